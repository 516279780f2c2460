"""The tools a chat request may run.

A request names a tool as ``"name"`` or ``"name:argument"`` (split at the first colon):
``"read_file:notes.txt"``, ``"word_count"``, ``"calculator:2*(3+4)"``. A tool that fails
raises :class:`ToolError`, whose ``error_type`` is what ``victor_tool_errors_total``
records; the chat answers anyway, with the error in that tool's result.
"""

from __future__ import annotations

import ast
import operator
import os
import stat
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
    """The text of a file inside the sandbox directory (UTF-8, at most 64 KiB)."""
    assert path is not None
    resolved = resolve_in_sandbox(ctx.sandbox, path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang the worker; O_NOFOLLOW: a symbolic link
        # swapped in after resolve_in_sandbox() is refused.
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ToolError("not_found", f"no file {path!r} in the sandbox") from None
    except OSError as err:
        raise ToolError("io_error", f"cannot open {path!r}: {err.strerror}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolError("not_a_file", f"{path!r} is not a regular file")
        data = _read_at_most(fd, READ_LIMIT_BYTES + 1)
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


def resolve_in_sandbox(sandbox: str, path: str) -> str:
    """The real path of ``path`` relative to ``sandbox``; :class:`ToolError` if it escapes.

    Escapes are absolute paths and paths that leave the sandbox through ``..`` or a
    symbolic link; they are refused with error type ``path_escape``.
    """
    if not path or "\x00" in path:
        raise ToolError("invalid_path", "the path must be non-empty, without NUL bytes")
    if os.path.isabs(path):
        raise ToolError("path_escape", f"{path!r} is absolute; give a path inside the sandbox")
    root = os.path.realpath(sandbox)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise ToolError("path_escape", f"{path!r} leads outside the sandbox")
    return resolved


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
    except SyntaxError:
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
