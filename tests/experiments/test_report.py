"""The report folder: files exist and parse, one table row per optimizer, NaN-safe JSON."""

import dataclasses
import json
import math

import pytest

from probopt.experiments.report import format_table, summarize, write_report
from probopt.experiments.training import compare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs():
    return compare("iris", ["sgdm", "adamw"], seeds=[0, 1], network="logreg", epochs=2,
                   batch_size=16)  # fmt: skip


def _table_rows(markdown):
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]  # skip header


def test_report_folder(runs, tmp_path):
    out = tmp_path / "nested" / "report"
    path = write_report(runs, out, config={"dataset": "iris", "epochs": 2})
    assert path == out / "report.md"
    for name in ("report.md", "results.json", "train_loss.png", "test_accuracy.png"):
        assert (out / name).is_file(), name
    for png in ("train_loss.png", "test_accuracy.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE

    import matplotlib.image

    assert matplotlib.image.imread(out / "train_loss.png").ndim == 3

    text = path.read_text()
    rows = _table_rows(text)
    assert [r[0] for r in rows] == ["sgdm", "adamw"]  # one row per optimizer
    assert "![training loss](train_loss.png)" in text and "**epochs**: 2" in text

    data = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    assert data["config"] == {"dataset": "iris", "epochs": 2}
    assert len(data["runs"]) == 4 and len(data["runs"][0]["test_accuracy"]) == 3
    assert {"probopt", "torch"} <= set(data["environment"]["versions"])
    assert [s["label"] for s in data["summary"]] == ["sgdm", "adamw"]
    assert data["summary"][0]["runs"] == 2


def _no_nan(name):
    raise AssertionError(f"results.json holds {name}, which is not JSON")


def test_summary_statistics(runs):
    rows = summarize(runs)
    sgdm = [r for r in runs if r.optimizer == "sgdm"]
    acc = [r.final_test_accuracy for r in sgdm]
    mean = sum(acc) / 2
    assert rows[0].final_acc[0] == pytest.approx(mean)
    assert rows[0].final_acc[1] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc)))


def test_diverged_runs_are_counted_and_left_out(runs, tmp_path):
    bad = dataclasses.replace(runs[0], train_loss=[1.0, math.nan, math.nan],
                              test_accuracy=[0.3, math.nan, math.nan], diverged=True)  # fmt: skip
    rows = summarize([bad, runs[1]])
    assert rows[0].runs == 2 and rows[0].diverged == 1
    assert rows[0].final_acc == (runs[1].final_test_accuracy, 0.0)
    write_report([bad, runs[1]], tmp_path)  # NaN curves plot and serialise
    json.loads((tmp_path / "results.json").read_text(), parse_constant=_no_nan)


def test_one_optimizer_at_several_lrs_gets_one_row_per_lr(runs):
    other = [dataclasses.replace(r, lr=0.5) for r in runs if r.optimizer == "sgdm"]
    labels = [r.label for r in summarize([*runs, *other])]
    assert labels == ["sgdm (lr 0.05)", "adamw", "sgdm (lr 0.5)"]


def test_table_marks_the_best_final_accuracy(runs):
    table = format_table(summarize(runs))
    rows = _table_rows(table)
    assert sum("**" in r[3] for r in rows) >= 1
    assert len(rows) == 2


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        write_report([], tmp_path)
