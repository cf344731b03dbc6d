"""CAT-Seg (lessons.catseg): cost volume, aggregation, q/v fine-tuning, loss, converter.

Published configurations are built on the meta device (shapes and parameter counts); everything
that runs uses the toy VLM or small random tensors.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

from lessons.backbones import build_encoder, toy_weights_dir
from lessons.catseg import (
    CATSEG_B,
    CATSEG_L,
    TOY_CATSEG,
    Aggregator,
    CATSeg,
    CATSegConfig,
    build_toy_catseg,
    catseg_loss,
    convert_official_catseg,
    cost_volume,
    linear_attention,
    load_official_catseg,
    shift_mask,
    sliding_inference,
    split_attention_qkv,
    split_qkv_state_dict,
    trainable_parameter_counts,
)
from lessons.checkpoints import trainable_keys
from lessons.classes import CLASSES, IGNORE_INDEX

SMALL = replace(TOY_CATSEG, pad_len=8)          # pads 5 classes, top-k filters 12


def random_inputs(cfg: CATSegConfig, T: int, B: int = 2, grid=(8, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    dense = torch.randn(B, cfg.embed_dim, h, w, generator=g)                    # (B, E, h, w)
    text = torch.randn(B, T, cfg.prompts, cfg.embed_dim, generator=g)           # (B, T, P, E)
    maps = [torch.randn(B, cfg.upsample_dims[0], 2 * h, 2 * w, generator=g),
            torch.randn(B, cfg.upsample_dims[1], 4 * h, 4 * w, generator=g)]
    return dense, text, maps


@pytest.fixture(scope="module")
def toy() -> CATSeg:
    torch.manual_seed(0)
    return build_toy_catseg()


# ----------------------------------------------------------------------------------------------
# The cost volume and the aggregator
# ----------------------------------------------------------------------------------------------


def test_cost_volume_is_the_cosine_similarity() -> None:
    dense, text, _ = random_inputs(TOY_CATSEG, T=3)
    cost = cost_volume(dense, text)
    assert cost.shape == (2, 1, 3, 8, 16)
    b, t, y, x = 1, 2, 5, 7
    expected = F.cosine_similarity(dense[b, :, y, x], text[b, t, 0], dim=0)
    assert torch.isclose(cost[b, 0, t, y, x], expected, atol=1e-6)
    assert torch.allclose(cost_volume(dense, text[0]), cost_volume(dense, text[:1].expand(2, -1,
                                                                                           -1, -1)))
    with pytest.raises(ValueError, match="same E"):
        cost_volume(dense, text[..., :5])


@pytest.mark.parametrize("attention", ["linear", "full"])
def test_aggregation_is_permutation_equivariant_over_classes(attention: str) -> None:
    cfg = replace(TOY_CATSEG, attention=attention)
    torch.manual_seed(0)
    agg = Aggregator(cfg).eval()
    dense, text, maps = random_inputs(cfg, T=7)
    perm = torch.randperm(7)
    with torch.no_grad():
        out = agg(dense, text, maps)
        permuted = agg(dense, text[:, perm], maps)
    assert out.shape == (2, 7, 32, 64)
    assert torch.allclose(permuted, out[:, perm], atol=1e-5)


def test_training_pools_the_class_aggregation_and_eval_does_not() -> None:
    torch.manual_seed(0)
    agg = Aggregator(TOY_CATSEG)
    dense, text, maps = random_inputs(TOY_CATSEG, T=4)
    with torch.no_grad():
        train_out = agg.train()(dense, text, maps)
        eval_out = agg.eval()(dense, text, maps)
    assert train_out.shape == eval_out.shape and not torch.allclose(train_out, eval_out)


def test_any_number_of_classes_and_the_top_k_cap() -> None:
    torch.manual_seed(0)
    agg = Aggregator(SMALL).eval()
    for T in (1, 3, 8):
        dense, text, maps = random_inputs(SMALL, T=T)
        assert agg(dense, text, maps).shape == (2, T, 32, 64)
    dense, text, maps = random_inputs(SMALL, T=20)
    with torch.no_grad():
        out = agg(dense, text, maps)
    dropped = (out == -100).all(-1).all(-1)                                       # (B, T)
    assert (dropped.sum(1) == 20 - 8).all()
    best = cost_volume(dense, text).amax(dim=(1, 3, 4)).topk(8, dim=1).indices
    kept = ~dropped
    for b in range(2):
        assert set(kept[b].nonzero().flatten().tolist()) == set(best[b].tolist())


@pytest.mark.parametrize("cfg, clip, classes", [(CATSEG_B, 512, 171), (CATSEG_L, 768, 171),
                                                (CATSEG_B, 512, 847)])
def test_shapes_at_the_published_configurations(cfg, clip, classes) -> None:
    with torch.device("meta"):
        agg = Aggregator(cfg).eval()
        dense = torch.empty(1, clip, 24, 24)
        text = torch.empty(1, classes, 1, clip)
        maps = [torch.empty(1, cfg.upsample_dims[0], 48, 48),
                torch.empty(1, cfg.upsample_dims[1], 96, 96)]
        assert agg(dense, text, maps).shape == (1, classes, 96, 96)


def test_trainable_counts_match_the_official_modules() -> None:
    """Counted from cvlab-kaist/CAT-Seg@6d3a188 (the released configs' 2 aggregation layers):
    1.354M layers, 0.754 / 1.082M guidance, 0.200M decoder, 2.360 / 3.146M upsamplers,
    20.45 / 64.49M CLIP q/v: about 25.1M and 70.3M."""
    b = trainable_parameter_counts(CATSEG_B, text_width=512, visual_depth=12, text_depth=12)
    l_ = trainable_parameter_counts(CATSEG_L, text_width=768, visual_depth=24, text_depth=12)
    assert b["aggregation layers"] == l_["aggregation layers"] == 1_354_240
    assert (b["cost embedding + guidance projections"],
            l_["cost embedding + guidance projections"]) == (754_224, 1_081_904)
    assert b["decoder + head"] == 200_497
    assert (b["upsample1 + upsample2"], l_["upsample1 + upsample2"]) == (2_359_680, 3_146_112)
    assert (b["CLIP q / v (image + text)"], l_["CLIP q / v (image + text)"]) == (20_447_232,
                                                                                 64_487_424)
    assert round(b["total"] / 1e6, 1) == 25.1 and round(l_["total"] / 1e6, 1) == 70.3


@pytest.mark.parametrize("bundle, cfg, total", [("clip_vitb16", CATSEG_B, 25_115_873),
                                                ("clip_vitl14_336", CATSEG_L, 70_270_177)])
def test_the_whole_model_on_meta_trains_what_the_official_code_trains(bundle, cfg, total) -> None:
    with torch.device("meta"):
        model = CATSeg(build_encoder(bundle, meta=True), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total
    clip = [n for n in trainable if n.startswith("encoder.")]
    assert clip and all(n.endswith(("q_proj_weight", "v_proj_weight")) for n in clip)
    assert any(".visual." in n for n in clip) and any(not n.startswith("encoder.model.visual")
                                                      for n in clip)      # both towers


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    assert CATSegConfig.from_dict({"hidden": 64, "pooling": [1, 1]}).pooling == (1, 1)
    with pytest.raises(ValueError, match="unknown CATSegConfig key"):
        CATSegConfig.from_dict({"hiden": 64})
    with pytest.raises(ValueError, match="attention"):
        CATSegConfig(attention="softmax")
    with pytest.raises(ValueError, match="guidance"):
        CATSegConfig(decoder_guidance_dims=(128, 16))


# ----------------------------------------------------------------------------------------------
# Pieces checked against references
# ----------------------------------------------------------------------------------------------


def test_shift_mask_equals_timms() -> None:
    block = SwinTransformerBlock(dim=32, input_resolution=(24, 24), num_heads=2, window_size=12,
                                 shift_size=6)
    ref = block.get_attn_mask(device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(shift_mask(24, 24, 12, 6), ref)


def test_linear_attention_equals_the_naive_formula() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    ref = torch.empty_like(v)
    for n in range(3):
        for m in range(2):
            weights = phi_q[n, :, m] @ phi_k[n, :, m].T                            # (S, S)
            ref[n, :, m] = weights @ v[n, :, m] / weights.sum(-1, keepdim=True)
    assert torch.allclose(linear_attention(q, k, v, eps=0.0), ref, atol=1e-10)


def test_class_residual_forms() -> None:
    """At pooling 1 the official residual adds x twice: code - paper == x after each layer's class
    aggregation; compare one ClassAggregation in both forms with the same weights."""
    from lessons.catseg import ClassAggregation
    torch.manual_seed(0)
    code = ClassAggregation(TOY_CATSEG)
    paper = ClassAggregation(replace(TOY_CATSEG, class_residual="paper"))
    paper.load_state_dict(code.state_dict())
    x = torch.randn(1, TOY_CATSEG.hidden, 3, 4, 8)
    g = torch.randn(1, 3, TOY_CATSEG.hidden)
    assert torch.allclose(code(x, g, (1, 1)) - paper(x, g, (1, 1)), x, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Fine-tuning CLIP's q and v
# ----------------------------------------------------------------------------------------------


def test_splitting_qkv_changes_no_output() -> None:
    torch.manual_seed(0)
    enc = build_encoder("toy_vlm", toy_weights_dir())
    images = torch.rand(2, 3, 64, 128)
    tokens = torch.randint(1, 1000, (3, 32))
    with torch.no_grad():
        before = (enc.model.encode_image(enc.normalize(images)), enc.model.encode_text(tokens))
        assert split_attention_qkv(enc.model) == 6 + 4          # visual + text blocks
        after = (enc.model.encode_image(enc.normalize(images)), enc.model.encode_text(tokens))
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert split_attention_qkv(enc.model) == 0                 # idempotent


def test_fused_to_split_converter_covers_every_key() -> None:
    fused = build_encoder("toy_vlm", toy_weights_dir()).model
    split = build_encoder("toy_vlm").model
    split_attention_qkv(split)
    converted = split_qkv_state_dict(fused.state_dict())
    result = split.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    q = fused.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"][:192]
    assert torch.equal(split.visual.transformer.resblocks[0].attn.q_proj_weight, q)
    with pytest.raises(ValueError, match="not \\(3D, D\\)"):
        split_qkv_state_dict({"a.in_proj_weight": torch.zeros(4, 2)})


def test_gradients_reach_exactly_what_trains(toy: CATSeg) -> None:
    toy.train()
    toy.zero_grad(set_to_none=True)
    images, labels = torch.rand(2, 3, 64, 128), torch.randint(0, 19, (2, 64, 128))
    toy.loss(images, labels)["loss_bce"].backward()
    # the dense path replaces the last visual block's attention by its value path, so that
    # block's q is "trainable" but never used: no gradient (as in the official code)
    unused = "encoder.model.visual.transformer.resblocks.5.attn.q_proj_weight"
    for name, p in toy.named_parameters():
        if p.requires_grad and name != unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    clip = [n for n, p in toy.encoder.named_parameters() if p.requires_grad]
    assert len(clip) == 2 * (6 + 4)
    assert all(n.endswith(("attn.q_proj_weight", "attn.v_proj_weight")) for n in clip)
    groups = toy.param_groups(0.05)
    mults = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    assert all(mults[id(p)] == 0.01 for p in toy.encoder.parameters() if p.requires_grad)
    assert all(mults[id(p)] == 1.0 for p in toy.aggregator.parameters())


# ----------------------------------------------------------------------------------------------
# Loss, labels, inference
# ----------------------------------------------------------------------------------------------


def test_loss_on_hand_cases() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    assert torch.isclose(catseg_loss(logits, labels), torch.tensor(math.log(2)))
    confident = torch.full((1, 3, 2, 2), -20.0)
    for i, k in enumerate([0, 1, 2]):
        confident[0, k, i // 2, i % 2] = 20.0
    confident[0, :, 1, 1] = 20.0              # the ignored pixel says "every class"
    assert catseg_loss(confident, labels) < 1e-6                           # masked out
    official = catseg_loss(confident, labels, official_ignore=True)       # trained to "none"
    assert torch.isclose(official, torch.tensor(3 * 20.0 / 12), atol=1e-4)
    with pytest.raises(ValueError, match="label values"):
        catseg_loss(logits, torch.tensor([[[0, 3], [0, 0]]]))


def test_held_out_class_is_ignored_in_training_and_scored_at_test(toy: CATSeg) -> None:
    bus = CLASSES.index("bus")
    assert "bus" not in toy.class_names and len(toy.class_names) == 18
    labels = torch.tensor([[[bus, 0, 18, IGNORE_INDEX]]])
    mapped = toy.map_labels(labels)
    assert mapped.tolist() == [[[IGNORE_INDEX, 0, 17, IGNORE_INDEX]]]
    toy.eval()
    images = torch.rand(2, 3, 64, 128)
    assert toy.predict(images).shape == (2, 19, 32, 64)
    for bad in (-3, 19, 254):
        with pytest.raises(ValueError, match="label values"):
            toy.map_labels(torch.tensor([[[bad]]]))


def test_open_vocabulary_inference_and_the_text_cache(toy: CATSeg) -> None:
    toy.eval()
    images = torch.rand(1, 3, 64, 128)
    names = ["road", "sky", "a purple elephant"]
    out = toy.predict(images, names)
    assert out.shape == (1, 3, 32, 64) and (out >= 0).all() and (out <= 1).all()
    assert len(toy.cache) == 1
    with torch.no_grad():
        reordered = toy.predict(images, names[::-1])
    assert torch.allclose(reordered, out.flip(1), atol=1e-5)     # class order does not matter
    toy.train()
    assert len(toy.cache) == 0                                     # training invalidates it
    toy.eval()


def test_sliding_inference_tiles_and_merges() -> None:
    def predict(crops):          # a "model" that returns the mean colour as one class
        return crops.mean(1, keepdim=True)
    images = torch.rand(2, 3, 50, 70)
    out = sliding_inference(predict, images, size=(64, 64), window=(32, 32), stride=(32, 32))
    assert out.shape == (2, 1, 50, 70)
    flat = torch.full((1, 3, 20, 20), 0.25)
    assert torch.allclose(sliding_inference(predict, flat, (640, 640), (384, 384), (256, 256)),
                          torch.full((1, 1, 20, 20), 0.25))
    with pytest.raises(ValueError, match="do not tile"):
        sliding_inference(predict, images, (64, 64), (32, 32), (20, 20))


# ----------------------------------------------------------------------------------------------
# Checkpoints: lesson and official
# ----------------------------------------------------------------------------------------------


def test_lesson_state_holds_the_trained_parts_only(toy: CATSeg) -> None:
    state = toy.trainable_state_dict()
    keys = trainable_keys(toy)
    assert set(state) <= keys and not any(k.startswith("encoder.vit.") for k in state)
    assert {t.data_ptr() for t in state.values()} == {toy.state_dict()[k].data_ptr() for k in keys}
    assert any(k.endswith("q_proj_weight") for k in state)
    assert not any(k.endswith(("k_proj_weight", "in_proj_bias", "ln_1.weight")) for k in state)


def official_like(model: CATSeg, fused_clip: bool) -> dict[str, torch.Tensor]:
    """A checkpoint laid out as the official CAT-Seg saves one (detectron2 names)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.") and not key.startswith("encoder.model."):
            continue                                     # our alias of the visual tower
        if key.startswith("aggregator."):
            out["sem_seg_head.predictor.transformer." + key[len("aggregator."):]] = value
        elif key.startswith("encoder.model."):
            out["sem_seg_head.predictor.clip_model." + key[len("encoder.model."):]] = value
        else:
            out[key] = value
    if fused_clip:
        for key in [k for k in out if k.endswith("q_proj_weight")]:
            stem = key[: -len("q_proj_weight")]
            parts = [out.pop(f"{stem}{n}_proj_weight") for n in "qkv"]
            out[stem + "in_proj_weight"] = torch.cat(parts)
    out["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"] = \
        shift_mask(8, 16, 4, 2)
    out["pixel_mean"] = torch.zeros(3)
    return out


@pytest.mark.parametrize("fused_clip", [False, True])
def test_official_converter_accounts_for_every_key(toy: CATSeg, fused_clip: bool,
                                                   tmp_path) -> None:
    torch.manual_seed(1)
    source = build_toy_catseg(pretrained=False)
    ckpt = {"model": official_like(source, fused_clip)}
    _, report = convert_official_catseg(ckpt, toy)
    assert report.ok, str(report)
    assert len(report.other) == 2 and "CAT-Seg tensors" in str(report)
    path = tmp_path / "model_base.pth"
    torch.save(ckpt, path)
    target = build_toy_catseg()
    load_official_catseg(path, target)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_official_converter_reports_problems(toy: CATSeg, tmp_path) -> None:
    ckpt = official_like(toy, fused_clip=False)
    ckpt.pop("sem_seg_head.predictor.transformer.head.weight")
    ckpt["sem_seg_head.predictor.transformer.extra.weight"] = torch.zeros(1)
    ckpt["upsample1.weight"] = torch.zeros(1)
    _, report = convert_official_catseg(ckpt, toy)
    assert report.missing == ["aggregator.head.weight", "upsample1.weight"]   # + mis-shaped
    assert report.unexpected == ["sem_seg_head.predictor.transformer.extra.weight"]
    assert len(report.mismatched) == 1 and not report.ok
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_official_catseg(path, toy)
    with pytest.raises(FileNotFoundError, match="hamacojr/CAT-Seg-weights"):
        load_official_catseg(tmp_path / "missing.pth", toy)
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_official_catseg(tmp_path / "corrupt.pth", toy)


def test_builder_checks() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        build_toy_catseg(held_out=("spaceship",))
    with pytest.raises(ValueError, match="OpenAI-style CLIP"):
        CATSeg(build_encoder("toy_vfm"), TOY_CATSEG)
    with pytest.raises(ValueError, match="width"):
        CATSeg(build_encoder("toy_vlm"), CATSEG_B)
