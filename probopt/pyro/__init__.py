"""Pyro adapters: PyroOptim factories for probopt's optimizers.

>>> import probopt.pyro
>>> optim = probopt.pyro.VSGD({"lr": 0.05})   # use as pyro.infer.SVI(model, guide, optim, loss)
"""

from probopt.pyro.optim import VSGD, ConstantVSGD, GradQueue

__all__ = ["ConstantVSGD", "GradQueue", "VSGD"]
