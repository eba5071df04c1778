"""`llava-ivtp bench`, its measurements: prefill and decode timing, peak memory, the KV cache, the profiled pruning
share, the FLOPs beside them, and the kept-token sweep."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from llava_ivtp.measuring.dispatch import count_dispatched, per_step
from llava_ivtp.measuring.bench_setup import (
    BenchError, VARIANTS, bench_image_size, build_inputs, build_ivtp_model, config_of, is_next, kept_schedule,
    method_config_dict,
)


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

    def __init__(self, name: str, model, inputs: dict, guidance: dict, device: torch.device, new_tokens: int,
                 compile_forward: bool = False):
        self.name, self.model, self.device, self.new_tokens = name, model, device, new_tokens
        # Every pruned variant gets the processor's guidance inputs (IVTP's pseudo-CLS, CDPruner's relevance, the
        # last instruction token of FastV / PDrop); stock Llava takes none.
        self.inputs = dict(inputs, **(guidance if name != "stock_sdpa" else {}))
        # `--compile`: the timed prefills run the compiled forward (nothing is set on the model), and the timed
        # decode runs `generate`'s compiled steps over a static cache (`CompileConfig()`: mode "reduce-overhead",
        # CUDA graphs on a GPU), one cache size for every call so that no call recompiles.
        self.forward = torch.compile(model.forward) if compile_forward else model
        self.compile_figures: dict | None = None
        self.compile_config = None
        if compile_forward:
            from transformers import CompileConfig

            self.compile_config = CompileConfig()
            self.compile_config._compile_all_devices = device.type == "cpu"  # transformers compiles on accelerators

    def prefill(self):
        with torch.inference_mode():
            return self.model(**self.inputs, use_cache=True)

    def compiled_prefill(self):
        with torch.inference_mode():
            return self.forward(**self.inputs, use_cache=True)

    def compile(self) -> dict:
        """The first call of the compiled forward (it compiles): seconds, graphs and graph breaks (dynamo's
        counters, before and after)."""
        from torch._dynamo.utils import counters

        def first_call(call) -> tuple[float, int, int]:
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
            start = time.perf_counter()
            call()
            _synchronize(self.device)
            return (time.perf_counter() - start, counters["stats"]["unique_graphs"] - graphs,
                    sum(counters["graph_break"].values()) - breaks)

        seconds, graphs, breaks = first_call(self.compiled_prefill)
        # the decode steps' first `generate` (its prefill runs eagerly, as `generate` runs it)
        decode_seconds, decode_graphs, decode_breaks = first_call(lambda: self.generate(2))
        self.compile_figures = {
            "compile_s": seconds, "graphs": graphs, "graph_breaks": breaks,
            "decode_compile_s": decode_seconds, "decode_graphs": decode_graphs, "decode_graph_breaks": decode_breaks,
        }
        return self.compile_figures

    def timed_prefill(self) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        output = self.compiled_prefill()
        _synchronize(self.device)
        elapsed = time.perf_counter() - start
        del output
        return elapsed

    def generate(self, new_tokens: int, compiled: bool = True):
        """Greedy `generate` of exactly `new_tokens`; with `--compile` (and `compiled`) through compiled steps over a
        static cache. Returns the streamer's times of the tokens."""
        config = self.model.config
        text = config.text_config
        eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
        suppress = sorted({config.image_token_index, *[token for token in eos if token is not None]})
        streamer = _StepTimes(self.device)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        static = {}
        if compiled and self.compile_config is not None:
            static = {"cache_implementation": "static", "compile_config": self.compile_config,
                      "max_cache_len": self.inputs["input_ids"].shape[1] + self.new_tokens}
        with torch.inference_mode():
            sequences = self.model.generate(
                **self.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                suppress_tokens=suppress, pad_token_id=pad, streamer=streamer, **static,
            )
        generated = sequences.shape[1] - self.inputs["input_ids"].shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"{self.name}: generate stopped after {generated} of {new_tokens} tokens.")
        return streamer.times


# Decode steps whose operators are counted (the difference between `generate` of 2 and of 2 + this many tokens).
COUNTED_STEPS = 4


def dispatched_figures(runner: Runner) -> dict:
    """The aten operators one prefill dispatches (all, views, the rest: on a GPU about one kernel launch each) and
    the operators per decode step of `generate` (`llava_ivtp.measuring.dispatch`). Counts do not depend on the
    machine's load, so launch-bound overhead shows without a GPU."""
    prefill = count_dispatched(runner.prefill)
    step = per_step(lambda new_tokens: runner.generate(new_tokens, compiled=False), 2, 2 + COUNTED_STEPS)
    return {"prefill": prefill.as_dict(top=12), "decode_step": step}


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


def flops_figures(config_dict: dict, text_tokens: int) -> dict:
    """IVTP's and stock's prefill FLOPs, one sample: analytic on LLaVA-1.5 (`analytic_flops`), counted on the
    weight-free forward on LLaVA-NeXT (`flops.measure`, the bench's image)."""
    from llava_ivtp.measuring.analytic_flops import llava_flops

    if is_next(config_dict):
        ivtp, stock = (_counted(dict(config_dict, **fields), text_tokens)
                       for fields in ({}, {"pruning_method": None}))
    else:
        ivtp = llava_flops(config_of(config_dict), text_tokens)
        stock = llava_flops(config_of(dict(config_dict, schedule=None)), text_tokens)
    ratio = ivtp["total"] / stock["total"]
    return {"stock": stock, "ivtp": ivtp, "ratio": ratio, "speedup": 1.0 / ratio}


def counted_flops(config_dict: dict, method: str, text_tokens: int) -> dict:
    """A method's prefill FLOPs and stock's, one sample, counted by `flops.measure` (the analytic formulas know
    IVTP's schedule only)."""
    stock_total = _counted(dict(config_dict, pruning_method=None), text_tokens)["total"]
    total = _counted(method_config_dict(config_dict, method), text_tokens)["total"]
    return {"total": total, "stock_total": stock_total, "speedup": stock_total / total}


def _counted(config_dict: dict, text_tokens: int) -> dict:
    """`{"vit", "llm", "total", "per_layer"}` of one sample's prefill, counted on the weight-free forward
    (`flops.measure`; LLaVA-NeXT: the bench's image), and the visual tokens each LLM layer held."""
    from llava_ivtp.measuring.flops import measure

    config = config_of(config_dict)
    config._attn_implementation = "sdpa"
    breakdown = measure(config, text_tokens, image_size=bench_image_size(config) or (0, 0))
    return {"vit": breakdown.vit, "llm": breakdown.llm, "total": breakdown.total,
            "per_layer": breakdown.visual_tokens_per_llm_layer}


def _analytic_kv(config_dict: dict, text_tokens: int, batch_size: int, bytes_per_value: int) -> dict:
    from llava_ivtp.measuring.analytic_flops import kv_cache_bytes_per_layer

    if is_next(config_dict):  # the visual tokens each layer holds, from the weight-free forward
        config = config_of(config_dict)
        text = config.text_config
        per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * bytes_per_value
        return {name: [batch_size * (visual + text_tokens) * per_token
                       for visual in _counted(dict(config_dict, **fields), text_tokens)["per_layer"]]
                for name, fields in (("stock", {"pruning_method": None}), ("ivtp", {}))}
    ivtp = config_of(config_dict)
    stock = config_of(dict(config_dict, schedule=None))
    return {
        "stock": kv_cache_bytes_per_layer(stock, text_tokens, batch_size, bytes_per_value),
        "ivtp": kv_cache_bytes_per_layer(ivtp, text_tokens, batch_size, bytes_per_value),
    }


def device_description(device: torch.device) -> dict:
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


def measure_batch(models: dict, config, config_dict: dict, args, batch_size: int, device, dtype, bar) -> list[dict]:
    """Every figure of every variant at one batch size."""
    from modeling_llava_ivtp.transformers_compat import output_cache

    common, guidance = build_inputs(config, batch_size, args.text_tokens, device, dtype, args.seed + batch_size)
    names = [name for name in models if name in VARIANTS or name.startswith("method:")]
    compile_forward = getattr(args, "compile", False)
    runners = {name: Runner(name, models[name], common, guidance, device, args.new_tokens, compile_forward)
               for name in names}
    results = {name: {"variant": name, "batch_size": batch_size} for name in names}

    for name, runner in runners.items():  # warm-up, also of the decode path
        if compile_forward:
            bar.set_description(f"b={batch_size} compile {name}")
            results[name]["compiled"] = runner.compile()
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
        bar.set_description(f"b={batch_size} operators {name}")
        result["dispatched_ops"] = dispatched_figures(runner)

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


def sweep_kept(models: dict, config_dict: dict, args, device, dtype, bar) -> list[dict]:
    """Analytic TFLOPs and measured IVTP (sdpa) prefill latency for each `--plot-kept` count, first batch size."""
    batch_size = args.batch_sizes[0]
    weights = models["ivtp_sdpa"].state_dict()
    config = models["ivtp_sdpa"].config
    common, guidance = build_inputs(config, batch_size, args.text_tokens, device, dtype, args.seed + batch_size)
    rows = []
    for kept in sorted(set(args.plot_kept)):
        swept = dict(copy.deepcopy(config_dict), schedule=kept_schedule(config_dict, kept))
        config_of(swept)  # validated
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
        flops = flops_figures(swept, args.text_tokens)
        rows.append({
            "kept": kept, "schedule": swept["schedule"], "batch_size": batch_size,
            "ivtp_tflops": flops["ivtp"]["total"] / 1e12, "stock_tflops": flops["stock"]["total"] / 1e12,
            "ivtp_prefill_ms": 1000.0 * statistics.median(times),
        })
        del model, runner
    return rows


__all__ = ["PeakMemory", "Runner", "measure_batch", "pruning_times_from_profile", "sweep_kept"]
