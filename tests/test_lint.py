"""The code base stays ruff-clean."""

from __future__ import annotations

import subprocess
import sys

from ._gunicorn import ROOT


def test_ruff_check_passes():
    """`ruff check` reports nothing on the whole repository."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr


def test_mypy_passes_on_the_library():
    """`mypy victor_mp_metrics` finds no type errors."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "victor_mp_metrics"], cwd=ROOT, capture_output=True,
        text=True,
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr
