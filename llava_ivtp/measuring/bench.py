"""`llava-ivtp bench`: wall-clock and memory of stock Llava and IVTP, side by side, same weights, same prompts.

Three variants run in one process on the same random weights and the same prompts:

- `stock_sdpa`: `transformers.LlavaForConditionalGeneration`, sdpa attention;
- `ivtp_sdpa`: `LlavaIvtpForConditionalGeneration`, sdpa attention (the stock layers' backend);
- `ivtp_eager`: the same IVTP model with eager attention.

The IVTP model is built first (LLaVA weights plus the frozen CLIP text tower and visual projection); the stock model
gets IVTP's LLaVA weights with `load_state_dict(strict=True)` (nothing of the shared part may be missing), the eager
model all of IVTP's weights.

Figures, per variant and batch size:

- prefill latency: one forward over the prompt with `use_cache=True` and logits for every token that reaches the
  LM head (the FLOPs convention of the paper's Table 9); median of `--repeats` after `--warmup` runs; the variants
  take turns run by run so that drift in machine load hits all of them alike; no profiler is active;
- decode tokens/s: greedy `generate` of `--new-tokens` tokens at a fixed length (EOS and the image token are
  suppressed), timed by a streamer from the first generated token to the last, so the prefill is not in it;
- peak memory: on CUDA `torch.cuda.max_memory_allocated` above what was allocated before the call; on CPU the rise
  of the process's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`, after `malloc_trim`) above the
  resident set before the call. Both are reported with the model's weight bytes;
- KV-cache bytes: the keys and values of the cache the prefill returned, summed over layers, with the analytic
  figure of `analytic_flops.kv_cache_bytes_per_layer` beside it;
- the pruning's own time as a share of prefill: separate prefills under `torch.profiler`, with the `ivtp/...`
  `record_function` labels of the model (vision scoring and rollout, CLIP guidance, LLM scoring, the token
  selections and per-segment masks) summed and divided by the profiled prefill (CPU: wall time of the ranges;
  CUDA: device time of the kernels inside them).

`--plot` sweeps the number of kept tokens (16-512, like the paper's Fig. 4) and draws analytic TFLOPs and measured
IVTP prefill latency against it. The schedule for a kept count is the one `pruning_options={"visual_tokens": K}`
derives (`kept_schedule`: the 7B preset's shape on the config's geometry).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


COMMAND = "bench"
# The keys of every report (`--json`); an existing report with them and no `"tool"` mark is one written before it.
REPORT_KEYS = ("meta", "flops", "results")
VARIANTS = ("stock_sdpa", "ivtp_sdpa", "ivtp_eager")
VARIANT_TITLES = {"stock_sdpa": "stock Llava (sdpa)", "ivtp_sdpa": "IVTP (sdpa)", "ivtp_eager": "IVTP (eager)"}
PLOT_KEPT_DEFAULT = (16, 32, 64, 128, 256, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt layout: LLaVA-1.5's system prompt and "USER:" before the image (about 35 tokens), "ASSISTANT:" at the end.
PREFIX_TOKENS = 35
ANSWER_PROMPT_TOKENS = 5
VISION_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TEXT_DIMS = VISION_DIMS + ("num_key_value_heads", "vocab_size")
# Width divisor of the reduced shape: 7B's depths, token geometry and schedule, every width / 8, head dims kept.
NARROW_DIVISOR = 8


class BenchError(ValueError):
    """A bad command line: the message names the flag."""


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _read_preset(size: str) -> dict:
    """The installed LLaVA-1.5 preset of `size` (the repository's configuration/, shipped as `llava_ivtp_presets`)."""
    from llava_ivtp_presets import preset_path

    return json.loads(preset_path(size).read_text())


def _clip_spec_vit_l14_336() -> dict:
    from modeling_llava_ivtp.guidance_ivtp import clip_text_encoder_spec

    return clip_text_encoder_spec("ViT-L-14-336")


def _narrow_7b() -> dict:
    """LLaVA-1.5-7B's depths (24 vision layers, 32 LLM layers), 576 patches of a 336 px image, the 7B preset's
    schedule (8 vision groups, 4 LLM groups of 3 layers, 64 tokens kept), every width divided by 8 with the head
    dimensions kept (vision 2 heads of 64, LLM 4 heads of 128), LLaMA's vocabulary; CLIP text tower (ViT-L-14-336's
    12 layers and 77 tokens) at width 96 and embedding 96."""
    config = _read_preset("7b")
    vision, text = config["vision_config"], config["text_config"]
    d = NARROW_DIVISOR
    vision.update(
        hidden_size=vision["hidden_size"] // d, intermediate_size=vision["intermediate_size"] // d,
        num_attention_heads=vision["num_attention_heads"] // d, projection_dim=vision["projection_dim"] // d,
    )
    text.update(
        hidden_size=text["hidden_size"] // d, intermediate_size=text["intermediate_size"] // d,
        num_attention_heads=text["num_attention_heads"] // d, num_key_value_heads=text["num_key_value_heads"] // d,
    )
    clip = _clip_spec_vit_l14_336()
    clip["embed_dim"] //= d
    clip["text_cfg"].update(width=clip["text_cfg"]["width"] // d, heads=2)
    config["clip_text_encoder"] = clip
    return config


NAMED_CONFIGS = {
    "7b": (
        "configuration/llava-1.5-7b-ivtp.json: LLaVA-1.5-7B, the paper's schedule", lambda: _read_preset("7b")
    ),
    "13b": ("configuration/llava-1.5-13b-ivtp.json: LLaVA-1.5-13B", lambda: _read_preset("13b")),
    "7b-narrow": ("LLaVA-1.5-7B depths, 576 patches, the 7B schedule, widths / 8 (CPU)", _narrow_7b),
}


def load_config_dict(spec: str) -> tuple[dict, str]:
    """`--config`: a named shape or the path of an IvtpConfig JSON. Returns the config dict and its description."""
    if spec in NAMED_CONFIGS:
        description, build = NAMED_CONFIGS[spec]
        return build(), description
    path = Path(spec)
    if path.is_file():
        try:
            config_dict = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BenchError(f"--config {spec}: not a JSON file ({error}).") from None
        except OSError as error:
            raise BenchError(f"--config {spec}: cannot be read ({error}).") from None
        if not isinstance(config_dict, dict):
            raise BenchError(
                f"--config {spec}: expected a JSON object of IvtpConfig fields, got a JSON {type(config_dict).__name__}."
            )
        return config_dict, str(path)
    raise BenchError(
        f"--config {spec!r} is neither a named shape ({', '.join(NAMED_CONFIGS)}) nor an existing IvtpConfig JSON file."
    )


def kept_schedule(config_dict: dict, kept: int) -> dict:
    """IVTP's schedule for `kept` visual tokens on the geometry of `config_dict`: the project's one budget rule
    (`modeling_llava_ivtp.pruner_base.budget_schedule`), so `--kept K` runs what `pruning_options={"visual_tokens":
    K}` runs. For the 7B preset's geometry, e.g., 16 -> vision [416, 304, 224, 160, 120, 88, 64, 48], LLM
    [32, 24, 16, 16]."""
    from modeling_llava_ivtp import IvtpConfig
    from modeling_llava_ivtp.pruner_base import budget_schedule

    return budget_schedule(IvtpConfig(**dict(copy.deepcopy(config_dict), schedule=None)), kept)


def stock_config_dict(config_dict: dict) -> dict:
    """The `LlavaConfig` fields of an IVTP config dict (IVTP's own fields and identity removed)."""
    from modeling_llava_ivtp.configuration_llava_ivtp import stock_llava_fields

    return stock_llava_fields(copy.deepcopy(config_dict))


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------
def build_models(config_dict: dict, device: torch.device, dtype: torch.dtype, seed: int, methods=()) -> dict:
    """IVTP (sdpa), stock Llava (sdpa) and IVTP (eager) holding the same weights, in eval mode on `device`; and one
    model per pruning method of `methods` (sdpa, the same weights), at the config's final visual tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        ivtp = LlavaIvtpForConditionalGeneration._from_config(
            IvtpConfig(**copy.deepcopy(config_dict)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
        stock = LlavaForConditionalGeneration._from_config(
            LlavaConfig(**stock_config_dict(config_dict)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    weights = ivtp.state_dict()
    shared = {key: value for key, value in weights.items() if not key.startswith("clip_")}
    result = stock.load_state_dict(shared, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"stock Llava and IVTP do not share their LLaVA weights: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    eager = build_ivtp_model(config_dict, weights, device, dtype, attn_implementation="eager")
    models = {"stock_sdpa": stock, "ivtp_sdpa": ivtp, "ivtp_eager": eager}
    for method in methods:
        models[f"method:{method}"] = build_ivtp_model(method_config_dict(config_dict, method), weights, device, dtype)
    return models


def method_config_dict(config_dict: dict, method: str) -> dict:
    """`config_dict` pruned by `method` at the budget its schedule ends with (the `--kept` count)."""
    schedule = config_dict["schedule"]
    kept = (schedule["llm"] or schedule["vision"])[-1]
    return dict(copy.deepcopy(config_dict), schedule=None, pruning_method=method,
                pruning_options={"visual_tokens": kept})


def variant_title(name: str) -> str:
    return VARIANT_TITLES.get(name, f"{name.removeprefix('method:')} (sdpa)")


def build_ivtp_model(config_dict: dict, weights: dict, device, dtype, attn_implementation: str = "sdpa"):
    from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration

    with torch.device(device):
        model = LlavaIvtpForConditionalGeneration._from_config(
            IvtpConfig(**copy.deepcopy(config_dict)), dtype=dtype, attn_implementation=attn_implementation
        ).eval()
    model.load_state_dict(weights, strict=True)
    return model


@dataclass
class PromptLayout:
    prefix: int  # text tokens between BOS and the image
    suffix: int  # text tokens after the image
    instruction: int  # of the suffix, the instruction (the rest is "ASSISTANT:")
    clip_tokens: int  # instruction tokens that get a CLIP token (CLIP reads context - 2 content tokens)


def prompt_layout(text_tokens: int, clip_context: int = 77) -> PromptLayout:
    prefix = min(PREFIX_TOKENS, (text_tokens - 1) // 4)
    suffix = text_tokens - 1 - prefix
    instruction = suffix - min(ANSWER_PROMPT_TOKENS, suffix - 1)
    return PromptLayout(prefix, suffix, instruction, min(instruction, clip_context - 2))


def build_inputs(config, batch_size: int, text_tokens: int, device, dtype, seed: int) -> tuple[dict, dict]:
    """Prompts of `text_tokens` text tokens (BOS included) around one image's placeholders, one image per sample, all
    of one length (no padding), random ids and pixels; and IVTP's guidance inputs as `LlavaIvtpProcessor` makes them:
    the instruction (the text after the image, "ASSISTANT:" excluded), its CLIP ids (start, content, end, padding)
    and each LLM token's CLIP span (one CLIP token per LLM token, none past CLIP's context, like long text).

    Returns `(common, guidance)`: `common` for both models, `guidance` for IVTP only.
    """
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    clip = config.clip_text_encoder
    layout = prompt_layout(text_tokens, clip["text_cfg"]["context_length"] if clip else 77)
    image_token = config.image_token_index
    high = min(text.vocab_size, image_token) if image_token >= 4 else text.vocab_size
    bos = text.bos_token_id if text.bos_token_id is not None else 1
    prefix = torch.randint(3, high, (batch_size, layout.prefix), generator=generator)
    suffix = torch.randint(3, high, (batch_size, layout.suffix), generator=generator)
    image = torch.full((batch_size, config.num_patches), image_token)
    input_ids = torch.cat([torch.full((batch_size, 1), bos), prefix, image, suffix], dim=1)
    image_size = config.vision_config.image_size
    channels = config.vision_config.num_channels
    pixel_values = torch.randn(batch_size, channels, image_size, image_size, generator=generator)
    common = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }
    guidance = {}
    if clip is not None:
        sequence = input_ids.shape[1]
        start = 1 + layout.prefix + config.num_patches
        instruction_mask = torch.zeros(batch_size, sequence, dtype=torch.bool)
        instruction_mask[:, start : start + layout.instruction] = True
        context, vocab = clip["text_cfg"]["context_length"], clip["text_cfg"]["vocab_size"]
        clip_ids = torch.zeros(batch_size, context, dtype=torch.long)
        clip_ids[:, 0] = vocab - 2  # start of text
        content = torch.randint(1, vocab - 2, (batch_size, layout.clip_tokens), generator=generator)
        clip_ids[:, 1 : 1 + layout.clip_tokens] = content
        clip_ids[:, 1 + layout.clip_tokens] = vocab - 1  # end of text (the largest id)
        spans = torch.zeros(batch_size, sequence, 2, dtype=torch.long)
        offsets = torch.arange(layout.clip_tokens)
        spans[:, start : start + layout.clip_tokens, 0] = 1 + offsets
        spans[:, start : start + layout.clip_tokens, 1] = 2 + offsets
        guidance = {
            "instruction_mask": instruction_mask.to(device),
            "clip_input_ids": clip_ids.to(device),
            "clip_token_spans": spans.to(device),
        }
    return common, guidance


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_bytes(model) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block above what was in use before it (see the module docstring for the method)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.note = ""

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated() - memory_allocated() before the call"
        return "process peak RSS (VmHWM, reset via /proc/self/clear_refs after malloc_trim) - RSS before the call"

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.before = _proc_status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as error:
            self.before = None
            self.note = f"peak RSS cannot be reset here ({error})"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.before is not None:
            peak = _proc_status_kib("VmHWM")
            self.peak_bytes = None if peak is None else max(0, peak - self.before) * 1024
        return False


class _StepTimes:
    """A `generate` streamer that records when each generated step arrives (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # `generate` sends the prompt first
            self.prompt_seen = True
            return
        _synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_bytes_per_layer(cache) -> list[int]:
    from modeling_llava_ivtp.cache_ivtp import cache_bytes

    return cache_bytes(cache)


LABEL_PREFIX = "ivtp/"


def pruning_times_from_profile(prof, device: torch.device) -> dict:
    """From a profiled prefill wrapped in `bench/prefill`: the total and each `ivtp/...` label's time, in ms.

    CPU: the labels' wall time (`cpu_time_total` of the ranges); CUDA: the device time of the kernels launched inside
    them, and beside it (`host_*`) the ranges' time on the host, which also holds launch gaps and waits for the
    device. Labels with one `/` are summed into the pruning total (they do not nest); deeper labels are a breakdown.
    """
    from torch.autograd import DeviceType

    def sums(time_of) -> tuple[float, dict]:
        total, labels = 0.0, {}
        for event in prof.events():
            if event.device_type != DeviceType.CPU:  # CUDA-side copies of user annotations
                continue
            if event.name == "bench/prefill":
                total += time_of(event) / 1000.0
            elif event.name.startswith(LABEL_PREFIX):
                labels[event.name] = labels.get(event.name, 0.0) + time_of(event) / 1000.0
        return total, dict(sorted(labels.items()))

    def own(labels: dict) -> float:
        return sum(value for name, value in labels.items() if name.count("/") == 1)

    if device.type != "cuda":
        total, labels = sums(lambda event: event.cpu_time_total)
        return {"profiled_prefill_ms": total, "pruning_ms": own(labels), "labels_ms": labels}
    total, labels = sums(lambda event: event.device_time_total)
    if total <= 0:
        raise BenchError(
            "the profiler recorded no CUDA kernel time in the prefill (CUPTI tracing unavailable here?): the pruning "
            "share cannot be measured."
        )
    host_total, host_labels = sums(lambda event: event.cpu_time_total)
    return {
        "profiled_prefill_ms": total, "pruning_ms": own(labels), "labels_ms": labels,
        "host_profiled_prefill_ms": host_total, "host_pruning_ms": own(host_labels), "host_labels_ms": host_labels,
    }


def top_ops(prof, device: torch.device, count: int) -> list[dict]:
    """The heaviest ops by self time (CUDA: the device time of the kernels each op launched). On CUDA the kernels
    are also listed as events of their own; only the host-side ops are kept, so no kernel is counted twice."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = [
        event
        for event in prof.key_averages()
        if not event.key.startswith(("ivtp/", "bench/")) and event.device_type == DeviceType.CPU
    ]
    total = sum(getattr(event, key) for event in averages) or 1.0
    averages.sort(key=lambda event: getattr(event, key), reverse=True)
    return [
        {
            "op": event.key,
            "self_ms": getattr(event, key) / 1000.0,
            "share": getattr(event, key) / total,
            "calls": event.count,
        }
        for event in averages[:count]
    ]


class Runner:
    """One variant's calls: prefill, generate; the inputs are fixed at construction."""

    def __init__(self, name: str, model, inputs: dict, guidance: dict, device: torch.device, new_tokens: int):
        self.name, self.model, self.device, self.new_tokens = name, model, device, new_tokens
        # Every pruned variant gets the processor's guidance inputs (IVTP's pseudo-CLS, CDPruner's relevance, the
        # last instruction token of FastV / PDrop); stock Llava takes none.
        self.inputs = dict(inputs, **(guidance if name != "stock_sdpa" else {}))

    def prefill(self):
        with torch.inference_mode():
            return self.model(**self.inputs, use_cache=True)

    def timed_prefill(self) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        output = self.prefill()
        _synchronize(self.device)
        elapsed = time.perf_counter() - start
        del output
        return elapsed

    def generate(self, new_tokens: int):
        config = self.model.config
        text = config.text_config
        eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
        suppress = sorted({config.image_token_index, *[token for token in eos if token is not None]})
        streamer = _StepTimes(self.device)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        with torch.inference_mode():
            sequences = self.model.generate(
                **self.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                suppress_tokens=suppress, pad_token_id=pad, streamer=streamer,
            )
        generated = sequences.shape[1] - self.inputs["input_ids"].shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"{self.name}: generate stopped after {generated} of {new_tokens} tokens.")
        return streamer.times


def decode_figures(step_times: list[float], batch_size: int) -> dict:
    steps = len(step_times) - 1
    seconds = step_times[-1] - step_times[0]
    return {
        "new_tokens": len(step_times),
        "timed_steps": steps,
        "ms_per_step": 1000.0 * seconds / steps,
        "tokens_per_s": batch_size * steps / seconds,
        "steps_per_s": steps / seconds,
    }


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "named shapes for --config: "
        + "; ".join(f"{name}: {description}" for name, (description, _) in NAMED_CONFIGS.items())
        + "\nexamples:\n  llava-ivtp bench --device cpu --config 7b-narrow --batch-sizes 1 8 --json cpu.json\n"
        "  llava-ivtp bench --device cuda --config 7b --dtype bfloat16 --batch-sizes 1 8 --json gpu.json"
    )
    parser.add_argument("--config", default=None, help="named shape or IvtpConfig JSON path (default: 7b on cuda, "
                        "7b-narrow on cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="B")
    parser.add_argument(
        "--text-tokens", type=int, default=512, help="text tokens per prompt, BOS included (default 512)"
    )
    parser.add_argument("--kept", type=int, default=None,
                        help="visual tokens kept at the end of the schedule (default: the config's, 64 for the "
                        "presets)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills per variant first")
    parser.add_argument("--profile-runs", type=int, default=1, help="profiled prefills per variant (pruning share)")
    parser.add_argument("--top-ops", type=int, default=0, metavar="K",
                        help="print the K ops with the most self time in each variant's profiled prefill")
    parser.add_argument("--no-clip-text", action="store_true",
                        help="no CLIP text tower: stage 2 guided by the visual CLS (default: a random-weight CLIP "
                        "text tower is added where the config has none, ViT-L-14-336's shape)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every figure as JSON: a new path, or a report this command wrote (replaced)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="sweep --plot-kept and draw TFLOPs and prefill latency against kept tokens (needs "
                        "matplotlib: pip install 'llava-ivtp[bench]'); .png, .pdf or .svg: a new path, or a plot this "
                        "command wrote (replaced)")
    parser.add_argument("--plot-kept", type=int, nargs="+", default=list(PLOT_KEPT_DEFAULT), metavar="K")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--methods", nargs="+", default=[], metavar="METHOD",
                        help="also measure these pruning methods (sdpa, same weights) at the budget --kept, one "
                        "variant each (`method:NAME`), or 'all'")


def _check_args(args, config_dict: dict) -> None:
    from modeling_llava_ivtp import IvtpConfig

    for flag, value, low in (
        ("--text-tokens", args.text_tokens, 4), ("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0), ("--profile-runs", args.profile_runs, 1), ("--top-ops", args.top_ops, 0),
    ):
        if value < low:
            raise BenchError(f"{flag} must be >= {low}, got {value}.")
    if any(size < 1 for size in args.batch_sizes):
        raise BenchError(f"--batch-sizes must be >= 1, got {args.batch_sizes}.")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available to torch here.")
    if (
        args.device == "cuda"
        and (args.dtype or "bfloat16") == "bfloat16"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise BenchError("--dtype bfloat16 (the default on CUDA): this GPU has no bfloat16 arithmetic; use float16.")
    if args.device == "cpu" and args.dtype == "float16":
        raise BenchError("--dtype float16 is not supported on --device cpu; use float32 or bfloat16.")
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = IvtpConfig(**copy.deepcopy(config_dict))
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise BenchError(f"--config: not a valid IvtpConfig: {error}") from None
    if config.schedule is None:
        raise BenchError("--config has no pruning schedule (schedule is null): nothing to compare with stock.")
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS

    if args.methods == ["all"]:
        args.methods = [method for method in PRUNING_METHODS if method != "ivtp"]
    unknown = [method for method in args.methods if method not in PRUNING_METHODS]
    if unknown or len(set(args.methods)) != len(args.methods):
        raise BenchError(f"--methods {args.methods}: each once, from {list(PRUNING_METHODS)} or 'all'.")
    num_patches = config.num_patches
    plot_kept = args.plot_kept if args.plot is not None else []
    for flag, values in (("--kept", [args.kept] if args.kept is not None else []), ("--plot-kept", plot_kept)):
        for value in values:
            if not 1 <= value <= num_patches:
                raise BenchError(f"{flag} must be in [1, {num_patches}] (the patches per image), got {value}.")
    length = args.text_tokens + num_patches + args.new_tokens
    if length > config.text_config.max_position_embeddings:
        raise BenchError(
            f"--text-tokens {args.text_tokens} + {num_patches} image tokens + --new-tokens {args.new_tokens} = "
            f"{length} "
            f"exceeds the LLM's max_position_embeddings ({config.text_config.max_position_embeddings})."
        )
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'llava-ivtp[bench]'.")
    if args.device == "cuda":
        check_device_memory(config, args.dtype or "bfloat16", torch.cuda.mem_get_info()[0])


def check_device_memory(config, dtype_name: str, free_bytes: int) -> None:
    """Three models' weights (IVTP sdpa, stock, IVTP eager; the `--plot` sweep's model replaces the eager one) must
    fit in the device's free memory with room for activations and caches, else stop before building them. (IVTP's
    size is counted three times: stock Llava lacks the CLIP text tower, a small overestimate.)"""
    from llava_ivtp.measuring.flops import build_weight_free

    parameters = sum(parameter.numel() for parameter in build_weight_free(config).parameters())
    weights = len(VARIANTS) * parameters * torch.tensor([], dtype=DTYPES[dtype_name]).element_size()
    if weights > 0.85 * free_bytes:
        raise BenchError(
            f"--config with --dtype {dtype_name}: the three models' weights take {weights / 2**30:.1f} GiB, more than "
            f"85% of the {free_bytes / 2**30:.1f} GiB free on this device (activations and caches need the rest). "
            + ("Use a smaller --config or a device with more memory." if DTYPES[dtype_name].itemsize == 2
               else "Use --dtype bfloat16, a smaller --config or a device with more memory.")
        )


def is_report(value: dict) -> bool:
    """Whether a JSON object is a report of this command (what `--json` may replace)."""
    return all(key in value for key in REPORT_KEYS)


def _prepare_outputs(args) -> None:
    """`--json` and `--plot` are checked, and their folders made, before anything is measured: a run never ends
    with results it cannot write, and never writes over a file it did not write (`cli.prepare_output`)."""
    from llava_ivtp.cli import distinct_outputs, prepare_output

    distinct_outputs(BenchError, [("--json", args.json), ("--plot", args.plot)])
    if args.json is not None:
        prepare_output("--json", args.json, BenchError, command=COMMAND, kind="json", recognise=is_report)
    if args.plot is not None:
        prepare_output("--plot", args.plot, BenchError, command=COMMAND, kind="figure")


def _prepare_config(args) -> tuple[dict, str]:
    name = args.config or ("7b" if args.device == "cuda" else "7b-narrow")
    config_dict, description = load_config_dict(name)
    config_dict = copy.deepcopy(config_dict)
    if args.no_clip_text:
        config_dict["clip_text_encoder"] = None
        config_dict["guidance"] = "visual_cls"
    elif config_dict.get("clip_text_encoder") is None:
        config_dict["clip_text_encoder"] = _clip_spec_vit_l14_336()
        description += " + random-weight ViT-L-14-336 CLIP text tower"
    _check_args(args, config_dict)
    _prepare_outputs(args)
    if args.kept is not None:
        config_dict["schedule"] = kept_schedule(config_dict, args.kept)
    return config_dict, name if name in NAMED_CONFIGS else description


def _flops(config_dict: dict, text_tokens: int) -> dict:
    from llava_ivtp.measuring.analytic_flops import llava_flops
    from modeling_llava_ivtp import IvtpConfig

    ivtp = llava_flops(IvtpConfig(**copy.deepcopy(config_dict)), text_tokens)
    stock = llava_flops(IvtpConfig(**dict(copy.deepcopy(config_dict), schedule=None)), text_tokens)
    ratio = ivtp["total"] / stock["total"]
    return {"stock": stock, "ivtp": ivtp, "ratio": ratio, "speedup": 1.0 / ratio}


def _counted_flops(config_dict: dict, method: str, text_tokens: int) -> dict:
    """A method's prefill FLOPs and stock's, one sample, counted by `flops.measure` (the analytic formulas know
    IVTP's schedule only)."""
    from llava_ivtp.measuring.flops import measure
    from modeling_llava_ivtp import IvtpConfig

    stock = IvtpConfig(**dict(copy.deepcopy(config_dict), pruning_method=None))
    pruned = IvtpConfig(**method_config_dict(config_dict, method))
    for config in (stock, pruned):
        config._attn_implementation = "sdpa"
    stock_total, total = measure(stock, text_tokens).total, measure(pruned, text_tokens).total
    return {"total": total, "stock_total": stock_total, "speedup": stock_total / total}


def _analytic_kv(config_dict: dict, text_tokens: int, batch_size: int, bytes_per_value: int) -> dict:
    from llava_ivtp.measuring.analytic_flops import kv_cache_bytes_per_layer
    from modeling_llava_ivtp import IvtpConfig

    ivtp = IvtpConfig(**copy.deepcopy(config_dict))
    stock = IvtpConfig(**dict(copy.deepcopy(config_dict), schedule=None))
    return {
        "stock": kv_cache_bytes_per_layer(stock, text_tokens, batch_size, bytes_per_value),
        "ivtp": kv_cache_bytes_per_layer(ivtp, text_tokens, batch_size, bytes_per_value),
    }


def _device_description(device: torch.device) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    info["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable, file=sys.stderr, unit="run", dynamic_ncols=True)


def measure_batch(models: dict, config, config_dict: dict, args, batch_size: int, device, dtype, bar) -> list[dict]:
    """Every figure of every variant at one batch size."""
    from modeling_llava_ivtp.transformers_compat import output_cache

    common, guidance = build_inputs(config, batch_size, args.text_tokens, device, dtype, args.seed + batch_size)
    names = [name for name in models if name in VARIANTS or name.startswith("method:")]
    runners = {name: Runner(name, models[name], common, guidance, device, args.new_tokens) for name in names}
    results = {name: {"variant": name, "batch_size": batch_size} for name in names}

    for name, runner in runners.items():  # warm-up, also of the decode path
        for _ in range(args.warmup):
            bar.set_description(f"b={batch_size} warm-up {name}")
            runner.timed_prefill()
            bar.update(1)
        if args.warmup:
            runner.generate(2)

    times = {name: [] for name in names}
    for repeat in range(args.repeats):  # the variants take turns
        for name, runner in runners.items():
            bar.set_description(f"b={batch_size} prefill {repeat + 1}/{args.repeats} {name}")
            times[name].append(runner.timed_prefill())
            bar.update(1)

    bytes_per_value = torch.tensor([], dtype=dtype).element_size()
    analytic = _analytic_kv(config_dict, args.text_tokens, batch_size, bytes_per_value)
    for name, runner in runners.items():
        result = results[name]
        result["prefill_ms"] = {
            "median": 1000.0 * statistics.median(times[name]),
            "min": 1000.0 * min(times[name]),
            "all": [1000.0 * value for value in times[name]],
        }
        bar.set_description(f"b={batch_size} memory+cache {name}")
        with PeakMemory(device) as peak:
            output = runner.prefill()
        per_layer = cache_bytes_per_layer(output_cache(output))
        del output
        bar.update(1)
        result["kv_cache_bytes"] = sum(per_layer)
        result["kv_cache_bytes_per_layer"] = per_layer
        expected = analytic["stock" if name == "stock_sdpa" else "ivtp"] if name in VARIANTS else None
        result["kv_cache_bytes_analytic"] = sum(expected) if expected is not None else None  # IVTP's schedule only
        result["kv_cache_matches_analytic"] = per_layer == expected if expected is not None else None
        result["weights_bytes"] = _model_bytes(runner.model)
        result["peak_memory"] = {"prefill_bytes_above_before": peak.peak_bytes, "note": peak.note}

        bar.set_description(f"b={batch_size} decode {args.new_tokens} tokens {name}")
        with PeakMemory(device) as peak:
            step_times = runner.generate(args.new_tokens)
        bar.update(1)
        result["decode"] = decode_figures(step_times, batch_size)
        result["peak_memory"]["generate_bytes_above_before"] = peak.peak_bytes

        prof_results = []
        for _ in range(args.profile_runs):
            bar.set_description(f"b={batch_size} profile {name}")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                with torch.profiler.record_function("bench/prefill"):
                    runner.prefill()
                    _synchronize(device)
            prof_results.append((pruning_times_from_profile(prof, device), prof))
            bar.update(1)
        # The profiled run with the median total is reported.
        prof_results.sort(key=lambda item: item[0]["profiled_prefill_ms"])
        times_profile, prof = prof_results[len(prof_results) // 2]
        total = times_profile["profiled_prefill_ms"]
        result["pruning"] = dict(
            times_profile,
            share=(times_profile["pruning_ms"] / total) if total > 0 else 0.0,
            label_shares={label: value / total for label, value in times_profile["labels_ms"].items()} if total else {},
            clock="device time of kernels" if device.type == "cuda" else "wall time of the ranges",
        )
        result["top_ops"] = top_ops(prof, device, max(20, args.top_ops))
        del prof_results, prof
    return [results[name] for name in names]


def comparisons(results: list[dict], flops: dict) -> list[dict]:
    rows = []
    for batch_size in sorted({result["batch_size"] for result in results}):
        by_name = {result["variant"]: result for result in results if result["batch_size"] == batch_size}
        stock = by_name["stock_sdpa"]
        for name in [name for name in by_name if name != "stock_sdpa"]:
            ours = by_name[name]
            speedup = stock["prefill_ms"]["median"] / ours["prefill_ms"]["median"]
            flops_speedup = flops["methods"][name]["speedup"] if name.startswith("method:") else flops["speedup"]
            rows.append({
                "batch_size": batch_size,
                "variant": name,
                "prefill_speedup": speedup,
                "prefill_speedup_of_min": stock["prefill_ms"]["min"] / ours["prefill_ms"]["min"],
                "flops_speedup": flops_speedup,
                "speedup_vs_flops": speedup / flops_speedup,
                "within_15pct_of_flops": abs(speedup / flops_speedup - 1.0) <= 0.15,
                "decode_ratio": ours["decode"]["tokens_per_s"] / stock["decode"]["tokens_per_s"],
                "kv_cache_reduction": 1.0 - ours["kv_cache_bytes"] / stock["kv_cache_bytes"],
                "pruning_share": ours["pruning"]["share"],
            })
    return rows


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def markdown_table(report: dict) -> str:
    results, flops = report["results"], report["flops"]
    lines = [
        "| batch | variant | prefill ms (median) | prefill speed-up | decode tok/s | peak prefill MiB (+ weights) | "
        "KV cache MiB | KV vs stock | pruning share of prefill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        stock = next(r for r in results if r["batch_size"] == result["batch_size"] and r["variant"] == "stock_sdpa")
        is_stock = result["variant"] == "stock_sdpa"
        speedup = stock["prefill_ms"]["median"] / result["prefill_ms"]["median"]
        kv = result["kv_cache_bytes"] / stock["kv_cache_bytes"]
        peak = result["peak_memory"]["prefill_bytes_above_before"]
        share = "-" if is_stock else f"{100 * result['pruning']['share']:.1f}%"
        lines.append(
            f"| {result['batch_size']} | {variant_title(result['variant'])} | {result['prefill_ms']['median']:,.1f} | "
            f"{speedup:.2f}x | {result['decode']['tokens_per_s']:,.1f} | "
            f"{_mib(peak)} (+ {_mib(result['weights_bytes'])}) | "
            f"{_mib(result['kv_cache_bytes'])} | {100 * kv:.1f}% | {share} |"
        )
    lines.append("")
    lines.append(
        f"FLOPs (analytic, one sample, CLIP text tower and scoring not counted): stock "
        f"{flops['stock']['total'] / 1e12:.4g} T, IVTP {flops['ivtp']['total'] / 1e12:.4g} T: ratio "
        f"{flops['ratio']:.3f}, i.e. {flops['speedup']:.2f}x fewer."
        + "".join(f" {variant_title(name)}: {value['total'] / 1e12:.4g} T counted (stock counted "
                  f"{value['stock_total'] / 1e12:.4g} T), {value['speedup']:.2f}x fewer." for name, value in flops["methods"].items())
    )
    lines.append("")
    lines.append(
        "| batch | variant | prefill speed-up (medians) / FLOPs speed-up | within 15% | speed-up of the fastest runs | "
        "decode vs stock | KV cache smaller by | pruning share |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in report["comparisons"]:
        lines.append(
            f"| {row['batch_size']} | {variant_title(row['variant'])} | {row['prefill_speedup']:.2f}x / "
            f"{row['flops_speedup']:.2f}x = {row['speedup_vs_flops']:.2f} | "
            f"{'yes' if row['within_15pct_of_flops'] else 'no'} | "
            f"{row['prefill_speedup_of_min']:.2f}x | "
            f"{row['decode_ratio']:.2f}x | {100 * row['kv_cache_reduction']:.1f}% | {100 * row['pruning_share']:.1f}% |"
        )
    return "\n".join(lines)


def top_ops_text(report: dict, count: int) -> str:
    blocks = []
    for result in report["results"]:
        blocks.append(
            f"\nTop {count} ops by self time, profiled prefill, {variant_title(result['variant'])}, batch "
            f"{result['batch_size']}:\n| op | self ms | share | calls |\n|---|---|---|---|"
        )
        for op in result["top_ops"][:count]:
            blocks.append(f"| `{op['op']}` | {op['self_ms']:,.1f} | {100 * op['share']:.1f}% | {op['calls']} |")
        labels = result["pruning"]["labels_ms"]
        if labels:
            blocks.append("ivtp labels (ms): " + ", ".join(f"{name} {value:,.1f}" for name, value in labels.items()))
    return "\n".join(blocks)


def sweep_kept(models: dict, config_dict: dict, args, device, dtype, bar) -> list[dict]:
    """Analytic TFLOPs and measured IVTP (sdpa) prefill latency for each `--plot-kept` count, first batch size."""
    from modeling_llava_ivtp import IvtpConfig

    batch_size = args.batch_sizes[0]
    weights = models["ivtp_sdpa"].state_dict()
    config = models["ivtp_sdpa"].config
    common, guidance = build_inputs(config, batch_size, args.text_tokens, device, dtype, args.seed + batch_size)
    rows = []
    for kept in sorted(set(args.plot_kept)):
        swept = dict(copy.deepcopy(config_dict), schedule=kept_schedule(config_dict, kept))
        IvtpConfig(**copy.deepcopy(swept))  # validated
        model = build_ivtp_model(swept, weights, device, dtype)
        runner = Runner("ivtp_sdpa", model, common, guidance, device, args.new_tokens)
        for _ in range(args.warmup):
            bar.set_description(f"sweep kept={kept} warm-up")
            runner.timed_prefill()
            bar.update(1)
        times = []
        for _ in range(args.repeats):
            bar.set_description(f"sweep kept={kept} prefill")
            times.append(runner.timed_prefill())
            bar.update(1)
        flops = _flops(swept, args.text_tokens)
        rows.append({
            "kept": kept, "schedule": swept["schedule"], "batch_size": batch_size,
            "ivtp_tflops": flops["ivtp"]["total"] / 1e12, "stock_tflops": flops["stock"]["total"] / 1e12,
            "ivtp_prefill_ms": 1000.0 * statistics.median(times),
        })
        del model, runner
    return rows


def draw_plot(report: dict, path: Path) -> None:
    import matplotlib

    from llava_ivtp.cli import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["sweep"]
    batch_size = sweep[0]["batch_size"]
    stock = next(r for r in report["results"] if r["variant"] == "stock_sdpa" and r["batch_size"] == batch_size)
    kept = [row["kept"] for row in sweep]
    figure, (flops_axis, latency_axis) = plt.subplots(1, 2, figsize=(10, 4))
    flops_axis.plot(kept, [row["ivtp_tflops"] for row in sweep], "o-", label="IVTP")
    flops_axis.axhline(sweep[0]["stock_tflops"], color="gray", linestyle="--", label="stock LLaVA")
    flops_axis.set(xscale="log", xlabel="visual tokens kept", ylabel="TFLOPs (analytic, one sample)", title="FLOPs")
    latency_axis.plot(kept, [row["ivtp_prefill_ms"] for row in sweep], "o-", label="IVTP (sdpa)")
    latency_axis.axhline(stock["prefill_ms"]["median"], color="gray", linestyle="--", label="stock Llava (sdpa)")
    latency_axis.set(
        xscale="log", xlabel="visual tokens kept", ylabel="prefill ms (median)",
        title=f"prefill latency, batch {batch_size}, {report['meta']['device']['type']}",
    )
    for axis in (flops_axis, latency_axis):
        axis.minorticks_off()
        axis.set_xticks(kept)
        axis.set_xticklabels([str(k) for k in kept])
        axis.legend()
        axis.grid(alpha=0.3)
    meta = report["meta"]
    figure.suptitle(f"{meta['config']}, {meta['text_tokens']} text tokens, {meta['dtype']}")
    figure.tight_layout()
    save_figure(figure, path, COMMAND, dpi=120)
    plt.close(figure)


def run(args) -> int:
    threads_before = torch.get_num_threads()
    try:
        config_dict, config_name = _prepare_config(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return _run(args, config_dict, config_name)
    except BenchError as error:  # a bad flag, found before measuring or while measuring
        from llava_ivtp.cli import report_error

        return report_error(COMMAND, error)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, config_dict: dict, config_name: str) -> int:
    import transformers

    from llava_ivtp.cli import TOOL_KEY, tool_name
    from modeling_llava_ivtp import IvtpConfig, __version__

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    config = IvtpConfig(**copy.deepcopy(config_dict))
    flops = _flops(config_dict, args.text_tokens)
    flops["methods"] = {f"method:{method}": _counted_flops(config_dict, method, args.text_tokens) for method in args.methods}
    layout = prompt_layout(args.text_tokens)
    meta = {
        "command": "llava-ivtp bench " + " ".join(shlex.quote(arg) for arg in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else None,
        "arguments": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "config": config_name,
        "schedule": config.schedule,
        "num_patches": config.num_patches,
        "kept": (config.schedule["llm"] or config.schedule["vision"])[-1],
        "text_tokens": args.text_tokens,
        "prompt": {"prefix": layout.prefix, "image": config.num_patches, "suffix": layout.suffix,
                   "instruction": layout.instruction, "clip_tokens": layout.clip_tokens},
        "clip_text_encoder": config.clip_text_encoder,
        "dtype": str(dtype).replace("torch.", ""),
        "device": _device_description(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "llava_ivtp": __version__,
                     "python": platform.python_version()},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peak_memory_method": PeakMemory.method(device),
        "prefill": "one forward, use_cache=True, logits for every token reaching the LM head",
        "dims": {
            "vision": {key: getattr(config.vision_config, key) for key in VISION_DIMS},
            "text": {key: getattr(config.text_config, key) for key in TEXT_DIMS},
        },
    }
    per_batch = (len(VARIANTS) + len(args.methods)) * (args.warmup + args.repeats + 2 + args.profile_runs)
    total = per_batch * len(args.batch_sizes)
    if args.plot is not None:
        total += len(set(args.plot_kept)) * (args.warmup + args.repeats)
    with _progress(total, args.no_progress) as bar:
        bar.set_description("building models")
        models = build_models(config_dict, device, dtype, args.seed, args.methods)
        results = []
        for batch_size in args.batch_sizes:
            results += measure_batch(models, config, config_dict, args, batch_size, device, dtype, bar)
        meta["load_average_after_measurements"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report = {TOOL_KEY: tool_name(COMMAND), "meta": meta, "flops": flops, "results": results}
        report["comparisons"] = comparisons(results, flops)
        _write_json(report, args.json)  # the measured results first, before the sweep and the plot
        if args.plot is not None:
            del models["ivtp_eager"]  # the sweep builds one model at a time in its place
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["sweep"] = sweep_kept(models, config_dict, args, device, dtype, bar)
            _write_json(report, args.json)
    hardware = meta["device"].get("gpu", meta["device"]["cpu"])
    print(f"llava-ivtp bench: {config_name}, {meta['dtype']}, {device.type} ({hardware}, "
          f"{meta['device']['torch_threads']} threads), {args.text_tokens} text tokens + {config.num_patches} image "
          f"tokens, {meta['kept']} kept, prefill median of {args.repeats}, decode {args.new_tokens} tokens")
    print()
    print(markdown_table(report))
    if args.top_ops:
        print(top_ops_text(report, args.top_ops))
    if "sweep" in report:
        print("\n| kept | IVTP TFLOPs | stock TFLOPs | IVTP prefill ms |\n|---|---|---|---|")
        for row in report["sweep"]:
            print(
                f"| {row['kept']} | {row['ivtp_tflops']:.4f} | {row['stock_tflops']:.4f} | "
                f"{row['ivtp_prefill_ms']:,.1f} |"
            )
    if args.json is not None:
        print(f"json: {args.json}")
    if "sweep" in report:
        draw_plot(report, args.plot)  # last: everything measured is on disk already
        print(f"\nplot: {args.plot}")
    return 0


def _write_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str))


__all__ = ["add_arguments", "run", "kept_schedule", "build_models", "build_inputs", "NAMED_CONFIGS"]
