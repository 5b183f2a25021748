"""The ``probopt`` command: a tiny compare run, the listings, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probopt.cli import main, parse_lrs, parse_seeds

TINY = ["--dataset", "iris", "--network", "logreg", "--optimizers", "sgdm,adamw", "--epochs", "2",
        "--seeds", "1", "--batch-size", "16"]  # fmt: skip


def test_compare_writes_the_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["compare", *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| sgdm |" in captured.out and "| adamw |" in captured.out
    assert f"report: {out / 'report.md'}" in captured.out
    assert "probopt compare" in captured.err  # the progress bar goes to stderr
    for name in ("report.md", "results.json", "train_loss.png", "test_accuracy.png"):
        assert (out / name).is_file()
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["optimizers"] == "sgdm, adamw"
    assert data["config"]["command"].startswith("probopt compare --dataset iris")
    assert [r["optimizer"] for r in data["runs"]] == ["sgdm", "adamw"]


def test_compare_writes_gradient_diagnostics(tmp_path):
    """The report carries the posterior-gradient diagnostics of the first seed of each
    optimizer: a netCDF DataTree and the PNG views that have data (VSGD has a posterior, SGD
    does not, so only VSGD gets the beta view); --no-diagnostics writes none."""
    from probopt.diagnostics.arviz import load

    out = tmp_path / "rep"
    argv = ["compare", *TINY, "--optimizers", "sgdm,vsgd", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    diag = out / "diagnostics"
    assert {"sgdm_seed_0.nc", "vsgd_seed_0.nc", "vsgd_seed_0_beta.png"} <= {
        f.name for f in diag.iterdir()
    }
    assert not (diag / "sgdm_seed_0_beta.png").exists()
    assert "diagnostics/vsgd_seed_0_beta.png" in (out / "report.md").read_text()
    tree = load(diag / "vsgd_seed_0.nc")
    assert {"layers", "coordinates"} <= set(tree.children)
    quiet = tmp_path / "plain"
    assert main([*argv[:-3], "--out", str(quiet), "--quiet", "--no-diagnostics"]) == 0
    assert not (quiet / "diagnostics").exists()


def test_quiet_has_no_progress_bar_and_lr_reaches_the_runs(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["compare", *TINY, "--out", str(out), "--quiet", "--lr", "0.01,adamw=0.02"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["optimizer"]: r["lr"] for r in runs} == {"sgdm": 0.01, "adamw": 0.02}
    assert {r["schedule"] for r in runs} == {"constant"}


def test_schedule_reaches_the_runs_and_the_report(tmp_path):
    out = tmp_path / "rep"
    assert main(["compare", *TINY, "--out", str(out), "--quiet", "--schedule", "cosine"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["schedule"] for r in runs} == {"cosine"}
    assert "- **schedule**: cosine" in (out / "report.md").read_text()


def test_listings(capsys):
    assert main(["datasets"]) == 0
    listed = capsys.readouterr().out
    assert "digits" in listed and "mnist1d" in listed
    assert main(["optimizers"]) == 0
    listed = capsys.readouterr().out
    assert "sgdm" in listed and "adamw" in listed and "vsgd" in listed
    assert main(["estimators"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "uniform"


def _file(tmp_path):
    (tmp_path / "a_file").write_text("")
    return str(tmp_path / "a_file" / "report")


BAD = {
    "unknown dataset": (["--dataset", "nope"], "unknown dataset 'nope'"),
    "unknown optimizer": (["--optimizers", "sgdm,foo"], "unknown optimizer 'foo'"),
    "unknown estimator": (["--estimator", "nope"], "unknown estimator 'nope'; choose from uniform"),
    "unknown network": (["--network", "rnn"], "unknown network 'rnn'"),
    "negative epochs": (["--epochs", "-3"], "--epochs must be an integer >= 1"),
    "malformed lr": (["--lr", "vsgd=abc"], "--lr takes a positive number"),
    "negative lr": (["--lr", "-0.1"], "--lr takes a positive number"),
    "lr for an optimizer not run": (["--lr", "adam=0.1"], "--lr names 'adam'"),
    "bad seeds": (["--seeds", "x"], "--seeds takes a count"),
    "cnn on flat data": (["--dataset", "iris", "--network", "cnn"], "a cnn needs"),
    "batch larger than the data": (["--dataset", "iris", "--batch-size", "1000"], "exceeds"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "zero threads": (["--threads", "0"], "expected a positive integer"),
    "unknown schedule": (["--schedule", "linear"], "argument --schedule: invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_give_one_line_and_status_2(case, tmp_path, capsys):
    args, message = BAD[case]
    assert main(["compare", *args, "--out", str(tmp_path / "rep")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("probopt: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "rep" / "report.md").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    assert main(["compare", *TINY, "--out", _file(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probopt: error: cannot write the report folder") and err.count("\n") == 1


def test_missing_command_and_missing_extra(monkeypatch, tmp_path, capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("probopt: error: choose a command")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert main(["compare", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install probopt[cli]" in err


def test_unavailable_optimizer_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import probopt.optim

    monkeypatch.delattr(probopt.optim, "GradQueue", raising=False)
    assert main(["compare", "--optimizers", "gq-sgdm", "--out", str(tmp_path)]) == 2
    assert "needs probopt.optim.GradQueue" in capsys.readouterr().err


def test_parsers():
    assert parse_seeds("2") == [0, 1] and parse_seeds("5,") == [5]
    assert parse_lrs(None, ["sgdm"]) == {}
    assert parse_lrs("vsgd=0.02,adamw=3e-3", ["adamw", "vsgd"]) == {"vsgd": 0.02, "adamw": 3e-3}
    with pytest.raises(ValueError, match="twice"):
        parse_lrs("vsgd=1,vsgd=2", ["vsgd"])
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("probopt ")


# ---------------------------------------------------------------------------------------------
# as a program: `python -m probopt.cli` and the console script


def _run(cmd, cwd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_python_dash_m(tmp_path):
    done = _run([sys.executable, "-m", "probopt.cli", "--help"], tmp_path)
    assert done.returncode == 0 and "compare" in done.stdout


def test_console_script(tmp_path):
    script = shutil.which("probopt", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the probopt console script is not installed next to this python")
    done = _run([script, "compare", "--quick", *TINY, "--quiet", "--out", "rep"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rep" / "report.md").is_file()
    assert "report: rep/report.md" in done.stdout
