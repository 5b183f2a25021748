"""Diagnostics in a ``probopt compare`` report folder: netCDF per run and the PNG views.

:class:`CompareDiagnostics` attaches one :class:`~probopt.diagnostics.Recorder` per recorded
run (through a callback the training loop calls with the model, the optimizer and the
estimator) and :meth:`CompareDiagnostics.write` calls :func:`write_report_diagnostics`, which
writes::

    <report>/diagnostics/<run>.nc               the DataTree of the run (all groups)
    <report>/diagnostics/<run>_<view>.png       every view the run has data for
    <report>/diagnostics/diagnostics.md         the section below, with the images

and appends the same section to ``<report>/report.md`` when asked. Recording costs time (the
views' data are cheap; the estimator variance needs one per-example backward per recorded
step), so by default only the first seed of each optimizer is recorded and the recorded runs'
``time / epoch`` includes that cost.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from probopt.diagnostics.arviz import save, to_datatree
from probopt.diagnostics.plots import save_views
from probopt.diagnostics.recorder import Recorder

__all__ = ["CompareDiagnostics", "write_report_diagnostics"]

_CAPTIONS = {
    "gradient_bands": "posterior mean and 94% HDI of the true gradient at chosen coordinates",
    "snr_heatmap": "signal-to-noise ratio of the true gradient per layer (log10)",
    "beta": "learned momentum beta_t per layer",
    "estimator_variance": "estimated design variance of the estimator vs the plain mean",
    "importance": "importance weights: Pareto k-hat and relative ESS",
    "draw_diagnostics": "ESS and R-hat of the posterior draws",
}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def write_report_diagnostics(
    report_dir: str | os.PathLike[str],
    runs: Mapping[str, Any] | Recorder | Any,
    *,
    append_to: str | os.PathLike[str] | None = None,
) -> str:
    """Write each run's DataTree (netCDF) and views (PNG) under ``<report_dir>/diagnostics``.

    Args:
        report_dir: the report folder.
        runs: ``label -> Recorder or DataTree``, or a single one (label ``"run"``).
        append_to: a markdown file (e.g. the report's ``report.md``) to which the section is
            appended, with image links relative to it.

    Returns:
        the markdown section (also written to ``diagnostics/diagnostics.md``).

    Example:
        >>> import tempfile, torch
        >>> from probopt.optim import VSGD
        >>> p = torch.nn.Parameter(torch.zeros(4)); opt = VSGD([p])
        >>> rec = Recorder(opt, {"p": p}, coordinates=2)
        >>> for _ in range(5):
        ...     p.grad = torch.randn(4); opt.step()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     text = write_report_diagnostics(d, {"vsgd seed 0": rec})
        ...     names = sorted(f.name for f in (Path(d) / "diagnostics").iterdir())
        >>> names  # doctest: +NORMALIZE_WHITESPACE
        ['diagnostics.md', 'vsgd_seed_0.nc', 'vsgd_seed_0_beta.png',
         'vsgd_seed_0_gradient_bands.png', 'vsgd_seed_0_snr_heatmap.png']
    """
    if not isinstance(runs, Mapping):
        runs = {"run": runs}
    report_dir = Path(report_dir)
    folder = report_dir / "diagnostics"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["## Gradient diagnostics", ""]
    lines += [
        "Recorded with `probopt.diagnostics` (one DataTree per run; open it with "
        '`probopt.diagnostics.load` or `xarray.open_datatree(..., engine="h5netcdf")`).',
        "",
    ]
    link_base = Path("diagnostics")
    if append_to is not None:
        link_base = Path(os.path.relpath(folder, Path(append_to).resolve().parent))
    for label, item in runs.items():
        dt = to_datatree(item) if isinstance(item, Recorder) else item
        slug = _slug(label)
        save(dt, folder / f"{slug}.nc")
        views = save_views(dt, folder, prefix=f"{slug}_")
        lines += [f"### {label}", "", f"DataTree: [`{slug}.nc`]({link_base / f'{slug}.nc'})", ""]
        for view, path in views.items():
            lines += [f"![{_CAPTIONS.get(view, view)}]({link_base / path.name})", ""]
    text = "\n".join(lines)
    own = "\n".join(line.replace(f"]({link_base}/", "](") for line in lines)
    (folder / "diagnostics.md").write_text(own + "\n")
    if append_to is not None:
        with open(append_to, "a") as fh:
            fh.write("\n" + text + "\n")
    return text


class CompareDiagnostics:
    """Record diagnostics for some runs of a comparison, then write them into its report.

    Args:
        every: optimizer steps between records of the posterior quantities.
        variance_every: steps between records of the estimator's design variance (each costs a
            per-example backward of ``variance_params``).
        variance_params: parameters for the estimator variance (default ``"last"``: the final
            linear layer, cheap, and where the model-assisted estimators correct).
        coordinates: coordinates per tensor recorded individually.
        capacity: records kept per group (thinned when full).

    A training loop calls ``callback(model, optimizer, estimator)`` once the three exist (see
    :meth:`callback`); the recorders stay attached until :meth:`write` (or :meth:`close`).

    Example:
        >>> import torch
        >>> diag = CompareDiagnostics(every=2)
        >>> hook = diag.callback("sgdm seed 0")
        >>> net = torch.nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> hook(net, opt, None)
        >>> sorted(diag.recorders)
        ['sgdm seed 0']
        >>> diag.close()
    """

    def __init__(
        self,
        *,
        every: int = 10,
        variance_every: int = 50,
        variance_params: Any = "last",
        coordinates: int = 3,
        capacity: int = 500,
    ) -> None:
        self.options = dict(
            every=every,
            variance_every=variance_every,
            variance_params=variance_params,
            coordinates=coordinates,
            capacity=capacity,
        )
        self.recorders: dict[str, Recorder] = {}

    def callback(self, label: str) -> Callable[[Any, Any, Any], None]:
        """A ``callback(model, optimizer, estimator)`` that attaches a recorder named ``label``."""

        def attach(model: Any, optimizer: Any, estimator: Any = None) -> None:
            opts = dict(self.options)
            if estimator is None:
                opts.pop("variance_every")
                opts.pop("variance_params")
            self.recorders[label] = Recorder(optimizer, model=model, estimator=estimator, **opts)

        return attach

    def close(self) -> None:
        """Detach every recorder (their records are kept)."""
        for rec in self.recorders.values():
            rec.close()

    def write(
        self, report_dir: str | os.PathLike[str], *, append_to: str | os.PathLike[str] | None = None
    ) -> str:
        """Detach and write every recorded run (:func:`write_report_diagnostics`)."""
        self.close()
        if not self.recorders:
            return ""
        return write_report_diagnostics(report_dir, self.recorders, append_to=append_to)
