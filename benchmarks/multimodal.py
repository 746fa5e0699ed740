"""Fusion rules for multimodal VAEs: PoE, MoE, MoPoE and CoDE(rho) on the same networks, data and budget.

Every rule trains the same :class:`ppl_models.multimodal.MultimodalVAE` (same
encoders/decoders, latent size, objective, optimiser, epochs, batch size and
seed) on the same data; only the fusion rule differs. PoE includes the N(0, I)
prior expert (the MVAE of Wu & Goodman 2018; without it PoE equals CoDE with
rho = 0). Reported per rule: cross-modal coherence by number of given
modalities (classifiers trained on the real training data, their own test
accuracy reported), joint coherence of prior draws, linear-probe accuracy of the
posterior means (all modalities, and each single one), joint and conditional
test log-likelihoods (importance sampling), and seconds per training epoch.
Baseline: linear CCA on the first two image modalities with a linear probe.

Incomplete training data: ``--missing 0,0.3,0.6`` trains every rule once per
fraction with ``--missing-modality`` (default the first) absent from that seeded
fraction of the training tuples (:func:`ppl_models.multimodal_data.with_missing`;
the test set and the coherence classifiers keep the complete data), and reports
coherence given each subset of modalities and its drop from the rule's run on
complete data (fraction 0).

Your own data: ``--dataset FILE.npz --modality NAME=LIKELIHOOD ...`` (or a
``SPEC.toml``), as ``pplm train mvae`` takes it; coherence needs classes (``y``).

    python -m benchmarks.multimodal --quick                      # digits halves + label, CPU, < 10 min
    python -m benchmarks.multimodal --dataset polymnist --data-root ../shared/data --modalities 3 \
        --objective subset --epochs 5 --classifier cnn --hidden 512 --latent-dim 16 --particles 10
                                          # the committed polymnist result: about 70 minutes on one CPU thread
    python -m benchmarks.multimodal --rules poe,moe,mopoe,code:0.2 --missing 0,0.3,0.6 --missing-modality top \
        --epochs 30 --particles 20 --tag missing-30ep   # digits halves with missing top halves, ~5 min

Writes ``multimodal-<dataset>[-quick]-<machine>.{json,md,png}`` and one
cross-modal generation grid per rule into ``--out``.
"""

import argparse
import os
import time

import pyro
import torch

from benchmarks.common import RESULTS, environment, machine_tag, markdown_table, write_results
from inference import fit
from inference import metrics as M
from inference.plots import generation_grid
from inference.train import resolve_device
from ppl_models.multimodal import MultimodalVAE
from ppl_models.multimodal_data import (
    MULTIMODAL_DATASETS,
    load_multimodal,
    load_multimodal_file,
    parse_assignments,
    parse_weights,
    read_spec,
    with_missing,
)

DEFAULT_RULES = ("poe", "moe", "mopoe", "code:0", "code:0.2", "code:0.4", "code:0.6")


def parse_rule(text):
    name, _, rho = text.partition(":")
    return name, float(rho) if rho else 0.0


def load(args):
    """(train, test, likelihood weights) of a built-in dataset or your own file (module docstring)."""
    name = str(args.dataset)
    if name in MULTIMODAL_DATASETS:
        train, test = load_multimodal(name, data_root=args.data_root, views=args.modalities, seed=args.seed,
                                      max_train=args.max_train, max_test=args.max_test)
        return train, test, parse_weights(args.weights)
    if name.endswith(".toml"):
        spec = read_spec(name)
        weights = spec["weights"] if args.weights is None else parse_weights(args.weights)
    else:
        spec = {"file": name, "modalities": parse_assignments(args.modality, "--modality"),
                "shapes": parse_assignments(args.shape, "--shape"), "standardize": args.standardize}
        weights = parse_weights(args.weights)
    train, test = load_multimodal_file(spec["file"], spec["modalities"], shapes=spec["shapes"],
                                       standardize=spec["standardize"] or args.standardize, seed=args.seed,
                                       max_train=args.max_train, max_test=args.max_test)
    if train.y is None or test.y is None:
        raise SystemExit(f"{name}: coherence needs classes: give the file a y array (and y_test with a test set)")
    return train, test, weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits-halves",
                   help=f"{' | '.join(MULTIMODAL_DATASETS)}, FILE.npz (with --modality) or SPEC.toml")
    p.add_argument("--modality", action="append", default=[], help="NAME=LIKELIHOOD of your .npz (repeat)")
    p.add_argument("--shape", action="append", default=[], help="NAME=HxW image shape of your .npz")
    p.add_argument("--standardize", action="store_true", help="standardise normal/laplace modalities of your .npz")
    p.add_argument("--weights", default=None, help="likelihood weights NAME=W,... or auto")
    p.add_argument("--missing", default="0", help="comma list of fractions of training tuples missing a modality")
    p.add_argument("--missing-modality", default=None, help="the modality made missing (default: the first)")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--modalities", type=int, default=3, help="PolyMNIST-like views (3..5)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES), help="comma list of poe, moe, mopoe, code:RHO")
    p.add_argument("--objective", default="subset", choices=("subset", "joint", "cross"))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[256])
    p.add_argument("--arch", default="mlp", choices=("mlp", "conv"))
    p.add_argument("--private-dim", type=int, default=0,
                   help="size of each image modality's private latent w_m beside the shared z (0: none)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL terms (1: the ELBO)")
    p.add_argument("--likelihood", default=None, help="image likelihood (default: the dataset's, cbernoulli)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--particles", type=int, default=100)
    p.add_argument("--classifier", default="logistic", choices=("logistic", "mlp", "cnn"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="digits halves + label, 60 epochs, CPU (< 10 minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.device, args.particles = "digits-halves", 60, "cpu", 100
    device = resolve_device(args.device)
    rules = [parse_rule(r) for r in args.rules.split(",")]

    train, test, weights = load(args)
    fractions = [float(f) for f in args.missing.split(",") if f]
    missing_name = args.missing_modality or train.names[0]
    specs = [dict(m) for m in train.modalities]
    if args.likelihood:
        for m in specs:
            if m["likelihood"] != "categorical":
                m["likelihood"] = args.likelihood
    t0 = time.perf_counter()
    classifiers, clf_acc = M.modality_classifiers(train.data, train.y, test.data, test.y, kind=args.classifier,
                                                  seed=args.seed)
    clf_seconds = time.perf_counter() - t0
    images = [m["name"] for m in specs if m["likelihood"] != "categorical"]
    cca = None
    if len(images) >= 2 and train.mask is None and test.mask is None:
        a, b = images[:2]
        cca = M.cca_probe(train.x[a], train.x[b], train.y, test.x[a], test.x[b], test.y,
                          n_components=min(8, args.latent_dim))
    print(f"{args.dataset}: {len(train)} train / {len(test)} test tuples, modalities {train.names}; "
          f"classifier test accuracy {clf_acc}; CCA probe {cca}")

    data_name = os.path.splitext(os.path.basename(str(args.dataset)))[0]
    tag = "-".join(filter(None, ["multimodal", data_name, "quick" if args.quick else None, args.tag,
                                 machine_tag(device)]))
    rows, results, summaries = [], [], []
    complete = {}  # rule label -> coherence by given subset on complete data
    for fraction, rule, rho in ((f, r, c) for f in fractions for r, c in rules):
        label = rule if rule != "code" else f"code({rho:g})"
        pyro.set_rng_seed(args.seed)
        module = MultimodalVAE(specs, latent_dim=args.latent_dim, hidden=args.hidden, rule=rule, rho=rho,
                               prior_expert=rule == "poe", objective=args.objective, arch=args.arch,
                               private_dim=args.private_dim, beta=args.beta, weights=weights)
        train_f = with_missing(train, missing_name, fraction, seed=args.seed)
        fr = fit(module, train_f, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                 seed=args.seed, progress=False, validate=False)
        t1 = time.perf_counter()
        mm = M.multimodal_metrics(module, train_f.data, train.y, test.data, test.y, classifiers,
                                  particles=args.particles, log_likelihood=True, seed=args.seed)
        eval_seconds = time.perf_counter() - t1
        for r in mm["coherence"]:
            results.append({"rule": rule, "rho": rho, "missing": fraction, **r})
        by = mm["coherence_by_size"]
        by_given = {g: float(sum(r["coherence"] for r in mm["coherence"] if r["given"] == g)
                             / sum(1 for r in mm["coherence"] if r["given"] == g))
                    for g in dict.fromkeys(r["given"] for r in mm["coherence"])}
        if fraction == 0:
            complete[label] = by_given
        drop = {g: complete[label][g] - v for g, v in by_given.items()} if label in complete else None
        summary = {
            "rule": rule, "rho": rho, "label": label, "missing": fraction, "missing_modality": missing_name,
            "coherence_by_size": by, "coherence_by_given": by_given, "drop_from_complete": drop,
            "joint_coherence": mm["joint_coherence"],
            "probe_accuracy": mm["probe_accuracy"],
            "test_elbo": mm["test_elbo"],
            "test_log_likelihood": mm["test_log_likelihood"],
            "test_log_likelihood_se": mm["test_log_likelihood_se"],
            "conditional_log_likelihood": mm["conditional_log_likelihood"],
            "seconds_per_epoch": fr.train_seconds / args.epochs,
            "train_seconds": fr.train_seconds,
            "eval_seconds": eval_seconds,
            "final_train_loss": fr.history[-1]["train_loss"],
        }
        summaries.append(summary)
        row = {"rule": label}
        if len(fractions) > 1 or fractions[0] != 0:
            row["missing"] = f"{fraction:.0%} {missing_name}"
            row.update({f"coh|{g}": v for g, v in by_given.items()})
            if drop is not None:
                row["mean_drop"] = sum(drop.values()) / len(drop)
        row.update({f"coh|{k}": v for k, v in by.items()})
        row.update(joint=mm["joint_coherence"], probe=mm["probe_accuracy"]["all"],
                   probe_1=min(v for k, v in mm["probe_accuracy"].items() if k != "all"),
                   log_px=mm["test_log_likelihood"], s_per_epoch=summary["seconds_per_epoch"])
        rows.append(row)
        print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
        given = images[0] if images else specs[0]["name"]
        if images and fraction == fractions[0]:
            generation_grid(module, test.data, given, [m["name"] for m in specs if m["name"] != given],
                            os.path.join(args.out, f"{tag}-generation-{label.replace('(', '').replace(')', '')}.png"),
                            image_shapes=module.image_shapes, title=f"{label}: generated from {given}")

    size_cols = sorted({k for s in summaries for k in s["coherence_by_size"]})
    given_cols = [f"coh|{g}" for g in dict.fromkeys(g for s in summaries for g in s["coherence_by_given"])]
    missing_cols = ["missing", *given_cols, "mean_drop"] if "missing" in rows[0] else []
    columns = ["rule", *missing_cols, *[f"coh|{k}" for k in size_cols], "joint", "probe", "probe_1", "log_px",
               "s_per_epoch"]
    table = markdown_table(rows, columns)
    missing_note = (
        f"missing: fraction of the training tuples without {missing_name} (seeded; test set and classifiers "
        f"complete); coh|S: mean coherence over the targets not in S given the subset S; mean_drop: mean over "
        "S of (coherence on complete data - this run's).\n" if missing_cols else "")
    legend = (
        f"\n\n{args.dataset}, {len(train)} train / {len(test)} test, modalities {train.names}, objective "
        f"{args.objective}, latent {args.latent_dim} (+{args.private_dim} private per image), beta {args.beta}, "
        f"hidden {args.hidden}, {args.arch}, {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr}, seed {args.seed}, device {device}.\n"
        + missing_note
        + "coh|k: mean cross-modal coherence given k modalities (targets not given); joint: joint coherence of 1000 "
        "prior draws; probe: linear-probe accuracy of the posterior mean given all modalities (probe_1: the worst "
        f"single modality); log_px: test log p(X), IWAE with {args.particles} particles.\n"
        f"Classifier ({args.classifier}) test accuracy: {clf_acc}. CCA baseline probe accuracy "
        f"({images[:2] if cca else 'n/a'}): {cca}."
    )
    print("\n" + table + legend)
    record = {
        "benchmark": "multimodal",
        "environment": environment(device),
        "seed": args.seed,
        "settings": {k: v for k, v in vars(args).items()},
        "data": {"name": str(args.dataset), "n_train": len(train), "n_test": len(test), "modalities": train.names,
                 "missing_modality": missing_name, "missing_fractions": fractions},
        "classifier_accuracy": clf_acc,
        "classifier_seconds": clf_seconds,
        "cca_probe": cca,
        "results": results,
        "summaries": summaries,
    }
    write_results(args.out, tag, record, table + legend)
    if len(fractions) > 1:
        for summary in summaries:
            summary["label"] = f"{summary['label']}\n{summary['missing']:.0%}\nno {missing_name}"
    _plot(summaries, size_cols, os.path.join(args.out, f"{tag}.png"), data_name)


def _plot(summaries, sizes, path, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(summaries)), 4))
    width = 0.8 / (len(sizes) + 1)
    xs = range(len(summaries))
    for i, k in enumerate(sizes):
        ax.bar([x + i * width for x in xs], [s["coherence_by_size"].get(k, 0) for s in summaries], width,
               label=f"given {k}")
    ax.bar([x + len(sizes) * width for x in xs], [s["joint_coherence"] for s in summaries], width, label="joint")
    ax.set_xticks([x + width * len(sizes) / 2 for x in xs], [s["label"] for s in summaries], fontsize=8)
    ax.set_ylabel("coherence")
    ax.set_ylim(0, 1)
    ax.set_title(f"multimodal VAEs on {dataset}: coherence by fusion rule")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the benchmark machine is shared; one thread per process is the fair setting
    main()
