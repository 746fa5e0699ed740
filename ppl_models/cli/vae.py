"""``pplm train vae``."""

from inference.plots import save_image_grid

from ..vae import VAE
from .base import ModelCommand, positive_float, positive_int, register


@register
class VAECommand(ModelCommand):
    name = "vae"
    help = "variational autoencoder (Bernoulli, continuous-Bernoulli, Normal or Laplace likelihood; beta weight)"
    default_binarize = "dynamic"
    default_epochs = 200
    default_batch_size = 64

    def add_arguments(self, p):
        p.add_argument("--likelihood", default="bernoulli", help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")
        p.add_argument("--latent-dim", type=positive_int, default=16)
        p.add_argument("--hidden", type=positive_int, nargs="+", default=[256], help="MLP hidden widths")
        p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
        p.add_argument("--beta", type=positive_float, default=1.0, help="KL weight (beta != 1 is not a bound on log p(x))")

    def build(self, args, train):
        return VAE(
            train.dim,
            latent_dim=args.latent_dim,
            hidden=args.hidden,
            likelihood=args.likelihood,
            beta=args.beta,
            arch=args.arch,
            image_shape=train.image_shape,
        )

    def rebuild(self, config):
        return VAE.from_config(config["module"])

    def figures(self, run_dir, module, train, test, args):
        shape = train.image_shape
        samples = module.sample(100)
        save_image_grid(samples, shape, run_dir / "samples.png", nrow=10, title="samples from the prior (E[x|z])")
        x = test.data[:50].to(samples.device)
        recon = module.reconstruct(x)
        rows = [t for i in range(0, 50, 10) for t in (x[i : i + 10], recon[i : i + 10])]
        import torch

        save_image_grid(torch.cat(rows), shape, run_dir / "reconstructions.png", nrow=10,
                        title="test images (odd rows) and reconstructions (even rows)")
        return ["samples.png", "reconstructions.png"]
