"""Experiment configs: every shipped config validates and builds on the meta device with the
trainable-parameter total the papers give (or a count of the official code); bad configs fail with a
clear message."""

from __future__ import annotations

import pytest
import yaml

from lessons.text import default_tokenizer
from reprod.experiment import (
    apply_overrides,
    build_model,
    check_weights,
    list_configs,
    load_experiment,
    parse_experiment,
)
from reprod.models import trainable_parameters

REIN_TOKENS = 2_990_081          # the paper's 2.99M (Rein v1 Tables 2 and 6)
REIN_HEAD = 20_579_796           # Rein's Mask2Former head, the paper's ~20.6M (v1 §4.2)
SIGLIP_UNUSED = 49 * (1024 * 1024 + 1024)   # adapter_proj1/2 x 24 + adapter_proj3: 51.43M


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _siglip_tokenizer(texts, context_length=64):
    """Shapes only: SigLIP's real tokenizer is a local Hugging Face directory."""
    return default_tokenizer()(texts, context_length) % 32000


def _meta_model(name: str):
    exp = load_experiment(name)
    if exp.model.args.get("variant") == "siglip":
        exp.model.args["tokenizer"] = _siglip_tokenizer
    return exp, build_model(exp, meta=True)


def _published_check(name: str, model, total: int) -> None:
    """The figure the paper (or a count of the official code) gives for each config (its
    rounding)."""
    if name.startswith(("rein_", "querydiff_")):
        assert _n(model.reins) == REIN_TOKENS
        assert _n(model.head) == REIN_HEAD
    elif name.startswith("frozen_"):
        assert total == _n(model.head) and round(total / 1e6, 1) == 20.6
    elif name.startswith("full_"):
        assert round(_n(model.encoder) / 1e6, 2) == 304.20
    elif name.startswith("tqdm_"):
        assert _n(model.head) == 25_717_716
        assert _n(model.encoder) == sum(p.numel() for p in model.encoder.vit.parameters())
    elif name.startswith("catseg_"):
        assert round(total / 1e6, 1) == 70.3
    elif name.startswith("mfuser_clip"):
        assert round(total / 1e6, 2) == 170.06
    elif name.startswith("mfuser_eva"):
        assert round((total + 14_592) / 1e6, 2) == 118.65      # + the unused random_text
    elif name.startswith("mfuser_siglip"):
        assert round((total + SIGLIP_UNUSED) / 1e6, 2) == 170.39
    elif name.startswith("toy_"):
        enc = getattr(model.encoder, "vfm", model.encoder)
        assert enc.bundle.name.startswith("toy_")                # the lesson's own model
    else:
        raise AssertionError(f"no published figure for {name}: add one")


@pytest.mark.parametrize("name", list_configs())
def test_config_builds_on_meta_with_the_published_total(name):
    exp, model = _meta_model(name)
    total = trainable_parameters(model)
    assert total == exp.expected.trainable, (name, total)
    assert exp.expected.source
    _published_check(name, model, total)


def test_configs_cover_the_issue():
    names = set(list_configs())
    assert {"rein_dinov2_gtav", "rein_eva02_gtav", "tqdm_eva02_gtav", "querydiff_dinov2_gtav",
            "mfuser_clip_gtav", "mfuser_eva_gtav", "mfuser_siglip_gtav", "catseg_clipl_gtav",
            "frozen_dinov2_gtav", "full_dinov2_gtav"} <= names
    sources = {load_experiment(n).data.source.dataset for n in names}
    targets = {t for n in names for t in load_experiment(n).data.targets}
    assert sources == {"gtav", "cityscapes"}
    assert targets == {"cityscapes", "bdd100k", "mapillary", "acdc"}


@pytest.mark.parametrize("name", list_configs())
def test_paper_rows_exist(name):
    from lessons.papers import get_table

    exp = load_experiment(name)
    if exp.paper is None:
        assert exp.departures, "a config without a paper row must say why"
        return
    table = get_table(exp.paper["table"])
    rows = [r for r in table.rows
            if (r.method, r.backbone) == (exp.paper["method"], exp.paper["backbone"])]
    assert len(rows) == 1
    assert set(exp.data.targets) <= set(table.columns)


def _minimal(**over) -> dict:
    base = {"name": "x", "model": {"builder": "toy", "args": {"method": "rein"}},
            "data": {"source": {"dataset": "gtav", "root": "nowhere"}}}
    return {**base, **over}


@pytest.mark.parametrize("data, match", [
    (_minimal(trian={}), r"unknown key\(s\) \['config.trian'\]"),
    (_minimal(train={"stepz": 3}), r"train.stepz"),
    (_minimal(data={"source": {"dataset": "gtav", "rooot": "x"}}), r"data.source.rooot"),
    (_minimal(data={"source": {"dataset": "gtav", "root": "x"},
                    "targets": {"cityscapes": {"root": "y", "splt": "val"}}}),
     r"data.targets.cityscapes.splt"),
    (_minimal(model={"builder": "rein2"}), r"model.builder 'rein2' is unknown"),
    (_minimal(data={"source": {"dataset": "gta5", "root": "x"}}), r"dataset 'gta5' is unknown"),
    (_minimal(train={"precision": "fp16"}), r"precision 'fp16'"),
    (_minimal(paper={"table": "t"}), r"paper must be null or have exactly"),
    (_minimal(train={"steps": "many"}), r"train.steps = 'many' should be int"),
    (_minimal(train={"lr": "fast"}), r"train.lr = 'fast' should be float"),
    ({"name": "x", "data": {}}, r"no 'model' section"),
])
def test_bad_configs_name_the_problem(data, match):
    with pytest.raises(ValueError, match=match):
        parse_experiment(data)


def test_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_minimal(train={"steps": 5, "lr": 0.1})))
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 7}\n")
    exp = load_experiment(tmp_path / "child.yaml", ["train.batch_size=3", "train.lr=1e-3",
                                                     "model.args.lora_rank=null"])
    assert (exp.train.steps, exp.train.batch_size, exp.train.lr) == (7, 3, 1e-3)
    assert exp.model.args == {"method": "rein", "lora_rank": None}
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ValueError, match="train.stepz"):
        load_experiment(tmp_path / "child.yaml", ["train.stepz=1"])
    with pytest.raises(FileNotFoundError, match="rein_dinov2_gtav"):
        load_experiment("no_such_config")


def test_null_drops_a_base_target():
    exp = load_experiment("rein_dinov2_cityscapes")
    assert list(exp.data.targets) == ["bdd100k", "mapillary"]
    assert exp.data.source.dataset == "cityscapes"


def test_missing_weights_say_which_key_and_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = load_experiment("mfuser_eva_gtav")
    with pytest.raises(FileNotFoundError) as e:
        check_weights(exp)
    msg = str(e.value)
    assert "model.args.vfm_weights = weights/dinov2_vitl14/model.safetensors" in msg
    assert "timm/vit_large_patch14_dinov2.lvd142m" in msg
    assert "EVA-CLIP release" in msg and "model.args.<key>=null" in msg
    exp = load_experiment("querydiff_dinov2_gtav")
    with pytest.raises(FileNotFoundError, match="stable-diffusion-2-1"):
        build_model(exp)


@pytest.mark.parametrize("name, stats", [
    ("rein_dinov2_gtav", {"dinov2_vitl14": "imagenet"}),
    ("rein_eva02_gtav", {"eva02_l14_mim": "clip"}),
    ("tqdm_eva02_gtav", {"eva02_clip_l14_336": "clip"}),
    ("mfuser_eva_gtav", {"dinov2_vitl14": "imagenet", "eva02_clip_l14_336": "clip"}),
    ("mfuser_siglip_gtav", {"dinov2_vitl14": "imagenet", "siglip_vitl16_384": "siglip"}),
    ("catseg_clipl_gtav", {"clip_vitl14_336": "clip"}),
])
def test_each_encoder_normalises_with_its_recipe_statistics(name, stats):
    """Per-backbone normalisation lives in the encoders (MFuser's fused encoders,
    devinxzhang/MFuser@cd8ef85 models/backbones/: DINOv2 ImageNet, CLIP / EVA02 CLIP's, SigLIP
    0.5; Rein's DINOv2 config: ImageNet)."""
    from lessons.backbones import CLIP_MEAN, IMAGENET_MEAN, SIGLIP_MEAN

    means = {"imagenet": IMAGENET_MEAN, "clip": CLIP_MEAN, "siglip": SIGLIP_MEAN}
    _, model = _meta_model(name)
    enc = model.encoder
    encoders = [enc.vfm, enc.vlm] if hasattr(enc, "vfm") else [enc]
    assert {e.bundle.name: e.bundle.mean for e in encoders} == {
        k: means[v] for k, v in stats.items()}


def test_paper_forms_reach_the_configs_by_override():
    """The paper-form flags of lessons reach the real-scale configs as model.args overrides."""
    exp = load_experiment("rein_dinov2_gtav", ["model.args.zero_init=true"])
    model = build_model(exp, meta=True)
    assert not hasattr(model.reins, "scale") or model.reins.scale is None   # the paper: no scale
    assert trainable_parameters(model) == exp.expected.trainable - 1
    qd = build_model(load_experiment("querydiff_dinov2_gtav", ["model.args.queries_from=agents"]),
                     meta=True)
    assert qd.queries_from == "agents"
    cs = build_model(load_experiment("catseg_clipl_gtav", ["model.args.official_ignore=true"]),
                     meta=True)
    assert cs.official_ignore


def test_the_tqdm_builder_does_not_shadow_the_progress_bar():
    import reprod.models as models

    assert models.BUILDERS["tqdm"] is models.tqdm_mask2former        # configs say builder: tqdm
    assert not hasattr(models, "tqdm")
    assert load_experiment("tqdm_eva02_gtav").model.builder == "tqdm"
