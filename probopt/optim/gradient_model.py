r"""Turn a user's Pyro model of the gradient into an optimizer: the generic model -> step path.

The contract (``shared/DESIGN.md``): at every optimizer step the observed minibatch gradient is
conditioned on, the guide's parameters are updated by stochastic variational inference, and the
posterior moments of the true gradient are turned into a parameter step by a documented rule.
:class:`probopt.optim.VSGD` does this in closed form for one model; this class does it for any
model and guide by a few SVI steps, so users can write their own gradient-noise model
(``models/student_t.py`` is a worked example).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from probopt._optional import require
from probopt.optim._base import (
    _maximize_doc,
    _nonfinite_doc,
    check_finite_grads,
    check_interval,
    check_lr,
    check_nonfinite,
    check_positive,
    check_state_dict,
)

__all__ = ["GradientModelOptimizer", "RULES"]


def _normalized(mean: Tensor, variance: Tensor, eps: float) -> Tensor:
    return mean / (torch.sqrt(mean**2 + variance) + eps)


def _mean(mean: Tensor, variance: Tensor, eps: float) -> Tensor:
    del variance, eps
    return mean


def _snr(mean: Tensor, variance: Tensor, eps: float) -> Tensor:
    return mean * mean**2 / (mean**2 + variance + eps)


#: Rules from posterior moments (m, v) of the true gradient to a step direction d (θ ← θ − η d).
RULES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "normalized": _normalized,  # d = m / (sqrt(m² + v) + ε): VSGD's rule, E[g] / sqrt(E[g²])
    "mean": _mean,  # d = m: SGD on the posterior mean
    "snr": _snr,  # d = m · m² / (m² + v): the mean shrunk by its signal-to-noise ratio
}


class GradientModelOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: ParamsT,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        lr: float = 0.01,
        *,
        local_params: tuple[str, ...] = ("g_loc", "g_scale"),
        site: str = "g",
        rule: str | Callable[[Tensor, Tensor, float], Tensor] = "normalized",
        svi_steps: int = 50,
        svi_lr: float = 0.3,
        num_particles: int = 64,
        kappa: float | Mapping[str, float] = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        model_kwargs: Mapping[str, Any] | None = None,
        maximize: bool = False,
        nonfinite: str = "skip",
    ):
        check_lr(lr)
        if not callable(model) or not callable(guide):
            raise TypeError("model and guide must be callables (Pyro programs)")
        if isinstance(rule, str) and rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r} (choose one of {', '.join(RULES)})")
        if not isinstance(svi_steps, int) or svi_steps < 1:
            raise ValueError(f"Invalid svi_steps: {svi_steps!r} (must be an integer >= 1)")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"Invalid num_particles: {num_particles!r} (must be >= 1)")
        check_positive("svi_lr", svi_lr)
        kappas = kappa.values() if isinstance(kappa, Mapping) else [kappa]
        for k in kappas:
            check_interval("kappa", k, 0.5, 1.0, closed="(]")
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_nonfinite(nonfinite)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        nonfinite=nonfinite)  # fmt: skip
        super().__init__(params, defaults)
        self.model, self.guide = model, guide
        self.local_params = tuple(local_params)
        self.site = site
        self.rule = RULES[rule] if isinstance(rule, str) else rule
        self.svi_steps, self.svi_lr, self.num_particles = svi_steps, svi_lr, num_particles
        self.kappa = kappa
        self.model_kwargs = dict(model_kwargs or {})
        self.num_skipped_steps = 0

    # ----------------------------------------------------------------------------------------

    def _kappa(self, name: str) -> float:
        if isinstance(self.kappa, Mapping):
            return self.kappa.get(name, 0.9)
        return self.kappa

    def _fit(
        self, loss_fn: Callable[[], Tensor], params: list[Tensor], lrs: list[Tensor | float]
    ) -> None:
        """Adam steps with per-element learning rates decaying 100-fold over the fit.

        A step whose loss or gradient is not finite is undone and ends the fit, so a fit never
        leaves NaN in the guide.
        """
        if not params:
            return
        b1, b2, eps = 0.9, 0.999, 1e-12
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        decay = 0.01 ** (1.0 / max(self.svi_steps - 1, 1))
        for k in range(1, self.svi_steps + 1):
            for p in params:
                p.grad = None
            loss = loss_fn()
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
                return
            scale = decay ** (k - 1)
            with torch.no_grad():
                for p, g, mk, vk, lr in zip(params, grads, m, v, lrs):
                    mk.mul_(b1).add_(g, alpha=1 - b1)
                    vk.mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = (mk / (1 - b1**k)) / ((vk / (1 - b2**k)).sqrt() + eps)
                    p.sub_(step * (lr * scale))
        for p in params:
            p.grad = None

    def _update_posterior(self, g_hat: Tensor, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        pyro = require("pyro", "the generic model -> step path")
        from pyro import poutine
        from pyro.infer import TraceMeanField_ELBO

        store = pyro.get_param_store()
        t = int(state["step"])
        prev = state["prev_mean"]
        args, kwargs = (g_hat, prev), self.model_kwargs
        elbo = TraceMeanField_ELBO(
            num_particles=self.num_particles, vectorize_particles=self.num_particles > 1,
            max_plate_nesting=1,
        )  # fmt: skip
        with store.scope(state["param_store"]):
            for name in self.local_params:  # local factors start afresh at every step
                if name in store:
                    del store[name]
            poutine.trace(self.guide).get_trace(*args, **kwargs)  # creates missing params
            named = dict(store.named_parameters())
            missing = [n for n in self.local_params if n not in named]
            if missing:
                raise ValueError(f"the guide registers no parameter named {missing}")
            local = [named[n] for n in self.local_params]
            globals_ = {n: p for n, p in named.items() if n not in self.local_params}

            def loss() -> Tensor:
                return elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

            # Note [probopt: fit learning rates] Adam's step is absolute: real-valued guide
            # parameters of the gradient's shape (means) move in units of each coordinate's
            # observed innovation |ĝ - μ_{t-1}| (floored at 1 % of its RMS); constrained ones
            # (scales, shapes, rates) are fitted in log space, where a step is relative.
            innovation = (g_hat - prev).abs()
            rms = float(innovation.pow(2).mean().sqrt()) or 1.0
            unit = innovation.clamp_min(0.01 * rms)

            def lrs(names: list[str]) -> list[Tensor | float]:
                out: list[Tensor | float] = []
                for n in names:
                    if store._constraints[n] is not torch.distributions.constraints.real:
                        out.append(self.svi_lr)
                    elif named[n].shape == unit.shape:
                        out.append(self.svi_lr * unit)
                    else:
                        out.append(self.svi_lr * rms)
                return out

            with torch.enable_grad():
                # 1. local step: fit q(local) with the global factors held at λ_{t-1}
                for p in globals_.values():
                    p.requires_grad_(False)
                self._fit(loss, local, lrs(list(self.local_params)))
                # 2. global step: fit λ̂_t given q(local), then λ_t = (1-ρ_t) λ_{t-1} + ρ_t λ̂_t
                #    in the constrained space (exact SVI for Gamma/Normal-mean parametrisations)
                old = {n: store[n].detach().clone() for n in globals_}
                for p in local:
                    p.requires_grad_(False)
                for p in globals_.values():
                    p.requires_grad_(True)
                self._fit(loss, list(globals_.values()), lrs(list(globals_)))
                for p in local:
                    p.requires_grad_(True)
            for n, p in globals_.items():
                rho = (t + 1) ** -self._kappa(n)
                fitted = store[n].detach()
                target = torch.lerp(old[n], fitted, rho)
                constraint = store._constraints[n]
                p.data.copy_(torch.distributions.transform_to(constraint).inv(target))
            trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
        fn = trace.nodes[self.site]["fn"]
        try:
            mean, variance = fn.mean, fn.variance
        except NotImplementedError:
            draws = fn.sample((256,))
            mean, variance = draws.mean(0), draws.var(0)
        return mean.detach().reshape(g_hat.shape), variance.detach().reshape(g_hat.shape)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step (a few SVI steps per parameter, then the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not check_finite_grads(self, grads, group["nonfinite"]):
                return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g_hat = p.grad.detach().reshape(-1).clone()
                if group["maximize"]:
                    g_hat = -g_hat
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["prev_mean"] = torch.zeros_like(g_hat)
                    state["param_store"] = {"params": {}, "constraints": {}}
                mean, variance = self._update_posterior(g_hat, state)
                state["step"] += 1
                state["prev_mean"] = mean
                state["mean"], state["variance"] = mean.view_as(p), variance.view_as(p)
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                direction = self.rule(mean, variance, group["eps"]).view_as(p)
                p.add_(direction.to(p.dtype), alpha=-group["lr"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, checked first (nothing changes on error;
        :func:`~probopt.optim._base.check_state_dict` lists the checks)."""
        check_state_dict(self, state_dict, required=("step", "prev_mean", "param_store"),
                         nonnegative=("variance",), flat=("prev_mean",))  # fmt: skip
        super().load_state_dict(state_dict)

    def posterior(self, param: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the true gradient of ``param`` after its last step."""
        state = self.state.get(param)
        if not state:
            raise KeyError("this parameter has not taken a step yet")
        return state["mean"], state["variance"]


GradientModelOptimizer.__doc__ = rf"""An optimizer whose update comes from a Pyro gradient model.

    The user supplies a generative model of one step's observed gradient and a guide, both Pyro
    programs over the flattened coordinates of one parameter tensor (use a plate of size
    ``g_hat.shape[-1]`` at ``dim=-1``)::

        model(g_hat, prev_mean, **model_kwargs)   # observes g_hat at some site
        guide(g_hat, prev_mean, **model_kwargs)   # q of the latents; ``site``: true gradient

    ``prev_mean`` is the previous posterior mean of the true gradient. Guide parameters named in
    ``local_params`` belong to this step's local latent (the true gradient); every other guide
    parameter is global and persists across steps (per parameter tensor, in its own Pyro param
    store, saved in ``state_dict``). Each step, per parameter tensor:

    .. math::
        \begin{{aligned}}
        &\textbf{{local}}:\; \phi_t \leftarrow \arg\max_\phi \mathrm{{ELBO}}(\phi, \lambda_{{t-1}};
            \hat g_t) \quad (\text{{fresh init, }} K \text{{ Adam steps}}) \\
        &\textbf{{global}}:\; \hat\lambda_t \leftarrow \arg\max_\lambda \mathrm{{ELBO}}(\phi_t,
            \lambda; \hat g_t) \quad (K \text{{ Adam steps from }} \lambda_{{t-1}}), \quad
            \lambda_t \leftarrow (1-\rho_t)\lambda_{{t-1}} + \rho_t \hat\lambda_t, \;
            \rho_t = t^{{-\kappa}} \\
        &\textbf{{step}}:\; (m_t, v_t) \leftarrow \mathbb E_{{q_{{\phi_t}}}}[g_t],
            \mathbb V_{{q_{{\phi_t}}}}[g_t], \quad
            \theta_t \leftarrow \theta_{{t-1}}(1-\eta\lambda_{{wd}}) - \eta\, r(m_t, v_t)
        \end{{aligned}}

    The global blend is done on the constrained parameters: for guides parametrised by an
    exponential family's natural or mean parameters (Gamma shape and rate, a Normal's mean) it is
    exactly the natural-gradient step of stochastic variational inference (Hoffman et al. 2013),
    the step :class:`VSGD` takes in closed form; otherwise it is a documented approximation. The
    ELBO is Pyro's ``TraceMeanField_ELBO`` (analytic KL terms where available) with
    ``num_particles`` vectorised particles.

    Rules ``r`` (``rule``): ``"normalized"`` m / (√(m² + v) + ε) (VSGD's), ``"mean"`` m,
    ``"snr"`` m·m²/(m² + v), or a callable ``(m, v, eps) -> direction``.

    Args:
        params (iterable): parameters or parameter groups.
        model, guide (callable): the Pyro model and guide, as above.
        lr (float, optional): step size η (default: 0.01)
        local_params (tuple of str, optional): guide parameters re-initialised at every step
            (default: ``("g_loc", "g_scale")``)
        site (str, optional): the guide's sample site of the true gradient (default: ``"g"``)
        rule (str or callable, optional): the posterior -> step rule (default: ``"normalized"``)
        svi_steps (int, optional): K, Adam steps per fit (twice per optimizer step) (default: 50)
        svi_lr (float, optional): the fits' initial Adam learning rate, decayed 100-fold over a
            fit; real-valued parameters are fitted in units of the observed innovation
            (Note [probopt: fit learning rates])
            (default: 0.3)
        num_particles (int, optional): ELBO particles (default: 64)
        kappa (float or dict, optional): κ in (0.5, 1] of ρ_t = t^-κ, or a dict from global
            parameter name to κ (missing names: 0.9) (default: 0.9)
        eps (float, optional): ε of the normalized rule (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay (default: 0)
        model_kwargs (dict, optional): keyword arguments passed to model and guide
        {_maximize_doc}
        {_nonfinite_doc}

    Cost: 2K ELBO evaluations per parameter tensor per step; meant for small models, notebooks
    and for trying a new gradient-noise model before deriving its closed form.

    .. warning::
        The step is only as good as the fits. With few ``svi_steps`` or ``num_particles`` the
        local fit stops short of the ELBO optimum, so (m_t, v_t) are not the posterior moments
        of the model: they stay near the fit's initialisation and the optimizer silently
        follows a different rule. The test suite checks the defaults (K = 50, 64 particles)
        against VSGD's closed form; before trusting smaller values for a model of your own,
        compare ``posterior()`` with a long fit (or a closed form) on a few recorded gradients.

    Example:
        >>> import probopt.models.vsgd as m
        >>> x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = GradientModelOptimizer([x], m.model, m.guide, lr=0.1, svi_steps=5,
        ...                              kappa={{"w_g_rate": 0.81, "w_g_shape": 0.81}})
        >>> for _ in range(3):
        ...     opt.zero_grad(); (x ** 2).sum().backward(); opt.step()
        >>> bool((x.abs() < torch.tensor([1.0, 2.0])).all())
        True

    References:
        Hoffman, Blei, Wang & Paisley, `Stochastic Variational Inference
        <https://jmlr.org/papers/v14/hoffman13a.html>`_, JMLR 2013.
    """
