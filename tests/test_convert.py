"""reprod.convert: a Rein checkpoint in the official (mmseg / mmdet 3.x) names converts to ours,
every official name matches mmdet 3.x's Mask2Former module names, and the CLI writes a checkpoint
that reprod.evaluate loads."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from lessons.checkpoints import trainable_keys, trainable_state_dict
from lessons.mask2former import build_toy_rein_mask2former
from reprod.convert import convert_official_rein_model, main
from reprod.evaluate import load_trained
from reprod.models import rein_mask2former

# The head's keys in mmdet 3.x naming (mmdet/models/dense_heads/mask2former_head.py and
# mmdet/models/layers/transformer/mask2former_layers.py, with Rein's querys2feat:
# w1oves/Rein@7da85bc rein/models/heads/rein_mask2former.py), and the Reins under backbone.reins.
OFFICIAL_PATTERNS = [
    r"backbone\.reins\.(learnable_tokens_[ab]|scale|mlp_token2feat|mlp_delta_f|transform|merge)",
    r"decode_head\.pixel_decoder\.input_convs\.\d\.(conv|gn)\.",
    r"decode_head\.pixel_decoder\.encoder\.layers\.\d+\.self_attn\.(sampling_offsets|"
    r"attention_weights|value_proj|output_proj)\.",
    r"decode_head\.pixel_decoder\.encoder\.layers\.\d+\.(ffn\.layers\.0\.0|ffn\.layers\.1|"
    r"norms\.[01])\.",
    r"decode_head\.pixel_decoder\.(level_encoding|mask_feature)\.",
    r"decode_head\.pixel_decoder\.(lateral_convs|output_convs)\.0\.(conv|gn)\.",
    r"decode_head\.transformer_decoder\.layers\.\d+\.(self_attn\.attn|cross_attn\.attn|"
    r"ffn\.layers\.0\.0|ffn\.layers\.1|norms\.[012])\.",
    r"decode_head\.transformer_decoder\.post_norm\.",
    r"decode_head\.(level_embed|cls_embed|mask_embed\.[024]|querys2feat)\.",
]


def to_official(name: str) -> str:
    """Our name -> the official one, written independently of reprod.convert's rules."""
    if name.startswith("reins."):
        return "backbone." + name
    n = name.removeprefix("head.")
    pd = "pixel_decoder.encoder.layers"
    subs = [
        (r"^pixel_decoder\.input_convs\.(\d)\.0\.", r"pixel_decoder.input_convs.\1.conv."),
        (r"^pixel_decoder\.input_convs\.(\d)\.1\.", r"pixel_decoder.input_convs.\1.gn."),
        (r"^pixel_decoder\.layers\.(\d+)\.ffn\.0\.", pd + r".\1.ffn.layers.0.0."),
        (r"^pixel_decoder\.layers\.(\d+)\.ffn\.2\.", pd + r".\1.ffn.layers.1."),
        (r"^pixel_decoder\.layers\.(\d+)\.norm1\.", pd + r".\1.norms.0."),
        (r"^pixel_decoder\.layers\.(\d+)\.norm2\.", pd + r".\1.norms.1."),
        (r"^pixel_decoder\.layers\.(\d+)\.", pd + r".\1."),
        (r"^pixel_decoder\.lateral_conv\.0\.", "pixel_decoder.lateral_convs.0.conv."),
        (r"^pixel_decoder\.lateral_conv\.1\.", "pixel_decoder.lateral_convs.0.gn."),
        (r"^pixel_decoder\.output_conv\.0\.", "pixel_decoder.output_convs.0.conv."),
        (r"^pixel_decoder\.output_conv\.1\.", "pixel_decoder.output_convs.0.gn."),
        (r"^transformer_decoder\.layers\.(\d+)\.(cross|self)_attn\.",
         r"transformer_decoder.layers.\1.\2_attn.attn."),
        (r"^transformer_decoder\.layers\.(\d+)\.ffn\.0\.",
         r"transformer_decoder.layers.\1.ffn.layers.0.0."),
        (r"^transformer_decoder\.layers\.(\d+)\.ffn\.2\.",
         r"transformer_decoder.layers.\1.ffn.layers.1."),
        (r"^transformer_decoder\.(level_embed|cls_embed|mask_embed)\.", r"\1."),
    ]
    for pattern, repl in subs:
        if re.match(pattern, n):
            n = re.sub(pattern, repl, n)
            break
    n = re.sub(r"^(transformer_decoder\.layers\.\d+)\.norm(\d)\.",
               lambda m: f"{m.group(1)}.norms.{int(m.group(2)) - 1}.", n)
    return "decode_head." + n


def _official(model) -> dict[str, torch.Tensor]:
    sd = {to_official(k): v.clone() for k, v in trainable_state_dict(model).items()}
    sd["decode_head.query_embed.weight"] = torch.zeros(19, 64)   # mmdet's own, unused by Rein
    sd["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # a frozen key: left alone
    return {"state_dict": sd, "meta": {}}


def test_official_names_follow_mmdet_at_full_scale():
    model = rein_mask2former(meta=True)
    state = model.state_dict()
    keys = sorted(trainable_keys(model))           # (trainable_state_dict dedups by pointer)
    names = [to_official(k) for k in keys]
    unmatched = [n for n in names if not any(re.match(p, n) for p in OFFICIAL_PATTERNS)]
    assert not unmatched, unmatched[:5]
    sd = {n: torch.empty(state[k].shape, device="meta") for n, k in zip(names, keys, strict=True)}
    out, report = convert_official_rein_model(sd, model)
    assert report.ok and len(out) == len(names) == len(report.converted)


def test_round_trip_and_report():
    torch.manual_seed(0)
    trained = build_toy_rein_mask2former(pretrained=False)
    fresh = build_toy_rein_mask2former(pretrained=False)
    sd, report = convert_official_rein_model(_official(trained), fresh)
    assert report.ok, str(report)
    assert sorted(report.other) == ["backbone.blocks.0.attn.qkv.weight",
                                    "decode_head.query_embed.weight"]
    ours = trainable_state_dict(trained)
    assert sd.keys() == ours.keys() and all(torch.equal(sd[k], ours[k]) for k in sd)
    assert "not yet verified" in str(report)


def test_cli_writes_what_evaluate_loads_and_refuses_a_bad_file(tmp_path, capsys):
    trained = build_toy_rein_mask2former()
    ckpt = _official(trained)
    torch.save(ckpt, tmp_path / "rein.pth")
    out = tmp_path / "ours.safetensors"
    assert main(["rein", "toy_rein", str(tmp_path / "rein.pth"), str(out)]) == 0
    fresh = build_toy_rein_mask2former()
    load_trained(fresh, out)
    assert torch.equal(fresh.head.querys2feat.weight, trained.head.querys2feat.weight)
    ckpt["state_dict"]["decode_head.cls_embed.weight"] = torch.zeros(5, 5)
    del ckpt["state_dict"]["decode_head.querys2feat.bias"]
    torch.save(ckpt, tmp_path / "bad.pth")
    capsys.readouterr()
    assert main(["rein", "toy_rein", str(tmp_path / "bad.pth"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "mismatched (1): decode_head.cls_embed.weight (5, 5)" in err
    assert "head.querys2feat.bias" in err
    assert main(["rein", "toy_rein", str(tmp_path / "none.pth"), str(tmp_path / "x")]) == 2
    assert "w1oves/Rein" in capsys.readouterr().err
    assert load_file(str(out))                                # written, readable


def test_rein_checkpoint_needs_reins():
    from reprod.models import mask2former

    with pytest.raises(ValueError, match="needs a model with Reins"):
        convert_official_rein_model({}, mask2former(meta=True))
