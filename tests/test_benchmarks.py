"""Each benchmark script runs end to end at a tiny budget and writes the record its issue specifies.

The budgets here are far too small for the figures to mean anything; what is checked
is the record's shape and the properties that hold at any budget (bounds stay below
exact log-likelihoods, k-means on digits beats chance, timings are consistent). Every
option a script offers is passed by some test here (Pyro's test_examples habit), except
``--quick`` where it takes minutes: its settings are checked by parsing instead.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bounds, clustering, disentanglement, multimodal, semisupervised, throughput
from ppl_models.data import load_digits_arrays

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="no MNIST files beside the repository")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)  # the scripts set their own thread counts


def _record(out):
    (path,) = [p for p in Path(out).glob("*.json")]
    assert path.with_suffix(".md").is_file() and any(Path(out).glob("*.png"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("device", DEVICES)
def test_bounds(tmp_path, device):
    argv = ["--epochs", "1", "--limit", "200", "100", "--eval-particles", "30", "--elbos", "trace", "iwae:3",
            "--ppca-epochs", "2", "--ppca-latent", "4", "--snr-samples", "3", "--threads", "1", "--hidden", "32", "32",
            "--latent-dim", "4", "--activation", "tanh", "--batch-size", "50", "--lr", "1e-3", "--seed", "1",
            "--binarize", "dynamic", "--gmm-clusters", "3", "--gmm-reg", "0.01", "--device", device,
            "--name", "tiny", "--out", str(tmp_path)]
    bounds.main(argv)
    record = _record(tmp_path)
    assert [r["elbo"] for r in record["results"]] == ["trace", "iwae:3"]
    for row in record["results"]:
        assert {"test_elbo", "test_log_likelihood", "seconds_per_epoch", "khat_above_0_7"} <= set(row)
        assert row["test_log_likelihood"] >= row["test_elbo"]  # same particles: log-mean-exp >= mean
    for row in record["exact"]:
        assert {"model", "bound", "value", "stderr", "exact"} <= set(row)
        # a bound is a bound at any budget: never above the exact value beyond Monte Carlo error
        assert row["value"] - row["exact"] <= 3 * max(row.get("gap_stderr") or 0.0, 1e-6)
    enum = [r for r in record["exact"] if r["model"] == "gmm" and r["bound"].startswith("enum")]
    assert enum and abs(enum[0]["value"] - enum[0]["exact"]) < 1e-6  # the enumerated GMM ELBO is exact


@needs_mnist
def test_bounds_on_mnist_skipping_the_exact_table(tmp_path):
    bounds.main(["--dataset", "mnist", "--data-root", str(SHARED), "--epochs", "1", "--limit", "300", "100",
                 "--eval-particles", "25", "--elbos", "trace", "--snr-samples", "2", "--skip-exact", "--threads", "1",
                 "--guide", "diag", "iaf:1", "--out", str(tmp_path)])
    record = _record(tmp_path)
    assert record["exact"] == [] and record["results"][0]["test_elbo"] < 0
    assert [r["guide"] for r in record["results"]] == ["diag", "iaf:1"]
    (cmp,) = record["guide_comparison"]  # the flow guide against the diagonal one, paired over the same points
    flow, diag = record["results"][1], record["results"][0]
    assert cmp["log_likelihood_gain"] == pytest.approx(flow["test_log_likelihood"] - diag["test_log_likelihood"])
    assert all(r["elbo_iwae_gap"] >= 0 for r in record["results"])  # same particles: log-mean-exp >= mean


def test_disentanglement(tmp_path):
    disentanglement.main(["--betas", "1", "4", "--seeds", "0", "--epochs", "1", "--latent-dim", "3", "--hidden", "32",
                          "--batch-size", "128", "--lr", "1e-3", "--device", "cpu", "--threads", "1",
                          "--name", "tiny", "--out", str(tmp_path)])
    record = _record(tmp_path)
    assert [r["beta"] for r in record["results"]] == [1.0, 4.0]
    for row in record["results"]:
        assert 0 <= row["mig"] <= 1 and 0 <= row["beta_vae_accuracy"] <= 1 and row["test_kl"] >= 0
        assert row["test_elbo"] == pytest.approx(row["test_reconstruction"] - row["test_kl"])


def test_bounds_quick_means_digits_on_the_cpu():
    args = bounds.parse_args(["--quick"])
    assert (args.dataset, args.device, args.threads) == ("digits", "cpu", 1)


def test_clustering(tmp_path):
    argv = ["--seeds", "0,1", "--epochs", "2", "--pretrain-epochs", "1", "--limit", "300", "--restarts", "1",
            "--candidates", "1", "--select-epochs", "1", "--batch-size", "64", "--lr", "2e-3", "--hidden", "32",
            "--latent-dim", "4", "--likelihood", "normal:0.3", "--clusters", "10", "--pixel-reg", "0.01",
            "--fit-on", "all", "--methods", "vade,kmeans-pixels,gmm-pixels,vae-gmm,tsne-gmm-pixels", "--device", "cpu",
            "--threads", "1", "--machine", "test", "--name", "tiny", "--init", "tsne", "--embed", "codes",
            "--embed-points", "200", "--perplexity", "20", "--align-epochs", "1", "--align-weight", "50",
            "--tsne-iterations", "300", "--scale-points", "100",
            "--pretrain-batch-size", "32", "--pretrain-lr", "2e-3", "--pretrain-validation", "0.1",
            "--pretrain-patience", "2", "--pretrain-min-delta", "0.5", "--svi-lr", "1e-3", "--svi-mixture", "fixed",
            "--out", str(tmp_path)]
    clustering.main(argv)
    record = _record(tmp_path)
    rows = record["results"]
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("vade", "kmeans-pixels", "gmm-pixels", "vae-gmm", "tsne-gmm-pixels") for s in (0, 1)}
    # VaDE's t-SNE initialisation embedded the requested subset of the 300 points
    assert {d.get("embed_points") for d in record["details"] if d["method"] == "vade"} == {200}
    assert all(d["align_cross_entropy"] >= 0 for d in record["details"] if d["method"] == "vade")
    for row in rows:
        assert {"method", "dataset", "seed", "acc", "nmi", "ari", "seconds"} <= set(row)
        assert 0 <= row["acc"] <= 1 and 0 <= row["nmi"] <= 1
    # with Hungarian matching chance is about 0.15 on 300 points; k-means on digit pixels is far above it
    assert all(r["acc"] > 0.5 for r in rows if r["method"] == "kmeans-pixels")
    # VaDE's record: the training ELBO before and after SVI (finite, per point), each stage's seconds
    assert record["seeds_done"] == [0, 1]
    for d in (d for d in record["details"] if d["method"] == "vade"):
        assert math.isfinite(d["elbo_before_svi"]) and math.isfinite(d["elbo_after_svi"])
        assert d["scale_head"] > 0 and math.isfinite(d["scale_head_elbo"])
        assert all(d[k] >= 0 for k in ("pretrain_seconds", "embed_seconds", "align_seconds", "svi_seconds"))
    md = (tmp_path / "tiny.md").read_text()
    assert "ELBO before -> after SVI" in md and md.count("\n| 1 | ") == 1


def test_clustering_without_the_scale_head_step(tmp_path):
    clustering.main(["--seeds", "1", "--epochs", "1", "--pretrain-epochs", "1", "--limit", "200", "--methods", "vade",
                     "--hidden", "16", "--latent-dim", "2", "--embed-points", "150", "--no-scale-head", "--threads", "1",
                     "--device", "cpu", "--name", "tiny", "--out", str(tmp_path), "--precision", "fp32"])
    (detail,) = _record(tmp_path)["details"]
    assert "scale_head" not in detail and math.isfinite(detail["elbo_after_svi"])
    assert detail["pretrain_precision"] == "fp32"


@needs_mnist
def test_clustering_on_mnist(tmp_path):
    clustering.main(["--dataset", "mnist", "--data-root", str(SHARED), "--seeds", "1", "--limit", "500",
                     "--methods", "kmeans-pixels", "--out", str(tmp_path), "--threads", "1"])
    (row,) = _record(tmp_path)["results"]
    assert row["dataset"] == "mnist" and row["acc"] > 0.3  # chance ~0.12 with matching on 500 points


def test_clustering_quick_means_digits_on_the_cpu():
    args = clustering.parse_args(["--quick"])
    assert (args.dataset, args.device) == ("digits", "cpu")


def test_clustering_seed_lists():
    from inference.errors import UsageError

    assert clustering.seeds_from("3") == [0, 1, 2] and clustering.seeds_from("4,") == [4]
    assert clustering.seeds_from("1,5") == [1, 5]
    for bad in ("0", "x", ","):  # zero seeds would write an empty table: refused
        with pytest.raises(UsageError, match="--seeds"):
            clustering.seeds_from(bad)


def test_multimodal(tmp_path):
    argv = ["--dataset", "digits-halves", "--rules", "poe,code:0.4", "--objective", "subset", "--epochs", "1",
            "--batch-size", "64", "--lr", "1e-3", "--latent-dim", "4", "--hidden", "32", "--arch", "mlp",
            "--likelihood", "cbernoulli", "--max-train", "300", "--max-test", "100", "--particles", "5",
            "--classifier", "logistic", "--device", "cpu", "--seed", "2", "--private-dim", "2", "--beta", "1.0",
            "--out", str(tmp_path)]
    multimodal.main(argv)
    record = _record(tmp_path)
    rows = record["results"]
    # 3 modalities: 3 single givens x 2 targets + 3 pairs x 1 target = 9 rows per rule
    assert len(rows) == 2 * 9
    for row in rows:
        assert {"rule", "rho", "given", "target", "coherence"} <= set(row) and 0 <= row["coherence"] <= 1
    assert {r["rho"] for r in rows if r["rule"] == "code"} == {0.4}
    assert {s["rule"] for s in record["summaries"]} == {"poe", "code"}


def test_multimodal_on_a_user_file_with_missing_modality(tmp_path):
    x, y, _, _ = load_digits_arrays()
    img = x[:200].reshape(-1, 8, 8)
    np.savez(tmp_path / "halves.npz", x_top=img[:, :4], x_bottom=img[:, 4:].reshape(-1, 32), x_label=y[:200], y=y[:200])
    multimodal.main(["--dataset", str(tmp_path / "halves.npz"), "--modality", "top=cbernoulli", "--modality",
                     "bottom=normal:0.3", "--modality", "label=categorical:10", "--shape", "bottom=4x8", "--standardize",
                     "--weights", "auto", "--missing", "0,0.5", "--missing-modality", "bottom", "--rules", "poe",
                     "--objective", "cross", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--particles", "3",
                     "--device", "cpu", "--tag", "t", "--out", str(tmp_path)])
    record = _record(tmp_path)
    complete, half = record["summaries"]
    assert (complete["missing"], half["missing"]) == (0.0, 0.5) and set(complete["drop_from_complete"].values()) == {0.0}
    for given, value in half["coherence_by_given"].items():
        assert half["drop_from_complete"][given] == complete["coherence_by_given"][given] - value
    assert len(record["results"]) == 2 * 9 and {r["missing"] for r in record["results"]} == {0.0, 0.5}


@needs_mnist
def test_multimodal_polymnist(tmp_path):
    multimodal.main(["--dataset", "polymnist", "--data-root", str(SHARED), "--modalities", "3", "--rules", "mopoe",
                     "--epochs", "1", "--max-train", "200", "--max-test", "50", "--particles", "3", "--hidden", "32",
                     "--latent-dim", "4", "--classifier", "logistic", "--device", "cpu", "--out", str(tmp_path)])
    record = _record(tmp_path)
    assert record["data"]["modalities"] == ["m0", "m1", "m2"] and record["data"]["n_train"] == 200
    # 3 views: 3 single givens x 2 targets + 3 pairs x 1 target
    assert len(record["results"]) == 9 and {r["target"] for r in record["results"]} == {"m0", "m1", "m2"}


@pytest.mark.parametrize("device", DEVICES)
def test_throughput(tmp_path, device):
    argv = ["--models", "vae-mlp-digits", "--batch-sizes", "32", "--elbos", "trace", "--impls", "hand",
            "fit[eager]", "fit[flat]", "fit[compiled]", "pyro-svi", "--backend", "aot_eager", "--steps", "3", "--rounds", "1",
            "--threads", "1", "--seed", "0", "--device", device, "--machine", "test", "--name", "tiny", "--warm-cache",
            "--note", "a test",
            "--out", str(tmp_path)]
    throughput.main(argv)
    record = _record(tmp_path)
    assert record["environment"]["versions"]["torch"] == torch.__version__
    rows = record["results"]
    assert {r["impl"] for r in rows} >= {"hand", "fit[eager]", "fit[flat]", "fit[compiled]", "pyro-svi"}
    paths = {r["impl"]: r["path"] for r in rows}
    assert paths["fit[eager]"] == "eager" and paths["fit[flat]"] == "flat" and paths["fit[compiled]"] == "aot_eager"
    # a 200-epoch digits run does not repay a compilation (fit[compiled] stands for inductor), but it repays
    # flattening (8000 steps x over 1 ms x 0.15 > 0.5 s): the default is the faster of eager and flat
    step = {r["impl"]: r["step_ms"] for r in rows}
    assert {r["default"] for r in rows} == {min(("fit[eager]", "fit[flat]"), key=step.get)}
    for row in rows:
        # the same draws in the warm-up epoch: the same loss to float rounding
        assert row["loss_rel_diff"] < 1e-5
        # the bound is the counted FLOPs at the measured rate, below every measured step
        assert row["lower_ms"] == pytest.approx(1e3 * row["flops"] / record["matmul_flops_per_s"], rel=1e-9)
        assert row["lower_ms"] < row["step_ms"]
    for row in rows:
        assert {"model", "impl", "elbo", "device", "batch_size", "step_ms", "samples_per_s"} <= set(row)
        # samples per second and step time describe the same measurement
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)


@needs_mnist
def test_throughput_on_mnist(tmp_path):
    throughput.main(["--models", "vae-mlp-mnist", "--data-root", str(SHARED), "--batch-sizes", "64", "--elbos",
                     "trace", "--impls", "hand", "fit[eager]", "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
    assert {r["model"] for r in _record(tmp_path)["results"]} == {"vae-mlp-mnist"}


@pytest.mark.parametrize("script", [bounds, clustering, disentanglement, multimodal, throughput], ids=lambda m: m.__name__)
def test_every_option_is_exercised(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    options = set(re.findall(r"(--[a-z][a-z0-9-]*)", capsys.readouterr().out)) - {"--help", "--quick"}
    text = Path(__file__).read_text()
    missing = sorted(o for o in options if f'"{o}"' not in text)
    assert not missing, f"{script.__name__} offers options no test passes: {missing}"


@pytest.mark.parametrize("script", [bounds, clustering, disentanglement])
def test_benchmarks_never_write_into_the_committed_results_by_default(script):
    """The default --out is ./benchmark-results (ignored by git), never the package's benchmarks/results/."""
    committed = (Path(bounds.__file__).resolve().parent / "results").resolve()
    out = Path(script.parse_args([]).out).resolve()
    assert out != committed and committed not in out.parents
    assert out.name == "benchmark-results"


def test_semisupervised(tmp_path):
    argv = ["--dataset", "digits", "--plan", "30:2", "--epochs", "1", "--vae-epochs", "1", "--batch-size", "64",
            "--lr", "1e-3", "--hidden", "32", "--latent-dim", "4", "--activation", "relu", "--alpha", "0.1",
            "--labelled-weight", "equal", "--knn", "1", "--eval-points", "50", "--particles", "5",
            "--methods", "m2,logreg-pixels,knn-pixels,logreg-vae,knn-vae", "--device", "cpu", "--threads", "1",
            "--machine", "test", "--name", "tiny", "--out", str(tmp_path)]
    semisupervised.main(argv)
    record = _record(tmp_path)
    rows = record["results"]
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in semisupervised.METHODS for s in (0, 1)}
    assert all(0 <= r["test_error"] <= 1 for r in rows)
    # 30 labels (3 per class) of the 8x8 digits: logistic regression on pixels is far better than chance (0.9)
    assert all(r["test_error"] < 0.5 for r in rows if r["method"] == "logreg-pixels")
    m2 = [d for d in record["details"] if d["method"] == "m2"]
    assert all(d["test_log_likelihood"] >= d["test_elbo"] - 3 * d["test_elbo_se"] for d in m2)
    assert (tmp_path / "tiny-style-30labels.png").is_file()


def test_semisupervised_plan_and_quick():
    assert semisupervised.parse_plan("100:3,600") == [(100, [0, 1, 2]), (600, [0])]
    with pytest.raises(Exception, match="LABELS"):
        semisupervised.parse_plan("x")
    args = semisupervised.parse_args(["--quick"])
    assert (args.dataset, args.device, args.threads) == ("digits", "cpu", 1)
