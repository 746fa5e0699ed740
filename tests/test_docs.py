"""The documentation site builds in strict mode (a broken reference or a missing page fails), with one page
per exported model, the inference API and every ``pplm`` command generated from argparse."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ppl_models
from ppl_models.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_with_a_page_per_model(site):
    for name in ("VAE", "PPCA", "GMM", "VaDE", "MultimodalVAE"):
        module = getattr(ppl_models, name).__module__
        page = site / "models" / module.rsplit(".", 1)[1] / "index.html"
        assert f'id="{module}.{name}"' in page.read_text(), name


def test_the_inference_page_documents_fit_its_callbacks_and_the_pair_contract(site):
    page = (site / "inference" / "index.html").read_text()
    for anchor in ("inference.train.fit", "inference.train.Trainer", "inference.callbacks.EarlyStopping",
                   "inference.evaluate.evaluate", "inference.elbo.make_elbo", "inference.pair.as_pair"):
        assert f'id="{anchor}"' in page, anchor


def test_the_cli_page_has_every_command_from_argparse(site):
    page = (site / "cli" / "index.html").read_text()
    commands = [a for a in build_parser()._actions if a.dest == "command"][0].choices
    for name in commands:
        assert f"pplm {name}" in page, name
    assert "--config FILE" in page and "pplm train vae" in page
