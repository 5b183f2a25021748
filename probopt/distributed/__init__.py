"""Scoring workers for importance sampling, local or on Ray (extra: ``probopt[distributed]``).

``import probopt.distributed`` imports torch only; Ray is imported when a
:class:`ScoringPool` with ``backend="ray"`` starts.
"""

from probopt.distributed.workers import ScoreBatch, ScoringPool, ScoringWorker, shard_indices

__all__ = ["ScoreBatch", "ScoringPool", "ScoringWorker", "shard_indices"]
