r"""ArviZ diagnostics of posterior gradient uncertainty (``pip install probopt[diagnostics]``).

Attach a :class:`Recorder` to any optimizer (and, optionally, a gradient estimator), train,
then look at the posterior of the true gradient with ArviZ::

    from probopt.diagnostics import Recorder, plot_gradient_bands, save
    rec = Recorder(optimizer, model=net, coordinates=3, every=10, estimator=estimator)
    ...                                    # train as usual: hooks record, nothing else changes
    dt = rec.to_datatree()                 # xarray.DataTree with named dims
    save(dt, "run.nc")                     # netCDF, exact round trip with load()
    plot_gradient_bands(dt).savefig("bands.png")

=====================================  ===================================================
:class:`Recorder`                      step hooks: posterior mean/variance, β_t, precisions,
                                       SNR; estimator design variance; importance weights
:func:`to_datatree`, :func:`save`,     ArviZ DataTree, netCDF round trip, posterior draws
:func:`load`, :func:`draws_to_datatree`  (chains × draws) for ESS and R̂
:mod:`~probopt.diagnostics.plots`      one-call views returning matplotlib figures
:func:`write_report_diagnostics`       netCDF + PNG views into a ``probopt compare`` report
=====================================  ===================================================
"""

from probopt._optional import require

for _name in ("xarray", "arviz_base", "arviz_stats", "matplotlib"):
    require(_name, "probopt.diagnostics")

from probopt.diagnostics.arviz import (  # noqa: E402
    draws_to_datatree,
    guide_draws,
    importance_dataset,
    load,
    save,
    to_datatree,
)
from probopt.diagnostics.estimator_variance import (  # noqa: E402
    ADAPTERS,
    EstimatorRecorder,
    VarianceAdapter,
    hansen_hurwitz_uniform_variance,
)
from probopt.diagnostics.plots import (  # noqa: E402
    VIEWS,
    plot_beta,
    plot_draw_diagnostics,
    plot_estimator_variance,
    plot_gradient_bands,
    plot_importance,
    plot_layer_quantity,
    plot_snr_heatmap,
    save_views,
)
from probopt.diagnostics.recorder import (  # noqa: E402
    LAYER_STATISTICS,
    QUANTITIES,
    READERS,
    PosteriorReader,
    Recorder,
)
from probopt.diagnostics.report import CompareDiagnostics, write_report_diagnostics  # noqa: E402

__all__ = [
    "ADAPTERS",
    "CompareDiagnostics",
    "EstimatorRecorder",
    "LAYER_STATISTICS",
    "PosteriorReader",
    "QUANTITIES",
    "READERS",
    "Recorder",
    "VIEWS",
    "VarianceAdapter",
    "draws_to_datatree",
    "guide_draws",
    "hansen_hurwitz_uniform_variance",
    "importance_dataset",
    "load",
    "plot_beta",
    "plot_draw_diagnostics",
    "plot_estimator_variance",
    "plot_gradient_bands",
    "plot_importance",
    "plot_layer_quantity",
    "plot_snr_heatmap",
    "save",
    "save_views",
    "to_datatree",
    "write_report_diagnostics",
]
