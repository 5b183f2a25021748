"""The fused CPU path of VSGD: one C loop per tensor chunk (Note [probopt: CPU kernels])."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from probopt._kernels.cpu import load, parallel_chunks

__all__ = ["cpu_kernel_available", "fused_cpu_vsgd", "supports"]

_DOUBLE = ctypes.c_double
_ARGTYPES = (
    [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [_DOUBLE] * 9 + [ctypes.c_int] + [_DOUBLE] * 2
)


@functools.cache
def _functions() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    lib = load("fused_cpu")
    if lib is None:
        return None
    out = {}
    for dtype, name in ((torch.float32, "vsgd_step_f32"), (torch.float64, "vsgd_step_f64")):
        fn = getattr(lib, name)
        fn.argtypes = _ARGTYPES
        fn.restype = None
        out[dtype] = fn
    return out


def cpu_kernel_available() -> bool:
    return _functions() is not None


def supports(param: Tensor, grad: Tensor, *state: Tensor) -> bool:
    """True when the C kernel can update this parameter in place."""
    tensors = (param, grad, *state)
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.float64)
        and all(t.dtype == param.dtype and t.is_contiguous() for t in tensors)
        and all(t.device.type == "cpu" for t in tensors)
        and all(t.shape == param.shape for t in tensors)  # the kernel trusts numel
    )


def fused_cpu_vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    b_gs: list[Tensor],
    b_ghats: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    variance_ratio: float,
    prior_strength: float,
    kappa1: float,
    kappa2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One VSGD step with the C kernel; every tensor must pass :func:`supports`."""
    from probopt.optim.vsgd import _first_step_posterior, _shape

    fns = _functions()
    if fns is None:
        raise RuntimeError("the fused CPU kernel is not available (no C compiler?)")
    gamma, k_g = prior_strength, variance_ratio
    a = _shape(gamma)
    k1, s2_1 = _first_step_posterior(gamma, k_g)
    decay = 1.0 - lr * weight_decay
    sign = -1.0 if maximize else 1.0
    for i, p in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        fn = fns[p.dtype]
        size = p.element_size()
        ptrs = [x.data_ptr() for x in (p, grads[i], mus[i], b_gs[i], b_ghats[i])]
        scalars = (lr, decay, 1.0 / a, gamma, k_g * gamma, t**-kappa1, t**-kappa2, eps, sign,
                   int(t == 1), k1, s2_1)  # fmt: skip

        def run(start: int, length: int, fn=fn, ptrs=ptrs, size=size, scalars=scalars) -> None:  # noqa: ANN001, E501
            fn(*(q + start * size for q in ptrs), length, *scalars)

        parallel_chunks(p.numel(), run)
