"""One table from `llava-ivtp eval` results on disjoint question ranges of one model (as `docs/accuracy.md` reports
every table): exact match on each range, pooled over all of them with its binomial standard error, the pooled
accuracy per question kind, TFLOPs and the mean visual tokens per LLM layer.

    python examples/ranges_table.py docs/accuracy/v2/methods-test-0.json docs/accuracy/v2/methods-test-1000.json \
        [--settings full ivtp@16 ...] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_ivtp.evaluation.eval import EvalError, pooled


def table(ranges: list[dict], settings: list[str] | None = None) -> str:
    merged = pooled(ranges)
    names = settings or list(merged["settings"])
    missing = [name for name in names if name not in merged["settings"]]
    if missing:
        raise EvalError(f"settings {missing} are not measured in every range")
    kinds = sorted(key.removeprefix("exact_match_") for key in merged["settings"][names[0]]
                   if key.startswith("exact_match_") and key != "exact_match_stderr")
    spans = [results["dataset"].removeprefix("testbed ") for results in ranges]
    header = ["setting", *spans, "pooled ± s.e.", *kinds, "TFLOPs", "mean visual tokens / LLM layer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = merged["settings"][name]
        cells = [f"`{name}`", *(f"{results['settings'][name]['exact_match']:.3f}" for results in ranges),
                 f"{entry['exact_match']:.3f} ± {entry['exact_match_stderr']:.3f}",
                 *(f"{entry[f'exact_match_{kind}']:.2f}" for kind in kinds),
                 f"{entry['tflops']:.5f}", f"{entry['mean_visual_tokens_per_llm_layer']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="llava-ivtp eval JSON files, one per question range")
    parser.add_argument("--settings", nargs="+", default=None, help="rows, in this order (default: every setting)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (a new file)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out}: exists; give a new path")
    try:
        text = table([json.loads(path.read_text()) for path in args.results], args.settings)
    except EvalError as error:
        parser.error(str(error))
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
