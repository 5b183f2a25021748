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
