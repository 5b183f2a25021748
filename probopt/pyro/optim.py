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

__all__ = ["ConstantVSGD", "VSGD"]

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
