r"""Record the posterior of the true gradient while an optimizer trains, through step hooks.

A :class:`Recorder` attaches to a torch optimizer with ``register_step_pre_hook`` and
``register_step_post_hook`` (and, optionally, wraps one gradient estimator's ``backward`` on the
instance): the optimizer's and the estimator's code stay untouched, and :meth:`Recorder.close`
removes every trace. At every recorded step it reads, for chosen parameter tensors:

==================  ===========================================================  ===============
quantity            meaning (per coordinate)                                     per tensor
==================  ===========================================================  ===============
``observed``        the observed gradient :math:`\hat g_t` (``.grad`` at the      RMS
                    step)
``mean``            posterior mean :math:`\mu_t = \mathbb E_q[g_t]`               RMS
``variance``        posterior variance :math:`\sigma_t^2 = \mathbb V_q[g_t]`      mean
``beta``            learned momentum :math:`\beta_t`: :math:`\mu_t = \beta_t      mean
                    \mu_{t-1} + (1-\beta_t)\hat g_t`
``precision_g``     :math:`\mathbb E_q[w_g]`, precision of the gradient's change  geometric mean
``precision_ghat``  :math:`\mathbb E_q[w_{\hat g}]`, observation-noise precision  geometric mean
``snr``             signal-to-noise ratio :math:`\mu_t^2/\sigma_t^2`              :math:`\sum\mu_t^2
                                                                                 /\sum\sigma_t^2`
==================  ===========================================================  ===============

Where each optimizer keeps them (:data:`READERS`; anything else records ``observed`` only):

* :class:`~probopt.optim.VSGD`. :math:`\beta_t` and :math:`\sigma_t^2` are functions of the Gamma
  rates *before* the step, :math:`v = b/a` (the prior values at :math:`t = 1`):
  :math:`\beta_t = v_{\hat g}/(v_g + v_{\hat g})`, :math:`\sigma_t^2 = v_g v_{\hat g}/(v_g +
  v_{\hat g})`. The pre-hook computes them from the state, so ``track_posterior`` is not needed
  (and the fused kernel keeps working); the post-hook reads :math:`\mu_t` and
  :meth:`~probopt.optim.VSGD.precisions` (after the step). Tested equal to
  ``track_posterior=True``.
* :class:`~probopt.optim.ConstantVSGD`: the constants :math:`\beta = K_g/(1+K_g)`,
  :math:`\sigma^2 = \beta s^2`, :math:`\mathbb E[w_g] = 1/s^2`, :math:`\mathbb E[w_{\hat g}] =
  1/(K_g s^2)`, and :math:`\mu_t` from the state.
* :class:`~probopt.optim.GradientModelOptimizer` (the generic SVI path):
  :meth:`~probopt.optim.GradientModelOptimizer.posterior` gives :math:`(\mu_t, \sigma_t^2)`; the
  *implied* momentum is :math:`\beta_t = (\hat g_t - \mu_t)/(\hat g_t - \mu_{t-1})` (NaN where
  the innovation is 0); the precisions are NaN (they are model-specific). With ``draws=(C, D)``
  the guide is re-traced after the step and :math:`C \times D` draws of the chosen coordinates
  are kept (``posterior`` group of the DataTree: chains × draws, so ESS and R̂ apply).
* :class:`~probopt.optim.GradQueue`: the recorder attaches to the inner optimizer, whose
  ``.grad`` is the amplified gradient.

With ``estimator=`` (a :class:`~probopt.sampling.GradientEstimator`) the recorder also wraps that
instance's ``backward`` and, at its own stride, records the batch loss, the estimated
design-based variance of the estimator's gradient and of the plain minibatch mean on the same
batch (:mod:`probopt.diagnostics.estimator_variance`; one vmapped per-example backward of the
chosen parameters per recorded step), and importance weights when the estimator has them.

Memory is bounded: ``capacity`` records per group, either thinned (``buffer="thin"``: when full,
every other record is dropped and the stride doubles, so the whole run stays covered at a
coarser resolution) or a ring (``buffer="ring"``: the last ``capacity`` records). A step that is
not recorded costs one integer test per hook; :meth:`Recorder.pause` or ``enabled=False``
skips even that work.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "QUANTITIES",
    "READERS",
    "LAYER_STATISTICS",
    "PosteriorReader",
    "Recorder",
]

#: Per-step quantities, in the order of the arrays a recorder stores.
QUANTITIES: tuple[str, ...] = (
    "observed",
    "mean",
    "variance",
    "beta",
    "precision_g",
    "precision_ghat",
    "snr",
)

#: How a whole tensor is summarised per quantity (the ``layers`` group of the DataTree).
LAYER_STATISTICS: dict[str, str] = {
    "observed": "rms",
    "mean": "rms",
    "variance": "mean",
    "beta": "mean",
    "precision_g": "geometric_mean",
    "precision_ghat": "geometric_mean",
    "snr": "ratio_of_sums",
}


# --------------------------------------------------------------------------------------------
# readers: where each optimizer keeps the posterior


class PosteriorReader:
    """Reads the posterior of the true gradient of one parameter around one optimizer step.

    ``before`` runs in the step pre-hook, ``after`` in the post-hook; both return dicts of
    tensors shaped like the parameter (views are fine: the recorder summarises each dict as soon
    as it gets it), keyed by names of :data:`QUANTITIES`; keys starting with ``_`` are private
    to the reader (``after`` receives the ``before`` dict). Quantities from ``after`` override
    those from ``before``; missing ones are recorded as NaN. ``after`` returns None when the
    optimizer did not step this parameter (a step skipped by the non-finite policy). The base
    class reads only the observed gradient: it serves any optimizer.
    """

    def before(self, opt: torch.optim.Optimizer, p: Tensor, group: dict) -> dict[str, Any]:
        g = p.grad.detach()
        return {"observed": -g if group.get("maximize", False) else g,
                "_step": _state_step(opt, p)}  # fmt: skip

    def after(
        self, opt: torch.optim.Optimizer, p: Tensor, group: dict, pre: dict[str, Any]
    ) -> dict[str, Tensor] | None:
        return {}  # no step counter to check in general

    def draws(
        self,
        opt: torch.optim.Optimizer,
        p: Tensor,
        pre: dict[str, Any],
        shape: tuple[int, int],
        index: Tensor,
        generator_seed: int,
    ) -> Tensor | None:
        """Posterior draws ``shape + (len(index),)`` of the chosen coordinates, or None."""
        return None


def _state_step(opt: torch.optim.Optimizer, p: Tensor) -> float:
    state = opt.state.get(p)
    if not state or "step" not in state:
        return 0.0
    return float(state["step"])


def _stepped(opt: torch.optim.Optimizer, p: Tensor, pre: dict[str, Any]) -> bool:
    """Whether a probopt optimizer stepped ``p``: its own step counter moved (a step skipped by
    the non-finite policy leaves it, and everything else, unchanged)."""
    state = opt.state.get(p)
    return bool(state) and "step" in state and float(state["step"]) != pre["_step"]


class _Summarised(NamedTuple):
    """A quantity a reader has already reduced: the tensor summary and a function giving the
    values at flat indices (lets a reader avoid materialising a whole tensor)."""

    summary: float
    at: Callable[[Tensor], Tensor]


class _VSGDReader(PosteriorReader):
    """VSGD: beta_t and sigma_t^2 from the rates before the step, in reusable scratch buffers.

    Note [probopt: recorder scratch] On CPU a freshly allocated temporary costs more than the
    arithmetic (first-touch page faults; Note [probopt: CPU blocking] in probopt.optim.vsgd), so
    the reader keeps three buffers the size of the largest recorded tensor and works in place.
    """

    def __init__(self) -> None:
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _buffers(self, like: Tensor) -> list[Tensor]:
        key = (like.device, like.dtype)
        n = like.numel()
        buf = self._scratch.get(key)
        if buf is None or buf.shape[1] < n:
            buf = torch.empty(3, n, device=like.device, dtype=like.dtype)
            self._scratch[key] = buf
        return [buf[i, :n].view_as(like) for i in range(3)]

    def before(self, opt: torch.optim.Optimizer, p: Tensor, group: dict) -> dict[str, Any]:
        from probopt.optim.vsgd import _first_step_variances, _shape

        out = super().before(opt, p, group)
        state = opt.state.get(p)
        gamma, k_g = group["prior_strength"], group["variance_ratio"]
        if out["_step"] == 0.0:
            v_g, v_ghat = _first_step_variances(gamma, k_g)
            ones = torch.ones_like(out["observed"])
            out["beta"] = ones * (v_ghat / (v_g + v_ghat))
            out["variance"] = ones * (v_g * v_ghat / (v_g + v_ghat))
            return out
        a = _shape(gamma)
        v_g, v_ghat, x = self._buffers(state["b_g"])
        torch.div(state["b_g"], a, out=v_g)
        torch.div(state["b_ghat"], a, out=v_ghat)
        torch.add(v_g, v_ghat, out=x)  # x = v_g + v_ghat
        # the reference's arithmetic, bit for bit: sigma^2 = (v_g v_ghat) / x, beta = v_ghat / x
        out["variance"] = v_g.mul_(v_ghat).div_(x)
        out["beta"] = v_ghat.div_(x)
        return out

    def after(
        self, opt: torch.optim.Optimizer, p: Tensor, group: dict, pre: dict[str, Any]
    ) -> dict[str, Any] | None:
        if not _stepped(opt, p, pre):
            return None
        from probopt.optim.vsgd import _shape

        state = opt.state[p]
        a = _shape(group["prior_strength"])
        out: dict[str, Any] = {"mean": state["mu"].detach()}
        log_b = self._buffers(state["b_g"])[0]
        for name, key in (("precision_g", "b_g"), ("precision_ghat", "b_ghat")):
            b = state[key]
            torch.log(b, out=log_b)  # E[w] = a / b: geometric mean a exp(-mean log b)
            flat = b.reshape(-1)
            out[name] = _Summarised(a * math.exp(-float(log_b.mean())),
                                    lambda i, flat=flat: a / flat[i])  # fmt: skip
        return out


class _ConstantVSGDReader(PosteriorReader):
    def after(
        self, opt: torch.optim.Optimizer, p: Tensor, group: dict, pre: dict[str, Any]
    ) -> dict[str, Tensor] | None:
        if not _stepped(opt, p, pre):
            return None
        k_g, s2 = group["variance_ratio"], group["prior_variance"]
        mu = opt.state[p]["mu"].detach()
        beta = k_g / (1.0 + k_g)

        def const(v: float) -> Tensor:
            return torch.full_like(mu, v)

        return {
            "mean": mu,
            "variance": const(beta * s2),
            "beta": const(beta),
            "precision_g": const(1.0 / s2),
            "precision_ghat": const(1.0 / (k_g * s2)),
        }


class _GradientModelReader(PosteriorReader):
    def before(self, opt: torch.optim.Optimizer, p: Tensor, group: dict) -> dict[str, Any]:
        out = super().before(opt, p, group)
        state = opt.state.get(p)
        prev = state["prev_mean"] if state else torch.zeros(p.numel(), dtype=p.dtype)
        out["_prev"] = prev.detach().clone()  # replaced by the step
        out["_observed"] = out["observed"].clone()
        return out

    def after(
        self, opt: torch.optim.Optimizer, p: Tensor, group: dict, pre: dict[str, Any]
    ) -> dict[str, Tensor] | None:
        if not _stepped(opt, p, pre):
            return None
        mean, variance = opt.posterior(p)
        g = pre["_observed"]
        prev = pre["_prev"].view_as(g).to(g.dtype)
        innovation = g - prev
        # implied momentum: mu_t = beta mu_{t-1} + (1 - beta) g_hat
        beta = torch.where(innovation != 0, (g - mean) / innovation, torch.full_like(g, math.nan))
        return {"mean": mean.detach(), "variance": variance.detach(), "beta": beta}

    def draws(
        self,
        opt: torch.optim.Optimizer,
        p: Tensor,
        pre: dict[str, Any],
        shape: tuple[int, int],
        index: Tensor,
        generator_seed: int,
    ) -> Tensor | None:
        import pyro
        from pyro import poutine

        state = opt.state[p]
        g_hat = pre["_observed"].reshape(-1)
        prev = pre["_prev"].reshape(-1)
        store = pyro.get_param_store()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            with store.scope(state["param_store"]):
                trace = poutine.trace(opt.guide).get_trace(g_hat, prev, **opt.model_kwargs)
            fn = trace.nodes[opt.site]["fn"]
            sample = fn.sample(shape).detach()
        return sample.reshape(*shape, -1)[..., index]


def _readers() -> dict[type, PosteriorReader]:
    from probopt.optim import VSGD, ConstantVSGD, GradientModelOptimizer

    return {
        VSGD: _VSGDReader(),
        ConstantVSGD: _ConstantVSGDReader(),
        GradientModelOptimizer: _GradientModelReader(),
    }


#: Optimizer class -> reader. Register a reader for your own optimizer class here.
READERS: dict[type, PosteriorReader] = {}


def _reader_for(opt: torch.optim.Optimizer) -> PosteriorReader:
    if not READERS:
        READERS.update(_readers())
    for cls in type(opt).__mro__:
        if cls in READERS:
            return READERS[cls]
    return PosteriorReader()


# --------------------------------------------------------------------------------------------
# bounded buffers


class _Buffer:
    """Records keyed by step with a stride; ``thin``: halve and double the stride when full;
    ``ring``: keep the last ``capacity``."""

    def __init__(self, every: int, capacity: int, mode: str) -> None:
        self.every = every
        self.capacity = capacity
        self.mode = mode
        self.records: deque | list = deque(maxlen=capacity) if mode == "ring" else []

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def add(self, step: int, record: Any) -> None:
        self.records.append((step, record))
        if self.mode == "thin" and len(self.records) > self.capacity:
            stride = 2 * self.every
            self.records = [(s, r) for s, r in self.records if s % stride == 0]
            self.every = stride

    def __len__(self) -> int:
        return len(self.records)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {low})")
    return value


# --------------------------------------------------------------------------------------------
# the recorder


@dataclass
class _Tracked:
    name: str
    param: Tensor
    index: Tensor  # flat indices of the recorded coordinates (may be empty)
    labels: list[str] = field(default_factory=list)


ParamChoice = None | nn.Module | Mapping[str, Tensor] | Iterable[Tensor] | Iterable[str]
CoordChoice = int | Sequence[int] | Mapping[str, int | Sequence[int]]


class Recorder:
    r"""Record posterior gradient quantities of an optimizer (and an estimator) during training.

    Args:
        optimizer: any ``torch.optim.Optimizer``; probopt's :class:`~probopt.optim.VSGD`,
            :class:`~probopt.optim.ConstantVSGD` and
            :class:`~probopt.optim.GradientModelOptimizer` expose a posterior (:data:`READERS`);
            for :class:`~probopt.optim.GradQueue` the inner optimizer is read.
        params: which tensors to record: ``None`` (every parameter of the optimizer), a module
            (its ``named_parameters``), a dict ``name -> tensor``, tensors, or parameter names of
            ``model``.
        model: names the parameters (``named_parameters``); needed for names in ``params`` and
            for the estimator variance.
        coordinates: coordinates recorded individually per tensor: a count (chosen at random
            with ``seed``, sorted), a list of flat indices, or a dict ``name -> count or list``.
        every: record every ``every``-th optimizer step.
        capacity: records kept per group (steps, estimator steps, draws).
        buffer: ``"thin"`` (keep the whole run, halving the resolution when full) or ``"ring"``
            (keep the most recent ``capacity`` records).
        estimator: a :class:`~probopt.sampling.GradientEstimator` whose ``backward`` is wrapped
            (on the instance) to record the loss, design variances and importance weights.
        variance_every: stride of the estimator records (default ``every``); each recorded
            step costs one vmapped per-example backward of ``variance_params``.
        variance_params: parameters for the estimator variance
            (:data:`~probopt.sampling.per_example.ParamSpec`; default: the recorded tensors).
        draws: ``(chains, draws)`` posterior draws of the chosen coordinates at every
            ``draw_every``-th recorded step, for optimizers that can sample their posterior
            (the generic SVI path); None for none.
        draw_every: stride in optimizer steps of the draws (default ``every``).
        seed: seeds the choice of coordinates and the posterior draws.
        enabled: start recording at once (otherwise call :meth:`resume`).

    Attributes:
        step: optimizer steps seen since attaching (recorded or not).
        names: the recorded tensors' names.

    Example:
        >>> from probopt.optim import VSGD
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = VSGD(net.parameters(), lr=0.1)
        >>> rec = Recorder(opt, model=net, coordinates=2, every=2)
        >>> for _ in range(6):
        ...     opt.zero_grad(); net(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
        >>> rec.step, rec.recorded_steps(), rec.names
        (6, [2, 4, 6], ['weight', 'bias'])
        >>> rec.layer_array("beta").shape  # (steps, tensors)
        (3, 2)
        >>> rec.close()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamChoice = None,
        *,
        model: nn.Module | None = None,
        coordinates: CoordChoice = 3,
        every: int = 1,
        capacity: int = 1000,
        buffer: str = "thin",
        estimator: Any = None,
        variance_every: int | None = None,
        variance_params: Any = None,
        draws: tuple[int, int] | None = None,
        draw_every: int | None = None,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        _check_int("every", every, 1)
        _check_int("capacity", capacity, 2)
        if buffer not in ("thin", "ring"):
            raise ValueError(f"Invalid buffer: {buffer!r} (choose 'thin' or 'ring')")
        if variance_every is not None:
            _check_int("variance_every", variance_every, 1)
        if draw_every is not None:
            _check_int("draw_every", draw_every, 1)
        if draws is not None:
            if not (isinstance(draws, (tuple, list)) and len(draws) == 2):
                raise ValueError(f"Invalid draws: {draws!r} (must be a pair (chains, draws))")
            _check_int("draws[0] (chains)", draws[0], 1)
            _check_int("draws[1] (draws)", draws[1], 2)
        self.optimizer = optimizer
        inner = getattr(optimizer, "optimizer", None)
        self._target = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self._reader = _reader_for(self._target)
        self.model = model
        self.seed = int(seed)
        self._tracked = self._resolve(params, coordinates)
        self.names = [t.name for t in self._tracked]
        self._group_of = {
            id(p): g for g in self._target.param_groups for p in g["params"]
        }  # fmt: skip
        missing = [t.name for t in self._tracked if id(t.param) not in self._group_of]
        if missing:
            raise ValueError(f"parameters not optimized by this optimizer: {missing}")
        self.buffer_mode = buffer
        self._steps = _Buffer(every, capacity, buffer)
        self._draws = _Buffer(draw_every or every, capacity, buffer) if draws else None
        self.draw_shape = tuple(draws) if draws else None
        self.step = 0
        self._pending: dict[int, dict[str, Any]] | None = None
        self._handles: list[Any] = []
        self.enabled = False
        self.estimator = None
        self._estimator_rec = None
        self.meta: dict[str, Any] = {
            "optimizer": type(self._target).__name__,
            "wrapper": type(optimizer).__name__ if self._target is not optimizer else "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if estimator is not None:
            from probopt.diagnostics.estimator_variance import EstimatorRecorder

            self.estimator = estimator
            self._estimator_rec = EstimatorRecorder(
                self, estimator, every=variance_every or every, capacity=capacity,
                buffer=buffer, params=variance_params,
            )  # fmt: skip
        if enabled:
            self.resume()

    # ---------------------------------------------------------------- set-up

    def _named(self) -> dict[int, str]:
        if self.model is not None:
            return {id(p): n for n, p in self.model.named_parameters()}
        names: dict[int, str] = {}
        for gi, group in enumerate(self._target.param_groups):
            pnames = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                names[id(p)] = pnames[pi] if pnames else f"group{gi}.param{pi}"
        return names

    def _resolve(self, params: ParamChoice, coordinates: CoordChoice) -> list[_Tracked]:
        named = self._named()
        if params is None:
            tensors = [p for g in self._target.param_groups for p in g["params"]]
            chosen = [(named.get(id(p), f"param{i}"), p) for i, p in enumerate(tensors)]
        elif isinstance(params, nn.Module):
            chosen = list(params.named_parameters())
        elif isinstance(params, Mapping):
            chosen = list(params.items())
        else:
            chosen = []
            by_name = {} if self.model is None else dict(self.model.named_parameters())
            for i, item in enumerate(params):
                if isinstance(item, str):
                    if item not in by_name:
                        raise ValueError(f"no parameter named {item!r} (pass model=...)")
                    chosen.append((item, by_name[item]))
                elif isinstance(item, Tensor):
                    chosen.append((named.get(id(item), f"param{i}"), item))
                else:
                    raise TypeError(f"cannot record {type(item).__name__} (tensor or name)")
        if not chosen:
            raise ValueError("no parameter to record")
        gen = torch.Generator().manual_seed(self.seed)
        tracked = []
        for name, p in chosen:
            spec = coordinates.get(name, 0) if isinstance(coordinates, Mapping) else coordinates
            n = p.numel()
            if isinstance(spec, bool) or not isinstance(spec, (int, Sequence, Tensor)):
                raise TypeError(f"Invalid coordinates for {name!r}: {spec!r}")
            if isinstance(spec, int):
                if spec < 0:
                    raise ValueError(f"Invalid coordinates for {name!r}: {spec} (must be >= 0)")
                index = torch.randperm(n, generator=gen)[: min(spec, n)].sort().values
            else:
                index = torch.as_tensor(list(spec), dtype=torch.long)
                if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
                    raise ValueError(f"coordinates of {name!r} must be flat indices in [0, {n})")
            labels = [f"{name}[{int(i)}]" for i in index]
            tracked.append(_Tracked(name, p, index, labels))
        return tracked

    # ---------------------------------------------------------------- hooks

    def resume(self) -> None:
        """(Re)register the hooks; recording restarts at the next step."""
        if self.enabled:
            return
        self._handles = [
            self._target.register_step_pre_hook(self._pre_hook),
            self._target.register_step_post_hook(self._post_hook),
        ]
        if self._estimator_rec is not None:
            self._estimator_rec.attach()
        self.enabled = True

    def pause(self) -> None:
        """Remove the hooks (no cost at all until :meth:`resume`); records are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._estimator_rec is not None:
            self._estimator_rec.detach()
        self.enabled = False
        self._pending = None

    close = pause

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wants_any(self, step: int) -> bool:
        return self._steps.wants(step) or (self._draws is not None and self._draws.wants(step))

    def _pre_hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step = self.step + 1
        if not self._wants_any(step):
            self._pending = None
            return
        pending = {}
        with torch.no_grad():
            for t in self._tracked:
                if t.param.grad is None:
                    continue
                group = self._group_of[id(t.param)]
                pre = self._reader.before(opt, t.param, group)
                private = {k: v for k, v in pre.items() if k.startswith("_")}
                pending[id(t.param)] = (private, _summarise(pre, t.index))
        self._pending = pending

    def _post_hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step = self.step
        nq, np_ = len(QUANTITIES), len(self._tracked)
        layers = np.full((nq, np_), np.nan)
        coords = [np.full((nq, t.index.numel()), np.nan) for t in self._tracked]
        draws: list[np.ndarray | None] = []
        any_stepped = False
        with torch.no_grad():
            for j, t in enumerate(self._tracked):
                entry = pending.get(id(t.param))
                post = None
                if entry is not None:
                    group = self._group_of[id(t.param)]
                    post = self._reader.after(opt, t.param, group, entry[0])
                if post is None:
                    draws.append(None)
                    continue
                any_stepped = True
                layers[:, j], coords[j] = _merge(entry[1], _summarise(post, t.index))
                if self._draws is not None and self._draws.wants(step):
                    d = self._reader.draws(
                        opt, t.param, entry[0], self.draw_shape, t.index, self.seed + step
                    )
                    draws.append(None if d is None else d.double().cpu().numpy())
                else:
                    draws.append(None)
        if not any_stepped:
            return
        if self._steps.wants(step):
            self._steps.add(step, (layers, np.concatenate(coords, axis=1)))
        if (
            self._draws is not None
            and self._draws.wants(step)
            and any(d is not None for d in draws)
        ):
            chains, ndraws = self.draw_shape
            full = [
                d if d is not None else np.full((chains, ndraws, t.index.numel()), np.nan)
                for d, t in zip(draws, self._tracked)
            ]
            self._draws.add(step, np.concatenate(full, axis=-1))

    # ---------------------------------------------------------------- read-out

    @property
    def every(self) -> int:
        """The current stride (doubles each time a ``thin`` buffer fills)."""
        return self._steps.every

    def recorded_steps(self) -> list[int]:
        """Optimizer steps (1-based) that have a record."""
        return [s for s, _ in self._steps.records]

    def coordinate_labels(self) -> list[str]:
        """Labels ``name[flat index]`` of the individually recorded coordinates."""
        return [label for t in self._tracked for label in t.labels]

    def coordinate_table(self) -> tuple[list[str], list[int]]:
        """The parameter name and flat index of each recorded coordinate."""
        names = [t.name for t in self._tracked for _ in range(t.index.numel())]
        index = [int(i) for t in self._tracked for i in t.index]
        return names, index

    def layer_array(self, quantity: str) -> np.ndarray:
        """``(steps, tensors)`` summaries of one quantity (see :data:`LAYER_STATISTICS`)."""
        q = QUANTITIES.index(quantity)
        if not self._steps.records:
            return np.empty((0, len(self._tracked)))
        return np.stack([rec[0][q] for _, rec in self._steps.records])

    def coordinate_array(self, quantity: str) -> np.ndarray:
        """``(steps, coordinates)`` values of one quantity at the recorded coordinates."""
        q = QUANTITIES.index(quantity)
        if not self._steps.records:
            return np.empty((0, len(self.coordinate_labels())))
        return np.stack([rec[1][q] for _, rec in self._steps.records])

    def draw_steps(self) -> list[int]:
        return [] if self._draws is None else [s for s, _ in self._draws.records]

    def draw_array(self) -> np.ndarray:
        """``(chains, draws, steps, coordinates)`` posterior draws (empty when none)."""
        if self._draws is None or not self._draws.records:
            return np.empty((0, 0, 0, len(self.coordinate_labels())))
        return np.stack([d for _, d in self._draws.records], axis=2)

    @property
    def estimator_records(self) -> Any:
        """The :class:`~probopt.diagnostics.estimator_variance.EstimatorRecorder`, or None."""
        return self._estimator_rec

    def to_datatree(self) -> Any:
        """The records as an ``xarray.DataTree`` (:func:`probopt.diagnostics.to_datatree`)."""
        from probopt.diagnostics.arviz import to_datatree

        return to_datatree(self)

    def __repr__(self) -> str:
        return (
            f"Recorder({self.meta['optimizer']}, tensors={len(self._tracked)}, "
            f"coordinates={len(self.coordinate_labels())}, records={len(self._steps)}, "
            f"every={self.every}, buffer={self.buffer_mode!r})"
        )


_Summary = tuple[dict[str, float], dict[str, np.ndarray], dict[str, float]]


def _summarise(tensors: Mapping[str, Any], index: Tensor) -> _Summary:
    """Tensor summaries (:data:`LAYER_STATISTICS`), the values at ``index`` and the sums the SNR
    needs, of the public quantities in ``tensors``; one pass per quantity, no float64 copy of a
    whole tensor (accumulation in the tensor's dtype)."""
    summary: dict[str, float] = {}
    values: dict[str, np.ndarray] = {}
    sums: dict[str, float] = {}
    for name, x in tensors.items():
        if name.startswith("_") or name not in LAYER_STATISTICS:
            continue
        if isinstance(x, _Summarised):
            summary[name] = x.summary
            if index.numel():
                values[name] = x.at(index).double().cpu().numpy()
            continue
        flat = x.detach().reshape(-1)
        if index.numel():
            values[name] = flat[index.to(flat.device)].double().cpu().numpy()
        stat = LAYER_STATISTICS[name]
        if name == "mean":
            sums["mean_sq"] = float(torch.dot(flat, flat))
        if stat == "rms":
            sq = sums["mean_sq"] if name == "mean" else float(torch.dot(flat, flat))
            summary[name] = math.sqrt(sq / max(flat.numel(), 1))
        elif stat == "mean":
            total = float(flat.sum())
            summary[name] = total / max(flat.numel(), 1)
            if name == "variance":
                sums["variance"] = total
        elif stat == "geometric_mean":
            summary[name] = math.exp(float(flat.log().mean()))
    return summary, values, sums


def _merge(pre: _Summary, post: _Summary) -> tuple[np.ndarray, np.ndarray]:
    r"""Arrays ``(Q,)`` and ``(Q, C)`` from the pre- and post-step summaries (post wins), with the
    SNR: :math:`\sum\mu^2/\sum\sigma^2` per tensor and :math:`\mu^2/\sigma^2` per
    coordinate."""
    summary = {**pre[0], **post[0]}
    values = {**pre[1], **post[1]}
    sums = {**pre[2], **post[2]}
    if "mean_sq" in sums and "variance" in sums:
        with np.errstate(divide="ignore", invalid="ignore"):
            summary["snr"] = np.float64(sums["mean_sq"]) / np.float64(sums["variance"])
            if "mean" in values and "variance" in values:
                values["snr"] = values["mean"] ** 2 / values["variance"]
    n = next((len(v) for v in values.values()), 0)
    layer = np.array([summary.get(q, np.nan) for q in QUANTITIES], dtype=float)
    coords = np.full((len(QUANTITIES), n), np.nan)
    for i, q in enumerate(QUANTITIES):
        if q in values:
            coords[i] = values[q]
    return layer, coords
