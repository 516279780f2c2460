"""The checks behind ``victor-metrics doctor``: each says what is wrong and how to fix it.

Doctor only reads. It never creates the directory and never moves, removes or writes a
file in it; while it inspects the files it holds a shared lock on ``compact.lock`` (when
the file exists) so it sees the directory between compactions, not in the middle of one.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pwd
import re
import stat
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from . import _files
from .exceptions import ConfigurationError
from .manifest import read_manifest
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
    details = tuple(f"        {s.env}={_shown(settings, s.name, s.secret)}" for s in SETTINGS)
    if not settings.enabled:
        return Check("WARN", "settings", "VICTOR_METRICS_ENABLED=false: nothing is recorded.",
                     "unset VICTOR_METRICS_ENABLED or set it to true.", details)
    env_dir = settings.multiproc_dir
    if directory is not None and env_dir is not None and env_dir != directory:
        return Check("WARN", "settings",
                     f"checking {directory}, but PROMETHEUS_MULTIPROC_DIR is {env_dir}.",
                     "give the service and this command the same directory.", details)
    return Check("OK", "settings", "loaded; effective values:", details=details)


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
        info = os.stat(path)
    except FileNotFoundError:
        return [Check("FAIL", "directory", f"{path} does not exist.",
                      "start the service (gunicorn.conf.py creates it) or create it with "
                      f"`install -d -m 0700 {path}`; make sure the service's "
                      "PROMETHEUS_MULTIPROC_DIR names this same path.")]
    except OSError as err:
        return [Check("FAIL", "directory", f"cannot stat {path}: {err.strerror}.",
                      "run doctor as the user the service runs as.")]
    if not stat.S_ISDIR(info.st_mode):
        return [Check("FAIL", "directory", f"{path} exists but is not a directory.",
                      "point PROMETHEUS_MULTIPROC_DIR at a directory (it is created if missing).")]
    checks = [Check("OK", "directory", f"{path} exists."), _permissions(path, info), _owner(info)]
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        checks.append(Check("FAIL", "access", f"uid {os.geteuid()} cannot read and write {path}.",
                            f"run doctor as the directory's owner (uid {info.st_uid}), or "
                            f"`chmod 700 {path}` as that user."))
        return checks
    checks.append(check_filesystem(path))
    with _compactions_held(path):
        checks.extend(_contents(path))
    return checks


def _permissions(path: str, info: os.stat_result) -> Check:
    mode = stat.S_IMODE(info.st_mode)
    others_write = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others_write and not mode & stat.S_ISVTX:
        return Check("FAIL", "permissions",
                     f"mode {mode:04o}: other users can plant or delete metric files, so the "
                     "service refuses this directory.", f"`chmod 700 {path}`.")
    if others_write:
        return Check("WARN", "permissions",
                     f"mode {mode:04o}: a shared directory (sticky bit).",
                     "use a private directory created with mode 0700.")
    if mode & 0o077:
        return Check("WARN", "permissions",
                     f"mode {mode:04o}: other users can read the metric files.",
                     f"`chmod 700 {path}`.")
    return Check("OK", "permissions", f"mode {mode:04o}.")


def _owner(info: os.stat_result) -> Check:
    euid = os.geteuid()
    owner = f"uid {info.st_uid} ({_user(info.st_uid)})"
    if info.st_uid == euid:
        return Check("OK", "owner", f"{owner}, the user running doctor.")
    if euid == 0 or info.st_uid == 0:
        return Check("OK", "owner", f"{owner}; the service must run as this user.")
    return Check("WARN", "owner", f"{owner}, not the user running doctor (uid {euid}).",
                 "run the service and doctor as the directory's owner; the service refuses "
                 "a directory owned by another user.")


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


@contextmanager
def _compactions_held(directory: str, timeout: float = 2.0) -> Iterator[None]:
    try:
        fd = os.open(os.path.join(directory, _files.COMPACT_LOCK), os.O_RDONLY | _files.OPEN_FLAGS)
    except OSError:
        fd = -1
    deadline = time.monotonic() + timeout
    while fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                break  # a long compaction: inspect anyway
            time.sleep(0.01)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _contents(path: str) -> list[Check]:
    names = sorted(os.listdir(path))
    compact = f"run `victor-metrics compact --dir {path}`"
    checks = [_files_summary(path, names)]
    try:
        manifest = read_manifest(path)
    except _files.CorruptFile as err:
        gens = sorted(_generations(i for i in map(_files.parse_name, names) if i is not None))
        checks.append(Check("FAIL", "manifest", f"corrupt ({err}); scrapes ignore the archive, "
                            "so totals drop.",
                            f"stop the service and write {{\"generation\": G, \"absorbed\": []}} "
                            f"to {path}/manifest.json, G being the archive generation in the "
                            f"file names (found: {gens or 'none'})."))
        return checks
    files = [(n, info) for n in names if (info := _files.parse_name(n)) is not None]
    alive = _files.writer_liveness(path, names, skip=manifest.absorbed)
    live = sorted(i for i, a in alive.items() if a)
    dead = sorted(i for i, a in alive.items() if not a)
    if live:
        checks.append(Check("OK", "writers", f"{len(live)} live ({_listed(live)})."))
    else:
        checks.append(Check("WARN", "writers", "no live writer process.",
                            "if the service is running, it writes elsewhere: compare its "
                            f"PROMETHEUS_MULTIPROC_DIR with {path}."))
    if dead:
        count = sum(1 for n in names if _files.writer_ident(n) in dead)
        checks.append(Check("FAIL", "orphans",
                            f"{len(dead)} dead writer(s) not compacted ({_listed(dead)}), "
                            f"{count} file(s).",
                            f"{compact}. A Gunicorn master using victor_mp_metrics.gunicorn_hooks "
                            "does this when a worker exits; orphans that stay mean no master "
                            "compacts this directory."))
    else:
        checks.append(Check("OK", "orphans", "no files of dead writers."))
    checks.append(_corrupt(path, [n for n, _ in files], compact))
    checks.append(_manifest_state(manifest.generation, sorted(manifest.absorbed),
                                  [i for _, i in files], compact))
    checks.append(_quarantine(path))
    stale = [n for n in names if n.endswith(_files.TMP_SUFFIX)
             and _files.stale_temp(os.path.join(path, n))]
    if stale:
        checks.append(Check("WARN", "temp files", f"{len(stale)} left over ({_listed(stale)}).",
                            f"{compact} (it removes them)."))
    else:
        checks.append(Check("OK", "temp files", "none left over."))
    return checks


def _files_summary(path: str, names: list[str]) -> Check:
    nbytes = count = 0
    for name in names:
        try:
            info = os.stat(os.path.join(path, name), follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            count += 1
            nbytes += info.st_size
    infos = [i for i in map(_files.parse_name, names) if i is not None]
    kinds = Counter(i.kind for i in infos if not i.is_archive)
    archives = sum(1 for i in infos if i.is_archive)
    per_kind = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
    return Check("OK", "files", f"{count} file(s), {nbytes} bytes; writer data files: "
                 f"{per_kind}; archive files: {archives}.")


def _listed(items: list[str]) -> str:
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _corrupt(path: str, names: list[str], compact: str) -> Check:
    bad = []
    for name in names:
        try:
            data = _files.read_file(os.path.join(path, name))
            for raw, *_ in _files.iter_entries(data, len(data)):
                metric, sample, labels, _help = json.loads(raw)
                if not (isinstance(metric, str) and isinstance(sample, str)
                        and isinstance(labels, dict)):
                    raise ValueError(f"key {raw[:60]!r} is not [name, sample, labels, help]")
        except FileNotFoundError:
            continue  # compacted away meanwhile
        except (_files.CorruptFile, OSError, ValueError, TypeError) as err:
            bad.append(f"{name} ({err})")
    if not names:
        return Check("OK", "data files", "none yet.")
    if not bad:
        return Check("OK", "data files", f"all {len(names)} parse.")
    return Check("FAIL", "data files", f"{len(bad)} corrupt: {_listed(bad)}; scrapes skip them.",
                 f"{compact}: it moves those of dead writers to quarantine/; a live writer's "
                 "file is set aside once that worker restarts.")


def _generations(infos: Iterable[_files.DataFile]) -> set[int]:
    return {i.generation for i in infos if i.generation is not None}


def _manifest_state(
    generation: int, absorbed: list[str], infos: list[_files.DataFile], compact: str
) -> Check:
    stray = sorted(_generations(infos) - {generation})
    if absorbed or stray:
        what = f"{len(absorbed)} absorbed writer(s) still listed" if absorbed else ""
        if stray:
            what += ("; " if what else "") + f"archive files of generation(s) {stray}"
        return Check("WARN", "manifest",
                     f"an interrupted compaction left {what}; scrapes are still exact.",
                     f"{compact} to finish it.")
    return Check("OK", "manifest", f"archive generation {generation}, no interrupted compaction.")


def _quarantine(path: str) -> Check:
    qdir = os.path.join(path, _files.QUARANTINE)
    try:
        names = sorted(os.listdir(qdir))
    except FileNotFoundError:
        names = []
    if not names:
        return Check("OK", "quarantine", "empty.")
    return Check("WARN", "quarantine",
                 f"{len(names)} corrupt file(s) set aside in {qdir} ({_listed(names)}); "
                 "their counts are missing from the totals.",
                 f"look at them, then delete them (`rm -r {qdir}`).")


def check_url(url: str, token: str | None, basic_auth: str | None = None) -> list[Check]:
    """GET a /metrics URL and check it answers Prometheus text with our request counter."""
    headers = {"Accept": "text/plain"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif basic_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(basic_auth.encode()).decode()
    try:
        request = urllib.request.Request(url, headers=headers)
    except ValueError as err:
        return [Check("FAIL", "endpoint", f"{url!r} is not a URL ({err}).",
                      "give a full URL such as http://localhost:9090/metrics.")]
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
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
    series = sum(1 for f in families for s in f.samples if s.name == "victor_requests_total")
    if series:
        checks.append(Check("OK", "requests", f"victor_requests_total present ({series} series)."))
    else:
        checks.append(Check("WARN", "requests", "victor_requests_total is absent.",
                            "send the app a request; check the app uses VictorMetrics(app) "
                            "and the same PROMETHEUS_MULTIPROC_DIR as this endpoint."))
    return checks
