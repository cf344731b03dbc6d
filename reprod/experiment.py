"""Experiment configs: one YAML per run of a paper's table, validated before anything is built.

A config (``reprod/configs/*.yaml``) has these sections; every key is checked, so a typo is an
error that names it and lists the known keys::

    name: rein_dinov2_gtav
    description: one line
    base: _gtav_rein.yaml            # optional: a YAML this one extends (deep merge)
    paper: {table: rein_gtav_main, method: Rein, backbone: DINOv2-L}   # or null
    model: {builder: rein_mask2former, args: {...}}    # reprod.models.BUILDERS
    data:
      source: {dataset: gtav, root: data/gta, split: all, labels: trainids}
      targets: {cityscapes: {root: data/cityscapes, split: val, labels: trainids}, ...}
      pipeline: {...}                # reprod.pipelines.PipelineConfig
      rcs: null                      # or {min_pixels: 3000, temperature: 100, ...}
      num_workers: 8
    train: {...}                     # TrainSettings
    evaluate: {protocol: rein, crop: 512, stride: 341}
    expected: {trainable: 23569877, source: "the paper's table (or the file) that gives it"}
    departures: ["what differs from the paper or its code, and why"]

Overrides on the command line are ``dotted.key=value`` with YAML values (``train.steps=100``,
``data.source.root=/data/gta``, ``model.args.weights=null``). Relative paths are relative to the
working directory (docs/reproduction.md's layout: ``data/`` and ``weights/`` beside the checkout).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_DIR",
    "PRECISIONS",
    "DataConfig",
    "EvalConfig",
    "Expected",
    "Experiment",
    "ModelConfig",
    "SourceConfig",
    "TargetConfig",
    "TrainSettings",
    "apply_overrides",
    "build_model",
    "check_weights",
    "config_path",
    "deep_merge",
    "list_configs",
    "load_experiment",
    "parse_experiment",
    "source_dataset",
    "target_datasets",
    "to_yaml",
]

CONFIG_DIR = Path(__file__).with_name("configs")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainSettings:
    """The optimisation recipe. ``lr_mult`` per parameter group comes from the model's
    ``param_groups`` (e.g. tqdm's 0.1 x backbone); the schedule is mmcv's poly per group,
    ``(lr_g - min_lr) (1 - s / steps)^power + min_lr``, times a linear warm-up from
    ``warmup_ratio`` over ``warmup_steps`` (mmcv's ``warmup='linear'``)."""

    steps: int = 40000
    batch_size: int = 4                 # total over all processes
    lr: float = 1e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    power: float = 0.9
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    grad_clip: float | None = None
    precision: str = "fp32"             # fp32 as the official runs; bf16 autocast as an option
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 2000
    eval_every: int = 0                 # 0: evaluate the targets only at the end
    eval_max_images: int | None = None  # per target, for quick checks (marked as a subset)
    find_unused_parameters: bool = False
    num_workers: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train.steps and train.batch_size must be >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"train.optimizer {self.optimizer!r}: choose adamw or sgd")
        for key, least in (("log_every", 1), ("checkpoint_every", 1), ("eval_every", 0),
                           ("warmup_steps", 0), ("num_workers", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"train.{key} must be >= {least}, got {getattr(self, key)}"
                                 + (" (0: only at the end)" if key == "eval_every" else ""))
        if self.eval_max_images is not None and self.eval_max_images < 1:
            raise ValueError(f"train.eval_max_images must be >= 1 or null, got "
                             f"{self.eval_max_images}")


@dataclass
class SourceConfig:
    dataset: str
    root: str
    split: str = "all"
    labels: str | None = None


@dataclass
class TargetConfig:
    root: str
    split: str = "val"
    labels: str | None = None


@dataclass
class DataConfig:
    source: SourceConfig
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)
    rcs: dict | None = None


@dataclass
class ModelConfig:
    builder: str
    args: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    protocol: str = "rein"
    crop: int = 512
    stride: int = 341


@dataclass
class Expected:
    trainable: int | None = None        # trainable parameters of the built model
    source: str = ""                    # the paper's table or the code that gives the figure


@dataclass
class Experiment:
    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""
    paper: dict | None = None
    expected: Expected = field(default_factory=Expected)
    departures: list[str] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"train": TrainSettings, "evaluate": EvalConfig, "expected": Expected,
             "model": ModelConfig}
_PAPER_KEYS = ("table", "method", "backbone")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def config_path(name_or_path: str | Path) -> Path:
    """A config file, or the name of one in ``reprod/configs`` (``rein_dinov2_gtav``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    named = CONFIG_DIR / f"{p.name}.yaml" if p.suffix == "" else CONFIG_DIR / p.name
    if named.is_file():
        return named
    raise FileNotFoundError(f"no config {name_or_path!r}; the shipped ones: "
                            f"{', '.join(list_configs())}")


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise ValueError(f"{path}: `base` chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(_read_yaml(path.parent / base, (*seen, path.resolve())), data)


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), Mapping) else copy.deepcopy(v)
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``a.b.c=value`` (YAML value) set into ``data``; an unknown section is caught later."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[last] = yaml.safe_load(raw)
    return out


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; known in "
                         f"{where}: {sorted(known)}")
    types = {f.name: str(f.type) for f in fields(cls)}
    data = {k: _typed(v, types[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _typed(value: Any, annotation: str, where: str) -> Any:
    """Check a scalar field's type; YAML 1.1 reads ``1e-4`` as a string, so numbers written so
    are converted for float fields. A wrong type is an error naming the key."""
    kinds = [a.strip() for a in annotation.split("|")]
    if (value is None and "None" in kinds) or not set(kinds) <= {*_SCALARS, "None"}:
        return value
    if "float" in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, _SCALARS[k]) and not (k != "bool" and isinstance(value, bool))
           for k in kinds if k in _SCALARS):
        return value
    raise ValueError(f"{where} = {value!r} should be {annotation}")


def parse_experiment(data: Mapping, path: str = "<dict>") -> Experiment:
    """Validate a config mapping into an :class:`Experiment` (every key checked)."""
    d = dict(data)
    for required in ("name", "model", "data"):
        if required not in d:
            raise ValueError(f"{path}: the config has no {required!r} section")
    data_section = dict(d["data"] or {})
    if "source" not in data_section:
        raise ValueError(f"{path}: data.source is required (dataset, root, split, labels)")
    data_section["source"] = _build(SourceConfig, data_section["source"], "data.source")
    data_section["targets"] = {
        name: _build(TargetConfig, t, f"data.targets.{name}")
        for name, t in (data_section.get("targets") or {}).items()
        if t is not None}                                 # null drops a base config's target
    d["data"] = _build(DataConfig, data_section, "data")
    for key, cls in _SECTIONS.items():
        if key in d:
            d[key] = _build(cls, d[key] or {}, key)
    if d.get("paper") is not None:
        paper = d["paper"]
        if not isinstance(paper, Mapping) or set(paper) != set(_PAPER_KEYS):
            raise ValueError(f"{path}: paper must be null or have exactly {_PAPER_KEYS}")
    exp = _build(Experiment, {**d, "path": str(path)}, "config")
    _check_names(exp)
    return exp


def _check_names(exp: Experiment) -> None:
    from reprod.data.datasets import DATASETS
    from reprod.models import BUILDERS

    if exp.model.builder not in BUILDERS:
        raise ValueError(f"model.builder {exp.model.builder!r} is unknown; choose from "
                         f"{sorted(BUILDERS)}")
    for name in (exp.data.source.dataset, *exp.data.targets):
        if name not in DATASETS:
            raise ValueError(f"dataset {name!r} is unknown; choose from {sorted(DATASETS)}")


def load_experiment(config: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read a config (a path or a shipped name), apply ``key=value`` overrides, validate."""
    path = config_path(config)
    return parse_experiment(apply_overrides(_read_yaml(path), overrides), str(path))


def to_yaml(exp: Experiment) -> str:
    return yaml.safe_dump(exp.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def check_weights(exp: Experiment) -> None:
    """Every weight file or directory the model arguments name exists (before minutes of
    building): a missing one is a FileNotFoundError saying which key and where to get it."""
    from reprod.models import WEIGHT_ARGS

    missing = []
    for key in WEIGHT_ARGS:
        value = exp.model.args.get(key)
        if value is not None and not Path(value).exists():
            missing.append(f"model.args.{key} = {value}: {_weights_hint(exp, key)}")
    if missing:
        raise FileNotFoundError(f"{exp.name}: weight files not found (relative paths are from "
                                f"{Path.cwd()}):\n  " + "\n  ".join(missing)
                                + "\nOverride a path with model.args.<key>=PATH, or "
                                "model.args.<key>=null for random weights (benchmarks only).")


def _weights_hint(exp: Experiment, key: str) -> str:
    from lessons.backbones import get_bundle
    from lessons.mfuser import MFUSER_VARIANTS

    args = exp.model.args
    if key == "sd_weights":
        return ("a diffusers folder of stabilityai/stable-diffusion-2-1 (vae/, unet/, "
                "text_encoder/, tokenizer/, scheduler/), saved with save_pretrained elsewhere")
    if key == "tokenizer":
        return "SigLIP's tokenizer directory (see lessons.text.load_siglip_tokenizer)"
    name = {"vfm_weights": "dinov2_vitl14",
            "vlm_weights": MFUSER_VARIANTS.get(args.get("variant", "eva"), {}).get("vlm")
            }.get(key, args.get("backbone"))
    if name is None:
        import inspect

        from reprod.models import BUILDERS

        default = inspect.signature(BUILDERS[exp.model.builder]).parameters.get("backbone")
        name = default.default if default is not None else None
    return get_bundle(name).source if name else "see the builder's docstring"


def build_model(exp: Experiment, meta: bool = False, check: bool = True,
                random_weights: bool = False):
    """The experiment's model. ``meta``: shapes only; ``meta`` or ``random_weights``: no weight
    file is read (every weight argument but the tokenizer set to None)."""
    from reprod.models import BUILDERS, WEIGHT_ARGS

    args = dict(exp.model.args)
    if meta or random_weights:
        args = {k: (None if k in WEIGHT_ARGS and k != "tokenizer" else v)
                for k, v in args.items()}
    elif check:
        check_weights(exp)
    try:
        return BUILDERS[exp.model.builder](**args, meta=meta)
    except TypeError as e:
        raise ValueError(f"{exp.name}: model.args do not fit {exp.model.builder}: {e}") from e


def source_dataset(exp: Experiment, **kwargs):
    from reprod.data.datasets import build_dataset

    s = exp.data.source
    extra = {"labels": s.labels} if s.labels else {}
    return build_dataset(s.dataset, s.root, s.split, **extra, **kwargs)


def target_datasets(exp: Experiment, names: Sequence[str] | None = None) -> dict:
    """The target readers (``names``: a subset, in that order)."""
    from reprod.data.datasets import build_dataset

    names = list(names or exp.data.targets)
    unknown = [n for n in names if n not in exp.data.targets]
    if unknown:
        raise ValueError(f"{exp.name} has no target(s) {unknown}; its targets: "
                         f"{list(exp.data.targets)}")
    out = {}
    for n in names:
        t = exp.data.targets[n]
        out[n] = build_dataset(n, t.root, t.split, **({"labels": t.labels} if t.labels else {}))
    return out
