"""`llava-ivtp` command line: `convert`, `flops`, `bench`, `eval`, `show`, `export-testbed`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; only the named
subcommand's module is imported, so `llava-ivtp flops` does not pay for the converter's imports and the reverse.
Not needed by remote code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


SUBCOMMANDS = {
    "convert": ("modeling_llava_ivtp.convert_ivtp", "convert a llava-hf checkpoint + open_clip CLIP into an IVTP checkpoint"),
    "flops": ("modeling_llava_ivtp.flops_ivtp", "FLOPs of stock LLaVA, TopK and IVTP, counted on the real forward"),
    "bench": ("modeling_llava_ivtp.bench_ivtp", "prefill/decode latency and memory: stock Llava vs IVTP"),
    "eval": ("modeling_llava_ivtp.eval_ivtp", "accuracy, TFLOPs and prefill time under a grid of pruning settings"),
    "show": ("modeling_llava_ivtp.show_ivtp", "a PNG of the patches each pruning setting keeps (paper Fig. 5)"),
    "export-testbed": ("modeling_llava_ivtp.export_testbed", "testbed questions as JSON lines + images and an lmms-eval task"),
}


def prepare_output(flag: str, path: Path, error: type[ValueError], folder: bool = False) -> None:
    """Check an output path before a command does any work, raising `error` naming `flag`: a file path must not be a
    folder (its folder is made, and must be writable); a folder path must not be a file. Either way nothing on the
    way to it may be a file."""
    if folder and path.exists() and not path.is_dir():
        raise error(f"{flag} {path}: is a file; give a folder.")
    if not folder and path.is_dir():
        raise error(f"{flag} {path}: is a folder; give a file path.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{flag} {path}: {parent} is a file, so no folder can be made under it.")
            break
    if folder:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as cause:
        raise error(f"{flag} {path}: cannot make its folder ({cause}).") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise error(f"{flag} {path}: not writable.")


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
