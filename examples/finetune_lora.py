"""LoRA fine-tuning of LLaVA-IVTP with PEFT and the `Trainer`, pruning on.

LoRA adapters go on the LLM's attention and MLP projections only (`q/k/v/o_proj`, `gate/up/down_proj` of
`model.language_model`); the vision tower, the projector and the CLIP text tower are left as they are. Same data
format and collator as `finetune.py`. The output folder holds the adapter (and the processor); load it with

    base = AutoModelForImageTextToText.from_pretrained(base_checkpoint, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, out)          # or .merge_and_unload() for a plain IVTP model

    python examples/finetune_lora.py --model <llava-ivtp checkpoint> --data train.jsonl --output-dir out
"""

from __future__ import annotations

import json

import torch
from finetune import apply_visual_tokens, build_trainer, read_conversations, training_parser
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor


# Every projection of the LLM's decoder layers, nothing else (PEFT matches this against full module names).
LLM_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def lora_model(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0):
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LLM_PROJECTIONS, bias="none")
    return get_peft_model(model, config)


def main(argv=None) -> dict:
    parser = training_parser(__doc__, 2e-4, "write the losses and the adapted module names here (JSON)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    base = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    apply_visual_tokens(base, args.visual_tokens, args.no_pruning)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = lora_model(base, rank=args.lora_r, alpha=args.lora_alpha)
    model.print_trainable_parameters()
    trainer = build_trainer(model, processor, read_conversations(args.data), args, activation_checkpointing=False)
    trainer.train()
    model.save_pretrained(str(args.output_dir))
    processor.save_pretrained(str(args.output_dir))
    adapted = sorted({name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name})
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"steps": trainer.state.global_step, "losses": losses, "adapted_modules": adapted}
    print(f"trained {summary['steps']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; {len(adapted)} LoRA modules; "
          f"adapter saved to {args.output_dir}")
    if args.summary:
        args.summary.write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
