"""Step cost of VSGD against torch.optim Adam/AdamW and pytorch-optimizer's VSGD.

Same parameter layout for everyone (default: 10M float32 parameters in 10 tensors, gradients of
scale 1e-2). The optimizers take turns: each round times every optimizer for ``--steps`` steps,
in a shuffled order, and the reported time is the median over rounds, so background load hits all
of them alike. Ratios are to torch Adam(foreach) measured in the same run.

    python benchmarks/bench_vsgd_step.py            # CPU: 10M params in 10 tensors
    python benchmarks/bench_vsgd_step.py --quick    # smoke run
    python benchmarks/bench_vsgd_step.py --device cuda --params 100000000 --tensors 100

On CUDA, times are taken with CUDA events around each block of steps.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

from probopt.optim import VSGD  # noqa: E402


def _layout(n_params: int, n_tensors: int, device: str) -> list[torch.Tensor]:
    per = n_params // n_tensors
    params = []
    for i in range(n_tensors):
        p = torch.randn(per, device=device, requires_grad=True)
        g = torch.Generator(device="cpu").manual_seed(i)
        p.grad = (torch.randn(per, generator=g) * 1e-2).to(device)
        params.append(p)
    return params


def _candidates(device: str) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    c: dict[str, Callable[[list[torch.Tensor]], object]] = {
        "torch Adam (foreach)": lambda p: torch.optim.Adam(p, foreach=True),
        "torch Adam (fused)": lambda p: torch.optim.Adam(p, fused=True),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, foreach=True),
        "probopt VSGD (default)": lambda p: VSGD(p),
        "probopt VSGD (default, nonfinite='ignore')": lambda p: VSGD(p, nonfinite="ignore"),
        "probopt VSGD (foreach)": lambda p: VSGD(p, foreach=True),
        "probopt VSGD (reference loop)": lambda p: VSGD(p, foreach=False),
    }
    try:
        from pytorch_optimizer import VSGD as PoVSGD

        c["pytorch-optimizer VSGD"] = lambda p: PoVSGD(p)
    except ImportError:
        pass
    return c


def _time(opt: object, steps: int, device: str) -> float:
    """Seconds per step over ``steps`` steps."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="1M params, 3 rounds; no doc update")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.rounds, args.steps = 1_000_000, 3, 2
    cands = _candidates(args.device)
    opts = {name: make(_layout(args.params, args.tensors, args.device)) for name, make in
            cands.items()}  # fmt: skip
    for opt in opts.values():  # warm up: state allocation, kernel compilation, caches
        _time(opt, 2, args.device)
    times: dict[str, list[float]] = {name: [] for name in opts}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(opts)
        rng.shuffle(order)
        for name in order:
            times[name].append(_time(opts[name], args.steps, args.device))
    base = statistics.median(times["torch Adam (foreach)"])
    rows = []
    for name in opts:
        med = statistics.median(times[name])
        fastest = min(times[name])
        rows.append([name, f"{med * 1e3:.2f}", f"{fastest * 1e3:.2f}", f"{med / base:.2f}×"])
    header = ["optimizer", "median ms/step", "min ms/step", "ratio to Adam (foreach)"]
    table = markdown_table(header, rows)
    print(table)
    if args.quick or args.no_write:
        return
    per = args.params // args.tensors
    vsgd_ratio = statistics.median(times["probopt VSGD (default)"]) / base
    body = (
        f"{args.params / 1e6:g}M float32 parameters in {args.tensors} tensors of {per:,} on "
        f"{args.device}; {args.rounds} interleaved rounds of {args.steps} steps, median.\n\n"
        f"{table}\n\n"
        f"Target (issue 2): VSGD ≤ 1.3× Adam(foreach) on CPU. Measured: "
        f"{vsgd_ratio:.2f}× with the default path "
        f"({'met' if vsgd_ratio <= 1.3 else 'missed'}). The default path on CPU is the fused C "
        f"kernel (one pass: reads θ, ĝ, μ, b_g, b_ĝ and writes θ, μ, b_g, b_ĝ, 36 bytes per "
        f"parameter against Adam's 28) plus the non-finite check (one more read of ĝ); "
        f"'foreach' is the in-place blocked torch path used when no C compiler is available."
    )
    if args.device == "cpu":
        body += (
            "\n\nGPU target (100M fp32 parameters in 100 tensors on one H100, ≤ 1.5 ms/step): "
            "not measured: no GPU machine was lent to this task. The Triton kernel "
            "(`probopt/optim/_vsgd_triton.py`, one launch per step for all tensors) was checked "
            "for correctness only, under Triton's CPU interpreter (float64 parity 1e-15)."
        )
    write_section(f"vsgd-step-{args.device}", f"VSGD step cost ({args.device})", body)


if __name__ == "__main__":
    main()
