"""Import optional backends with an error message that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_EXTRA_OF = {
    "pyro": "probopt (pyro-ppl is a core dependency; reinstall probopt)",
    "jax": "probopt[jax]",
    "numpyro": "probopt[jax]",
    "optax": "probopt[jax]",
    "arviz_base": "probopt[diagnostics]",
    "arviz_stats": "probopt[diagnostics]",
    "arviz_plots": "probopt[diagnostics]",
    "xarray": "probopt[diagnostics]",
    "matplotlib": "probopt[cli] or probopt[diagnostics]",
    "ray": "probopt[distributed]",
    "sklearn": "probopt[cli]",
    "mlxtend": "probopt[cli]",
    "mnist1d": "probopt[cli]",
    "tqdm": "probopt[cli]",
    "triton": "triton (comes with CUDA builds of torch)",
}


def require(name: str, purpose: str = "") -> ModuleType:
    """Import module ``name`` or raise an ImportError saying which extra provides it.

    Args:
        name: dotted module name, e.g. ``"numpyro"`` or ``"arviz_stats.base"``.
        purpose: what the caller needs it for, added to the message.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        top = name.split(".")[0]
        extra = _EXTRA_OF.get(top, top)
        why = f" for {purpose}" if purpose else ""
        raise ImportError(
            f"probopt needs the optional package '{top}'{why}; install it with "
            f"`pip install {extra}`"
        ) from err
