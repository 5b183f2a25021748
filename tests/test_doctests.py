"""Run the doctest example of every public module of probopt and probopt.models."""

import doctest
import importlib
import pkgutil

import probopt.models
import pytest

import probopt

_OPTIONAL = {"jax", "numpyro", "optax", "arviz_base", "arviz_stats", "arviz_plots", "ray"}


def _modules():
    for pkg in (probopt, probopt.models):
        yield pkg.__name__
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if info.name == "probopt.models" or info.name.startswith("probopt.models."):
                if pkg is probopt:
                    continue  # walked separately (the source-checkout path mapping)
            yield info.name


@pytest.mark.parametrize("name", sorted(set(_modules())))
def test_doctests(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if getattr(err, "name", None) in _OPTIONAL or any(m in str(err) for m in _OPTIONAL):
            pytest.skip(f"optional dependency missing: {err}")
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
