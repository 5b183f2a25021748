"""The CPU kernel of :func:`probopt.jax.scale_by_vsgd`, an XLA FFI custom call.

Note [probopt: the VSGD FFI kernel] in ``probopt/_kernels/vsgd_xla_ffi.cc`` says why and what.
The handler is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``; a few seconds) against the XLA FFI headers shipped with jaxlib, cached like the C
kernels of :mod:`probopt._kernels.cpu` (per source, compiler, flags, jaxlib and machine, in
``$PROBOPT_CACHE_DIR``, default ``~/.cache/probopt``) and registered with XLA for the CPU platform.
:func:`vsgd_kernel` returns None, and logs why, when ``PROBOPT_NO_CPU_KERNELS=1``, when there is
no C++ compiler or when the build fails; :func:`probopt.jax.scale_by_vsgd` then runs its XLA code.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jaxlib

from probopt._kernels.cpu import build_shared

__all__ = ["TARGET", "vsgd_kernel"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parent.parent / "_kernels" / "vsgd_xla_ffi.cc"
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
#: The name of the custom call target registered with XLA.
TARGET = "probopt_vsgd"
#: Entries of the scalar operand per block (see the .cc file).
NUM_SCALARS = 9


def _compiler() -> str | None:
    names = [os.environ.get("CXX", "c++"), "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def _build() -> Path | None:
    """Compile the handler into the cache (once per key); its path, or None with a log line."""
    cxx = _compiler()
    if cxx is None:
        _log.info("probopt: no C++ compiler found; the JAX VSGD kernel is disabled")
        return None
    flags = [*_FLAGS, "-isystem", jax.ffi.include_dir()]
    return build_shared(_SOURCE, cxx, flags, extra_key=jaxlib.__version__)


@functools.cache
def vsgd_kernel() -> Callable[..., tuple[jax.Array, ...]] | None:
    """The fused VSGD leaf update, or None when it cannot be built (the reason is logged).

    The returned function maps ``(g, mu, b_g, b_ghat, scalars)`` (one dtype, float32 or float64;
    ``scalars`` of shape (9,) as laid out in the .cc file) to ``(u, mu', b_g', b_ghat')``, the
    state updated in place on the input buffers. It works under ``jit``, ``lax.scan`` and
    ``vmap`` (``vmap_method="broadcast_all"``: the kernel is elementwise, so a batch of problems
    is one call over blocks, each with its own scalars, not one call per batch element).
    """
    if os.environ.get("PROBOPT_NO_CPU_KERNELS", "") not in ("", "0"):
        _log.info("probopt: PROBOPT_NO_CPU_KERNELS is set; the JAX VSGD kernel is disabled")
        return None
    path = _build()
    if path is None:
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ProboptVsgd), platform="cpu")
    except (OSError, AttributeError, ValueError, RuntimeError) as err:
        _log.warning("probopt: loading the JAX VSGD kernel failed (%s); it is disabled", err)
        return None

    def update(
        g: jax.Array, mu: jax.Array, b_g: jax.Array, b_ghat: jax.Array, scalars: jax.Array
    ) -> tuple[jax.Array, ...]:
        out = jax.ShapeDtypeStruct(mu.shape, mu.dtype)
        call = jax.ffi.ffi_call(
            TARGET,
            (out, out, out, out),
            vmap_method="broadcast_all",
            input_output_aliases={1: 1, 2: 2, 3: 3},
        )
        return tuple(call(g, mu, b_g, b_ghat, scalars))

    return update
