"""Semi-supervised classification benchmark: M2 (Kingma et al. 2014) against baselines on the same labels.

    python -m benchmarks.semisupervised --quick            # digits, CPU, a few minutes
    python -m benchmarks.semisupervised --dataset mnist --data-root ../shared/data --plan 100:3,600:1,1000:1,3000:1 \\
        --threads 1 --out benchmarks/results   # the committed MNIST result (epochs: the stated budget)

For each entry ``LABELS:SEEDS`` of ``--plan`` and each seed s in 0..SEEDS-1, ``LABELS`` training labels are
kept, balanced over the classes and drawn with seed s (:func:`ppl_models.m2.choose_labels`); every other
training point is unlabelled. On those labels:

* ``m2``: :class:`ppl_models.m2.M2` (``--hidden`` MLPs with ``--activation``, latent ``--latent-dim``, the
  classification weight ``--alpha`` per row, M2's default 60, which is 600 times the paper's alpha = 0.1 N at
  100 labels (0.1 per row; the reason is in M2's docstring); each labelled point's ELBO weighs as one datapoint
  of the data set, as in the paper's J^alpha, or with ``--labelled-weight equal`` the labelled minibatch's ELBO
  as much as the unlabelled one's), trained by :func:`inference.fit` with the
  ``enum`` objective (TraceEnum_ELBO sums the missing labels out) for ``--epochs`` passes over the
  unlabelled points, each step an unlabelled minibatch of ``--batch-size`` and as many cycled labelled
  points, Adam at ``--lr``, the training seed s; classes = argmax q(y | x). Its test error is also recorded
  after every epoch (the curve in the figure), with the error of the model's own posterior argmax_y L(x, y)
  on the first ``--eval-points`` test images (:func:`generative_posterior`), and the test ELBO U(x) and importance-weighted bound on
  log p(x) (:func:`inference.evaluate`, ``--particles``) on the first ``--eval-points`` test images.
* ``logreg-pixels`` / ``knn-pixels``: scikit-learn's multinomial logistic regression (C = 1) and
  k-nearest neighbours (k = ``--knn``) on the labelled pixels;
* ``logreg-vae`` / ``knn-vae``: the same on a plain :class:`ppl_models.vae.VAE`'s posterior means (the
  paper's M1 idea of features learned without labels; M1 itself used a TSVM), the VAE trained once on every
  training image (no labels) for ``--vae-epochs`` with the same hidden widths, latent size, batch size and
  learning rate.

Errors are on the full test split. Binarisation: ``dynamic`` (a fresh Bernoulli draw of each training image
per epoch, Burda et al. 2015) for the generative models; the baselines see grey levels. Seconds are
wall-clock on a machine others share.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, machine_tag, markdown_table, start, write_results
from inference import fit
from inference.errors import UsageError
from inference.evaluate import evaluate
from inference.plots import save_image_grid
from ppl_models.data import load_dataset
from ppl_models.m2 import M2, choose_labels, split_labels
from ppl_models.vae import VAE

# Kingma et al. 2014, table 1: M2's MNIST test error (%) by number of labels; M1+TSVM and M1+M2 for reference
PAPER_M2 = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}
PAPER_M1_TSVM = {100: 11.82, 600: 5.72, 1000: 4.24, 3000: 3.49}
METHODS = ("logreg-pixels", "knn-pixels", "logreg-vae", "knn-vae", "m2")
DEFAULTS = {
    "mnist": dict(plan="100:3,600:1,1000:1,3000:1", epochs=3, vae_epochs=5, batch_size=200, lr=3e-4,
                  hidden=[500], latent_dim=50, eval_points=1000, particles=50),
    "digits": dict(plan="50:3,100:1,300:1", epochs=30, vae_epochs=30, batch_size=64, lr=1e-3,
                   hidden=[256], latent_dim=16, eval_points=359, particles=50),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.semisupervised", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", help="digits | mnist | fashion-mnist | path.npz (default digits)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for mnist / fashion-mnist)")
    p.add_argument("--plan", default=None, help="LABELS:SEEDS,... (default mnist 100:3,600:1,1000:1,3000:1)")
    p.add_argument("--epochs", type=int, default=None, help="M2's epochs (passes over the unlabelled points)")
    p.add_argument("--vae-epochs", type=int, default=None, help="epochs of the VAE behind the *-vae baselines")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden widths")
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--activation", default="softplus")
    p.add_argument("--alpha", type=float, default=60.0,
                   help="classification weight per row (the paper's: 0.1 with --labelled-weight paper; the default, "
                        "M2's, is chosen by measurement)")
    p.add_argument("--labelled-weight", choices=("paper", "equal"), default="paper",
                   help="paper: a labelled point weighs as one datapoint of the data set (J^alpha); equal: each "
                        "step's labelled minibatch weighs as much as its unlabelled one")
    p.add_argument("--knn", type=int, default=3, help="k of the k-NN baselines")
    p.add_argument("--eval-points", type=int, default=None, help="test points of M2's ELBO / IWAE (the error uses all)")
    p.add_argument("--particles", type=int, default=None, help="importance samples of M2's test log-likelihood")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="file name stem (default semisupervised-<dataset>-<epochs>ep-<machine>)")
    p.add_argument("--machine", default=None, help="machine tag for the file name (default cpu-<n>core or the GPU)")
    p.add_argument("--quick", action="store_true", help="digits, CPU, one thread, dataset defaults")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.device, args.threads = "digits", "cpu", args.threads or 1
    return args


def parse_plan(text):
    """``"100:3,600"`` -> [(100, [0, 1, 2]), (600, [0])]."""
    plan = []
    for part in text.split(","):
        labels, _, seeds = part.strip().partition(":")
        try:
            n, k = int(labels), int(seeds or 1)
        except ValueError:
            raise UsageError(f"--plan entries are LABELS[:SEEDS], got {part!r}") from None
        if n < 1 or k < 1:
            raise UsageError(f"--plan entries need positive numbers, got {part!r}")
        plan.append((n, list(range(k))))
    return plan


def error(pred, y):
    return float((pred.cpu() != y.cpu()).float().mean())


def classify_all(m, x):
    return torch.cat([m.classify(x[i : i + 2000]) for i in range(0, len(x), 2000)])


@torch.no_grad()
def generative_posterior(m, x, y, seed=0):
    """How M2's own posterior p(y | x) ~ softmax_y L(x, y) classifies ``x`` (L the labelled bound, one z draw
    from q(z | x, y) per class, from a generator seeded by ``seed``, so training's random stream is untouched):
    (its accuracy against ``y``, the fraction of points where argmax q(y | x) agrees with it, the mean gap
    max_y L - mean_y L in nats). The unlabelled bound's gradient pulls q(y | x) toward this posterior."""
    ys = torch.arange(m.num_classes, device=x.device).view(-1, 1).expand(-1, len(x))
    qz = m.encode(x, ys)
    g = torch.Generator(device=x.device).manual_seed(seed)
    z = qz.mean + qz.stddev * torch.randn(qz.mean.shape, generator=g, device=x.device, dtype=qz.mean.dtype)
    bound = m.decode(ys, z).log_prob(x) + m._prior_z(x).log_prob(z) - qz.log_prob(z)  # (K, N)
    best = bound.argmax(0)
    return (float((best.cpu() == y.cpu()).float().mean()), float((m.classify(x) == best).float().mean()),
            float((bound.max(0).values - bound.mean(0)).mean()))


def run_m2(train, test, labels, seed, s, device):
    """Train M2 on ``labels`` (-1 = unlabelled); returns (test predictions, extras with the per-epoch curve)."""
    data = split_labels(train, labels)
    torch.manual_seed(seed)
    fraction = data.labelled_fraction if s["labelled_weight"] == "paper" else None
    m = M2(train.dim, num_classes=s["classes"], latent_dim=s["latent_dim"], hidden=s["hidden"],
           activation=s["activation"], alpha=s["alpha"], labelled_fraction=fraction, image_shape=train.image_shape)
    xt = test.data.to(device)
    curve = []

    def record(rec):
        m.eval()
        acc, agree, gap = generative_posterior(m, xt[: s["eval_points"]], test.y[: s["eval_points"]])
        curve.append({"epoch": rec["epoch"], "test_error": error(classify_all(m, xt), test.y),
                      "generative_error": 1 - acc, "q_agrees_with_generative": agree, "bound_gap": gap,
                      "train_loss": rec["train_loss"], "seconds": rec["seconds"]})
        m.train()
        print(f"    epoch {rec['epoch']}: loss {rec['train_loss']:.2f} test error {curve[-1]['test_error']:.4f} "
              f"argmax_y L error {1 - acc:.4f} ({rec['seconds']:.0f} s)", file=sys.stderr, flush=True)

    result = fit(m, data, elbo="enum", epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                 device=device, validate=False, progress=False, callbacks=[record])
    m.eval()
    pred = classify_all(m, xt)
    ev = evaluate(m, xt[: s["eval_points"]], particles=s["particles"])
    extra = {"curve": curve, "train_seconds": result.train_seconds, "test_elbo": ev.elbo, "test_elbo_se": ev.elbo_se,
             "test_log_likelihood": ev.log_likelihood, "test_log_likelihood_se": ev.log_likelihood_se,
             "eval_points": min(s["eval_points"], len(xt)), "particles": s["particles"], "module": m}
    return pred, extra


def train_vae(train, s, device):
    torch.manual_seed(0)
    vae = VAE(train.dim, latent_dim=s["latent_dim"], hidden=s["hidden"], activation=s["activation"])
    t0 = time.perf_counter()
    fit(vae, train, elbo="trace", epochs=s["vae_epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=0,
        device=device, validate=False, progress=False)
    return vae.eval(), time.perf_counter() - t0


def baseline(kind, features, labels, test_features, k):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    keep = labels >= 0
    clf = LogisticRegression(C=1.0, max_iter=2000) if kind == "logreg" else KNeighborsClassifier(n_neighbors=k)
    clf.fit(features[keep].numpy(), labels[keep].numpy())
    return torch.as_tensor(clf.predict(test_features.numpy()))


def style_figure(m, test, path, title):
    """Rows: a test image, then its style z = E[q(z | x, y_hat)] decoded as each class (columns 0..K-1)."""
    k = m.num_classes
    device = next(m.parameters()).device
    x = test.data[:10].to(device)
    cells = [torch.cat([x[i : i + 1], m.style_transfer(x[i].expand(k, -1), torch.arange(k))]) for i in range(len(x))]
    save_image_grid(torch.cat(cells).cpu(), test.image_shape, path, nrow=k + 1, title=title)


def curve_figure(results, extras, path, title, paper):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in extras:
        if e["method"] == "m2":
            xs = [c["epoch"] for c in e["curve"]]
            line, = ax.plot(xs, [100 * c["test_error"] for c in e["curve"]], marker="o",
                            label=f"M2, {e['labels']} labels, seed {e['seed']}: argmax q(y|x)")
            if all("generative_error" in c for c in e["curve"]):
                ax.plot(xs, [100 * c["generative_error"] for c in e["curve"]], ls="--", color=line.get_color(),
                        label=f"seed {e['seed']}: the model's own argmax_y L(x, y)")
    for n, err in PAPER_M2.items():
        if paper and any(r["labels"] == n for r in results):
            ax.axhline(err, ls="--", lw=0.8, color="grey")
            ax.text(ax.get_xlim()[0], err, f" paper M2, {n}: {err}%", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("epoch (passes over the unlabelled points)")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(results, methods, paper):
    rows = []
    for n in sorted({r["labels"] for r in results}):
        for method in methods:
            errs = [r["test_error"] for r in results if r["labels"] == n and r["method"] == method]
            if not errs:
                continue
            secs = [r["seconds"] for r in results if r["labels"] == n and r["method"] == method]
            row = {"labels": n, "method": method, "seeds": len(errs),
                   "test_error_pct": f"{100 * statistics.median(errs):.2f}"
                   + (f" [{100 * min(errs):.2f}, {100 * max(errs):.2f}]" if len(errs) > 1 else ""),
                   "median_error": statistics.median(errs), "seconds": statistics.median(secs)}
            if paper and method == "m2" and n in PAPER_M2:
                row["paper_m2_pct"] = f"{PAPER_M2[n]:.2f}"
            rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    key = "mnist" if args.dataset in ("mnist", "fashion-mnist") else "digits"
    s = dict(DEFAULTS[key])
    for name in ("plan", "epochs", "vae_epochs", "batch_size", "lr", "hidden", "latent_dim", "eval_points", "particles"):
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    s.update(activation=args.activation, alpha=args.alpha, labelled_weight=args.labelled_weight, knn=args.knn,
             binarize="dynamic")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    plan = parse_plan(s["plan"])

    t_start = time.perf_counter()
    train, test = load_dataset(args.dataset, data_root=args.data_root, binarize="dynamic")
    grey_train = train.grey if train.grey is not None else train.x
    grey_test = load_dataset(args.dataset, data_root=args.data_root, binarize="none")[1].x
    s["classes"] = int(train.y.max()) + 1
    machine = args.machine or machine_tag(device)
    name = args.name or f"semisupervised-{Path(args.dataset).stem}-{s['epochs']}ep{'-quick' if args.quick else ''}-{machine}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"semi-supervised on {args.dataset}: {len(train)} training, {len(test)} test points; device {device}; "
          f"plan {plan}; settings {s}", file=sys.stderr)

    vae_codes, vae_seconds = None, None
    if any(m.endswith("-vae") for m in methods):
        vae, vae_seconds = train_vae(train, s, device)
        with torch.no_grad():
            vae_codes = (vae.encode(train.data.to(device)).mean.cpu(), vae.encode(test.data.to(device)).mean.cpu())
        print(f"  VAE for the *-vae baselines: {s['vae_epochs']} epochs, {vae_seconds:.0f} s", file=sys.stderr)

    results, extras = [], []

    def report(complete):
        total = time.perf_counter() - t_start
        summary = summarise(results, methods, paper=args.dataset == "mnist")
        env = environment(device)
        curve_figure(results, extras, out / f"{name}.png",
                     f"M2 on {args.dataset}: test error per epoch ({s['epochs']} epochs, {machine})",
                     paper=args.dataset == "mnist")
        m2 = [e for e in extras if e["method"] == "m2"]
        record = {
            "benchmark": "semisupervised",
            "command": "python -m benchmarks.semisupervised " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": env, "machine": machine, "settings": s, "total_seconds": total,
            "vae_seconds": vae_seconds, "paper_m2_test_error_pct": PAPER_M2,
            "paper_m1_tsvm_test_error_pct": PAPER_M1_TSVM, "results": results, "summary": summary, "details": extras,
        }
        md = (f"Semi-supervised classification on {args.dataset} ({len(train)} training points, test error on all "
              f"{len(test)} test points; {machine}, {env['device_name']}, {env['cpu_threads']} torch thread(s)). "
              f"M2: {s['epochs']} epochs, batch {s['batch_size']} unlabelled + {s['batch_size']} labelled, Adam lr "
              f"{s['lr']}, hidden {s['hidden']} {s['activation']}, latent {s['latent_dim']}, alpha {s['alpha']} per "
              f"row ({s['labelled_weight']} weighting of the labelled ELBO), dynamic binarisation. Median [min, max] "
              f"over seeds. "
              f"Total {total:.0f} s (wall-clock on a shared machine).\n\n")
        md += markdown_table(summary, ["labels", "method", "seeds", "test_error_pct", "paper_m2_pct", "seconds"],
                             floatfmt="{:.1f}")
        if m2:
            md += "\n\nM2 per run: seconds per epoch (median over epochs), test ELBO U(x) and IWAE bound on log p(x):\n\n"
            rows = [{"labels": e["labels"], "seed": e["seed"],
                     "s_per_epoch": statistics.median(c["seconds"] for c in e["curve"]),
                     "final_error_pct": 100 * e["curve"][-1]["test_error"],
                     "test_elbo": e["test_elbo"], "test_iwae": e["test_log_likelihood"],
                     "eval": f"{e['eval_points']} pts x {e['particles']}"} for e in m2]
            md += markdown_table(rows, ["labels", "seed", "s_per_epoch", "final_error_pct", "test_elbo", "test_iwae",
                                        "eval"], floatfmt="{:.2f}")
            md += ("\n\nM2's test error (%) after each epoch: argmax q(y | x) on every test point; in brackets, "
                   "the model's own posterior argmax_y L(x, y) on the first eval points (one z draw per class), "
                   "toward which the unlabelled bound pulls q(y | x):\n\n")
            md += "\n".join(f"- {e['labels']} labels, seed {e['seed']}: "
                             + ", ".join(f"{100 * c['test_error']:.2f} ({100 * c['generative_error']:.0f})"
                                         for c in e["curve"]) for e in m2)
        if not complete:
            md += "\n\n(partial: the run had not finished its plan when this was written)"
        record["complete"] = complete
        write_results(out, name, record, md)
        return record, md

    for n, seeds in plan:
        for seed in seeds:
            labels = choose_labels(train.y, n, seed=seed, num_classes=s["classes"])
            for method in methods:
                t0 = time.perf_counter()
                extra = {}
                if method == "m2":
                    pred, extra = run_m2(train, test, labels, seed, s, device)
                    module = extra.pop("module")
                    if seed == 0:
                        fig = out / f"{name}-style-{n}labels.png"
                        style_figure(module, test, fig, f"M2, {n} labels, seed 0: test image, then its style as 0..9")
                        extra["style_figure"] = fig.name
                else:
                    kind, feats = method.split("-")
                    tr, te = (grey_train, grey_test) if feats == "pixels" else vae_codes
                    pred = baseline(kind, tr, labels, te, s["knn"])
                seconds = time.perf_counter() - t0
                err = error(pred, test.y)
                results.append({"labels": n, "seed": seed, "method": method, "test_error": err, "seconds": seconds})
                extras.append({"labels": n, "seed": seed, "method": method, **extra})
                print(f"  {n} labels seed {seed} {method:13s} test error {100 * err:.2f}%  {seconds:.0f} s",
                      file=sys.stderr, flush=True)
            report(False)  # the results so far, rewritten after every labelled set (a killed run keeps them)
    record, md = report(True)
    print(md)
    return record


if __name__ == "__main__":
    main()
