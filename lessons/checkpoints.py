"""Lesson checkpoints: the trained adapters and heads the notebooks load (made by the toy sweep).

A lesson checkpoint is one fp16 safetensors file holding only what trained (adapters and heads;
a fully fine-tuned encoder too), and in its header everything needed to rebuild the model and to
judge whether it still fits the code:

- ``builder`` (``"lessons.<module>:<function>"``) and ``builder_kwargs`` (JSON): the function that
  builds the untrained model (frozen parts included, e.g. the committed toy VFM). Only the names
  in :data:`BUILDERS` are called, and only with keyword arguments of their signature whose JSON
  values fit the annotation (a path or a module can only be null, ``**kwargs`` not given): a
  ``.safetensors`` file can hold tensors and choose among known models, nothing else;
- ``toyworld_version``: the world it was trained on; the model is rebuilt with that world's toy
  foundation models (``lessons.toyworld.in_world``), and an unknown version does not load;
- ``lessons_modules`` / ``lessons_digest``: the code it was trained with (shown, not enforced:
  the state dict loading strictly is what proves it still fits);
- ``method``, ``seed``, ``train_config``, ``val_miou``, ``best_step``, ``seconds``, ``hardware``.

``python -m reprod.toy.sweep`` writes them under ``lessons/weights/checkpoints/<lesson>/``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lessons.backbones import WEIGHTS_DIR
from lessons.toyworld import WORLD_VERSIONS, in_world

__all__ = [
    "BUILDERS",
    "CHECKPOINT_DIR",
    "REQUIRED_KEYS",
    "build_model",
    "check_builder_kwargs",
    "get_builder",
    "load_lesson_checkpoint",
    "read_metadata",
    "register_builder",
    "save_lesson_checkpoint",
    "trainable_keys",
    "trainable_state_dict",
]

CHECKPOINT_DIR = WEIGHTS_DIR / "checkpoints"
REQUIRED_KEYS = ("builder", "builder_kwargs", "toyworld_version", "lessons_digest", "method",
                 "seed")


# The builders a checkpoint header may name ("lessons.<module>:<function>"): the toy sweep's
# methods. Resolved lazily (those modules import this one); add one with register_builder.
BUILDERS: dict[str, Callable[..., nn.Module] | None] = dict.fromkeys((
    "lessons.baselines:TinySegNet",
    "lessons.segmentor:build_toy_segmentor",
    "lessons.mask2former:build_toy_frozen_mask2former",
    "lessons.mask2former:build_toy_rein_mask2former",
    "lessons.mask2former:build_toy_tqdm",
    "lessons.catseg:build_toy_catseg",
    "lessons.querydiff:build_toy_querydiff",
    "lessons.mfuser:build_toy_mfuser",
))
# JSON value kinds per annotation name; a kwarg annotated otherwise cannot come from a header
_JSON_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "bool": (bool,), "int": (int,), "float": (int, float), "None": (type(None),),
    "list": (list,), "tuple": (list,), "Sequence": (list,), "dict": (dict,), "Mapping": (dict,)}


def register_builder(name: str, func: Callable[..., nn.Module] | None = None) -> None:
    """Allow checkpoints to name ``name`` (``"lessons.<module>:<function>"``)."""
    module, _, attr = name.partition(":")
    if not module.startswith("lessons.") or not attr.isidentifier():
        raise ValueError(f"builder must be 'lessons.<module>:<function>', got {name!r}")
    BUILDERS[name] = func


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder ``name``; a ValueError for any other name (nothing is imported)."""
    if not isinstance(name, str) or name not in BUILDERS:
        raise ValueError(f"builder {name!r} is not a registered lesson builder; known: "
                         f"{sorted(BUILDERS)} (builder must be 'lessons.<module>:<function>' "
                         "from lessons.checkpoints.BUILDERS)")
    if BUILDERS[name] is None:
        module, _, attr = name.partition(":")
        BUILDERS[name] = getattr(importlib.import_module(module), attr)
    return BUILDERS[name]


def check_builder_kwargs(name: str, kwargs: object) -> dict:
    """``kwargs`` checked against the signature of builder ``name``: known keyword names only,
    every required one given, each JSON value of the annotated type; a ValueError otherwise."""
    func = get_builder(name)
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"builder_kwargs of {name} must be a JSON object, got {kwargs!r}")
    params = {k: p for k, p in inspect.signature(func).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"builder_kwargs {unknown} are not arguments of {name}; its arguments: "
                         f"{sorted(params)}")
    required = sorted(k for k, p in params.items() if p.default is p.empty and k not in kwargs)
    if required:
        raise ValueError(f"builder_kwargs lack {required}, required by {name}")
    for key, value in kwargs.items():
        annotation = _annotation(params[key].annotation)
        if not _settable(annotation):             # a path or an object: null at most
            if value is None and ("None", "") in _members(annotation):
                continue
            raise ValueError(f"builder_kwargs.{key} of {name} is annotated {annotation!r}: such "
                             "an argument cannot come from a checkpoint header (null at most)")
        if not _fits(value, annotation):
            raise ValueError(f"builder_kwargs.{key} = {value!r} should be {annotation} "
                             f"(builder {name})")
    return kwargs


def build_model(builder: str, kwargs: dict) -> nn.Module:
    """Call the registered ``builder`` with checked ``kwargs`` (:func:`check_builder_kwargs`)."""
    return get_builder(builder)(**check_builder_kwargs(builder, kwargs))


def _annotation(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return "None | bool | int | float | str"          # no annotation: JSON scalars only
    return annotation if isinstance(annotation, str) else getattr(
        annotation, "__name__", str(annotation))


def _split(text: str, sep: str = ",") -> list[str]:
    """Split at top-level ``sep`` (not inside brackets)."""
    out, depth, part = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            out.append(part.strip())
            part = ""
        else:
            part += ch
    return [*out, part.strip()]


def _members(annotation: str) -> list[tuple[str, str]]:
    """``"tuple[int, ...] | None"`` -> ``[("tuple", "int, ..."), ("None", "")]``."""
    members = []
    for member in _split(annotation, "|"):
        base, _, inner = member.partition("[")
        members.append((base.strip().rsplit(".", 1)[-1], inner.removesuffix("]").strip()))
    return members


def _settable(annotation: str) -> bool:
    for base, inner in _members(annotation):
        if base not in _JSON_KINDS:
            return False
        if inner and not all(_settable(a) for a in _split(inner) if a != "..."):
            return False
    return True


def _fits(value: object, annotation: str) -> bool:
    for base, inner in _members(annotation):
        kinds = _JSON_KINDS[base]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            continue
        args = [a for a in _split(inner) if a != "..."] if inner else []
        if isinstance(value, list) and args:
            fixed = base == "tuple" and "..." not in inner and len(args) > 1
            if fixed and len(value) != len(args):
                continue
            if not all(_fits(v, args[i] if fixed else args[0]) for i, v in enumerate(value)):
                continue
        if isinstance(value, dict) and len(args) == 2 and not all(
                isinstance(k, str) and _fits(v, args[1]) for k, v in value.items()):
            continue
        return True
    return False


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
    world = meta["toyworld_version"]
    if world not in WORLD_VERSIONS:
        raise ValueError(f"{path} was trained on ToyWorld {world!r}, which this code does not "
                         f"know ({', '.join(WORLD_VERSIONS)}): retrain it with "
                         "`python -m reprod.toy.sweep`")
    with in_world(world):                           # its world's toy foundation models
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
                                f"`python -m reprod.toy.sweep` (see lessons/weights/README.md)")
    return path
