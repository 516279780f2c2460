"""The Gunicorn master's own metrics: its workers, their exits, signals, reloads, backlog.

The master sees every worker's birth and death, so it keeps the catalog's
``source="server"`` rows, in its own per-process files: its counters outlive it (summed
over live and dead processes like any other) and its gauges use live modes, so they
vanish with it instead of reporting a dead master's workers.

Gunicorn's hooks get no exit status and there is no hook for signals, so :meth:`watch`
wraps a few methods of the arbiter *instance* (never its class). Each wrapper records a
fact and calls the original; a failure of ours is logged and counted, never raised:

* ``handle_<signal>`` of the operator's signals counts ``gunicorn_master_signals_total``;
  HUP also counts a reload and remembers ``Arbiter.worker_age``, the age of the newest
  worker it replaces; USR2 counts a reload when a new master was forked;
* ``reap_workers``, every path by which Gunicorn reaps workers (SIGCHLD, a reload, the
  shutdown): first peeks at each exited worker's wait status with ``waitid(WNOWAIT)``,
  which leaves the child to Gunicorn's ``waitpid``;
* ``stop``: every way to shut down (TERM, INT, QUIT, a halt) goes through it;
* ``manage_workers`` runs after every spawn and at least once a second: after it, the
  worker count, the desired count, the listen queue and the workers' memory are sampled.

``child_exit`` then gives each reaped worker one reason, the first that applies:

==============  ==================================================================
``timeout``     the master aborted it for its timeout (``worker.aborted``)
``reload``      the master was stopping and a USR2 child took over, or the worker
                was born before the latest HUP
``shutdown``    the master was stopping
``killed``      ended by a signal it did not handle: SIGKILL, the OOM killer
``crashed``     a non-zero exit status (a boot failure halts Gunicorn itself)
``shutdown``    exit 0 while the master had as many workers as it wants (TTOU, WINCH)
``max_requests``  exit 0 on its own, which Gunicorn's workers do at ``max_requests``
                (and when someone other than the master sends them TERM, INT or QUIT)
==============  ==================================================================

A worker that exits between the peek and Gunicorn's ``waitpid`` (microseconds, in one
round of reaping) has no status and is judged by the last two rows.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import psutil

from . import _mpdir, _runtime
from .catalog import create_metric, server_specs

log = logging.getLogger("victor_mp_metrics")

REASONS = ("max_requests", "timeout", "killed", "crashed", "reload", "shutdown")
# The signals an operator sends the master (SIGCHLD, from workers, is not counted).
SIGNALS = ("hup", "int", "quit", "term", "ttin", "ttou", "usr1", "usr2", "winch")
MEMORY_INTERVAL = 1.0  # seconds between two samples of the workers' memory

# struct tcp_info (include/uapi/linux/tcp.h): eight one-byte fields, then u32 tcpi_rto,
# tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss, tcpi_unacked. On a LISTEN socket the kernel
# reports the accept queue's length in tcpi_unacked (and its limit in tcpi_sacked).
_TCP_INFO_SIZE = 104
_UNACKED = struct.Struct("=I")
_UNACKED_OFFSET = 24
_TCP_LISTEN = 10
_WRAPPED = "__victor_mp_metrics_wrapped__"
_Status = tuple[int, int]  # (si_code, si_status) of waitid


def listen_queue(listener: Any) -> int | None:
    """Connections waiting to be accepted on a Gunicorn listener, or None when the kernel
    does not say: only Linux TCP sockets tell (``/proc/net/unix`` has no queue length)."""
    sock = getattr(listener, "sock", None)
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or not isinstance(sock, socket.socket):
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _UNACKED_OFFSET + _UNACKED.size or info[0] != _TCP_LISTEN:
        return None
    return int(_UNACKED.unpack_from(info, _UNACKED_OFFSET)[0])


class ServerMetrics:
    """One master's server metrics and what it remembers of its workers."""

    def __init__(self) -> None:
        specs = server_specs()
        self.workers = create_metric(specs["gunicorn_workers"])
        self.desired = create_metric(specs["gunicorn_workers_desired"])
        self.exits = create_metric(specs["gunicorn_worker_exits_total"])
        self.age = create_metric(specs["gunicorn_worker_age_seconds"])
        self.memory = create_metric(specs["gunicorn_worker_memory_bytes"])
        self.signals = create_metric(specs["gunicorn_master_signals_total"])
        self.reloads = create_metric(specs["gunicorn_reloads_total"])
        self._backlog_spec = specs["gunicorn_backlog"]
        self.backlog: Any = None  # made when a listener's queue can first be read
        for reason in REASONS:
            self.exits.labels(reason)  # every series from 0, so rate() sees the first exit
        for name in SIGNALS:
            self.signals.labels(name)
        self._procs: dict[int, psutil.Process] = {}
        self._born: dict[int, float] = {}  # worker pid -> its start (epoch seconds)
        self._status: dict[int, _Status] = {}
        self._stopping = False
        self._replaced_age = 0  # a HUP replaced the workers spawned up to this age (number)
        self._memory_at = 0.0

    # -- the arbiter's methods --

    def watch(self, server: Any) -> None:
        """Wrap the arbiter's methods (see the module docstring) and take a first sample."""
        for name in SIGNALS:
            if name != "usr2":
                self._wrap(server, f"handle_{name}", before=self._signal_counter(name))
        self._wrap(server, "handle_usr2", before=self._usr2_before, after=self._usr2_after)
        self._wrap(server, "reap_workers", before=self._peek_exits)
        self._wrap(server, "stop", before=self._stop_before)
        self._wrap(server, "manage_workers", after=self._sample_after)
        self.sample(server)

    def _wrap(
        self,
        server: Any,
        name: str,
        before: Callable[[Any], Any] | None = None,
        after: Callable[[Any, Any], None] | None = None,
    ) -> None:
        original = getattr(server, name, None)
        if original is None or getattr(original, _WRAPPED, False):
            return

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            noted = _safely(before, server) if before is not None else None
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    _safely(after, server, noted)

        setattr(wrapped, _WRAPPED, True)
        setattr(server, name, wrapped)

    def _signal_counter(self, name: str) -> Callable[[Any], None]:
        def count(server: Any) -> None:
            self.signals.labels(name).inc()
            if name == "hup":
                self._replaced_age = int(server.worker_age)
                self.reloads.inc()

        return count

    def _usr2_before(self, server: Any) -> int:
        self.signals.labels("usr2").inc()
        return int(server.reexec_pid)

    def _usr2_after(self, server: Any, reexec_pid_before: Any) -> None:
        if reexec_pid_before == 0 and server.reexec_pid != 0:
            self.reloads.inc()

    def _peek_exits(self, server: Any) -> None:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        for pid in list(server.WORKERS):
            if pid in self._status:
                continue
            try:
                info = os.waitid(os.P_PID, pid, flags)
            except ChildProcessError:
                continue
            if info is not None:
                self._status[pid] = (info.si_code, info.si_status)

    def _stop_before(self, server: Any) -> None:
        self._stopping = True

    def _sample_after(self, server: Any, _noted: Any) -> None:
        self.sample(server)

    # -- what the hooks call --

    def sample(self, server: Any) -> None:
        """Set the gauges from the arbiter's state; remember when new workers were born."""
        workers = list(server.WORKERS)
        self.workers.set(len(workers))
        self.desired.set(server.num_workers or 0)
        now = time.time()
        born = [pid for pid in workers if pid not in self._born]
        for pid in born:
            self._born[pid] = self._created(pid, now)
        queues = [q for q in map(listen_queue, server.LISTENERS) if q is not None]
        if queues:
            if self.backlog is None:
                self.backlog = create_metric(self._backlog_spec)
            self.backlog.set(sum(queues))
        if workers and (born or now - self._memory_at >= MEMORY_INTERVAL):
            self._memory_at = now
            rss = [r for r in map(self._rss, workers) if r is not None]
            self.memory.labels("max").set(max(rss, default=0))
            self.memory.labels("sum").set(sum(rss))

    def worker_exited(self, server: Any, worker: Any) -> str:
        """Count a reaped worker's exit and lifetime; return the reason counted."""
        pid = worker.pid
        reason = self._reason(server, worker, self._status.pop(pid, None))
        self.exits.labels(reason).inc()
        born = self._born.pop(pid, None)
        if born is not None:
            age = max(0.0, time.time() - born)
            self.age.observe(_mpdir.on_grid(age, _mpdir.PER_SECOND))  # exact sums
        self._procs.pop(pid, None)
        self.workers.set(len(server.WORKERS))
        return reason

    def _reason(self, server: Any, worker: Any, status: _Status | None) -> str:
        if getattr(worker, "aborted", False):
            return "timeout"
        if self._stopping:
            return "reload" if server.reexec_pid else "shutdown"
        if worker.age <= self._replaced_age:
            return "reload"
        if status is not None:
            code, value = status
            if code in (os.CLD_KILLED, os.CLD_DUMPED):
                return "killed"
            if value != 0:
                return "crashed"
        if len(server.WORKERS) >= (server.num_workers or 0):
            return "shutdown"
        return "max_requests"

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = self._procs[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return proc

    def _created(self, pid: int, default: float) -> float:
        proc = self._process(pid)
        try:
            return proc.create_time() if proc is not None else default
        except psutil.Error:
            return default

    def _rss(self, pid: int) -> int | None:
        proc = self._process(pid)
        try:
            return int(proc.memory_info().rss) if proc is not None else None
        except psutil.Error:
            return None


def _safely(func: Callable[..., Any], *args: Any) -> Any:
    try:
        return func(*args)
    except Exception:
        log.exception("victor_mp_metrics: recording a Gunicorn server metric failed")
        try:
            _runtime.self_counter("hook_errors").inc()
        except Exception:  # pragma: no cover - counting must not fail the arbiter either
            pass
        return None


def server_metrics() -> ServerMetrics:
    """This master's :class:`ServerMetrics` (made on first use)."""
    return _runtime.singleton("gunicorn_server_metrics", ServerMetrics)


def watch(server: Any) -> None:
    """In the master, once ready: start keeping the server metrics of ``server``."""
    server_metrics().watch(server)


def worker_exited(server: Any, worker: Any) -> str:
    """In the master's ``child_exit``: count the worker's exit; return its reason."""
    return server_metrics().worker_exited(server, worker)
