"""VaDE: responsibilities, the K=1 reduction to a VAE (closed form), clustering of separated data."""

import math
import warnings

import numpy as np
import pyro
import pytest
import torch
import torch.distributions as td

from inference import evaluate, fit, make_elbo
from inference.errors import NonFiniteLossError, UsageError
from inference.metrics import cluster_accuracy
from inference.train import _validation_split
from ppl_models import vade_init
from ppl_models.vade import VaDE
from ppl_models.vade_init import (
    SCALE_STEPS,
    AlignmentPair,
    AutoencoderPair,
    align,
    init_mixture,
    init_scale_head,
    initialise,
    pretrain,
    resolve_precision,
    set_mixture_from_responsibilities,
)
from ppl_models.vae import VAE


def _set_mixture(m, weights, locs, scales):
    m.set_mixture(weights, locs, scales**2)


def test_responsibilities_are_bayes_rule(device):
    from sklearn.mixture import GaussianMixture

    torch.manual_seed(0)
    k, L = 4, 3
    m = VaDE(6, n_clusters=k, latent_dim=L, hidden=(8,), likelihood="normal:1").to(device)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    locs, scales = torch.randn(k, L, device=device), 0.5 + torch.rand(k, L, device=device)
    _set_mixture(m, weights, locs, scales)
    x = torch.randn(50, 6, device=device)
    gamma = m.responsibilities(x)
    assert gamma.device == x.device and gamma.shape == (50, k)
    # rows of a softmax sum to one up to float32 rounding
    torch.testing.assert_close(gamma.sum(-1), torch.ones(50, device=device), atol=1e-6, rtol=0)
    # an independent implementation of p(c | z) at z = mean of q(z | x): scikit-learn's diagonal GMM
    ref = GaussianMixture(k, covariance_type="diag")
    ref.weights_, ref.means_ = weights.double().cpu().numpy(), locs.double().cpu().numpy()
    ref.covariances_ = (scales.double() ** 2).cpu().numpy()
    ref.precisions_cholesky_ = 1 / scales.double().cpu().numpy()
    expected = torch.as_tensor(ref.predict_proba(m.latent_means(x).double().cpu().numpy()), dtype=torch.float32)
    # float32 densities of moderate size: agreement to 1e-5 absolute
    torch.testing.assert_close(gamma.cpu(), expected, atol=1e-5, rtol=0)
    assert torch.equal(m.cluster(x).cpu(), expected.argmax(-1))


def test_equal_components_give_the_mixture_weights():
    # with identical components p(c | z) = pi_c for every z; adding log pi_c once per latent
    # dimension (the published code's bug) would give pi_c^L / sum pi^L instead
    m = VaDE(5, n_clusters=3, latent_dim=4, hidden=(8,), likelihood="normal:1")
    weights = torch.tensor([0.2, 0.3, 0.5])
    _set_mixture(m, weights, torch.zeros(3, 4), torch.ones(3, 4))
    gamma = m.responsibilities(torch.randn(20, 5))
    torch.testing.assert_close(gamma, weights.expand(20, 3), atol=1e-6, rtol=0)


def test_one_cluster_with_standard_prior_is_the_vae():
    # same networks, K=1 with mu=0, sigma=1: the same reparameterised draws give the same ELBO value
    vade = VaDE(10, n_clusters=1, latent_dim=3, hidden=(16,), likelihood="normal:0.5")
    vae = VAE(10, latent_dim=3, hidden=(16,), likelihood="normal:0.5")
    vae.load_state_dict({k: v for k, v in vade.state_dict().items() if not k.startswith("mixture_")})
    _set_mixture(vade, torch.ones(1), torch.zeros(1, 3), torch.ones(1, 3))
    x = torch.randn(32, 10)
    elbo = make_elbo("trace:8", max_plate_nesting=1)  # as fit passes it: no guessing run that draws numbers
    pyro.set_rng_seed(3)
    a = elbo.differentiable_loss(vade.model, vade.guide, x)
    pyro.set_rng_seed(3)
    b = elbo.differentiable_loss(vae.model, vae.guide, x)
    # identical computations but for a log-sum-exp over one component: float32 rounding only
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_one_cluster_elbo_matches_closed_form(device):
    """Linear-Gaussian VaDE with K=1: every term of the ELBO is closed form.

    Encoder q(z|x) = N(A x + a, diag s(x)^2), decoder p(x|z) = N(W z + b, S^2 I), prior N(m, diag sigma^2):
    E_q[log p(x|z)] = -D/2 log(2 pi S^2) - (|x - W mu - b|^2 + sum_dj W_dj^2 s_j^2) / (2 S^2),
    minus KL(q || prior) from torch.distributions.
    """
    torch.manual_seed(1)
    D, L, S = 6, 2, 0.7
    vade = VaDE(D, n_clusters=1, latent_dim=L, hidden=(), likelihood=f"normal:{S}").to(device)
    _set_mixture(vade, torch.ones(1, device=device), torch.randn(1, L, device=device), 0.5 + torch.rand(1, L, device=device))
    x = torch.randn(8, D, device=device)
    q = vade.encode(x).base_dist
    lin = vade.decoder[0]
    W, b = lin.weight.detach(), lin.bias.detach()
    with torch.no_grad():
        resid = x - q.loc @ W.T - b
        recon = -D / 2 * math.log(2 * math.pi * S**2) - (resid.pow(2).sum(-1) + (q.scale.pow(2) @ W.pow(2).T).sum(-1)) / (
            2 * S**2
        )
        prior = td.Normal(vade.mixture_locs[0], vade.mixture_scales[0])
        exact = recon - td.kl_divergence(td.Normal(q.loc, q.scale), prior).sum(-1)
    particles = 20000
    ev = evaluate(vade, x, particles=particles, keep_log_weights=True)
    se = ev.log_weights.std(dim=1).double() / math.sqrt(particles)
    # Monte Carlo mean of K iid log weights: within 5 standard errors (two-sided p ~ 6e-7 per point)
    assert ((ev.elbo_per_point - exact.double().cpu()).abs() <= 5 * se).all()
    # and the importance-weighted estimate is above the ELBO (Jensen), as it must be for any model
    assert (ev.log_likelihood_per_point >= ev.elbo_per_point - 1e-6).all()


def test_scales_bounded_and_nonfinite_loss_caught():
    m = VaDE(4, n_clusters=2, latent_dim=2, hidden=(8,), likelihood="normal:1", min_scale=1e-3)
    with torch.no_grad():
        m.mixture_raw_scales.fill_(-1e4)  # softplus underflows to 0: the scale is the floor, not 0
    assert (m.mixture_scales == 1e-3).all()
    assert torch.isfinite(m.prior().log_prob(torch.zeros(3, 2))).all()
    with torch.no_grad():
        m.mixture_locs.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError):
        fit(m, torch.randn(16, 4), epochs=1, batch_size=8, lr=1e-3, device="cpu", progress=False)


def test_bad_arguments():
    with pytest.raises(UsageError, match="n_clusters"):
        VaDE(4, n_clusters=0)
    m = VaDE(4, n_clusters=2, latent_dim=2, hidden=(8,), likelihood="normal:1")
    with pytest.raises(UsageError, match="component"):
        m.sample(3, component=2)
    # initialisation arguments are refused before any pretraining changes a weight
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(50, 4)
    for kw, match in [(dict(init="kmeans"), "initialisation"), (dict(init="tsne", embed="pixels"), "embed"),
                      (dict(init="tsne", embed_points=2), "embed_points"), (dict(init="tsne", perplexity=0), "perplexity"),
                      (dict(dropout=1.0), "dropout"), (dict(init="tsne", tsne_iterations=100), "250"),
                      (dict(precision="fp16"), "precision")]:
        with pytest.raises(UsageError, match=match):
            initialise(m, x, pretrain_epochs=1, **kw)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(UsageError, match="more than"):  # 50 points cannot carry a perplexity of 60
        init_mixture(m, x, method="tsne", perplexity=60)
    with pytest.raises(UsageError, match="responsibilities"):
        set_mixture_from_responsibilities(m, torch.randn(5, 2), torch.rand(5, 3))


def test_mixture_from_responsibilities_is_the_m_step():
    """One-hot responsibilities give each component its cluster's proportion, mean and (biased) variance."""
    g = torch.Generator().manual_seed(0)
    k, L = 3, 4
    m = VaDE(6, n_clusters=k, latent_dim=L, hidden=(8,), likelihood="normal:1", min_scale=1e-3)
    labels = torch.tensor([0] * 20 + [1] * 50 + [2] * 30)
    z = torch.randn(100, L, generator=g, dtype=torch.float64) * (1 + labels[:, None]) + 5 * labels[:, None]
    ll = set_mixture_from_responsibilities(m, z, torch.nn.functional.one_hot(labels, k))
    for c in range(k):
        zc = z[labels == c]
        # float32 parameters; the 1e-6 pseudo-count moves a moment by ~1e-6 relative: 1e-5 covers both
        assert float(m.mixture_weights[c].detach()) == pytest.approx(len(zc) / 100, rel=1e-5)
        torch.testing.assert_close(m.mixture_locs[c].double(), zc.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.mixture_scales[c].double(), zc.var(0, unbiased=False).sqrt(), rtol=1e-5, atol=1e-5)
    assert ll == pytest.approx(float(m.prior().log_prob(z.float()).mean().detach()), rel=1e-6)
    # soft responsibilities: the weighted moments, against numpy's weighted average
    import numpy as np

    r = torch.rand(100, k, generator=g, dtype=torch.float64)
    set_mixture_from_responsibilities(m, z, r)
    for c in range(k):
        mean = np.average(z.numpy(), axis=0, weights=r[:, c].numpy())
        var = np.average((z.numpy() - mean) ** 2, axis=0, weights=r[:, c].numpy())
        np.testing.assert_allclose(m.mixture_locs[c].detach().numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.mixture_scales[c].detach().numpy(), np.sqrt(var), rtol=1e-5, atol=1e-5)
    # an empty component stays finite (pooled moments through the pseudo-count)
    set_mixture_from_responsibilities(m, z, torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), k))
    assert all(torch.isfinite(t).all() for t in (m.mixture_logits, m.mixture_locs, m.mixture_scales))


def _blobs(n_per, k, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(k, dim, generator=g)  # pairwise distance ~ 3*sqrt(2*dim): far beyond the noise 0.3
    y = torch.arange(k).repeat_interleave(n_per)
    x = centres[y] + 0.3 * torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("init,embed,points", [("gmm", "codes", 0), ("tsne", "codes", 10000), ("tsne", "inputs", 10000),
                                               ("tsne", "codes", 200)])
def test_separated_clusters_are_found(device, init, embed, points):
    k, dim = 4, 12
    x, y = _blobs(150, k, dim, seed=0)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    m = VaDE(dim, n_clusters=k, latent_dim=2, hidden=(32,), likelihood="normal:0.3").to(device)
    if init == "gmm":
        info = initialise(m, x, pretrain_epochs=10, batch_size=64, restarts=3, seed=0, init=init)
    else:  # initialise's stages one by one (as initialise(..., align_epochs=2) runs them), to see the map's clusters
        pretrain(m, x, epochs=10, batch_size=64, seed=0)
        info, r = init_mixture(m, x, restarts=3, seed=0, method=init, embed=embed, embed_points=points)
        # a map of 200 of the 600 points: the other 400 get their clusters by the nearest-codes vote
        assert info["embed_points"] == min(points, 600) and r.shape == (600, k)
        torch.testing.assert_close(r.sum(-1), torch.ones(600, device=r.device, dtype=r.dtype))
        assert cluster_accuracy(y, r.argmax(-1)) >= 0.95
        align(m, x, r, epochs=2, batch_size=64, seed=0)
    assert info["init"] == init and math.isfinite(info["gmm_log_likelihood"])
    fit(m, x, epochs=10, batch_size=64, lr=2e-3, device=device, seed=0, progress=False)
    # the target for well-separated clusters
    assert cluster_accuracy(y, m.cluster(x)) >= 0.95
    # draws from component c are assigned to cluster c (the components are the clusters)
    for c in range(k):
        assert (m.cluster(m.sample(50, component=c)) == c).float().mean() >= 0.9
    # the config round-trips
    again = VaDE.from_config(m.config).to(device)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.cluster(x), m.cluster(x))


def test_align_pulls_the_codes_to_the_target_clusters():
    """align minimises the cross-entropy from the targets to p(c | mu_phi(x)): it drops, and the argmax follows."""
    x, y = _blobs(100, 4, 10, seed=3)
    torch.manual_seed(0)
    m = VaDE(10, n_clusters=4, latent_dim=3, hidden=(32,), likelihood="normal:0.3")
    pretrain(m, x, epochs=5, batch_size=64, seed=0)
    # start from a mixture fitted to random responsibilities: every component sits on the pooled codes
    set_mixture_from_responsibilities(m, m.latent_means(x), torch.rand(len(x), 4, generator=torch.Generator().manual_seed(1)))
    before = cluster_accuracy(y, m.cluster(x))
    r = torch.nn.functional.one_hot(y, 4).float()  # the targets: the blobs
    first = align(m, x, r, epochs=1, weight=100.0, lr=1e-3, batch_size=64, seed=0)["align_cross_entropy"]
    last = align(m, x, r, epochs=20, weight=100.0, lr=1e-3, batch_size=64, seed=0)["align_cross_entropy"]
    assert last < 0.1 * first  # from about chance (log 4 = 1.39) to near 0
    assert before < 0.7 and cluster_accuracy(y, m.cluster(x)) == 1.0
    with pytest.raises(UsageError, match="responsibilities"):
        align(m, x, r[:10], epochs=1)


def _pair_setup():
    torch.manual_seed(0)
    m = VaDE(6, n_clusters=3, latent_dim=2, hidden=(8,), likelihood="normal:0.5")
    m.set_mixture(torch.tensor([0.2, 0.3, 0.5]), torch.randn(3, 2), 0.5 + torch.rand(3, 2))
    x = torch.randn(40, 6)
    with torch.no_grad():
        loc, _ = m.encoder_head(m.encoder_body(x))  # mu_phi(x)
        rec = -m.decode(loc).log_prob(x)  # -log p(x_n | z = mu_phi(x_n)), (40,)
    return m, x, loc, rec


def test_pretraining_pair_loss_is_the_autoencoder_loss():
    m, x, _, rec = _pair_setup()
    pair = AutoencoderPair(m, dropout=0.0)
    # the pair holds the networks only: the mixture is not optimised
    assert not any("mixture" in name for name, _ in pair.named_parameters())
    mixture = [t.detach().clone() for t in (m.mixture_logits, m.mixture_locs, m.mixture_raw_scales)]
    # Pyro's own Trace_ELBO on the pair: no latent site and an empty guide, so the estimate is exact
    pyro_loss = pyro.infer.Trace_ELBO().loss(pair.model, pair.guide, x)
    # a sum of 40 float32 terms against Pyro's float conversion of the same sum: rounding only
    assert pyro_loss == pytest.approx(float(rec.double().sum()), rel=1e-5)
    # fit: one batch of every point, so the epoch's loss is the loss at the starting weights (read before the step)
    result = fit(pair, x, epochs=1, batch_size=40, lr=1e-2, device="cpu", progress=False)
    assert result.history[0]["train_loss"] == pytest.approx(float(rec.double().mean()), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(mixture, (m.mixture_logits, m.mixture_locs, m.mixture_raw_scales)))
    with pytest.raises(UsageError, match="dropout"):
        AutoencoderPair(m, dropout=1.0)


def test_alignment_pair_loss_is_reconstruction_plus_weighted_cross_entropy():
    m, x, loc, rec = _pair_setup()
    r = torch.rand(40, 3, generator=torch.Generator().manual_seed(1)).softmax(-1)
    weight = 7.0
    with torch.no_grad():
        ce = -(r * m.log_responsibilities_z(loc)).sum(-1)  # CE_n, (40,)
    hand = rec.double() + weight * ce.double()
    pair = AlignmentPair(m, weight=weight)
    assert {"vade.mixture_logits", "vade.mixture_locs", "vade.mixture_raw_scales"} <= dict(pair.named_parameters()).keys()
    batch = {"x": x, "r": r}
    assert pyro.infer.Trace_ELBO().loss(pair.model, pair.guide, batch) == pytest.approx(float(hand.sum()), rel=1e-5)
    before = m.mixture_locs.detach().clone()
    result = fit(pair, batch, epochs=1, batch_size=40, lr=1e-2, device="cpu", progress=False)
    assert result.history[0]["train_loss"] == pytest.approx(float(hand.mean()), rel=1e-5)
    assert not torch.equal(before, m.mixture_locs)  # the mixture is trained too
    with pytest.raises(UsageError, match="responsibilities"):
        fit(pair, {"x": x, "r": r[:, :2]}, epochs=1, batch_size=40, lr=1e-2, device="cpu", progress=False)
    with pytest.raises(UsageError, match="weight"):
        AlignmentPair(m, weight=-1.0)


def test_pplm_train_vade_writes_clustering_outputs(tmp_path, monkeypatch):
    import json

    from inference.checkpoint import load_checkpoint
    from inference.metrics import clustering_scores
    from ppl_models.cli import main
    from ppl_models.data import load_dataset

    out = tmp_path / "vade"
    argv = ["train", "vade", "--clusters", "10", "--out", str(out), "--epochs", "2", "--pretrain-epochs", "3",
            "--hidden", "32", "--latent-dim", "4", "--particles", "10", "--quiet", "--device", "cpu",
            "--gmm-restarts", "2", "--pretrain-dropout", "0.1", "--init", "tsne", "--embed", "inputs",
            "--embed-points", "300", "--perplexity", "20", "--align-epochs", "1", "--align-weight", "10",
            "--init-candidates", "2", "--select-epochs", "1", "--pretrain-lr", "2e-3", "--min-scale", "0.01",
            "--pretrain-validation", "0.1", "--pretrain-patience", "2", "--precision", "auto"]
    assert main(argv) == 0
    for name in ("cluster_samples.png", "latent_pca.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["cluster_weights"]) == pytest.approx(1.0, abs=1e-5)  # softmax weights, float32
    # the reported test scores are those of the saved model's q(c | x), recomputed from the checkpoint
    state = load_checkpoint(out / "checkpoint.pt")
    m = VaDE.from_config(state["config"])
    m.load_state_dict(state["module"])
    assert m.min_scale == 0.01 and (m.mixture_scales >= 0.01).all()
    _, test = load_dataset("digits")
    again = clustering_scores(test.y, m.cluster(test.x))
    assert again == pytest.approx({k: metrics[f"test_{k}"] for k in ("acc", "nmi", "ari")}, abs=1e-12)
    # pretraining is required: zero epochs is refused before anything is written
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--pretrain-epochs", "0", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--pretrain-dropout", "1", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--embed-points", "10", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--init", "gmm", "--align-epochs", "2", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--align-weight", "-1", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--pretrain-patience", "2", "--quiet"]) == 2
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--pretrain-validation", "1", "--quiet"]) == 2
    monkeypatch.setattr(vade_init, "bf16_available", lambda device: False)
    assert main(["train", "vade", "--out", str(tmp_path / "no"), "--precision", "bf16", "--quiet"]) == 2
    assert not (tmp_path / "no").exists()


def test_initialise_keeps_the_candidate_with_the_highest_elbo():
    """Selection among initialisations by the training ELBO (label-free: only x goes in)."""
    x, _ = _blobs(40, 3, 8, seed=1)
    kw = dict(pretrain_epochs=3, batch_size=64, restarts=1, seed=2)

    def new():
        torch.manual_seed(0)
        return VaDE(8, n_clusters=3, latent_dim=2, hidden=(16,), likelihood="normal:0.3")

    m = new()
    info = initialise(m, x, candidates=3, select_epochs=2, select_particles=10, **kw)
    elbos = info["candidate_elbos"]
    # the candidates are distinct models (fresh weights and seeds), so their bounds differ
    assert len(elbos) == 3 and len(set(elbos)) == 3
    assert info["selected"] == max(range(3), key=elbos.__getitem__)
    # the kept module is that candidate: scored with the same draws it gives the same ELBO (deterministic
    # CPU computation on the same state; float64 accumulation of float32 terms, so 1e-9 is rounding only)
    pyro.set_rng_seed(2)
    assert float(evaluate(m, x, particles=10).elbo) == pytest.approx(elbos[info["selected"]], rel=0, abs=1e-9)
    # candidate 0 is exactly the single initialisation followed by the same SVI epochs
    single = new()
    initialise(single, x, **kw)
    fit(single, x, epochs=2, batch_size=64, lr=2e-3, device="cpu", seed=2, progress=False, validate=False)
    pyro.set_rng_seed(2)
    assert float(evaluate(single, x, particles=10).elbo) == pytest.approx(elbos[0], rel=0, abs=1e-9)
    with pytest.raises(UsageError, match="candidates"):
        initialise(new(), x, candidates=0, **kw)


def test_pretraining_early_stopping_keeps_the_best_held_out_epoch():
    """pretrain(validation=, patience=): the weights kept are those of the epoch with the lowest held-out loss."""
    x, _ = _blobs(60, 3, 10, seed=4)
    torch.manual_seed(0)
    m = VaDE(10, n_clusters=3, latent_dim=2, hidden=(32,), likelihood="normal:0.3")
    # a learning rate far too high: the held-out loss stops improving within a few epochs
    info = pretrain(m, x, epochs=40, batch_size=16, lr=0.05, seed=3, validation=0.25, patience=2)
    assert info["pretrain_epochs_run"] < 40 and info["pretrain_epochs_run"] - info["pretrain_best_epoch"] == 2
    # the held-out points are fit's seeded split; the module now scores them exactly as the kept epoch did
    _, held = _validation_split(x, 0.25, 3)
    m.eval()
    # no latent site: exact, no draws; in the arithmetic the pretraining ran in (bf16 where the CPU has it)
    loss = -float(evaluate(AutoencoderPair(m, precision=info["pretrain_precision"]), held, particles=1).elbo)
    assert loss == pytest.approx(info["pretrain_val_loss"], rel=1e-6)
    with pytest.raises(UsageError, match="validation"):
        pretrain(m, x, epochs=1, patience=2)
    with pytest.raises(UsageError, match="validation"):
        pretrain(m, x, epochs=1, validation=1.0)


def test_scale_head_starts_at_the_best_constant_scale_of_the_grid():
    """init_scale_head: sigma_phi(x) = s* for every x, s* the grid's ELBO maximiser; the means are untouched."""
    x, _ = _blobs(80, 3, 10, seed=5)
    torch.manual_seed(0)
    m = VaDE(10, n_clusters=3, latent_dim=2, hidden=(32,), likelihood="normal:0.3")
    pretrain(m, x, epochs=5, batch_size=64, seed=0)
    init_mixture(m, x, restarts=1, seed=0)
    means = m.latent_means(x)
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    info = init_scale_head(m, x, points=200, seed=4)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is left as it was
    assert torch.equal(m.latent_means(x), means)
    with torch.no_grad():
        scale = m.encode(x).base_dist.scale
    torch.testing.assert_close(scale, torch.full_like(scale, info["scale_head"]))
    # s* is on the grid, and no grid point scores higher with the same draws (exact recomputation)
    idx = torch.as_tensor(np.sort(np.random.default_rng(4).choice(240, 200, replace=False)))  # its seeded subset
    sub = x[idx]
    spread = float(means[idx].double().var(0).mean().sqrt())
    grid = [spread * 2.0**-k for k in range(SCALE_STEPS)]
    assert min(abs(info["scale_head"] / s - 1) for s in grid) < 1e-5
    head = m.encoder_head.linear
    saved = head.bias.detach().clone()
    for s in grid:
        with torch.no_grad():
            head.bias[2:] = torch.log(torch.expm1(torch.tensor(s - m.encoder_head.min_scale)))
        pyro.set_rng_seed(4)
        assert float(evaluate(m, sub, particles=1).elbo) <= info["scale_head_elbo"] + 1e-9
    with torch.no_grad():
        head.bias.copy_(saved)
    with pytest.raises(UsageError, match="points"):
        init_scale_head(m, x, points=0)


def test_frozen_mixture_is_not_trained_by_svi():
    """freeze_mixture: fit leaves pi, mu_c, sigma_c exactly as they were and still trains the networks."""
    x, _ = _blobs(30, 3, 6, seed=6)
    torch.manual_seed(0)
    m = VaDE(6, n_clusters=3, latent_dim=2, hidden=(16,), likelihood="normal:0.3")
    m.freeze_mixture()
    mixture = [t.detach().clone() for t in (m.mixture_logits, m.mixture_locs, m.mixture_raw_scales)]
    decoder = [t.detach().clone() for t in m.decoder.parameters()]
    fit(m, x, epochs=2, batch_size=30, lr=1e-2, device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(mixture, (m.mixture_logits, m.mixture_locs, m.mixture_raw_scales)))
    assert not all(torch.equal(a, b) for a, b in zip(decoder, m.decoder.parameters()))
    m.freeze_mixture(False)
    fit(m, x, epochs=1, batch_size=30, lr=1e-2, device="cpu", progress=False)
    assert not torch.equal(mixture[1], m.mixture_locs)


BF16_U = 2.0**-8  # bfloat16's unit roundoff: 8 significand bits (7 stored), round to nearest


def _bf16_error_variance(layers, h):
    """Variance of net_bf16(h) - net_fp32(h) per output, for a chain of Linear and ReLU layers under bf16 autocast.

    Autocast rounds each Linear's input, weight and bias to bfloat16 and its output back to bfloat16; the
    products accumulate in float32. Each rounding is a relative error uniform on [-u, u] (variance u^2 / 3),
    independent across roundings, the model of Higham & Mary's probabilistic rounding-error analysis
    (SIAM J. Sci. Comput. 2019), whose worst-case counterpart (errors adding as n u) is vacuous for 8 layers.
    To first order: v' = W^2 v + (u^2 / 3) (W^2 h^2 + b^2 + y^2); ReLU is exact in bfloat16 and 1-Lipschitz: v' <= v.
    """
    var = BF16_U**2 / 3 * h**2  # the float32 input rounded to bfloat16
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            w2 = layer.weight**2
            y = layer(h)
            var = var @ w2.T + BF16_U**2 / 3 * (h**2 @ w2.T + layer.bias**2 + y**2)
            h = y
        else:
            assert isinstance(layer, torch.nn.ReLU)
            h = layer(h)
    return h, var


def test_bf16_pretraining_loss_is_the_float32_loss_within_bfloat16_rounding(monkeypatch):
    """precision="bf16" runs the networks in bfloat16 (the losses differ) and the loss stays within the
    rounding bound of bfloat16's 8-bit significand propagated through the layers; parameters stay float32."""
    monkeypatch.setattr(vade_init, "bf16_available", lambda device: True)  # autocast's rounding is the same emulated
    torch.manual_seed(0)
    scale = 0.3
    m = VaDE(64, n_clusters=3, latent_dim=4, hidden=(48, 32), likelihood=f"normal:{scale}")
    x = torch.rand(50, 64)
    with torch.no_grad():  # the bound on the decoder mean's error: encoder body, head's loc rows, decoder
        head = torch.nn.Linear(32, 4)
        head.weight.copy_(m.encoder_head.linear.weight[:4]), head.bias.copy_(m.encoder_head.linear.bias[:4])
        mean, var = _bf16_error_variance([*m.encoder_body[0], m.encoder_body[1], head, *m.decoder], x)
        # -log N(x_n; m, s) changes by sum_d (m - x) d / s^2 + d^2 / (2 s^2) for a mean error d: a standard deviation
        # sqrt(sum_d (m - x)^2 var) / s^2 per row, plus sum_d var / (2 s^2). Rows share the weights' roundings, so
        # the rows' deviations are added (full correlation) rather than in quadrature; 6 of them: a tolerance the
        # rounding model exceeds with probability below 1e-8 (Gaussian tail), however the roundings fall.
        row_sd = ((mean - x) ** 2 * var).sum(-1).sqrt() / scale**2
        bound = float(6 * row_sd.sum() + (var.sum() / (2 * scale**2)))
    fp32, bf16 = AutoencoderPair(m, precision="fp32"), AutoencoderPair(m, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    loss32 = pyro.infer.Trace_ELBO().loss(fp32.model, fp32.guide, x)
    loss16 = pyro.infer.Trace_ELBO().loss(bf16.model, bf16.guide, x)
    assert loss16 != loss32  # the networks did run in bfloat16
    assert abs(loss16 - loss32) <= bound
    assert bound < 0.01 * abs(loss32)  # and the tolerance is a tight one, not a vacuous one
    # the alignment pair: the same networks in bfloat16, the cross-entropy from the code cast back to float32
    r = torch.full((50, 3), 1 / 3)
    a32, a16 = AlignmentPair(m, 1.0, precision="fp32"), AlignmentPair(m, 1.0, precision="bf16")
    l32 = pyro.infer.Trace_ELBO().loss(a32.model, a32.guide, {"x": x, "r": r})
    l16 = pyro.infer.Trace_ELBO().loss(a16.model, a16.guide, {"x": x, "r": r})
    assert l16 != l32 and abs(l16 - l32) < 0.05 * abs(l32)
    # mixed precision through fit's flattened loss path: no fallback warning, float32 parameters and the same
    # epoch losses as the eager bf16 path (the same ops and draws: float32 summation order at most), which the
    # float32 run's losses are not (they differ by about 1e-4 relative after two epochs)
    losses = {}
    for precision, path in (("bf16", "flat"), ("bf16", False), ("fp32", False)):
        torch.manual_seed(1)
        net = VaDE(64, n_clusters=3, latent_dim=4, hidden=(48, 32), likelihood=f"normal:{scale}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = fit(AutoencoderPair(net, 0.2, precision), x, epochs=2, batch_size=25, lr=1e-3, device="cpu",
                         seed=0, progress=False, compile=path)
        assert result.history[-1]["loss_path"] == (path or "eager")
        assert all(p.dtype == torch.float32 for p in net.parameters())
        losses[precision, path] = [h["train_loss"] for h in result.history]
    assert losses["bf16", "flat"] == pytest.approx(losses["bf16", False], rel=1e-6)
    assert losses["fp32", False] != pytest.approx(losses["bf16", "flat"], rel=1e-6)


def test_precision_option_is_checked(monkeypatch):
    m = VaDE(6, n_clusters=3, latent_dim=2, hidden=(8,), likelihood="normal:0.5")
    x = torch.rand(20, 6)
    with pytest.raises(UsageError, match="precision must be one of"):
        AutoencoderPair(m, precision="fp16")
    with pytest.raises(UsageError, match="precision must be one of"):
        initialise(m, x, pretrain_epochs=1, precision="half")
    monkeypatch.setattr(vade_init, "bf16_available", lambda device: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert AutoencoderPair(m, precision="auto").precision == "fp32"
    for build in (lambda: AutoencoderPair(m, precision="bf16"), lambda: AlignmentPair(m, precision="bf16"),
                  lambda: pretrain(m, x, epochs=1, precision="bf16")):
        with pytest.raises(UsageError, match="hardware bfloat16"):
            build()
    monkeypatch.setattr(vade_init, "bf16_available", lambda device: True)
    assert resolve_precision("auto", "cpu") == "bf16"


def test_precision_takes_the_devices_the_cli_takes():
    """resolve_precision reads a device as fit does: "auto"/None resolve, an unknown name is a UsageError."""
    assert resolve_precision("fp32", "auto") == resolve_precision("fp32", None) == "fp32"
    assert resolve_precision("auto", "auto") in ("bf16", "fp32")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        resolve_precision("auto", "gpu")
