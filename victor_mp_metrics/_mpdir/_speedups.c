/* The request path's locked writes, in C (optional: _mpdir._writer has the same functions
   in Python, used when this extension was not built; a property test holds them equal).

   add_each(values, amounts) is FileValue.add_each: under the store lock (item 0 of
   _writer's _lock_cell, given once with bind(cell)), for each i: values[i]._value +=
   amounts[i] and, when values[i]._file is not None, item values[i]._index of its float64
   view is set to the new value (a pending value only counts in memory, as in Python).

   observe_and_add(values, bounds, extra, amount) is a histogram observation plus one
   more addition under one acquisition of the lock: values are (sum, bucket 0, ...,
   bucket n-1, other); sum += amount, the bucket of the first bound >= amount += 1
   (bisect_left, as Histogram.observe), other += extra. A request's end: its duration
   and the in-flight gauge's -1.

   The same float additions in the same order as the Python functions, so the same bits
   in the files. Values are FileValue instances (slots read at their offsets, found once
   per type); between acquire and release no Python code runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *lock_cell;  /* the list holding the store lock; set by bind() */
static PyObject *s_acquire, *s_release, *s_value, *s_file, *s_index, *s_doubles;

/* The store lock last used and its bound acquire/release (looked up again when the cell
   holds another lock: after fork the child binds a new one). */
static PyObject *cached_lock, *cached_acquire, *cached_release;

/* Where a type keeps a __slots__ attribute: the offset of its object pointer, or -1 when
   the attribute is anything but a plain slot (then the generic getattr is used). */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t value, file, index;
} ValueSlots;
static ValueSlots value_slots = {NULL, -1, -1, -1};
static PyTypeObject *file_type;
static Py_ssize_t doubles_offset = -1;

static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(type, name);  /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return -1;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || (member->flags & READONLY))
        return -1;
    return member->offset;
}

/* A new reference to obj.name, through its slot when known. */
static PyObject *
get_slot(PyObject *obj, Py_ssize_t offset, PyObject *name)
{
    if (offset < 0)
        return PyObject_GetAttr(obj, name);
    PyObject *found = *(PyObject **)((char *)obj + offset);
    if (found == NULL) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    Py_INCREF(found);
    return found;
}

static int
set_slot(PyObject *obj, Py_ssize_t offset, PyObject *name, PyObject *value)
{
    if (offset < 0)
        return PyObject_SetAttr(obj, name, value);
    PyObject **where = (PyObject **)((char *)obj + offset);
    PyObject *old = *where;
    Py_INCREF(value);
    *where = value;
    Py_XDECREF(old);
    return 0;
}

static int
store(PyObject *value, PyObject *amount)
{
    PyTypeObject *type = Py_TYPE(value);
    if (value_slots.type != type) {
        Py_INCREF(type);  /* kept while cached: no other type can take its address */
        Py_XSETREF(value_slots.type, type);
        value_slots.value = slot_offset(type, s_value);
        value_slots.file = slot_offset(type, s_file);
        value_slots.index = slot_offset(type, s_index);
    }
    PyObject *old = get_slot(value, value_slots.value, s_value);
    if (old == NULL)
        return -1;
    double sum = PyFloat_AsDouble(old);
    Py_DECREF(old);
    if (sum == -1.0 && PyErr_Occurred())
        return -1;
    double add = PyFloat_AsDouble(amount);
    if (add == -1.0 && PyErr_Occurred())
        return -1;
    sum += add;
    PyObject *now = PyFloat_FromDouble(sum);
    if (now == NULL)
        return -1;
    int failed = set_slot(value, value_slots.value, s_value, now);
    Py_DECREF(now);
    if (failed)
        return -1;
    PyObject *file = get_slot(value, value_slots.file, s_file);
    if (file == NULL)
        return -1;
    if (file == Py_None) {  /* pending: written whole when the file is had again */
        Py_DECREF(file);
        return 0;
    }
    if (file_type != Py_TYPE(file)) {
        Py_INCREF(Py_TYPE(file));
        Py_XSETREF(file_type, Py_TYPE(file));
        doubles_offset = slot_offset(file_type, s_doubles);
    }
    PyObject *doubles = get_slot(file, doubles_offset, s_doubles);
    Py_DECREF(file);
    if (doubles == NULL)
        return -1;
    PyObject *index_obj = get_slot(value, value_slots.index, s_index);
    if (index_obj == NULL) {
        Py_DECREF(doubles);
        return -1;
    }
    Py_ssize_t index = PyLong_AsSsize_t(index_obj);
    Py_DECREF(index_obj);
    if (index == -1 && PyErr_Occurred()) {
        Py_DECREF(doubles);
        return -1;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(doubles, &view, PyBUF_CONTIG | PyBUF_FORMAT) < 0) {
        Py_DECREF(doubles);
        return -1;
    }
    Py_DECREF(doubles);
    if (view.itemsize != sizeof(double) || view.format == NULL || strcmp(view.format, "d")
            != 0 || index < 0 || index >= view.len / (Py_ssize_t)sizeof(double)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "victor_mp_metrics: value index outside its file");
        return -1;
    }
    ((double *)view.buf)[index] = sum;
    PyBuffer_Release(&view);
    return 0;
}

/* The store lock, acquired; a new reference to its release method (NULL on error). */
static PyObject *
acquire_store_lock(void)
{
    if (lock_cell == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "victor_mp_metrics._speedups used before bind()");
        return NULL;
    }
    PyObject *lock = PyList_GetItem(lock_cell, 0);
    if (lock == NULL)
        return NULL;
    if (lock != cached_lock) {
        PyObject *acquire = PyObject_GetAttr(lock, s_acquire);
        PyObject *release = acquire ? PyObject_GetAttr(lock, s_release) : NULL;
        if (release == NULL) {
            Py_XDECREF(acquire);
            return NULL;
        }
        Py_INCREF(lock);
        Py_XSETREF(cached_lock, lock);
        Py_XSETREF(cached_acquire, acquire);
        Py_XSETREF(cached_release, release);
    }
    PyObject *release = cached_release;
    Py_INCREF(release);  /* the cell may be rebound (after fork) while we hold the lock */
    PyObject *got = PyObject_CallNoArgs(cached_acquire);
    if (got == NULL) {
        Py_DECREF(release);
        return NULL;
    }
    Py_DECREF(got);
    return release;
}

/* Release the lock; return NULL with the first error (of the stores or of the release)
   set, else None. */
static PyObject *
release_store_lock(PyObject *release, int failed)
{
    PyObject *type = NULL, *exc = NULL, *tb = NULL;
    if (failed)
        PyErr_Fetch(&type, &exc, &tb);  /* release the lock first, then raise */
    PyObject *released = PyObject_CallNoArgs(release);
    Py_DECREF(release);
    if (released == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(released);
    if (failed) {
        PyErr_Restore(type, exc, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
add_each(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "add_each(values, amounts) takes two tuples");
        return NULL;
    }
    PyObject *values = args[0], *amounts = args[1];
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    if (PyTuple_GET_SIZE(amounts) != n) {
        PyErr_SetString(PyExc_ValueError, "add_each: as many amounts as values");
        return NULL;
    }
    PyObject *release = acquire_store_lock();
    if (release == NULL)
        return NULL;
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++)
        failed = store(PyTuple_GET_ITEM(values, i), PyTuple_GET_ITEM(amounts, i));
    return release_store_lock(release, failed);
}

static PyObject *
observe_and_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])
            || !PyFloat_Check(args[2]) || !PyFloat_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "observe_and_add(values, bounds, extra, amount): tuples and floats");
        return NULL;
    }
    PyObject *values = args[0], *bounds = args[1], *extra = args[2], *amount = args[3];
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    if (PyTuple_GET_SIZE(values) != n + 2) {
        PyErr_SetString(PyExc_ValueError, "observe_and_add: values are sum, buckets, extra");
        return NULL;
    }
    double v = PyFloat_AS_DOUBLE(amount);
    Py_ssize_t i = 0;  /* bisect_left: the first bound >= v (NaN: past the last) */
    while (i < n) {
        PyObject *bound = PyTuple_GET_ITEM(bounds, i);
        if (!PyFloat_Check(bound)) {
            PyErr_SetString(PyExc_TypeError, "observe_and_add: bounds are floats");
            return NULL;
        }
        if (PyFloat_AS_DOUBLE(bound) >= v)
            break;
        i++;
    }
    if (i == n) {
        PyErr_SetString(PyExc_ValueError, "observe_and_add: no bucket takes the amount");
        return NULL;
    }
    PyObject *one = PyFloat_FromDouble(1.0);
    if (one == NULL)
        return NULL;
    PyObject *release = acquire_store_lock();
    if (release == NULL) {
        Py_DECREF(one);
        return NULL;
    }
    int failed = store(PyTuple_GET_ITEM(values, 0), amount)
        || store(PyTuple_GET_ITEM(values, 1 + i), one)
        || store(PyTuple_GET_ITEM(values, n + 1), extra);
    Py_DECREF(one);
    return release_store_lock(release, failed);
}

static PyObject *
bind(PyObject *module, PyObject *cell)
{
    if (!PyList_Check(cell) || PyList_GET_SIZE(cell) != 1) {
        PyErr_SetString(PyExc_TypeError, "bind(cell): a list holding the store lock");
        return NULL;
    }
    Py_INCREF(cell);
    Py_XSETREF(lock_cell, cell);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_each", (PyCFunction)(void (*)(void))add_each, METH_FASTCALL,
     "add_each(values, amounts): FileValue.add_each under the bound store lock."},
    {"observe_and_add", (PyCFunction)(void (*)(void))observe_and_add, METH_FASTCALL,
     "observe_and_add(values, bounds, extra, amount): under the bound store lock, "
     "values[0] += amount, values[1 + bisect_left(bounds, amount)] += 1, "
     "values[-1] += extra."},
    {"bind", bind, METH_O, "bind(cell): the list whose item 0 is the store lock."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "The request path's locked writes in C (see _mpdir._writer).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_acquire = PyUnicode_InternFromString("acquire");
    s_release = PyUnicode_InternFromString("release");
    s_value = PyUnicode_InternFromString("_value");
    s_file = PyUnicode_InternFromString("_file");
    s_index = PyUnicode_InternFromString("_index");
    s_doubles = PyUnicode_InternFromString("doubles");
    if (!s_acquire || !s_release || !s_value || !s_file || !s_index || !s_doubles)
        return NULL;
    return PyModule_Create(&module_def);
}
