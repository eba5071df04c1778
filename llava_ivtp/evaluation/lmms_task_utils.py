"""The functions of the `llava_ivtp_testbed` lmms-eval task (`llava-ivtp export-testbed` copies this file next to
the task's YAML as `utils.py`; the YAML names them `!function utils.NAME`).

Documents are the exported JSON lines: `image` (a path relative to this folder), `question`, `answers`, `kind`.
Scoring is `llava-ivtp eval`'s exact match (`metric_exact_match.plain`), so the two report the same accuracy.
"""

from pathlib import Path

from PIL import Image

from llava_ivtp.evaluation.metric_exact_match import plain


FOLDER = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(FOLDER / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # the model's chat template adds "USER: <image>\n" and " ASSISTANT:"


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    prediction = results[0]
    return {"exact_match": float(any(plain(prediction) == plain(answer) for answer in doc["answers"]))}
