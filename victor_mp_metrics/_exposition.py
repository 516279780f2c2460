"""Building the ``/metrics`` response: gather, authorise, negotiate, compress.

Shared by the Flask route, the standalone server and the CLI, so every endpoint answers
the same way: the aggregated families of the whole deployment in multiprocess mode
(every worker, live and dead), the local registry otherwise; derived and system metrics;
self-metrics; OpenMetrics when the scraper asks for it; gzip when it accepts it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping

import psutil
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest, gzip_accepted
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from . import _compat, _derived, _runtime, _system
from ._mpdir import ReadReport
from ._selfmetrics import scrape_families
from .settings import Settings

log = logging.getLogger("victor_mp_metrics")

DISABLED_BODY = b"# victor_mp_metrics: metrics are disabled (VICTOR_METRICS_ENABLED=false)\n"


def count_read(report: ReadReport) -> None:
    """Turn what a read of the directory did into self-metrics."""
    if report.corrupt:
        _runtime.self_counter("corrupt_files").inc(report.corrupt)
    store = _runtime.RUNTIME.store
    if store is not None:
        new = store.take_write_errors()
        if new:
            _runtime.self_counter("write_errors").inc(new)


def deployment_problem(settings: Settings) -> str | None:
    """Why this process's totals are not the deployment's, if it is a Gunicorn worker run
    without a shared directory or without our hooks; None otherwise. Judged once."""
    found = _runtime.singleton("deployment_problem", lambda: [_judge_deployment(settings)])
    return found[0]


def _judge_deployment(settings: Settings) -> str | None:
    rt = _runtime.RUNTIME
    if rt.master_pid is not None or "gunicorn" not in sys.modules:
        return None
    try:
        parent = psutil.Process(os.getppid())
        if not any("gunicorn" in part for part in parent.cmdline()):
            return None
        workers = len(parent.children())
    except (psutil.Error, OSError):
        return None
    if not settings.multiprocess:
        if workers < 2:
            return None
        reason = ("no_shared_directory",
                  f"this Gunicorn worker has no PROMETHEUS_MULTIPROC_DIR, so each of the "
                  f"{workers} workers answers /metrics with its own share only. Run Gunicorn "
                  "with `-c gunicorn.conf.py` (or import victor_mp_metrics.gunicorn_hooks in "
                  "your config)")
    else:
        reason = ("no_hooks",
                  "Gunicorn runs without victor_mp_metrics.gunicorn_hooks: totals are "
                  "exact, but dead workers' files are never compacted and live gauges of "
                  "killed workers linger. Import the hooks in your gunicorn config")
    log.warning("victor_mp_metrics: %s.", reason[1])
    return reason[0]


def gather(settings: Settings | None = None, *, created: bool = False) -> list[Metric]:
    """Every metric family of the deployment, as a scrape would see it right now."""
    s = settings or _runtime.get_settings()
    if not s.enabled:
        return []
    started = time.perf_counter()
    files = nbytes = 0
    if s.multiproc_dir is not None:
        families, report = _runtime.reader(s.multiproc_dir).read(created=created)
        count_read(report)
        files, nbytes = report.files, report.nbytes
    else:
        # Single process: our metrics, and the user's own on prometheus_client's default
        # registry (a name on both is ours: it is the same metric).
        families = [_without_created(f) for f in _runtime.local_registry().collect()]
        ours = {f.name for f in families}
        families += [_without_created(f) for f in REGISTRY.collect() if f.name not in ours]
    families = _derived.with_derived(families)
    families.extend(_local_families(s, started, files, nbytes))
    return families


def _local_families(s: Settings, started: float, files: int, nbytes: int) -> list[Metric]:
    """The families this process adds after the directory's: system, self-metrics, and
    the misconfiguration flag."""
    families: list[Metric] = []
    try:
        families.extend(_system.collect_system_metrics())
    except Exception:  # processes come and go; the rest of the scrape must not suffer
        log.exception("victor_mp_metrics: system metrics skipped in this scrape")
    families.extend(scrape_families(time.perf_counter() - started, files, nbytes))
    problem = deployment_problem(s)
    if problem is not None:
        misconfigured = GaugeMetricFamily(
            "victor_metrics_misconfigured",
            "1 when the totals this process reports are wrong or incomplete (see the log).",
            labels=("reason",))
        misconfigured.add_metric((problem,), 1.0)
        families.append(misconfigured)
    return families


# The directory families `_derived` computes from (Metric names: a counter's lacks _total).
_DERIVED_INPUTS = frozenset(("victor_cache_hits", "victor_cache_hits_total",
                             "victor_cache_misses", "victor_cache_misses_total"))


def _text_answer(
    s: Settings, multiproc_dir: str, content_type: str, accept_encoding: str | None
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The plain text answer of a multiprocess directory, printed from the merged values
    (``DirectoryReader.read_text``) rather than through Metric objects: the same bytes as
    :func:`gather` + ``generate_latest``, many times faster at high cardinality."""
    started = time.perf_counter()
    found = _runtime.reader(multiproc_dir).read_text(
        _DERIVED_INPUTS, frozenset((_derived.HIT_RATE,)))
    count_read(found.report)
    if found.text is None:
        head = ""
        families = _derived.with_derived(found.families)
    else:
        head = found.text
        inputs = {id(f) for f in found.families}
        families = [f for f in _derived.with_derived(found.families) if id(f) not in inputs]
    families.extend(_local_families(s, started, found.report.files, found.report.nbytes))
    body = head.encode("utf-8") + generate_latest(FamiliesCollector(families))
    headers = [("Content-Type", content_type)]
    if gzip_accepted(accept_encoding):  # type: ignore[arg-type]
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return "200 OK", headers, body


def _without_created(family: Metric) -> Metric:
    # Multiprocess mode has no `_created` samples; single-process output matches it.
    family.samples = [s for s in family.samples if not s.name.endswith("_created")]
    return family


class FamiliesCollector:
    """A one-shot collector over already gathered families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families

    def describe(self) -> Iterable[Metric]:
        """The same families: prometheus_client's ``name[]`` filter looks names up here."""
        return self._families


def authorized(settings: Settings, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header satisfies the configured token or basic auth."""
    if settings.auth_token is None and settings.basic_auth is None:
        return True
    if not authorization:
        return False
    scheme, _, credentials = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and settings.auth_token is not None:
        return hmac.compare_digest(credentials.strip().encode(), settings.auth_token.encode())
    if scheme == "basic" and settings.basic_auth is not None:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(decoded, settings.basic_auth.encode())
    return False


def render(
    headers: Mapping[str, str],
    params: Mapping[str, list[str]] | None = None,
    settings: Settings | None = None,
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The full HTTP answer to a scrape: (status line, headers, body).

    ``headers`` needs ``Accept``, ``Accept-Encoding`` and ``Authorization`` if present
    (looked up case-insensitively); ``params`` may carry ``name[]`` filters.
    """
    s = settings or _runtime.get_settings()
    lower = {k.lower(): v for k, v in headers.items()}
    if not authorized(s, lower.get("authorization")):
        challenge = 'Bearer realm="metrics"' if s.auth_token else 'Basic realm="metrics"'
        return (
            "401 Unauthorized",
            [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", challenge)],
            b"Unauthorized: /metrics requires credentials (see VICTOR_METRICS_AUTH_TOKEN / "
            b"VICTOR_METRICS_BASIC_AUTH).\n",
        )
    if not s.enabled:
        return "200 OK", [("Content-Type", "text/plain; charset=utf-8")], DISABLED_BODY
    if s.multiproc_dir is not None and "name[]" not in (params or {}):
        encoder, content_type = choose_encoder(lower.get("accept"))  # type: ignore[arg-type]
        if encoder is generate_latest:  # text 0.0.4, prometheus_client's default escaping
            return _text_answer(s, s.multiproc_dir, content_type,
                                lower.get("accept-encoding"))
    registry = CollectorRegistry(auto_describe=False)
    openmetrics = "application/openmetrics-text" in (lower.get("accept") or "")
    registry.register(FamiliesCollector(gather(s, created=openmetrics)))
    return _compat.bake_output(
        registry, lower.get("accept"), lower.get("accept-encoding"), params or {}
    )
