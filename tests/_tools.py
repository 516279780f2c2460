"""Helpers for tests that run external programs (promtool, gunicorn, hadolint, ...)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, install_hint: str | None = None) -> str:
    """Return the path of executable ``name`` found on ``PATH``.

    When it is missing the calling test fails if the environment variable ``CI`` is set
    (CI must not pass by skipping what it was meant to run), and is skipped otherwise.
    ``install_hint`` tells the reader how to get the program, for example
    ``"apt-get install prometheus"``.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name!r} is not on PATH; install it"
    message += f" ({install_hint})" if install_hint else ""
    message += " or add its directory to PATH"
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI is set, so a missing tool is an error.", pytrace=False)
    pytest.skip(message)
