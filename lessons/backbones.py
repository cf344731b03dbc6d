"""Foundation-model encoders behind one block-wise interface (timm and open_clip).

Rein refines a frozen VFM's tokens *between* its blocks; MFuser runs a VFM and a VLM block by block
in lock-step with a fuser after each pair; CAT-Seg and tqdm read intermediate CLIP layers. All of
them need the same view of a ViT: image -> tokens, run block i, patch tokens as a map, final norm
and projection. :class:`Encoder` gives that view for every model used here, built by the libraries
that maintain them:

- DINOv2 ViT-S/B/L/G, with and without registers (timm ``VisionTransformer``);
- CLIP ViT-B/16 and ViT-L/14 (open_clip's own ``VisionTransformer``);
- EVA02-CLIP-L/14 (open_clip over timm ``Eva``: RoPE, SwiGLU) and SigLIP ViT-L/16 (open_clip over
  timm ``VisionTransformer`` with an attention-pool head);
- the toy VFM and VLM of this course (small timm / open_clip configs, weights in
  ``lessons/weights``).

A :class:`Bundle` records what a model needs around it (normalisation, patch size, pretraining
size, widths, out_indices, where its weights come from). Weights load only from local files,
through the libraries' own loaders (timm ``pretrained_cfg_overlay=dict(file=...)``, open_clip
``load_checkpoint`` on the built model: a local path is always read as a path, never looked up
as a pretrained tag such as ``openai``, so nothing is ever downloaded); a missing or mismatched
file is a clear error. Nothing a weights file holds is run: safetensors, ``torch.load`` with
``weights_only=True``, and OpenAI's released CLIP ``.pt`` files (TorchScript archives, which
``weights_only`` refuses) read by :func:`read_torchscript_state_dict`, which unpickles only their
tensors and never compiles their code. ``python -m lessons.backbones convert-openai IN.pt
OUT.safetensors`` writes such a file's tensors once as safetensors. Other input sizes work:
absolute position embeddings are resampled to the token grid (timm's ``resample_abs_pos_embed``),
EVA02's RoPE is rebuilt for the grid, and :meth:`Encoder.set_patch_size` resamples the patch kernel
(14 -> 16, as Rein and MFuser's CLIP/SigLIP variants do).

Dense VLM embeddings, two forms because the methods differ:

- ``dense_embedding(..., form="mfuser")``: the normal last block, then the tower's own head per
  token (CLIP ``ln_post`` + ``proj``; EVA ``norm`` + ``head``; SigLIP the attention-pool head
  applied densely, every token its own query) -- MFuser;
- ``form="maskclip"`` (CLIP only): the last block without query-key attention, values through the
  output projection plus a residual from the CLS token only, as CAT-Seg's released code does
  (``cls_residual=False`` gives MaskCLIP's full residual, the paper's form).

Dimension glossary: B batch, C width, D joint image-text dim, N tokens (prefix + h*w),
P prefix tokens (CLS, registers), h w token grid, H W image size.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import pickle
import re
import sys
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

__all__ = [
    "BUNDLES",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_METADATA_KEYS",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "TOY_VFM_CFG",
    "TOY_VLM_CFG",
    "WEIGHTS_DIR",
    "Adapter",
    "Bundle",
    "Encoder",
    "TokenGrid",
    "build_encoder",
    "convert_openai",
    "create_model",
    "get_bundle",
    "is_torchscript_archive",
    "load_open_clip_weights",
    "main",
    "openai_state_dict",
    "read_torchscript_state_dict",
    "register",
    "toy_weights_dir",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def toy_weights_dir(world: str | None = None) -> Path:
    """The folder of a ToyWorld version's toy foundation models (default: the current world,
    ``lessons.toyworld.use_world``): ``lessons/weights`` for world 2, ``lessons/weights/world1``
    for world 1 (its models were trained on world 1's renders)."""
    from lessons.toyworld import TOYWORLD_VERSION, current_world

    world = world or current_world()
    return WEIGHTS_DIR if world == TOYWORLD_VERSION else WEIGHTS_DIR / f"world{world.split('.')[0]}"


@dataclass(frozen=True)
class Bundle:
    """Everything a lesson needs to know about one encoder besides its weights' values."""

    name: str
    library: str                       # "timm" or "open_clip"
    arch: str                          # timm model name / open_clip model config name
    kind: str                          # "vfm" (vision only) or "vlm" (image-text)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    img_size: tuple[int, int]          # pretraining input size (H, W)
    width: int                         # token width C
    depth: int                         # number of blocks
    out_indices: tuple[int, ...]       # blocks whose outputs feed a decoder (0-based)
    embed_dim: int | None = None       # joint image-text dim D (VLMs)
    weights: str = ""                  # file name of the weights
    source: str = ""                   # where to get them
    kwargs: dict = field(default_factory=dict)   # timm create_model overrides / open_clip cfg

    def __post_init__(self) -> None:
        if self.library not in ("timm", "open_clip"):
            raise ValueError(f"{self.name}: unknown library {self.library!r}")
        if self.kind not in ("vfm", "vlm"):
            raise ValueError(f"{self.name}: kind must be 'vfm' or 'vlm', got {self.kind!r}")
        bad = [i for i in self.out_indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"{self.name}: out_indices {bad} outside 0..{self.depth - 1}")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) at the pretraining size."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size


def _dinov2(name: str, arch: str, width: int, depth: int, hub: str) -> Bundle:
    quarter = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23), 40: (9, 19, 29, 39)}[depth]
    return Bundle(
        name, "timm", arch, "vfm", IMAGENET_MEAN, IMAGENET_STD, 14, (518, 518), width, depth,
        quarter, weights="model.safetensors",
        source=f"timm/{arch}.lvd142m on the Hugging Face hub (its model.safetensors, saved "
               f"locally; timm's loader also converts the official {hub}.pth)")


BUNDLES: dict[str, Bundle] = {}


def register(bundle: Bundle) -> Bundle:
    """Add a bundle to :data:`BUNDLES` (a name may be registered once)."""
    if bundle.name in BUNDLES:
        raise ValueError(f"a bundle named {bundle.name!r} is already registered")
    BUNDLES[bundle.name] = bundle
    return bundle


for _size, _w, _d in (("s", 384, 12), ("b", 768, 12), ("l", 1024, 24), ("g", 1536, 40)):
    _full = {"s": "small", "b": "base", "l": "large", "g": "giant"}[_size]
    register(_dinov2(f"dinov2_vit{_size}14", f"vit_{_full}_patch14_dinov2", _w, _d,
                     f"dinov2_vit{_size}14_pretrain"))
    register(_dinov2(f"dinov2_vit{_size}14_reg", f"vit_{_full}_patch14_reg4_dinov2", _w, _d,
                     f"dinov2_vit{_size}14_reg4_pretrain"))

_OPENAI = "the OpenAI CLIP release (open_clip pretrained tag 'openai'), saved as a local file"
register(Bundle("clip_vitb16", "open_clip", "ViT-B-16", "vlm", CLIP_MEAN, CLIP_STD, 16,
                (224, 224), 768, 12, (3, 5, 7, 11), embed_dim=512, weights="ViT-B-16.pt",
                source=_OPENAI))
register(Bundle("clip_vitl14", "open_clip", "ViT-L-14", "vlm", CLIP_MEAN, CLIP_STD, 14,
                (224, 224), 1024, 24, (7, 11, 15, 23), embed_dim=768, weights="ViT-L-14.pt",
                source=_OPENAI))
register(Bundle("clip_vitl14_336", "open_clip", "ViT-L-14-336", "vlm", CLIP_MEAN, CLIP_STD, 14,
                (336, 336), 1024, 24, (7, 11, 15, 23), embed_dim=768,
                weights="ViT-L-14-336px.pt", source=_OPENAI))
register(Bundle("eva02_clip_l14", "open_clip", "EVA02-L-14", "vlm", CLIP_MEAN, CLIP_STD, 14,
                (224, 224), 1024, 24, (7, 11, 15, 23), embed_dim=768,
                weights="EVA02_CLIP_L_psz14_s4B.pt",
                source="the EVA-CLIP release (open_clip tag 'merged2b_s4b_b131k'), a local file"))
register(Bundle("eva02_clip_l14_336", "open_clip", "EVA02-L-14-336", "vlm", CLIP_MEAN, CLIP_STD,
                14, (336, 336), 1024, 24, (7, 11, 15, 23), embed_dim=768,
                weights="EVA02_CLIP_L_336_psz14_s6B.pt",
                source="the EVA-CLIP release (open_clip tag 'merged2b_s6b_b61k'), a local file"))
register(Bundle("siglip_vitl16_384", "open_clip", "ViT-L-16-SigLIP-384", "vlm", SIGLIP_MEAN,
                SIGLIP_STD, 16, (384, 384), 1024, 24, (7, 11, 15, 23), embed_dim=1024,
                weights="open_clip_model.safetensors",
                source="timm/ViT-L-16-SigLIP-384 on the Hugging Face hub (open_clip format), a "
                       "local file; its tokenizer is a separate local directory"))

# The course's own toy models (weights made by `python -m reprod.toy.pretrain`).
TOY_VFM_CFG = dict(img_size=(64, 128), patch_size=8, embed_dim=192, depth=6, num_heads=3,
                   reg_tokens=4, no_embed_class=True, init_values=0.1, num_classes=0)
TOY_VLM_CFG = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=(64, 128), patch_size=8, width=192, layers=6, head_width=64),
    text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=4),
)
_TOY_SOURCE = "`python -m reprod.toy.pretrain` (it writes lessons/weights/)"
register(Bundle("toy_vfm", "timm", "vit_small_patch14_reg4_dinov2", "vfm", IMAGENET_MEAN,
                IMAGENET_STD, 8, (64, 128), 192, 6, (1, 2, 3, 5), weights="toy_vfm.safetensors",
                source=_TOY_SOURCE, kwargs=TOY_VFM_CFG))
register(Bundle("toy_vfm_invariant", "timm", "vit_small_patch14_reg4_dinov2", "vfm",
                IMAGENET_MEAN, IMAGENET_STD, 8, (64, 128), 192, 6, (1, 2, 3, 5),
                weights="toy_vfm_invariant.safetensors", source=_TOY_SOURCE, kwargs=TOY_VFM_CFG))
register(Bundle("toy_vlm", "open_clip", "toy-clip", "vlm", CLIP_MEAN, CLIP_STD, 8, (64, 128), 192,
                6, (1, 2, 3, 5), embed_dim=128, weights="toy_vlm.safetensors",
                source=_TOY_SOURCE, kwargs=TOY_VLM_CFG))


def get_bundle(name: str | Bundle) -> Bundle:
    if isinstance(name, Bundle):
        return name
    if name not in BUNDLES:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(BUNDLES)}")
    return BUNDLES[name]


# ----------------------------------------------------------------------------------------------
# Building models from the libraries, weights from local files
# ----------------------------------------------------------------------------------------------
def _weights_path(bundle: Bundle, weights: str | Path | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights)
    if path.is_dir():
        path = path / bundle.weights
    if not path.is_file():
        raise FileNotFoundError(
            f"weights for {bundle.name} not found at {path}. Expected {bundle.weights}; get it "
            f"from {bundle.source}, then pass its local path (nothing is downloaded here).")
    return path


def _open_clip_cfg(bundle: Bundle) -> tuple[type, dict]:
    cfg = dict(bundle.kwargs) if bundle.kwargs else dict(open_clip.get_model_config(bundle.arch))
    custom = cfg.pop("custom_text", False)
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP), cfg


def create_model(bundle: str | Bundle, weights: str | Path | None = None,
                 meta: bool = False) -> nn.Module:
    """The library's own model: a timm ViT (VFM) or a whole open_clip model (VLM, text too).

    ``weights``: a local file (or a directory holding ``bundle.weights``); None keeps the random
    init. ``meta=True`` builds on the meta device (shapes and parameter counts only, no memory).
    """
    b = get_bundle(bundle)
    path = _weights_path(b, weights)
    if meta and path is not None:
        raise ValueError("meta=True builds shapes only: it cannot load weights")
    if b.library == "timm":
        try:            # timm builds the model and then loads the file in one call
            with torch.device("meta") if meta else contextlib.nullcontext():
                return timm.create_model(
                    b.arch, pretrained=path is not None,
                    pretrained_cfg_overlay=dict(file=str(path)) if path else None, **b.kwargs)
        except Exception as e:   # torch, safetensors and pickle each raise their own kind
            if path is None or not _raised_in(e, ("load_pretrained", "load_custom_pretrained")):
                raise            # building the model failed, not reading the weights
            raise _weights_error(b, path, e) from e
    cls, cfg = _open_clip_cfg(b)
    if meta:
        with torch.device("meta"):
            return cls(**cfg)
    if b.kwargs:
        model = cls(**cfg)                # a config of our own (the toy VLM)
    else:                                 # open_clip's registry; weights never by tag name
        with _quiet_logging():            # random init is asked for, or we load the file next
            model = open_clip.create_model(b.arch)
    if path is not None:
        try:
            load_open_clip_weights(model, path)
        except Exception as e:   # torch, safetensors, pickle and zip each raise their own kind
            raise _weights_error(b, path, e) from e
    return model


def _raised_in(error: BaseException, functions: tuple[str, ...]) -> bool:
    """Whether ``error`` was raised inside (a call made by) one of the named functions."""
    return any(frame.name in functions for frame in traceback.extract_tb(error.__traceback__))


def _weights_error(b: Bundle, path: Path, e: BaseException) -> ValueError:
    return ValueError(f"the weights in {path} do not fit {b.name} ({b.arch}), or the file is not "
                      f"a readable checkpoint: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _quiet_logging():
    """Silence open_clip's "no pretrained weights loaded" warning: the weights are ours to load
    next, or a random init was asked for (notebook 01's counts)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def load_open_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into an open_clip model, always as a path (never as a
    pretrained tag) and never running code: safetensors, a weights-only ``torch.save`` file
    (open_clip's own loader), or an OpenAI TorchScript archive read by
    :func:`read_torchscript_state_dict`."""
    path = Path(path)
    if not is_torchscript_archive(path):
        open_clip.load_checkpoint(model, str(path))
        return
    state = openai_state_dict(read_torchscript_state_dict(path))
    unsaved = {k for k, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in unsaved}      # e.g. attn_mask
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    open_clip.model.resize_pos_embed(state, model)
    open_clip.model.resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def build_encoder(bundle: str | Bundle, weights: str | Path | None = None,
                  meta: bool = False) -> Encoder:
    """An :class:`Encoder` over the bundle's vision tower (see :func:`create_model`)."""
    b = get_bundle(bundle)
    return Encoder(b, create_model(b, weights, meta))


# ----------------------------------------------------------------------------------------------
# OpenAI's released CLIP files are TorchScript archives: read their tensors without running them
# ----------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding ``<archive>/constants.pkl`` and ``<archive>/code/``: TorchScript's layout."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names) and any(
        n.count("/") > 1 and n.split("/")[1] == "code" for n in names)


class _ScriptObject:
    """Stands in for a TorchScript class instance: keeps its attributes, runs nothing."""

    qualname = ""

    def __setstate__(self, state: object) -> None:
        self.attrs = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: object
                    ) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles an archive's ``data.pkl`` allowing tensors, storages, OrderedDict, TorchScript's
    list tags and stand-ins for its ``__torch__`` classes; any other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix, self.classes = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                self.classes[qual] = type(name, (_ScriptObject,), {"qualname": qual})
            return self.classes[qual]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")) \
                and name != "build_tensor_from_id":
            return lambda value, *_: value
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        size = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * size:
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, not "
                                         f"{numel * size}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(raw[: numel * size], dtype=dtype)


def _module_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, list[str]]:
    """``{qualified class: its parameter and buffer names}`` from the ``__parameters__`` and
    ``__buffers__`` lines of the archive's code files (read as text, never compiled)."""
    out = {}
    pattern = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n"
                         r"  __buffers__ = \[(.*?)\]", re.M)
    for name in archive.namelist():
        if name.startswith(prefix + "code/") and name.endswith(".py"):
            module = name[len(prefix + "code/"):-3].replace("/", ".")
            for cls, params, buffers in pattern.findall(archive.read(name).decode()):
                out[f"{module}.{cls}"] = re.findall(r'"([^"]+)"', params + buffers)
    return out


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers by dotted name) of a TorchScript archive, read from
    its pickled tensors with a restricted unpickler: the archive's code is never run."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise ValueError("no single <archive>/data.pkl")
            prefix = pkl[0][: -len("data.pkl")]
            tensors = _module_tensors(z, prefix)
            root = _TensorsOnlyUnpickler(z, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, RuntimeError,
            ValueError) as e:
        raise ValueError(f"{path} is not a TorchScript archive whose tensors can be read "
                         f"safely: {e}") from e
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors, state, path)
    return state


def _collect(obj: object, prefix: str, tensors: dict[str, list[str]],
             state: dict[str, torch.Tensor], path: Path) -> None:
    if not isinstance(obj, _ScriptObject):
        raise ValueError(f"{path}: the archive's root is not a TorchScript module")
    if obj.qualname not in tensors:
        raise ValueError(f"{path}: no parameter list for {obj.qualname} in the archive's code")
    for name in tensors[obj.qualname]:
        value = getattr(obj, "attrs", {}).get(name)
        if isinstance(value, torch.Tensor):
            state[prefix + name] = value
    for name, value in getattr(obj, "attrs", {}).items():
        if isinstance(value, _ScriptObject) and value.qualname in tensors:
            _collect(value, f"{prefix}{name}.", tensors, state, path)


def openai_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI archive's state dict without its metadata tensors (as open_clip drops them)."""
    return {k: v for k, v in state.items() if k not in OPENAI_METADATA_KEYS}


def convert_openai(src: str | Path, dst: str | Path) -> Path:
    """Write the tensors of OpenAI's TorchScript ``src`` (e.g. ``ViT-L-14.pt``) to ``dst`` as
    safetensors (a one-time conversion; the loaders also read ``src`` directly)."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no file at {src}")
    if not is_torchscript_archive(src):
        raise ValueError(f"{src} is not a TorchScript archive (OpenAI's released .pt files are)")
    state = {k: v.contiguous() for k, v in openai_state_dict(
        read_torchscript_state_dict(src)).items()}
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(state, str(tmp), metadata={"source": src.name, "format": "openai-clip"})
    tmp.replace(dst)
    return dst


# ----------------------------------------------------------------------------------------------
# The block-wise interface
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenGrid:
    """What blocks need to know about the token layout: the grid and EVA02's rotary embedding."""

    h: int
    w: int
    rope: torch.Tensor | None = None


Adapter = Callable[[int, torch.Tensor, TokenGrid], torch.Tensor]   # (block i, tokens, grid)


class Encoder(nn.Module):
    """One block-wise view of a ViT, whatever library built it.

    >>> enc = build_encoder("dinov2_vitl14", weights="~/weights/...")     # doctest: +SKIP
    >>> x, grid = enc.embed(images)              # (B, N, C) tokens, with position embeddings
    >>> for i in range(enc.depth):
    ...     x = enc.block(i, x, grid)            # an adapter may change x here
    >>> feature_map = enc.patch_map(x, grid)     # (B, C, h, w)
    """

    def __init__(self, bundle: Bundle, model: nn.Module):
        super().__init__()
        self.bundle = bundle
        self.model = model                                   # the library's model, untouched
        if bundle.library == "timm":
            self.style, self.vit = "timm", model
        elif hasattr(model.visual, "trunk"):                 # open_clip over timm: EVA, SigLIP
            self.style, self.vit = "timm", model.visual.trunk
        else:                                                # open_clip's own ViT: CLIP
            self.style, self.vit = "open_clip", model.visual
        self.is_eva = getattr(self.vit, "rope", None) is not None
        # Position embeddings at other grids: bicubic without antialiasing, as the official
        # DINOv2 / Rein / MFuser code interpolates (timm's own dynamic-size path antialiases:
        # set pos_antialias=True to match it).
        self.pos_interpolation, self.pos_antialias = "bicubic", False

    # --- shape facts ------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        return self.vit.blocks if self.style == "timm" else self.vit.transformer.resblocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.bundle.width

    @property
    def patch_size(self) -> int:
        conv = self._patch_conv()
        return conv.kernel_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens if self.style == "timm" else 1

    def _patch_conv(self) -> nn.Conv2d:
        return self.vit.patch_embed.proj if self.style == "timm" else self.vit.conv1

    def _pos_embed(self) -> torch.Tensor | None:
        """Absolute position embedding as (1, [P +] h0*w0, C), or None (EVA02 uses RoPE too)."""
        if self.style == "timm":
            return self.vit.pos_embed
        return self.vit.positional_embedding.unsqueeze(0)

    def _pos_grid(self) -> tuple[int, int]:
        pos = self._pos_embed()
        n = pos.shape[1] - self._pos_prefix()
        h0, w0 = self.bundle.grid
        if h0 * w0 == n:
            return h0, w0
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{self.bundle.name}: cannot infer the position grid of {n} tokens")
        return side, side

    def _pos_has_no_prefix(self) -> bool:
        return self.style == "timm" and getattr(self.vit, "no_embed_class", False)

    def _pos_prefix(self) -> int:
        """Rows of the position embedding that belong to prefix tokens (CLS, registers)."""
        return 0 if self._pos_has_no_prefix() else self.num_prefix_tokens

    # --- the block-wise forward -------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> the bundle's normalisation."""
        mean = images.new_tensor(self.bundle.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.bundle.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenGrid]:
        """Normalised images (B, 3, H, W) -> tokens (B, N, C) and their grid.

        ``mask`` (B, h*w) bool replaces those patch embeddings by ``mask_token`` (C,) before the
        position embedding is added, as masked-image-modelling pretraining (iBOT) does.

        Position embeddings are resampled to the image's token grid when it differs from the
        pretraining grid (``self.pos_interpolation``: bicubic, or bilinear as MFuser's CLIP);
        EVA02's rotary embedding is rebuilt for the grid. Image sides that are not a multiple of
        the patch size are cropped by the patch convolution (as tqdm's EVA02 at 512 / 14).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[-2] < p or images.shape[-1] < p:
            raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than one patch ({p})")
        x = self._patch_conv()(images)                          # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                        # (B, h*w, C)
        if mask is not None:
            if mask.shape != x.shape[:2] or mask_token is None:
                raise ValueError(f"mask must be (B, h*w) = {tuple(x.shape[:2])} with a "
                                 f"mask_token, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = self._add_prefix_and_pos(x, (h, w))                 # (B, N, C)
        rope = self._rope(h, w) if self.is_eva else None
        x = self.vit.norm_pre(x) if self.style == "timm" else self.vit.ln_pre(x)
        return x, TokenGrid(h, w, rope)

    def _rope(self, h: int, w: int) -> torch.Tensor:
        """EVA02's rotary embedding for an (h, w) grid, rescaled to the pretraining grid."""
        rope = self.vit.rope
        if rope.feat_shape is None or list(rope.feat_shape) == [h, w]:
            return rope.get_embed(shape=[h, w])
        # timm caches the pretraining grid's embedding and ignores `shape`; rebuild it from the
        # cached bands (positions are scaled by ref_feat_shape, EVA's pt -> ft interpolation)
        return rope._build_embed_cat([h, w], rope.bands)

    def _add_prefix_and_pos(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B = x.shape[0]
        pos = self._pos_embed()
        if pos is not None and tuple(grid) != self._pos_grid():
            prefix = self._pos_prefix()
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self._pos_grid()),
                                         num_prefix_tokens=prefix,
                                         interpolation=self.pos_interpolation,
                                         antialias=self.pos_antialias)
        if self.style == "open_clip":
            cls = self.vit.class_embedding.view(1, 1, -1).expand(B, -1, -1).to(x.dtype)
            return torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        prefix = [t.expand(B, -1, -1) for t in (self.vit.cls_token, self.vit.reg_token)
                  if t is not None]
        if self._pos_has_no_prefix():               # DINOv2-style: pos only on patch tokens
            x = x + pos if pos is not None else x
            return torch.cat([*prefix, x], dim=1)
        x = torch.cat([*prefix, x], dim=1)
        return x + pos if pos is not None else x

    def block(self, i: int, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Run block ``i`` on tokens (B, N, C)."""
        blk = self.blocks[i]
        if self.is_eva:
            return blk(x, rope=grid.rope)
        return blk(x)

    def patch_map(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Patch tokens (B, N, C) without the prefix -> a feature map (B, C, h, w)."""
        patches = x[:, self.num_prefix_tokens:]                          # (B, h*w, C)
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid.h, grid.w)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's last LayerNorm (timm ``norm``, open_clip ``ln_post``)."""
        return self.vit.norm(x) if self.style == "timm" else self.vit.ln_post(x)

    def forward_tokens(self, images: torch.Tensor, adapter: Adapter | None = None,
                       blocks: int | None = None, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor], torch.Tensor, TokenGrid]:
        """Run the blocks; ``adapter(i, x, grid)`` may refine the tokens after block i.

        ``blocks`` stops after that many blocks (default: all); ``mask``/``mask_token`` go to
        :meth:`embed`. Returns the patch maps at ``out_indices`` (B, C, h, w) taken after
        refinement and before the final norm (as Rein does), the last tokens (B, N, C) and the
        grid.
        """
        x, grid = self.embed(images, mask=mask, mask_token=mask_token)
        maps = []
        for i in range(self.depth if blocks is None else blocks):
            x = self.block(i, x, grid)
            if adapter is not None:
                x = adapter(i, x, grid)
            if i in self.bundle.out_indices:
                maps.append(self.patch_map(x, grid))
        return maps, x, grid

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch maps (B, C, h, w) at the bundle's out_indices, from normalised images."""
        return self.forward_tokens(images)[0]

    # --- changing the input geometry ----------------------------------------------------------
    @torch.no_grad()
    def set_patch_size(self, patch_size: int, interpolation: str = "bicubic") -> None:
        """Resample the patch-embedding kernel to ``patch_size`` (Rein, MFuser: 14 -> 16).

        Plain interpolation of the kernel weights (bicubic for DINOv2 in Rein and MFuser, bilinear
        for MFuser's CLIP), as the official conversions do -- not FlexiViT's pseudo-inverse resize.
        """
        grid = self._pos_grid()                        # the stored position grid is kept
        conv = self._patch_conv()
        old = conv.weight                                                # (C, 3, p, p)
        new = F.interpolate(old.float(), size=(patch_size, patch_size), mode=interpolation,
                            align_corners=False).to(old.dtype)
        conv.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        conv.kernel_size = conv.stride = (patch_size, patch_size)
        if self.style == "timm":
            pe = self.vit.patch_embed
            pe.patch_size = (patch_size, patch_size)
            pe.strict_img_size = False
        self.bundle = replace(self.bundle, patch_size=patch_size,
                              img_size=(grid[0] * patch_size, grid[1] * patch_size))

    @torch.no_grad()
    def set_pos_grid(self, grid: tuple[int, int], interpolation: str = "bicubic") -> None:
        """Resample the absolute position embedding to ``grid`` once (e.g. 37x37 -> 32x32)."""
        pos = self._pos_embed()
        prefix = self._pos_prefix()
        new = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self._pos_grid()),
                                     num_prefix_tokens=prefix, interpolation=interpolation,
                                     antialias=False)
        if self.style == "timm":
            self.vit.pos_embed = nn.Parameter(new, requires_grad=pos.requires_grad)
        else:
            self.vit.positional_embedding = nn.Parameter(new[0], requires_grad=pos.requires_grad)
        self.bundle = replace(self.bundle, img_size=(grid[0] * self.patch_size,
                                                     grid[1] * self.patch_size))

    # --- VLM embeddings ---------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, N, C) -> the tower's global image embedding (B, D) (VLMs)."""
        self._need_vlm()
        if self.style == "open_clip":
            return self.vit.ln_post(x[:, 0]) @ self.vit.proj
        x = self.vit.norm(x)
        pool = getattr(self.vit, "attn_pool", None)
        pooled = pool(x) if pool is not None else x[:, 0]            # SigLIP: MAP; EVA: CLS
        return self._timm_head(pooled)

    def _timm_head(self, x: torch.Tensor) -> torch.Tensor:
        """timm's fc_norm and head, then open_clip's projection head, on pooled or dense tokens."""
        return self.model.visual.head(self.vit.head(self.vit.fc_norm(x)))

    def dense_embedding(self, x: torch.Tensor, grid: TokenGrid, form: str = "mfuser",
                        before_last: torch.Tensor | None = None,
                        cls_residual: bool = True) -> torch.Tensor:
        """Per-patch image embeddings (B, D, h, w) in the joint image-text space.

        ``form="mfuser"``: ``x`` are the final tokens; each goes through the tower's head.
        ``form="maskclip"`` (CLIP only, CAT-Seg): ``before_last`` are the tokens entering the last
        block; that block is replaced by its value path (see the module docstring).
        """
        self._need_vlm()
        if form == "maskclip":
            if before_last is None:
                raise ValueError("form='maskclip' needs before_last: the last block's input")
            tokens = self._maskclip_last_block(before_last, cls_residual)
            tokens = self.vit.ln_post(tokens) @ self.vit.proj             # (B, N, D)
        elif form == "mfuser":
            tokens = self._dense_head(x)                                  # (B, N, D)
        else:
            raise ValueError(f"unknown dense form {form!r}; choose 'mfuser' or 'maskclip'")
        return self.patch_map(tokens, grid)

    def _dense_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "open_clip":
            return self.vit.ln_post(x) @ self.vit.proj
        x = self.vit.norm(x)
        pool = getattr(self.vit, "attn_pool", None)
        if pool is not None:                                 # SigLIP: every token its own query
            x = _attention_pool_dense(pool, x)
        return self._timm_head(x)                            # EVA: the Linear head per token

    def _maskclip_last_block(self, x: torch.Tensor, cls_residual: bool) -> torch.Tensor:
        if self.style != "open_clip":
            raise ValueError("the MaskCLIP dense form is defined for OpenAI-style CLIP towers")
        blk = self.blocks[-1]
        attn = blk.attn
        C = x.shape[-1]
        y = blk.ln_1(x)                                                   # (B, N, C)
        w_v = attn.in_proj_weight[2 * C:] if attn.in_proj_weight is not None else attn.v_proj_weight
        v = F.linear(y, w_v, attn.in_proj_bias[2 * C:])                  # q / k / v split or not
        v = attn.out_proj(v)                                              # no q-k attention
        v = blk.ls_1(v) + (x[:, :1] if cls_residual else x)               # CAT-Seg: CLS only
        return v + blk.ls_2(blk.mlp(blk.ln_2(v)))

    def _need_vlm(self) -> None:
        if self.bundle.kind != "vlm":
            raise ValueError(f"{self.bundle.name} is a vision-only model: no image-text head")

    # --- training helpers -----------------------------------------------------------------------
    def freeze(self) -> Encoder:
        """No gradient to any encoder weight (adapters attached elsewhere still train)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def _attention_pool_dense(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's attention-pool head with every token as its own query: (B, N, C) -> (B, N, C).

    The global form asks one learned latent query; MFuser's dense SigLIP embedding asks each
    token's own projection instead (MHA(h, h, h)), then the same output projection and MLP.
    """
    B, N, C = x.shape
    heads, hd = pool.num_heads, pool.head_dim
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(x).reshape(B, N, heads, hd).transpose(1, 2)                  # (B, heads, N, hd)
    k, v = pool.kv(x).reshape(B, N, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    out = pool.proj(out)
    return out + pool.mlp(pool.norm(out)) if pool.mlp is not None else out


def main(argv: list[str] | None = None) -> int:
    """``python -m lessons.backbones convert-openai IN.pt OUT.safetensors``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lessons.backbones",
                                 description="one-time conversions of released weight files")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert-openai", help="OpenAI's TorchScript CLIP .pt -> safetensors, "
                       "reading its tensors without running its code")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    try:
        out = convert_openai(args.src, args.dst)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
