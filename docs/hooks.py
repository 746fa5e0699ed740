"""MkDocs hooks: the pages generated from the code (one per model, the command line, the benchmarks,
the README's sections), so that adding a model, a command or a result adds no hand-written page."""

import argparse
import re
from pathlib import Path

import torch.nn as nn
from mkdocs.structure.files import File

import ppl_models
from ppl_models.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _readme_section(first, stop):
    """The README from the heading ``first`` up to the heading ``stop`` (not included)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {first}")
    return text[start:text.index(f"## {stop}", start)]


def _model_modules():
    """The modules of the models ``ppl_models`` exports (every nn.Module in its ``__all__``), in that order."""
    modules = []
    for name in ppl_models.__all__:
        obj = getattr(ppl_models, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ not in modules:
            modules.append(obj.__module__)
    return modules


def _commands(parser, prog="pplm"):
    """``(prog, parser)`` for ``parser`` and every subcommand below it, depth first."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prog} {name}")


def _cli_page():
    lines = ["# The command line: `pplm`", "",
             "Generated from the argparse parser of `ppl_models.cli` (every command's `--help`). "
             "`python -m ppl_models` is `pplm`.", ""]
    for prog, parser in _commands(build_parser()):
        parser.prog = prog
        lines += [f"## `{prog}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _benchmarks_page():
    lines = ["# Benchmarks", "", "The results tables committed in `benchmarks/results/` (figures beside them, "
             "named after the machine). How to run them:", "", _readme_section("Benchmarks", "Layout").split("\n", 1)[1]]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        body = re.sub(r"^(#+) ", r"#\1 ", path.read_text(), flags=re.M)  # one level below the file's heading
        lines += [f"## {path.stem}", "", body, ""]
    return "\n".join(lines)


def on_config(config):
    """The Models section of the navigation (``MODELS`` in mkdocs.yml): one page per model module."""
    pages = [{m.rsplit(".", 1)[1]: f"models/{m.rsplit('.', 1)[1]}.md"} for m in _model_modules()]
    config["nav"] = [{"Models": pages} if entry == "MODELS" else entry for entry in config["nav"]]
    return config


def on_files(files, config):
    pages = {
        "index.md": "# ppl-models\n\n" + (ROOT / "README.md").read_text().split("\n", 2)[2].split("## A tour")[0]
        + "\nBuild this site with `mkdocs build` (or `mkdocs serve` and open http://127.0.0.1:8000).\n",
        "own-pair.md": "# Write your own model/guide pair\n\n" + _readme_section("A tour", "Models").split("\n", 1)[1]
        + "\nThe contract a pair follows is written once, in [inference.pair][]; "
        "[fit][inference.train.fit] trains it and [evaluate][inference.evaluate.evaluate] scores it.\n",
        "cli.md": _cli_page(),
        "benchmarks.md": _benchmarks_page(),
    }
    for module in _model_modules():
        short = module.rsplit(".", 1)[1]
        pages[f"models/{short}.md"] = f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
    for path, content in pages.items():
        files.append(File.generated(config, path, content=content))
    return files
