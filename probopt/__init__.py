"""probopt: stochastic-gradient estimation as probabilistic inference.

The true gradient is a latent variable, the minibatch gradient an observation, the minibatch a draw
from a finite-population sampling design, and an auxiliary regression model predicts per-example
gradients. Inference in these models gives optimizers (:mod:`probopt.optim`) and gradient
estimators (:mod:`probopt.sampling`) that plug into any torch training loop.

``import probopt`` imports torch only. Pyro (:mod:`probopt.pyro`), JAX/NumPyro (:mod:`probopt.jax`),
ArviZ (:mod:`probopt.diagnostics`) and Ray (:mod:`probopt.distributed`) load with their subpackages.
"""

from pathlib import Path as _Path

from probopt import optim

__version__ = "0.1.0"
__all__ = ["optim", "__version__"]


# Note [probopt: models/ from a source checkout]
# The top-level folder ``models/`` is installed as ``probopt.models`` (editable installs map it).
# When ``probopt`` is imported straight from a source checkout (e.g. a regular install shadowed by
# the repository root as working directory), nothing maps it: load ``<repo>/models`` under that
# name explicitly. Appending the repository root to ``__path__`` instead would also expose
# ``probopt.probopt``, ``probopt.tests``, ... and make package walkers recurse forever.
def _expose_models_from_checkout() -> None:
    import importlib.util
    import sys

    if importlib.util.find_spec("probopt.models") is not None:
        return
    folder = _Path(__file__).resolve().parent.parent / "models"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "probopt.models", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["probopt.models"] = module
    spec.loader.exec_module(module)


_expose_models_from_checkout()
