"""The repository's own `evaluate` metric modules, loaded by path, against hand-computed cases."""

from pathlib import Path

import evaluate
import pytest

import llava_ivtp.evaluation

PACKAGE = Path(llava_ivtp.evaluation.__file__).parent


@pytest.fixture(scope="module")
def vqa():
    return evaluate.load(str(PACKAGE / "metric_vqa_accuracy.py"))


@pytest.fixture(scope="module")
def exact():
    return evaluate.load(str(PACKAGE / "metric_exact_match.py"))


def test_exact_match_by_hand(exact):
    predictions = ["Red.", " blue", "star", "no"]
    references = [["red"], ["Blue"], ["circle"], ["yes", "no"]]
    assert exact.compute(predictions=predictions, references=references) == {"exact_match": 0.75}


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Two.", ["2"], 1.0),  # number word, case, final period
        ("the red", ["red"], 1.0),  # article
        ("dont", ["don't"], 1.0),  # contraction
        ("1,000", ["1000"], 1.0),  # comma inside a number
        ("left-hand", ["left hand"], 1.0),  # a mark between words splits them
        ("3.5", ["35"], 0.0),  # a period between digits stays
        ("red", ["blue"], 0.0),
        # ten annotators, leave-one-out: 3 say "2" -> each subset without one of them has 2 matches (2/3), the 7
        # without any have 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
        ("two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"], 0.9),
        ("three", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"], 1.0),
        ("four", ["2", "4"] + ["3"] * 8, (1 * 0.0 + 9 * (1 / 3)) / 10),
    ],
)
def test_vqa_accuracy_by_hand(vqa, prediction, answers, expected):
    result = vqa.compute(predictions=[prediction], references=[answers])["vqa_accuracy"]
    assert result == pytest.approx(expected)


def test_metrics_refuse_questions_without_answers(vqa, exact):
    for metric in (vqa, exact):
        with pytest.raises(ValueError, match="reference answer"):
            metric.compute(predictions=["x"], references=[[]])
