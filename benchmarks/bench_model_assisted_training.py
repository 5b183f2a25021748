"""Training with model-assisted gradients against uniform minibatches: epochs to a target.

For every dataset × optimizer × batch size × seed, the same network (same initialisation, same
sequence of shuffled minibatches) is trained ``--epochs`` epochs once with the plain minibatch mean
("uniform") and once with each model-assisted estimator; test accuracy is measured after every
epoch. The target is the uniform run's best test accuracy; for each run we record the first epoch
at which it reaches the target (uniform: the epoch of its best).

* ratio: epochs of the model-assisted run / epochs of the uniform run (a run that never reaches
  the target counts as ``--epochs + 1``); summarised per dataset and optimizer by the median over
  seeds and batch sizes.
* win: a configuration (dataset × optimizer × batch size) where the model-assisted run needs fewer
  epochs than uniform in the median over seeds (ties: the higher mean best accuracy).

Run ``python benchmarks/bench_model_assisted_training.py`` (``--quick`` for a smoke run); results
go to the "model-assisted-training" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from probopt.experiments.datasets import load_dataset  # noqa: E402
from probopt.experiments.networks import make_network  # noqa: E402
from probopt.sampling.gradient_estimator import UniformEstimator  # noqa: E402
from probopt.sampling.model_assisted import make_estimator  # noqa: E402

DATASETS = ("digits", "breast_cancer", "wine", "iris", "mnist5k", "mnist1d")
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    "sgdm": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}


def loss_fn(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def accuracy(net, x, y):
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def train(ds, estimator, opt_name, batch_size, epochs, seed, hidden):
    """Test accuracy after each epoch (a list of ``epochs`` values) and the seconds taken."""
    net = make_network("mlp", (ds.num_features,), ds.num_classes, seed=seed, hidden=hidden)
    opt = OPTIMIZERS[opt_name](net.parameters())
    x, y = ds.x_train, ds.y_train
    estimator.setup(net, x, y)
    gen = torch.Generator().manual_seed(seed)
    accs = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        for index in estimator.epoch_batches(batch_size, gen):
            opt.zero_grad()
            estimator.backward(net, loss_fn, x[index], y[index], index)
            opt.step()
            estimator.after_step(net)
        accs.append(accuracy(net, ds.x_test, ds.y_test))
    return accs, time.perf_counter() - t0


def build(spec):
    """``name`` or ``name:key=value,key=value`` (values parsed as Python literals)."""
    import ast

    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    return make_estimator(name, **kwargs)


def first_reach(accs, target, epochs):
    for e, a in enumerate(accs, start=1):
        if a >= target - 1e-12:
            return e
    return epochs + 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--optimizers", default="adamw,sgdm")
    ap.add_argument("--batch-sizes", default="64")
    ap.add_argument(
        "--estimators",
        nargs="+",
        default=["difference-cached"],
        help="registry names, each optionally with overrides: 'name:key=value;key=value'",
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 datasets, 1 seed, 3 epochs")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets, args.seeds, args.epochs = "iris,digits", 1, 3
    datasets = args.datasets.split(",")
    optimizers = args.optimizers.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    estimators = args.estimators
    t_start = time.perf_counter()
    # results[(dataset, opt, bs, seed)] = {name: (accs, seconds)}
    results = {}
    for dname in datasets:
        for seed in range(args.seeds):
            ds = load_dataset(dname, seed=seed)
            for opt_name in optimizers:
                for bs in batch_sizes:
                    bs_eff = min(bs, ds.x_train.shape[0] // 4)
                    runs = {
                        "uniform": train(ds, UniformEstimator(), opt_name, bs_eff, args.epochs,
                                         seed, (args.hidden,))
                    }  # fmt: skip
                    for name in estimators:
                        runs[name] = train(ds, build(name), opt_name, bs_eff,
                                           args.epochs, seed, (args.hidden,))  # fmt: skip
                    results[(dname, opt_name, bs, seed)] = runs
            print(f"{dname} seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    elapsed = time.perf_counter() - t_start

    rows, win_rows = [], []
    wins = {name: 0 for name in estimators}
    acc_better = {name: [0, 0] for name in estimators}  # [higher, at least as high]
    half = {name: {opt: 0 for opt in optimizers} for name in estimators}
    for dname in datasets:
        for opt_name in optimizers:
            row = [dname, opt_name]
            cell_ratios = {name: [] for name in estimators}
            for bs in batch_sizes:
                per_seed = [results[(dname, opt_name, bs, s)] for s in range(args.seeds)]
                u_epochs, u_best = [], []
                e_epochs = {name: [] for name in estimators}
                e_best = {name: [] for name in estimators}
                for runs in per_seed:
                    u_acc = runs["uniform"][0]
                    target = max(u_acc)
                    u_epochs.append(u_acc.index(target) + 1)
                    u_best.append(target)
                    for name in estimators:
                        acc = runs[name][0]
                        e_epochs[name].append(first_reach(acc, target, args.epochs))
                        e_best[name].append(max(acc))
                        cell_ratios[name].append(e_epochs[name][-1] / u_epochs[-1])
                win_row = [dname, opt_name, bs, statistics.median(u_epochs),
                           statistics.mean(u_best)]  # fmt: skip
                for name in estimators:
                    med_e, med_u = statistics.median(e_epochs[name]), statistics.median(u_epochs)
                    won = med_e < med_u or (
                        med_e == med_u and statistics.mean(e_best[name]) > statistics.mean(u_best)
                    )
                    wins[name] += won
                    gap = statistics.mean(e_best[name]) - statistics.mean(u_best)
                    acc_better[name][0] += gap > 1e-9
                    acc_better[name][1] += gap > -1e-9
                    win_row += [med_e, statistics.mean(e_best[name]), "yes" if won else "no"]
                win_rows.append(win_row)
            for name in estimators:
                med = statistics.median(cell_ratios[name])
                half[name][opt_name] += med <= 0.5
                row.append(med)
            rows.append(row)
    n_configs = len(datasets) * len(optimizers) * len(batch_sizes)
    times = {name: [] for name in ["uniform", *estimators]}
    for runs in results.values():
        for name, (_, sec) in runs.items():
            times[name].append(sec)
    cost = {
        name: statistics.median(runs[name][1] / runs["uniform"][1] for runs in results.values())
        for name in estimators
    }

    header = ["dataset", "optimizer", *[f"{n}: epochs ratio" for n in estimators]]
    win_header = ["dataset", "optimizer", "batch", "uniform: epochs to best", "uniform: best acc"]
    for name in estimators:
        win_header += [f"{name}: epochs", f"{name}: best acc", f"{name} wins"]
    summary = []
    for name in estimators:
        summary.append(
            f"- `{name}`: wins {wins[name]}/{n_configs} configurations "
            f"({100 * wins[name] / n_configs:.0f} %); median epochs ratio ≤ 0.5 on "
            + ", ".join(f"{half[name][o]}/{len(datasets)} datasets with {o}" for o in optimizers)
            + f"; median wall-time ratio to uniform {cost[name]:.2f}×; best test accuracy "
            f"within the {args.epochs} epochs (mean over seeds) higher than uniform's in "
            f"{acc_better[name][0]}/{n_configs} configurations, at least as high in "
            f"{acc_better[name][1]}/{n_configs}."
        )
    body = (
        f"One-hidden-layer MLP ({args.hidden} units), {args.epochs} epochs, {args.seeds} seeds "
        f"(seed = data split, initialisation and batch order, shared by the runs it compares), "
        f"batch sizes {', '.join(map(str, batch_sizes))} (capped at a quarter of the training "
        f"set), AdamW (lr 1e-3, weight decay 0.01) and SGD with momentum 0.9 (lr 0.05). Target: "
        f"the uniform run's best test accuracy; epochs ratio = epochs the model-assisted run needs "
        f"to reach it / epochs uniform needs (its best epoch); a run that never reaches it counts "
        f"{args.epochs + 1} epochs. Targets: ratio ≤ 0.5 on at least 3 of 6 datasets; "
        f"model-assisted wins ≥ 90 % of configurations.\n\n"
        + "\n".join(summary)
        + "\n\nMedian epochs ratio per dataset and optimizer (over seeds and batch sizes):\n\n"
        + markdown_table(header, rows)
        + "\n\nPer configuration (medians over seeds; best acc = mean over seeds of the best "
        "test accuracy within the run):\n\n"
        + markdown_table(win_header, win_rows)
        + f"\n\nWall time {elapsed:.0f} s ({args.threads} torch threads)."
    )
    print(body)
    if not args.no_write and not args.quick:
        write_section("model-assisted-training", "Training with model-assisted gradients", body)


if __name__ == "__main__":
    main()
