"""Checks of lesson 06's exercises (Mamba from scratch): see ``lessons.exercises``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lessons.exercises import exercise, expect, expect_keys, expect_number
from lessons.ssm import SCAN_SHAPES, Mamba, default_chunk_size

__all__ = ["bidirectional", "chunk_length", "log_space"]

DTYPES = ("float32", "float64")
CHUNKS = (4, 8, 16, 32, 64, 128, 256)
SHAPES = ("mvfuser_toy", "longer")
DELTA, A, LENGTH = 0.1, -4.0, 2000            # exercise 2's channel and sequence


def _two_scans(module: nn.Module, kind: type) -> tuple[nn.Module, nn.Module]:
    """The two ``kind`` submodules of ``module`` (itself left out), in registration order."""
    inner = [m for m in module.modules() if isinstance(m, kind) and m is not module]
    expect(len(inner) == 2, f"your mixer should hold two {kind.__name__}s (one per direction); "
                            f"it holds {len(inner)}.")
    return inner[0], inner[1]


def _is_bidirectional_sum(module: nn.Module, first: nn.Module, second: nn.Module,
                          x: torch.Tensor) -> bool:
    """``module(x)`` is ``m1(x) + m2(x.flip(1)).flip(1)`` for one of the two assignments."""
    with torch.no_grad():
        y = module(x)
        expect(isinstance(y, torch.Tensor) and y.shape == x.shape,
               "the mixer should return a tensor of its input's shape (batch, L, d_model).")
        forms = [a(x) + b(x.flip(1)).flip(1) for a, b in ((first, second), (second, first))]
    return any(torch.allclose(y, f, atol=1e-10) for f in forms)


@exercise("06", 1,
          BidirectionalMamba="your nn.Module class: BidirectionalMamba(d_model, **kwargs) holds "
                             "two Mamba(d_model, **kwargs) and forward(x) returns "
                             "m1(x) + m2(x.flip(1)).flip(1) for x (batch, L, d_model)",
          bidirectional_map="its (L, L) influence map: influence(mixer, tokens) with the setup's "
                            "influence, in float64 as in section 5 (e.g. d_model 8, L 24)",
          bidirectional_param_ratio="parameters of BidirectionalMamba(8, d_state=4) divided by "
                                    "those of Mamba(8, d_state=4)")
def bidirectional(BidirectionalMamba, bidirectional_map, bidirectional_param_ratio):
    expect(isinstance(BidirectionalMamba, type) and issubclass(BidirectionalMamba, nn.Module),
           "`BidirectionalMamba` should be a class (an nn.Module subclass), not an instance.")
    with torch.random.fork_rng(devices=[]):                 # leave the notebook's RNG alone
        torch.manual_seed(0)
        mixer = BidirectionalMamba(8, d_state=4).double().eval()
        x = torch.randn(1, 12, 8, dtype=torch.float64)
    first, second = _two_scans(mixer, Mamba)
    expect(_is_bidirectional_sum(mixer, first, second, x),
           "the output is not m1(x) + m2(x.flip(1)).flip(1): flip the sequence (dim 1) before the "
           "second Mamba and flip its output back.")
    m = torch.as_tensor(bidirectional_map)
    expect(m.ndim == 2 and m.shape[0] == m.shape[1] and m.shape[0] >= 4,
           "`bidirectional_map` should be a square (L, L) map from `influence`.")
    expect(bool((m > 0).all()), "some (i, j) of `bidirectional_map` show no influence: is it "
                                "the bidirectional mixer's map?")
    ratio = expect_number(bidirectional_param_ratio, "`bidirectional_param_ratio`", 0)
    count = sum(p.numel() for p in mixer.parameters())
    with torch.device("meta"):
        one = sum(p.numel() for p in Mamba(8, d_state=4).parameters())
    expect(abs(ratio - count / one) < 1e-6, "`bidirectional_param_ratio` does not agree with "
                                            "your class's parameter count.")
    return ("your mixer adds a forward and a flipped scan, every output sees every input, and "
            "its cost in parameters is counted.")


def _recurrence(x: torch.Tensor, delta: torch.Tensor, a: float, b: float) -> torch.Tensor:
    h, hs = torch.zeros((), dtype=torch.float64), []
    for x_t, d_t in zip(x.double(), delta.double(), strict=True):
        h = torch.exp(d_t * a) * h + d_t * b * x_t
        hs.append(h)
    return torch.stack(hs)


def _first_nonfinite(h: torch.Tensor):
    bad = (~torch.isfinite(h)).nonzero()
    return bad[0].item() if len(bad) else None


@exercise("06", 2,
          scan_closed_form="your function (x, delta, a, b) -> h: x and delta 1-D tensors of "
                           "length L, a and b numbers; h_t = e^{S_t} Σ_{s≤t} e^{-S_s} Δ_s b x_s "
                           "with S_t = Σ_{r≤t} Δ_r a, computed in x's dtype",
          first_nonfinite="{'float32': t, 'float64': t}: the first token index (0-based) where "
                          "the closed form gives a non-finite h_t, at Δ = 0.1, A = -4, b = 1 "
                          "over 2,000 tokens",
          closed_form_error="{'float32': e, 'float64': e}: the largest |closed form - scan_loop| "
                            "over the tokens before that failure")
def log_space(scan_closed_form, first_nonfinite, closed_form_error):
    expect(callable(scan_closed_form), "`scan_closed_form` should be a function.")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, generator=g, dtype=torch.float64)
    delta = torch.full((40,), DELTA, dtype=torch.float64)
    h = torch.as_tensor(scan_closed_form(x, delta, A, 1.0))
    expect(h.shape == x.shape, "`scan_closed_form` should return one h_t per token (shape (L,)).")
    expect(torch.allclose(h.double(), _recurrence(x, delta, A, 1.0), rtol=1e-8, atol=1e-10),
           "`scan_closed_form` does not match the recurrence on a short float64 sequence.")
    expect_keys(first_nonfinite, DTYPES, "first_nonfinite")
    expect_keys(closed_form_error, DTYPES, "closed_form_error")
    x = torch.randn(LENGTH, generator=g, dtype=torch.float64)
    for name in DTYPES:
        dtype = getattr(torch, name)
        theirs = _first_nonfinite(torch.as_tensor(scan_closed_form(
            x.to(dtype), torch.full((LENGTH,), DELTA, dtype=dtype), A, 1.0)))
        expect(theirs is not None, f"your function stays finite over {LENGTH} tokens in {name}: "
                                   "it should be the two-cumsum closed form, not a loop.")
        t = expect_number(first_nonfinite[name], f"first_nonfinite[{name!r}]", 0, LENGTH)
        expect(abs(t - theirs) <= 2, f"`first_nonfinite[{name!r}]` is not where the closed form "
                                     "first gives inf or NaN in that dtype.")
    err32 = expect_number(closed_form_error["float32"], "closed_form_error['float32']", 0, 1e-3)
    err64 = expect_number(closed_form_error["float64"], "closed_form_error['float64']", 0, 1e-9)
    expect(err64 < err32 or err32 == 0, "float64 should be more accurate than float32 here.")
    return ("your closed form matches the recurrence, and where it breaks in each dtype is "
            "found.")


def _ms_rows(table) -> dict:
    expect(isinstance(table, Mapping), "`chunk_ms` should be a dict.")
    expect_keys(table, SHAPES, "chunk_ms")
    out = {}
    for name in SHAPES:
        expect_keys(table[name], CHUNKS, f"chunk_ms[{name!r}]")
        out[name] = {t: expect_number(table[name][t], f"chunk_ms[{name!r}][{t}]", 0)
                     for t in CHUNKS}
        expect(min(out[name].values()) > 0, f"`chunk_ms[{name!r}]` has a time of 0.")
    return out


@exercise("06", 3,
          chunk_ms="{'mvfuser_toy': {T: ms}, 'longer': {T: ms}}: forward + backward of "
                   "selective_scan(..., impl='fast', chunk_size=T) for T = 4, 8, ..., 256, at "
                   "SCAN_SHAPES['mvfuser_toy'] and at your longer shape",
          longer_shape="(batch, D, L, N) of your longer shape (L above the toy's)",
          best_chunk="{'mvfuser_toy': T, 'longer': T}: the fastest T of each row",
          default_chunks="{'mvfuser_toy': T, 'longer': T}: what default_chunk_size(batch, D, N) "
                         "chooses for each shape",
          chunk_outputs_equal="True or False: does the fast scan give the same output "
                              "(torch.allclose, atol 1e-5) for every chunk length?")
def chunk_length(chunk_ms, longer_shape, best_chunk, default_chunks, chunk_outputs_equal):
    rows = _ms_rows(chunk_ms)
    expect(isinstance(longer_shape, (tuple, list)) and len(longer_shape) == 4,
           "`longer_shape` should be (batch, D, L, N).")
    batch, dim, length, n = (int(v) for v in longer_shape)
    expect(length > SCAN_SHAPES["mvfuser_toy"][2], "your longer shape should have more tokens "
                                                   "than the toy MVFuser's.")
    expect_keys(best_chunk, SHAPES, "best_chunk")
    expect_keys(default_chunks, SHAPES, "default_chunks")
    shapes = {"mvfuser_toy": SCAN_SHAPES["mvfuser_toy"], "longer": (batch, dim, length, n)}
    for name, row in rows.items():
        expect(best_chunk[name] in row and row[best_chunk[name]] == min(row.values()),
               f"`best_chunk[{name!r}]` is not the fastest T of your timings.")
        b, d, _, s = shapes[name]
        expect(default_chunks[name] == default_chunk_size(b, d, s),
               f"`default_chunks[{name!r}]` is not what default_chunk_size gives for that shape "
               "(its arguments: batch, D, N).")
    expect(isinstance(chunk_outputs_equal, bool), "`chunk_outputs_equal` should be a bool.")
    expect(chunk_outputs_equal, "the chunk length must not change the output: compare every "
                                "chunk length's output with one of them.")
    return ("both shapes are timed at every chunk length, the output does not depend on it, and "
            "the optimum and the default are read correctly.")
