"""Scoring workers in local mode (no Ray): shards, versions, exact scores, the estimator path."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from probopt.distributed import ScoringPool, ScoringWorker, shard_indices
from probopt.sampling.importance import ImportanceEstimator
from probopt.sampling.scores import cross_entropy_per_example as ce
from probopt.sampling.scores import exact_grad_norms

# float64: the workers' dense-identity scores equal the torch.func norms up to rounding
RTOL = 1e-10


def problem(n=40, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return net, x, torch.randint(0, 3, (n,), generator=g)


def test_import_does_not_import_ray():
    code = "import sys, probopt.distributed; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shards_partition_the_population():
    shards = shard_indices(11, 3)
    assert [s.numel() for s in shards] == [4, 4, 3]
    assert torch.equal(torch.cat(shards), torch.arange(11))
    with pytest.raises(ValueError, match="Invalid num_shards: 12"):
        shard_indices(11, 12)


def test_worker_scores_its_shard_round_robin_with_global_indices():
    net, x, y = problem()
    shard = torch.arange(10, 17)
    worker = ScoringWorker(3, net, x[shard], y[shard], shard, block_size=3, version=5)
    batches = [worker.score_block() for _ in range(4)]
    assert [b.indices.tolist() for b in batches] == [[10, 11, 12], [13, 14, 15], [16], [10, 11, 12]]
    assert {(b.version, b.worker) for b in batches} == {(5, 3)}
    for b in batches:
        ref = exact_grad_norms(net, ce, x[b.indices], y[b.indices])
        torch.testing.assert_close(b.scores, ref, rtol=RTOL, atol=0)


def test_local_pool_scores_with_the_published_version():
    net, x, y = problem()
    pool = ScoringPool(2, block_size=5, blocks_per_poll=4)
    pool.start(net, x, y, version=0)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    pool.publish(net, 3)
    batches = pool.poll()
    covered = torch.cat([b.indices for b in batches])
    assert sorted(covered.tolist()) == list(range(40))  # 2 workers x 4 blocks x 5 = everything
    assert {b.version for b in batches} == {3}
    scores = torch.cat([b.scores for b in batches])
    ref = exact_grad_norms(net, ce, x[covered], y[covered])  # the published (scaled) parameters
    torch.testing.assert_close(scores, ref, rtol=RTOL, atol=0)


def test_estimator_merges_worker_scores_with_their_versions():
    net, x, y = problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    est = ImportanceEstimator(workers=2, block_size=4, refresh=False, sync_every=2)
    est.setup(net, x, y)
    snapshots = {0: {k: v.clone() for k, v in net.state_dict().items()}}
    for index in est.epoch_batches(8, torch.Generator().manual_seed(0)):
        opt.zero_grad()
        est.backward(net, ce, x[index], y[index], index)
        opt.step()
        est.after_step(net)
        snapshots[est.version] = {k: v.clone() for k, v in net.state_dict().items()}
    # 5 steps, 2 workers x 1 block of 4 per step: 40 scores; parameters published at 2 and 4
    assert est.table.coverage() == 1.0
    assert set(est.table.versions.tolist()) == {0, 2, 4}
    probe = problem()[0]
    for version in (0, 2, 4):
        probe.load_state_dict(snapshots[version])
        rows = est.table.versions == version
        ref = exact_grad_norms(probe, ce, x[rows], y[rows])
        torch.testing.assert_close(est.table.scores[rows], ref, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_workers": 0}, "Invalid num_workers: 0"),
        ({"backend": "mpi"}, "Invalid backend: 'mpi'"),
        ({"method": "nope"}, "Invalid method: 'nope'"),
        ({"on_failure": "ignore"}, "Invalid on_failure: 'ignore'"),
        ({"block_size": 0}, "Invalid block_size: 0"),
        ({"max_pending": 0}, "Invalid max_pending: 0"),
    ],
)
def test_pool_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScoringPool(**{"num_workers": 1, **kwargs})


def test_pool_must_be_started():
    with pytest.raises(RuntimeError, match="start"):
        ScoringPool(1).poll()
