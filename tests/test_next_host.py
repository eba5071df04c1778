"""The LLaVA-NeXT host (`LlavaNextIvtpForConditionalGeneration`, `IvtpNextConfig`) on tiny random models: with
pruning off it is stock `LlavaNextForConditionalGeneration`, in padded batches of images with different aspect
ratios; it loads llava-hf's LLaVA-NeXT key format and reloads as remote code; a method that does not run on it yet is
refused (every registered method does: `tests/test_methods.py` runs its invariants over both hosts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from transformers import LlavaNextConfig

from modeling_llava_ivtp import IvtpNextConfig, LlavaNextIvtpForConditionalGeneration
from modeling_llava_ivtp.configuration_llava_ivtp import IVTP_FIELDS, IvtpConfig, stock_llava_fields
from modeling_llava_ivtp.transformers_compat import output_cache
from test_remote_code import NEXT_REMOTE_FILES, run_fresh
from tiny_models import (
    IMAGE_TOKEN_ID, TINY_CLIP_TEXT, llava_hf_state, make_next_batch, next_image_tokens, next_stock_twin, tiny_next_config_dict,
    tiny_next_model,
)


def test_placeholder_counts_follow_the_aspect_ratio():
    """The batch the tests use: a wide image (1x2 tiles, unpadded to 3 rows) and a near-square one (2x2 tiles), so
    the two samples have different crop and placeholder counts. (A square image takes the 1x2 grid, unpadded to 6x6.)"""
    model = tiny_next_model()
    assert next_image_tokens(model.config, [(20, 40), (40, 36), (24, 24)]) == [36 + 6 * 13, 36 + 12 * 11, 36 + 6 * 7]
    batch = make_next_batch(model.config)
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [114, 168]
    assert batch["pixel_values"].shape == (2, 5, 3, 24, 24)
    layouts = model.image_layouts(batch["image_sizes"])
    assert [layout.length for layout in layouts] == [114, 168] and [layout.crops for layout in layouts] == [3, 5]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_pruning_off_is_stock_llava_next_in_a_padded_batch(attn_implementation):
    model = tiny_next_model(attn_implementation=attn_implementation)
    stock = next_stock_twin(model, attn_implementation)
    batch = make_next_batch(model.config)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = model(**batch, labels=labels, output_hidden_states=True)
        theirs = stock(**batch, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    for mine, stocks in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, stocks, atol=1e-5, rtol=0)
    length = batch["input_ids"].shape[1]
    assert torch.equal(ours.kept_positions, torch.arange(length).expand(2, -1))
    with torch.no_grad():  # logits_to_keep: the positions say which rows are left
        last = model(**batch, logits_to_keep=1)
    assert last.logits.shape[1] == 1 and last.kept_positions.tolist() == [[length - 1], [length - 1]]


@pytest.mark.parametrize("mode", ["greedy", "sample", "beams"])
def test_pruning_off_generates_as_stock_llava_next(mode):
    model = tiny_next_model()
    stock = next_stock_twin(model)
    batch = make_next_batch(model.config)
    settings = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 5},
                "beams": {"do_sample": False, "num_beams": 3}}[mode]
    outputs = []
    for candidate in (model, stock):
        torch.manual_seed(0)
        outputs.append(candidate.generate(**batch, max_new_tokens=6, suppress_tokens=[IMAGE_TOKEN_ID],
                                          pad_token_id=0, **settings))
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad():  # the cache a prefill leaves is stock's too
        assert type(output_cache(model(**batch, use_cache=True))).__name__ == "DynamicCache"


def test_generate_takes_the_guidance_inputs_on_its_first_step():
    """The processor's guidance inputs cover the prompt: `generate` passes them on the prefill step only (a decode
    step's one token would not match them); with pruning off they change nothing."""
    model = tiny_next_model(clip_text_encoder=TINY_CLIP_TEXT)
    batch = make_next_batch(model.config)
    length = batch["input_ids"].shape[1]
    guidance = {
        "instruction_mask": (batch["input_ids"] != IMAGE_TOKEN_ID) & (batch["attention_mask"] == 1),
        "clip_input_ids": torch.tensor([[49406, 320, 1125, 49407] + [0] * 4] * 2),
        "clip_token_spans": torch.zeros(2, length, 2, dtype=torch.long),
    }
    settings = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID], pad_token_id=0)
    with_guidance = model.generate(**batch, **guidance, **settings)
    assert torch.equal(with_guidance, model.generate(**batch, **settings))
    assert with_guidance.shape[1] == length + 5


def test_a_method_without_variable_lengths_is_refused_naming_the_field(monkeypatch):
    """Every registered method runs on this host (`Pruner.variable_lengths`); one that did not -- a method added to
    the registry without a rule for images of different lengths -- is refused at construction and, for a config
    edited after it, at the call, naming the methods that run."""
    from modeling_llava_ivtp.pruners import PRUNERS

    assert all(pruner.variable_lengths for pruner in PRUNERS.values())
    monkeypatch.setattr(PRUNERS["tome"], "variable_lengths", False)  # the project's own class, restored after
    settings = {"pruning_method": "tome", "pruning_options": {"visual_tokens": 16}}
    config = IvtpNextConfig(**tiny_next_config_dict(**settings))
    expected = (r"pruning_method='tome' does not run on the LLaVA-NeXT host yet .* the methods that do: "
                r"\['cdpruner', 'divprune', .*'tome_plus', .*\]. Set `pruning_method=None`")
    with pytest.raises(ValueError, match=expected):
        LlavaNextIvtpForConditionalGeneration(config)
    model = tiny_next_model()
    model.config.pruning_method, model.config.pruning_options = "tome", settings["pruning_options"]
    with pytest.raises(ValueError, match="does not run on the LLaVA-NeXT host yet"):
        model(**make_next_batch(model.config))


def test_bad_guidance_is_refused_naming_the_field():
    model = tiny_next_model()
    batch = make_next_batch(model.config)
    with pytest.raises(ValueError, match="instruction_mask"):
        model(**batch, instruction_mask=torch.ones(2, 3, dtype=torch.bool))


def test_config_fields_are_checked_as_ivtp_configs_are():
    with pytest.raises(ValueError, match="`tau` must be in"):
        IvtpNextConfig(**tiny_next_config_dict(tau=3.0))
    with pytest.raises(ValueError, match="`pruning_method` must be one of"):
        IvtpNextConfig(**tiny_next_config_dict(pruning_method="nope"))
    config = IvtpNextConfig(**tiny_next_config_dict())
    assert config.model_type == "llava_next_ivtp" and config.image_seq_length == 36 and config.num_patches == 36
    assert config.image_grid_pinpoints == [[24, 48], [48, 24], [48, 48]]
    assert IvtpNextConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_both_hosts_declare_the_same_pruning_fields():
    """The fields are declared in each config class (their checks are shared): same names, types and defaults."""
    def declared(cls):
        return {name: (field.type, field.default) for name, field in cls.__dataclass_fields__.items()
                if name in (*IVTP_FIELDS, "image_seq_length")}

    assert declared(IvtpNextConfig) == declared(IvtpConfig) and len(declared(IvtpConfig)) == len(IVTP_FIELDS) + 1


def test_loads_llava_hf_next_on_disk_key_format(tmp_path):
    """llava-hf LLaVA-NeXT checkpoints store `language_model.model.*`, `language_model.lm_head`,
    `vision_tower.vision_model.*`, `multi_modal_projector.*` and `image_newline` at the top."""
    model = tiny_next_model()
    state = llava_hf_state(model)
    assert "image_newline" in state
    folder = tmp_path / "llava-next-hf"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    LlavaNextConfig(**stock_llava_fields(model.config.to_dict())).save_pretrained(folder)  # llava-hf's own config
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava_next"
    loaded, info = LlavaNextIvtpForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, pruning_method=None
    )
    assert type(loaded.config) is IvtpNextConfig and loaded.config.pruning_method is None
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_saves_and_reloads_as_remote_code(tmp_path):
    """`save_pretrained` writes a self-contained checkpoint: the Auto classes load the NeXT classes from its own
    files, in an interpreter that cannot import the package, and the model gives the same logits."""
    folder = tmp_path / "tiny-llava-next-ivtp"
    model = tiny_next_model(clip_text_encoder=TINY_CLIP_TEXT)
    model.save_pretrained(folder)
    batch = make_next_batch(model.config)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": batch, "logits": logits, "state": model.state_dict()}, tmp_path / "expected.pt")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_next_ivtp"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llava_ivtp.IvtpNextConfig",
        "AutoModel": "modeling_llava_next_ivtp.LlavaNextIvtpForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_llava_next_ivtp.LlavaNextIvtpForConditionalGeneration",
    }
    # every model file (no processor was saved here)
    assert {path.name for path in folder.glob("*.py")} == NEXT_REMOTE_FILES - {"processing_llava_ivtp.py"}
    result = run_fresh(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModelForImageTextToText
        folder = {str(folder)!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=False)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model, info = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        state = model.state_dict()
        with torch.no_grad():
            logits = model.eval()(**expected["batch"]).logits
        print(json.dumps({{
            "config": [type(config).__module__, type(config).__name__],
            "model": [type(model).__module__, type(model).__name__],
            "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "all_equal": sorted(state) == sorted(expected["state"]) and all(
                torch.equal(state[key], expected["state"][key]) for key in expected["state"]),
            "logits_max_diff": float((logits - expected["logits"]).abs().max()),
        }}))
        """,
        tmp_path,
    )
    assert result["config"][0].startswith("transformers_modules.") and result["config"][1] == "IvtpNextConfig"
    assert result["model"][0].startswith("transformers_modules.")
    assert result["model"][1] == "LlavaNextIvtpForConditionalGeneration"
    assert result["missing"] == [] and result["unexpected"] == [] and result["all_equal"]
    assert result["logits_max_diff"] <= 1e-6


def test_ivtps_budget_derives_a_schedule_per_crop_and_per_image():
    """On LLaVA-NeXT the vision counts are per crop (the LLaVA-1.5 schedule of `visual_tokens // max_crops`: 640 /
    320 / 160 give 128 / 64 / 32 per crop at LLaVA-1.6-7B's 5 crops) and the LLM counts per image, from the most an
    image can bring after the tower down to the budget; a count above that bound is refused naming the field."""
    from pathlib import Path

    from modeling_llava_ivtp import IvtpConfig
    from modeling_llava_ivtp.pruner_base import budget_schedule

    presets = Path(__file__).resolve().parents[1] / "configuration"
    preset = IvtpNextConfig.from_json_file(presets / "llava-v1.6-vicuna-7b-ivtp.json")
    llava = IvtpConfig.from_json_file(presets / "llava-1.5-7b-ivtp.json")
    assert preset.max_crops == 5 and preset.max_visual_tokens == 2928 and preset.num_patches == 576
    assert preset.pruning_options == {"visual_tokens": 640} and preset.schedule["llm"][-1] == 640
    for budget in (640, 320, 160):
        config = IvtpNextConfig.from_dict({**preset.to_dict(), "schedule": None, "pruning_options": {"visual_tokens": budget}})
        vision, llm = config.schedule["vision"], config.schedule["llm"]
        assert vision == budget_schedule(llava, budget // 5)["vision"]
        bound = config.stage_two_bound(vision[-1])
        assert bound == 5 * vision[-1] + 2 * 24  # the 2x2 grid's five crops and its 48 rows' newlines
        assert len(llm) == 4 and llm[-1] == budget and llm == sorted(llm, reverse=True) and llm[0] <= bound
    assert IvtpNextConfig.from_dict({**preset.to_dict(), "schedule": None, "pruning_options": {"visual_tokens": 320}}
                                    ).schedule["vision"] == llava.schedule["vision"]
    schedule = {"vision": preset.schedule["vision"], "llm": [1049]}  # the bound at 200 per crop: 1,048
    with pytest.raises(ValueError, match=r'`schedule\["llm"\]\[0\]` = 1049 is larger than the most visual tokens an image'):
        IvtpNextConfig.from_dict({**preset.to_dict(), "schedule": schedule, "pruning_options": None})
    with pytest.raises(ValueError, match=r"must be an int in \[1, 2928\]"):
        IvtpNextConfig.from_dict({**preset.to_dict(), "schedule": None, "pruning_options": {"visual_tokens": 2929}})


def test_a_layout_longer_than_the_images_placeholders_is_refused_naming_the_budget():
    """VisionZip's layout keeps every crop's share, padding patches included: at 190 (a crop's share capped at its 36
    patches) the tall image (5 crops, 168 placeholders) would get 5 x 36 = 180 tokens: refused, naming the field."""
    model = tiny_next_model(pruning_method="visionzip", pruning_options={"visual_tokens": 190})
    with pytest.raises(ValueError, match=r"gives image 1 180 tokens, more than its 168 placeholders .* `pruning_options\['visual_tokens'\]`"):
        model(**make_next_batch(model.config))


def test_the_next_processor_gives_the_guidance_and_ivtp_prunes_with_it():
    """`LlavaNextIvtpProcessor`: stock `LlavaNextProcessor`'s outputs (each image's crops, size and placeholders)
    plus IVTP's guidance inputs; with them IVTP's default guidance (`clip_relevance`) ranks stage 2 by the
    instruction's CLIP relevance, and a sample in the padded batch prunes as alone."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaNextProcessor

    from modeling_llava_ivtp.processing_llava_ivtp import GUIDANCE_OUTPUTS
    from tiny_models import TINY_CLIP_TEXT, tiny_next_processor

    processor = tiny_next_processor()
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, size, dtype=np.uint8)) for size in ((20, 40, 3), (40, 36, 3))]
    prompts = ["USER: <image>\nWhat color is the cat? ASSISTANT:", "USER: <image>\nIs there a dog here? ASSISTANT:"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    stock = LlavaNextProcessor(processor.image_processor, processor.tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    plain = stock(images=images, text=prompts, return_tensors="pt", padding=True)
    for name in plain:
        assert torch.equal(inputs[name], plain[name]), name
    assert set(GUIDANCE_OUTPUTS) <= set(inputs) and "offset_mapping" not in inputs
    for row, question in enumerate(("What color is the cat?", "Is there a dog here?")):
        instruction = inputs["input_ids"][row][inputs["instruction_mask"][row].bool()]
        assert processor.tokenizer.decode(instruction).replace(" ", "") == question.replace(" ", "")
        assert (inputs["clip_token_spans"][row][inputs["instruction_mask"][row].bool()][:, 1] > 0).all()

    model = tiny_next_model(pruning_method="ivtp", pruning_options={"visual_tokens": 32}, clip_text_encoder=TINY_CLIP_TEXT)
    layouts = model.image_layouts(inputs["image_sizes"])
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [layout.length for layout in layouts]
    with torch.no_grad():
        batched = model(**inputs, use_cache=False)
    assert batched.pseudo_cls_tokens is not None and batched.instruction_relevance is not None
    relevance = batched.instruction_relevance[inputs["instruction_mask"].bool()]
    assert torch.isfinite(relevance).all()
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        alone = {name: inputs[name][row:row + 1] for name in ("pixel_values", "image_sizes", "clip_input_ids")}
        alone.update({name: inputs[name][row:row + 1, real] for name in ("input_ids", "instruction_mask", "clip_token_spans")})
        with torch.no_grad():
            single = model(**alone, use_cache=False)
        for ours, theirs in zip(single.llm_keep_indices, batched.llm_keep_indices, strict=True):
            assert torch.equal(ours[0][ours[0] >= 0], theirs[row][theirs[row] >= 0]), row
