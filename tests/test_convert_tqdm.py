"""lessons.convert's tqdm converter: the official state dict's keys and shapes (EVA02-CLIP-L at 512)
land on our real-scale model with nothing missing, unexpected or mis-shaped; a renamed, missing or
mis-shaped key is reported; a toy checkpoint round-trips through a file and reprod.evaluate's
``--official tqdm``.

The official key list below is written from the modules of ByeongHyunPak/tqdm@46e616c (the
code files' only stored version; the project pins 75168af; mmseg 0.16 / mmcv 1.x) with the config
``configs/tqdm/tqdm_eva_vit-l_1e-5_20k-g2c-512.py``, independently of the converter's rules:

- ``models/segmentors/tqdm_eva_clip.py``: ``backbone`` and ``text_encoder`` (the EVA-CLIP model's
  ``visual`` and ``text``, ``models/backbones/eva_clip/factory.py`` ``get_backbone``),
  ``context_decoder``, ``decode_head``, ``contexts`` (1, 13 - 5, 768), ``gamma`` (768,) and
  ``reg_E0`` (a deep copy of the backbone); the identity head's ``conv_seg`` is None (no keys).
- ``models/backbones/eva_clip/eva_vit_model.py`` with EVA02-CLIP-L-14-336 (width 1024, 24 blocks,
  head width 64, mlp_ratio 2.6667, subln, naiveswiglu, rope with intp_freq, qkv_bias, no layer
  scale, CLS-token pooling: ``norm`` and ``head`` (768, 1024)) at image_size 512: a 36 x 36 grid;
  ``fpn1`` (ConvT, SyncBN, GELU, ConvT) and ``fpn2`` (Sequential(ConvT)); RoPE tables
  (36 * 36, 64) under ``rope`` and every block's ``attn.rope`` (``rope.py``
  ``VisionRotaryEmbeddingFast``).
- ``models/backbones/clip/models.py`` ``ContextDecoder`` (width 256, 3 layers, visual_dim 768).
- ``mmseg/models/decode_heads/tqdm_head.py`` ``tqdmHead``: ``query_embed`` (19, 256),
  ``text_proj`` (Linear, ReLU, Linear), ``level_embed``, ``cls_embed`` (20, 256), ``mask_embed``
  (three Linear); the decoder input projections are Identity (256 = 256, not enforced).
- ``mmseg/models/plugins/tqdm_msdeformattn_pixel_decoder.py``: ``input_convs`` (3 ConvModules,
  conv + gn, bias), the encoder (mmcv 1.x ``DetrTransformerDecoder``, 6 layers: attentions.0 =
  MultiScaleDeformableAttention 8 heads x 3 levels x 4 points, attentions.1 = MultiheadAttention
  on the texts, ffns.0, norms.0-2, and ``post_norm``), ``level_encoding``, one lateral and one
  output ConvModule (no bias: GN), ``mask_feature``, ``text_proj`` (256, 768), ``text_pos_embed``
  (19, 256). The FFNs are 2048 wide: the layer config's top-level ``feedforward_channels=2048``
  overrides ``ffn_cfgs``' 1024 (mmcv 1.x ``BaseTransformerLayer`` maps that deprecated argument
  into ``ffn_cfgs``).
- The transformer decoder: mmcv 1.x ``DetrTransformerDecoder``, 9 layers (attentions.0 cross,
  attentions.1 self, ffns.0, norms.0-2) and ``post_norm``.
"""

from __future__ import annotations

import re

import pytest
import torch

from lessons.checkpoints import trainable_keys, trainable_state_dict
from lessons.convert import convert_official_tqdm, load_official_tqdm
from lessons.mask2former import build_toy_tqdm
from reprod.evaluate import OFFICIAL
from reprod.evaluate import load_official as evaluate_load_official
from reprod.models import tqdm_mask2former

C, E, D, K = 1024, 768, 256, 19         # tower width, joint width, decoder width, classes
EVA_MLP, FFN, GRID = 2730, 2048, 36     # int(1024 * 2.6667); 512 // 14


def _linear(keys: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    keys[f"{name}.weight"] = (out, inp)
    if bias:
        keys[f"{name}.bias"] = (out,)


def _norm(keys: dict, name: str, dim: int) -> None:
    keys[f"{name}.weight"] = keys[f"{name}.bias"] = (dim,)


def _mha(keys: dict, name: str, dim: int) -> None:           # torch's nn.MultiheadAttention
    keys[f"{name}.in_proj_weight"], keys[f"{name}.in_proj_bias"] = (3 * dim, dim), (3 * dim,)
    _linear(keys, f"{name}.out_proj", dim, dim)


def _eva_tower(prefix: str) -> dict[str, tuple[int, ...]]:
    keys = {f"{prefix}cls_token": (1, 1, C), f"{prefix}pos_embed": (1, GRID * GRID + 1, C),
            f"{prefix}patch_embed.proj.weight": (C, 3, 14, 14),
            f"{prefix}patch_embed.proj.bias": (C,),
            f"{prefix}rope.freqs_cos": (GRID * GRID, 64),
            f"{prefix}rope.freqs_sin": (GRID * GRID, 64)}
    for i in range(24):
        b = f"{prefix}blocks.{i}."
        _norm(keys, b + "norm1", C)
        _norm(keys, b + "norm2", C)
        for p in "qkv":
            _linear(keys, f"{b}attn.{p}_proj", C, C, bias=False)
        keys[b + "attn.q_bias"] = keys[b + "attn.v_bias"] = (C,)
        _norm(keys, b + "attn.inner_attn_ln", C)
        _linear(keys, b + "attn.proj", C, C)
        keys[b + "attn.rope.freqs_cos"] = keys[b + "attn.rope.freqs_sin"] = (GRID * GRID, 64)
        _linear(keys, b + "mlp.w1", EVA_MLP, C)
        _linear(keys, b + "mlp.w2", EVA_MLP, C)
        _norm(keys, b + "mlp.ffn_ln", EVA_MLP)
        _linear(keys, b + "mlp.w3", C, EVA_MLP)
    _norm(keys, prefix + "norm", C)
    _linear(keys, prefix + "head", E, C)
    keys[f"{prefix}fpn1.0.weight"] = keys[f"{prefix}fpn1.3.weight"] = (C, C, 2, 2)
    keys[f"{prefix}fpn1.0.bias"] = keys[f"{prefix}fpn1.3.bias"] = (C,)
    for b in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}fpn1.1.{b}"] = (C,)
    keys[f"{prefix}fpn1.1.num_batches_tracked"] = ()
    keys[f"{prefix}fpn2.0.weight"], keys[f"{prefix}fpn2.0.bias"] = (C, C, 2, 2), (C,)
    return keys


def official_tqdm_eva_keys() -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of the official tqdm EVA02-CLIP-L state dict; the text tower by a
    few representative keys (it is not converted, so its shapes do not matter here)."""
    keys = _eva_tower("backbone.")
    keys |= _eva_tower("reg_E0.")
    keys |= {"text_encoder.positional_embedding": (13, E),
             "text_encoder.token_embedding.weight": (49408, E),
             "text_encoder.transformer.resblocks.0.ln_1.weight": (E,),
             "text_encoder.ln_final.weight": (E,), "text_encoder.text_projection": (E, E)}
    keys["contexts"], keys["gamma"] = (1, 8, E), (E,)
    cd = "context_decoder."
    _norm(keys, cd + "memory_proj.0", E)
    _linear(keys, cd + "memory_proj.1", D, E)
    _norm(keys, cd + "memory_proj.2", D)
    _norm(keys, cd + "text_proj.0", E)
    _linear(keys, cd + "text_proj.1", D, E)
    for i in range(3):
        b = f"{cd}decoder.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in "qkv":
                _linear(keys, f"{b}{attn}.{p}_proj", D, D, bias=False)
            _linear(keys, f"{b}{attn}.proj", D, D)
        for n in (1, 2, 3):
            _norm(keys, f"{b}norm{n}", D)
        _linear(keys, b + "mlp.0", 4 * D, D)
        _linear(keys, b + "mlp.3", D, 4 * D)
    _norm(keys, cd + "out_proj.0", D)
    _linear(keys, cd + "out_proj.1", E, D)
    pd = "decode_head.pixel_decoder."
    for i in range(3):
        keys[f"{pd}input_convs.{i}.conv.weight"] = (D, C, 1, 1)
        keys[f"{pd}input_convs.{i}.conv.bias"] = (D,)
        _norm(keys, f"{pd}input_convs.{i}.gn", D)
    for i in range(6):
        b = f"{pd}encoder.layers.{i}."
        _linear(keys, b + "attentions.0.sampling_offsets", 8 * 3 * 4 * 2, D)
        _linear(keys, b + "attentions.0.attention_weights", 8 * 3 * 4, D)
        _linear(keys, b + "attentions.0.value_proj", D, D)
        _linear(keys, b + "attentions.0.output_proj", D, D)
        _mha(keys, b + "attentions.1.attn", D)
        _linear(keys, b + "ffns.0.layers.0.0", FFN, D)
        _linear(keys, b + "ffns.0.layers.1", D, FFN)
        for n in range(3):
            _norm(keys, f"{b}norms.{n}", D)
    _norm(keys, pd + "encoder.post_norm", D)
    keys[pd + "level_encoding.weight"] = (3, D)
    keys[pd + "lateral_convs.0.conv.weight"] = (D, C, 1, 1)
    _norm(keys, pd + "lateral_convs.0.gn", D)
    keys[pd + "output_convs.0.conv.weight"] = (D, D, 3, 3)
    _norm(keys, pd + "output_convs.0.gn", D)
    keys[pd + "mask_feature.weight"], keys[pd + "mask_feature.bias"] = (D, D, 1, 1), (D,)
    _linear(keys, pd + "text_proj", D, E)
    keys[pd + "text_pos_embed.weight"] = (K, D)
    td = "decode_head.transformer_decoder."
    for i in range(9):
        b = f"{td}layers.{i}."
        _mha(keys, b + "attentions.0.attn", D)
        _mha(keys, b + "attentions.1.attn", D)
        _linear(keys, b + "ffns.0.layers.0.0", FFN, D)
        _linear(keys, b + "ffns.0.layers.1", D, FFN)
        for n in range(3):
            _norm(keys, f"{b}norms.{n}", D)
    _norm(keys, td + "post_norm", D)
    keys["decode_head.query_embed.weight"] = (K, D)
    _linear(keys, "decode_head.text_proj.0", D, E)
    _linear(keys, "decode_head.text_proj.2", D, D)
    keys["decode_head.level_embed.weight"] = (3, D)
    _linear(keys, "decode_head.cls_embed", K + 1, D)
    for n in (0, 2, 4):
        _linear(keys, f"decode_head.mask_embed.{n}", D, D)
    return keys


def _not_converted(key: str) -> bool:
    return key.startswith(("text_encoder.", "reg_E0.")) or bool(
        re.search(r"rope\.freqs_(cos|sin)$", key))


@pytest.fixture(scope="module")
def real_scale():
    return tqdm_mask2former(meta=True)


def _meta_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict:
    return {"state_dict": {k: torch.empty(s, device="meta") for k, s in keys.items()},
            "meta": {}}


def test_the_official_key_list_converts_cleanly_at_full_scale(real_scale):
    keys = official_tqdm_eva_keys()
    out, report = convert_official_tqdm(_meta_checkpoint(keys), real_scale)
    assert report.ok, str(report)[:2000]
    assert sorted(report.other) == sorted(k for k in keys if _not_converted(k))
    assert len(report.converted) == len(out) == len(keys) - len(report.other)
    # every trained tensor of ours is loaded once (the encoder.vit alias is the same tensor)
    state = real_scale.state_dict(keep_vars=True)
    trained = {id(state[k]) for k in trainable_keys(real_scale)}
    assert {id(state[k]) for k in out} == trained and len(out) == len(trained)
    assert "encoder.model.visual.trunk.blocks.23.mlp.fc1_g.weight" in out
    assert "not yet verified" in str(report) and report.what == "tqdm"


def test_renamed_missing_and_mis_shaped_keys_are_reported(real_scale):
    keys = official_tqdm_eva_keys()
    keys["decode_head.class_embed.weight"] = keys.pop("decode_head.cls_embed.weight")  # renamed
    del keys["backbone.blocks.3.attn.q_bias"]                                           # missing
    keys["backbone.pos_embed"] = (1, 24 * 24 + 1, C)          # trained at 336, not 512
    _, report = convert_official_tqdm(_meta_checkpoint(keys), real_scale)
    assert not report.ok
    assert report.unexpected == ["decode_head.class_embed.weight"]
    assert report.mismatched == ["backbone.pos_embed (1, 577, 1024) vs ours (1, 1297, 1024)"]
    assert report.missing == ["encoder.model.visual.trunk.blocks.3.attn.q_proj.bias",
                              "encoder.model.visual.trunk.pos_embed",       # (the mis-shaped)
                              "head.transformer_decoder.cls_embed.weight"]
    text = str(report)
    assert "missing (3)" in text and "unexpected (1)" in text and "mismatched (1)" in text


# -- the toy model: values through a file, and reprod.evaluate's --official tqdm ---------------


def _to_official(name: str) -> str:
    """Our name -> the official tqdm one (the toy's tower is an OpenAI-style CLIP, whose names
    tqdm's CLIP variant keeps: models/backbones/clip/models.py ``CLIPVisionTransformer``)."""
    rules = [(r"^encoder\.model\.visual\.", "backbone."), (r"^neck\.fpn2\.", "backbone.fpn2.0."),
             (r"^neck\.", "backbone."), (r"^context_decoder\.gamma$", "gamma"),
             (r"^prompts\.contexts$", "contexts"), (r"^context_decoder\.", "context_decoder.")]
    for p, r in rules:
        if re.match(p, name):
            return re.sub(p, r, name)
    n = name.removeprefix("head.")
    pd = "pixel_decoder.encoder.layers"
    for p, r in [(r"^pixel_decoder\.input_convs\.(\d)\.0\.", r"pixel_decoder.input_convs.\1.conv."),
                 (r"^pixel_decoder\.input_convs\.(\d)\.1\.", r"pixel_decoder.input_convs.\1.gn."),
                 (r"^pixel_decoder\.layers\.(\d+)\.self_attn\.", pd + r".\1.attentions.0."),
                 (r"^pixel_decoder\.layers\.(\d+)\.text_attn\.", pd + r".\1.attentions.1.attn."),
                 (r"^pixel_decoder\.layers\.(\d+)\.norm1\.", pd + r".\1.norms.0."),
                 (r"^pixel_decoder\.layers\.(\d+)\.norm_text\.", pd + r".\1.norms.1."),
                 (r"^pixel_decoder\.layers\.(\d+)\.norm2\.", pd + r".\1.norms.2."),
                 (r"^pixel_decoder\.layers\.(\d+)\.ffn\.", pd + r".\1.ffn."),
                 (r"^pixel_decoder\.post_norm\.", "pixel_decoder.encoder.post_norm."),
                 (r"^pixel_decoder\.lateral_conv\.0\.", "pixel_decoder.lateral_convs.0.conv."),
                 (r"^pixel_decoder\.lateral_conv\.1\.", "pixel_decoder.lateral_convs.0.gn."),
                 (r"^pixel_decoder\.output_conv\.0\.", "pixel_decoder.output_convs.0.conv."),
                 (r"^pixel_decoder\.output_conv\.1\.", "pixel_decoder.output_convs.0.gn."),
                 (r"^transformer_decoder\.layers\.(\d+)\.cross_attn\.",
                  r"transformer_decoder.layers.\1.attentions.0.attn."),
                 (r"^transformer_decoder\.layers\.(\d+)\.self_attn\.",
                  r"transformer_decoder.layers.\1.attentions.1.attn."),
                 (r"^(transformer_decoder\.layers\.\d+)\.norm(\d)\.",
                  lambda m: f"{m[1]}.norms.{int(m[2]) - 1}."),
                 (r"\.ffn\.0\.", ".ffns.0.layers.0.0."), (r"\.ffn\.2\.", ".ffns.0.layers.1."),
                 (r"^transformer_decoder\.(level_embed|cls_embed|mask_embed)\.", r"\1.")]:
        n = re.sub(p, r, n)
    return "decode_head." + n


def _official_toy_checkpoint(model) -> dict:
    sd = {_to_official(k): v.clone() for k, v in trainable_state_dict(model).items()}
    sd["contexts"] = sd["contexts"][None]                       # the code's (1, N_ctx, E)
    sd["text_encoder.ln_final.weight"] = torch.ones(3)          # frozen: not converted
    sd["reg_E0.conv1.weight"] = torch.ones(3)
    return {"state_dict": sd, "meta": {}}


def test_a_toy_checkpoint_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    trained = build_toy_tqdm(pretrained=False)
    torch.manual_seed(1)
    fresh = build_toy_tqdm(pretrained=False)
    ckpt = _official_toy_checkpoint(trained)
    path = tmp_path / "tqdm.pth"
    torch.save(ckpt, path)
    assert "tqdm" in OFFICIAL
    report = evaluate_load_official(fresh, path, "tqdm")
    assert report.ok and sorted(report.other) == ["reg_E0.conv1.weight",
                                                  "text_encoder.ln_final.weight"]
    assert report.sha256 and not report.verified
    ours, theirs = fresh.state_dict(), trained.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in trainable_keys(trained))
    del ckpt["state_dict"]["gamma"]
    ckpt["state_dict"]["contexts"] = torch.zeros(1, 3, 7)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*missing \(2\).*context_decoder\.gamma"
                                         r".*mismatched \(1\): contexts \(3, 7\)"):
        load_official_tqdm(path, fresh)
    assert not evaluate_load_official(fresh, path, "tqdm", strict=False).ok   # --lenient
    with pytest.raises(FileNotFoundError, match="ByeongHyunPak/tqdm"):
        load_official_tqdm(tmp_path / "none.pth", fresh)


def test_a_tqdm_checkpoint_needs_a_tqdm_model():
    from reprod.models import mask2former

    with pytest.raises(ValueError, match="needs a tqdm model"):
        convert_official_tqdm({}, mask2former(meta=True))
