"""MFuser: MVFuser, the fused dual encoder, MTEnhancer, the segmentor, counts, the converter."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lessons import mfuser as mf
from lessons.backbones import build_encoder
from lessons.checkpoints import trainable_keys
from lessons.mask2former import ContextDecoder
from lessons.ssm import selective_scan_ref


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 128, generator=g), torch.randint(0, 19, (2, 64, 128), generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mf.build_toy_mfuser(pretrained=False)


def _count(m):
    return sum(p.numel() for p in m.parameters())


# -- MVFuser -------------------------------------------------------------------------------------


def test_mvfuser_parameter_counts_match_the_official_modules():
    with torch.device("meta"):
        big, small = mf.MVFuser(1024), mf.MVFuser(256)
    assert _count(big) == 1_667_585          # the paper's Table 3: 1.67 M
    assert _count(small) == 109_697
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert shapes == {"in_proj.weight": (1024, 1024), "conv1d_x.weight": (512, 1, 3),
                      "conv1d_z.weight": (512, 1, 3), "x_proj.weight": (96, 512),
                      "dt_proj.weight": (512, 64), "dt_proj.bias": (512,), "A_log": (512, 16),
                      "D": (512,), "norm.weight": (512,), "out_proj.weight": (1024, 512),
                      "scale": ()}


def _mvfuser_by_hand(m, h, bias_twice=True, silu_twice=True):
    """The official forward written out with the step-by-step reference scan."""
    x, z = F.linear(h, m.in_proj.weight).transpose(1, 2).chunk(2, dim=1)
    x = F.silu(F.conv1d(x, m.conv1d_x.weight, padding=1, groups=x.shape[1]))
    z = F.conv1d(z, m.conv1d_z.weight, padding=1, groups=z.shape[1])
    z = F.silu(z) if silu_twice else z
    dt, B, C = F.linear(x.transpose(1, 2), m.x_proj.weight).split([m.dt_rank, 16, 16], -1)
    delta = F.linear(dt, m.dt_proj.weight) + (m.dt_proj.bias if bias_twice else 0)
    y = selective_scan_ref(x, delta.transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2),
                           C.transpose(1, 2), m.D, delta_bias=m.dt_proj.bias,
                           delta_softplus=True).transpose(1, 2)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight
    y = y * F.silu(z.transpose(1, 2))
    return F.linear(y, m.out_proj.weight) * m.scale


@pytest.mark.parametrize("bias_twice,silu_twice", [(True, True), (False, True), (True, False)])
def test_mvfuser_forward_equals_the_code_written_out(bias_twice, silu_twice):
    torch.manual_seed(0)
    m = mf.MVFuser(32, dt_bias_twice=bias_twice, gate_silu_twice=silu_twice).eval()
    with torch.no_grad():
        m.scale.fill_(0.5)
    h = torch.randn(2, 11, 32)
    ours = m(h)
    assert torch.allclose(ours, _mvfuser_by_hand(m, h, bias_twice, silu_twice), atol=1e-5)
    flipped = mf.MVFuser(32, dt_bias_twice=not bias_twice, gate_silu_twice=silu_twice).eval()
    flipped.load_state_dict(m.state_dict())
    assert not torch.allclose(flipped(h), ours, atol=1e-5)     # the flag changes the forward


def test_mvfuser_scan_is_one_directional_and_its_conv_looks_one_token_ahead():
    torch.manual_seed(0)
    m = mf.MVFuser(32).eval()
    h = torch.randn(1, 12, 32)
    h2 = h.clone()
    h2[:, -1] += 1.0                               # change the last token only
    diff = (m(h2) - m(h)).abs().amax(-1)[0]        # (L,)
    assert bool((diff[:-2] == 0).all())            # earlier tokens never see it ...
    assert diff[-2] > 0 and diff[-1] > 0           # ... but the 'same' conv lets t = L-2 peek


def test_mvfuser_starts_near_zero_and_has_dropout():
    torch.manual_seed(0)
    m = mf.MVFuser(64)
    assert m.scale.item() == pytest.approx(1e-3)
    h = torch.randn(2, 9, 64)
    assert m.eval()(h).abs().max() < 1e-2 * h.abs().max()
    m.train()
    assert not torch.equal(m(h), m(h))             # dropout 0.1 on the output
    softplus_bias = F.softplus(m.dt_proj.bias)
    assert bool(((softplus_bias > 0.9e-3) & (softplus_bias < 0.11)).all())   # Δ in [1e-3, 0.1]


def test_mvfuser_rejects_bad_input():
    m = mf.MVFuser(16)
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="scan_impl"):
        mf.MVFuser(16, scan_impl="triton")


# -- the fused encoder -----------------------------------------------------------------------------


def test_fused_maps_concatenate_both_towers_and_equal_them_when_fusers_are_silent(model, batch):
    images, _ = batch
    enc = model.encoder
    out = enc(images)
    assert [tuple(m.shape) for m in out["maps"]] == [(2, 384, 8, 16)] * 4
    assert tuple(out["dense"].shape) == (2, 128, 8, 16)
    assert tuple(out["global"].shape) == (2, 128)
    silent = mf.build_toy_mfuser(pretrained=False)
    silent.load_state_dict(model.state_dict())
    for f, p2 in zip(silent.encoder.fusers, silent.encoder.proj2, strict=True):
        f.mixer.scale.data.zero_()
        p2.bias.data.zero_()                      # P2(0) would add its bias
    silent.encoder.proj3.weight.data.zero_()
    silent.encoder.proj3.bias.data.zero_()
    silent.eval()
    fused = silent.encoder(images)
    maps_d = silent.encoder.vfm.forward_tokens(silent.encoder.vfm.normalize(images))[0]
    maps_v, tokens_v, grid = silent.encoder.vlm.forward_tokens(
        silent.encoder.vlm.normalize(images))
    for m, d, v in zip(fused["maps"], maps_d, maps_v, strict=True):
        assert torch.allclose(m, torch.cat([d, v], 1), atol=1e-5)
    dense = silent.encoder.vlm.dense_embedding(tokens_v, grid)       # the VLM's own, unfused
    assert torch.allclose(fused["dense"], dense, atol=1e-5)


def test_fused_encoder_checks_its_pair():
    vfm, vlm = build_encoder("toy_vfm"), build_encoder("toy_vlm")
    with pytest.raises(ValueError, match="must be a VLM"):
        mf.FusedEncoder(vlm, vfm)
    big = build_encoder("dinov2_vitl14", meta=True)
    with pytest.raises(ValueError, match="equal depth and width"):
        mf.FusedEncoder(big, vlm)
    with pytest.raises(ValueError, match="unknown fusion"):
        mf.FusedEncoder(vfm, vlm, fusion="concat-conv")
    enc = mf.FusedEncoder(vfm, vlm)
    vfm.set_patch_size(16)
    with pytest.raises(ValueError, match="token grids differ"):
        enc(torch.rand(1, 3, 64, 128))


@pytest.mark.parametrize("fusion", mf.FUSIONS)
def test_every_fusion_has_the_same_interface_and_trains_only_its_own_parts(fusion, batch):
    images, labels = batch
    torch.manual_seed(0)
    m = mf.build_toy_mfuser(fusion=fusion, pretrained=False)
    losses = m.loss(images, labels)
    assert set(losses) == {"loss_cls", "loss_mask", "loss_dice", "loss_pixel_text"}
    sum(losses.values()).backward()
    towers = [p for t in (m.encoder.vfm, m.encoder.vlm) for p in t.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in towers)
    if fusion == "none":
        assert m.encoder.fusers is None and m.encoder.proj1 is None
    else:
        assert all(p.grad is not None for p in m.encoder.fusers.parameters())
    assert m.prompts.contexts.grad is not None


def test_fusion_alternatives_sizes_at_full_width():
    """Table 3's per-adapter counts at C = 1024: MVFuser 1.67 M, self-attention 4.20 M,
    separate self-attention 8.40 M."""
    with torch.device("meta"):
        sizes = {f: _count(mf.make_fuser(f, 1024, 16)) for f in mf.FUSIONS if f != "none"}
    assert round(sizes["mvfuser"] / 1e6, 2) == 1.67
    assert round(sizes["self_attention"] / 1e6, 2) == 4.20
    assert round(sizes["separate_self_attention"] / 1e6, 2) == 8.40
    assert sizes["separate_mvfusers"] == 2 * sizes["mvfuser"]


# -- MTEnhancer and the context decoder ------------------------------------------------------------


def test_mtenhancer_counts_and_init():
    with torch.device("meta"):
        layer = mf.MTEnhancer(256)
    assert _count(layer) == 899_201
    for E, expected in ((768, 1_494_401), (1024, 1_692_289)):
        ctx = mf.build_context_decoder(E)
        assert _count(ctx) - ctx.gamma.numel() == expected   # the official one holds gamma outside
    fuser = ctx.decoder[0].cross_attn
    assert torch.count_nonzero(fuser.dt_proj.bias) == 0     # re-initialised with the decoder
    assert fuser.in_proj.weight.std() < 0.03                 # trunc_normal(0.02), not default
    assert torch.equal(fuser.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))


def test_mtenhancer_copies_the_text_around_the_image_and_drops_the_visual_part():
    torch.manual_seed(0)
    layer = mf.MTEnhancer(32, heads=4).eval()
    x, visual = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    y = layer.norm1(x)
    h = x + layer.self_attn(y, y, y)
    y = layer.norm2(h)
    s = layer.cross_attn(torch.cat([y, visual, y], 1))
    assert s.shape[1] == 5 + 7 + 5
    h = h + s[:, :5] + s[:, -5:]
    expected = h + layer.mlp(layer.norm3(h))
    assert torch.allclose(layer(x, visual), expected, atol=1e-6)


def test_context_decoder_choices():
    assert mf.build_context_decoder(64, 32, enhancer="none") is None
    attn = mf.build_context_decoder(64, 32, enhancer="attention")
    assert isinstance(attn, ContextDecoder) and not isinstance(attn.decoder[0], mf.MTEnhancer)
    with pytest.raises(ValueError, match="unknown enhancer"):
        mf.build_context_decoder(64, enhancer="transformer")


# -- the segmentor -------------------------------------------------------------------------------


def test_segmentor_trains_fusers_text_and_head_never_the_towers(model, batch):
    images, labels = batch
    model.zero_grad()
    losses = model.loss(images, labels)
    sum(losses.values()).backward()
    keys = trainable_keys(model)
    assert not any(k.startswith(("encoder.vfm.", "encoder.vlm.")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"encoder", "neck", "head", "prompts",
                                               "context_decoder"}
    for name in ("encoder.fusers.0.mixer.in_proj.weight", "encoder.proj1.0.weight",
                 "encoder.proj3.weight", "context_decoder.decoder.0.cross_attn.A_log",
                 "context_decoder.gamma", "prompts.contexts"):
        assert dict(model.named_parameters())[name].grad is not None, name
    assert model.training and not model.encoder.vlm.training and model.encoder.fusers.training
    model.eval()
    assert tuple(model.predict(images).shape) == (2, 19, 16, 32)
    model.train()


def test_pixel_text_forms(model, batch):
    _, labels = batch
    scores = torch.randn(2, 19, 8, 16)
    soft = mf.pixel_text_loss(scores, labels, logit_scale=2.0, logit_bias=-10.0)
    assert torch.allclose(soft, mf.pixel_text_loss(scores, labels, logit_scale=2.0))  # bias cancels
    sig = mf.pixel_text_sigmoid_loss(scores, labels, 2.0, -10.0)
    onehot = F.one_hot(labels, 19).permute(0, 3, 1, 2).float()
    logits = F.interpolate(scores * torch.e ** 2 - 10, size=(64, 128), mode="bilinear")
    assert torch.allclose(sig, F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum")
                          / labels.numel(), atol=1e-5)
    with pytest.raises(ValueError, match="needs SigLIP"):
        mf.MFuserSegmentor(model.encoder, model.neck, model.head, model.criterion,
                           prompts=model.prompts, pixel_text_form="sigmoid")


def test_toy_counts(model):
    parts = mf.trainable_parameter_counts(model)
    assert parts["fusers"] == 6 * 63_073                    # MVFuser(192): D/2 96, R 12
    assert parts["projections P1 P2 P3"] == 13 * (192 * 192 + 192)
    assert parts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant,total", [("clip", 170.06), ("eva", 118.65)])
def test_published_trainable_totals_on_meta(variant, total):
    """The totals of the official modules, counted (devinxzhang/MFuser@cd8ef85): CLIP 170.06 M;
    EVA02 118.65 M, which counts the official model's unused ``random_text`` (19 x 768)."""
    parts = mf.trainable_parameter_counts(mf.build_mfuser(variant, meta=True))
    assert parts["fusers"] == 24 * 1_667_585
    assert parts["context decoder"] == 1_494_401
    assert parts["Mask2Former head"] == 26_766_292
    assert parts["FPN"] == 50_341_888
    unused = 19 * 768 if variant == "eva" else 0
    assert round((parts["total"] + unused) / 1e6, 2) == total


def test_siglip_parts_on_meta():
    """SigLIP: no projections are used (the code creates 51.43 M of them that never train: the
    official total of 170.39 M counts them); the 1024-d text makes the decoder 1,692,289."""
    vfm = build_encoder("dinov2_vitl14", meta=True)
    vlm = build_encoder("siglip_vitl16_384", meta=True)
    with torch.device("meta"):
        enc = mf.FusedEncoder(vfm, vlm)
        ctx = mf.build_context_decoder(1024)
        head = mf.Mask2FormerHead(replace(mf.MFUSER_M2F, text_dim=1024))
        fpn = mf.SimpleFPN(2048)
    assert enc.proj1 is None
    ours = (_count(enc.fusers) + _count(fpn) + _count(ctx) + _count(head) + 5 * 1024)
    assert round((ours + 51_430_400) / 1e6, 2) == 170.39


# -- the official checkpoint -----------------------------------------------------------------------


def _official_name(ours: str) -> str:
    """Our name -> the official one, written from the official state-dict keys (the inverse
    direction of the converter, so the two are checked against each other)."""
    import re
    rules = [(r"^encoder\.fusers\.(\d+)\.mixer\.", r"backbone.adapter.\1."),
             (r"^encoder\.proj([12])\.(\d+)\.", r"backbone.adapter_proj\1.\2."),
             (r"^encoder\.proj3\.", "backbone.adapter_proj3."),
             (r"^neck\.", "backbone."), (r"^context_decoder\.gamma$", "gamma"),
             (r"^prompts\.contexts$", "contexts")]
    for p, r in rules:
        if re.match(p, ours):
            return re.sub(p, r, ours)
    if ours.startswith("context_decoder."):
        return ours
    name = "decode_head." + ours[len("head."):]
    for p, r in [(r"pixel_decoder\.input_convs\.(\d)\.0\.", r"pixel_decoder.input_convs.\1.conv."),
                 (r"pixel_decoder\.input_convs\.(\d)\.1\.", r"pixel_decoder.input_convs.\1.gn."),
                 (r"pixel_decoder\.layers\.(\d+)\.self_attn\.",
                  r"pixel_decoder.encoder.layers.\1.attentions.0."),
                 (r"pixel_decoder\.layers\.(\d+)\.text_attn\.",
                  r"pixel_decoder.encoder.layers.\1.attentions.1.attn."),
                 (r"pixel_decoder\.layers\.(\d+)\.norm1\.",
                  r"pixel_decoder.encoder.layers.\1.norms.0."),
                 (r"pixel_decoder\.layers\.(\d+)\.norm_text\.",
                  r"pixel_decoder.encoder.layers.\1.norms.1."),
                 (r"pixel_decoder\.layers\.(\d+)\.norm2\.",
                  r"pixel_decoder.encoder.layers.\1.norms.2."),
                 (r"pixel_decoder\.layers\.(\d+)\.ffn\.", r"pixel_decoder.encoder.layers.\1.ffn."),
                 (r"pixel_decoder\.post_norm\.", "pixel_decoder.encoder.post_norm."),
                 (r"pixel_decoder\.lateral_conv\.0\.", "pixel_decoder.lateral_convs.0.conv."),
                 (r"pixel_decoder\.lateral_conv\.1\.", "pixel_decoder.lateral_convs.0.gn."),
                 (r"pixel_decoder\.output_conv\.0\.", "pixel_decoder.output_convs.0.conv."),
                 (r"pixel_decoder\.output_conv\.1\.", "pixel_decoder.output_convs.0.gn."),
                 (r"transformer_decoder\.layers\.(\d+)\.cross_attn\.",
                  r"transformer_decoder.layers.\1.attentions.0.attn."),
                 (r"transformer_decoder\.layers\.(\d+)\.self_attn\.",
                  r"transformer_decoder.layers.\1.attentions.1.attn."),
                 (r"transformer_decoder\.layers\.(\d+)\.norm([123])\.", None),
                 (r"\.ffn\.0\.", ".ffns.0.layers.0.0."), (r"\.ffn\.2\.", ".ffns.0.layers.1."),
                 (r"transformer_decoder\.(level_embed|cls_embed|mask_embed)\.", r"\1.")]:
        if r is None:
            name = re.sub(p, lambda m: f"transformer_decoder.layers.{m[1]}.norms."
                          f"{int(m[2]) - 1}.", name)
        else:
            name = re.sub(p, r, name)
    return name


def _official_checkpoint(model):
    from lessons.checkpoints import trainable_state_dict
    sd = {_official_name(k): v.clone() for k, v in trainable_state_dict(model).items()}
    sd["contexts"] = sd["contexts"][None]                     # the code's (1, N_ctx, C)
    sd["backbone.dinov2.blocks.0.norm1.weight"] = torch.ones(192)   # frozen: not converted
    sd["text_encoder.ln_final.weight"] = torch.ones(64)
    return {"state_dict": sd, "meta": {}}


def test_converter_round_trip_on_the_toy_model(model, tmp_path):
    ckpt = _official_checkpoint(model)
    torch.manual_seed(1)
    fresh = mf.build_toy_mfuser(pretrained=False)
    sd, report = mf.convert_official_mfuser(ckpt, fresh)
    assert report.ok, str(report)
    assert sorted(report.other) == ["backbone.dinov2.blocks.0.norm1.weight",
                                    "text_encoder.ln_final.weight"]
    fresh.load_state_dict(sd, strict=False)
    ours = model.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], ours[k]) for k in sd)
    path = tmp_path / "mfuser.pth"
    torch.save(ckpt, path)
    assert mf.load_official_mfuser(path, fresh).ok
    del ckpt["state_dict"]["backbone.adapter.0.A_log"]
    ckpt["state_dict"]["backbone.adapter.0.B_log"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"missing \(1\).*A_log(?s:.*)unexpected \(1\).*B_log"):
        mf.load_official_mfuser(path, fresh)
    with pytest.raises(FileNotFoundError, match="devinxzhang/MFuser"):
        mf.load_official_mfuser(tmp_path / "nope.pth", fresh)


def test_converter_names_match_the_official_key_list_at_full_size():
    """Keys and shapes of the official state dict (CLIP variant, listed from the modules of
    devinxzhang/MFuser@cd8ef85) land on our tensors."""
    ours = mf.build_mfuser("clip", meta=True).state_dict()
    listed = {
        "backbone.adapter.3.in_proj.weight": (1024, 1024), "backbone.adapter.3.x_proj.weight":
        (96, 512), "backbone.adapter.23.conv1d_z.weight": (512, 1, 3),
        "backbone.adapter_proj1.5.weight": (1024, 1024), "backbone.adapter_proj3.bias": (1024,),
        "backbone.fpn1.0.weight": (2048, 2048, 2, 2), "backbone.fpn1.1.running_var": (2048,),
        "backbone.fpn1.3.weight": (2048, 2048, 2, 2), "backbone.fpn2.0.bias": (2048,),
        "gamma": (768,), "context_decoder.memory_proj.1.weight": (256, 768),
        "context_decoder.decoder.0.self_attn.q_proj.weight": (256, 256),
        "context_decoder.decoder.0.cross_attn.x_proj.weight": (48, 128),
        "context_decoder.decoder.0.cross_attn.dt_proj.weight": (128, 16),
        "context_decoder.decoder.0.mlp.3.weight": (256, 1024),
        "context_decoder.out_proj.1.weight": (768, 256),
        "decode_head.pixel_decoder.input_convs.0.conv.weight": (256, 2048, 1, 1),
        "decode_head.pixel_decoder.input_convs.2.gn.bias": (256,),
        "decode_head.pixel_decoder.encoder.layers.5.attentions.0.sampling_offsets.weight":
        (192, 256),
        "decode_head.pixel_decoder.encoder.layers.0.attentions.1.attn.in_proj_weight": (768, 256),
        "decode_head.pixel_decoder.encoder.layers.0.ffns.0.layers.0.0.weight": (2048, 256),
        "decode_head.pixel_decoder.encoder.layers.0.ffns.0.layers.1.weight": (256, 2048),
        "decode_head.pixel_decoder.encoder.layers.2.norms.1.weight": (256,),
        "decode_head.pixel_decoder.encoder.post_norm.weight": (256,),
        "decode_head.pixel_decoder.level_encoding.weight": (3, 256),
        "decode_head.pixel_decoder.lateral_convs.0.conv.weight": (256, 2048, 1, 1),
        "decode_head.pixel_decoder.output_convs.0.conv.weight": (256, 256, 3, 3),
        "decode_head.pixel_decoder.mask_feature.weight": (256, 256, 1, 1),
        "decode_head.pixel_decoder.text_proj.weight": (256, 768),
        "decode_head.pixel_decoder.text_pos_embed.weight": (19, 256),
        "decode_head.transformer_decoder.layers.8.attentions.0.attn.in_proj_weight": (768, 256),
        "decode_head.transformer_decoder.layers.8.ffns.0.layers.0.0.weight": (2048, 256),
        "decode_head.transformer_decoder.layers.0.norms.2.bias": (256,),
        "decode_head.transformer_decoder.post_norm.weight": (256,),
        "decode_head.query_embed.weight": (19, 256), "decode_head.level_embed.weight": (3, 256),
        "decode_head.text_proj.2.weight": (256, 256), "decode_head.cls_embed.weight": (20, 256),
        "decode_head.mask_embed.4.weight": (256, 256),
    }
    for key, shape in listed.items():
        name = mf.official_to_ours(key)
        assert name in ours, (key, name)
        assert tuple(ours[name].shape) == shape, key
    assert mf.official_to_ours("backbone.dinov2.blocks.0.attn.qkv.weight") is None
    assert mf.official_to_ours("random_text") is None


# -- GPU: the fused kernel inside the MVFuser, the toy model on CUDA ---------------------------


@pytest.mark.gpu
def test_gpu_mvfuser_kernel_agrees_with_the_pure_pytorch_scan():
    """At MFuser's full shape (d_model 1024, L = 2 x 1025 tokens): mamba_ssm's kernel (as the
    official code calls it) vs the chunked scan, forward and gradients."""
    from lessons import ssm
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not ssm.mamba_ssm_available():
        pytest.skip("needs mamba_ssm: python -m reprod.install_mamba_ssm")
    torch.manual_seed(0)
    m = mf.MVFuser(1024).cuda().eval()
    h = torch.randn(2, 2050, 1024, device="cuda")
    outs, grads = {}, {}
    for impl in ("cuda", "fast"):
        m.scan_impl = impl
        m.zero_grad()
        out = m(h)
        out.square().sum().backward()
        outs[impl] = out.detach().double()
        grads[impl] = {k: p.grad.double() for k, p in m.named_parameters()}
    rel = (outs["fast"] - outs["cuda"]).norm() / outs["cuda"].norm()
    assert rel < 1e-3, rel
    for k, g in grads["cuda"].items():
        assert (grads["fast"][k] - g).norm() / g.norm().clamp(min=1e-12) < 1e-2, k


@pytest.mark.gpu
def test_gpu_toy_mfuser_trains_and_predicts_like_the_cpu(batch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images, labels = batch
    torch.manual_seed(0)
    cpu = mf.build_toy_mfuser(pretrained=False).eval()
    gpu = mf.build_toy_mfuser(pretrained=False).cuda()
    gpu.load_state_dict(cpu.state_dict())
    losses = gpu.train().loss(images.cuda(), labels.cuda())
    sum(losses.values()).backward()
    assert gpu.encoder.fusers[0].mixer.in_proj.weight.grad is not None
    gpu.eval()
    assert torch.allclose(gpu.predict(images.cuda()).cpu(), cpu.predict(images), atol=1e-3)


def test_the_near_twins_control_puts_a_second_vlm_tower_in_the_vfm_slot(batch):
    """The lesson's precondition control: the same MFuser with the VLM's image tower in both
    slots (two towers with one set of blind spots), fused or concatenated."""
    images, labels = batch
    from lessons.utils import count_parameters

    twins = mf.build_toy_mfuser(pretrained=False, first_tower="toy_vlm")
    assert twins.encoder.vfm.bundle.name == twins.encoder.vlm.bundle.name == "toy_vlm"
    assert count_parameters(twins) == count_parameters(mf.build_toy_mfuser(pretrained=False))
    assert torch.isfinite(sum(twins.loss(images, labels).values()))
    concat = mf.build_toy_mfuser(pretrained=False, first_tower="toy_vlm", fusion="none")
    assert concat.encoder.fusers is None
