"""Instruction-guided pruning: one scene, two questions, what each question makes the model keep.

On the testbed model the repository ships (`models/llava-ivtp-testbed`): for each question it prints the
instruction's tokens with their relevance to the image (eq. 6-7; `*` marks those >= tau, averaged into the
pseudo-CLS, eq. 8), the answer, and for every object of the scene the share of its patches that reach the LLM's
last layers; and it writes one picture per question (`llava-ivtp show`'s figure: vision-only pruning against IVTP,
kept patches after each step). Stage 1 (the vision tower) is the same for both questions; stage 2 follows them.

    python examples/guided_pruning.py [--scene test:3] [--question "What color is the star?" --question ...]
                                      [--visual-tokens 16] [--out guided_pruning.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ivtp.evaluation.eval import parse_setting, prompt_of
from llava_ivtp.evaluation.show import pruning_of, render
from llava_ivtp.testbed import scenes as testbed


ROOT = Path(__file__).resolve().parent.parent


def object_patches(scene: testbed.Example) -> dict[str, set[int]]:
    """Per object ("red star", "small blue circle"), the patches that show it."""
    return {f"{'small ' if obj.small else ''}{obj.color} {obj.shape}": scene.object_patches(obj) for obj in scene.objects}


def default_questions(scene: testbed.Example) -> list[str]:
    """"What color is the (small) X?" for the first two objects whose shape occurs once in the scene."""
    shapes = [obj.shape for obj in scene.objects]
    unique = [obj for obj in scene.objects if shapes.count(obj.shape) == 1]
    if len(unique) < 2:
        raise SystemExit("this scene has fewer than two shapes that occur once; give --question twice")
    return [f"What color is the {'small ' if obj.small else ''}{obj.shape}?" for obj in unique[:2]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "llava-ivtp-testbed"))
    parser.add_argument("--scene", default="test:3", metavar="SPLIT:INDEX")
    parser.add_argument("--question", action="append", default=None, help="twice; default: two colour questions")
    parser.add_argument("--visual-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("guided_pruning.png"), help="PNG; one per question, numbered")
    args = parser.parse_args(argv)
    try:
        scene = testbed.scene_of(args.scene)
    except ValueError as error:
        parser.error(f"--scene {error}")
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    questions = args.question or default_questions(scene)
    setting = f"ivtp@{args.visual_tokens}"
    objects = object_patches(scene)
    print(f"scene {args.scene}: {scene.caption}")
    report = {}
    for number, question in enumerate(questions, start=1):
        with parse_setting(setting, model.config).applied(model):
            result = pruning_of(model, processor, scene.image, question)
            inputs = processor(images=[scene.image], text=[prompt_of(question)], return_tensors="pt")
            with torch.inference_mode():
                generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            reply = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        final = set(result["stages"][-1][1])
        print(f"\nQ{number}: {question} -> {reply.strip()!r} ({setting})")
        print("  " + " ".join(f"{token.strip()}({relevance:+.2f}){'*' if chosen else ''}"
                              for token, relevance, chosen in result["instruction"] if relevance is not None))
        shares = {name: len(patches & final) / len(patches) for name, patches in objects.items() if patches}
        for name, share in shares.items():
            print(f"  {name:>16}: {share:4.0%} of its patches reach the LLM's last layers")
        figure = render(model, processor, scene.image, question, [f"stage1@{args.visual_tokens}", setting])
        path = args.out.with_name(f"{args.out.stem}-{number}{args.out.suffix}")
        figure.savefig(path, dpi=110)
        print(f"  picture: {path}")
        report[question] = {"answer": reply.strip(), "kept": sorted(final), "object_shares": shares}
    first, second = (set(report[q]["kept"]) for q in questions[:2])
    print(f"\nkept by both questions: {len(first & second)}; only by the first: {len(first - second)}; "
          f"only by the second: {len(second - first)}")
    return report


if __name__ == "__main__":
    main()
