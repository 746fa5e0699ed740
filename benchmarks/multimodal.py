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

    python -m benchmarks.multimodal --quick                      # digits halves + label, CPU, < 10 min
    python -m benchmarks.multimodal --dataset polymnist --data-root ../shared/data --modalities 3 \
        --objective subset --epochs 5 --classifier cnn --hidden 512 --latent-dim 16 --particles 10
                                          # the committed polymnist result: about 70 minutes on one CPU thread

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
from ppl_models.multimodal_data import MULTIMODAL_DATASETS, load_multimodal

DEFAULT_RULES = ("poe", "moe", "mopoe", "code:0", "code:0.2", "code:0.4", "code:0.6")


def parse_rule(text):
    name, _, rho = text.partition(":")
    return name, float(rho) if rho else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits-halves", choices=MULTIMODAL_DATASETS)
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--modalities", type=int, default=3, help="PolyMNIST-like views (3..5)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES), help="comma list of poe, moe, mopoe, code:RHO")
    p.add_argument("--objective", default="subset", choices=("subset", "joint"))
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

    train, test = load_multimodal(args.dataset, data_root=args.data_root, views=args.modalities, seed=args.seed,
                                  max_train=args.max_train, max_test=args.max_test)
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
    if len(images) >= 2:
        a, b = images[:2]
        cca = M.cca_probe(train.x[a], train.x[b], train.y, test.x[a], test.x[b], test.y,
                          n_components=min(8, args.latent_dim))
    print(f"{args.dataset}: {len(train)} train / {len(test)} test tuples, modalities {train.names}; "
          f"classifier test accuracy {clf_acc}; CCA probe {cca}")

    tag = f"multimodal-{args.dataset}{'-quick' if args.quick else ''}-{machine_tag(device)}"
    rows, results, summaries = [], [], []
    for rule, rho in rules:
        label = rule if rule != "code" else f"code({rho:g})"
        pyro.set_rng_seed(args.seed)
        module = MultimodalVAE(specs, latent_dim=args.latent_dim, hidden=args.hidden, rule=rule, rho=rho,
                               prior_expert=rule == "poe", objective=args.objective, arch=args.arch,
                               private_dim=args.private_dim, beta=args.beta)
        fr = fit(module, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                 seed=args.seed, progress=False, validate=False)
        t1 = time.perf_counter()
        mm = M.multimodal_metrics(module, train.data, train.y, test.data, test.y, classifiers, particles=args.particles,
                                  log_likelihood=True, seed=args.seed)
        eval_seconds = time.perf_counter() - t1
        for r in mm["coherence"]:
            results.append({"rule": rule, "rho": rho, **r})
        by = mm["coherence_by_size"]
        summary = {
            "rule": rule, "rho": rho, "label": label,
            "coherence_by_size": by,
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
        row.update({f"coh|{k}": v for k, v in by.items()})
        row.update(joint=mm["joint_coherence"], probe=mm["probe_accuracy"]["all"],
                   probe_1=min(v for k, v in mm["probe_accuracy"].items() if k != "all"),
                   log_px=mm["test_log_likelihood"], s_per_epoch=summary["seconds_per_epoch"])
        rows.append(row)
        print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
        given = images[0] if images else specs[0]["name"]
        generation_grid(module, test.data, given, [m["name"] for m in specs if m["name"] != given],
                        os.path.join(args.out, f"{tag}-generation-{label.replace('(', '').replace(')', '')}.png"),
                        image_shapes=module.image_shapes, title=f"{label}: generated from {given}")

    size_cols = sorted({k for s in summaries for k in s["coherence_by_size"]})
    columns = ["rule", *[f"coh|{k}" for k in size_cols], "joint", "probe", "probe_1", "log_px", "s_per_epoch"]
    table = markdown_table(rows, columns)
    legend = (
        f"\n\n{args.dataset}, {len(train)} train / {len(test)} test, modalities {train.names}, objective "
        f"{args.objective}, latent {args.latent_dim} (+{args.private_dim} private per image), beta {args.beta}, "
        f"hidden {args.hidden}, {args.arch}, {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr}, seed {args.seed}, device {device}.\n"
        "coh|k: mean cross-modal coherence given k modalities (targets not given); joint: joint coherence of 1000 "
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
        "data": {"name": args.dataset, "n_train": len(train), "n_test": len(test), "modalities": train.names},
        "classifier_accuracy": clf_acc,
        "classifier_seconds": clf_seconds,
        "cca_probe": cca,
        "results": results,
        "summaries": summaries,
    }
    write_results(args.out, tag, record, table + legend)
    _plot(summaries, size_cols, os.path.join(args.out, f"{tag}.png"), args.dataset)


def _plot(summaries, sizes, path, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(sizes) + 1)
    xs = range(len(summaries))
    for i, k in enumerate(sizes):
        ax.bar([x + i * width for x in xs], [s["coherence_by_size"].get(k, 0) for s in summaries], width,
               label=f"given {k}")
    ax.bar([x + len(sizes) * width for x in xs], [s["joint_coherence"] for s in summaries], width, label="joint")
    ax.set_xticks([x + width * len(sizes) / 2 for x in xs], [s["label"] for s in summaries])
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
