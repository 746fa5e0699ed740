r"""VaDE's initialisation: pretraining, the initial mixture, alignment and the choice among candidates.

SVI on VaDE's ELBO (:mod:`ppl_models.vade`) from random networks and a random
mixture gets stuck (Jiang et al. 2017, section 3.4), so before SVI the networks
are pretrained as an autoencoder and the mixture is set from the codes. How
good the clustering ends up is decided mostly here: SVI moves the accuracy of
the initial mixture by a few points (measured in
``benchmarks/results/clustering-digits-quick-*`` and ``clustering-mnist-*``).
:func:`initialise` runs the stages in order:

1. **Pretraining** (:func:`pretrain`). The encoder mean mu_phi and the decoder
   are trained as a (denoising) deterministic autoencoder, minimising per point::

       l_AE(x) = -log p_theta(x | z = mu_phi(x~)),

   where x~ is x with each value zeroed with probability ``dropout`` and the
   rest scaled by 1 / (1 - dropout) (the denoising pretraining of DEC and
   VaDE); the target is the clean x. It is the model/guide pair
   :class:`AutoencoderPair` trained by :func:`inference.fit`: the model observes
   x under p_theta(x | z = mu_phi(x~)) and has no latent site, the guide is
   empty, so Trace_ELBO's estimate is exact, ELBO = sum_n log p(x_n | mu_phi(x~_n)),
   and fit's loss -ELBO(B) / |B| is the mean of l_AE over the batch. The pair
   holds only the encoder, decoder and likelihood, so the mixture is not
   trained; the encoder's scale head gets no gradient. AdamW (Loshchilov &
   Hutter 2019) with ``weight_decay``.

2. **The initial mixture** (:func:`init_mixture`), from the codes z_n = mu_phi(x_n):

   * ``method="gmm"`` (the paper): a diagonal GMM fitted by EM to the codes,
     the best likelihood of several k-means-initialised restarts
     (:func:`fit_diag_gmm`), copied into pi, mu_c, sigma_c;
   * ``method="tsne"`` (the N2D recipe of McConville et al. 2020, with t-SNE
     (van der Maaten & Hinton 2008) for UMAP): a full-covariance GMM is fitted
     in a 2-D t-SNE map (:func:`tsne_map`) of the codes or of the inputs; points
     left out of the map get the vote of their 10 nearest embedded codes; the
     responsibilities r_nc set the latent mixture by one M-step
     (:func:`set_mixture_from_responsibilities`), with N_c = sum_n r_nc::

         pi_c = N_c / N,   mu_c = sum_n r_nc z_n / N_c,   sigma_c^2 = sum_n r_nc (z_n - mu_c)^2 / N_c.

     k-means/EM on the codes split curved class manifolds; a neighbour
     embedding keeps them whole.

3. **Alignment** (:func:`align`, t-SNE only, optional). One M-step puts a
   diagonal Gaussian on each cluster of codes, but clusters found in a t-SNE map
   are not diagonal Gaussians in the code space, so the latent mixture starts
   below the map's accuracy. Alignment trains everything (networks and mixture)
   on, per point::

       l_AE(x_n) + weight * CE_n,    CE_n = -sum_c r_nc log p(c | z = mu_phi(x_n)),

   the cross-entropy from the map's responsibilities r_nc to the ones the model
   uses for q(c | x). It is the pair :class:`AlignmentPair`: the autoencoder's
   observed site plus ``pyro.factor("align", -weight * CE_n)`` in the data
   plate, trained by :func:`inference.fit` on batches ``{"x": x, "r": r}``. No
   labels are used: the targets are the map's own clusters.

4. **The encoder's scale head** (:func:`init_scale_head`). Stages 1 and 3
   train only the mean mu_phi of q(z | x) = N(mu_phi(x), diag sigma_phi(x)^2);
   the scale head sigma_phi is still at its random initialisation, whose
   output (softplus of a random projection, about softplus(0) = 0.69) has
   nothing to do with the scale of the codes, which pretraining leaves
   arbitrary. When it is larger than the clusters' scales, the z decoded at
   the start of SVI are mostly noise and the ELBO there is far below that of
   a well-chosen constant scale; Adam moves each weight by about the learning
   rate per step, so with the small learning rate that fine-tuning pretrained
   networks wants, SVI spends its first epochs shrinking the scales. So the
   head is set, before SVI, to the constant scale that maximises the ELBO
   over a log grid with the means, decoder and mixture fixed: one step of
   coordinate ascent on SVI's own objective.

5. **Selection** (``candidates`` R > 1). R initialisations are built, each
   trained by SVI for a few epochs, and the one with the highest estimated
   training ELBO is kept::

       r* = argmax_r (1/N) sum_n ELBO_hat_r(x_n),

   each ELBO_hat_r from the same particles per point and the same random
   stream (common random numbers), i.e. the highest lower bound on the
   marginal likelihood of the training data; no labels.

Precision. Stages 1 and 3 are deterministic losses whose cost is the MLPs'
matrix products, so they run in mixed precision where the hardware has
bfloat16 (``precision="auto"``, the default; ``"bf16"``/``"fp32"`` to choose):
the networks run under ``torch.autocast`` in bfloat16 (8 significand bits,
products accumulated in float32), their outputs are cast back to float32
before the likelihood and the cross-entropy, and the parameters, gradients and
optimiser stay float32 (Micikevicius et al. 2018; bfloat16's float32 exponent
range needs no loss scaling, Kalamkar et al. 2019). The codes handed to the
mixture, the scale-head grid, SVI and every ELBO stay float32.

After initialisation. The mixture set from the map is what carries the
clusters; SVI of the whole model moves it towards the maximum-likelihood
diagonal GMM of the codes (the ELBO's gradient in pi, mu_c, sigma_c is that of
sum_n log p(z_n)), which clusters worse, as EM on the codes does. Keeping it
fixed (:meth:`ppl_models.vade.VaDE.freeze_mixture`) and training the networks
with a small learning rate raises the ELBO and keeps the clusters (measured in
``benchmarks/results/clustering-mnist-*``).

References: Z. Jiang, Y. Zheng, H. Tan, B. Tang, H. Zhou, "Variational Deep
Embedding: An Unsupervised and Generative Approach to Clustering", IJCAI 2017.
R. McConville, R. Santos-Rodriguez, R. J. Piechocki, I. Craddock, "N2D: (Not Too)
Deep Clustering via Clustering the Local Manifold of an Autoencoded Embedding",
ICPR 2020. L. van der Maaten, G. Hinton, "Visualizing Data using t-SNE", JMLR 2008.
I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
P. Micikevicius et al., "Mixed Precision Training", ICLR 2018. D. Kalamkar et al., "A Study of
BFLOAT16 for Deep Learning Training", arXiv:1905.12322, 2019.
"""
import copy
import logging
import math
import time
from typing import Any

import numpy as np
import pyro
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.util import get_rng_state, set_rng_state

from inference import EarlyStopping, batching, evaluate, fit, resolve_device
from inference.errors import NonFiniteLossError, UsageError

from .nets import softplus_inverse

log = logging.getLogger(__name__)  # long phases say one line each (the CLI shows them on stderr)

INIT_METHODS = ("gmm", "tsne")
EMBED_SOURCES = ("codes", "inputs")


# ---- numeric precision of the autoencoder stages ----------------------------------------------
PRECISIONS = ("auto", "bf16", "fp32")


def bf16_available(device: Any) -> bool:
    """Whether ``device`` runs bfloat16 matrix products in hardware: a CUDA device that supports
    bfloat16, or a CPU with AVX512-BF16 (which includes the CPUs with AMX-BF16). ``device`` as for
    :func:`inference.resolve_device` (``"auto"``/None, ``"cpu"``, ``"cuda[:N]"``; :class:`UsageError` for an
    unknown one or CUDA where there is none)."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(check is not None and check())
    return False


def resolve_precision(precision: str, device: Any) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"`` is bf16 where :func:`bf16_available`, fp32 elsewhere.

    :raises UsageError: for a value outside :data:`PRECISIONS`, or ``"bf16"`` on a
        device without hardware bfloat16 (emulated bfloat16 is slower than float32).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    available = bf16_available(device)
    if precision == "auto":
        return "bf16" if available else "fp32"
    if precision == "bf16" and not available:
        raise UsageError(f"precision bf16 needs hardware bfloat16 (a CPU with AVX512-BF16 or a CUDA device that "
                         f"supports it); {resolve_device(device)} has none: use fp32")
    return precision


# ---- the two training pairs ----------------------------------------------------------------
def _reconstruct(net, x_in, x, precision="fp32"):
    """Observe ``x`` under p(x | z = mu_phi(x_in)) at site "x" and return mu_phi(x_in) (B, L), float32.

    ``net`` has VaDE's ``encoder_body``, ``encoder_head``, ``decoder`` and ``likelihood``.
    With ``precision="bf16"`` the networks run under ``torch.autocast`` in
    bfloat16 (the matrix products; parameters stay float32) and their outputs
    are cast back to float32 before the likelihood and anything computed from
    the code, so only the networks' arithmetic is rounded.
    """
    with torch.autocast(x_in.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loc, _ = net.encoder_head(net.encoder_body(x_in))
        mean = net.decoder(loc)
    loc, mean = loc.to(x.dtype), mean.to(x.dtype)
    pyro.sample("x", net.likelihood(mean), obs=x)
    return loc


class AutoencoderPair(nn.Module):
    """The pretraining pair: model observes x ~ p(x | z = mu_phi(x~)) in ``pyro.plate("data")``; empty guide.

    Its loss under :func:`inference.fit` (``elbo="trace"``) is the mean over the
    batch of l_AE(x) = -log p(x | z = mu_phi(x~)) (module docstring, stage 1).
    It shares VaDE's encoder, decoder and likelihood modules (training it trains
    them) and holds nothing else, so the mixture parameters are not optimised.

    :param vade: a :class:`ppl_models.vade.VaDE`.
    :param dropout: probability of zeroing each input value while training
        (x~); in [0, 1). No corruption in eval mode.
    :param precision: ``"fp32"``, ``"bf16"`` (the networks under bfloat16
        autocast, outputs cast back to float32 before the likelihood: mixed
        precision, parameters and optimiser in float32) or ``"auto"`` (bf16
        where the module's device has hardware bfloat16, :func:`resolve_precision`).
    :raises UsageError: for a dropout outside [0, 1) or an invalid or unavailable precision.
    """

    max_plate_nesting = 1

    def __init__(self, vade: Any, dropout: float = 0.0, precision: str = "fp32") -> None:
        super().__init__()
        _check_dropout(dropout)
        self.precision = resolve_precision(precision, _device(vade))
        self.encoder_body, self.encoder_head = vade.encoder_body, vade.encoder_head
        self.decoder, self.likelihood = vade.decoder, vade.likelihood
        self.dropout = float(dropout)

    def model(self, x: torch.Tensor) -> None:
        x_in = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        with pyro.plate("data", x.shape[0]):
            _reconstruct(self, x_in, x, self.precision)

    def guide(self, x: torch.Tensor) -> None:
        """Empty: the model has no latent site."""

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)


class AlignmentPair(nn.Module):
    """The alignment pair: the autoencoder's observed site plus ``pyro.factor("align", -weight * CE_n)``.

    Batches are mappings ``{"x": (B, D) data, "r": (B, K) target responsibilities}``.
    Under :func:`inference.fit` (``elbo="trace"``) the loss is the batch mean of
    ``-log p(x_n | z = mu_phi(x_n)) + weight * CE_n`` with
    ``CE_n = -sum_c r_nc log p(c | z = mu_phi(x_n))`` (module docstring, stage 3).
    It holds the whole VaDE, so networks and mixture are trained. ``precision``
    as for :class:`AutoencoderPair` (the networks only: the cross-entropy is
    computed in float32 from the code cast back).

    :raises UsageError: for a negative ``weight`` or an invalid or unavailable precision.
    """

    max_plate_nesting = 1

    def __init__(self, vade: Any, weight: float = 100.0, precision: str = "fp32") -> None:
        super().__init__()
        if not weight >= 0:
            raise UsageError(f"align weight must be non-negative, got {weight!r}")
        self.precision = resolve_precision(precision, _device(vade))
        self.vade = vade
        self.weight = float(weight)

    def model(self, batch: Any) -> None:
        x, r = batch["x"], batch["r"]
        with pyro.plate("data", x.shape[0]):
            loc = _reconstruct(self.vade, x, x, self.precision)
            cross_entropy = -(r * self.vade.log_responsibilities_z(loc)).sum(-1)
            pyro.factor("align", -self.weight * cross_entropy)

    def guide(self, batch: Any) -> None:
        """Empty: the model has no latent site."""

    def check_data(self, batch: Any) -> None:
        x, r = batch["x"], batch["r"]
        self.vade.check_data(x)
        _check_responsibilities(r, x.shape[0], self.vade.n_clusters)


# ---- stage 1: pretraining --------------------------------------------------------------------
def pretrain(vade: Any, x: torch.Tensor, *, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3,
             dropout: float = 0.0, weight_decay: float = 0.0, seed: int = 0, progress: bool = False,
             validation: float = 0.0, patience: int | None = None, min_delta: float = 0.0,
             precision: str = "auto", compile: bool | str | None = None) -> dict[str, Any]:
    """Train VaDE's encoder mean and decoder as a (denoising) autoencoder (module docstring, stage 1).

    :class:`AutoencoderPair` trained by :func:`inference.fit` for at most
    ``epochs`` (AdamW, ``lr``, ``weight_decay``, ``batch_size``, ``seed``) on
    the module's device; Pyro's per-step validation is off (fit checks the data
    once). ``x`` is a tensor (N, D) or a ``DataSplit`` (a fresh view per epoch
    under dynamic binarisation). ``precision``: the networks' arithmetic,
    ``"fp32"``, ``"bf16"`` (mixed precision: bfloat16 autocast of the networks,
    float32 parameters, optimiser and likelihood; :class:`AutoencoderPair`) or
    ``"auto"`` (bf16 where the device has hardware bfloat16, else fp32).
    ``compile`` is :func:`inference.fit`'s (None: fit chooses the loss path).

    Early stopping: with ``validation`` = f in (0, 1), a seeded fraction f of
    the points is held out of the pretraining (it is still clustered later)
    and its clean reconstruction loss, mean l_AE without input dropout, is
    measured after every epoch; with ``patience`` = P, pretraining stops once
    P epochs in a row have not lowered it by more than ``min_delta`` nats per
    point, and the weights of the best epoch are restored
    (:class:`inference.EarlyStopping`).

    Returns ``{"pretrain_loss" (mean l_AE per point over the last epoch; NaN
    for 0 epochs), "pretrain_seconds", "pretrain_epochs_run", "pretrain_precision"}`` plus, with
    validation, ``"pretrain_val_loss"`` (the held-out loss of the kept weights)
    and ``"pretrain_best_epoch"``.

    :raises UsageError: for a negative or non-integer ``epochs``, a dropout
        outside [0, 1), a validation fraction outside [0, 1), ``patience``
        without validation, or an invalid or unavailable ``precision``.
    :raises inference.errors.NonFiniteLossError: when the loss stops being finite.
    """
    _check_epochs("pretrain", epochs)
    _check_early_stopping(validation, patience)
    pair = AutoencoderPair(vade, dropout, precision)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"pretrain_loss": float("nan"), "pretrain_epochs_run": 0,
                              "pretrain_precision": pair.precision}
    if epochs:
        stop = [] if patience is None else [EarlyStopping(patience, min_delta=min_delta)]
        result = fit(pair, x, epochs=epochs, batch_size=batch_size, lr=lr, device=_device(vade), seed=seed,
                     progress=progress, validate=False, validation=validation or None, callbacks=stop, compile=compile,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        history = result.history
        record.update(pretrain_loss=history[-1]["train_loss"], pretrain_epochs_run=len(history))
        if validation:
            kept = stop[0].best_epoch if stop else history[-1]["epoch"]  # the epoch EarlyStopping restored
            best = next(h for h in history if h["epoch"] == kept)
            record.update(pretrain_val_loss=-best["val_elbo"], pretrain_best_epoch=best["epoch"])
            log.info(f"pretraining: {len(history)} epochs, kept epoch {best['epoch']} "
                     f"(held-out loss {-best['val_elbo']:.2f} per point)")
    vade.eval()
    record["pretrain_seconds"] = time.perf_counter() - t0
    return record


# ---- stage 2: the initial mixture ------------------------------------------------------------
def fit_diag_gmm(z: torch.Tensor, n_components: int, *, restarts: int = 5, seed: int = 0, max_iter: int = 500,
                 reg: float = 1e-6) -> Any:
    """Diagonal-covariance GMM by EM (scikit-learn), best of ``restarts`` k-means-initialised runs.

    :param z: (N, L) tensor or array.
    :returns: the fitted ``sklearn.mixture.GaussianMixture`` (``weights_``,
        ``means_``, ``covariances_`` (K, L) variances, ``predict``, ``score``).
    :raises UsageError: for fewer than ``n_components`` rows or non-finite codes.
    """
    from sklearn.mixture import GaussianMixture

    z = _numpy64(z)
    if z.ndim != 2 or z.shape[0] < n_components:
        raise UsageError(f"a {n_components}-component GMM needs an (N, L) array with N >= {n_components}, got {z.shape}")
    if not np.isfinite(z).all():
        raise UsageError("cannot fit a GMM to non-finite codes")
    gmm = GaussianMixture(
        n_components, covariance_type="diag", n_init=restarts, max_iter=max_iter, reg_covar=reg, random_state=seed
    )
    return gmm.fit(z)


def tsne_map(points: Any, *, perplexity: float = 30.0, seed: int = 0, iterations: int = 1000) -> Any:
    """A 2-D t-SNE map (van der Maaten & Hinton 2008) of the rows of ``points``: (N, 2) float64 array.

    scikit-learn's Barnes-Hut t-SNE, PCA initialisation, automatic learning rate,
    ``random_state=seed`` (so a seed gives the same map on the same machine),
    at most ``iterations`` gradient steps (its ``max_iter``; the first 250 are
    the early exaggeration phase, so at least 250 are needed).

    :raises UsageError: for non-finite points or fewer than 250 iterations.
    """
    from sklearn.manifold import TSNE

    points = _numpy64(points)
    points = points.reshape(len(points), -1)
    if not np.isfinite(points).all():
        raise UsageError("cannot embed non-finite points with t-SNE")
    _check_tsne_iterations(iterations)
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed, max_iter=iterations)
    log.info(f"t-SNE map of {len(points)} points (perplexity {perplexity:g}) ...")
    t0 = time.perf_counter()
    emb = tsne.fit_transform(points)
    log.info(f"t-SNE map: done in {time.perf_counter() - t0:.1f} s")
    return emb


@torch.no_grad()
def set_mixture_from_responsibilities(vade: Any, z: torch.Tensor, r: Any) -> float:
    r"""Set VaDE's pi, mu_c, sigma_c by the M-step of a diagonal GMM on codes ``z`` (N, L), responsibilities ``r`` (N, K).

    With N_c = sum_n r_nc::

        pi_c = N_c / N,   mu_c = sum_n r_nc z_n / N_c,   sigma_c^2 = sum_n r_nc (z_n - mu_c)^2 / N_c,

    computed in float64, each sigma_c floored just above ``min_scale``
    (:meth:`ppl_models.vade.VaDE.set_mixture`). A component with (almost) no
    mass gets a pseudo-count of 1e-6 of the pooled moments, so its parameters
    stay finite. Returns the mean log-likelihood of ``z`` under the resulting
    mixture.

    :raises UsageError: on wrong shapes, non-finite codes, or negative/non-finite responsibilities.
    """
    z = torch.as_tensor(z).detach().to(torch.float64)
    r = torch.as_tensor(r).detach().to(device=z.device, dtype=torch.float64)
    if z.ndim != 2 or z.shape[1] != vade.latent_dim or r.shape != (z.shape[0], vade.n_clusters):
        raise UsageError(f"need codes (N, {vade.latent_dim}) and responsibilities (N, {vade.n_clusters}), "
                         f"got {tuple(z.shape)} and {tuple(r.shape)}")
    if not (torch.isfinite(z).all() and torch.isfinite(r).all() and (r >= 0).all()):
        raise UsageError("codes must be finite and responsibilities finite and non-negative")
    eps = 1e-6
    nk = r.sum(0) + eps
    mean, second = z.mean(0), (z**2).mean(0)
    locs = (r.T @ z + eps * mean) / nk[:, None]
    var = ((r.T @ z**2 + eps * second) / nk[:, None] - locs**2).clamp_min(0)
    vade.set_mixture(nk / nk.sum(), locs, var)
    return float(vade.prior().log_prob(z.to(vade.mixture_locs)).mean())


@torch.no_grad()
def init_mixture(vade: Any, x: torch.Tensor, *, restarts: int = 5, seed: int = 0, method: str = "gmm",
                 embed: str = "codes", embed_points: int = 10000, perplexity: float = 30.0,
                 tsne_iterations: int = 1000) -> tuple[Any, ...]:
    """Set VaDE's pi, mu_c, sigma_c from the codes mu_phi(x) of its (pretrained) encoder (module docstring, stage 2).

    ``method="gmm"``: the best of ``restarts`` diagonal-GMM EM fits to the codes
    (:func:`fit_diag_gmm`).

    ``method="tsne"``: up to ``embed_points`` points (a seeded random subset of x
    beyond that) are embedded by :func:`tsne_map` (``perplexity``,
    ``tsne_iterations``), their codes (``embed="codes"``) or their inputs
    (``embed="inputs"``); a full-covariance
    GMM with ``restarts`` restarts is fitted in the map; points left out of the
    map get the vote of their 10 nearest embedded codes (scikit-learn's
    ``KNeighborsClassifier`` on the map's hard clusters); the responsibilities
    set the latent mixture by :func:`set_mixture_from_responsibilities`.

    ``x`` is a tensor (N, D) or a ``DataSplit`` (its fixed view is used).

    :returns: ``(record, r)``: ``record`` is ``{"init", "gmm_log_likelihood" (mean
        per code: under the EM fit for gmm, under the set mixture for tsne),
        "gmm_seconds"}`` plus, for t-SNE, ``embed``, ``embed_points`` and
        ``embed_seconds``; ``r`` (N, K) holds the responsibilities of every row
        of x under the clustering the mixture was set from (the EM fit's, or the
        map's, voted in where needed), the targets of :func:`align`.
    :raises UsageError: for an unknown method or embedding, too few points for
        the perplexity, fewer than 250 t-SNE iterations, or non-finite codes.
    """
    _check_init(method, embed, embed_points, perplexity, vade.n_clusters)
    _check_tsne_iterations(tsne_iterations)
    t0 = time.perf_counter()
    xf = batching.fixed_view(x)
    codes = vade.latent_means(xf)
    k = vade.n_clusters
    if method == "gmm":
        gmm = fit_diag_gmm(codes, k, restarts=restarts, seed=seed)
        codes64 = _numpy64(codes)
        vade.set_mixture(*(torch.as_tensor(a) for a in (gmm.weights_, gmm.means_, gmm.covariances_)))
        r = torch.as_tensor(gmm.predict_proba(codes64), dtype=codes.dtype, device=codes.device)
        record = {"init": "gmm", "gmm_log_likelihood": float(gmm.score(codes64)), "gmm_seconds": time.perf_counter() - t0}
        return record, r
    n = codes.shape[0]
    idx = torch.arange(n)
    if n > embed_points:
        idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n, embed_points, replace=False)))
    embedded = len(idx)
    sub_codes = codes[idx.to(codes.device)]
    points = sub_codes if embed == "codes" else xf[idx.to(xf.device)].reshape(embedded, -1)
    if embedded <= max(perplexity, k):
        raise UsageError(f"t-SNE with perplexity {perplexity} and {k} clusters needs more than "
                         f"{max(perplexity, k):g} points, got {embedded}")
    emb = tsne_map(points, perplexity=perplexity, seed=seed, iterations=tsne_iterations)
    t1 = time.perf_counter()
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(k, covariance_type="full", n_init=restarts, random_state=seed).fit(emb)
    resp = gmm.predict_proba(emb)
    if embedded < n:  # out-of-sample: the map's clusters carried to every point by its 10 nearest embedded codes
        from sklearn.neighbors import KNeighborsClassifier

        knn = KNeighborsClassifier(min(10, embedded)).fit(_numpy64(sub_codes), resp.argmax(1))
        proba = knn.predict_proba(_numpy64(codes))
        resp = np.zeros((n, k))
        resp[:, knn.classes_] = proba
    r = torch.as_tensor(resp, dtype=codes.dtype, device=codes.device)
    ll = set_mixture_from_responsibilities(vade, codes, r)
    record = {"init": "tsne", "embed": embed, "embed_points": int(embedded), "embed_seconds": t1 - t0,
              "gmm_log_likelihood": ll, "gmm_seconds": time.perf_counter() - t1}
    return record, r


# ---- stage 3: alignment ----------------------------------------------------------------------
def align(vade: Any, x: torch.Tensor, r: Any, *, epochs: int = 5, weight: float = 100.0, lr: float = 1e-3,
          batch_size: int = 256, seed: int = 0, progress: bool = False, precision: str = "auto",
          compile: bool | str | None = None) -> dict[str, Any]:
    r"""Pull the codes towards the clusters ``r`` (N, K): train all of VaDE on l_AE + ``weight`` * CE (stage 3).

    :class:`AlignmentPair` trained by :func:`inference.fit` for ``epochs`` (Adam,
    ``lr``, ``batch_size``, ``seed``) on batches ``{"x": x, "r": r}``, on the
    module's device; Pyro's per-step validation is off. ``x`` is a tensor
    (N, D) or a ``DataSplit`` (its fixed view is used); ``precision`` and
    ``compile`` as for :func:`pretrain`. Returns ``{"align_seconds", "align_cross_entropy_start",
    "align_cross_entropy"}``: the mean over points of CE_n before and after
    (both in float32).

    :raises UsageError: for a negative or non-integer ``epochs``, a negative
        ``weight``, responsibilities of the wrong shape, or an invalid or
        unavailable ``precision``.
    :raises inference.errors.NonFiniteLossError: when the loss stops being finite.
    """
    _check_epochs("align", epochs)
    pair = AlignmentPair(vade, weight, precision)
    t0 = time.perf_counter()
    x = batching.fixed_view(x)
    r = torch.as_tensor(r).to(device=x.device, dtype=x.dtype)
    _check_responsibilities(r, x.shape[0], vade.n_clusters)
    start = _cross_entropy(vade, x, r)
    if epochs:
        fit(pair, {"x": x, "r": r}, epochs=epochs, batch_size=batch_size, lr=lr, device=_device(vade), seed=seed,
            progress=progress, validate=False, compile=compile)
    vade.eval()
    return {"align_seconds": time.perf_counter() - t0, "align_cross_entropy_start": start,
            "align_cross_entropy": _cross_entropy(vade, x, r)}


@torch.no_grad()
def _cross_entropy(vade, x, r):
    """(1/N) sum_n -sum_c r_nc log p(c | z = mu_phi(x_n)), in float64 on the host."""
    log_resp = vade.log_responsibilities_z(vade.latent_means(x))
    return float(-(r.to(log_resp) * log_resp).sum(-1).double().mean())


# ---- stage 4: the encoder's scale head -------------------------------------------------------
SCALE_STEPS = 13
"""Grid of :func:`init_scale_head`: s_k = 2^-k times the codes' spread, k = 0 .. SCALE_STEPS - 1."""


@torch.no_grad()
def init_scale_head(vade: Any, x: torch.Tensor, *, points: int = 5000, seed: int = 0) -> dict[str, Any]:
    r"""Start q(z | x)'s scale at the constant that maximises the ELBO given the pretrained means (stage 4).

    Pretraining and alignment train mu_phi only, so the scale head
    sigma_phi(x) = softplus(W h + b) is still at its random initialisation when
    SVI starts, unrelated to the codes' scale (module docstring, stage 4).
    This sets ``W = 0`` and ``b`` so that sigma_phi(x) = s* for every x and
    dimension, with::

        s* = argmax_{s in S} (1/M) sum_m ELBO_hat_s(x_m),   S = {2^-k * spread : k = 0 .. SCALE_STEPS - 1},

    ``spread`` the root mean over dimensions of the codes' variances, the ELBO
    estimated by :func:`inference.evaluate` (one particle) on M = ``points``
    rows of ``x`` (a seeded subset beyond that), the same random stream for
    every s (common random numbers). It is one step of coordinate ascent on
    the objective SVI then optimises (the best constant scale, the means,
    decoder and mixture fixed), so SVI starts from a bound at least as high as
    the best s of the grid and learns per-point scales from there.

    :returns: ``{"scale_head", "scale_head_elbo" (per point, at s*), "scale_head_elbo_start" (per point,
        the untrained head, same draws), "scale_head_seconds"}``.
    :raises UsageError: for ``points`` below 1.
    """
    if not (isinstance(points, int) and points >= 1):
        raise UsageError(f"points must be a positive integer, got {points!r}")
    t0 = time.perf_counter()
    xf = batching.fixed_view(x)
    n = xf.shape[0]
    if n > points:
        idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n, points, replace=False)))
        xf = xf[idx.to(xf.device)]
    head = vade.encoder_head
    latent = vade.latent_dim
    spread = float(vade.latent_means(xf).double().var(0).mean().sqrt())
    was_training, rng = vade.training, get_rng_state()
    vade.eval()

    def elbo():
        pyro.set_rng_seed(seed)
        return float(evaluate(vade, xf, particles=1).elbo)

    start = elbo()
    best_scale, best = None, -math.inf
    for k in range(SCALE_STEPS):
        s = spread * 2.0**-k
        if s <= 2 * head.min_scale:
            break
        _set_constant_scale(head, latent, s)
        value = elbo()
        if value > best:
            best_scale, best = s, value
    if best_scale is None:
        raise UsageError(f"the codes' spread {spread:g} is below twice the scale head's floor {head.min_scale:g}")
    _set_constant_scale(head, latent, best_scale)
    vade.train(was_training)
    set_rng_state(rng)  # the grid's draws leave the caller's random stream as it was
    return {"scale_head": best_scale, "scale_head_elbo": best, "scale_head_elbo_start": start,
            "scale_head_seconds": time.perf_counter() - t0}


def _set_constant_scale(head, latent, scale):
    """Make a ``GaussianHead`` (loc rows first, then the raw-scale rows) output ``scale`` for every input."""
    head.linear.weight[latent:] = 0
    head.linear.bias[latent:] = softplus_inverse(torch.tensor(scale - head.min_scale))


# ---- all stages, and the choice among candidates -----------------------------------------------
def initialise(vade: Any, x: torch.Tensor, *, pretrain_epochs: int = 50, batch_size: int = 256, lr: float = 1e-3,
               dropout: float = 0.0, weight_decay: float = 0.0, restarts: int = 5, seed: int = 0,
               progress: bool = False, candidates: int = 1, select_epochs: int = 10, select_lr: float = 2e-3,
               select_particles: int = 10, init: str = "gmm", embed: str = "codes", embed_points: int = 10000,
               perplexity: float = 30.0, align_epochs: int = 0, align_weight: float = 100.0,
               pretrain_validation: float = 0.0, pretrain_patience: int | None = None,
               pretrain_min_delta: float = 0.0, scale_head: bool = True, scale_points: int = 5000,
               precision: str = "auto", compile: bool | str | None = None, tsne_iterations: int = 1000) -> Any:
    """Initialise ``vade`` on ``x``: :func:`pretrain`, :func:`init_mixture`, :func:`align`, :func:`init_scale_head`.

    ``pretrain_epochs``, ``lr``, ``dropout``, ``weight_decay`` go to
    :func:`pretrain`, and ``pretrain_validation``, ``pretrain_patience``,
    ``pretrain_min_delta`` are its ``validation``, ``patience``, ``min_delta``
    (early stopping on the held-out reconstruction); ``precision`` (``"auto"``,
    ``"bf16"``, ``"fp32"``) is the arithmetic of the pretraining and the
    alignment (:func:`pretrain`; mixed precision where bf16), never of SVI, the
    codes handed to the mixture or the ELBOs; ``compile`` is fit's for those
    two stages (the selection's SVI keeps fit's own choice); with ``scale_head``
    (default) the encoder's scale head is set last by :func:`init_scale_head`
    on ``scale_points`` points; ``init``, ``embed``, ``embed_points``, ``perplexity``,
    ``tsne_iterations``, ``restarts`` are :func:`init_mixture`'s ``method``, ...; for ``init="tsne"``
    with ``align_epochs`` > 0, :func:`align` runs on every point and its map
    cluster (``align_weight``, learning rate ``lr``). ``x`` is a tensor or a
    ``DataSplit`` on the module's device. Returns the merged records. Bad
    arguments are refused (:class:`UsageError`) before any weight changes.

    With ``candidates`` R > 1 (stage 5): candidate 0 is built exactly as with
    R = 1; candidate r > 0 from freshly drawn network weights and its own
    pretraining and GMM seeds; each is trained by SVI (:func:`inference.fit`)
    for ``select_epochs`` epochs (Adam, ``select_lr``, ``batch_size``), its ELBO
    on ``x`` is estimated by :func:`inference.evaluate` with
    ``select_particles`` draws per point (same random stream for every
    candidate), and ``vade`` keeps the candidate with the highest ELBO. The
    record then also holds ``candidate_elbos`` (per datapoint), ``selected``
    (its index) and ``select_seconds``; the kept module has had
    ``select_epochs`` of SVI. The selection buys a better bound, not reliably
    better clusters: the bound ranks candidates by accuracy only weakly.

    :raises inference.errors.NonFiniteLossError: when a stage's loss or a
        candidate's ELBO is not finite.
    """
    if not (isinstance(candidates, int) and candidates >= 1):
        raise UsageError(f"candidates must be a positive integer, got {candidates!r}")
    _check_epochs("pretrain", pretrain_epochs)
    _check_dropout(dropout)
    _check_early_stopping(pretrain_validation, pretrain_patience)
    _check_init(init, embed, embed_points, perplexity, vade.n_clusters)
    _check_tsne_iterations(tsne_iterations)
    resolve_precision(precision, _device(vade))
    if not (isinstance(align_epochs, int) and align_epochs >= 0) or not align_weight >= 0:
        raise UsageError(f"align_epochs must be a non-negative integer and align_weight non-negative, "
                         f"got {align_epochs!r}, {align_weight!r}")
    if candidates > 1 and not (isinstance(select_epochs, int) and select_epochs >= 1):
        raise UsageError(f"select_epochs must be a positive integer when candidates > 1, got {select_epochs!r}")

    def build(r):
        cand_seed = seed if r == 0 else 1_000_003 * (seed + 1) + r
        if r > 0:
            torch.manual_seed(cand_seed)
            for mod in vade.modules():
                if mod is not vade and hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
            with torch.no_grad():  # the mixture is set by init_mixture; this only resets it to the constructor's
                vade.mixture_logits.zero_()
        record = pretrain(vade, x, epochs=pretrain_epochs, batch_size=batch_size, lr=lr, dropout=dropout,
                          weight_decay=weight_decay, seed=cand_seed, progress=progress,
                          validation=pretrain_validation, patience=pretrain_patience, min_delta=pretrain_min_delta,
                          precision=precision, compile=compile)
        mixture, resp = init_mixture(vade, x, restarts=restarts, seed=cand_seed, method=init, embed=embed,
                                     embed_points=embed_points, perplexity=perplexity, tsne_iterations=tsne_iterations)
        record.update(mixture)
        if init == "tsne" and align_epochs:
            record.update(align(vade, x, resp, epochs=align_epochs, weight=align_weight, lr=lr,
                                batch_size=batch_size, seed=cand_seed, progress=progress, precision=precision,
                                compile=compile))
        if scale_head:
            record.update(init_scale_head(vade, x, points=scale_points, seed=cand_seed))
        return record

    if candidates == 1:
        return build(0)
    t0 = time.perf_counter()
    device = _device(vade)
    best, best_elbo, elbos, records = None, -math.inf, [], []
    for r in range(candidates):
        record = build(r)
        fit(vade, x, epochs=select_epochs, batch_size=batch_size, lr=select_lr, device=device, seed=seed + r,
            progress=False, validate=False)
        pyro.set_rng_seed(seed)  # common random numbers: every candidate is scored with the same draws
        elbo = float(evaluate(vade, batching.fixed_view(x), particles=select_particles).elbo)
        if not math.isfinite(elbo):
            raise NonFiniteLossError(f"VaDE candidate {r} has a non-finite ELBO after {select_epochs} SVI epochs")
        elbos.append(elbo)
        records.append(record)
        if elbo > best_elbo:
            best, best_elbo = copy.deepcopy(vade.state_dict()), elbo
    selected = int(np.argmax(elbos))
    vade.load_state_dict(best)
    vade.eval()
    record = dict(records[selected])
    record.update(candidate_elbos=elbos, selected=selected, select_seconds=time.perf_counter() - t0)
    return record


# ---- argument checks and small helpers ----------------------------------------------------------
def _check_epochs(stage, epochs):
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
        raise UsageError(f"{stage} epochs must be a non-negative integer, got {epochs!r}")


def _check_early_stopping(validation, patience):
    if not (isinstance(validation, (int, float)) and 0 <= validation < 1):
        raise UsageError(f"pretraining validation fraction must lie in [0, 1), got {validation!r}")
    if patience is not None and not validation:
        raise UsageError("early stopping of the pretraining (patience) needs a validation fraction above 0")


def _check_dropout(dropout):
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise UsageError(f"pretraining dropout must lie in [0, 1), got {dropout!r}")


def _check_init(method, embed, embed_points, perplexity, n_clusters):
    if method not in INIT_METHODS:
        raise UsageError(f"unknown VaDE initialisation {method!r}; valid: {', '.join(INIT_METHODS)}")
    if embed not in EMBED_SOURCES:
        raise UsageError(f"embed must be one of {', '.join(EMBED_SOURCES)}, got {embed!r}")
    if not (isinstance(embed_points, int) and embed_points > n_clusters):
        raise UsageError(f"embed_points must be an integer above the {n_clusters} clusters, got {embed_points!r}")
    if not (isinstance(perplexity, (int, float)) and perplexity > 0):
        raise UsageError(f"perplexity must be positive, got {perplexity!r}")


def _check_tsne_iterations(iterations):
    if not (isinstance(iterations, int) and iterations >= 250):
        raise UsageError(f"t-SNE needs at least 250 iterations (its early exaggeration phase), got {iterations!r}")


def _check_responsibilities(r, n, k):
    if r.shape != (n, k):
        raise UsageError(f"need responsibilities ({n}, {k}), got {tuple(r.shape)}")


def _device(vade):
    return vade.mixture_locs.device


def _numpy64(a):
    """A float64 numpy copy of a tensor or array."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)
