"""Shared pieces of probopt's torch optimizers: validation, the non-finite policy, doc fragments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NONFINITE_POLICIES",
    "NonFinitePolicy",
    "NonFiniteGradientError",
    "all_finite",
    "check_finite_grads",
    "check_interval",
    "check_lr",
    "check_nonfinite",
    "check_positive",
    "check_state_dict",
]

NonFinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "ignore")


class NonFiniteGradientError(FloatingPointError):
    """Raised by an optimizer with ``nonfinite="raise"`` before it changes anything."""


# --------------------------------------------------------------------------------------------
# validation: one check per hyperparameter, the offending value in the message


def check_lr(lr: float | Tensor) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0.0 if allow_zero else value > 0.0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {bound})")


def check_interval(name: str, value: float, low: float, high: float, *, closed: str = "[]") -> None:
    """Check ``value`` lies in an interval; ``closed`` is one of ``"[]", "[)", "(]", "()"``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if closed[0] == "[" else value > low) and (
            value <= high if closed[1] == "]" else value < high
        )
    if not ok:
        interval = f"{closed[0]}{low}, {high}{closed[1]}"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {interval})")


def check_nonfinite(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"Invalid nonfinite policy: {policy!r} (choose one of {', '.join(NONFINITE_POLICIES)})"
        )


# --------------------------------------------------------------------------------------------
# the non-finite gradient policy


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when every entry of every tensor is finite (one host synchronisation)."""
    if not tensors:
        return True
    from probopt._kernels.cpu import all_finite_cpu

    fast = all_finite_cpu(list(tensors))
    if fast is not None:
        return fast
    # the inf-norm cannot overflow and is NaN as soon as one entry is NaN
    norms = torch._foreach_norm(list(tensors), float("inf"))
    return bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())


def check_finite_grads(
    optimizer: torch.optim.Optimizer, grads: Sequence[Tensor], policy: str
) -> bool:
    """Apply the documented non-finite policy; return True when the step may go ahead.

    See :data:`_nonfinite_doc`. With ``"skip"`` the optimizer's ``num_skipped_steps`` grows by one
    and nothing is changed; with ``"raise"`` a :class:`NonFiniteGradientError` is raised before
    anything is changed; ``"ignore"`` does not look.
    """
    for g in grads:
        if g.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
    if policy == "ignore" or all_finite(grads):
        return True
    if policy == "raise":
        raise NonFiniteGradientError(
            f"{type(optimizer).__name__}: a gradient holds NaN or Inf; no parameter or state was "
            "changed (construct the optimizer with nonfinite='skip' to skip such steps)"
        )
    optimizer.num_skipped_steps = getattr(optimizer, "num_skipped_steps", 0) + 1
    return False


def check_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: object,
    *,
    required: Sequence[str],
    nonnegative: Sequence[str] = (),
    flat: Sequence[str] = (),
) -> dict[int, Tensor]:
    """Check a saved optimizer state against ``optimizer`` before anything is loaded.

    torch's ``Optimizer.load_state_dict`` checks the number and sizes of the parameter groups
    only: a state tensor of the wrong shape would be read (and, by the fused kernels, written)
    out of bounds at the next step, and a missing key or a NaN would fail or spread only then.
    Checked here, each with a ``ValueError`` that names the parameter and the key: the dict's
    layout, the groups' sizes, state only for listed parameters, every ``required`` key present,
    per-coordinate tensors shaped like their parameter (the ``flat`` keys: flattened), every
    value finite, ``step`` a non-negative count, the ``nonnegative`` keys (Gamma rates,
    variances) ``>= 0``.

    Returns:
        The map from saved parameter ids to this optimizer's parameters.
    """
    name = type(optimizer).__name__
    if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)):
        raise ValueError(
            f"{name}.load_state_dict expects the dict of state_dict(), with keys 'state' and "
            "'param_groups'"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, optimizer.param_groups)
    ):
        raise ValueError(
            f"{name}: the saved parameter groups have sizes "
            f"{[len(g['params']) for g in saved_groups]}, this optimizer's "
            f"{[len(g['params']) for g in optimizer.param_groups]}"
        )
    id_map = {
        i: p
        for saved, group in zip(saved_groups, optimizer.param_groups)
        for i, p in zip(saved["params"], group["params"])
    }
    for pid, state in state_dict["state"].items():
        if pid not in id_map:
            raise ValueError(f"{name}: state for parameter {pid!r}, which no parameter group lists")
        param = id_map[pid]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{name}: the state of parameter {pid} lacks {missing}")
        for key, value in state.items():
            where = f"{name}: state {key!r} of parameter {pid}"
            if key == "step":
                step = float(value)
                if not (math.isfinite(step) and step >= 0 and step == int(step)):
                    raise ValueError(f"{where} is {step!r}, not a step count")
                continue
            if not isinstance(value, Tensor):
                continue
            want = (param.numel(),) if key in flat else tuple(param.shape)
            if tuple(value.shape) != want:
                raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {want}")
            if value.is_floating_point() and not bool(value.isfinite().all()):
                raise ValueError(f"{where} holds NaN or Inf")
            if key in nonnegative and bool((value < 0).any()):
                raise ValueError(f"{where} has negative entries (it must be >= 0)")
    return id_map


# --------------------------------------------------------------------------------------------
# doc fragments shared by the optimizers' docstrings (torch's _foreach_doc pattern)

_nonfinite_doc = r"""nonfinite (str, optional): what a step does when a gradient holds NaN or Inf.
            ``"skip"``: nothing changes (parameters and state keep their values), the step is
            counted in ``num_skipped_steps``; ``"raise"``: raise
            :class:`~probopt.optim.NonFiniteGradientError` before anything changes;
            ``"ignore"``: do not check (fastest; a NaN then spreads into the state, as in
            torch.optim). The check costs one read of the gradients and one host sync per step.
            (default: ``"skip"``)"""

_foreach_doc = r"""foreach (bool, optional): use the multi-tensor (``torch._foreach_*``) path.
            ``None`` picks it whenever the parameters allow it. (default: None)"""

_fused_doc = r"""fused (bool, optional): use the fused path, one pass over memory per step: a C loop
            compiled on first use on CPU (Note [probopt: CPU kernels]; needs a C compiler), a
            Triton kernel on CUDA. ``None`` picks it whenever it is available, and the foreach
            path otherwise; tensors the kernel does not handle (half precision, non-contiguous,
            complex) take the foreach path. (default: None)"""

_maximize_doc = r"""maximize (bool, optional): maximize the objective with respect to the params,
            instead of minimizing. (default: False)"""
