"""lessons.ssm: the selective scan's three paths, the Mamba mixer, the gated RMSNorm.

Tolerances (against the float64 reference, on inputs in a trained Mamba's range):
- float64 fast vs float64 reference: 1e-10 (the same arithmetic in another order);
- float32 fast: forward 1e-4 absolute, gradients 1e-4 relative to their largest magnitude;
- bfloat16 inputs (computed in float32 inside): 3e-2 relative — the error is the input rounding.
The fused CUDA kernel itself differs from mamba_ssm's own reference by up to ~3e-2 absolute in
float32 at L=8192 (research note); the ``gpu`` tests use that bound.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lessons import ssm
from lessons.ssm import (
    Mamba,
    RMSNormGated,
    rms_norm_gated,
    scan_inputs,
    selective_scan,
    selective_scan_fast,
    selective_scan_ref,
)
from reprod.course.bench_scan import mambapy_scan, to_mambapy_layout

KW = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def full_inputs(batch=2, dim=6, length=37, n=4, dtype=torch.float64, seed=0):
    """Every argument of the scan, in a trained Mamba's range, as leaves that need grads."""
    x = scan_inputs(batch, dim, length, n, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x["z"] = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    x["delta_bias"] = 0.1 * torch.randn(dim, generator=g, dtype=dtype)
    x["delta"] = x["delta"] - 1.0              # pre-softplus values
    return {k: x[k].clone().requires_grad_() for k in KW}, x["grad"]


def run(x, grad, impl, chunk_size=None, last_weight=None):
    """Outputs, last state and the gradients of <y, grad> + <h_L, last_weight>."""
    kwargs = {"chunk_size": chunk_size} if impl == "fast" else {}
    y, last = selective_scan(*(x[k] for k in KW), delta_softplus=True, return_last_state=True,
                             impl=impl, **kwargs)
    loss = (y * grad).sum()
    if last_weight is not None:
        loss = loss + (last * last_weight).sum()
    grads = torch.autograd.grad(loss, [x[k] for k in KW])
    return y, last, dict(zip(KW, grads, strict=True))


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------

def test_reference_on_a_hand_computed_case():
    # one channel, one state: h1 = Δ1 B1 u1; h2 = exp(Δ2 A) h1 + Δ2 B2 u2; y = C h + D u
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    A = torch.tensor([[-2.0]], dtype=torch.float64)
    B = torch.tensor([[[3.0, -1.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 4.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    h1 = 0.5 * 3.0 * 1.0
    h2 = math.exp(0.25 * -2.0) * h1 + 0.25 * -1.0 * 2.0
    want = torch.tensor([[[2.0 * h1 + 0.5, 4.0 * h2 + 1.0]]], dtype=torch.float64)
    for impl in ("ref", "fast"):
        y, last = selective_scan(u, delta, A, B, C, D, return_last_state=True, impl=impl)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(last, torch.tensor([[[h2]]], dtype=torch.float64))


def test_reference_keeps_float64_and_matches_mambapy_sequential():
    """Against an independent implementation: mambapy's sequential selective scan."""
    from mambapy.mamba import MambaBlock

    x = scan_inputs(2, 5, 19, 3, dtype=torch.float64)
    y = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    assert y.dtype == torch.float64
    xp = to_mambapy_layout(x)
    block = SimpleNamespace(config=SimpleNamespace(d_inner=5, d_state=3))   # all it reads
    peer = MambaBlock.selective_scan_seq(block, xp["u"], xp["delta"], xp["A"], xp["B"], xp["C"],
                                         xp["D"])
    torch.testing.assert_close(y, peer.transpose(1, 2), rtol=0, atol=1e-10)


def test_fast_matches_mambapy_pscan_in_float32():
    x = scan_inputs(2, 16, 100, 8)
    y = selective_scan_fast(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    peer = mambapy_scan(to_mambapy_layout(x)).transpose(1, 2)
    torch.testing.assert_close(y, peer, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The fast scan against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 37, 100])
def test_fast_equals_reference_in_float64(chunk_size):
    x, grad = full_inputs()
    w = torch.randn(2, 6, 4, dtype=torch.float64)
    y_r, last_r, g_r = run(x, grad, "ref", last_weight=w)
    y_f, last_f, g_f = run(x, grad, "fast", chunk_size, last_weight=w)
    torch.testing.assert_close(y_f, y_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(last_f, last_r, rtol=0, atol=1e-10)
    for k in KW:
        torch.testing.assert_close(g_f[k], g_r[k], rtol=0, atol=1e-10, msg=k)


def test_fast_gradcheck():
    x, _ = full_inputs(batch=1, dim=3, length=7, n=2)
    fn = lambda *a: selective_scan(*a, delta_softplus=True, return_last_state=True,  # noqa: E731
                                   impl="fast", chunk_size=3)
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in KW))


def test_fast_float32_within_tolerance_of_float64_reference():
    x64, grad = full_inputs(batch=2, dim=32, length=512, n=16, seed=3)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    y_r, _, g_r = run(x64, grad, "ref")
    y_f, last_f, g_f = run(x32, grad.float(), "fast")
    assert y_f.dtype == last_f.dtype == torch.float32
    assert (y_f.double() - y_r).abs().max() < 1e-4
    for k in KW:
        assert max_rel(g_f[k].double(), g_r[k]) < 1e-4, k


def test_bfloat16_inputs_run_in_float32_and_return_bfloat16():
    x64, _ = full_inputs(batch=2, dim=16, length=64, n=8, seed=4)
    xb = {k: v.detach().to(torch.bfloat16) for k, v in x64.items()}
    y_r = selective_scan_ref(*(xb[k].double() for k in KW), delta_softplus=True)
    for impl in ("ref", "fast"):
        y, last = selective_scan(*(xb[k] for k in KW), delta_softplus=True,
                                 return_last_state=True, impl=impl)
        assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
        assert max_rel(y.double(), y_r) < 3e-2


def test_fast_scan_without_optional_terms_and_without_grads():
    x = scan_inputs(1, 4, 10, 2)
    y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    y_r = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])
    torch.testing.assert_close(y, y_r, rtol=0, atol=1e-5)
    u = x["u"].clone().requires_grad_()         # only u needs a gradient
    (gu,) = torch.autograd.grad(selective_scan(u, x["delta"], x["A"], x["B"], x["C"]).sum(), [u])
    u_r = x["u"].clone().requires_grad_()
    (gu_r,) = torch.autograd.grad(selective_scan_ref(u_r, x["delta"], x["A"], x["B"],
                                                     x["C"]).sum(), [u_r])
    torch.testing.assert_close(gu, gu_r, rtol=0, atol=1e-5)


def test_default_chunk_size_targets_a_cache_sized_buffer():
    assert ssm.default_chunk_size(2, 512, 16) == 16              # 2**18 / (2·512·16)
    assert ssm.default_chunk_size(1, 8, 4) == 256                # capped
    assert ssm.default_chunk_size(64, 1024, 16) == 16            # floor: 16 tokens


# ------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ------------------------------------------------------------------------------------------------

def test_auto_picks_fast_on_cpu_and_cuda_is_refused_there():
    assert ssm.resolve_impl("auto", torch.device("cpu")) == "fast"
    assert "cuda" not in ssm.available_impls("cpu")
    x = scan_inputs(1, 2, 3, 2)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="CUDA tensors"):
        selective_scan(*args, impl="cuda")
    with pytest.raises(ValueError, match="unknown selective-scan impl"):
        selective_scan(*args, impl="pscan")


@pytest.mark.parametrize(("change", "message"), [
    (lambda x: x.update(u=x["u"][0]), r"u must be \(batch, D, L\)"),
    (lambda x: x.update(delta=x["delta"][..., :-1]), "delta must have u's shape"),
    (lambda x: x.update(A=x["A"][:-1]), r"A must be \(D, N\)"),
    (lambda x: x.update(A=x["A"].to(torch.complex64)), "complex A"),
    (lambda x: x.update(B=x["B"][:, None]), r"B must be \(batch, N, L\)"),
    (lambda x: x.update(C=x["C"][0, :, 0]), r"C must be \(batch, N, L\)"),
    (lambda x: x.update(D=x["D"][:-1]), "D must have shape"),
    (lambda x: x.update(z=x["z"][:, :-1]), "z must have shape"),
    (lambda x: x.update(delta_bias=x["delta_bias"][None]), "delta_bias must have shape"),
])
def test_bad_input_is_a_clear_error(change, message):
    x, _ = full_inputs(batch=1, dim=3, length=5, n=2)
    x = {k: v.detach() for k, v in x.items()}
    change(x)
    with pytest.raises(ValueError, match=message):
        selective_scan(*(x[k] for k in KW))


def test_integer_inputs_are_refused():
    x = scan_inputs(1, 2, 3, 2)
    with pytest.raises(TypeError, match="floating-point"):
        selective_scan(x["u"].long(), x["delta"], x["A"], x["B"], x["C"])


# ------------------------------------------------------------------------------------------------
# Gated RMSNorm
# ------------------------------------------------------------------------------------------------

def test_rms_norm_gated_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    x, z, w = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g), torch.rand(8)
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)  # noqa: E731
    torch.testing.assert_close(rms_norm_gated(x, w, z), rms(x) * w * F.silu(z))
    torch.testing.assert_close(rms_norm_gated(x, w, z, norm_before_gate=False),
                               rms(x * F.silu(z)) * w)
    torch.testing.assert_close(rms_norm_gated(x, w), rms(x) * w)
    grouped = rms_norm_gated(x, w, z, group_size=4)
    want = torch.cat([rms(x[..., :4]), rms(x[..., 4:])], -1) * w * F.silu(z)
    torch.testing.assert_close(grouped, want)
    with pytest.raises(ValueError, match="does not divide"):
        rms_norm_gated(x, w, group_size=3)


def test_rms_norm_gated_module_state_dict_and_dtype():
    norm = RMSNormGated(8)
    assert list(norm.state_dict()) == ["weight"] and norm.bias is None
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert norm(x, x).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# The Mamba mixer
# ------------------------------------------------------------------------------------------------

def mamba_ssm_shapes(d_model, d_state=16, d_conv=4, expand=2):
    """mamba_ssm.Mamba's state-dict keys and shapes (bias=False, conv_bias=True)."""
    d_inner, rank = expand * d_model, math.ceil(d_model / 16)
    return {"A_log": (d_inner, d_state), "D": (d_inner,),
            "in_proj.weight": (2 * d_inner, d_model), "conv1d.weight": (d_inner, 1, d_conv),
            "conv1d.bias": (d_inner,), "x_proj.weight": (rank + 2 * d_state, d_inner),
            "dt_proj.weight": (d_inner, rank), "dt_proj.bias": (d_inner,),
            "out_proj.weight": (d_model, d_inner)}


def test_mamba_state_dict_is_mamba_ssm_s_and_counts_at_scale():
    with torch.device("meta"):
        m = Mamba(1024)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == mamba_ssm_shapes(1024)
    # in_proj 4,194,304 + conv 10,240 + x_proj 196,608 + dt_proj 133,120 + A_log 32,768
    # + D 2,048 + out_proj 2,097,152
    assert sum(p.numel() for p in m.parameters()) == 6_666_240


def test_mamba_official_initialisation():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.max() / dt.min() > 10                      # log-uniform over the range
    torch.testing.assert_close(m.A_log.exp(), torch.arange(1.0, 9.0).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    assert torch.equal(Mamba(64, dt_init="constant").dt_proj.weight,
                       torch.full((128, 4), 4**-0.5))


def test_mamba_matches_mambapy_block_with_the_same_weights():
    """An independent implementation with the official parameter names loads our weights."""
    from mambapy.mamba import MambaBlock, MambaConfig

    torch.manual_seed(0)
    ours = Mamba(32, d_state=8, d_conv=4, expand=2).double()
    peer = MambaBlock(MambaConfig(d_model=32, n_layers=1, d_state=8, d_conv=4,
                                  expand_factor=2, pscan=False)).double()
    peer.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-10)


def test_mamba_is_causal_and_paths_agree():
    torch.manual_seed(0)
    m = Mamba(16, d_state=4).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    (g,) = torch.autograd.grad(y[0, 9].sum(), [x])
    assert g[0, 10:].abs().max() == 0 and g[0, :10].abs().max() > 0
    m_ref = Mamba(16, d_state=4, scan_impl="ref").double()
    m_ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m_ref(x), y, rtol=0, atol=1e-10)


def test_mamba_bad_input():
    with pytest.raises(ValueError, match=r"expects \(batch, L, 16\)"):
        Mamba(16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="uniform")
    with pytest.raises(ValueError, match="scan_impl"):
        Mamba(16, scan_impl="triton")


# ------------------------------------------------------------------------------------------------
# GPU: every path against mamba_ssm's fused kernel
# ------------------------------------------------------------------------------------------------

def _need_mamba_ssm():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not ssm.mamba_ssm_available():
        pytest.skip("needs mamba_ssm: python -m reprod.install_mamba_ssm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["ref", "fast", "auto"])
def test_gpu_paths_agree_with_selective_scan_fn(impl, dtype):
    _need_mamba_ssm()
    x64, grad = full_inputs(batch=2, dim=64, length=1024, n=16, seed=5)
    xc = {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in x64.items()}
    xk = {k: v.detach().clone().requires_grad_() for k, v in xc.items()}
    grad = grad.to("cuda", dtype)
    y, last, g = run(xc, grad, impl)
    y_k, last_k, g_k = run(xk, grad, "cuda")
    tol = 3e-2 if dtype == torch.float32 else 1e-1
    assert max_rel(y.double(), y_k.double()) < tol
    assert max_rel(last.double(), last_k.double()) < tol
    for k in KW:
        assert max_rel(g[k].double(), g_k[k].double()) < tol, k


@pytest.mark.gpu
def test_gpu_mamba_loads_a_mamba_ssm_state_dict():
    _need_mamba_ssm()
    from mamba_ssm import Mamba as OfficialMamba

    torch.manual_seed(0)
    official = OfficialMamba(d_model=256, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(256, d_state=16, d_conv=4, expand=2).cuda()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 512, 256, device="cuda")
    with torch.no_grad():
        want = official(x)
        for impl in ("cuda", "fast"):
            ours.scan_impl = impl
            assert max_rel(ours(x).double(), want.double()) < 3e-2, impl
