"""Small C kernels for CPU fast paths, compiled on first use and called through ctypes.

Note [probopt: CPU kernels]
torch's foreach ops on CPU run one pass over memory per op (and allocate their temporaries), so a
VSGD step with ~20 elementwise ops costs several times a fused loop. A C loop over
(param, grad, state) does the whole update in one pass. It is compiled here on first use with the
system C compiler (``$CC``, else ``cc``; under a second), needs no torch headers, and is cached per
source, compiler and machine in ``$PROBOPT_CACHE_DIR`` (default ``~/.cache/probopt``). ctypes
releases the GIL during the call, so chunks of a tensor run in parallel on a thread pool of
``torch.get_num_threads()`` workers. When no compiler is found, or ``PROBOPT_NO_CPU_KERNELS=1``,
:func:`load` returns None and callers take their foreach path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["all_finite_cpu", "build_shared", "cache_dir", "load", "parallel_chunks"]

_log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-std=c99"]
#: chunks smaller than this run in the calling thread (thread hand-off costs ~10 µs)
_MIN_PARALLEL = 1 << 16


def cache_dir() -> Path:
    env = os.environ.get("PROBOPT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "probopt"


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def build_shared(
    source: Path, compiler: str, flags: list[str], *, extra_key: str = "", libs: tuple = ()
) -> Path | None:
    """Compile ``source`` into a shared library in the cache, once per key; its path or None.

    The key hashes the source text, the compiler and its version, the flags, ``extra_key`` and
    the machine's CPU flags (``-march=native``). The first writable folder of ``cache_dir()``
    and a temporary one is used; the library is written to a temporary name and renamed, so
    concurrent processes never load half a file. Failures are logged and give None.
    """
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        key = hashlib.sha256(
            "\0".join(
                [source.read_text(), compiler, version, " ".join(flags), extra_key,
                 _cpu_signature()]
            ).encode()
        ).hexdigest()[:16]  # fmt: skip
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / "probopt-cache"):
            target = folder / f"{source.stem}-{key}.so"
            if target.is_file():
                return target
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
            except OSError:
                continue  # folder not writable: try the next one
            try:
                subprocess.run(
                    [compiler, *flags, "-o", tmp, str(source), *libs],
                    check=True, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                os.replace(tmp, target)  # atomic: concurrent processes never see half a file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return target
    except subprocess.CalledProcessError as err:
        _log.warning("probopt: compiling %s failed; its kernel is disabled:\n%s",
                     source.name, err.stderr)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        _log.warning("probopt: building %s failed (%s); its kernel is disabled", source.name, err)
    return None


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """Compile (once) and load ``probopt/_kernels/<name>.c``; None when that is not possible."""
    if os.environ.get("PROBOPT_NO_CPU_KERNELS", "") not in ("", "0"):
        return None
    source = _HERE / f"{name}.c"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not source.is_file():
        _log.info("probopt: no C compiler found; CPU kernels disabled")
        return None
    target = build_shared(source, cc, _FLAGS, libs=("-lm",))
    try:
        return None if target is None else ctypes.CDLL(str(target))
    except OSError as err:
        _log.warning("probopt: loading %s failed (%s); CPU kernels disabled", target, err)
        return None


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1))


def parallel_chunks(numel: int, fn: Callable[[int, int], object]) -> None:
    """Call ``fn(start, length)`` over ``[0, numel)`` cut into one chunk per thread."""
    workers = max(torch.get_num_threads(), 1)
    if workers == 1 or numel < _MIN_PARALLEL:
        fn(0, numel)
        return
    size = -(-numel // workers)
    size = -(-size // 16) * 16  # keep chunk starts 64-byte aligned for float32
    futures = [
        _pool().submit(fn, start, min(size, numel - start)) for start in range(0, numel, size)
    ]
    for f in futures:
        f.result()


@functools.cache
def _finite_functions() -> dict[torch.dtype, Callable] | None:
    lib = load("fused_cpu")
    if lib is None:
        return None
    out = {}
    for dtype, name in ((torch.float32, "all_finite_f32"), (torch.float64, "all_finite_f64")):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        fn.restype = ctypes.c_int
        out[dtype] = fn
    return out


def all_finite_cpu(tensors: list[torch.Tensor]) -> bool | None:
    """True/False when every tensor is a contiguous float32/float64 CPU tensor, else None."""
    fns = _finite_functions()
    if fns is None or not all(
        t.device.type == "cpu" and t.dtype in fns and t.is_contiguous() for t in tensors
    ):
        return None
    for t in tensors:
        fn, ptr, size = fns[t.dtype], t.data_ptr(), t.element_size()
        results: list[int] = []

        def check(s: int, n: int, fn=fn, ptr=ptr, size=size, out=results) -> None:  # noqa: ANN001
            out.append(fn(ptr + s * size, n))

        parallel_chunks(t.numel(), check)
        if not all(results):
            return False
    return True
