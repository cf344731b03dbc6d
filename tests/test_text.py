"""Tests of lessons.text on tiny open_clip models built on CPU (no weights, no network)."""

from __future__ import annotations

import copy
import importlib.util

import open_clip
import pytest
import torch
from torch import nn

from lessons.classes import CLASSES
from lessons.text import (
    CATSEG_TEMPLATE,
    CITYSCAPES_CLASSES,
    PromptLearner,
    TextEmbeddingCache,
    default_tokenizer,
    encode_text,
    format_prompts,
    load_siglip_tokenizer,
    text_tower,
)

WIDTH, EMBED = 64, 32
VISION = dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32)
NAMES = ["road", "traffic light", "sky", "motorcycle"]


@pytest.fixture(scope="module")
def clip_model() -> open_clip.CLIP:
    """A CLIP-style tower: causal mask, EOT ('argmax') read-out, projection matrix."""
    torch.manual_seed(0)
    text = dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=EMBED, vision_cfg=VISION, text_cfg=text).eval()


@pytest.fixture(scope="module")
def siglip_model() -> open_clip.CustomTextCLIP:
    """A SigLIP-style tower: bidirectional, last-position read-out, Linear head with bias.

    It uses the CLIP BPE vocabulary so the test runs offline; the read-out does not depend on it.
    """
    torch.manual_seed(1)
    text = dict(
        context_length=64, vocab_size=49408, width=WIDTH, heads=2, layers=2,
        no_causal_mask=True, pool_type="last", proj_bias=True,
    )
    return open_clip.CustomTextCLIP(embed_dim=EMBED, vision_cfg=VISION, text_cfg=text).eval()


def truncated_clip(model: open_clip.CLIP, length: int) -> open_clip.CLIP:
    """A copy of ``model`` whose own ``encode_text`` runs at ``length`` positions (MFuser's cut)."""
    ref = copy.deepcopy(model)
    ref.positional_embedding = nn.Parameter(ref.positional_embedding[:length].detach().clone())
    ref.attn_mask = ref.attn_mask[:length, :length].clone()
    return ref


# -- prompts ---------------------------------------------------------------------------------


def test_class_names_are_the_cityscapes_ones():
    assert CITYSCAPES_CLASSES is CLASSES and len(CITYSCAPES_CLASSES) == 19


def test_format_prompts():
    expected = ["A photo of a traffic light in the scene"]
    assert format_prompts(["traffic light"], "catseg") == expected
    assert format_prompts(["traffic light"], CATSEG_TEMPLATE) == expected
    assert format_prompts(CLASSES, "raw") == list(CLASSES)
    assert format_prompts(["car"], "tqdm_regularizer") == ["a clean origami of a car"]
    assert format_prompts(["person, people"], "raw", first_synonym=True) == ["person"]
    with pytest.raises(ValueError, match="unknown template key"):
        format_prompts(["car"], "imagenet80")
    with pytest.raises(ValueError, match="sequence"):
        format_prompts("car", "raw")


# -- frozen embeddings -------------------------------------------------------------------------


def test_encode_text_matches_open_clip(clip_model):
    prompts = format_prompts(NAMES, "catseg")
    tokens = default_tokenizer()(prompts, context_length=77)
    with torch.no_grad():
        expected = clip_model.encode_text(tokens)  # (K, C_embed)
    raw = encode_text(clip_model, prompts, normalize=False, batch_size=3)  # two batches
    torch.testing.assert_close(raw, expected)
    unit = encode_text(clip_model, prompts)
    assert unit.shape == (len(NAMES), EMBED) and not unit.requires_grad
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(NAMES)))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(expected, dim=-1))


def test_encode_text_rejects_bad_input(clip_model):
    with pytest.raises(ValueError, match="non-empty"):
        encode_text(clip_model, [])
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        encode_text(clip_model, ["car"], tokenizer="ViT-L-16-SigLIP-384")
    with pytest.raises(ValueError, match="no open_clip text transformer"):
        encode_text(nn.Linear(2, 2), ["car"])


def test_cache_returns_same_tensor_until_cleared(clip_model):
    cache = TextEmbeddingCache()
    prompts = format_prompts(NAMES, "catseg")
    first = cache(clip_model, prompts)
    assert cache(clip_model, prompts) is first and len(cache) == 1
    assert cache(clip_model, prompts, normalize=False) is not first  # its own entry
    cache.clear()
    assert len(cache) == 0
    again = cache(clip_model, prompts)
    assert again is not first
    torch.testing.assert_close(again, first)


# -- prompt learner ---------------------------------------------------------------------------


def test_zero_context_reproduces_encode_text_at_short_length(clip_model):
    learner = PromptLearner(clip_model, NAMES, n_ctx=0, name_length=5)
    tokens = default_tokenizer()(NAMES, context_length=5)  # (K, 5)
    with torch.no_grad():
        expected = truncated_clip(clip_model, 5).encode_text(tokens)
        got = learner()
    torch.testing.assert_close(got, expected)
    assert torch.equal(learner.eot_index, tokens.argmax(dim=-1))


def test_context_goes_after_sot_and_shifts_eot(clip_model):
    n_ctx = 4  # "a photo of a" is four BPE tokens
    learner = PromptLearner(clip_model, NAMES, n_ctx=n_ctx, ctx_words="a photo of a")
    assert learner.context_length == 9 and learner.contexts.shape == (n_ctx, WIDTH)
    names = default_tokenizer()(NAMES, context_length=5)  # (K, 5)
    assert torch.equal(learner.eot_index, names.argmax(dim=-1) + n_ctx)
    # learned context set to the words' embeddings == the hand-written prompt, truncated tower
    prompt_tokens = default_tokenizer()([f"a photo of a {n}" for n in NAMES], context_length=9)
    with torch.no_grad():
        expected = truncated_clip(clip_model, 9).encode_text(prompt_tokens)
        got = learner()
    assert got.shape == (len(NAMES), EMBED)
    torch.testing.assert_close(got, expected)


def test_siglip_style_tower_inserts_after_first_token_and_reads_last(siglip_model):
    with torch.no_grad():
        learner0 = PromptLearner(siglip_model, NAMES, n_ctx=0)
        names = default_tokenizer()(NAMES, context_length=5)  # (K, 5)
        torch.testing.assert_close(learner0(), siglip_model.encode_text(names))
        n_ctx = 3
        learner = PromptLearner(siglip_model, NAMES, n_ctx=n_ctx, ctx_words="a blue photo")
        ctx_ids = torch.tensor(default_tokenizer().encode("a blue photo")).expand(len(NAMES), -1)
        ids = torch.cat([names[:, :1], ctx_ids, names[:, 1:]], dim=1)  # (K, 8)
        torch.testing.assert_close(learner(), siglip_model.encode_text(ids))
    assert torch.equal(learner.eot_index, torch.full((len(NAMES),), 5 + n_ctx - 1))


def test_only_contexts_get_gradients(clip_model):
    model = copy.deepcopy(clip_model)
    learner = PromptLearner(model, CLASSES, n_ctx=5)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is learner.contexts
    assert sum(p.numel() for p in trainable) == 5 * WIDTH
    out = learner(normalize=True)  # (K, C_embed)
    assert out.shape == (19, EMBED)
    out.pow(2).sum().backward()
    assert learner.contexts.grad is not None and learner.contexts.grad.abs().sum() > 0
    tower = text_tower(model)
    for p in [*learner.frozen_parameters(), tower.positional_embedding]:
        assert p.grad is None and not p.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_context_inits():
    torch.manual_seed(0)
    text = dict(context_length=16, vocab_size=49408, width=256, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=EMBED, vision_cfg=VISION, text_cfg=text)
    tn = PromptLearner(model, ["car"], n_ctx=8).contexts  # trunc_normal, std 1, cut at +-2
    assert tn.abs().max() <= 2.0 and 0.7 < tn.std() < 1.0
    small = PromptLearner(model, ["car"], n_ctx=8, ctx_init="normal").contexts
    assert 0.015 < small.std() < 0.025
    with pytest.raises(ValueError, match="ctx_init"):
        PromptLearner(model, ["car"], ctx_init="uniform")


def test_prompt_learner_rejects_bad_input(clip_model):
    with pytest.raises(ValueError, match="name_length"):
        PromptLearner(clip_model, ["road", "a very long and winding class name"])
    with pytest.raises(ValueError, match="exceeds"):
        PromptLearner(clip_model, ["road"], n_ctx=75)
    with pytest.raises(ValueError, match="n_ctx"):
        PromptLearner(clip_model, ["road"], n_ctx=-1)
    with pytest.raises(ValueError, match="non-empty"):
        PromptLearner(clip_model, [])
    with pytest.raises(ValueError, match="word tokens"):
        PromptLearner(clip_model, ["road"], n_ctx=2, ctx_words="a photo of a")


def test_every_cityscapes_name_fits_mfuser_length(clip_model):
    learner = PromptLearner(clip_model, CLASSES, n_ctx=5)  # MFuser CLIP: context length 10
    assert learner.tokens.shape == (19, 5) and learner.context_length == 10


def _word_tokenizer(texts: list[str], context_length: int) -> torch.Tensor:
    """A stand-in for SigLIP's sentencepiece tokenizer: one id per word, then EOS = pad = 1."""
    out = torch.ones(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [100 + len(word) for word in text.split()][:context_length]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize(
    ("name", "n_ctx", "width", "custom_text"),
    [("ViT-L-14-336", 5, 768, False), ("EVA02-L-14-336", 8, 768, True),
     ("ViT-L-16-SigLIP-384", 5, 1024, True)],
)
def test_mfuser_prompt_sizes_at_real_scale_on_meta(name, n_ctx, width, custom_text):
    config = {k: v for k, v in open_clip.get_model_config(name).items() if k != "custom_text"}
    with torch.device("meta"):
        model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**config)
    tokenizer = _word_tokenizer if "SigLIP" in name else None
    if tokenizer is not None:  # a 32,000-token sentencepiece vocabulary: CLIP BPE is refused
        with pytest.raises(ValueError, match="load_siglip_tokenizer"):
            PromptLearner(model, CLASSES, n_ctx=n_ctx)
    learner = PromptLearner(model, CLASSES, n_ctx=n_ctx, tokenizer=tokenizer)
    assert learner.contexts.shape == (n_ctx, width)  # MFuser: 3,840 / 6,144 / 5,120 parameters
    assert sum(p.numel() for p in learner.parameters() if p.requires_grad) == n_ctx * width
    assert learner().shape == (19, width)  # t0: (K, C_embed)


# -- SigLIP tokenizer ---------------------------------------------------------------------------


def test_siglip_tokenizer_missing_directory(tmp_path):
    missing = tmp_path / "siglip-tokenizer"
    with pytest.raises(FileNotFoundError, match="siglip-large-patch16-384") as info:
        load_siglip_tokenizer(missing)
    assert str(missing) in str(info.value)


def test_siglip_tokenizer_without_transformers(tmp_path, monkeypatch):
    """transformers is a dependency, so its absence is simulated: the error names the install."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install transformers"):
        load_siglip_tokenizer(tmp_path)
