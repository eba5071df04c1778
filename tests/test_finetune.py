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

from tiny_models import TINY_CLIP_TEXT, tiny_model, tiny_processor, write_color_dataset


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny remote-code checkpoint and 8 conversations about solid-colour images (one of them two turns)."""
    folder = tmp_path_factory.mktemp("finetune")
    tiny_model(clip_text_encoder=TINY_CLIP_TEXT).save_pretrained(folder / "base")
    tiny_processor().save_pretrained(folder / "base")
    write_color_dataset(folder)
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


def test_training_schedule_options():
    """`--visual-tokens K` sets the schedule `eval`'s ivtp@K runs (the budget rule); `--no-pruning` switches pruning off
    (the control run of docs/accuracy.md); the two exclude each other and bad counts are refused by name."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from finetune import apply_visual_tokens, training_parser
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from modeling_llava_ivtp.pruner_base import budget_schedule

    model = tiny_model()
    original = dict(model.config.schedule)
    apply_visual_tokens(model, None)
    assert model.config.schedule == original
    apply_visual_tokens(model, 3)
    assert model.config.schedule == budget_schedule(model.config, 3)
    assert model.config.schedule["llm"][-1] == 3
    apply_visual_tokens(model, None, no_pruning=True)
    assert model.config.schedule is None
    apply_visual_tokens(model, 3)  # from no schedule: the budget derives one
    assert model.config.schedule == budget_schedule(model.config, 3)
    model.config.pruning_method = "fastv"
    with pytest.raises(SystemExit, match="--visual-tokens sets IVTP's schedule"):
        apply_visual_tokens(model, 3)
    with pytest.raises(SystemExit, match=r"--visual-tokens must be in \[1, "):
        apply_visual_tokens(tiny_model(), 0)
    parser = training_parser("", 1e-5, "")
    base = ["--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    assert parser.parse_args(base + ["--no-pruning"]).no_pruning
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --visual-tokens
        parser.parse_args(base + ["--no-pruning", "--visual-tokens", "4"])


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


LORA_CHECK = """
import json, sys, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
base_dir, adapter_dir, image_path = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=True)
inputs = processor(images=[Image.open(image_path).convert("RGB")], text="USER: <image>\\nWhat color is it? ASSISTANT:",
                   return_tensors="pt")
settings = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[90])
base = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True).eval()
plain = base.generate(**inputs, **settings)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
adapted = model.generate(**inputs, **settings)
merged = model.merge_and_unload()
merged_tokens = merged.generate(**inputs, **settings)
print(json.dumps({"plain": plain.tolist(), "adapted": adapted.tolist(), "merged": merged_tokens.tolist(),
                  "merged_class": type(merged).__name__, "merged_module": type(merged).__module__}))
"""


def test_lora_adapter_trains_saves_reloads_and_merges(workspace):
    out = workspace / "lora"
    summary_path = workspace / "lora_summary.json"
    run_example(
        "finetune_lora.py",
        ["--model", str(workspace / "base"), "--data", str(workspace / "train.jsonl"), "--output-dir", str(out),
         "--max-steps", "8", "--learning-rate", "1e-2", "--summary", str(summary_path)],
        workspace,
    )
    summary = json.loads(summary_path.read_text())
    adapted = summary["adapted_modules"]
    assert len(adapted) == 8 * 7  # 8 LLM layers x (q, k, v, o, gate, up, down)
    assert all(".language_model.layers." in name for name in adapted)
    assert not any("vision_tower" in name or "clip_" in name or "projector" in name for name in adapted)
    assert summary["losses"][-1] < summary["losses"][0]



def test_lora_generates_the_same_tokens_after_reload_and_merge(workspace):
    """Train LoRA a few steps here, generate, save the adapter; in a fresh process the remote-code base + the
    adapter, and the merged model, generate the same tokens."""
    import torch

    from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from finetune import ConversationCollator, read_conversations
        from finetune_lora import lora_model
    finally:
        sys.path.remove(str(ROOT / "examples"))
    processor = tiny_processor()
    torch.manual_seed(0)
    model = lora_model(LlavaIvtpForConditionalGeneration.from_pretrained(workspace / "base"))
    batch = ConversationCollator(processor, "</s>")(read_conversations(workspace / "train.jsonl")[:4])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = processor(
        images=[Image.open(workspace / "images" / "0.png").convert("RGB")],
        text="USER: <image>\nWhat color is it? ASSISTANT:", return_tensors="pt",
    )
    before = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[90]).tolist()
    out = workspace / "lora_here"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    check = subprocess.run(
        [sys.executable, "-c", LORA_CHECK, str(workspace / "base"), str(out), str(workspace / "images" / "0.png")],
        capture_output=True, text=True, timeout=600, cwd=workspace,
        env=dict(os.environ, HF_MODULES_CACHE=str(workspace / "modules3"), HF_HUB_OFFLINE="1"),
    )
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["adapted"] == before == report["merged"]
    assert report["adapted"] != report["plain"]  # the adapter changed what the model says
    assert report["merged_class"] == "LlavaIvtpForConditionalGeneration"
    assert report["merged_module"].startswith("transformers_modules.")


@pytest.fixture(scope="module")
def next_workspace(tmp_path_factory):
    """A tiny remote-code LLaVA-NeXT checkpoint (IVTP at 32 tokens, the CLIP text tower) with its processor, and the
    colour conversations."""
    from tiny_models import tiny_next_model, tiny_next_processor

    folder = tmp_path_factory.mktemp("finetune-next")
    model = tiny_next_model(pruning_method="ivtp", pruning_options={"visual_tokens": 32}, clip_text_encoder=TINY_CLIP_TEXT)
    model.save_pretrained(folder / "base")
    tiny_next_processor().save_pretrained(folder / "base")
    write_color_dataset(folder)
    return folder


def test_llava_next_fine_tunes_with_the_trainer_and_lora_and_reloads(next_workspace):
    """The examples on a LLaVA-NeXT checkpoint: the HF Trainer with IVTP pruning every step (each image's crops,
    padded batches) lowers the loss and the result reloads as remote code (the NeXT class); LoRA trains the LLM's
    projections only and the adapter, reloaded in a fresh process and merged, generates what it generated."""
    out = next_workspace / "trained"
    run_example(
        "finetune.py",
        ["--model", str(next_workspace / "base"), "--data", str(next_workspace / "train.jsonl"), "--output-dir",
         str(out), "--max-steps", "12", "--batch-size", "4", "--learning-rate", "3e-3", "--summary",
         str(next_workspace / "summary.json")],
        next_workspace,
    )
    summary = json.loads((next_workspace / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["pruned_steps"] == 12
    assert np.mean(summary["losses"][-3:]) < np.mean(summary["losses"][:3]), summary["losses"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaNextIvtpForConditionalGeneration"]
    lora = next_workspace / "lora"
    run_example(
        "finetune_lora.py",
        ["--model", str(next_workspace / "base"), "--data", str(next_workspace / "train.jsonl"), "--output-dir",
         str(lora), "--max-steps", "8", "--learning-rate", "1e-2", "--summary", str(next_workspace / "lora.json")],
        next_workspace,
    )
    adapted = json.loads((next_workspace / "lora.json").read_text())["adapted_modules"]
    assert len(adapted) == 8 * 7 and all(".language_model.layers." in name for name in adapted)
    check = subprocess.run(
        [sys.executable, "-c", LORA_CHECK, str(next_workspace / "base"), str(lora),
         str(next_workspace / "images" / "0.png")],
        capture_output=True, text=True, timeout=600, cwd=next_workspace,
        env=dict(os.environ, HF_MODULES_CACHE=str(next_workspace / "modules-lora"), HF_HUB_OFFLINE="1"),
    )
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["adapted"] == report["merged"]
    assert report["merged_class"] == "LlavaNextIvtpForConditionalGeneration"
