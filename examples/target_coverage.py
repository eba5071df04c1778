"""Does the instruction steer what is kept? On the testbed model, for test questions about one object ("What color
is the star?", "Where is the circle?", "What shape is the purple object?", "Is there a green triangle?" when it is
there), the share of that object's patches among the visual tokens that reach the LLM's last layers, per setting,
and what IVTP's relevance (eq. 6-7) ranks highest in the instruction.

Random keeping covers K / 144 of any object on average; vision-only pruning (`stage1@K`) keeps what the vision
tower's CLS attends to, the same for every question; IVTP's stage 2 adds the question. The relevance check answers
the question `docs/accuracy.md` asks: is the CLIP relevance of the word naming the object (the shape or colour
word) higher than that of the template's words, or inverted?

    python examples/target_coverage.py [--model DIR] [--limit 300] [--visual-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ivtp.evaluation.eval import parse_setting
from llava_ivtp.evaluation.show import pruning_of
from llava_ivtp.testbed import scenes as testbed


TESTBED_MODEL = Path(__file__).resolve().parent.parent / "models" / "llava-ivtp-testbed"


def target_patches(scene: testbed.Example) -> set[int]:
    """The patches labelled with the colour and shape of the object the question is about."""
    return scene.object_patches(scene.target)


def named_word(scene: testbed.Example) -> str:
    """The instruction's word that names the object: the shape, or the colour for `shape` questions."""
    return scene.target.color if scene.kind == "shape" else scene.target.shape


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TESTBED_MODEL))
    parser.add_argument("--limit", type=int, default=300, help="test questions to look at (those without a target skipped)")
    parser.add_argument("--visual-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    kept = args.visual_tokens
    settings = [f"stage1@{kept}", f"ivtp@{kept}", f"ivtp@{kept}:visual_cls", f"ivtp@{kept}:instruction_mean"]
    scenes = [scene for scene in testbed.examples("test", args.limit) if scene.target is not None]
    coverage: dict[str, list[float]] = {name: [] for name in settings}
    rank_of_named, named_selected, relevance_named, relevance_other = [], [], [], []
    for scene in scenes:
        patches = target_patches(scene)
        if not patches:
            continue
        for name in settings:
            with parse_setting(name, model.config).applied(model):
                result = pruning_of(model, processor, scene.image, scene.question)
            final = set(result["stages"][-1][1])
            coverage[name].append(len(patches & final) / len(patches))
            if name != f"ivtp@{kept}":
                continue
            words = [(token.strip().strip("?").lower(), value, chosen)
                     for token, value, chosen in result["instruction"] if value is not None]
            named = named_word(scene)
            ranked = sorted(words, key=lambda word: -word[1])
            positions = [index for index, word in enumerate(ranked) if word[0] == named]
            if positions:
                rank_of_named.append(positions[0] + 1)
                named_selected.append(ranked[positions[0]][2])
                relevance_named.append(ranked[positions[0]][1])
                relevance_other.extend(value for word, value, _ in words if word != named)
    questions = len(coverage[settings[0]])
    print(f"{questions} test questions about one object (of the first {args.limit}); {kept} visual tokens kept, "
          f"random keeping covers {kept / model.config.num_patches:.0%} of an object on average")
    print("| setting | mean share of the object's patches kept | questions with none of its patches kept |")
    print("|---|---|---|")
    for name, shares in coverage.items():
        print(f"| {name} | {statistics.mean(shares):.3f} | {sum(share == 0 for share in shares) / len(shares):.3f} |")
    if rank_of_named:
        words = len(rank_of_named)
        print(f"\nIVTP relevance (eq. 7) of the word naming the object, over {words} questions: mean "
              f"{statistics.mean(relevance_named):+.3f} against {statistics.mean(relevance_other):+.3f} for the other "
              f"words; ranked first in {sum(rank == 1 for rank in rank_of_named) / words:.0%}, mean rank "
              f"{statistics.mean(rank_of_named):.1f}; in the pseudo-CLS (>= tau) in "
              f"{sum(named_selected) / words:.0%}")
    return {"coverage": {name: statistics.mean(shares) for name, shares in coverage.items()},
            "named_rank": rank_of_named, "questions": questions}


if __name__ == "__main__":
    main()
