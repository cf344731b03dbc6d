"""Lesson checkpoints: the trained adapters and heads the notebooks load (made by the toy sweep).

A lesson checkpoint is one fp16 safetensors file holding only what trained (adapters and heads;
a fully fine-tuned encoder too), and in its header everything needed to rebuild the model and to
judge whether it still fits the code:

- ``builder`` (``"lessons.<module>:<function>"``) and ``builder_kwargs`` (JSON): the function that
  builds the untrained model (frozen parts included, e.g. the committed toy VFM);
- ``toyworld_version``: a checkpoint trained on another ToyWorld version does not load;
- ``lessons_modules`` / ``lessons_digest``: the code it was trained with (shown, not enforced:
  the state dict loading strictly is what proves it still fits);
- ``method``, ``seed``, ``train_config``, ``val_miou``, ``best_step``, ``seconds``, ``hardware``.

``python -m reprod.toy_sweep`` writes them under ``lessons/weights/checkpoints/<lesson>/``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lessons.backbones import WEIGHTS_DIR
from lessons.toyworld import TOYWORLD_VERSION

CHECKPOINT_DIR = WEIGHTS_DIR / "checkpoints"
REQUIRED_KEYS = ("builder", "builder_kwargs", "toyworld_version", "lessons_digest", "method",
                 "seed")


def build_model(builder: str, kwargs: dict) -> nn.Module:
    """Call ``builder`` (``"lessons.module:function"``) with ``kwargs``; only lessons code runs."""
    module, _, func = builder.partition(":")
    if not module.startswith("lessons.") or not func:
        raise ValueError(f"builder must be 'lessons.<module>:<function>', got {builder!r}")
    return getattr(importlib.import_module(module), func)(**kwargs)


def save_lesson_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``state`` (floating tensors as fp16) and ``meta`` (JSON-able values) to ``path``."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in state.items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict:
    """A checkpoint's header, JSON values decoded."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: a header value is not JSON, so this is no lesson checkpoint"
                         ) from e


def load_lesson_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained as, load its weights; returns (model, meta).

    Raises ValueError when the checkpoint was made on another ToyWorld version or its tensors
    do not fit the model the current code builds.
    """
    meta = read_metadata(path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a lesson checkpoint: its header lacks {missing}")
    if meta["toyworld_version"] != TOYWORLD_VERSION:
        raise ValueError(f"{path} was trained on ToyWorld {meta['toyworld_version']}, this is "
                         f"{TOYWORLD_VERSION}: retrain it with `python -m reprod.toy_sweep`")
    model = build_model(meta["builder"], meta["builder_kwargs"])
    state = load_file(str(path))
    own = model.state_dict()
    wrong = sorted(set(state) - set(own))
    if wrong:
        raise ValueError(f"{path} has tensors the model does not: {wrong[:5]}")
    try:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    except RuntimeError as e:          # shape mismatches
        raise ValueError(f"{path} does not fit the model built by {meta['builder']}: {e}") from e
    covered = {own[k].data_ptr() for k in state if own[k].numel()}
    lacking = sorted(k for k in trainable_keys(model) if k not in state
                     and not (own[k].numel() and own[k].data_ptr() in covered))
    if lacking:                  # frozen tensors come from the builder; trained ones must be here
        raise ValueError(f"{path} lacks trained tensors: {lacking[:5]}")
    model.eval()
    return model, meta


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict names of what trains: parameters with ``requires_grad`` and the buffers of
    modules that own one (BatchNorm statistics). Everything else comes from a builder."""
    keys = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            dot = f"{prefix}." if prefix else ""
            keys |= {dot + b for b, _ in module.named_buffers(recurse=False)}
    return keys & set(model.state_dict())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a lesson checkpoint stores: :func:`trainable_keys`, each tensor once (an
    encoder's alias of its own tower, e.g. ``encoder.vit.*``, is not stored twice)."""
    keep = trainable_keys(model)
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k in keep and not (v.numel() and v.data_ptr() in seen):
            seen.add(v.data_ptr())
            out[k] = v
    return out


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no lesson checkpoint at {path}: make it with "
                                f"`python -m reprod.toy_sweep` (see lessons/weights/README.md)")
    return path
