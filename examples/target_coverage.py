"""Does the instruction steer what is kept? On the testbed model, for test questions about one object ("What color
is the star?", "Where is the circle?", "What shape is the purple object?", "Is there a green triangle?" when it is
there, the `small` kind's questions about a small object, "Where is the small star?", and the `largest` kind's,
"Where is the largest object?", which name none of its attributes), the share of that
object's patches among the visual tokens that reach the LLM's last layers, per setting, and what IVTP's relevance
(eq. 6-7) ranks highest in the instruction.

Random keeping covers K / 144 of any object on average; vision-only pruning (`stage1@K`) keeps what the vision
tower's CLS attends to, the same for every question; IVTP's stage 2 adds the question. The relevance check answers
the question `docs/accuracy.md` asks: is the CLIP relevance of the word naming the object (the shape or colour
word) higher than that of the template's words, or inverted?

    python examples/target_coverage.py [--model DIR] [--limit 300] [--ranges 0 1000] [--visual-tokens 16] [--json F]
        [--settings topk@64 random@64 ...]   # any `llava-ivtp eval` settings (default: IVTP's guidance modes at K)

For a merging method (EViT, ToMe) a kept token counts as the patch it stands for (`vision_keep_indices`).

Each range is `--limit` test questions from its start; the table gives each range's mean coverage, the pooled mean,
the pooled share of questions with none of the object kept, and the pooled mean per kind.
"""

from __future__ import annotations

import argparse
import json
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


def named_word(scene: testbed.Example) -> str | None:
    """The instruction's word that names the object: the shape, or the colour for `shape` questions (a `small`
    question names its object by its shape, and by its colour too when it asks whether it exists); None for a
    `largest` question, which names no attribute of its object (left out of the relevance figures)."""
    if scene.kind == "largest":
        return None
    return scene.target.color if scene.kind == "shape" else scene.target.shape


@torch.no_grad()
def final_patches(model, processor, scene: testbed.Example) -> list[int]:
    """The patches whose tokens reach the LLM's last layers under a method without IVTP's stages (its last LLM
    selection, else its vision-side one; a merged token counts as the patch it stands for, -1 for none)."""
    from llava_ivtp.evaluation.eval import prompt_of

    inputs = processor(images=[scene.image], text=[prompt_of(scene.question)], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model(**inputs, use_cache=False, logits_to_keep=1)
    kept = out.llm_keep_indices[-1] if out.llm_keep_indices else out.vision_keep_indices
    if kept is None:  # a setting that does not prune: every patch
        return list(range(model.config.num_patches))
    return [index for index in kept[0].tolist() if index >= 0]


def measure(model, processor, scenes: list[testbed.Example], settings: list[str]) -> list[dict]:
    """One record per question about one object: its kind, the share of the object's patches each setting keeps,
    and (for the first setting, IVTP) the relevance rank of the word naming the object."""
    records = []
    for scene in scenes:
        patches = target_patches(scene)
        if not patches:
            continue
        record = {"kind": scene.kind, "coverage": {}}
        for name in settings:
            with parse_setting(name, model.config).applied(model):
                result = pruning_of(model, processor, scene.image, scene.question)
                final = result["stages"][-1][1] if result["stages"] else final_patches(model, processor, scene)
            record["coverage"][name] = len(patches & set(final)) / len(patches)
            if name != settings[0]:
                continue
            words = [(token.strip().strip("?").lower(), value, chosen)
                     for token, value, chosen in result["instruction"] if value is not None]
            named = named_word(scene)
            ranked = sorted(words, key=lambda word: -word[1])
            positions = [index for index, word in enumerate(ranked) if word[0] == named]
            if positions:
                record["named"] = {"rank": positions[0] + 1, "selected": ranked[positions[0]][2],
                                   "relevance": ranked[positions[0]][1],
                                   "others": [value for word, value, _ in words if word != named]}
        records.append(record)
    return records


def report(ranges: dict[int, list[dict]], settings: list[str], kept: int, num_patches: int, limit: int) -> dict:
    pooled = [record for records in ranges.values() for record in records]
    kinds = sorted({record["kind"] for record in pooled})
    mean = lambda values: statistics.mean(values) if values else float("nan")  # noqa: E731
    spans = [f"test {start}..{start + limit - 1}" for start in ranges]
    print(f"{len(pooled)} test questions about one object ({', '.join(f'{len(r)} in {s}' for s, r in zip(spans, ranges.values()))}); "
          f"at {kept} visual tokens random keeping covers {kept / num_patches:.0%} of an object on average")
    header = ["setting", *spans, "pooled", "none kept (pooled)", *kinds]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    table = {}
    for name in settings:
        per_range = [mean([record["coverage"][name] for record in records]) for records in ranges.values()]
        shares = [record["coverage"][name] for record in pooled]
        by_kind = {kind: mean([r["coverage"][name] for r in pooled if r["kind"] == kind]) for kind in kinds}
        table[name] = {"ranges": per_range, "pooled": mean(shares), "none_kept": mean([share == 0 for share in shares]),
                       "by_kind": by_kind}
        cells = [f"`{name}`", *(f"{value:.3f}" for value in per_range), f"{table[name]['pooled']:.3f}",
                 f"{table[name]['none_kept']:.3f}", *(f"{by_kind[kind]:.3f}" for kind in kinds)]
        print("| " + " | ".join(cells) + " |")
    named = [record["named"] for record in pooled if "named" in record]
    relevance = {}
    if named:
        relevance = {
            "words": len(named), "named_mean": mean([n["relevance"] for n in named]),
            "others_mean": mean([value for n in named for value in n["others"]]),
            "first": mean([n["rank"] == 1 for n in named]), "mean_rank": mean([n["rank"] for n in named]),
            "in_pseudo_cls": mean([n["selected"] for n in named]),
        }
        print(f"\nIVTP relevance (eq. 7) of the word naming the object, over {relevance['words']} questions: mean "
              f"{relevance['named_mean']:+.3f} against {relevance['others_mean']:+.3f} for the other words; ranked "
              f"first in {relevance['first']:.0%}, mean rank {relevance['mean_rank']:.1f}; in the pseudo-CLS (>= tau) "
              f"in {relevance['in_pseudo_cls']:.0%}")
    return {"questions": len(pooled), "per_range": {str(start): len(records) for start, records in ranges.items()},
            "visual_tokens": kept, "coverage": table, "relevance": relevance}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TESTBED_MODEL))
    parser.add_argument("--limit", type=int, default=300,
                        help="test questions looked at in each range (those without a target skipped)")
    parser.add_argument("--ranges", type=int, nargs="+", default=[0],
                        help="first test question of each range (disjoint ranges of --limit questions)")
    parser.add_argument("--visual-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a new file)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="settings to measure (`llava-ivtp eval` names); default: ivtp@K, stage1@K, "
                             "ivtp@K:visual_cls, ivtp@K:instruction_mean with K = --visual-tokens. The relevance "
                             "figures are the first setting's, when it is IVTP's")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    starts = sorted(args.ranges)
    if starts[0] < 0 or any(b < a + args.limit for a, b in zip(starts, starts[1:])):
        parser.error(f"--ranges {args.ranges}: starts must be >= 0 and at least --limit ({args.limit}) apart")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json}: exists; give a new path")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    kept = args.visual_tokens
    settings = args.settings or [f"ivtp@{kept}", f"stage1@{kept}", f"ivtp@{kept}:visual_cls",
                                 f"ivtp@{kept}:instruction_mean"]
    ranges = {start: measure(model, processor, [scene for scene in testbed.examples("test", args.limit, start)
                                                if scene.target is not None], settings)
              for start in starts}
    figures = report(ranges, settings, kept, model.config.num_patches, args.limit)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
