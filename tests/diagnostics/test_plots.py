"""Every view renders headless from a DataTree with its group, and says what is missing."""

import numpy as np
import pytest

pytest.importorskip("arviz_plots")

from matplotlib.figure import Figure  # noqa: E402

from probopt.diagnostics import (  # noqa: E402
    VIEWS,
    plot_layer_quantity,
    write_report_diagnostics,
)


@pytest.mark.parametrize("view", list(VIEWS))
def test_every_view_renders_to_png(full_tree, view, tmp_path):
    fn, group = VIEWS[view]
    fig = fn(full_tree)
    assert isinstance(fig, Figure)
    path = tmp_path / f"{view}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # a tree without the view's group: a clear error naming it
    partial = full_tree.copy()
    del partial[group]
    with pytest.raises(ValueError, match=f"needs the '{group}' group"):
        fn(partial)


def test_plot_layer_quantity_and_unknown_names(full_tree):
    fig = plot_layer_quantity(full_tree, "precision_ghat", logy=True)
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[0].get_lines()) == full_tree["layers"].sizes["parameter"]
    with pytest.raises(ValueError, match="unknown quantity"):
        plot_layer_quantity(full_tree, "momentum")
    with pytest.raises(ValueError, match="unknown coordinates"):
        VIEWS["gradient_bands"][0](full_tree, ["nope[0]"])


def test_save_views_and_report_section(full_tree, tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    text = write_report_diagnostics(tmp_path, {"vsgd seed 0": full_tree}, append_to=report)
    folder = tmp_path / "diagnostics"
    assert (folder / "vsgd_seed_0.nc").is_file()
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(
        f"vsgd_seed_0_{v}.png" for v in VIEWS
    )
    body = report.read_text()
    assert body.startswith("# report\n") and "## Gradient diagnostics" in body
    assert "(diagnostics/vsgd_seed_0_beta.png)" in text
    assert "(vsgd_seed_0_beta.png)" in (folder / "diagnostics.md").read_text()
    assert np.isfinite(full_tree["layers"]["beta"].values).all()
