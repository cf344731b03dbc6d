"""Class names, prompts, frozen text embeddings and CoOp-style prompt tuning on open_clip towers.

Every method in these lessons turns the 19 class names into one text embedding per class, and
each names that step differently:

- **CAT-Seg** fills one hand-written template per class, ``"A photo of a {} in the scene"`` in
  the released configs, runs CLIP's text tower (EOT token -> ``ln_final`` -> ``text_projection``)
  and L2-normalises: the paper's text embeddings ``D^L``. CAT-Seg fine-tunes the text tower, so
  it encodes on every training forward and caches the class embeddings only at evaluation
  (``TextEmbeddingCache`` here).
- **CoOp** calls its learned prompt ``t = [V]_1 [V]_2 ... [V]_M [CLASS]``: M learnable *context
  vectors* shared by all classes, followed by the class name, through the frozen text encoder.
- **tqdm** and **MFuser** use exactly that (the official code calls the vectors ``contexts`` and
  the tower a "text context encoder"): each raw class name is tokenised alone at a short length
  (5), the context vectors go right after the start-of-text token, the frozen tower runs on the
  longer sequence (10 for CLIP and SigLIP, 13 for EVA02-CLIP: 5 or 8 context vectors) with its
  positional embedding truncated to it, and the output is read at the end-of-text token, whose
  position moved by ``N_ctx``. The result, ``t0`` (19 x 768), holds the initial *textual object
  queries* that MTEnhancer then refines. ``PromptLearner`` here.
- SigLIP has no start token and pools the *last* position: MFuser inserts the context after the
  first word token, which is the same index (1) as "after SOT" for CLIP, and reads the last
  position. SigLIP's tokenizer is a Hugging Face one; ``load_siglip_tokenizer`` loads it from a
  local directory (nothing here touches the network).

Dimension letters: B batch, K classes (prompts), L context length (tokens per prompt),
C width of the text transformer, C_embed joint image-text embedding width, N_ctx learnable
context vectors, L_name tokens of a class name alone (start, words, end, padding).
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lessons.classes import CLASSES

__all__ = [
    "CATSEG_TEMPLATE",
    "CITYSCAPES_CLASSES",
    "MFUSER_N_CTX",
    "NAME_LENGTH",
    "RAW_TEMPLATE",
    "TEMPLATES",
    "TQDM_N_CTX",
    "TQDM_REGULARIZER_TEMPLATE",
    "PromptLearner",
    "TextEmbeddingCache",
    "TextTower",
    "default_tokenizer",
    "encode_text",
    "format_prompts",
    "load_siglip_tokenizer",
    "text_tower",
]

Tokenizer = Callable[..., torch.Tensor]  # tokenizer(texts, context_length=L) -> (K, L) int64

# ----------------------------------------------------------------------------------------------
# Class names and prompt forms
# ----------------------------------------------------------------------------------------------

CITYSCAPES_CLASSES: tuple[str, ...] = CLASSES
"""The 19 Cityscapes class names in trainId order (``lessons.classes.CLASSES``)."""

RAW_TEMPLATE: str = "{}"
"""CoOp / tqdm / MFuser: the raw class name alone; the learnable context supplies the rest."""

CATSEG_TEMPLATE: str = "A photo of a {} in the scene"
"""CAT-Seg's single template (``PROMPT_ENSEMBLE_TYPE: "single"`` in its released configs)."""

TQDM_REGULARIZER_TEMPLATE: str = "a clean origami of a {}"
"""tqdm's language regulariser: frozen ``T0_k`` of this prompt anchor the learned embeddings."""

TEMPLATES: dict[str, str] = {
    "raw": RAW_TEMPLATE,
    "catseg": CATSEG_TEMPLATE,
    "tqdm_regularizer": TQDM_REGULARIZER_TEMPLATE,
}
"""Template keys accepted by ``format_prompts``."""

NAME_LENGTH: int = 5
"""Tokens of a class name alone in tqdm / MFuser (``tokenize(name, context_length=5)``)."""

MFUSER_N_CTX: dict[str, int] = {"clip": 5, "eva02_clip": 8, "siglip": 5}
"""MFuser's learnable context vectors per VLM: its text context length (10 / 13 / 10) minus 5."""

TQDM_N_CTX: dict[str, int] = {"clip": 5, "eva02_clip": 8}
"""tqdm's learnable context vectors: 5 with CLIP ViT-B (context 10), 8 with EVA02-CLIP-L (13)."""


def format_prompts(
    class_names: Sequence[str], template: str = "raw", first_synonym: bool = False
) -> list[str]:
    """Fill ``template`` (a key of ``TEMPLATES`` or a string with one ``{}``) with each name.

    ``first_synonym=True`` keeps only the part before ``", "`` of each name, as CAT-Seg's
    ``get_text_embeds`` does for synonym lists such as ``"person, people"``.
    """
    if isinstance(class_names, str):
        raise ValueError("class_names must be a sequence of names, not one string")
    if template in TEMPLATES:
        template = TEMPLATES[template]
    elif template.count("{}") != 1:
        raise ValueError(
            f"unknown template key {template!r}: use one of {sorted(TEMPLATES)} or a format "
            "string with exactly one '{}'"
        )
    names = [name.split(", ")[0] if first_synonym else name for name in class_names]
    return [template.format(name) for name in names]


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

_CLIP_BPE_VOCAB = 49408  # open_clip's SimpleTokenizer: 49,406 BPE tokens + <start>, <end>


@functools.lru_cache(maxsize=4)
def default_tokenizer(context_length: int = 77) -> Tokenizer:
    """open_clip's own CLIP BPE tokenizer (ships with open_clip, works offline; also EVA02-CLIP).

    Built once per context length (reading the BPE merges takes about 80 ms).
    """
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _resolve_tokenizer(tokenizer: Tokenizer | str | None, vocab_size: int) -> Tokenizer:
    """A callable tokenizer from ``None`` (CLIP BPE), an open_clip model name, or a callable."""
    if tokenizer is None:
        if vocab_size != _CLIP_BPE_VOCAB:
            raise ValueError(
                f"this text tower has a {vocab_size}-token vocabulary, not CLIP BPE's "
                f"{_CLIP_BPE_VOCAB}: pass its tokenizer (SigLIP: load_siglip_tokenizer(path))"
            )
        return default_tokenizer()
    if isinstance(tokenizer, str):
        return _tokenizer_by_name(tokenizer)
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be None, a model name or a callable, got {tokenizer!r}")
    return tokenizer


def _tokenizer_by_name(name: str) -> Tokenizer:
    """``open_clip.get_tokenizer(name)``, refused where it would download a Hugging Face one."""
    import open_clip

    config = open_clip.get_model_config(name) if ":" not in name else None
    if config is None:
        raise ValueError(
            f"{name!r} is not a built-in open_clip model name; pass a tokenizer object instead"
        )
    if config.get("text_cfg", {}).get("hf_tokenizer_name") or "siglip" in name.lower():
        raise ValueError(
            f"{name!r} uses a Hugging Face tokenizer, which open_clip would download: load it "
            "from a local directory with load_siglip_tokenizer(path) and pass that"
        )
    return open_clip.get_tokenizer(name)


def load_siglip_tokenizer(path: str | Path, context_length: int = 64) -> Tokenizer:
    """SigLIP's Hugging Face tokenizer from a local directory, wrapped as an open_clip tokenizer.

    The directory holds the tokenizer files of ``google/siglip-large-patch16-384`` (MFuser's)
    saved with ``AutoTokenizer.from_pretrained(...).save_pretrained(path)`` on a machine with
    network. Calls pad to ``max_length`` and truncate, as MFuser's ``AutoProcessor`` calls do.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"SigLIP tokenizer directory not found: {path}. Save the tokenizer files of "
            "'google/siglip-large-patch16-384' there on a machine with network: "
            "transformers.AutoTokenizer.from_pretrained('google/siglip-large-patch16-384')"
            f".save_pretrained('{path}')"
        )
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "SigLIP's tokenizer is a Hugging Face tokenizer: `pip install transformers` (plus "
            "`sentencepiece`), and keep its files in a local tokenizer directory "
            f"(here {path}); nothing is downloaded"
        )
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(
        str(path), context_length=context_length, clean="canonicalize", local_files_only=True
    )


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """``tokenizer(texts, context_length)`` as a (K, L) int64 tensor, checked."""
    tokens = tokenizer(list(texts), context_length=context_length)  # (K, L)
    if tokens.ndim != 2 or tokens.shape != (len(texts), context_length):
        raise ValueError(
            f"tokenizer returned shape {tuple(tokens.shape)}, expected "
            f"({len(texts)}, {context_length})"
        )
    return tokens.long()


def _token_count(tokenizer: Tokenizer, text: str) -> int | None:
    """Tokens ``text`` needs with its special tokens (None for an unknown kind of tokenizer)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # CLIP BPE
        return len(tokenizer.encode(text)) + 2  # [SOT, words, EOT]
    hf = getattr(tokenizer, "tokenizer", None)
    if callable(hf):  # open_clip HFTokenizer (SigLIP: [words, EOS], no start token)
        clean = getattr(tokenizer, "clean_fn", lambda s: s)
        return len(hf(clean(text))["input_ids"])
    return None


def _fits(tokenizer: Tokenizer, text: str, length: int) -> tuple[bool, int | None]:
    """Whether ``text`` tokenises into ``length`` tokens without truncation, and its count."""
    count = _token_count(tokenizer, text)
    if count is not None:
        return count <= length, count
    # unknown tokenizer: truncation shows as a difference from a longer tokenisation
    short = _tokenize(tokenizer, [text], length)[0]  # (L_name,)
    long = _tokenize(tokenizer, [text], length + 64)[0]  # (L_name + 64,)
    tail = long[length:]
    return bool((long[:length] == short).all() and (tail == tail[-1]).all()), None


# ----------------------------------------------------------------------------------------------
# The text tower of an open_clip model
# ----------------------------------------------------------------------------------------------


@dataclass
class TextTower:
    """References to the parts of an open_clip text tower (shared with the model, not copied)."""

    token_embedding: nn.Embedding  # (V, C)
    positional_embedding: nn.Parameter  # (L_max, C)
    transformer: nn.Module  # open_clip Transformer, batch first
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear | None  # (C, C_embed) or Linear(C, C_embed)
    attn_mask: torch.Tensor | None  # (L_max, L_max) additive causal mask, None if bidirectional
    pool_type: str  # 'argmax' (CLIP EOT), 'eos', 'last' (SigLIP), 'first'
    eos_id: int | None
    vocab_size: int
    context_length: int

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim


def text_tower(model: nn.Module) -> TextTower:
    """The text tower of an open_clip ``CLIP``, ``CustomTextCLIP`` or bare ``TextTransformer``."""
    if hasattr(model, "token_embedding") and hasattr(model, "ln_final"):
        if hasattr(model, "text_pool_type"):  # open_clip CLIP: the tower's parts sit on the model
            pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
        else:  # a TextTransformer itself
            pool_type, eos_id = model.pool_type, getattr(model, "eos_id", None)
        if getattr(model, "cls_emb", None) is not None:
            raise ValueError("text towers with an appended CLS embedding (CoCa) are not supported")
        if getattr(model, "use_pad_mask", False):
            raise ValueError("text towers with a padding mask are not supported")
        return TextTower(
            token_embedding=model.token_embedding,
            positional_embedding=model.positional_embedding,
            transformer=model.transformer,
            ln_final=model.ln_final,
            text_projection=model.text_projection,
            attn_mask=model.attn_mask,
            pool_type=pool_type,
            eos_id=eos_id,
            vocab_size=model.token_embedding.num_embeddings,
            context_length=model.positional_embedding.shape[0],
        )
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module) and hasattr(text, "token_embedding"):  # CustomTextCLIP
        return text_tower(text)
    raise ValueError(
        f"{type(model).__name__} has no open_clip text transformer (token_embedding, "
        "positional_embedding, transformer, ln_final); Hugging Face text towers are not supported"
    )


# ----------------------------------------------------------------------------------------------
# Frozen text embeddings (CAT-Seg's D^L, tqdm's T0)
# ----------------------------------------------------------------------------------------------


def encode_text(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Tokenizer | str | None = None,
    normalize: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """Frozen text embeddings (K, C_embed) of ``texts`` through ``model.encode_text``, no grad.

    ``tokenizer``: ``None`` is open_clip's CLIP BPE (CLIP, EVA02-CLIP, the toy VLM); a string is
    an open_clip model name for ``open_clip.get_tokenizer``; anything else is called as
    ``tokenizer(texts, context_length=L)`` (SigLIP: ``load_siglip_tokenizer(path)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = tokenize(model, texts, tokenizer)  # (K, L)
    device = text_tower(model).token_embedding.weight.device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = tokens[start : start + batch_size].to(device)  # (k, L)
            chunks.append(model.encode_text(chunk))  # (k, C_embed)
    embeddings = torch.cat(chunks)  # (K, C_embed)
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def tokenize(model: nn.Module, texts: Sequence[str], tokenizer: Tokenizer | str | None = None
             ) -> torch.Tensor:
    """Token ids (K, L) of ``texts`` at the text tower's context length, checked against its
    vocabulary (``tokenizer`` as in :func:`encode_text`). For towers that train (CAT-Seg)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty sequence of strings")
    tower = text_tower(model)
    tokens = _tokenize(_resolve_tokenizer(tokenizer, tower.vocab_size), texts,
                       tower.context_length)  # (K, L)
    _check_vocab(tokens, tower.vocab_size)
    return tokens


def _check_vocab(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise a ``ValueError`` if a token id falls outside the tower's vocabulary."""
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but the text tower has "
            f"{vocab_size} tokens: the tokenizer does not belong to this model"
        )


class TextEmbeddingCache:
    """Frozen class-text embeddings computed once per (model, prompts, normalize).

    CAT-Seg caches its class embeddings at evaluation and never invalidates them (a known
    pitfall when the dataset changes); here the prompts are part of the key, and ``clear()``
    must be called after the text tower's weights change (for instance after training steps).
    A model is keyed by ``name`` when given, else by identity (a weak reference, so a new model
    that happens to reuse a freed object's id is not served stale embeddings).
    """

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[weakref.ref | None, torch.Tensor]] = {}

    def get(
        self,
        model: nn.Module,
        prompts: Sequence[str],
        tokenizer: Tokenizer | str | None = None,
        normalize: bool = True,
        name: str | None = None,
    ) -> torch.Tensor:
        """The (K, C_embed) embeddings of ``prompts``: cached, else computed by ``encode_text``."""
        model_key = ("name", name) if name is not None else ("id", id(model))
        key = (model_key, tuple(prompts), bool(normalize))
        hit = self._store.get(key)
        if hit is not None and (hit[0] is None or hit[0]() is model):
            return hit[1]
        embeddings = encode_text(model, prompts, tokenizer=tokenizer, normalize=normalize)
        ref = weakref.ref(model) if name is None else None
        self._store[key] = (ref, embeddings)
        return embeddings

    __call__ = get

    def clear(self) -> None:
        """Forget every cached embedding."""
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


# ----------------------------------------------------------------------------------------------
# CoOp-style prompt tuning (tqdm, MFuser)
# ----------------------------------------------------------------------------------------------

_INSERT_AT = 1  # after SOT (CLIP, EVA02-CLIP); after the first word token (SigLIP has no SOT)


class PromptLearner(nn.Module):
    """Learnable context vectors before each class name, through a frozen open_clip text tower.

    Sequence per class (CLIP): ``[SOT, ctx_1 .. ctx_N, name tokens, EOT, pad]`` of length
    ``L = name_length + n_ctx``; SigLIP: ``[w_1, ctx_1 .. ctx_N, w_2 .., EOS, pad]``. The
    positional embedding and causal mask are truncated to ``L``; the output is read at the EOT
    position (``argmax(token ids) + n_ctx`` for CLIP's 'argmax' pooling; the last position for
    SigLIP's 'last' pooling), then ``ln_final`` and the text projection. The tower is shared with
    ``model`` and frozen in place (``requires_grad=False``); only ``contexts`` trains.

    ``ctx_init``: 'trunc_normal' (std 1, as tqdm's and MFuser's code re-initialise ``contexts``
    with ``trunc_normal_``; the default), or 'normal' (std 0.02, CoOp's init). ``ctx_words``
    instead starts the context from a phrase's token embeddings (CoOp's "a photo of a" init; its
    token count must equal ``n_ctx``). The official code stores ``contexts`` as (1, N_ctx, C) and
    keeps a truncated copy of the positional embedding; here ``contexts`` is (N_ctx, C) and the
    model's full positional embedding is sliced at run time (a converter reshapes / pads).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        n_ctx: int = 5,
        name_length: int = NAME_LENGTH,
        tokenizer: Tokenizer | str | None = None,
        ctx_init: str = "trunc_normal",
        ctx_std: float | None = None,
        ctx_words: str | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        tower = text_tower(model)
        self._check_args(class_names, n_ctx, name_length, ctx_init, tower)
        self.class_names = tuple(class_names)
        self.n_ctx, self.name_length, self.normalize = n_ctx, name_length, normalize
        self.pool_type, self.ctx_init = tower.pool_type, ctx_init
        default_std = 1.0 if ctx_init == "trunc_normal" else 0.02
        self.ctx_std = default_std if ctx_std is None else ctx_std
        self.tokenizer = _resolve_tokenizer(tokenizer, tower.vocab_size)

        # the frozen tower, shared with `model`
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding  # (L_max, C), sliced to (L, C)
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        L = self.context_length
        mask = None if tower.attn_mask is None else tower.attn_mask[:L, :L].clone()  # (L, L)
        self.register_buffer("attn_mask", mask, persistent=False)

        tokens = self._tokenize_names(self.class_names)  # (K, L_name), on the CPU
        eot_index = self._eot_index(tokens, tower.eos_id)  # (K,)
        device = tower.token_embedding.weight.device
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("eot_index", eot_index.to(device), persistent=False)

        weight = tower.token_embedding.weight
        ctx = torch.empty(n_ctx, tower.width, dtype=weight.dtype, device=weight.device)
        self.contexts = nn.Parameter(ctx)  # (N_ctx, C)
        self.reset_parameters()
        if ctx_words is not None:
            self.init_from_words(ctx_words)

    # -- construction helpers --------------------------------------------------------------

    @staticmethod
    def _check_args(
        class_names: Sequence[str], n_ctx: int, name_length: int, ctx_init: str, tower: TextTower
    ) -> None:
        if isinstance(class_names, str) or len(class_names) == 0:
            raise ValueError("class_names must be a non-empty sequence of names")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        if name_length < 2:
            raise ValueError(f"name_length must be >= 2 (word and end tokens), got {name_length}")
        if n_ctx + name_length > tower.context_length:
            raise ValueError(
                f"n_ctx + name_length = {n_ctx + name_length} exceeds the text tower's "
                f"{tower.context_length} positions"
            )
        if ctx_init not in ("trunc_normal", "normal"):
            raise ValueError(f"ctx_init must be 'trunc_normal' or 'normal', got {ctx_init!r}")
        if tower.pool_type not in ("argmax", "eos", "last", "first"):
            raise ValueError(f"unsupported text pooling {tower.pool_type!r}")

    def _tokenize_names(self, class_names: Sequence[str]) -> torch.Tensor:
        """Each name alone at ``name_length`` tokens, or a ``ValueError`` if it does not fit."""
        for name in class_names:
            fits, count = _fits(self.tokenizer, name, self.name_length)
            if not fits:
                needs = f"needs {count} tokens" if count is not None else "does not fit"
                raise ValueError(
                    f"class name {name!r} {needs} (with its special tokens) but name_length is "
                    f"{self.name_length}: raise name_length (the context length is "
                    "name_length + n_ctx) or shorten the name"
                )
        tokens = _tokenize(self.tokenizer, class_names, self.name_length)  # (K, L_name)
        _check_vocab(tokens, self.token_embedding.num_embeddings)
        return tokens

    def _eot_index(self, tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
        """(K,) read-out position in the length-L sequence, after the context is inserted."""
        K = tokens.shape[0]
        if self.pool_type == "last":
            return torch.full((K,), self.context_length - 1, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(K, dtype=torch.long, device=tokens.device)
        if self.pool_type == "argmax":  # CLIP: EOT has the largest id
            index = tokens.argmax(dim=-1)  # (K,)
        else:  # 'eos': the first EOS token
            is_eos = tokens == eos_id  # (K, L_name)
            if not bool(is_eos.any(dim=-1).all()):
                raise ValueError(f"a tokenised class name has no end token (id {eos_id})")
            index = is_eos.int().argmax(dim=-1)  # (K,)
        return torch.where(index >= _INSERT_AT, index + self.n_ctx, index)

    # -- parameters ----------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """L = name_length + n_ctx (MFuser: 10 for CLIP and SigLIP, 13 for EVA02-CLIP)."""
        return self.name_length + self.n_ctx

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The text tower's parameters (shared with the model; never trained here)."""
        params = [*self.token_embedding.parameters(), self.positional_embedding]
        params += [*self.transformer.parameters(), *self.ln_final.parameters()]
        if isinstance(self.text_projection, nn.Module):
            params += list(self.text_projection.parameters())
        elif self.text_projection is not None:
            params.append(self.text_projection)
        return params

    def reset_parameters(self) -> None:
        """Re-draw ``contexts``: trunc_normal (std 1; cut at +-2) or normal, as ``ctx_init``."""
        if self.ctx_init == "trunc_normal":
            nn.init.trunc_normal_(self.contexts, std=self.ctx_std)
        else:
            nn.init.normal_(self.contexts, std=self.ctx_std)

    def init_from_words(self, text: str) -> None:
        """Set ``contexts`` to the token embeddings of ``text`` (exactly ``n_ctx`` word tokens)."""
        ids = self._word_ids(text)
        if len(ids) != self.n_ctx:
            raise ValueError(f"{text!r} has {len(ids)} word tokens, but n_ctx is {self.n_ctx}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.contexts.device)
        with torch.no_grad():
            self.contexts.copy_(self.token_embedding(ids_t))  # (N_ctx, C)

    def _word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if hasattr(self.tokenizer, "encode") and hasattr(self.tokenizer, "sot_token_id"):
            return list(self.tokenizer.encode(text))
        hf = getattr(self.tokenizer, "tokenizer", None)
        if callable(hf):
            clean = getattr(self.tokenizer, "clean_fn", lambda s: s)
            return list(hf(clean(text), add_special_tokens=False)["input_ids"])
        raise ValueError("ctx_words needs open_clip's SimpleTokenizer or HFTokenizer")

    # -- forward -------------------------------------------------------------------------

    def prompt_embeddings(self) -> torch.Tensor:
        """(K, L, C) token embeddings with the context inserted, plus positional embeddings."""
        get_dtype = getattr(self.transformer, "get_cast_dtype", None)
        dtype = get_dtype() if get_dtype is not None else self.contexts.dtype
        names = self.token_embedding(self.tokens).to(dtype)  # (K, L_name, C)
        K = names.shape[0]
        ctx = self.contexts.to(dtype).unsqueeze(0).expand(K, -1, -1)  # (K, N_ctx, C)
        x = torch.cat([names[:, :_INSERT_AT], ctx, names[:, _INSERT_AT:]], dim=1)  # (K, L, C)
        return x + self.positional_embedding[: self.context_length].to(dtype)  # (K, L, C)

    def forward(self, normalize: bool | None = None) -> torch.Tensor:
        """(K, C_embed) class text embeddings (L2-normalised if ``normalize``, else as set)."""
        x = self.prompt_embeddings()  # (K, L, C)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        x = self.transformer(x, attn_mask=mask)  # (K, L, C)
        x = self.ln_final(x)  # (K, L, C)
        rows = torch.arange(x.shape[0], device=x.device)
        x = x[rows, self.eot_index.to(x.device)]  # (K, C)
        if isinstance(self.text_projection, nn.Module):
            x = self.text_projection(x)  # (K, C_embed)
        elif self.text_projection is not None:
            x = x @ self.text_projection  # (K, C_embed)
        normalize = self.normalize if normalize is None else normalize
        return F.normalize(x, dim=-1) if normalize else x

    def extra_repr(self) -> str:
        return (
            f"classes={len(self.class_names)}, n_ctx={self.n_ctx}, name_length={self.name_length}, "
            f"context_length={self.context_length}, pool={self.pool_type!r}"
        )
