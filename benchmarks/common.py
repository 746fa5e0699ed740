"""Helpers every benchmark script shares: the environment record and result files."""

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy
import pyro
import torch

from inference import resolve_device

# where a benchmark writes by default: a folder of the current directory, ignored by git (the committed
# results in benchmarks/results/ are written only when asked for with --out benchmarks/results)
RESULTS = Path("benchmark-results")


def start(args):
    """The device of a benchmark run, after setting its torch threads (``--threads``, ``--device``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def environment(device):
    """Device, machine and library versions, for the JSON record of a benchmark."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "numpy": numpy.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine_tag(device):
    """A short file-name-safe name of the machine: the GPU's name on CUDA, ``cpu-<N>core`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def markdown_table(rows, columns, floatfmt="{:.3f}"):
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``."""
    def cell(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir, name, record, table):
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    md_path.write_text(table + "\n")
    return json_path, md_path
