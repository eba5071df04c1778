"""`llava-ivtp bench` on a tiny config: the CLI end to end, the figures it reports, its errors, the kept-token
schedules.

No timed assertions: speed is what the benchmark measures, not what the tests check.
"""

import contextlib
import importlib.util
import io
import json
import math

import pytest
import torch

from llava_ivtp import cli
from llava_ivtp.measuring.analytic_flops import kv_cache_bytes_per_layer
from llava_ivtp.measuring.bench import check_device_memory
from llava_ivtp.measuring.bench_measure import pruning_times_from_profile
from llava_ivtp.measuring.bench_setup import (
    VARIANT_TITLES,
    VARIANTS,
    BenchError,
    build_models,
    kept_schedule,
    load_config_dict,
)
from modeling_llava_ivtp import IvtpConfig
from tiny_models import TINY_CLIP_TEXT, tiny_config_dict


BATCH_SIZES = (1, 2)
TEXT_TOKENS = 16
FAST = ["--threads", "1", "--no-progress", "--warmup", "0", "--repeats", "1", "--new-tokens", "3"]


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)))
    return path


@pytest.fixture(scope="module")
def bench_run(tiny_json, tmp_path_factory):
    """One run of the CLI: batch sizes 1 and 2, JSON and markdown out."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    argv = ["bench", "--config", str(tiny_json), "--batch-sizes", *map(str, BATCH_SIZES), "--text-tokens",
            str(TEXT_TOKENS), "--json", str(out), *FAST]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(argv)
    return rc, json.loads(out.read_text()), stdout.getvalue()


def run_cli(argv, capsys):
    rc = cli.main(["bench", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_runs_and_json_has_every_figure_for_every_variant_and_batch(bench_run):
    rc, report, _ = bench_run
    assert rc == 0
    results = report["results"]
    assert {(r["variant"], r["batch_size"]) for r in results} == {(v, b) for v in VARIANTS for b in BATCH_SIZES}
    assert len(results) == len(VARIANTS) * len(BATCH_SIZES)
    for result in results:
        assert result["prefill_ms"]["median"] > 0 and len(result["prefill_ms"]["all"]) == 1
        assert result["decode"]["tokens_per_s"] > 0 and result["decode"]["new_tokens"] == 3
        assert result["decode"]["timed_steps"] == 2
        peak = result["peak_memory"]
        assert set(peak) >= {"prefill_bytes_above_before", "generate_bytes_above_before", "note"}
        assert peak["prefill_bytes_above_before"] is None or peak["prefill_bytes_above_before"] >= 0
        assert result["weights_bytes"] > 0
        assert result["kv_cache_bytes"] > 0
        assert 0.0 <= result["pruning"]["share"] <= 1.0
        assert all(0.0 <= share <= 1.0 for share in result["pruning"]["label_shares"].values())
        assert result["top_ops"] and all(op["self_ms"] >= 0 for op in result["top_ops"])
    meta = report["meta"]
    assert meta["text_tokens"] == TEXT_TOKENS and meta["kept"] == 5 and meta["num_patches"] == 36
    assert meta["versions"]["torch"] == torch.__version__
    assert 0 < report["flops"]["ratio"] < 1
    assert len(report["comparisons"]) == 2 * len(BATCH_SIZES)


def test_pruning_share_is_measured_from_the_model_labels(bench_run):
    _, report, _ = bench_run
    for result in report["results"]:
        labels = result["pruning"]["labels_ms"]
        if result["variant"] == "stock_sdpa":
            assert labels == {} and result["pruning"]["share"] == 0.0
            continue
        for label in ("ivtp/vision_scoring", "ivtp/llm_scoring", "ivtp/probe", "ivtp/probe/clip_text_tower"):
            assert label in labels
        top_level = sum(value for name, value in labels.items() if name.count("/") == 1)
        assert math.isclose(result["pruning"]["pruning_ms"], top_level)
        assert result["pruning"]["pruning_ms"] <= result["pruning"]["profiled_prefill_ms"]
        assert 0.0 < result["pruning"]["share"] <= 1.0


def test_kv_cache_bytes_are_smaller_than_stock_and_equal_the_analytic_figure(bench_run):
    _, report, _ = bench_run
    config = IvtpConfig(**tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT))
    stock_config = IvtpConfig(**tiny_config_dict(schedule=None))
    for batch_size in BATCH_SIZES:
        by_name = {r["variant"]: r for r in report["results"] if r["batch_size"] == batch_size}
        stock = by_name["stock_sdpa"]
        assert stock["kv_cache_bytes_per_layer"] == kv_cache_bytes_per_layer(stock_config, TEXT_TOKENS, batch_size, 4)
        for name in ("ivtp_sdpa", "ivtp_eager"):
            ours = by_name[name]
            assert ours["kv_cache_bytes"] < stock["kv_cache_bytes"]
            expected = kv_cache_bytes_per_layer(config, TEXT_TOKENS, batch_size, 4)  # float32
            assert ours["kv_cache_bytes_per_layer"] == expected
            assert ours["kv_cache_bytes"] == ours["kv_cache_bytes_analytic"] == sum(expected)
            assert ours["kv_cache_matches_analytic"]


def test_markdown_table_has_a_row_per_variant_and_batch(bench_run):
    _, _, stdout = bench_run
    for batch_size in BATCH_SIZES:
        for name in VARIANTS:
            assert f"| {batch_size} | {VARIANT_TITLES[name]} |" in stdout
    assert "| batch | variant | prefill ms (median) |" in stdout
    assert "prefill speed-up (medians) / FLOPs speed-up" in stdout


def test_operators_per_prefill_and_decode_step_for_every_variant(bench_run):
    """Counted eagerly, beside the times: the same for a variant at every run (they do not depend on the load)."""
    _, report, stdout = bench_run
    for result in report["results"]:
        ops = result["dispatched_ops"]
        assert ops["prefill"]["total"] == ops["prefill"]["views"] + ops["prefill"]["computing"] > 0
        assert 0 < sum(ops["prefill"]["top"].values()) <= ops["prefill"]["total"]
        assert ops["decode_step"] > 0
        stock = next(r for r in report["results"] if r["variant"] == "stock_sdpa" and r["batch_size"] == result["batch_size"])
        if result["variant"] != "stock_sdpa":  # pruning adds bookkeeping (and the CLIP text tower)
            assert ops["prefill"]["total"] > stock["dispatched_ops"]["prefill"]["total"]
    by_batch = {r["batch_size"]: r["dispatched_ops"]["prefill"]["total"] for r in report["results"] if r["variant"] == "ivtp_sdpa"}
    assert by_batch[1] == by_batch[2]  # one layout: nothing per sample
    for row in report["comparisons"]:
        assert row["prefill_ops_ratio"] > 1 and row["decode_step_ops_ratio"] > 0
    assert "| batch | variant | operators per prefill | vs stock |" in stdout


def test_compiled_prefill_runner_reports_graphs_and_keeps_the_outputs(tiny_json):
    """`--compile`: the timed prefill runs `torch.compile(model.forward)`; IVTP's pruned forward compiles, broken only
    at the prefill's device reads (the batch layout, the kept counts), and keeps the eager outputs. The decode runs
    `generate`'s compiled steps over a static cache: one graph, no break, and the timed call (longer than the
    warm-up's) compiles nothing more."""
    from torch._dynamo.utils import counters

    from llava_ivtp.measuring.bench_measure import Runner
    from llava_ivtp.measuring.bench_setup import build_inputs

    config_dict, _ = load_config_dict(str(tiny_json))
    models = build_models(config_dict, torch.device("cpu"), torch.float32, 0)
    common, guidance = build_inputs(models["ivtp_sdpa"].config, 1, TEXT_TOKENS, "cpu", torch.float32, 0)
    runner = Runner("ivtp_sdpa", models["ivtp_sdpa"], common, guidance, torch.device("cpu"), 3, compile_forward=True)
    torch._dynamo.reset()
    figures = runner.compile()
    assert figures["compile_s"] > 0 and 1 <= figures["graphs"] <= 8 and figures["graph_breaks"] <= 8
    eager, compiled = runner.prefill(), runner.compiled_prefill()
    assert torch.equal(compiled.kept_positions, eager.kept_positions)
    assert compiled.llm_token_counts == eager.llm_token_counts
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert figures["decode_compile_s"] > 0
    assert figures["decode_graphs"] == 1 and figures["decode_graph_breaks"] == 0
    graphs = counters["stats"]["unique_graphs"]
    assert len(runner.generate(3)) == 3
    assert counters["stats"]["unique_graphs"] == graphs


def test_stock_and_ivtp_hold_the_same_llava_weights(tiny_json):
    config_dict, _ = load_config_dict(str(tiny_json))
    models = build_models(config_dict, torch.device("cpu"), torch.float32, seed=0)
    ivtp = models["ivtp_sdpa"].state_dict()
    stock = models["stock_sdpa"].state_dict()
    eager = models["ivtp_eager"].state_dict()
    assert set(stock) == {key for key in ivtp if not key.startswith("clip_")}
    assert all(torch.equal(stock[key], ivtp[key]) for key in stock)
    assert set(eager) == set(ivtp) and all(torch.equal(eager[key], ivtp[key]) for key in ivtp)
    # held once: the other variants' parameters are IVTP's own tensors
    assert all(stock[key].data_ptr() == ivtp[key].data_ptr() for key in stock)
    assert all(eager[key].data_ptr() == ivtp[key].data_ptr() for key in ivtp)
    assert models["ivtp_eager"].config._attn_implementation == "ivtp_eager"  # eager, recording (attention_rows.py)
    assert models["stock_sdpa"].config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--config", "no-such-shape"], "--config"),
        (["--kept", "0"], "--kept"),
        (["--kept", "37"], "--kept"),
        (["--text-tokens", "2"], "--text-tokens"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_give_a_clear_error_naming_the_flag(argv, flag, tiny_json, capsys):
    if "--config" not in argv:
        argv = ["--config", str(tiny_json), *argv]
    rc, out, err = run_cli([*argv, "--no-progress"], capsys)
    assert rc == 2
    assert err.startswith("llava-ivtp bench: error:") and flag in err
    assert out == ""


def test_unknown_config_error_lists_the_named_shapes(capsys):
    rc, _, err = run_cli(["--config", "7b-wide"], capsys)
    assert rc == 2 and "'7b-wide'" in err and "7b-narrow" in err


def test_a_llava_next_config_measures_stock_llava_next_ivtp_and_methods(tmp_path, capsys):
    """A LLaVA-NeXT config (IVTP with a budget): stock `LlavaNextForConditionalGeneration`, IVTP and a method on the
    same weights, one image of the grid's largest size per sample (5 crops, 192 tokens on the tiny grid), batch 1
    and 2; FLOPs counted on the weight-free forward, the KV cache against the per-layer counts of that forward."""
    from modeling_llava_ivtp import IvtpNextConfig
    from tiny_models import tiny_next_config_dict

    config = tmp_path / "tiny-next.json"
    config.write_text(IvtpNextConfig(**tiny_next_config_dict(
        pruning_method="ivtp", pruning_options={"visual_tokens": 40}, clip_text_encoder=TINY_CLIP_TEXT)).to_json_string())
    out = tmp_path / "next.json"
    rc, stdout, _ = run_cli(["--config", str(config), "--batch-sizes", "1", "2", "--text-tokens", str(TEXT_TOKENS),
                             "--methods", "visionzip", "--json", str(out), *FAST], capsys)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["meta"]["image_size"] == [48, 48] and report["meta"]["prompt"]["image"] == 192
    assert report["meta"]["kept"] == 40
    variants = ["stock_sdpa", "ivtp_sdpa", "ivtp_eager", "method:visionzip"]
    assert [result["variant"] for result in report["results"]] == variants * 2
    assert report["flops"]["speedup"] > 1 and report["flops"]["methods"]["method:visionzip"]["speedup"] > 1
    for result in report["results"]:
        if result["variant"] in ("stock_sdpa", "ivtp_sdpa", "ivtp_eager"):  # the cache each layer holds, as counted
            assert result["kv_cache_matches_analytic"] is True, result["variant"]
        if result["variant"] != "stock_sdpa":
            assert result["kv_cache_bytes"] < next(r["kv_cache_bytes"] for r in report["results"]
                                                    if r["variant"] == "stock_sdpa" and r["batch_size"] == result["batch_size"])
    assert "192 image tokens" in stdout and "FLOPs (counted on the weight-free forward, one sample)" in stdout
    rc, _, err = run_cli(["--config", str(config), "--kept", "193", *FAST], capsys)
    assert rc == 2 and "--kept must be in [1, 192] (the visual tokens of an image)" in err


def test_kept_out_of_range_names_the_patch_count(tiny_json, capsys):
    rc, _, err = run_cli(["--config", str(tiny_json), "--kept", "100"], capsys)
    assert rc == 2 and "--kept must be in [1, 36]" in err


def test_cuda_without_a_device_is_refused(tiny_json, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, _, err = run_cli(["--config", str(tiny_json), "--device", "cuda"], capsys)
    assert rc == 2 and "--device cuda" in err


def test_plot_without_matplotlib_says_how_to_install_it(tiny_json, capsys, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "matplotlib" else real_find_spec(name, *args)
    )
    rc, _, err = run_cli(["--config", str(tiny_json), "--plot", str(tmp_path / "p.png"), "--plot-kept", "4", *FAST,
                          "--text-tokens", str(TEXT_TOKENS)], capsys)
    assert rc == 2 and "--plot needs matplotlib" in err and "llava-ivtp[bench]" in err
    assert not (tmp_path / "p.png").exists()


def test_plot_kept_out_of_range_names_the_flag(tiny_json, capsys, tmp_path):
    argv = ["--config", str(tiny_json), "--plot", str(tmp_path / "p.png"), "--plot-kept", "4", "40"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "--plot-kept" in err


def test_plot_sweeps_kept_tokens(tiny_json, capsys, tmp_path):
    # matplotlib is in the `test` extra: the figure is drawn, not skipped
    plot, out = tmp_path / "kept.png", tmp_path / "out.json"
    rc, stdout, _ = run_cli(
        ["--config", str(tiny_json), "--batch-sizes", "1", "--text-tokens", str(TEXT_TOKENS), "--kept", "4",
         "--no-clip-text", "--plot", str(plot), "--plot-kept", "2", "8", "36", "--json", str(out), *FAST],
        capsys,
    )
    assert rc == 0 and plot.stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["meta"]["kept"] == 4 and report["meta"]["clip_text_encoder"] is None
    assert [row["kept"] for row in report["sweep"]] == [2, 8, 36]
    flops = [row["ivtp_tflops"] for row in report["sweep"]]
    assert flops == sorted(flops) and math.isclose(flops[-1], report["sweep"][-1]["stock_tflops"])
    assert all(row["ivtp_prefill_ms"] > 0 for row in report["sweep"])
    assert "| kept | IVTP TFLOPs |" in stdout


def test_kept_schedules_keep_the_structure_and_end_at_kept():
    preset, _ = load_config_dict("7b")
    base = preset["schedule"]
    assert kept_schedule(preset, 64) == base  # the paper's count gives the preset back
    assert kept_schedule(preset, 16) == {"vision": [416, 304, 224, 160, 120, 88, 64, 48], "llm": [32, 24, 16, 16]}
    for kept in (1, 16, 32, 100, 128, 256, 512, 576):
        schedule = kept_schedule(preset, kept)
        # --kept K runs what the budget K derives (the one rule)
        assert schedule == IvtpConfig(**dict(preset, schedule=None, pruning_method="ivtp",
                                             pruning_options={"visual_tokens": kept})).schedule
        counts = schedule["vision"] + schedule["llm"]
        assert len(schedule["vision"]) == len(base["vision"]) and len(schedule["llm"]) == len(base["llm"])
        assert counts[-1] == kept and all(kept <= c <= 576 for c in counts)
        assert counts == sorted(counts, reverse=True)
        IvtpConfig(**dict(preset, schedule=schedule))  # a valid config
    assert kept_schedule(preset, 576) == {"vision": [576] * 8, "llm": [576] * 4}
    # Fewer kept tokens cut every group at least as deep.
    small, large = kept_schedule(preset, 16), kept_schedule(preset, 256)
    assert all(a <= b for a, b in zip(small["vision"] + small["llm"], large["vision"] + large["llm"]))


def test_named_narrow_shape_keeps_the_paper_schedule_structure():
    config = IvtpConfig(**load_config_dict("7b-narrow")[0])
    preset = IvtpConfig(**load_config_dict("7b")[0])
    assert config.num_patches == 576 and config.schedule == preset.schedule
    assert config.vision_layer_groups == preset.vision_layer_groups
    assert config.llm_layer_groups == preset.llm_layer_groups
    assert config.text_config.num_hidden_layers == 32 and config.vision_config.num_hidden_layers == 24
    assert config.text_config.hidden_size * 8 == preset.text_config.hidden_size
    assert config.clip_text_encoder is not None


@pytest.mark.parametrize(("size", "dtype", "fits"), [("7b", "bfloat16", True), ("13b", "bfloat16", True),
                                                     ("7b", "float32", True), ("13b", "float32", False)])
def test_device_memory_check_of_the_shared_weights(size, dtype, fits):
    """On a device with 78 GiB free (an H100), the weights twice (the shared copy and a model being built): the 7B
    in bf16 (about 27 GiB), the 13B in bf16 (about 50 GiB) and the 7B in float32 (about 53 GiB) fit; the 13B in
    float32 (about 100 GiB) is refused before anything is built."""
    config = IvtpConfig(**load_config_dict(size)[0])
    free = 78 * 2**30
    if fits:
        check_device_memory(config, dtype, free)
    else:
        with pytest.raises(BenchError, match=rf"--dtype {dtype}: the shared weights and a model being built take [\d.]+ GiB"):
            check_device_memory(config, dtype, free)


def test_cuda_pruning_share_refuses_a_profile_without_kernels():
    """A profile with no device time (here a CPU profile) must not report a 0% pruning share on CUDA."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("bench/prefill"), torch.profiler.record_function("ivtp/llm_scoring"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    on_cpu = pruning_times_from_profile(prof, torch.device("cpu"))
    assert on_cpu["profiled_prefill_ms"] > 0 and on_cpu["pruning_ms"] > 0
    with pytest.raises(BenchError, match="no CUDA kernel time"):
        pruning_times_from_profile(prof, torch.device("cuda"))


def test_a_variant_per_method(tiny_json, tmp_path, capsys):
    """`--methods all`: every method of the registry measured beside stock, on the same weights and prompts, with
    its counted FLOPs and its pruning share from the runner's labels around the method's own work."""
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS

    out = tmp_path / "methods.json"
    rc, stdout, _ = run_cli(["--config", str(tiny_json), "--batch-sizes", "1", "--text-tokens", str(TEXT_TOKENS),
                             "--methods", "all", "--json", str(out), *FAST], capsys)
    assert rc == 0
    report = json.loads(out.read_text())
    methods = [f"method:{name}" for name in PRUNING_METHODS if name != "ivtp"]
    assert [result["variant"] for result in report["results"]] == ["stock_sdpa", "ivtp_sdpa", "ivtp_eager", *methods]
    for name in methods:
        result = next(result for result in report["results"] if result["variant"] == name)
        assert result["kv_cache_bytes"] < report["results"][0]["kv_cache_bytes"], name
        assert result["kv_cache_matches_analytic"] is None  # the analytic formula knows IVTP's schedule only
        assert 0.0 < result["pruning"]["share"] < 1.0, name
        assert report["flops"]["methods"][name]["speedup"] > 1.0, name
        assert f"| 1 | {name.removeprefix('method:')} (sdpa) |" in stdout
    assert {row["variant"] for row in report["comparisons"]} == {"ivtp_sdpa", "ivtp_eager", *methods}
    rc, _, err = run_cli(["--config", str(tiny_json), "--methods", "fast_v", *FAST], capsys)
    assert rc == 2 and "--methods ['fast_v']" in err


def test_every_pruned_variant_gets_the_guidance_inputs():
    """The processor's guidance inputs reach every pruned variant (CDPruner's relevance and FastV's / PDrop's last
    instruction token need them, as IVTP's pseudo-CLS does), never stock Llava, which takes none."""
    from llava_ivtp.measuring.bench_measure import Runner
    from llava_ivtp.measuring.bench_setup import build_inputs

    config = IvtpConfig(**tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT))
    common, guidance = build_inputs(config, 2, TEXT_TOKENS, torch.device("cpu"), torch.float32, seed=0)
    assert {"instruction_mask", "clip_input_ids", "clip_token_spans"} <= set(guidance)
    for name in ("ivtp_sdpa", "ivtp_eager", "method:cdpruner", "method:fastv"):
        assert set(guidance) <= set(Runner(name, None, common, guidance, torch.device("cpu"), 1).inputs), name
    assert not set(guidance) & set(Runner("stock_sdpa", None, common, guidance, torch.device("cpu"), 1).inputs)
