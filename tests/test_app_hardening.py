"""Hardening of the reference app: bounded request bodies, a race-free read_file sandbox,
and no input that ends in a 500 or in an exception class name as a metric label."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from flask.testing import FlaskClient

from app import MAX_BODY_BYTES, create_app
from app import tools as app_tools
from app.tools import ToolContext, ToolError, calculator, read_file

from ._gunicorn import Gunicorn, gunicorn

MiB = 1024 * 1024
# The swap race runs this long per resolution path; APP_HARDENING_RACE_SECONDS=10 by hand.
RACE_SECONDS = float(os.environ.get("APP_HARDENING_RACE_SECONDS", "3"))
RACE_MIN_CALLS = 1000
SECRET = "TOP-SECRET-MARKER-4b1d"
RSS_GROWTH_LIMIT = 6 * MiB
ANSWER_TIMEOUT = 30.0
AT_FDCWD = -100
RENAME_EXCHANGE = 2
EXCEPTION_LABEL = re.compile(r'="[A-Za-z_.]*(?:Error|Exception|Exit|Interrupt)"')

_libc = ctypes.CDLL(None, use_errno=True)


def chat_body(message: str = "hello", tools: list[str] | None = None) -> bytes:
    """A /chat JSON body; ``json.dumps`` writes a lone surrogate as its ``\\ud800`` escape."""
    payload: dict[str, Any] = {"message": message}
    if tools is not None:
        payload["tools"] = tools
    return json.dumps(payload).encode()


def post_chat(client: FlaskClient, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST /chat through the test client; (status, decoded JSON body)."""
    response = client.post("/chat", data=body, content_type="application/json", buffered=True)
    return response.status_code, response.get_json()


@pytest.fixture
def client() -> Iterator[FlaskClient]:
    """A test client of a fresh app without simulated LLM latency."""
    with create_app({"VICTOR_APP_LLM_LATENCY_MS": 0}).test_client() as c:
        yield c


# --- 1. request bodies are bounded ---------------------------------------------------------


def test_body_limit_defaults_to_one_mib() -> None:
    """Without config or environment, MAX_CONTENT_LENGTH is 1 MiB (Flask's default is None)."""
    assert MiB == MAX_BODY_BYTES == create_app().config["MAX_CONTENT_LENGTH"]


def test_body_limit_from_environment_config_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """VICTOR_MAX_BODY_BYTES sets the limit; a MAX_CONTENT_LENGTH given to create_app wins."""
    monkeypatch.setenv("VICTOR_MAX_BODY_BYTES", "2048")
    assert 2048 == create_app().config["MAX_CONTENT_LENGTH"]
    assert 64 == create_app({"MAX_CONTENT_LENGTH": 64}).config["MAX_CONTENT_LENGTH"]
    assert 2048 == create_app({"MAX_CONTENT_LENGTH": None}).config["MAX_CONTENT_LENGTH"]


@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "1MiB", "lots"])
def test_bad_body_limit_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    """A VICTOR_MAX_BODY_BYTES that is not a whole number >= 1 stops create_app clearly."""
    monkeypatch.setenv("VICTOR_MAX_BODY_BYTES", raw)
    with pytest.raises(ValueError) as info:
        create_app()
    assert (
        f"the environment variable VICTOR_MAX_BODY_BYTES = {raw!r} is not valid: expected "
        "a whole number of bytes >= 1, such as 1048576 (1 MiB)."
    ) == str(info.value)


def test_bad_body_limit_in_config_is_refused() -> None:
    """A bad MAX_CONTENT_LENGTH given to create_app is refused, naming the config key."""
    with pytest.raises(ValueError, match=r"config\['MAX_CONTENT_LENGTH'\] = '0' is not valid"):
        create_app({"MAX_CONTENT_LENGTH": 0})


def test_two_mb_body_is_a_json_413_in_process(client: FlaskClient) -> None:
    """A 2 MB body answers 413 with the app's JSON error shape, counted as payload_too_large."""
    status, body = post_chat(client, chat_body("x" * 2_000_000))
    assert 413 == status
    assert ["error"] == list(body)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'error_type="payload_too_large"' in metrics


def raw_post(
    port: int, body: bytes, *, chunked: bool, chunk_size: int = 64 * 1024
) -> tuple[int, bytes, int]:
    """POST /chat on a raw socket, chunked or with Content-Length; stop sending as soon as
    the server answers or closes. Returns (status, response body, request bytes sent)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (
        "POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\n{framing}\r\n\r\n"
    ).encode()

    def frames() -> Iterator[bytes]:
        for start in range(0, len(body), chunk_size):
            part = body[start : start + chunk_size]
            yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
        if chunked:
            yield b"0\r\n\r\n"

    pieces, pending, sent, sending = frames(), head, 0, True
    response = bytearray()
    deadline = time.monotonic() + ANSWER_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        sock.setblocking(False)
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no complete answer in {ANSWER_TIMEOUT} s: {bytes(response)!r}"
            readable, _, _ = select.select([sock], [sock] if sending else [], [], remaining)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                response += data
                sending = False  # the server answered: send nothing more
                continue
            if not pending:
                pending = next(pieces, b"")
                if not pending:
                    sending = False
                    continue
            try:
                count = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                sending = False
                continue
            pending, sent = pending[count:], sent + count
    head_bytes, _, payload = bytes(response).partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 "), f"no HTTP answer: {bytes(response)[:200]!r}"
    return int(head_bytes.split(b" ", 2)[1]), payload, sent - len(head)


class PeakRss:
    """Samples the resident memory of ``pid`` every 5 ms in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def vm_hwm(pid: int) -> int:
    """The kernel's record of the peak resident memory of ``pid`` (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """One real Gunicorn master with one sync worker on 127.0.0.1; stopped after the module."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    with gunicorn(tmp, workers=1, env={"VICTOR_APP_LLM_LATENCY_MS": "0"}) as master:
        yield master


@pytest.mark.gunicorn
def test_two_mb_body_with_content_length_is_a_413(server: Gunicorn) -> None:
    """Under Gunicorn a 2 MB body with Content-Length answers a JSON 413 before it is read."""
    status, payload, sent = raw_post(server.port, chat_body("x" * 2_000_000), chunked=False)
    print(f"\n2 MB with Content-Length: status {status} after {sent / MiB:.2f} MiB sent")
    assert 413 == status
    assert ["error"] == list(json.loads(payload))


@pytest.mark.gunicorn
def test_chunked_body_of_twenty_mib_is_a_413_with_bounded_memory(server: Gunicorn) -> None:
    """A 20 MiB chunked POST /chat answers 413 without the worker's RSS growing past a few MiB;
    a normal /chat still works afterwards."""
    (worker,) = server.wait_workers(1)
    assert 200 == server.post_json("/chat", chat_body()).status  # warm up the worker
    before, hwm_before = psutil.Process(worker).memory_info().rss, vm_hwm(worker)
    with PeakRss(worker) as rss:
        status, payload, sent = raw_post(server.port, chat_body("x" * (20 * MiB)), chunked=True)
    growth, hwm_growth = rss.peak - before, vm_hwm(worker) - hwm_before
    print(
        f"\n20 MiB chunked: status {status}, sent {sent / MiB:.2f} MiB, worker RSS "
        f"{before / MiB:.1f} -> peak {rss.peak / MiB:.1f} MiB (+{growth / MiB:.2f}), "
        f"VmHWM +{hwm_growth / MiB:.2f} MiB"
    )
    assert 413 == status
    assert ["error"] == list(json.loads(payload))
    assert growth < RSS_GROWTH_LIMIT
    assert hwm_growth < RSS_GROWTH_LIMIT
    assert [worker] == server.workers()  # the same worker, still alive
    after = server.post_json("/chat", chat_body("still there?"))
    assert 200 == after.status
    assert "claude-sonnet-4-5 read 2 word(s)." == json.loads(after.body)["reply"]


@pytest.mark.gunicorn
def test_chunked_body_exactly_at_the_limit_is_read_one_more_byte_is_a_413(
    server: Gunicorn,
) -> None:
    """A chunked body of exactly MAX_BODY_BYTES is accepted; one byte more is a 413, not a
    silently truncated body."""
    body = chat_body("fits")
    body += b" " * (MAX_BODY_BYTES - len(body))
    status, payload, _ = raw_post(server.port, body, chunked=True)
    assert (200, "claude-sonnet-4-5 read 1 word(s).") == (status, json.loads(payload)["reply"])
    status, payload, _ = raw_post(server.port, body + b" ", chunked=True)
    assert (413, ["error"]) == (status, list(json.loads(payload)))


# --- 2. the read_file sandbox --------------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Run read_file on openat2(2) or on the component-by-component walk; count the walks."""
    if request.param == "openat2":
        probe = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not app_tools._has_openat2(probe):
                pytest.skip("this kernel has no usable openat2(2)")
        finally:
            os.close(probe)
    monkeypatch.setattr(app_tools, "USE_OPENAT2", request.param == "openat2")
    calls: Counter[str] = Counter()
    walk = app_tools._open_walk

    def counted(root: int, parts: list[bytes], path: str) -> int:
        calls["walk"] += 1
        return walk(root, parts, path)

    monkeypatch.setattr(app_tools, "_open_walk", counted)
    calls["mode_" + request.param] = 1
    return calls


def used_expected_path(calls: Counter[str]) -> bool:
    """The walk ran if and only if the walk was forced."""
    return (calls["walk"] > 0) == bool(calls["mode_walk"])


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A sandbox with files, a FIFO, and links (symbolic and hard) inside and to the outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    root = tmp_path / "box"
    (root / "sub").mkdir(parents=True)
    (root / "inside.txt").write_text("hello sandbox\n")
    (root / "sub" / "inner.txt").write_text("inner\n")
    (root / "link-in").symlink_to(root / "inside.txt")
    (root / "link-out").symlink_to(outside / "secret.txt")
    (root / "dir-out").symlink_to(outside)
    (root / "dir-in").symlink_to(root / "sub")
    (root / "dangling").symlink_to(tmp_path / "nothing-here")
    os.link(outside / "secret.txt", root / "hard-out")
    (root / "sub" / "twin.txt").write_text("twin\n")
    os.link(root / "sub" / "twin.txt", root / "sub" / "hard-in")  # both names refused
    os.mkfifo(root / "fifo")
    (root / "big.txt").write_bytes(b"x" * (app_tools.READ_LIMIT_BYTES + 1))
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00")
    return root


READS = [
    ("inside.txt", "hello sandbox\n"),
    ("./inside.txt", "hello sandbox\n"),
    ("sub/inner.txt", "inner\n"),
    ("sub/./inner.txt", "inner\n"),
]
REFUSALS = [
    ("../outside/secret.txt", "path_escape"),
    ("sub/../../outside/secret.txt", "path_escape"),
    ("sub/../inside.txt", "path_escape"),
    ("..", "path_escape"),
    ("/etc/passwd", "path_escape"),
    ("//etc/passwd", "path_escape"),
    ("link-out", "path_escape"),
    ("link-in", "path_escape"),
    ("dir-out/secret.txt", "path_escape"),
    ("dir-in/inner.txt", "path_escape"),
    ("dangling", "path_escape"),
    ("hard-out", "path_escape"),
    ("sub/hard-in", "path_escape"),
    ("sub/twin.txt", "path_escape"),
    ("missing.txt", "not_found"),
    ("sub/missing.txt", "not_found"),
    ("inside.txt/more", "not_found"),
    ("sub", "not_a_file"),
    (".", "not_a_file"),
    ("fifo", "not_a_file"),
    ("big.txt", "too_large"),
    ("binary.bin", "not_text"),
    ("", "invalid_path"),
    ("sub//inner.txt", "invalid_path"),
    ("sub/", "invalid_path"),
    ("inside.txt\x00", "invalid_path"),
    ("\ud800", "invalid_path"),
    ("x" * 300, "invalid_path"),
    ("a/" * 2100 + "a", "invalid_path"),
]


@pytest.mark.parametrize(("path", "content"), READS)
def test_read_file_reads_regular_files_inside(
    box: Path, resolution: Counter[str], path: str, content: str
) -> None:
    """Regular, singly linked files below the sandbox are read, on both resolution paths."""
    result = read_file(path, ToolContext("m", str(box)))
    assert {"path": path, "bytes": len(content), "content": content} == result
    assert used_expected_path(resolution)


@pytest.mark.parametrize(("path", "error_type"), REFUSALS)
def test_read_file_refusals_have_stable_error_types(
    box: Path, resolution: Counter[str], path: str, error_type: str
) -> None:
    """Escapes, links, hard links, FIFOs, directories and bad paths are ToolErrors with a
    stable error_type, identical on both resolution paths; the secret never shows."""
    with pytest.raises(ToolError) as info:
        read_file(path, ToolContext("m", str(box)))
    assert error_type == info.value.error_type
    assert SECRET not in str(info.value)
    try:
        app_tools._components(path)
    except ToolError:
        return  # refused before anything is opened
    assert used_expected_path(resolution)


def test_fifo_is_refused_without_blocking(box: Path) -> None:
    """Opening a FIFO nobody writes to returns at once (O_NONBLOCK) as not_a_file."""
    started = time.monotonic()
    with pytest.raises(ToolError, match="not a regular file"):
        read_file("fifo", ToolContext("m", str(box)))
    assert time.monotonic() - started < 1.0


def test_without_openat2_the_walk_is_used(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When openat2 fails with ENOSYS (old kernel, seccomp) reads fall back to the walk."""

    def enosys(*args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(app_tools, "_openat2", enosys)
    monkeypatch.setattr(app_tools, "_openat2_works", None)
    ctx = ToolContext("m", str(box))
    assert "inner\n" == read_file("sub/inner.txt", ctx)["content"]
    with pytest.raises(ToolError) as info:
        read_file("dir-out/secret.txt", ctx)
    assert "path_escape" == info.value.error_type
    assert app_tools._openat2_works is False


def test_sandbox_refusals_over_http_are_200_with_a_tool_error(box: Path) -> None:
    """Through /chat a refused read is a tool error in a 200 answer, never a 500."""
    client = create_app({"VICTOR_APP_SANDBOX": str(box), "VICTOR_APP_LLM_LATENCY_MS": 0})
    tools = ["read_file:hard-out", "read_file:dir-out/secret.txt", "read_file:fifo"]
    status, body = post_chat(client.test_client(), chat_body("m", tools))
    assert 200 == status
    assert ["path_escape", "path_escape", "not_a_file"] == [t["error_type"] for t in body["tools"]]
    assert SECRET not in json.dumps(body)


def _renameat2_exchange(a: bytes, b: bytes) -> int:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE); 0 or the errno."""
    if _libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0:
        return 0
    return ctypes.get_errno()


def race(
    box: Path, call: Callable[[int], tuple[str, str]], seconds: float
) -> tuple[Counter[str], int, int, list[object]]:
    """Swap ``box/sub`` (a directory) with ``box/swap`` (a link to the outside directory)
    in a thread while calling ``call(i)`` -> (outcome, text) for ``seconds``.

    Returns the outcomes, the number of calls whose text held the secret, the number of
    swaps, and the swapper's errors."""
    stop = threading.Event()
    swaps = [0]
    problems: list[object] = []
    a, b = os.fsencode(box / "sub"), os.fsencode(box / "swap")

    def swapper() -> None:
        try:
            while not stop.is_set():
                code = _renameat2_exchange(a, b)
                if code:
                    problems.append(os.strerror(code))
                    return
                swaps[0] += 1
        except BaseException as err:  # reported by the test, not lost in the thread
            problems.append(err)

    outcomes: Counter[str] = Counter()
    leaks = 0
    thread = threading.Thread(target=swapper, name="swapper", daemon=True)
    thread.start()
    try:
        deadline, i = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            outcome, text = call(i)
            outcomes[outcome] += 1
            leaks += SECRET in text
            i += 1
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    return outcomes, leaks, swaps[0], problems


@pytest.mark.skipif(not hasattr(_libc, "renameat2"), reason="libc has no renameat2")
def test_swapping_a_directory_for_a_symlink_never_leaks(
    tmp_path: Path, resolution: Counter[str]
) -> None:
    """While a thread swaps a sandbox directory with a link to an outside directory
    (RENAME_EXCHANGE), thousands of reads never return the outside secret nor a 500."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    box = tmp_path / "box"
    (box / "sub").mkdir(parents=True)
    (box / "sub" / "secret.txt").write_text("harmless\n")
    (box / "swap").symlink_to(outside)
    ctx = ToolContext("m", str(box))
    client = create_app(
        {"VICTOR_APP_SANDBOX": str(box), "VICTOR_APP_LLM_LATENCY_MS": 0}
    ).test_client()
    request = chat_body("m", ["read_file:sub/secret.txt"])

    def call(i: int) -> tuple[str, str]:
        if i % 10 == 0:  # every tenth through the HTTP route, the rest direct
            response = client.post(
                "/chat", data=request, content_type="application/json", buffered=True
            )
            text = response.get_data(as_text=True)
            if response.status_code != 200:
                return f"http_{response.status_code}", text
            result = response.get_json()["tools"][0]
            return result.get("error_type", "success"), text
        try:
            output = read_file("sub/secret.txt", ctx)
        except ToolError as err:
            return err.error_type, str(err)
        return ("success" if output["content"] == "harmless\n" else "wrong"), output["content"]

    outcomes, leaks, swaps, problems = race(box, call, RACE_SECONDS)
    calls = sum(outcomes.values())
    mode = "walk" if resolution["mode_walk"] else "openat2"
    print(f"\nrace ({mode}): {calls} calls, {swaps} swaps, {leaks} leaks, {dict(outcomes)}")
    assert [] == problems
    assert 0 == leaks
    assert set(outcomes) <= {"success", "path_escape", "not_found"}
    assert calls >= RACE_MIN_CALLS
    assert outcomes["success"] > 0 and outcomes["path_escape"] > 0  # both states were seen
    assert used_expected_path(resolution)


# --- 3. no input is a 500 or an exception-class label --------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (chat_body("m", ["read_file:\ud800"]), "each tool is not valid Unicode text"),
        (chat_body("m", ["calculator:1+\udfff"]), "each tool is not valid Unicode text"),
        (chat_body("m", ["word_count:\ud800x"]), "each tool is not valid Unicode text"),
        (chat_body("hi \ud800"), "'message' is not valid Unicode text"),
        (chat_body("m", ["\ud800"]), "each tool is not valid Unicode text"),
        (b'{"message": "m", "provider": "\\ud800"}', "unknown provider"),
        (b'{"message": "m", "\\udc80": 1}', "unknown field(s)"),
    ],
)
def test_lone_surrogates_are_a_400(client: FlaskClient, body: bytes, fragment: str) -> None:
    """A lone surrogate (a JSON \\ud800 escape) anywhere is a 400 JSON error, never a 500;
    /metrics carries no UnicodeEncodeError label."""
    assert b"\\ud" in body
    tools_before = tool_samples(client)
    status, answer = post_chat(client, body)
    assert 400 == status
    assert fragment in answer["error"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "UnicodeEncodeError" not in metrics
    assert 'error_type="bad_request"' in metrics
    assert tools_before == tool_samples(client)  # no tool ran


def tool_samples(client: FlaskClient) -> list[str]:
    """The victor_tool_* sample lines of /metrics."""
    text = client.get("/metrics").get_data(as_text=True)
    return [line for line in text.splitlines() if line.startswith("victor_tool_")]


def test_tools_refuse_lone_surrogates_themselves() -> None:
    """Called directly, read_file and calculator turn a lone surrogate into a ToolError."""
    ctx = ToolContext("m", ".")
    with pytest.raises(ToolError) as info:
        read_file("\ud800", ctx)
    assert "invalid_path" == info.value.error_type
    with pytest.raises(ToolError) as info:
        calculator("1+\ud800", ctx)
    assert "invalid_expression" == info.value.error_type


ODD_TOOLS = [
    "read_file:\x00", "read_file:" + "a/" * 5000, "read_file:" + "\u00e9" * 300,
    "read_file:/dev/zero", "read_file:../../../../etc/shadow", "read_file:.", "read_file:./",
    "read_file:\udcff", "calculator:1\x00", "calculator:9**9**9", "calculator:" + "-" * 180 + "1",
    "calculator:" + "(" * 150, "calculator:1e309", "calculator:(-1)**0.5", "calculator:1%0",
    "calculator:" + "9" * 200, "calculator:[1]", "calculator:'a'*9", "word_count:\x00",
]  # fmt: skip


def test_odd_input_never_yields_a_500_or_an_exception_label(client: FlaskClient) -> None:
    """Odd but well-formed requests are 200 or 400, and no metric label names an exception."""
    statuses: Counter[int] = Counter()
    for tool in ODD_TOOLS:
        status, _ = post_chat(client, chat_body("odd \x00 input", [tool]))
        statuses[status] += 1
    for raw in (b"\xed\xa0\x80", b'"\\ud800"', b'{"message": "\\ud800\\udc00"}', b"1e99999"):
        status, _ = post_chat(client, raw)
        statuses[status] += 1
    assert set(statuses) <= {200, 400}, statuses
    metrics = client.get("/metrics").get_data(as_text=True)
    assert [] == EXCEPTION_LABEL.findall(metrics)
