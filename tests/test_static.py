"""Static checks as part of the suite, so the README's one test command gates them: ruff over the code
and tests, and mypy over src/ with unreachable-code warnings (pyproject.toml configures both). Code after
a `return` (optimizer settings that were never validated) is the kind of defect these catch and tests
that exercise only the happy path do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "--no-cache", "src", "tests", "analysis", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing_in_src():
    # no cache (/dev/null): the checkout stays clean and every run checks from scratch
    proc = _run("mypy", "--cache-dir", "/dev/null", "--config-file", str(ROOT / "pyproject.toml"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr
