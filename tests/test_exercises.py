"""The exercises' self-checks (``lessons.exercises``): every exercise has one, it says "not yet"
with a reason for missing, wrong or malformed answers, and never raises for a student's value.
(That each check says "right" for the solutions and "not yet" for the untouched student copies is
tested in tests/test_student_copies.py.)"""

from __future__ import annotations

import pytest

from lessons import exercises as ex
from reprod.course import student_copies as sc
from reprod.course.notebooks import lesson_id


def _row(values):
    return dict(zip(("synthetic", "citylike", "fog", "night"), values, strict=True))


GOOD_01_1 = {"block_results": {"block 2": _row([0.4, 0.25, 0.15, 0.14]),
                               "last block": _row([0.41, 0.3, 0.28, 0.29])},
             "earlier_more_invariant": False}


@pytest.mark.parametrize("solutions", sc.all_solutions(), ids=lesson_id)
def test_every_exercise_of_every_lesson_has_a_check(solutions):
    items = sc.lesson_exercises(sc.lesson_path(solutions))
    lesson = lesson_id(solutions)
    assert ex.registered(lesson) == sorted(items), f"lesson {lesson}"
    for n in items:
        needs = ex.needed_names(lesson, n)
        assert needs and all(isinstance(d, str) and len(d) > 10 for d in needs.values()), needs


def test_a_right_answer_is_right_and_shows_as_one_line():
    verdict = ex.check_exercise("01", 1, GOOD_01_1)
    assert verdict and verdict.ok
    assert repr(verdict).startswith("Exercise 1 of lesson 01: right. ")
    assert "\n" not in repr(verdict)


def test_missing_names_are_listed_with_what_they_hold():
    verdict = ex.check_exercise("01", 1, {"block_results": None})
    assert not verdict
    assert "`block_results` (" in verdict.reason and "`earlier_more_invariant` (" in verdict.reason
    assert repr(verdict).startswith("Exercise 1 of lesson 01: not yet. Still to define: ")


@pytest.mark.parametrize("change, says", [
    ({"earlier_more_invariant": True}, "does not agree with your table"),
    ({"block_results": {"block 2": _row([0.4] * 4), "last block": _row([0.4] * 4)}},
     "the two rows are identical"),
    ({"block_results": {"block 2": _row([40, 25, 15, 14]), "last block": _row([0.4] * 4)}},
     "should be a finite number in [0, 1]"),
    ({"block_results": {"block 2": {"synthetic": 0.4}, "last block": _row([0.4] * 4)}},
     "has no entry for 'citylike'"),
    ({"earlier_more_invariant": "no"}, "should be a bool"),
])
def test_a_wrong_answer_is_not_yet_with_a_reason(change, says):
    verdict = ex.check_exercise("01", 1, {**GOOD_01_1, **change})
    assert not verdict and says in verdict.reason, verdict.reason


def test_an_error_while_checking_is_a_verdict_not_a_traceback():
    verdict = ex.check_exercise("01", 1, {**GOOD_01_1, "block_results": {"block 2": 3,
                                                                         "last block": 4}})
    assert not verdict and "should be a dict" in verdict.reason
    verdict = ex.check_exercise("01", 3, {"prompt_results": {"{}": object()},
                                          "best_template": "{}"})
    assert not verdict and verdict.reason


def test_bad_lesson_or_number_or_namespace_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no lesson '12'"):
        ex.check_exercise("12", 1, {})
    with pytest.raises(ValueError, match=r"lesson 01 has no exercise 9 \(it has 1, 2, 3\)"):
        ex.check_exercise("01", 9, {})
    with pytest.raises(TypeError, match=r"globals\(\)"):
        ex.check_exercise("01", 1, ["not", "a", "namespace"])
    assert ex.check_exercise(1, 1, GOOD_01_1).lesson == "01"     # int lessons are accepted


def test_the_todo_cell_lists_the_names_the_check_reads():
    text = sc.todo_source("01", 2)
    assert text.startswith("# TODO (exercise 2): your code here.")
    for name in ex.needed_names("01", 2):
        assert f"#   {name}: " in text
    compile(text, "todo", "exec")       # comments only: runs as a no-op until filled in
