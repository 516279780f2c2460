"""The tools a chat request may run.

A request names a tool as ``"name"`` or ``"name:argument"`` (split at the first colon):
``"read_file:notes.txt"``, ``"word_count"``, ``"calculator:2*(3+4)"``. A tool that fails
raises :class:`ToolError`, whose ``error_type`` is what ``victor_tool_errors_total``
records; the chat answers anyway, with the error in that tool's result.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import operator
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

READ_LIMIT_BYTES = 64 * 1024
MAX_EXPRESSION_LENGTH = 200
MAX_MAGNITUDE = 1e100
MAX_EXPONENT = 333


class ToolError(Exception):
    """A tool could not do its job; ``error_type`` is the stable label for the failure."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class ToolContext:
    """What a tool may use besides its argument."""

    message: str
    sandbox: str


@dataclass(frozen=True)
class Tool:
    """A named tool; ``argument`` says whether ``name:argument`` is required."""

    name: str
    argument: str | None
    description: str
    run: Callable[[str | None, ToolContext], dict[str, Any]]


def read_file(path: str | None, ctx: ToolContext) -> dict[str, Any]:
    """The text of a file inside the sandbox directory (UTF-8, at most 64 KiB).

    Refused: absolute paths and ``..`` (``path_escape``), any symbolic link on the way or
    at the end (``path_escape``), a file with several hard links, since another name may
    lie outside the sandbox (``path_escape``), anything but a regular file
    (``not_a_file``), empty components, NUL bytes or text that is not valid Unicode
    (``invalid_path``). See :func:`open_in_sandbox`.
    """
    assert path is not None
    fd = open_in_sandbox(ctx.sandbox, path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ToolError("not_a_file", f"{path!r} is not a regular file")
        if info.st_nlink != 1:
            raise ToolError(
                "path_escape",
                f"{path!r} has {info.st_nlink} hard links; refused, another may lie outside "
                "the sandbox",
            )
        data = _read_at_most(fd, READ_LIMIT_BYTES + 1)
    except OSError as err:
        raise ToolError("io_error", f"cannot read {path!r}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > READ_LIMIT_BYTES:
        raise ToolError("too_large", f"{path!r} is larger than {READ_LIMIT_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError("not_text", f"{path!r} is not UTF-8 text") from None
    return {"path": path, "bytes": len(data), "content": text}


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    while limit > 0:
        chunk = os.read(fd, limit)
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


# --- opening a path inside the sandbox, race-free ------------------------------------------
#
# The sandbox is opened once per call as a directory fd, and the path is resolved relative
# to it by the kernel without following any symbolic link, so a directory swapped for a
# link between a check and the open cannot lead outside: there is no separate check.

USE_OPENAT2 = True
"""Use Linux openat2(2) when the kernel has it; False forces the portable walk (tests)."""

SYS_OPENAT2 = 437  # the same number on every Linux architecture but alpha
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
PATH_MAX = 4096

# O_NONBLOCK: opening a FIFO must not hang the worker; O_NOCTTY: never acquire a terminal.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_ROOT_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        _libc = None
_openat2_works: bool | None = None  # None: not probed yet
# Old kernels answer ENOSYS; seccomp filters ENOSYS or EPERM; EINVAL/E2BIG: unknown fields.
_NO_OPENAT2 = frozenset((errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG))


def open_in_sandbox(sandbox: str, path: str) -> int:
    """A new read-only fd of ``path`` (relative to the directory ``sandbox``), not followed
    through any symbolic link and never outside ``sandbox``; :class:`ToolError` otherwise.

    The caller closes the fd and checks what it is (it may be a directory or a FIFO).
    """
    parts = _components(path)
    try:
        root = os.open(sandbox, _ROOT_FLAGS)
    except OSError as err:
        raise ToolError("io_error", f"the sandbox is not available: {err.strerror}") from None
    try:
        if USE_OPENAT2 and _has_openat2(root):
            try:
                return _openat2(root, b"/".join(parts), _FILE_FLAGS, _RESOLVE)
            except OSError as err:
                if err.errno != errno.ENOSYS:
                    raise _refusal(err, path) from None
        return _open_walk(root, parts, path)
    finally:
        os.close(root)


def _components(path: str) -> list[bytes]:
    """The names of ``path``, validated; ``"."`` dropped, ``[b"."]`` for the sandbox itself."""
    if not path or "\x00" in path:
        raise ToolError("invalid_path", "the path must be non-empty, without NUL bytes")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolError("invalid_path", f"{path!r} is not valid Unicode text") from None
    if raw.startswith(b"/"):
        raise ToolError("path_escape", f"{path!r} is absolute; give a path inside the sandbox")
    if len(raw) >= PATH_MAX:
        raise ToolError("invalid_path", f"the path is longer than {PATH_MAX - 1} bytes")
    parts = raw.split(b"/")
    if b".." in parts:
        raise ToolError("path_escape", f"{path!r} goes up with '..'; paths only go down")
    if b"" in parts:
        raise ToolError("invalid_path", f"{path!r} has an empty component ('//' or a final '/')")
    return [part for part in parts if part != b"."] or [b"."]


def _has_openat2(root: int) -> bool:
    """Whether openat2(2) works here: not before Linux 5.6, nor under some seccomp filters."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(root, b".", _ROOT_FLAGS, _RESOLVE))
        except OSError as err:
            if err.errno not in _NO_OPENAT2:
                return False  # a passing failure (EMFILE...): walk this time, probe again
            _openat2_works = False
        else:
            _openat2_works = True
    return _openat2_works


def _openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(dir_fd, path, {flags, 0, resolve}); raises OSError (ENOSYS without it)."""
    if _libc is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags, 0, resolve)
    while True:
        fd = _libc.syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def _open_walk(root: int, parts: list[bytes], path: str) -> int:
    """Without openat2: one component at a time, each opened without following a link."""
    fd = root
    try:
        for name in parts[:-1]:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                raise _refusal(err, path, fd, name) from None
            if fd != root:
                os.close(fd)
            fd = child
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as err:
            raise _refusal(err, path, fd, parts[-1]) from None
    finally:
        if fd != root:
            os.close(fd)


def _refusal(err: OSError, path: str, dir_fd: int | None = None, name: bytes = b"") -> ToolError:
    """The :class:`ToolError` of a failed open; ``dir_fd``/``name``: the walk's component."""
    code = err.errno
    if code == errno.ENOTDIR and dir_fd is not None:
        # O_NOFOLLOW|O_DIRECTORY on a symbolic link fails with ENOTDIR, like a file would.
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        code = errno.ELOOP if is_link else code
    if code == errno.ELOOP:
        return ToolError("path_escape", f"{path!r} is or goes through a symbolic link")
    if code == errno.EXDEV:
        return ToolError("path_escape", f"{path!r} leads outside the sandbox")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return ToolError("not_found", f"no file {path!r} in the sandbox")
    if code == errno.ENXIO:  # a socket, or a device without a driver
        return ToolError("not_a_file", f"{path!r} is not a regular file")
    if code == errno.ENAMETOOLONG:
        return ToolError("invalid_path", f"a component of {path!r} is too long")
    return ToolError("io_error", f"cannot open {path!r}: {err.strerror}")


def word_count(text: str | None, ctx: ToolContext) -> dict[str, Any]:
    """The number of words of the argument, or of the chat message without one."""
    counted = ctx.message if text is None else text
    return {"words": len(counted.split())}


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def calculator(expression: str | None, ctx: ToolContext) -> dict[str, Any]:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses.

    Values beyond +-1e100, and exponents above 333 of a number beyond +-1, are refused
    with error type ``too_large``.
    """
    assert expression is not None
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolError(
            "invalid_expression", f"expressions are limited to {MAX_EXPRESSION_LENGTH} characters"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a lone surrogate (or NUL before 3.11.4)
        raise ToolError("invalid_expression", f"{expression!r} is not arithmetic") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("zero_division", f"{expression!r} divides by zero") from None
    except OverflowError:
        raise ToolError("too_large", f"{expression!r} is too large to compute") from None
    return {"expression": expression, "value": value}


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # Refused before computing: 9**9**9 would hold the worker for minutes.
        if isinstance(node.op, ast.Pow) and right > MAX_EXPONENT and abs(left) > 1:
            raise OverflowError
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_evaluate(node.operand)))
    raise ToolError(
        "invalid_expression", "only numbers, + - * / // % ** and parentheses are allowed"
    )


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex):  # a negative number to a fractional power
        raise ToolError("invalid_expression", "the result is not a real number")
    if not abs(value) <= MAX_MAGNITUDE:  # also catches inf and nan
        raise OverflowError
    return value  # type: ignore[no-any-return]


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("read_file", "path", "read a UTF-8 file of the sandbox", read_file),
        Tool("word_count", None, "count the words of the argument or the message", word_count),
        Tool("calculator", "expression", "evaluate an arithmetic expression", calculator),
    )
}
