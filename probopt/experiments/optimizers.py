"""The optimizers that ``probopt compare`` and the benchmarks know by name.

Each entry builds a fresh optimizer from ``(params, lr=None, **kwargs)``; ``lr=None`` means the
entry's documented default, chosen for the small networks of :mod:`probopt.experiments.networks`
(an MLP or a small CNN, minibatches of 32--128, inputs standardised):

=============  ===================================  ==========  =======================
name           optimizer                            default lr  other settings
=============  ===================================  ==========  =======================
sgdm           ``torch.optim.SGD``                  0.05        momentum 0.9
adam           ``torch.optim.Adam``                 1e-3        torch's defaults
adamw          ``torch.optim.AdamW``                1e-3        weight_decay 0.01
vsgd           ``probopt.optim.VSGD``               0.01        its defaults
constant-vsgd  ``probopt.optim.ConstantVSGD``       0.3         its defaults
gq-sgdm        ``probopt.optim.GradQueue`` (sgdm)   0.05        GradQueue's defaults
gq-adamw       ``probopt.optim.GradQueue`` (adamw)  1e-3        GradQueue's defaults
=============  ===================================  ==========  =======================

Why these learning rates. 1e-3 is Adam's and AdamW's own default. SGD with momentum 0.9 takes
steps about ten times the plain gradient; 0.05 trains the digits MLP well where 0.2 blows up.
VSGD divides its posterior mean by ``sqrt(mu**2 + sigma**2)``, so that, as in Adam, a coordinate
moves by about ``lr`` at most per step; its paper uses 0.1 with a step schedule on deep CNNs and
0.01 in its one small-network experiment (MNIST), which we take. Measured on the digits MLP of
``probopt compare`` (20 epochs, batch 32, mean final test accuracy of 3 seeds): sgdm
0.01 / 0.05 / 0.2: 96.4 / 96.8 / 90.2 %; adamw 3e-4 / 1e-3 / 3e-3: 95.2 / 96.8 / 97.4 %;
vsgd 0.003 / 0.01 / 0.03 / 0.1: 97.3 / 97.5 / 96.7 / 95.1 %. ConstantVSGD with small gradients
steps like SGD on an exponential average of the gradients with learning rate ``lr / sigma``
(``sigma`` about 1 with its default prior), so it needs a much larger ``lr`` than VSGD:
0.03 / 0.1 / 0.3 / 1 / 3 give 95.1 / 96.5 / 96.5 / 96.9 / 93.7 % (3 blows the loss up); we take
0.3, ten times below the blow-up. ``benchmarks/bench_vsgd_accuracy.py`` sweeps the learning
rates around these defaults on two CNN tasks. The Grad Queue entries use the inner
optimizer's learning rate.

The probopt optimizers are imported when an entry is built, never when this module is imported,
so an entry whose class is not in this version of :mod:`probopt.optim` is listed but not
:func:`available <is_available>`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "available_optimizers",
    "default_lr",
    "is_available",
    "make_optimizer",
    "warm_up",
]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer of the registry.

    Attributes:
        name: the registry name (``--optimizers`` of ``probopt compare``).
        description: one line for ``probopt optimizers``.
        default_lr: the learning rate used when none is given.
        build: ``build(params, lr, **kwargs)`` returns the optimizer.
        requires: names in :mod:`probopt.optim` the entry needs (checked lazily).
        defaults: the settings other than ``lr`` that the entry passes (documentation; the values
            are already baked into ``build``, and ``kwargs`` override them).
    """

    name: str
    description: str
    default_lr: float
    build: Callable[..., Any]
    requires: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)


def _probopt_optim(name: str) -> Any:
    module = importlib.import_module("probopt.optim")
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(
            f"optimizer class probopt.optim.{name} is not in this version of probopt"
        ) from None


def _sgdm(params: Params, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, **{"momentum": 0.9, **kw})


def _adam(params: Params, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, **kw)


def _adamw(params: Params, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, **{"weight_decay": 0.01, **kw})


def _vsgd(params: Params, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return _probopt_optim("VSGD")(params, lr=lr, **kw)


def _constant_vsgd(params: Params, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return _probopt_optim("ConstantVSGD")(params, lr=lr, **kw)


# ---------------------------------------------------------------------------------------------
# Grad Queue entries. GradQueue wraps an inner optimizer: ``GradQueue(inner, **kw)`` rewrites the
# gradients (boosting rare components) and then lets ``inner`` step. The entries are registered
# now and become available as soon as ``probopt.optim.GradQueue`` exists; until then
# ``make_optimizer("gq-sgdm", ...)`` raises a ValueError that says so.
def _gq(inner: Callable[..., torch.optim.Optimizer]) -> Callable[..., Any]:
    def build(params: Params, lr: float, **kw: Any) -> Any:
        return _probopt_optim("GradQueue")(inner(params, lr), **kw)

    return build


_ENTRIES = (
    OptimizerSpec("sgdm", "torch SGD with momentum 0.9", 0.05, _sgdm, (), {"momentum": 0.9}),
    OptimizerSpec("adam", "torch Adam (betas 0.9, 0.999)", 1e-3, _adam),
    OptimizerSpec(
        "adamw",
        "torch AdamW (decoupled weight decay 0.01)",
        1e-3,
        _adamw,
        (),
        {"weight_decay": 0.01},
    ),
    OptimizerSpec(
        "vsgd", "variational SGD (Chen et al. 2024), probopt.optim.VSGD", 0.01, _vsgd, ("VSGD",)
    ),
    OptimizerSpec(
        "constant-vsgd",
        "VSGD with constant precisions, probopt.optim.ConstantVSGD",
        0.3,
        _constant_vsgd,
        ("ConstantVSGD",),
    ),
    OptimizerSpec(
        "gq-sgdm", "Grad Queue (Al Hasib 2024) around sgdm", 0.05, _gq(_sgdm), ("GradQueue",)
    ),
    OptimizerSpec(
        "gq-adamw", "Grad Queue (Al Hasib 2024) around adamw", 1e-3, _gq(_adamw), ("GradQueue",)
    ),
)

#: Every registered optimizer by name (available or not; see :func:`available_optimizers`).
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _ENTRIES}


def is_available(name: str) -> bool:
    """Whether the classes that optimizer ``name`` needs exist in this probopt.

    Example:
        >>> is_available("sgdm")
        True
    """
    spec = _spec(name)
    if not spec.requires:
        return True
    module = importlib.import_module("probopt.optim")
    return all(hasattr(module, cls) for cls in spec.requires)


def available_optimizers() -> tuple[str, ...]:
    """Names of the registered optimizers that can be built now, in registry order."""
    return tuple(name for name in OPTIMIZERS if is_available(name))


def default_lr(name: str) -> float:
    """The documented default learning rate of optimizer ``name``.

    Example:
        >>> default_lr("adamw")
        0.001
    """
    return _spec(name).default_lr


def make_optimizer(name: str, params: Params, lr: float | None = None, **kwargs: Any) -> Any:
    """Build the registered optimizer ``name``.

    Args:
        name: a key of :data:`OPTIMIZERS`.
        params: the parameters (or parameter groups) to optimize.
        lr: learning rate; ``None`` takes the entry's documented default.
        **kwargs: further settings passed to the optimizer; they override the entry's defaults.

    Raises:
        ValueError: unknown name, or an entry whose class this probopt does not have.

    Example:
        >>> opt = make_optimizer("sgdm", [torch.zeros(3, requires_grad=True)])
        >>> opt.defaults["lr"], opt.defaults["momentum"]
        (0.05, 0.9)
    """
    spec = _spec(name)
    if not is_available(name):
        missing = ", ".join(f"probopt.optim.{c}" for c in spec.requires)
        raise ValueError(f"optimizer {name!r} needs {missing}, which this probopt does not have")
    return spec.build(params, spec.default_lr if lr is None else lr, **kwargs)


def warm_up(name: str, device: str | torch.device = "cpu") -> None:
    """Take one step of optimizer ``name`` on a throwaway tensor.

    One-off costs (lazy imports, a kernel compiled on first use) then stay out of the timings of
    the first real run.

    Example:
        >>> warm_up("adamw")
    """
    p = torch.nn.Parameter(torch.zeros(8, device=device))
    p.grad = torch.ones_like(p)
    make_optimizer(name, [p]).step()


def _spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
        ) from None
