"""Fine-tuning with the HF Trainer (pruning on) and PEFT LoRA, through the examples, on a tiny checkpoint and a
tiny generated dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import TINY_CLIP_TEXT, tiny_model, tiny_processor


ROOT = Path(__file__).resolve().parent.parent
COLORS = {"Red.": (220, 30, 30), "Blue.": (30, 30, 220), "Green.": (30, 200, 30), "Gray.": (128, 128, 128)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny remote-code checkpoint and 8 conversations about solid-colour images (one of them two turns)."""
    folder = tmp_path_factory.mktemp("finetune")
    tiny_model(clip_text_encoder=TINY_CLIP_TEXT).save_pretrained(folder / "base")
    tiny_processor().save_pretrained(folder / "base")
    (folder / "images").mkdir()
    lines = []
    for index in range(8):
        answer = list(COLORS)[index % 4]
        pixels = np.zeros((24 + 2 * index, 24, 3), dtype=np.uint8) + np.array(COLORS[answer], dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        turns = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": answer}]
        if index == 7:
            turns += [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]
        lines.append(json.dumps({"image": f"images/{index}.png", "conversations": turns}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_example(name: str, arguments: list[str], folder: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_MODULES_CACHE=str(folder / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *arguments], capture_output=True, text=True, timeout=900,
        cwd=folder, env=environment,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_collator_labels_only_the_answers(workspace):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from finetune import ConversationCollator, read_conversations
    finally:
        sys.path.remove(str(ROOT / "examples"))
    processor = tiny_processor()
    records = read_conversations(workspace / "train.jsonl")
    batch = ConversationCollator(processor, "</s>")([records[0], records[7]])
    tokenizer = processor.tokenizer
    for row, expected in ((0, ["Red.</s>"]), (1, ["Gray.</s>", "Yes.</s>"])):
        labelled = (batch["labels"][row] != -100).nonzero()[:, 0].tolist()
        pieces, current = [], [labelled[0]]
        for index in labelled[1:]:
            if index == current[-1] + 1:
                current.append(index)
            else:
                pieces.append(current)
                current = [index]
        pieces.append(current)
        assert [tokenizer.decode(batch["input_ids"][row][piece]) for piece in pieces] == expected
    # the instruction guidance is the last user turn, never an answer
    row = batch["input_ids"][1][batch["instruction_mask"][1].bool()]
    assert tokenizer.decode(row) == "Sure?"
    assert {"pixel_values", "instruction_mask", "clip_input_ids", "clip_token_spans", "labels"} <= set(batch)


def test_trainer_fine_tunes_with_pruning_in_every_step_and_reloads(workspace):
    out = workspace / "trained"
    run_example(
        "finetune.py",
        ["--model", str(workspace / "base"), "--data", str(workspace / "train.jsonl"), "--output-dir", str(out),
         "--max-steps", "30", "--batch-size", "4", "--learning-rate", "3e-3", "--summary", str(workspace / "summary.json")],
        workspace,
    )
    summary = json.loads((workspace / "summary.json").read_text())
    losses = summary["losses"]
    assert summary["steps"] == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert summary["pruned_steps"] == len(summary["pruning_per_step"]) == 30
    assert all(step == {"vision": [24, 16, 12], "llm": [8, 5]} for step in summary["pruning_per_step"])
    reloaded = subprocess.run(
        [sys.executable, "-c", (
            "import json, torch\n"
            "from transformers import AutoModelForImageTextToText\n"
            f"model, info = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True, output_loading_info=True)\n"
            "print(json.dumps({'module': type(model).__module__, 'missing': sorted(info['missing_keys']), 'unexpected': sorted(info['unexpected_keys'])}))\n"
        )],
        capture_output=True, text=True, timeout=600, cwd=workspace,
        env=dict(os.environ, HF_MODULES_CACHE=str(workspace / "modules2"), HF_HUB_OFFLINE="1"),
    )
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    report = json.loads(reloaded.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and not report["missing"] and not report["unexpected"]
