"""Exact match as an `evaluate` metric module, loaded by path (nothing is fetched from the Hub):

    evaluate.load("llava_ivtp/evaluation/metric_exact_match.py")

A prediction scores 1 when, stripped of surrounding whitespace and a final period and compared case-insensitively,
it equals any of the question's reference answers, else 0; the metric is the mean.
"""

from __future__ import annotations

import datasets
import evaluate


def plain(text: str) -> str:
    return text.strip().removesuffix(".").strip().lower()


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of list of str (the answers to each).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if any(len(answers) == 0 for answers in references):
            raise ValueError("every question needs at least one reference answer")
        hits = [float(any(plain(prediction) == plain(answer) for answer in answers))
                for prediction, answers in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else float("nan")}
