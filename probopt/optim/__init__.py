"""torch.optim optimizers whose update rules come from generative models of gradients.

=====================  ==========================================================================
:class:`VSGD`          variational SGD: the true gradient as a latent variable (Chen et al. 2024)
:class:`GradQueue`     wrapper boosting rare gradient components under a queue model (Al Hasib 2024)
=====================  ==========================================================================
"""

from probopt.optim._base import NonFiniteGradientError
from probopt.optim.grad_queue import GradQueue
from probopt.optim.vsgd import VSGD

__all__ = ["GradQueue", "NonFiniteGradientError", "VSGD"]
