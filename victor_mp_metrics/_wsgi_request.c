/* One WSGI request of wsgi.MetricsMiddleware, in C (optional: wsgi._Request is the same
   object in Python, used without this extension and for requests carrying a traceparent).

   The life cycle is instrument.RequestTracker's, for a request without an exemplar:

   - created: in flight (metrics.enter()), its start time taken;
   - capture(status, headers, *exc_info) is the start_response the app gets: the first
     call counts the request on middleware.endpoint_of(environ) with the status's
     error_type rule (answered()), then hands the response to the server's start_response;
   - answered(endpoint, status, error_type): counts it once: children of (endpoint, method)
     .count() for a known route's success, metrics.count(...) (Python: new children, the
     error counter and its error_type rule) otherwise;
   - iterating gives the app's body; close() closes it, then end(): once, the duration in
     ms goes to children.end(duration) (the histogram and the in-flight -1 under one lock)
     or, when that is None, to children.observe(duration, None) then metrics.leave();
     a request never answered only leaves the in-flight gauge.

   Recording errors (an Exception) are logged by the function given to bind() and never
   raised, as RequestTracker does; anything else (SystemExit of a worker timeout) passes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <time.h>

/* Bound by instrument (bind) and wsgi (set_error_type_key) when they are imported. */
static PyObject *standard_methods;  /* frozenset of the nine methods */
static PyObject *other_method;      /* "OTHER" */
static PyObject *singletons;        /* the runtime's singletons dict (cleared, never replaced) */
static PyObject *metrics_key;       /* the request metrics' name in it */
static PyObject *request_metrics;   /* request_metrics(): makes them when absent */
static PyObject *log_failure;       /* log_failure(message, exception) */
static PyObject *error_type_key;    /* environ key of a named error_type */
static PyObject *s_enter, *s_leave, *s_children, *s_count, *s_end, *s_observe,
    *s_endpoint_of, *s_close;

typedef struct {
    PyObject_HEAD
    PyObject *metrics;         /* instrument._RequestMetrics, or NULL */
    PyObject *method;
    PyObject *environ;
    PyObject *start_response;
    PyObject *middleware;
    PyObject *body;
    PyObject *endpoint;        /* NULL until answered */
    PyObject *children;        /* NULL until answered (or when counting failed) */
    double started;
    int done;
} Request;

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.perf_counter's clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Log the Exception being raised with ``message`` and clear it; leave anything else
   (SystemExit, KeyboardInterrupt) raised. Returns 0 if cleared, -1 if still raised. */
static int
swallow(const char *message)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *text = PyUnicode_FromString(message);
    PyObject *done = NULL;
    if (text != NULL && log_failure != NULL)
        done = PyObject_CallFunctionObjArgs(log_failure, text, value ? value : Py_None, NULL);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (done == NULL) {
        PyErr_Clear();  /* the log itself failed: nothing better to do */
        return 0;
    }
    Py_DECREF(done);
    return 0;
}

static PyObject *
call_method0(PyObject *obj, PyObject *name)
{
    return PyObject_CallMethodNoArgs(obj, name);
}

static int
Request_traverse(Request *self, visitproc visit, void *arg)
{
    Py_VISIT(self->metrics);
    Py_VISIT(self->method);
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response);
    Py_VISIT(self->middleware);
    Py_VISIT(self->body);
    Py_VISIT(self->endpoint);
    Py_VISIT(self->children);
    return 0;
}

static int
Request_clear(Request *self)
{
    Py_CLEAR(self->metrics);
    Py_CLEAR(self->method);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->body);
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->children);
    return 0;
}

static void
Request_dealloc(Request *self)
{
    PyObject_GC_UnTrack(self);
    Request_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Request(method, environ, start_response, middleware): in flight from here. */
static PyObject *
Request_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *method, *environ, *start_response, *middleware;
    if (!PyArg_ParseTuple(args, "OOOO:Request", &method, &environ, &start_response,
                          &middleware))
        return NULL;
    if (standard_methods == NULL || error_type_key == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_wsgi_request used before it was bound");
        return NULL;
    }
    Request *self = (Request *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    int standard = PyUnicode_Check(method) ? PySet_Contains(standard_methods, method) : 0;
    if (standard < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->method = Py_NewRef(standard ? method : other_method);
    self->environ = Py_NewRef(environ);
    self->start_response = Py_NewRef(start_response);
    self->middleware = Py_NewRef(middleware);
    self->body = Py_NewRef(Py_None);
    PyObject *metrics = PyDict_GetItemWithError(singletons, metrics_key);  /* borrowed */
    if (metrics != NULL)
        Py_INCREF(metrics);
    else if (!PyErr_Occurred())
        metrics = PyObject_CallNoArgs(request_metrics);
    PyObject *done = NULL;
    if (metrics != NULL) {
        self->metrics = metrics;
        done = call_method0(metrics, s_enter);
    }
    if (done == NULL) {
        if (swallow("victor_mp_metrics: could not count the request in flight") < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    else {
        Py_DECREF(done);
    }
    self->started = now();
    return (PyObject *)self;
}

/* Count the request once; 0, or -1 with a non-Exception raised. */
static int
answer(Request *self, PyObject *endpoint, PyObject *status, PyObject *error_type)
{
    if (self->endpoint != NULL)
        return 0;
    self->endpoint = Py_NewRef(endpoint);
    if (self->metrics == NULL)  /* its lookup failed when the request came: logged then */
        return 0;
    long code = PyLong_AsLong(status);
    if (code == -1 && PyErr_Occurred())
        return swallow("victor_mp_metrics: could not record request metrics");
    PyObject *children = NULL;
    PyObject *table = PyObject_GetAttr(self->metrics, s_children);
    if (table != NULL && PyDict_Check(table) && code < 400) {
        PyObject *key = PyTuple_Pack(2, endpoint, self->method);
        if (key != NULL) {
            children = PyDict_GetItemWithError(table, key);  /* borrowed */
            Py_XINCREF(children);
            Py_DECREF(key);
        }
    }
    Py_XDECREF(table);
    if (PyErr_Occurred()) {
        Py_XDECREF(children);
        return swallow("victor_mp_metrics: could not record request metrics");
    }
    PyObject *done;
    if (children != NULL) {  /* a known route's success: the common case of count() */
        done = call_method0(children, s_count);
    }
    else {
        children = PyObject_CallMethodObjArgs(
            self->metrics, s_count, endpoint, self->method, status,
            code >= 400 ? error_type : Py_None, NULL);
        done = children ? Py_NewRef(Py_None) : NULL;
    }
    if (done == NULL) {
        Py_XDECREF(children);
        return swallow("victor_mp_metrics: could not record request metrics");
    }
    Py_DECREF(done);
    Py_XSETREF(self->children, children);
    return 0;
}

static PyObject *
Request_answered(Request *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "answered(endpoint, status, error_type=None)");
        return NULL;
    }
    if (answer(self, args[0], args[1], nargs == 3 ? args[2] : Py_None) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Request_end(Request *self, PyObject *unused)
{
    if (self->done)
        Py_RETURN_NONE;
    self->done = 1;
    /* in ms on a grid of 1/1024 ms, as instrument._ms: sums exact whatever compaction
       regroups (_mpdir._merge.on_grid) */
    PyObject *elapsed = PyFloat_FromDouble(floor((now() - self->started) * 1000.0 * 1024.0)
                                           / 1024.0);
    if (elapsed == NULL)
        return NULL;
    PyObject *done = NULL;
    PyObject *children = self->children;
    if (self->metrics == NULL) {
        done = Py_NewRef(Py_None);
    }
    else if (children == NULL) {
        done = call_method0(self->metrics, s_leave);  /* the gauge creation counted in */
    }
    else {
        PyObject *end = PyObject_GetAttr(children, s_end);
        if (end != NULL && end != Py_None) {
            done = PyObject_CallOneArg(end, elapsed);  /* timed and out, under one lock */
        }
        else if (end != NULL) {  /* timed before it leaves the in-flight gauge */
            done = PyObject_CallMethodObjArgs(children, s_observe, elapsed, Py_None, NULL);
            if (done != NULL) {
                Py_DECREF(done);
                done = call_method0(self->metrics, s_leave);
            }
        }
        Py_XDECREF(end);
    }
    Py_DECREF(elapsed);
    if (done == NULL) {
        if (swallow("victor_mp_metrics: could not record request metrics") < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    Py_DECREF(done);
    Py_RETURN_NONE;
}

/* The app's start_response: count the request (first call), then the server's. */
static PyObject *
Request_capture(Request *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "start_response(status, headers, exc_info=None)");
        return NULL;
    }
    if (self->endpoint == NULL) {
        PyObject *status = args[0];
        if (!PyUnicode_Check(status)) {
            PyErr_SetString(PyExc_TypeError, "the WSGI status must be a str");
            return NULL;
        }
        PyObject *head = PyUnicode_Substring(status, 0, 3);
        PyObject *code = head ? PyLong_FromUnicodeObject(head, 10) : NULL;
        Py_XDECREF(head);
        if (code == NULL)
            return NULL;  /* int(status[:3]) raises the same to the app */
        PyObject *endpoint = PyObject_CallMethodOneArg(self->middleware, s_endpoint_of,
                                                       self->environ);
        if (endpoint == NULL) {
            Py_DECREF(code);
            return NULL;
        }
        PyObject *error_type = NULL;
        if (PyDict_CheckExact(self->environ)) {
            error_type = PyDict_GetItemWithError(self->environ, error_type_key);
            Py_XINCREF(error_type);
        }
        if (error_type == NULL && PyErr_Occurred()) {
            Py_DECREF(code);
            Py_DECREF(endpoint);
            return NULL;
        }
        int failed = answer(self, endpoint, code, error_type ? error_type : Py_None);
        Py_XDECREF(error_type);
        Py_DECREF(code);
        Py_DECREF(endpoint);
        if (failed < 0)
            return NULL;
    }
    return PyObject_Vectorcall(self->start_response, args, nargs, NULL);
}

static PyObject *
Request_iter(Request *self)
{
    return PyObject_GetIter(self->body);
}

/* Close the app's body (when it can be), then end the request, even if closing failed. */
static PyObject *
Request_close(Request *self, PyObject *unused)
{
    PyObject *closed = Py_NewRef(Py_None);
    PyObject *close = PyObject_GetAttr(self->body, s_close);
    if (close == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear();  /* a body without close() */
        else
            Py_CLEAR(closed);
    }
    else {
        Py_DECREF(closed);
        closed = PyObject_CallNoArgs(close);
        Py_DECREF(close);
    }
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (closed == NULL)
        PyErr_Fetch(&type, &value, &tb);
    PyObject *ended = Request_end(self, NULL);
    if (closed == NULL) {
        if (ended == NULL) {  /* end's own error wins, as a finally block's would */
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            return NULL;
        }
        Py_DECREF(ended);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_DECREF(closed);
    return ended;
}

static PyObject *
Request_get_body(Request *self, void *closure)
{
    return Py_NewRef(self->body);
}

static int
Request_set_body(Request *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "body cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->body, Py_NewRef(value));
    return 0;
}

static PyObject *
Request_get_endpoint(Request *self, void *closure)
{
    return Py_NewRef(self->endpoint ? self->endpoint : Py_None);
}

static PyGetSetDef Request_getset[] = {
    {"body", (getter)Request_get_body, (setter)Request_set_body,
     "the app's response iterable", NULL},
    {"endpoint", (getter)Request_get_endpoint, NULL,
     "the route it was counted on, None before", NULL},
    {NULL},
};

static PyMethodDef Request_methods[] = {
    {"capture", (PyCFunction)(void (*)(void))Request_capture, METH_FASTCALL,
     "the start_response the app gets"},
    {"answered", (PyCFunction)(void (*)(void))Request_answered, METH_FASTCALL,
     "answered(endpoint, status, error_type=None): count it once"},
    {"end", (PyCFunction)Request_end, METH_NOARGS, "time it and take it out of flight, once"},
    {"close", (PyCFunction)Request_close, METH_NOARGS, "close the body, then end()"},
    {NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "victor_mp_metrics._wsgi_request.Request",
    .tp_basicsize = sizeof(Request),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One WSGI request (see the module's source).",
    .tp_new = Request_new,
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_traverse = (traverseproc)Request_traverse,
    .tp_clear = (inquiry)Request_clear,
    .tp_iter = (getiterfunc)Request_iter,
    .tp_methods = Request_methods,
    .tp_getset = Request_getset,
};

/* bind(standard_methods, other_method, singletons, metrics_key, request_metrics,
        log_failure): instrument's request life cycle. */
static PyObject *
bind(PyObject *module, PyObject *args)
{
    PyObject *methods, *other, *table, *key, *factory, *log;
    if (!PyArg_ParseTuple(args, "O!UO!UOO:bind", &PyFrozenSet_Type, &methods, &other,
                          &PyDict_Type, &table, &key, &factory, &log))
        return NULL;
    Py_XSETREF(standard_methods, Py_NewRef(methods));
    Py_XSETREF(other_method, Py_NewRef(other));
    Py_XSETREF(singletons, Py_NewRef(table));
    Py_XSETREF(metrics_key, Py_NewRef(key));
    Py_XSETREF(request_metrics, Py_NewRef(factory));
    Py_XSETREF(log_failure, Py_NewRef(log));
    Py_RETURN_NONE;
}

/* set_error_type_key(key): the environ key of a named error_type (wsgi's). */
static PyObject *
set_error_type_key(PyObject *module, PyObject *key)
{
    if (!PyUnicode_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "set_error_type_key(key): a str");
        return NULL;
    }
    Py_XSETREF(error_type_key, Py_NewRef(key));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(standard_methods, other_method, singletons, metrics_key, request_metrics, "
     "log_failure)"},
    {"set_error_type_key", set_error_type_key, METH_O, "set_error_type_key(key)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_wsgi_request",
    "One WSGI request of wsgi.MetricsMiddleware, in C (see the source).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__wsgi_request(void)
{
    s_enter = PyUnicode_InternFromString("enter");
    s_leave = PyUnicode_InternFromString("leave");
    s_children = PyUnicode_InternFromString("children");
    s_count = PyUnicode_InternFromString("count");
    s_end = PyUnicode_InternFromString("end");
    s_observe = PyUnicode_InternFromString("observe");
    s_endpoint_of = PyUnicode_InternFromString("endpoint_of");
    s_close = PyUnicode_InternFromString("close");
    if (!s_enter || !s_leave || !s_children || !s_count || !s_end || !s_observe
            || !s_endpoint_of || !s_close)
        return NULL;
    if (PyType_Ready(&RequestType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Request", (PyObject *)&RequestType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
