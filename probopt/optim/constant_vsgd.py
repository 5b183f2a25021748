r"""Constant VSGD: the strong-prior limit of VSGD, with fixed precisions and a constant momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from probopt.optim._base import (
    _maximize_doc,
    _nonfinite_doc,
    check_finite_grads,
    check_lr,
    check_nonfinite,
    check_positive,
    check_state_dict,
)

__all__ = ["ConstantVSGD", "constant_vsgd"]


class ConstantVSGD(torch.optim.Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        variance_ratio: float = 30.0,
        prior_variance: float = 1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ):
        check_lr(lr)
        check_positive("variance_ratio", variance_ratio)
        check_positive("prior_variance", prior_variance)
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_nonfinite(nonfinite)
        defaults = dict(lr=lr, variance_ratio=variance_ratio, prior_variance=prior_variance,
                        eps=eps, weight_decay=weight_decay, maximize=maximize,
                        nonfinite=nonfinite, foreach=foreach)  # fmt: skip
        super().__init__(params, defaults)
        self.num_skipped_steps = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nonfinite", "skip")
            group.setdefault("foreach", None)
        self.__dict__.setdefault("num_skipped_steps", 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, checked first (nothing changes on error;
        :func:`~probopt.optim._base.check_state_dict` lists the checks)."""
        check_state_dict(self, state_dict, required=("step", "mu"))
        super().load_state_dict(state_dict)

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
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not check_finite_grads(self, grads, group["nonfinite"]):
                return loss
        work = []
        for group in self.param_groups:
            params, grads, mus, steps = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ConstantVSGD does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                mus.append(state["mu"])
                steps.append(state["step"])
            work.append((group, params, grads, mus, steps))
        for group, params, grads, mus, steps in work:
            if params:
                constant_vsgd(
                    params, grads, mus, steps,
                    lr=group["lr"], variance_ratio=group["variance_ratio"],
                    prior_variance=group["prior_variance"], eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"],
                    foreach=group["foreach"],
                )  # fmt: skip
        return loss


ConstantVSGD.__doc__ = rf"""Constant VSGD: VSGD with the noise precisions frozen at their priors.

    In the VSGD model (:class:`VSGD`, :mod:`probopt.models.vsgd`) let the prior strength γ → ∞:
    the Gamma factors q(w_g), q(w_ĝ) never leave their priors, whose means are
    E[w_g] = 1/s² and E[w_ĝ] = 1/(K_g s²) (:math:`s^2` = ``prior_variance``; VSGD's prior is
    s² = 1). The local posterior of the true gradient then has a constant gain and variance:

    .. math::
        \beta = \frac{{K_g}}{{1 + K_g}}, \qquad \sigma^2 = \frac{{K_g}}{{1 + K_g}}\, s^2, \qquad
        \mu_t = \beta\,\mu_{{t-1}} + (1-\beta)\,\hat g_t, \qquad
        \theta_t = \theta_{{t-1}} - \eta\,\frac{{\mu_t}}{{\sqrt{{\mu_t^2 + \sigma^2}} + \epsilon}}.

    Relations (exact in the stated limits; tested):

    * **SGD with momentum.** When :math:`|\mu_t| \ll \sigma` the step is
      :math:`\eta\mu_t/\sigma`: ``torch.optim.SGD(lr=η/σ, momentum=β, dampening=β)``, whose buffer
      :math:`b_t = \beta b_{{t-1}} + (1-\beta)\hat g_t` is :math:`\mu_t`. With the default s² = 1
      this is the regime of typical deep-network gradients.
    * **Signum.** When :math:`|\mu_t| \gg \sigma` the step is :math:`\eta\,\mathrm{{sign}}(\mu_t)`,
      sign descent on a momentum (Bernstein et al. 2018).
    * **Adam.** Adam divides the momentum by :math:`\sqrt{{v_t}}`, a running mean of ĝ²;
      Constant VSGD divides by :math:`\sqrt{{\mu_t^2 + \sigma^2}}`, the posterior second moment of
      the true gradient with a *fixed* noise variance. VSGD learns that variance per coordinate
      (by SVI on w_ĝ), which is what makes it Adam-like; Constant VSGD is what remains without
      that learning: an SGDM/Signum interpolation with no bias correction.
    * It is the limit γ → ∞ of :class:`VSGD` (with s² = 1), up to VSGD's first-step jitter.

    .. note::
        The paper's own definition of "Constant VSGD" was not available to us; this is the
        strong-prior limit of its model (``shared/notes/vsgd.md`` section 3). ``prior_variance``
        is ours: it rescales the fixed precisions so the SGDM regime can be set to any gradient
        scale.

    Args:
        params (iterable): parameters or parameter groups.
        lr (float, Tensor, optional): η (default: 0.1)
        variance_ratio (float, optional): K_g; sets β = K_g/(1+K_g) (default: 30.0, β ≈ 0.968)
        prior_variance (float, optional): s², the prior variance of the true gradient's change
            (default: 1.0)
        eps (float, optional): ε outside the square root (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay (default: 0)
        {_maximize_doc}
        {_nonfinite_doc}
        foreach (bool, optional): use the foreach path (default: None, chosen automatically)

    Example:
        >>> x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = ConstantVSGD([x], lr=0.5, variance_ratio=9.0)
        >>> for _ in range(3):
        ...     opt.zero_grad(); (x ** 2).sum().backward(); opt.step()
        >>> x.detach()
        tensor([ 0.4988, -1.1494])

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
        Networks <https://arxiv.org/abs/2404.06549>`_, 2024.
        Bernstein, Wang, Azizzadenesheli & Anandkumar, `signSGD: Compressed Optimisation for
        Non-Convex Problems <https://arxiv.org/abs/1802.04434>`_, ICML 2018.
    """


def constant_vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    variance_ratio: float,
    prior_variance: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional API of :class:`ConstantVSGD` (in place)."""
    lr = float(lr)
    beta = variance_ratio / (1.0 + variance_ratio)
    sigma2 = beta * prior_variance
    for s in steps:
        s += 1
    if foreach is None:
        foreach = True
    if foreach and not any(torch.is_complex(p) for p in params):
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        g = torch._foreach_neg(grads) if maximize else grads
        torch._foreach_lerp_(mus, g, 1 - beta)
        denom = torch._foreach_mul(mus, mus)
        torch._foreach_add_(denom, sigma2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, mus, denom, value=-lr)
        return
    for p, g, mu in zip(params, grads, mus):  # the reference, one tensor at a time
        g = -g if maximize else g
        if torch.is_complex(p):
            p, g, mu = torch.view_as_real(p), torch.view_as_real(g), torch.view_as_real(mu)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        mu.mul_(beta).add_(g, alpha=1 - beta)
        p.add_(mu / (torch.sqrt(mu**2 + sigma2) + eps), alpha=-lr)
