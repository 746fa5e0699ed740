"""``pplm train MODEL --config FILE``: options read from a TOML or JSON file.

The file's keys are the command-line options of ``pplm train MODEL``, spelled
with dashes or underscores (``batch-size = 128`` or ``batch_size = 128``); a
flag is ``true`` or ``false``, a list option (``--hidden 256 256``,
``--modality ...``) a list. The file's options are placed on the command line
before the options typed there, so the typed ones win, and every value goes
through the same argparse checks as a typed one. A run folder's
``config.json`` is read too: its recorded options (:meth:`RunConfig.stored`,
read back by :func:`~ppl_models.cli.runs.read_run_config`) repeat the run
(``--out`` is still given on the command line). A key that is no option of
the model is refused in one line naming it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib

from inference.errors import UsageError

from .recipes import RECIPES
from .runs import read_config, read_run_config

# options that say how to run this command rather than what run to make: never read from a file
NOT_IN_FILES = ("config", "help", "resume", "overwrite")


def _config_position(argv):
    """``(model_index, config_index, path)`` of ``pplm train MODEL ... --config PATH``, or None."""
    if "train" not in argv:
        return None
    t = argv.index("train")
    if t + 1 >= len(argv) or argv[t + 1] not in RECIPES:
        return None
    for i in range(t + 2, len(argv)):
        if argv[i] == "--":
            return None
        if argv[i] == "--config":
            return (t + 1, i, argv[i + 1]) if i + 1 < len(argv) else None
        if argv[i].startswith("--config="):
            return t + 1, i, argv[i].split("=", 1)[1]
    return None


def read_options_file(path: str | Path, model: Callable[..., Any]) -> dict[str, Any]:
    """The ``{option: value}`` dict of a TOML/JSON options file or a run folder's ``config.json`` for ``model``.

    :raises inference.errors.UsageError: for a missing or malformed file, a run folder of another model, or
        a file that is not a table of options.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_bytes()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text.decode())
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"--config {path}: expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of options")
    if "format" in data:  # a run folder's config.json: the options it recorded
        config = read_config(path.parent)
        if config.get("model") != model:
            raise UsageError(f"--config {path}: a run of {config.get('model')!r}, not of {model!r}")
        stored = read_run_config(config, RECIPES[model]).stored()
        data = {**stored["run"], **stored["options"]}
    return data


def _option_actions(parser):
    """``{name: action}`` of ``parser``'s options, by dest and by long option (without dashes)."""
    actions = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IN_FILES:
            continue
        actions[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                actions[flag[2:].replace("-", "_")] = action
    return actions


def _tokens(key, value, action, path):
    flag = max(action.option_strings, key=len)
    if action.nargs == 0:  # a flag: store_true / store_false
        if not isinstance(value, bool):
            raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
        return [flag] if value == action.const else []
    if value is None:
        return []
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):
            return [t for v in value for t in (flag, str(v))]
        if action.nargs in ("+", "*"):
            return [flag, *map(str, value)] if value else []
        raise UsageError(f"--config {path}: {key} takes one value, got a list")
    if isinstance(value, dict):
        raise UsageError(f"--config {path}: {key} takes a value, got a table")
    return [f"{flag}={value}"]


def expand_config(argv: list[str], model_parser_of: Any) -> list[str]:
    """``argv`` with ``--config FILE``'s options inserted after ``pplm train MODEL`` (typed options win).

    ``model_parser_of(model)`` gives the argparse parser of ``pplm train MODEL``. ``argv`` is returned
    unchanged when it names no config file (argparse then reports any misuse of ``--config``).

    :raises inference.errors.UsageError: for an unreadable file, an unknown key (named) or a bad value's type.
    """
    where = _config_position(argv)
    if where is None:
        return argv
    model_index, _, path = where
    model = argv[model_index]
    data = read_options_file(path, model)
    actions = _option_actions(model_parser_of(model))
    tokens: list[str] = []
    seen: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in seen:
            raise UsageError(f"--config {path}: {seen[name]!r} and {key!r} name the same option; keep one")
        seen[name] = key
        if name == "validate" and isinstance(value, bool):  # RunConfig's name of --no-validate
            name, value = "no_validate", not value
        if name not in actions:
            raise UsageError(f"--config {path}: unknown option {key!r} for pplm train {model}")
        tokens += _tokens(key, value, actions[name], path)
    return [*argv[: model_index + 1], *tokens, *argv[model_index + 1:]]
