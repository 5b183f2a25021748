"""Cost of the diagnostics recorder on a training step (VSGD), off and on.

Configurations, each with its own copy of the network and optimizer, stepped in turns on the
same minibatches (round robin, blocks of steps) so that machine noise hits all alike:

* ``none``: no recorder;
* ``paused``: a recorder built and paused (its hooks removed: must cost nothing);
* ``attached, idle``: hooks attached, stride so large that no step is recorded (the per-step
  cost of "off" while attached: one integer test per hook);
* ``every 10`` / ``every step``: posterior summaries of every tensor and 3 coordinates each;
* ``every step + variance/10``: plus the estimator's design variance every 10 steps (one
  vmapped per-example backward of all parameters).

Reported: the median over blocks of the time per step, relative to ``none`` in the same round.

    python benchmarks/bench_diagnostics_overhead.py            # full run, writes the section
    python benchmarks/bench_diagnostics_overhead.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section  # noqa: E402

from probopt.diagnostics import Recorder  # noqa: E402
from probopt.optim import VSGD  # noqa: E402
from probopt.sampling.gradient_estimator import UniformEstimator  # noqa: E402

CONFIGS = ("none", "paused", "attached, idle", "every 10", "every step",
           "every step + variance/10")  # fmt: skip


def _loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, t, reduction="none")


def _setup(config: str, net0: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    net = copy.deepcopy(net0)
    opt = VSGD(net.parameters(), lr=0.01)
    est = UniformEstimator()
    est.setup(net, x, y)
    rec = None
    if config == "paused":
        rec = Recorder(opt, model=net)
        rec.pause()
    elif config == "attached, idle":
        rec = Recorder(opt, model=net, every=10**9)
    elif config == "every 10":
        rec = Recorder(opt, model=net, every=10)
    elif config == "every step":
        rec = Recorder(opt, model=net, every=1)
    elif config == "every step + variance/10":
        rec = Recorder(opt, model=net, every=1, estimator=est, variance_every=10)
    return {"net": net, "opt": opt, "est": est, "rec": rec}


def _block(run: dict, batches: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    net, opt, est = run["net"], run["opt"], run["est"]
    start = time.perf_counter()
    for index in batches:
        opt.zero_grad()
        est.backward(net, _loss, x[index], y[index], index)
        opt.step()
    return (time.perf_counter() - start) / len(batches)


def measure(width: int, depth: int, rounds: int, block: int, batch: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    n, d = 2048, 256
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), nn.ReLU()]
    torch.manual_seed(0)
    net0 = nn.Sequential(*layers, nn.Linear(width, 10))
    runs = {c: _setup(c, net0, x, y) for c in CONFIGS}
    warm = [torch.randint(0, n, (batch,), generator=g) for _ in range(3)]
    for run in runs.values():
        _block(run, warm, x, y)
    ratios: dict[str, list[float]] = {c: [] for c in CONFIGS}
    base: list[float] = []
    for _ in range(rounds):
        batches = [torch.randint(0, n, (batch,), generator=g) for _ in range(block)]
        times = {c: _block(runs[c], batches, x, y) for c in CONFIGS}
        base.append(times["none"])
        for c in CONFIGS:
            ratios[c].append(times[c] / times["none"])
    out = {c: statistics.median(r) for c, r in ratios.items()}
    out["ms per step (none)"] = 1e3 * statistics.median(base)
    out["params"] = sum(p.numel() for p in net0.parameters())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; prints, writes nothing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, block = (3, 5) if args.quick else (15, 20)
    shapes = [(128, 1), (512, 2)]
    rows = []
    start = time.perf_counter()
    for width, depth in shapes:
        res = measure(width, depth, rounds, block, batch=64)
        rows.append([f"MLP {depth}x{width}", res["params"], res["ms per step (none)"]]
                    + [res[c] for c in CONFIGS[1:]])  # fmt: skip
        print(rows[-1], flush=True)
    header = ["network", "parameters", "ms / step, no recorder"] + [f"{c} (×)" for c in CONFIGS[1:]]
    table = markdown_table(header, rows)
    print(table)
    if args.quick:
        return
    body = (
        "Time of a training step (batch 64: forward, backward, `VSGD.step`) with a "
        "`probopt.diagnostics.Recorder`, relative to the same step without one: median over "
        f"{rounds} rounds of {block} steps, the configurations taking turns on the same "
        "minibatches (the machine is shared). Recording reads every tensor's posterior "
        "(summaries) and 3 coordinates per tensor; `variance/10` adds the estimator's design "
        "variance every 10 steps (a vmapped per-example backward of all parameters). Inputs: "
        "2048 synthetic examples of 256 features, 10 classes.\n\n"
        + table
        + f"\n\nWall time {time.perf_counter() - start:.0f} s."
    )
    write_section("diagnostics-overhead", "Diagnostics recorder: cost per training step", body)


if __name__ == "__main__":
    main()
