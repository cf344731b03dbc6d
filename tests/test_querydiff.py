"""QueryDiff: diffusion teacher, agent queries, consistency loss, refinement, segmentor."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lessons import querydiff as qd
from lessons.checkpoints import build_model, load_lesson_checkpoint, save_lesson_checkpoint
from lessons.toyworld import current_world
from lessons.utils import count_parameters


@pytest.fixture(scope="module")
def teacher():
    """The toy teacher's architecture with random weights (the tests do not need the trained
    ones; ``test_toy_weights`` covers the committed file)."""
    torch.manual_seed(0)
    return qd.DiffusionTeacher.toy(None)          # random weights, the current world's U-Net


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 128, generator=g), torch.randint(0, 19, (2, 64, 128), generator=g)


def _model(teacher, **kw):
    torch.manual_seed(0)
    m = qd.build_toy_querydiff(pretrained=False, teacher_weights=None, **kw)
    if m.alpha:
        m.teacher = teacher
    return m


# -- the teacher ---------------------------------------------------------------------------------


def test_timesteps_match_stable_diffusions_noise_levels():
    sd, toy = qd.sd_scheduler(), qd.toy_scheduler()
    assert float(sd.alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-5)
    assert qd.matching_timestep(sd, float(sd.alphas_cumprod[100])) == 100
    t_w, t_s = qd.toy_timesteps()
    assert (t_w, t_s) == (5, 100)
    for t_toy, t_sd in zip((t_w, t_s), qd.SD_TIMESTEPS, strict=True):
        assert float(toy.alphas_cumprod[t_toy]) == pytest.approx(
            float(sd.alphas_cumprod[t_sd]), abs=2e-3)


def test_teacher_features_shapes_channels_and_frozen(teacher, batch):
    images, _ = batch
    f = teacher.features(images)
    shapes = [(64, 8, 16), (64, 16, 32), (32, 32, 64)]
    assert [tuple(x.shape[1:]) for x in f.weak] == shapes
    assert [tuple(x.shape[1:]) for x in f.strong] == shapes
    assert teacher.channels == (64, 64, 32)
    assert teacher.channels == tuple(qd.unet_channels()[j] for j in qd.TOY_FEATURE_LAYERS)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(x.requires_grad for x in f.weak + f.strong)
    teacher.train()
    assert not teacher.training                             # stays in eval mode


def test_teacher_noise_is_shared_and_seedable(teacher, batch):
    images, _ = batch
    a = teacher.features(images, generator=torch.Generator().manual_seed(3))
    b = teacher.features(images, generator=torch.Generator().manual_seed(3))
    c = teacher.features(images, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.strong, b.strong, strict=True))
    assert not torch.allclose(a.strong[0], c.strong[0])
    # the weak view is nearly clean: its features move far less with the noise draw
    weak_change = (a.weak[0] - c.weak[0]).norm() / a.weak[0].norm()
    strong_change = (a.strong[0] - c.strong[0]).norm() / a.strong[0].norm()
    assert weak_change < strong_change


def test_the_teacher_stops_after_its_last_hook_and_reads_the_same_features(teacher, batch):
    """Reading features stops the U-Net once its last hooked layer has run; the features equal
    those the same hooks see in a whole forward, and a plain call of the U-Net still runs whole."""
    images, _ = batch
    t_w = teacher.timesteps[0]
    ran = []
    spy = teacher.unet.conv_out.register_forward_hook(lambda *args: ran.append("conv_out"))
    try:
        read = teacher.features_at(images, [t_w], torch.Generator().manual_seed(0))[0]
        assert ran == []                              # nothing after the last hook ran
        z0 = teacher.encode(images)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((images.shape[0],), t_w)
        teacher._captured = []
        teacher.unet(teacher.scheduler.add_noise(z0, noise, t), t)          # the whole U-Net
        assert ran == ["conv_out"]
        assert len(read) == len(teacher._captured) == len(teacher.layers)
        assert all(torch.equal(a, b.float()) for a, b in zip(read, teacher._captured, strict=True))
    finally:
        spy.remove()


def test_cache_features_equals_seeded_features(teacher, batch):
    images, _ = batch
    cached = qd.cache_features(teacher, images, batch_size=2, seed=5)
    direct = teacher.features(images, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(cached.weak, direct.weak, strict=True))
    sub = cached[torch.tensor([1])]
    assert sub.strong[2].shape[0] == 1 and torch.equal(sub.strong[2][0], cached.strong[2][1])


def test_teacher_rejects_bad_input(teacher):
    with pytest.raises(ValueError, match="expected images"):
        teacher.features(torch.rand(2, 1, 64, 128))
    with pytest.raises(ValueError, match="timesteps"):
        qd.DiffusionTeacher(teacher.unet, qd.toy_scheduler(), (5, 1000), qd.TOY_FEATURE_LAYERS)
    with pytest.raises(ValueError, match="within 0..999"):
        teacher.features_at(torch.rand(1, 3, 64, 128), [0, 1000])
    with pytest.raises(ValueError, match="no up_blocks"):
        qd.DiffusionTeacher(teacher.unet, qd.toy_scheduler(), (5, 100), [(7, 0)])


def test_toy_unet_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reprod.toy.pretrain diffusion"):
        qd.build_toy_unet(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        qd.build_toy_unet(bad)


def _tiny_stable_diffusion(root):
    """A random Stable Diffusion in diffusers' directory layout, a few MB, made offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=8, layers_per_block=1).save_pretrained(root / "vae")
    UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=32, attention_head_dim=8,
                         sample_size=16).save_pretrained(root / "unet")
    qd.sd_scheduler().save_pretrained(root / "scheduler")
    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=77)).save_pretrained(root / "text_encoder")
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1,
                                                "road</w>": 2}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt")).save_pretrained(tok)


def test_stable_diffusion_path_loads_a_local_directory(tmp_path):
    pytest.importorskip("transformers")
    _tiny_stable_diffusion(tmp_path)
    teacher = qd.DiffusionTeacher.from_pretrained(tmp_path, layers=((0, 1), (1, 1)))
    assert teacher.timesteps == qd.SD_TIMESTEPS
    assert teacher.prompt_embedding.shape == (1, 77, 32)          # the empty prompt
    images = torch.rand(2, 3, 64, 64)
    z0 = teacher.encode(images)
    assert z0.shape == (2, 4, 32, 32)                              # through the VAE
    expected = qd.SD_LATENT_SCALE * teacher.vae.encode(2 * images - 1).latent_dist.mean
    assert torch.allclose(z0, expected)
    f = teacher.features(images, generator=torch.Generator().manual_seed(0))
    assert [tuple(x.shape) for x in f.weak] == [(2, 32, 16, 16), (2, 16, 32, 32)]
    assert teacher.channels == (32, 16)


def test_stable_diffusion_path_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="missing .*vae"):
        qd.DiffusionTeacher.from_pretrained(tmp_path)


# -- agent queries -------------------------------------------------------------------------------


def test_halving_groups():
    assert qd.halving_groups(4) == (2, 1)
    assert qd.halving_groups(24) == (12, 6, 3, 1)
    assert qd.halving_groups(1) == (1,)


def test_agent_queries_shapes_and_per_image():
    torch.manual_seed(0)
    gen = qd.AgentQueryGenerator(dim=32, num_layers=4, num_queries=5, heads=4)
    maps = [torch.randn(3, 32, 4, 8) for _ in range(4)]
    q = gen(maps)
    assert q.shape == (3, 5, 32)
    assert not torch.allclose(q[0], q[1])                          # image-conditioned (Eq. 3)
    with pytest.raises(ValueError, match="expected 4 layer maps"):
        gen(maps[:3])


def test_agent_pooling_is_eq_3_and_4():
    torch.manual_seed(0)
    gen = qd.AgentQueryGenerator(dim=8, num_layers=2, num_queries=3, heads=2)
    f = torch.randn(2, 12, 8)                                       # (B, hw, c)
    q_init = gen.query_init[0]                                      # (c, r)
    A = torch.softmax(f @ q_init / math.sqrt(8), dim=1)             # over the locations
    assert torch.allclose(A.sum(1), torch.ones(2, 3))
    expected = gen.layer_mlp(torch.einsum("bnr,bnc->brc", A, f))
    assert torch.allclose(gen.pool(f, q_init), expected, atol=1e-6)


# -- the diffusion consistency loss ------------------------------------------------------------


def _dcl_inputs(seed=0, B=2, r=4, c=16, channels=(8, 6)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, r, c, generator=g, requires_grad=True)
    weak = [torch.randn(B, C, 3, 5, generator=g) for C in channels]
    strong = [torch.randn(B, C, 3, 5, generator=g) for C in channels]
    return q, weak, strong


def test_dcl_matches_the_equations():
    torch.manual_seed(0)
    q, weak, strong = _dcl_inputs(channels=(8,))
    dcl = qd.DiffusionConsistencyLoss(16, (8,))
    out = dcl(q, weak, strong)
    k = dcl.proj[0](q)                                              # (B, r, C)
    fw = F.layer_norm(weak[0].flatten(2).transpose(1, 2), (8,))
    fs = F.layer_norm(strong[0].flatten(2).transpose(1, 2), (8,))
    S = torch.softmax(fw @ k.transpose(1, 2) / math.sqrt(8), dim=-1)        # Eq. 8
    p_s, p_hat = fs.softmax(-1), (S @ k).softmax(-1)
    kl = (p_s * (p_s.log() - p_hat.log())).sum(-1).mean()                   # Eq. 9
    q_opt = (S / S.sum(1, keepdim=True)).transpose(1, 2) @ fs               # Eq. 10
    assert torch.allclose(out["dist"], kl, atol=1e-5)
    assert torch.allclose(out["sup"], F.huber_loss(k, q_opt), atol=1e-6)    # Eq. 11
    assert out["dist"] >= 0 and out["sup"] >= 0


def test_dcl_huber_target_weak_vs_strong():
    q, weak, strong = _dcl_inputs()
    torch.manual_seed(0)
    a = qd.DiffusionConsistencyLoss(16, (8, 6), huber_target="strong")
    torch.manual_seed(0)
    b = qd.DiffusionConsistencyLoss(16, (8, 6), huber_target="weak")
    out_a, out_b = a(q, weak, strong), b(q, weak, strong)
    assert torch.allclose(out_a["dist"], out_b["dist"])             # the KL term is the same
    assert not torch.allclose(out_a["sup"], out_b["sup"])
    # with the weak features as the strong ones, both forms agree
    assert torch.allclose(a(q, weak, weak)["sup"], b(q, weak, weak)["sup"])
    with pytest.raises(ValueError, match="huber_target"):
        qd.DiffusionConsistencyLoss(16, (8,), huber_target="medium")
    with pytest.raises(ValueError, match="expected 2 diffusion layers"):
        a(q, weak[:1], strong[:1])


def test_dcl_gradients_reach_queries_not_targets():
    q, weak, strong = _dcl_inputs()
    weak = [w.requires_grad_() for w in weak]
    strong = [s.requires_grad_() for s in strong]
    dcl = qd.DiffusionConsistencyLoss(16, (8, 6))
    out = dcl(q, weak, strong)
    (out["dist"] + out["sup"]).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dcl.parameters())
    assert all(s.grad is None for s in strong)                       # targets are detached
    # weak features only shape S (the teacher never trains: its features carry no parameters)


# -- refinement -----------------------------------------------------------------------------------


def test_refinement_keeps_every_map_shape():
    torch.manual_seed(0)
    ref = qd.AgentRefinement(dim=32, heads=4, gn_groups=8)
    maps = [torch.randn(2, 32, 16, 32), torch.randn(2, 32, 2, 4), torch.randn(2, 32, 4, 8),
            torch.randn(2, 32, 8, 16)]
    agents = torch.randn(2, 5, 32)
    out = ref(maps, agents)
    assert [o.shape for o in out] == [m.shape for m in maps]
    # the refined maps depend on the agent queries
    out2 = ref(maps, agents + 1)
    assert not torch.allclose(out[0], out2[0])
    with pytest.raises(ValueError, match="expected 4 maps"):
        ref(maps[:2], agents)


def test_refinement_gradients_under_bf16_autocast_match_float32():
    """Under CPU bfloat16 autocast the refinement's gradients, to its parameters and to the maps
    it refines, agree with float32's. (PyTorch 2.14's CPU kernel for a dilated depthwise
    convolution of a channels-last bf16 input returns a wrong input gradient, up to inf: world
    2's QueryDiff diverged in a few steps. The refinement feeds those convolutions a contiguous
    map.)"""
    torch.manual_seed(0)
    ref = qd.AgentRefinement(dim=64, heads=4, gn_groups=8)
    maps = [torch.randn(4, 64, 16, 32), torch.randn(4, 64, 2, 4), torch.randn(4, 64, 4, 8),
            torch.randn(4, 64, 8, 16)]
    # the pixel decoder's finest map arrives channels-last (tokens reshaped to a map)
    maps[0] = maps[0].contiguous(memory_format=torch.channels_last).requires_grad_()
    agents = torch.randn(4, 5, 64, requires_grad=True)
    weights = [torch.randn(m.shape) for m in maps]

    def grads(bf16: bool) -> dict[str, torch.Tensor]:
        ref.zero_grad()
        maps[0].grad = agents.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = ref(maps, agents)
        sum((o.float() * w).sum() for o, w in zip(out, weights, strict=True)).backward()
        return {"map 0": maps[0].grad, "agents": agents.grad,
                **{n: p.grad.clone() for n, p in ref.named_parameters()}}

    exact, bf16 = grads(False), grads(True)
    for name, g in exact.items():
        err = (bf16[name] - g).norm() / g.norm()
        assert err < 0.2, f"{name}: the bf16 gradient is off by {float(err):.2f} of its norm"


# -- the segmentor -------------------------------------------------------------------------------


def test_loss_terms_and_gradients(teacher, batch):
    images, labels = batch
    m = _model(teacher)
    m.train()
    losses = m.loss(images, labels)
    assert {"loss_dcl_dist", "loss_dcl_sup", "loss_cls", "loss_mask", "loss_dice"} <= set(losses)
    sum(losses.values()).backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    for part in ("agents.", "refinement.", "dcl.", "agent_proj.", "reins.", "head."):
        assert any(n.startswith(part) for n in trained), part
    assert not any(n.startswith("encoder.") for n in trained)       # frozen VFM
    assert all(p.grad is None for p in teacher.parameters())       # frozen teacher
    # the DCL terms alone reach the agent queries
    m.zero_grad()
    dcl = m.loss(images, labels)
    (dcl["loss_dcl_dist"] + dcl["loss_dcl_sup"]).backward()
    assert m.agents.query_init.grad is not None and m.agents.query_init.grad.abs().sum() > 0
    assert m.refinement.fuse[0].weight.grad is None                 # not on the DCL's path


def test_teacher_is_not_part_of_the_model(teacher):
    m = _model(teacher)
    keys = set(m.state_dict())
    assert not any("unet" in k or "teacher" in k for k in keys)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert all(p is not q for p in m.parameters() for q in list(teacher.parameters())[:3])
    assert count_parameters(m, trainable_only=False) > 0 and n_teacher == 1_113_955


def test_inference_needs_no_diffusion_model(teacher, batch):
    images, _ = batch
    m = _model(teacher).eval()
    with_teacher = m.predict(images)

    class Exploding:
        def features(self, *a, **k):
            raise AssertionError("the diffusion model was called at inference")

    m.teacher = Exploding()
    assert torch.equal(m.predict(images), with_teacher)
    del m.__dict__["_teacher"]                                       # no teacher at all
    m.__dict__["_teacher"] = None
    assert torch.equal(m.predict(images), with_teacher)
    assert with_teacher.shape == (2, 19, 16, 32)


def test_precomputed_features_replace_the_teacher(teacher, batch):
    images, labels = batch
    m = _model(teacher)
    feats = qd.cache_features(teacher, images, seed=1)
    m.teacher = None
    torch.manual_seed(0)
    a = m.loss(images, labels, teacher_features=feats)
    assert torch.isfinite(a["loss_dcl_dist"])
    with pytest.raises(ValueError, match="needs a teacher"):
        m.loss(images, labels)


def test_no_guidance_ablation_has_no_teacher_or_dcl(batch):
    images, labels = batch
    m = _model(None, alpha=0.0)
    assert m.dcl is None and m.teacher is None
    assert not any(k.startswith("loss_dcl") for k in m.loss(images, labels))


def test_flat_view_draws_the_class_map_and_is_the_same_for_every_look():
    from lessons import toyworld as tw
    from lessons.classes import PALETTE

    labels = torch.tensor([[[0, 13, 255]]])
    view = qd.flat_view(labels)
    assert view.shape == (1, 3, 1, 3) and view.min() >= 0 and view.max() <= 1
    assert torch.allclose(view[0, :, 0, 1] * 255, torch.tensor(PALETTE[13], dtype=torch.float))
    assert view[0, :, 0, 2].sum() == 0                                     # ignore: black
    looks = tw.render_across_domains(3, domains=("synthetic", "fog", "painted"), world="2.0")
    labels = [torch.as_tensor(lab) for _, lab in looks.values()]
    assert all(torch.equal(qd.flat_view(labels[0][None]), qd.flat_view(x[None]))
               for x in labels)
    with pytest.raises(ValueError, match="integer labels"):
        qd.flat_view(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        qd.flat_view(torch.tensor([[[19]]]))


def test_guidance_controls_change_only_what_the_teacher_sees(teacher, batch):
    images, labels = batch
    real = qd.guidance_features(teacher, images, labels, "teacher")
    torch.manual_seed(0)
    oracle = qd.guidance_features(teacher, images, labels, "oracle")
    torch.manual_seed(0)
    assert torch.allclose(oracle.strong[0],
                          teacher.features(qd.flat_view(labels)).strong[0])
    # shuffled: each image gets its neighbour's features under the same noise
    torch.manual_seed(1)
    shuffled = qd.guidance_features(teacher, images, labels, "shuffled")
    torch.manual_seed(1)
    same_noise = teacher.features(images)
    assert torch.equal(shuffled.weak[0][0], same_noise.weak[0][1])
    assert torch.equal(shuffled.strong[1][1], same_noise.strong[1][0])
    assert real.weak[0].shape == oracle.weak[0].shape == shuffled.weak[0].shape
    with pytest.raises(ValueError, match="batch of 2"):
        qd.guidance_features(teacher, images[:1], labels[:1], "shuffled")
    with pytest.raises(ValueError, match="guidance must be one of"):
        qd.guidance_features(teacher, images, labels, "noise")
    with pytest.raises(ValueError, match="guidance must be one of"):
        _model(teacher, guidance="noise")
    m = _model(teacher, guidance="oracle")
    assert m.guidance == "oracle" and torch.isfinite(m.loss(images, labels)["loss_dcl_sup"])


def test_agents_as_decoder_queries(teacher, batch):
    images, _ = batch
    m = _model(teacher, queries_from="agents")
    preds, _ = m(images)
    assert preds[-1].class_logits.shape == (2, 19, 20)
    with pytest.raises(ValueError, match="queries_from"):
        _model(teacher, queries_from="text")


def test_checkpoint_round_trip(tmp_path, teacher, batch):
    images, _ = batch
    kwargs = {"pretrained": False, "teacher_weights": None}
    torch.manual_seed(0)
    m = build_model("lessons.querydiff:build_toy_querydiff", kwargs).eval()
    meta = {"builder": "lessons.querydiff:build_toy_querydiff", "builder_kwargs": kwargs,
            "toyworld_version": current_world(), "lessons_digest": "0" * 16,
            "method": "querydiff", "seed": 0}
    state = m.trainable_state_dict()
    assert not any("unet" in k for k in state)
    path = save_lesson_checkpoint(tmp_path / "qd.safetensors", state, meta)
    torch.manual_seed(0)                       # the same random (frozen) encoder
    loaded, _ = load_lesson_checkpoint(path)
    assert loaded.teacher is None or callable(loaded.__dict__["_teacher"])
    assert torch.allclose(loaded.eval().predict(images), m.predict(images).half().float(),
                          atol=5e-2)


def test_parameter_counts_at_full_scale():
    """QueryDiff's additions on DINOv2-L (c 1024, 4 layers, r 100, D 256) with SD 2.1's hooks;
    the paper gives no count, so this pins ours against the formula."""
    with torch.device("meta"):
        gen = qd.AgentQueryGenerator(1024, 4, 100, heads=8)
        ref = qd.AgentRefinement(256, 8)
        dcl = qd.DiffusionConsistencyLoss(1024, (1280, 640, 320))
    c, D = 1024, 256
    mlp = 2 * (c * c + c)
    stage = c * 100 * 0 + 2 * (4 * c * c + 4 * c) + 2 * mlp + 4 * 2 * c
    expected_gen = 4 * c * 100 + mlp + sum(n * 100 * c + stage for n in (2, 1)) + c * c + c
    assert count_parameters(gen) == expected_gen
    branch = 2 * D * 9 + 2 * D * D + 2 * D
    assert count_parameters(ref) == (4 * D * D + 4 * D) + 2 * D + 4 * (
        4 * branch + 4 * D * D + D)
    assert count_parameters(dcl) == sum(c * C + C + 2 * C + C * C + C for C in (1280, 640, 320))


def test_stable_diffusion_21_unet_on_meta():
    """SD 2.1's U-Net (about 865M parameters) and the channels of the code's hooks."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**qd.SD21_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert tuple(unet.up_blocks[i].resnets[k].conv2.out_channels
                 for i, k in qd.SD_FEATURE_LAYERS) == (1280, 640, 320)
