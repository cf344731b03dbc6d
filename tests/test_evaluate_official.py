"""reprod.evaluate's ``--official`` families reach their lessons.convert loaders, and
reprod.predict offers the same families. (The converters themselves: tests/test_convert.py,
test_convert_tqdm.py, test_mfuser.py, test_catseg.py.)"""

from __future__ import annotations

import pytest

from lessons import convert
from reprod import evaluate, predict

LOADERS = {"rein": "load_official_rein_model", "mfuser": "load_official_mfuser",
           "tqdm": "load_official_tqdm", "catseg": "load_official_catseg"}


@pytest.mark.parametrize("kind", evaluate.OFFICIAL)
def test_each_family_reaches_its_converter(kind, monkeypatch):
    calls = []
    monkeypatch.setattr(convert, LOADERS[kind],
                        lambda path, model, strict: calls.append((path, model, strict)) or kind)
    assert evaluate.load_official("model", "ckpt.pth", kind, strict=False) == kind
    assert calls == [("ckpt.pth", "model", False)]


def test_the_families_and_an_unknown_one():
    assert set(evaluate.OFFICIAL) == set(LOADERS)
    with pytest.raises(ValueError, match=r"unknown --official 'segformer'.*tqdm"):
        evaluate.load_official(None, "x.pth", "segformer")
    assert "--official" in evaluate._parser().format_help()
    assert evaluate._parser().parse_args(["c", "--checkpoint", "x", "--official",
                                          "tqdm"]).official == "tqdm"


@pytest.mark.parametrize("kind", ["tqdm", "catseg"])
def test_predict_offers_the_same_families(kind, monkeypatch, tmp_path):
    seen = {}

    def fake(spec, weights, official, *rest):
        seen.update(spec=spec, official=official)
        raise ValueError("stop here")

    monkeypatch.setattr(predict, "load_predictor", fake)
    argv = ["cfg", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", "w.pth",
            "--official", kind]
    assert predict.main(argv) == 2
    assert seen == {"spec": "cfg", "official": kind}
    with pytest.raises(SystemExit):
        predict.main([*argv[:-1], "segformer"])
