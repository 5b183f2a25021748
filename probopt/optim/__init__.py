"""torch.optim optimizers whose update rules come from generative models of gradients.

===============================  ================================================================
:class:`VSGD`                    variational SGD: the true gradient as a latent (Chen et al. 2024)
:class:`ConstantVSGD`            VSGD's strong-prior limit: fixed precisions, constant momentum
:class:`GradientModelOptimizer`  any Pyro model of the gradient -> an optimizer (SVI per step)
:class:`GradQueue`               boosts rare gradient components under a queue model (Al Hasib)
===============================  ================================================================
"""

from probopt.optim._base import NonFiniteGradientError
from probopt.optim.constant_vsgd import ConstantVSGD
from probopt.optim.grad_queue import GradQueue
from probopt.optim.gradient_model import GradientModelOptimizer
from probopt.optim.vsgd import VSGD

__all__ = [
    "ConstantVSGD",
    "GradQueue",
    "GradientModelOptimizer",
    "NonFiniteGradientError",
    "VSGD",
]
