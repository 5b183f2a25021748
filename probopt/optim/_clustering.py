"""Large-batch support of Grad Queue: k-means in torch and per-cluster gradients.

A large mini-batch mixes examples whose objectives conflict; Grad Queue (Al Hasib 2024) groups
them "with aligned objectives by clustering based on inherent feature space" and weighs each
cluster centre by its scarcity. This module holds the pieces that do not depend on the queue:

* :func:`kmeans`: Lloyd's algorithm with k-means++ seeding, seeded by a ``torch.Generator``;
* :func:`num_clusters`: how ``k`` grows with the batch size (ours: ``ceil(B / threshold)``);
* :func:`penultimate_features`: the default feature space (the activations feeding the last
  layer);
* :func:`cluster_gradients`: the mean gradient of each cluster, by one backward per cluster or
  by per-example gradients (``torch.func``) and a segment mean, whichever is cheaper.

The scarcity weighting and the combination live in :mod:`probopt.models.grad_queue`
(:func:`~probopt.models.grad_queue.cluster_scale`,
:func:`~probopt.models.grad_queue.combine_cluster_gradients`) and are applied by
:class:`probopt.optim.GradQueue`.

.. note:: The paper's clustering algorithm, feature layer, rule for ``k`` and the definition of
    a centre's gradient were not available to us (shared/notes/gq.md, C.6). k-means on the
    penultimate activations, ``k = ceil(B / threshold)`` and "centre gradient = mean gradient of
    the cluster's examples" are our choices.

References:
    Arthur, D. and Vassilvitskii, S., `k-means++: the advantages of careful seeding
    <https://dl.acm.org/doi/10.5555/1283383.1283494>`_, SODA 2007.

Example:
    >>> x = torch.cat([torch.randn(20, 2) - 5, torch.randn(20, 2) + 5])
    >>> labels, centres = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
    >>> sorted(torch.bincount(labels).tolist())
    [20, 20]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ClusterGradients",
    "cluster_gradients",
    "kmeans",
    "num_clusters",
    "penultimate_features",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances, shape ``(n, k)``, clamped at 0 against rounding."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0.0)


def kmeans(
    x: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    max_iter: int = 25,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` into ``k`` groups (k-means++ seeding, then Lloyd iterations).

    An empty cluster is re-seeded at the point farthest from its centre, so every returned
    cluster is non-empty whenever ``x`` has at least ``k`` distinct rows.

    Args:
        x: ``(n, d)`` features (detached; any float dtype).
        k: number of clusters, ``1 <= k <= n``.
        generator: seeds the k-means++ draws (the global RNG when None).
        max_iter: at most this many Lloyd iterations.
        tol: stop when no centre moved more than ``tol`` times the features' scale.

    Returns:
        ``(labels, centres)``: ``(n,)`` int64 labels in ``[0, k)`` and ``(k, d)`` centres.
    """
    x = x.detach().reshape(x.shape[0], -1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k!r} (must be in [1, {n}] for {n} points)")
    # k-means++: the first centre uniformly, then each with probability proportional to D(x)^2
    first = torch.randint(n, (1,), generator=generator, device="cpu").to(x.device)
    centres = [x[first[0]]]
    d2 = _sq_dist(x, centres[0][None]).squeeze(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs.cpu().double(), 1, generator=generator).to(x.device)
        centres.append(x[idx[0]])
        d2 = torch.minimum(d2, _sq_dist(x, centres[-1][None]).squeeze(1))
    c = torch.stack(centres)
    scale = float(x.std()) if n > 1 else 1.0
    labels = _sq_dist(x, c).argmin(1)
    for _ in range(max_iter):
        sizes = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        new = sums / sizes.clamp_min(1).unsqueeze(1).to(x.dtype)
        if bool((sizes == 0).any()):  # re-seed empty clusters at the worst-served points
            dist = _sq_dist(x, new).gather(1, labels[:, None]).squeeze(1)
            for j in torch.nonzero(sizes == 0).flatten().tolist():
                far = int(dist.argmax())
                new[j] = x[far]
                dist[far] = -1.0
        shift = float((new - c).norm(dim=1).max())
        c = new
        labels = _sq_dist(x, c).argmin(1)
        if shift <= tol * max(scale, 1e-12):
            break
    return labels, c


def num_clusters(batch_size: int, threshold: int, max_clusters: int) -> int:
    """``k = min(max_clusters, ceil(batch_size / threshold))``; 1 up to the threshold (ours).

    Example:
        >>> [num_clusters(b, 256, 16) for b in (128, 256, 257, 2048, 8192)]
        [1, 1, 2, 8, 16]
    """
    return max(1, min(max_clusters, math.ceil(batch_size / threshold)))


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """The activations that feed the last layer (detached): the default clustering space.

    ``model.features(x)`` when the model has it (:class:`probopt.experiments.networks.SmallCNN`),
    all but the last layer of an ``nn.Sequential`` (the input itself for a one-layer model). Other
    models need an explicit ``features`` callable.
    """
    with torch.no_grad():
        if callable(getattr(model, "features", None)):
            return model.features(x).reshape(x.shape[0], -1)
        if isinstance(model, nn.Sequential):
            h = x
            for layer in list(model)[:-1]:  # not model[:-1]: subclasses may not rebuild from a dict
                h = layer(h)
            return h.reshape(x.shape[0], -1)
    raise TypeError(
        f"cannot find the penultimate layer of {type(model).__name__}: give the model a "
        "`features(x)` method, use an nn.Sequential, or pass features=callable"
    )


class ClusterGradients:
    """Per-cluster mean gradients of one batch.

    Attributes:
        grads: one tensor per parameter (in ``params`` order), shape ``(k, *p.shape)``; row ``c``
            is the mean gradient of cluster ``c``'s examples.
        sizes: ``(k,)`` int64 cluster sizes :math:`n_c` (all > 0).
        loss: the mean loss over the whole batch (detached).
    """

    def __init__(self, grads: list[Tensor], sizes: Tensor, loss: Tensor) -> None:
        self.grads, self.sizes, self.loss = grads, sizes, loss

    @property
    def batch_size(self) -> int:
        return int(self.sizes.sum())

    def mean_grads(self) -> list[Tensor]:
        """The plain batch-mean gradient :math:`\\sum_c (n_c/B) g_c` of every parameter."""
        w = self.sizes.to(self.grads[0].dtype) / self.batch_size if self.grads else None
        return [torch.tensordot(w.to(g.device), g, dims=1) for g in self.grads]

    def __repr__(self) -> str:
        return f"ClusterGradients(k={len(self.sizes)}, sizes={self.sizes.tolist()})"


def cluster_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    labels: Tensor,
    params: list[Tensor],
    *,
    method: str = "auto",
    per_example_budget: int = 2**25,
) -> ClusterGradients:
    """Mean gradient of each cluster of the batch ``(x, y)``.

    Args:
        model: the network; ``loss_fn(model(x), y)`` must return per-example losses.
        loss_fn: per-example loss (``reduction="none"``).
        x, y: the batch.
        labels: ``(B,)`` cluster labels; clusters are renumbered to the non-empty ones.
        params: the parameters to differentiate (those of the optimizer).
        method: ``"per_cluster"``: one forward and backward per cluster (total work about one
            batch forward+backward, plus ``k`` calls' overhead); ``"per_example"``:
            ``torch.func.vmap`` of per-example gradients and a segment mean (one vectorised
            call, but :math:`B \\times P` memory); ``"auto"``: per-example only when the clusters
            are tiny (mean size below 4) and :math:`B P \\le` ``per_example_budget`` elements,
            else per-cluster. (On CPU, for the benchmarks' MLPs, the vmap path measured 30 to 60
            times slower than the per-cluster loop at B = 512 to 2048, k = 2 to 8.)
        per_example_budget: memory cap of the per-example path, in elements.
    """
    if method not in ("auto", "per_cluster", "per_example"):
        raise ValueError(f"Invalid method: {method!r} (one of auto, per_cluster, per_example)")
    _, labels = torch.unique(labels, return_inverse=True)
    k = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=k)
    numel = sum(p.numel() for p in params)
    if method == "auto":
        small = x.shape[0] * numel <= per_example_budget
        method = "per_example" if small and x.shape[0] < 4 * k else "per_cluster"
    if method == "per_example":
        return _per_example(model, loss_fn, x, y, labels, sizes, params)
    grads = [torch.empty(k, *p.shape, dtype=p.dtype, device=p.device) for p in params]
    total = torch.zeros((), dtype=torch.float64)
    for c in range(k):
        idx = torch.nonzero(labels == c).flatten()
        losses = loss_fn(model(x[idx]), y[idx])
        gs = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        for buf, g in zip(grads, gs):
            if g is None:
                buf[c].zero_()
            else:
                buf[c].copy_(g)
        total += losses.detach().double().sum().cpu()
    return ClusterGradients(grads, sizes, (total / x.shape[0]).to(x.dtype))


def _per_example(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    labels: Tensor,
    sizes: Tensor,
    params: list[Tensor],
) -> ClusterGradients:
    """Per-example gradients (:func:`probopt.sampling.per_example.per_example_grads`), then a
    segment mean per cluster."""
    from probopt.sampling.per_example import per_example_grads

    per_ex = per_example_grads(model, loss_fn, x, y, params=list(params))
    name_of = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        loss = loss_fn(model(x), y).mean()
    k = len(sizes)
    grads = []
    for p in params:
        g = per_ex[name_of[id(p)]]
        seg = torch.zeros(k, *g.shape[1:], dtype=g.dtype, device=g.device).index_add_(0, labels, g)
        grads.append(seg / sizes.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return ClusterGradients(grads, sizes, loss)
