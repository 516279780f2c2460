"""``victor-metrics``: check, compact, dump, serve and push a multiprocess metrics directory.

Exit status: 0 ok, 1 problems found or the operation failed, 2 usage or configuration
error. Results go to stdout, errors to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from . import __version__, _doctor, _mpdir, _runtime, push
from ._exposition import FamiliesCollector
from ._server import start_metrics_server
from .exceptions import ConfigurationError, VictorMetricsError
from .gunicorn_hooks import default_base
from .settings import Settings, load_settings

PROG = "victor-metrics"
DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser, subparsers = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    command = subparsers[args.command]
    if args.command == "doctor":
        return _doctor_command(args, command)
    try:
        settings = load_settings()
    except ConfigurationError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    directory = args.dir or settings.multiproc_dir or _running_master(command)
    if not directory:
        return 2
    directory = os.path.abspath(directory)
    if args.command == "compact":
        return _compact(directory)
    if args.command == "dump":
        return _dump(directory, args.format)
    if args.command == "push":
        return _push(directory, args, command)
    return _serve(directory, settings, args.port, args.addr, args.web_config)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check, compact, dump, serve and push the multiprocess metrics directory "
        "of victor_mp_metrics.",
        epilog=f"DIR defaults to ${DIR_ENV}. Exit status: 0 ok, 1 problems found or "
        "operation failed, 2 usage or configuration error.",
    )
    # DIR: --dir, else $PROMETHEUS_MULTIPROC_DIR, else the one running master's built-in one.
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", metavar="DIR",
                        help=f"the metrics directory (default: ${DIR_ENV})")
    commands = {
        "doctor": sub.add_parser(
            "doctor", parents=[common], help="check the directory and say how to fix problems",
            description="Check the settings, the directory, its files and optionally a "
            "/metrics URL. One line per check: OK, WARN or FAIL, what is wrong and how to fix "
            "it. Exit status 1 if any check FAILs. Reads only: creates and changes nothing.",
            epilog="If /metrics answers but Prometheus shows nothing: `promtool check config "
            "prometheus.yml`, then look at the target on Prometheus' /api/v1/targets.",
        ),
        "compact": sub.add_parser(
            "compact", parents=[common], help="merge dead writers' files into the archive now",
            description="Finish any interrupted compaction, remove leftover temp files and "
            "merge the files of dead writer processes into the archive. Safe while the "
            "service runs: live writers are never touched.",
        ),
        "dump": sub.add_parser(
            "dump", parents=[common], help="print the aggregated metrics of the directory",
            description="Print the aggregated exposition of the directory, as /metrics "
            "would (without system and self metrics), without a server.",
        ),
        "serve": sub.add_parser(
            "serve", parents=[common], help="serve the aggregated /metrics over HTTP",
            description="Serve the aggregated /metrics of the directory until SIGINT or "
            "SIGTERM.",
        ),
        "push": sub.add_parser(
            "push", parents=[common], help="push the aggregated metrics to a Pushgateway",
            description="Push the aggregated metrics of the directory (what dump prints) to "
            "a Prometheus Pushgateway, as the group of --job and --grouping: for batch jobs, "
            "once their processes have finished. Counters, histograms and summaries are the "
            "totals of every process that wrote to the directory, live and dead; live* "
            "gauges only those of processes alive now. Reads only.",
            epilog="The Pushgateway never adds pushes up: give each directory its own group "
            "(e.g. --grouping instance=$(hostname)) and use a fresh directory for each run.",
        ),
    }
    doctor = commands["doctor"]
    doctor.add_argument("--url", help="also GET this /metrics URL, e.g. "
                        "http://localhost:9090/metrics")
    doctor.add_argument("--token", help="bearer token for --url "
                        "(default: $VICTOR_METRICS_AUTH_TOKEN)")
    commands["dump"].add_argument("--format", choices=("text", "openmetrics"), default="text",
                                  help="exposition format (default: text)")
    serve = commands["serve"]
    serve.add_argument("--port", type=_port, help="port (default: $VICTOR_METRICS_PORT or 9090; "
                       "0 picks a free one)")
    serve.add_argument("--addr",
                       help="address to bind (default: $VICTOR_METRICS_ADDR or 127.0.0.1)")
    serve.add_argument("--web-config", metavar="FILE",
                       help="exporter-toolkit web config: TLS, client certificates, bcrypt "
                       "basic auth (default: $VICTOR_METRICS_WEB_CONFIG); re-read on SIGHUP")
    push_ = commands["push"]
    push_.add_argument("--gateway", required=True, metavar="URL",
                       help="the Pushgateway's base URL, e.g. http://localhost:9091")
    push_.add_argument("--job", required=True, help="the job label of the group")
    push_.add_argument("--grouping", action="append", default=[], type=_label_pair,
                       metavar="KEY=VALUE",
                       help="a further label of the group (repeatable), e.g. instance=host1")
    push_.add_argument("--method", choices=("put", "post"), default="put",
                       help="put replaces every metric of the group, post only the families "
                       "pushed (default: put)")
    push_.add_argument("--timeout", type=_seconds, default=push.DEFAULT_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the Pushgateway (default: "
                       f"{push.DEFAULT_TIMEOUT:g})")
    return parser, commands


def _label_pair(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{raw!r} is not KEY=VALUE, e.g. instance=host1")
    return name, value


def _seconds(raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds > 0")
    return seconds


def _port(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port: expected 0-65535")
    return port


def _running_master(command: argparse.ArgumentParser) -> str:
    """The built-in directory of the one running master (as gunicorn.conf.py picks it);
    "" after saying why not (none running, or several to choose from)."""
    base = default_base()
    found = _mpdir.live_masters(base)
    if len(found) == 1:
        return found[0]
    command.print_usage(sys.stderr)
    if not found:
        print(f"{command.prog}: error: no metrics directory: {DIR_ENV} is unset and no "
              f"running Gunicorn master uses the built-in directory under {base}. Pass "
              f"--dir DIR or set {DIR_ENV}.", file=sys.stderr)
    else:
        print(f"{command.prog}: error: {len(found)} running masters use built-in directories "
              f"({', '.join(found)}); pass --dir with the one you mean.", file=sys.stderr)
    return ""


def _doctor_command(args: argparse.Namespace, command: argparse.ArgumentParser) -> int:
    directory = args.dir or os.environ.get(DIR_ENV, "").strip() or _running_master(command)
    if not directory:
        return 2
    directory = os.path.abspath(directory)
    checks = [_doctor.check_settings(os.environ, directory), *_doctor.check_secrets(os.environ),
              *_doctor.check_directory(directory)]
    if args.url:
        try:
            settings: Settings | None = load_settings()
        except ConfigurationError:
            settings = None  # already reported by the settings check
        token = args.token or (settings.auth_token if settings else None)
        basic = settings.basic_auth if settings else None
        checks.extend(_doctor.check_url(args.url, token, basic))
    for check in checks:
        print("\n".join(check.lines()))
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("FAIL", "WARN", "OK")}
    print(f"doctor: {counts['FAIL']} FAIL, {counts['WARN']} WARN, {counts['OK']} OK")
    return 1 if counts["FAIL"] else 0


def _compact(directory: str) -> int:
    if not os.path.isdir(directory):
        print(f"{PROG} compact: error: {directory} is not a directory", file=sys.stderr)
        return 1
    try:
        problems = _mpdir.directory_problems(os.lstat(directory), directory)
    except OSError as err:
        problems = [(f"{directory}: {err.strerror}", "pass an existing directory with --dir.")]
    if problems:
        text, fix = problems[0]
        print(f"{PROG} compact: error: {text}; the service refuses it, and so does compact. "
              f"Fix: {fix}", file=sys.stderr)
        return 1
    try:
        settings = load_settings()
        result = _mpdir.compact(directory, max_series=settings.max_series)
    except (OSError, _mpdir.CorruptFile, ConfigurationError) as err:
        print(f"{PROG} compact: error: compaction of {directory} failed: {err}. "
              f"Run `{PROG} doctor --dir {directory}`.", file=sys.stderr)
        return 1
    if result.absorbed:
        absorbed = ", ".join(result.absorbed)
        print(f"compact: absorbed {len(result.absorbed)} dead writer(s) ({absorbed}), "
              f"removed {result.files_removed} file(s), wrote {result.files_written} file(s); "
              f"archive generation {result.generation} in {result.duration * 1000:.1f} ms")
    else:
        print(f"compact: no dead writers; archive generation {result.generation} "
              f"in {result.duration * 1000:.1f} ms")
    if result.recovered:
        print("compact: finished an interrupted compaction / removed leftover temp files")
    if result.corrupt:
        print(f"compact: moved {len(result.corrupt)} corrupt file(s) to quarantine/: "
              + ", ".join(result.corrupt))
    return 0


def _dump(directory: str, fmt: str) -> int:
    if not os.path.isdir(directory):
        print(f"{PROG} dump: error: {directory} is not a directory", file=sys.stderr)
        return 1
    families = push.aggregated_families(directory)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(families))
    generate = generate_openmetrics if fmt == "openmetrics" else generate_latest
    sys.stdout.write(generate(registry).decode("utf-8"))
    return 0


def _push(directory: str, args: argparse.Namespace, command: argparse.ArgumentParser) -> int:
    grouping: dict[str, str] = {}
    for name, value in args.grouping:
        if name in grouping:
            command.print_usage(sys.stderr)
            print(f"{command.prog}: error: --grouping {name}= given twice", file=sys.stderr)
            return 2
        grouping[name] = value
    try:
        result = push.push_directory(directory, args.gateway, args.job, grouping,
                                     args.method, args.timeout)
    except ConfigurationError as err:
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {err}", file=sys.stderr)
        return 2
    except VictorMetricsError as err:  # DirectoryError, PushError
        print(f"{command.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"push: pushed {result.families} metric families ({result.samples} samples) of "
          f"{directory} to {result.url} ({result.method})")
    if not result.families:
        print(f"{command.prog}: warning: {directory} holds no metrics; is it the directory "
              "the job's processes wrote to?", file=sys.stderr)
    return 0


def _serve(directory: str, settings: Settings, port: int | None, addr: str | None,
           web_config: str | None) -> int:
    settings = dataclasses.replace(settings, multiproc_dir=directory)
    try:
        _runtime.configure(settings)
    except VictorMetricsError as err:
        print(f"{PROG} serve: error: {err}", file=sys.stderr)
        return 1
    if not settings.enabled:
        print(f"{PROG} serve: warning: VICTOR_METRICS_ENABLED=false, /metrics says so and "
              "nothing else", file=sys.stderr)
    stop, hup = threading.Event(), threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: hup.set())
    try:
        try:
            server = start_metrics_server(port, addr, web_config)
        except OSError as err:
            where = f"{addr or settings.addr}:{port if port is not None else settings.port or 9090}"
            print(f"{PROG} serve: error: cannot listen on {where}: {err.strerror or err}. "
                  "Choose another --port or --addr.", file=sys.stderr)
            return 1
        except ValueError as err:  # WebConfigError
            print(f"{PROG} serve: error: {err}", file=sys.stderr)
            return 1
        host = f"[{server.addr}]" if ":" in server.addr else server.addr
        scheme = "https" if (web_config or settings.web_config) and server.handle_tls else "http"
        print(f"serving the metrics of {directory} on {scheme}://{host}:{server.port}/metrics "
              "(stop with Ctrl-C or SIGTERM)", flush=True)
        while not stop.wait(0.5):
            if hup.is_set():
                hup.clear()
                try:
                    server.reload()
                except ValueError as err:
                    print(f"{PROG} serve: warning: web config not reloaded: {err}",
                          file=sys.stderr)
        server.stop()
        print("stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
