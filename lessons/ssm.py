"""Selective state-space models (Mamba v1): the selective scan, the Mamba mixer, a gated RMSNorm.

Paper: A. Gu and T. Dao, *Mamba: Linear-Time Sequence Modeling with Selective State Spaces* (2023).

- Eq. 1, the continuous SSM: h'(t) = A h(t) + B x(t),  y(t) = C h(t).
- Eq. 4, zero-order-hold discretisation with step Δ: Ā = exp(ΔA). For B the official code (and
  this one) uses the Euler form B̄ = ΔB instead of (ΔA)⁻¹(exp(ΔA) − I)·ΔB (paper §3.5.2 notes it).
- Eq. 2a/2b, the recurrence: h_t = Ā_t ⊙ h_{t-1} + B̄_t x_t,  y_t = C_t · h_t  (+ D x_t, the skip).
- Algorithm 2 / Eq. 3, *selection*: B_t, C_t and Δ_t = softplus(Linear(x_t) + bias) depend on the
  input, so Ā_t and B̄_t change per token. A is diagonal per channel: A ∈ R^{D×N}, A = −exp(A_log).

:func:`selective_scan` has the signature and semantics of ``mamba_ssm``'s ``selective_scan_fn``
with three implementations behind ``impl=``:

- ``"ref"``: the recurrence as written, one step per token (any float dtype, float64 included; the
  backward is autograd over per-step views, so it is O(L), not the O(L²) of indexing ``x[:, t]``);
- ``"fast"``: a chunked pure-PyTorch scan for CPUs (and any device): per chunk of T tokens it
  discretises (exp(ΔA), ΔBu), runs the recurrence and contracts with C while the chunk is in cache,
  so no (batch, L, D, N) tensor ever exists; its custom backward recomputes each chunk from the
  saved chunk-start states and runs the adjoint recurrence backwards;
- ``"cuda"``: ``mamba_ssm``'s fused kernel, when it imports and the tensors are on CUDA.

``impl="auto"`` picks ``"cuda"`` when possible, else ``"fast"``.

Dimension glossary (``batch`` is spelled out so that B stays the SSM's input matrix):
    batch  batch size
    D      channels of the scan (Mamba's d_inner)
    L      sequence length (tokens)
    N      state size per channel (d_state)
    T      tokens per chunk of the fast scan
    R      rank of the Δ projection (dt_rank)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHUNK_ELEMENTS",
    "IMPLS",
    "INSTALL_HINT",
    "SCAN_SHAPES",
    "Mamba",
    "RMSNormGated",
    "available_impls",
    "compute_dtype",
    "default_chunk_size",
    "discretize_delta",
    "init_dt_bias",
    "mamba_ssm_available",
    "mamba_ssm_import_error",
    "resolve_impl",
    "rms_norm_gated",
    "s4d_real_A_log",
    "scan_fast_core",
    "scan_inputs",
    "scan_ref_core",
    "selective_scan",
    "selective_scan_fast",
    "selective_scan_ref",
]

IMPLS = ("auto", "ref", "fast", "cuda")

# Elements of one (T, batch, N, D) chunk buffer the fast scan aims for (at least 16 tokens):
# 2**18 float32 = 1 MiB, the L2 cache of one core of the reference machine (`--chunk-sizes`).
CHUNK_ELEMENTS = 2**18

INSTALL_HINT = ("build it for your GPU with `python -m reprod.install_mamba_ssm` "
                "(the lessons run without it on the pure-PyTorch scan)")


# ------------------------------------------------------------------------------------------------
# The fused kernel, when it is there
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mamba_ssm_import() -> tuple[Callable | None, str | None]:
    """(``mamba_ssm``'s ``selective_scan_fn``, None), or (None, why it does not import)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:   # only this import: a missing package, extension or symbol is an
        # ImportError, a broken CUDA or Triton install raises OSError, RuntimeError or others
        return None, f"{type(e).__name__}: {e}"
    return selective_scan_fn, None


def _mamba_ssm_scan() -> Callable | None:
    """``mamba_ssm``'s ``selective_scan_fn``, or None when it does not import."""
    return _mamba_ssm_import()[0]


def mamba_ssm_import_error() -> str | None:
    """Why ``mamba_ssm``'s fused kernel does not import here (its exception type and message),
    or None when it does."""
    return _mamba_ssm_import()[1]


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm``'s fused selective-scan kernel imports (it needs CUDA to run)."""
    return _mamba_ssm_scan() is not None


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """The scan implementations that can run on ``device`` here."""
    impls = ["ref", "fast"]
    if torch.device(device).type == "cuda" and mamba_ssm_available():
        impls.append("cuda")
    return impls


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` means for tensors on ``device`` (``auto``: fastest there)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown selective-scan impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "cuda" if device.type == "cuda" and mamba_ssm_available() else "fast"
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
        if not mamba_ssm_available():
            raise RuntimeError(f"impl='cuda' needs mamba_ssm, which does not import here: "
                               f"{INSTALL_HINT}")
    return impl


# ------------------------------------------------------------------------------------------------
# Shared pre- and post-processing
# ------------------------------------------------------------------------------------------------

def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Clear errors for shapes, dtypes and devices ``selective_scan_fn`` would reject."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported: Mamba v1 vision models use a real A")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D={dim}, got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.shape != (batch, n, length):
            raise ValueError(
                f"{name} must be (batch, N, L) = ({batch}, {n}, {length}), got "
                f"{tuple(m.shape)} (time-invariant (D, N) and grouped (batch, G, N, L) forms are "
                f"not supported)")
    for name, v, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)),
                           ("z", z, tuple(u.shape))):
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(v.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(not t.is_floating_point() for t in tensors):
        raise TypeError("selective_scan takes floating-point tensors only, got "
                        f"{[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {[t.device for t in tensors]}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def discretize_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None,
                     delta_softplus: bool) -> torch.Tensor:
    """Δ = softplus(delta + delta_bias) (Algorithm 2: τ_Δ = softplus)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(delta.dtype)       # (batch, D, L)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z, out_dtype):
    """y + D ⊙ u, then the optional gate ⊙ silu(z); cast to the input dtype."""
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)                         # (batch, D, L)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# ------------------------------------------------------------------------------------------------
# The reference: the recurrence as written
# ------------------------------------------------------------------------------------------------

def scan_ref_core(u, delta, A, B, C):
    """y_t = C_t · h_t with h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t (Eq. 2a/2b, 4), step by step.

    u, delta: (batch, D, L); A: (D, N); B, C: (batch, N, L), all in one dtype. Returns y
    (batch, D, L) and the last state h_L (batch, D, N). Loops over ``unbind`` views: indexing
    ``x[:, :, t]`` inside the loop would make autograd's backward O(L²).
    """
    batch, dim, _ = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])                            # (batch, D, N)
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1),
                                      strict=True):
        A_bar = torch.exp(delta_t[:, :, None] * A)                     # (batch, D, N)  Eq. 4
        B_bar_u = delta_t[:, :, None] * B_t[:, None, :] * u_t[:, :, None]   # (batch, D, N)
        h = A_bar * h + B_bar_u                                        # Eq. 2a
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))                  # Eq. 2b: (batch, D)
    return torch.stack(ys, dim=-1), h                                  # (batch, D, L)


# ------------------------------------------------------------------------------------------------
# The fast chunked scan (CPU)
# ------------------------------------------------------------------------------------------------
# Layout inside the fast scan: time first and the state before the channels, (T, batch, N, D), so
# that one step is one contiguous (batch, N, D) block, the C contraction is a batched
# (1 × N) @ (N × D) matrix product, and the gradient reductions run over contiguous D.

def default_chunk_size(batch: int, dim: int, n: int) -> int:
    """Tokens per chunk so that one (T, batch, N, D) buffer holds about CHUNK_ELEMENTS values."""
    return max(16, min(256, CHUNK_ELEMENTS // max(1, batch * dim * n)))


def _discretize_chunk(delta_c, u_c, B_c, A_t, out_dA, out_x):
    """Ā = exp(ΔA) and B̄u = Δ u B for one chunk, written into the given buffers.

    delta_c, u_c: (T, batch, D); B_c: (T, batch, N); A_t: (N, D); out_*: (T, batch, N, D).
    """
    torch.mul(delta_c[:, :, None, :], A_t, out=out_dA).exp_()          # (T, batch, N, D)
    torch.mul((delta_c * u_c)[:, :, None, :], B_c[:, :, :, None], out=out_x)


def _recur_chunk(dA, x, h0):
    """h_t = Ā_t ⊙ h_{t-1} + B̄_t u_t over one chunk, in place: x becomes the states H.

    One fused multiply-add per token on a (batch, N, D) block; returns the last state (a view).
    """
    h = h0
    for a_t, x_t in zip(dA.unbind(0), x.unbind(0), strict=True):
        h = x_t.addcmul_(a_t, h)
    return h


def _recur_chunk_backward(dA, g, carry):
    """The adjoint recurrence over one chunk, in place: g_t += Ā_{t+1} ⊙ g_{t+1} (t descending).

    g holds ∂loss/∂h_t from the outputs (C_t ⊗ ∂y_t) on entry and the full ∂loss/∂h_t on exit;
    ``carry`` is Ā_{t1} ⊙ g_{t1} from the chunk after this one. Returns this chunk's carry.
    """
    g_t, a_t = g.unbind(0), dA.unbind(0)
    g_t[-1].add_(carry)
    for t in range(len(g_t) - 2, -1, -1):
        g_t[t].addcmul_(a_t[t + 1], g_t[t + 1])
    return a_t[0] * g_t[0]


class _ChunkedScan(torch.autograd.Function):
    """The core scan y = C · h (no skip, no gate) with a chunk-recomputing backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        # u, delta: (batch, D, L); A: (D, N); B, C: (batch, N, L)
        # -> y (batch, D, L), h_L (batch, D, N)
        batch, dim, length = u.shape
        n = A.shape[1]
        u_l, delta_l = u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous()
        B_l, C_l = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()  # (L, batch, N)
        A_t = A.t().contiguous()                                                   # (N, D)
        y = u.new_empty(length, batch, dim)                                        # (L, batch, D)
        dA = u.new_empty(chunk, batch, n, dim)
        x = u.new_empty(chunk, batch, n, dim)
        starts = u.new_empty((length + chunk - 1) // chunk, batch, n, dim)   # h at chunk starts
        h = u.new_zeros(batch, n, dim)
        for k, t0 in enumerate(range(0, length, chunk)):
            t1 = min(t0 + chunk, length)
            T = t1 - t0
            starts[k] = h                       # copied: h is a view into x, overwritten next
            _discretize_chunk(delta_l[t0:t1], u_l[t0:t1], B_l[t0:t1], A_t, dA[:T], x[:T])
            h = _recur_chunk(dA[:T], x[:T], starts[k])
            torch.bmm(C_l[t0:t1].reshape(T * batch, 1, n), x[:T].view(T * batch, n, dim),
                      out=y[t0:t1].view(T * batch, 1, dim))                        # Eq. 2b
        ctx.save_for_backward(u_l, delta_l, A_t, B_l, C_l, starts)
        ctx.chunk = chunk
        return y.permute(1, 2, 0).contiguous(), h.transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last):
        u_l, delta_l, A_t, B_l, C_l, starts = ctx.saved_tensors
        chunk = ctx.chunk
        length, batch, dim = u_l.shape
        n = A_t.shape[0]
        gy = grad_y.permute(2, 0, 1).contiguous()                                   # (L, batch, D)
        du, ddelta = torch.empty_like(u_l), torch.empty_like(delta_l)
        dB, dC = torch.empty_like(B_l), torch.empty_like(C_l)
        dA_t = torch.zeros_like(A_t)                                                # (N, D)
        dA = u_l.new_empty(chunk, batch, n, dim)
        x = u_l.new_empty(chunk, batch, n, dim)
        g = u_l.new_empty(chunk, batch, n, dim)
        carry = (grad_last.transpose(1, 2) if grad_last is not None
                 else u_l.new_zeros(batch, n, dim))                                 # (batch, N, D)
        for k in range(len(starts) - 1, -1, -1):
            t0, t1 = k * chunk, min((k + 1) * chunk, length)
            T, TB = t1 - t0, (t1 - t0) * batch
            d_c, u_c, B_c, C_c, gy_c = (t[t0:t1] for t in (delta_l, u_l, B_l, C_l, gy))
            a, H, G = dA[:T], x[:T], g[:T]
            # recompute the chunk's states H from its start state
            _discretize_chunk(d_c, u_c, B_c, A_t, a, H)
            _recur_chunk(a, H, starts[k])
            # ∂L/∂C_t = H_t · ∂y_t
            torch.bmm(H.view(TB, n, dim), gy_c.reshape(TB, dim, 1), out=dC[t0:t1].view(TB, n, 1))
            # ∂L/∂h_t: C_t ⊗ ∂y_t, then the adjoint recurrence
            torch.mul(C_c[:, :, :, None], gy_c[:, :, None, :], out=G)
            carry = _recur_chunk_backward(a, G, carry)
            # through B̄u = Δ u B: w = Σ_n G B, ∂u = w Δ, ∂Δ = w u, ∂B = Σ_d G Δu
            w = torch.bmm(B_c.reshape(TB, 1, n), G.view(TB, n, dim)).view(T, batch, dim)
            torch.mul(w, d_c, out=du[t0:t1])
            torch.mul(w, u_c, out=ddelta[t0:t1])
            torch.bmm(G.view(TB, n, dim), (d_c * u_c).reshape(TB, dim, 1),
                      out=dB[t0:t1].view(TB, n, 1))
            # through Ā = exp(ΔA): M = G_t ⊙ h_{t-1} ⊙ Ā_t = ∂L/∂(ΔA)
            M = G.mul_(a)
            M[1:].mul_(H[:-1])
            M[0].mul_(starts[k])
            ddelta[t0:t1] += torch.mul(M, A_t).sum(2)                               # Σ_n M A
            dA_t += M.mul_(d_c[:, :, None, :]).sum((0, 1))                          # Σ_t,b M Δ
        grads = (du.permute(1, 2, 0), ddelta.permute(1, 2, 0), dA_t.t(),
                 dB.permute(1, 2, 0), dC.permute(1, 2, 0))
        needs = ctx.needs_input_grad[:5]
        return (*(gr if need else None for gr, need in zip(grads, needs, strict=True)), None)


def scan_fast_core(u, delta, A, B, C, chunk_size: int | None = None):
    """The chunked scan: the same (y, h_L) as :func:`scan_ref_core`, about 10× faster on a CPU."""
    batch, dim, _ = u.shape
    chunk = chunk_size or default_chunk_size(batch, dim, A.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedScan.apply(u, delta, A, B, C, chunk)


# ------------------------------------------------------------------------------------------------
# The public scan
# ------------------------------------------------------------------------------------------------

def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, impl: str = "auto",
                   chunk_size: int | None = None):
    """The selective scan of Mamba v1 (Algorithm 2), as ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u: (batch, D, L) input x. delta: (batch, D, L) pre-activation of the step Δ.
        A: (D, N) real state matrix (negative: A = −exp(A_log)).
        B, C: (batch, N, L) input-dependent input and output matrices.
        D: optional (D,) skip. z: optional (batch, D, L) gate, y ⊙ silu(z).
        delta_bias: optional (D,) added to delta before the softplus.
        delta_softplus: Δ = softplus(delta + delta_bias).
        return_last_state: also return h_L, (batch, D, N).
        impl: ``"auto"`` | ``"ref"`` | ``"fast"`` | ``"cuda"`` (see the module docstring).
        chunk_size: tokens per chunk of the fast scan (default: about 1 MiB per buffer).

    Returns:
        y (batch, D, L) in u's dtype, and h_L in the compute dtype when ``return_last_state``.
        Float16/bfloat16 inputs are computed in float32, float64 in float64 (``"cuda"``: as
        ``mamba_ssm`` does, float32 inside).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    impl = resolve_impl(impl, u.device)
    if impl == "cuda":
        return _mamba_ssm_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state)
    ct = compute_dtype(u.dtype)
    u_c, A_c, B_c, C_c = (t.to(ct) for t in (u, A, B, C))
    delta_c = discretize_delta(delta.to(ct), delta_bias, delta_softplus)
    if impl == "ref":
        y, last = scan_ref_core(u_c, delta_c, A_c, B_c, C_c)
    else:
        y, last = scan_fast_core(u_c, delta_c, A_c, B_c, C_c, chunk_size)
    out = _skip_and_gate(y, u_c, D, z, u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """:func:`selective_scan` with ``impl="ref"``: the recurrence, step by step."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                          impl="ref")


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, chunk_size=None):
    """:func:`selective_scan` with ``impl="fast"``: the chunked pure-PyTorch scan."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                          impl="fast", chunk_size=chunk_size)


SCAN_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "issue": (2, 512, 2048, 16),
    "mvfuser_toy": (16, 96, 262, 16),
    "mvfuser_full": (2, 512, 2050, 16),
}
"""(batch, D, L, N) of the scans the course times: a long scan, one toy MVFuser (96 channels over
the toy VFM + VLM tokens) and one real-scale MVFuser (512 channels over ~2,050 tokens)."""


def scan_inputs(batch: int, dim: int, length: int, n: int, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs of :func:`selective_scan` in the ranges a trained Mamba sees, and an upstream
    gradient: u (B, D, L), Δ = softplus(· − 2) around 0.1, A = −exp(·) in −1 .. −20 (D, N),
    B and C (B, N, L), D (D,), grad (B, D, L)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g, dtype=dtype),
        "delta": F.softplus(torch.randn(batch, dim, length, generator=g, dtype=dtype) - 2.0),
        "A": -torch.exp(torch.rand(dim, n, generator=g, dtype=dtype) * 3.0),   # -1 .. -20
        "B": torch.randn(batch, n, length, generator=g, dtype=dtype),
        "C": torch.randn(batch, n, length, generator=g, dtype=dtype),
        "D": torch.randn(dim, generator=g, dtype=dtype),
        "grad": torch.randn(batch, dim, length, generator=g, dtype=dtype),
    }


# ------------------------------------------------------------------------------------------------
# Gated RMSNorm (mamba_ssm's RMSNormGated)
# ------------------------------------------------------------------------------------------------

def rms_norm_gated(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None,
                   eps: float = 1e-5, group_size: int | None = None,
                   norm_before_gate: bool = True) -> torch.Tensor:
    """RMSNorm(x) ⊙ weight, gated by silu(z) after (``norm_before_gate``) or before the norm.

    x, z: (..., C); weight: (C,); ``group_size`` normalises groups of that many channels
    separately. Computed in float32 (float64 stays), returned in x's dtype.
    """
    ct = compute_dtype(x.dtype)
    h = x.to(ct)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(ct))
    channels = h.shape[-1]
    group = group_size or channels
    if channels % group:
        raise ValueError(f"group_size {group} does not divide the {channels} channels")
    hg = h.unflatten(-1, (channels // group, group))                   # (..., G, C/G)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    out = hg.flatten(-2) * weight.to(ct)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(ct))
    return out.to(x.dtype)


class RMSNormGated(nn.Module):
    """Gated RMSNorm; its state dict (``weight``, no bias) loads from mamba_ssm's RMSNormGated."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


# ------------------------------------------------------------------------------------------------
# The Mamba v1 mixer
# ------------------------------------------------------------------------------------------------

def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Δ's bias = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max] (Mamba §3.6, App. E)."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))                  # softplus(bias) == dt


def s4d_real_A_log(d_inner: int, d_state: int, device=None) -> torch.Tensor:
    """A_log with A = −(1, 2, ..., N) in every channel: the S4D-Real initialisation."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
    return torch.log(A).repeat(d_inner, 1)                             # (D, N)


class Mamba(nn.Module):
    """The Mamba v1 block's mixer (Fig. 3): in_proj → causal depthwise conv → SiLU → selective SSM,
    gated by silu(z) → out_proj.

    Parameter names and shapes equal ``mamba_ssm.Mamba``'s, so its state dicts load strictly:
    ``in_proj`` (2D, d_model), ``conv1d`` (D, 1, d_conv), ``x_proj`` (R + 2N, D), ``dt_proj``
    (D, R) with bias, ``A_log`` (D, N), ``D`` (D,), ``out_proj`` (d_model, D); D = expand·d_model.
    Initialisation as the official code: PyTorch defaults for the linear and conv layers, dt_proj
    weight uniform ±R^-0.5·dt_scale (or constant), Δ bias = softplus⁻¹(log-uniform dt), S4D-Real
    A_log, D = 1. As there, dt_proj's bias is added inside the scan (``delta_bias``), not by the
    linear layer.

    Shapes: forward takes (batch, L, d_model) and returns (batch, L, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, scan_impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if scan_impl not in IMPLS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; choose one of {IMPLS}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
        init_dt_bias(self.dt_proj.bias, dt_min, dt_max, dt_init_floor)
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(s4d_real_A_log(self.d_inner, d_state, device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def ssm_inputs(self, x: torch.Tensor):
        """Δ (pre-bias), B, C from the conv output x (batch, D, L) — the selection of Alg. 2."""
        x_dbl = self.x_proj(x.transpose(1, 2))                          # (batch, L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                      # (batch, L, D), no bias
        return delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects (batch, L, {self.d_model}), got "
                             f"{tuple(hidden_states.shape)}")
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)                # (batch, 2D, L)
        x, z = xz.chunk(2, dim=1)                                      # (batch, D, L) each
        x = self.act(self.conv1d(x)[..., :length])                     # causal: drop the tail
        delta, B, C = self.ssm_inputs(x)                               # (batch, D|N, L)
        A = -torch.exp(self.A_log.float())                             # (D, N)
        y = selective_scan(x, delta, A, B, C, self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           impl=self.scan_impl)                        # (batch, D, L)
        return self.out_proj(y.transpose(1, 2))                        # (batch, L, d_model)
