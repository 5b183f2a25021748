"""Test accuracy of VSGD against AdamW and SGD with momentum on MNIST-5k and mnist1d.

A small CNN (``make_network("cnn", ...)``: two conv blocks, global average pooling, two linear
layers) is trained by the loop of ``probopt compare`` (:func:`probopt.experiments.training.train`)
with each optimizer at its documented default learning rate (``probopt optimizers``) and at 1/3,
3 and 10 times it, for several seeds. Runs that share a seed share the initial weights
and the minibatch order. The budget is short on purpose (the whole benchmark takes about a quarter
of an hour on 2 CPU cores with one torch thread), so the numbers compare the optimizers at a
fixed small budget, not at convergence.

    python benchmarks/bench_vsgd_accuracy.py            # full run, writes docs/benchmarks.md
    python benchmarks/bench_vsgd_accuracy.py --quick    # smoke run (1 epoch, 1 seed), no write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

from probopt.experiments import load_dataset  # noqa: E402
from probopt.experiments.optimizers import default_lr, is_available, warm_up  # noqa: E402
from probopt.experiments.report import summarize  # noqa: E402
from probopt.experiments.training import train  # noqa: E402

OPTIMIZERS = ("vsgd", "adamw", "sgdm")
LABELS = {"vsgd": "VSGD", "adamw": "AdamW", "sgdm": "SGD+momentum 0.9"}
# learning rates: the documented default, 1/3 of it, and 3 and 10 times it (short budgets
# favour large steps; VSGD's paper default, 0.1, is 10 times ours)
LR_FACTORS = (1 / 3, 1.0, 3.0, 10.0)
SCHEDULE_TEXT = {
    "constant": "no schedule",
    "step": "the learning rate halved after each third of the iterations, the VSGD paper's "
    'StepLR recipe (`schedule="step"`)',
    "cosine": 'cosine annealing of the learning rate to 0 (`schedule="cosine"`)',
}
# per dataset: CNN width, batch size and epochs, sized for ~1/4 hour in all on 2 cores
SETTINGS = {
    "mnist5k": {"width": 8, "batch_size": 32, "epochs": 15},
    "mnist1d": {"width": 16, "batch_size": 64, "epochs": 20},
}


def lr_grid(name: str, factors: tuple[float, ...] = LR_FACTORS) -> list[float]:
    return [float(f"{default_lr(name) * f:.2g}") for f in factors]


def _fmt(ms: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    mean, sd = ms
    if not math.isfinite(mean):
        return "n/a"
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def run_dataset(name, optimizers, seeds, settings, lrs_of, log, schedule="constant"):
    data = load_dataset(name)
    runs = []
    for opt in optimizers:
        for lr in lrs_of(opt):
            for seed in seeds:
                start = time.perf_counter()
                run = train(
                    data, opt, network="cnn", network_kwargs={"width": settings["width"]},
                    seed=seed, epochs=settings["epochs"], batch_size=settings["batch_size"], lr=lr,
                    schedule=schedule,
                )  # fmt: skip
                runs.append(run)
                log(
                    f"{name} {opt} lr={lr:g} seed={seed}: final acc "
                    f"{100 * run.final_test_accuracy:.1f}% ({time.perf_counter() - start:.0f}s)"
                )
    return data, runs


def dataset_table(name, runs, optimizers):
    """Rows: optimizer x lr; best lr per optimizer (mean final accuracy) marked."""
    rows, best = [], {}
    summaries = summarize(runs)
    for opt in optimizers:
        mine = [s for s in summaries if s.optimizer == opt]
        if not mine:
            continue
        top = max(mine, key=lambda s: -1 if math.isnan(s.final_acc[0]) else s.final_acc[0])
        best[opt] = top
        for s in mine:
            lr = f"{s.lr:g}" + (" (default)" if math.isclose(s.lr, default_lr(opt)) else "")
            final = _fmt(s.final_acc)
            rows.append([
                LABELS[opt], lr, f"**{final}** ★" if s is top else final, _fmt(s.best_acc),
                _fmt(s.final_loss, 1.0, 3), f"{1000 * s.epoch_time[0]:.0f}",
                f"{s.diverged}/{s.runs}",
            ])  # fmt: skip
    header = ["optimizer", "lr", "final test acc. (%)", "best-epoch test acc. (%)",
              "final train loss", "ms / epoch", "diverged"]  # fmt: skip
    return markdown_table(header, rows), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 seed, no write")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="mnist5k,mnist1d")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also save every run's curves here")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the docs")
    parser.add_argument("--schedule", default="constant", choices=("constant", "step", "cosine"),
                        help="learning-rate schedule of every run (section vsgd-accuracy for "
                        "constant, vsgd-accuracy-<schedule> otherwise)")  # fmt: skip
    parser.add_argument("--lr-factors", default=None,
                        help="comma-separated multiples of each default lr (default: "
                        f"{','.join(f'{f:.3g}' for f in LR_FACTORS)})")  # fmt: skip
    args = parser.parse_args()
    factors = (
        LR_FACTORS
        if args.lr_factors is None
        else tuple(float(f) for f in args.lr_factors.split(","))
    )
    torch.set_num_threads(args.threads)
    optimizers = [o for o in args.optimizers.split(",") if o]
    missing = [o for o in optimizers if not is_available(o)]
    if missing:
        sys.exit(f"bench_vsgd_accuracy: not in this probopt: {', '.join(missing)}")
    datasets = [d for d in args.datasets.split(",") if d]
    seeds = list(range(1 if args.quick else args.seeds))
    lrs_of = (lambda o: [default_lr(o)]) if args.quick else (lambda o: lr_grid(o, factors))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    for opt in optimizers:  # one-off costs (kernel compilation) out of the timings
        warm_up(opt)
    wall, cpu = time.perf_counter(), time.process_time()
    sections, summary_rows, all_runs = [], [], []
    for name in datasets:
        settings = dict(SETTINGS[name])
        if args.quick or args.epochs is not None:
            settings["epochs"] = 1 if args.quick else args.epochs
        data, runs = run_dataset(name, optimizers, seeds, settings, lrs_of, log, args.schedule)
        all_runs += runs
        table, best = dataset_table(name, runs, optimizers)
        n_epochs = settings["epochs"]
        sections.append(
            f"### {name}\n\n{data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
            f"input {data.input_shape}; CNN width {settings['width']}, batch "
            f"{settings['batch_size']}, {n_epochs} epoch{'s' * (n_epochs != 1)}, seeds "
            f"{', '.join(map(str, seeds))}.\n\n{table}"
        )
        for opt, top in best.items():
            default = [s for s in summarize([r for r in runs if r.optimizer == opt])
                       if math.isclose(s.lr, default_lr(opt))]  # fmt: skip
            grid = lrs_of(opt)
            edge = (
                "; the largest tried" if len(grid) > 1 and math.isclose(top.lr, max(grid)) else
                "; the smallest tried" if len(grid) > 1 and math.isclose(top.lr, min(grid)) else ""
            )  # fmt: skip
            summary_rows.append([
                name, LABELS[opt], _fmt(default[0].final_acc) if default else "n/a",
                f"{_fmt(top.final_acc)} (lr {top.lr:g}{edge})",
            ])  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    lr_lines = ", ".join(f"{LABELS[o]} {'/'.join(f'{x:g}' for x in lrs_of(o))}" for o in optimizers)
    body = "\n\n".join([
        "VSGD, AdamW and SGD with momentum 0.9 train the small CNN of "
        "`probopt.experiments.make_network(\"cnn\")` with the loop of `probopt compare` "
        "(cross-entropy, shuffled minibatches, last incomplete batch dropped, "
        f"{SCHEDULE_TEXT[args.schedule]}, no augmentation). Learning rates: {lr_lines} (the "
        "documented default of each optimizer, `probopt optimizers`, is among them); other "
        "settings are the optimizers' defaults (AdamW weight decay 0.01). Mean ± sd over "
        "seeds; runs that share a seed share the initial weights and the minibatch order. "
        "★ marks the learning rate with the best mean final accuracy; a best learning rate at "
        "the end of the sweep (\"the largest tried\") means the optimum may lie beyond it. "
        "*ms / epoch* is training time only (one torch thread) and is noisy on a shared "
        "machine.",
        "**Summary** (final test accuracy, %):\n\n" + markdown_table(
            ["dataset", "optimizer", "default lr", "best lr of the sweep"], summary_rows),
        *sections,
        f"Total: {len(all_runs)} runs, {wall / 60:.1f} min wall clock, {cpu / 60:.1f} min CPU.",
    ])  # fmt: skip
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in all_runs], indent=1))
    if not (args.quick or args.no_write):
        constant = args.schedule == "constant"
        write_section(
            "vsgd-accuracy" if constant else f"vsgd-accuracy-{args.schedule}",
            "VSGD vs AdamW vs SGD+momentum: test accuracy (MNIST-5k, mnist1d)"
            + ("" if constant else f", {args.schedule} learning-rate schedule"),
            body,
        )


if __name__ == "__main__":
    main()
