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
# The top-level folder ``models/`` is installed as ``probopt.models``. When ``probopt`` is imported
# straight from a source checkout (a regular, non-editable install with the repository root as the
# working directory shadows the installed package), expose ``<repo>/models`` under that name too.
_here = _Path(__file__).resolve().parent
if not (_here / "models").is_dir() and (_here.parent / "models" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  (module __path__)
