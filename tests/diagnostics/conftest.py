"""Shared fixture of the diagnostics tests: a DataTree with every group."""

import numpy as np
import pytest
import torch
from torch import nn


def _loss(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


@pytest.fixture(scope="session")
def full_tree():
    """A tree with every group: VSGD + estimator + importance weights + SVI-path draws."""
    pytest.importorskip("arviz_base")
    import probopt.models.vsgd as vsgd_model

    from probopt.diagnostics import Recorder, importance_dataset, to_datatree
    from probopt.optim import VSGD, GradientModelOptimizer
    from probopt.sampling.gradient_estimator import UniformEstimator

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    est = UniformEstimator()
    est.setup(net, x, y)
    opt = VSGD(net.parameters(), lr=0.01)
    rec = Recorder(opt, model=net, coordinates=2, every=2, estimator=est, variance_every=3)
    for index in est.epoch_batches(8, torch.Generator().manual_seed(0)):
        opt.zero_grad()
        est.backward(net, _loss, x[index], y[index], index)
        opt.step()
    dt = to_datatree(rec)
    rng = np.random.default_rng(0)
    steps = dt["estimator"]["step"].values
    dt["importance"] = importance_dataset(rng.normal(size=(len(steps), 64)), steps)
    p = nn.Parameter(torch.zeros(3))
    gopt = GradientModelOptimizer([p], vsgd_model.model, vsgd_model.guide, svi_steps=5,
                                  num_particles=4)  # fmt: skip
    grec = Recorder(gopt, {"p": p}, coordinates=2, draws=(2, 50))
    for _ in range(2):
        p.grad = torch.randn(3)
        gopt.step()
    dt["posterior"] = to_datatree(grec)["posterior"]
    return dt
