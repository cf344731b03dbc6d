"""lessons.mask2former: deformable attention, the decoder, matching, the loss, tqdm's text parts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lessons.checkpoints import load_lesson_checkpoint, save_lesson_checkpoint, trainable_keys
from lessons.mask2former import (
    MFUSER_M2F,
    REIN_M2F,
    TOY_M2F,
    TQDM_M2F,
    ContextDecoder,
    HungarianMatcher,
    IdentityMatcher,
    Mask2FormerConfig,
    Mask2FormerHead,
    MaskClassificationLoss,
    Prediction,
    RescaleNeck,
    SimpleFPN,
    dice_loss,
    head_parameter_count,
    language_regularizer,
    multi_scale_deformable_attention,
    neck_scales,
    pixel_text_loss,
    pixel_text_scores,
    semantic_inference,
    semantic_targets,
    slide_inference,
)
from lessons.toyworld import current_world

torch.manual_seed(0)


def toy_maps(B=2, C=192, grid=(8, 16), patch=8):
    maps = [torch.randn(B, C, *grid) for _ in range(4)]
    return RescaleNeck(patch)(maps)


# --- parameter counts at the papers' configurations (meta device) -----------------------------

def test_head_counts_match_the_papers():
    # Rein's decode head (~20.6M, Rein v1 §4.2, excluded from Rein's counts)
    assert head_parameter_count(REIN_M2F) == 20_579_796
    # MFuser's decode_head, counted from its modules (devinxzhang/MFuser@cd8ef85, tqdm's head):
    # 26.77M = pixel decoder 12.09 + decoder 14.21 + other 0.47
    assert head_parameter_count(MFUSER_M2F) == 26_766_292
    with torch.device("meta"):
        head = Mask2FormerHead(MFUSER_M2F)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(head.pixel_decoder) == 12_086_208
    decoder_layers = sum(count(layer) for layer in head.transformer_decoder.layers)
    assert decoder_layers + 512 == 14_209_280              # 9 layers + post_norm
    # tqdm on EVA02-CLIP-L: 1024-d maps, 768-d text, pixel FFN 2048 (derived by the same count)
    assert head_parameter_count(TQDM_M2F) == 25_717_716


def test_pixel_ffn_width_is_what_separates_1024_from_2048():
    # the config's 1024 vs mmcv 1.x's deprecated 2048 (docs/paper_vs_code.md): 6 layers x 2 x 256 x
    # 1024 weights (+ biases) apart
    narrow = head_parameter_count(Mask2FormerConfig(**{**TQDM_M2F.__dict__, "pixel_ffn": 1024}))
    assert head_parameter_count(TQDM_M2F) - narrow == 6 * (2 * 256 * 1024 + 1024)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown Mask2FormerConfig key"):
        Mask2FormerConfig.from_dict({"hiden_dim": 64})
    with pytest.raises(ValueError, match="query_source"):
        Mask2FormerConfig(query_source="clip")
    with pytest.raises(ValueError, match="one query per class"):
        Mask2FormerConfig(query_source="text", text_dim=64, num_queries=10)
    with pytest.raises(ValueError, match="input maps"):
        Mask2FormerConfig(in_channels=(64, 64))


# --- deformable attention --------------------------------------------------------------------

def test_deformable_attention_reads_exact_values_at_pixel_centres():
    shapes = [(2, 3), (4, 6)]
    value = torch.randn(1, 6 + 24, 1, 5)                                   # (B, S, heads, d)
    # one query, one point per level, all weight on level 1 at pixel (row 2, col 4)
    loc = torch.zeros(1, 1, 1, 2, 1, 2)
    loc[..., 1, 0, :] = torch.tensor([(4 + 0.5) / 6, (2 + 0.5) / 4])
    w = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2, 1)
    out = multi_scale_deformable_attention(value, shapes, loc, w)
    assert torch.allclose(out[0, 0], value[0, 6 + 2 * 6 + 4, 0])


def test_deformable_attention_matches_a_loop_reference():
    torch.manual_seed(1)
    shapes = [(3, 4), (5, 2)]
    B, heads, d, Nq, P = 2, 2, 3, 4, 3
    value = torch.randn(B, 12 + 10, heads, d)
    loc = torch.rand(B, Nq, heads, 2, P, 2)
    w = torch.rand(B, Nq, heads, 2, P)
    w = w / w.sum((-1, -2), keepdim=True)
    out = multi_scale_deformable_attention(value, shapes, loc, w)

    def bilinear(img, x, y):                         # img (h, w, d); x, y in pixel units
        h, wd, _ = img.shape
        x, y = x - 0.5, y - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        acc = torch.zeros(img.shape[-1])
        for dx, dy in itertools.product((0, 1), (0, 1)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < wd and 0 <= yi < h:
                acc += (1 - abs(x - xi)) * (1 - abs(y - yi)) * img[yi, xi]
        return acc

    starts = [0, 12]
    for b, q, hd in itertools.product(range(B), range(Nq), range(heads)):
        ref = torch.zeros(d)
        for lvl, (h, wd) in enumerate(shapes):
            img = value[b, starts[lvl]:starts[lvl] + h * wd, hd].view(h, wd, d)
            for p in range(P):
                x, y = loc[b, q, hd, lvl, p].tolist()
                ref += w[b, q, hd, lvl, p] * bilinear(img, x * wd, y * h)
        assert torch.allclose(out[b, q, hd * d:(hd + 1) * d], ref, atol=1e-5)


# --- the head ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["learnable", "text", "rein"])
def test_head_shapes(source):
    cfg = Mask2FormerConfig.from_dict({**TOY_M2F.__dict__, "query_source": source,
                                       "text_dim": 32 if source == "text" else None})
    head = Mask2FormerHead(cfg)
    maps = toy_maps()
    text = torch.randn(2, 19, 32) if source == "text" else None
    rq = torch.randn(19, 64) if source == "rein" else None
    preds = head(maps, text=text, rein_queries=rq)
    assert len(preds) == cfg.decoder_layers + 1
    for p in preds:
        assert p.class_logits.shape == (2, 19, 20)
        assert p.mask_logits.shape == (2, 19, 16, 32)               # stride 4 of a 64x128 image
    assert semantic_inference(preds[-1]).shape == (2, 19, 16, 32)


def test_head_input_errors():
    head = Mask2FormerHead(Mask2FormerConfig.from_dict({**TOY_M2F.__dict__,
                                                        "query_source": "rein"}))
    with pytest.raises(ValueError, match="token length must equal num_queries"):
        head(toy_maps(), rein_queries=torch.randn(10, 64))
    with pytest.raises(ValueError, match="expected 4 maps"):
        head(toy_maps()[:3], rein_queries=torch.randn(19, 64))
    text_head = Mask2FormerHead(Mask2FormerConfig.from_dict(
        {**TOY_M2F.__dict__, "query_source": "text", "text_dim": 32}))
    with pytest.raises(ValueError, match="class texts"):
        text_head(toy_maps())


def test_masked_attention_blocks_outside_the_previous_mask():
    head = Mask2FormerHead(TOY_M2F)
    dec = head.transformer_decoder
    q = torch.randn(1, 19, 64)
    mask_features = torch.randn(1, 64, 16, 32)
    pred, blocked = dec.predict(q, mask_features, (4, 8))
    small = F.interpolate(pred.mask_logits, size=(4, 8), mode="bilinear", align_corners=False)
    expect = (small.sigmoid() < 0.5).flatten(2)
    expect[expect.all(-1)] = False
    assert blocked.shape == (TOY_M2F.num_heads, 19, 32)
    assert torch.equal(blocked[0], expect[0]) and torch.equal(blocked[-1], expect[0])
    assert not blocked.all(-1).any()                        # no query is left with nothing


def test_necks_reach_strides_4_to_32():
    assert neck_scales(16) == (4.0, 2.0, 1.0, 0.5) and neck_scales(8) == (2.0, 1.0, 0.5, 0.25)
    maps = [torch.randn(1, 8, 32, 32) for _ in range(4)]           # a 512 crop at patch 16
    for neck in (RescaleNeck(16), SimpleFPN(8, 16)):
        assert [m.shape[-1] for m in neck(maps)] == [128, 64, 32, 16]
    fpn = SimpleFPN(8, 16)
    assert isinstance(fpn.fpn1[1], torch.nn.BatchNorm2d)
    assert isinstance(fpn.fpn4, torch.nn.MaxPool2d)


# --- targets and matching ------------------------------------------------------------------------

def test_semantic_targets_and_ignore():
    labels = torch.tensor([[[0, 0, 255], [3, 3, 0]]])
    (t,) = semantic_targets(labels)
    assert t.classes.tolist() == [0, 3]
    assert t.masks.shape == (2, 2, 3) and t.masks[0].sum() == 3 and t.masks[1].sum() == 2
    assert t.valid.sum() == 5                                          # the 255 pixel
    (empty,) = semantic_targets(torch.full((1, 2, 3), 255))
    assert len(empty.classes) == 0
    with pytest.raises(ValueError, match="label values"):
        semantic_targets(torch.tensor([[[0, 19]]]))
    with pytest.raises(ValueError, match="integer"):
        semantic_targets(torch.zeros(1, 2, 2))


def brute_force(cost):
    Q, n = cost.shape
    return min(sum(cost[q, j] for j, q in enumerate(perm))
               for perm in itertools.permutations(range(Q), n))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    Q, K = 5, 6
    labels = torch.randint(0, 3, (1, 8, 8), generator=g) * 2             # classes 0, 2, 4
    targets = semantic_targets(labels, K)
    pred = Prediction(torch.randn(1, Q, K + 1, generator=g), torch.randn(1, Q, 8, 8, generator=g))
    matcher = HungarianMatcher(num_points=None)
    (rows, cols), = matcher(pred, targets)
    cost = matcher.cost(pred.class_logits[0], pred.mask_logits[0], targets[0])
    assert len(rows) == len(targets[0].classes)
    assert math.isclose(cost[rows, cols].sum().item(), brute_force(cost), rel_tol=1e-6)


def test_hungarian_names_predictions_that_diverged():
    from lessons.train import NonFiniteLoss

    targets = semantic_targets(torch.tensor([[[1, 1, 0, 0]]]), 2)
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="the training diverged"):
        HungarianMatcher(num_points=None)(Prediction(torch.zeros(1, 2, 3), logits), targets)


def test_hungarian_costs_by_hand():
    t = semantic_targets(torch.tensor([[[1, 1, 0, 0]]]), 2)[0]          # classes [0, 1]
    logits = torch.tensor([[[10.0, 10.0, -10.0, -10.0]],                 # query 0: class 1's mask
                           [[-10.0, -10.0, 10.0, 10.0]]])                # query 1: class 0's mask
    cls = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    cost = HungarianMatcher(num_points=None).cost(cls, logits, t)        # (Q, n)
    assert cost[0, 1] < cost[0, 0] and cost[1, 0] < cost[1, 1]
    # class part: -softmax prob; dice part: 1 - (2*2 + 1) / (2 + 2 + 1) = 0 for a perfect match
    p = torch.softmax(cls, -1)
    assert math.isclose(cost[0, 1].item(), 2 * -p[0, 1].item() + 5 * 4.54e-5 + 5 * 0.0,
                        abs_tol=1e-3)


def test_identity_matching():
    targets = semantic_targets(torch.tensor([[[5, 2, 2, 255]]]))
    pred = Prediction(torch.zeros(1, 19, 20), torch.zeros(1, 19, 1, 4))
    (q, t), = IdentityMatcher()(pred, targets)
    assert q.tolist() == [2, 5] and targets[0].classes[t].tolist() == [2, 5]
    with pytest.raises(ValueError, match="one query per class"):
        IdentityMatcher()(Prediction(torch.zeros(1, 4, 20), torch.zeros(1, 4, 1, 4)), targets)


# --- the loss ------------------------------------------------------------------------------------

def test_dice_by_hand():
    logits = torch.tensor([[100.0, 100.0, -100.0, -100.0]])
    assert dice_loss(logits, torch.tensor([[1.0, 1.0, 0.0, 0.0]])).item() == pytest.approx(0.0)
    # p = (1, 1, 0, 0), t = (0, 0, 1, 1): 1 - 1 / 5
    assert dice_loss(logits, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).item() == pytest.approx(0.8)


def test_loss_values_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1]]])
    perfect = torch.tensor([[[[20.0, 20.0, -20.0, -20.0]], [[-20.0, -20.0, 20.0, 20.0]],
                             [[-20.0] * 4]]])                              # (1, Q=3, 1, 4)
    cls = torch.zeros(1, 3, 3)                                             # K = 2, uniform
    crit = MaskClassificationLoss(num_classes=2, matcher="identity", num_points=None)
    out = crit([Prediction(cls, perfect)], labels)
    # uniform class scores: CE = log 3 for every query, weights 1, 1, 0.1 -> the mean is log 3
    assert out["loss_cls"].item() == pytest.approx(2 * math.log(3), rel=1e-5)
    assert out["loss_mask"].item() < 1e-6 and out["loss_dice"].item() < 1e-6
    # two predictions (deep supervision) count twice
    twice = crit([Prediction(cls, perfect)] * 2, labels)
    assert twice["loss_cls"].item() == pytest.approx(2 * out["loss_cls"].item())
    # no-object weight: a confident "no object" on query 2 only changes its 0.1-weighted term
    cls2 = cls.clone()
    cls2[0, 2, 2] = 50.0
    out2 = crit([Prediction(cls2, perfect)], labels)
    assert out2["loss_cls"].item() == pytest.approx(2 * (2 * math.log(3)) / 2.1, rel=1e-4)


def test_loss_ignores_ignored_pixels_as_configured():
    labels = torch.tensor([[[0, 0, 255, 255]]])
    logits = torch.tensor([[[[20.0, 20.0, 20.0, 20.0]]]])                  # covers the ignored too
    cls = torch.zeros(1, 1, 2)
    official = MaskClassificationLoss(num_classes=1, matcher="identity", num_points=None)
    excluding = MaskClassificationLoss(num_classes=1, matcher="identity", num_points=None,
                                       exclude_ignored=True)
    a = official([Prediction(cls, logits)], labels)
    b = excluding([Prediction(cls, logits)], labels)
    assert a["loss_mask"].item() > 1.0        # ignored pixels are background of every mask
    assert b["loss_mask"].item() < 1e-6 and b["loss_dice"].item() < 1e-6
    # an image with no labelled pixel: only "no object" targets, zero mask losses, finite
    all_ignored = torch.full((1, 1, 4), 255)
    c = official([Prediction(cls, logits)], all_ignored)
    assert c["loss_mask"].item() == 0 and torch.isfinite(c["loss_cls"])


def test_point_sampled_loss_is_close_to_the_dense_one():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    smooth = F.interpolate(torch.randn(2, 3, 4, 4), size=(32, 32), mode="bilinear")
    pred = Prediction(torch.randn(2, 3, 4), smooth)                     # at the label size
    dense = MaskClassificationLoss(num_classes=3, matcher="identity", num_points=None)(
        [pred], labels)
    sampled = MaskClassificationLoss(num_classes=3, matcher="identity", num_points=20000,
                                     importance_sample_ratio=0.0)([pred], labels)
    for k in ("loss_mask", "loss_dice"):
        assert sampled[k].item() == pytest.approx(dense[k].item(), rel=0.05)


def test_unknown_matcher():
    with pytest.raises(ValueError, match="unknown matcher"):
        MaskClassificationLoss(matcher="greedy")


# --- inference -----------------------------------------------------------------------------------

def test_semantic_inference_by_hand():
    cls = torch.tensor([[[10.0, -10.0, -10.0], [-10.0, -10.0, 10.0]]])    # q0: class 0; q1: none
    masks = torch.tensor([[[[10.0, -10.0]], [[10.0, 10.0]]]])
    scores = semantic_inference(Prediction(cls, masks))
    assert scores.shape == (1, 2, 1, 2)
    assert scores[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-3)
    assert scores[0, 0, 0, 1] < 1e-3 and scores[0, 1].max() < 1e-3


def test_slide_inference_equals_whole_image_for_a_local_predictor():
    images = torch.rand(2, 3, 20, 33)
    predict = lambda x: torch.cat([x, x[:, :1] * 2], 1)                   # noqa: E731 (per pixel)
    whole = predict(images)
    slid = slide_inference(predict, images, crop=(12, 16), stride=(8, 10), num_classes=4)
    assert torch.allclose(slid, whole, atol=1e-6)
    small = slide_inference(predict, images, crop=64, stride=40, num_classes=4)  # crop > image
    assert torch.allclose(small, whole, atol=1e-6)
    with pytest.raises(ValueError, match="classes"):
        slide_inference(predict, images, crop=12, stride=8, num_classes=3)


# --- text: pixel-text alignment, context decoder, regularisers ------------------------------------

def test_pixel_text_loss_by_hand():
    dense = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)     # px0 = e0, px1 = e1
    text = torch.eye(2)
    scores = pixel_text_scores(dense, text)
    assert torch.allclose(scores, torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]))
    labels = torch.tensor([[[0, 255]]])
    per_px = F.cross_entropy(torch.tensor([[1.0, 0.0]]) / 0.07, torch.tensor([0]))
    official = pixel_text_loss(scores, labels)              # mean over both pixels (mmseg 0.16)
    assert official.item() == pytest.approx(per_px.item() / 2, rel=1e-5)
    assert pixel_text_loss(scores, labels, avg_non_ignore=True).item() == pytest.approx(
        per_px.item(), rel=1e-5)
    siglip = pixel_text_loss(scores, labels, logit_scale=math.log(10.0), logit_bias=-3.0,
                             avg_non_ignore=True)
    expect = F.cross_entropy(torch.tensor([[10.0 - 3.0, -3.0]]), torch.tensor([0]))
    assert siglip.item() == pytest.approx(expect.item(), rel=1e-5)


def test_context_decoder_shapes_and_init():
    ctx = ContextDecoder(32, width=16, heads=4, num_layers=2)
    out = ctx(torch.randn(19, 32), torch.randn(3, 1 + 12, 32))
    assert out.shape == (3, 19, 32)
    assert ctx.gamma.abs().max() <= 2.0 and ctx.gamma.std() > 0.3          # trunc_normal std 1
    small = ContextDecoder(32, width=16, num_layers=1, gamma_init=1e-4)
    assert torch.all(small.gamma == 1e-4)
    zero = ContextDecoder(32, width=16, num_layers=1, gamma_init=0.0).eval()
    t = torch.randn(2, 19, 32)
    assert torch.equal(zero(t, torch.randn(2, 5, 32)), t)


def test_language_regularizer():
    anchors = torch.eye(4)
    loss = language_regularizer(anchors.clone(), anchors)
    expect = F.cross_entropy(torch.eye(4), torch.arange(4))
    assert loss.item() == pytest.approx(expect.item())
    assert language_regularizer(anchors.roll(1, 0), anchors) > loss


# --- the segmentors on the toy models ------------------------------------------------------------

@pytest.fixture(scope="module")
def tqdm_model():
    from lessons.mask2former import build_toy_tqdm
    return build_toy_tqdm()


@pytest.fixture(scope="module")
def rein_model():
    from lessons.mask2former import build_toy_rein_mask2former
    return build_toy_rein_mask2former()


def test_tqdm_gradients_reach_what_trains(tqdm_model):
    m = tqdm_model
    m.zero_grad(set_to_none=True)
    images, labels = torch.rand(2, 3, 64, 128), torch.randint(0, 19, (2, 64, 128))
    labels[:, :8] = 255
    losses = m.loss(images, labels)
    assert set(losses) == {"loss_cls", "loss_mask", "loss_dice", "loss_pixel_text",
                           "loss_language", "loss_visual"}
    sum(losses.values()).backward()
    assert m.prompts.contexts.grad is not None and m.prompts.contexts.grad.abs().sum() > 0
    assert m.encoder.vit.conv1.weight.grad is not None            # the visual tower fine-tunes
    assert m.head.text_proj[0].weight.grad is not None
    assert m.context_decoder.gamma.grad is not None
    assert m.encoder.model.token_embedding.weight.grad is None    # the text tower is frozen
    assert all(p.grad is None for p in m.initial_encoder.parameters())
    groups = {(g["weight_decay"], g["lr_mult"]) for g in m.param_groups(0.05)}
    assert (0.05, 0.1) in groups and (0.05, 1.0) in groups        # encoder + neck at 0.1x lr
    assert m.predict(images).shape == (2, 19, 16, 32)


def test_rein_link_gradients(rein_model):
    m = rein_model
    m.zero_grad(set_to_none=True)
    losses = m.loss(torch.rand(2, 3, 64, 128), torch.randint(0, 19, (2, 64, 128)))
    sum(losses.values()).backward()
    assert m.reins.learnable_tokens_a.grad is not None            # through the link and features
    assert m.reins.merge.weight.grad is not None and m.head.querys2feat.weight.grad is not None
    assert all(p.grad is None for p in m.encoder.parameters())
    assert not m.encoder.training
    m.train()
    assert not m.encoder.training                                 # frozen means eval mode


def test_segmentor_checks():
    from lessons.backbones import build_encoder
    from lessons.mask2former import MaskFormerSegmentor
    enc = build_encoder("toy_vfm")
    text_head = Mask2FormerHead(Mask2FormerConfig.from_dict(
        {**TOY_M2F.__dict__, "query_source": "text", "text_dim": 32}))
    with pytest.raises(ValueError, match="need prompts"):
        MaskFormerSegmentor(enc, RescaleNeck(8), text_head, MaskClassificationLoss())
    rein_head = Mask2FormerHead(Mask2FormerConfig.from_dict(
        {**TOY_M2F.__dict__, "query_source": "rein"}))
    with pytest.raises(ValueError, match="link_to_queries"):
        MaskFormerSegmentor(enc, RescaleNeck(8), rein_head, MaskClassificationLoss())


def test_checkpoint_round_trip_keeps_frozen_parts_out(tqdm_model, tmp_path):
    m = tqdm_model
    state = m.trainable_state_dict()
    assert not any(k.startswith(("initial_encoder.", "prompts.token_embedding")) for k in state)
    assert not any("token_embedding" in k for k in state)                # 3.2M frozen rows
    assert "prompts.contexts" in state
    assert set(state) <= trainable_keys(m)
    meta = {"builder": "lessons.mask2former:build_toy_tqdm", "builder_kwargs": {},
            "toyworld_version": current_world(), "lessons_digest": "0" * 16, "method": "tqdm",
            "seed": 0}
    path = save_lesson_checkpoint(tmp_path / "t.safetensors", state, meta)
    loaded, _ = load_lesson_checkpoint(path)
    assert torch.allclose(loaded.prompts.contexts, m.prompts.contexts.half().float())
    # a file without the trained visual tower is refused
    partial = {k: v for k, v in state.items() if "conv1" not in k}
    save_lesson_checkpoint(tmp_path / "p.safetensors", partial, meta)
    with pytest.raises(ValueError, match="lacks trained tensors"):
        load_lesson_checkpoint(tmp_path / "p.safetensors")
