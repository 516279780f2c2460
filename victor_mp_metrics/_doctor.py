"""The checks behind ``victor-metrics doctor``: each says what is wrong and how to fix it.

Doctor only reads. It never creates the directory and never moves, removes or writes a
file in it; while it inspects the files it holds a shared lock on ``compact.lock`` (when
the file exists) so it sees the directory between compactions, not in the middle of one.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from . import _mpdir
from .exceptions import ConfigurationError
from .settings import SETTINGS, Settings, load_settings

Status = Literal["OK", "WARN", "FAIL"]
URL_TIMEOUT = 5.0
_TMPFS = ("tmpfs", "ramfs")
_SHOWN = 5


@dataclass(frozen=True)
class Check:
    """The outcome of one check; ``details`` are extra lines printed under it."""

    status: Status
    name: str
    message: str
    fix: str = ""
    details: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        head = f"{self.status:<4}  {self.name}: {self.message}"
        return [head + (f" Fix: {self.fix}" if self.fix else ""), *self.details]


def check_settings(environ: Mapping[str, str], directory: str | None) -> Check:
    """Load the settings the way the service does; show the effective values, secrets hidden."""
    try:
        settings = load_settings(environ)
    except ConfigurationError as err:
        return Check("FAIL", "settings", str(err))
    details = tuple(f"        {s.env}={_shown(settings, s.name, s.secret)}" for s in SETTINGS
                    if s.section == "library")
    if not settings.enabled:
        return Check("WARN", "settings", "VICTOR_METRICS_ENABLED=false: nothing is recorded.",
                     "unset VICTOR_METRICS_ENABLED or set it to true.", details)
    env_dir = settings.multiproc_dir
    if directory is not None and env_dir is not None and env_dir != directory:
        return Check("WARN", "settings",
                     f"checking {directory}, but PROMETHEUS_MULTIPROC_DIR is {env_dir}.",
                     "give the service and this command the same directory.", details)
    return Check("OK", "settings", "loaded; effective values:", details=details)


def check_secrets(environ: Mapping[str, str]) -> list[Check]:
    """Secrets belong in files only the service can read, not in the environment."""
    checks = []
    in_env = [s.env for s in SETTINGS if s.secret and environ.get(s.env)]
    if in_env:
        checks.append(Check("WARN", "secrets", f"{', '.join(in_env)} set in the environment, "
                            "which child processes and /proc/PID/environ of this user show.",
                            "put the token in VICTOR_METRICS_AUTH_TOKEN_FILE (mode 0600), "
                            "or basic auth users in a VICTOR_METRICS_WEB_CONFIG file."))
    for env in ("VICTOR_METRICS_WEB_CONFIG", "VICTOR_METRICS_AUTH_TOKEN_FILE"):
        path = environ.get(env, "").strip()
        if not path:
            continue
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue  # the settings check reports a missing file
        if mode & 0o077:
            checks.append(Check("WARN", "secrets", f"{env}={path} is readable by other users "
                                f"(mode {mode:04o}); it holds credentials.",
                                f"`chmod 600 {path}`."))
    return checks


def _shown(settings: Settings, name: str, secret: bool) -> str:
    value = getattr(settings, name)
    if value is None:
        return "(unset)"
    if secret:
        return "(set, hidden)"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_directory(path: str) -> list[Check]:
    """The directory itself, then every file in it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return [Check("FAIL", "directory", f"{path} does not exist.",
                      "start the service (gunicorn.conf.py creates it) or create it with "
                      f"`install -d -m 0700 {path}`; make sure the service's "
                      "PROMETHEUS_MULTIPROC_DIR names this same path.")]
    except OSError as err:
        return [Check("FAIL", "directory", f"cannot stat {path}: {err.strerror}.",
                      "run doctor as the user the service runs as.")]
    if not stat.S_ISDIR(info.st_mode):
        problem, fix = _mpdir.directory_problems(info, path)[0]
        return [Check("FAIL", "directory", f"{problem}.", fix)]
    checks = [Check("OK", "directory", f"{path} exists."), *_trust(path, info)]
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        checks.append(Check("FAIL", "access", f"uid {os.geteuid()} cannot read and write {path}.",
                            f"run doctor as the directory's owner (uid {info.st_uid}), or "
                            f"`chmod 700 {path}` as that user."))
        return checks
    checks.append(check_filesystem(path))
    checks.extend(_contents(path))
    return checks


def _trust(path: str, info: os.stat_result) -> list[Check]:
    """The service's own rule (``_mpdir.directory_problems``), plus readable-by-others."""
    problems = _mpdir.directory_problems(info, path)
    owner = f"uid {info.st_uid} ({_user(info.st_uid)})"
    if problems:
        return [Check("FAIL", "permissions", f"{text}; the service refuses it.", fix)
                for text, fix in problems]
    mode = stat.S_IMODE(info.st_mode)
    checks = [Check("OK", "owner", f"{owner}, the user running doctor.")]
    if mode & 0o077:
        checks.append(Check("WARN", "permissions",
                            f"mode {mode:04o}: other users can read the metric files.",
                            f"`chmod 700 {path}`."))
    else:
        checks.append(Check("OK", "permissions", f"mode {mode:04o}."))
    return checks


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def check_filesystem(path: str, mounts: str | None = None) -> Check:
    """WARN unless the directory is on tmpfs (``mounts``: /proc/mounts text, read if None)."""
    if mounts is None:
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError as err:
            return Check("WARN", "filesystem",
                         f"cannot tell whether {path} is on tmpfs: {err.strerror}.")
    found = mount_of(os.path.realpath(path), mounts)
    if found is None:
        return Check("WARN", "filesystem", f"no mount point of {path} in /proc/mounts.")
    mount_point, fstype = found
    if fstype in _TMPFS:
        return Check("OK", "filesystem", f"{fstype} (mounted at {mount_point}).")
    return Check("WARN", "filesystem",
                 f"{fstype} (mounted at {mount_point}), not tmpfs: metric files are mmap-ed, "
                 "so on disk the kernel writes values back to storage.",
                 f"mount a tmpfs there (`docker run --tmpfs {path}:uid=UID,mode=0700`) or "
                 "use a directory under /dev/shm.")


def mount_of(path: str, mounts: str) -> tuple[str, str] | None:
    """(mount point, file system type) of the longest mount point containing ``path``."""
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        # Later lines mount over earlier ones at the same point, hence >=.
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def _contents(path: str) -> list[Check]:
    found = _mpdir.inspect(path)
    compact = f"run `victor-metrics compact --dir {path}`"
    per_kind = ", ".join(f"{k} {n}" for k, n in sorted(found.kinds.items())) or "none"
    checks = [Check("OK", "files", f"{found.regular_files} file(s), {found.nbytes} bytes; "
                    f"writer data files: {per_kind}; archive files: {found.archive_files}.")]
    if found.manifest is None:
        gens = sorted(found.generations)
        checks.append(Check("FAIL", "manifest", f"corrupt ({found.manifest_error}); scrapes "
                            "ignore the archive, so totals drop.",
                            f"stop the service and write {{\"generation\": G, \"absorbed\": []}} "
                            f"to {path}/manifest.json, G being the archive generation in the "
                            f"file names (found: {gens or 'none'})."))
        return checks
    if found.live:
        checks.append(Check("OK", "writers", f"{len(found.live)} live ({_listed(found.live)})."))
    else:
        checks.append(Check("WARN", "writers", "no live writer process.",
                            "if the service is running, it writes elsewhere: compare its "
                            f"PROMETHEUS_MULTIPROC_DIR with {path}."))
    if found.dead and _mpdir.master_running(path):
        checks.append(Check("WARN", "orphans",
                            f"{len(found.dead)} dead writer(s) not compacted yet "
                            f"({_listed(found.dead)}), {found.dead_files} file(s); the running "
                            "Gunicorn master of this directory compacts them on its next sweep "
                            "(at most VICTOR_METRICS_SWEEP_INTERVAL).",
                            f"nothing, or {compact} now."))
    elif found.dead:
        checks.append(Check("FAIL", "orphans",
                            f"{len(found.dead)} dead writer(s) not compacted "
                            f"({_listed(found.dead)}), {found.dead_files} file(s).",
                            f"{compact}. A Gunicorn master using victor_mp_metrics.gunicorn_hooks "
                            "does this when a worker exits; orphans that stay mean no master "
                            "compacts this directory."))
    else:
        checks.append(Check("OK", "orphans", "no files of dead writers."))
    checks.append(_corrupt(found, compact))
    checks.append(_manifest_state(found.manifest.generation, sorted(found.manifest.absorbed),
                                  sorted(found.generations), compact))
    checks.append(_quarantine(path, found.quarantined))
    if found.stale_temps:
        checks.append(Check("WARN", "temp files",
                            f"{len(found.stale_temps)} left over ({_listed(found.stale_temps)}).",
                            f"{compact} (it removes them)."))
    else:
        checks.append(Check("OK", "temp files", "none left over."))
    return checks


def _listed(items: list[str]) -> str:
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _corrupt(found: _mpdir.Inspection, compact: str) -> Check:
    if not found.data_files:
        return Check("OK", "data files", "none yet.")
    if not found.corrupt:
        return Check("OK", "data files", f"all {found.data_files} parse.")
    bad = [f"{name} ({reason})" for name, reason in found.corrupt]
    return Check("FAIL", "data files", f"{len(bad)} corrupt: {_listed(bad)}; scrapes skip them.",
                 f"{compact}: it moves those of dead writers to quarantine/; a live writer's "
                 "file is set aside once that worker restarts.")


def _manifest_state(
    generation: int, absorbed: list[str], generations: list[int], compact: str
) -> Check:
    stray = sorted(set(generations) - {generation})
    if absorbed or stray:
        what = f"{len(absorbed)} absorbed writer(s) still listed" if absorbed else ""
        if stray:
            what += ("; " if what else "") + f"archive files of generation(s) {stray}"
        return Check("WARN", "manifest",
                     f"an interrupted compaction left {what}; scrapes are still exact.",
                     f"{compact} to finish it.")
    return Check("OK", "manifest", f"archive generation {generation}, no interrupted compaction.")


def _quarantine(path: str, names: list[str]) -> Check:
    qdir = os.path.join(path, _mpdir.QUARANTINE)
    if not names:
        return Check("OK", "quarantine", "empty.")
    return Check("WARN", "quarantine",
                 f"{len(names)} corrupt file(s) set aside in {qdir} ({_listed(names)}); "
                 "their counts are missing from the totals.",
                 f"look at them, then delete them (`rm -r {qdir}`).")


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send ``Authorization`` only to the origin it was given for."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in ("Authorization", "authorization"):
                new.headers.pop(name, None)
                new.unredirected_hdrs.pop(name, None)
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), parts.port or default


def check_url(url: str, token: str | None, basic_auth: str | None = None) -> list[Check]:
    """GET a /metrics URL and check it answers Prometheus text with our request counter."""
    headers = {"Accept": "text/plain"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif basic_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(basic_auth.encode()).decode()
    opener = urllib.request.build_opener(_SameOriginCredentials)
    try:
        request = urllib.request.Request(url, headers=headers)
    except ValueError as err:
        return [Check("FAIL", "endpoint", f"{url!r} is not a URL ({err}).",
                      "give a full URL such as http://localhost:9090/metrics.")]
    try:
        with opener.open(request, timeout=URL_TIMEOUT) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, b""
        err.close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return [Check("FAIL", "endpoint", f"cannot reach {url}: {reason}.",
                      "is the service running? is the port right (VICTOR_METRICS_PORT, "
                      f"default 9090)? Try `curl {url}`.")]
    if status == 401:
        fix = ("check that --token matches the service's VICTOR_METRICS_AUTH_TOKEN."
               if token else "pass --token (the service's VICTOR_METRICS_AUTH_TOKEN).")
        return [Check("FAIL", "endpoint", f"{url} answered 401 Unauthorized.", fix)]
    if status != 200:
        return [Check("FAIL", "endpoint", f"{url} answered {status}.",
                      "the metrics path is /metrics; otherwise look at the service's log.")]
    try:
        families = list(text_string_to_metric_families(body.decode("utf-8")))
    except (ValueError, TypeError, IndexError, UnicodeDecodeError) as err:
        return [Check("FAIL", "endpoint", f"{url} answered 200, but not Prometheus text ({err}).",
                      f"make sure {url} is the /metrics endpoint.")]
    checks = [Check("OK", "endpoint", f"{url} answered 200 with {len(families)} metric families.")]
    for f in families:
        for s in f.samples:
            if s.name == "victor_metrics_misconfigured" and s.value:
                checks.append(Check("FAIL", "deployment",
                                    f"{url} says its totals are wrong or incomplete "
                                    f"({s.labels.get('reason')}).",
                                    "read the service's log: it says what is missing (the "
                                    "Gunicorn hooks or a shared PROMETHEUS_MULTIPROC_DIR)."))
    series = sum(1 for f in families for s in f.samples if s.name == "victor_requests_total")
    if series:
        checks.append(Check("OK", "requests", f"victor_requests_total present ({series} series)."))
    else:
        checks.append(Check("WARN", "requests", "victor_requests_total is absent.",
                            "send the app a request; check the app uses VictorMetrics(app) "
                            "and the same PROMETHEUS_MULTIPROC_DIR as this endpoint."))
    return checks
