"""DataTree layout, netCDF round trip, ESS / Pareto k-hat, posterior draws for ArviZ."""

import importlib
import sys

import numpy as np
import pytest

xr = pytest.importorskip("xarray")
pytest.importorskip("arviz_base")

import arviz_stats as azs  # noqa: E402

from probopt.diagnostics import (  # noqa: E402
    QUANTITIES,
    draws_to_datatree,
    importance_dataset,
    load,
    save,
)


def test_groups_dims_and_coords_are_as_documented(full_tree):
    dt = full_tree
    assert set(dt.children) == {"layers", "coordinates", "estimator", "importance", "posterior"}
    layers = dt["layers"]
    assert set(layers.data_vars) == set(QUANTITIES)
    assert all(layers[q].dims == ("step", "parameter") for q in QUANTITIES)
    assert layers["parameter"].values.tolist() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert layers["step"].values.tolist() == [2, 4]  # 5 steps, every 2
    assert layers["beta"].attrs["statistic"] == "mean"
    coords = dt["coordinates"]
    assert all(coords[q].dims == ("step", "coordinate") for q in QUANTITIES)
    assert coords["parameter"].dims == ("coordinate",) and coords["index"].dims == ("coordinate",)
    labels = coords["coordinate"].values.tolist()
    assert labels == [f"{p}[{i}]" for p, i in zip(coords["parameter"].values,
                                                  coords["index"].values)]  # fmt: skip
    est = dt["estimator"]
    assert set(est.data_vars) == {"loss", "variance", "uniform_variance", "batch_size"}
    assert est["step"].values.tolist() == [3]
    assert est["batch_size"].values.tolist() == [8]
    imp = dt["importance"]
    assert imp["log_weights"].dims == ("step", "example") and imp["khat"].dims == ("step",)
    post = dt["posterior"]
    assert post["gradient"].dims == ("chain", "draw", "step", "coordinate")
    assert dict(post.sizes) == {"chain": 2, "draw": 50, "step": 2, "coordinate": 2}
    assert dt.attrs["optimizer"] == "VSGD" and dt.attrs["every"] == 2


def test_netcdf_round_trip_is_exact(full_tree, tmp_path):
    path = save(full_tree, tmp_path / "run.nc")
    back = load(path)
    xr.testing.assert_identical(back, full_tree)
    for group in full_tree.children:  # dtypes too (assert_identical compares values and attrs)
        for name, var in full_tree[group].variables.items():
            assert back[group][name].dtype.kind == var.dtype.kind, (group, name)


def test_arviz_diagnostics_apply_to_the_posterior_draws(full_tree):
    da = full_tree["posterior"].to_dataset()["gradient"]
    ess = azs.ess(da)
    rhat = azs.rhat(da)
    assert ess.dims == ("step", "coordinate") and rhat.dims == ("step", "coordinate")
    # independent draws (100 per step and coordinate): bulk ESS is near 100 and R-hat near 1;
    # 40-250 and 0.95-1.06 are wide enough for any seed's Monte Carlo error at this size
    assert np.all((ess.values > 40) & (ess.values < 250))
    assert np.all(np.abs(rhat.values - 1) < 0.06)


def test_draws_to_datatree_iid_normal_rhat():
    rng = np.random.default_rng(1)
    dt = draws_to_datatree({"B": rng.normal(size=(4, 1000, 3))}, dims={"B": ["column"]},
                           coords={"column": ["a", "b", "c"]})  # fmt: skip
    rhat = azs.rhat(dt)["B"].values
    # 4 x 1000 independent draws: R-hat within 0.01 of 1 (its sd is about 0.001 here)
    assert np.all(np.abs(rhat - 1) < 0.01)
    with pytest.raises(ValueError, match=r"\(chain, draw, ...\)"):
        draws_to_datatree({"B": np.zeros(5)})


@pytest.mark.parametrize("k", [0.3, 0.6, 0.9])
def test_pareto_khat_recovers_a_known_tail_index(k):
    # weights w = U^(-k), U uniform, have an exact Pareto tail with index k (P(w > t) = t^(-1/k)).
    # With S = 20000 weights PSIS fits the top 3 sqrt(S) = 424; the estimate's sd is about
    # (1 + k)/sqrt(424) < 0.1 and its prior shrinks toward 0.5 slightly: tolerance 0.15
    # (measured with this seed: 0.284, 0.551, 0.817).
    g = np.random.default_rng(7)
    lw = -k * np.log(g.uniform(size=(1, 20000)))
    khat = float(importance_dataset(lw, [1])["khat"].values[0])
    assert abs(khat - k) < 0.15


def test_batch_ess_extremes_and_padding():
    lw = np.array([[0.0, 0.0, 0.0, np.nan], [0.0, -np.inf, -np.inf, -np.inf]])
    ds = importance_dataset(lw, [1, 2])
    np.testing.assert_allclose(ds["ess"].values, [1.0, 0.25])  # NaN padding is ignored
    assert np.isnan(ds["khat"].values[1])  # zero weights: no tail fit, NaN (not an error)


def test_diagnostics_import_is_optional_and_names_the_extra(monkeypatch):
    # a missing ArviZ raises the ImportError of probopt._optional.require naming the extra
    monkeypatch.setitem(sys.modules, "arviz_base", None)  # `import arviz_base` now fails
    for name in [m for m in sys.modules if m.startswith("probopt.diagnostics")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install probopt\[diagnostics\]"):
        importlib.import_module("probopt.diagnostics")
