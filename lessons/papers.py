"""Published results of Rein, tqdm, CAT-Seg, QueryDiff and MFuser, loaded and validated.

`papers.yaml` (beside this module) holds every results table of the five papers, each with the
paper and table it comes from (``source``): the numbers are the papers' own, never recomputed or
rounded.
The reproduction scripts write their measured numbers next to these, and notebook 00 shows the
GTAV -> Cityscapes / BDD100K / Mapillary headline rows (`gtav_to_real`).

Schema (version 1)::

    schema: 1
    tables:
      - id: rein_gtav_main          # unique, snake_case
        paper: Rein                 # Rein | tqdm | CAT-Seg | QueryDiff | MFuser
        venue: CVPR 2024
        source: "Rein paper v1, Table 2"      # where in the paper (or README / issue)
        setting: "GTAV -> Cityscapes, BDD100K, Mapillary"   # train -> test
        protocol: "..."             # evaluation protocol, one line
        metric: mIoU
        columns: [cityscapes, bdd100k, mapillary, mean]   # snake_case
        rows:
          - {method: Rein, backbone: DINOv2-L, values: [66.4, 60.4, 66.1, 64.3]}
          # backbone may be null; values hold a number or null per column;
          # an optional `note` says what is uncertain or unusual about the row.

Validation (`ValueError` naming the table): unknown or missing keys, a bad id or column name,
duplicate ids or columns, an unknown paper, a row whose value count differs from the columns,
a value that is not a number or null, and a `mean` column that differs from the mean of the
other columns by more than `MEAN_TOLERANCE` when all of them are present. A row whose note
contains the word "mean" is exempt from that check: its published mean is kept as printed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_PATH",
    "GTAV_TARGETS",
    "MAIN_TABLES",
    "MEAN_TOLERANCE",
    "PAPERS",
    "SCHEMA_VERSION",
    "Row",
    "Table",
    "get_table",
    "gtav_to_real",
    "load_paper_results",
    "parse_paper_results",
]

SCHEMA_VERSION = 1
PAPERS = ("Rein", "tqdm", "CAT-Seg", "QueryDiff", "MFuser")
MEAN_TOLERANCE = 0.15
DEFAULT_PATH = Path(__file__).with_name("papers.yaml")

# The main GTAV -> Cityscapes / BDD100K / Mapillary table of each DGSS paper.
MAIN_TABLES = {
    "Rein": "rein_gtav_main",
    "tqdm": "tqdm_gtav_main",
    "QueryDiff": "querydiff_gtav_main",
    "MFuser": "mfuser_gtav_main",
}
GTAV_TARGETS = ("cityscapes", "bdd100k", "mapillary")

_TOP_KEYS = frozenset({"schema", "tables"})
_TABLE_KEYS = frozenset(
    {"id", "paper", "venue", "source", "setting", "protocol", "metric", "columns", "rows"}
)
_ROW_REQUIRED = frozenset({"method", "backbone", "values"})
_ROW_KEYS = _ROW_REQUIRED | {"note"}
_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_MEAN_WORD = re.compile(r"\bmean\b", re.IGNORECASE)


@dataclass(frozen=True)
class Row:
    """One method's published numbers, keyed by column name (None where not published)."""

    method: str
    backbone: str | None
    values: dict[str, float | None]
    note: str | None = None


@dataclass(frozen=True)
class Table:
    """One published results table."""

    id: str
    paper: str
    venue: str
    source: str
    setting: str
    protocol: str
    metric: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]

    def to_markdown(self) -> str:
        """Render as a markdown table (method, backbone, one column per target; None as '-')."""
        header = ["method", "backbone", *self.columns]
        lines = [_md_line(header), _md_line(["---"] * len(header))]
        places = self.decimals()
        for row in self.rows:
            cells = [row.method, row.backbone or "-"]
            cells += [_format_value(row.values[c], places) for c in self.columns]
            lines.append(_md_line(cells))
        return "\n".join(lines)

    def decimals(self) -> int:
        """Decimal places of the most precise value (papers print one precision per table)."""
        values = [v for row in self.rows for v in row.values.values() if v is not None]
        return max((_decimals(v) for v in values), default=0)


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _decimals(value: float) -> int:
    text = repr(value)
    return 0 if "e" in text or "." not in text else len(text.split(".")[1].rstrip("0"))


def _format_value(value: float | None, places: int) -> str:
    return "-" if value is None else f"{value:.{places}f}"


def _check_keys(where: str, data: Any, required: frozenset[str], allowed: frozenset[str]) -> None:
    """Raise ValueError when `data` is not a mapping with exactly the allowed keys."""
    if not isinstance(data, dict):  # a malformed file is a ValueError, as every other check
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _check_text(where: str, key: str, value: Any, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")


def _parse_value(where: str, column: str, value: Any) -> float | None:
    """A number (int or float, not bool, finite) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: value {value!r} for column {column!r} is not a number or null")
    return float(value)


def _check_mean(where: str, values: dict[str, float | None], note: str | None) -> None:
    """The `mean` column must match the mean of the other columns (when all are present)."""
    if "mean" not in values or len(values) < 2 or values["mean"] is None:
        return
    if note is not None and _MEAN_WORD.search(note):
        return
    others = [v for k, v in values.items() if k != "mean" and v is not None]
    if len(others) < len(values) - 1:
        return
    computed = sum(others) / len(others)
    if abs(computed - values["mean"]) > MEAN_TOLERANCE:
        raise ValueError(
            f"{where}: published mean {values['mean']} differs from the mean of the other "
            f"columns ({computed:.3f}) by more than {MEAN_TOLERANCE}; "
            "add a note containing 'mean' if the paper prints it so"
        )


def _parse_row(table_id: str, index: int, data: Any, columns: tuple[str, ...]) -> Row:
    where = f"table {table_id!r}, row {index}"
    _check_keys(where, data, _ROW_REQUIRED, _ROW_KEYS)
    _check_text(where, "method", data["method"])
    where = f"table {table_id!r}, row {index} ({data['method']})"
    _check_text(where, "backbone", data["backbone"], nullable=True)
    _check_text(where, "note", data.get("note"), nullable=True)
    raw = data["values"]
    if not isinstance(raw, list) or len(raw) != len(columns):
        count = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ValueError(f"{where}: has {count} values but the table has {len(columns)} columns")
    values = {c: _parse_value(where, c, v) for c, v in zip(columns, raw, strict=True)}
    _check_mean(where, values, data.get("note"))
    return Row(data["method"], data["backbone"], values, data.get("note"))


def _parse_columns(where: str, columns: Any) -> tuple[str, ...]:
    if not isinstance(columns, list) or not columns:
        raise ValueError(f"{where}: 'columns' must be a non-empty list")
    for column in columns:
        if not isinstance(column, str) or not _SNAKE.match(column):
            raise ValueError(f"{where}: column {column!r} is not a snake_case name")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{where}: duplicate column names in {columns}")
    return tuple(columns)


def _parse_table(index: int, data: Any) -> Table:
    _check_keys(f"table {index}", data, _TABLE_KEYS, _TABLE_KEYS)
    table_id = data["id"]
    if not isinstance(table_id, str) or not _SNAKE.match(table_id):
        raise ValueError(f"table {index}: id {table_id!r} is not a snake_case name")
    where = f"table {table_id!r}"
    for key in ("venue", "source", "setting", "protocol", "metric"):
        _check_text(where, key, data[key])
    if data["paper"] not in PAPERS:
        raise ValueError(f"{where}: unknown paper {data['paper']!r}; expected one of {PAPERS}")
    columns = _parse_columns(where, data["columns"])
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise ValueError(f"{where}: 'rows' must be a non-empty list")
    rows = tuple(_parse_row(table_id, i, r, columns) for i, r in enumerate(data["rows"]))
    texts = {k: data[k] for k in ("paper", "venue", "source", "setting", "protocol", "metric")}
    return Table(id=table_id, columns=columns, rows=rows, **texts)


def parse_paper_results(data: Any) -> list[Table]:
    """Validate an already-loaded YAML document and return its tables."""
    _check_keys("paper results", data, _TOP_KEYS, _TOP_KEYS)
    if data["schema"] != SCHEMA_VERSION:
        raise ValueError(f"paper results: schema {data['schema']!r} is not {SCHEMA_VERSION}")
    if not isinstance(data["tables"], list):
        raise ValueError("paper results: 'tables' must be a list")
    tables = [_parse_table(i, t) for i, t in enumerate(data["tables"])]
    seen: set[str] = set()
    for table in tables:
        if table.id in seen:
            raise ValueError(f"table {table.id!r}: duplicate table id")
        seen.add(table.id)
    return tables


def load_paper_results(path: str | Path | None = None) -> list[Table]:
    """Load and validate the published results (default: the YAML beside this module)."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper results file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    return parse_paper_results(data)


def get_table(table_id: str, tables: list[Table] | None = None) -> Table:
    """The table with this id (from the shipped YAML unless `tables` is given)."""
    tables = load_paper_results() if tables is None else tables
    for table in tables:
        if table.id == table_id:
            return table
    known = ", ".join(t.id for t in tables)
    raise KeyError(f"no paper-results table {table_id!r}; known ids: {known}")


def gtav_to_real(tables: list[Table] | None = None) -> list[tuple[str, str, str, dict]]:
    """Each DGSS paper's own rows of its main GTAV -> Cityscapes / BDD100K / Mapillary table.

    Returns (paper, method, backbone, values) tuples, values keyed by column
    (cityscapes, bdd100k, mapillary, mean), in the order Rein, tqdm, QueryDiff, MFuser.
    """
    tables = load_paper_results() if tables is None else tables
    headline = []
    for paper, table_id in MAIN_TABLES.items():
        table = get_table(table_id, tables)
        for row in table.rows:
            if row.method == paper:
                values = {c: row.values[c] for c in (*GTAV_TARGETS, "mean")}
                headline.append((paper, row.method, row.backbone or "-", values))
    return headline
