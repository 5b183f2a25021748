"""Execute every example notebook in docs/notebooks top to bottom, within its time budget.

The notebooks are committed with their outputs (built by ``docs/notebooks/_build.py``); this test
re-runs each one with nbclient in the interpreter running the tests and checks that no cell
fails and that the whole notebook takes less than 2 minutes (the budget on 2 CPU cores).
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("arviz_base")

FOLDER = Path(__file__).resolve().parent.parent / "docs" / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("[0-9][0-9]_*.ipynb"))
BUDGET_S = 120.0


def _kernel_name() -> str:
    """``python3`` (jupyter_client starts it with this interpreter); otherwise install a spec
    for this interpreter once, as ``probopt``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:
        pass
    try:
        manager.get_kernel_spec("probopt")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name",
                        "probopt"], check=True, capture_output=True)  # fmt: skip
    return "probopt"


def test_the_four_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert (
        names
        == [
            "01_how_noisy_are_my_gradients.ipynb",
            "02_your_own_gradient_model.ipynb",
            "03_model_assisted_sampling.ipynb",
            "04_importance_sampling_reliability.ipynb",
        ][: len(names)]
    )
    assert len(names) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_within_budget(path):
    nb = nbformat.read(path, as_version=4)
    committed = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in committed if c.source.strip()), "commit the executed notebook"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=int(BUDGET_S), kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(FOLDER)}})  # fmt: skip
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    if _kernel_name() == "python3":  # the kernel ran in this interpreter (this venv)
        assert nb.cells[-1].outputs[0].text.strip() == sys.executable
    assert seconds < BUDGET_S, f"{path.name} took {seconds:.0f} s (budget {BUDGET_S:.0f} s)"
