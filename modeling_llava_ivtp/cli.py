"""`llava-ivtp` command line: `convert`, `flops`, `bench`, `eval`, `show`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; only the named
subcommand's module is imported, so `llava-ivtp flops` does not pay for the converter's imports and the reverse.
Not needed by remote code.
"""

from __future__ import annotations

import argparse
import importlib
import sys


SUBCOMMANDS = {
    "convert": ("modeling_llava_ivtp.convert_ivtp", "convert a llava-hf checkpoint + open_clip CLIP into an IVTP checkpoint"),
    "flops": ("modeling_llava_ivtp.flops_ivtp", "FLOPs of stock LLaVA, TopK and IVTP, counted on the real forward"),
    "bench": ("modeling_llava_ivtp.bench_ivtp", "prefill/decode latency and memory: stock Llava vs IVTP"),
    "eval": ("modeling_llava_ivtp.eval_ivtp", "accuracy, TFLOPs and prefill time under a grid of pruning settings"),
    "show": ("modeling_llava_ivtp.show_ivtp", "a PNG of the patches each pruning setting keeps (paper Fig. 5)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ivtp", description="IVTP for LLaVA-1.5 on Hugging Face transformers.")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
