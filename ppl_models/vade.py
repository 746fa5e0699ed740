r"""Variational deep embedding, VaDE (Jiang et al. 2017): a VAE whose prior is a Gaussian mixture.

Generative process, for each datapoint n (inside ``pyro.plate("data")``)::

    c_n ~ Cat(pi)                                   pi = softmax(logits)
    z_n | c_n ~ N(mu_c, diag sigma_c^2)             sigma_c = softplus(r_c) + min_scale
    x_n | z_n ~ p_theta(x | z_n) = Lik(x; decoder_theta(z_n))

pi, mu_c and sigma_c are learned with the networks. Every sigma_c is positive
and bounded below by construction, so log N(z; mu_c, sigma_c^2) is finite for
finite z; a non-finite loss anyway stops :func:`inference.fit` with
``NonFiniteLossError``.

How c is handled: it is summed out exactly, in the prior
---------------------------------------------------------
The model samples z from the marginal mixture
``p(z) = sum_c pi_c N(z; mu_c, sigma_c^2)`` (``MixtureSameFamily``), so the guide
is the VAE's ``q(z | x) = N(mu_phi(x), diag sigma_phi(x)^2)`` alone and the
objective is, per datapoint::

    ELBO(x) = E_q(z|x)[ log p(x | z) + log sum_c pi_c N(z; mu_c, sigma_c^2) - log q(z | x) ]   <= log p(x).

This is exactly what enumerating c in the model with ``TraceEnum_ELBO`` computes
(a log-sum-exp over c at each sampled z), written as a distribution, so it
works with every ELBO spec of :func:`inference.make_elbo` (``trace``, ``iwae:K``,
...) and :func:`inference.evaluate` scores it by its default tracing path with
no special code: ``log w = log p(x|z) + log p(z) - log q(z|x)``.

Why not the bound of the VaDE paper. With q(z, c | x) = q(z | x) q(c | x) the
paper optimises::

    ELBO_q(c|x)(x) = E_q[log p(x|z)] - sum_c q(c|x) KL(q(z|x) || N(mu_c, sigma_c^2)) - KL(q(c|x) || pi)
                   = ELBO(x) - E_q(z|x)[ KL(q(c|x) || p(c|z)) ],

so it is never tighter than ELBO(x) above, and equals it only if q(c | x)
matched p(c | z) for every z under q(z | x), which a q(c | x) that depends on x
alone cannot do. Its per-component KLs are analytic, but the analytic part we
give up is small: in the marginal bound the sum over c is exact, and the
entropy term enters through the reparameterised estimate
``log q(z(eps) | x) = -sum_j log sigma_j - |eps|^2 / 2 - L/2 log 2 pi``, whose
gradient equals the gradient of the analytic entropy exactly (zero variance).
Only E_q[log p(x|z)] and E_q[log p(z)] are Monte Carlo, as in any VAE.

Cluster assignments. q(c | x) is defined as the posterior responsibility at the
mean of q(z | x)::

    q(c | x) = p(c | z = mu_phi(x)) = pi_c N(mu_phi(x); mu_c, sigma_c^2) / sum_c' pi_c' N(mu_phi(x); mu_c', sigma_c'^2),

with log pi_c added once (the published code summed it over the L latent
dimensions, i.e. used pi_c^L, which is wrong); ``cluster(x)`` is its argmax.

Initialisation (:meth:`VaDE.initialise` = :meth:`VaDE.pretrain` then
:meth:`VaDE.init_mixture`). As the paper says, SVI from random mixture
parameters gets stuck; we pretrain the encoder mean and the decoder as a
(optionally denoising) deterministic autoencoder, loss -log p(x | z = mu_phi(x~)),
then set pi, mu_c, sigma_c by one of two rules:

* ``init="gmm"`` (the paper): a diagonal GMM fitted by EM with several restarts
  to the codes mu_phi(x) (scikit-learn's ``GaussianMixture``), best likelihood kept;
* ``init="tsne"``: a full-covariance GMM fitted in a 2-D t-SNE map of the codes
  (or of the inputs), whose responsibilities r_nc give the latent mixture by one
  M-step, pi_c = mean_n r_nc, mu_c and sigma_c^2 the r-weighted mean and variance
  of the codes (the N2D recipe of McConville et al. 2020, with t-SNE for UMAP).

How good the clustering ends up is decided mostly here: SVI moves the accuracy
of the initial mixture by a few points, rarely more. Measured on sklearn digits
(5 pretraining seeds): the paper's rule starts at ACC 0.69-0.89 and ends at
0.73-0.93; the t-SNE map of the inputs starts at 0.89-0.91 and ends at
0.91-0.94 after 150 SVI epochs (``benchmarks/results/clustering-digits-quick-*``).
On MNIST (all 70,000 images, 5 seeds) t-SNE of the codes, the vote and
:meth:`VaDE.align` start at 0.954-0.965 and 5 SVI epochs end at 0.940-0.951,
median 0.944 (``benchmarks/results/clustering-mnist-cpu-2core.*``).
The encoder's scale head is not pretrained. With ``candidates=R`` several
initialisations are tried and the one with the highest training ELBO after a few
SVI epochs is kept (maximum marginal likelihood, no labels).

References: Z. Jiang, Y. Zheng, H. Tan, B. Tang, H. Zhou, "Variational Deep
Embedding: An Unsupervised and Generative Approach to Clustering", IJCAI 2017.
R. McConville, R. Santos-Rodriguez, R. J. Piechocki, I. Craddock, "N2D: (Not Too)
Deep Clustering via Clustering the Local Manifold of an Autoencoded Embedding",
ICPR 2020. L. van der Maaten, G. Hinton, "Visualizing Data using t-SNE", JMLR 2008.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.errors import UsageError

from .base import ModelConfig
from .nets import softplus_inverse
from .vae import VAE


def fit_diag_gmm(z, n_components, *, restarts=5, seed=0, max_iter=500, reg=1e-6):
    """Diagonal-covariance GMM by EM (scikit-learn), best of ``restarts`` k-means-initialised runs.

    :param z: (N, L) tensor or array.
    :returns: the fitted ``sklearn.mixture.GaussianMixture`` (``weights_``,
        ``means_``, ``covariances_`` (K, L) variances, ``predict``, ``score``).
    """
    from sklearn.mixture import GaussianMixture

    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().double().numpy()
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < n_components:
        raise UsageError(f"a {n_components}-component GMM needs an (N, L) array with N >= {n_components}, got {z.shape}")
    if not np.isfinite(z).all():
        raise UsageError("cannot fit a GMM to non-finite codes")
    gmm = GaussianMixture(
        n_components, covariance_type="diag", n_init=restarts, max_iter=max_iter, reg_covar=reg, random_state=seed
    )
    return gmm.fit(z)


INIT_METHODS = ("gmm", "tsne")
EMBED_SOURCES = ("codes", "inputs")


def _check_init(method, embed, embed_points, perplexity, n_clusters):
    if method not in INIT_METHODS:
        raise UsageError(f"unknown VaDE initialisation {method!r}; valid: {', '.join(INIT_METHODS)}")
    if embed not in EMBED_SOURCES:
        raise UsageError(f"embed must be one of {', '.join(EMBED_SOURCES)}, got {embed!r}")
    if not (isinstance(embed_points, int) and embed_points > n_clusters):
        raise UsageError(f"embed_points must be an integer above the {n_clusters} clusters, got {embed_points!r}")
    if not (isinstance(perplexity, (int, float)) and perplexity > 0):
        raise UsageError(f"perplexity must be positive, got {perplexity!r}")


def tsne_map(points, *, perplexity=30.0, seed=0):
    """A 2-D t-SNE map (van der Maaten & Hinton 2008) of the rows of ``points``: (N, 2) float64 array.

    scikit-learn's Barnes-Hut t-SNE, PCA initialisation, automatic learning rate,
    ``random_state=seed`` (so a seed gives the same map on the same machine).
    """
    from sklearn.manifold import TSNE

    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    points = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    if not np.isfinite(points).all():
        raise UsageError("cannot embed non-finite points with t-SNE")
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(points)


@dataclass
class VaDEConfig(ModelConfig):
    """The arguments of :class:`VaDE` (defaults: its signature)."""

    x_dim: int
    n_clusters: int
    latent_dim: int
    hidden: Sequence[int]
    likelihood: str
    arch: str
    image_shape: Sequence[int] | None
    activation: str
    min_scale: float


class VaDE(VAE):
    """VaDE: a VAE with a learned K-component diagonal Gaussian-mixture prior (see the module docstring).

    :param x_dim: values per datapoint (flattened).
    :param n_clusters: K, the number of mixture components.
    :param latent_dim: L, the size of z.
    :param hidden: MLP hidden widths (encoder; the decoder mirrors them).
    :param likelihood: observation family spec (see :mod:`ppl_models.likelihoods`).
    :param arch: ``"mlp"`` or ``"conv"``.
    :param min_scale: lower bound of every component's standard deviation.
    """

    def __init__(
        self,
        x_dim,
        n_clusters=10,
        latent_dim=10,
        hidden=(256,),
        likelihood="bernoulli",
        arch="mlp",
        image_shape=None,
        activation="relu",
        min_scale=1e-3,
    ):
        if not (isinstance(n_clusters, int) and n_clusters >= 1):
            raise UsageError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not min_scale > 0:
            raise UsageError(f"min_scale must be positive, got {min_scale!r}")
        super().__init__(
            x_dim,
            latent_dim=latent_dim,
            hidden=hidden,
            likelihood=likelihood,
            beta=1.0,
            arch=arch,
            image_shape=image_shape,
            activation=activation,
        )
        self.cfg = VaDEConfig.from_arguments(locals())  # replaces the VAE's config (VaDE has no beta)
        self.n_clusters = n_clusters
        self.min_scale = float(min_scale)
        # until init_mixture: equal weights, unit scales, means spread by a fixed generator
        gen = torch.Generator().manual_seed(0)
        self.mixture_logits = nn.Parameter(torch.zeros(n_clusters))
        self.mixture_locs = nn.Parameter(torch.randn(n_clusters, latent_dim, generator=gen))
        self.mixture_raw_scales = nn.Parameter(torch.full((n_clusters, latent_dim), softplus_inverse(1.0)))

    # ---- the mixture prior -------------------------------------------------------------
    @property
    def mixture_weights(self):
        """pi, shape (K,)."""
        return self.mixture_logits.softmax(-1)

    @property
    def mixture_scales(self):
        """sigma_c, shape (K, L), each >= min_scale."""
        return F.softplus(self.mixture_raw_scales) + self.min_scale

    def components(self):
        """p(z | c) for every c: a Normal with batch shape (K,) and event shape (L,)."""
        return dist.Normal(self.mixture_locs, self.mixture_scales).to_event(1)

    def prior(self):
        """p(z) = sum_c pi_c N(z; mu_c, diag sigma_c^2), event shape (L,)."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.mixture_logits), self.components())

    def model(self, x):
        n = x.shape[0]
        prior = self.prior()
        with pyro.plate("data", n):
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    # guide: the VAE's q(z | x)

    # ---- clustering --------------------------------------------------------------------
    def log_responsibilities_z(self, z):
        """log p(c | z) for z of shape (..., L): shape (..., K) (Bayes' rule, log pi_c added once)."""
        joint = self.mixture_logits.log_softmax(-1) + self.components().log_prob(z.unsqueeze(-2))
        return joint.log_softmax(-1)

    @torch.no_grad()
    def responsibilities(self, x):
        """q(c | x) = p(c | z = mean of q(z | x)): shape (N, K), rows sum to 1."""
        return self.log_responsibilities_z(self.encode(x).mean).exp()

    @torch.no_grad()
    def cluster(self, x, batch_size=4096):
        """The most probable cluster under q(c | x) for each row of x: (N,) long."""
        out = [
            self.log_responsibilities_z(self.encode(x[i : i + batch_size]).mean).argmax(-1)
            for i in range(0, x.shape[0], batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def latent_means(self, x, batch_size=4096):
        """mu_phi(x), the means of q(z | x): (N, L)."""
        return torch.cat([self.encode(x[i : i + batch_size]).mean for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def sample(self, n, *, component=None, mean=True):
        """n draws x ~ p(x), or x ~ p(x | c = component) when ``component`` is given.

        ``mean=True`` returns E[x | z] instead of a draw of x.
        """
        if component is None:
            z = self.prior().sample((n,))
        else:
            if not (isinstance(component, int) and 0 <= component < self.n_clusters):
                raise UsageError(f"component must be an integer in 0..{self.n_clusters - 1}, got {component!r}")
            loc, scale = self.mixture_locs[component], self.mixture_scales[component]
            z = loc + scale * torch.randn(n, self.latent_dim, device=loc.device, dtype=loc.dtype)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    # ---- initialisation ----------------------------------------------------------------
    def pretrain(self, x, *, epochs=50, batch_size=256, lr=1e-3, dropout=0.0, weight_decay=0.0, seed=0, progress=False):
        """Train encoder mean and decoder as an autoencoder: minimise mean_n -log p(x_n | z = mu_phi(x~_n)).

        With ``dropout`` > 0 the encoder sees x~, the input with each value
        zeroed with that probability and the rest scaled by 1/(1 - dropout) (a
        denoising autoencoder, as in the stacked pretraining of DEC/VaDE); the
        target is always the clean x.

        ``x`` is a tensor or a ``DataSplit`` (a fresh view per epoch under dynamic
        binarisation) on the module's device. Returns ``{"pretrain_loss",
        "pretrain_seconds"}`` (loss of the last epoch, per datapoint).
        """
        from inference import batching

        if not (isinstance(epochs, int) and epochs >= 0):
            raise UsageError(f"pretrain epochs must be a non-negative integer, got {epochs!r}")
        t0 = time.perf_counter()
        n = batching.length(x)
        self.check_data(batching.fixed_view(x))
        params = [p for name, p in self.named_parameters() if not name.startswith("mixture_")]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        last = float("nan")
        self.train()
        for _ in _epochs(epochs, progress, "pretrain autoencoder"):
            data = batching.epoch_view(x)
            perm = torch.randperm(n, generator=gen).to(data.device)
            total = 0.0
            for i in range(0, n, batch_size):
                xb = data[perm[i : i + batch_size]]
                xin = F.dropout(xb, dropout) if dropout > 0 else xb
                loc, _ = self.encoder_head(self.encoder_body(xin))
                loss = -self.decode(loc).log_prob(xb).sum()
                if not torch.isfinite(loss):
                    from inference.errors import NonFiniteLossError

                    raise NonFiniteLossError("non-finite autoencoder loss during VaDE pretraining")
                opt.zero_grad(set_to_none=True)
                (loss / xb.shape[0]).backward()
                opt.step()
                total += float(loss.detach())
            last = total / n
        self.eval()
        return {"pretrain_loss": last, "pretrain_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def set_mixture_from_responsibilities(self, z, r):
        r"""Set pi, mu_c, sigma_c by the M-step of a diagonal GMM on codes ``z`` (N, L) with responsibilities ``r`` (N, K).

        With N_c = sum_n r_nc::

            pi_c = N_c / N,   mu_c = sum_n r_nc z_n / N_c,   sigma_c^2 = sum_n r_nc (z_n - mu_c)^2 / N_c,

        computed in float64, each sigma_c floored just above ``min_scale``. A
        component with (almost) no mass gets a pseudo-count of 1e-6 of the pooled
        moments, so its parameters stay finite. Returns the mean log-likelihood of
        ``z`` under the resulting mixture.
        """
        z = torch.as_tensor(z).detach().to(torch.float64)
        r = torch.as_tensor(r).detach().to(device=z.device, dtype=torch.float64)
        if z.ndim != 2 or z.shape[1] != self.latent_dim or r.shape != (z.shape[0], self.n_clusters):
            raise UsageError(f"need codes (N, {self.latent_dim}) and responsibilities (N, {self.n_clusters}), "
                             f"got {tuple(z.shape)} and {tuple(r.shape)}")
        if not (torch.isfinite(z).all() and torch.isfinite(r).all() and (r >= 0).all()):
            raise UsageError("codes must be finite and responsibilities finite and non-negative")
        eps = 1e-6
        nk = r.sum(0) + eps
        mean, second = z.mean(0), (z**2).mean(0)
        locs = (r.T @ z + eps * mean) / nk[:, None]
        var = ((r.T @ z**2 + eps * second) / nk[:, None] - locs**2).clamp_min(0)
        self._set_mixture((nk / nk.sum()).log(), locs, var)
        return float(self.prior().log_prob(z.to(self.mixture_locs)).mean())

    def _set_mixture(self, log_weights, locs, variances):
        """Copy log pi, mu_c and sigma_c^2 into the parameters (sigma_c floored just above ``min_scale``).

        The floor is applied in the dtype given, then everything is cast to the parameters' dtype and device.
        """
        ref = self.mixture_locs
        scales = variances.sqrt().clamp_min(self.min_scale * 1.01).to(ref)
        self.mixture_logits.copy_(log_weights.to(ref))
        self.mixture_locs.copy_(locs.to(ref))
        self.mixture_raw_scales.copy_(softplus_inverse(scales - self.min_scale))

    @torch.no_grad()
    def init_mixture(self, x, *, restarts=5, seed=0, method="gmm", embed="codes", embed_points=10000, perplexity=30.0):
        """Set pi, mu_c, sigma_c from the codes mu_phi(x) of the (pretrained) encoder.

        ``method="gmm"`` (the paper): the best of ``restarts`` diagonal-GMM EM fits
        to the codes.

        ``method="tsne"``: cluster on a 2-D t-SNE map instead, then carry the
        clusters back to the latent space. Up to ``embed_points`` points (a
        seeded random subset of x beyond that) are embedded by t-SNE (scikit-learn,
        PCA-initialised, ``perplexity``), either their codes (``embed="codes"``)
        or their raw inputs (``embed="inputs"``); a full-covariance GMM with
        ``restarts`` restarts is fitted in the map; its responsibilities r_nc set
        the latent mixture by one M-step (:meth:`set_mixture_from_responsibilities`).
        Points left out of the map get the vote of their 10 nearest embedded codes
        (scikit-learn's ``KNeighborsClassifier`` on the map's hard clusters), so
        the M-step and :meth:`align` see every point (on MNIST: 0.959 accuracy
        in a map of 10,000 codes, 0.956 on all 70,000 after the vote).
        This is the "cluster the local manifold" idea of N2D (McConville et al.
        2020, with UMAP there): k-means/EM on the codes split the curved digit
        manifolds, a neighbour embedding keeps them whole.

        Returns ``{"init", "gmm_log_likelihood" (mean per code under the set
        mixture), "gmm_seconds"}`` plus, for t-SNE, ``embed``, ``embed_points`` and
        ``embed_seconds``; t-SNE also leaves ``self.map_responsibilities``, the (N, K)
        responsibilities of every row of x (mapped or voted in), for :meth:`align`.
        """
        from inference import batching

        _check_init(method, embed, embed_points, perplexity, self.n_clusters)
        t0 = time.perf_counter()
        xf = batching.fixed_view(x)
        codes = self.latent_means(xf)
        if method == "gmm":
            gmm = fit_diag_gmm(codes, self.n_clusters, restarts=restarts, seed=seed)
            ref = self.mixture_locs
            as_ref = lambda a: torch.as_tensor(a, dtype=ref.dtype, device=ref.device)  # noqa: E731
            self._set_mixture(as_ref(gmm.weights_).clamp_min(1e-12).log(), as_ref(gmm.means_), as_ref(gmm.covariances_))
            return {"init": "gmm", "gmm_log_likelihood": float(gmm.score(codes.cpu().double().numpy())),
                    "gmm_seconds": time.perf_counter() - t0}
        n = codes.shape[0]
        idx = torch.arange(n)
        if n > embed_points:
            idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n, embed_points, replace=False)))
        embedded = len(idx)
        sub_codes = codes[idx.to(codes.device)]
        points = sub_codes if embed == "codes" else xf[idx.to(xf.device)].reshape(embedded, -1)
        if embedded <= max(perplexity, self.n_clusters):
            raise UsageError(f"t-SNE with perplexity {perplexity} and {self.n_clusters} clusters needs more than "
                             f"{max(perplexity, self.n_clusters):g} points, got {embedded}")
        emb = tsne_map(points, perplexity=perplexity, seed=seed)
        t1 = time.perf_counter()
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(self.n_clusters, covariance_type="full", n_init=restarts, random_state=seed).fit(emb)
        resp = gmm.predict_proba(emb)
        if embedded < n:  # out-of-sample: the map's clusters carried to every point by its 10 nearest embedded codes
            from sklearn.neighbors import KNeighborsClassifier

            knn = KNeighborsClassifier(min(10, embedded)).fit(sub_codes.cpu().double().numpy(), resp.argmax(1))
            proba = knn.predict_proba(codes.cpu().double().numpy())
            resp = np.zeros((n, self.n_clusters))
            resp[:, knn.classes_] = proba
        resp = torch.as_tensor(resp, dtype=codes.dtype, device=codes.device)
        ll = self.set_mixture_from_responsibilities(codes, resp)
        self.map_responsibilities = resp  # every row of x, for :meth:`align`; not part of the state dict
        return {"init": "tsne", "embed": embed, "embed_points": int(embedded), "embed_seconds": t1 - t0,
                "gmm_log_likelihood": ll, "gmm_seconds": time.perf_counter() - t1}

    def align(self, x, r, *, epochs=5, weight=100.0, lr=1e-3, batch_size=256, seed=0, progress=False):
        r"""Pull the codes towards given clusters: train encoder mean, decoder and mixture on ``x`` (N, D) with
        target responsibilities ``r`` (N, K), minimising the mean over points of::

            -log p(x_n | z = mu_phi(x_n))  +  weight * sum_c r_nc [-log p(c | z = mu_phi(x_n))].

        The first term is the autoencoder loss of :meth:`pretrain`; the second is
        the cross-entropy from the targets to the responsibilities the model will
        use for q(c | x). One M-step (:meth:`set_mixture_from_responsibilities`)
        puts a diagonal Gaussian on each cluster of codes, but clusters found in a
        t-SNE map are not diagonal Gaussians in the code space, so the latent
        mixture starts below the map's accuracy. Measured on MNIST (70,000 images,
        one seed): 0.956 for the map's clusters voted to every point, 0.905 after
        the M-step, 0.957 after 3 epochs of this; SVI on the ELBO then gives some
        of it back (0.951, 0.944, 0.940 after 2, 4, 6 epochs at lr 5e-4), since
        the bound does not reward class-shaped clusters. No labels are used: the
        targets are the map's own clusters. Returns ``{"align_seconds",
        "align_cross_entropy"}`` (mean cross-entropy of the last epoch).
        """
        if not (isinstance(epochs, int) and epochs >= 0):
            raise UsageError(f"align epochs must be a non-negative integer, got {epochs!r}")
        if not weight >= 0:
            raise UsageError(f"align weight must be non-negative, got {weight!r}")
        t0 = time.perf_counter()
        r = torch.as_tensor(r).to(device=x.device, dtype=x.dtype)
        if r.shape != (x.shape[0], self.n_clusters):
            raise UsageError(f"need responsibilities ({x.shape[0]}, {self.n_clusters}), got {tuple(r.shape)}")
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        ce_sum = float("nan")
        self.train()
        for _ in _epochs(epochs, progress, "align codes to the map's clusters"):
            ce_sum = 0.0
            for b in torch.randperm(x.shape[0], generator=gen).to(x.device).split(batch_size):
                loc, _ = self.encoder_head(self.encoder_body(x[b]))
                rec = -self.decode(loc).log_prob(x[b]).sum()
                ce = -(r[b] * self.log_responsibilities_z(loc)).sum()
                loss = (rec + weight * ce) / len(b)
                if not torch.isfinite(loss):
                    from inference.errors import NonFiniteLossError

                    raise NonFiniteLossError("non-finite loss while aligning VaDE's codes to the map's clusters")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += float(ce.detach())
            ce_sum /= x.shape[0]
        self.eval()
        return {"align_seconds": time.perf_counter() - t0, "align_cross_entropy": ce_sum}

    def initialise(
        self, x, *, pretrain_epochs=50, batch_size=256, lr=1e-3, dropout=0.0, weight_decay=0.0, restarts=5, seed=0,
        progress=False, candidates=1, select_epochs=10, select_lr=2e-3, select_particles=10, init="gmm",
        embed="codes", embed_points=10000, perplexity=30.0, align_epochs=0, align_weight=100.0,
    ):
        """:meth:`pretrain` then :meth:`init_mixture` (``init``, ``embed``, ``embed_points``, ``perplexity`` are
        its ``method``, ``embed``, ...), then, for ``init="tsne"`` with ``align_epochs`` > 0, :meth:`align` on every
        point and its map cluster (``align_weight``, learning rate ``lr``); returns the merged
        records. Bad arguments are refused before any training.

        With ``candidates`` R > 1 the initialisation is chosen by the bound, with
        no labels: R candidates are built (candidate 0 exactly as with R = 1;
        candidate r > 0 from freshly drawn network weights and its own
        pretraining and GMM seeds), each is trained by SVI for ``select_epochs``
        epochs (Adam, ``select_lr``, ``batch_size``), its ELBO on ``x`` is
        estimated with ``select_particles`` draws per point (same random stream
        for every candidate), and the module keeps the candidate with the
        highest ELBO, i.e. the highest lower bound on the marginal likelihood
        log p(x) of the training data. The record then also holds
        ``candidate_elbos`` (per datapoint), ``selected`` (its index) and
        ``select_seconds``; the chosen module has had ``select_epochs`` of SVI.

        Measured on sklearn digits (15 pretraining seeds, 10 SVI epochs): the
        selection ELBO ranks candidates by clustering accuracy only weakly
        (Spearman 0.24), so this buys a better bound, not reliably better clusters.
        """
        if not (isinstance(candidates, int) and candidates >= 1):
            raise UsageError(f"candidates must be a positive integer, got {candidates!r}")
        _check_init(init, embed, embed_points, perplexity, self.n_clusters)
        if not (isinstance(align_epochs, int) and align_epochs >= 0) or not align_weight >= 0:
            raise UsageError(f"align_epochs must be a non-negative integer and align_weight non-negative, "
                             f"got {align_epochs!r}, {align_weight!r}")

        def build(r):
            cand_seed = seed if r == 0 else 1_000_003 * (seed + 1) + r
            if r > 0:
                torch.manual_seed(cand_seed)
                for mod in self.modules():
                    if mod is not self and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
                with torch.no_grad():  # the mixture is set by init_mixture; this only resets it to the constructor's
                    self.mixture_logits.zero_()
            out = self.pretrain(
                x, epochs=pretrain_epochs, batch_size=batch_size, lr=lr, dropout=dropout, weight_decay=weight_decay,
                seed=cand_seed, progress=progress,
            )
            out.update(self.init_mixture(x, restarts=restarts, seed=cand_seed, method=init, embed=embed,
                                         embed_points=embed_points, perplexity=perplexity))
            if init == "tsne" and align_epochs:
                from inference import batching

                out.update(self.align(batching.fixed_view(x), self.map_responsibilities, epochs=align_epochs,
                                      weight=align_weight, lr=lr, batch_size=batch_size, seed=cand_seed,
                                      progress=progress))
            return out

        if candidates == 1:
            return build(0)
        if not (isinstance(select_epochs, int) and select_epochs >= 1):
            raise UsageError(f"select_epochs must be a positive integer when candidates > 1, got {select_epochs!r}")
        import copy

        from inference import batching, evaluate, fit

        t0 = time.perf_counter()
        device = self.mixture_locs.device
        best, best_elbo, elbos, records = None, -math.inf, [], []
        for r in range(candidates):
            info = build(r)
            fit(self, x, epochs=select_epochs, batch_size=batch_size, lr=select_lr, device=device,
                seed=seed + r, progress=False, validate=False)
            pyro.set_rng_seed(seed)  # common random numbers: every candidate is scored with the same draws
            elbo = float(evaluate(self, batching.fixed_view(x), particles=select_particles).elbo)
            if not math.isfinite(elbo):
                from inference.errors import NonFiniteLossError

                raise NonFiniteLossError(f"VaDE candidate {r} has a non-finite ELBO after {select_epochs} SVI epochs")
            elbos.append(elbo)
            records.append(info)
            if elbo > best_elbo:
                best, best_elbo = copy.deepcopy(self.state_dict()), elbo
        selected = int(np.argmax(elbos))
        self.load_state_dict(best)
        self.eval()
        info = dict(records[selected])
        info.update(candidate_elbos=elbos, selected=selected, select_seconds=time.perf_counter() - t0)
        return info


def _epochs(epochs, progress, desc):
    """range(epochs), under a tqdm bar named ``desc`` when ``progress``."""
    if not progress:
        return range(epochs)
    from tqdm.auto import tqdm

    return tqdm(range(epochs), desc=desc, unit="epoch")
