"""Disentanglement against beta: beta-VAEs on the sprites set, scored by MIG and the beta-VAE metric.

For each beta (default 1, 2, 4, 8; Higgins et al. 2017) and seed, the same VAE
(MLP encoder/decoder, Bernoulli likelihood, diagonal Gaussian guide) is
trained on the sprites training split (:mod:`ppl_models.sprites`: shape, scale,
rotation, x, y on a full factorial grid) with the beta-weighted ELBO. Reported
per run, with codes = posterior means of all 6,144 sprites:

* MIG (Chen et al. 2018) and its per-factor gaps; the beta-VAE metric
  (Higgins et al. 2017; chance 0.2) (:mod:`inference.disentanglement`);
* on the test split: reconstruction E_q[log p(x | z)] (nats per image, 16
  draws), KL(q(z | x) || p(z)) (closed form) and their difference, the plain
  (beta = 1) ELBO; the number of active dimensions (Burda et al. 2015).

Usage::

    python -m benchmarks.disentanglement --threads 1            # 4 betas, a few minutes on a CPU
    python -m benchmarks.disentanglement --betas 1 4 --seeds 0 1 --epochs 50

Writes ``<name>.json``, ``<name>.md``, ``<name>.png`` (MIG, reconstruction and
KL against beta) and ``<name>-traversals.png`` (the best-MIG model's traversals).
"""

import argparse
import time
from pathlib import Path

import pyro
import torch

from benchmarks.common import RESULTS, environment, machine_tag, markdown_table, start, write_results
from inference import fit
from inference.disentanglement import beta_vae_score, mig
from inference.latent import ACTIVE_THRESHOLD, activity, traversal_codes
from inference.plots import save_labelled_grid
from ppl_models.sprites import FACTOR_NAMES, load_sprites_arrays, make_sprites
from ppl_models.vae import VAE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="file stem (default disentanglement-sprites-<machine>)")
    return p.parse_args(argv)


@torch.no_grad()
def test_terms(vae, x, draws=16):
    """Per-image means over ``x``: reconstruction E_q[log p(x|z)] (``draws`` samples) and the closed-form KL."""
    q = vae.encode(x)
    z = q.rsample((draws,))
    recon = vae.decode(z).log_prob(x).mean(0)
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(q.mean), 1.0), 1)
    kl = torch.distributions.kl_divergence(q, prior)
    return float(recon.mean()), float(kl.mean())


def run_one(beta, seed, data, args, device):
    x_tr, x_te, x_all, f_all = data
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(x_tr.shape[1], latent_dim=args.latent_dim, hidden=args.hidden, likelihood="bernoulli", beta=beta)
    t0 = time.perf_counter()
    result = fit(vae, x_tr, elbo="trace", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                 seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    vae.eval()
    recon, kl = test_terms(vae, x_te.to(device))
    with torch.no_grad():
        codes = torch.cat([vae.encode(x_all[i : i + 1024].to(device)).mean for i in range(0, len(x_all), 1024)]).cpu()
    m = mig(codes, f_all)
    b = beta_vae_score(codes, f_all, seed=seed)
    act = activity(codes)
    row = {
        "beta": beta, "seed": seed, "mig": m["mig"], "beta_vae_accuracy": b["accuracy"],
        "test_reconstruction": recon, "test_kl": kl, "test_elbo": recon - kl,
        "active_dims": int((act > ACTIVE_THRESHOLD).sum()), "train_seconds": seconds,
        "final_train_loss": result.history[-1]["train_loss"],
        **{f"gap_{name}": float(g) for name, g in zip(FACTOR_NAMES, m["per_factor"])},
        "mutual_information": m["mutual_information"].tolist(), "activity": act.tolist(),
    }
    return row, vae, codes


def plot_sweep(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted({r["beta"] for r in rows})

    def mean_of(key):
        return [sum(r[key] for r in rows if r["beta"] == b) / sum(1 for r in rows if r["beta"] == b) for b in betas]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for r in rows:
        axes[0].plot(r["beta"], r["mig"], "o", color="C0", alpha=0.4)
    axes[0].plot(betas, mean_of("mig"), "-o", color="C0", label="MIG")
    axes[0].plot(betas, mean_of("beta_vae_accuracy"), "-s", color="C1", label="beta-VAE metric (chance 0.2)")
    axes[0].set_ylabel("score")
    axes[0].set_title("Disentanglement against beta")
    axes[0].legend(fontsize=8)
    axes[1].plot(betas, mean_of("test_reconstruction"), "-o", color="C2")
    axes[1].set_ylabel("E_q[log p(x|z)] (nats per image)")
    axes[1].set_title("Test reconstruction")
    axes[2].plot(betas, mean_of("test_kl"), "-o", color="C3")
    axes[2].set_ylabel("KL(q(z|x) || p(z)) (nats per image)")
    axes[2].set_title("Test KL")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.set_xlabel("beta")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    t_start = time.perf_counter()
    x_tr, _, x_te, _, _, _ = load_sprites_arrays(0)
    x_all, f_all = make_sprites(0)  # all 6,144 sprites (test split first, then train)
    data = (torch.from_numpy(x_tr), torch.from_numpy(x_te), torch.from_numpy(x_all), f_all)
    rows, best = [], None
    for beta in args.betas:
        for seed in args.seeds:
            row, vae, codes = run_one(beta, seed, data, args, device)
            rows.append(row)
            print(f"[beta {beta:g}, seed {seed}] MIG {row['mig']:.3f}, beta-VAE {row['beta_vae_accuracy']:.3f}, "
                  f"recon {row['test_reconstruction']:.2f}, KL {row['test_kl']:.2f}, {row['active_dims']} active, "
                  f"{row['train_seconds']:.0f} s", flush=True)
            if best is None or row["mig"] > best[0]["mig"]:
                best = (row, vae, codes)
    name = args.name or f"disentanglement-sprites-{machine_tag(device)}"
    out = Path(args.out)
    total = time.perf_counter() - t_start
    record = {
        "benchmark": "disentanglement",
        "compares": "beta-VAEs (same network, data, epochs, optimiser) on the sprites set for each beta: MIG, the "
                    "beta-VAE metric, test reconstruction and KL",
        "environment": environment(device), "machine": machine_tag(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
        "dataset": {"name": "sprites", "n_train": len(x_tr), "n_test": len(x_te), "factors": list(FACTOR_NAMES),
                    "scored_on": "all 6,144 sprites (posterior means)"},
        "results": rows, "total_seconds": total,
    }
    columns = ["beta", "seed", "mig", "beta_vae_accuracy", "test_reconstruction", "test_kl", "test_elbo",
               "active_dims", *[f"gap_{n}" for n in FACTOR_NAMES], "train_seconds"]
    text = (f"# Disentanglement against beta on sprites, {machine_tag(device)}\n\n"
            f"VAE 1024-{'-'.join(map(str, args.hidden))}-{args.latent_dim} (ReLU MLP), Bernoulli likelihood, diagonal "
            f"guide, beta-weighted trace ELBO, Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs on "
            f"{len(x_tr)} training sprites; MIG (20-bin histograms) and the beta-VAE metric (1000/500 votes of 64 "
            f"pairs, chance 0.2) on the posterior means of all 6,144 sprites; reconstruction and KL in nats per test "
            f"image. gap_F: the normalised MI gap of factor F. Total {total:.0f} s.\n\n"
            + markdown_table(rows, columns) + "\n")
    write_results(out, name, record, text)
    plot_sweep(rows, out / f"{name}.png")
    row, vae, codes = best
    act = torch.tensor(row["activity"])
    dims = torch.argsort(act, descending=True)[:6].tolist()
    values = torch.linspace(-3, 3, 11)
    with torch.no_grad():
        images = vae.decode(traversal_codes(codes[0].to(device), dims, values.to(device))).mean.cpu()
    save_labelled_grid(images, (1, 32, 32), out / f"{name}-traversals.png",
                       row_labels=[f"z{d + 1} (A={act[d]:.2g})" for d in dims],
                       col_labels=[f"{v:+.1f}" for v in values.tolist()],
                       xlabel="value given to the row's dimension (the others keep sprite 0's code)",
                       title=f"Traversals of the best-MIG model (beta {row['beta']:g}, seed {row['seed']}, "
                             f"MIG {row['mig']:.2f}), most active dimensions first")
    print(text)
    print(f"wrote {out / name}.json/.md/.png/-traversals.png in {total:.0f} s")
    return record


if __name__ == "__main__":
    main()
