"""`llava-ivtp eval`: accuracy, TFLOPs and prefill time of one model under a grid of pruning settings.

A model (folder or hub id) x a dataset (the testbed by name, or local JSON lines / parquet / a `datasets` folder
with `image`, `question` and `answers`) x settings:

- `full`: no pruning (`schedule = None`, stock Llava);
- `ivtp@K`: the model's schedule scaled to `K` visual tokens in the LLM's last layers (each count keeps its share of
  the log-reduction, as `llava-ivtp bench --kept` does), with the model's guidance; `ivtp@K:MODE` with guidance
  `MODE` (`clip_relevance`, `instruction_mean`, `embedding_relevance`, `visual_cls`);
- `stage1@K`: stage 1 only, the vision counts decaying geometrically to `K` (the presets' TopK rule);
- `preset:PATH`: IvtpConfig fields (schedule, group_size, tau, guidance) from a JSON file;
- `random@K`: the baseline of no selection at all: stock Llava (no pruning schedule) whose LLM sees `K` of each
  image's visual tokens chosen uniformly at random (seeded per batch), at their original positions, decoded greedily
  without a cache (`random_keep_generate`). Its TFLOPs are the full setting's minus the LLM work of the dropped
  tokens (`analytic_flops.llm_layer_flops`).

Answers are generated greedily in left-padded batches and scored with the repository's own `evaluate` metric modules
(exact match; VQA accuracy with the VQA answer normalisation), loaded by path. TFLOPs come from the project's counter
(`flops_ivtp.measure`, the prefill of one sample with the dataset's mean prompt length). Results go to a JSON file
that later runs resume from (settings already in it are skipped), a markdown table, and optionally a plot of
accuracy against visual tokens. Not needed by remote code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .configuration_llava_ivtp import GUIDANCE_MODES


PACKAGE = Path(__file__).resolve().parent
METRICS = {"exact_match": PACKAGE / "metric_exact_match.py", "vqa_accuracy": PACKAGE / "metric_vqa_accuracy.py"}


class EvalError(ValueError):
    """A bad argument; the message names it."""


@dataclass
class Setting:
    name: str
    fields: dict  # IvtpConfig fields to set for this setting
    random_keep: int | None = None  # `random@K`: K random visual tokens reach a stock forward

    def config_of(self, base) -> object:
        config = copy.deepcopy(base)
        for key, value in self.fields.items():
            setattr(config, key, value)
        config.check_ivtp()
        return config

    @contextlib.contextmanager
    def applied(self, model):
        """`model` runs with this setting's config inside the block; its own config is back afterwards."""
        base = model.config
        model.config = self.config_of(base)
        try:
            yield model.config
        finally:
            model.config = base


def parse_setting(spec: str, base) -> Setting:
    """A setting from its name (see the module docstring), checked against the model's config `base`."""
    from .bench_ivtp import BenchError, derive_schedule
    from .flops_ivtp import geometric_vision_schedule

    if spec == "full":
        return Setting(spec, {"schedule": None})
    if spec.startswith("preset:"):
        path = Path(spec[len("preset:"):])
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EvalError(f"--settings {spec}: cannot read an IvtpConfig JSON ({error}).") from None
        fields = {key: raw[key] for key in ("schedule", "group_size", "tau", "guidance") if key in raw}
        if not isinstance(raw, dict) or "schedule" not in fields:
            raise EvalError(f"--settings {spec}: needs a JSON object with a `schedule`.")
        return Setting(spec, fields)
    kind, _, rest = spec.partition("@")
    budget, _, mode = rest.partition(":")
    if kind not in ("ivtp", "stage1", "random") or not budget.isdigit():
        raise EvalError(
            f"--settings {spec!r}: expected full, ivtp@K, ivtp@K:MODE, stage1@K, random@K or preset:PATH "
            "(K a token count)."
        )
    kept, patches = int(budget), base.num_patches
    if not 1 <= kept <= patches:
        raise EvalError(f"--settings {spec}: K must be in [1, {patches}] (the patches per image), got {kept}.")
    if kind == "random":
        if mode:
            raise EvalError(f"--settings {spec}: random@K takes no guidance mode.")
        return Setting(spec, {"schedule": None}, random_keep=kept)
    if base.schedule is None:
        raise EvalError(f"--settings {spec}: the model has no pruning schedule to scale; use preset:PATH.")
    if kind == "stage1":
        if mode:
            raise EvalError(f"--settings {spec}: stage1@K takes no guidance mode (stage 2 is off).")
        return Setting(spec, {"schedule": {"vision": geometric_vision_schedule(base, kept), "llm": []}})
    if mode and mode not in GUIDANCE_MODES:
        raise EvalError(f"--settings {spec}: guidance {mode!r} is not one of {list(GUIDANCE_MODES)}.")
    try:
        schedule = derive_schedule(base.schedule, patches, kept)
    except BenchError as error:
        raise EvalError(f"--settings {spec}: {error}") from None
    return Setting(spec, {"schedule": schedule, **({"guidance": mode} if mode else {})})


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def load_records(dataset: str, limit: int | None) -> tuple[list[dict], str]:
    """`(records, description)`: each record `{"image": PIL image, "question": str, "answers": [str], ...}`."""
    from PIL import Image

    if dataset.startswith("testbed"):
        from . import testbed

        _, _, split = dataset.partition(":")
        split = split or "test"
        if split not in testbed.SPLITS:
            raise EvalError(f"--dataset {dataset}: the testbed's splits are {list(testbed.SPLITS)}.")
        count = limit if limit is not None else 1000
        return [testbed.example(split, index).record() for index in range(count)], f"testbed {split} 0..{count - 1}"
    path = Path(dataset)
    if not path.exists():
        raise EvalError(f"--dataset {dataset}: neither `testbed[:split]` nor an existing file or folder.")
    if path.is_dir():
        import datasets

        rows = list(datasets.load_from_disk(str(path)))
        root = path
    elif path.suffix == ".parquet":
        import datasets

        rows = list(datasets.Dataset.from_parquet(str(path)))
        root = path.parent
    else:
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise EvalError(f"--dataset {dataset}: not JSON lines ({error}).") from None
        root = path.parent
    records = []
    for number, row in enumerate(rows[:limit] if limit is not None else rows):
        missing = [key for key in ("image", "question") if key not in row]
        answers = row.get("answers", [row["answer"]] if "answer" in row else None)
        if missing or not answers:
            raise EvalError(f"--dataset {dataset}: row {number} lacks {missing or ['answers']}.")
        image = row["image"]
        if isinstance(image, str):
            image = Image.open(root / image).convert("RGB")
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
    with setting.applied(model) as config:
        predictions, prefill_seconds = [], []
        for begin in range(0, len(records), batch_size):
            batch = records[begin:begin + batch_size]
            inputs = processor(images=[r["image"] for r in batch], text=[prompt_of(r["question"]) for r in batch],
                               padding=True, return_tensors="pt").to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            if setting.random_keep is not None:
                generator = torch.Generator().manual_seed(begin)
                new_tokens, seconds = random_keep_generate(model, inputs, setting.random_keep, max_new_tokens, generator)
                prefill_seconds.append(seconds)
            else:
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                prefill_seconds.append(time.perf_counter() - start)
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
            predictions += [text.strip() for text in texts]
            if progress is not None:
                progress(len(batch))
    if setting.random_keep is None:
        counts = visual_tokens(config)
    else:
        counts = {"visual_tokens": setting.random_keep, "mean_visual_tokens_per_llm_layer": float(setting.random_keep)}
    return {"predictions": predictions, "prefill_ms_per_batch": 1000 * statistics.median(prefill_seconds), **counts}


@torch.no_grad()
def random_keep_generate(model, inputs, keep: int, max_new_tokens: int, generator: torch.Generator):
    """`(new token ids (batch, steps), prefill seconds)` of stock Llava whose LLM sees `keep` random visual tokens of
    each image at their original positions (left padding respected), greedy, recomputing the whole sequence at each
    step (no cache). Built from the model's own submodules: vision tower, projector, decoder, LM head."""
    config = model.config
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == config.image_token_id
    per_sample = image.sum(dim=1)
    if per_sample.ne(config.num_patches).any():
        raise EvalError(f"random@{keep}: needs exactly one image of {config.num_patches} placeholders per sample, got "
                        f"{per_sample.tolist()}.")
    start = time.perf_counter()
    tower = model.model.vision_tower
    hidden = tower(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states[config.vision_feature_layer]
    features = model.model.multi_modal_projector(hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden)
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    dropped = torch.zeros_like(image)
    for row in range(ids.shape[0]):  # keep `keep` of the row's placeholders, uniformly at random
        slots = image[row].nonzero().squeeze(1)
        dropped[row, slots[torch.randperm(slots.numel(), generator=generator)[keep:].to(slots.device)]] = True
    survive = ~dropped
    length = int(survive[0].sum())
    embeds = embeds[survive].view(ids.shape[0], length, -1)
    positions, mask = positions[survive].view(ids.shape[0], length), mask[survive].view(ids.shape[0], length)
    steps, seconds = [], 0.0
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        hidden_states = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        token = model.lm_head(hidden_states[:, -1]).argmax(dim=-1)
        if step == 0:
            seconds = time.perf_counter() - start
        token = torch.where(finished, torch.full_like(token, config.text_config.pad_token_id or 0), token)
        steps.append(token)
        finished |= token == model.generation_config.eos_token_id
        if bool(finished.all()):
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(steps, dim=1), seconds


def visual_tokens(config) -> dict:
    """Visual tokens in the LLM's last layers and their mean over the LLM's layers."""
    layers = config.text_config.num_hidden_layers
    if config.schedule is None:
        return {"visual_tokens": config.num_patches, "mean_visual_tokens_per_llm_layer": float(config.num_patches)}
    entering = config.schedule["vision"][-1] if config.schedule["vision"] else config.num_patches
    per_layer = []
    for index, count in enumerate(config.schedule["llm"]):
        before = entering if index == 0 else config.schedule["llm"][index - 1]
        per_layer += [before] * config.group_size
        del count
    final = config.schedule["llm"][-1] if config.schedule["llm"] else entering
    per_layer += [final] * (layers - len(per_layer))
    return {"visual_tokens": final, "mean_visual_tokens_per_llm_layer": sum(per_layer) / layers}


def setting_tflops(config, text_tokens: int, random_keep: int | None = None) -> float:
    """Prefill TFLOPs of one sample (`flops_ivtp.measure`); for `random@K` the full forward's minus, in every LLM
    layer, the work of the visual tokens it does not see."""
    from .analytic_flops import _head_dim, llm_layer_flops
    from .configuration_llava_ivtp import IvtpConfig
    from .flops_ivtp import DEFAULT_PREFIX_TOKENS, measure

    # A checkpoint loaded as remote code has its own copy of the config class: count with this package's.
    config = IvtpConfig.from_dict(config.to_dict())
    total = measure(config, text_tokens, prefix_tokens=DEFAULT_PREFIX_TOKENS).total
    if random_keep is not None:
        text = config.text_config
        full = config.num_patches + text_tokens + DEFAULT_PREFIX_TOKENS
        sizes = (text.hidden_size, text.intermediate_size, text.num_key_value_heads * _head_dim(text))
        saved = llm_layer_flops(full, *sizes) - llm_layer_flops(full - config.num_patches + random_keep, *sizes)
        total -= text.num_hidden_layers * saved
    return total / 1e12


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
        entry["tflops"] = setting_tflops(setting.config_of(model.config), text_tokens, setting.random_keep)
        entry["fields"] = setting.fields
        results["settings"][setting.name] = entry
        log(f"{setting.name}: exact match {entry['exact_match']:.3f} ± {entry['exact_match_stderr']:.3f}, "
            f"{entry['visual_tokens']} visual tokens, {entry['tflops']:.4f} TFLOPs")
        if save is not None:
            save(results)
    return results


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

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list] = {}
    for name, entry in results["settings"].items():
        family = name.split("@")[0] + (":" + name.split(":")[1] if name.count(":") and "@" in name else "")
        groups.setdefault(family, []).append(entry)
    for family, entries in groups.items():
        entries.sort(key=lambda e: e["visual_tokens"])
        style = "o-" if len(entries) > 1 else "s"
        by_tokens.errorbar([e["visual_tokens"] for e in entries], [e["exact_match"] for e in entries],
                           yerr=[e["exact_match_stderr"] for e in entries], fmt=style, label=family, capsize=3)
        by_flops.errorbar([e["tflops"] for e in entries], [e["exact_match"] for e in entries],
                          yerr=[e["exact_match_stderr"] for e in entries], fmt=style, label=family, capsize=3)
    by_tokens.set_xscale("log", base=2)
    by_tokens.set_xlabel("visual tokens in the LLM's last layers")
    by_flops.set_xlabel("TFLOPs (prefill, one sample)")
    for axis in (by_tokens, by_flops):
        axis.set_ylabel("exact match")
        axis.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (loaded with trust_remote_code)")
    parser.add_argument("--dataset", default="testbed:test",
                        help="testbed[:train|validation|test], or a JSON lines / parquet file or `datasets` folder")
    parser.add_argument("--limit", type=int, default=None, help="questions (testbed default 1000)")
    parser.add_argument("--settings", nargs="+", default=["full", "ivtp@64", "ivtp@32", "ivtp@16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True, help="results; settings already in it are skipped")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
            raise EvalError("--batch-size, --max-new-tokens and --limit must be >= 1.")
        from .cli import prepare_output

        for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
            if path is not None:
                prepare_output(flag, path, EvalError)
        results = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        settings = [parse_setting(spec, model.config) for spec in args.settings]
        records, description = load_records(args.dataset, args.limit)
        identity = {"model": str(args.model), "dataset": description, "questions": len(records)}
        stale = {key: results[key] for key in identity if key in results and results[key] != identity[key]}
        if stale:
            raise EvalError(f"--json {args.json}: holds results of another run {stale}; give another file.")
        results.update(identity)
    except EvalError as error:
        print(f"llava-ivtp eval: error: {error}", file=sys.stderr)
        return 2

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


__all__ = ["Setting", "add_arguments", "evaluate_grid", "load_records", "markdown", "parse_setting", "run", "score"]
