"""Gradient variance of the model-assisted estimators against uniform minibatches, mid-training.

Protocol, per dataset and network:

1. Train ``--epochs`` epochs with AdamW and plain (uniform) minibatches of size ``--batch-size``.
   Every model-assisted estimator rides along in shadow: at every step it receives the same batch
   through its ordinary ``backward`` call (its auxiliary tables and working model are updated
   exactly as in training), its gradient is discarded, and the time of that call is recorded.
2. Freeze the parameters and every estimator's state. Compute the full-data gradient
   :math:`\\bar y_U` (one backward over the whole training set).
3. Draw ``--batches`` simple random samples; for each, every estimator (a copy of its frozen
   state, so nothing it learns during measurement is used) produces its estimate ĝ through the
   same ``backward`` call a training loop makes. Report MSE = mean ‖ĝ − ȳ_U‖² (the trace
   variance plus squared bias) relative to uniform on the same batches.

Cost per step: median time of a whole training step (``zero_grad``, the estimator's
``backward``, AdamW ``step``, ``after_step``) relative to a plain step, the estimators taking
turns on the same batches (each on its own copy of the network), after phase 3.

Run ``python benchmarks/bench_model_assisted_variance.py`` (``--quick`` for a smoke run); results
go to the "model-assisted-variance" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
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

VARIANTS = (
    "greg-onehot",
    "greg-pca",
    "greg-loss",
    "difference-onehot",
    "difference-pca-class",
    "difference-lastlayer",
    "difference-cached",
)


def build(spec):
    """``name`` or ``name:key=value;key=value`` (values parsed as Python literals)."""
    import ast

    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    return make_estimator(name, **kwargs)


def loss_fn(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def time_steps(net, x, y, ests, batch_size, steps, seed):
    """Lower-quartile time of a full training step (zero_grad, backward, AdamW step, after_step) per
    estimator relative to uniform; the estimators take turns on the same batches, each on its own
    copy of the network, optimizer and state, so load changes hit all of them alike."""
    runs = {}
    for name, est in ests.items():
        net_c = copy.deepcopy(net)
        runs[name] = (net_c, torch.optim.AdamW(net_c.parameters(), lr=1e-3), copy.deepcopy(est))
    times = {name: [] for name in ests}
    gen = torch.Generator().manual_seed(seed + 2000)
    n_pop = x.shape[0]
    for step in range(steps):
        idx = torch.randperm(n_pop, generator=gen)[:batch_size]
        xb, yb = x[idx], y[idx]
        for name, (net_c, opt, est) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            est.backward(net_c, loss_fn, xb, yb, idx)
            opt.step()
            est.after_step(net_c)
            if step >= 5:  # warm-up
                times[name].append(time.perf_counter() - t0)
    low = {name: float(torch.tensor(t).quantile(0.25)) for name, t in times.items()}
    return {name: low[name] / low["uniform"] for name in ests if name != "uniform"}


def measure(dataset, kind, variants, *, epochs, batch_size, batches, seed, hidden, timing_steps):
    ds = load_dataset(dataset, seed=seed)
    x, y = ds.x_train, ds.y_train
    n_pop = x.shape[0]
    net = make_network(kind, (ds.num_features,), ds.num_classes, seed=seed, hidden=hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    uniform = UniformEstimator()
    uniform.setup(net, x, y)
    ests = {}
    for name in variants:
        ests[name] = build(name)
        ests[name].setup(net, x, y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in uniform.epoch_batches(batch_size, gen):
            xb, yb = x[idx], y[idx]
            for est in ests.values():
                net.zero_grad()
                est.backward(net, loss_fn, xb, yb, idx)
                est.after_step(net)
            net.zero_grad()
            uniform.backward(net, loss_fn, xb, yb, idx)
            opt.step()
    # frozen parameters and estimator states
    net.zero_grad()
    loss_fn(net(x), y).mean().backward()
    full = flat_grad(net).clone()
    with torch.no_grad():
        acc = float((net(ds.x_test).argmax(1) == ds.y_test).float().mean())
    frozen = {name: copy.deepcopy(est) for name, est in ests.items()}
    sq = dict.fromkeys(["uniform", *variants], 0.0)
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(batches):
        idx = torch.randperm(n_pop, generator=gen)[:batch_size]
        xb, yb = x[idx], y[idx]
        net.zero_grad()
        uniform.backward(net, loss_fn, xb, yb, idx)
        sq["uniform"] += float((flat_grad(net) - full).pow(2).sum())
        for name in variants:
            est = copy.deepcopy(frozen[name])
            net.zero_grad()
            est.backward(net, loss_fn, xb, yb, idx)
            sq[name] += float((flat_grad(net) - full).pow(2).sum())
    ratio = {name: sq[name] / sq["uniform"] for name in variants}
    cost = time_steps(net, x, y, {"uniform": uniform, **frozen}, batch_size, timing_steps, seed)
    return {"acc": acc, "ratio": ratio, "cost": cost, "mse_uniform": sq["uniform"] / batches}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="digits,breast_cancer,mnist5k,mnist1d")
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="registry names, each optionally with overrides: 'name:key=value;key=value'",
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--timing-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 20 batches")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.batches, args.timing_steps = 1, 20, 10
        args.datasets = "digits,breast_cancer"
    variants = args.variants
    rows, results = [], {}
    t_start = time.perf_counter()
    for dataset in args.datasets.split(","):
        for kind in args.models.split(","):
            res = measure(
                dataset, kind, variants, epochs=args.epochs, batch_size=args.batch_size,
                batches=args.batches, seed=args.seed, hidden=(args.hidden,),
                timing_steps=args.timing_steps,
            )  # fmt: skip
            results[(dataset, kind)] = res
            row = [dataset, kind, res["acc"]]
            row += [f"{res['ratio'][v]:.3f} ({res['cost'][v]:.2f}×)" for v in variants]
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    elapsed = time.perf_counter() - t_start
    best = {key: min(variants, key=lambda v, r=res: r["ratio"][v]) for key, res in results.items()}
    hits = {v: sum(res["ratio"][v] <= 0.3 for res in results.values()) for v in variants}
    body = (
        f"MSE of each estimator to the full-data gradient relative to uniform minibatches (same "
        f"batches; lower is better); in brackets the time of a training step (forward, "
        f"backward, AdamW step) relative to a plain step (lower quartile over "
        f"{args.timing_steps - 5} steps, the estimators taking turns on the same batches; the "
        f"machine is shared, so the quartile rather than the mean). {args.epochs} AdamW epochs "
        f"(lr 1e-3) with uniform minibatches of {args.batch_size} first, every estimator riding "
        f"along in shadow (its tables and working model updated as in training); then θ and "
        f"each estimator's state frozen and {args.batches} SRS batches measured. MLP: one hidden "
        f"layer of {args.hidden}. Column 3: test accuracy of the frozen θ. Targets: ratio ≤ 0.3 "
        f"on at least three dataset × model cases, cost ≤ 1.5×.\n\n"
        + markdown_table(["dataset", "model", "test acc", *variants], rows)
        + "\n\nCases with ratio ≤ 0.3: "
        + ", ".join(f"`{v}` {hits[v]}/{len(results)}" for v in variants)
        + ".  \nBest per case: "
        + ", ".join(f"{d}/{m}: `{b}`" for (d, m), b in best.items())
        + f".  \nWall time {elapsed:.0f} s ({args.threads} torch threads).\n\n"
        + "Variants (`probopt.sampling.make_estimator`): `greg-*` are calibration weights on the "
        "losses (Variant G, no per-example gradients) with h = class one-hot "
        "(post-stratification), 4 PCA scores of the inputs, class one-hot and cached loss; "
        "`difference-*` add B̂ᵀ(h̄_U − h̄_s) to the last layer's gradient (Variant D; B̂ by "
        "ridge regression with forgetting 0.9 on per-example gradients of past batches, refit "
        "every 4 steps) with h = class one-hot, class one-hot ⊗ 8 PCA scores, cached output "
        "error (softmax − one-hot at the last visit) ⊗ 8 PCA scores; `difference-cached` is the "
        "difference estimator whose prediction is each example's last-visit gradient of every "
        "dense layer times a fitted per-layer coefficient (SAGA's control variate with "
        "shrinkage; not one of the notes' h choices)."
    )
    print(body)
    if not args.no_write and not args.quick:
        write_section("model-assisted-variance", "Model-assisted gradient variance", body)


if __name__ == "__main__":
    main()
