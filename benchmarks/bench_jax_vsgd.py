"""JAX VSGD: cost per optimizer step against optax.adam, and NumPyro SVI wall time against Adam.

1. **Per step.** One jitted step (``tx.update`` + ``optax.apply_updates``) with donated
   parameter and state buffers, on a layout of ``--params`` float32 parameters split into
   ``--arrays`` equal arrays, for ``optax.adam``, ``probopt.jax.vsgd`` with its fused FFI kernel
   (``implementation="auto"`` on CPU) and with its XLA path (``implementation="xla"``), each
   with the default ``"skip"`` non-finite policy and with ``nonfinite="ignore"``, the kernel
   with the state not donated, the kernel with ``"skip"`` in the select form it takes off CPU,
   and ``probopt.jax.constant_vsgd``. Rounds of
   ``--steps-per-round`` steps are interleaved between the optimizers (this machine is shared
   and noisy); the table gives the median time per step and its ratio to Adam's, both measured
   in this run.
2. **NumPyro SVI.** Bayesian multinomial logistic regression on the bundled digits data (1437
   training images, 64 features, 10 classes: 650 latent weights, a Normal(0, 1) prior) with an
   ``AutoNormal`` guide and ``Trace_ELBO``; ``--svi-steps`` steps in one ``lax.scan`` with
   ``numpyro.optim.Adam`` and with ``probopt.jax.vsgd``, at each of ``--svi-lrs``. Reported:
   compile time, steady-state time per step, the final loss (mean of the last 10 % of steps)
   and the test accuracy of the posterior-median weights.

Run ``python benchmarks/bench_jax_vsgd.py`` (a few minutes on 2 cores) or ``--quick`` (a smoke
run that writes nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

import probopt.jax as pj  # noqa: E402
from probopt.jax import _base as jax_base  # noqa: E402
from probopt.jax._ffi_cpu import vsgd_kernel  # noqa: E402


def make_step(tx, donate=(0, 1)):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=donate)


def make_select_step(tx, donate=(0, 1)):
    """The step with ``nonfinite="skip"`` in its select form (``jnp.where`` between the new and
    the old state, what the policy does off CPU), traced with the switch of
    ``probopt.jax._base`` turned off."""
    step = make_step(tx, donate)

    def call(*args):
        saved = jax_base._skip_by_cond
        jax_base._skip_by_cond = lambda: False
        try:
            return step(*args)
        finally:
            jax_base._skip_by_cond = saved

    return call


def per_step(num_params, num_arrays, rounds, steps_per_round):
    size = num_params // num_arrays
    kernel = "FFI kernel" if vsgd_kernel() is not None else "no kernel: XLA"
    key = jax.random.PRNGKey(0)
    grads = [0.01 * jax.random.normal(k, (size,)) for k in jax.random.split(key, num_arrays)]
    xla = {"implementation": "xla"}
    ignore = {"nonfinite": "ignore"}
    optimizers = {
        "optax.adam": (optax.adam(1e-3), (0, 1), make_step),
        f"probopt.jax.vsgd ({kernel})": (pj.vsgd(1e-3), (0, 1), make_step),
        f'vsgd(nonfinite="ignore") ({kernel})': (pj.vsgd(1e-3, **ignore), (0, 1), make_step),
        'vsgd(implementation="xla")': (pj.vsgd(1e-3, **xla), (0, 1), make_step),
        'vsgd(implementation="xla", nonfinite="ignore")': (
            pj.vsgd(1e-3, **xla, **ignore), (0, 1), make_step,
        ),
        f"probopt.jax.vsgd ({kernel}), state not donated": (pj.vsgd(1e-3), (0,), make_step),
        f'probopt.jax.vsgd ({kernel}), skip by select (the off-CPU form)': (
            pj.vsgd(1e-3), (0, 1), make_select_step,
        ),
        "probopt.jax.constant_vsgd": (pj.constant_vsgd(1e-3), (0, 1), make_step),
    }  # fmt: skip
    runs = {}
    for name, (tx, donate, make) in optimizers.items():
        params = [jnp.ones((size,)) for _ in range(num_arrays)]
        state = tx.init(params)
        step = make(tx, donate)
        t0 = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready(params)
        compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            params, state = step(params, state, grads)
        jax.block_until_ready(params)
        runs[name] = {"step": step, "params": params, "state": state, "times": [],
                      "compile": compile_s}  # fmt: skip
    for _ in range(rounds):
        for run in runs.values():
            params, state = run["params"], run["state"]
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                params, state = run["step"](params, state, grads)
            jax.block_until_ready(params)
            run["times"].append((time.perf_counter() - t0) / steps_per_round)
            run["params"], run["state"] = params, state
    base = statistics.median(runs["optax.adam"]["times"])
    rows = []
    for name, run in runs.items():
        med = statistics.median(run["times"])
        ratios = [t / b for t, b in zip(run["times"], runs["optax.adam"]["times"])]
        rows.append([name, round(1e3 * med, 2), round(med / base, 3),
                     f"{min(ratios):.2f}-{max(ratios):.2f}", round(run["compile"], 2)])  # fmt: skip
    header = ["optimizer", "ms / step (median)", "× adam", "per-round ratio range", "compile s"]
    return markdown_table(header, rows), [row[1] for row in rows]


def svi_benchmark(num_steps, lrs):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from probopt.experiments import load_dataset

    ds = load_dataset("digits", seed=0)
    x = jnp.asarray(ds.x_train.numpy())
    y = jnp.asarray(ds.y_train.numpy())
    x_test, y_test = ds.x_test.numpy(), ds.y_test.numpy()
    d, k = x.shape[1], ds.num_classes

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d, k]).to_event(2))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([k]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=x @ w + b), obs=y)

    rows = []
    runs = [(name, lr, make(lr)) for lr in lrs
            for name, make in [("numpyro.optim.Adam", numpyro.optim.Adam),
                               ("probopt.jax.vsgd", pj.vsgd)]]  # fmt: skip
    for name, lr, optim in runs:
        guide = AutoNormal(model)
        svi = SVI(model, guide, optim, Trace_ELBO())
        state = svi.init(jax.random.PRNGKey(0), x, y)

        @jax.jit
        def run(state, svi=svi):
            return jax.lax.scan(lambda s, _: svi.update(s, x, y), state, None, length=num_steps)

        t0 = time.perf_counter()
        compiled = run.lower(state).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        final, losses = compiled(state)
        jax.block_until_ready(losses)
        run_s = time.perf_counter() - t0
        params = guide.median(svi.get_params(final))
        logits = x_test @ np.asarray(params["w"]) + np.asarray(params["b"])
        acc = float((logits.argmax(1) == y_test).mean())
        tail = float(np.mean(np.asarray(losses)[-max(num_steps // 10, 1) :]))
        raw = svi.get_params(final)
        loc_max = float(np.abs(np.asarray(raw["w_auto_loc"])).max())
        scale_max = float(np.asarray(raw["w_auto_scale"]).max())
        rows.append([name, lr, round(compile_s, 2), round(1e3 * run_s / num_steps, 3),
                     round(tail, 1), round(acc, 4), round(loc_max, 2),
                     round(scale_max, 2)])  # fmt: skip
    header = ["optimizer", "lr", "compile s", "ms / step", "final loss (-ELBO)", "test accuracy",
              "max abs loc(w)", "max scale(w)", "× Adam time (same lr)"]  # fmt: skip
    adam = {row[1]: row[3] for row in rows if row[0] == "numpyro.optim.Adam"}
    for row in rows:
        row.append(round(row[3] / adam[row[1]], 3))
    return markdown_table(header, rows), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, writes nothing")
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--small-params", type=int, default=100_000,
                        help="a second, cache-resident layout")  # fmt: skip
    parser.add_argument("--arrays", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--svi-steps", type=int, default=3000)
    parser.add_argument("--svi-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    args = parser.parse_args()
    if args.quick:
        args.params, args.rounds, args.steps_per_round, args.svi_steps = 100_000, 2, 2, 50
        args.svi_lrs = [0.01]
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    step_table, ms = per_step(args.params, args.arrays, args.rounds, args.steps_per_round)
    print(step_table)
    small_table, _ = per_step(args.small_params, args.arrays, args.rounds, 4 * args.steps_per_round)
    print(small_table)
    svi_table, svi_rows = svi_benchmark(args.svi_steps, args.svi_lrs)
    print(svi_table)
    if args.quick:
        return
    by = {(r[0], r[1]): r for r in svi_rows}
    pairs = [(by["numpyro.optim.Adam", lr], by["probopt.jax.vsgd", lr]) for lr in args.svi_lrs]
    worse = [str(v[1]) for a, v in pairs if v[4] > 2 * a[4]]
    drift = [str(v[1]) for a, v in pairs if v[6] > 2 * a[6]]
    close = [str(v[1]) for a, v in pairs if abs(v[5] - a[5]) <= 0.01]
    svi_text = (
        f"VSGD with its defaults and no learning-rate decay: its final loss is more than twice "
        f"Adam's at lr = {', '.join(worse) or 'none'}; its largest posterior mean of a weight is "
        f"more than twice Adam's at lr = {', '.join(drift) or 'none'}; the test accuracies are "
        f"within 0.01 of each other at lr = {', '.join(close) or 'none'}."
    )
    body = f"""JAX {jax.__version__}, optax {optax.__version__}, backend `{jax.default_backend()}`.
**No GPU on this machine**: the issue's target (≤ 1.2× optax.adam on one H100, 100M float32
parameters in 100 arrays, where optax.adam took 2.05 ms) cannot be measured here. This is the
CPU layout of {args.params:,} float32 parameters in {args.arrays} arrays, one jitted step
(`update` + `apply_updates`) with donated buffers; {args.rounds} rounds of
{args.steps_per_round} steps interleaved between the optimizers.

{step_table}

The same with {args.small_params:,} parameters in {args.arrays} arrays (cache-resident),
{4 * args.steps_per_round} steps per round:

{small_table}

Memory traffic per step, in passes over a parameter-sized array, if each optimizer ran as one
fused loop: Adam reads g, m, v, θ and writes m, v, θ (7); VSGD reads g, μ, b_g, b_ĝ, θ and writes
μ, b_g, b_ĝ, θ (9, a floor of 9/7 = 1.29×); `nonfinite="skip"` reads g once more for its check
(10). XLA's CPU backend does not fuse VSGD's four outputs (μ, b_g, b_ĝ and the update) into one
loop: the compiled HLO of the XLA path materialises the gain k = b_g/(b_g + b_ĝ) and copies the
donated μ and b_ĝ before they are overwritten, about 27 passes per step. On CPU,
`implementation="auto"` therefore runs each leaf's state update as one C++ loop (an XLA FFI
custom call, `probopt/_kernels/vsgd_xla_ffi.cc`) that updates μ, b_g and b_ĝ in place on the
donated buffers (no copy in the compiled step) and writes the direction u: 8 passes, plus 3 for
XLA's fused `θ − η u`, 11 in all (11/7 = 1.57× Adam's ideal) and a temporary buffer for u, since
`scale_by_vsgd` still returns u to the rest of the optax chain. Kernel with `"ignore"`:
{ms[2]} ms against {ms[4]} ms for the XLA path and {ms[0]} ms for Adam.

`nonfinite="skip"` on CPU runs the inner update under `lax.cond(all_finite(g), update,
skip)` (`probopt/jax/_base.py`, Note [probopt: skip by cond on CPU]), so the kernel's state
stays in place: the default `probopt.jax.vsgd` takes {ms[1]} ms against {ms[2]} ms with
`"ignore"`. The difference is the finiteness check (one more pass over g) and the conditional
boundary: XLA does not fuse across it, so the update −η u is written out by the branch and
read back by `apply_updates` (two more passes). The select form of the policy (`jnp.where`
between the new and the old state, used off CPU, where a conditional reads its predicate back
to the host) keeps the old state alive past the in-place update, so XLA copies every state
buffer first: {ms[6]} ms. The GPU backend fuses multi-output loops differently and the kernel
is CPU only; the H100 figure needs a GPU run.

NumPyro SVI, Bayesian multinomial logistic regression on digits (650 latent weights,
`AutoNormal`, `Trace_ELBO`, {args.svi_steps} steps in one `lax.scan`, the same learning rates
for both; final loss = mean -ELBO over the last 10 % of steps, test accuracy of the
posterior-median weights on the 360 held-out images; the largest posterior mean and scale of
a weight):

{svi_table}

{svi_text}
"""
    write_section("jax-vsgd", "JAX VSGD: optax step cost and NumPyro SVI", body)


if __name__ == "__main__":
    main()
