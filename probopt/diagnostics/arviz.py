r"""A :class:`~probopt.diagnostics.Recorder` as an ArviZ ``xarray.DataTree``; netCDF round trip.

The tree (every group optional; a group is present when something was recorded for it):

=================  ==========================  ==================================================
group              dims                        variables
=================  ==========================  ==================================================
``layers``         ``step, parameter``         :data:`~probopt.diagnostics.recorder.QUANTITIES`
                                               summarised per tensor (each variable's
                                               ``statistic`` attribute says how:
                                               :data:`~probopt.diagnostics.recorder.
                                               LAYER_STATISTICS`)
``coordinates``    ``step, coordinate``        the same quantities at the chosen coordinates;
                                               non-index coords ``parameter`` and ``index``
                                               (flat index) along ``coordinate``
``estimator``      ``step``                    ``loss``, ``variance``, ``uniform_variance``,
                                               ``batch_size`` (estimated design variances,
                                               traces; :mod:`~probopt.diagnostics.
                                               estimator_variance`)
``importance``     ``step, example``           ``log_weights`` of the batch's draws (NaN pad);
                   (``step``)                  ``ess`` (Kish ESS / draws) and ``khat`` (PSIS)
                                               of the batch; for importance estimators also
                                               ``active`` and ``design_ess``, ``design_khat``
                                               of 4000 draws from the current design
``posterior``      ``chain, draw, step,        ``gradient``: draws of the true gradient from the
                   coordinate``                optimizer's posterior (the generic SVI path), so
                                               ``arviz_stats.ess`` / ``rhat`` apply per step
=================  ==========================  ==================================================

The root node's attributes describe the run (optimizer, stride, buffer, ...). ``step`` holds the
1-based optimizer step of each record; groups have their own ``step`` values (different strides).
:func:`draws_to_datatree` turns any ``(chain, draw, ...)`` arrays into an ArviZ tree (for example
draws from the Bayesian auxiliary regression, :func:`guide_draws`).

netCDF: :func:`save` writes all groups to one file (``h5netcdf`` engine), :func:`load` reads it
back into memory; the round trip is exact (tested with ``xarray.testing.assert_identical``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probopt._optional import require
from probopt.diagnostics.recorder import LAYER_STATISTICS, QUANTITIES, Recorder

__all__ = [
    "DESCRIPTIONS",
    "draws_to_datatree",
    "guide_draws",
    "importance_dataset",
    "load",
    "save",
    "to_datatree",
]

#: ``long_name`` attribute of each recorded variable.
DESCRIPTIONS: dict[str, str] = {
    "observed": "observed gradient",
    "mean": "posterior mean of the true gradient",
    "variance": "posterior variance of the true gradient",
    "beta": "learned momentum beta_t",
    "precision_g": "E[w_g], precision of the true gradient's change",
    "precision_ghat": "E[w_ghat], precision of the observation noise",
    "snr": "signal-to-noise ratio mu^2 / sigma^2",
    "loss": "minibatch loss returned by the estimator",
    "variance_est": "estimated design variance (trace) of the estimator's gradient",
    "uniform_variance": "estimated design variance (trace) of the plain minibatch mean (SRSWOR)",
    "batch_size": "minibatch size",
    "log_weights": "log importance weights of the batch's draws",
    "ess": "Kish effective sample size of the batch's weights / draws",
    "khat": "Pareto k-hat (PSIS) of the batch's weights",
    "active": "1 if the batch was drawn by importance sampling, 0 if uniformly",
    "design_ess": "Kish ESS / draws of the importance design's weights (4000 draws)",
    "design_khat": "Pareto k-hat (PSIS) of the importance design's weights (4000 draws)",
}


def _xr() -> Any:
    return require("xarray", "the DataTree of probopt.diagnostics")


def _row_diagnostics(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative Kish ESS and PSIS Pareto k-hat of each row of log-weights (NaN entries dropped),
    through :func:`probopt.sampling.importance.kish_ess` and
    :func:`~probopt.sampling.importance.pareto_khat` (NaN when a row is too short or has zero
    weights)."""
    from probopt.sampling.importance import kish_ess, pareto_khat

    lw = np.asarray(log_weights, dtype=float)
    ess, khat = np.full(lw.shape[0], np.nan), np.full(lw.shape[0], np.nan)
    for i, row in enumerate(lw):
        row = row[~np.isnan(row)]
        if row.size == 0:
            continue
        w = np.exp(row - row.max())  # scale-free: both diagnostics ignore a common factor
        ess[i] = kish_ess(torch.from_numpy(w)) / row.size
        try:
            khat[i] = pareto_khat(torch.from_numpy(w))
        except ValueError:  # zero weights: no tail fit
            pass
    return ess, khat


def to_datatree(recorder: Recorder) -> Any:
    """Convert a recorder's records to an ``xarray.DataTree`` (layout in the module docstring).

    Example:
        >>> import torch
        >>> from probopt.diagnostics import Recorder
        >>> from probopt.optim import VSGD
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = VSGD(net.parameters())
        >>> rec = Recorder(opt, model=net, coordinates=1)
        >>> for _ in range(4):
        ...     opt.zero_grad(); net(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
        >>> dt = to_datatree(rec)
        >>> sorted(dt.children), dict(dt["layers"].sizes)
        (['coordinates', 'layers'], {'step': 4, 'parameter': 2})
        >>> dt["coordinates"]["coordinate"].values.tolist()
        ['weight[2]', 'bias[1]']
    """
    xr = _xr()
    tree: dict[str, Any] = {"/": xr.Dataset(attrs=_root_attrs(recorder))}
    steps = recorder.recorded_steps()
    if steps:
        step = np.asarray(steps, dtype=np.int64)
        layers = {
            q: (("step", "parameter"), recorder.layer_array(q), _attrs(q, LAYER_STATISTICS[q]))
            for q in QUANTITIES
        }
        tree["layers"] = xr.Dataset(
            layers, coords={"step": step, "parameter": np.asarray(recorder.names, dtype=str)}
        )
        pnames, index = recorder.coordinate_table()
        coords = {
            q: (("step", "coordinate"), recorder.coordinate_array(q), _attrs(q, "value"))
            for q in QUANTITIES
        }
        tree["coordinates"] = xr.Dataset(
            coords,
            coords={
                "step": step,
                "coordinate": np.asarray(recorder.coordinate_labels(), dtype=str),
                "parameter": ("coordinate", np.asarray(pnames, dtype=str)),
                "index": ("coordinate", np.asarray(index, dtype=np.int64)),
            },
        )
    est = recorder.estimator_records
    if est is not None and est.steps():
        estep = np.asarray(est.steps(), dtype=np.int64)
        tree["estimator"] = xr.Dataset(
            {
                "loss": ("step", est.array("loss"), _attrs("loss")),
                "variance": ("step", est.array("variance"), _attrs("variance_est")),
                "uniform_variance": (
                    "step", est.array("uniform_variance"), _attrs("uniform_variance")
                ),
                "batch_size": ("step", est.array("batch_size").astype(np.int64),
                               _attrs("batch_size")),
            },
            coords={"step": estep},
            attrs={"estimator": type(recorder.estimator).__name__,
                   "name": str(getattr(recorder.estimator, "name", ""))},
        )  # fmt: skip
        imp = est.importance()
        if imp is not None:
            lw = imp.pop("log_weights")
            tree["importance"] = importance_dataset(lw, estep, imp)
    draws = recorder.draw_array()
    if draws.size:
        chains, ndraws = draws.shape[:2]
        tree["posterior"] = xr.Dataset(
            {"gradient": (("chain", "draw", "step", "coordinate"), draws,
                          _attrs("mean", "draws"))},
            coords={
                "chain": np.arange(chains, dtype=np.int64),
                "draw": np.arange(ndraws, dtype=np.int64),
                "step": np.asarray(recorder.draw_steps(), dtype=np.int64),
                "coordinate": np.asarray(recorder.coordinate_labels(), dtype=str),
            },
        )  # fmt: skip
    return xr.DataTree.from_dict(tree)


def importance_dataset(
    log_weights: np.ndarray,
    steps: Sequence[int],
    extra: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """The ``importance`` group from ``(steps, draws)`` log-weights (NaN-padded rows).

    ``ess`` and ``khat`` are computed per row; ``extra`` adds per-step variables (``active``,
    ``design_ess``, ``design_khat`` from the estimator adapters).

    Example:
        >>> ds = importance_dataset(np.log([[1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 1.0, np.nan]]), [1, 2])
        >>> ds["ess"].values.round(3).tolist()
        [1.0, 0.667]
    """
    xr = _xr()
    lw = np.asarray(log_weights, dtype=float)
    ess, khat = _row_diagnostics(lw)
    data = {
        "log_weights": (("step", "example"), lw, _attrs("log_weights")),
        "ess": ("step", ess, _attrs("ess")),
        "khat": ("step", khat, _attrs("khat")),
    }
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if name == "active":
            values = values.astype(np.int64)
        data[name] = ("step", values, _attrs(name))
    return xr.Dataset(
        data,
        coords={
            "step": np.asarray(steps, dtype=np.int64),
            "example": np.arange(lw.shape[1], dtype=np.int64),
        },
    )


def _attrs(name: str, statistic: str | None = None) -> dict[str, str]:
    out = {"long_name": DESCRIPTIONS.get(name, name)}
    if statistic is not None:
        out["statistic"] = statistic
    return out


def _root_attrs(recorder: Recorder) -> dict[str, Any]:
    import probopt

    attrs: dict[str, Any] = {str(k): str(v) for k, v in recorder.meta.items()}
    attrs.update(
        {
            "probopt_version": probopt.__version__,
            "every": int(recorder.every),
            "buffer": recorder.buffer_mode,
            "steps_seen": int(recorder.step),
            "parameters": ",".join(recorder.names),
        }
    )
    est = recorder.estimator_records
    if est is not None:
        attrs["estimator_every"] = int(est.every)
    return attrs


# --------------------------------------------------------------------------------------------
# sampled posteriors


def draws_to_datatree(
    draws: Mapping[str, Any],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    group: str = "posterior",
) -> Any:
    """ArviZ DataTree from ``name -> (chain, draw, *shape)`` arrays (tensors or numpy).

    A thin, typed front to ``arviz_base.from_dict``: ESS, R̂ and every ArviZ plot then apply.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> dt = draws_to_datatree({"B": rng.normal(size=(2, 50, 3))}, dims={"B": ["column"]})
        >>> dict(dt["posterior"].sizes)
        {'chain': 2, 'draw': 50, 'column': 3}
    """
    azb = require("arviz_base", "ArviZ posteriors")
    arrays = {}
    for name, value in draws.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.ndim < 2:
            raise ValueError(f"{name!r} must be (chain, draw, ...), got shape {value.shape}")
        arrays[name] = value
    return azb.from_dict({group: arrays}, dims=dict(dims or {}), coords=dict(coords or {}))


def guide_draws(
    guide: Callable[..., Any],
    *args: Any,
    sites: Sequence[str],
    chains: int = 4,
    draws: int = 500,
    seed: int = 0,
    vectorize_dim: int | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Draw ``chains × draws`` samples of ``sites`` from a fitted Pyro guide.

    By default the guide is traced once per draw; with ``vectorize_dim`` (a free batch dimension
    left of the guide's own plates, e.g. ``-2`` for a guide with one plate at ``dim=-1``) it is
    traced once under a ``pyro.plate`` of all the draws. torch's random state is forked, so the
    caller's stream is untouched; the chains are consecutive blocks of draws. Draws from a
    variational posterior are independent, so ESS should be near ``chains × draws`` and R̂ near
    1: a clear departure flags a guide whose sampling is broken.

    Returns:
        ``site -> (chains, draws, *shape)`` numpy arrays, for :func:`draws_to_datatree`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def guide():
        ...     with pyro.plate("coords", 3, dim=-1):
        ...         pyro.sample("g", dist.Normal(torch.zeros(3), 1.0))
        >>> out = guide_draws(guide, sites=["g"], chains=2, draws=50, vectorize_dim=-2)
        >>> out["g"].shape
        (2, 50, 3)
    """
    pyro = require("pyro", "drawing from a guide")
    from pyro import poutine

    total = chains * draws
    out: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        if vectorize_dim is not None:
            with pyro.plate("_guide_draws", total, dim=vectorize_dim):
                trace = poutine.trace(guide).get_trace(*args, **kwargs)
            result = {}
            for s in sites:
                node = trace.nodes[s]
                value = node["value"].detach()
                batch_ndim = value.dim() - len(node["fn"].event_shape)
                value = value.movedim(batch_ndim + vectorize_dim, 0).cpu().numpy()
                result[s] = value.reshape(chains, draws, *value.shape[1:])
            return result
        for _ in range(total):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            for s in sites:
                out[s].append(trace.nodes[s]["value"].detach().cpu().numpy())
    return {s: np.stack(v).reshape(chains, draws, *v[0].shape) for s, v in out.items()}


# --------------------------------------------------------------------------------------------
# netCDF


def save(datatree_or_recorder: Any, path: str | os.PathLike[str]) -> Path:
    """Write the DataTree (or a recorder's) to one netCDF-4 file, all groups; returns the path.

    Example:
        >>> import tempfile, torch
        >>> from probopt.diagnostics import Recorder
        >>> p = torch.nn.Parameter(torch.zeros(3)); opt = torch.optim.SGD([p], lr=0.1)
        >>> rec = Recorder(opt)
        >>> for _ in range(3):
        ...     p.grad = torch.ones(3); opt.step()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     back = load(save(rec, Path(d) / "run.nc"))
        >>> back["layers"]["observed"].values.ravel().tolist()
        [1.0, 1.0, 1.0]
    """
    dt = datatree_or_recorder
    if isinstance(dt, Recorder):
        dt = to_datatree(dt)
    require("h5netcdf", "writing netCDF")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dt.to_netcdf(path, engine="h5netcdf")
    return path


def load(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`save` fully into memory (the file is closed)."""
    xr = _xr()
    require("h5netcdf", "reading netCDF")
    with xr.open_datatree(path, engine="h5netcdf") as dt:
        return dt.load().copy()
