r"""Per-example importance scores: gradient norms, exact, cheap and bounded.

Importance sampling for SGD draws example :math:`k` with probability :math:`q_k \propto
\lVert g_k \rVert`, where :math:`g_k = \nabla_\theta \ell(\theta; x_k, y_k)`
(:mod:`probopt.sampling.importance`). This module computes that score for a batch, four ways:

==================  ===================================================  ======================
method              what it computes                                     cost
==================  ===================================================  ======================
``"exact"``         :math:`\lVert g_k \rVert` by ``torch.func``          one vmapped backward
                    (:func:`exact_grad_norms`), any network without      per chunk, memory
                    batch coupling                                       :math:`B \times P`
``"dense"``         the same number for networks whose trainable         one ordinary
                    parameters all sit in :class:`~torch.nn.Linear`      forward/backward
                    layers, from the dense-layer identity                (:class:`DenseNorm\
                    (:class:`DenseNormCapture`)                          Capture`)
``"auto"``          ``"dense"`` on the covered :class:`~torch.nn.Linear` as ``"dense"`` plus
                    layers, ``"exact"`` (restricted to them) on every    ``"exact"`` on the
                    other parameter                                      rest
``"last-layer"``    exact norm of the final linear layer's gradient      one forward pass
                    :math:`\lVert\delta_k\rVert\sqrt{\lVert a_k\rVert^2
                    + 1}`
``"logits"``        :math:`\hat G_k = \lVert \partial\ell_k/\partial     one forward pass
                    z_k \rVert` (:func:`logit_grad_norms`), for softmax
                    cross-entropy :math:`\lVert\mathrm{softmax}(z_k) -
                    e_{y_k}\rVert`: Katharopoulos & Fleuret's upper
                    bound up to a constant
==================  ===================================================  ======================

**The dense-layer identity.** A dense layer :math:`z_k = W a_k + b` receives, in the backward
pass of :math:`L = \sum_k w_k \ell_k`, the row :math:`w_k\delta_k` with
:math:`\delta_k = \partial \ell_k/\partial z_k`. Its per-example gradients are
:math:`\nabla_W \ell_k = \delta_k a_k^\top` and :math:`\nabla_b \ell_k = \delta_k`, so

.. math::
    \lVert g_k \rVert^2 = \sum_{\text{layers}} \big(\lVert a_k \rVert^2 + 1\big)
    \lVert \delta_k \rVert^2

(the :math:`+1` only for layers with a trainable bias), from row norms of quantities the ordinary
backward pass computes anyway. For a loss that is a mean (:math:`w_k = 1/B`) the recorded rows
carry the factor :math:`1/B`: :meth:`DenseNormCapture.norms` divides by :math:`w_k`.

**Which layers are covered.** :class:`~torch.nn.Linear` (and subclasses) called once per
forward pass through its ``forward``, with the batch on the first axis:

* 2-D inputs ``(B, d_in)``: the identity above;
* inputs ``(B, T, ..., d_in)`` (a layer applied at every position of a sequence): the
  per-example gradient :math:`\sum_t \delta_{kt} a_{kt}^\top` is no longer rank one; its norm
  is computed exactly from the same recorded factors, as
  :math:`\sum_{t,s} (a_{kt}\cdot a_{ks})(\delta_{kt}\cdot\delta_{ks})` or as
  :math:`\lVert \Delta_k^\top A_k \rVert_F^2`, whichever is cheaper.

Not covered, and handled by the exact ``torch.func`` path under ``"auto"`` (``"dense"`` raises):
every other parameterised module (convolutions, normalisation layers, embeddings, recurrent
cells, attention modules that use their ``out_proj`` weight without calling it), a Linear applied
more than once per forward pass, and a parameter shared between modules (weight tying): their
per-example gradients sum several contributions and the identity does not apply. BatchNorm in
training mode couples the examples of a batch; no per-example norm is defined then.

References:
    Goodfellow, `Efficient Per-Example Gradient Computations
    <https://arxiv.org/abs/1510.01799>`_, 2015 (the dense-layer identity).
    Alain, Lamb, Sankar, Courville & Bengio, `Variance Reduction in SGD by Distributed Importance
    Sampling <https://arxiv.org/abs/1511.06481>`_, 2015 (its use for importance sampling).
    Katharopoulos & Fleuret, `Not All Samples Are Created Equal: Deep Learning with Importance
    Sampling <https://arxiv.org/abs/1803.00942>`_, ICML 2018 (the last-layer upper bound).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probopt.sampling.per_example import (
    ParamSpec,
    final_linear,
    grad_norms,
    per_example_grads,
    select_parameters,
)

__all__ = [
    "SCORE_METHODS",
    "DenseNormCapture",
    "cross_entropy_per_example",
    "dense_coverage",
    "exact_grad_norms",
    "last_layer_norms",
    "logit_grad_norms",
    "score_examples",
    "softmax_cross_entropy_bound",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: The ``method`` names :func:`score_examples` accepts.
SCORE_METHODS: tuple[str, ...] = ("auto", "dense", "exact", "last-layer", "logits")


def cross_entropy_per_example(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy per example (``reduction="none"``); a picklable default loss."""
    return F.cross_entropy(logits, targets, reduction="none")


# --------------------------------------------------------------------------------------------
# which parameters the identity covers


def _linear_owners(model: nn.Module) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """``{param name: (layer name, "weight"|"bias")}`` for Linear-owned parameters, plus the
    names of parameters that more than one module holds (tied weights)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    holders: dict[int, int] = {}
    owners: dict[str, tuple[str, str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
            if isinstance(module, nn.Linear) and pname in ("weight", "bias"):
                owners.setdefault(by_id[id(p)], (mname, pname))
    tied = {by_id[i] for i, count in holders.items() if count > 1 and i in by_id}
    return owners, tied


def dense_coverage(model: nn.Module, params: ParamSpec = None) -> tuple[list[str], list[str]]:
    """Split the chosen parameters into those the dense identity covers and the rest.

    Covered: weights and biases of :class:`~torch.nn.Linear` modules that no other module shares.
    Whether a covered layer really sees a batch-first input once per forward pass is only known
    during the pass (:meth:`DenseNormCapture.sq_norms` reports it).

    Returns:
        ``(covered, uncovered)`` parameter names, each in ``named_parameters`` order.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> dense_coverage(net)
        (['2.weight', '2.bias'], ['0.weight', '0.bias'])
    """
    names = select_parameters(model, params)
    owners, tied = _linear_owners(model)
    covered = [n for n in names if n in owners and n not in tied]
    return covered, [n for n in names if n not in covered]


# --------------------------------------------------------------------------------------------
# the dense-layer identity


def _weight_sq(a: Tensor, g: Tensor) -> Tensor:
    r""":math:`\lVert \sum_t g_t a_t^\top \rVert_F^2` per example; ``a (B,T,i)``, ``g (B,T,o)``."""
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if t * (d_in + d_out) <= d_in * d_out:  # Gram form: O(B T^2 (i + o))
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))  # O(B T i o)


class DenseNormCapture:
    r"""Per-example gradient norms of :class:`~torch.nn.Linear` layers from one backward pass.

    A forward hook on every covered layer records :math:`\lVert a_k\rVert^2` (or the whole
    input, for inputs with more than two axes) and, when the layer output requires grad, puts a
    tensor hook on it that turns the incoming rows :math:`w_k\delta_k` into per-example squared
    norms, summed over layers. Nothing is kept beyond one ``(B,)`` vector per pass (plus the
    inputs of layers that see sequences); the backward pass and ``.grad`` are unchanged.

    Args:
        model: the network.
        params: which parameters (:data:`~probopt.sampling.per_example.ParamSpec`; default all
            trainable ones). Parameters that the identity does not cover are listed in
            :attr:`uncovered` and ignored here (see :func:`score_examples` for the fallback).
        hooks: ``False`` records the layer outputs without tensor hooks, for
            :meth:`backward_outputs` (scoring without parameter gradients).

    Use it around the forward *and* the backward pass::

        with DenseNormCapture(model) as cap:
            losses = loss_fn(model(x), y)
            (w * losses).sum().backward()
        sq, missing = cap.sq_norms(w)        # (B,) squared norms; parameters still to do exactly

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> x, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> with DenseNormCapture(net) as cap:
        ...     cross_entropy_per_example(net(x), t).mean().backward()
        >>> dense = cap.norms(1 / 5)
        >>> exact = exact_grad_norms(net, cross_entropy_per_example, x, t)
        >>> bool(torch.allclose(dense, exact, rtol=1e-12, atol=0))
        True
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None, *, hooks: bool = True) -> None:
        self.model = model
        self.names = select_parameters(model, params)
        self.covered, self.uncovered = dense_coverage(model, self.names)
        owners, _ = _linear_owners(model)
        modules = dict(model.named_modules())
        self._parts: dict[str, set[str]] = {}
        for n in self.covered:
            lname, pname = owners[n]
            self._parts.setdefault(lname, set()).add(pname)
        self._layers = {lname: modules[lname] for lname in self._parts}
        self._param_of = {(lname, pname): n for n in self.covered for lname, pname in [owners[n]]}
        self._hooks = hooks
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._reset()

    def _reset(self) -> None:
        self._sq: dict[str, Tensor] = {}
        self._calls: dict[str, int] = dict.fromkeys(self._layers, 0)
        self._grads_seen: dict[str, int] = dict.fromkeys(self._layers, 0)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self._batch: int | None = None
        self._ref: Tensor | None = None

    def __enter__(self) -> DenseNormCapture:
        self._reset()
        for lname, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(functools.partial(self._fwd, lname)))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _fwd(self, lname: str, _m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        self._calls[lname] += 1
        a = inputs[0].detach()
        if a.dim() < 2:
            return  # no batch axis: reported as missing
        self._batch, self._ref = a.shape[0], a
        if a.dim() == 2:
            stat = torch.linalg.vecdot(a, a) if "weight" in self._parts[lname] else a[:, :0]
        else:
            stat = a.reshape(a.shape[0], -1, a.shape[-1])
        if self._hooks:
            output.register_hook(functools.partial(self._grad, lname, stat))
        else:
            self._pending[lname] = (stat, output)

    def _grad(self, lname: str, stat: Tensor, g: Tensor) -> None:
        g = g.detach()
        parts = self._parts[lname]
        if g.dim() == 2:
            factor = (stat if "weight" in parts else 0.0) + (1.0 if "bias" in parts else 0.0)
            sq = torch.linalg.vecdot(g, g) * factor
        else:
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            sq = _weight_sq(stat, g3) if "weight" in parts else g3.new_zeros(g3.shape[0])
            if "bias" in parts:
                gb = g3.sum(1)
                sq = sq + torch.linalg.vecdot(gb, gb)
        self._grads_seen[lname] += 1
        self._sq[lname] = sq

    def backward_outputs(self, loss: Tensor) -> None:
        """Backpropagate ``loss`` to the recorded layer outputs only (``hooks=False``).

        Skips every parameter gradient: what scoring without an update needs.
        """
        if self._hooks:
            raise RuntimeError("backward_outputs() needs DenseNormCapture(..., hooks=False)")
        lnames = [n for n in self._pending if self._calls[n] == 1]
        if lnames:
            outs = [self._pending[n][1] for n in lnames]
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
            for lname, g in zip(lnames, grads):
                if g is not None:
                    self._grad(lname, self._pending[lname][0], g)
        self._pending.clear()

    def sq_norms(self, weights: float | Tensor = 1.0) -> tuple[Tensor, list[str]]:
        r"""Per-example squared norms over the covered layers, and what is left to do exactly.

        Args:
            weights: the per-example loss weights :math:`w_k` of the loss that was
                backpropagated (a number, e.g. ``1/B`` for the mean, or a ``(B,)`` tensor); every
                :math:`w_k` must be non-zero.

        Returns:
            ``(sq, missing)``: ``sq`` of shape ``(B,)`` summed over the layers that satisfied
            the identity, and the covered parameter names whose layer did not (applied more than
            once, no batch axis, not called through ``forward``, no gradient reached it): add
            their squared norms exactly (:func:`exact_grad_norms` with ``params=missing``).
        """
        if self._ref is None:
            raise RuntimeError("no forward pass with gradients was recorded inside the context")
        good = [n for n in self._layers if self._calls[n] == 1 and self._grads_seen[n] == 1]
        bad = {
            self._param_of[(n, p)] for n in self._layers if n not in good for p in self._parts[n]
        }
        missing = [n for n in self.covered if n in bad]
        sq = sum((self._sq[n] for n in good), self._ref.new_zeros(self._batch))
        if isinstance(weights, Tensor):
            return sq / weights.to(sq).reshape(-1).square(), missing
        return sq * (1.0 / float(weights) ** 2), missing

    def norms(self, weights: float | Tensor = 1.0) -> Tensor:
        r""":math:`\lVert g_k \rVert` over the covered parameters; raises if any is missing."""
        sq, missing = self.sq_norms(weights)
        if missing:
            raise ValueError(
                f"the dense identity does not apply to {missing} (layer applied more than "
                f"once, no batch axis, or not called through forward); use method='auto'"
            )
        return sq.sqrt()


# --------------------------------------------------------------------------------------------
# exact norms and the forward-only scores


def exact_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    params: ParamSpec = None,
    chunk: int = 256,
) -> Tensor:
    r"""Exact :math:`\lVert g_k \rVert` by ``torch.func`` (vmap of grad), ``chunk`` examples a call.

    Memory is bounded by ``chunk`` × (number of chosen parameters). See
    :func:`~probopt.sampling.per_example.per_example_grads` for what the model must satisfy.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(net.bias)  # zero logits at x = 0: |softmax - onehot| = 1/sqrt(2)
        >>> exact_grad_norms(net, cross_entropy_per_example, torch.zeros(3, 2),
        ...                  torch.tensor([0, 1, 0]))
        tensor([0.7071, 0.7071, 0.7071])
    """
    if chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk!r} (must be >= 1)")
    out = [
        grad_norms(
            per_example_grads(model, loss_fn, x[s : s + chunk], y[s : s + chunk], params=params)
        )
        for s in range(0, x.shape[0], chunk)
    ]
    return torch.cat(out) if out else x.new_zeros(0)


def softmax_cross_entropy_bound(logits: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\lVert \mathrm{softmax}(z_k) - e_{y_k} \rVert` (the closed form of ``"logits"``).

    Example:
        >>> softmax_cross_entropy_bound(torch.zeros(1, 2), torch.tensor([0]))
        tensor([0.7071])
    """
    delta = torch.softmax(logits, dim=1)
    delta[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return torch.linalg.vector_norm(delta, dim=1)


def logit_grad_norms(model: nn.Module, loss_fn: LossFn | None, x: Tensor, y: Tensor) -> Tensor:
    r"""Katharopoulos–Fleuret score :math:`\hat G_k = \lVert\partial \ell_k/\partial z_k\rVert`.

    One forward pass without a graph through the network; the loss is differentiated with respect
    to the outputs only. ``loss_fn=None`` means softmax cross-entropy in closed form
    (:func:`softmax_cross_entropy_bound`). Katharopoulos & Fleuret bound
    :math:`\lVert g_k\rVert \le L\rho\,\hat G_k` with :math:`L\rho` the same for every example,
    so :math:`\hat G_k` may stand in for :math:`\lVert g_k\rVert` in :math:`q_k \propto` score.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> logit_grad_norms(net, None, torch.zeros(1, 2), torch.tensor([0])).shape
        torch.Size([1])
    """
    with torch.no_grad():
        z = model(x)
    if loss_fn is None:
        return softmax_cross_entropy_bound(z, y)
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(z, y).sum(), z)
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)


def last_layer_norms(model: nn.Module, loss_fn: LossFn | None, x: Tensor, y: Tensor) -> Tensor:
    r"""Exact norm of the final linear layer's per-example gradient, forward pass only.

    :math:`\lVert \nabla_{W_L, b_L} \ell_k \rVert = \lVert\delta_k\rVert\sqrt{\lVert a_k\rVert^2
    + 1}` with :math:`a_k` its input and :math:`\delta_k` the gradient at its output (the
    model's output must be that layer's output; ``loss_fn=None``: softmax cross-entropy).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(net.bias)
        >>> last_layer_norms(net, None, torch.zeros(1, 2), torch.tensor([0]))
        tensor([0.7071])
    """
    name, layer = final_linear(model)
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["a"], seen["z"] = inputs[0], output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    if seen.get("z") is not out or seen["a"].dim() != 2:
        raise ValueError(f"the model's output must be the 2-D output of its last Linear {name!r}")
    with torch.no_grad():
        delta_norm = logit_grad_norms(_Constant(out), loss_fn, x, y)
    a = seen["a"]
    factor = torch.zeros_like(delta_norm)
    if layer.weight.requires_grad:
        factor = factor + torch.linalg.vecdot(a, a)
    if layer.bias is not None and layer.bias.requires_grad:
        factor = factor + 1.0
    return delta_norm * factor.sqrt()


class _Constant(nn.Module):
    """A module that returns precomputed outputs (reuses one forward pass)."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, _x: Tensor) -> Tensor:
        return self.out


def score_examples(
    model: nn.Module,
    loss_fn: LossFn | None,
    x: Tensor,
    y: Tensor,
    method: str = "auto",
    *,
    params: ParamSpec = None,
    chunk: int = 256,
    capture: DenseNormCapture | None = None,
) -> Tensor:
    r"""Importance scores of a batch (no side effect on ``.grad``).

    Args:
        model: the network (its mode is left as it is: put it in ``eval()`` first if it has
            dropout).
        loss_fn: per-example loss ``loss_fn(outputs, targets)``; ``None`` means softmax
            cross-entropy.
        x: inputs ``(B, ...)``.
        y: targets ``(B, ...)``.
        method: one of :data:`SCORE_METHODS` (table in the module docstring).
        params: the parameters whose gradient norm is scored (``"dense"``, ``"auto"``,
            ``"exact"``); default all trainable ones.
        chunk: examples per ``torch.func`` call (``"exact"`` and the exact part of ``"auto"``).
        capture: a ``DenseNormCapture(model, params, hooks=False)`` to reuse across calls (saves
            walking the modules at every call); built here when ``None``.

    Returns:
        ``(B,)`` non-negative scores, in the dtype of the model's output.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        >>> x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        >>> dense = score_examples(net, None, x, t, "dense")
        >>> exact = score_examples(net, None, x, t, "exact")
        >>> bool(torch.allclose(dense, exact, rtol=1e-12, atol=0))
        True
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"Invalid method: {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    loss = loss_fn if loss_fn is not None else cross_entropy_per_example
    if method == "logits":
        return logit_grad_norms(model, loss_fn, x, y)
    if method == "last-layer":
        return last_layer_norms(model, loss_fn, x, y)
    if method == "exact":
        return exact_grad_norms(model, loss, x, y, params=params, chunk=chunk)
    cap = capture if capture is not None else DenseNormCapture(model, params, hooks=False)
    if cap.model is not model or cap._hooks:
        raise ValueError("capture must be DenseNormCapture(model, params, hooks=False)")
    if method == "dense" and cap.uncovered:
        raise ValueError(
            f"the dense identity does not cover {cap.uncovered} (not nn.Linear, or tied); "
            f"use method='auto' or 'exact'"
        )
    with torch.enable_grad():
        sq, rest = None, list(cap.uncovered)
        if cap.covered:
            with cap:
                losses = loss(model(x), y)
                cap.backward_outputs(losses.sum())
            if method == "dense":
                return cap.norms()
            sq, missing = cap.sq_norms(1.0)
            rest = [n for n in cap.names if n in set(rest) | set(missing)]
        if rest:
            extra = exact_grad_norms(model, loss, x, y, params=rest, chunk=chunk).square()
            sq = extra if sq is None else sq + extra
    return sq.sqrt()
