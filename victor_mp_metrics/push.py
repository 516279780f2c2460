"""Pushing the aggregated metrics of a multiprocess directory to a Prometheus Pushgateway.

For batch jobs: a job whose processes (a ``multiprocessing`` Pool, a
``ProcessPoolExecutor``, forked or spawned) write to ``PROMETHEUS_MULTIPROC_DIR`` ends,
and its totals go to a Pushgateway for Prometheus to scrape there. What is pushed is what
``victor-metrics dump`` prints for the directory, as one group:

* counters, histograms and summaries: the totals of every process that ever wrote to the
  directory, live and dead, so the workers of a finished pool are all counted;
* ``live*`` gauges (the custom registry's default ``livesum``): only processes alive at
  push time; a finished pool's workers are gone, so use a non-live mode (``max``,
  ``sum``, ``mostrecent``) for a gauge that must outlive its process;
* derived metrics (``victor_cache_hit_rate``), but no system or self metrics.

``put`` replaces every metric of the group (job and grouping key); ``post`` replaces only
the metric families pushed and keeps the group's others. The Pushgateway never adds
pushes up: push each directory to its own group, once its processes have finished.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, push_to_gateway, pushadd_to_gateway
from prometheus_client.metrics_core import Metric

from . import _derived, _mpdir
from ._exposition import FamiliesCollector
from .exceptions import ConfigurationError, DirectoryError, PushError

PushMethod = Literal["put", "post"]
DEFAULT_TIMEOUT = 30.0

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_BODY_SHOWN = 500


@dataclass(frozen=True)
class PushResult:
    """What a push sent, and where."""

    url: str  # the group's URL: {gateway}/metrics/job/{job}[/{label}/{value}...]
    method: str  # "PUT" or "POST"
    families: int
    samples: int


def push_directory(
    directory: str | os.PathLike[str],
    gateway: str,
    job: str,
    grouping_key: Mapping[str, str] | None = None,
    method: PushMethod = "put",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> PushResult:
    """Push the aggregated metrics of ``directory`` to the Pushgateway at ``gateway``.

    ``gateway`` is the Pushgateway's base URL (``http://host:9091``; ``host:9091`` means
    http). The group is ``job`` plus ``grouping_key``; ``method`` ``put`` replaces the
    group's metrics, ``post`` only those pushed. ``timeout`` is in seconds (None: wait).

    Raises :class:`ConfigurationError` for a bad argument, :class:`DirectoryError` if
    ``directory`` is missing or unreadable, :class:`PushError` if the push failed.
    """
    url = _gateway_url(gateway)
    if not job:
        raise ConfigurationError("job is empty: the Pushgateway needs a job name, e.g. "
                                 "the name of the batch job.")
    key = _grouping_key(grouping_key or {})
    if method not in ("put", "post"):
        raise ConfigurationError(f"method {method!r} is not a push method: expected 'put' "
                                 "(replace the group) or 'post' (replace only the metrics "
                                 "pushed).")
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"timeout {timeout!r} is not a number of seconds > 0.")
    families = aggregated_families(directory)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(families))
    sent: list[str] = []
    push = push_to_gateway if method == "put" else pushadd_to_gateway
    try:
        push(url, job, registry, grouping_key=key, timeout=timeout,
             handler=_recording_handler(sent))
    except urllib.error.HTTPError as err:
        raise PushError(_refused(sent[0], err)) from err
    except (OSError, http.client.HTTPException) as err:
        target = sent[0] if sent else url
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, TimeoutError):
            raise PushError(f"the Pushgateway at {target} did not answer within {timeout} s, "
                            "so the push may or may not have landed; pushing again is safe. "
                            "Is it overloaded? Raise the timeout if it is just slow.") from err
        raise PushError(f"cannot reach the Pushgateway at {target}: {reason}; nothing was "
                        "pushed. Is it running, and is the gateway URL right?") from err
    return PushResult(sent[0], method.upper(), len(families),
                      sum(len(family.samples) for family in families))


def aggregated_families(directory: str | os.PathLike[str]) -> list[Metric]:
    """The aggregated families of ``directory``, as ``victor-metrics dump`` prints them
    (derived metrics included); reads only, and never moves a file."""
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise DirectoryError(f"{path} is not a directory, so there is nothing to push. "
                             "Pass the PROMETHEUS_MULTIPROC_DIR the job's processes wrote to.")
    reader = _mpdir.DirectoryReader(path, read_only=True)
    try:
        return _derived.with_derived(list(reader.collect()))
    except (OSError, RuntimeError) as err:
        raise DirectoryError(f"cannot read {path}: {err}. Run `victor-metrics doctor --dir "
                             f"{path}`.") from err


def _gateway_url(gateway: str) -> str:
    url = gateway.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a bad port or IPv6 address
        parts, port_ok = urllib.parse.urlsplit(""), False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok \
            or parts.query or parts.fragment:
        raise ConfigurationError(f"gateway {gateway!r} is not a Pushgateway URL: expected "
                                 "http(s)://HOST[:PORT][/PATH], e.g. http://localhost:9091.")
    return url.rstrip("/")


def _grouping_key(key: Mapping[str, str]) -> dict[str, str]:
    for name in key:
        if name == "job":
            raise ConfigurationError("the grouping key may not contain 'job': it is given as "
                                     "the job itself.")
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ConfigurationError(f"grouping key label {name!r} is not a label name: "
                                     "expected [a-zA-Z_][a-zA-Z0-9_]*, not starting with __.")
    return {str(name): str(value) for name, value in key.items()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect of a POST as a GET and report success: a redirect
    # is an answer that the push did not land, like any other status but 2xx.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _recording_handler(sent: list[str]) -> Callable[..., Callable[[], None]]:
    """prometheus_client's handler protocol: one request, no redirects, the URL noted."""

    def handler(url: str, method: str, timeout: float | None,
                headers: list[tuple[str, str]], data: bytes) -> Callable[[], None]:
        def handle() -> None:
            sent.append(url)
            request = urllib.request.Request(url, data=data, headers=dict(headers),
                                             method=method)
            opener = urllib.request.build_opener(_NoRedirect)
            with opener.open(request, timeout=timeout) as response:
                response.read()

        return handle

    return handler


def _refused(url: str, err: urllib.error.HTTPError) -> str:
    try:
        body = err.read(_BODY_SHOWN).decode("utf-8", "replace").strip()
    except OSError:
        body = ""
    finally:
        err.close()
    said = f": {' '.join(body.split())}" if body else ""
    hint = ""
    if err.code in (404, 405):
        hint = (" Is the gateway URL the Pushgateway's base URL (http://host:9091, without "
                "/metrics)?")
    elif 300 <= err.code < 400:
        hint = f" Push to {err.headers.get('Location')} directly." if err.headers else ""
    return (f"the Pushgateway at {url} answered {err.code} {err.reason}{said}; nothing was "
            f"pushed.{hint}")
