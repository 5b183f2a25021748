"""PyroOptim factories for probopt's optimizers (Pyro's ``pyro.optim.Adam`` pattern).

``pyro.infer.SVI`` accepts only :class:`pyro.optim.PyroOptim` objects. PyroOptim creates one
torch optimizer per Pyro parameter, lazily, and calls ``step()`` without a closure, which
probopt's optimizers support. ``optim_args`` is a dict, or a callable from the parameter's name to
a dict for per-parameter settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from probopt._optional import require

__all__ = ["ConstantVSGD", "GradQueue", "VSGD"]

OptimArgs = dict[str, Any] | Callable[[str], dict[str, Any]]


def _pyro_optim(constructor: type, optim_args: OptimArgs, clip_args: Any = None) -> Any:
    pyro_optim = require("pyro.optim", "probopt.pyro")
    return pyro_optim.PyroOptim(constructor, optim_args, clip_args)


def VSGD(optim_args: OptimArgs, clip_args: dict[str, float] | None = None) -> Any:  # noqa: N802
    """:class:`probopt.optim.VSGD` as a Pyro optimizer, for ``pyro.infer.SVI``.

    Args:
        optim_args: keyword arguments of :class:`probopt.optim.VSGD` (``lr``, ``variance_ratio``,
            ``prior_strength``, ...), or a callable from parameter name to such a dict.
        clip_args: Pyro's gradient clipping arguments (``clip_norm`` or ``clip_value``).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(1.0))
        >>> def guide():
        ...     pyro.param("loc", torch.tensor(0.0))
        >>> pyro.clear_param_store()
        >>> svi = SVI(model, guide, VSGD({"lr": 0.01}), loss=Trace_ELBO())
        >>> svi.step()
        1.4189...
    """
    from probopt.optim import VSGD as _VSGD

    return _pyro_optim(_VSGD, optim_args, clip_args)


def ConstantVSGD(optim_args: OptimArgs, clip_args: dict[str, float] | None = None) -> Any:  # noqa: N802
    """:class:`probopt.optim.ConstantVSGD` as a Pyro optimizer, for ``pyro.infer.SVI``."""
    from probopt.optim import ConstantVSGD as _ConstantVSGD

    return _pyro_optim(_ConstantVSGD, optim_args, clip_args)


def _grad_queue(
    params: Any,
    optimizer: Callable[..., Any] | None = None,
    optimizer_args: dict[str, Any] | None = None,
    **grad_queue_args: Any,
) -> Any:
    """One :class:`probopt.optim.GradQueue` around ``optimizer(params, **optimizer_args)``."""
    import torch

    from probopt.optim import GradQueue as _GradQueue

    inner = (torch.optim.SGD if optimizer is None else optimizer)(params, **(optimizer_args or {}))
    return _GradQueue(inner, **grad_queue_args)


def GradQueue(optim_args: OptimArgs, clip_args: dict[str, float] | None = None) -> Any:  # noqa: N802
    """:class:`probopt.optim.GradQueue` around a torch optimizer, as a Pyro optimizer.

    Args:
        optim_args: a dict (or a callable from parameter name to a dict) with ``optimizer``, the
            inner torch optimizer class (default ``torch.optim.SGD``), ``optimizer_args``, its
            keyword arguments (``{"lr": ...}``), and any keyword argument of
            :class:`probopt.optim.GradQueue` (``q_min``, ``amplification``, ...).
        clip_args: Pyro's gradient clipping arguments (``clip_norm`` or ``clip_value``).

    .. note:: ``pyro.infer.SVI`` steps its optimizers without the loss, so the loss-driven queue
        length stays at ``queue_length`` (use ``length_rule="fixed"`` to say so explicitly).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def regression(x, y):  # maximum likelihood: a model with a parameter, no guide
        ...     w = pyro.param("w", torch.zeros(2))
        ...     pyro.sample("y", dist.Normal(x @ w, 1.0).to_event(1), obs=y)
        >>> pyro.clear_param_store()
        >>> optim = GradQueue({"optimizer": torch.optim.Adam, "optimizer_args": {"lr": 0.01},
        ...                    "length_rule": "fixed"})
        >>> svi = SVI(regression, lambda x, y: None, optim, loss=Trace_ELBO())
        >>> x, y = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([1.0, 0.0])
        >>> losses = [svi.step(x, y) for _ in range(5)]
        >>> losses[-1] < losses[0], sorted(optim.get_state())
        (True, ['w'])
    """
    return _pyro_optim(_grad_queue, optim_args, clip_args)
