"""VSGD: reference vs fast paths, parity with pytorch-optimizer, limits, policies, state."""

import copy
import os
import subprocess
import sys
import textwrap

import probopt.models.vsgd as vsgd_model
import pytest
import torch

from probopt.optim import VSGD, ConstantVSGD, NonFiniteGradientError
from probopt.optim._vsgd_cpu import cpu_kernel_available

IMPLS = {
    "reference": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def _params(dtype=torch.float64, device="cpu"):
    torch.manual_seed(3)
    shapes = [(5, 3), (7,), (2, 2, 2), (), (70_000,), (1, 70_001)]  # > one CPU block
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]


def _run(impl_kwargs, steps=8, dtype=torch.float64, device="cpu", none_at=None, **hyper):
    """Run VSGD on a fixed gradient stream; a frozen parameter never gets a gradient and
    ``none_at`` = (step, index) leaves one parameter without a gradient at one step."""
    params = _params(dtype, device)
    frozen = torch.nn.Parameter(torch.ones(4, dtype=dtype, device=device))
    opt = VSGD(params + [frozen], **impl_kwargs, **hyper)
    gen = torch.Generator().manual_seed(7)
    for t in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1 + 0.03
            p.grad = None if none_at == (t, i) else g.to(device)
        opt.step()
    return params, opt


def _state(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("hyper", [{}, {"weight_decay": 0.05, "maximize": True}])
def test_fast_paths_match_reference_float64(impl, hyper):
    """torch's test_foreach_matches_forloop: ≥ 7 steps in float64, params and every state entry,
    with a frozen parameter, a 0-dim parameter and a step where one parameter has no gradient.
    Tolerance 1e-12: the paths differ only in the order of float64 operations."""
    if impl == "fused" and not cpu_kernel_available():
        pytest.skip("no C compiler: the fused CPU kernel is unavailable")
    ref, ref_opt = _run(IMPLS["reference"], none_at=(3, 1), **hyper)
    fast, fast_opt = _run(IMPLS[impl], none_at=(3, 1), **hyper)
    for p, q in zip(ref, fast):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    for s, r in zip(_state(ref_opt, ref), _state(fast_opt, fast)):
        assert s.keys() == r.keys()
        for k in s:
            torch.testing.assert_close(r[k], s[k], rtol=1e-12, atol=1e-14)
    assert int(ref_opt.state[ref[1]]["step"]) == 7  # skipped once


def test_foreach_tracks_posterior_like_reference():
    ref, ref_opt = _run(IMPLS["reference"], track_posterior=True)
    fe, fe_opt = _run(IMPLS["foreach"], track_posterior=True)
    for p, q in zip(ref, fe):
        a, b = ref_opt.posterior(p), fe_opt.posterior(q)
        torch.testing.assert_close(b.variance, a.variance, rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(b.beta, a.beta, rtol=1e-12, atol=1e-14)


def test_float32_paths_agree():
    ref, _ = _run(IMPLS["reference"], dtype=torch.float32)
    for impl in ("foreach", "fused"):
        fast, _ = _run(IMPLS[impl], dtype=torch.float32)
        for p, q in zip(ref, fast):
            # float32 rounding of a different operation order, over 8 steps of lr 0.1
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_parity_with_pytorch_optimizer(dtype, rtol):
    """Same recursion as pytorch-optimizer's VSGD (itself a port of the official code) when every
    parameter gets a gradient from step 1. Tolerances: the official code expands the squares in
    the rate update, which changes rounding (float64 differences ~1e-13)."""
    po = pytest.importorskip("pytorch_optimizer")
    ours, _ = _run(IMPLS["reference"], steps=10, dtype=dtype, weight_decay=0.01)
    params = _params(dtype)
    theirs = po.VSGD(params, lr=0.1, weight_decay=0.01)
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1 + 0.03
        theirs.step()
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol)


def test_late_parameter_takes_its_own_first_step():
    """A parameter whose first gradient arrives at step 5 starts its own t = 1 (prior) branch:
    finite, and identical to a fresh optimizer on that parameter alone. (pytorch-optimizer's
    per-group counter divides 0 by 0 here.)"""
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = VSGD([a, b])
    for t in range(8):
        a.grad = torch.full_like(a, 0.5)
        b.grad = torch.full_like(b, -0.2) if t >= 5 else None
        opt.step()
    alone = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    single = VSGD([alone])
    for _ in range(3):
        alone.grad = torch.full_like(alone, -0.2)
        single.step()
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, alone, rtol=0, atol=0)


def test_first_step_facts():
    """μ₁ = ĝ₁/(1 + K_g); σ₁² = v_g K_g/(1 + K_g) ≈ 1.935e-4 with the defaults (notes §2)."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = VSGD([p], track_posterior=True)
    g = torch.tensor([3.1, -6.2, 0.31, 0.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    post = opt.posterior(p)
    torch.testing.assert_close(post.mean, g / 31, rtol=1e-14, atol=0)
    v_g = 2e-8 / (2e-8 + 1e-4)
    torch.testing.assert_close(post.variance, torch.full_like(g, v_g * 30 / 31), rtol=1e-12, atol=0)
    assert abs(float(post.variance[0]) - 1.935e-4) < 1e-6
    step = -0.1 * post.mean / (torch.sqrt(post.mean**2 + post.variance) + 1e-8)
    torch.testing.assert_close(p.detach(), step, rtol=1e-14, atol=0)


def test_cavi_update_of_the_model_is_the_optimizer_step():
    """The contract: models/vsgd.py's closed-form SVI step equals the optimizer's state update."""
    stream = vsgd_model.make_data(0, dim=6, steps=12).double()
    state = vsgd_model.init_state(stream[0])
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = VSGD([p], track_posterior=True)
    for g in stream:
        state, variance = vsgd_model.cavi_update(state, g)
        p.grad = g.clone()
        opt.step()
        s = opt.state[p]
        torch.testing.assert_close(s["mu"], state.mean, rtol=1e-13, atol=1e-18)
        torch.testing.assert_close(s["b_g"], state.rate_g, rtol=1e-13, atol=1e-18)
        torch.testing.assert_close(s["b_ghat"], state.rate_ghat, rtol=1e-13, atol=1e-18)
        torch.testing.assert_close(s["variance"], variance, rtol=1e-13, atol=1e-18)


def test_strong_prior_limit_is_constant_vsgd():
    """γ → ∞: the precisions stay at their prior means (E[w_g] = 1, E[w_ĝ] = 1/K_g), which is
    ConstantVSGD with s² = 1. With γ = 1e12 the deviation is O(1/γ) after the first step, whose
    jitter δ makes E[w_g] = 1 + δ/(2γ)."""
    x1 = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    x2 = torch.nn.Parameter(x1.detach().clone())
    o1 = VSGD([x1], lr=0.05, prior_strength=1e12)
    o2 = ConstantVSGD([x2], lr=0.05)
    for _ in range(20):
        for x, o in ((x1, o1), (x2, o2)):
            o.zero_grad()
            (x**2).sum().backward()
            o.step()
    torch.testing.assert_close(x1, x2, rtol=1e-9, atol=1e-12)


def test_constant_vsgd_small_gradients_is_sgd_momentum():
    """|μ| ≪ σ: ConstantVSGD = SGD(lr=η/σ, momentum=β, dampening=β); relative error O(μ²/σ²)."""
    k, s2, lr = 9.0, 1.0, 0.3
    beta, sigma = k / (1 + k), (k / (1 + k) * s2) ** 0.5
    x1 = torch.nn.Parameter(torch.tensor([1e-3, -2e-3], dtype=torch.float64))
    x2 = torch.nn.Parameter(x1.detach().clone())
    o1 = ConstantVSGD([x1], lr=lr, variance_ratio=k, prior_variance=s2, eps=0.0)
    o2 = torch.optim.SGD([x2], lr=lr / sigma, momentum=beta, dampening=beta)
    # torch SGD's first step copies the gradient into the buffer (no dampening): align it
    x1.grad = torch.tensor([1e-4, -2e-4], dtype=torch.float64)
    o1.step()
    o2.state[x2]["momentum_buffer"] = o1.state[x1]["mu"].clone()
    x2.data.copy_(x1.data)
    for _ in range(10):
        for x, o in ((x1, o1), (x2, o2)):
            o.zero_grad()
            (1e-3 * x**2).sum().backward()
            o.step()
    torch.testing.assert_close(x1, x2, rtol=1e-6, atol=0)


def test_zero_gradient_only_decays():
    p = torch.nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
    opt = VSGD([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.9, -3.8], dtype=torch.float64))


def test_maximize_equals_minimizing_the_negation():
    a = torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = VSGD([a], maximize=True), VSGD([b])
    for _ in range(6):
        oa.zero_grad(), ob.zero_grad()
        (-(a**2).sum()).backward()
        (b**2).sum().backward()
        oa.step(), ob.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
def test_state_dict_round_trip_continues_identically(impl):
    params, opt = _run(IMPLS[impl], steps=3)
    saved = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    frozen = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    restored = VSGD(clones + [frozen], **IMPLS[impl])
    restored.load_state_dict(saved)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        for p, q in zip(params, clones):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g, g.clone()
        opt.step()
        restored.step()
    for p, q in zip(params, clones):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert restored.state_dict()["param_groups"][0]["variance_ratio"] == 30.0


def _corrupt(state_dict, how):
    sd = copy.deepcopy(state_dict)
    first = sd["state"][0]
    if how == "shape":
        first["mu"] = first["mu"][:-1]
    elif how == "missing":
        del first["b_g"]
    elif how == "nan":
        first["b_ghat"][0] = float("nan")
    elif how == "negative":
        first["b_g"][0] = -1.0
    elif how == "step":
        first["step"] = torch.tensor(2.5)
    elif how == "extra":
        sd["state"][99] = copy.deepcopy(first)
    elif how == "groups":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "layout":
        sd = sd["state"]
    return sd


CORRUPTIONS = {
    "shape": "'mu' of parameter 0 has shape",
    "missing": "lacks \\['b_g'\\]",
    "nan": "'b_ghat' of parameter 0 holds NaN",
    "negative": "'b_g' of parameter 0 has negative",
    "step": "not a step count",
    "extra": "parameter 99, which no parameter group lists",
    "groups": "saved parameter groups have sizes",
    "layout": "keys 'state' and 'param_groups'",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_is_rejected_and_changes_nothing(how):
    """A wrong-shaped state tensor would otherwise be read and written out of bounds by the
    fused kernel at the next step; every corruption gives a ValueError naming the problem, and
    the optimizer's state and parameters stay as they were."""
    params, opt = _run(IMPLS["fused"] if cpu_kernel_available() else {}, steps=3)
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=CORRUPTIONS[how]):
        opt.load_state_dict(_corrupt(opt.state_dict(), how))
    after = opt.state_dict()
    for pid, state in before["state"].items():
        for k, v in state.items():
            assert torch.equal(after["state"][pid][k], v), (pid, k)
    assert all(torch.equal(p, v) for p, v in zip(params, values))


def test_half_precision_state_survives_a_round_trip_in_float32():
    """torch casts loaded state to the parameter's dtype; VSGD puts its float32 state of a
    bfloat16 parameter back exactly, so a restored run continues bit for bit."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 16, dtype=torch.bfloat16))
    opt = VSGD([p], lr=0.01)
    for t in range(3):
        p.grad = torch.full_like(p, 0.1 * (t + 1))
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    restored = VSGD([q], lr=0.01)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in ("mu", "b_g", "b_ghat"):
        assert restored.state[q][k].dtype == torch.float32
        assert torch.equal(restored.state[q][k], opt.state[p][k])
    p.grad, q.grad = torch.full_like(p, 0.3), torch.full_like(q, 0.3)
    opt.step(), restored.step()
    assert torch.equal(p, q)


def test_param_groups_behave_like_separate_optimizers():
    a1, b1 = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    a2, b2 = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    joint = VSGD([{"params": [a1], "lr": 0.2}, {"params": [b1], "variance_ratio": 5.0}])
    sep_a, sep_b = VSGD([a2], lr=0.2), VSGD([b2], variance_ratio=5.0)
    for t in range(5):
        for p in (a1, a2):
            p.grad = torch.full((3,), 0.1 * (t + 1))
        for p in (b1, b2):
            p.grad = torch.full((3,), -0.05 * (t + 1))
        joint.step(), sep_a.step(), sep_b.step()
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch.testing.assert_close(b1, b2, rtol=0, atol=0)


def test_lr_scheduler_and_tensor_lr():
    p = torch.nn.Parameter(torch.ones(2))
    opt = VSGD([p], lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert abs(float(opt.param_groups[0]["lr"]) - 0.0125) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype):
    """Half-precision parameters keep float32 state and follow the float32 run to bf16/fp16
    rounding of the parameter (relative 1e-2)."""
    ref = torch.nn.Parameter(torch.linspace(-1, 1, 64))
    low = torch.nn.Parameter(ref.detach().to(dtype))
    o_ref, o_low = VSGD([ref], lr=0.01), VSGD([low], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        g = torch.randn(64, generator=gen) * 0.1 + 0.05
        ref.grad, low.grad = g, g.to(dtype)
        o_ref.step(), o_low.step()
    assert o_low.state[low]["mu"].dtype == (torch.float32 if dtype != torch.float64 else dtype)
    assert low.dtype == dtype
    torch.testing.assert_close(low.detach().float(), ref.detach(), rtol=1e-2, atol=1e-2)


def test_complex_parameters_are_optimized_as_real_pairs():
    z = torch.nn.Parameter(torch.tensor([1 + 2j, -0.5 + 0.1j], dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = VSGD([z]), VSGD([r])
    for t in range(5):
        g = torch.tensor([[0.1, -0.2], [0.3, 0.05]], dtype=torch.float64) * (t + 1)
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        oz.step(), orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-14, atol=0)


ERROR_INPUTS = [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(variance_ratio=0.0), "Invalid variance_ratio: 0.0"),
    (dict(prior_strength=0.0), "Invalid prior_strength: 0.0"),
    (dict(prior_strength=-1e-8), "Invalid prior_strength"),
    (dict(kappa1=0.5), r"Invalid kappa1: 0.5 \(must be in \(0.5, 1.0\]\)"),
    (dict(kappa2=1.5), "Invalid kappa2: 1.5"),
    (dict(eps=-1.0), "Invalid eps"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(nonfinite="zero"), "Invalid nonfinite policy: 'zero'"),
]


@pytest.mark.parametrize("kwargs,message", ERROR_INPUTS)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VSGD([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_fused_and_foreach_together_is_an_error():
    with pytest.raises(RuntimeError, match="cannot both be True"):
        VSGD([torch.nn.Parameter(torch.ones(1))], fused=True, foreach=True)


def test_sparse_gradients_are_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        VSGD([p]).step()


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_everything_untouched(impl, bad):
    params, opt = _run(IMPLS[impl], steps=3)
    before_p = [p.detach().clone() for p in params]
    before_s = _state(opt, params)
    for p in params:
        p.grad = torch.ones_like(p)
    params[4].grad[123] = bad
    opt.step()
    assert opt.num_skipped_steps == 1
    for p, q in zip(params, before_p):
        assert torch.equal(p.detach(), q)
    for p, s in zip(params, before_s):
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v)


def test_nonfinite_raise_and_ignore():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = VSGD([p], nonfinite="raise")
    p.grad = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)
    with pytest.raises(NonFiniteGradientError, match="no parameter or state was changed"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64)) and not opt.state[p]
    ignore = VSGD([p], nonfinite="ignore")
    ignore.step()
    assert torch.isnan(p).any()  # documented: "ignore" lets a NaN in, as torch.optim does


def test_closure_and_pyro_style_step_without_closure():
    p = torch.nn.Parameter(torch.ones(2))
    opt = VSGD([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 2.0
    assert p.detach().lt(1).all()


def test_foreach_and_fused_share_step_counts_and_state_keys():
    p = torch.nn.Parameter(torch.ones(5))
    for kwargs in IMPLS.values():
        opt = VSGD([p], **kwargs)
        p.grad = torch.ones(5)
        opt.step()
        assert set(opt.state[p]) == {"step", "mu", "b_g", "b_ghat"}


def test_no_c_compiler_falls_back_to_foreach():
    """With the CPU kernel disabled (as on a machine without a C compiler) the default path is
    the foreach one, and results agree with the reference."""
    code = textwrap.dedent(
        """
        import torch, probopt.optim.vsgd as v
        from probopt.optim._vsgd_cpu import cpu_kernel_available
        assert not cpu_kernel_available()
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        q = torch.nn.Parameter(p.detach().clone())
        a, b = v.VSGD([p]), v.VSGD([q], foreach=False)
        for _ in range(4):
            p.grad = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64); q.grad = p.grad.clone()
            a.step(); b.step()
        assert torch.allclose(p, q, rtol=1e-13, atol=0), (p, q)
        print("ok")
        """
    )
    env = dict(os.environ, PROBOPT_NO_CPU_KERNELS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cuda_fused_matches_reference(dtype, tol):
    ref, _ = _run(IMPLS["reference"], dtype=dtype, device="cuda", none_at=(3, 1))
    fused, opt = _run(IMPLS["fused"], dtype=dtype, device="cuda", none_at=(3, 1))
    for p, q in zip(ref, fused):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)


def test_triton_kernel_under_the_interpreter():
    """The CUDA kernel's arithmetic and address tables, run by Triton's CPU interpreter (needs
    the `triton` package; CI does not install it, GPU machines test the real thing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    code = textwrap.dedent(
        """
        import torch
        import probopt.optim._vsgd_triton as T
        from probopt.optim.vsgd import _single_tensor_vsgd
        kw = dict(lr=0.1, variance_ratio=30.0, prior_strength=1e-8, kappa1=0.81, kappa2=0.9,
                  eps=1e-8, weight_decay=0.01, maximize=True)
        out = []
        for fn in ("ref", "tri"):
            torch.manual_seed(0)
            ps = [torch.randn(s, dtype=torch.float64) for s in [(3000,), (5, 7), (1,)]]
            st = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
            steps = [torch.tensor(0.0) for _ in ps]
            g = torch.Generator().manual_seed(1)
            for _ in range(8):
                gr = [torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1 for p in ps]
                if fn == "ref":
                    _single_tensor_vsgd(ps, gr, *st, steps, None, None, **kw)
                else:
                    T.fused_vsgd(ps, gr, *st, steps, **kw)
            out.append(ps)
        err = max(float((a - b).abs().max()) for a, b in zip(*out))
        assert err < 1e-12, err
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_noisy_gradients_give_near_sign_steps_not_snr_scaled_ones():
    """A property of VSGD's step (docs/algorithms/vsgd.md, "Noisy gradients"): for i.i.d.
    gradients N(m, 1), σ_t² is the posterior variance of the *drift* of the true gradient, not
    the observation noise, so once μ_t has averaged the noise away the step μ/√(μ² + σ²) is close
    to sign(m), whereas Adam's m/√v scales with the signal-to-noise ratio. Measured over steps
    1000-1999 (lr 1, 5000 coordinates, float64): mean step 0.85 (VSGD) and 0.10 (Adam) at
    m = 0.1, 0.40 and 0.03 at m = 0.03, |step| < 0.005 at m = 0."""

    def mean_step(make, m):
        p = torch.nn.Parameter(torch.zeros(5000, dtype=torch.float64))
        opt, g, total = make(p), torch.Generator().manual_seed(0), 0.0
        for t in range(2000):
            before = p.detach().clone()
            p.grad = m + torch.randn(5000, generator=g, dtype=torch.float64)
            opt.step()
            if t >= 1000:
                total += float((before - p.detach()).mean())
        return total / 1000

    def vsgd(p):
        return VSGD([p], lr=1.0)

    def adam(p):
        return torch.optim.Adam([p], lr=1.0)

    assert mean_step(vsgd, 0.1) > 0.75 and abs(mean_step(adam, 0.1) - 0.1) < 0.02
    assert mean_step(vsgd, 0.03) > 0.3 and abs(mean_step(adam, 0.03) - 0.03) < 0.02
    assert abs(mean_step(vsgd, 0.0)) < 0.005
