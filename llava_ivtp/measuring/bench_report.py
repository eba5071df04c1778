"""`llava-ivtp bench`, its reporting: the comparisons, the markdown table, the profiled operators, the plot, the JSON
report."""

from __future__ import annotations

import json
from pathlib import Path


from llava_ivtp.measuring.bench_setup import COMMAND, variant_title


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
                "prefill_ops_ratio": ours["dispatched_ops"]["prefill"]["total"] / stock["dispatched_ops"]["prefill"]["total"],
                "decode_step_ops_ratio": ours["dispatched_ops"]["decode_step"] / stock["dispatched_ops"]["decode_step"],
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
        ("FLOPs (counted on the weight-free forward, one sample): stock " if "per_layer" in flops["ivtp"] else
         "FLOPs (analytic, one sample, CLIP text tower and scoring not counted): stock ")
        + f"{flops['stock']['total'] / 1e12:.4g} T, IVTP {flops['ivtp']['total'] / 1e12:.4g} T: ratio "
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
    lines.append("")
    lines.append(
        "| batch | variant | operators per prefill | vs stock | of which views | the rest (GPU: ~kernel launches) | "
        "operators per decode step | vs stock |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for result in results:
        stock = next(r for r in results if r["batch_size"] == result["batch_size"] and r["variant"] == "stock_sdpa")
        ops, stock_ops = result["dispatched_ops"], stock["dispatched_ops"]
        lines.append(
            f"| {result['batch_size']} | {variant_title(result['variant'])} | {ops['prefill']['total']:,} | "
            f"{ops['prefill']['total'] / stock_ops['prefill']['total']:.2f}x | {ops['prefill']['views']:,} | "
            f"{ops['prefill']['computing']:,} | {ops['decode_step']:,.1f} | "
            f"{ops['decode_step'] / stock_ops['decode_step']:.2f}x |"
        )
    if any("compiled" in result for result in results):
        lines += ["", "Prefill times above are of `torch.compile(model.forward)`, decode times of `generate`'s compiled "
                  "steps over a static cache (`--compile`; `CompileConfig()`, mode reduce-overhead: CUDA graphs on a "
                  "GPU; the first `generate` compiles, after its eager prefill):", "",
                  "| batch | variant | prefill compile s | graphs | graph breaks | decode compile s | graphs | graph breaks |",
                  "|---|---|---|---|---|---|---|---|"]
        for result in results:
            compiled = result["compiled"]
            lines.append(f"| {result['batch_size']} | {variant_title(result['variant'])} | {compiled['compile_s']:,.1f} | "
                         f"{compiled['graphs']} | {compiled['graph_breaks']} | {compiled['decode_compile_s']:,.1f} | "
                         f"{compiled['decode_graphs']} | {compiled['decode_graph_breaks']} |")
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


def write_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str))


__all__ = ["comparisons", "draw_plot", "markdown_table", "top_ops_text", "write_json"]
