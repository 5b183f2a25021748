"""torch.optim optimizers whose update rules come from generative models of gradients."""

from probopt.optim._base import NonFiniteGradientError

__all__ = ["NonFiniteGradientError"]
