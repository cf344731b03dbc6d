"""Tests of lessons.rein: the refinement against an independent float64 reference, the null token,
both initialisations, the token -> query link's interleaved order, parameter counts at the
paper's scale (every Table 6/7 figure), the encoder adapter, gradients, bad input, and the
converter on a synthetic official checkpoint built from the official modules' key/shape list."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lessons.backbones import build_encoder
from lessons.rein import (
    OFFICIAL_PREFIX,
    VIT_L,
    Reins,
    convert_official_rein,
    load_official_rein,
    rein_parameter_count,
)


# --- parameter counts: the paper's tables, exactly ------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    ({}, 2_990_081),                                         # Rein (ViT-L, r=16, with the link)
    ({"link_to_queries": False}, 2_530_817),                 # SemFPN rows (Table 9)
    ({"lora_rank": 4}, 2_666_369),                           # Table 7: 2.67M
    ({"lora_rank": 8}, 2_774_273),                           # 2.77M
    ({"lora_rank": 32}, 3_421_697),                          # 3.42M
    ({"lora_rank": 64}, 4_284_929),                          # 4.28M
    ({"num_layers": 32, "embed_dim": 1280}, 4_510_721),      # SAM-H: 4.51M
    # Table 6 lineage: core 52.84M, +link 59.33M, +share 5.02M, +lora 2.99M
    ({"lora_rank": None, "shared_mlps": False, "link_to_queries": False}, 52_838_401),
    ({"lora_rank": None, "shared_mlps": False}, 59_332_865),
    ({"lora_rank": None}, 5_016_065),
])
def test_parameter_counts_match_the_paper(overrides, expected):
    assert rein_parameter_count(**overrides) == expected


def test_state_dict_keys_and_shapes_follow_the_official_names():
    with torch.device("meta"):
        sd = Reins(**VIT_L).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "learnable_tokens_a": (24, 100, 16), "learnable_tokens_b": (24, 16, 1024), "scale": (),
        "mlp_token2feat.weight": (1024, 1024), "mlp_token2feat.bias": (1024,),
        "mlp_delta_f.weight": (1024, 1024), "mlp_delta_f.bias": (1024,),
        "transform.weight": (256, 1024), "transform.bias": (256,),
        "merge.weight": (256, 768), "merge.bias": (256,)}


# --- the refinement (Eq. 3-7) ---------------------------------------------------------------------
def _reference(f_nbc, T, W_T, W_f, scale):
    """The official layout, sequence first: f (n, B, c), written from the equations in float64."""
    c = f_nbc.shape[-1]
    S = torch.softmax(torch.einsum("nbc,mc->nbm", f_nbc, T) / math.sqrt(c), dim=-1)
    dfbar = torch.einsum("nbm,mc->nbc", S[:, :, 1:], W_T(T[1:]))
    return f_nbc + scale * W_f(dfbar + f_nbc)


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_refinement_equals_the_reference_in_float64(lora_rank):
    torch.manual_seed(0)
    reins = Reins(3, 32, token_length=7, lora_rank=lora_rank, query_dim=8).double()
    with torch.no_grad():
        reins.scale.fill_(0.7)
    f = torch.randn(2, 10, 32, dtype=torch.float64)                          # (B, n, c)
    for layer in range(3):
        T = reins.tokens(layer)
        want = _reference(f.transpose(0, 1), T, reins.mlp_token2feat, reins.mlp_delta_f, 0.7)
        torch.testing.assert_close(reins(f, layer), want.transpose(0, 1), atol=1e-12, rtol=0)


def test_token_zero_is_a_null_sink():
    # a patch that matches only token 0 gets no token update: dfbar ~ 0, only W_f(f) remains
    torch.manual_seed(0)
    reins = Reins(1, 16, token_length=5, lora_rank=None, link_to_queries=False).double()
    with torch.no_grad():                       # orthogonal tokens; the patch matches token 0 only
        reins.learnable_tokens.copy_(torch.eye(16)[:5].unsqueeze(0))
    T = reins.tokens(0).detach()
    f = 100.0 * torch.eye(16, dtype=torch.float64)[0].view(1, 1, 16)
    with torch.no_grad():
        reins.mlp_token2feat.weight.normal_()
        reins.mlp_token2feat.bias.fill_(3.0)
    only_f = reins.scale * reins.mlp_delta_f(f)
    torch.testing.assert_close(reins.delta_f(f, 0), only_f, atol=1e-9, rtol=0)
    # while a patch aligned with token 1 gets token 1's W_T output
    f1 = 100.0 * torch.eye(16, dtype=torch.float64)[1].view(1, 1, 16)
    want = reins.scale * reins.mlp_delta_f(reins.mlp_token2feat(T[1]) + f1)
    torch.testing.assert_close(reins.delta_f(f1, 0), want, atol=1e-9, rtol=0)
    S = torch.softmax(f @ T.t() / 4, dim=-1)
    assert S[..., 1:].sum() < 1e-9


def test_official_init_scale_and_token_bounds():
    reins = Reins(4, 64, token_length=10, lora_rank=8, patch_size=16)
    assert reins.scale.item() == pytest.approx(1e-3)
    bound = math.sqrt(6 / (3 * 16 * 16 + math.sqrt(64 * 8)))
    for t in (reins.learnable_tokens_a, reins.learnable_tokens_b):
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    full = Reins(4, 64, token_length=10, lora_rank=None, patch_size=16)
    assert full.learnable_tokens.abs().max() <= math.sqrt(6 / (768 + 64))


def test_paper_zero_init_starts_as_the_identity_and_still_learns():
    torch.manual_seed(0)
    reins = Reins(2, 16, token_length=4, lora_rank=2, query_dim=8, zero_init=True)
    assert "scale" not in reins.state_dict()
    assert all(m.bias.abs().sum() == 0 for m in reins.modules() if isinstance(m, nn.Linear))
    f = torch.randn(3, 5, 16)
    assert torch.equal(reins(f, 1), f)
    reins(f, 1).square().sum().backward()
    assert reins.mlp_delta_f.weight.grad.abs().sum() > 0


def test_per_layer_mlps_are_per_layer():
    torch.manual_seed(0)
    reins = Reins(2, 8, token_length=3, lora_rank=None, shared_mlps=False, query_dim=4)
    f = torch.randn(1, 4, 8)
    before0, before1 = reins(f, 0), reins(f, 1)
    with torch.no_grad():
        reins.mlp_delta_f[1].weight.add_(1.0)
    torch.testing.assert_close(reins(f, 0), before0)
    assert not torch.allclose(reins(f, 1), before1)
    assert reins.queries().shape == (3, 4)


# --- the link (Eq. 8-10) --------------------------------------------------------------------------
def test_queries_feed_merge_max_mean_last_interleaved_per_channel():
    torch.manual_seed(0)
    N, m, c, q = 3, 5, 12, 4
    reins = Reins(N, c, token_length=m, lora_rank=3, query_dim=q).double()
    Q = reins.transform(reins.tokens())                                        # (N, m, q)
    with torch.no_grad():   # merge = a selection matrix: output j reads merge input 3*j + k
        for k, want in enumerate((Q.amax(0), Q.mean(0), Q[-1])):
            reins.merge.weight.zero_()
            reins.merge.bias.zero_()
            for j in range(q):
                reins.merge.weight[j, 3 * j + k] = 1.0
            torch.testing.assert_close(reins.queries(), want, atol=1e-12, rtol=0)


def test_queries_use_every_token_including_the_null_token():
    reins = Reins(2, 8, token_length=4, lora_rank=None, query_dim=4)
    reins.queries()[0].sum().backward()
    assert reins.learnable_tokens.grad[:, 0].abs().sum() > 0


def test_queries_need_the_link():
    reins = Reins(2, 8, token_length=4, lora_rank=2, link_to_queries=False)
    assert not hasattr(reins, "merge")
    with pytest.raises(RuntimeError, match="link_to_queries=False"):
        reins.queries()


# --- attached to an encoder -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_encoder():
    torch.manual_seed(0)
    return build_encoder("toy_vfm").freeze().eval()


def test_adapter_refines_patches_and_passes_prefix_tokens(toy_encoder):
    enc = toy_encoder
    reins = Reins(enc.depth, enc.width, token_length=6, lora_rank=4, link_to_queries=False)
    with torch.no_grad():
        reins.scale.fill_(1.0)
    x = torch.randn(2, enc.num_prefix_tokens + 128, enc.width)
    out = reins.adapter(enc)(2, x, None)
    P = enc.num_prefix_tokens
    assert P == 5                                                    # CLS + 4 registers
    assert torch.equal(out[:, :P], x[:, :P])
    assert not torch.allclose(out[:, P:], x[:, P:])
    torch.testing.assert_close(out[:, P:], reins(x[:, P:], 2))


def test_gradients_reach_the_reins_and_not_the_frozen_encoder(toy_encoder):
    enc = toy_encoder
    reins = Reins(enc.depth, enc.width, token_length=6, lora_rank=4, link_to_queries=False)
    images = torch.rand(2, 3, 64, 128)
    maps, _, _ = enc.forward_tokens(enc.normalize(images), adapter=reins.adapter(enc))
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reins.parameters())
    assert all(p.grad is None for p in enc.parameters())


def test_reins_must_fit_the_encoder(toy_encoder):
    with pytest.raises(ValueError, match="toy_vfm has 6 of width 192"):
        Reins(24, 1024).adapter(toy_encoder)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="token_length"):
        Reins(2, 8, token_length=1)
    with pytest.raises(ValueError, match="lora_rank"):
        Reins(2, 8, lora_rank=0)
    with pytest.raises(ValueError, match="embed_dim"):
        Reins(2, 0)
    reins = Reins(2, 8, token_length=3, lora_rank=2)
    with pytest.raises(ValueError, match=r"\(B, n, 8\)"):
        reins(torch.randn(2, 5, 9), 0)
    with pytest.raises(IndexError, match="layer 2"):
        reins(torch.randn(2, 5, 8), 2)


# --- the converter --------------------------------------------------------------------------------
def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic official checkpoint: the key/shape list of w1oves/Rein's ``LoRAReins`` for ViT-L
    (``rein/models/backbones/reins.py``), plus head keys."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"learnable_tokens_a": (24, 100, 16), "learnable_tokens_b": (24, 16, 1024),
              "scale": (), "mlp_token2feat.weight": (1024, 1024), "mlp_token2feat.bias": (1024,),
              "mlp_delta_f.weight": (1024, 1024), "mlp_delta_f.bias": (1024,),
              "transform.weight": (256, 1024), "transform.bias": (256,),
              "merge.weight": (256, 768), "merge.bias": (256,)}
    sd = {OFFICIAL_PREFIX + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["decode_head.querys2feat.weight"] = torch.randn(256, 256, generator=g)
    sd["decode_head.cls_embed.weight"] = torch.randn(20, 256, generator=g)
    sd["decode_head.level_embed.weight"] = torch.randn(3, 256, generator=g)
    return sd


@pytest.fixture(scope="module")
def vit_l_reins():
    return Reins(**VIT_L)


def test_converter_maps_every_official_rein_key(vit_l_reins):
    official = _official_state_dict()
    sd, report = convert_official_rein({"state_dict": official, "meta": {"iter": 40000}},
                                       vit_l_reins)
    assert report.ok and not report.verified
    assert len(report.converted) == 11 and len(report.other) == 3
    assert "not yet verified" in str(report) and "decode_head" in str(report)
    vit_l_reins.load_state_dict(sd, strict=True)
    torch.testing.assert_close(vit_l_reins.merge.weight, official["backbone.reins.merge.weight"])
    torch.testing.assert_close(vit_l_reins.scale, official["backbone.reins.scale"])


def test_converter_reports_missing_unexpected_and_mismatched(vit_l_reins):
    official = _official_state_dict()
    official.pop(OFFICIAL_PREFIX + "merge.bias")
    official[OFFICIAL_PREFIX + "learnable_tokens"] = torch.zeros(24, 100, 1024)
    official[OFFICIAL_PREFIX + "transform.weight"] = torch.zeros(128, 1024)
    _, report = convert_official_rein(official, vit_l_reins)
    assert not report.ok
    assert report.missing == [OFFICIAL_PREFIX + "merge.bias"]
    assert report.unexpected == [OFFICIAL_PREFIX + "learnable_tokens"]
    assert len(report.mismatched) == 1 and "transform.weight (128, 1024)" in report.mismatched[0]


def test_paper_form_reports_the_official_scale_as_unexpected():
    with torch.device("meta"):
        paper = Reins(**VIT_L, zero_init=True)
    _, report = convert_official_rein(_official_state_dict(), paper)
    assert report.unexpected == [OFFICIAL_PREFIX + "scale"]


def test_load_official_rein_from_a_file(tmp_path, vit_l_reins):
    path = tmp_path / "rein_dinov2_mask2former_512x512_bs1x4.pth"
    official = _official_state_dict(seed=1)
    torch.save({"meta": {"iter": 40000, "seed": 42}, "state_dict": official}, path)
    report = load_official_rein(path, vit_l_reins)
    assert report.ok
    torch.testing.assert_close(vit_l_reins.learnable_tokens_b,
                               official[OFFICIAL_PREFIX + "learnable_tokens_b"])
    official.pop(OFFICIAL_PREFIX + "scale")
    torch.save(official, path)
    with pytest.raises(ValueError, match="missing"):
        load_official_rein(path, vit_l_reins)
    assert not load_official_rein(path, vit_l_reins, strict=False).ok


def test_load_official_rein_bad_files(tmp_path, vit_l_reins):
    with pytest.raises(FileNotFoundError, match="w1oves/Rein"):
        load_official_rein(tmp_path / "nope.pth", vit_l_reins)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_official_rein(bad, vit_l_reins)
    with pytest.raises(ValueError, match="dict of tensors"):
        convert_official_rein({"state_dict": {"a": "b"}}, vit_l_reins)


def test_verified_only_for_a_known_file_that_converts_cleanly(tmp_path, vit_l_reins, monkeypatch):
    import lessons.convert as conv

    path = tmp_path / "rein.pth"
    official = _official_state_dict(seed=2)
    torch.save({"state_dict": official}, path)
    report = load_official_rein(path, vit_l_reins)
    assert report.ok and not report.verified and report.sha256 == conv.file_sha256(path)
    monkeypatch.setitem(conv.VERIFIED_CHECKPOINTS, report.sha256, "a checked release")
    report = load_official_rein(path, vit_l_reins)
    assert report.verified and "not yet verified" not in str(report)
    official.pop(OFFICIAL_PREFIX + "scale")             # a known file that no longer fits
    torch.save({"state_dict": official}, path)
    monkeypatch.setitem(conv.VERIFIED_CHECKPOINTS, conv.file_sha256(path), "a checked release")
    report = load_official_rein(path, vit_l_reins, strict=False)
    assert not report.ok and not report.verified
    _, report = convert_official_rein({"state_dict": _official_state_dict()}, vit_l_reins)
    assert not report.verified                          # no file, no verification
