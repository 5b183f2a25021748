"""Wall-clock training with 0, 1, 2 scoring workers (Ray actors) on this machine.

Every configuration trains the same MLP from the same initial weights on MNIST-5k with SGD
(momentum 0.9) for the same budget of training seconds; the full training loss and the test
accuracy are evaluated every ``--eval-every`` seconds of training (evaluation time is not
counted). Configurations:

* uniform: shuffled minibatches, plain mean (the baseline);
* IS, 0 workers: ``ImportanceEstimator`` defaults (in-batch dense-identity refresh, a sweep of
  b/2 examples per importance-sampled step inside the trainer);
* IS, k Ray workers: the in-batch refresh plus k scoring actors that sweep their shard with
  parameters republished every ``--sync-every`` steps (no sweep in the trainer);
* IS, 2 local workers: the same two workers run inline by the trainer (``backend="local"``, no
  Ray: the same code path without parallelism, so the cost of scoring without distribution).

The trainer uses ``--threads`` torch threads in every configuration; each actor uses one. On a
machine with C cores, k workers leave C − k cores (or less) to the trainer.

Run ``python benchmarks/bench_distributed_scoring.py`` (``--quick`` for a smoke run); results go
to the "distributed-scoring" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from probopt.distributed import ScoringPool  # noqa: E402
from probopt.experiments.datasets import load_dataset  # noqa: E402
from probopt.experiments.networks import make_network  # noqa: E402
from probopt.experiments.training import evaluate  # noqa: E402
from probopt.sampling.gradient_estimator import UniformEstimator  # noqa: E402
from probopt.sampling.importance import ImportanceEstimator  # noqa: E402
from probopt.sampling.scores import cross_entropy_per_example as ce  # noqa: E402


class TimedPool(ScoringPool):
    """Counts the trainer's seconds spent talking to the workers (poll and publish)."""

    seconds = 0.0

    def poll(self):
        t0 = time.perf_counter()
        out = super().poll()
        self.seconds += time.perf_counter() - t0
        return out

    def publish(self, model, version):
        t0 = time.perf_counter()
        super().publish(model, version)
        self.seconds += time.perf_counter() - t0


def make_config(name, net, x, y, args):
    """(estimator, pool or None) for a configuration name."""
    if name == "uniform":
        return UniformEstimator(), None
    if name == "IS, 0 workers":
        return ImportanceEstimator(uniform_mix=args.mix), None
    k = int(name.split(",")[1].split()[0])
    backend = "ray" if "Ray" in name else "local"
    pool = TimedPool(k, backend=backend, block_size=args.block_size)
    pool.start(net, x, y, version=0)
    if backend == "ray":  # actors up (torch imported) before the clock starts
        seen = set()
        while len(seen) < k:
            seen |= {b.worker for b in pool.poll()}
            time.sleep(0.05)
    est = ImportanceEstimator(uniform_mix=args.mix, pool=pool, sync_every=args.sync_every)
    return est, pool


def run(name, ds, args):
    net = make_network("mlp", (ds.num_features,), ds.num_classes, seed=args.seed,
                       hidden=tuple(int(h) for h in args.hidden.split(",")))  # fmt: skip
    x, y = ds.x_train, ds.y_train
    est, pool = make_config(name, net, x, y, args)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    est.setup(net, x, y)
    gen = torch.Generator().manual_seed(args.seed)
    curve = [(0.0, 0, *evaluate(net, x, y), evaluate(net, ds.x_test, ds.y_test)[1], None)]
    clock, steps, next_eval = 0.0, 0, args.eval_every
    while clock < args.budget:
        for index in est.epoch_batches(args.batch_size, gen):
            t0 = time.perf_counter()
            opt.zero_grad()
            est.backward(net, ce, x[index], y[index], index)
            opt.step()
            est.after_step(net)
            clock += time.perf_counter() - t0
            steps += 1
            if clock >= next_eval or clock >= args.budget:
                age = est.table.mean_age(est.version) if hasattr(est, "table") else None
                loss, _ = evaluate(net, x, y)
                acc = evaluate(net, ds.x_test, ds.y_test)[1]
                curve.append((clock, steps, loss, None, acc, age))
                next_eval += args.eval_every
            if clock >= args.budget:
                break
    active = getattr(est, "active", False)
    comm = None
    if pool is not None:
        comm = pool.seconds / steps
        pool.close()
    return curve, active, comm


def loss_at(curve, t):
    """Training loss at the last evaluation not later than t seconds."""
    return [c[2] for c in curve if c[0] <= t + 1e-9][-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="uniform;IS, 0 workers;IS, 1 Ray worker;"
                    "IS, 2 Ray workers;IS, 2 local workers")  # fmt: skip
    ap.add_argument("--budget", type=float, default=30.0, help="training seconds per config")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the configurations")
    ap.add_argument("--eval-every", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--sync-every", type=int, default=32)
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--mix", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 s per configuration")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.budget, args.eval_every, args.rounds = 4.0, 1.0, 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    configs = args.configs.split(";")
    if any("Ray" in c for c in configs):
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2)  # fmt: skip
    ds = load_dataset("mnist5k", seed=args.seed)
    t_start = time.perf_counter()
    results = {}
    for r, name in [(r, c) for r in range(1, args.rounds + 1) for c in configs]:
        curve, active, comm = run(name, ds, args)
        results[(r, name)] = (curve, active, comm)
        last = curve[-1]
        print(f"round {r} {name}: {last[1]} steps in {last[0]:.1f} s, loss {last[2]:.4f}, "
              f"acc {last[4]:.3f}, age {last[5]}", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - t_start
    marks = [t for t in (5, 10, 20, 30, 40, 80) if t <= args.budget]
    rows = []
    for (r, name), (curve, active, comm) in results.items():
        base = results.get((r, "uniform"))
        is0 = results.get((r, "IS, 0 workers"))
        last = curve[-1]
        rate = last[1] / last[0]
        rel = "" if is0 is None else f"{rate / (is0[0][-1][1] / is0[0][-1][0]):.2f}"
        row = [r, name, f"{rate:.1f}", rel, "" if comm is None else f"{comm * 1e3:.2f}"]
        row += [f"{loss_at(curve, t):.4f}" for t in marks]
        row += [f"{last[4]:.3f}", "" if last[5] is None else f"{last[5]:.0f}",
                "yes" if active else "no"]  # fmt: skip
        if base is not None and name != "uniform":
            target = loss_at(base[0], args.budget)
            reach = next((c[0] for c in curve if c[2] <= target), None)
            row.append("never" if reach is None else f"{reach:.0f} s")
        else:
            row.append("")
        rows.append(row)
    body = (
        f"Training loss (whole training set) after the given seconds of training, MNIST-5k, MLP "
        f"{args.hidden.replace(',', '-')}, SGD lr {args.lr} momentum 0.9, batches of "
        f"{args.batch_size}, seed {args.seed}, same initial weights; {args.threads} torch "
        f"thread(s) in the trainer, one per actor, on this machine ({os.cpu_count()} logical "
        f"cores, no GPU: this task had no GPU machine, so the 16-core runs the issue mentions "
        f"were not made). Importance sampling: λ = {args.mix} uniform mixing; workers score "
        f"blocks of {args.block_size} with parameters republished every {args.sync_every} "
        f"steps, at most 2 blocks queued per actor. *steps/s*: training steps per second of "
        f"training time; *× IS-0*: that rate over the rate of IS with 0 workers in the same "
        f"round; *pool ms/step*: trainer time spent polling and publishing to the workers per "
        f"step (local workers: includes their scoring); *age*: mean steps since each score "
        f"was computed, at the end; *IS on*: "
        f"whether the τ switch had importance sampling on at the end; *reaches uniform*: "
        f"training time at which the configuration first reached the final loss of uniform "
        f"in the same round. The configurations run one after the other ({args.budget:.0f} s "
        f"each), {args.rounds} round(s), on a machine shared with other jobs: compare within a "
        f"round.\n\n"
        + markdown_table(
            [
                "round",
                "configuration",
                "steps/s",
                "× IS-0",
                "pool ms/step",
                *[f"loss @{t}s" for t in marks],
                "test acc",
                "age",
                "IS on",
                "reaches uniform",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nWall time {elapsed:.0f} s."
    )
    print(body)
    if not args.no_write and not args.quick:
        write_section("distributed-scoring", "Importance sampling: distributed scoring workers",
                      body)  # fmt: skip


if __name__ == "__main__":
    main()
