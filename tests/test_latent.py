"""Latent-space tools: interpolation endpoints, traversals, grids, activity, moments; pplm embed/explore."""

import json

import numpy as np
import pyro
import pytest
import torch

from inference.errors import UsageError
from inference.latent import (
    activity,
    encode_batches,
    lerp,
    manifold_grid,
    map_2d,
    posterior_moments,
    slerp,
    traversal_codes,
)
from ppl_models.cli import main
from ppl_models.cli.latent import image_views, latent_codes, read_codes
from ppl_models.cli.runs import load_module, open_run
from ppl_models.multimodal import MultimodalVAE
from ppl_models.multimodal_data import load_multimodal, with_missing
from ppl_models.vae import VAE


@pytest.mark.parametrize("path", [lerp, slerp])
def test_interpolation_endpoints_decode_the_endpoints_codes_exactly(path):
    torch.manual_seed(0)
    vae = VAE(20, latent_dim=3, hidden=(8,))
    x = torch.bernoulli(torch.rand(2, 20))
    z = vae.encode(x).mean
    p = path(z[0], z[1], 7)
    assert p.shape == (7, 3) and torch.equal(p[0], z[0]) and torch.equal(p[-1], z[1])
    # the endpoint codes are bit-identical, so the decoded endpoints are the endpoints' decodings (up to the
    # round-off of a different BLAS batch size)
    dec = vae.decode(p).mean
    torch.testing.assert_close(dec[[0, -1]], vae.decode(z).mean, rtol=0, atol=1e-6)
    batch = path(z[:1].expand(4, 3), z[1:].expand(4, 3), 5)  # batched codes: (..., steps, L)
    assert batch.shape == (4, 5, 3)


def test_slerp_keeps_the_norm_and_lerp_is_linear():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    s = slerp(a, b, 5)
    assert torch.allclose(s.norm(dim=-1), torch.full((5,), 2.0))  # on the circle of radius 2
    assert torch.allclose(s[2], torch.tensor([2**0.5, 2**0.5]))  # the half-way angle
    assert torch.allclose(lerp(a, b, 5)[1], 0.75 * a + 0.25 * b)
    assert torch.allclose(slerp(a, 3 * a, 4), lerp(a, 3 * a, 4))  # parallel codes: the linear path


def test_traversal_manifold_activity():
    z = torch.tensor([0.5, -1.0, 2.0])
    codes = traversal_codes(z, [2, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert codes.shape == (2, 3, 3)
    assert torch.equal(codes[0, :, 2], torch.tensor([-1.0, 0.0, 1.0])) and torch.equal(codes[0, :, :2], z[:2].expand(3, 2))
    with pytest.raises(UsageError):
        traversal_codes(z, [3], [0.0])
    grid, values = manifold_grid(5)
    assert grid.shape == (25, 2) and torch.allclose(values, -values.flip(0), atol=1e-6)  # symmetric quantiles
    assert torch.allclose(torch.distributions.Normal(0, 1).cdf(values), torch.linspace(0.05, 0.95, 5), atol=1e-6)
    assert torch.equal(grid[0], torch.stack([values[0], values[-1]]))  # top-left: smallest z1, largest z2
    means = torch.tensor([[0.0, 1.0, 5.0], [0.0, -1.0, 5.0], [0.0, 1.0, 5.0], [0.0, -1.0, 5.0]])
    assert torch.equal(activity(means), torch.tensor([0.0, 1.0, 0.0]))  # Var_x of the posterior means


def test_posterior_moments_exact_and_monte_carlo():
    torch.manual_seed(0)
    gauss = VAE(20, latent_dim=3, hidden=(8,))
    flow0 = VAE(20, latent_dim=3, hidden=(8,), guide="iaf:0")
    flow0.load_state_dict(gauss.state_dict())
    x = torch.bernoulli(torch.rand(5, 20))
    m, s = posterior_moments(gauss.encode(x))
    assert torch.equal(m, gauss.encode(x).mean) and torch.equal(s, gauss.encode(x).stddev)
    mc_m, mc_s = posterior_moments(flow0.encode(x), samples=20000)  # same q, moments by Monte Carlo
    assert torch.allclose(mc_m, m, atol=5 * s.max().item() / 20000**0.5)  # 5 Monte Carlo standard errors
    assert torch.allclose(mc_s, s, rtol=0.05)
    mb, sb = encode_batches(gauss.encode, x, batch_size=2)
    assert torch.allclose(mb, m) and torch.allclose(sb, s)


def test_map_2d():
    codes = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 1.0, 0.1, 0.1])
    xy, names = map_2d(codes, method="pca")
    assert xy.shape == (50, 2) and names[0].startswith("PC 1")
    assert np.corrcoef(xy[:, 0], codes[:, 0].numpy())[0, 1] ** 2 > 0.95  # the first PC is the widest axis
    with pytest.raises(UsageError):
        map_2d(codes, method="umap")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "flow"
    assert main(["train", "vae", "--guide", "iaf:1", "--latent-dim", "2", "--hidden", "32", "--epochs", "2",
                 "--particles", "10", "--out", str(out), "--quiet"]) == 0
    return out


def test_embed_round_trips_the_codes(flow_run, tmp_path):
    recipe, config, run = open_run(flow_run)
    module = load_module(recipe, config, flow_run, torch.device("cpu"))
    _, test = recipe.load_data(run)
    pyro.set_rng_seed(0)
    mean, sd = encode_batches(module.encode, test.data, samples=64)
    for suffix in ("npz", "csv"):
        out = tmp_path / f"codes.{suffix}"
        assert main(["embed", str(flow_run), "--split", "test", "--out", str(out), "--samples", "64", "--seed", "0",
                     "--device", "cpu"]) == 0
        codes = read_codes(out)
        assert codes["mean"].shape == (len(test), 2) and np.array_equal(codes["y"], test.y.numpy())
        np.testing.assert_allclose(codes["mean"], mean.numpy(), rtol=1e-6, atol=1e-7)  # same seed, same draws
        np.testing.assert_allclose(codes["sd"], sd.numpy(), rtol=1e-6, atol=1e-7)
    assert main(["embed", str(flow_run), "--out", str(tmp_path / "codes.txt")]) == 2


def test_explore_writes_the_figures(flow_run, tmp_path):
    assert main(["explore", str(flow_run), "--out", str(tmp_path), "--split", "test", "--index", "3", "--map", "pca",
                 "--samples", "32", "--seed", "1", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "explore.json").read_text())
    assert summary["latent_dim"] == 2 and len(summary["activity"]) == 2 and summary["index"] == 3
    assert main(["explore", str(flow_run), "--out", str(tmp_path), "--index", "100000"]) == 2  # one line, no trace
    for name in ("activity.png", "traversals.png", "interpolations.png", "manifold.png", "latent-map.png"):
        assert (tmp_path / name).stat().st_size > 1000
    y = [int(v) for v in read_codes_labels(flow_run)]
    assert all(y[a] != y[b] for a, b in summary["pairs"])  # interpolations join points of different labels


def read_codes_labels(run_dir):
    recipe, _, run = open_run(run_dir)
    return recipe.load_data(run)[1].y.tolist()


def test_vade_refuses_a_flow_guide(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "vade", "--guide", "iaf:2", "--out", str(tmp_path / "v")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--guide" in err


def test_gmm_run_has_no_codes(tmp_path):
    out = tmp_path / "gmm"
    assert main(["train", "gmm", "--clusters", "2", "--epochs", "1", "--particles", "5", "--out", str(out), "--quiet"]) == 0
    assert main(["embed", str(out), "--out", str(tmp_path / "c.npz")]) == 2


# ---- multimodal runs: the code is the shared z of the joint posterior ------------------------------------
@pytest.fixture(scope="module")
def mvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mvae"
    assert main(["train", "mvae", "--rule", "moe", "--private-dim", "2", "--latent-dim", "2", "--hidden", "32",
                 "--epochs", "1", "--particles", "5", "--binarize", "fixed", "--quiet", "--no-validate",
                 "--out", str(out)]) == 0
    return out


def test_mvae_embed_round_trips_the_joint_posterior_codes(mvae_run, tmp_path):
    recipe, config, run = open_run(mvae_run)
    module = load_module(recipe, config, mvae_run, torch.device("cpu"))
    _, test = recipe.load_data(run)
    with torch.no_grad():
        loc, scale, _ = module.experts(test.data)  # (N, M, L): the mixture of experts, by the law of total variance
    mean = loc.mean(-2)
    sd = ((scale**2 + loc**2).mean(-2) - mean**2).sqrt()
    for suffix in ("npz", "csv"):
        out = tmp_path / f"codes.{suffix}"
        assert main(["embed", str(mvae_run), "--out", str(out), "--device", "cpu"]) == 0
        codes = read_codes(out)
        assert codes["mean"].shape == (len(test), 2) and np.array_equal(codes["y"], test.y.numpy())
        np.testing.assert_allclose(codes["mean"], mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(codes["sd"], sd.numpy(), rtol=1e-5, atol=1e-6)


def test_mvae_explore_draws_every_image_modality(mvae_run, tmp_path):
    assert main(["explore", str(mvae_run), "--out", str(tmp_path), "--index", "2", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "explore.json").read_text())
    assert summary["latent_dim"] == 2
    for m in ("top", "bottom"):  # digits-halves: two image modalities (and a label, which is not drawn)
        for name in ("traversals", "interpolations", "manifold"):
            assert (tmp_path / f"{name}-{m}.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*-label.png"))


@pytest.mark.parametrize("rule", ["poe", "mopoe"])
def test_mvae_codes_fuse_the_present_experts_and_decode_the_endpoints_exactly(rule):
    train, _ = load_multimodal("digits-halves", binarize="fixed", max_train=40)
    data = with_missing(train, "top", 0.5, seed=0)  # half the tuples without their top half
    assert 0 < int(data.mask[:, 0].sum()) < len(data)
    torch.manual_seed(0)
    module = MultimodalVAE(data.modalities, latent_dim=3, hidden=(16,), rule=rule, private_dim=2).eval()
    mean, sd = latent_codes(module, data, samples=2)
    with torch.no_grad():
        loc, scale, _ = module.experts(module.observed(data.data, module.names, data.mask))
    # by hand, per tuple: PoE of its present experts (Wu & Goodman 2018); MoPoE: the equal-weight mixture of
    # the PoE of every non-empty subset of them (Sutter et al. 2021), moments by the law of total variance
    for n in range(len(data)):
        present = [m for m in range(len(module.names)) if data.mask[n, m]]
        subsets = [present] if rule == "poe" else [
            [m for j, m in enumerate(present) if k >> j & 1] for k in range(1, 2 ** len(present))]
        means, variances = [], []
        for sub in subsets:
            prec = scale[n, sub] ** -2
            means.append((prec * loc[n, sub]).sum(0) / prec.sum(0))
            variances.append(1 / prec.sum(0))
        mu = torch.stack(means).mean(0)
        var = (torch.stack(variances) + torch.stack(means) ** 2).mean(0) - mu**2
        torch.testing.assert_close(mean[n], mu)
        torch.testing.assert_close(sd[n], var.sqrt())
    views = image_views(module, data)
    assert [v[0] for v in views] == ["top", "bottom"]
    for name, decode, shape, x in views:
        assert x.shape == (len(data), int(np.prod(shape)))
        if name == "top":  # an absent entry is drawn blank
            assert torch.equal(x[~data.mask[:, 0]], torch.zeros_like(x[~data.mask[:, 0]]))
        with torch.no_grad():
            for path in (lerp, slerp):
                p = path(mean[0], mean[1], 5)
                torch.testing.assert_close(decode(p)[[0, -1]], decode(mean[:2]), rtol=0, atol=1e-6)
                torch.testing.assert_close(decode(p), decode(p), rtol=0, atol=0)  # private w held at 0, not drawn
