"""`llava-ivtp eval`: accuracy, TFLOPs and prefill time of one model under a grid of pruning settings.

A model (folder or hub id) x a dataset (the testbed by name, or local JSON lines / parquet / a `datasets` folder
with `image`, `question` and `answers`) x settings:

- `full`: no pruning (`pruning_method = None`, stock Llava);
- `ivtp@K`: IVTP with the budget `pruning_options={"visual_tokens": K}` (`K` visual tokens in the LLM's last layers;
  the schedule that budget derives, `pruner_base.budget_schedule`, as `llava-ivtp bench --kept K` runs), with the
  model's guidance; `ivtp@K:MODE` with guidance `MODE` (`clip_relevance`, `instruction_mean`, `embedding_relevance`,
  `visual_cls`);
- `stage1@K`: stage 1 only, the vision counts decaying geometrically to `K` (`budget_schedule(..., llm=False)`, the
  rule of TopK's and EViT's counts);
- `preset:PATH`: IvtpConfig fields (schedule, group_size, tau, guidance) from a JSON file;
- `METHOD@K` for every other registered method (`random`, `topk`, `pooling`, `evit`, `tome`, `topk_plus`,
  `tome_plus`, `fastv`, `pdrop`, `visionzip`, `vispruner`, `divprune`, `cdpruner`): `pruning_method=METHOD` with the
  budget `pruning_options={"visual_tokens": K}`, which the method maps to its own schedule; `METHOD@K:NAME=VALUE`
  (several joined by `,`) sets the method's other options too, e.g. `fastv@64:layer=3`, `evit@64:fused=mean`
  (a value that reads as JSON is taken so, else as a string; the method checks it).

Every setting reports the visual tokens in the LLM's last layers and their mean over the LLM's layers (as the forward
held them: methods spend tokens differently, FastV keeps all of them for its first layers), and TFLOPs.

Answers are generated greedily in left-padded batches and scored with the repository's own `evaluate` metric modules
(exact match; VQA accuracy with the VQA answer normalisation), loaded by path. TFLOPs come from the project's counter
(`measuring.flops.measure`, the prefill of one sample with the dataset's mean prompt length). Results go to a JSON file
that later runs resume from (settings already in it are skipped), a markdown table, and optionally a plot of
accuracy against visual tokens. None of them is ever written over a file this command did not write: an existing
`--json` must be its results (marked `"tool": "llava-ivtp eval"`, or with their keys), an existing `--markdown` or
`--plot` its table or plot (`cli.prepare_output`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_llava_ivtp.configuration_llava_ivtp import GUIDANCE_MODES


PACKAGE = Path(__file__).resolve().parent
METRICS = {"exact_match": PACKAGE / "metric_exact_match.py", "vqa_accuracy": PACKAGE / "metric_vqa_accuracy.py"}
COMMAND = "eval"
# What a results file names the run by: a file with other values holds another run's results.
IDENTITY_KEYS = ("model", "dataset", "questions")
# How `markdown` begins: an existing `--markdown` file that begins so is this command's own table.
MARKDOWN_START = re.compile(r"Model `.*`, .*, \d+ questions\.\n\n\| setting \| visual tokens \|")


class EvalError(ValueError):
    """A bad argument; the message names it."""


def is_results_file(value: dict) -> bool:
    """Whether a JSON object is a results file of this command (what `--json` resumes from): its `settings` (an
    object) and the keys naming the run. Files written before the `"tool": "llava-ivtp eval"` mark have them too."""
    return isinstance(value.get("settings"), dict) and all(key in value for key in IDENTITY_KEYS)


def is_markdown_table(text: str) -> bool:
    """Whether a text is a table `markdown` wrote (`--markdown` replaces only those)."""
    return MARKDOWN_START.match(text) is not None


@dataclass
class Setting:
    name: str
    fields: dict  # IvtpConfig fields to set for this setting

    def config_of(self, base) -> object:
        """A copy of the config `base` with this setting's fields."""
        return self.apply_to(copy.deepcopy(base))

    def apply_to(self, config) -> object:
        """Set this setting's fields on `config` itself and check them together (`check_ivtp`); on an error the
        config is left as it was."""
        before = {key: copy.deepcopy(getattr(config, key)) for key in (*self.fields, "schedule")}
        try:
            for key, value in self.fields.items():
                setattr(config, key, copy.deepcopy(value))
            config.check_ivtp()
        except BaseException:
            _restore(config, before)
            raise
        return config

    @contextlib.contextmanager
    def applied(self, model):
        """`model` runs with this setting inside the block; its config's fields are back afterwards. The fields are
        set on the model's own config object, which its submodules hold too (a copy in its place would leave them
        on the attention backend of the model's own setting: a model saved without pruning would then refuse to
        prune)."""
        config = model.config
        before = {key: copy.deepcopy(getattr(config, key)) for key in (*self.fields, "schedule")}
        self.apply_to(config)
        try:
            yield config
        finally:
            _restore(config, before)


def _restore(config, values: dict) -> None:
    """Put back fields that held together before (single-field checks only, no derivation in between)."""
    for key, value in values.items():
        setattr(config, key, value)


def parse_setting(spec: str, base) -> Setting:
    """A setting from its name (see the module docstring), checked against the model's config `base`."""
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS
    from modeling_llava_ivtp.pruner_base import budget_schedule

    if spec == "full":
        return Setting(spec, {"pruning_method": None})
    if spec.startswith("preset:"):
        path = Path(spec[len("preset:"):])
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EvalError(f"--settings {spec}: cannot read an IvtpConfig JSON ({error}).") from None
        fields = {key: raw[key] for key in ("schedule", "group_size", "tau", "guidance") if key in raw}
        if not isinstance(raw, dict) or "schedule" not in fields:
            raise EvalError(f"--settings {spec}: needs a JSON object with a `schedule`.")
        return Setting(spec, {"pruning_method": "ivtp", "pruning_options": None, **fields})
    kind, _, rest = spec.partition("@")
    budget, _, mode = rest.partition(":")
    if kind not in ("stage1", *PRUNING_METHODS) or not budget.isdigit():
        raise EvalError(
            f"--settings {spec!r}: expected full, ivtp@K, ivtp@K:MODE, stage1@K, METHOD@K (METHOD one of "
            f"{list(PRUNING_METHODS)}) or preset:PATH (K a token count)."
        )
    kept, patches = int(budget), base.max_visual_tokens
    if not 1 <= kept <= patches:
        raise EvalError(f"--settings {spec}: K must be in [1, {patches}] (the visual tokens of an image), got {kept}.")
    if kind == "stage1":
        if mode:
            raise EvalError(f"--settings {spec}: stage1@K takes no guidance mode (stage 2 is off).")
        return Setting(spec, {"pruning_method": "ivtp", "pruning_options": None,
                              "schedule": budget_schedule(base, kept, llm=False)})
    options = {}
    if "=" in mode:  # METHOD@K:NAME=VALUE,...: the method's own options
        if kind == "ivtp":
            raise EvalError(f"--settings {spec}: options after ':' are for the other methods; ivtp@K takes a "
                            "guidance mode there (or use preset:PATH).")
        for pair in mode.split(","):  # values without ',' (no JSON lists or objects)
            name, equals, value = pair.partition("=")
            if not equals or not name or name == "visual_tokens":
                raise EvalError(f"--settings {spec}: expected {kind}@K:NAME=VALUE[,NAME=VALUE] (the budget is K; a "
                                f"value holds no ','), got {pair!r}.")
            if name in options:
                raise EvalError(f"--settings {spec}: option {name!r} is given twice.")
            try:
                options[name] = json.loads(value)
            except json.JSONDecodeError:
                options[name] = value
        mode = ""
    if mode and kind != "ivtp":
        raise EvalError(f"--settings {spec}: {kind}@K takes no guidance mode (options: {kind}@K:NAME=VALUE).")
    if mode and mode not in GUIDANCE_MODES:
        raise EvalError(f"--settings {spec}: guidance {mode!r} is not one of {list(GUIDANCE_MODES)}.")
    # The budget as a config states it (IVTP derives its schedule from it: `pruner_base.budget_schedule`).
    fields = {"schedule": None, "pruning_method": kind, "pruning_options": {"visual_tokens": kept, **options}}
    setting = Setting(spec, {**fields, **({"guidance": mode} if mode else {})})
    try:
        setting.config_of(base)
    except ValueError as error:
        raise EvalError(f"--settings {spec}: {error}") from None
    return setting


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def load_records(dataset: str, limit: int | None) -> tuple[list[dict], str]:
    """`(records, description)`: each record `{"image": PIL image, "question": str, "answers": [str], ...}`."""
    from PIL import Image

    if dataset.startswith("testbed"):
        from llava_ivtp.testbed import scenes

        name, _, rest = dataset.partition(":")
        split, _, start = rest.partition(":")
        split = split or "test"
        tasks = {"testbed": scenes.V2, "testbed-next": scenes.NEXT}  # v2's scenes; the LLaVA-NeXT testbed's
        if name not in tasks or split not in scenes.SPLITS or not (start == "" or start.isdigit()):
            raise EvalError(f"--dataset {dataset}: expected testbed[:SPLIT[:START]] (or testbed-next[:SPLIT[:START]], "
                            f"the high-resolution scenes) with SPLIT one of {list(scenes.SPLITS)} and START an index "
                            ">= 0 (the first question).")
        first, count = int(start or 0), limit if limit is not None else 1000
        records = [scenes.example(split, index, task=tasks[name]).record() for index in range(first, first + count)]
        return records, f"{name} {split} {first}..{first + count - 1}"
    path = Path(dataset)
    if not path.exists():
        raise EvalError(f"--dataset {dataset}: neither `testbed[:split]` nor an existing file or folder.")
    if path.is_dir() or path.suffix == ".parquet":
        import datasets

        try:
            rows = list(datasets.load_from_disk(str(path)) if path.is_dir()
                        else datasets.Dataset.from_parquet(str(path)))
        except (OSError, ValueError) as error:  # not a `datasets` folder / not parquet (pyarrow's errors are both)
            kind = "a `datasets` folder" if path.is_dir() else "a parquet file"
            raise EvalError(f"--dataset {dataset}: not {kind} ({type(error).__name__}: {error}).") from None
        root = path if path.is_dir() else path.parent
    else:
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EvalError(f"--dataset {dataset}: not JSON lines ({error}).") from None
        root = path.parent
    records = []
    for number, row in enumerate(rows[:limit] if limit is not None else rows):
        if not isinstance(row, dict):
            raise EvalError(f"--dataset {dataset}: row {number} is a JSON {type(row).__name__}, not an object with "
                            "image, question and answers.")
        missing = [key for key in ("image", "question") if key not in row]
        answers = row.get("answers", [row["answer"]] if "answer" in row else None)
        if missing or not answers:
            raise EvalError(f"--dataset {dataset}: row {number} lacks {missing or ['answers']}.")
        image = row["image"]
        if isinstance(image, str):
            try:
                image = Image.open(root / image).convert("RGB")
            except OSError as error:  # no such file, or not an image PIL reads
                message = f"--dataset {dataset}: row {number}'s image {image}: cannot read it ({error})."
                raise EvalError(message) from None
        records.append({**row, "image": image, "answers": [str(answer) for answer in answers]})
    return records, str(path)


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------
def prompt_of(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


@torch.no_grad()
def run_setting(model, processor, records: list[dict], setting: Setting, batch_size: int, max_new_tokens: int,
                progress=None) -> dict:
    per_layer, unpruned = None, None
    with setting.applied(model) as config:
        predictions, prefill_seconds = [], []
        for begin in range(0, len(records), batch_size):
            batch = records[begin:begin + batch_size]
            inputs = processor(images=[r["image"] for r in batch], text=[prompt_of(r["question"]) for r in batch],
                               padding=True, return_tensors="pt").to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            start = time.perf_counter()
            prefill = model(**inputs, use_cache=True, logits_to_keep=1)
            prefill_seconds.append(time.perf_counter() - start)
            per_layer = per_layer or prefill.visual_tokens_per_layer
            if not per_layer:  # nothing pruned: every placeholder (LLaVA-NeXT: the batch's longest image)
                held = int((inputs["input_ids"] == config.image_token_id).sum(dim=1).max())
                unpruned = max(unpruned or 0, held)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
            predictions += [text.strip() for text in texts]
            if progress is not None:
                progress(len(batch))
        counts = visual_tokens(config, per_layer, unpruned)
    return {"predictions": predictions, "prefill_ms_per_batch": 1000 * statistics.median(prefill_seconds), **counts}


def visual_tokens(config, per_layer: tuple[int, ...] | None, unpruned: int | None = None) -> dict:
    """Visual tokens per image in the LLM's last layers and their mean over the LLM's layers, from what a forward's
    layers held (`visual_tokens_per_layer` of its output, the most any image of the batch held; `None`: nothing
    pruned, `unpruned` (the placeholders of an image; `num_patches` by default) in every layer)."""
    if not per_layer:
        per_layer = (unpruned or config.num_patches,) * config.text_config.num_hidden_layers
    return {"visual_tokens": per_layer[-1], "mean_visual_tokens_per_llm_layer": sum(per_layer) / len(per_layer)}


def setting_tflops(config, text_tokens: int, image_size: tuple[int, int] | None = None) -> float:
    """Prefill TFLOPs of one sample (`measuring.flops.measure`); LLaVA-NeXT: one image of `image_size` `(height,
    width)` (its crops and packed tokens follow the size)."""
    from llava_ivtp.measuring.flops import DEFAULT_NEXT_IMAGE_SIZE, DEFAULT_PREFIX_TOKENS, measure
    from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig, IvtpNextConfig

    # A checkpoint loaded as remote code has its own copy of the config class: count with this package's.
    config_class = IvtpNextConfig if config.model_type == IvtpNextConfig.model_type else IvtpConfig
    config = config_class.from_dict(config.to_dict())
    return measure(config, text_tokens, prefix_tokens=DEFAULT_PREFIX_TOKENS,
                   image_size=image_size or DEFAULT_NEXT_IMAGE_SIZE).total / 1e12


@functools.lru_cache(maxsize=None)
def metric(name: str):
    """The repository's `evaluate` module `name`, loaded by path once per process."""
    import evaluate

    return evaluate.load(str(METRICS[name]))


def score(predictions: list[str], records: list[dict]) -> dict:
    references = [record["answers"] for record in records]
    result = {}
    for name in METRICS:
        result.update(metric(name).compute(predictions=predictions, references=references))
    kinds = sorted({record.get("kind") for record in records if record.get("kind")})
    for kind in kinds:  # the same exact-match rule, per question kind
        chosen = [i for i, record in enumerate(records) if record.get("kind") == kind]
        subset = metric("exact_match").compute(
            predictions=[predictions[i] for i in chosen], references=[references[i] for i in chosen]
        )
        result[f"exact_match_{kind}"] = subset["exact_match"]
        result[f"questions_{kind}"] = len(chosen)
    n = len(predictions)
    accuracy = result["exact_match"]
    result["exact_match_stderr"] = (accuracy * (1 - accuracy) / n) ** 0.5 if n else float("nan")  # binomial
    result["questions"] = n
    return result


def evaluate_grid(model, processor, records, settings: list[Setting], results: dict, batch_size: int,
                  max_new_tokens: int, log=print, save=None, progress: bool = False) -> dict:
    """Run every setting not in `results["settings"]` yet; `save(results)` after each one (resumable); a progress
    bar per setting on stderr when `progress`."""
    from tqdm.auto import tqdm

    text_tokens = round(statistics.mean(len(processor.tokenizer(prompt_of(r["question"]))["input_ids"]) for r in records)) + 1
    results.setdefault("settings", {})
    for setting in settings:
        if setting.name in results["settings"]:
            log(f"{setting.name}: already in the results, skipped")
            continue
        with tqdm(total=len(records), desc=setting.name, unit="question", disable=not progress) as bar:
            measured = run_setting(model, processor, records, setting, batch_size, max_new_tokens, progress=bar.update)
        entry = {**score(measured.pop("predictions"), records), **measured}
        width, height = records[0]["image"].size  # LLaVA-NeXT: the first image's size decides its crops
        entry["tflops"] = setting_tflops(setting.config_of(model.config), text_tokens, (height, width))
        entry["fields"] = setting.fields
        results["settings"][setting.name] = entry
        log(f"{setting.name}: exact match {entry['exact_match']:.3f} ± {entry['exact_match_stderr']:.3f}, "
            f"{entry['visual_tokens']} visual tokens, {entry['tflops']:.4f} TFLOPs")
        if save is not None:
            save(results)
    return results


def pooled(ranges: list[dict]) -> dict:
    """The results of disjoint question ranges (each `llava-ivtp eval`'s JSON) as one: per setting measured in every
    range, exact match over all their questions (overall and per kind), its binomial s.e., and the rest of the first
    range's entry (tokens, TFLOPs). Ranges of different models are refused."""
    models = {results["model"] for results in ranges}
    if len(models) != 1:
        raise EvalError(f"the ranges hold results of different models {sorted(models)}; pool one model's ranges.")
    names = [name for name in ranges[0]["settings"] if all(name in results["settings"] for results in ranges)]
    settings = {}
    for name in names:
        entries = [results["settings"][name] for results in ranges]
        total = sum(entry["questions"] for entry in entries)
        entry = dict(entries[0])
        entry["exact_match"] = sum(e["exact_match"] * e["questions"] for e in entries) / total
        entry["exact_match_stderr"] = (entry["exact_match"] * (1 - entry["exact_match"]) / total) ** 0.5
        entry["questions"] = total
        for key in [key for key in entries[0] if key.startswith("exact_match_") and key != "exact_match_stderr"]:
            kind = key.removeprefix("exact_match_")
            counts = [e.get(f"questions_{kind}") for e in entries]
            if None in counts:
                raise EvalError(f"setting {name}: a range has no question count for kind {kind!r} (measured before "
                                "the counts were recorded); re-run it.")
            entry[key] = sum(e[key] * n for e, n in zip(entries, counts)) / sum(counts)
            entry[f"questions_{kind}"] = sum(counts)
        settings[name] = entry
    return {"model": ranges[0]["model"], "dataset": " + ".join(results["dataset"] for results in ranges),
            "questions": sum(results["questions"] for results in ranges), "settings": settings}


def markdown(results: dict) -> str:
    lines = [
        f"Model `{results['model']}`, {results['dataset']}, {results['questions']} questions.",
        "",
        "| setting | visual tokens | mean visual tokens / LLM layer | exact match | ± (binomial s.e.) | VQA acc. | TFLOPs | prefill ms / batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["settings"].items():
        lines.append(
            f"| {name} | {entry['visual_tokens']} | {entry['mean_visual_tokens_per_llm_layer']:.1f} | "
            f"{entry['exact_match']:.3f} | {entry['exact_match_stderr']:.3f} | {entry['vqa_accuracy']:.3f} | "
            f"{entry['tflops']:.4f} | {entry['prefill_ms_per_batch']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def draw_plot(results: dict, path: Path) -> None:
    import matplotlib

    from llava_ivtp.cli import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list] = {}
    for name, entry in results["settings"].items():
        family = name.split("@")[0] + (":" + name.split(":")[1] if name.count(":") and "@" in name else "")
        groups.setdefault(family, []).append(entry)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for index, (family, entries) in enumerate(groups.items()):
        entries.sort(key=lambda e: e["visual_tokens"])
        # A colour and a marker of its own for each family (up to 20 x 12 tell apart).
        style = dict(color=colors[index % len(colors)], marker=markers[index % len(markers)],
                     linestyle="-" if len(entries) > 1 else "none", label=family, capsize=3,
                     linewidth=2.5 if family.startswith("ivtp") else 1.5)
        by_tokens.errorbar([e["visual_tokens"] for e in entries], [e["exact_match"] for e in entries],
                           yerr=[e["exact_match_stderr"] for e in entries], **style)
        by_flops.errorbar([e["tflops"] for e in entries], [e["exact_match"] for e in entries],
                          yerr=[e["exact_match_stderr"] for e in entries], **style)
    by_tokens.set_xscale("log", base=2)
    by_tokens.set_xlabel("visual tokens in the LLM's last layers")
    by_flops.set_xlabel("TFLOPs (prefill, one sample)")
    by_flops.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    for axis in (by_tokens, by_flops):
        axis.set_ylabel("exact match")
        axis.grid(alpha=0.3)
    by_flops.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    figure.tight_layout()
    save_figure(figure, path, COMMAND, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (loaded with trust_remote_code)")
    parser.add_argument("--dataset", default="testbed:test",
                        help="testbed[:SPLIT[:START]] (SPLIT train, validation, test or sparse; questions START.. "
                        "START+limit-1, default 0), testbed-next[:SPLIT[:START]] (the LLaVA-NeXT testbed's "
                        "high-resolution scenes), or a JSON lines / parquet file or `datasets` folder")
    parser.add_argument("--limit", type=int, default=None, help="questions (testbed default 1000)")
    parser.add_argument("--settings", nargs="+", default=["full", "ivtp@64", "ivtp@32", "ivtp@16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True,
                        help="results: a new path, or a results file of an earlier run (its settings are skipped)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="the table: a new path, or a table this command wrote (replaced)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="accuracy plot (.png, .pdf or .svg): a new path, or a plot this command wrote (replaced)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from llava_ivtp.cli import (
        TOOL_KEY, distinct_outputs, load_ivtp_checkpoint, prepare_output, report_error, resolve_checkpoint, tool_name,
    )

    try:
        if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
            raise EvalError("--batch-size, --max-new-tokens and --limit must be >= 1.")
        # Every path first, then the dataset, then the model: a bad argument costs no loading.
        distinct_outputs(EvalError, [("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)])
        prepare_output("--json", args.json, EvalError, command=COMMAND, kind="json", recognise=is_results_file)
        if args.markdown is not None:
            prepare_output("--markdown", args.markdown, EvalError, command=COMMAND, kind="text",
                           recognise=is_markdown_table)
        if args.plot is not None:
            prepare_output("--plot", args.plot, EvalError, command=COMMAND, kind="figure")
        resolve_checkpoint("--model", args.model, EvalError)
        results = json.loads(args.json.read_text()) if args.json.is_file() else {}  # checked: a results file
        records, description = load_records(args.dataset, args.limit)
        identity = {"model": str(args.model), "dataset": description, "questions": len(records)}
        stale = {key: results[key] for key in identity if key in results and results[key] != identity[key]}
        if stale:
            raise EvalError(f"--json {args.json}: holds results of another run {stale}; give another file.")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, processor = load_ivtp_checkpoint("--model", args.model, EvalError)
        settings = [parse_setting(spec, model.config) for spec in args.settings]
        results = {TOOL_KEY: tool_name(COMMAND), **results, **identity}
    except EvalError as error:
        return report_error(COMMAND, error)

    def save(current):
        args.json.write_text(json.dumps(current, indent=2))

    evaluate_grid(model, processor, records, settings, results, args.batch_size, args.max_new_tokens,
                  log=lambda line: print(line, flush=True), save=save, progress=not args.no_progress)
    save(results)
    table = markdown(results)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    if args.plot is not None:
        draw_plot(results, args.plot)
    return 0


__all__ = ["pooled", "Setting", "add_arguments", "evaluate_grid", "load_records", "markdown", "parse_setting", "run", "score"]
