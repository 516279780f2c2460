"""Request overhead of the generic middlewares against the usual exporters, in process.

The same tiny app per framework, with a route template (``/items/{id}``), is called
directly, with no server and no sockets, the way a worker calls it; the CPU time per
request isolates the instrumentation's own cost. Every variant runs in a fresh
subprocess with its own empty ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess mode, as under
Gunicorn, for every library):

* FastAPI (ASGI, driven by one event loop, one request after the other):
  ``fastapi-plain`` (no metrics), ``fastapi-ours``
  (``app.add_middleware(victor_mp_metrics.asgi.MetricsMiddleware)``), ``fastapi-pfi``
  (prometheus-fastapi-instrumentator ``Instrumentator().instrument(app)``, its default
  metrics) and ``fastapi-se`` (starlette-exporter ``PrometheusMiddleware``);
* Django (WSGI, ``examples/django``'s URLconf, the body read and closed like a server):
  ``django-plain``, ``django-ours`` (``MetricsMiddleware`` around the WSGI app and
  ``DjangoRouteMiddleware``) and ``django-prometheus`` (its Before and After middlewares).

Variants take turns, 3 runs each, best of 5 repeats per run, best run kept. Overhead =
variant - plain of its framework; theirs / ours divides an exporter's overhead by ours.
Verdicts: ours adds less than each exporter it is compared with, and at most 15 us per
request. That bound is a regression guard set after measuring about 11 us on the 2-core
reference machine, where ``bench/http.py --wsgi-only`` measured 12 us for the Flask
extension: all three integrations share the recording path (``RequestTracker``,
``instrument.record_request``), whose own goal is issue 16's.

    python bench/frameworks.py              # 20000 requests per repeat
    python bench/frameworks.py --quick      # 3000
"""

from __future__ import annotations

import os
import sys

# As in http.py: bench/http.py would shadow the standard library's http package, so this
# script's directory goes last (`_common` is still found), and the repository root first,
# so this checkout's victor_mp_metrics is measured.
if os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, Verdicts, library, load_average, ratio, table

VARIANTS = {
    "fastapi-plain": "FastAPI, no metrics",
    "fastapi-ours": "FastAPI + victor_mp_metrics.asgi.MetricsMiddleware",
    "fastapi-pfi": "FastAPI + prometheus-fastapi-instrumentator",
    "fastapi-se": "FastAPI + starlette-exporter",
    "django-plain": "Django, no metrics",
    "django-ours": "Django + victor_mp_metrics.wsgi.MetricsMiddleware",
    "django-prometheus": "Django + django-prometheus",
}
GOAL_US = 15.0


# --- in the subprocess ---------------------------------------------------------------------


def fastapi_app(variant: str) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    if variant == "fastapi-ours":
        from victor_mp_metrics.asgi import MetricsMiddleware

        library()
        app.add_middleware(MetricsMiddleware)
    elif variant == "fastapi-pfi":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app)
    elif variant == "fastapi-se":
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware)
    return app


def asgi_driver(app: Any) -> Callable[[int], None]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/items/7", "raw_path": b"/items/7", "root_path": "",
        "query_string": b"", "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        pass

    async def many(count: int) -> None:
        for _ in range(count):
            await app(dict(scope), receive, send)

    loop = asyncio.new_event_loop()  # no lifespan: none of the variants needs one
    return lambda count: loop.run_until_complete(many(count))


def django_app(variant: str) -> Any:
    import django
    from django.conf import settings

    middleware = []
    apps: list[str] = []
    if variant == "django-ours":
        middleware = ["victor_mp_metrics.wsgi.DjangoRouteMiddleware"]
    elif variant == "django-prometheus":
        apps = ["django_prometheus"]
        middleware = ["django_prometheus.middleware.PrometheusBeforeMiddleware",
                      "django_prometheus.middleware.PrometheusAfterMiddleware"]  # fmt: skip
    settings.configure(
        DEBUG=False, SECRET_KEY="bench", ALLOWED_HOSTS=["*"], ROOT_URLCONF="examples.django.urls",
        MIDDLEWARE=middleware, INSTALLED_APPS=apps, DATABASES={}, USE_TZ=True,
    )  # fmt: skip
    django.setup()
    from django.core.wsgi import get_wsgi_application

    app = get_wsgi_application()
    if variant == "django-ours":
        from victor_mp_metrics.wsgi import MetricsMiddleware

        library()
        app = MetricsMiddleware(app)
    return app


def wsgi_driver(app: Any) -> Callable[[int], None]:
    from werkzeug.test import EnvironBuilder

    base = EnvironBuilder(path="/items/7", base_url="http://127.0.0.1:8000").get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None):
        return lambda data: None

    def many(count: int) -> None:
        for _ in range(count):
            body = app(dict(base), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return many


def child(variant: str, number: int) -> None:
    """Print the best CPU us per request of ``number`` requests, 5 repeats."""
    if variant.startswith("fastapi"):
        run = asgi_driver(fastapi_app(variant))
    else:
        run = wsgi_driver(django_app(variant))
    run(300)  # warm-up: every cache and label child made
    best = min(timeit.Timer(lambda: run(number), timer=time.process_time).repeat(5, 1))
    print(best / number * 1e6)


# --- the parent ----------------------------------------------------------------------------


def measure(variants: list[str], number: int, rounds: int, workdir: Path) -> dict[str, float]:
    costs: dict[str, float] = {}
    for round_ in range(rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("VICTOR_", "PROMETHEUS_MULTIPROC_DIR", "DJANGO_"))}
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=workdir)
            env["PYTHONPATH"] = str(ROOT)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--number", str(number)],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{proc.stderr}")
            us = float(proc.stdout.split()[-1])
            costs[variant] = min(us, costs.get(variant, us))
    return costs


def report(costs: dict[str, float], number: int) -> int:
    rows = []
    for variant, us in costs.items():
        plain = costs[variant.split("-")[0] + "-plain"]
        rows.append([variant, VARIANTS[variant], f"{us:.1f}", f"{us - plain:+.1f}"])
    print(f"In-process cost, CPU us per GET /items/7 (best of 3 runs x 5 repeats of {number})")
    print(table(["variant", "what", "us/request", "overhead us"], rows))
    print()
    verdicts = Verdicts()
    for framework, competitors in (("fastapi", ("pfi", "se")), ("django", ("prometheus",))):
        ours = costs[f"{framework}-ours"] - costs[f"{framework}-plain"]
        verdicts.check(
            f"{framework}: victor_mp_metrics adds <= {GOAL_US:.0f} us per request",
            ours <= GOAL_US, f"+{ours:.1f} us",
        )  # fmt: skip
        for name in competitors:
            theirs = costs[f"{framework}-{name}"] - costs[f"{framework}-plain"]
            verdicts.check(
                f"{framework}: victor_mp_metrics adds less than {framework}-{name}",
                ours < theirs,
                f"+{ours:.1f} us vs +{theirs:.1f} us: theirs / ours = "
                f"{ratio(theirs / ours) if ours > 0 else 'inf'}",
            )
    print(verdicts.report())
    return 1 if verdicts.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3000 requests per repeat")
    parser.add_argument("--number", type=int, default=0, help="requests per repeat")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    number = args.number or (3000 if args.quick else 20000)
    if args.child:
        child(args.child, number)
        return 0
    print(f"{library()}; {load_average()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="victor-bench-frameworks-"))
    try:
        costs = measure(list(VARIANTS), number, 3, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(load_average())
    return report(costs, number)


if __name__ == "__main__":
    sys.exit(main())
