"""The small Flask app of ``bench/http.py``, in three variants that differ only in metrics.

Gunicorn app specs (from the repository root, where ``bench`` is a namespace package; not
with ``--pythonpath bench``, where ``bench/http.py`` would shadow the stdlib's ``http``):

* ``bench.apps:plain``: no metrics at all;
* ``bench.apps:ours``: ``victor_mp_metrics.flask_ext.VictorMetrics`` (with
  ``VICTOR_METRICS_ENABLED=false`` this is the "disabled" variant);
* ``bench.apps:pfe``: prometheus_flask_exporter's ``GunicornPrometheusMetrics`` in
  multiprocess mode (PROMETHEUS_MULTIPROC_DIR must be set before it is imported; serve it with
  ``-c bench/gunicorn_pfe.conf.py``, whose ``child_exit`` marks dead workers).

Each variant is built on first access (PEP 562), so importing this module builds none and
imports neither metrics library.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

__all__ = ["make_ours", "make_pfe", "make_plain"]  # and, built on access: ours, pfe, plain


def _base() -> Flask:
    app = Flask(__name__)

    @app.get("/ping")
    def ping() -> dict[str, object]:
        return {"status": "ok", "service": "victor-bench", "items": [1, 2, 3]}

    return app


def make_plain() -> Flask:
    """The app without any metrics."""
    return _base()


def make_ours() -> Flask:
    """The app with our Flask extension (request metrics, in-flight gauge, /metrics)."""
    from victor_mp_metrics.flask_ext import VictorMetrics

    app = _base()
    VictorMetrics(app)
    return app


def make_pfe() -> Flask:
    """The app with prometheus_flask_exporter in Gunicorn multiprocess mode."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    app = _base()
    GunicornPrometheusMetrics(app)
    return app


_FACTORIES: dict[str, Callable[[], Flask]] = {
    "ours": make_ours,
    "pfe": make_pfe,
    "plain": make_plain,
}


def __getattr__(name: str) -> Flask:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = globals()[name] = factory()
    return app
