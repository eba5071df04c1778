"""`llava-ivtp export-testbed`: testbed questions as files -- JSON lines + PNG images, and an lmms-eval task.

    llava-ivtp export-testbed --out testbed-task --split test --limit 1000
    llava-ivtp eval --model models/llava-ivtp-testbed --dataset testbed-task/test.jsonl --settings ivtp@64 ...
    lmms-eval --model llava_ivtp --model_args pretrained=models/llava-ivtp-testbed,method=ivtp,budget=64 \
        --include_path testbed-task --tasks llava_ivtp_testbed --batch_size 16 --output_path results/

The folder gets `SPLIT.jsonl` (one `{"image": "images/SPLIT-00000.png", "question", "answers", "kind"}` per line),
`images/`, and the lmms-eval task `llava_ivtp_testbed.yaml` with its `utils.py` (exact match as `llava-ivtp eval`
scores it, greedy answers of at most 4 tokens as `eval`'s default). Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


TASK = "llava_ivtp_testbed"
UTILS = Path(__file__).resolve().parents[1] / "evaluation" / "lmms_task_utils.py"


class ExportError(ValueError):
    """A bad argument; the message names it."""


def task_yaml(split: str, max_new_tokens: int) -> str:
    return f"""# lmms-eval task: testbed questions exported by `llava-ivtp export-testbed` (files next to this YAML).
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {split}.jsonl
test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def export(out: Path, split: str = "test", limit: int = 1000, max_new_tokens: int = 4) -> Path:
    """Write `limit` questions of the testbed's `split` and the lmms-eval task to `out`; returns the JSON lines file."""
    from llava_ivtp.testbed import scenes

    if split not in scenes.SPLITS:
        raise ExportError(f"--split {split}: the testbed's splits are {list(scenes.SPLITS)}.")
    if limit < 1 or max_new_tokens < 1:
        raise ExportError(f"--limit and --max-new-tokens must be >= 1, got {limit} and {max_new_tokens}.")
    lines_path = out / f"{split}.jsonl"
    targets = [lines_path, out / "images", out / f"{TASK}.yaml", out / "utils.py"]
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing:
        raise ExportError(f"--out {out}: already holds {existing}; give an empty or new folder (nothing is overwritten).")
    (out / "images").mkdir(parents=True)
    lines = []
    for index in range(limit):
        record = scenes.example(split, index).record()
        image = f"images/{split}-{index:05d}.png"
        record["image"].save(out / image)
        lines.append(json.dumps({"image": image, "question": record["question"], "answers": record["answers"],
                                 "kind": record["kind"]}))
    lines_path.write_text("\n".join(lines) + "\n")
    (out / f"{TASK}.yaml").write_text(task_yaml(split, max_new_tokens))
    (out / "utils.py").write_text(UTILS.read_text())
    return lines_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the files (new or empty)")
    parser.add_argument("--split", default="test", help="train, validation or test")
    parser.add_argument("--limit", type=int, default=1000, help="questions (the first ones of the split)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="the lmms-eval task's generation length")


def run(args) -> int:
    from llava_ivtp.cli import prepare_output, report_error

    try:
        prepare_output("--out", args.out, ExportError, folder=True)
        path = export(args.out, args.split, args.limit, args.max_new_tokens)
    except ExportError as error:
        return report_error("export-testbed", error)
    print(f"wrote {args.limit} questions to {path}, their images, and the lmms-eval task {TASK} in {args.out}")
    return 0


__all__ = ["TASK", "add_arguments", "export", "run", "task_yaml"]
