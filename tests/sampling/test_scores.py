"""Per-example gradient norms: the dense identity, the last-layer scores, against torch.func."""

import pytest
import torch
from torch import nn

from probopt.sampling.scores import (
    SCORE_METHODS,
    DenseNormCapture,
    cross_entropy_per_example,
    dense_coverage,
    exact_grad_norms,
    last_layer_norms,
    logit_grad_norms,
    score_examples,
    softmax_cross_entropy_bound,
)

ce = cross_entropy_per_example
# float64 throughout: the identity is algebraically exact, so only rounding separates it from the
# torch.func norms (observed ~2e-16 relative); 1e-10 leaves room for summation order.
RTOL = 1e-10


def close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-14)


def mlp(bias=True):
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def data(b=9, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (b,), generator=g)


def loop_norms(net, x, y):
    """The slow reference: one backward per example, norm of the concatenated gradient."""
    out = []
    for k in range(len(x)):
        grads = torch.autograd.grad(ce(net(x[k : k + 1]), y[k : k + 1]).sum(), net.parameters())
        out.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(out)


def test_exact_norms_match_a_per_example_loop():
    net, (x, y) = mlp(), data()
    close(exact_grad_norms(net, ce, x, y, chunk=4), loop_norms(net, x, y))


@pytest.mark.parametrize("bias", [True, False])
def test_dense_identity_equals_exact_norms_in_the_training_backward(bias):
    net, (x, y) = mlp(bias), data()
    with DenseNormCapture(net) as cap:
        ce(net(x), y).mean().backward()
    close(cap.norms(1 / len(x)), exact_grad_norms(net, ce, x, y))


def test_the_mean_loss_needs_the_n_squared_rescale():
    net, (x, y) = mlp(), data()
    with DenseNormCapture(net) as cap:
        ce(net(x), y).mean().backward()
    close(cap.norms(1.0) * len(x), exact_grad_norms(net, ce, x, y))  # rows carry 1/B


def test_dense_identity_with_per_example_loss_weights_leaves_grad_unchanged():
    net, (x, y) = mlp(), data()
    w = torch.rand(len(x), dtype=torch.float64) + 0.1  # e.g. Hansen-Hurwitz weights
    (w * ce(net(x), y)).sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with DenseNormCapture(net) as cap:
        (w * ce(net(x), y)).sum().backward()
    for p, g in zip(net.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # the hooks only read
    close(cap.norms(w), exact_grad_norms(net, ce, x, y))


class SeqNet(nn.Module):
    """A Linear applied at every position of a length-T sequence, then a classifier."""

    def __init__(self, t, d_in, d_hidden):
        super().__init__()
        self.t, self.d_in = t, d_in
        self.a = nn.Linear(d_in, d_hidden)
        self.b = nn.Linear(t * d_hidden, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.view(-1, self.t, self.d_in)))
        return self.b(h.reshape(h.shape[0], -1))


# (T, d_in, d_hidden): T (d_in + d_out) <= d_in d_out takes the Gram form, otherwise the product
@pytest.mark.parametrize("shape", [(2, 6, 7), (20, 2, 2)], ids=["gram", "product"])
def test_sequence_inputs_are_covered_exactly(shape):
    t, d_in, d_hidden = shape
    net = SeqNet(t, d_in, d_hidden).double()
    x, y = data(d=t * d_in)
    close(score_examples(net, ce, x, y, "dense"), exact_grad_norms(net, ce, x, y))


def test_frozen_weight_trainable_bias():
    net, (x, y) = mlp(), data()
    net[2].weight.requires_grad_(False)
    with DenseNormCapture(net) as cap:
        ce(net(x), y).sum().backward()
    close(cap.norms(), exact_grad_norms(net, ce, x, y))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def cnn():
    return nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3)).double()


def test_coverage_lists_what_the_identity_cannot_do():
    assert dense_coverage(cnn()) == (["3.weight", "3.bias"], ["0.weight", "0.bias"])
    assert dense_coverage(Tied()) == (["a.bias", "b.bias", "c.weight", "c.bias"], ["a.weight"])


@pytest.mark.parametrize("make", [cnn, Twice, Tied], ids=["conv", "applied-twice", "tied"])
def test_auto_falls_back_to_exact_norms(make):
    net = make().double()
    x, y = data()
    if isinstance(net, nn.Sequential):
        x = x.view(-1, 1, 5)
    close(score_examples(net, ce, x, y, "auto"), exact_grad_norms(net, ce, x, y))
    with pytest.raises(ValueError, match="dense identity does not"):
        score_examples(net, ce, x, y, "dense")


def test_applied_twice_is_reported_as_missing_in_the_training_backward():
    net, (x, y) = Twice().double(), data()
    with DenseNormCapture(net) as cap:
        ce(net(x), y).sum().backward()
    sq, missing = cap.sq_norms()
    assert missing == ["a.weight", "a.bias"]
    rest = exact_grad_norms(net, ce, x, y, params=missing).square()
    close((sq + rest).sqrt(), exact_grad_norms(net, ce, x, y))


def test_scoring_has_no_side_effect_on_grad():
    net, (x, y) = mlp(), data()
    for method in SCORE_METHODS:
        score_examples(net, ce, x, y, method)
        assert all(p.grad is None for p in net.parameters()), method


def test_last_layer_norms_are_the_exact_last_layer_gradient_norms():
    net, (x, y) = mlp(), data()
    close(last_layer_norms(net, None, x, y), exact_grad_norms(net, ce, x, y, params="last"))
    close(last_layer_norms(net, ce, x, y), exact_grad_norms(net, ce, x, y, params="last"))


def test_logit_scores_are_the_gradient_at_the_logits():
    net, (x, y) = mlp(), data()
    z = net(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(ce(z, y).sum(), z)
    close(logit_grad_norms(net, None, x, y), g.norm(dim=1))
    close(logit_grad_norms(net, ce, x, y), g.norm(dim=1))
    close(softmax_cross_entropy_bound(z.detach(), y), g.norm(dim=1))


def test_logistic_regression_exact_norm_is_the_bound_times_the_input_factor():
    # one linear layer: g_k = delta_k [x_k, 1], so ||g_k|| = G_k sqrt(||x_k||^2 + 1) exactly
    net, (x, y) = nn.Linear(5, 3).double(), data()
    bound = logit_grad_norms(net, None, x, y)
    close(exact_grad_norms(net, ce, x, y), bound * (x.square().sum(1) + 1).sqrt())


def test_errors():
    net, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="Invalid method: 'nope'"):
        score_examples(net, ce, x, y, "nope")
    with pytest.raises(RuntimeError, match="no forward pass"):
        with DenseNormCapture(net) as cap:
            pass
        cap.sq_norms()
    with pytest.raises(ValueError, match="Invalid chunk"):
        exact_grad_norms(net, ce, x, y, chunk=0)
    with pytest.raises(ValueError, match="last Linear"):
        last_layer_norms(nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double(), None, x, y)
