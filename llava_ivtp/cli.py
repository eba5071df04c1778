"""`llava-ivtp` command line: `convert`, `flops`, `bench`, `eval`, `show`, `calibrate-tau`, `export-testbed`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; only the named
subcommand's module is imported, so `llava-ivtp flops` does not pay for the converter's imports and the reverse.
The checks every subcommand shares live here: output paths (`prepare_output`: a user's files are never written
over), checkpoint arguments (`resolve_checkpoint`, `load_ivtp_checkpoint`) and the one-line error report
(`report_error`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


SUBCOMMANDS = {
    "convert": ("llava_ivtp.conversion.convert", "convert a llava-hf checkpoint + open_clip CLIP into an IVTP checkpoint"),
    "flops": ("llava_ivtp.measuring.flops", "FLOPs of stock LLaVA, TopK and IVTP, counted on the real forward"),
    "bench": ("llava_ivtp.measuring.bench", "prefill/decode latency and memory: stock Llava vs IVTP"),
    "eval": ("llava_ivtp.evaluation.eval", "accuracy, TFLOPs and prefill time under a grid of pruning settings"),
    "show": ("llava_ivtp.evaluation.show", "a PNG of the patches each pruning setting keeps (paper Fig. 5)"),
    "calibrate-tau": ("llava_ivtp.evaluation.calibrate",
                      "set IVTP's relevance threshold tau to a quantile of the checkpoint's own CLIP relevances"),
    "export-testbed": ("llava_ivtp.testbed.export", "testbed questions as JSON lines + images and an lmms-eval task"),
}
# The key of the mark a command leaves in the JSON files it writes (`{"tool": "llava-ivtp eval", ...}`), by which
# it recognises them as its own later.
TOOL_KEY = "tool"
# Figure formats whose metadata can carry the writer's mark, and the metadata field matplotlib writes it to.
FIGURE_MARK_FIELDS = {"png": "Software", "pdf": "Creator", "svg": "Creator"}
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def tool_name(command: str) -> str:
    """The name a command signs its outputs with and its errors: `llava-ivtp eval`."""
    return f"llava-ivtp {command}"


def one_line(message) -> str:
    """`message` on one line: errors of other libraries (transformers, huggingface_hub) often span several."""
    return re.sub(r"\s*\n\s*", " ", str(message).strip())


def report_error(command: str, error) -> int:
    """Every command's refusal: one line on stderr, `llava-ivtp COMMAND: error: MESSAGE`; returns the exit code 2."""
    print(f"{tool_name(command)}: error: {one_line(error)}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------------------------
def prepare_output(flag: str, path: Path, error: type[ValueError], folder: bool = False, *, command: str | None = None,
                   kind: str | None = None, recognise: Callable[[object], bool] | None = None) -> None:
    """Check an output path before a command does any work, raising `error` (one line naming `flag`, what is
    allowed and how to go on); nothing is written to `path` here.

    The rule, the same for every `llava-ivtp` command: a command never writes into a file it did not create.
    A file path (`folder=False`) may be

    - a path where nothing exists yet: the command creates the file (and the folders on the way);
    - an existing file that this `command` wrote as this `kind` of output: the command replaces it (or, for
      `eval`'s results, resumes from it). Own outputs are recognised by their content: `kind="json"`, a JSON object
      with the mark `"tool": "llava-ivtp COMMAND"` (`TOOL_KEY`) or, for files written before the mark, none; where
      `recognise` is given, `recognise(the object)` must hold as well (the keys the command writes); `kind="figure"`,
      a PNG, PDF or SVG with the mark in its metadata (`save_figure` writes it); `kind="text"`, a text for which
      `recognise(the text)` holds.

    Any other existing file -- the user's, another command's, not of the `kind`, a figure in a format whose
    metadata carries no mark (JPEG), or any file when no `command` and `kind` are given -- is refused and left byte
    for byte as it was: the user removes it or gives another path. There is no `--overwrite` for files: a command's
    own outputs need none (re-running a command works), and nothing else is ever replaced. A file path must not be
    a folder, its folder is made and must be writable; a figure's name must end in a format matplotlib writes (no
    suffix: PNG).

    A folder path (`folder=True`) must not be a file; which files it may already hold is the command's check, made
    before it writes any (`export-testbed`: none of the names it writes; `convert`: none at all, unless
    `--overwrite` is given). Either way nothing on the way to `path` may be a file.
    """
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
        nearest = path if path.exists() else next((parent for parent in path.parents if parent.exists()), None)
        if nearest is not None and not os.access(nearest, os.W_OK):
            raise error(f"{flag} {path}: {nearest} is not writable.")
        return
    if kind == "figure":
        figure_format(flag, path, error)
    if path.exists() or path.is_symlink():
        problem = own_output_problem(path, command, kind, recognise)
        if problem is not None:
            owner = tool_name(command) if command else "this command"
            raise error(
                f"{flag} {path}: exists and {problem}; {flag} takes a new path or a file {owner} wrote itself. "
                "Nothing was changed: remove the file or give another path."
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as cause:
        raise error(f"{flag} {path}: cannot make its folder ({one_line(cause)}).") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise error(f"{flag} {path}: not writable.")


def own_output_problem(path: Path, command: str | None, kind: str | None,
                       recognise: Callable[[object], bool] | None = None) -> str | None:
    """None when the existing file at `path` is `command`'s own output of `kind` (see `prepare_output`); otherwise
    what the file is, for the refusal (a phrase after "exists and")."""
    if command is None or kind is None:
        return "is not a file this command can tell it wrote"
    if not path.is_file():
        return "is not a regular file"
    tool = tool_name(command)
    try:
        data = path.read_bytes()
    except OSError as cause:
        return f"cannot be read ({one_line(cause)})"
    if kind == "figure":
        if figure_mark(path, data) == tool:
            return None
        return f"is not a figure {tool} wrote (no mark of it in its metadata)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "is not a text file" if kind == "text" else "is not JSON (not even text)"
    if kind == "text":
        return None if recognise is not None and recognise(text) else f"is not a text {tool} wrote"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as cause:
        return f"is not JSON ({cause.msg} at line {cause.lineno} column {cause.colno})"
    if not isinstance(value, dict):
        return f"holds a JSON {type(value).__name__}, not an object"
    mark = value.get(TOOL_KEY)
    if isinstance(mark, str) and mark != tool and mark.startswith("llava-ivtp "):
        return f"was written by {mark}"
    if mark in (tool, None) and (recognise(value) if recognise is not None else mark == tool):
        return None
    return f'holds a JSON object that {tool} did not write (neither "{TOOL_KEY}": "{tool}" nor the keys it writes)'


def figure_format(flag: str, path: Path, error: type[ValueError]) -> str:
    """The format matplotlib writes `path` in (its suffix; PNG without one), refused if matplotlib has no writer."""
    name = path.suffix[1:].lower() or "png"
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        message = f"{flag} {path}: figures need matplotlib, which is not installed (pip install matplotlib)."
        raise error(message) from None
    if name not in FigureCanvasBase.get_supported_filetypes():
        raise error(f"{flag} {path}: matplotlib cannot write .{name} figures; give a .png, .pdf or .svg path.")
    return name


def figure_mark(path: Path, data: bytes) -> str | None:
    """The writer's mark in a PNG, PDF or SVG figure's metadata (`save_figure`), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.text.get(FIGURE_MARK_FIELDS["png"])
        except (OSError, ValueError, SyntaxError):
            return None
    if data.startswith(b"%PDF"):
        found = re.search(rb"/Creator \((llava-ivtp [\w-]+)\)", data)
        return found.group(1).decode() if found else None
    found = re.search(rb"<svg.*?<dc:creator>\s*<cc:Agent>\s*<dc:title>(llava-ivtp [\w-]+)</dc:title>", data, re.DOTALL)
    return found.group(1).decode() if found else None


def save_figure(figure, path: Path, command: str, **savefig_kwargs) -> None:
    """`figure.savefig` to exactly `path` (no suffix appended), with `command`'s mark in the metadata of the formats
    that carry one, so that a later run recognises the file as its own (`prepare_output`)."""
    name = path.suffix[1:].lower() or "png"
    field = FIGURE_MARK_FIELDS.get(name)
    figure.savefig(path, format=name, metadata={field: tool_name(command)} if field else None, **savefig_kwargs)


def distinct_outputs(error: type[ValueError], outputs: list[tuple[str, Path | None]]) -> None:
    """Two output flags naming one file would write over each other's results: refused."""
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if path is None:
            continue
        key = path.expanduser().resolve()
        if key in seen:
            raise error(f"{flag} {path}: is also {seen[key]}; give each output its own path.")
        seen[key] = flag


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint arguments
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(flag: str, source: str, error: type[ValueError]) -> str:
    """What to load for a checkpoint argument: an existing folder with a `config.json` (`~` expanded), or a hub repo
    id `owner/name`. Anything else -- a file, a path that does not exist (`./x`, `/x`, `~/x`, `a/b/c`), a name the
    hub cannot hold -- is refused here, before any loading, naming `flag`."""
    path = Path(source).expanduser()
    allowed = "give a checkpoint folder (with its config.json) or a hub repo id owner/name"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise error(f"{flag} {source}: a folder without config.json, so not a checkpoint; {allowed}.")
        return str(path)
    if path.exists():
        raise error(f"{flag} {source}: is a file; {allowed}.")
    if not is_hub_repo_id(source):
        raise error(f"{flag} {source}: no such folder, and not a hub repo id owner/name; {allowed}.")
    return source


def is_hub_repo_id(text: str) -> bool:
    """Whether `text` is a hub model id `owner/name` (what the hub accepts; no path: `./x`, `/x`, `~/x`, `a/b/c`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not HUB_REPO_ID.match(text) or text.startswith((".", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


IVTP_MODEL_TYPES = ("llava_ivtp", "llava_next_ivtp")  # LLaVA-1.5 and LLaVA-NeXT checkpoints


def load_ivtp_checkpoint(flag: str, source: str, error: type[ValueError]):
    """`(model in eval mode, processor)` of an IVTP checkpoint (folder or hub id, loaded with `trust_remote_code`).
    A bad argument -- see `resolve_checkpoint`; not loadable (a hub id not in the cache offline, broken files); not
    an IVTP checkpoint -- raises `error` on one line naming `flag`, never a loader's traceback."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    where = resolve_checkpoint(flag, source, error)
    # A hub id that cannot be loaded (offline and not cached, no such repo) names where it was looked for.
    failure = "cannot load it" if Path(where).is_dir() else "no such folder, and as a hub repo id it cannot be loaded"
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=True)
        if getattr(config, "model_type", None) not in IVTP_MODEL_TYPES:
            raise error(
                f"{flag} {source}: model_type {getattr(config, 'model_type', None)!r}, not an IVTP checkpoint "
                f"({' or '.join(map(repr, IVTP_MODEL_TYPES))}); make one with `llava-ivtp convert`."
            )
        model = AutoModelForImageTextToText.from_pretrained(where, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=True)
    except error:
        raise
    except (OSError, ValueError) as cause:
        raise error(f"{flag} {source}: {failure}: {one_line(cause)}") from None
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
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
