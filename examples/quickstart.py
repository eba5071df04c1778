"""Quickstart: the testbed LLaVA-IVTP the repository ships answers a question about a generated scene, with and
without pruning, and shows which patches it kept (paper Fig. 5).

The testbed model (`models/llava-ivtp-testbed`) is a tiny LLaVA trained here by
`python -m llava_ivtp.testbed.train all --out DIR` on the synthetic task of
`llava_ivtp/testbed/scenes.py` (scenes of coloured shapes, one-word answers); it loads like any remote-code
checkpoint. Nothing is downloaded. `docs/accuracy.md` has its accuracy under every pruning setting.

    python examples/quickstart.py [--model DIR] [--scene test:5] [--question "Where is the small star?"]
                                  [--visual-tokens 16] [--out quickstart.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ivtp.evaluation.eval import parse_setting, prompt_of
from llava_ivtp.evaluation.show import render
from llava_ivtp.testbed import scenes as testbed


TESTBED_MODEL = Path(__file__).resolve().parent.parent / "models" / "llava-ivtp-testbed"


def timed_prefills(model, inputs, settings, repeats: int) -> dict:
    """Median ms of the forward over the prompt (what pruning makes cheaper) per setting, after a warm-up; the
    settings take turns run by run, so a change in the machine's load affects each of them alike."""
    times = {setting: [] for setting in settings}
    for attempt in range(repeats + 1):
        for setting in settings:
            with parse_setting(setting, model.config).applied(model):
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                if attempt:
                    times[setting].append(time.perf_counter() - start)
    return {setting: 1000 * statistics.median(values) for setting, values in times.items()}


@torch.inference_mode()
def answer(model, processor, image, question: str, setting: str) -> dict:
    """Generate the answer under `setting` (`full` or `ivtp@K`); the visual tokens after each pruning step."""
    with parse_setting(setting, model.config).applied(model):
        inputs = processor(images=[image], text=[prompt_of(question)], return_tensors="pt")
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        text = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return {
        "answer": text.strip(),
        "vision": list(out.vision_token_counts or ()),
        "llm": list(out.llm_token_counts or ()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TESTBED_MODEL), help="a testbed checkpoint (folder or hub id)")
    parser.add_argument("--scene", default="test:5", metavar="SPLIT:INDEX", help="a generated testbed scene (test:5: the first test question about a small object)")
    parser.add_argument("--question", default=None, help="default: the scene's own question")
    parser.add_argument("--visual-tokens", type=int, default=16, help="visual tokens left in the LLM's last layers")
    parser.add_argument("--repeats", type=int, default=15, help="timed prefills per setting (median reported)")
    parser.add_argument("--out", type=Path, default=Path("quickstart.png"), help="the Fig. 5 picture (PNG)")
    args = parser.parse_args(argv)
    try:
        scene = testbed.scene_of(args.scene)
    except ValueError as error:
        parser.error(f"--scene {error}")
    torch.manual_seed(0)

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    question = args.question or scene.question
    print(f"scene {args.scene}: {scene.caption}")
    print(f"Q: {question}" + (f"   (expected: {scene.answer})" if args.question is None else ""))
    settings = ("full", f"ivtp@{args.visual_tokens}")
    results = {setting: answer(model, processor, scene.image, question, setting) for setting in settings}
    with torch.inference_mode():
        inputs = processor(images=[scene.image], text=[prompt_of(question)], return_tensors="pt")
        for setting, milliseconds in timed_prefills(model, inputs, settings, args.repeats).items():
            results[setting]["ms"] = milliseconds
    for setting, result in results.items():
        kept = f"all {model.config.num_patches} visual tokens" if setting == "full" else (
            f"visual tokens {model.config.num_patches} -> vision tower {result['vision']} -> LLM {result['llm']}")
        print(f"  {setting:>9}: {result['answer']!r:12} {kept}; prefill {result['ms']:.1f} ms")
    full_ms, pruned_ms = results["full"]["ms"], results[settings[1]]["ms"]
    print(f"prefill speed-up {full_ms / pruned_ms:.2f}x (median of {args.repeats}, the settings taking turns, "
          f"{torch.get_num_threads()} threads)")
    figure = render(model, processor, scene.image, question, [f"stage1@{args.visual_tokens}", f"ivtp@{args.visual_tokens}"])
    figure.savefig(args.out, dpi=110)
    print(f"kept patches (vision-only pruning vs IVTP) and the instruction's relevance: {args.out}")
    return {"question": question, "expected": scene.answer, **results}


if __name__ == "__main__":
    main()
