r"""Ready-made views of a diagnostics DataTree: one call each, a matplotlib figure back.

=====================================  =====================================================
view                                   needs group
=====================================  =====================================================
:func:`plot_gradient_bands`            ``coordinates`` (and ``posterior`` draws if present)
:func:`plot_snr_heatmap`               ``layers``
:func:`plot_beta`                      ``layers``
:func:`plot_layer_quantity`            ``layers``
:func:`plot_estimator_variance`        ``estimator``
:func:`plot_importance`                ``importance``
:func:`plot_draw_diagnostics`          ``posterior``
=====================================  =====================================================

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas, never through
pyplot: no display is needed, pyplot's state and backend are untouched, and
``fig.savefig("view.png")`` works headless. :func:`save_views` writes every view the tree has
data for. In a notebook, ``display(fig)`` (or a figure as a cell's last value) shows it inline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from probopt._optional import require

__all__ = [
    "VIEWS",
    "plot_beta",
    "plot_draw_diagnostics",
    "plot_estimator_variance",
    "plot_gradient_bands",
    "plot_importance",
    "plot_layer_quantity",
    "plot_snr_heatmap",
    "save_views",
]


def _figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 3.2,
            sharex: bool = True) -> tuple[Any, np.ndarray]:  # fmt: skip
    require("matplotlib", "the diagnostics plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height * nrows),
                 layout="constrained")  # fmt: skip
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False)
    return fig, axes


def _group(dt: Any, name: str, view: str) -> Any:
    if name not in dt.children:
        have = ", ".join(sorted(dt.children)) or "none"
        raise ValueError(f"{view} needs the {name!r} group of the DataTree (it has: {have})")
    return dt[name].to_dataset()


def plot_gradient_bands(
    dt: Any,
    coordinates: Sequence[str] | None = None,
    *,
    prob: float = 0.94,
    max_panels: int = 6,
    show_observed: bool = True,
) -> Any:
    r"""Posterior mean of the true gradient over steps with its highest-density band.

    One panel per coordinate: the line is :math:`\mu_t`, the band the ``prob`` HDI of
    :math:`q(g_t)`, the dots the observed :math:`\hat g_t`. For the Gaussian posteriors of
    VSGD the HDI is :math:`\mu_t \pm z\,\sigma_t` with :math:`z = \Phi^{-1}((1+p)/2)`; where the
    tree has posterior draws for a step (``posterior`` group), the band at that step is ArviZ's
    HDI of the draws (``arviz_stats.hdi`` over chain and draw), drawn as error bars.

    Args:
        dt: the DataTree (:func:`~probopt.diagnostics.to_datatree`).
        coordinates: labels to show (default: the first ``max_panels``).
        prob: HDI probability.
        max_panels: most panels when ``coordinates`` is None.
        show_observed: draw the observed gradients.

    Returns:
        the :class:`matplotlib.figure.Figure`.
    """
    ds = _group(dt, "coordinates", "plot_gradient_bands")
    labels = list(ds["coordinate"].values)
    chosen = labels[:max_panels] if coordinates is None else list(coordinates)
    unknown = [c for c in chosen if c not in labels]
    if unknown:
        raise ValueError(f"unknown coordinates {unknown}; the tree has {labels}")
    if not chosen:
        raise ValueError("the DataTree records no individual coordinate")
    ncols = 2 if len(chosen) > 1 else 1
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.2, height=2.6)
    z = NormalDist().inv_cdf((1 + prob) / 2)
    step = ds["step"].values
    draws = dt["posterior"].to_dataset() if "posterior" in dt.children else None
    for ax, label in zip(axes.ravel(), chosen):
        c = ds.sel(coordinate=label)
        mean, sd = c["mean"].values, np.sqrt(c["variance"].values)
        ax.plot(step, mean, color="C0", lw=1.2, label=r"$\mu_t$")
        if np.isfinite(sd).any():
            ax.fill_between(step, mean - z * sd, mean + z * sd, color="C0", alpha=0.25, lw=0,
                            label=f"{prob:.0%} HDI")  # fmt: skip
        if show_observed:
            ax.plot(step, c["observed"].values, ".", ms=2.5, color="0.35", label=r"$\hat g_t$")
        if draws is not None and label in draws["coordinate"].values:
            _draw_bars(ax, draws["gradient"].sel(coordinate=label), prob)
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_title(label, fontsize=9)
    for ax in axes.ravel()[len(chosen) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("Posterior of the true gradient", fontsize=10)
    return fig


def _draw_bars(ax: Any, da: Any, prob: float) -> None:
    azs = require("arviz_stats", "HDI of posterior draws")
    da = da.dropna("step", how="all")
    if da.sizes.get("step", 0) == 0:
        return
    hdi = azs.hdi(da, prob=prob, dim=["chain", "draw"])
    lo, hi = hdi.sel(ci_bound="lower").values, hdi.sel(ci_bound="upper").values
    mid = da.mean(("chain", "draw")).values
    ax.errorbar(da["step"].values, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor="C3",
                elinewidth=1.0, capsize=2, label="HDI of draws")  # fmt: skip


def plot_layer_quantity(
    dt: Any, quantity: str, *, logy: bool = False, ylabel: str | None = None
) -> Any:
    """One line per tensor of a ``layers`` variable over steps."""
    ds = _group(dt, "layers", "plot_layer_quantity")
    if quantity not in ds:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {list(ds.data_vars)}")
    fig, axes = _figure()
    ax = axes[0, 0]
    da = ds[quantity]
    for i, name in enumerate(ds["parameter"].values):
        ax.plot(ds["step"].values, da.sel(parameter=name).values, lw=1.1, label=str(name),
                color=f"C{i % 10}")  # fmt: skip
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    stat = da.attrs.get("statistic", "")
    ax.set_ylabel(ylabel or f"{quantity} ({stat})" if stat else quantity)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(da.attrs.get("long_name", quantity), fontsize=10)
    return fig


def plot_beta(dt: Any) -> Any:
    r"""The learned momentum :math:`\beta_t` (mean over each tensor's coordinates) per layer.

    :math:`\beta_t` is the weight of the previous posterior mean in the new one; VSGD starts at
    :math:`K_g/(1+K_g)` and learns it per coordinate (SGD with momentum keeps it fixed).
    """
    fig = plot_layer_quantity(dt, "beta", ylabel=r"mean $\beta_t$")
    fig.axes[0].set_title(r"Learned momentum $\beta_t$ per layer", fontsize=10)
    return fig


def plot_snr_heatmap(dt: Any, *, vmin: float | None = None, vmax: float | None = None) -> Any:
    r"""Heat map of :math:`\log_{10}` SNR, :math:`\sum\mu_t^2/\sum\sigma_t^2` per tensor, over
    steps (rows: tensors). SNR above 1 (0 on the scale): the posterior is sure of the gradient's
    direction; far below: the step is mostly noise."""
    ds = _group(dt, "layers", "plot_snr_heatmap")
    snr = ds["snr"].values.T  # (parameter, step)
    with np.errstate(divide="ignore", invalid="ignore"):
        logsnr = np.log10(snr)
    fig, axes = _figure(height=0.45 * snr.shape[0] + 1.4)
    ax = axes[0, 0]
    steps = ds["step"].values
    edges = _edges(steps)
    mesh = ax.pcolormesh(edges, np.arange(snr.shape[0] + 1), np.ma.masked_invalid(logsnr),
                         cmap="viridis", vmin=vmin, vmax=vmax, shading="flat")  # fmt: skip
    ax.set_yticks(np.arange(snr.shape[0]) + 0.5, [str(p) for p in ds["parameter"].values])
    ax.invert_yaxis()
    ax.set_xlabel("step")
    fig.colorbar(mesh, ax=ax, label=r"$\log_{10}$ SNR")
    ax.set_title("Signal-to-noise ratio of the true gradient per layer", fontsize=10)
    return fig


def _edges(steps: np.ndarray) -> np.ndarray:
    steps = np.asarray(steps, dtype=float)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid,
                           [steps[-1] + (steps[-1] - mid[-1])]])  # fmt: skip


def _running_geomean(x: np.ndarray, window: int) -> np.ndarray:
    logx = np.log(np.where(x > 0, x, np.nan))
    out = np.full_like(logx, np.nan)
    for i in range(len(x)):
        part = logx[max(0, i - window + 1) : i + 1]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = np.exp(part.mean())
    return out


def plot_estimator_variance(dt: Any, *, window: int = 10) -> Any:
    r"""Estimated design variance of the estimator's gradient against the plain minibatch mean's
    on the same batches, over training; below, their ratio (< 1: the estimator is better). For
    the plain mean itself (both series equal) one panel.

    Dots are single batches; lines their running geometric mean over ``window`` records (the
    per-batch estimates are heavy-tailed: a few badly fitted examples dominate a batch).
    """
    ds = _group(dt, "estimator", "plot_estimator_variance")
    step = ds["step"].values
    est, uni = ds["variance"].values, ds["uniform_variance"].values
    same = bool(np.array_equal(est, uni, equal_nan=True))  # the plain mean itself
    fig, axes = _figure(1 if same else 2, 1, height=2.6)
    ax = axes[0, 0]
    name = ds.attrs.get("name") or ds.attrs.get("estimator", "estimator")
    series = [(uni, "plain minibatch mean (SRSWOR)", "C7")]
    if not same:
        series.append((est, name, "C1"))
    for values, label, color in series:
        ax.plot(step, values, ".", ms=3, color=color, alpha=0.5)
        ax.plot(step, _running_geomean(values, window), color=color, lw=1.4, label=label)
    ax.set_yscale("log")
    ax.set_ylabel(r"tr $\hat V$ (gradient)")
    ax.legend(fontsize=7)
    ax.set_title("Design variance of the minibatch gradient", fontsize=10)
    if same:
        ax.set_xlabel("step")
        return fig
    ax = axes[1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = est / uni
    ax.plot(step, ratio, ".", ms=3, color="C1", alpha=0.5)
    ax.plot(step, _running_geomean(ratio, window), color="C1", lw=1.4)
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("estimator / uniform")
    ax.set_xlabel("step")
    return fig


def plot_importance(dt: Any) -> Any:
    r"""Reliability of the importance weights over training: Pareto :math:`\hat k` (PSIS) and
    the relative effective sample size (Kish ESS / draws).

    Where the tree has design-level diagnostics (``design_khat``, ``design_ess``: 4000 draws from
    the estimator's current design) they are drawn as lines and the batch's own values as dots;
    otherwise the batch's values only. Grey spans mark steps drawn uniformly (``active = 0``).
    Reference lines: :math:`\hat k = 0.5` and :math:`0.7` (Vehtari et al.).
    """
    ds = _group(dt, "importance", "plot_importance")
    step = ds["step"].values
    fig, axes = _figure(2, 1, height=2.4)
    top, bottom = axes[0, 0], axes[1, 0]
    design = "design_khat" in ds
    top.plot(step, ds["khat"].values, ".", ms=3, color="C3", alpha=0.6,
             label="batch" if design else None)  # fmt: skip
    bottom.plot(step, ds["ess"].values, ".", ms=3, color="C0", alpha=0.6,
                label="batch" if design else None)  # fmt: skip
    if design:
        top.plot(step, ds["design_khat"].values, "-", lw=1.2, color="C3", label="design")
        bottom.plot(step, ds["design_ess"].values, "-", lw=1.2, color="C0", label="design")
        bottom.legend(fontsize=7)
    if "active" in ds:
        edges = _edges(step)
        for i, on in enumerate(ds["active"].values):
            if not on:
                for ax in (top, bottom):
                    ax.axvspan(edges[i], edges[i + 1], color="0.92", lw=0, zorder=0)
    top.axhline(0.5, color="0.5", lw=0.8, ls=":", label="0.5")
    top.axhline(0.7, color="0.3", lw=0.8, ls="--", label="0.7")
    top.set_ylabel(r"Pareto $\hat k$")
    top.legend(fontsize=7, ncols=2)
    top.set_title("Importance weights: tail and effective sample size", fontsize=10)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("ESS / draws")
    bottom.set_xlabel("step")
    return fig


def plot_draw_diagnostics(dt: Any) -> Any:
    """Bulk ESS (relative to the number of draws) and R̂ of the posterior draws, per step and
    coordinate (``arviz_stats.ess``, ``arviz_stats.rhat``)."""
    azs = require("arviz_stats", "ESS and R-hat")
    da = _group(dt, "posterior", "plot_draw_diagnostics")["gradient"]
    total = da.sizes["chain"] * da.sizes["draw"]
    ess = azs.ess(da) / total
    rhat = azs.rhat(da)
    fig, axes = _figure(2, 1, height=2.4)
    for j, label in enumerate(da["coordinate"].values):
        kw = dict(color=f"C{j % 10}", lw=0.9, ms=3, label=str(label))
        axes[0, 0].plot(da["step"].values, ess.sel(coordinate=label).values, ".-", **kw)
        axes[1, 0].plot(da["step"].values, rhat.sel(coordinate=label).values, ".-", **kw)
    axes[0, 0].set_ylabel("bulk ESS / draws")
    axes[0, 0].set_title("Posterior draws: effective sample size and R-hat", fontsize=10)
    axes[1, 0].axhline(1.01, color="0.4", lw=0.8, ls="--")
    axes[1, 0].set_ylabel(r"$\hat R$")
    axes[1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=6, ncols=2)
    return fig


#: View name -> (function, the group it needs), in the order :func:`save_views` writes them.
VIEWS: dict[str, tuple[Any, str]] = {
    "gradient_bands": (plot_gradient_bands, "coordinates"),
    "snr_heatmap": (plot_snr_heatmap, "layers"),
    "beta": (plot_beta, "layers"),
    "estimator_variance": (plot_estimator_variance, "estimator"),
    "importance": (plot_importance, "importance"),
    "draw_diagnostics": (plot_draw_diagnostics, "posterior"),
}


#: views that show a posterior quantity, skipped when it is NaN everywhere
_KEY_VARIABLE = {"gradient_bands": "mean", "snr_heatmap": "snr", "beta": "beta"}


def save_views(
    dt: Any, folder: str | os.PathLike[str], *, prefix: str = "", dpi: int = 110
) -> dict[str, Path]:
    """Render every view the tree has data for and save it as ``<prefix><view>.png``.

    A view whose key quantity is missing everywhere (β_t, the SNR or the posterior mean of an
    optimizer without a posterior, such as AdamW: every value NaN) is not drawn.

    Returns:
        view name -> path of the PNG written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (fn, group) in VIEWS.items():
        if group not in dt.children:
            continue
        if group == "coordinates" and dt[group].sizes.get("coordinate", 0) == 0:
            continue
        key = _KEY_VARIABLE.get(name)
        if key is not None and not np.isfinite(dt[group].to_dataset()[key].values).any():
            continue
        fig = fn(dt)
        path = folder / f"{prefix}{name}.png"
        fig.savefig(path, dpi=dpi)
        written[name] = path
    return written
