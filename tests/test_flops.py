"""`llava-ivtp flops`: FLOPs counted on the real forward, pinned to the paper (Tables 1, 2, 3, 9).

The paper's figures are checked against `measure()`, the weight-free count the CLI prints. That count runs the model
classes' own forward on meta weights; the first tests check, on small models with random weights, that it books
exactly the same FLOPs (module by module) as FlopCounterMode around a real CPU forward.
"""

import functools
import json
from pathlib import Path

import pytest
import torch

from llava_ivtp.cli import main
from llava_ivtp.measuring.analytic_flops import llava_flops
from llava_ivtp.measuring.flops import (
    WeightFreeMode,
    build_weight_free,
    count_forward,
    example_inputs,
    ivtp_config,
    measure,
    part_breakdown,
    stock_llava_config,
    topk_config,
    visual_tokens_into_llm,
)
from modeling_llava_ivtp import IvtpConfig
from modeling_llava_ivtp.pruner_base import budget_schedule
from modeling_llava_ivtp.transformers_compat import output_cache
from tiny_models import TINY_CLIP_TEXT, stock_twin, tiny_config_dict, tiny_model


PRESETS = Path(__file__).resolve().parent.parent / "configuration"
TERA = 1e12


def relative_error(measured: float, expected: float) -> float:
    return abs(measured - expected) / expected


@functools.lru_cache(maxsize=None)
def preset(size: str) -> IvtpConfig:
    config = IvtpConfig.from_json_file(PRESETS / f"llava-1.5-{size}-ivtp.json")
    config._attn_implementation = "sdpa"
    return config


@functools.lru_cache(maxsize=None)
def counted(size: str, row: str, text_tokens: int):
    """The weight-free count of one row of `llava-ivtp flops` (same functions the CLI calls)."""
    config = {
        "stock": lambda: stock_llava_config(preset(size)),
        "topk": lambda: topk_config(preset(size)),
        "ivtp": lambda: ivtp_config(preset(size))[0],
    }[row]()
    return measure(config, text_tokens)


# ------------------------------------------------------------------------------------------------------------------
# The weight-free count is the real forward's count
# ------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tiny_rows():
    ivtp = tiny_model(clip_text_encoder=TINY_CLIP_TEXT)
    topk = tiny_model(schedule={"vision": [24, 16, 8], "llm": []})
    return {"stock": stock_twin(ivtp), "topk": topk, "ivtp": ivtp}


@pytest.mark.parametrize("row", ["stock", "topk", "ivtp"])
def test_weight_free_count_equals_the_real_forward_count(row):
    """Same FLOPs, module by module and op by op, as FlopCounterMode around a real CPU forward with random weights."""
    real = _tiny_rows()[row]
    inputs = example_inputs(real.config, text_tokens=14, prefix_tokens=3, seed=1)
    real_counts, substituted, real_output = count_forward(real, inputs, weight_free=False)
    assert substituted == []

    meta = build_weight_free(real.config)
    assert all(parameter.device.type == "meta" for parameter in meta.parameters())
    meta_inputs = dict(inputs, pixel_values=inputs["pixel_values"].to("meta"))
    meta_counts, substituted, meta_output = count_forward(meta, meta_inputs, weight_free=True)
    assert meta_counts == real_counts
    assert meta_output.logits.device.type == "meta" and meta_output.logits.shape == real_output.logits.shape
    # Only the choice of kept tokens, and IVTP's relevance copied to the CPU (a value, no shape), ran on zeros.
    assert set(substituted) <= {"aten.sort.stable", "aten._to_copy.default"}

    num_images = inputs["pixel_values"].shape[0]
    real_parts = part_breakdown(real, real_counts, 14, num_images)
    meta_parts = part_breakdown(meta, meta_counts, 14, num_images)
    assert real_parts == meta_parts
    assert meta_parts.total == real_counts["Global"] - meta_parts.not_counted
    if row == "stock":
        assert meta_parts.extra == 0 and meta_parts.not_counted > 0  # the 7th vision layer runs, unused
    else:
        assert meta_parts.not_counted == 0 and meta_parts.extra > 0
        assert tuple(real_output.vision_token_counts) == tuple(real.config.schedule["vision"])
    if row == "ivtp":
        assert 0 < meta_parts.clip_text_tower < meta_parts.extra
        assert tuple(real_output.llm_token_counts) == tuple(real.config.schedule["llm"])


def test_parts_follow_the_token_counts():
    """More kept tokens cost more in the part that sees them; pruning off costs what stock Llava costs."""
    config = IvtpConfig(**tiny_config_dict(schedule=None))
    config._attn_implementation = "sdpa"
    unpruned = measure(config, 20, prefix_tokens=3)
    stock = measure(stock_llava_config(config), 20, prefix_tokens=3)
    assert (unpruned.vit, unpruned.llm, unpruned.extra, unpruned.total) == (stock.vit, stock.llm, 0, stock.total)
    small = measure(topk_config(IvtpConfig(**tiny_config_dict()), [24, 16, 4]), 20, prefix_tokens=3)
    large = measure(topk_config(IvtpConfig(**tiny_config_dict()), [24, 16, 12]), 20, prefix_tokens=3)
    assert small.vit == large.vit  # the last group's count acts after the last vision layer
    assert small.llm < large.llm < stock.llm


def test_stage_2_scoring_never_runs_a_projection_again():
    """Scoring reads the queries, keys and values the decoder layers computed (`attention_rows.py`): with a cache
    (the prefill `generate` runs) and without one (training, `use_cache=False`) alike, each layer's `q_proj`,
    `k_proj` and `v_proj` run once, in the layer's own call over its tokens (the pseudo-CLS included), and the two
    forwards count the same FLOPs."""
    model = _tiny_rows()["ivtp"]
    text = model.config.text_config
    inputs = example_inputs(model.config, text_tokens=14, prefix_tokens=3, seed=1)
    cached, _, output = count_forward(model, inputs, weight_free=False, use_cache=True)
    uncached, _, _ = count_forward(model, inputs, weight_free=False, use_cache=False)
    head_dim = text.hidden_size // text.num_attention_heads
    stage_2_layers = range(model.config.group_size * len(model.config.schedule["llm"]))
    tokens_per_layer = [layer.keys.shape[-2] for layer in output_cache(output).layers]
    for layer_idx in stage_2_layers:
        for projection, heads in (("q_proj", text.num_attention_heads), ("k_proj", text.num_key_value_heads),
                                  ("v_proj", text.num_key_value_heads)):
            own_call = 2 * (tokens_per_layer[layer_idx] + 1) * text.hidden_size * heads * head_dim  # + 1: pseudo-CLS
            name = f"LlavaIvtpForConditionalGeneration.model.language_model.layers.{layer_idx}.self_attn.{projection}"
            assert cached[name] == uncached[name] == own_call, (name, cached[name], uncached[name], own_call)
    assert cached["Global"] == uncached["Global"]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_vision_layers_run_for_scoring_count_as_the_stock_layers(batch_size):
    """Stage 1 runs its vision layers through their submodules (the probabilities it scores with are the ones the
    layer's output uses). With nothing pruned, ViT must be exactly stock Llava's vision tower, counted around the
    stock layers' own forward; the scoring's own products are in `extra`."""
    config = IvtpConfig(**tiny_config_dict(schedule={"vision": [36, 36, 36], "llm": []}))
    config._attn_implementation = "sdpa"
    ivtp = measure(config, 20, prefix_tokens=3, batch_size=batch_size)
    stock = measure(stock_llava_config(config), 20, prefix_tokens=3, batch_size=batch_size)
    assert ivtp.vit == stock.vit
    assert ivtp.extra > 0


def test_weight_free_mode_refuses_weight_dependent_values():
    weight = torch.empty(4, 4, device="meta")
    with WeightFreeMode(), pytest.raises(RuntimeError, match="depends on the weights"):
        (torch.ones(4) @ weight).sum().item()


def test_topk_default_schedule_is_geometric_to_64():
    schedule = budget_schedule(preset("7b"), 64, llm=False)
    assert schedule == {"vision": [440, 336, 256, 192, 144, 112, 88, 64], "llm": []}
    assert topk_config(preset("7b")).schedule == schedule


# ------------------------------------------------------------------------------------------------------------------
# Pinned to the paper
# ------------------------------------------------------------------------------------------------------------------
def test_stock_7b_at_512_text_tokens_is_table_9():
    """Table 9 (and Table 1): LLaVA-1.5-7B, batch 1, 512 text tokens: ViT 0.361 + LLM 15.003 = 15.364 TFLOPs."""
    stock = counted("7b", "stock", 512)
    assert relative_error(stock.total / TERA, 15.364) < 0.01, stock
    assert relative_error(stock.vit / TERA, 0.361) < 0.02, stock
    assert relative_error(stock.llm / TERA, 15.003) < 0.02, stock
    assert stock.extra == 0 and stock.visual_tokens_into_llm == 576


@pytest.mark.parametrize("text_tokens, paper", [(128, 9.9), (256, 11.7), (512, 15.4), (1024, 22.9)])
def test_stock_7b_follows_table_3(text_tokens, paper):
    assert relative_error(counted("7b", "stock", text_tokens).total / TERA, paper) < 0.01


def test_stock_13b_at_512_text_tokens_is_table_2():
    """Table 2: LLaVA-1.5-13B, batch 1, 512 text tokens: 29.4 TFLOPs."""
    assert relative_error(counted("13b", "stock", 512).total / TERA, 29.4) < 0.01


def test_7b_preset_ivtp_is_table_9():
    """Table 9: IVTP 8.228 TFLOPs (-46.8%) at 512 text tokens; the count includes the CLIP text tower and scoring."""
    stock, ivtp = counted("7b", "stock", 512), counted("7b", "ivtp", 512)
    assert relative_error(ivtp.total / TERA, 8.228) < 0.05, ivtp
    assert ivtp.total < 0.54 * stock.total
    assert ivtp.vit < stock.vit and ivtp.llm < stock.llm
    assert ivtp.clip_text_tower > 0 and ivtp.extra > ivtp.clip_text_tower
    assert ivtp.visual_tokens_into_llm == preset("7b").schedule["vision"][-1]


def test_stock_count_is_the_analytic_convention():
    """The analytic formulas of `analytic_flops` (used to pick the presets) are what the stock forward runs: same
    ViT; the LLM differs by the projector and the rotary tables, which the formulas leave out."""
    unpruned = IvtpConfig.from_dict({**preset("7b").to_dict(), "schedule": None})
    stock, analytic = counted("7b", "stock", 512), llava_flops(unpruned, 512)
    assert stock.vit == analytic["vit"]
    text, vision = preset("7b").text_config, preset("7b").vision_config
    projector = 2 * 576 * (vision.hidden_size * text.hidden_size + text.hidden_size * text.hidden_size)
    assert 0 <= stock.llm - analytic["llm"] - projector < 1e-6 * stock.llm  # rotary: 2 * 64 * 1088 per call


# ------------------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny-ivtp.json"
    IvtpConfig(**tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)).to_json_file(path)
    return path


def test_cli_markdown_prints_tables_3_and_9(tiny_preset, capsys):
    assert main(["flops", "--preset", str(tiny_preset), "--text-tokens", "8", "16", "--breakdown-at", "16"]) == 0
    output = capsys.readouterr().out
    assert "(paper Table 3)" in output and "at 16 text tokens (paper Table 9)" in output
    assert "| method | 8 | 16 |" in output
    assert "| method | visual tokens in LLM | mean per LLM layer | ViT | LLM | extra | total | vs stock |" in output
    for label in ("| LLaVA-1.5 (stock) |", "| TopK (vision only, to 5) |", "| IVTP (preset) |"):
        assert output.count(label) == 2, label
    assert "| IVTP (preset) | 12 -> 5 | 7.5 |" in output  # (12 * 2 + 8 * 2 + 5 * 4) / 8 tokens per layer
    assert "runs over its whole context of 77 tokens" in output


def test_cli_rows_per_method(tiny_preset, capsys):
    """`--methods all`: one row per registered method at the budget, with what its layers held."""
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS

    assert main(["flops", "--preset", str(tiny_preset), "--text-tokens", "16", "--methods", "all",
                 "--visual-tokens", "8", "--format", "json"]) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    stock = rows["stock"]["results"][0]
    for method in PRUNING_METHODS:
        result = rows[f"method:{method}"]["results"][0]
        assert rows[f"method:{method}"]["label"] == f"{method} @8"
        assert result["visual_tokens_last_layer"] == 8, method
        assert 8 <= result["mean_visual_tokens_per_llm_layer"] < 36 and result["ratio_to_stock"] < 1, method
    fastv = rows["method:fastv"]["results"][0]
    assert fastv["visual_tokens_into_llm"] == 36 and fastv["mean_visual_tokens_per_llm_layer"] == (2 * 36 + 6 * 8) / 8
    assert rows["method:topk"]["results"][0]["tflops"]["vit"] < stock["tflops"]["vit"]  # pruned inside the tower
    assert rows["method:divprune"]["results"][0]["tflops"]["vit"] == stock["tflops"]["vit"]  # after it
    assert main(["flops", "--preset", str(tiny_preset), "--methods", "fast_v"]) == 2
    assert "--methods ['fast_v'] are not methods" in capsys.readouterr().err


def test_cli_json_is_the_measured_counts(tiny_preset, capsys):
    args = ["flops", "--preset", str(tiny_preset), "--text-tokens", "10", "20", "--format", "json",
            "--topk-vision", "24,16,6", "--prefix-tokens", "2"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["key"] for row in report["rows"]] == ["stock", "topk", "ivtp"]
    assert report["rows"][1]["schedule"] == {"vision": [24, 16, 6], "llm": []}
    assert report["clip_text_tokens"] == 77 and report["prefix_tokens"] == 2
    config = IvtpConfig.from_json_file(tiny_preset)
    config._attn_implementation = "sdpa"
    for row, rebuilt in zip(report["rows"], [stock_llava_config(config), topk_config(config, [24, 16, 6]), config]):
        assert [result["text_tokens"] for result in row["results"]] == [10, 20]
        for result in row["results"]:
            flops = result["flops"]
            assert flops["vit"] + flops["llm"] + flops["extra"] == flops["total"]
            assert result["tflops"]["total"] == flops["total"] / 1e12
            assert result["visual_tokens_into_llm"] == visual_tokens_into_llm(rebuilt)
    expected = measure(config, 20, prefix_tokens=2)  # what the CLI printed is the count of the forward
    assert report["rows"][2]["results"][1]["flops"]["total"] == expected.total
    assert report["rows"][2]["results"][1]["flops"]["clip_text_tower"] == expected.clip_text_tower > 0
    assert report["rows"][0]["results"][0]["ratio_to_stock"] == 1.0
    assert report["rows"][2]["results"][0]["ratio_to_stock"] < report["rows"][0]["results"][0]["ratio_to_stock"]


def test_cli_errors(tmp_path, capsys):
    assert main(["flops", "--preset", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["flops", "--text-tokens", "128", "--breakdown-at", "512"]) == 2
    assert "--breakdown-at" in capsys.readouterr().err
    assert main(["flops", "--text-tokens", "300", "--topk-vision", "500,400"]) == 2
    assert "one entry per vision group" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "--preset", "x.json", "--model-size", "7b"])


# ------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "ivtp", "visionzip", "cdpruner", "tome_plus"])
def test_next_weight_free_count_equals_the_real_forward_count(method):
    """LLaVA-NeXT (stock, and methods at each site: the tower per crop, the crops after the projector, the LLM): the
    weight-free count of one image of 40 x 36 px (5 crops) equals FlopCounterMode around a real CPU forward."""
    from modeling_llava_ivtp import LlavaNextIvtpForConditionalGeneration
    from tiny_models import next_stock_twin, tiny_next_model

    if method is None:
        real = next_stock_twin(tiny_next_model())
    else:
        real = tiny_next_model(pruning_method=method, pruning_options={"visual_tokens": 40}, clip_text_encoder=TINY_CLIP_TEXT)
        assert isinstance(real, LlavaNextIvtpForConditionalGeneration)
    inputs = example_inputs(real.config, text_tokens=14, prefix_tokens=3, seed=1, image_size=(40, 36))
    assert inputs["pixel_values"].shape == (1, 5, 3, 24, 24) and inputs["image_sizes"].tolist() == [[40, 36]]
    real_counts, substituted, real_output = count_forward(real, inputs, weight_free=False)
    meta = build_weight_free(real.config)
    meta_inputs = dict(inputs, pixel_values=inputs["pixel_values"].to("meta"))
    meta_counts, substituted, meta_output = count_forward(meta, meta_inputs, weight_free=True)
    assert meta_counts == real_counts, method
    assert meta_output.logits.shape == real_output.logits.shape
    assert part_breakdown(real, real_counts, 14, 1) == part_breakdown(meta, meta_counts, 14, 1)


def test_next_cli_counts_every_method_at_a_budget(tmp_path, capsys):
    """A LLaVA-NeXT preset: the stock row holds the image's packed length; every method's row at the budget keeps at
    most the budget in the last layer and costs less than stock."""
    from modeling_llava_ivtp import IvtpNextConfig
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS
    from tiny_models import tiny_next_config_dict

    path = tmp_path / "tiny-next-ivtp.json"
    IvtpNextConfig(**tiny_next_config_dict(pruning_method="ivtp", pruning_options={"visual_tokens": 40},
                                           clip_text_encoder=TINY_CLIP_TEXT)).to_json_file(path)
    assert main(["flops", "--preset", str(path), "--text-tokens", "16", "--methods", "all", "--visual-tokens", "40",
                 "--image-size", "40", "36", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["host"] == "LLaVA-NeXT" and report["image_size"] == [40, 36] and report["image_tokens"] == 168
    rows = {row["key"]: row for row in report["rows"]}
    stock = rows["stock"]["results"][0]
    assert stock["visual_tokens_into_llm"] == stock["visual_tokens_last_layer"] == 168
    for method in PRUNING_METHODS:
        result = rows[f"method:{method}"]["results"][0]
        assert result["visual_tokens_last_layer"] <= 40 and result["ratio_to_stock"] < 1, method
    assert main(["flops", "--preset", str(path), "--text-tokens", "16"]) == 0
    assert "| LLaVA-NeXT (stock) |" in capsys.readouterr().out
