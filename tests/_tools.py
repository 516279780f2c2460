"""Helpers for tests that run external programs (promtool, gunicorn, hadolint, ...)."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest


def _missing(message: str) -> NoReturn:
    """Fail when ``CI`` is set (CI must not pass by skipping what it was meant to run: it
    installs every tool and the test extra), skip otherwise."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI is set, so a missing tool or package is an error.",
                    pytrace=False)
    pytest.skip(message)


def require_module(name: str, install_hint: str) -> ModuleType:
    """Import module ``name``; when it is missing, fail under CI and skip elsewhere."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"{name!r} is not installed ({install_hint})")


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
    _missing(message)
