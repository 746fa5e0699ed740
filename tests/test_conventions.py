"""The repository's conventions, checked like any other property: the linter passes on the tree."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes_on_the_tree():
    """``ruff check`` with ``ruff.toml`` (pyflakes, pycodestyle's errors, import sorting) finds nothing."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
