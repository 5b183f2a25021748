r"""The JAX backend: optax transforms, survey estimators and NumPyro models (``probopt[jax]``).

=============================================  ==============================================
JAX                                            torch / Pyro twin
=============================================  ==============================================
:func:`vsgd`, :func:`scale_by_vsgd`            :class:`probopt.optim.VSGD`
:func:`constant_vsgd`,                         :class:`probopt.optim.ConstantVSGD`
:func:`scale_by_constant_vsgd`
:func:`grad_queue` (chain it before any        :class:`probopt.optim.GradQueue`,
optimizer), :mod:`probopt.jax.grad_queue`      :mod:`probopt.models.grad_queue`
:mod:`probopt.jax.estimators`                  :mod:`probopt.sampling.estimators`
:mod:`probopt.jax.designs` (explicit keys)     :mod:`probopt.sampling.designs`
:mod:`probopt.jax.models` (NumPyro)            :mod:`probopt.models` (Pyro)
:func:`gradient_model`,                        :class:`probopt.optim.GradientModelOptimizer`
:func:`scale_by_gradient_model`
:func:`skip_nonfinite`                         ``nonfinite="skip"`` of the torch optimizers
=============================================  ==============================================

The transforms are ``optax.GradientTransformationExtraArgs`` with ``NamedTuple`` states; they
run under ``jit``, ``vmap`` and ``lax.scan``, and plug into NumPyro's SVI directly::

    svi = numpyro.infer.SVI(model, guide, probopt.jax.vsgd(1e-2), numpyro.infer.Trace_ELBO())

``import probopt`` never imports JAX; this subpackage does (NumPyro only with
:mod:`probopt.jax.models` and :func:`probopt.jax.grad_queue.model`).
"""

from probopt._optional import require

require("jax", "the JAX backend (probopt.jax)")
require("optax", "the JAX backend (probopt.jax)")

from probopt.jax import designs, estimators  # noqa: E402
from probopt.jax._base import SkipNonFiniteState, skip_nonfinite  # noqa: E402
from probopt.jax.constant_vsgd import (  # noqa: E402
    ScaleByConstantVSGDState,
    constant_vsgd,
    scale_by_constant_vsgd,
)
from probopt.jax.grad_queue import GradQueueState, grad_queue  # noqa: E402
from probopt.jax.gradient_model import (  # noqa: E402
    ScaleByGradientModelState,
    gradient_model,
    scale_by_gradient_model,
)
from probopt.jax.vsgd import JITTER, ScaleByVSGDState, scale_by_vsgd, vsgd  # noqa: E402

__all__ = [
    "JITTER",
    "GradQueueState",
    "ScaleByConstantVSGDState",
    "ScaleByGradientModelState",
    "ScaleByVSGDState",
    "SkipNonFiniteState",
    "constant_vsgd",
    "designs",
    "estimators",
    "grad_queue",
    "gradient_model",
    "scale_by_constant_vsgd",
    "scale_by_gradient_model",
    "scale_by_vsgd",
    "skip_nonfinite",
    "vsgd",
]
