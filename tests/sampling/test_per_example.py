"""Per-example gradients: torch.func reference, closed-form last layer, backward-hook capture."""

import pytest
import torch
from torch import nn

from probopt.sampling.per_example import (
    LinearGradCapture,
    final_linear,
    flatten_grads,
    grad_norms,
    last_layer_grads,
    per_example_grads,
    select_parameters,
    unflatten_grads,
)

# float64 throughout: the closed forms and the hooks must agree with torch.func to rounding
ATOL = 1e-12


def ce(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


def data(b=9, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (b,), generator=g)


def loop_grads(net, x, y, names):
    """The slow reference: one ordinary backward per example."""
    params = dict(net.named_parameters())
    rows = []
    for k in range(len(x)):
        net.zero_grad()
        ce(net(x[k : k + 1]), y[k : k + 1]).sum().backward()
        rows.append({n: params[n].grad.clone() for n in names})
    net.zero_grad()
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def test_torch_func_matches_loop():
    net = mlp().double()
    x, y = data()
    names = [n for n, _ in net.named_parameters()]
    ref = loop_grads(net, x, y, names)
    got = per_example_grads(net, ce, x, y)
    assert list(got) == names
    for n in names:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", ["last", "2", ["0.weight", "4.bias"], "linear"])
def test_restricted_equals_full_restricted(spec):
    net = mlp().double()
    x, y = data()
    full = per_example_grads(net, ce, x, y)
    names = select_parameters(net, spec)
    part = per_example_grads(net, ce, x, y, params=spec)
    assert list(part) == names
    for n in names:
        torch.testing.assert_close(part[n], full[n], atol=ATOL, rtol=0)


def test_restricted_by_module_and_parameter_objects():
    net = mlp().double()
    x, y = data()
    full = per_example_grads(net, ce, x, y)
    by_module = per_example_grads(net, ce, x, y, params=net[2])
    by_param = per_example_grads(net, ce, x, y, params=[net[2].weight])
    assert list(by_module) == ["2.weight", "2.bias"] and list(by_param) == ["2.weight"]
    torch.testing.assert_close(by_module["2.weight"], full["2.weight"], atol=ATOL, rtol=0)
    torch.testing.assert_close(by_param["2.weight"], full["2.weight"], atol=ATOL, rtol=0)


def test_flat_layout_and_roundtrip():
    net = mlp().double()
    x, y = data()
    grads = per_example_grads(net, ce, x, y)
    flat = per_example_grads(net, ce, x, y, flat=True)
    assert flat.shape == (len(x), sum(p.numel() for p in net.parameters()))
    torch.testing.assert_close(flat, flatten_grads(grads), atol=0, rtol=0)
    back = unflatten_grads(flat, {n: p.shape for n, p in net.named_parameters()})
    for n in grads:
        assert torch.equal(back[n], grads[n])
    with pytest.raises(ValueError, match="columns"):
        unflatten_grads(flat[:, :-1], {n: p.shape for n, p in net.named_parameters()})


def test_per_example_mean_is_batch_gradient():
    net = mlp().double()
    x, y = data()
    flat = per_example_grads(net, ce, x, y, flat=True)
    net.zero_grad()
    ce(net(x), y).mean().backward()
    batch = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(flat.mean(0), batch, atol=ATOL, rtol=0)


@pytest.mark.parametrize("hidden", [(), (7,), (7, 6)])
def test_last_layer_closed_form_equals_torch_func(hidden):
    torch.manual_seed(0)
    layers, width = [], 5
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    net = nn.Sequential(*layers, nn.Linear(width, 3)).double()
    x, y = data()
    closed, logits = last_layer_grads(net, x, y, return_logits=True)
    ref = per_example_grads(net, ce, x, y, params="last")
    assert list(closed) == list(ref)
    for n in ref:
        torch.testing.assert_close(closed[n], ref[n], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, net(x), atol=0, rtol=0)
    flat = last_layer_grads(net, x, y, flat=True)
    torch.testing.assert_close(flat, flatten_grads(ref), atol=ATOL, rtol=0)


def test_last_layer_without_bias_and_by_name():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).double()
    x, y = data()
    closed = last_layer_grads(net, x, y, layer="2")
    ref = per_example_grads(net, ce, x, y, params="last")
    assert list(closed) == ["2.weight"]
    torch.testing.assert_close(closed["2.weight"], ref["2.weight"], atol=ATOL, rtol=0)


def test_last_layer_rejects_a_model_whose_output_is_not_the_layer():
    net = nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1)).double()
    x, y = data()
    with pytest.raises(ValueError, match="not the output"):
        last_layer_grads(net, x, y)


@pytest.mark.parametrize("weights", ["mean", "sum", "tensor"])
def test_linear_capture_equals_torch_func(weights):
    net = mlp().double()
    x, y = data()
    ref = per_example_grads(net, ce, x, y, params="linear")
    w = {
        "mean": 1.0 / len(x),
        "sum": 1.0,
        "tensor": torch.linspace(0.5, 2.0, len(x), dtype=torch.float64),
    }[weights]
    with LinearGradCapture(net, "linear") as cap:
        losses = ce(net(x), y)
        (losses * w).sum().backward()
    got = cap.grads(w)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=0)
    assert set(cap.factors) == {"0", "2", "4"}


def test_linear_capture_rejects_non_linear_parameters_and_reuse():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    with pytest.raises(ValueError, match="nn.Linear"):
        LinearGradCapture(conv, None)
    shared = nn.Linear(3, 3).double()
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="twice"), LinearGradCapture(twice) as _cap:
        twice(torch.randn(2, 3, dtype=torch.float64))
    # no hook is left behind
    assert not shared._forward_hooks


def test_grad_norms_dict_and_flat_agree():
    net = mlp().double()
    x, y = data()
    grads = per_example_grads(net, ce, x, y)
    norms = grad_norms(grads)
    torch.testing.assert_close(norms, grad_norms(flatten_grads(grads)), atol=ATOL, rtol=0)
    loop = torch.stack([flatten_grads(grads)[k].norm() for k in range(len(x))])
    torch.testing.assert_close(norms, loop, atol=ATOL, rtol=0)


def test_select_parameters_errors_and_frozen():
    net = mlp()
    net[0].weight.requires_grad_(False)
    assert "0.weight" not in select_parameters(net)
    assert final_linear(net)[0] == "4"
    with pytest.raises(ValueError, match="no parameter or submodule named 'nope'"):
        select_parameters(net, "nope")
    with pytest.raises(ValueError, match="not a trainable"):
        select_parameters(net, [nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="cannot select"):
        select_parameters(net, [3])
    with pytest.raises(ValueError, match="no nn.Linear"):
        final_linear(nn.Sequential(nn.ReLU()))
