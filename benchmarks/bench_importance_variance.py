"""Trace variance per draw of importance-sampled gradients mid-training: uniform, ideal, stale.

Alain et al.'s variance monitor (their figure of √Tr Σ over training), on real datasets. Per
dataset: train an MLP with SGD (momentum 0.9) and the ``ImportanceEstimator`` (stale
dense-identity norms refreshed when an example is drawn, 10 % uniform mixing, the τ switch) for
``--epochs`` epochs; after every epoch freeze θ and compute, over the whole training set,

* the fresh per-example norms ‖g_k‖ (dense-layer identity, equal to ``torch.func`` norms) and
  the full gradient μ,
* Tr Σ per draw of Hansen–Hurwitz estimates under: uniform (mean‖g‖² − ‖μ‖²), ideal
  (fresh norms: (mean‖g‖)² − ‖μ‖²), stale + mixed (the estimator's own table, as it would draw
  at that moment, for several mixing shares λ), and KF's fresh last-layer bound
  (q ∝ ‖softmax − onehot‖).

Reported: ratios to uniform (lower is better; target stale+mixed ≤ 0.6), √Tr Σ, the mean age
of the table in steps, and the Kish ESS share and PSIS k̂ of 4000 weights drawn from the
estimator's design. The values are exact design variances (no Monte Carlo).

Run ``python benchmarks/bench_importance_variance.py`` (``--quick`` for a smoke run); results
go to the "importance-variance" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from probopt.experiments.datasets import load_dataset  # noqa: E402
from probopt.experiments.networks import make_network  # noqa: E402
from probopt.sampling.importance import (  # noqa: E402
    ImportanceEstimator,
    draw_probabilities,
    trace_variances,
)
from probopt.sampling.scores import cross_entropy_per_example as ce  # noqa: E402
from probopt.sampling.scores import score_examples  # noqa: E402

MIXES = (0.0, 0.1, 0.3)
#: estimator settings compared (each trains its own trajectory)
CONFIGS = {
    "default": {},  # in-batch refresh + sweep of b/2 per importance-sampled step
    "no sweep": {"sweep": 0, "tau_threshold": 4 / 3},  # in-batch refresh only, same switch
}


def population_state(net, x, y, chunk=1000):
    """Fresh norms of every example, the KF bound, and ||mu||^2 of the full gradient, computed
    in float64 on a copy of the network (float32 softmax saturates to exact one-hots)."""
    net, x = copy.deepcopy(net).double(), x.double()
    norms = torch.cat([score_examples(net, ce, x[s : s + chunk], y[s : s + chunk], "dense")
                       for s in range(0, len(x), chunk)])  # fmt: skip
    bound = score_examples(net, ce, x, y, "logits")
    net.zero_grad()
    ce(net(x), y).mean().backward()
    mu2 = sum(float(p.grad.double().square().sum()) for p in net.parameters())
    net.zero_grad()
    return norms.double(), bound.double(), mu2


def stale_design(norms, scores, lam, mu2):
    """Tr of the stale design mixed with lam; NaN when it would leave an example undrawable."""
    try:
        q = draw_probabilities(scores, uniform_mix=lam)
    except ValueError:  # a stored score is exactly 0 and lam = 0
        return float("nan")
    return trace_variances(norms, q, mu2).design


def run(dataset, config, args):
    ds = load_dataset(dataset, seed=args.seed)
    x, y = ds.x_train, ds.y_train
    hidden = tuple(int(h) for h in args.hidden.split(","))
    net = make_network("mlp", (ds.num_features,), ds.num_classes, seed=args.seed, hidden=hidden)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    est = ImportanceEstimator(uniform_mix=0.1, **CONFIGS[config])
    est.setup(net, x, y)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for epoch in range(1, args.epochs + 1):
        on = 0
        for index in est.epoch_batches(args.batch_size, gen):
            on += est.active
            opt.zero_grad()
            est.backward(net, ce, x[index], y[index], index)
            opt.step()
            est.after_step(net)
        if epoch not in args.report:
            continue
        norms, bound, mu2 = population_state(net, x, y)
        tv = trace_variances(norms, None, mu2)
        stale = {lam: stale_design(norms, est.table.scores, lam, mu2) for lam in MIXES}
        kf = stale_design(norms, bound, 0.0, mu2)
        diag = est.weight_diagnostics(4000, torch.Generator().manual_seed(epoch), warn=False)
        with torch.no_grad():
            acc = float((net(ds.x_test).argmax(1) == ds.y_test).float().mean())
        rows.append({
            "dataset": dataset, "config": config, "epoch": epoch, "acc": acc, "uniform": tv.uniform,
            "ideal": tv.ideal, "stale": stale, "kf": kf, "age": est.table.mean_age(est.version),
            "coverage": est.table.coverage(), "ess": diag.ess_fraction, "khat": diag.khat,
            "is_share": on / max(len(x) // args.batch_size, 1),
        })  # fmt: skip
        r = rows[-1]
        print(
            f"{dataset} {config} epoch {epoch}: acc {acc:.3f} sqrtTr U {tv.uniform**0.5:.3f} "
            f"ideal/U {tv.ideal / tv.uniform:.3f} "
            + " ".join(f"stale{lam}/U {stale[lam] / tv.uniform:.3f}" for lam in MIXES)
            + f" kf/U {kf / tv.uniform:.3f} age {r['age']:.0f} khat {r['khat']:.2f}",
            flush=True,
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="digits,mnist5k,mnist1d")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--report", default="2,5,10,20", help="epochs at which to measure")
    ap.add_argument("--mid", type=int, default=5, help="'mid-training': epochs >= this")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: digits, 2 epochs")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets, args.epochs, args.report, args.mid = "digits", 2, "1,2", 1
    args.report = {int(e) for e in args.report.split(",")}
    t_start = time.perf_counter()
    rows = [r for d in args.datasets.split(",") for c in args.configs.split(",")
            for r in run(d, c, args)]  # fmt: skip
    elapsed = time.perf_counter() - t_start
    table = []
    for r in rows:
        u = r["uniform"]
        table.append([
            r["dataset"], r["config"], r["epoch"], f"{r['acc']:.3f}", f"{u**0.5:.3g}",
            f"{r['ideal'] / u:.3f}", *[f"{r['stale'][lam] / u:.3f}" for lam in MIXES],
            f"{r['kf'] / u:.3f}", f"{r['age']:.0f}", f"{r['coverage']:.2f}",
            f"{r['ess']:.2f}", f"{r['khat']:.2f}", f"{r['is_share']:.2f}",
        ])  # fmt: skip
    worst = {}
    for r in rows:
        if r["config"] == "default" and r["epoch"] >= args.mid:
            key = r["dataset"]
            worst[key] = max(worst.get(key, 0.0), r["stale"][0.1] / r["uniform"])
    met = [d for d, w in worst.items() if w <= 0.6]
    verdict = (
        f"met on {len(met)} of {len(worst)} datasets ({', '.join(met) or 'none'})"
        if met
        else "missed"
    )
    body = (
        f"Trace of the covariance of one Hansen–Hurwitz draw, relative to uniform sampling "
        f"(lower is better), over the whole training set at the end of the given epoch. "
        f"Training: MLP {args.hidden.replace(',', '-')} (ReLU), SGD lr {args.lr} momentum 0.9, "
        f"batches of {args.batch_size} drawn by the `ImportanceEstimator(uniform_mix=0.1)` "
        f"being measured, seed {args.seed}. Estimator *default*: stale dense-identity norms of "
        f"the drawn examples plus a round-robin sweep of b/2 examples after each "
        f"importance-sampled step, τ switch at (2r + 3b)/(3b) = 4/3; *no sweep*: the drawn "
        f"examples' norms only (same switch). *ideal*: q ∝ fresh ‖g_k‖; *stale λ*: q from "
        f"the estimator's table of stale norms at that moment mixed with λ uniform (λ = 0.1 "
        f"is what it draws with); *KF "
        f"bound*: q ∝ fresh ‖softmax − onehot‖ (Katharopoulos–Fleuret, no mixing). "
        f"√Tr U: √Tr Σ of uniform per draw. *age*: mean steps since each table entry was "
        f"computed; *ESS*, *k̂*: Kish ESS share and PSIS Pareto k̂ of 4000 weights 1/(Nq) from "
        f"the λ = 0.1 design; *IS share*: share of the epoch's steps that used importance "
        f"sampling. Exact design variances from all per-example norms (no Monte Carlo); "
        f"Tr Σ = Σ‖g_k‖²/(N²q_k) − ‖μ‖² (fresh norms and μ in float64). *nan* under λ = 0: a "
        f"stored norm is exactly 0 (float32 underflow in training), so that design would never "
        f"draw the example and is not defined.\n\n"
        + markdown_table(
            [
                "dataset",
                "estimator",
                "epoch",
                "test acc",
                "√Tr U",
                "ideal",
                *[f"stale λ={lam}" for lam in MIXES],
                "KF bound",
                "age",
                "coverage",
                "ESS",
                "k̂",
                "IS share",
            ],
            table,
        )  # fmt: skip
        + f"\n\nTarget stale + smoothed (λ = 0.1, default estimator) ≤ 0.6× uniform at every "
        f"measured epoch ≥ {args.mid}: **{verdict}**; worst per dataset: "
        + ", ".join(f"{d} {w:.3f}" for d, w in worst.items())
        + f". Wall time {elapsed:.0f} s ({args.threads} torch threads)."
    )
    print(body)
    if not args.no_write and not args.quick:
        write_section("importance-variance", "Importance sampling: gradient variance per draw",
                      body)  # fmt: skip


if __name__ == "__main__":
    main()
