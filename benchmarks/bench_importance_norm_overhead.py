"""Cost of per-example gradient norms relative to a plain forward/backward, on MLPs.

Variants, each timed on the same minibatch (MNIST-5k inputs, 784 features, 10 classes):

* plain: ``zero_grad``, forward, mean cross-entropy, ``backward`` (what a training step does
  before ``optimizer.step``);
* dense: the same pass inside :class:`probopt.sampling.scores.DenseNormCapture` plus the norms
  (the dense-layer identity, what ``ImportanceEstimator`` does at every step);
* dense-score: :func:`~probopt.sampling.scores.score_examples` with ``method="dense"`` (a
  worker's scoring pass: backward to the layer outputs only, no parameter gradients);
* last-layer / logits: the forward-only scores (exact last-layer norm; Katharopoulos–Fleuret's
  bound), as extra work on top of nothing;
* exact: ``torch.func`` per-example gradients (vmap of grad), for reference.

The variants take turns inside every round (so load changes hit them alike); the ratio is the
median over rounds of (variant time / plain time in the same round), each time the fastest of
``--reps`` calls. Target: dense ≤ 1.3× plain.

Run ``python benchmarks/bench_importance_norm_overhead.py`` (``--quick`` for a smoke run);
results go to the "importance-norm-overhead" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from probopt.experiments.datasets import load_dataset  # noqa: E402
from probopt.experiments.networks import make_network  # noqa: E402
from probopt.sampling.scores import (  # noqa: E402
    DenseNormCapture,
    cross_entropy_per_example,
    exact_grad_norms,
    score_examples,
)


def variants(net, x, y):
    ce = cross_entropy_per_example
    cap = DenseNormCapture(net)  # built once, as the estimator does

    def plain():
        net.zero_grad()
        ce(net(x), y).mean().backward()

    def dense():
        net.zero_grad()
        with cap:
            ce(net(x), y).mean().backward()
        return cap.norms(1.0 / len(x))

    return {
        "plain": plain,
        "dense": dense,
        "dense-score": lambda: score_examples(net, ce, x, y, "dense"),
        "last-layer": lambda: score_examples(net, ce, x, y, "last-layer"),
        "logits": lambda: score_examples(net, ce, x, y, "logits"),
        "exact": lambda: exact_grad_norms(net, ce, x, y, chunk=len(x)),
    }


def min_time(fn, reps):
    """The fastest of ``reps`` calls (timeit's advice: the rest is other jobs' noise)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(net, x, y, rounds, reps, skip_exact):
    fns = variants(net, x, y)
    if skip_exact:
        fns.pop("exact")
    for fn in fns.values():  # warm-up
        fn()
    ratios = {k: [] for k in fns if k != "plain"}
    plain_times = []
    for _ in range(rounds):
        t = {k: min_time(fn, reps) for k, fn in fns.items()}
        plain_times.append(t["plain"])
        for k in ratios:
            ratios[k].append(t[k] / t["plain"])
    return statistics.median(plain_times), {k: statistics.median(v) for k, v in ratios.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", default="256,256;1024,1024", help="';'-separated MLP shapes")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 3")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.reps = 3, 3
    ds = load_dataset("mnist5k")
    rows, worst = [], 0.0
    t_start = time.perf_counter()
    for shape in args.hidden.split(";"):
        hidden = tuple(int(h) for h in shape.split(","))
        net = make_network("mlp", (ds.num_features,), ds.num_classes, seed=0, hidden=hidden)
        for b in (int(v) for v in args.batch_sizes.split(",")):
            x, y = ds.x_train[:b], ds.y_train[:b]
            size = sum(p.numel() for p in net.parameters())
            # torch.func holds B x P per-example gradients: skip it above 5e7 numbers (400 MB)
            plain_s, ratio = measure(net, x, y, args.rounds, args.reps, skip_exact=b * size > 5e7)
            worst = max(worst, ratio["dense"])
            row = [f"784-{'-'.join(map(str, hidden))}-10", b, f"{plain_s * 1e3:.2f}"]
            row += [f"{ratio[k]:.2f}×" for k in ("dense", "dense-score", "last-layer", "logits")]
            row.append(f"{ratio['exact']:.1f}×" if "exact" in ratio else "")
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    elapsed = time.perf_counter() - t_start
    verdict = "met" if worst <= 1.3 else "missed"
    body = (
        "Time of per-example gradient norms relative to a plain forward/backward of the same "
        "minibatch (mean cross-entropy, `zero_grad` + forward + `backward`), MNIST-5k inputs, "
        f"float32, {args.threads} torch threads. Each cell: median over {args.rounds} rounds of "
        f"(variant / plain in the same round), every time the fastest of {args.reps} calls, the "
        "variants taking turns inside each round. *dense*: the same training pass inside "
        "`DenseNormCapture` plus the norms (what `ImportanceEstimator` adds to every step); "
        "*dense-score*: a worker's scoring pass (`score_examples(method='dense')`, backward to "
        "the layer outputs only); *last-layer* and *logits*: forward-only scores (exact "
        "last-layer norm; Katharopoulos–Fleuret's ‖softmax − onehot‖); *exact*: `torch.func` "
        "per-example gradients and their norms (not run where B × P exceeds 5·10⁷).\n\n"
        + markdown_table(
            ["MLP", "batch", "plain (ms)", "dense", "dense-score", "last-layer", "logits", "exact"],
            rows,
        )  # fmt: skip
        + f"\n\nTarget dense ≤ 1.3× plain: **{verdict}** (worst case {worst:.2f}×). "
        f"Wall time {elapsed:.0f} s."
    )
    print(body)
    if not args.no_write and not args.quick:
        write_section("importance-norm-overhead", "Importance sampling: cost of gradient norms",
                      body)  # fmt: skip


if __name__ == "__main__":
    main()
