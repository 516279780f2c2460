"""Building the ``/metrics`` response: gather, authorise, negotiate, compress.

Shared by the Flask route, the standalone server and the CLI, so every endpoint answers
the same way: the aggregated families of the whole deployment in multiprocess mode
(every worker, live and dead), the local registry otherwise; derived and system metrics;
self-metrics; OpenMetrics when the scraper asks for it; gzip when it accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import _bake_output
from prometheus_client.metrics_core import Metric

from . import _state, selfmetrics
from .aggregate import DirectoryCollector
from .settings import Settings

log = logging.getLogger("victor_mp_metrics")
_collectors: dict[str, DirectoryCollector] = {}
_collectors_lock = threading.Lock()

DISABLED_BODY = b"# victor_mp_metrics: metrics are disabled (VICTOR_METRICS_ENABLED=false)\n"


def directory_collector(directory: str) -> DirectoryCollector:
    """This process's cached aggregator of ``directory`` (its caches live across scrapes)."""
    with _collectors_lock:
        found = _collectors.get(directory)
        if found is None:
            found = _collectors[directory] = DirectoryCollector(directory)
        return found


def gather(settings: Settings | None = None) -> list[Metric]:
    """Every metric family of the deployment, as a scrape would see it right now."""
    s = settings or _state.get_settings()
    if not s.enabled:
        return []
    started = time.perf_counter()
    files = nbytes = 0
    if s.multiproc_dir is not None:
        collector = directory_collector(s.multiproc_dir)
        families = list(collector.collect())
        files, nbytes = collector.stats.last_files, collector.stats.last_bytes
    else:
        families = [_without_created(f) for f in _state.local_registry().collect()]
    from . import derived, system

    families = derived.with_derived(families)
    try:
        families.extend(system.collect_system_metrics())
    except Exception:  # processes come and go; the rest of the scrape must not suffer
        log.exception("victor_mp_metrics: system metrics skipped in this scrape")
    families.extend(selfmetrics.scrape_families(time.perf_counter() - started, files, nbytes))
    return families


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
    s = settings or _state.get_settings()
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
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(gather(s)))  # type: ignore[arg-type]
    status, out_headers, body = _bake_output(
        registry, lower.get("accept"), lower.get("accept-encoding"), params or {}, False
    )
    return status, list(out_headers), body


@_state.on_reset
def _reset() -> None:
    with _collectors_lock:
        _collectors.clear()


def _after_fork_in_child() -> None:
    # A scrape thread of the parent may have held these locks at fork time.
    global _collectors_lock
    _collectors_lock = threading.Lock()
    _collectors.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
