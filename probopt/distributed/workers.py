r"""Scoring workers for importance sampling (Alain et al.): local, or Ray actors.

Each worker holds a shard of the training set and a copy of the network whose parameters the
trainer refreshes every few steps; it scores its shard block by block, round robin, and
publishes every block as a :class:`ScoreBatch` carrying the *global* example indices and the
parameter version that produced the scores. The trainer merges them into its
:class:`~probopt.sampling.importance.ScoreTable` (freshest version wins) and samples with the
freshest scores it has. It never waits for a worker.

::

    trainer (ScoringPool)                         worker w (ScoringWorker, shard S_w)
    start: split U into shards, start workers    hold θ_v, cursor
    every sync_every steps: publish(θ, v)  ───►   set_params(θ, v)
    every step: poll()                            score_block():
        top up ≤ max_pending requests / worker  ───►   block ← next block_size of S_w
        collect the finished ones (timeout 0)  ◄───    return (indices, ‖g‖ at θ_v, v, w)
        a dead worker: restart it on its shard
        (from where it stopped) or hand the shard
        to the least loaded survivor

``backend="local"`` (the default; no Ray) runs the same :class:`ScoringWorker` objects in the
trainer's process: :meth:`ScoringPool.poll` scores ``blocks_per_poll`` blocks per worker inline,
so scoring costs trainer time instead of running in parallel. ``backend="ray"`` makes each
worker a Ray actor (``ray.init`` is called with the machine's CPUs if Ray is not running).

.. note::
    Alain et al. ran a database (Redis) between a master and the workers; workers pulled blocks
    from a shared round-robin queue and the parameters from the database. Here the trainer
    talks to the actors directly (requests, not a database), each worker owns a fixed shard,
    and fault handling (restart or reassign) is ours: their system had none.

References:
    Alain, Lamb, Sankar, Courville & Bengio, `Variance Reduction in SGD by Distributed Importance
    Sampling <https://arxiv.org/abs/1511.06481>`_, 2015.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from probopt._optional import require
from probopt.sampling.scores import (
    SCORE_METHODS,
    DenseNormCapture,
    cross_entropy_per_example,
    score_examples,
)

__all__ = ["ScoreBatch", "ScoringPool", "ScoringWorker", "shard_indices"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ScoreBatch(NamedTuple):
    """One published block of scores."""

    indices: Tensor  # (m,) int64, global example indices
    scores: Tensor  # (m,) float64, their gradient norms
    version: int  # the parameter version that produced them
    worker: int  # the worker slot that published them


def shard_indices(population_size: int, num_shards: int) -> list[Tensor]:
    """Contiguous shards of ``range(population_size)`` whose sizes differ by at most one.

    Example:
        >>> [s.tolist() for s in shard_indices(5, 2)]
        [[0, 1, 2], [3, 4]]
    """
    if num_shards < 1 or num_shards > population_size:
        raise ValueError(f"Invalid num_shards: {num_shards!r} (must be in [1, {population_size}])")
    return [s.clone() for s in torch.tensor_split(torch.arange(population_size), num_shards)]


def _state(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    items = model.state_dict().items() if isinstance(model, nn.Module) else model.items()
    return {k: v.detach().to("cpu", copy=True) for k, v in items}


class ScoringWorker:
    """A shard of the data, a copy of the network, and a cursor: scores one block per call.

    The same class runs in process (local mode) and as a Ray actor.

    Args:
        worker: the slot number written into every :class:`ScoreBatch`.
        model: the network (copied; its parameters are replaced by :meth:`set_params`).
        x: inputs of the shard, ``(m, ...)``.
        y: targets of the shard.
        indices: global indices of the shard's examples, ``(m,)``.
        loss_fn: per-example loss; ``None``: softmax cross-entropy.
        method: score method (:data:`~probopt.sampling.scores.SCORE_METHODS`).
        block_size: examples per block (the last block of a pass may be shorter).
        version: version of ``model``'s current parameters.
        start: position in the shard of the first block.
        num_threads: ``torch.set_num_threads`` for this process (``None``: leave it).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> w = ScoringWorker(0, net, torch.zeros(5, 2), torch.zeros(5, dtype=torch.long),
        ...                   torch.arange(10, 15), block_size=3)
        >>> [w.score_block().indices.tolist() for _ in range(3)]
        [[10, 11, 12], [13, 14], [10, 11, 12]]
    """

    def __init__(
        self,
        worker: int,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        indices: Tensor,
        *,
        loss_fn: LossFn | None = None,
        method: str = "auto",
        block_size: int = 256,
        version: int = 0,
        start: int = 0,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if method not in SCORE_METHODS:
            raise ValueError(f"Invalid method: {method!r}; choose one of {SCORE_METHODS}")
        if block_size < 1:
            raise ValueError(f"Invalid block_size: {block_size!r} (must be >= 1)")
        self.worker = worker
        self.model = copy.deepcopy(model)
        self.loss_fn = loss_fn
        self.method = method
        self.block_size = block_size
        self.version = version
        self.indices = torch.as_tensor(indices, dtype=torch.int64).clone()
        self.x, self.y = x, y
        if not (self.indices.numel() == x.shape[0] == y.shape[0] > 0):
            raise ValueError("x, y and indices must have the same, non-zero length")
        self.cursor = int(start) % self.indices.numel()
        self._capture: DenseNormCapture | None = None

    def set_params(self, state: Mapping[str, Tensor], version: int) -> int:
        """Load parameters ``state`` of version ``version``; returns the version."""
        self.model.load_state_dict(state)
        self.version = int(version)
        return self.version

    def add_shard(self, x: Tensor, y: Tensor, indices: Tensor) -> int:
        """Take over another shard (after its worker died); returns the new shard size."""
        self.x = torch.cat([self.x, x])
        self.y = torch.cat([self.y, y])
        self.indices = torch.cat([self.indices, torch.as_tensor(indices, dtype=torch.int64)])
        return self.indices.numel()

    def score_block(self) -> ScoreBatch:
        """Score the next block of the shard with the current parameters."""
        lo = self.cursor
        hi = min(lo + self.block_size, self.indices.numel())
        self.cursor = hi % self.indices.numel()
        if self._capture is None and self.method in ("auto", "dense"):
            self._capture = DenseNormCapture(self.model, hooks=False)
        scores = score_examples(
            self.model, self.loss_fn, self.x[lo:hi], self.y[lo:hi], self.method,
            capture=self._capture,
        )  # fmt: skip
        return ScoreBatch(
            self.indices[lo:hi].clone(), scores.detach().double(), self.version, self.worker
        )

    def score_block_arrays(self) -> tuple[Any, Any, int, int]:
        """:meth:`score_block` as NumPy arrays: what crosses the process boundary (NumPy
        arrays deserialise much faster than torch tensors)."""
        b = self.score_block()
        return b.indices.numpy(), b.scores.numpy(), b.version, b.worker

    def info(self) -> dict[str, int]:
        """Shard size, cursor, version and process id (for monitoring and tests)."""
        return {
            "size": self.indices.numel(),
            "cursor": self.cursor,
            "version": self.version,
            "pid": os.getpid(),
        }


@dataclass
class _Slot:
    shard: Tensor  # global indices of the slot's own shard
    worker: Any  # ScoringWorker (local) or an actor handle (ray)
    scored: int = 0  # examples returned since (re)start, to restart at the right block
    start: int = 0
    pending: list[Any] = field(default_factory=list)  # ray object refs of score requests
    acks: list[Any] = field(default_factory=list)  # ray object refs of set_params / add_shard
    alive: bool = True


class ScoringPool:
    """Scoring workers that the trainer feeds with parameters and polls for scores.

    Args:
        num_workers: number of workers (shards).
        backend: ``"local"`` (in process, the default) or ``"ray"`` (one actor per worker).
        method: score method of the workers (:data:`~probopt.sampling.scores.SCORE_METHODS`).
        block_size: examples per block.
        max_pending: requests kept queued at each Ray actor, so it never idles between polls.
        blocks_per_poll: blocks each local worker scores per :meth:`poll`.
        on_failure: ``"restart"`` a dead actor on its shard, or ``"reassign"`` the shard to the
            least loaded live actor (restart when none is left).
        worker_cpus: CPUs Ray reserves per actor.
        num_threads: torch threads inside each actor.
        min_interval: seconds; a Ray :meth:`poll` sooner than this after the previous one
            returns ``[]`` at once (a poll costs the trainer ~0.3–1 ms; blocks take longer).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Linear(3, 2)
        >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> pool = ScoringPool(2, block_size=4)
        >>> pool.start(net, x, y, version=0)
        >>> [(b.indices.tolist(), b.version, b.worker) for b in pool.poll()]
        [([0, 1, 2, 3], 0, 0), ([5, 6, 7, 8], 0, 1)]
        >>> pool.publish(net, 7)
        >>> [b.version for b in pool.poll()]
        [7, 7]
    """

    def __init__(
        self,
        num_workers: int = 1,
        *,
        backend: str = "local",
        method: str = "auto",
        block_size: int = 256,
        max_pending: int = 2,
        blocks_per_poll: int = 1,
        on_failure: str = "restart",
        worker_cpus: float = 1.0,
        num_threads: int = 1,
        min_interval: float = 0.01,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"Invalid num_workers: {num_workers!r} (must be an integer >= 1)")
        if backend not in ("local", "ray"):
            raise ValueError(f"Invalid backend: {backend!r}; choose 'local' or 'ray'")
        if method not in SCORE_METHODS:
            raise ValueError(f"Invalid method: {method!r}; choose one of {SCORE_METHODS}")
        if on_failure not in ("restart", "reassign"):
            raise ValueError(f"Invalid on_failure: {on_failure!r}; choose 'restart' or 'reassign'")
        for name, value in (
            ("block_size", block_size),
            ("max_pending", max_pending),
            ("blocks_per_poll", blocks_per_poll),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
        self.num_workers = num_workers
        self.backend = backend
        self.method = method
        self.block_size = block_size
        self.max_pending = max_pending
        self.blocks_per_poll = blocks_per_poll
        self.on_failure = on_failure
        self.worker_cpus = worker_cpus
        self.num_threads = num_threads
        self.min_interval = float(min_interval)
        self._last_poll = -float("inf")
        self.failures: list[tuple[int, int, str]] = []
        """``(slot, version at detection, "restart"|"reassign")`` for every worker lost."""
        self.slots: list[_Slot] = []
        self.started = False

    # -- life cycle -----------------------------------------------------------------------------

    def start(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: LossFn | None = None,
        version: int = 0,
    ) -> None:
        """Split ``(x, y)`` into shards and start one worker per shard with ``model``'s
        parameters as version ``version``."""
        if self.started:
            raise RuntimeError("this ScoringPool is already started")
        self._x, self._y = x.detach().cpu(), y.detach().cpu()
        self._model = copy.deepcopy(model).cpu()
        self._loss_fn = loss_fn if loss_fn is not None else cross_entropy_per_example
        self._version = int(version)
        self._state = _state(self._model)
        self._state_ref: Any = None
        if self.backend == "ray":
            self._ray = require("ray", "distributed scoring workers")
            if not self._ray.is_initialized():
                self._ray.init(
                    num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False
                )
            self._actor_cls = self._ray.remote(ScoringWorker)
        self.slots = []
        for w, shard in enumerate(shard_indices(self._x.shape[0], self.num_workers)):
            self.slots.append(_Slot(shard, self._new_worker(w, shard, start=0)))
        self.started = True

    def _new_worker(self, w: int, shard: Tensor, *, start: int) -> Any:
        args = (w, self._model, self._x[shard], self._y[shard], shard)
        kwargs = {
            "loss_fn": self._loss_fn,
            "method": self.method,
            "block_size": self.block_size,
            "version": self._version,
            "start": start,
        }
        if self.backend == "local":
            worker = ScoringWorker(*args, **kwargs)
            worker.set_params(self._state, self._version)
            return worker
        actor = self._actor_cls.options(num_cpus=self.worker_cpus, max_restarts=0).remote(
            *args, num_threads=self.num_threads, **kwargs
        )
        if self._state_ref is not None:  # parameters newer than the model passed to start()
            actor.set_params.remote(self._state_ref, self._version)
        return actor

    def close(self) -> None:
        """Stop the workers (kills the Ray actors; leaves Ray itself running)."""
        if self.started and self.backend == "ray":
            for slot in self.slots:
                if slot.alive:
                    self._ray.kill(slot.worker)
        self.slots = []
        self.started = False

    # -- parameters and scores ------------------------------------------------------------------

    def publish(self, model: nn.Module | Mapping[str, Tensor], version: int) -> None:
        """Send the parameters of version ``version`` to every worker (never waits)."""
        self._check_started()
        self._version = int(version)
        self._state = _state(model)
        if self.backend == "local":
            for slot in self.slots:
                slot.worker.set_params(self._state, self._version)
            return
        self._state_ref = self._ray.put(self._state)
        for slot in self.slots:
            if slot.alive:
                slot.acks.append(slot.worker.set_params.remote(self._state_ref, self._version))

    def poll(self) -> list[ScoreBatch]:
        """The blocks finished since the last call (local: scored now), in completion order."""
        self._check_started()
        if self.backend == "local":
            out = []
            for slot in self.slots:
                for _ in range(self.blocks_per_poll):
                    out.append(slot.worker.score_block())
            return out
        return self._poll_ray()

    def _poll_ray(self) -> list[ScoreBatch]:
        now = time.monotonic()
        if now - self._last_poll < self.min_interval:
            return []
        self._last_poll = now
        ray = self._ray
        for slot in self.slots:
            while slot.alive and len(slot.pending) < self.max_pending:
                slot.pending.append(slot.worker.score_block_arrays.remote())
        owner = {}
        for i, slot in enumerate(self.slots):
            for ref in slot.pending + slot.acks:
                owner[ref] = i
        if not owner:
            return []
        ready, _ = ray.wait(list(owner), num_returns=len(owner), timeout=0)
        ready_set = set(ready)
        out: list[ScoreBatch] = []
        dead: set[int] = set()
        for i, slot in enumerate(self.slots):
            # results of one actor complete in submission order: take them in that order
            for ref in [r for r in slot.acks if r in ready_set]:
                slot.acks.remove(ref)
                if self._get(ref) is None:
                    dead.add(i)
            for ref in [r for r in slot.pending if r in ready_set]:
                slot.pending.remove(ref)
                arrays = self._get(ref)
                if arrays is None:
                    dead.add(i)
                    continue
                if i not in dead:
                    idx, scores, version, worker = arrays
                    batch = ScoreBatch(torch.tensor(idx), torch.tensor(scores), version,
                                       worker)  # fmt: skip
                    slot.scored += batch.indices.numel()
                    out.append(batch)
        for i in sorted(dead):
            self._replace(i)
        return out

    def _get(self, ref: Any) -> Any:
        """The value of a finished ref, or ``None`` when its actor died."""
        try:
            return self._ray.get(ref, timeout=0)
        except self._ray.exceptions.RayActorError:
            return None

    def _replace(self, i: int) -> None:
        slot = self.slots[i]
        if not slot.alive:
            return
        slot.alive = False
        slot.pending.clear()
        slot.acks.clear()
        self._ray.kill(slot.worker)  # make sure it is gone (no-op if already dead)
        live = [j for j, s in enumerate(self.slots) if s.alive]
        if self.on_failure == "reassign" and live:
            j = min(live, key=lambda k: self._load(k))
            shard = slot.shard
            ack = self.slots[j].worker.add_shard.remote(self._x[shard], self._y[shard], shard)
            self.slots[j].acks.append(ack)
            self.slots[j].shard = torch.cat([self.slots[j].shard, shard])
            self.failures.append((i, self._version, "reassign"))
            slot.shard = shard[:0]
            return
        start = (slot.start + slot.scored) % slot.shard.numel()
        self.slots[i] = _Slot(slot.shard, self._new_worker(i, slot.shard, start=start), start=start)
        self.failures.append((i, self._version, "restart"))

    def _load(self, j: int) -> int:
        return self.slots[j].shard.numel()

    def _check_started(self) -> None:
        if not self.started:
            raise RuntimeError("call ScoringPool.start(model, x, y) first")

    def worker(self, slot: int) -> Any:
        """The worker of ``slot``: a :class:`ScoringWorker` (local) or its Ray actor handle."""
        return self.slots[slot].worker

    def shard(self, slot: int) -> Tensor:
        """Global indices that ``slot`` currently scores (its own shard and any taken over)."""
        return self.slots[slot].shard

    def __repr__(self) -> str:
        return (
            f"ScoringPool(num_workers={self.num_workers}, backend={self.backend!r}, "
            f"method={self.method!r}, block_size={self.block_size})"
        )
