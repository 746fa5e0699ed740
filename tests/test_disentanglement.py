"""The sprites set (its factor grid) and the disentanglement scores (MIG, the beta-VAE metric) on known codes."""

import numpy as np
import pytest

from inference.disentanglement import beta_vae_score, mig
from inference.errors import UsageError
from ppl_models.data import load_dataset
from ppl_models.sprites import FACTOR_SIZES, factor_grid, make_sprites, render


@pytest.fixture(scope="module")
def sprites():
    return make_sprites(0)


def test_sprites_are_the_full_factor_grid(sprites):
    x, f = sprites
    assert x.shape == (6144, 1024) and f.shape == (6144, 5) and int(np.prod(FACTOR_SIZES)) == 6144
    assert len({tuple(r) for r in f}) == 6144  # every combination once
    assert set(np.unique(x)) == {0.0, 1.0} and (x.sum(1) > 0).all()  # binary, no empty image
    x2, f2 = make_sprites(0)
    assert np.array_equal(x, x2) and np.array_equal(f, f2)  # the seed fixes everything
    assert not np.array_equal(make_sprites(1)[1], f)  # another seed, another order
    base = np.array([[0, 0, 0, 3, 3]])
    area = [render(base + [[0, s, 0, 0, 0]]).sum() for s in range(4)]
    assert area == sorted(area) and area[0] < area[-1]  # scale grows the shape
    shifted = render(base + [[0, 0, 0, 1, 0]]).reshape(32, 32)
    assert np.array_equal(np.roll(render(base).reshape(32, 32), 2, axis=1)[:, 3:], shifted[:, 3:])  # x moves columns
    train, test = load_dataset("sprites")
    assert len(train) + len(test) == 6144 and train.image_shape == (1, 32, 32) and set(test.y.tolist()) == {0, 1, 2}


def test_mig_is_one_for_a_copy_and_near_zero_for_noise(sprites):
    _, f = sprites
    rng = np.random.default_rng(0)
    copy = f[:, rng.permutation(5)] * rng.uniform(0.5, 2.0, 5) + rng.normal(size=5)  # any order, scale, offset
    assert mig(copy, f)["mig"] == pytest.approx(1.0, abs=1e-12)
    # unused noise dimensions cost only their plug-in MI bias (~0.005 after normalising)
    assert mig(np.concatenate([copy, rng.normal(size=(len(f), 3))], 1), f)["mig"] > 0.98
    # the plug-in bias is about (bins-1)(|v|-1)/(2N) nats = 0.01 for 8 values: far below 0.02 after normalising
    assert 0 <= mig(rng.normal(size=(len(f), 10)), f)["mig"] < 0.02
    doubled = np.concatenate([f, f[:, :1]], 1).astype(float)  # the shape in two dimensions: no gap for it
    per = mig(doubled, f)["per_factor"]
    assert per[0] == pytest.approx(0.0, abs=1e-12) and np.allclose(per[1:], 1.0)
    with pytest.raises(UsageError):
        mig(copy, np.zeros((len(f), 1), dtype=int))


def test_beta_vae_metric_is_one_for_a_copy_and_chance_for_noise(sprites):
    _, f = sprites
    rng = np.random.default_rng(0)
    assert beta_vae_score(f.astype(float), f, train_votes=300, test_votes=200)["accuracy"] == 1.0
    noise = beta_vae_score(rng.normal(size=(len(f), 10)), f, train_votes=300, test_votes=200)
    # chance is 1/5; 200 test votes give a binomial sd of 0.028, so 0.35 is > 5 sd above chance
    assert noise["chance"] == 0.2 and noise["accuracy"] < 0.35


def test_factor_grid_order():
    g = factor_grid()
    assert np.array_equal(g[1], [0, 0, 0, 0, 1]) and np.array_equal(g[-1], np.array(FACTOR_SIZES) - 1)
