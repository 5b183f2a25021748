"""ConstantVSGD: foreach vs reference, limits, validation, state."""

import copy

import pytest
import torch

from probopt.optim import ConstantVSGD


def _run(foreach, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(4, 3), (), (9,)]]
    opt = ConstantVSGD(ps, foreach=foreach, **kw)
    gen = torch.Generator().manual_seed(1)
    for t in range(7):
        for i, p in enumerate(ps):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = None if (t, i) == (2, 0) else g
        opt.step()
    return ps, opt


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "maximize": True}])
def test_foreach_matches_reference(kw):
    a, oa = _run(False, **kw)
    b, ob = _run(True, **kw)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ob.state[q]["mu"], oa.state[p]["mu"], rtol=1e-13, atol=1e-15)


def test_large_gradients_give_sign_descent():
    """|μ| ≫ σ: the step is η sign(μ) (Signum)."""
    x = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=torch.float64))
    opt = ConstantVSGD([x], lr=0.01, variance_ratio=1.0, prior_variance=1e-12)
    x.grad = torch.tensor([1e3, -1e3], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([-0.01, 0.01], dtype=torch.float64))


def test_state_dict_round_trip():
    ps, opt = _run(True)
    saved = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = ConstantVSGD(clones)
    other.load_state_dict(saved)
    for p, q in zip(ps, clones):
        g = torch.ones_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step(), other.step()
    for p, q in zip(ps, clones):
        assert torch.equal(p, q)


def test_corrupted_checkpoint_is_rejected_and_changes_nothing():
    ps, opt = _run(True)
    saved = copy.deepcopy(opt.state_dict())
    wrong_shape, no_mu = copy.deepcopy(saved), copy.deepcopy(saved)
    wrong_shape["state"][2]["mu"] = torch.zeros(8, dtype=torch.float64)
    del no_mu["state"][1]["mu"]
    with pytest.raises(ValueError, match="'mu' of parameter 2 has shape \\(8,\\)"):
        opt.load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="parameter 1 lacks \\['mu'\\]"):
        opt.load_state_dict(no_mu)
    for pid, state in saved["state"].items():
        assert torch.equal(opt.state_dict()["state"][pid]["mu"], state["mu"])


@pytest.mark.parametrize(
    "kw,msg",
    [(dict(variance_ratio=-1.0), "Invalid variance_ratio"),
     (dict(prior_variance=0.0), "Invalid prior_variance"),
     (dict(lr=-0.1), "Invalid learning rate")],
)  # fmt: skip
def test_invalid(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ConstantVSGD([torch.nn.Parameter(torch.ones(1))], **kw)
