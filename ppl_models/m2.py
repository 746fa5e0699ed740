r"""The semi-supervised M2 model (Kingma, Rezende, Mohamed & Welling 2014, "Semi-supervised learning with
deep generative models", sec. 3.1.2 and 3.2).

Generative process, for each datapoint n (inside ``pyro.plate``)::

    y_n ~ Cat(pi),  pi uniform over the K classes
    z_n ~ N(0, I_L)                          (the "style", independent of the class a priori)
    x_n | y_n, z_n ~ Lik(x; decoder_theta(y_n, z_n))

with ``Lik`` a family of :mod:`ppl_models.likelihoods`. Guide::

    q_phi(y_n | x_n)       = Cat(y_n; softmax(classifier_phi(x_n)))
    q_phi(z_n | x_n, y_n)  = N(z_n; mu_phi(x_n, y_n), diag sigma_phi(x_n, y_n)^2)

Objective (the paper's eq. 6-9). For a labelled point (x, y)::

    L(x, y) = E_{q(z|x,y)}[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]  <= log p(x, y)

for an unlabelled point, y is summed out exactly::

    U(x) = sum_y q(y | x) L(x, y) + H(q(y | x))  <= log p(x)

Training sums the unlabelled points' guide site y over its K values in parallel: it is
marked ``infer={"enumerate": "parallel"}`` and the objective is ``enum``
(``TraceEnum_ELBO``), which computes the expectation over q(y | x) exactly, one
vectorised pass over the K classes. The paper maximises::

    J^alpha = sum_{(x,y) labelled} L(x, y) + sum_{x unlabelled} U(x) + alpha * E_{labelled}[log q(y | x)]

with alpha = 0.1 N (N the number of training points), so that the classifier
q(y | x) also learns from the labels directly. Kingma's code (nips14-ssl,
``learn_yz_x_ss.py``) weighs log q(y | x) of each labelled point by
beta = alpha N / N_l (alpha = 0.1), each labelled point in one minibatch per
pass: the same J^alpha (beta = 60 per labelled point at 100 labels of 60,000).
Per datapoint, the form :func:`inference.fit`'s loss takes (the step's loss
divided by its rows), J^alpha / N = mean over all points of L or U + 0.1 *
E_labelled[log q(y | x)]. Each training row here pairs one unlabelled point with
one labelled point (the labelled set is cycled, :class:`SemiSupervisedData`, so
each labelled point comes N_u / N_l times per pass), and its log-density is::

    U(x_u) + w * L(x_l, y_l) + a * log q(y_l | x_l)

The paper's weights (``labelled_fraction=f``, f = N_l / N, pplm's
``--labelled-weight paper``) are w = f / (1 - f) and a = alpha / (1 - f), so
that the mean over the N_u rows of a pass is (N / N_u) J^alpha / N (exactly when
N_u is a multiple of N_l, else up to the cycle's rounding): the paper's
objective, rescaled by the constant N / N_u. The paper's alpha is therefore 0.1
per row here (a = 0.1 N / N_u: 60 per labelled point per pass at 100 labels),
not 0.1 N / N_l per row, which would count each labelled point's term N_u / N_l
times over. With ``labelled_fraction=None`` (``--labelled-weight equal``) w = 1
and a = alpha: a row's labelled ELBO weighs as much as its unlabelled part. The
weights are ``poutine.scale`` on the labelled sites and a ``pyro.factor`` named
``"classification"``.

The default alpha = 60 per row is 600 times the paper's at 100 of 60,000
labels, chosen by measurement, not derived. alpha touches q(y | x) alone, and
Adam's steps do not change when a parameter's gradient is scaled by a constant,
so a large alpha amounts to scaling down U's gradient on the classifier (the
decoder and q(z | x, y) still learn from every point). That gradient,
q(y | x) (L(x, y) - log q(y | x) - U(x)) per class, pulls q(y | x) toward the
model's own posterior softmax_y L(x, y). On MNIST with 100 labels and the
paper's networks (500 softplus units, z of 50), that posterior, argmax_y L(x, y),
classified 25-50% of test digits right in 16 epochs (against ~77% for
q(y | x)): the decoder draws the digit z holds, whatever y. The pull therefore
lowers the accuracy: the test error rose over epochs, the faster the smaller
alpha and the more the decoder used y (a smaller z). With alpha = 60 and Adam's
lr 3e-4 it stays near a classifier trained on the labels alone for the first
epochs and then rises slowly; M2's unlabelled term can help the classifier only
once its own posterior classifies better than q(y | x). The numbers and the
probes: ``benchmarks/results/semisupervised-mnist-100labels-16ep-*``. The
paper's weighting remains available (``alpha=0.1``, ``labelled_fraction=f``).

J^alpha is a bound on the data's log-likelihood only without the classification
term; :func:`inference.evaluate` scores a model with x alone, i.e. U(x), the
bound on log p(x) (its importance weights sample y from q(y | x)).

Networks (MLPs; the paper used 500 softplus units): q(z | x, y) and the decoder
take y as a one-hot vector concatenated to their input, written as an embedding
added after the first linear layer (the same function), so the enumerated
classes share the x-part of the first layer.
"""
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn

from inference.errors import UsageError

from . import nets
from .base import Configurable, ModelConfig
from .data import DataSplit
from .likelihoods import make_likelihood

UNLABELLED = -1


@dataclass
class M2Config(ModelConfig):
    """The arguments of :class:`M2` (defaults: its signature)."""

    x_dim: int
    num_classes: int
    latent_dim: int
    hidden: Sequence[int]
    likelihood: str
    activation: str
    alpha: float
    labelled_fraction: float | None
    image_shape: Sequence[int] | None


class LabelledInput(nn.Module):
    """(x or z, y) -> activation(W [input; one_hot(y)] + b), as W_in input + E[y] + b (same function, cheaper
    when y is enumerated: the input's product is shared by the K classes). ``y``: integer classes that broadcast
    against the input's batch shape (e.g. (K, 1) under enumeration)."""

    def __init__(self, in_features: int, num_classes: int, out_features: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.embed = nn.Embedding(num_classes, out_features)
        nn.init.normal_(self.embed.weight, std=1.0 / (in_features + num_classes) ** 0.5)
        self.act = nets.activation_class(activation)()

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(h) + self.embed(y))


class M2(Configurable, nn.Module):
    """M2: classifier q(y | x), style encoder q(z | x, y), decoder p(x | y, z).

    :param x_dim: D, values per datapoint (flattened).
    :param num_classes: K.
    :param latent_dim: L, the size of the style z.
    :param hidden: MLP hidden widths, shared by the classifier, the encoder and (mirrored) the decoder.
    :param likelihood: observation family spec (:mod:`ppl_models.likelihoods`).
    :param activation: hidden activation (the paper: softplus).
    :param alpha: the classification weight per row (the paper's alpha = 0.1 N is 0.1 here with
        ``labelled_fraction=f``; the default 60 is chosen by measurement, see the module docstring).
    :param labelled_fraction: f = N_l / N of the training data, in [0, 1), for the paper's weighting of the
        labelled rows; None: a row's labelled part weighs as much as its unlabelled part (module docstring).
    :param image_shape: (C, H, W) of an image datapoint, kept for figures (the networks are MLPs).
    :raises UsageError: K < 2, alpha < 0, or f outside [0, 1).

    ``model(x=None, x_lab=None, y_lab=None)`` and ``guide(...)``: x (B, D) unlabelled points, x_lab (B', D)
    labelled points with their classes y_lab (B',) (long); either part may be absent.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        x_dim: int,
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden: tuple[Any, ...] = (500,),
        likelihood: str = "bernoulli",
        activation: str = "softplus",
        alpha: float = 60.0,
        labelled_fraction: float | None = None,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = M2Config.from_arguments(locals())
        if num_classes < 2:
            raise UsageError(f"M2 needs at least 2 classes, got {num_classes}")
        if not alpha >= 0:
            raise UsageError(f"the classification weight alpha must be >= 0, got {alpha}")
        if labelled_fraction is not None and not 0 <= labelled_fraction < 1:
            raise UsageError(f"the labelled fraction must lie in [0, 1), got {labelled_fraction}")
        if not hidden:
            raise UsageError("M2 needs at least one hidden layer")
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.alpha = float(alpha)
        self.likelihood = make_likelihood(likelihood, x_dim)
        hidden = tuple(hidden)
        self.classifier = nets.mlp([x_dim, *hidden, num_classes], activation)
        self.encoder_in = LabelledInput(x_dim, num_classes, hidden[0], activation)
        self.encoder_body, body_out = nets.mlp_encoder_body(hidden[0], tuple(hidden[1:]), activation)
        self.encoder_head = nets.GaussianHead(body_out, latent_dim)
        back = list(reversed(hidden))
        self.decoder_in = LabelledInput(latent_dim, num_classes, back[0], activation)
        self.decoder_body = nets.mlp([*back, self.likelihood.out_features], activation)
        if labelled_fraction is None:
            self.labelled_weight, self.classification_weight = 1.0, self.alpha
        else:
            self.labelled_weight = labelled_fraction / (1 - labelled_fraction)
            self.classification_weight = self.alpha / (1 - labelled_fraction)

    # ---- the pair ------------------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, x_lab: torch.Tensor | None = None,
              y_lab: torch.Tensor | None = None) -> None:
        if x is not None:
            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", self._prior_y(x))
                z = pyro.sample("z", self._prior_z(x))
                pyro.sample("x", self.decode(y, z), obs=x)
        if x_lab is not None:
            y_lab = self._labels(x_lab, y_lab)
            with pyro.plate("labelled", x_lab.shape[0]):
                with poutine.scale(scale=self.labelled_weight):
                    pyro.sample("y_lab", self._prior_y(x_lab), obs=y_lab)
                    z = pyro.sample("z_lab", self._prior_z(x_lab))
                    pyro.sample("x_lab", self.decode(y_lab, z), obs=x_lab)
                if self.classification_weight:
                    pyro.factor("classification", self.classification_weight * self.classify_dist(x_lab).log_prob(y_lab))

    def guide(self, x: torch.Tensor | None = None, x_lab: torch.Tensor | None = None,
              y_lab: torch.Tensor | None = None) -> None:
        if x is not None:
            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", self.classify_dist(x), infer={"enumerate": "parallel"})
                pyro.sample("z", self.encode(x, y))
        if x_lab is not None:
            y_lab = self._labels(x_lab, y_lab)
            with pyro.plate("labelled", x_lab.shape[0]), poutine.scale(scale=self.labelled_weight):
                pyro.sample("z_lab", self.encode(x_lab, y_lab))

    def _labels(self, x_lab, y_lab):
        if y_lab is None or y_lab.shape != x_lab.shape[:1]:
            raise UsageError(f"labelled points need one class each: x_lab has {x_lab.shape[0]} rows, y_lab "
                             f"{'is missing' if y_lab is None else f'has shape {tuple(y_lab.shape)}'}")
        return y_lab

    def _prior_y(self, x):
        return dist.Categorical(logits=x.new_zeros(x.shape[0], self.num_classes))

    def _prior_z(self, x):
        return dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)

    # ---- the networks as distributions ---------------------------------------------------
    def classify_dist(self, x: torch.Tensor) -> dist.Categorical:
        """q(y | x): a Categorical with batch shape x.shape[:-1]."""
        return dist.Categorical(logits=self.classifier(x))

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x, y), event shape (L,); ``y`` (long) broadcasts against x's batch shape."""
        loc, scale = self.encoder_head(self.encoder_body(self.encoder_in(x, y)))
        return dist.Normal(loc, scale).to_event(1)

    def decode(self, y: torch.Tensor, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | y, z), event shape (D,)."""
        return self.likelihood(self.decoder_body(self.decoder_in(z, y)))

    def check_data(self, batch: Any) -> None:
        """Points x (a tensor, or the ``x`` / ``x_lab`` of a mapping) in the likelihood's support; ``y_lab``
        classes in 0..K-1. Raises :class:`UsageError`."""
        if not isinstance(batch, dict):
            batch = {"x": batch}
        unknown = sorted(set(batch) - {"x", "x_lab", "y_lab"})
        if unknown:
            raise UsageError(f"M2 data are x (unlabelled), x_lab and y_lab (labelled); got {', '.join(unknown)}")
        for key in ("x", "x_lab"):
            if batch.get(key) is not None:
                self.likelihood.check(batch[key])
        y = batch.get("y_lab")
        if y is not None and (y.is_floating_point() or (y < 0).any() or (y >= self.num_classes).any()):
            raise UsageError(f"y_lab must hold integer classes in 0..{self.num_classes - 1}")

    # ---- queries of a fitted model -------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x) as probabilities, (N, K)."""
        return self.classify_dist(x).probs

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q(y | x), (N,) long."""
        return self.classifier(x).argmax(-1)

    def _classes(self, y, n, ref):
        if y is None:
            return torch.randint(self.num_classes, (n,), device=ref.device)
        y = torch.as_tensor(y, device=ref.device).long()
        if y.dim() == 0:
            y = y.expand(n)
        if y.shape != (n,) or (y < 0).any() or (y >= self.num_classes).any():
            raise UsageError(f"y must be one class in 0..{self.num_classes - 1} or {n} of them, got shape "
                             f"{tuple(y.shape)}")
        return y

    @torch.no_grad()
    def sample(self, n: int, *, y: Any = None, mean: bool = True) -> torch.Tensor:
        """n draws x ~ p(x | y, z), z ~ N(0, I); ``y`` one class, n classes, or None (y ~ Cat(pi)).
        ``mean=True`` returns E[x | y, z]. (n, D)."""
        ref = next(self.parameters())
        y = self._classes(y, n, ref)
        z = torch.randn(n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        px = self.decode(y, z)
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def style(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """The style of x: the mean of q(z | x, y), y the given classes or (None) argmax q(y | x). (N, L)."""
        y = self.classify(x) if y is None else self._classes(y, x.shape[0], x)
        return self.encoder_head(self.encoder_body(self.encoder_in(x, y)))[0]

    @torch.no_grad()
    def style_transfer(self, x: torch.Tensor, y_new: Any, *, y: Any = None) -> torch.Tensor:
        """E[x | y_new, z] with z the style of x (:meth:`style`): x's style drawn as class ``y_new`` (one class
        or one per row). (N, D)."""
        z = self.style(x, y)
        return self.decode(self._classes(y_new, x.shape[0], x), z).mean


@dataclass
class SemiSupervisedData:
    """Training data of M2: the unlabelled points, and the labelled ones cycled so each row pairs one of each.

    * ``data`` (the evaluation view): the unlabelled points x (N_u, D), scored by U(x);
    * ``epoch()``: ``{"x": (N_u, D), "x_lab": (N_u, D), "y_lab": (N_u,)}``, the labelled points repeated in
      fresh random orders (the global torch RNG) until they fill N_u rows, so every labelled point appears
      equally often (within one) per epoch; without labelled points, x only. A minibatch of B rows is
      then an unlabelled minibatch and a labelled one of B points each;
    * ``rows(index)``: the unlabelled points ``index`` with every labelled point (a validation split holds
      out unlabelled points only).

    ``num_classes``: the classes of the data (K of M2), which a few labels may not all show; None: those
    the labelled points show. Build it with :func:`split_labels`.
    """

    unlabelled: DataSplit
    labelled: DataSplit | None
    num_classes: int | None = None

    @property
    def name(self) -> str:
        return self.unlabelled.name

    @property
    def image_shape(self) -> Any:
        return self.unlabelled.image_shape

    @property
    def dim(self) -> int:
        return self.unlabelled.dim

    @property
    def num_labelled(self) -> int:
        return 0 if self.labelled is None else len(self.labelled)

    @property
    def labelled_fraction(self) -> float:
        return self.num_labelled / (self.num_labelled + len(self.unlabelled))

    def __len__(self):
        return len(self.unlabelled)

    @property
    def data(self) -> torch.Tensor:
        return self.unlabelled.data

    def epoch(self) -> Any:
        x = self.unlabelled.epoch()
        if self.labelled is None:
            return x
        n, m = x.shape[0], len(self.labelled)
        order = torch.cat([torch.randperm(m, device=x.device) for _ in range(-(-n // m))])[:n]
        y = self.labelled.y
        assert y is not None  # split_labels keeps the labelled rows' labels
        return {"x": x, "x_lab": self.labelled.epoch()[order], "y_lab": y[order]}

    def to(self, device: str | torch.device) -> "SemiSupervisedData":
        return replace(self, unlabelled=self.unlabelled.to(device),
                       labelled=None if self.labelled is None else self.labelled.to(device))

    def rows(self, index: torch.Tensor) -> "SemiSupervisedData":
        return replace(self, unlabelled=self.unlabelled.rows(index))


def choose_labels(y: torch.Tensor, n: int, *, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Keep ``n`` labels of ``y`` (long, -1 = unlabelled), balanced over the classes: n // K per class, the
    n mod K left over going to classes drawn at random; the points are drawn uniformly within each class
    with a NumPy generator seeded by ``seed``. Returns a copy of y with every other label set to -1.

    :raises UsageError: n < 1, or a class has fewer labelled points than its share.
    """
    import numpy as np

    y = torch.as_tensor(y).long()
    k = num_classes or int(y.max()) + 1
    if n < 1:
        raise UsageError(f"--labels must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    share = np.full(k, n // k)
    share[rng.choice(k, n % k, replace=False)] += 1
    keep = []
    labels = y.numpy()
    counts = np.bincount(labels[labels >= 0], minlength=k)[:k]
    if n > k * counts.min():  # every class's share is n // K or one more
        c = int(counts.argmin())
        raise UsageError(f"{n} labels balanced over {k} classes need {-(-n // k)} of some classes, but class {c} "
                         f"has only {counts[c]} labelled points: at most {k * counts[c]} balanced labels here")
    for c in range(k):
        where = np.flatnonzero(labels == c)
        keep.append(rng.choice(where, share[c], replace=False))
    out = torch.full_like(y, UNLABELLED)
    idx = torch.as_tensor(np.concatenate(keep)).long()
    out[idx] = y[idx]
    return out


def split_labels(train: DataSplit, y: torch.Tensor | None = None, *,
                 num_classes: int | None = None) -> SemiSupervisedData:
    """:class:`SemiSupervisedData` of a training split whose labels ``y`` (default ``train.y``) hold -1 for
    unlabelled rows; ``num_classes`` the data's classes (default: the largest kept label + 1).

    :raises UsageError: no labels at all, or every point labelled (M2 learns from unlabelled points; train
        the CVAE, or keep fewer labels).
    """
    y = train.y if y is None else y
    if y is None:
        raise UsageError(f"the training data of {train.name!r} carry no labels")
    is_lab = y >= 0
    if not bool(is_lab.any()):
        raise UsageError(f"every label of {train.name!r} is -1 (unlabelled): M2 needs at least one labelled row")
    if bool(is_lab.all()):
        raise UsageError("every training point is labelled: keep fewer labels (--labels N) for M2, or train the cvae")
    lab = torch.nonzero(is_lab).flatten()
    unlab = torch.nonzero(~is_lab).flatten()
    labelled = train.rows(lab) if len(lab) else None
    k = int(y[is_lab].max()) + 1 if num_classes is None else num_classes
    return SemiSupervisedData(unlabelled=replace(train.rows(unlab), y=None), labelled=labelled, num_classes=k)
