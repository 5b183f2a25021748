"""Scoring workers as Ray actors: exact scores, a trainer that never waits, a killed worker."""

import time

import pytest
import torch
from torch import nn

from probopt.distributed import ScoringPool
from probopt.sampling.importance import ImportanceEstimator, ScoreTable
from probopt.sampling.scores import cross_entropy_per_example as ce
from probopt.sampling.scores import exact_grad_norms

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

# float64 in every process: worker scores (dense identity) equal torch.func norms to rounding
RTOL = 1e-10
# a poll must never wait for a worker; it only talks to the local raylet (~1 ms idle). The
# bound leaves room for a loaded 2-core machine, far below one block's scoring time.
POLL_LIMIT_S = 0.5


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024**2,
    )
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The trainer shares the 2 cores with the actors: one torch thread avoids OpenMP spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def problem(n=96, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return net, x, torch.randint(0, 3, (n,), generator=g)


class RecordingPool(ScoringPool):
    """Keeps every published block and the time each poll took."""

    def start(self, *args, **kwargs):
        self.batches, self.poll_times = [], []
        super().start(*args, **kwargs)

    def poll(self):
        t0 = time.perf_counter()
        out = super().poll()
        self.poll_times.append(time.perf_counter() - t0)
        self.batches += out
        return out


@pytest.mark.slow  # the killed-worker test below checks the same (exact scores, coverage)
def test_actors_score_every_example_exactly(ray_cluster):
    net, x, y = problem(240)
    pool = RecordingPool(2, backend="ray", block_size=32)
    pool.start(net, x, y, version=0)
    table = ScoreTable(len(x))
    deadline = time.monotonic() + 60
    while table.coverage() < 1 and time.monotonic() < deadline:
        for b in pool.poll():
            table.update(b.indices, b.scores, b.version)
        time.sleep(0.01)
    pool.close()
    assert table.coverage() == 1.0
    torch.testing.assert_close(table.scores, exact_grad_norms(net, ce, x, y), rtol=RTOL, atol=0)
    workers = {b.worker: set(b.indices.tolist()) for b in pool.batches}
    assert workers[0] <= set(range(120)) and workers[1] <= set(range(120, 240))
    assert max(pool.poll_times) < POLL_LIMIT_S


@pytest.mark.slow  # its own actors (~10 s); the killed-worker test also bounds every poll
def test_polls_do_not_wait_for_slow_workers(ray_cluster):
    net, x, y = problem()

    def slow_loss(out, t):  # a block takes at least 0.5 s to score
        time.sleep(0.5)
        return ce(out, t)

    pool = RecordingPool(2, backend="ray", block_size=16)
    pool.start(net, x, y, loss_fn=slow_loss, version=0)
    while not pool.poll():  # the actors are up once the first blocks arrive
        time.sleep(0.05)
    empty, deadline = 0, time.monotonic() + 1.0
    while time.monotonic() < deadline:
        empty += not pool.poll()
        time.sleep(0.02)
    pool.close()
    assert empty > 10  # the trainer went on while blocks were being scored
    assert max(pool.poll_times) < POLL_LIMIT_S


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "on_failure",
    ["restart", pytest.param("reassign", marks=pytest.mark.slow)],  # a second cluster of actors
)
def test_a_killed_worker_loses_no_score_and_training_goes_on(ray_cluster, one_thread, on_failure):
    net, x, y = problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    pool = RecordingPool(2, backend="ray", block_size=16, on_failure=on_failure)
    est = ImportanceEstimator(pool=pool, refresh=False, sync_every=4, tau_threshold=1.0)
    est.setup(net, x, y)
    snapshots = {0: snapshot(net)}
    killed_at, shard0 = None, torch.arange(48)
    gen = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + 90
    done = False
    while not done and time.monotonic() < deadline:
        for index in est.epoch_batches(16, gen):
            opt.zero_grad()
            est.backward(net, ce, x[index], y[index], index)
            opt.step()
            est.after_step(net)
            snapshots[est.version] = snapshot(net)
            if killed_at is None and {b.worker for b in pool.batches} == {0, 1}:
                ray.kill(pool.worker(0))  # mid-run, with requests in flight
                killed_at = est.version
            time.sleep(0.005)  # leave the 2 cores some room for the workers
            done = killed_at is not None and bool((est.table.versions[shard0] > killed_at).all())
            if done:
                break
    steps = est.version
    pool.close()
    assert killed_at is not None and done, "the killed worker's shard was never rescored"
    assert [f[2] for f in pool.failures] == [on_failure]
    assert steps > killed_at  # training went on
    assert est.table.coverage() == 1.0  # no example lost its score
    # no score mixed up: every published block equals the exact norms of its examples under
    # the parameters of the version it carries
    probe = problem()[0]
    for version in sorted({b.version for b in pool.batches}):
        probe.load_state_dict(snapshots[version])
        mine = [b for b in pool.batches if b.version == version]
        idx = torch.cat([b.indices for b in mine])
        ref = exact_grad_norms(probe, ce, x[idx], y[idx])
        torch.testing.assert_close(torch.cat([b.scores for b in mine]), ref, rtol=RTOL, atol=0)
    # the table holds, for every example, the freshest published score
    for k in range(len(x)):
        last = max((b for b in pool.batches if k in b.indices.tolist()), key=lambda b: b.version)
        assert int(est.table.versions[k]) == last.version
    # after the failure the dead shard is scored by the replacement / the survivor
    after = [b for b in pool.batches if b.version > killed_at and bool((b.indices < 48).all())]
    assert {b.worker for b in after} == ({0} if on_failure == "restart" else {1})
    assert max(pool.poll_times) < POLL_LIMIT_S
