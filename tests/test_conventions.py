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


def _unannotated(tree, module):
    """Public module-level functions, public classes' ``__init__`` and public methods (also nested in public
    classes) whose parameters (``self``/``cls`` aside) or return lack an annotation, as ``module:line name``."""
    import ast

    missing = []

    def check(node, qualname, is_method):
        args = node.args
        params = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
        decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in node.decorator_list}
        if is_method and "staticmethod" not in decorators and params and params[0] in args.posonlyargs + args.args:
            params = params[1:]
        lacking = [a.arg for a in params if a.annotation is None]
        if node.returns is None:
            lacking.append("return")
        if lacking:
            missing.append(f"{module}:{node.lineno} {qualname} ({', '.join(lacking)})")

    def walk(body, prefix, in_class):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_") or (in_class and node.name == "__init__"):
                    check(node, prefix + node.name, in_class)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                walk(node.body, prefix + node.name + ".", True)

    walk(tree.body, "", False)
    return missing


def test_every_public_function_and_method_is_annotated():
    """Every public function, public class's ``__init__`` and public method of ``ppl_models`` (the CLI too) and
    ``inference`` annotates all its parameters (``self``/``cls`` aside) and its return, so that the type check
    above sees their bodies and a reader sees the types (shapes and units stay in the docstrings)."""
    import ast

    # the walker itself: a missing parameter or return annotation is found, self and private names are not
    probe = ("def f(x, *, y: int = 0): pass\ndef _g(x): pass\nclass C:\n    def __init__(self, a: int):\n"
             "        pass\n    @staticmethod\n    def s(b) -> None: pass\n    def m(self) -> int: return 0\n")
    assert _unannotated(ast.parse(probe), "probe.py") == ["probe.py:1 f (x, return)", "probe.py:4 C.__init__ (return)",
                                                          "probe.py:7 C.s (b)"]
    missing = []
    for package in ("ppl_models", "inference"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            if any(part.startswith("_") and part not in ("__init__.py", "__main__.py") for part in path.parts[-2:]):
                continue
            missing += _unannotated(ast.parse(path.read_text()), module)
    assert not missing, f"{len(missing)} public functions lack annotations:\n" + "\n".join(missing)
