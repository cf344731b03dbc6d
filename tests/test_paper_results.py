"""Tests of lessons.papers: the shipped published-results YAML and its validator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lessons.papers import (
    PAPERS,
    Table,
    get_table,
    gtav_to_real,
    load_paper_results,
)

# Rein paper v1 (arXiv 2312.04265), Table 2.
REIN_DINOV2 = {"cityscapes": 66.4, "bdd100k": 60.4, "mapillary": 66.1, "mean": 64.3}


@pytest.fixture(scope="module")
def tables() -> list[Table]:
    return load_paper_results()


def _row(table: Table, method: str, backbone: str | None) -> dict[str, float | None]:
    matches = [r for r in table.rows if r.method == method and r.backbone == backbone]
    assert len(matches) == 1, (table.id, method, backbone)
    return matches[0].values


def _table(**overrides: object) -> dict:
    table = {
        "id": "toy_table",
        "paper": "Rein",
        "venue": "CVPR 2024",
        "source": "test",
        "setting": "GTAV -> Cityscapes, BDD100K, Mapillary",
        "protocol": "test",
        "metric": "mIoU",
        "columns": ["cityscapes", "bdd100k", "mapillary", "mean"],
        "rows": [{"method": "Rein", "backbone": "DINOv2-L", "values": [66.4, 60.4, 66.1, 64.3]}],
    }
    table.update(overrides)
    return table


def _write(tmp_path: Path, *tables: dict) -> Path:
    path = tmp_path / "results.yaml"
    path.write_text(yaml.safe_dump({"schema": 1, "tables": list(tables)}), encoding="utf-8")
    return path


# --- the shipped file --------------------------------------------------------------------


def test_shipped_file_loads_with_unique_ids(tables: list[Table]) -> None:
    ids = [t.id for t in tables]
    assert len(ids) == len(set(ids))
    assert {t.paper for t in tables} == set(PAPERS)
    for table in tables:
        assert table.rows
        for row in table.rows:
            assert list(row.values) == list(table.columns)


def test_main_tables_present(tables: list[Table]) -> None:
    for table_id in ("rein_gtav_main", "tqdm_gtav_main", "querydiff_gtav_main", "mfuser_gtav_main"):
        assert get_table(table_id, tables).columns == ("cityscapes", "bdd100k", "mapillary", "mean")


def test_spot_checks_against_the_papers(tables: list[Table]) -> None:
    assert _row(get_table("rein_gtav_main", tables), "Rein", "DINOv2-L") == REIN_DINOV2
    mfuser = _row(get_table("mfuser_gtav_main", tables), "MFuser", "DINOv2-L + EVA02-L")
    assert mfuser == {"cityscapes": 70.19, "bdd100k": 63.13, "mapillary": 71.28, "mean": 68.20}
    tqdm = _row(get_table("tqdm_gtav_main", tables), "tqdm", "EVA02-CLIP-L")
    assert tqdm == {"cityscapes": 68.88, "bdd100k": 59.18, "mapillary": 70.10, "mean": 66.05}
    querydiff = _row(get_table("querydiff_gtav_main", tables), "QueryDiff", "DINOv2-L")
    assert querydiff == {"cityscapes": 69.1, "bdd100k": 62.3, "mapillary": 68.6, "mean": 66.7}
    acdc = _row(get_table("mfuser_acdc", tables), "MFuser", "DINOv2-L")
    assert acdc["night"] == 57.94 and acdc["mean"] == 73.45
    catseg = _row(get_table("catseg_open_vocab", tables), "CAT-Seg (L)", "CLIP ViT-L/14@336")
    assert catseg["ade_847"] == 16.0 and catseg["pas_20b"] == 82.5


def test_published_mean_disagreements_carry_a_note(tables: list[Table]) -> None:
    row = next(r for r in get_table("querydiff_acdc", tables).rows if r.method == "Rein")
    assert row.values["mean"] == 77.6
    assert row.note is not None and "mean" in row.note


def test_get_table_unknown_id_lists_known(tables: list[Table]) -> None:
    with pytest.raises(KeyError, match="known ids: .*rein_gtav_main"):
        get_table("no_such_table", tables)


def test_to_markdown_shape(tables: list[Table]) -> None:
    table = get_table("tqdm_cityscapes", tables)
    lines = table.to_markdown().splitlines()
    assert len(lines) == len(table.rows) + 2
    assert lines[0] == "| method | backbone | bdd100k | mapillary | mean |"
    assert set(lines[1].replace("|", "").split()) == {"---"}
    assert all(line.count("|") == len(table.columns) + 3 for line in lines)
    assert "| WildNet | RN101 | 47.01 | 50.94 | - |" in lines
    assert "| tqdm | EVA02-CLIP-L | 64.72 | 76.15 | 70.44 |" in lines


def test_gtav_to_real_has_every_dgss_paper(tables: list[Table]) -> None:
    headline = gtav_to_real(tables)
    assert {paper for paper, *_ in headline} == {"Rein", "tqdm", "QueryDiff", "MFuser"}
    for paper, method, backbone, values in headline:
        assert method == paper and backbone
        assert list(values) == ["cityscapes", "bdd100k", "mapillary", "mean"]
    assert ("Rein", "Rein", "DINOv2-L", REIN_DINOV2) in headline


# --- validation on bad input ---------------------------------------------------------------


def test_valid_minimal_file(tmp_path: Path) -> None:
    (table,) = load_paper_results(_write(tmp_path, _table()))
    assert table.id == "toy_table" and table.rows[0].values["mean"] == 64.3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_paper_results(tmp_path / "nope.yaml")


def test_unknown_table_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"table 0: unknown key\(s\) \['year'\]"):
        load_paper_results(_write(tmp_path, _table(year=2024)))


def test_missing_table_key(tmp_path: Path) -> None:
    table = _table()
    del table["protocol"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['protocol'\]"):
        load_paper_results(_write(tmp_path, table))


def test_unknown_row_key(tmp_path: Path) -> None:
    row = {"method": "Rein", "backbone": "DINOv2-L", "values": [1, 2, 3, 2], "params": 3}
    with pytest.raises(ValueError, match=r"'toy_table', row 0: unknown key\(s\) \['params'\]"):
        load_paper_results(_write(tmp_path, _table(rows=[row])))


def test_wrong_value_count(tmp_path: Path) -> None:
    row = {"method": "Rein", "backbone": "DINOv2-L", "values": [66.4, 60.4, 66.1]}
    with pytest.raises(ValueError, match="'toy_table'.*has 3 values but the table has 4 columns"):
        load_paper_results(_write(tmp_path, _table(rows=[row])))


@pytest.mark.parametrize("bad", ["66.4", True, [1.0]])
def test_value_not_a_number(tmp_path: Path, bad: object) -> None:
    row = {"method": "Rein", "backbone": "DINOv2-L", "values": [bad, 60.4, 66.1, None]}
    with pytest.raises(ValueError, match="'toy_table'.*'cityscapes' is not a number or null"):
        load_paper_results(_write(tmp_path, _table(rows=[row])))


def test_duplicate_table_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'toy_table': duplicate table id"):
        load_paper_results(_write(tmp_path, _table(), _table()))


def test_unknown_paper(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'toy_table': unknown paper 'SegFormer'"):
        load_paper_results(_write(tmp_path, _table(paper="SegFormer")))


def test_bad_column_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'toy_table': column 'G->C' is not a snake_case name"):
        load_paper_results(_write(tmp_path, _table(columns=["G->C", "b", "c", "mean"])))


def test_mean_disagreement(tmp_path: Path) -> None:
    row = {"method": "Rein", "backbone": "DINOv2-L", "values": [66.4, 60.4, 66.1, 65.0]}
    with pytest.raises(ValueError, match="'toy_table'.*published mean 65.0 differs"):
        load_paper_results(_write(tmp_path, _table(rows=[row])))


def test_mean_disagreement_allowed_with_note(tmp_path: Path) -> None:
    row = {
        "method": "Rein",
        "backbone": "DINOv2-L",
        "values": [66.4, 60.4, 66.1, 65.0],
        "note": "the published mean differs",
    }
    (table,) = load_paper_results(_write(tmp_path, _table(rows=[row])))
    assert table.rows[0].values["mean"] == 65.0


def test_mean_not_checked_with_missing_values(tmp_path: Path) -> None:
    row = {"method": "Rein", "backbone": None, "values": [None, None, None, 66.09]}
    (table,) = load_paper_results(_write(tmp_path, _table(rows=[row])))
    assert table.rows[0].backbone is None
    assert "| Rein | - | - | - | - | 66.09 |" in table.to_markdown()


def test_wrong_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "results.yaml"
    path.write_text(yaml.safe_dump({"schema": 2, "tables": [_table()]}), encoding="utf-8")
    with pytest.raises(ValueError, match="schema 2 is not 1"):
        load_paper_results(path)
