"""Instruction-guided pruning: the same image, two questions, what each question makes stage 2 keep.

For each question it prints the instruction's tokens with their CLIP relevance (eq. 6-7; `*` marks those >= tau,
the ones averaged into the pseudo-CLS, eq. 8) and the image's patches as a grid: `#` reaches the LLM's last
layers, `+` left the vision tower but was pruned in the LLM (stage 2, the instruction-guided part), `.` was pruned
in the vision tower (stage 1, the same for every question).

Offline by default: LLaVA-1.5-7B's geometry and schedule with narrow layers, a narrow CLIP text tower and random
weights, a tokenizer trained here on the prompts, a generated image. With random weights the relevances are
arbitrary numbers and so is which patches a question favours; what runs is the mechanism (processor -> CLIP text
tower -> relevance -> pseudo-CLS -> stage 2), and that changing only the question changes stage 2's choice.
Give `--model` a converted LLaVA-IVTP checkpoint (with `LlavaIvtpProcessor` files) and `--image` a picture to see a
trained model's choices.

    python examples/guided_pruning.py [--question "Where is the bright disc?" --question "What color is the top?"]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from quickstart import ROOT, demo_tokenizer, generated_image, small_config
from transformers import CLIPImageProcessor

from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration, LlavaIvtpProcessor
from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE


QUESTIONS = ["Where is the bright blue disc in this picture?", "What color is the sky at the top of the image?"]
# The narrow stand-in for ViT-L-14-336's text tower: its tokenizer and context, smaller widths.
DEMO_CLIP_TEXT = {
    "model_name": "ViT-L-14-336", "embed_dim": 64, "quick_gelu": True,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def offline_model_and_processor(preset: Path, questions: list[str]):
    torch.manual_seed(0)
    config = small_config(preset, clip_text_encoder=DEMO_CLIP_TEXT)
    # Random LLM weights of std 0.1 (not 0.02): with 0.02 and narrow layers every query attends almost uniformly,
    # so stage 2 would rank by value norms alone and both questions would keep the same patches.
    config.text_config.initializer_range = 0.1
    config._attn_implementation = "sdpa"
    model = LlavaIvtpForConditionalGeneration(config).eval()
    corpus = [f"USER: <image>\n{question} ASSISTANT:" for question in questions] * 8
    processor = LlavaIvtpProcessor(
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        demo_tokenizer(corpus, image_token_id=config.image_token_id),
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, clip_model_name=DEMO_CLIP_TEXT["model_name"],
    )
    return model, processor


def patch_grid(num_patches: int, left_vision: torch.Tensor, reached_last: torch.Tensor) -> list[str]:
    cells = torch.zeros(num_patches, dtype=torch.long)
    cells[left_vision] = 1
    cells[reached_last] = 2
    side = int(num_patches**0.5)
    return ["".join(".+#"[cell] for cell in row) for row in cells.view(side, side).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", help="a question (give two); defaults: two about the image")
    parser.add_argument("--preset", type=Path, default=ROOT / "configuration" / "llava-1.5-7b-ivtp.json")
    parser.add_argument("--model", help="a converted LLaVA-IVTP checkpoint directory (model + processor files)")
    parser.add_argument("--image", type=Path, help="an image file (default: a generated picture)")
    args = parser.parse_args()
    questions = args.question or QUESTIONS

    if args.model:
        model = LlavaIvtpForConditionalGeneration.from_pretrained(args.model).eval()
        processor = LlavaIvtpProcessor.from_pretrained(args.model)
    else:
        model, processor = offline_model_and_processor(args.preset, questions)
    config = model.config
    image = Image.open(args.image).convert("RGB") if args.image else generated_image()
    print(f"guidance {config.guidance!r}, tau {config.tau}; {config.num_patches} patches, schedule {config.schedule}")

    grids = {}
    for question in questions:
        conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model(**inputs, use_cache=False)
        ids = inputs["input_ids"][0]
        print(f"\nQ: {question}")
        print("instruction tokens (CLIP relevance; * = >= tau, averaged into the pseudo-CLS):")
        words = []
        for index in inputs["instruction_mask"][0].nonzero()[:, 0].tolist():
            token = processor.tokenizer.convert_ids_to_tokens(int(ids[index])).replace("\u2581", "")
            value = float(out.instruction_relevance[0, index])
            chosen = out.pseudo_cls_tokens is not None and bool(out.pseudo_cls_tokens[0, index])
            words.append(f"{token}({'none' if value != value else f'{value:+.3f}'}){'*' if chosen else ''}")
        print("  " + " ".join(words))
        if out.pseudo_cls_tokens is None or not bool(out.pseudo_cls_tokens[0].any()):
            print("  no token >= tau: the pseudo-CLS is the visual CLS")
        reached = out.llm_keep_indices[-1][0]
        grids[question] = set(reached.tolist())
        print(f"patches: {len(out.vision_keep_indices[0])} left the vision tower, {len(reached)} reach the last layers")
        for row in patch_grid(config.num_patches, out.vision_keep_indices[0], reached):
            print("  " + row)
    if len(questions) >= 2:
        first, second = grids[questions[0]], grids[questions[1]]
        print(
            f"\nkept by both questions: {len(first & second)}; only by the first: {len(first - second)}; "
            f"only by the second: {len(second - first)}"
        )


if __name__ == "__main__":
    main()
