"""Execute every example notebook in docs/notebooks top to bottom, within its time budget.

The notebooks are committed with their outputs (built by ``docs/notebooks/_build.py``); this test
re-runs each one with nbclient in the interpreter running the tests and checks that no cell
fails and that the notebook fits its budget of 2 minutes on 2 CPU cores.

The budget is checked on the kernel's CPU time (user + system, kernel start and imports
included), which bounds the wall time the notebook needs on an idle 2-core machine whatever
else is running, and on the wall time itself unless the machine was oversubscribed during the
run (1-minute load average above the core count): on a shared machine wall time measures the
neighbours.
"""

import os
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
    assert [p.name for p in NOTEBOOKS] == [
        "01_how_noisy_are_my_gradients.ipynb",
        "02_your_own_gradient_model.ipynb",
        "03_model_assisted_sampling.ipynb",
        "04_importance_sampling_reliability.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_within_budget(path):
    nb = nbformat.read(path, as_version=4)
    committed = [c for c in nb.cells if c.cell_type == "code"]
    # committed executed: every code cell ran in order, so the outputs read on GitHub
    counts = [c.execution_count for c in committed]
    assert counts == list(range(1, len(committed) + 1)), "commit the executed notebook"
    nb.cells.append(nbformat.v4.new_code_cell(
        "import resource, sys; r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(sys.executable); print(r.ru_utime + r.ru_stime)"
    ))  # fmt: skip
    client = nbclient.NotebookClient(nb, timeout=int(BUDGET_S), kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(FOLDER)}})  # fmt: skip
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    executable, cpu = nb.cells[-1].outputs[0].text.split()
    if _kernel_name() == "python3":  # the kernel ran in this interpreter (this venv)
        assert executable == sys.executable
    assert float(cpu) < BUDGET_S, f"{path.name}: kernel CPU time {float(cpu):.0f} s"
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        assert seconds < BUDGET_S, f"{path.name} took {seconds:.0f} s (budget {BUDGET_S:.0f} s)"
