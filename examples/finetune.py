"""Fine-tune LLaVA-IVTP with the Hugging Face `Trainer`, pruning on (the model trains on what it will serve).

Data: JSON lines in LLaVA's format, one conversation per line, image paths relative to the file:

    {"image": "images/0001.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                   {"from": "gpt", "value": "A red square."}]}

The collator renders "USER: <image>\\n{question} ASSISTANT: {answer}</s>" per turn, runs `LlavaIvtpProcessor` (so
stage 2 gets the instruction guidance: the last user turn) and masks every label but the answers' tokens. The
vision tower and the CLIP text tower stay frozen; the projector and the LLM train, with activation checkpointing.
Every training step runs both pruning stages (the log counts them). The output folder is a self-contained
checkpoint: `AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)` loads it.

    python examples/finetune.py --model <llava-ivtp checkpoint> --data train.jsonl --output-dir out [--max-steps 100]

Multi-GPU: run the same script under `accelerate launch` or `torchrun` (DDP), or with `--deepspeed ds.json` /
`--fsdp "full_shard auto_wrap"`; the model is an ordinary `PreTrainedModel` to them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from modeling_llava_ivtp.processing_llava_ivtp import expanded_position_function


ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def read_conversations(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or any(turn.get("from") not in ROLES for turn in turns):
            raise ValueError(f"{path}:{number}: `conversations` must be a list of turns with `from` in {sorted(ROLES)}.")
        if "image" in record:
            record["image"] = str((path.parent / record["image"]).resolve())
        records.append(record)
    return records


class ConversationCollator:
    """LLaVA conversations -> processor inputs with labels on the answers only."""

    def __init__(self, processor, eos_token: str):
        self.processor = processor
        self.eos_token = eos_token

    def render(self, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character ranges of the answers (each answer and its EOS)."""
        text, answers = "", []
        for turn in turns:
            value = turn["value"]
            if turn["from"] == "human":
                text += f"USER: {value} "
            else:
                text += "ASSISTANT: "
                answers.append((len(text), len(text) + len(value) + len(self.eos_token)))
                text += value + self.eos_token
        return text, answers

    def __call__(self, records: list[dict]) -> dict:
        texts, answer_spans, images = [], [], []
        for record in records:
            text, answers = self.render(record["conversations"])
            texts.append(text)
            answer_spans.append(answers)
            if "image" in record:
                images.append(Image.open(record["image"]).convert("RGB"))
        batch = self.processor(
            images=images or None, text=texts, padding=True, return_tensors="pt",
            return_offsets_mapping=True, return_text_replacement_offsets=True,
        )
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets")
        labels = torch.full_like(batch["input_ids"], -100)
        for row, spans in enumerate(answer_spans):
            shift = expanded_position_function(replacements[row])  # offsets are in the text after `<image>` expanded
            for start, end in spans:
                start, end = shift(start), shift(end)
                inside = (offsets[row, :, 0] < end) & (offsets[row, :, 1] > start) & (batch["attention_mask"][row] > 0)
                labels[row, inside] = batch["input_ids"][row, inside]
        batch["labels"] = labels
        return batch


class PruningTrainer(Trainer):
    """`Trainer` that also records, per training step, the visual tokens each pruning stage kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pruning_per_step: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.pruning_per_step.append(
                {"vision": list(outputs.vision_token_counts or ()), "llm": list(outputs.llm_token_counts or ())}
            )
        return (loss, outputs) if return_outputs else loss


def build_trainer(model, processor, records, args, activation_checkpointing: bool = True) -> PruningTrainer:
    """The `PruningTrainer` of both fine-tuning examples, from their command-line arguments."""
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        activation_checkpointing=activation_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        seed=args.seed,
    )
    return PruningTrainer(
        model=model, args=training_args, train_dataset=records,
        data_collator=ConversationCollator(processor, processor.tokenizer.eos_token),
    )


def training_parser(description: str, learning_rate: float, summary_help: str) -> argparse.ArgumentParser:
    """The arguments both fine-tuning examples take."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a LLaVA-IVTP checkpoint (folder or hub id, remote code)")
    parser.add_argument("--data", type=Path, required=True, help="JSON lines, LLaVA conversation format")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", type=Path, help=summary_help)
    pruning = parser.add_mutually_exclusive_group()
    pruning.add_argument("--visual-tokens", type=int, default=None,
                         help="train with IVTP at this budget of visual tokens in the LLM's last layers (the schedule "
                              "`pruning_options={'visual_tokens': K}` derives, as `llava-ivtp eval` ivtp@K runs); "
                              "saved in the output's config")
    pruning.add_argument("--no-pruning", action="store_true",
                         help="train at full tokens (schedule None, saved so): the control for --visual-tokens")
    return parser


def apply_visual_tokens(model, kept: int | None, no_pruning: bool = False) -> None:
    """Prune with IVTP at the budget of `kept` final visual tokens (the schedule `pruning_options={"visual_tokens":
    kept}` derives, `budget_schedule`), or switch pruning off (`no_pruning`); neither leaves the model's own
    schedule."""
    if no_pruning:
        model.config.schedule = None
        return
    if kept is None:
        return
    from modeling_llava_ivtp.pruner_base import budget_schedule

    if model.config.pruning_method != "ivtp":
        raise SystemExit(f"--visual-tokens sets IVTP's schedule; the model prunes with {model.config.pruning_method!r}.")
    if not 1 <= kept <= model.config.num_patches:
        raise SystemExit(f"--visual-tokens must be in [1, {model.config.num_patches}], got {kept}.")
    model.config.schedule = budget_schedule(model.config, kept)
    model.config.check_ivtp()


def main(argv=None) -> dict:
    args = training_parser(__doc__, 2e-5, "write the losses and pruning counts per step here (JSON)").parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model.model.vision_tower.requires_grad_(False)  # frozen, as in LLaVA's fine-tuning; the CLIP text tower is frozen
    model.config.use_cache = False
    apply_visual_tokens(model, args.visual_tokens, args.no_pruning)
    trainer = build_trainer(model, processor, read_conversations(args.data), args)
    trainer.train()
    trainer.save_model(str(args.output_dir))
    processor.save_pretrained(str(args.output_dir))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "steps": trainer.state.global_step,
        "losses": losses,
        "pruned_steps": sum(1 for step in trainer.pruning_per_step if step["vision"] and step["llm"]),
        "pruning_first_step": trainer.pruning_per_step[0] if trainer.pruning_per_step else None,
        "output_dir": str(args.output_dir),
    }
    first, last = losses[: max(1, len(losses) // 6)], losses[-max(1, len(losses) // 6) :]
    print(
        f"trained {summary['steps']} steps; loss {sum(first) / len(first):.4f} (first steps) -> "
        f"{sum(last) / len(last):.4f} (last steps); both pruning stages ran in {summary['pruned_steps']} of "
        f"{len(trainer.pruning_per_step)} forward passes; saved to {args.output_dir}"
    )
    if args.summary:
        args.summary.write_text(json.dumps({**summary, "pruning_per_step": trainer.pruning_per_step}))
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"non-finite loss during training: {losses}")
    return summary


if __name__ == "__main__":
    main()
