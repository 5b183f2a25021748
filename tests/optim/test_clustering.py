"""k-means in torch and per-cluster gradients (the large-batch part of Grad Queue)."""

import pytest
import torch
from torch import nn

from probopt.experiments import make_network
from probopt.optim._clustering import (
    cluster_gradients,
    kmeans,
    num_clusters,
    penultimate_features,
)


def _blobs(n_per=30, k=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    truth = torch.arange(k).repeat_interleave(n_per)
    return centres[truth] + torch.randn(k * n_per, d, generator=g), truth


def _same_partition(a, b):
    # labels equal up to a permutation: the pair (a, b) takes exactly as many values as a
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_blobs():
    x, truth = _blobs()
    labels, centres = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert _same_partition(labels, truth)
    for c in range(4):  # each centre is its cluster's mean
        torch.testing.assert_close(centres[c], x[labels == c].mean(0))


def test_kmeans_is_reproducible_with_a_seeded_generator():
    x = torch.randn(200, 3)
    a = kmeans(x, 7, generator=torch.Generator().manual_seed(3))[0]
    b = kmeans(x, 7, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_kmeans_returns_non_empty_clusters_and_handles_edge_cases():
    x = torch.cat([torch.zeros(20, 2), torch.ones(3, 2) * 5, torch.ones(2, 2) * -5])
    labels, _ = kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [2, 3, 20]
    labels, c = kmeans(torch.randn(5, 2), 5, generator=torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    assert kmeans(torch.randn(5, 2), 1)[0].eq(0).all()
    with pytest.raises(ValueError, match="Invalid k: 6"):
        kmeans(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match="Invalid k: 0"):
        kmeans(torch.randn(5, 2), 0)


def test_num_clusters_grows_with_the_batch():
    assert [num_clusters(b, 256, 16) for b in (32, 256, 257, 1024, 2048, 100_000)] == [
        1, 1, 2, 4, 8, 16,
    ]  # fmt: skip


def test_penultimate_features():
    mlp = make_network("mlp", (6,), 3, hidden=(8,))
    x = torch.randn(4, 6)
    torch.testing.assert_close(penultimate_features(mlp, x), mlp[1](mlp[0](x)))
    cnn = make_network("cnn", (1, 12), 3, width=4)
    assert penultimate_features(cnn, torch.randn(4, 12)).shape == (4, 16)
    assert not penultimate_features(mlp, x).requires_grad

    class Bare(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="features=callable"):
        penultimate_features(Bare(), x)


@pytest.mark.parametrize("kind,methods", [("mlp", ("per_cluster", "per_example")),
                                          ("cnn", ("per_cluster",))])  # fmt: skip
def test_cluster_gradients_are_the_cluster_mean_gradients(kind, methods):
    torch.manual_seed(0)
    shape = (6,) if kind == "mlp" else (1, 12)
    model = make_network(kind, shape, 3, hidden=(8,), width=4).double()
    x = torch.randn(40, 6 if kind == "mlp" else 12, dtype=torch.float64)
    y = torch.randint(3, (40,))
    labels = torch.randint(5, (40,)) * 2  # gaps in the label values are renumbered
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    full = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    for method in methods:  # (vmap of conv layers is slow on CPU: the CNN checks one method)
        a = cluster_gradients(model, loss_fn, x, y, labels, params, method=method)
        assert a.sizes.tolist() == torch.bincount(labels // 2).tolist() and a.batch_size == 40
        for c, value in enumerate(labels.unique()):
            idx = labels == value
            ref = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]).mean(), params)
            for i, r in enumerate(ref):
                torch.testing.assert_close(a.grads[i][c], r, rtol=1e-10, atol=1e-12)
        for f, m in zip(full, a.mean_grads()):
            torch.testing.assert_close(m, f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.loss, loss_fn(model(x), y).mean().detach())
        assert "k=5" in repr(a)


def test_cluster_gradients_rejects_bad_arguments():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(2, (4,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="Invalid method: 'fast'"):
        cluster_gradients(model, loss_fn, x, y, torch.zeros(4, dtype=torch.long),
                          list(model.parameters()), method="fast")  # fmt: skip
    with pytest.raises(ValueError, match="not a trainable model parameter"):
        cluster_gradients(model, loss_fn, x, y, torch.zeros(4, dtype=torch.long),
                          [nn.Parameter(torch.zeros(2))], method="per_example")  # fmt: skip
