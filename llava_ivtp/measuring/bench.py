"""`llava-ivtp bench`: wall-clock and memory of stock Llava and IVTP, side by side, same weights, same prompts.

Three variants run in one process on the same random weights and the same prompts:

- `stock_sdpa`: `transformers.LlavaForConditionalGeneration`, sdpa attention;
- `ivtp_sdpa`: `LlavaIvtpForConditionalGeneration`, sdpa attention (the stock layers' backend);
- `ivtp_eager`: the same IVTP model with eager attention.

The IVTP model is built first (LLaVA weights plus the frozen CLIP text tower and visual projection); the stock model
gets IVTP's LLaVA weights (nothing of the shared part may be missing or left over), the eager model and each
`--methods` model all of IVTP's weights, as the same tensors (`load_state_dict(assign=True)`): the weights are in
memory once.

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

This module is the command (arguments, checks, the run); `bench_setup.py` builds the configs, models and prompts,
`bench_measure.py` measures, `bench_report.py` writes the table, the plot and the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from llava_ivtp.measuring.bench_measure import (
    PeakMemory, counted_flops, device_description, flops_figures, measure_batch, sweep_kept,
)
from llava_ivtp.measuring.bench_report import comparisons, draw_plot, markdown_table, top_ops_text, write_json
from llava_ivtp.measuring.bench_setup import (
    BenchError, COMMAND, DTYPES, NAMED_CONFIGS, PLOT_KEPT_DEFAULT, REPORT_KEYS, TEXT_DIMS, VARIANTS, VISION_DIMS,
    _with_schedule, bench_image_size, build_models, clip_spec_vit_l14_336, config_of, host_classes, image_tokens,
    is_next, kept_schedule, load_config_dict, prompt_layout,
)


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
    parser.add_argument("--compile", action="store_true",
                        help="time each variant's prefill through torch.compile(model.forward) (default mode) and its "
                        "decode through generate's compiled steps over a static cache (CompileConfig(): mode "
                        "reduce-overhead, CUDA graphs on a GPU); the first calls compile; report graphs and graph "
                        "breaks of both; operators are counted eagerly")
    parser.add_argument("--methods", nargs="+", default=[], metavar="METHOD",
                        help="also measure these pruning methods (sdpa, same weights) at the budget --kept, one "
                        "variant each (`method:NAME`), or 'all'")


def _check_args(args, config_dict: dict) -> None:
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

    config_class = host_classes(config_dict)[0]
    try:
        config = config_class(**copy.deepcopy(config_dict))
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise BenchError(f"--config: not a valid {config_class.__name__}: {error}") from None
    if config.schedule is None:
        raise BenchError("--config has no pruning schedule (schedule is null): nothing to compare with stock.")
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS

    if args.methods == ["all"]:
        args.methods = [method for method in PRUNING_METHODS if method != "ivtp"]
    unknown = [method for method in args.methods if method not in PRUNING_METHODS]
    if unknown or len(set(args.methods)) != len(args.methods):
        raise BenchError(f"--methods {args.methods}: each once, from {list(PRUNING_METHODS)} or 'all'.")
    num_patches = image_tokens(config)
    plot_kept = args.plot_kept if args.plot is not None else []
    bound, what = (config.num_patches, "the patches per image") if config.max_crops == 1 else (
        config.max_visual_tokens, "the visual tokens of an image")
    for flag, values in (("--kept", [args.kept] if args.kept is not None else []), ("--plot-kept", plot_kept)):
        for value in values:
            if not 1 <= value <= bound:
                raise BenchError(f"{flag} must be in [1, {bound}] ({what}), got {value}.")
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
    """The weights twice -- the shared weights every variant holds, and a model being built, whose own weights the
    shared ones then replace (`bench_setup.build_models`) -- must fit in the device's free memory with room for
    activations and caches, else stop before building anything. (IVTP's size is counted: stock Llava lacks the CLIP
    text tower, a small overestimate.)"""
    from llava_ivtp.measuring.flops import build_weight_free

    parameters = sum(parameter.numel() for parameter in build_weight_free(config).parameters())
    weights = 2 * parameters * torch.tensor([], dtype=DTYPES[dtype_name]).element_size()
    if weights > 0.85 * free_bytes:
        raise BenchError(
            f"--config with --dtype {dtype_name}: the shared weights and a model being built take "
            f"{weights / 2**30:.1f} GiB, more than "
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
        config_dict["clip_text_encoder"] = clip_spec_vit_l14_336()
        description += " + random-weight ViT-L-14-336 CLIP text tower"
    if is_next(config_dict) and config_dict.get("schedule") is None and config_dict.get("pruning_options"):
        from modeling_llava_ivtp import IvtpNextConfig

        try:  # a NeXT config with a budget: the schedule it derives, written out (the bench reads the schedule)
            config_dict = _with_schedule(config_dict, IvtpNextConfig)
        except (TypeError, ValueError) as error:
            raise BenchError(f"--config: not a valid IvtpNextConfig: {error}") from None
    _check_args(args, config_dict)
    _prepare_outputs(args)
    if args.kept is not None:
        config_dict["schedule"] = kept_schedule(config_dict, args.kept)
    return config_dict, name if name in NAMED_CONFIGS else description


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable, file=sys.stderr, unit="run", dynamic_ncols=True)


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
    from modeling_llava_ivtp import __version__

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    config = config_of(config_dict)
    flops = flops_figures(config_dict, args.text_tokens)
    flops["methods"] = {f"method:{method}": counted_flops(config_dict, method, args.text_tokens) for method in args.methods}
    layout = prompt_layout(args.text_tokens)
    meta = {
        "command": "llava-ivtp bench " + " ".join(shlex.quote(arg) for arg in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else None,
        "arguments": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "config": config_name,
        "schedule": config.schedule,
        "num_patches": config.num_patches,
        "image_size": list(bench_image_size(config)) if bench_image_size(config) else None,  # LLaVA-NeXT
        "kept": (config.schedule["llm"] or config.schedule["vision"])[-1],
        "text_tokens": args.text_tokens,
        "prompt": {"prefix": layout.prefix, "image": image_tokens(config), "suffix": layout.suffix,
                   "instruction": layout.instruction, "clip_tokens": layout.clip_tokens},
        "clip_text_encoder": config.clip_text_encoder,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_description(device),
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
        write_json(report, args.json)  # the measured results first, before the sweep and the plot
        if args.plot is not None:
            del models["ivtp_eager"]  # the sweep builds one model at a time in its place
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["sweep"] = sweep_kept(models, config_dict, args, device, dtype, bar)
            write_json(report, args.json)
    hardware = meta["device"].get("gpu", meta["device"]["cpu"])
    print(f"llava-ivtp bench: {config_name}, {meta['dtype']}, {device.type} ({hardware}, "
          f"{meta['device']['torch_threads']} threads), {args.text_tokens} text tokens + {image_tokens(config)} image "
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


__all__ = ["add_arguments", "check_device_memory", "run"]
