"""Variational bounds side by side, and against models whose log p(x) is exact.

Table 1 (VAE). The *same* VAE (network, data, seed, epochs, optimiser, batch
size) is trained once per objective: ``trace`` (ELBO, Monte Carlo KL),
``meanfield`` (ELBO, analytic KL), ``iwae:5``, ``iwae:50`` (Burda et al. 2015)
and ``renyi:0.5:5`` (Li & Turner 2016). For each: the test ELBO and the test
log-likelihood estimated by importance sampling with the trained guide (K=5000
on MNIST, K=1000 otherwise; the IWAE_K estimate, a stochastic lower bound), the
PSIS k-hat summary of those test importance weights (Yao et al. 2018), the
ELBO-IWAE gap (test log-likelihood minus test ELBO, the part of log p(x) the
guide misses), seconds
per training epoch, and the gradient signal-to-noise ratio of encoder and
decoder parameters on a fixed minibatch at the end of training (Rainforth et al.
2018). ``--guide diag iaf:2`` trains one VAE per (objective, guide): the
diagonal Gaussian guide and normalising-flow guides (:mod:`ppl_models.flows`;
inverse autoregressive flow, Kingma et al. 2016); every guide after the first is
compared with the first on the same test points (the paired difference of
per-point log-likelihoods and its standard error).

Table 2 (exact references). A probabilistic PCA fitted by SVI (trace ELBO,
diagonal linear guide) and a diagonal GMM fitted by EM, both on the same
training data: each bound's test value and standard error (over test points),
the exact test log p(x), the gap and the standard error of the paired gap. For
pPCA: the ELBO and IWAE_K for K = 1, 10, 100, 1000. For the GMM: Pyro's
enumerated ELBO (``"enum"``: c summed out, so it must equal the exact value) and
importance sampling with the prior over c as proposal (IWAE_K, K = 1..1000).

Usage::

    python -m benchmarks.bounds --quick        # digits, CPU, a few minutes
    python -m benchmarks.bounds --dataset mnist --data-root /work/shared/data --binarize dynamic \\
        --hidden 200 200 --latent-dim 50 --epochs 100 --elbos trace iwae:50
    python -m benchmarks.bounds --dataset digits --elbos trace --guide diag iaf:2 --skip-exact

Writes ``<name>.json``, ``<name>.md``, ``<name>-ppca.png`` (bound against K on
pPCA) and ``<name>-curves.png`` (training curves per objective) into ``--out``.
"""

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import pyro
import torch

from benchmarks.common import RESULTS, environment, machine_tag, markdown_table, start, write_results
from inference import evaluate, fit, gradient_snr, khat_summary, make_elbo, psis_khat
from inference.errors import UsageError
from ppl_models.data import BINARIZE, load_dataset
from ppl_models.flows import parse_guide
from ppl_models.gmm import GMM, em
from ppl_models.ppca import PPCA
from ppl_models.vae import VAE

ELBOS = ("trace", "meanfield", "iwae:5", "iwae:50", "renyi:0.5:5")
IWAE_KS = (1, 10, 100, 1000)
SNR_GROUPS = {"encoder": ("encoder_body", "encoder_head", "flow"), "decoder": ("decoder", "likelihood")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits on the CPU, 1 thread, small budget (< 5 minutes)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--binarize", choices=BINARIZE, default="dynamic")
    p.add_argument("--epochs", type=int, default=None, help="VAE epochs per objective (default 50 quick, 100)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="file stem (default bounds-<dataset>[-quick]-<machine>)")
    p.add_argument("--elbos", nargs="+", default=list(ELBOS))
    p.add_argument("--guide", nargs="+", default=["diag"],
                   help="guides of q(z|x): diag, iaf:K, spline:K (one VAE per objective and guide)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP widths (default 128 128; 200 200 on MNIST)")
    p.add_argument("--latent-dim", type=int, default=None, help="default 10; 50 on MNIST")
    p.add_argument("--activation", default="tanh", help="tanh as in Burda et al. 2015")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-particles", type=int, default=None, help="K for the test log-likelihood (5000 MNIST, 1000)")
    p.add_argument("--snr-samples", type=int, default=100, help="gradient draws for the SNR")
    p.add_argument("--ppca-latent", type=int, default=8)
    p.add_argument("--ppca-epochs", type=int, default=None, help="default 100 (digits), 10 (larger data)")
    p.add_argument("--gmm-clusters", type=int, default=10)
    p.add_argument("--gmm-reg", type=float, default=1e-2, help="EM variance floor (binary pixels that never vary)")
    p.add_argument("--skip-exact", action="store_true", help="only the VAE table")
    p.add_argument("--limit", type=int, nargs=2, metavar=("N_TRAIN", "N_TEST"), default=None,
                   help="use only the first N_TRAIN / N_TEST points (smoke runs; recorded in the JSON)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --quick)")
    args = p.parse_args(argv)
    large = args.dataset != "digits"
    if args.quick:
        if args.dataset != "digits":
            raise UsageError("--quick runs on digits")
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1
    args.epochs = args.epochs or (50 if args.quick else 100)
    args.hidden = args.hidden or ([200, 200] if large else [128, 128])
    args.latent_dim = args.latent_dim or (50 if large else 10)
    args.eval_particles = args.eval_particles or (5000 if large else 1000)
    args.ppca_epochs = args.ppca_epochs or (10 if large else 100)
    for spec in args.elbos:
        make_elbo(spec, max_plate_nesting=1)  # unknown specs fail before any training
    for spec in args.guide:
        parse_guide(spec)
    return args


def _head(split, n):
    """The first n points of a DataSplit (every per-point tensor cut alike)."""
    cut = lambda t: None if t is None else t[:n]  # noqa: E731
    return replace(split, x=cut(split.x), y=cut(split.y), grey=cut(split.grey))


# ---- table 1: one VAE per objective --------------------------------------------------
def run_vae(spec, train, test, args, device, guide="diag"):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(train.dim, latent_dim=args.latent_dim, hidden=args.hidden, likelihood="bernoulli",
              activation=args.activation, guide=guide)
    result = fit(vae, train, elbo=spec, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                 seed=args.seed, validation=test, progress=False, validate=False)
    snr_batch = test.data[: args.batch_size].to(device)
    pyro.set_rng_seed(args.seed)
    with pyro.validation_enabled(False):
        snr = gradient_snr(vae, make_elbo(spec, max_plate_nesting=1), snr_batch, samples=args.snr_samples,
                           groups=SNR_GROUPS)
    pyro.set_rng_seed(args.seed)
    t0 = time.perf_counter()
    ev = evaluate(vae, test.to(device), particles=args.eval_particles, keep_log_weights=True)
    eval_seconds = time.perf_counter() - t0
    khat = khat_summary(psis_khat(ev.log_weights))
    seconds = [h["seconds"] for h in result.history]
    return {
        "elbo": spec,
        "guide": guide,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "test_elbo": ev.elbo,
        "test_elbo_se": ev.elbo_se,
        "test_log_likelihood": ev.log_likelihood,
        "test_log_likelihood_se": ev.log_likelihood_se,
        "elbo_iwae_gap": ev.log_likelihood - ev.elbo,
        "elbo_iwae_gap_se": float((ev.log_likelihood_per_point - ev.elbo_per_point).double().std()
                                  / math.sqrt(ev.log_likelihood_per_point.numel())),
        "eval_particles": ev.particles,
        "seconds_per_epoch": sum(seconds) / len(seconds),
        "eval_seconds": eval_seconds,
        **khat,
        "snr_encoder": snr["encoder"]["snr_mean"],
        "snr_decoder": snr["decoder"]["snr_mean"],
        "snr_encoder_median": snr["encoder"]["snr_median"],
        "snr_decoder_median": snr["decoder"]["snr_median"],
        "final_train_loss": result.history[-1]["train_loss"],
        "history": result.history,
        "_log_likelihood_per_point": ev.log_likelihood_per_point.detach().cpu().double(),
    }


def compare_guides(results):
    """Each guide after the first against the first, per objective: paired test log-likelihood difference and SE."""
    rows = []
    for spec in dict.fromkeys(r["elbo"] for r in results):
        same = [r for r in results if r["elbo"] == spec]
        for r in same[1:]:
            diff = r["_log_likelihood_per_point"] - same[0]["_log_likelihood_per_point"]
            se = float(diff.std() / math.sqrt(diff.numel()))
            rows.append({"elbo": spec, "guide": r["guide"], "baseline": same[0]["guide"],
                         "log_likelihood_gain": float(diff.mean()), "gain_se": se,
                         "gain_in_se": float(diff.mean()) / se if se > 0 else float("nan"),
                         "gap_change": r["elbo_iwae_gap"] - same[0]["elbo_iwae_gap"]})
    return rows


# ---- table 2: exact references ---------------------------------------------------------
def _row(model, bound, per_point, exact_per_point, **extra):
    n = per_point.numel()
    gap = per_point.double() - exact_per_point.double()
    return {
        "model": model,
        "bound": bound,
        "value": float(per_point.mean()),
        "stderr": float(per_point.std() / math.sqrt(n)),
        "exact": float(exact_per_point.mean()),
        "gap": float(gap.mean()),
        "gap_stderr": float(gap.std() / math.sqrt(n)),
        **extra,
    }


def run_ppca(train, test, args, device):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    ppca = PPCA(train.dim, args.ppca_latent, guide="diag")
    t0 = time.perf_counter()
    result = fit(ppca, train.data, elbo="trace", epochs=args.ppca_epochs, batch_size=args.batch_size, lr=3e-3,
                 device=device, seed=args.seed, progress=False, validate=False)
    x = test.data.to(device)
    with torch.no_grad():
        exact = ppca.log_marginal(x).cpu()
    rows = []
    pyro.set_rng_seed(args.seed)
    ev = evaluate(ppca, x, particles=max(IWAE_KS))
    rows.append(_row("ppca", "elbo", ev.elbo_per_point, exact, particles=ev.particles))
    for k in IWAE_KS:
        ev = evaluate(ppca, x, particles=k)
        rows.append(_row("ppca", f"iwae:{k}", ev.log_likelihood_per_point, exact, particles=k))
    info = {"latent_dim": args.ppca_latent, "epochs": args.ppca_epochs, "fit_seconds": time.perf_counter() - t0,
            "sigma": float(ppca.sigma.detach()), "final_train_loss": result.history[-1]["train_loss"]}
    return rows, info


def run_gmm(train, test, args, device):
    t0 = time.perf_counter()
    x_train = train.data.to(device)
    fit_em = em(x_train, args.gmm_clusters, covariance="diag", restarts=3, reg=args.gmm_reg, seed=args.seed)
    gmm = GMM.from_em(fit_em).to(device)
    x = test.data.to(device)
    with torch.no_grad():
        exact = gmm.log_marginal(x).cpu()
    rows = []
    # Pyro's enumerated ELBO, one test point at a time (per-point values for the SE and the paired gap)
    elbo = make_elbo("enum", max_plate_nesting=1)
    with torch.no_grad():
        enum_pp = torch.tensor([-elbo.loss(gmm.model, gmm.guide, x[i : i + 1]) for i in range(x.shape[0])],
                               dtype=torch.float64)
    rows.append(_row("gmm", "enum (c summed out)", enum_pp, exact))
    gmm.proposal = "prior"
    pyro.set_rng_seed(args.seed)
    for k in IWAE_KS:
        ev = evaluate(gmm, x, particles=k)
        rows.append(_row("gmm", f"iwae:{k} (prior proposal)", ev.log_likelihood_per_point, exact, particles=k))
    gmm.proposal = "exact"
    info = {"clusters": args.gmm_clusters, "reg": args.gmm_reg, "em_iterations": fit_em.n_iter,
            "em_converged": fit_em.converged, "em_train_log_likelihood": fit_em.log_likelihood,
            "fit_seconds": time.perf_counter() - t0}
    return rows, info


# ---- figures ------------------------------------------------------------------------------
def plot_ppca(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iw = [r for r in rows if r["model"] == "ppca" and r["bound"].startswith("iwae:")]
    elbo = next(r for r in rows if r["model"] == "ppca" and r["bound"] == "elbo")
    ks = [r["particles"] for r in iw]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(ks, [r["gap"] for r in iw], yerr=[3 * r["gap_stderr"] for r in iw], marker="o", capsize=3,
                label="IWAE_K - log p(x) (3 SE)")
    ax.axhline(elbo["gap"], color="C1", ls="--", label=f"ELBO - log p(x) = {elbo['gap']:.3f}")
    ax.axhline(0.0, color="k", lw=0.8, label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("bound - exact (nats, test mean)")
    ax.set_title("pPCA: bounds against K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(r):
    return r["elbo"] if r.get("guide", "diag") == "diag" else f"{r['elbo']}, {r['guide']} guide"


def plot_curves(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        epochs = [h["epoch"] for h in r["history"]]
        axes[0].plot(epochs, [h["train_loss"] for h in r["history"]], label=_label(r))
        axes[1].plot(epochs, [h["val_elbo"] for h in r["history"]], label=_label(r))
    axes[0].set_ylabel("training loss (-objective per point)")
    axes[1].set_ylabel("test ELBO (1 particle per point)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle("VAE training curves per objective")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


VAE_COLUMNS = ["elbo", "guide", "test_elbo", "test_log_likelihood", "test_log_likelihood_se", "elbo_iwae_gap",
               "khat_below_0_5", "khat_0_5_to_0_7", "khat_above_0_7",
               "seconds_per_epoch", "snr_encoder", "snr_decoder"]
GUIDE_COLUMNS = ["elbo", "guide", "baseline", "log_likelihood_gain", "gain_se", "gain_in_se", "gap_change"]
EXACT_COLUMNS = ["model", "bound", "value", "stderr", "exact", "gap", "gap_stderr"]


def checks(exact_rows):
    """The issue's acceptance checks on pPCA: every bound <= exact + 3 SE (of the paired gap), IWAE_1000 within 0.5."""
    ppca = [r for r in exact_rows if r["model"] == "ppca"]
    if not ppca:
        return {}
    iw1000 = next(r for r in ppca if r["bound"] == "iwae:1000")
    return {
        "ppca_bounds_below_exact_plus_3se": all(r["gap"] <= 3 * r["gap_stderr"] for r in ppca),
        "ppca_iwae1000_within_0.5_nats": abs(iw1000["gap"]) <= 0.5,
    }


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    t_start = time.perf_counter()
    train, test = load_dataset(args.dataset, data_root=args.data_root, binarize=args.binarize)
    if args.limit:
        train, test = _head(train, args.limit[0]), _head(test, args.limit[1])
    name = args.name or f"bounds-{train.name}{'-quick' if args.quick else ''}-{machine_tag(device)}"
    out = Path(args.out)
    results = []
    for spec in args.elbos:
        for guide in args.guide:
            t0 = time.perf_counter()
            results.append(run_vae(spec, train, test, args, device, guide=guide))
            print(f"[{spec}, {guide}] done in {time.perf_counter() - t0:.1f} s: test log-likelihood "
                  f"{results[-1]['test_log_likelihood']:.3f} +- {results[-1]['test_log_likelihood_se']:.3f}", flush=True)
    guide_rows = compare_guides(results)
    for r in results:
        del r["_log_likelihood_per_point"]
    exact_rows, exact_info = [], {}
    if not args.skip_exact:
        rows, exact_info["ppca"] = run_ppca(train, test, args, device)
        exact_rows += rows
        rows, exact_info["gmm"] = run_gmm(train, test, args, device)
        exact_rows += rows
    total = time.perf_counter() - t_start
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    record = {
        "benchmark": "bounds",
        "compares": "the same VAE (network, data, seed, epochs, optimiser, batch size) trained with each objective; "
                    "bounds of pPCA and a GMM against their exact log p(x) on the same data",
        "environment": environment(device),
        "machine": machine_tag(device),
        "seed": args.seed,
        "settings": settings,
        "dataset": {"name": train.name, "n_train": len(train), "n_test": len(test), "binarize": args.binarize},
        "results": results,
        "guide_comparison": guide_rows,
        "exact": exact_rows,
        "exact_models": exact_info,
        "checks": checks(exact_rows),
        "total_seconds": total,
    }
    header = (
        f"# Bounds on {train.name} ({args.binarize} binarisation), {machine_tag(device)}\n\n"
        f"VAE {train.dim}-{'-'.join(map(str, args.hidden))}-{args.latent_dim} ({args.activation}), Bernoulli "
        f"likelihood, Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; "
        f"test log-likelihood by importance sampling with K={args.eval_particles}; gradient SNR = mean over "
        f"parameters of |E g| / sd g over {args.snr_samples} draws on one test minibatch. Total {total:.0f} s.\n"
    )
    table1 = markdown_table(results, VAE_COLUMNS)
    text = header + "\n## Table 1: one VAE per objective\n\n" + table1 + "\n"
    if guide_rows:
        text += ("\n## Guides against the first guide (paired over test points)\n\n"
                 + markdown_table(guide_rows, GUIDE_COLUMNS) + "\n")
    if exact_rows:
        table2 = markdown_table(exact_rows, EXACT_COLUMNS, floatfmt="{:.4f}")
        text += (
            "\n## Table 2: bounds against exact log p(x) (test means; stderr over points, gap_stderr of the paired gap)\n\n"
            f"pPCA L={args.ppca_latent} fitted by SVI (trace, diagonal guide, {args.ppca_epochs} epochs); "
            f"GMM K={args.gmm_clusters} diagonal fitted by EM (variance floor {args.gmm_reg}).\n\n"
            + table2 + "\n\nChecks: " + ", ".join(f"{k}={v}" for k, v in record["checks"].items()) + "\n"
        )
    write_results(out, name, record, text)
    if exact_rows:
        plot_ppca(exact_rows, out / f"{name}-ppca.png")
    plot_curves(results, out / f"{name}-curves.png")
    print(text)
    print(f"wrote {out / name}.json/.md/-ppca.png/-curves.png in {total:.0f} s")
    return record


if __name__ == "__main__":
    main()
