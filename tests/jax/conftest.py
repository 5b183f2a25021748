"""Fixtures of the JAX tests: a scoped float64 mode (tests share one process)."""

import pytest


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test only (``jax.enable_x64`` is a context manager)."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield
