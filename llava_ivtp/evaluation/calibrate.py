"""`llava-ivtp calibrate-tau`: put IVTP's relevance threshold `tau` (eq. 8) on the scale of the checkpoint's own CLIP.

The paper sets `tau` = 0.2 for OpenAI's CLIP ViT-L-14-336: an instruction token joins the pseudo-CLS when the cosine
of its CLIP text feature with the CLIP image embedding (eq. 6-7) is at least 0.2. Another CLIP -- a smaller one, one
trained on other data, the repository's testbed -- puts those cosines elsewhere, and a fixed 0.2 can let no token
through (the pseudo-CLS then falls back to the visual CLS) or every token.

The rule, fixed before any accuracy is looked at: run the checkpoint as it is configured (IVTP, guidance
`clip_relevance`, its own schedule, whose pruned vision tower gives the image embedding) on calibration questions,
collect the eq. 7 relevance of every instruction token that has one, and set `tau` to their `--quantile`
(default 0.75: about a quarter of the instruction's tokens form the pseudo-CLS). The relevance does not depend on
`tau`, so one pass suffices. Calibration data: `--dataset` as `llava-ivtp eval` takes it (default the testbed's
validation split; never the split you report on).

`--write` sets `tau` in the checkpoint folder's `config.json` and nothing else; the file as it was is kept beside it
as `config.json.before-calibrate-tau` (refused when that file exists, so no earlier state is lost). `--json` writes
the calibration's report (the rule, the data, the relevance's quantiles, the old and new `tau`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


COMMAND = "calibrate-tau"
BACKUP_SUFFIX = ".before-calibrate-tau"


class CalibrationError(ValueError):
    """A bad argument or a checkpoint that cannot be calibrated (one line naming the field)."""


def check_calibratable(config) -> None:
    """The relevance exists only for IVTP with guidance `clip_relevance`, an LLM stage and a CLIP text tower."""
    if config.pruning_method not in ("ivtp", None) or (config.pruning_method is None and not config.schedule):
        raise CalibrationError(
            f"config.pruning_method is {config.pruning_method!r}: tau is IVTP's threshold; calibrate a checkpoint "
            "that runs IVTP ('ivtp', or None with a schedule).")
    if config.guidance != "clip_relevance":
        raise CalibrationError(f"config.guidance is {config.guidance!r}: tau thresholds the CLIP relevance of "
                               "guidance 'clip_relevance' only.")
    if not config.clip_text_encoder:
        raise CalibrationError("config.clip_text_encoder is not set: the relevance needs the CLIP text tower.")


@torch.no_grad()
def instruction_relevances(model, processor, records: list[dict], progress=None) -> list[float]:
    """The eq. 7 relevance of every instruction token of every record's question (tokens with no CLIP token, and
    so no relevance, are left out), as the checkpoint's configuration computes it."""
    from llava_ivtp.evaluation.show import pruning_of

    values = []
    for record in records:
        result = pruning_of(model, processor, record["image"], record["question"])
        values += [value for _, value, _ in result["instruction"] if value is not None and math.isfinite(value)]
        if progress is not None:
            progress(1)
    return values


def quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def calibrate(model, processor, records: list[dict], q: float, progress=None) -> dict:
    """The report: `tau` (the `q`-quantile of the relevances), the share of tokens at or above it, the relevance's
    spread, and the share that the checkpoint's former `tau` let through."""
    check_calibratable(model.config)
    values = instruction_relevances(model, processor, records, progress)
    if not values:
        raise CalibrationError("no instruction token had a relevance: are the questions empty, or is the processor "
                               "not LlavaIvtpProcessor (it gives the guidance inputs)?")
    tau = round(quantile(values, q), 4)
    old = float(model.config.tau)
    return {
        "rule": f"tau = the {q} quantile of the eq. 7 relevance of the calibration questions' instruction tokens",
        "quantile": q, "questions": len(records), "tokens": len(values), "tau": tau, "previous_tau": old,
        "share_at_or_above_tau": sum(v >= tau for v in values) / len(values),
        "share_at_or_above_previous_tau": sum(v >= old for v in values) / len(values),
        "relevance_quantiles": {str(p): round(quantile(values, p), 4) for p in (0.05, 0.25, 0.5, 0.75, 0.95)},
    }


def free_backup(folder: Path) -> Path:
    """The path `--write` keeps the old `config.json` at; refused when a file is there (an earlier calibration's)."""
    backup = folder / f"config.json{BACKUP_SUFFIX}"
    if backup.exists():
        raise CalibrationError(f"--write: {backup} exists (an earlier calibration's copy of config.json); move it "
                               "away to calibrate again.")
    return backup


def write_tau(folder: Path, tau: float) -> Path:
    """Set `tau` in `folder/config.json`, keeping the file as it was as `config.json.before-calibrate-tau`."""
    path = folder / "config.json"
    backup = free_backup(folder)
    text = path.read_text()
    config = json.loads(text)
    config["tau"] = tau
    backup.write_text(text)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (loaded with trust_remote_code)")
    parser.add_argument("--dataset", default="testbed:validation",
                        help="calibration questions, as `llava-ivtp eval --dataset` takes them (default the "
                        "testbed's validation split)")
    parser.add_argument("--limit", type=int, default=500, help="calibration questions (default 500)")
    parser.add_argument("--quantile", type=float, default=0.75,
                        help="tau = this quantile of the instruction tokens' relevance (default 0.75)")
    parser.add_argument("--write", action="store_true",
                        help="set tau in the checkpoint folder's config.json (the old file kept beside it)")
    parser.add_argument("--json", type=Path, default=None, help="the report: a new path, or a report this command wrote")
    parser.add_argument("--threads", type=int, default=None)


def run(args) -> int:
    from llava_ivtp.cli import TOOL_KEY, load_ivtp_checkpoint, prepare_output, report_error, resolve_checkpoint, tool_name
    from llava_ivtp.evaluation.eval import EvalError, load_records

    try:
        if not 0.0 < args.quantile < 1.0:
            raise CalibrationError(f"--quantile {args.quantile}: must be in (0, 1).")
        if args.limit < 1:
            raise CalibrationError(f"--limit {args.limit}: must be >= 1.")
        if args.json is not None:
            prepare_output("--json", args.json, CalibrationError, command=COMMAND, kind="json",
                           recognise=lambda data: isinstance(data, dict) and data.get(TOOL_KEY) == tool_name(COMMAND))
        where = resolve_checkpoint("--model", args.model, CalibrationError)
        if args.write:
            if not Path(where).is_dir():
                raise CalibrationError(f"--write: --model {args.model} is a hub id; --write sets tau in a local "
                                       "checkpoint folder (download it first, or give the printed tau to from_pretrained).")
            free_backup(Path(where))  # before the calibration's forward passes, and again when writing
        try:
            records, description = load_records(args.dataset, args.limit)
        except EvalError as error:
            raise CalibrationError(str(error)) from None
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, processor = load_ivtp_checkpoint("--model", args.model, CalibrationError)
        report = {TOOL_KEY: tool_name(COMMAND), "model": str(args.model), "dataset": description,
                  **calibrate(model, processor, records, args.quantile)}
        if args.write:
            report["written"] = str(write_tau(Path(where), report["tau"]))
    except CalibrationError as error:
        return report_error(COMMAND, error)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"tau = {report['tau']} ({report['rule']}; {report['questions']} questions, {report['tokens']} tokens; "
          f"{report['share_at_or_above_tau']:.0%} of them >= tau, {report['share_at_or_above_previous_tau']:.0%} >= "
          f"the former tau {report['previous_tau']})" + (f"; written to {report['written']}" if args.write else ""))
    return 0


__all__ = ["add_arguments", "calibrate", "check_calibratable", "instruction_relevances", "run", "write_tau"]
