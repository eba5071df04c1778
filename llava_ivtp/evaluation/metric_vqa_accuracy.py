"""VQA accuracy as an `evaluate` metric module, loaded by path (nothing is fetched from the Hub):

    evaluate.load("llava_ivtp/evaluation/metric_vqa_accuracy.py")

The VQA benchmark's rule: a prediction scores `min(1, matches / 3)` against each leave-one-out subset of the
reference answers (`matches`: how many of the other annotators gave it), averaged over the subsets; with a single
reference answer, 1 for a match and 0 otherwise. Predictions and answers are normalised as the VQA evaluation does:
lower case, whitespace collapsed, punctuation dropped or turned into a space, periods dropped except between digits,
number words written as digits, articles dropped, and common contractions written with their apostrophe.
"""

from __future__ import annotations

import re

import datasets
import evaluate


_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
    "lets": "let's", "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "youve": "you've",
}
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's normalisation of one answer."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    # A mark next to a space, or any mark when a comma sits inside a number, is dropped; otherwise it splits words.
    drop = _COMMA_IN_NUMBER.search(text) is not None
    stripped = text
    for mark in _PUNCTUATION:
        removed = drop or f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if removed else " ")
    stripped = _PERIOD.sub("", stripped)
    words = []
    for word in stripped.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: list[str]) -> float:
    predicted = normalize_answer(prediction)
    references = [normalize_answer(answer) for answer in answers]
    if len(references) == 1:
        return float(predicted == references[0])
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1:]
        scores.append(min(1.0, sum(other == predicted for other in others) / 3))
    return sum(scores) / len(scores)


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Antol et al., VQA: Visual Question Answering, ICCV 2015 (the evaluation's answer rules).",
            inputs_description="predictions: list of str; references: list of list of str (the answers to each).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if any(len(answers) == 0 for answers in references):
            raise ValueError("every question needs at least one reference answer")
        scores = [vqa_score(prediction, answers) for prediction, answers in zip(predictions, references)]
        return {"vqa_accuracy": sum(scores) / len(scores) if scores else float("nan")}
