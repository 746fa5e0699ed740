"""``pplm train gmm --clusters K``: a Gaussian mixture trained by SVI with enumerated assignments."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.errors import UsageError
from inference.plots import save_image_grid

from ..gmm import GMM, em
from .options import add_data_options, positive_float, positive_int
from .recipe import Recipe, RunConfig

log = logging.getLogger(__name__)


@dataclass
class GMMOptions:
    clusters: int = 10
    covariance: str = "diag"
    min_scale: float = 0.05
    init: str = "kmeans++"
    em_restarts: int = 3
    em_reference: bool = True


def add_options(p: Any) -> None:
    d = GMMOptions()
    add_data_options(p, binarize=GMMRecipe.default_binarize)
    p.add_argument("--clusters", type=positive_int, default=d.clusters, help="number of mixture components K")
    p.add_argument("--covariance", choices=("diag", "full"), default=d.covariance)
    p.add_argument("--min-scale", type=positive_float, default=d.min_scale,
                   help="floor on component standard deviations (keeps constant pixels from dominating)")
    p.add_argument("--init", choices=("kmeans++", "em"), default=d.init,
                   help="start from EM's starting point (k-means++ means, pooled variances) or from EM's fit")
    p.add_argument("--em-restarts", type=positive_int, default=d.em_restarts, help="EM restarts for the reference fit")
    p.add_argument("--no-em-reference", dest="em_reference", action="store_false",
                   help="skip EM's reference fit in the metrics (minutes on MNIST)")


class GMMRecipe(Recipe):
    name = "gmm"
    help = "Gaussian mixture (diag or full covariance), assignments summed out exactly; EM reference in metrics"
    model_class = GMM
    Options = GMMOptions
    default_elbo = "enum"
    default_epochs = 100
    default_batch_size = 256
    default_lr = 0.01

    def check(self, run: RunConfig) -> None:
        spec = run.elbo.split(":")[0]
        if spec != "enum":
            raise UsageError(f"the GMM sums its assignments out by enumeration: use --elbo enum (got {run.elbo!r})")

    def build(self, run: RunConfig, train: Any) -> Any:
        o, x = run.options, train.data
        if o.clusters > x.shape[0]:
            raise UsageError(f"--clusters {o.clusters} exceeds the {x.shape[0]} training points")
        gmm = GMM(x.shape[1], o.clusters, o.covariance, min_scale=o.min_scale)
        return gmm.initialize(x, seed=run.seed)

    def _em(self, train, run):
        """EM's fit on the training data (the reference, and ``--init em``'s start), computed once per run."""
        if not hasattr(self, "_em_cache") or self._em_cache[0] != id(train):
            o = run.options
            log.info(f"EM reference fit ({o.clusters} components, {o.em_restarts} restarts) ...")
            fit = em(train.data, o.clusters, covariance=o.covariance, restarts=o.em_restarts,
                     reg=o.min_scale**2, seed=run.seed)
            self._em_cache = (id(train), fit)
            log.info(f"EM reference fit: done in {fit.n_iter} iterations")
        return self._em_cache[1]

    def before_fit(self, module: Any, train: Any, run: RunConfig, device: str | torch.device) -> dict[str, Any]:
        if run.options.init == "em":
            fit = self._em(train, run)
            module.set_parameters(fit.weights, fit.means, fit.covariances)
            return {"init": "em"}
        return {"init": "kmeans++"}

    def metrics(self, module: Any, train: Any, test: Any, run: RunConfig) -> dict[str, Any]:
        """Exact test log-likelihood of the SVI fit and of EM's (same reg), and label agreement on the test set."""
        from sklearn.metrics import adjusted_rand_score

        fit = self._em(train, run) if run.options.em_reference else None
        x = test.data.to(next(module.parameters()).device)
        with torch.no_grad():
            out = {"exact_test_log_likelihood": float(module.log_marginal(x).mean())}
            if fit is not None:
                out.update(
                    em_test_log_likelihood=float(fit.log_marginal(test.data).mean()),
                    em_train_log_likelihood=fit.log_likelihood,
                    em_iterations=fit.n_iter,
                    em_converged=fit.converged,
                )
            if test.y is not None:
                pred = module.predict(x).cpu().numpy()
                out["test_ari"] = float(adjusted_rand_score(test.y.numpy(), pred))
                if fit is not None:
                    out["em_test_ari"] = float(adjusted_rand_score(test.y.numpy(),
                                                                   fit.predict(test.data).cpu().numpy()))
        return out

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> list[Any]:
        """The component means as images (when the data are images)."""
        shape = train.image_shape
        if shape is None or len(shape) != 3:
            return []
        means = module.means.detach().clamp(0, 1)
        nrow = min(10, means.shape[0])
        save_image_grid(means, shape, run_dir / "means.png", nrow=nrow, title="component means")
        return ["means.png"]


RECIPE = GMMRecipe()
