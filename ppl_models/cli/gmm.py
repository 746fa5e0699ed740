"""``pplm train gmm --clusters K``: a Gaussian mixture trained by SVI with enumerated assignments."""

from inference.errors import UsageError

from ..gmm import GMM, em
from .base import ModelCommand, positive_float, positive_int, register


@register
class GMMCommand(ModelCommand):
    name = "gmm"
    help = "Gaussian mixture (diag or full covariance), assignments summed out exactly; EM reference in metrics"
    default_elbo = "enum"
    default_epochs = 100
    default_batch_size = 256
    default_lr = 0.01

    def add_arguments(self, p):
        p.add_argument("--clusters", type=positive_int, default=10, help="number of mixture components K")
        p.add_argument("--covariance", choices=("diag", "full"), default="diag")
        p.add_argument("--min-scale", type=positive_float, default=0.05,
                       help="floor on component standard deviations (keeps constant pixels from dominating)")
        p.add_argument("--init", choices=("kmeans++", "em"), default="kmeans++",
                       help="start from EM's starting point (k-means++ means, pooled variances) or from EM's fit")
        p.add_argument("--em-restarts", type=positive_int, default=3, help="EM restarts for the reference fit")

    def check_args(self, args):
        spec = args.elbo.split(":")[0]
        if spec != "enum":
            raise UsageError(f"the GMM sums its assignments out by enumeration: use --elbo enum (got {args.elbo!r})")

    def build(self, args, train):
        x = train.data
        if args.clusters > x.shape[0]:
            raise UsageError(f"--clusters {args.clusters} exceeds the {x.shape[0]} training points")
        gmm = GMM(x.shape[1], args.clusters, args.covariance, min_scale=args.min_scale)
        return gmm.initialize(x, seed=args.seed)

    def rebuild(self, config):
        return GMM.from_config(config["module"])

    def _em(self, train, args):
        if not hasattr(self, "_em_cache") or self._em_cache[0] != id(train):
            fit = em(train.data, args.clusters, covariance=args.covariance, restarts=args.em_restarts,
                     reg=args.min_scale**2, seed=args.seed)
            self._em_cache = (id(train), fit)
        return self._em_cache[1]

    def before_fit(self, module, train, args, device):
        if args.init == "em":
            fit = self._em(train, args)
            module.set_parameters(fit.weights, fit.means, fit.covariances)
            return {"init": "em"}
        return {"init": "kmeans++"}

    def metrics(self, module, train, test, args):
        """Exact test log-likelihood of the SVI fit and of EM's (same reg), and label agreement on the test set."""
        import torch
        from sklearn.metrics import adjusted_rand_score

        fit = self._em(train, args)
        x = test.data.to(next(module.parameters()).device)
        with torch.no_grad():
            out = {
                "exact_test_log_likelihood": float(module.log_marginal(x).mean()),
                "em_test_log_likelihood": float(fit.log_marginal(test.data).mean()),
                "em_train_log_likelihood": fit.log_likelihood,
                "em_iterations": fit.n_iter,
                "em_converged": fit.converged,
            }
            if test.y is not None:
                pred = module.predict(x).cpu().numpy()
                out["test_ari"] = float(adjusted_rand_score(test.y.numpy(), pred))
                out["em_test_ari"] = float(adjusted_rand_score(test.y.numpy(), fit.predict(test.data).cpu().numpy()))
        return out

    def figures(self, run_dir, module, train, test, args):
        """The component means as images (when the data are images)."""
        from inference.plots import save_image_grid

        shape = train.image_shape
        if shape is None or len(shape) != 3:
            return []
        means = module.means.detach().clamp(0, 1)
        nrow = min(10, means.shape[0])
        save_image_grid(means, shape, run_dir / "means.png", nrow=nrow, title="component means")
        return ["means.png"]
