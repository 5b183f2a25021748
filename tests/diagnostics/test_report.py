"""CompareDiagnostics: attach through a training-loop callback, leave training unchanged,
write netCDF + PNG views into a report folder."""

import pytest
import torch
from torch import nn

pytest.importorskip("arviz_base")

from probopt.diagnostics import CompareDiagnostics, load  # noqa: E402
from probopt.optim import VSGD  # noqa: E402
from probopt.sampling import make_estimator, train_epoch  # noqa: E402


def _loss(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def _run(diag):
    torch.manual_seed(0)
    x, y = torch.randn(96, 5), torch.randint(0, 3, (96,))
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = VSGD(net.parameters(), lr=0.01)
    est = make_estimator("greg-onehot")
    est.setup(net, x, y)
    if diag is not None:
        diag.callback("vsgd seed 0")(net, opt, est)  # what the training loop calls once
    for epoch in range(2):
        train_epoch(net, opt, est, _loss, x, y, 16, generator=torch.Generator().manual_seed(epoch))
    return [p.detach().clone() for p in net.parameters()]


def test_compare_diagnostics_records_without_changing_training(tmp_path):
    diag = CompareDiagnostics(every=2, variance_every=3)
    with_diag = _run(diag)
    assert all(torch.equal(a, b) for a, b in zip(with_diag, _run(None)))
    report = tmp_path / "report.md"
    report.write_text("# probopt compare\n")
    text = diag.write(tmp_path, append_to=report)
    assert not diag.recorders["vsgd seed 0"].enabled  # detached by write
    folder = tmp_path / "diagnostics"
    dt = load(folder / "vsgd_seed_0.nc")
    assert set(dt.children) == {"layers", "coordinates", "estimator"}
    assert dt["layers"].sizes["step"] == 6  # 12 steps, every 2
    assert dt["estimator"].sizes["step"] == 4 and dt["estimator"].attrs["name"] == "greg-onehot"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [f"vsgd_seed_0_{v}.png" for v in
                    ("beta", "estimator_variance", "gradient_bands", "snr_heatmap")]  # fmt: skip
    assert "### vsgd seed 0" in text and report.read_text().endswith(text + "\n")


def test_nothing_recorded_writes_nothing(tmp_path):
    assert CompareDiagnostics().write(tmp_path) == ""
    assert not (tmp_path / "diagnostics").exists()
