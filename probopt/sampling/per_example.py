r"""Per-example gradients :math:`g_k = \nabla_\theta \ell(\theta; z_k)` of a minibatch.

Three ways to get them, from the most general to the cheapest:

=================================  ==============================================  ===============
function                           what it needs                                   cost
=================================  ==============================================  ===============
:func:`per_example_grads`          any model without batch coupling (no           one vmapped
                                   BatchNorm in training mode), any per-example    backward per
                                   loss; optionally restricted to some parameters  batch
:func:`last_layer_grads`           a final :class:`~torch.nn.Linear` whose output   one forward
                                   is the logits, softmax cross-entropy            pass, no
                                                                                   backward
:class:`LinearGradCapture`         :class:`~torch.nn.Linear` layers on 2-D inputs   the ordinary
                                   and a loss with known per-example weights       backward (hooks)
=================================  ==============================================  ===============

All three return the same layout: a dict ``name -> (B, *param.shape)`` keyed by
:meth:`~torch.nn.Module.named_parameters` names, in that order; :func:`flatten_grads` turns it
into the ``(B, P)`` matrix whose columns follow the same order (and :func:`unflatten_grads` back),
and :func:`grad_norms` gives the per-example Euclidean norms :math:`\|g_k\|`.

The dense-layer factors that :class:`LinearGradCapture` records (the layer input :math:`a_k` and
the per-example output gradient :math:`\delta_k`, with :math:`g_k^W = \delta_k a_k^\top`,
:math:`g_k^b = \delta_k`) are exposed as :attr:`LinearGradCapture.factors`, so other code (for
example the norm identity :math:`\|g_k^W\|^2 = \|\delta_k\|^2 \|a_k\|^2`) can reuse them without
forming :math:`g_k`.

References:
    Goodfellow, `Efficient Per-Example Gradient Computations <https://arxiv.org/abs/1510.01799>`_,
    2015 (the outer-product form of dense-layer per-example gradients).
    Horace He, Richard Zou et al., `torch.func per-sample gradients
    <https://pytorch.org/tutorials/intermediate/per_sample_grads.html>`_ (vmap + grad).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "LinearGradCapture",
    "ParamSpec",
    "final_linear",
    "flatten_grads",
    "grad_norms",
    "last_layer_grads",
    "per_example_grads",
    "select_parameters",
    "unflatten_grads",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Which parameters: ``None`` (all that require grad), ``"last"`` (the final ``nn.Linear``),
#: ``"linear"`` (every ``nn.Linear``), a name (a parameter's name, or a submodule's name meaning
#: all its parameters), an :class:`~torch.nn.Module` that is a submodule
#: of the model, an :class:`~torch.nn.Parameter` of the model, or an iterable of those.
ParamSpec = None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]


# --------------------------------------------------------------------------------------------
# choosing parameters


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last :class:`~torch.nn.Linear` submodule in registration order, with its name.

    For :class:`~probopt.experiments.networks.MLP` and ``SmallCNN`` this is the output layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> final_linear(net)[0]
        '2'
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear submodule")
    return found[-1]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Resolve a parameter choice into parameter names, in ``model.named_parameters()`` order.

    Args:
        model: the network.
        params: see :data:`ParamSpec`. The string ``"last"`` means the parameters of
            :func:`final_linear`, ``"linear"`` those of every :class:`~torch.nn.Linear` layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_parameters(net, "last"), select_parameters(net, [net[0]])
        (['2.weight', '2.bias'], ['0.weight', '0.bias'])
        >>> select_parameters(net, "linear")
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return [n for n, _ in named]
    if params == "linear":
        params = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not params:
            raise ValueError(f"{type(model).__name__} has no nn.Linear submodule")
    if isinstance(params, (str, nn.Module, nn.Parameter)):
        params = [params]
    wanted: set[str] = set()
    by_id = {id(p): n for n, p in named}
    modules = dict(model.named_modules())
    for spec in params:
        if isinstance(spec, nn.Parameter):
            if id(spec) not in by_id:
                raise ValueError("a parameter given in params is not a trainable model parameter")
            wanted.add(by_id[id(spec)])
        elif isinstance(spec, nn.Module):
            ids = {id(p) for p in spec.parameters()}
            hit = {by_id[i] for i in ids if i in by_id}
            if not hit:
                raise ValueError(f"module {type(spec).__name__} has no trainable model parameter")
            wanted |= hit
        elif isinstance(spec, str):
            if spec == "last":
                spec = final_linear(model)[0]
            if spec in by_id.values():
                wanted.add(spec)
            elif spec in modules:
                hit = {by_id[id(p)] for p in modules[spec].parameters() if id(p) in by_id}
                if not hit:
                    raise ValueError(f"module {spec!r} has no trainable parameter")
                wanted |= hit
            else:
                raise ValueError(f"no parameter or submodule named {spec!r} in the model")
        else:
            raise TypeError(f"cannot select parameters from {type(spec).__name__}")
    return [n for n, _ in named if n in wanted]


# --------------------------------------------------------------------------------------------
# layout helpers


def flatten_grads(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a dict ``name -> (B, *shape)`` into a ``(B, P)`` matrix (dict order).

    Example:
        >>> flatten_grads({"w": torch.ones(2, 3, 2), "b": torch.zeros(2, 3)}).shape
        torch.Size([2, 9])
    """
    mats = [g.reshape(g.shape[0], -1) for g in grads.values()]
    return torch.cat(mats, dim=1)


def unflatten_grads(flat: Tensor, like: Mapping[str, Tensor | torch.Size]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_grads` for ``(B, P)`` or ``(P,)`` input.

    Args:
        flat: the matrix (or one row of it).
        like: dict ``name -> tensor or shape`` giving the *per-example* shapes, in order.
    """
    shapes = {n: tuple(r.shape if isinstance(r, Tensor) else r) for n, r in like.items()}
    need = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if need != flat.shape[-1]:
        raise ValueError(f"flat has {flat.shape[-1]} columns but the shapes need {need}")
    out: dict[str, Tensor] = {}
    start = 0
    lead = flat.shape[:-1]
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel())
        out[name] = flat[..., start : start + size].reshape(*lead, *shape)
        start += size
    return out


def grad_norms(grads: Mapping[str, Tensor] | Tensor) -> Tensor:
    r"""Per-example Euclidean norms :math:`\|g_k\|` of a dict ``(B, *shape)`` or a ``(B, P)``.

    Example:
        >>> grad_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
    """
    if isinstance(grads, Tensor):
        return torch.linalg.vector_norm(grads, dim=1)
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    return sq.sqrt()


# --------------------------------------------------------------------------------------------
# exact per-example gradients with torch.func


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    params: ParamSpec = None,
    flat: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Tensor] | Tensor:
    r"""Exact per-example gradients :math:`g_k = \nabla_\theta \ell(\theta; x_k, y_k)`.

    ``torch.func.vmap(torch.func.grad(f))`` over the batch, where ``f`` runs
    :func:`torch.func.functional_call` on one example. Only the chosen parameters are
    differentiated (the others enter as constants), which is what makes a restricted call cheap.

    Args:
        model: the network; it must treat examples independently (no BatchNorm in training mode,
            no in-place buffer updates during the forward pass).
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses
            (``reduction="none"``), as in :class:`~probopt.sampling.GradientEstimator`.
        x: inputs ``(B, ...)``.
        y: targets ``(B, ...)``.
        params: which parameters (:data:`ParamSpec`; default all trainable ones).
        flat: return the ``(B, P)`` matrix instead of the dict.
        chunk_size: passed to :func:`torch.func.vmap` to bound memory.

    Returns:
        ``{name: (B, *shape)}`` in ``named_parameters`` order, or the ``(B, P)`` matrix.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> loss = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> g = per_example_grads(net, loss, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
        >>> {k: tuple(v.shape) for k, v in g.items()}
        {'weight': (5, 2, 3), 'bias': (5, 2)}
    """
    from torch.func import functional_call, grad, vmap

    names = select_parameters(model, params)
    if not names:
        raise ValueError("no parameter selected")
    all_params = dict(model.named_parameters())
    chosen = {n: all_params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in all_params.items() if n not in chosen}
    fixed.update(dict(model.named_buffers()))

    def one(theta: dict[str, Tensor], xk: Tensor, yk: Tensor) -> Tensor:
        out = functional_call(model, (theta, fixed), (xk.unsqueeze(0),))
        return loss_fn(out, yk.unsqueeze(0)).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(chosen, x, y)
    grads = {n: grads[n] for n in names}
    return flatten_grads(grads) if flat else grads


# --------------------------------------------------------------------------------------------
# closed form: final linear layer + softmax cross-entropy


@contextmanager
def _capture_io(layer: nn.Module) -> Iterator[dict[str, Tensor]]:
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store["input"] = inputs[0]
        store["output"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def last_layer_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layer: nn.Linear | str | None = None,
    flat: bool = False,
    return_logits: bool = False,
) -> dict[str, Tensor] | Tensor | tuple[dict[str, Tensor] | Tensor, Tensor]:
    r"""Closed-form per-example gradients of a final linear layer under softmax cross-entropy.

    With logits :math:`z_k = W a_k + b` (``a_k`` the layer input) and
    :math:`\ell_k = -\log \operatorname{softmax}(z_k)_{y_k}`,

    .. math::
        \nabla_W \ell_k = (\operatorname{softmax}(z_k) - e_{y_k})\, a_k^\top, \qquad
        \nabla_b \ell_k = \operatorname{softmax}(z_k) - e_{y_k},

    i.e. :math:`\delta_k \otimes [a_k, 1]`. One forward pass (a forward hook records
    :math:`a_k`), no backward pass, no autograd graph.

    Args:
        model: the network; its output must be the layer's output (the logits).
        x: inputs ``(B, ...)``.
        y: integer class labels ``(B,)``.
        layer: the final :class:`~torch.nn.Linear` (module or name); default
            :func:`final_linear`.
        flat: return the ``(B, P)`` matrix (``weight`` entries first, then ``bias``).
        return_logits: also return the logits ``(B, C)``.

    Returns:
        ``{"<layer>.weight": (B, C, d), "<layer>.bias": (B, C)}`` (only the parameters the layer
        has), or the flat matrix; with ``return_logits`` a pair ``(grads, logits)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> g = last_layer_grads(net, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
        >>> {k: tuple(v.shape) for k, v in g.items()}
        {'2.weight': (5, 2, 4), '2.bias': (5, 2)}
    """
    if layer is None or layer == "last":
        name, layer = final_linear(model)
    elif isinstance(layer, str):
        name = layer
        layer = dict(model.named_modules())[name]
    else:
        name = next(n for n, m in model.named_modules() if m is layer)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be nn.Linear, got {type(layer).__name__}")
    with torch.no_grad(), _capture_io(layer) as io:
        logits = model(x)
    if io.get("output") is not logits:
        raise ValueError(f"the model's output is not the output of layer {name!r}")
    act = io["input"]
    if act.dim() != 2:
        raise ValueError(f"layer {name!r} must see 2-D inputs, got shape {tuple(act.shape)}")
    delta = torch.softmax(logits, dim=1)
    delta[torch.arange(len(y), device=y.device), y] -= 1.0
    prefix = f"{name}." if name else ""
    grads = {}
    if layer.weight.requires_grad:
        grads[prefix + "weight"] = delta.unsqueeze(2) * act.unsqueeze(1)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[prefix + "bias"] = delta
    out = flatten_grads(grads) if flat else grads
    return (out, logits) if return_logits else out


# --------------------------------------------------------------------------------------------
# dense-layer factors from the ordinary backward pass


class LinearGradCapture:
    r"""Per-example gradients of :class:`~torch.nn.Linear` layers from the ordinary backward.

    For a dense layer :math:`z_k = W a_k + b` inside a loss
    :math:`L = \sum_k w_k \ell_k` (``w_k`` known, e.g. ``1/n`` for the mean), the gradient that
    reaches the layer output of example ``k`` is :math:`\partial L/\partial z_k = w_k
    \delta_k` with :math:`\delta_k = \partial \ell_k / \partial z_k`, so

    .. math::
        \nabla_W \ell_k = \delta_k a_k^\top, \qquad \nabla_b \ell_k = \delta_k .

    A forward hook keeps :math:`a_k` and a tensor hook on :math:`z_k` keeps
    :math:`w_k\delta_k`; :meth:`grads` divides by :math:`w_k` and forms the outer products
    (cost :math:`O(B \cdot d_{out} d_{in})`, the same as the layer's own weight gradient). The
    backward pass itself is unchanged.

    Args:
        model: the network.
        params: which parameters (:data:`ParamSpec`); every selected parameter must belong to an
            ``nn.Linear`` whose input is 2-D and which is applied once per forward pass.

    Use it as a context manager around the forward *and* backward pass::

        with LinearGradCapture(model, "last") as cap:
            losses = loss_fn(model(x), y)
            losses.mean().backward()
        g = cap.grads(weights=1 / len(x))        # {name: (B, *shape)}

    .. note::
        Exact only when examples do not interact inside the network (no BatchNorm in training
        mode) and every ``w_k`` is non-zero.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x, t = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> with LinearGradCapture(net) as cap:
        ...     nn.functional.cross_entropy(net(x), t).backward()
        >>> ref = per_example_grads(
        ...     net, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), x, t)
        >>> all(torch.allclose(cap.grads(0.2)[k], ref[k], atol=1e-6) for k in ref)
        True
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None) -> None:
        self.names = select_parameters(model, params)
        owners: dict[str, tuple[str, nn.Linear]] = {}
        for mname, module in model.named_modules():
            if isinstance(module, nn.Linear):
                for pname, _ in module.named_parameters(recurse=False):
                    owners[f"{mname}.{pname}" if mname else pname] = (mname, module)
        layers: dict[str, nn.Linear] = {}
        for n in self.names:
            if n not in owners:
                raise ValueError(f"parameter {n!r} does not belong to an nn.Linear layer")
            layers[owners[n][0]] = owners[n][1]
        self._layers = layers
        self.layers: dict[str, nn.Linear] = layers
        """``{layer name: nn.Linear}`` of the layers whose factors are recorded."""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        """``{layer name: (a, w*delta)}`` recorded by the last forward/backward pass."""
        self._inputs: dict[str, Tensor] = {}

    def __enter__(self) -> LinearGradCapture:
        self.factors.clear()
        self._inputs.clear()
        for lname, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(self._forward_hook(lname)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, lname: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            a = inputs[0]
            if a.dim() != 2:
                raise ValueError(f"layer {lname!r} must see 2-D inputs, got {tuple(a.shape)}")
            if lname in self._inputs:
                raise ValueError(f"layer {lname!r} was applied twice in one forward pass")
            self._inputs[lname] = a.detach()
            if output.requires_grad:

                def keep(grad_out: Tensor) -> None:
                    self.factors[lname] = (self._inputs[lname], grad_out.detach())

                output.register_hook(keep)

        return hook

    def grads(self, weights: float | Tensor) -> dict[str, Tensor]:
        """Per-example gradients ``{name: (B, *shape)}`` of the selected parameters.

        Args:
            weights: the per-example loss weights ``w_k`` of the loss that was backpropagated
                (a number for equal weights, e.g. ``1/B`` for the mean, or a ``(B,)`` tensor).
        """
        out: dict[str, Tensor] = {}
        for n in self.names:
            lname, _, pname = n.rpartition(".")
            if lname not in self.factors:
                raise RuntimeError(f"no gradient reached layer {lname!r}: run backward inside")
            a, gz = self.factors[lname]
            w = weights if not isinstance(weights, Tensor) else weights.reshape(-1, 1)
            delta = gz / w
            out[n] = delta.unsqueeze(2) * a.unsqueeze(1) if pname == "weight" else delta
        return out
