"""Bad inputs through the public API: each gets a clear error that names the input and what is allowed, and none of
our tools destroys a user's files or loses measured results.

Areas: config (also edited after construction), forward, generate, processor, command line, save/load. Every case
asserts the error type and that the message names the input; the data-safety cases check the files afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_ivtp.cli import main as cli_main
from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration
from modeling_llava_ivtp.transformers_compat import cache_kwargs, output_cache
from tiny_models import (
    IMAGE_TOKEN_ID,
    TINY_CLIP_TEXT,
    left_pad,
    make_images,
    make_pixels,
    make_prompt,
    tiny_config_dict,
    tiny_model,
    tiny_processor,
    write_llava_hf,
    write_open_clip,
)


GREEDY = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]}
PROMPTS = ["USER: <image>\nWhat color is the dog? ASSISTANT:", "USER: <image>\nIs it big? ASSISTANT:"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def inputs(processor):
    return dict(processor(images=make_images(2), text=PROMPTS, padding=True, return_tensors="pt"))


def raises(error, *patterns):
    """`pytest.raises(error)` whose message must match every pattern (the input's name first)."""

    @contextlib.contextmanager
    def check():
        with pytest.raises(error) as caught:
            yield caught
        for pattern in patterns:
            assert re.search(pattern, str(caught.value)), f"{pattern!r} not in: {caught.value}"

    return check()


# ------------------------------------------------------------------------------------------------------------------
# Config: edited after construction, or through from_pretrained's overrides (13 cases)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("tau", float("nan"), r"\[-1, 1\]"),
        ("tau", 2.0, r"\[-1, 1\]"),
        ("tau", "high", r"\[-1, 1\]"),
        ("group_size", 0, ">= 1"),
        ("group_size", 2.5, ">= 1"),
        ("guidance", "nope", "clip_relevance"),
        ("clip_text_encoder", "ViT-L-14", "dict"),
    ],
)
def test_config_field_assigned_after_construction_is_checked_before_it_is_stored(field, value, allowed):
    config = IvtpConfig(**tiny_config_dict())
    before = getattr(config, field)
    with raises(ValueError, f"`{field}`", allowed):
        setattr(config, field, value)
    assert getattr(config, field) == before  # the bad value never landed


def test_from_pretrained_override_is_checked(tmp_path):
    IvtpConfig(**tiny_config_dict()).save_pretrained(tmp_path)
    with raises(ValueError, "`tau`"):
        IvtpConfig.from_pretrained(tmp_path, tau=float("nan"))
    tiny_model().save_pretrained(tmp_path / "model")
    with raises(ValueError, "`guidance`"):
        LlavaIvtpForConditionalGeneration.from_pretrained(tmp_path / "model", guidance="nope")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda config: setattr(config, "schedule", {"vision": [24, 16, 40], "llm": []}), r'schedule\["vision"\]\[2\]'),
        (lambda config: setattr(config, "schedule", {"vision": [24, 16, 12]}), "schedule"),
        (lambda config: setattr(config, "group_size", 3), r'schedule\["vision"\]'),  # 3 groups of 2 -> 2 of 3
    ],
)
def test_schedule_edited_after_construction_is_checked_when_used_and_never_saved(edit, field, tmp_path):
    model = tiny_model()
    edit(model.config)
    with raises(ValueError, field):
        model(input_ids=torch.tensor([make_prompt(2, 3)]), pixel_values=make_pixels(1))
    with raises(ValueError, field):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "config.json").exists()


def test_schedule_counts_may_be_any_integral_numbers():
    schedule = {"vision": [np.int64(24), np.int32(16), 12], "llm": [np.int64(8), 5]}
    config = IvtpConfig(**tiny_config_dict(schedule=schedule))
    assert config.schedule == {"vision": [24, 16, 12], "llm": [8, 5]}
    assert all(type(count) is int for stage in config.schedule.values() for count in stage)
    json.loads(config.to_json_string())  # serialisable


# ------------------------------------------------------------------------------------------------------------------
# Forward (31 cases)
# ------------------------------------------------------------------------------------------------------------------
ROUTES = ["pruned", "pruning off", "text only"]


def route_batch(route: str):
    """A left-padded batch of 2 for a route: with images (pruned or pruning off) or text only."""
    if route == "text only":
        input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]])
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    input_ids, attention_mask = left_pad([make_prompt(2, 5), make_prompt(4, 3, seed=1)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": make_pixels(2)}


def route_model(route: str):
    return tiny_model(clip_text_encoder=TINY_CLIP_TEXT, **({"schedule": None} if route == "pruning off" else {}))


def with_change(batch: dict, name: str, value) -> dict:
    batch = dict(batch)
    if value is None:
        batch.pop(name)
    else:
        batch[name] = value
    return batch


SEQUENCE_CASES = {
    "attention_mask too short": (lambda b: with_change(b, "attention_mask", b["attention_mask"][:, 1:]), "attention_mask", r"\(2, \d+\)"),
    "labels too long": (lambda b: with_change(b, "labels", torch.cat([b["input_ids"], b["input_ids"][:, :2]], 1)), "labels", "one label per token"),
    "position_ids too short": (lambda b: with_change(b, "position_ids", torch.arange(3).unsqueeze(0)), "position_ids", r"\(batch, sequence\)"),
    "negative token id": (lambda b: with_change(b, "input_ids", b["input_ids"].clone().index_fill_(1, torch.tensor([1]), -3)), "input_ids", r"\[0, 99\)"),
    "token id past the vocabulary": (lambda b: with_change(b, "input_ids", b["input_ids"].clone().index_fill_(1, torch.tensor([1]), 99)), "input_ids", r"\[0, 99\)"),
    "float token ids": (lambda b: with_change(b, "input_ids", b["input_ids"].float()), "input_ids", "integer token ids"),
    "inputs_embeds of the wrong width": (lambda b: with_change(with_change(b, "input_ids", None), "inputs_embeds", torch.zeros(2, b["input_ids"].shape[1], 31)), "inputs_embeds", r"hidden size"),
}


# Checks that read values off the device; with pruning off the embedding raises stock Llava's error instead.
VALUE_CASES = ("negative token id", "token id past the vocabulary")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(SEQUENCE_CASES))
def test_forward_sequence_inputs(route, case):
    change, name, allowed = SEQUENCE_CASES[case]
    model = route_model(route)
    if route == "pruning off" and case in VALUE_CASES:
        # Pruning off runs stock Llava's operators and nothing else (no read of the ids): stock's own error.
        with pytest.raises(IndexError, match="index out of range"):
            model(**change(route_batch(route)))
        return
    with raises(ValueError, f"`{name}`", allowed):
        model(**change(route_batch(route)))


@pytest.mark.parametrize(
    "input_ids, message",
    [(torch.zeros(1, 0, dtype=torch.long), "empty"), (torch.zeros(0, 8, dtype=torch.long), "empty")],
    ids=["no tokens", "batch of 0"],
)
def test_empty_inputs(input_ids, message):
    with raises(ValueError, "`input_ids`", message):
        tiny_model()(input_ids=input_ids)


@pytest.mark.parametrize("channels, size", [(1, 24), (4, 24), (3, 32)], ids=["1 channel", "4 channels", "32 px"])
@pytest.mark.parametrize("route", ["pruned", "pruning off"])
def test_pixel_values_of_the_wrong_geometry(route, channels, size):
    batch = route_batch(route)
    batch["pixel_values"] = torch.zeros(2, channels, size, size)
    with raises(ValueError, "`pixel_values`", r"\(num_images, 3, 24, 24\)"):
        route_model(route)(**batch)


def guided(model_inputs: dict, **changes) -> dict:
    return {**model_inputs, **changes}


@pytest.mark.parametrize(
    "name, make, allowed",
    [
        ("clip_input_ids", lambda i: i["clip_input_ids"].clone().index_fill_(1, torch.tensor([3]), -1), r"\[0, 49408\)"),
        ("clip_input_ids", lambda i: i["clip_input_ids"].clone().index_fill_(1, torch.tensor([3]), 49408), r"\[0, 49408\)"),
        ("clip_input_ids", lambda i: torch.cat([i["clip_input_ids"], i["clip_input_ids"][:, :1]], 1), "context of 77"),
        ("clip_token_spans", lambda i: i["clip_token_spans"].clone().index_fill_(2, torch.tensor([0]), -1), "0 <= start"),
        ("clip_token_spans", lambda i: torch.stack([i["clip_token_spans"][..., 1] + 1, i["clip_token_spans"][..., 1]], -1), "start after its end"),
        ("clip_token_spans", lambda i: i["clip_token_spans"] + 77, r"<= 77"),
        ("instruction_mask", lambda i: i["instruction_mask"][:, 2:], "shape of `input_ids`"),
    ],
    ids=["clip id negative", "clip id past vocab", "clip context too long", "span start negative", "span reversed",
         "span past context", "mask too short"],
)
def test_guidance_values_are_checked(model, inputs, name, make, allowed):
    with raises(ValueError, f"`{name}`", allowed):
        model(**guided(inputs, **{name: make(inputs)}))


def test_image_placeholders_without_pixel_values_are_refused(model, inputs):
    text_inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
    with raises(ValueError, "image placeholder", "`pixel_values`"):
        model(**text_inputs)
    with raises(ValueError, "image placeholder", "`pixel_values`"):
        model.generate(**text_inputs, max_new_tokens=2, **GREEDY)


def test_output_attentions_is_refused_the_same_way_by_argument_and_by_config(inputs):
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, attn_implementation="eager")  # sdpa configs refuse the flag
    with raises(ValueError, "`output_attentions`", "not supported"):
        model(**inputs, output_attentions=True)
    with raises(ValueError, "`output_attentions`", "not supported"):  # the layers run the recording twin of eager
        model.config.output_attentions = True
        model(**inputs)


@pytest.mark.parametrize("request_, message", [([0, 9], "out of range"), ("yes", "a bool, an int or a list")])
def test_bad_output_hidden_states_requests(model, inputs, request_, message):
    with raises(ValueError, "`output_hidden_states`", message):
        model(**inputs, output_hidden_states=request_)


def test_output_hidden_states_by_index_is_honoured_for_the_tokens_each_layer_held(model, inputs):
    with torch.no_grad():
        every = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        some = model(**inputs, output_hidden_states=[0, 2, -1], use_cache=False).hidden_states
    assert len(some) == len(every) == 9
    assert [index for index, hidden in enumerate(some) if hidden is not None] == [0, 2, 8]
    for index in (0, 2, 8):
        torch.testing.assert_close(some[index], every[index])
    assert every[0].shape[1] > every[8].shape[1]  # layer 0 held more tokens than the last


def test_wrong_placeholder_count_for_the_images(model, inputs):
    with raises(ValueError, "36 image placeholder tokens", "Use the model's processor"):
        model(**guided(inputs, pixel_values=make_pixels(3)))


# ------------------------------------------------------------------------------------------------------------------
# Generate (8 cases)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["instruction_mask", "clip_token_spans"])
@pytest.mark.parametrize("shift", [-5, 5], ids=["5 short", "5 long"])
def test_generate_checks_guidance_length_like_forward(model, inputs, name, shift):
    value = inputs[name]
    if shift < 0:
        value = value[:, -shift:]
    else:
        value = torch.cat([value, torch.zeros_like(value[:, :shift])], dim=1)
    bad = guided(inputs, **{name: value})
    with raises(ValueError, f"`{name}`", "shape"):
        model(**bad)
    with raises(ValueError, f"`{name}`", "shape"):
        model.generate(**bad, max_new_tokens=2, **GREEDY)
    with raises(ValueError, f"`{name}`", "shape"):
        model.generate(**bad, max_new_tokens=2, use_cache=False, **GREEDY)


def test_generate_continued_without_the_conversation_is_refused(model, inputs):
    first = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    cache = output_cache(first)
    held = cache.get_seq_length()
    new_turn = torch.full((2, 4), 7)
    with raises(ValueError, f"holds the first {held} tokens", "`input_ids` must hold the whole conversation"):
        model.generate(input_ids=new_turn, attention_mask=torch.ones_like(new_turn), max_new_tokens=2,
                       **cache_kwargs(cache), **GREEDY)
    shorter = first.sequences[:, :-3]  # a cache longer than the input
    with raises(ValueError, f"holds the first {held} tokens", "Got 47 tokens" if shorter.shape[1] == 47 else "Got"):
        model.generate(input_ids=shorter, attention_mask=torch.ones_like(shorter), max_new_tokens=2,
                       **cache_kwargs(cache), **GREEDY)
    assert cache.get_seq_length() == held  # the refused calls left the cache as it was


def test_generate_with_a_cache_class_that_cannot_hold_pruned_tokens(model, inputs):
    with raises(ValueError, "cache_implementation", "IvtpCache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="quantized", **GREEDY)


# ------------------------------------------------------------------------------------------------------------------
# Processor (7 cases)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(text=5), "`text`"),
        (dict(text="USER: What? ASSISTANT:", instruction="absent words"), r"`instruction\[0\]`"),
        (dict(text=["USER: a? ASSISTANT:", "USER: b? ASSISTANT:"], instruction="a?"), "`instruction`"),
        (dict(text=["USER: a? ASSISTANT:"], instruction=[5]), r"`instruction\[0\]`"),
        (dict(text="USER: a? ASSISTANT:", instruction_spans=[[(0, 2)], [(0, 1)]]), "`instruction_spans`"),
        (dict(instruction="a?"), "`text`"),
    ],
    ids=["text not a string", "instruction not in prompt", "one instruction for a batch", "instruction not a string",
         "spans for another batch", "instruction without text"],
)
def test_processor_refuses_bad_arguments(processor, kwargs, name):
    with raises(ValueError, name):
        processor(**kwargs)


def test_processor_refuses_an_unknown_clip_tokenizer():
    with raises(ValueError, "`clip_model_name`"):
        tiny_processor(clip_model_name="ViT-Nope")


# ------------------------------------------------------------------------------------------------------------------
# Save / load (2 cases)
# ------------------------------------------------------------------------------------------------------------------
def test_checkpoint_without_the_clip_text_tower_it_names_is_refused(tmp_path):
    llava = tmp_path / "llava-hf"
    write_llava_hf(llava)
    config = IvtpConfig(**{**tiny_config_dict(), "clip_text_encoder": TINY_CLIP_TEXT})
    with raises(ValueError, "`config.clip_text_encoder`", "random", "llava-ivtp convert", "clip_text_encoder=None"):
        LlavaIvtpForConditionalGeneration.from_pretrained(llava, config=config)
    plain = LlavaIvtpForConditionalGeneration.from_pretrained(llava, config=IvtpConfig(**tiny_config_dict()))
    assert not hasattr(plain, "clip_text_model")  # no tower named, none needed


def test_missing_vision_weights_get_clips_own_init_as_in_stock_llava(tmp_path):
    """A checkpoint without some vision-tower weights: they are initialised as stock Llava initialises them (CLIP's
    attention and MLP scales), not with the generic std 0.02 transformers gives custom-code classes."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [key for key in weights if "vision_tower.encoder.layers.0." in key and key.endswith(("q_proj.weight", "fc1.weight"))]
    assert len(dropped) == 2
    save_file({key: value for key, value in weights.items() if key not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    ours = LlavaIvtpForConditionalGeneration.from_pretrained(tmp_path)
    vision = ours.config.vision_config
    width, layers = vision.hidden_size, vision.num_hidden_layers
    expected = {"q_proj": width**-0.5 * (2 * layers) ** -0.5, "fc1": (2 * width) ** -0.5}  # CLIP's _init_weights
    parameters = dict(ours.named_parameters())
    for key in dropped:
        name = "q_proj" if "q_proj" in key else "fc1"
        std = next(value for name_, value in parameters.items() if name_.endswith(key)).std().item()
        assert abs(std - expected[name]) < 0.25 * expected[name], (key, std, expected[name])
        assert abs(std - 0.02) > 0.01
    assert issubclass(LlavaIvtpForConditionalGeneration, LlavaForConditionalGeneration)


def test_generation_mixin_is_a_direct_base():
    from transformers import GenerationMixin

    assert GenerationMixin in LlavaIvtpForConditionalGeneration.__bases__


# ------------------------------------------------------------------------------------------------------------------
# Command line (14 cases) and data safety
# ------------------------------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "content, message",
    [("not json {", "not JSON"), ("[1, 2]", "JSON object"), ('{"model_type": "llava_ivtp", "tau": 7}', "`tau`")],
    ids=["not JSON", "a JSON list", "invalid config"],
)
def test_flops_refuses_a_bad_preset(tmp_path, capsys, content, message):
    preset = tmp_path / "preset.json"
    preset.write_text(content)
    code, out, err = run_cli(["flops", "--preset", str(preset)], capsys)
    assert code == 2 and "--preset" in err and re.search(message, err), err
    assert out == ""


@pytest.mark.parametrize(
    "content, message",
    [("[1, 2]", "JSON object"), ('{"schedule": {"vision": [], "llm": []}, "tau": 7}', "`tau`")],
    ids=["a JSON list", "invalid config"],
)
def test_bench_refuses_a_bad_config(tmp_path, capsys, content, message):
    config = tmp_path / "config.json"
    config.write_text(content)
    code, _, err = run_cli(["bench", "--config", str(config), "--no-progress"], capsys)
    assert code == 2 and "--config" in err and re.search(message, err), err


@pytest.fixture(scope="module")
def convert_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-convert")
    llava = write_llava_hf(root / "llava-hf")
    write_open_clip(root / "clip", llava)
    preset = root / "tiny-preset.json"
    preset.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict(), "tau": 0.0}))
    return root


def convert_argv(root: Path, out, llava=None, clip=None) -> list[str]:
    return [
        "convert", "--llava", str(llava or root / "llava-hf"), "--clip", clip or f"local-dir:{root / 'clip'}",
        "--preset", str(root / "tiny-preset.json"), "--out", str(out), "--clip-tokenizer", "ViT-L-14-336",
        "--base-model", "llava-hf/llava-1.5-7b-hf", "--overwrite",
    ]


def digest(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "out, message",
    [
        (lambda root: root / "llava-hf", "is --llava"),
        (lambda root: root / "llava-hf" / "ivtp", "inside --llava"),
        (lambda root: root, "contains --llava"),
        (lambda root: root / "clip", "is --clip"),
        (lambda root: root / "clip" / "sub", "inside --clip"),
    ],
    ids=["out is llava", "out inside llava", "out contains llava", "out is clip", "out inside clip"],
)
def test_convert_never_writes_over_its_inputs(convert_sources, capsys, out, message):
    before = digest(convert_sources)
    code, stdout, err = run_cli(convert_argv(convert_sources, out(convert_sources)), capsys)
    assert code == 2 and "--out" in err and re.search(message, err), err
    assert "error" not in stdout
    assert digest(convert_sources) == before  # byte-identical: nothing was written


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_convert_out_must_be_a_folder(convert_sources, tmp_path, capsys, where):
    existing = tmp_path / "file.txt"
    existing.write_text("mine")
    out = existing if where == "a file" else existing / "ivtp"
    code, _, err = run_cli(convert_argv(convert_sources, out), capsys)
    assert code == 2 and "--out" in err and "file" in err, err
    assert existing.read_text() == "mine"


def test_convert_reports_a_truncated_safetensors_file(convert_sources, tmp_path, capsys):
    broken = tmp_path / "llava-truncated"
    shutil.copytree(convert_sources / "llava-hf", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, stdout, err = run_cli(convert_argv(convert_sources, tmp_path / "out", llava=broken), capsys)
    assert code == 2 and "--llava" in err and "model.safetensors" in err, err
    assert "Traceback" not in err and stdout == ""
    assert not (tmp_path / "out").exists()


BENCH_FAST = ["--no-progress", "--threads", "1", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
              "--batch-sizes", "1", "--text-tokens", "8", "--profile-runs", "1"]


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-bad") / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)))
    return path


def test_bench_checks_output_paths_before_measuring(bench_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(["bench", "--config", str(bench_config), *BENCH_FAST, "--json", str(blocker / "out.json")], capsys)
    assert code == 2 and "--json" in err, err
    code, _, err = run_cli(["bench", "--config", str(bench_config), *BENCH_FAST, "--plot", str(tmp_path), "--plot-kept",
                            "4"], capsys)
    assert code == 2 and "--plot" in err and "folder" in err, err


def test_bench_writes_results_into_new_folders_and_before_the_plot(bench_config, tmp_path, capsys, monkeypatch):
    """`--plot` and `--json` into folders that do not exist yet are created before the run; the results are on disk
    before the plot is drawn, so a failure there loses nothing measured."""
    from llava_ivtp.measuring import bench as bench_ivtp

    def failing_plot(report, path):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(bench_ivtp, "draw_plot", failing_plot)
    json_path, plot_path = tmp_path / "new" / "results.json", tmp_path / "plots" / "sweep.png"
    with pytest.raises(RuntimeError, match="the plot failed"):
        cli_main(["bench", "--config", str(bench_config), *BENCH_FAST, "--json", str(json_path), "--plot",
                  str(plot_path), "--plot-kept", "4"])
    report = json.loads(json_path.read_text())
    assert {result["variant"] for result in report["results"]} == {"stock_sdpa", "ivtp_sdpa", "ivtp_eager"}
    assert [row["kept"] for row in report["sweep"]] == [4]
    assert plot_path.parent.is_dir()
    assert not math.isnan(report["results"][0]["prefill_ms"]["median"])


def test_convert_errors_go_to_stderr(convert_sources, tmp_path, capsys):
    code, stdout, err = run_cli(convert_argv(convert_sources, tmp_path / "out", clip="ViT-Nope:openai"), capsys)
    assert code == 2 and stdout == "" and err.startswith("llava-ivtp convert: error: --clip")


def test_flops_and_bench_and_convert_outputs_stay_quiet_on_stdout_on_error(tmp_path, capsys):
    code, stdout, err = run_cli(["flops", "--preset", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and stdout == "" and "--preset" in err




# ------------------------------------------------------------------------------------------------------------------
# Valid inputs near the checks: they must still work
# ------------------------------------------------------------------------------------------------------------------
def test_continuation_with_only_the_new_tokens_and_a_full_mask_equals_the_whole_conversation(model, inputs):
    """transformers also continues from the new tokens alone when `attention_mask` covers the whole conversation."""
    first = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    new_turn = torch.full((2, 3), 7)
    conversation = torch.cat([first.sequences, new_turn], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, conversation.shape[1] - inputs["attention_mask"].shape[1],
                                                           dtype=torch.long)], dim=1)
    whole = model.generate(input_ids=conversation, attention_mask=mask, max_new_tokens=3,
                           **cache_kwargs(copy_cache(output_cache(first))), **GREEDY)
    held = output_cache(first).get_seq_length()  # the last generated token is not in the cache yet
    only_new = model.generate(input_ids=conversation[:, held:], attention_mask=mask, max_new_tokens=3,
                              **cache_kwargs(copy_cache(output_cache(first))), **GREEDY)
    assert torch.equal(only_new[:, -3:], whole[:, -3:])


def copy_cache(cache):
    import copy

    return copy.deepcopy(cache)


def test_guidance_on_a_continuation_over_a_text_only_cache_is_cut_like_input_ids(processor):
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)
    first_turn = processor(text=["USER: Hello there. ASSISTANT:"], return_tensors="pt")
    first = model.generate(**first_turn, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    text = processor.tokenizer.decode(first.sequences[0], skip_special_tokens=True) + " USER: And now? ASSISTANT:"
    second_turn = processor(text=[text], return_tensors="pt")
    if second_turn["input_ids"].shape[1] <= first.sequences.shape[1]:
        pytest.skip("the re-tokenised conversation is not longer than the cache")
    out = model.generate(**second_turn, max_new_tokens=2, **cache_kwargs(output_cache(first)), **GREEDY)
    assert out.shape[1] == second_turn["input_ids"].shape[1] + 2
    bad = dict(second_turn, instruction_mask=second_turn["instruction_mask"][:, 1:])
    with raises(ValueError, "`instruction_mask`", "one entry per token"):
        model.generate(**bad, max_new_tokens=2, **cache_kwargs(output_cache(first)), **GREEDY)


def test_continuation_with_new_image_placeholders_over_a_pruned_cache_is_refused(model, inputs):
    first = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    conversation = torch.cat([first.sequences, torch.full((2, 3), IMAGE_TOKEN_ID)], dim=1)
    with raises(ValueError, "image placeholder", "`pixel_values`"):
        model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation), max_new_tokens=2,
                       **cache_kwargs(output_cache(first)), **GREEDY)


def test_pruning_off_with_a_static_cache_generates_as_stock():
    from tiny_models import make_batch, stock_twin

    model = tiny_model(schedule=None)
    batch = make_batch()
    ours = model.generate(**batch, max_new_tokens=3, cache_implementation="static", **GREEDY)
    theirs = stock_twin(model).generate(**batch, max_new_tokens=3, cache_implementation="static", **GREEDY)
    assert torch.equal(ours, theirs)


def test_schedule_override_of_from_pretrained_is_a_value_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with raises(ValueError, "`schedule`", "missing"):
        LlavaIvtpForConditionalGeneration.from_pretrained(tmp_path, schedule={"vision": [24, 16, 12]})


def test_convert_never_writes_over_its_preset(convert_sources, tmp_path, capsys):
    folder = tmp_path / "presets"
    folder.mkdir()
    preset = folder / "preset.json"
    shutil.copy(convert_sources / "tiny-preset.json", preset)
    argv = convert_argv(convert_sources, folder)
    argv[argv.index("--preset") + 1] = str(preset)
    before = preset.read_bytes()
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "contains --preset" in err, err
    assert preset.read_bytes() == before
