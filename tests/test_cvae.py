"""The conditional VAE (Sohn et al. 2015): exact log p(x | y) of a linear-Gaussian CVAE bounds its ELBO and
importance-weighted value; class and top-half conditions; ``pplm train cvae``."""

import json

import pytest
import torch
from torch.distributions import MultivariateNormal

from inference import UsageError, fit
from inference.evaluate import evaluate
from ppl_models.cvae import CVAE, ConditionalData
from ppl_models.data import DataSplit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def exact_log_likelihood(m, x, y):
    """log p(x | y) of a CVAE without hidden layers and a Normal likelihood of fixed scale s:
    z | y ~ N(m(y), S(y)), x = W z + V c + b + s eps, so x | y ~ N(W m + V c + b, W S W^T + s^2 I)."""
    c = m.condition(y)
    lin = m.decoder[0]
    w, v, b = lin.weight[:, : m.latent_dim], lin.weight[:, m.latent_dim :], lin.bias
    p = m.prior_dist(c)
    loc = p.mean @ w.T + c @ v.T + b
    cov = w @ torch.diag_embed(p.variance) @ w.T + m.likelihood.scale**2 * torch.eye(len(b), dtype=x.dtype)
    return MultivariateNormal(loc, cov).log_prob(x)


@pytest.mark.parametrize("prior", ["learned", "standard"])
def test_linear_gaussian_cvae_bounds_its_exact_conditional_likelihood(prior):
    """After a short fit, ELBO <= IWAE(K=2000) <= exact log p(x | y) on average over the test points (each
    gap beyond 4 standard errors of the estimates), and IWAE is within 0.05 nats of the exact value (the linear
    guide family contains the exact Gaussian posterior's mean map, so K = 2000 closes the gap)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) * 0.5 + y[:, None].double() - 1.0
    m = CVAE(4, num_classes=3, latent_dim=2, hidden=(), likelihood="normal:0.5", prior=prior).double()
    fit(m, {"x": x, "y": y}, elbo="trace", epochs=20, batch_size=50, lr=0.02, progress=False)
    xt, yt = x[:100], y[:100]
    ev = evaluate(m, {"x": xt, "y": yt}, particles=2000)
    with torch.no_grad():
        exact = float(exact_log_likelihood(m, xt, yt).mean())
    assert ev.elbo <= ev.log_likelihood + 4 * ev.elbo_se
    assert ev.log_likelihood <= exact + 1e-3
    assert ev.log_likelihood == pytest.approx(exact, abs=0.05)


def test_samples_follow_the_condition_and_bad_conditions_are_refused():
    m = CVAE(5, num_classes=4, latent_dim=2, hidden=(8,))
    assert m.sample(6, y=3).shape == (6, 5) and m.sample(4, y=torch.arange(4)).shape == (4, 5)
    # a sample is E[x | y, z] with z ~ p(z | y) for the condition asked: the same draw rebuilt from the parts
    c = m.condition(torch.full((6,), 3))
    torch.manual_seed(1)
    drawn = m.sample(6, y=3)
    torch.manual_seed(1)
    assert torch.allclose(drawn, m.decode(m.prior_dist(c).sample(), c).mean)
    torch.manual_seed(1)
    assert not torch.allclose(drawn, m.sample(6, y=2))  # the class reaches the decoder
    with pytest.raises(UsageError, match="one class"):
        m.sample(2, y=4)
    with pytest.raises(UsageError, match="integer label"):
        m.check_data({"x": torch.zeros(2, 5), "y": torch.tensor([0, 4])})
    t = CVAE(5, y_dim=3, latent_dim=2, hidden=(8,), prior="standard")
    assert t.sample(3, y=torch.zeros(3)).shape == (3, 5)
    with pytest.raises(UsageError, match="shape"):
        t.sample(3, y=torch.zeros(2))
    with pytest.raises(UsageError, match="prior"):
        CVAE(5, y_dim=2, prior="flat")
    assert CVAE.from_config(m.config).config == m.config


def test_top_half_condition_splits_images_into_halves():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16) / 32
    data = ConditionalData(DataSplit("img", x, None, image_shape=(1, 4, 4)), "top-half")
    view = data.data
    assert torch.equal(view["y"], x[:, :8]) and torch.equal(view["x"], x[:, 8:])
    assert data.image_shape == (1, 2, 4) and data.dim == 8 and data.y_dim == 8
    with pytest.raises(UsageError, match="labels"):
        ConditionalData(DataSplit("img", x, None, image_shape=(1, 4, 4)), "class")
    # a class condition needs no image shape: a flat .npz's x (image_shape (D,)) used to be refused
    flat = ConditionalData(DataSplit("flat", x, torch.tensor([0, 1]), image_shape=(16,)), "class")
    assert flat.dim == 16 and flat.y_dim == 0 and flat.image_shape == (16,)
    assert CVAE(flat.dim, y_dim=flat.y_dim, num_classes=2, latent_dim=2, hidden=(8,)).y_dim == 2


def test_pplm_train_cvae_class_and_top_half(tmp_path):
    from ppl_models.cli import main

    out = tmp_path / "class"
    argv = ["train", "cvae", "--condition", "class", "--prior", "learned", "--epochs", "2", "--hidden", "32",
            "--latent-dim", "4", "--particles", "5", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_log_likelihood"] >= m["test_elbo"] - 3 * m["test_elbo_se"]
    assert (out / "samples_per_class.png").is_file()
    assert main(["sample", str(out), "-n", "10", "--out", str(tmp_path / "s.png")]) == 0
    out2 = tmp_path / "half"
    argv = ["train", "cvae", "--condition", "top-half", "--prior", "standard", "--epochs", "1", "--hidden", "16",
            "--particles", "5", "--quiet", "--out", str(out2)]
    assert main(argv) == 0
    assert (out2 / "completions.png").is_file()


def test_a_class_only_the_test_split_holds_is_refused_naming_the_split(tmp_path, capsys):
    """The CVAE's classes come from the training split: a test class it lacks is one line, exit 2, no folder."""
    import numpy as np

    from ppl_models.cli import main

    rng = np.random.default_rng(0)
    x = (rng.random((40, 16)) > 0.5).astype("float32")
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(40) % 3, x_test=x[:10], y_test=np.full(10, 5))
    out = tmp_path / "run"
    argv = ["train", "cvae", "--dataset", str(tmp_path / "d.npz"), "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test split has class 5" in err[0] and "classes stop at 2" in err[0]
    assert not out.exists()
