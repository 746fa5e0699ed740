"""The README is executable documentation: its set-up commands and its tour must stay true."""

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def setup_commands():
    block = re.search(r"## Set-up\s+```bash\n(.*?)```", README, re.S).group(1)
    return [line.strip() for line in block.strip().splitlines()]


def test_the_three_setup_commands():
    install, main_job, tests = setup_commands()
    assert install == 'pip install -e ".[test]"'
    assert main_job.startswith("pplm train vae ")
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs as the README says and runs exactly the README's test command
    assert 'pip install -e ".[test]"' in ci
    assert ci.strip().splitlines()[-1] == tests


def test_main_job_parses_with_the_documented_defaults():
    from ppl_models.cli import build_parser

    args = build_parser().parse_args(setup_commands()[1].split()[1:])
    assert (args.dataset, args.binarize, args.likelihood, args.elbo, args.particles) == (
        "digits", "dynamic", "bernoulli", "trace", 1000)


def test_the_tour_runs_and_its_bounds_are_ordered():
    code = re.search(r"## A tour.*?```python\n(.*?)```", README, re.S).group(1)
    namespace = {"__name__": "readme_tour"}
    exec(compile(code, "README.md", "exec"), namespace)
    score = namespace["score"]
    # same particles for both: log-mean-exp >= mean (Jensen) for every datapoint
    assert score.log_likelihood >= score.elbo
    # 20 epochs of training lift the bound far above 64 coin flips (44.4 nats)
    assert score.elbo > -40
    assert len(namespace["result"].history) == 20


def test_the_second_tour_recovers_the_regression_weights():
    """The function model + autoguide example: its global weights come back (1.5, -0.5) within 0.1 (the
    posterior sd is about 0.014 and 100 epochs of minibatch SVI leave a few hundredths of noise), and
    the whole-data bound per point is near -log(0.3 sqrt(2 pi e)) = -0.21 nats (minus the noise's entropy;
    the data's own scatter around it is about 0.03)."""
    blocks = re.findall(r"```python\n(.*?)```", README.split("## A tour", 1)[1], re.S)
    namespace = {"__name__": "readme_tour"}
    exec(compile(blocks[0] + blocks[1], "README.md", "exec"), namespace)
    w = namespace["guide"].median()["w"]
    assert torch.allclose(w, torch.tensor([1.5, -0.5]), atol=0.1)
    bound = namespace["bound"]
    assert bound.scope == "whole-data" and bound.log_likelihood_per_point is None
    assert abs(bound.log_likelihood + 0.21) < 0.1


def test_pplm_entry_point_is_installed():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pplm")
    assert script.value == "ppl_models.cli:main"
    out = subprocess.run([sys.executable, "-m", "ppl_models.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout and "sample" in out.stdout


def test_every_documented_pplm_command_parses():
    """Each ``pplm ...`` line in the README's code blocks is accepted by the parser as written."""
    from ppl_models.cli import build_parser

    lines = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith("pplm ")]
    assert len(lines) >= 10
    for line in lines:
        argv = line.split()[1:]
        if argv[-1] == "--help":
            continue
        build_parser().parse_args(argv)
