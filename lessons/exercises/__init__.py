"""Self-checks for the lessons' exercises: right, or not yet and why, without the answer.

In a student copy (``notebooks/students/``) each exercise ends with a check cell::

    check_exercise("01", 2, globals())

It reads the names the exercise's TODO cell lists from the notebook's namespace and tests what a
correct answer must satisfy: the keys and shapes asked for, values in their possible range,
agreement with a cheap recomputation or with the lesson's own numbers where the exercise repeats
them. It never prints the expected numbers. A name that is missing (or still ``None``) is "not
yet: define ...", a value that fails a test is "not yet: <what is wrong>", and an error raised
while checking a value is reported as "not yet" with its message, never as a traceback.

The checks of lesson NN live in ``lessons/exercises/lessonNN.py``, registered with
:func:`exercise`; the solutions notebooks run every check (``# NBVAL_CHECK_OUTPUT`` on the check
cell, so CI fails when a solution stops passing its own check).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LESSONS",
    "NotYet",
    "Verdict",
    "check_exercise",
    "exercise",
    "expect",
    "expect_domain_rows",
    "expect_keys",
    "expect_number",
    "needed_names",
    "registered",
]

LESSONS = ("00", "01", "02", "03a", "03b", "04", "05", "06", "07", "08", "09")  # with exercises


class NotYet(Exception):
    """Raised by a check when the answer is not right yet; its message says why."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check. ``bool(verdict)`` is True when the answer is right."""

    lesson: str
    number: int
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        mark = "right" if self.ok else "not yet"
        first = self.reason.split(" ", 1)[0]       # "both ..." -> "Both ...", names as they are
        reason = self.reason[:1].upper() + self.reason[1:] if first.isalpha() else self.reason
        return f"Exercise {self.number} of lesson {self.lesson}: {mark}. {reason}"

    __str__ = __repr__


@dataclass(frozen=True)
class _Check:
    function: Callable[..., str]
    needs: dict[str, str]       # name in the notebook -> what it should hold


_REGISTRY: dict[tuple[str, int], _Check] = {}
_LOADED: set[str] = set()


def _lesson_key(lesson: str | int) -> str:
    key = f"{lesson:02d}" if isinstance(lesson, int) else str(lesson)
    if key not in LESSONS:
        raise ValueError(f"no lesson {lesson!r}: lessons are {', '.join(LESSONS)}")
    return key


def _load(lesson: str) -> None:
    if lesson not in _LOADED:
        importlib.import_module(f"lessons.exercises.lesson{lesson}")
        _LOADED.add(lesson)


def exercise(lesson: str, number: int, **needs: str) -> Callable:
    """Register ``function`` as the check of exercise ``number`` of ``lesson``.

    ``needs`` maps each name the check reads from the notebook to a short description shown in
    the TODO cell and in "not yet" messages. The function receives those values as keyword
    arguments, raises :class:`NotYet` (see :func:`expect`) when the answer is not right, and
    returns one sentence saying what was checked (no numbers that depend on the run: the
    solutions notebooks compare this output).
    """
    def register(function: Callable[..., str]) -> Callable[..., str]:
        _REGISTRY[(lesson, number)] = _Check(function, dict(needs))
        return function
    return register


def registered(lesson: str | int) -> list[int]:
    """The exercise numbers of a lesson that have a check."""
    key = _lesson_key(lesson)
    _load(key)
    return sorted(n for (k, n) in _REGISTRY if k == key)


def _find(lesson: str | int, number: int) -> tuple[str, _Check]:
    key = _lesson_key(lesson)
    _load(key)
    if (key, number) not in _REGISTRY:
        have = ", ".join(map(str, registered(key))) or "none"
        raise ValueError(f"lesson {key} has no exercise {number} (it has {have})")
    return key, _REGISTRY[(key, number)]


def needed_names(lesson: str | int, number: int) -> dict[str, str]:
    """Name -> description of what the check of that exercise reads."""
    return dict(_find(lesson, number)[1].needs)


def check_exercise(lesson: str | int, number: int, namespace: Mapping[str, Any]) -> Verdict:
    """Check exercise ``number`` of ``lesson`` against the names in ``namespace`` (a notebook's
    ``globals()``): a :class:`Verdict` that shows as one line, right or not yet and why."""
    key, check = _find(lesson, number)
    if not isinstance(namespace, Mapping):
        raise TypeError("pass the notebook's namespace: check_exercise(lesson, number, globals())")
    missing = [name for name in check.needs if namespace.get(name) is None]
    if missing:
        wanted = "; ".join(f"`{name}` ({check.needs[name]})" for name in missing)
        return Verdict(key, number, False, f"Still to define: {wanted}")
    try:
        reason = check.function(**{name: namespace[name] for name in check.needs})
    except NotYet as e:
        return Verdict(key, number, False, str(e))
    except Exception as e:  # a value of the wrong kind: say so in one line, no traceback
        return Verdict(key, number, False,
                       f"checking your answer raised {type(e).__name__}: {e}")
    return Verdict(key, number, True, reason)


# -- helpers for the checks ---------------------------------------------------------------------

def expect(condition: Any, reason: str) -> None:
    """Raise :class:`NotYet` with ``reason`` unless ``condition`` holds."""
    if not condition:
        raise NotYet(reason)


def expect_keys(mapping: Any, keys: Iterable, what: str) -> None:
    """``mapping`` is a dict whose keys include ``keys`` (``what`` names it in the message)."""
    expect(isinstance(mapping, Mapping),
           f"`{what}` should be a dict, not {type(mapping).__name__}.")
    missing = [k for k in keys if k not in mapping]
    expect(not missing, f"`{what}` has no entry for {', '.join(map(repr, missing))}.")


def expect_number(value: Any, what: str, low: float = -math.inf, high: float = math.inf
                  ) -> float:
    """``value`` is a finite real number in [low, high]; returns it as a float."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise NotYet(f"{what} should be a number, not {type(value).__name__}.") from None
    expect(math.isfinite(x) and low <= x <= high,
           f"{what} should be a finite number in [{low:g}, {high:g}]; it is {x:g}.")
    return x


def expect_domain_rows(table: Any, rows: Iterable[str], domains: Iterable[str], what: str,
                       high: float = 1.0) -> dict[str, dict[str, float]]:
    """``table`` maps each of ``rows`` to ``{domain: score}`` with every one of ``domains``, scores
    in [0, high] (``evaluate_domains`` gives mIoU fractions: high=1; percentages: high=100).
    Returns the rows as plain floats."""
    rows, domains = list(rows), list(domains)
    expect_keys(table, rows, what)
    out = {}
    for row in rows:
        expect_keys(table[row], domains, f"{what}[{row!r}]")
        out[row] = {d: expect_number(table[row][d], f"{what}[{row!r}][{d!r}]", 0.0, high)
                    for d in domains}
    return out
