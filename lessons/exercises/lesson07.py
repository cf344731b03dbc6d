"""Checks of lesson 07's exercises (MFuser): see ``lessons.exercises``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lessons import mfuser as mf
from lessons.exercises import exercise, expect, expect_keys, expect_number

__all__ = ["both_directions", "reverse_order", "step_size", "why_mamba"]

N_VFM, N_VLM = 133, 129                 # tokens entering the first fuser (the solutions' setup)
STREAMS = ("VFM", "VLM")
ORDERS = ("[VFM; VLM]", "[VLM; VFM]")
MIXERS = ("MVFuser", "self-attention")
LENGTHS = (256, 512, 1024, 2048, 4096)
FULL_SEQUENCE = 2594                    # DINOv2-L + EVA02-L tokens at 512 x 512
SETTINGS = {"backbone 0.001": 1e-3, "backbone 0.1": 1e-1, "MTEnhancer": None}
CHANNELS = (-1, -16)


class _Cumsum(nn.Module):
    """A causal test mixer whose output shows the order it read: token i sums tokens 0..i."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.cumsum(1)


def _norm(text) -> str:
    return str(text).replace(" ", "").upper()


@exercise("07", 1,
          ReversedConcatFuser="your class: a subclass of mf.ConcatFuser whose forward(d, v) scans "
                              "[VLM; VFM] with self.mixer and returns the (d update, v update) "
                              "pair, in that order",
          reversed_vfm_reads_vlm="int: for ReversedConcatFuser(fuser) (the given trained "
                                 "mixer) on (d, v), how many of the VFM tokens' updates move "
                                 "when one VLM patch token is changed",
          reversed_vlm_reads_vfm="int: and how many of the VLM tokens' updates move when one VFM "
                                 "patch token is changed",
          reader_stream="'VFM' or 'VLM': the stream whose updates now read the other stream",
          order_for_vlm_decoder="'[VFM; VLM]' or '[VLM; VFM]': the order you expect to help a "
                                "decoder whose queries come from the VLM's text space more")
def reverse_order(ReversedConcatFuser, reversed_vfm_reads_vlm, reversed_vlm_reads_vfm,
                  reader_stream, order_for_vlm_decoder):
    expect(isinstance(ReversedConcatFuser, type)
           and issubclass(ReversedConcatFuser, mf.ConcatFuser),
           "`ReversedConcatFuser` should be a class that subclasses mf.ConcatFuser.")
    d, v = torch.arange(15.0).view(1, 5, 3), -torch.arange(12.0).view(1, 4, 3) ** 2
    with torch.no_grad():
        out = ReversedConcatFuser(_Cumsum())(d, v)
    expect(isinstance(out, tuple) and len(out) == 2, "forward(d, v) should return a pair of "
                                                     "updates (d, v).")
    u = torch.cat([v, d], dim=1).cumsum(1)
    expect(out[0].shape == d.shape and out[1].shape == v.shape,
           "forward(d, v) should return the d update first, then the v update, each of its "
           "stream's shape.")
    expect(torch.allclose(out[0], u[:, 4:]) and torch.allclose(out[1], u[:, :4]),
           "with a causal test mixer the updates are not those of a scan over [VLM; VFM]: "
           "concatenate v before d, and split the output back at v's length.")
    vfm = expect_number(reversed_vfm_reads_vlm, "`reversed_vfm_reads_vlm`", 0, N_VFM)
    vlm = expect_number(reversed_vlm_reads_vfm, "`reversed_vlm_reads_vfm`", 0, N_VLM)
    expect(vfm == N_VFM and vlm <= 1,
           "your counts do not come from the reversed fuser: change one token of one stream, run "
           "the fuser on both inputs and count the other stream's updates that differ.")
    expect(_norm(reader_stream) in STREAMS, f"`reader_stream` should be one of {STREAMS}.")
    expect(_norm(reader_stream) == ("VFM" if vfm > vlm else "VLM"),
           "`reader_stream` does not agree with your counts.")
    expect(_norm(order_for_vlm_decoder) in map(_norm, ORDERS),
           f"`order_for_vlm_decoder` should be one of {ORDERS}.")
    expect(_norm(order_for_vlm_decoder) == _norm(ORDERS[0]),
           "the VLM's tokens become the dense image-text embedding the text queries "
           "read; which order lets them read the VFM's detail?")
    return ("your fuser scans [VLM; VFM], its counts show who reads whom, and the order you "
            "prefer for a VLM-query decoder is the one MFuser uses.")


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@exercise("07", 2,
          BiMVFuser="your nn.Module class: BiMVFuser(d_model, **kw) holds two mf.MVFuser(d_model, "
                    "**kw) and forward(h) returns m1(h) + m2(h.flip(1)).flip(1) for h (B, L, C)",
          bi_depends_on_all="True or False: on the fused sequence h, does every output token of "
                            "your BiMVFuser move when any single input token is changed?",
          bi_parameters_1024="int: the parameters of BiMVFuser(1024)")
def both_directions(BiMVFuser, bi_depends_on_all, bi_parameters_1024):
    expect(isinstance(BiMVFuser, type) and issubclass(BiMVFuser, nn.Module),
           "`BiMVFuser` should be a class (an nn.Module subclass), not an instance.")
    with torch.random.fork_rng(devices=[]):                 # leave the notebook's RNG alone
        torch.manual_seed(0)
        fuser = BiMVFuser(16).double().eval()
        h = torch.randn(1, 10, 16, dtype=torch.float64)
    inner = [m for m in fuser.modules() if isinstance(m, mf.MVFuser) and m is not fuser]
    expect(len(inner) == 2, f"your BiMVFuser should hold two mf.MVFusers; it holds {len(inner)}.")
    with torch.no_grad():
        y = fuser(h)
        forms = [a(h) + b(h.flip(1)).flip(1) for a, b in (inner, inner[::-1])]
    expect(y.shape == h.shape and any(torch.allclose(y, f, atol=1e-12) for f in forms),
           "the output is not m1(h) + m2(h.flip(1)).flip(1): flip the sequence (dim 1) before "
           "the second MVFuser and flip its output back.")
    expect(isinstance(bi_depends_on_all, bool), "`bi_depends_on_all` should be a bool.")
    expect(bi_depends_on_all, "with a forward and a flipped scan every output token depends on "
                              "every input: change each input token in turn (in float64) and "
                              "look at every output token.")
    with torch.device("meta"):
        count = _param_count(BiMVFuser(1024))
    expect(expect_number(bi_parameters_1024, "`bi_parameters_1024`", 0) == count,
           "`bi_parameters_1024` is not your BiMVFuser(1024)'s parameter count (count it on the "
           "meta device).")
    return ("your fuser adds a forward and a flipped scan, every update depends on every token, "
            "and its size at d_model 1024 is counted.")


def _slope(row: dict) -> float:
    """Least-squares slope of log(seconds) against log(L)."""
    return float(np.polyfit(np.log(list(row)), np.log(list(row.values())), 1)[0])


@exercise("07", 3,
          mixer_seconds="{'MVFuser': {L: s}, 'self-attention': {L: s}}: seconds of forward + "
                        "backward of mf.MVFuser(192) and mf.SelfAttentionMixer(192, 4) for "
                        "L = 256, 512, 1024, 2048, 4096",
          crossing_length="the smallest L of your table at which self-attention is slower than "
                          "the MVFuser, or 'never'",
          growth_exponent="{'MVFuser': k, 'self-attention': k}: the slope of a least-squares line "
                          "through (log L, log seconds) of each row (np.polyfit)")
def why_mamba(mixer_seconds, crossing_length, growth_exponent):
    expect_keys(mixer_seconds, MIXERS, "mixer_seconds")
    rows = {}
    for m in MIXERS:
        expect_keys(mixer_seconds[m], LENGTHS, f"mixer_seconds[{m!r}]")
        rows[m] = {n: expect_number(mixer_seconds[m][n], f"mixer_seconds[{m!r}][{n}]", 0, 600)
                   for n in LENGTHS}
        expect(min(rows[m].values()) > 0, f"`mixer_seconds[{m!r}]` has a time of 0.")
    slower = [n for n in LENGTHS if rows["self-attention"][n] > rows["MVFuser"][n]]
    expect(crossing_length == (slower[0] if slower else "never"),
           "`crossing_length` does not agree with your timings.")
    expect_keys(growth_exponent, MIXERS, "growth_exponent")
    slopes = {m: _slope(rows[m]) for m in MIXERS}
    for m in MIXERS:
        k = expect_number(growth_exponent[m], f"growth_exponent[{m!r}]")
        expect(abs(k - slopes[m]) < 0.02, f"`growth_exponent[{m!r}]` is not the slope of your "
                                          "timings on log-log axes.")
    return ("both mixers are timed at every length, and the crossing and the growth rates are "
            "read off your own timings.")


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _delta(start: float | None) -> float:
    """Initial Δ: the MTEnhancer's softplus(0); a backbone fuser's softplus(2 softplus⁻¹(Δ0))."""
    if start is None:
        return _softplus(0.0)
    return _softplus(2 * math.log(math.expm1(start)))


@exercise("07", 4,
          half_life_tokens="{'backbone 0.001': {-1: n, -16: n}, 'backbone 0.1': {...}, "
                           "'MTEnhancer': {...}}: tokens for the state of channel A (-1 or -16) "
                           "to decay to half at initialisation: a backbone MVFuser started at "
                           "Δ0 = 0.001 or 0.1 (bias added twice), and the MTEnhancer's",
          far_back="True or False: at initialisation, does the slowest backbone channel (Δ0 = "
                   "0.001, A = -1) keep half its state over a whole full-scale [VFM; VLM] "
                   "sequence (2,594 tokens)?")
def step_size(half_life_tokens, far_back):
    expect_keys(half_life_tokens, SETTINGS, "half_life_tokens")
    for name, start in SETTINGS.items():
        expect_keys(half_life_tokens[name], CHANNELS, f"half_life_tokens[{name!r}]")
        for a in CHANNELS:
            n = expect_number(half_life_tokens[name][a], f"half_life_tokens[{name!r}][{a}]", 0)
            want = math.log(2) / (_delta(start) * abs(a))
            expect(abs(n / want - 1) < 0.02,
                   f"`half_life_tokens[{name!r}][{a}]` is off: the state decays by exp(Δ A) per "
                   "token, with Δ at initialisation (for the backbone: softplus of twice the "
                   "bias b = softplus⁻¹(Δ0)).")
    expect(isinstance(far_back, bool), "`far_back` should be a bool.")
    expect(far_back == (half_life_tokens["backbone 0.001"][-1] > FULL_SEQUENCE),
           "`far_back` does not agree with your half-lives.")
    return ("the half-lives are right for both kinds of fuser, and your conclusion follows from "
            "them.")

