"""Clustering benchmark: VaDE against k-means and a GMM on pixels, and a GMM on a plain VAE's codes.

    python -m benchmarks.clustering --quick                     # digits, CPU, 5 seeds, < 10 minutes
    python -m benchmarks.clustering --dataset mnist --data-root ../shared/data --seeds 5 --methods vade --threads 1
                                          # the committed MNIST result (one CPU thread)
    python -m benchmarks.clustering --dataset mnist --data-root ../shared/data --device cuda --seeds 5

What is compared, per seed, on the same data:

* ``vade``: :class:`ppl_models.vade.VaDE` with :func:`ppl_models.vade_init.initialise` (autoencoder
  pretraining for ``--pretrain-epochs``, then the mixture from ``--init``: ``tsne``
  (default) fits a full GMM with ``--restarts`` restarts in a 2-D t-SNE map of the
  inputs (digits) or of the codes (MNIST), ``--embed`` to choose, and moves it to
  the latent space by one M-step, then ``--align-epochs`` of
  :func:`ppl_models.vade_init.align` (on by default for MNIST); ``gmm`` is the
  paper's diagonal GMM on the codes), then the encoder's scale head set by
  :func:`ppl_models.vade_init.init_scale_head` (``--no-scale-head`` skips it),
  then ``--epochs`` of SVI at ``--svi-lr``, with the mixture trained or, with
  ``--svi-mixture fixed`` (MNIST's default), kept as initialised
  (:meth:`ppl_models.vade.VaDE.freeze_mixture`); clusters = argmax q(c | x).
  Pretraining (and alignment) use ``--pretrain-batch-size``,
  ``--pretrain-lr`` and ``--precision`` (default: bfloat16 mixed precision
  where the hardware has it, float32 otherwise; SVI is float32); on MNIST 5% of the points are held out of the
  pretraining and it stops early (``--pretrain-patience``) when their
  reconstruction stops improving. The record holds, per seed, the ACC right
  after initialisation, the training ELBO per point before and after SVI
  (one particle per point, the same random stream) and each stage's seconds.
  With ``--candidates R`` (default 1) R initialisations are each trained for
  ``--select-epochs`` of SVI and the one with the highest training ELBO is kept
  and trained on (its selection epochs count in ``--epochs``); no labels are used.
* ``vae-gmm``: a plain :class:`ppl_models.vae.VAE` with the same encoder, decoder,
  likelihood, latent size, batch size and learning rate, trained by SVI for
  ``--pretrain-epochs + --epochs`` epochs (VaDE's pretraining plus SVI passes),
  then the same diagonal GMM (same restarts) on its latent means.
* ``kmeans-pixels``: scikit-learn's k-means on the pixels (10 k-means++ restarts).
* ``gmm-pixels``: our EM (:func:`ppl_models.gmm.em`, diagonal covariances,
  ``--restarts`` restarts, ridge ``--pixel-reg`` on every variance, since many
  pixels are nearly constant) on the pixels.
* ``tsne-gmm-pixels``: VaDE's t-SNE initialiser alone on the pixels (t-SNE map of
  every point, full GMM), so the table shows what SVI adds to it; not run by
  default on MNIST (t-SNE of 70,000 images) nor with ``--fit-on train``.

Every method sees the same points: by default all of them, train and test
together (``--fit-on all``; clustering is transductive, and the VaDE paper trains
and scores on all 70,000 MNIST images); ``--fit-on train`` fits on the training
split and scores the test split. Scores: unsupervised accuracy (Hungarian
matching), NMI and ARI from :mod:`inference.metrics`; seconds are wall-clock
for the whole method (pretraining and initialisation included).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

from benchmarks.common import RESULTS, environment, machine_tag, markdown_table, start, write_results
from inference import evaluate, fit
from inference.errors import UsageError
from inference.metrics import clustering_scores
from ppl_models.data import load_dataset
from ppl_models.gmm import em
from ppl_models.vade import VaDE
from ppl_models.vade_init import fit_diag_gmm, initialise, tsne_map
from ppl_models.vae import VAE

METHODS = ("vade", "vae-gmm", "kmeans-pixels", "gmm-pixels", "tsne-gmm-pixels")

# per-dataset defaults (the --quick budget is the digits row). stage_compile: fit's ``compile`` for VaDE's pretraining
# and alignment; on MNIST "flat", because fit's own choice builds and times an inductor graph for a 20-epoch
# pretraining (~35 s here) that then runs no faster than the flat or eager loss (results/clustering-mnist-*.md)
DEFAULTS = {
    "digits": dict(hidden=[256, 256], latent_dim=10, epochs=150, pretrain_epochs=50, batch_size=64, lr=2e-3,
                   likelihood="normal:0.3", init="tsne", embed="inputs", align_epochs=0, methods=",".join(METHODS),
                   pretrain_batch_size=64, pretrain_lr=1e-3, pretrain_validation=0.0, pretrain_patience=None,
                   svi_mixture="trained", svi_lr=2e-3, embed_points=10000, tsne_iterations=1000, scale_points=5000,
                   stage_compile=None),
    "mnist": dict(hidden=[500, 500, 2000], latent_dim=10, epochs=1, pretrain_epochs=19, batch_size=256, lr=5e-4,
                  likelihood="normal:0.3", init="tsne", embed="codes", align_epochs=1,
                  methods="vade,vae-gmm,kmeans-pixels,gmm-pixels",
                  pretrain_batch_size=256, pretrain_lr=1e-3, pretrain_validation=0.05, pretrain_patience=2,
                  svi_mixture="fixed", svi_lr=5e-5, embed_points=10000, tsne_iterations=750, scale_points=2000,
                  stage_compile="flat"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.clustering", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", help="digits | mnist | fashion-mnist | path.npz (default digits)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for mnist / fashion-mnist)")
    p.add_argument("--seeds", default="5", help="a count N (seeds 0..N-1) or a comma list (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="SVI epochs of VaDE (dataset default otherwise)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="autoencoder pretraining epochs")
    p.add_argument("--batch-size", type=int, default=None, help="SVI batch size")
    p.add_argument("--pretrain-batch-size", type=int, default=None, help="batch size of pretraining and alignment")
    p.add_argument("--pretrain-lr", type=float, default=None, help="learning rate of pretraining and alignment")
    p.add_argument("--pretrain-validation", type=float, default=None,
                   help="fraction held out of the pretraining to watch its reconstruction (early stopping)")
    p.add_argument("--pretrain-patience", type=int, default=None,
                   help="stop pretraining after this many epochs without a held-out improvement above "
                        "--pretrain-min-delta (needs --pretrain-validation)")
    p.add_argument("--pretrain-min-delta", type=float, default=0.0, help="nats per point (early stopping)")
    p.add_argument("--svi-lr", type=float, default=None,
                   help="learning rate of VaDE's SVI after initialisation (default: 2e-3 digits, 5e-5 MNIST)")
    p.add_argument("--svi-mixture", choices=("trained", "fixed"), default=None,
                   help="train VaDE's mixture by SVI, or keep it as initialised and train the networks only "
                        "(VaDE.freeze_mixture; default: fixed on MNIST, trained on digits)")
    p.add_argument("--no-scale-head", action="store_true",
                   help="leave the encoder's scale head as drawn (no vade_init.init_scale_head before SVI)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden widths")
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--likelihood", default=None, help="observation family of VaDE and the VAE (default normal:0.3)")
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--restarts", type=int, default=5, help="EM restarts of every GMM")
    p.add_argument("--init", choices=("gmm", "tsne"), default=None,
                   help="VaDE mixture initialisation: gmm (EM on the codes, the paper) or tsne (GMM in a t-SNE map; "
                        "default)")
    p.add_argument("--embed", choices=("codes", "inputs"), default=None,
                   help="what --init tsne embeds (default: inputs on digits, codes on MNIST)")
    p.add_argument("--embed-points", type=int, default=None,
                   help="points embedded by t-SNE (a seeded subset beyond; the rest get their 10 nearest embedded "
                        "codes' vote)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="arithmetic of VaDE's pretraining and alignment: bf16 mixed precision (bfloat16 autocast of "
                        "the networks) or fp32; auto = bf16 where the device has hardware bfloat16 (SVI and the "
                        "ELBOs stay float32)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--tsne-iterations", type=int, default=None, help="t-SNE gradient steps (at least 250)")
    p.add_argument("--scale-points", type=int, default=None,
                   help="points scored by vade_init.init_scale_head's grid of constant scales")
    p.add_argument("--align-epochs", type=int, default=None,
                   help="epochs pulling the codes towards the t-SNE map's clusters before SVI (vade_init.align)")
    p.add_argument("--align-weight", type=float, default=100.0, help="weight of the cross-entropy in vade_init.align")
    p.add_argument("--candidates", type=int, default=1,
                   help="VaDE initialisations tried; the one with the highest training ELBO after --select-epochs "
                        "of SVI is kept (no labels); 1 = a single initialisation")
    p.add_argument("--select-epochs", type=int, default=10,
                   help="SVI epochs per VaDE candidate before selection (counted in --epochs)")
    p.add_argument("--pixel-reg", type=float, default=1e-2, help="variance ridge of the GMM on pixels")
    p.add_argument("--fit-on", choices=("all", "train"), default="all",
                   help="all: fit and score train+test together; train: fit on train, score test")
    p.add_argument("--limit", type=int, default=None, help="use only the first N points (smoke tests)")
    p.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHODS)} (default: all on digits; no tsne-gmm-pixels on MNIST)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="file name stem (default clustering-<dataset>[-quick]-<machine>)")
    p.add_argument("--machine", default=None, help="machine tag for the file name (default cpu-<n>core or the GPU)")
    p.add_argument("--quick", action="store_true", help="digits, CPU, 5 seeds, dataset defaults: under 10 minutes")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.device, args.seeds = "digits", "cpu", "5"
        args.threads = args.threads or 1  # small networks: one thread is fastest on a shared CPU
    return args


def seeds_from(text):
    """``"N"`` -> seeds 0..N-1; ``"a,b,..."`` -> those seeds (``"3,"`` is the single seed 3)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds:
        raise UsageError(f"--seeds needs a positive count or a comma list of seeds, got {text!r}")
    return seeds


def load_points(args):
    """(x, y, x_score, y_score, image_shape): the points to fit and the points to score (a DataSplit for x)."""
    train, test = load_dataset(args.dataset, data_root=args.data_root)
    if args.fit_on == "all":
        x = torch.cat([train.x, test.x])
        y = torch.cat([train.y, test.y])
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        return x, y, x, y, train.image_shape
    x, y, xs, ys = train.x, train.y, test.x, test.y
    if args.limit:
        x, y, xs, ys = x[: args.limit], y[: args.limit], xs[: args.limit], ys[: args.limit]
    return x, y, xs, ys, train.image_shape


def _training_elbo(m, x, seed):
    """Training ELBO per point (one particle per point, a fixed random stream), and the seconds it took."""
    t0 = time.perf_counter()
    pyro.set_rng_seed(seed)
    return float(evaluate(m, x, particles=1, batch_size=5000).elbo), time.perf_counter() - t0


def run_vade(x, xs, s, seed, device):
    torch.manual_seed(seed)
    m = VaDE(x.shape[1], n_clusters=s["clusters"], latent_dim=s["latent_dim"], hidden=s["hidden"],
             likelihood=s["likelihood"]).to(device)
    info = initialise(m, x, pretrain_epochs=s["pretrain_epochs"], batch_size=s["pretrain_batch_size"],
                      lr=s["pretrain_lr"], restarts=s["restarts"], dropout=s["pretrain_dropout"], seed=seed,
                      candidates=s["candidates"], select_epochs=s["select_epochs"], select_lr=s["lr"], init=s["init"],
                      embed=s["embed"], embed_points=s["embed_points"], perplexity=s["perplexity"],
                      align_epochs=s["align_epochs"], align_weight=s["align_weight"],
                      pretrain_validation=s["pretrain_validation"], pretrain_patience=s["pretrain_patience"],
                      pretrain_min_delta=s["pretrain_min_delta"], scale_head=s["scale_head"], precision=s["precision"],
                      compile=s["stage_compile"], tsne_iterations=s["tsne_iterations"], scale_points=s["scale_points"])
    # reporting only (not counted in the method's seconds): clusters and training ELBO before and after SVI
    t0 = time.perf_counter()
    info["init_clusters"] = m.cluster(xs)  # after initialisation (and, with candidates > 1, the selection's SVI)
    info["elbo_before_svi"], _ = _training_elbo(m, x, seed)
    report = time.perf_counter() - t0
    done = s["select_epochs"] if s["candidates"] > 1 else 0
    m.freeze_mixture(s["svi_mixture"] == "fixed")
    t1 = time.perf_counter()
    fit(m, x, epochs=s["epochs"] - done, batch_size=s["batch_size"], lr=s["svi_lr"], device=device, seed=seed,
        progress=False, validate=False)
    info["svi_seconds"] = time.perf_counter() - t1
    pred = m.cluster(xs)
    info["elbo_after_svi"], seconds = _training_elbo(m, x, seed)
    info["report_seconds"] = report + seconds
    return pred, info


def run_vae_gmm(x, xs, s, seed, device):
    torch.manual_seed(seed)
    m = VAE(x.shape[1], latent_dim=s["latent_dim"], hidden=s["hidden"], likelihood=s["likelihood"]).to(device)
    fit(m, x, epochs=s["pretrain_epochs"] + s["epochs"], batch_size=s["batch_size"], lr=s["lr"], device=device,
        seed=seed, progress=False, validate=False)
    with torch.no_grad():
        z = torch.cat([m.encode(x[i : i + 4096]).mean for i in range(0, x.shape[0], 4096)])
        zs = z if xs is x else torch.cat([m.encode(xs[i : i + 4096]).mean for i in range(0, xs.shape[0], 4096)])
    gmm = fit_diag_gmm(z, s["clusters"], restarts=s["restarts"], seed=seed)
    return torch.as_tensor(gmm.predict(zs.cpu().double().numpy())), {}


def run_kmeans(x, xs, s, seed, device):
    from sklearn.cluster import KMeans

    km = KMeans(s["clusters"], n_init=10, random_state=seed).fit(x.cpu().numpy())
    return torch.as_tensor(km.predict(xs.cpu().numpy())), {}


def run_gmm_pixels(x, xs, s, seed, device):
    fitted = em(x, s["clusters"], covariance="diag", restarts=s["restarts"], reg=s["pixel_reg"], seed=seed)
    return fitted.predict(xs), {"backend": "ppl_models.gmm.em", "em_converged": bool(fitted.converged)}


def run_tsne_gmm_pixels(x, xs, s, seed, device):
    """VaDE's t-SNE initialiser alone, on the pixels: a full GMM in the 2-D map of every point (transductive)."""
    from sklearn.mixture import GaussianMixture

    if xs is not x:
        return None, {"skipped": "t-SNE has no out-of-sample map; run it with --fit-on all"}
    emb = tsne_map(x, perplexity=s["perplexity"], seed=seed, iterations=s["tsne_iterations"])
    g = GaussianMixture(s["clusters"], covariance_type="full", n_init=s["restarts"], random_state=seed).fit(emb)
    return torch.as_tensor(g.predict(emb)), {}


RUNNERS = {"vade": run_vade, "vae-gmm": run_vae_gmm, "kmeans-pixels": run_kmeans, "gmm-pixels": run_gmm_pixels,
           "tsne-gmm-pixels": run_tsne_gmm_pixels}


def summarise(results, methods, dataset):
    rows = []
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        row = {"method": method, "dataset": dataset, "seeds": len(rs)}
        for key in ("acc", "nmi", "ari", "seconds"):
            vals = [r[key] for r in rs]
            row[f"{key}_median"], row[f"{key}_min"], row[f"{key}_max"] = statistics.median(vals), min(vals), max(vals)
        rows.append(row)
    return rows


def table(summary):
    rows = [
        {
            "method": r["method"],
            "dataset": r["dataset"],
            "seeds": r["seeds"],
            **{k.upper(): f"{r[k + '_median']:.3f} [{r[k + '_min']:.3f}, {r[k + '_max']:.3f}]" for k in ("acc", "nmi", "ari")},
            "seconds (median)": f"{r['seconds_median']:.1f}",
        }
        for r in summary
    ]
    return markdown_table(rows, ["method", "dataset", "seeds", "ACC", "NMI", "ARI", "seconds (median)"])


STAGES = (("pretrain_seconds", "pretrain"), ("embed_seconds", "t-SNE"), ("gmm_seconds", "GMM"),
          ("align_seconds", "align"), ("scale_head_seconds", "scale head"), ("svi_seconds", "SVI"))


def vade_table(details, results):
    """One row per seed: ACC before/after SVI, training ELBO before/after, seconds per stage."""
    acc = {r["seed"]: r["acc"] for r in results if r["method"] == "vade"}
    secs = {r["seed"]: r["seconds"] for r in results if r["method"] == "vade"}
    rows = []
    for e in details:
        row = {"seed": e["seed"], "ACC init -> SVI": f"{e['init_acc']:.3f} -> {acc[e['seed']]:.3f}",
               "ELBO before -> after SVI": f"{e['elbo_before_svi']:.1f} -> {e['elbo_after_svi']:.1f} "
                                           f"({e['elbo_after_svi'] - e['elbo_before_svi']:+.1f})",
               "pretrain epochs": e.get("pretrain_epochs_run", "")}
        row.update({name: f"{e[key]:.0f}" if key in e else "" for key, name in STAGES})
        row["total s"] = f"{secs[e['seed']]:.0f}"
        rows.append(row)
    return markdown_table(rows, ["seed", "ACC init -> SVI", "ELBO before -> after SVI", "pretrain epochs",
                                 *(name for _, name in STAGES), "total s"])


def figure(results, methods, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if any(r["method"] == m for r in results)]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, key in zip(axes, ("acc", "nmi", "ari", "seconds")):
        data = [[r[key] for r in results if r["method"] == m] for m in methods]
        ax.boxplot(data, whis=(0, 100))
        for i, vals in enumerate(data, start=1):
            ax.scatter([i] * len(vals), vals, s=12, color="black", zorder=3)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
        ax.set_title(key.upper() if key != "seconds" else "seconds (wall)")
        if key == "seconds":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    key = "mnist" if args.dataset in ("mnist", "fashion-mnist") else "digits"
    s = dict(DEFAULTS[key])
    methods = [m.strip() for m in (args.methods or s.pop("methods")).split(",") if m.strip()]
    s.pop("methods", None)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    for name in ("hidden", "latent_dim", "epochs", "pretrain_epochs", "batch_size", "lr", "likelihood", "init", "embed",
                 "align_epochs", "pretrain_batch_size", "pretrain_lr", "pretrain_validation", "pretrain_patience",
                 "svi_mixture", "svi_lr", "embed_points", "tsne_iterations", "scale_points"):
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    if args.candidates > 1 and not 1 <= args.select_epochs < s["epochs"]:
        raise UsageError(f"--select-epochs must lie in 1..{s['epochs'] - 1} (below --epochs), got {args.select_epochs}")
    s.update(candidates=args.candidates, select_epochs=args.select_epochs)
    s.update(clusters=args.clusters, restarts=args.restarts, pixel_reg=args.pixel_reg, fit_on=args.fit_on,
             limit=args.limit, pretrain_dropout=0.2, precision=args.precision, perplexity=args.perplexity,
             align_weight=args.align_weight, pretrain_min_delta=args.pretrain_min_delta,
             scale_head=not args.no_scale_head)
    seeds = seeds_from(args.seeds)

    t_start = time.perf_counter()
    x, y, xs, ys, image_shape = load_points(args)
    x, xs = x.to(device), (x.to(device) if xs is x else xs.to(device))
    print(f"clustering on {args.dataset}: fit {x.shape[0]} points, score {xs.shape[0]}; device {device}; "
          f"seeds {seeds}; settings {s}", file=sys.stderr)
    results, extras = [], []

    def write(final):
        """Write the md/json/png of the seeds done so far (after every seed, so a stopped run keeps them)."""
        total = time.perf_counter() - t_start
        done = sorted({r['seed'] for r in results})
        summary = summarise(results, methods, args.dataset)
        md = table(summary)
        env = environment(device)
        machine = args.machine or machine_tag(device)
        name = args.name or f"clustering-{Path(args.dataset).stem}{'-quick' if args.quick else ''}-{machine}"
        backend = next((e.get("backend") for e in extras if e["method"] == "gmm-pixels"), None)
        record = {
            "benchmark": "clustering",
            "command": "python -m benchmarks.clustering " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": env,
            "machine": machine,
            "seeds": seeds,
            "seeds_done": done,
            "settings": s,
            "gmm_pixels_backend": backend,
            "points_fit": int(x.shape[0]),
            "points_scored": int(xs.shape[0]),
            "total_seconds": total,
            "results": results,
            "summary": summary,
            "details": extras,
            "compares": "all methods on the same points and seeds; VaDE and vae-gmm share networks, likelihood, latent "
                        "size, batch size, lr and the number of passes over the data",
        }
        header = (f"Clustering on {args.dataset} ({x.shape[0]} points fitted, {xs.shape[0]} scored; {len(done)} of {len(seeds)} seeds; "
                  f"{machine}, {env['device_name']}); median [min, max]. Total {total:.0f} s.\n\n")
        init = [e for e in extras if e["method"] == "vade" and "init_acc" in e]
        if init:
            accs = [e["init_acc"] for e in init]
            md += (f"\n\nVaDE ACC right after initialisation (candidates {s['candidates']}"
                   f"{', selected by training ELBO after ' + str(s['select_epochs']) + ' SVI epochs' if s['candidates'] > 1 else ''}"
                   f"), per seed {[round(a, 3) for a in accs]}: median {statistics.median(accs):.3f}.")
            if s["candidates"] > 1:
                md += " Selected candidate per seed: " + ", ".join(
                    f"seed {e['seed']}: #{e['selected']} of ELBOs {[round(v, 2) for v in e['candidate_elbos']]}" for e in init)
        if init and "elbo_after_svi" in init[0]:
            md += "\n\nVaDE per seed: ACC after initialisation -> after SVI; training ELBO per point (one particle, " \
                  "same draws) before -> after SVI; seconds per stage.\n\n" + vade_table(init, results)
        json_path, md_path = write_results(args.out, name, record, header + md)
        figure(results, methods, Path(args.out) / f"{name}.png",
               f"clustering on {args.dataset}, {len(done)} seeds ({machine})")
        if final:
            print(header + md)
        print(f"wrote {json_path}, {md_path}, {Path(args.out) / (name + '.png')}", file=sys.stderr)
        return record, total

    for seed in seeds:
        for method in methods:
            t0 = time.perf_counter()
            pred, extra = RUNNERS[method](x, xs, s, seed, device)
            if pred is None:
                print(f"  seed {seed} {method:14s} skipped: {extra['skipped']}", file=sys.stderr)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0 - extra.get("report_seconds", 0.0)  # the method's own time
            scores = clustering_scores(ys, pred)
            if "init_clusters" in extra:  # VaDE right after its initialisation, before SVI
                extra["init_acc"] = clustering_scores(ys, extra.pop("init_clusters"))["acc"]
            results.append({"method": method, "dataset": args.dataset, "seed": seed, **scores, "seconds": seconds})
            extras.append({"method": method, "seed": seed, **{k: v for k, v in extra.items() if v is not None}})
            print(f"  seed {seed} {method:14s} acc {scores['acc']:.3f} nmi {scores['nmi']:.3f} "
                  f"ari {scores['ari']:.3f}  {seconds:.1f}s", file=sys.stderr, flush=True)
        if seed != seeds[-1] and results:
            write(final=False)
    record, total = write(final=True)
    if args.quick and total > 600:
        print(f"warning: --quick took {total:.0f} s, over its 10-minute budget", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
