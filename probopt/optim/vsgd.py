r"""VSGD: variational stochastic gradient descent (Chen, Kuzina, Esmaeili & Tomczak, 2024).

The generative model and its guide are in :mod:`probopt.models.vsgd`; this module turns the
closed-form SVI update of that model into a ``torch.optim`` optimizer, with a readable
single-tensor reference, a multi-tensor (foreach) path and a fused CUDA kernel
(:mod:`probopt.optim._vsgd_triton`) that must all agree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from probopt.optim._base import (
    _foreach_doc,
    _fused_doc,
    _maximize_doc,
    _nonfinite_doc,
    check_finite_grads,
    check_interval,
    check_lr,
    check_nonfinite,
    check_positive,
    check_state_dict,
)

__all__ = ["VSGD", "VSGDPosterior", "vsgd", "JITTER"]

#: Note [probopt: the hard-coded jitter δ]
#: The official implementation adds δ = 1e-4 to the doubled Gamma shape 2a. With the default
#: γ = 1e-8 this makes the prior mean precision E[w_g] about 5000 at t = 0 (not 1), which sets the
#: scale of the first steps. We reproduce it: without it the steps are ~10x smaller for thousands
#: of iterations (shared/notes/vsgd.md section 2).
JITTER = 1e-4

# Note [probopt: CPU blocking]
# On CPU, freshly allocated temporaries cost more than the arithmetic (first-touch page faults:
# an allocating add over 40 MB took 30 ms where an in-place addcmul_ took 9 ms). The foreach path
# therefore works in place, on blocks of at most _CPU_BLOCK elements, with two scratch buffers of
# that size kept between steps, so that temporaries stay in cache.
_CPU_BLOCK = 1 << 18


class VSGDPosterior(NamedTuple):
    """The Gaussian posterior q(g_t) = N(mean, variance) of the true gradient after step t.

    ``beta`` is the learned momentum β_t (the weight of μ_{t-1} in μ_t); ``variance`` and ``beta``
    are None unless the optimizer was built with ``track_posterior=True``.
    """

    mean: Tensor
    variance: Tensor | None
    beta: Tensor | None
    step: int


def _first_step_variances(prior_strength: float, variance_ratio: float) -> tuple[float, float]:
    """1/E[w_g], 1/E[w_ĝ] under the prior Gamma(γ + δ/2, γ), Gamma(γ + δ/2, K_g γ)."""
    a0 = prior_strength + JITTER / 2
    return prior_strength / a0, variance_ratio * prior_strength / a0


def _first_step_posterior(prior_strength: float, variance_ratio: float) -> tuple[float, float]:
    """The first step's gain k₁ = 1 − β₁ = v_g/(v_g + v_ĝ) and variance σ₁² (both constants)."""
    v_g, v_h = _first_step_variances(prior_strength, variance_ratio)
    return v_g / (v_g + v_h), v_g * v_h / (v_g + v_h)


def _shape(prior_strength: float) -> float:
    """The Gamma shape a_t = γ + 1/2 (+ δ/2) of q(w_g) and q(w_ĝ) for every t ≥ 1."""
    return (2 * prior_strength + 1 + JITTER) / 2


class VSGD(torch.optim.Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        variance_ratio: float = 30.0,
        prior_strength: float = 1e-8,
        kappa1: float = 0.81,
        kappa2: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        nonfinite: str = "skip",
        track_posterior: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        check_lr(lr)
        check_positive("variance_ratio", variance_ratio)
        check_positive("prior_strength", prior_strength)
        check_interval("kappa1", kappa1, 0.5, 1.0, closed="(]")
        check_interval("kappa2", kappa2, 0.5, 1.0, closed="(]")
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_nonfinite(nonfinite)
        if fused and foreach:
            raise RuntimeError("VSGD: `fused` and `foreach` cannot both be True")
        defaults = dict(
            lr=lr,
            variance_ratio=variance_ratio,
            prior_strength=prior_strength,
            kappa1=kappa1,
            kappa2=kappa2,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            nonfinite=nonfinite,
            track_posterior=track_posterior,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)
        self.num_skipped_steps = 0
        self._scratch: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nonfinite", "skip")
            group.setdefault("track_posterior", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        self.__dict__.setdefault("num_skipped_steps", 0)
        self.__dict__.setdefault("_scratch", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, checked first (nothing changes on error).

        Raises:
            ValueError: the dict does not fit these parameters (group sizes, a missing key, a
                state tensor of another shape, NaN or Inf, a negative Gamma rate, a bad step
                count; :func:`~probopt.optim._base.check_state_dict`).
        """
        id_map = check_state_dict(
            self, state_dict, required=("step", "mu", "b_g", "b_ghat"),
            nonnegative=("b_g", "b_ghat", "variance", "beta"),
        )  # fmt: skip
        # torch casts every state tensor to its parameter's dtype; the state of a float16 or
        # bfloat16 parameter is float32 (see _init_group), so it is put back from the saved
        # values, not from their rounded copies
        wide = {
            pid: {k: v for k, v in s.items() if k != "step" and isinstance(v, Tensor)}
            for pid, s in state_dict["state"].items()
            if id_map[pid].dtype in (torch.float16, torch.bfloat16)
        }
        super().load_state_dict(state_dict)
        for pid, saved in wide.items():
            p = id_map[pid]
            for k, v in saved.items():
                self.state[p][k] = v.detach().to(device=p.device, dtype=torch.float32).clone()

    def _init_group(self, group: dict[str, Any], lists: dict[str, list[Tensor]]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("VSGD does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # state in the parameter's dtype, float32 for half-precision parameters
                sdtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                zeros = dict(memory_format=torch.preserve_format, dtype=sdtype)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["mu"] = torch.zeros_like(p, **zeros)
                state["b_g"] = torch.zeros_like(p, **zeros)
                state["b_ghat"] = torch.zeros_like(p, **zeros)
            if group["track_posterior"] and "variance" not in state:
                state["variance"] = torch.zeros_like(state["mu"])
                state["beta"] = torch.zeros_like(state["mu"])
            lists["params"].append(p)
            lists["grads"].append(p.grad)
            for key in ("mu", "b_g", "b_ghat", "step"):
                lists[key].append(state[key])
            if group["track_posterior"]:
                lists["variances"].append(state["variance"])
                lists["betas"].append(state["beta"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the non-finite policy is applied to all groups before anything (state included) changes
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not check_finite_grads(self, grads, group["nonfinite"]):
                return loss
        groups = []
        for group in self.param_groups:
            lists: dict[str, list[Tensor]] = {
                k: [] for k in ("params", "grads", "mu", "b_g", "b_ghat", "step", "variances",
                                "betas")
            }  # fmt: skip
            self._init_group(group, lists)
            groups.append((group, lists))
        for group, lists in groups:
            if not lists["params"]:
                continue
            vsgd(
                lists["params"],
                lists["grads"],
                lists["mu"],
                lists["b_g"],
                lists["b_ghat"],
                lists["step"],
                variances=lists["variances"] or None,
                betas=lists["betas"] or None,
                lr=group["lr"],
                variance_ratio=group["variance_ratio"],
                prior_strength=group["prior_strength"],
                kappa1=group["kappa1"],
                kappa2=group["kappa2"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
                scratch=self._scratch,
            )
        return loss

    # ---------------------------------------------------------------------------------------
    # reading the posterior

    def posterior(self, param: Tensor) -> VSGDPosterior:
        """The posterior q(g_t) of the true gradient of ``param`` after its last step.

        Example:
            >>> p = torch.nn.Parameter(torch.zeros(3))
            >>> opt = VSGD([p], track_posterior=True)
            >>> p.grad = torch.tensor([1.0, -2.0, 0.5]); opt.step()
            >>> post = opt.posterior(p)
            >>> post.mean  # the first step shrinks the observation by 1 / (1 + K_g)
            tensor([ 0.0323, -0.0645,  0.0161])
            >>> round(float(post.beta[0]), 4)  # K_g / (1 + K_g)
            0.9677
        """
        state = self.state.get(param)
        if not state:
            raise KeyError("this parameter has not taken a VSGD step yet")
        return VSGDPosterior(
            mean=state["mu"],
            variance=state.get("variance"),
            beta=state.get("beta"),
            step=int(state["step"]),
        )

    def precisions(self, param: Tensor) -> tuple[Tensor, Tensor]:
        """E[w_g] and E[w_ĝ] under the current guide: the prior precision of the true gradient's
        change and the precision of the observation noise, per coordinate."""
        state = self.state.get(param)
        if not state:
            raise KeyError("this parameter has not taken a VSGD step yet")
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        a = _shape(group["prior_strength"])
        return a / state["b_g"], a / state["b_ghat"]


VSGD.__doc__ = rf"""Variational stochastic gradient descent (VSGD).

    VSGD treats the true gradient as a latent variable and the minibatch gradient as a noisy
    observation of it. Per coordinate (all coordinates independent; :mod:`probopt.models.vsgd`):

    .. math::
        w_g \sim \mathrm{{Gamma}}(\gamma, \gamma), \quad
        w_{{\hat g}} \sim \mathrm{{Gamma}}(\gamma, K_g \gamma), \quad
        g_t \sim \mathcal{{N}}(\mu_{{t-1}}, w_g^{{-1}}), \quad
        \hat g_t \sim \mathcal{{N}}(g_t, w_{{\hat g}}^{{-1}}),

    with the mean-field guide :math:`q(g_t) q(w_g) q(w_{{\hat g}}) =
    \mathcal{{N}}(\mu_t, \sigma_t^2)\,\mathrm{{Gamma}}(a_t, b_{{t,g}})\,
    \mathrm{{Gamma}}(a_t, b_{{t,\hat g}})`. Stochastic variational
    inference updates the local factor by coordinate ascent and the global factors by a
    natural-gradient step of size :math:`\rho_t = t^{{-\kappa}}`; the parameter update uses the
    posterior mean over the posterior second moment of the true gradient.

    Let :math:`\eta` be ``lr``, :math:`K_g` ``variance_ratio``, :math:`\gamma` ``prior_strength``,
    :math:`\kappa_1, \kappa_2` ``kappa1, kappa2``, :math:`\lambda` ``weight_decay``,
    :math:`\epsilon` ``eps`` and :math:`\delta = 10^{{-4}}` the jitter of the official code.

    .. math::
        \begin{{aligned}}
        &\textbf{{input}}: \eta, K_g, \gamma, \kappa_1, \kappa_2, \lambda, \epsilon,
            \theta_0, \text{{maximize}} \\
        &\textbf{{initialize}}: \mu_0 \leftarrow 0, \;
            a \leftarrow \gamma + \tfrac12 + \tfrac\delta2
            \quad \text{{(each parameter has its own step counter t)}} \\
        &\textbf{{for}}\: t = 1 \:\textbf{{to}}\: \ldots \:\textbf{{do}} \\
        &\quad \hat g_t \leftarrow \nabla_\theta f_t(\theta_{{t-1}})
            \quad (\text{{negated if maximize}}) \\
        &\quad \theta_{{t-1}} \leftarrow \theta_{{t-1}} (1 - \eta\lambda) \\
        &\quad \textbf{{if}}\: t = 1: \; v_g \leftarrow \gamma / (\gamma + \delta/2), \;
            v_{{\hat g}} \leftarrow K_g\gamma / (\gamma + \delta/2) \\
        &\quad \textbf{{else}}: \; v_g \leftarrow b_{{t-1,g}} / a, \;
            v_{{\hat g}} \leftarrow b_{{t-1,\hat g}} / a
            \qquad (v = 1/\mathbb{{E}}_q[w]) \\
        &\quad \sigma_t^2 \leftarrow v_g v_{{\hat g}} / (v_g + v_{{\hat g}}), \quad
            \mu_t \leftarrow (v_{{\hat g}}\mu_{{t-1}} + v_g \hat g_t) / (v_g + v_{{\hat g}})
            \qquad (\beta_t = v_{{\hat g}} / (v_g + v_{{\hat g}})) \\
        &\quad \rho_1 \leftarrow t^{{-\kappa_1}}, \; \rho_2 \leftarrow t^{{-\kappa_2}} \\
        &\quad b_{{t,g}} \leftarrow (1-\rho_1) b_{{t-1,g}}
            + \rho_1 \big(\gamma + \tfrac12(\sigma_t^2 + (\mu_t - \mu_{{t-1}})^2)\big) \\
        &\quad b_{{t,\hat g}} \leftarrow (1-\rho_2) b_{{t-1,\hat g}}
            + \rho_2 \big(K_g\gamma + \tfrac12(\sigma_t^2 + (\mu_t - \hat g_t)^2)\big) \\
        &\quad \theta_t \leftarrow \theta_{{t-1}}
            - \eta\,\mu_t / (\sqrt{{\mu_t^2 + \sigma_t^2}} + \epsilon) \\
        &\textbf{{return}}\: \theta_t
        \end{{aligned}}

    Args:
        params (iterable): iterable of parameters or named parameters to optimize, or dicts
            defining parameter groups.
        lr (float, Tensor, optional): learning rate η (default: 0.1)
        variance_ratio (float, optional): K_g, the prior ratio of the observation-noise variance
            to the variance of the true gradient's change, Var(ĝ_t − g_t) / Var(g_t − g_{{t−1}});
            ``ghattg`` in the official code (default: 30.0)
        prior_strength (float, optional): γ, the strength of the Gamma priors; must be > 0
            (``ps`` in the official code) (default: 1e-8)
        kappa1 (float, optional): κ₁ in (0.5, 1], decay of the SVI step t^-κ₁ for w_g
            (``tau1``) (default: 0.81)
        kappa2 (float, optional): κ₂ in (0.5, 1], decay of the SVI step t^-κ₂ for w_ĝ
            (``tau2``) (default: 0.9)
        eps (float, optional): ε added to the denominator, outside the square root
            (default: 1e-8)
        weight_decay (float, optional): decoupled (AdamW-style) weight decay λ (default: 0)
        {_maximize_doc}
        {_nonfinite_doc}
        track_posterior (bool, optional): also store σ_t² and β_t per coordinate (two more
            buffers) so that :meth:`posterior` returns them. (default: False)
        {_foreach_doc}
        {_fused_doc}

    The state of each parameter holds ``step`` (its own counter t), ``mu`` (μ_t), ``b_g`` and
    ``b_ghat`` (the Gamma rates; E_q[w] = a / b); three buffers of the parameter's size against
    Adam's two. Half-precision parameters keep float32 state.

    .. note::
        Departures from Algorithm 1 of the paper, all taken from the official code
        (github.com/generativeai-tue/vsgd, ``src/vsgd.py``) because its published results come
        from it: (1) the jitter δ = 1e-4 in the Gamma shape, see :data:`JITTER`; (2) ε outside
        the square root; (3) decoupled weight decay applied before the update with the current
        lr. The rate updates are written as the paper's squared differences (the official code
        expands the squares; equal in exact arithmetic, safer in low precision).

    .. note::
        Unlike ``pytorch_optimizer.VSGD``, the step counter is per parameter, as in the official
        code: a parameter whose first gradient arrives late takes its own first (prior) step
        instead of dividing 0 by 0.

    Example:
        >>> x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = VSGD([x], lr=0.1)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     loss = (x ** 2).sum()
        ...     loss.backward()
        ...     opt.step()
        ...     print(f"{{loss.item():.4f}}")
        5.0000
        4.4262
        4.0360
        3.6607
        3.3014

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
        Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (TMLR 2025).

    .. seealso:: :class:`probopt.optim.ConstantVSGD`, the strong-prior limit;
        :mod:`probopt.models.vsgd`, the model and guide; :func:`probopt.pyro.VSGD`.
    """


def vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    b_gs: list[Tensor],
    b_ghats: list[Tensor],
    steps: list[Tensor],
    *,
    variances: list[Tensor] | None = None,
    betas: list[Tensor] | None = None,
    lr: float | Tensor,
    variance_ratio: float,
    prior_strength: float,
    kappa1: float,
    kappa2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
    scratch: dict | None = None,
) -> None:
    """Functional API of :class:`VSGD`: one step on lists of tensors, in place.

    ``foreach`` and ``fused`` as in :class:`VSGD` (None: automatic). ``variances`` and ``betas``,
    when given, receive σ_t² and β_t. ``scratch`` is a dict the caller keeps between steps (the
    foreach path's reusable buffers).
    """
    if not all(isinstance(t, Tensor) for t in steps):
        raise TypeError("`steps` must be a list of singleton tensors")
    lr = float(lr)
    kwargs = dict(
        lr=lr,
        variance_ratio=variance_ratio,
        prior_strength=prior_strength,
        kappa1=kappa1,
        kappa2=kappa2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    if fused and variances is not None:
        raise RuntimeError("VSGD(fused=True) cannot track the posterior; use foreach")
    if fused is None and foreach is None:
        fused = variances is None and _fused_available(params)
    if fused:
        _fused_vsgd(params, grads, mus, b_gs, b_ghats, steps, scratch=scratch, **kwargs)
        return
    if foreach is None:
        foreach = True
    impl = _multi_tensor_vsgd if foreach else _single_tensor_vsgd
    impl(params, grads, mus, b_gs, b_ghats, steps, variances, betas, scratch=scratch, **kwargs)


def _fused_available(params: list[Tensor]) -> bool:
    """The fused path exists for these parameters' device (C kernel on CPU, Triton on CUDA)."""
    if not params:
        return False
    if all(p.device.type == "cpu" for p in params):
        from probopt.optim._vsgd_cpu import cpu_kernel_available

        return cpu_kernel_available()
    if all(p.is_cuda for p in params):
        from probopt.optim._vsgd_triton import triton_available

        return triton_available()
    return False


def _fused_vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    b_gs: list[Tensor],
    b_ghats: list[Tensor],
    steps: list[Tensor],
    *,
    scratch: dict | None,
    **kwargs: Any,
) -> None:
    """Route each tensor to its device's fused kernel; the rest (half precision, non-contiguous,
    complex) take the foreach path."""
    if not _fused_available(params):
        raise RuntimeError(
            "VSGD(fused=True) needs CPU tensors and a C compiler, or CUDA tensors and Triton"
        )
    fused_idx, other_idx = [], []
    for i, p in enumerate(params):
        if p.device.type == "cpu":
            from probopt.optim._vsgd_cpu import supports
        else:
            from probopt.optim._vsgd_triton import supports
        ok = supports(p, grads[i], mus[i], b_gs[i], b_ghats[i])
        (fused_idx if ok else other_idx).append(i)

    def pick(xs: list[Tensor], idx: list[int]) -> list[Tensor]:
        return [xs[i] for i in idx]

    lists = (params, grads, mus, b_gs, b_ghats, steps)
    if fused_idx:
        sub = [pick(x, fused_idx) for x in lists]
        if sub[0][0].device.type == "cpu":
            from probopt.optim._vsgd_cpu import fused_cpu_vsgd as kernel
        else:
            from probopt.optim._vsgd_triton import fused_vsgd as kernel
        kernel(*sub, **kwargs)
    if other_idx:
        sub = [pick(x, other_idx) for x in lists]
        _multi_tensor_vsgd(*sub, None, None, scratch=scratch, **kwargs)


def _single_tensor_vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    b_gs: list[Tensor],
    b_ghats: list[Tensor],
    steps: list[Tensor],
    variances: list[Tensor] | None,
    betas: list[Tensor] | None,
    *,
    lr: float,
    variance_ratio: float,
    prior_strength: float,
    kappa1: float,
    kappa2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    scratch: dict | None = None,
) -> None:
    """The reference: the pseudo-code of :class:`VSGD`, line by line, one tensor at a time."""
    del scratch
    gamma, k_g = prior_strength, variance_ratio
    a = _shape(gamma)
    for i, param in enumerate(params):
        mu, b_g, b_ghat = mus[i], b_gs[i], b_ghats[i]
        cdtype = mu.dtype  # compute in the state's dtype (float32 for half parameters)
        grad = grads[i].to(cdtype)
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            mu, b_g, b_ghat = (torch.view_as_real(x) for x in (mu, b_g, b_ghat))
        steps[i] += 1
        t = float(steps[i])

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)

        if t == 1:
            v_g, v_ghat = _first_step_variances(gamma, k_g)
        else:
            v_g, v_ghat = b_g / a, b_ghat / a

        mu_prev = mu.clone()
        sigma2 = v_g * v_ghat / (v_g + v_ghat)
        mu.copy_((v_ghat * mu_prev + v_g * grad) / (v_g + v_ghat))
        if variances is not None:
            variances[i].copy_(torch.as_tensor(sigma2, dtype=cdtype).expand_as(mu))
            betas[i].copy_(torch.as_tensor(v_ghat / (v_g + v_ghat), dtype=cdtype).expand_as(mu))

        rho1, rho2 = t**-kappa1, t**-kappa2
        b_g.mul_(1 - rho1).add_(rho1 * (gamma + 0.5 * (sigma2 + (mu - mu_prev) ** 2)))
        b_ghat.mul_(1 - rho2).add_(rho2 * (k_g * gamma + 0.5 * (sigma2 + (mu - grad) ** 2)))

        update = mu / (torch.sqrt(mu**2 + sigma2) + eps)
        param.add_(update.to(param.dtype), alpha=-lr)


def _blocks(numels: list[int], block: int) -> list[list[tuple[int, int, int]]]:
    """Cut tensors (flattened) into segments and group them into blocks of <= ``block`` elements.

    Returns blocks as lists of ``(tensor index, start, length)``.
    """
    blocks: list[list[tuple[int, int, int]]] = [[]]
    room = block
    for i, n in enumerate(numels):
        start = 0
        while start < n:
            if room == 0:
                blocks.append([])
                room = block
            length = min(room, n - start)
            blocks[-1].append((i, start, length))
            start += length
            room -= length
    return [b for b in blocks if b]


def _multi_tensor_vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    b_gs: list[Tensor],
    b_ghats: list[Tensor],
    steps: list[Tensor],
    variances: list[Tensor] | None,
    betas: list[Tensor] | None,
    *,
    lr: float,
    variance_ratio: float,
    prior_strength: float,
    kappa1: float,
    kappa2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    scratch: dict | None = None,
) -> None:
    """The foreach path: the same algebra as the reference with in-place ``torch._foreach_*`` ops.

    Tensors are grouped by device, dtype and step count (ρ_t and the first-step prior are
    per step count). On CPU the work is cut into cache-sized blocks (Note [probopt: CPU blocking]).
    """
    if scratch is None:
        scratch = {}
    for i in range(len(steps)):
        steps[i] += 1
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if torch.is_complex(p) or mus[i].dtype != p.dtype or not p.is_contiguous():
            key: tuple = ("reference", i)  # rare layouts take the reference path
        else:
            key = (p.device, p.dtype, float(steps[i]))
        groups.setdefault(key, []).append(i)
    scalars = dict(
        lr=lr,
        variance_ratio=variance_ratio,
        prior_strength=prior_strength,
        kappa1=kappa1,
        kappa2=kappa2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    for key, idx in groups.items():
        if key[0] == "reference":
            i = idx[0]
            steps[i] -= 1  # the reference increments it again
            _single_tensor_vsgd(
                [params[i]], [grads[i]], [mus[i]], [b_gs[i]], [b_ghats[i]], [steps[i]],
                None if variances is None else [variances[i]],
                None if betas is None else [betas[i]],
                **scalars,
            )  # fmt: skip
            continue
        device, dtype, t = key
        flat = [
            [x[i].view(-1) for i in idx]
            for x in (params, grads, mus, b_gs, b_ghats)
            + (() if variances is None else (variances, betas))
        ]
        numels = [f.numel() for f in flat[0]]
        block = _CPU_BLOCK if device.type == "cpu" else max(sum(numels), 1)
        if device.type == "cpu":
            bufs = scratch.get((device, dtype))
            if bufs is None:
                bufs = tuple(torch.empty(block, device=device, dtype=dtype) for _ in range(2))
                scratch[(device, dtype)] = bufs
        else:
            bufs = tuple(torch.empty(block, device=device, dtype=dtype) for _ in range(2))
        for segs in _blocks(numels, block):
            views = [[f[i][s : s + n] for i, s, n in segs] for f in flat]
            offsets = [0]
            for _, _, n in segs:
                offsets.append(offsets[-1] + n)
            x = [bufs[0][offsets[j] : offsets[j + 1]] for j in range(len(segs))]
            y = [bufs[1][offsets[j] : offsets[j + 1]] for j in range(len(segs))]
            _foreach_vsgd_block(*views[:5], x, y, *(views[5:] or (None, None)), t=t, **scalars)


def _foreach_vsgd_block(
    p: list[Tensor],
    g: list[Tensor],
    mu: list[Tensor],
    b_g: list[Tensor],
    b_h: list[Tensor],
    x: list[Tensor],
    y: list[Tensor],
    var_out: list[Tensor] | None,
    beta_out: list[Tensor] | None,
    *,
    t: float,
    lr: float,
    variance_ratio: float,
    prior_strength: float,
    kappa1: float,
    kappa2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One block of the foreach path; ``x`` and ``y`` are scratch of the same shapes.

    With k = 1 − β_t = v_g / (v_g + v_ĝ) the posterior update reads μ_t = μ_{t−1} + k (ĝ − μ_{t−1})
    and a σ_t² = k b_ĝ (t > 1), which needs no division by a.
    """
    gamma, k_g = prior_strength, variance_ratio
    a = _shape(gamma)
    rho1, rho2 = t**-kappa1, t**-kappa2
    if weight_decay != 0:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    # y <- innovation r = ĝ - μ_{t-1}
    if maximize:
        torch._foreach_copy_(y, g)
        torch._foreach_neg_(y)
        torch._foreach_sub_(y, mu)
    else:
        torch._foreach_copy_(y, g)
        torch._foreach_sub_(y, mu)
    if t == 1:
        k1, sigma2 = _first_step_posterior(gamma, k_g)
        torch._foreach_mul_(y, k1)  # y <- Δμ
        if beta_out is not None:
            torch._foreach_zero_(beta_out)
            torch._foreach_add_(beta_out, 1 - k1)
            torch._foreach_zero_(var_out)
            torch._foreach_add_(var_out, sigma2)
        torch._foreach_add_(mu, y)
        # b_g <- γ + ½(σ² + Δμ²)      (ρ₁ = 1)
        torch._foreach_zero_(b_g)
        torch._foreach_addcmul_(b_g, y, y, value=0.5)
        torch._foreach_add_(b_g, gamma + 0.5 * sigma2)
        # b_ĝ <- K γ + ½(σ² + (μ - ĝ)²), μ - ĝ = -(1-k) r = Δμ (k - 1) / k
        torch._foreach_zero_(b_h)
        torch._foreach_addcmul_(b_h, y, y, value=0.5 * ((1 - k1) / k1) ** 2)
        torch._foreach_add_(b_h, k_g * gamma + 0.5 * sigma2)
        # x <- sqrt(μ² + σ²) + ε
        torch._foreach_zero_(x)
        torch._foreach_add_(x, sigma2)
    else:
        # x <- k = b_g / (b_g + b_ĝ)
        torch._foreach_copy_(x, b_g)
        torch._foreach_add_(x, b_h)
        torch._foreach_div_(x, b_g)
        torch._foreach_reciprocal_(x)
        if beta_out is not None:
            torch._foreach_copy_(beta_out, x)
            torch._foreach_neg_(beta_out)
            torch._foreach_add_(beta_out, 1.0)
        # b_ĝ-part first (needs r): (μ_t - ĝ)² = (1-k)² r²;  y <- (1-k) r = r - k r
        # μ_t = μ + k r
        torch._foreach_addcmul_(mu, x, y)  # μ <- μ + k r
        torch._foreach_mul_(y, x)  # y <- k r = Δμ
        # x <- a σ² = k b_ĝ
        torch._foreach_mul_(x, b_h)
        if var_out is not None:
            torch._foreach_copy_(var_out, x)
            torch._foreach_mul_(var_out, 1 / a)
        # b_g <- (1-ρ₁) b_g + ρ₁ γ + ½ρ₁ σ² + ½ρ₁ Δμ²
        torch._foreach_mul_(b_g, 1 - rho1)
        torch._foreach_add_(b_g, x, alpha=0.5 * rho1 / a)
        torch._foreach_addcmul_(b_g, y, y, value=0.5 * rho1)
        torch._foreach_add_(b_g, rho1 * gamma)
        # (μ_t - ĝ)² : y <- μ_t - ĝ
        torch._foreach_copy_(y, mu)
        torch._foreach_sub_(y, g) if not maximize else torch._foreach_add_(y, g)
        torch._foreach_mul_(b_h, 1 - rho2)
        torch._foreach_add_(b_h, x, alpha=0.5 * rho2 / a)
        torch._foreach_addcmul_(b_h, y, y, value=0.5 * rho2)
        torch._foreach_add_(b_h, rho2 * k_g * gamma)
        torch._foreach_mul_(x, 1 / a)  # x <- σ²
    # θ <- θ - η μ / (sqrt(μ² + σ²) + ε)
    torch._foreach_addcmul_(x, mu, mu)
    torch._foreach_sqrt_(x)
    torch._foreach_add_(x, eps)
    torch._foreach_addcdiv_(p, mu, x, value=-lr)
