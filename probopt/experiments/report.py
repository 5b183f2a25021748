"""The report folder that ``probopt compare`` writes.

=====================  ========================================================================
file                   content
=====================  ========================================================================
``report.md``          the settings, the results table, the two plots, the machine
``results.json``       the settings, the versions, the machine, the table and every per-epoch
                       number of every run (NaN written as ``null``)
``train_loss.png``     training-set loss against epochs (log scale): the mean over seeds, and
                       the min--max band over seeds, one colour per optimizer
``test_accuracy.png``  test accuracy against epochs, drawn the same way
=====================  ========================================================================

The table has one row per optimizer (per optimizer and learning rate when one optimizer was run
with several): mean ± standard deviation over seeds of the final and of the best test accuracy,
the final training loss and the training time per epoch. Runs that diverged are counted and left
out of the means. matplotlib is imported only to draw the plots, with its Agg canvas (no display
and no change to pyplot's backend).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probopt._optional import require
from probopt.experiments.training import RunResult

__all__ = [
    "Summary",
    "environment",
    "format_table",
    "plot_curves",
    "summarize",
    "write_report",
]

_PACKAGES = ("probopt", "torch", "numpy", "scikit-learn", "mlxtend", "mnist1d", "matplotlib")


@dataclass(frozen=True)
class Summary:
    """Mean and standard deviation over the seeds of one row of the results table.

    Attributes:
        label: the row's name (the optimizer, with its learning rate when needed).
        optimizer, lr: what was run.
        runs: number of runs (seeds); ``diverged`` of them stopped on a non-finite loss.
        final_acc, best_acc, final_loss, epoch_time: ``(mean, sd)`` over the runs that did not
            diverge (sd with ``ddof=1``; 0 for a single run, NaN when none is left).
    """

    label: str
    optimizer: str
    lr: float
    runs: int
    diverged: int
    final_acc: tuple[float, float]
    best_acc: tuple[float, float]
    final_loss: tuple[float, float]
    epoch_time: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, tuple):
                out[key] = {"mean": _finite(value[0]), "sd": _finite(value[1])}
            else:
                out[key] = _finite(value) if isinstance(value, float) else value
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _groups(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by row label, in order of first appearance."""
    lrs: dict[str, set[float]] = {}
    for r in runs:
        lrs.setdefault(r.optimizer, set()).add(r.lr)
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        label = r.optimizer if len(lrs[r.optimizer]) == 1 else f"{r.optimizer} (lr {r.lr:g})"
        groups.setdefault(label, []).append(r)
    return groups


def summarize(runs: Sequence[RunResult]) -> list[Summary]:
    """One :class:`Summary` per optimizer (per optimizer and learning rate when it varies).

    Example:
        >>> from probopt.experiments.training import compare
        >>> runs = compare("iris", ["sgdm", "adamw"], seeds=[0, 1], network="logreg", epochs=2)
        >>> [(s.label, s.runs) for s in summarize(runs)]
        [('sgdm', 2), ('adamw', 2)]
    """
    rows = []
    for label, group in _groups(runs).items():
        ok = [r for r in group if not r.diverged]
        rows.append(
            Summary(
                label=label,
                optimizer=group[0].optimizer,
                lr=group[0].lr,
                runs=len(group),
                diverged=len(group) - len(ok),
                final_acc=_mean_sd([r.final_test_accuracy for r in ok]),
                best_acc=_mean_sd([r.best_test_accuracy for r in ok]),
                final_loss=_mean_sd([r.final_train_loss for r in ok]),
                epoch_time=_mean_sd([r.time_per_epoch for r in ok]),
            )
        )
    return rows


def _pct(ms: tuple[float, float], single: bool) -> str:
    mean, sd = ms
    if not math.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.1f}" if single else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _sci(ms: tuple[float, float], single: bool) -> str:
    mean, sd = ms
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3g}" if single else f"{mean:.3g} ± {sd:.2g}"


def format_table(rows: Sequence[Summary]) -> str:
    """The results table as GitHub markdown; the best mean final accuracy is in bold.

    Example:
        >>> row = Summary("sgdm", "sgdm", 0.05, 3, 0, (0.97, 0.01), (0.98, 0.005),
        ...               (0.002, 0.001), (0.012, 0.001))
        >>> print(format_table([row]))  # doctest: +NORMALIZE_WHITESPACE
        | optimizer | lr | runs | final test acc. (%) | best test acc. (%) | final train loss
          | time / epoch (ms) | diverged |
        |---|---|---|---|---|---|---|---|
        | sgdm | 0.05 | 3 | **97.0 ± 1.0** | 98.0 ± 0.5 | 0.002 ± 0.001 | 12.0 ± 1.0 | 0 |
    """
    header = [
        "optimizer",
        "lr",
        "runs",
        "final test acc. (%)",
        "best test acc. (%)",
        "final train loss",
        "time / epoch (ms)",
        "diverged",
    ]
    finals = [r.final_acc[0] for r in rows if math.isfinite(r.final_acc[0])]
    best = max(finals) if finals else math.nan
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        single = r.runs - r.diverged <= 1
        acc = _pct(r.final_acc, single)
        if r.final_acc[0] == best:
            acc = f"**{acc}**"
        ms = (1000 * r.epoch_time[0], 1000 * r.epoch_time[1])
        time_ = (
            "n/a"
            if not math.isfinite(ms[0])
            else (f"{ms[0]:.1f}" if single else f"{ms[0]:.1f} ± {ms[1]:.1f}")
        )
        cells = [
            r.label,
            f"{r.lr:g}",
            str(r.runs),
            acc,
            _pct(r.best_acc, single),
            _sci(r.final_loss, single),
            time_,
            str(r.diverged),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    runs: Sequence[RunResult],
    metric: str,
    path: str | os.PathLike[str],
    *,
    ylabel: str | None = None,
    logy: bool = False,
    title: str | None = None,
    first_epoch: int = 0,
) -> Path:
    """Plot ``metric`` (a per-epoch list of :class:`RunResult`) against epochs.

    One colour per row of :func:`summarize`: the mean over seeds as a line and the min--max over
    seeds as a shaded band.

    Args:
        runs: the runs.
        metric: ``"train_loss"``, ``"test_loss"`` or ``"test_accuracy"``.
        path: the PNG file to write.
        ylabel: the y-axis label (default: ``metric``).
        logy: logarithmic y axis.
        title: the figure title.
        first_epoch: the first epoch drawn (1 leaves out the untrained network, whose chance
            accuracy would squash the interesting range).

    Returns:
        The path written.
    """
    require("matplotlib", "the report plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, (label, group) in enumerate(_groups(runs).items()):
        curves = np.asarray([getattr(r, metric) for r in group], dtype=float)
        if metric == "test_accuracy":
            curves = 100 * curves
        epochs = np.arange(curves.shape[1])[first_epoch:]
        curves = curves[:, first_epoch:]
        finite = np.isfinite(curves)
        count = finite.sum(0)
        seen = count > 0  # epochs that at least one run reached without diverging
        mean = np.where(finite, curves, 0.0).sum(0) / np.maximum(count, 1)
        mean = np.where(seen, mean, np.nan)
        low = np.where(seen, np.where(finite, curves, np.inf).min(0), np.nan)
        high = np.where(seen, np.where(finite, curves, -np.inf).max(0), np.nan)
        colour = colours[i % len(colours)]
        ax.plot(epochs, mean, color=colour, label=f"{label} (n={len(group)})", lw=1.6)
        if len(group) > 1:
            ax.fill_between(epochs, low, high, color=colour, alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or metric)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def environment() -> dict[str, Any]:
    """Versions of the packages that matter and a description of the machine."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "versions": versions,
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _settings_lines(config: Mapping[str, Any]) -> list[str]:
    return [f"- **{key}**: {value}" for key, value in config.items()]


def write_report(
    runs: Sequence[RunResult],
    out: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    title: str = "probopt compare",
) -> Path:
    """Write ``report.md``, ``results.json``, ``train_loss.png`` and ``test_accuracy.png``.

    Args:
        runs: the runs to report (e.g. from :func:`probopt.experiments.training.compare`).
        out: the report folder (created if missing; the four files are overwritten).
        config: the settings to record (shown in ``report.md`` and stored in ``results.json``).
        title: the report's title.

    Returns:
        The path of ``report.md``.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    rows = summarize(runs)
    env = environment()
    dataset = runs[0].dataset
    caption = f"{dataset}, {runs[0].network}"
    plot_curves(
        runs,
        "train_loss",
        out / "train_loss.png",
        ylabel="training loss (cross-entropy)",
        logy=True,
        title=f"{caption}: training loss",
    )
    plot_curves(
        runs,
        "test_accuracy",
        out / "test_accuracy.png",
        ylabel="test accuracy (%)",
        title=f"{caption}: test accuracy",
        first_epoch=1 if runs[0].epochs > 1 else 0,
    )
    created = _dt.datetime.now().isoformat(timespec="seconds")
    payload = {
        "created": created,
        "config": config,
        "environment": env,
        "summary": [row.to_dict() for row in rows],
        "runs": [r.to_dict() for r in runs],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Created {created}.",
            "",
            "## Settings",
            "",
            *_settings_lines(config),
            "",
            "## Results",
            "",
            format_table(rows),
            "",
            "Mean ± standard deviation over seeds (runs that share a seed share the initial "
            "weights and the minibatch order). *Final*: after the last epoch; *best*: the "
            "highest test accuracy over the epochs; *train loss*: cross-entropy on the whole "
            "training set; *time / epoch*: training only, evaluation excluded. Diverged runs "
            "are left out of the means.",
            "",
            "![training loss](train_loss.png)",
            "",
            "![test accuracy](test_accuracy.png)",
            "",
            "Lines: mean over seeds; bands: min–max over seeds.",
            "",
            "## Machine",
            "",
            f"{env['cpu']}, {env['logical_cores']} logical cores, {env['torch_threads']} torch "
            f"threads; Python {env['python']}; {versions}.",
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return out / "report.md"
