"""Tests of lessons.backbones: the block-wise Encoder over timm and open_clip ViTs.

Real-size models are built on the meta device only (shapes and parameter counts); every forward
pass runs on a small random-init config on CPU. Nothing is downloaded: weights come from files
written to ``tmp_path``.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lessons import backbones
from lessons.backbones import (
    BUNDLES,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    Bundle,
    Encoder,
    build_encoder,
    create_model,
    get_bundle,
    register,
)

ATOL = 1e-5

# Vision-tower parameter counts with random init (measured with timm 1.0.31, open_clip 3.3.0).
# The derived rows follow from the measured ones: a _reg variant adds 4 register tokens and drops
# the CLS row of the position embedding (+3 * C, as the measured ViT-L pair shows); a 336 px tower
# adds (24**2 - 16**2) * C position-embedding rows to its 224 px sibling.
VISION_PARAMS = {
    "dinov2_vits14": 22_056_192,
    "dinov2_vitb14": 86_579_712,
    "dinov2_vitl14": 304_367_616,
    "dinov2_vitl14_reg": 304_370_688,
    "dinov2_vitg14": 1_136_479_232,            # timm's 1136.48M (the official file adds mask_token)
    "dinov2_vits14_reg": 22_056_192 + 3 * 384,
    "dinov2_vitb14_reg": 86_579_712 + 3 * 768,
    "dinov2_vitg14_reg": 1_136_479_232 + 3 * 1536,
    "clip_vitb16": 86_192_640,
    "clip_vitl14": 303_966_208,
    "clip_vitl14_336": 303_966_208 + (24**2 - 16**2) * 1024,
    "eva02_clip_l14": 304_105_152,
    "eva02_clip_l14_336": 304_105_152 + (24**2 - 16**2) * 1024,
    "siglip_vitl16_384": 316_283_904,
    "toy_vfm": 2_734_464,                          # measured: the course's own configs
    "toy_vfm_invariant": 2_734_464,                # the same ViT, another pretraining
    "toy_vlm": 2_756_352,
}

TINY_TEXT = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1)

EVA_TINY = Bundle(
    "test_eva02_tiny", "open_clip", "eva02-tiny-test", "vlm", CLIP_MEAN, CLIP_STD, 14, (224, 224),
    192, 12, (2, 5, 8, 11), embed_dim=64,
    kwargs=dict(embed_dim=64, vision_cfg=dict(timm_model_name="eva02_tiny_patch14_224",
                                              timm_model_pretrained=False, timm_pool="token",
                                              timm_proj=None, image_size=224),
                text_cfg=TINY_TEXT, custom_text=True))

# SigLIP as open_clip builds ViT-L-16-SigLIP-384 (map pool, no extra projection), with a base
# trunk that is swapped for a small one of the same structure (see ``siglip_encoder``).
SIGLIP_SMALL = Bundle(
    "test_siglip_small", "open_clip", "siglip-small-test", "vlm", SIGLIP_MEAN, SIGLIP_STD, 16,
    (64, 64), 64, 2, (0, 1), embed_dim=64,
    kwargs=dict(embed_dim=64, vision_cfg=dict(timm_model_name="vit_base_patch16_siglip_224",
                                              timm_model_pretrained=False, timm_pool="map",
                                              timm_proj="none", image_size=224),
                text_cfg=TINY_TEXT, custom_text=True))

# Patch-14 towers small enough to run: a DINOv2-style timm ViT and an OpenAI-style CLIP.
DINO_P14 = Bundle(
    "test_dinov2_p14", "timm", "vit_small_patch14_dinov2", "vfm", IMAGENET_MEAN, IMAGENET_STD, 14,
    (56, 56), 64, 2, (0, 1),
    kwargs=dict(img_size=56, embed_dim=64, depth=2, num_heads=2, num_classes=0))
CLIP_P14 = Bundle(
    "test_clip_p14", "open_clip", "clip-p14-test", "vlm", CLIP_MEAN, CLIP_STD, 14, (56, 56), 64, 2,
    (0, 1), embed_dim=32,
    kwargs=dict(embed_dim=32, vision_cfg=dict(image_size=56, patch_size=14, width=64, layers=2,
                                              head_width=32),
                text_cfg=TINY_TEXT))


@torch.no_grad()
def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make random init informative: layer scales (1e-5) and position embeddings (std 0.02) get
    values of order one, so a block or a position embedding in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf in ("pos_embed", "positional_embedding"):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def encoder(bundle: str | Bundle, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    enc = build_encoder(bundle)
    sharpen(enc.model, seed)
    return enc.eval()


def images(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run_blocks(enc: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, backbones.TokenGrid]:
    tokens, grid = enc.embed(x)
    for i in range(enc.depth):
        tokens = enc.block(i, tokens, grid)
    return tokens, grid


@pytest.fixture(scope="module")
def toy_vfm() -> Encoder:
    return encoder("toy_vfm")


@pytest.fixture(scope="module")
def toy_vlm() -> Encoder:
    return encoder("toy_vlm")


@pytest.fixture(scope="module")
def eva() -> Encoder:
    return encoder(EVA_TINY)


@pytest.fixture(scope="module")
def siglip() -> Encoder:
    torch.manual_seed(0)
    model = create_model(SIGLIP_SMALL)
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, num_classes=0, global_pool="map",
        embed_dim=64, depth=2, num_heads=2, img_size=64)
    sharpen(model)
    with torch.no_grad():       # random-init queries attend almost uniformly: make them choose
        model.visual.trunk.attn_pool.q.weight.mul_(30)
    return Encoder(SIGLIP_SMALL, model).eval()


# ----------------------------------------------------------------------------------------------
# 1. Real-size models on meta: parameter counts and shape facts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUNDLES))
def test_meta_parameter_counts_and_shapes(name: str) -> None:
    if name not in VISION_PARAMS:
        pytest.fail(f"bundle {name!r} has no measured vision-tower parameter count here: add it")
    b = BUNDLES[name]
    enc = build_encoder(name, meta=True)
    tower = enc.vit if b.library == "timm" else enc.model.visual
    assert all(p.device.type == "meta" for p in enc.parameters())
    assert sum(p.numel() for p in tower.parameters()) == VISION_PARAMS[name]
    assert (enc.depth, enc.width, enc.patch_size) == (b.depth, b.width, b.patch_size)
    assert enc._patch_conv().out_channels == b.width
    assert enc._pos_grid() == b.grid
    expected_prefix = (0 if "siglip" in name else 1) + (4 if name.endswith("_reg") or
                                                        name.startswith("toy_vfm") else 0)
    assert enc.num_prefix_tokens == expected_prefix
    assert enc.is_eva == name.startswith("eva02")
    if b.kind == "vlm":
        out_dim = (enc.vit.proj.shape[1] if enc.style == "open_clip"
                   else enc.vit.num_features if name.startswith("siglip")
                   else enc.vit.head.out_features)
        assert out_dim == b.embed_dim


# ----------------------------------------------------------------------------------------------
# 2. Block-wise forward == the library's own forward
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_toy_vfm_blockwise_equals_forward_features(toy_vfm: Encoder) -> None:
    x = images(2, 3, 64, 128)
    tokens, grid = run_blocks(toy_vfm, x)
    assert (grid.h, grid.w) == (8, 16) and tokens.shape == (2, 5 + 8 * 16, 192)
    torch.testing.assert_close(toy_vfm.final_norm(tokens), toy_vfm.vit.forward_features(x),
                               atol=ATOL, rtol=0)
    maps, last, _ = toy_vfm.forward_tokens(x)
    torch.testing.assert_close(last, tokens, atol=0, rtol=0)
    assert [m.shape for m in maps] == [(2, 192, 8, 16)] * len(toy_vfm.bundle.out_indices)


@torch.no_grad()
@pytest.mark.parametrize("which", ["toy_vlm", "eva", "siglip"])
def test_vlm_project_equals_encode_image(which: str, request: pytest.FixtureRequest) -> None:
    enc = request.getfixturevalue(which)
    size = {"toy_vlm": (64, 128), "eva": (224, 224), "siglip": (64, 64)}[which]
    x = images(2, 3, *size)
    tokens, grid = run_blocks(enc, x)
    p = enc.patch_size
    assert (grid.h, grid.w) == (size[0] // p, size[1] // p)
    out = enc.project(tokens)
    assert out.shape == (2, enc.bundle.embed_dim)
    torch.testing.assert_close(out, enc.model.encode_image(x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# 3. Other input sizes: position-embedding resampling and EVA02's RoPE
# ----------------------------------------------------------------------------------------------
def dynamic_twin(enc: Encoder, arch: str, **kwargs) -> nn.Module:
    """timm's own model with ``dynamic_img_size=True``, holding the encoder's weights."""
    ref = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kwargs)
    ref.load_state_dict(enc.vit.state_dict())
    return ref.eval()


@torch.no_grad()
@pytest.mark.parametrize("which, size", [("toy_vfm", (96, 160)), ("eva", (112, 168))])
def test_antialiased_resampling_equals_timm_dynamic_size(which: str, size: tuple[int, int],
                                                          request: pytest.FixtureRequest) -> None:
    enc = request.getfixturevalue(which)
    if which == "toy_vfm":
        ref = dynamic_twin(enc, enc.bundle.arch, **enc.bundle.kwargs)
    else:
        ref = dynamic_twin(enc, "eva02_tiny_patch14_224", num_classes=64, global_pool="token")
    x = images(2, 3, *size)
    enc.pos_antialias = True
    try:
        tokens, grid = run_blocks(enc, x)
    finally:
        enc.pos_antialias = False
    p = enc.patch_size
    assert (grid.h, grid.w) == (size[0] // p, size[1] // p) != enc._pos_grid()
    expected = ref.forward_features(x)
    torch.testing.assert_close(enc.final_norm(tokens), expected, atol=ATOL, rtol=0)
    # the default (no antialiasing) is a different resampling, so the comparison above is sharp
    default, _ = run_blocks(enc, x)
    assert (enc.final_norm(default) - expected).abs().max() > 1e-3


def hand_pos(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(1, h0*w0, C) -> (1, h*w, C) by plain bicubic interpolation of the grid."""
    C = pos.shape[-1]
    grid = pos.reshape(1, *old, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C)


@torch.no_grad()
def test_default_resampling_is_plain_bicubic_timm(toy_vfm: Encoder) -> None:
    assert toy_vfm.pos_antialias is False
    x = images(2, 3, 96, 160)
    tokens, _ = toy_vfm.embed(x)
    vit = toy_vfm.vit
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    patches = patches + hand_pos(vit.pos_embed, (8, 16), (12, 20))   # DINOv2: no pos on prefix
    prefix = torch.cat([vit.cls_token, vit.reg_token], dim=1).expand(2, -1, -1)
    torch.testing.assert_close(tokens, torch.cat([prefix, patches], dim=1), atol=ATOL, rtol=0)


@torch.no_grad()
def test_default_resampling_is_plain_bicubic_open_clip(toy_vlm: Encoder) -> None:
    x = images(2, 3, 48, 96)                                            # 6 x 12 from 8 x 16
    tokens, _ = toy_vlm.embed(x)
    v = toy_vlm.vit
    pos = v.positional_embedding.unsqueeze(0)
    patches = v.conv1(x).flatten(2).transpose(1, 2) + hand_pos(pos[:, 1:], (8, 16), (6, 12))
    cls = (v.class_embedding + pos[0, 0]).view(1, 1, -1).expand(2, -1, -1)
    expected = v.ln_pre(torch.cat([cls, patches], dim=1))
    torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# 4. Changing the patch size and the stored position grid
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("bundle", [DINO_P14, CLIP_P14], ids=["timm", "open_clip"])
def test_set_patch_size_and_pos_grid(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = encoder(bundle)
    conv = enc._patch_conv()
    old = conv.weight.detach().clone()
    enc.set_patch_size(16)
    conv = enc._patch_conv()
    torch.testing.assert_close(
        conv.weight, F.interpolate(old, size=(16, 16), mode="bicubic", align_corners=False))
    assert conv.stride == conv.kernel_size == (16, 16) and enc.patch_size == 16
    _, grid = enc.embed(images(1, 3, 64, 96))
    assert (grid.h, grid.w) == (4, 6)                                   # H / 16, W / 16

    enc.set_pos_grid((5, 5))
    assert enc._pos_embed().shape[1] == 25 + (0 if enc._pos_has_no_prefix() else 1)
    assert enc.bundle.img_size == (80, 80)
    assert enc._pos_grid() == (5, 5)

    def no_resampling(*args, **kwargs):
        raise AssertionError("position embeddings resampled at the stored grid")

    monkeypatch.setattr(backbones, "resample_abs_pos_embed", no_resampling)
    maps = enc(images(2, 3, 80, 80))
    assert [m.shape for m in maps] == [(2, 64, 5, 5)] * 2


@torch.no_grad()
@pytest.mark.parametrize("bundle", [DINO_P14, CLIP_P14], ids=["timm", "open_clip"])
def test_set_patch_size_then_non_square_pos_grid(bundle: Bundle) -> None:
    enc = encoder(bundle)
    enc.set_patch_size(16)
    enc.set_pos_grid((4, 8))
    assert enc.bundle.img_size == (64, 128)
    assert [m.shape for m in enc(images(1, 3, 64, 128))] == [(1, 64, 4, 8)] * 2
    assert enc.bundle.patch_size == 16 and enc.bundle.grid == (4, 8)


# ----------------------------------------------------------------------------------------------
# 5. Dense image embeddings
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_clip_dense_forms(toy_vlm: Encoder) -> None:
    x = images(2, 3, 64, 128)
    tokens, grid = toy_vlm.embed(x)
    for i in range(toy_vlm.depth - 1):
        tokens = toy_vlm.block(i, tokens, grid)
    before_last = tokens
    last = toy_vlm.block(toy_vlm.depth - 1, before_last, grid)
    v = toy_vlm.vit
    D = toy_vlm.bundle.embed_dim

    mfuser = toy_vlm.dense_embedding(last, grid)
    assert mfuser.shape == (2, D, 8, 16)
    expected = (v.ln_post(last) @ v.proj)[:, 1:].transpose(1, 2).reshape(2, D, 8, 16)
    torch.testing.assert_close(mfuser, expected, atol=ATOL, rtol=0)

    # CAT-Seg's last block: value path only, a residual from the CLS token, then the MLP
    blk = v.transformer.resblocks[-1]
    C = before_last.shape[-1]
    W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    y = blk.attn.out_proj(blk.ln_1(before_last) @ W[2 * C:].T + b[2 * C:])
    y = y + before_last[:, :1]
    y = y + blk.mlp(blk.ln_2(y))
    expected = (v.ln_post(y) @ v.proj)[:, 1:].transpose(1, 2).reshape(2, D, 8, 16)
    maskclip = toy_vlm.dense_embedding(last, grid, form="maskclip", before_last=before_last)
    assert maskclip.shape == (2, D, 8, 16)
    torch.testing.assert_close(maskclip, expected, atol=ATOL, rtol=0)

    full = toy_vlm.dense_embedding(last, grid, form="maskclip", before_last=before_last,
                                   cls_residual=False)
    assert full.shape == (2, D, 8, 16)
    assert (full - maskclip).abs().max() > 1e-3


@torch.no_grad()
def test_eva_dense_is_the_head_per_token(eva: Encoder) -> None:
    tokens, grid = run_blocks(eva, images(2, 3, 224, 224))
    dense = eva.dense_embedding(tokens, grid)
    assert dense.shape == (2, 64, 16, 16)
    for k in (0, 37, 255):                 # token k of the grid as if it were the CLS token
        torch.testing.assert_close(dense.flatten(2)[..., k], eva.project(tokens[:, 1 + k:2 + k]),
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_siglip_dense_embedding(siglip: Encoder) -> None:
    tokens, grid = run_blocks(siglip, images(2, 3, 64, 64))
    dense = siglip.dense_embedding(tokens, grid)
    assert dense.shape == (2, 64, 4, 4)
    assert dense.flatten(2).std(-1).min() > 1e-3           # different tokens, different outputs

    # every token its own query: timm's pool with its latent replaced by token k's query input
    pool = siglip.vit.attn_pool
    normed = siglip.vit.norm(tokens)
    saved = pool.latent.detach().clone()
    try:
        for k in (0, 9):
            pool.latent.copy_(normed[:1, k:k + 1])
            expected = siglip._timm_head(pool(normed[:1]))
            torch.testing.assert_close(dense[:1, :, k // 4, k % 4], expected, atol=ATOL, rtol=0)
    finally:
        pool.latent.copy_(saved)

    # identical tokens: attention over identical keys returns their value whatever the query
    same = torch.randn(2, 1, 64).expand(2, grid.h * grid.w, 64)
    dense = siglip.dense_embedding(same, grid)
    glob = siglip.project(same)
    torch.testing.assert_close(dense, glob[:, :, None, None].expand_as(dense), atol=ATOL, rtol=0)


@torch.no_grad()
def test_dense_errors(toy_vlm: Encoder, eva: Encoder, toy_vfm: Encoder) -> None:
    tokens, grid = toy_vlm.embed(images(1, 3, 64, 128))
    with pytest.raises(ValueError, match="before_last"):
        toy_vlm.dense_embedding(tokens, grid, form="maskclip")
    with pytest.raises(ValueError, match="unknown dense form 'clip'"):
        toy_vlm.dense_embedding(tokens, grid, form="clip")
    eva_tokens, eva_grid = eva.embed(images(1, 3, 28, 28))
    with pytest.raises(ValueError, match="MaskCLIP"):
        eva.dense_embedding(eva_tokens, eva_grid, form="maskclip", before_last=eva_tokens)
    vfm_tokens, vfm_grid = toy_vfm.embed(images(1, 3, 64, 128))
    with pytest.raises(ValueError, match="toy_vfm is a vision-only model"):
        toy_vfm.dense_embedding(vfm_tokens, vfm_grid)
    with pytest.raises(ValueError, match="toy_vfm is a vision-only model"):
        toy_vfm.project(vfm_tokens)


# ----------------------------------------------------------------------------------------------
# 6. Adapters between blocks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("which", ["toy_vfm", "toy_vlm"])
def test_adapter_called_after_every_block(which: str, request: pytest.FixtureRequest) -> None:
    enc = request.getfixturevalue(which)
    x = images(2, 3, 64, 128)
    shifts = torch.randn(enc.depth, 1, 1, enc.width)
    calls = []

    def adapter(i, tokens, grid):
        calls.append((i, tokens.clone(), grid))
        return tokens + shifts[i]

    maps, last, grid = enc.forward_tokens(x, adapter=adapter)
    assert [c[0] for c in calls] == list(range(enc.depth))
    assert all(c[2] is grid for c in calls) and (grid.h, grid.w) == (8, 16)

    tokens, _ = enc.embed(x)
    expected_maps = []
    for i in range(enc.depth):
        tokens = enc.block(i, tokens, grid)
        torch.testing.assert_close(calls[i][1], tokens, atol=ATOL, rtol=0)   # the block output
        tokens = tokens + shifts[i]
        if i in enc.bundle.out_indices:
            expected_maps.append(enc.patch_map(tokens, grid))                # after the adapter
    torch.testing.assert_close(last, tokens, atol=ATOL, rtol=0)
    assert len(maps) == len(expected_maps) == len(enc.bundle.out_indices)
    for got, want in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_frozen_encoder_trains_only_the_adapter() -> None:
    enc = encoder("toy_vfm").freeze()
    adapter = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, enc.width))
                               for _ in range(enc.depth))
    maps, _, _ = enc.forward_tokens(images(2, 3, 64, 128),
                                    adapter=lambda i, x, grid: x + adapter[i])
    sum(m.pow(2).mean() for m in maps).backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    # every layer up to the last out_index feeds a map; later ones feed nothing
    for i, p in enumerate(adapter):
        if i <= max(enc.bundle.out_indices):
            assert p.grad is not None and p.grad.abs().sum() > 0, i


# ----------------------------------------------------------------------------------------------
# 7. Weights from local files through the libraries' own loaders
# ----------------------------------------------------------------------------------------------
def saved_state(name: str, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = sharpen(create_model(name), seed)
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def assert_weights_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_toy_vfm_weights_from_safetensors(tmp_path) -> None:
    state = saved_state("toy_vfm")
    path = tmp_path / "any_name.safetensors"
    save_file(state, str(path))
    assert_weights_equal(build_encoder("toy_vfm", weights=path).model, state)
    assert_weights_equal(build_encoder("toy_vfm", weights=str(path)).model, state)


def test_toy_vlm_weights_from_torch_save(tmp_path) -> None:
    state = saved_state("toy_vlm")
    path = tmp_path / "toy_vlm_checkpoint.pt"
    torch.save(state, path)
    assert_weights_equal(build_encoder("toy_vlm", weights=path).model, state)


@pytest.mark.parametrize("name", ["toy_vfm", "toy_vlm"])
def test_weights_from_a_directory(name: str, tmp_path) -> None:
    state = saved_state(name)
    save_file(state, str(tmp_path / get_bundle(name).weights))
    assert_weights_equal(build_encoder(name, weights=tmp_path).model, state)


@pytest.mark.parametrize("name", ["toy_vfm", "dinov2_vitl14", "clip_vitl14", "siglip_vitl16_384"])
def test_missing_weights(name: str, tmp_path) -> None:
    b = get_bundle(name)
    for where in (tmp_path, tmp_path / "nothing.safetensors"):
        with pytest.raises(FileNotFoundError) as err:
            build_encoder(name, weights=where)
        msg = str(err.value)
        assert b.weights in msg and b.source in msg and str(where) in msg


def test_mismatched_weights(tmp_path) -> None:
    vlm = tmp_path / "toy_vlm.pt"
    torch.save(saved_state("toy_vlm"), vlm)
    vfm = tmp_path / "toy_vfm.safetensors"
    save_file(saved_state("toy_vfm"), str(vfm))
    for name, path in (("toy_vfm", vlm), ("toy_vlm", vfm)):
        with pytest.raises(ValueError, match="do not fit " + name):
            build_encoder(name, weights=path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(vlm.read_bytes()[: vlm.stat().st_size // 2])
    for name in ("toy_vfm", "toy_vlm"):
        with pytest.raises(ValueError, match="do not fit " + name):
            build_encoder(name, weights=truncated)


@pytest.mark.parametrize("name, corruption", [
    ("toy_vfm", "truncated_safetensors"),
    ("toy_vlm", "truncated_safetensors"),
    ("toy_vlm", "garbage_pt"),
    ("toy_vfm", "garbage_pt"),
])
def test_corrupt_weights(name: str, corruption: str, tmp_path) -> None:
    if corruption == "truncated_safetensors":
        good = tmp_path / "good.safetensors"
        save_file(saved_state(name), str(good))
        path = tmp_path / "bad.safetensors"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        path = tmp_path / "bad.pt"
        path.write_bytes(b"\x00 not a checkpoint " * 16)
    with pytest.raises(ValueError, match="do not fit " + name):
        build_encoder(name, weights=path)


def test_meta_with_weights_is_an_error(tmp_path) -> None:
    path = tmp_path / "toy_vfm.safetensors"
    save_file(saved_state("toy_vfm"), str(path))
    with pytest.raises(ValueError, match="meta=True"):
        build_encoder("toy_vfm", weights=path, meta=True)


# ----------------------------------------------------------------------------------------------
# 8. Registry, Bundle checks, input checks, normalisation
# ----------------------------------------------------------------------------------------------
def test_registry() -> None:
    with pytest.raises(KeyError) as err:
        get_bundle("dinov3_vitl16")
    assert "dinov3_vitl16" in str(err.value)
    assert all(name in str(err.value) for name in BUNDLES)
    b = get_bundle("toy_vfm")
    assert get_bundle(b) is b
    before = dict(BUNDLES)
    with pytest.raises(ValueError, match="'toy_vfm' is already registered"):
        register(dataclasses.replace(b, depth=3, out_indices=(0,)))
    assert before == BUNDLES and BUNDLES["toy_vfm"] is b


def test_bundle_checks() -> None:
    with pytest.raises(ValueError, match=r"out_indices \[6\] outside 0\.\.5"):
        dataclasses.replace(get_bundle("toy_vfm"), out_indices=(1, 6))
    with pytest.raises(ValueError, match=r"out_indices \[-1\]"):
        dataclasses.replace(get_bundle("toy_vfm"), out_indices=(-1,))
    with pytest.raises(ValueError, match="unknown library"):
        dataclasses.replace(get_bundle("toy_vfm"), library="hf")
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(get_bundle("toy_vfm"), kind="vit")
    assert get_bundle("dinov2_vitl14").grid == (37, 37)
    assert get_bundle("toy_vlm").grid == (8, 16)


def test_embed_input_checks(toy_vfm: Encoder, toy_vlm: Encoder) -> None:
    for enc in (toy_vfm, toy_vlm):
        for shape in ((3, 64, 128), (2, 1, 64, 128), (2, 4, 64, 128)):
            with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
                enc.embed(torch.zeros(shape))
        for shape in ((1, 3, 4, 64), (1, 3, 64, 7)):
            with pytest.raises(ValueError, match="smaller than one patch"):
                enc.embed(torch.zeros(shape))
        _, grid = enc.embed(torch.zeros(1, 3, 8, 8))                    # exactly one patch
        assert (grid.h, grid.w) == (1, 1)


def test_normalize_uses_the_bundle_statistics(toy_vfm: Encoder, toy_vlm: Encoder,
                                              siglip: Encoder) -> None:
    x = torch.rand(2, 3, 5, 7)
    for enc, (mean, std) in ((toy_vfm, (IMAGENET_MEAN, IMAGENET_STD)),
                             (toy_vlm, (CLIP_MEAN, CLIP_STD)),
                             (siglip, (SIGLIP_MEAN, SIGLIP_STD))):
        expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(enc.normalize(x), expected)
    torch.testing.assert_close(siglip.normalize(x), 2 * x - 1)
    assert IMAGENET_MEAN != CLIP_MEAN


# ----------------------------------------------------------------------------------------------
# 9. OpenAI's TorchScript archives, read without running them; local paths never as tags
# ----------------------------------------------------------------------------------------------
TINY_CLIP_CFG = dict(embed_dim=16,
                     vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2,
                                     head_width=16),
                     text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1))
TINY_CLIP = Bundle("tiny_clip", "open_clip", "tiny-clip", "vlm", CLIP_MEAN, CLIP_STD, 8,
                   (32, 32), 32, 2, (0, 1), embed_dim=16, weights="ViT-tiny.pt",
                   kwargs=TINY_CLIP_CFG)


class _OpenAIStyle(nn.Module):
    """An open_clip CLIP plus the metadata buffers OpenAI's archives carry."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for key, value in (("input_resolution", 32), ("context_length", 8), ("vocab_size", 100)):
            self.register_buffer(key, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


@pytest.fixture(scope="module")
def scripted_clip(tmp_path_factory) -> tuple:
    """A TorchScript archive of a tiny CLIP (fp16 like OpenAI's), and its fp32 reference."""
    torch.manual_seed(0)
    clip = backbones.open_clip.CLIP(**TINY_CLIP_CFG).eval()
    sharpen(clip)
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    with pytest.warns(FutureWarning):                        # torch.jit is deprecated
        torch.jit.save(torch.jit.script(_OpenAIStyle(clip).half()), str(path))
    return path, {k: v.half().float() for k, v in clip.state_dict().items()}


def test_torchscript_archive_loads_without_running_it(scripted_clip, monkeypatch) -> None:
    path, reference = scripted_clip

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    assert backbones.is_torchscript_archive(path)
    state = backbones.read_torchscript_state_dict(path)
    assert {"input_resolution", "vocab_size", "visual.conv1.weight"} <= set(state)
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.startswith("visual."))
    model = create_model(TINY_CLIP, weights=path)             # open_clip's loading path
    assert_weights_equal(model, reference)
    assert_weights_equal(create_model(TINY_CLIP, weights=path.parent), reference)   # a folder


def test_convert_openai_command(scripted_clip, tmp_path, capsys) -> None:
    path, reference = scripted_clip
    out = tmp_path / "ViT-tiny.safetensors"
    assert backbones.main(["convert-openai", str(path), str(out)]) == 0
    assert_weights_equal(create_model(TINY_CLIP, weights=out), reference)
    assert backbones.main(["convert-openai", str(out), str(tmp_path / "x.safetensors")]) == 2
    assert "is not a TorchScript archive" in capsys.readouterr().err


def test_torchscript_archive_with_a_code_global_is_refused(scripted_clip, tmp_path) -> None:
    """A data.pkl that names os.system (or anything but tensors) is refused, not run."""
    import os
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    src, _ = scripted_clip
    bad = tmp_path / "evil.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Evil(), protocol=2)
            zout.writestr(item, data)
    with pytest.raises(ValueError, match="os.system|posix.system|not allowed"):
        backbones.read_torchscript_state_dict(bad)
    with pytest.raises(ValueError, match="do not fit tiny_clip"):
        create_model(TINY_CLIP, weights=bad)
    assert not (tmp_path / "pwned").exists()


def test_a_local_file_named_like_a_tag_loads_as_a_path(tmp_path, monkeypatch) -> None:
    """A weights file called ``openai`` must not make open_clip look up (download) the tag."""
    import open_clip.factory

    asked = []
    for name in ("download_pretrained", "download_pretrained_from_hf", "get_pretrained_cfg"):
        monkeypatch.setattr(open_clip.factory, name,
                            lambda *a, _name=name, **k: asked.append(_name) or None)
    monkeypatch.chdir(tmp_path)
    clip_b = dataclasses.replace(get_bundle("clip_vitb16"), arch="ViT-B-32")  # smallest CLIP
    (tmp_path / "openai").write_bytes(b"\x00 not weights " * 8)
    with pytest.raises(ValueError, match="the weights in openai do not fit"):
        create_model(clip_b, weights="openai")
    assert asked == [], "a local path was looked up as an open_clip pretrained tag"


def test_a_model_that_fails_to_build_is_not_blamed_on_its_weights(tmp_path, monkeypatch) -> None:
    vfm = tmp_path / "toy_vfm.safetensors"
    save_file(saved_state("toy_vfm"), str(vfm))
    vlm = tmp_path / "toy_vlm.pt"
    torch.save(saved_state("toy_vlm"), vlm)

    def broken(*args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'bogus'")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(TypeError, match="bogus"):            # the cause, not "do not fit"
        build_encoder("toy_vfm", weights=vfm)
    cls, _ = backbones._open_clip_cfg(backbones.get_bundle("toy_vlm"))
    monkeypatch.setattr(cls, "__init__", broken)
    with pytest.raises(TypeError, match="bogus"):
        build_encoder("toy_vlm", weights=vlm)
