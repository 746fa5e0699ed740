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


def test_mypy_finds_no_errors_in_the_public_packages():
    """``mypy`` with ``mypy.ini`` (ppl_models and inference; untyped dependencies not followed) finds nothing."""
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_packages_ship_their_type_marker():
    setup = (ROOT / "setup.py").read_text()
    for package in ("ppl_models", "inference"):
        assert (ROOT / package / "py.typed").is_file()
        assert f'"{package}": ["py.typed"]' in setup
