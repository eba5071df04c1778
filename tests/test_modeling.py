"""LlavaIvtpForConditionalGeneration on tiny models: equality with stock Llava, with a hand-written reference,
across attention backends and batch layouts; shrinking; loading; errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from modeling_llava_ivtp import IvtpCache, IvtpConfig, LlavaIvtpForConditionalGeneration
from modeling_llava_ivtp.transformers_compat import cache_kwargs, output_cache, output_image_features
from reference_ivtp import reference_forward
from tiny_models import (
    IMAGE_TOKEN_ID,
    llava_hf_state,
    left_pad,
    make_batch,
    make_pixels,
    make_prompt,
    sharpen_attention,
    stock_twin,
    tiny_config_dict,
    tiny_model,
)


SCHEDULES = {
    "groups_of_2": (2, {"vision": [24, 16, 12], "llm": [8, 5]}),
    "groups_of_3": (3, {"vision": [20, 10], "llm": [8, 4]}),
    "groups_of_1": (1, {"vision": [32, 28, 24, 20, 16, 12], "llm": [10, 8, 6]}),
}


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, use_cache=False, **kwargs)


def test_pruning_off_equals_stock_llava():
    model = tiny_model(schedule=None)
    stock = stock_twin(model)
    batch = make_batch()
    assert batch["attention_mask"][0, 0] == 0, "left padding"
    ours, theirs = run(model, batch), run(stock, batch)
    assert ours.logits.shape == theirs.logits.shape
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert torch.equal(ours.kept_positions, torch.arange(batch["input_ids"].shape[1]).expand(2, -1))
    as_tuple = run(model, batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], ours.logits)


def test_keep_all_schedule_equals_stock_llava():
    """Running IVTP's own loops, pseudo-CLS included, with nothing pruned must not change a single logit."""
    model = tiny_model(schedule={"vision": [36, 36, 36], "llm": [36, 36]})
    stock = stock_twin(model)
    batch = make_batch()
    ours, theirs = run(model, batch), run(stock, batch)
    assert ours.logits.shape == theirs.logits.shape
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert torch.equal(ours.kept_positions, torch.arange(batch["input_ids"].shape[1]).expand(2, -1))


@pytest.mark.parametrize("use_cache", [False, True], ids=["keys_recomputed", "keys_from_the_cache"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_pruned_forward_equals_reference(name, use_cache):
    """Stage-2 scoring reads the layer's own keys and values from the prefill's cache; without a cache it computes
    them again from the layer's modules. Both must match the reference."""
    group_size, schedule = SCHEDULES[name]
    model = sharpen_attention(tiny_model(schedule=schedule, group_size=group_size))
    stock = stock_twin(model, "eager")
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch, use_cache=use_cache)
    assert isinstance(output_cache(out), IvtpCache) == use_cache
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        offset = int((~valid).sum())
        reference = reference_forward(stock, model.config, batch["input_ids"][row][valid], batch["pixel_values"][row])
        real = out.kept_positions[row] >= offset
        assert torch.equal(out.kept_positions[row][real] - offset, reference["kept_positions"])
        assert torch.equal(out.vision_keep_indices[row], reference["vision_keep_indices"])
        for group, kept in enumerate(reference["llm_keep_indices"]):
            assert torch.equal(out.llm_keep_indices[group][row], kept)
        assert (out.logits[row][real] - reference["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_segment_mask_is_causal_padded_and_isolates_the_pseudo_cls(attn_implementation):
    """The stage-2 segment mask, built by broadcasting, against the rule written out element by element: causal,
    padding keys masked, the pseudo-CLS (last slot) sees the slots up to its sample's last visual token and itself,
    and a sample without an image lets it see only itself."""
    from modeling_llava_ivtp.tokens_ivtp import TokenState, segment_mask

    model = tiny_model(attn_implementation=attn_implementation)
    batch_size, num_slots = 3, 9
    is_visual = torch.zeros(batch_size, num_slots, dtype=torch.bool)
    is_visual[0, 2:5] = True
    is_visual[1, 1:3] = True  # sample 2 has no image
    attention_mask = torch.ones(batch_size, num_slots, dtype=torch.bool)
    attention_mask[1, 0] = False  # left padding
    tokens = TokenState(
        hidden_states=torch.zeros(batch_size, num_slots, 32), positions=None, position_ids=None,
        attention_mask=attention_mask, is_visual=is_visual, patch_index=None, num_patches=3,
        has_image=[True, True, False], length=num_slots, pads=[0, 1, 0], visual=3, last_placeholder=[4, 1, -1],
        probe=True,
    )
    mask = segment_mask(model.config.text_config, tokens, None, layer_idx=0)
    assert mask.shape == (batch_size, 1, num_slots, num_slots)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    visual_end = [4, 2, -1]
    for b in range(batch_size):
        for q in range(num_slots):
            for k in range(num_slots):
                expected = k <= q and bool(attention_mask[b, k])
                if q == num_slots - 1:
                    expected = expected and (k <= visual_end[b] or k == q)
                assert bool(allowed[b, 0, q, k]) == expected, (b, q, k)
    if attn_implementation == "eager":
        assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min


def test_probe_mask_of_one_layout_equals_the_per_sample_one():
    """sdpa's probe-segment mask from a host-known visual end (one layout) is the per-sample construction's, with
    and without padding keys, the end anywhere from before the first slot to the slot before the probe."""
    from modeling_llava_ivtp.tokens_ivtp import _probe_bool_mask

    batch_size, num_slots = 2, 8
    padding = torch.ones(batch_size, num_slots, dtype=torch.bool)
    padding[1, :2] = False
    for visual_end in range(-1, num_slots - 1):
        for pad in (None, padding):
            per_sample = _probe_bool_mask(batch_size, num_slots, torch.full((batch_size,), visual_end), pad, "cpu")
            host = _probe_bool_mask(batch_size, num_slots, visual_end, pad, "cpu")
            assert host.shape == per_sample.shape == (batch_size, 1, num_slots, num_slots)
            assert torch.equal(host, per_sample), (visual_end, pad is None)
    assert not _probe_bool_mask(1, num_slots, 3, None, "cpu")[0, 0, -1, 4:-1].any()


def test_sdpa_and_eager_keep_the_same_tokens():
    sdpa = sharpen_attention(tiny_model(attn_implementation="sdpa"))
    eager = LlavaIvtpForConditionalGeneration(sdpa.config.__class__(**tiny_config_dict())).eval()
    eager.config._attn_implementation = "eager"
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch()
    a, b = run(sdpa, batch), run(eager, batch)
    # each runs the recording twin of its backend (`attention_rows.py`)
    assert eager.config.text_config._attn_implementation == eager.config.vision_config._attn_implementation == "ivtp_eager"
    assert sdpa.config.text_config._attn_implementation == sdpa.config.vision_config._attn_implementation == "ivtp_sdpa"
    assert torch.equal(a.vision_keep_indices, b.vision_keep_indices)
    assert all(torch.equal(x, y) for x, y in zip(a.llm_keep_indices, b.llm_keep_indices))
    assert torch.equal(a.kept_positions, b.kept_positions)
    # Padding rows attend to nothing: sdpa and eager fill them differently, and nobody reads them.
    real = batch["attention_mask"].gather(1, a.kept_positions).bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-4


def test_sample_alone_equals_sample_in_padded_batch():
    model = sharpen_attention(tiny_model())
    batch = make_batch(lengths=((2, 5), (6, 12), (1, 3)))
    together = run(model, batch)
    for row in range(3):
        valid = batch["attention_mask"][row].bool()
        offset = int((~valid).sum())
        alone = run(model, {"input_ids": batch["input_ids"][row][valid][None], "pixel_values": batch["pixel_values"][row][None]})
        real = together.kept_positions[row] >= offset
        assert torch.equal(together.kept_positions[row][real] - offset, alone.kept_positions[0])
        assert torch.equal(together.vision_keep_indices[row], alone.vision_keep_indices[0])
        for group in range(2):
            assert torch.equal(together.llm_keep_indices[group][row], alone.llm_keep_indices[group][0])
        assert (together.logits[row][real] - alone.logits[0]).abs().max() <= 1e-5


def test_sequence_really_shrinks_and_counts_follow_the_schedule():
    model = tiny_model()
    batch = make_batch()
    out = run(model, batch)
    text_tokens = batch["input_ids"].shape[1] - 36
    assert out.logits.shape[1] == text_tokens + 5
    assert out.vision_token_counts == (24, 16, 12)
    assert out.llm_token_counts == (8, 5)
    assert out.vision_keep_indices.shape == (2, 12)
    assert output_image_features(out).shape == (2, 12, 32)
    # the rows of logits at image positions are exactly the last group's kept patches
    for row in range(2):
        image_start = int((batch["input_ids"][row] == IMAGE_TOKEN_ID).nonzero()[0])
        image_rows = batch["input_ids"][row][out.kept_positions[row]] == IMAGE_TOKEN_ID
        assert torch.equal(out.kept_positions[row][image_rows] - image_start, out.llm_keep_indices[-1][row])
        assert set(out.llm_keep_indices[-1][row].tolist()) <= set(out.vision_keep_indices[row].tolist())


def test_inputs_embeds_and_tuple_outputs():
    model = tiny_model()
    batch = make_batch()
    reference = run(model, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    out = run(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "pixel_values": batch["pixel_values"]})
    assert torch.equal(out.kept_positions, reference.kept_positions)
    torch.testing.assert_close(out.logits, reference.logits)
    as_tuple = run(model, batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], reference.logits)


def test_labels_use_the_kept_positions_and_train():
    model = tiny_model().train()
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, use_cache=False)
    kept_labels = labels.gather(1, out.kept_positions)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), kept_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_cache", [False, True])
def test_sample_without_image_passes_unpruned(use_cache):
    """A text-only sample first in the batch: stage 2 scores only the second row (keys and values read from the
    cache at that row when there is one)."""
    model = sharpen_attention(tiny_model())
    stock = stock_twin(model)
    with_image = make_prompt(2, 5, seed=1)
    text_only = [1, 5, 6, 7, 8, 9, 10, 11]
    input_ids, attention_mask = left_pad([text_only, with_image])
    pixels = make_pixels(1)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, use_cache=use_cache)
    alone_text = run(stock, {"input_ids": torch.tensor([text_only])})
    real = out.kept_positions[0] >= 0
    kept = out.kept_positions[0][real]
    offset = input_ids.shape[1] - len(text_only)
    assert torch.equal(kept[kept >= offset] - offset, torch.arange(len(text_only)))
    rows = out.logits[0][real][kept >= offset]
    assert (rows - alone_text.logits[0]).abs().max() <= 1e-5
    alone_image = run(model, {"input_ids": torch.tensor([with_image]), "pixel_values": pixels})
    assert torch.equal(out.kept_positions[1][out.kept_positions[1] >= 0], alone_image.kept_positions[0])
    assert all(torch.equal(group[1], alone[0]) for group, alone in zip(out.llm_keep_indices, alone_image.llm_keep_indices))
    assert all((group[0] == -1).all() for group in out.llm_keep_indices)
    assert (out.logits[1][out.kept_positions[1] >= 0] - alone_image.logits[0]).abs().max() <= 1e-5


def test_use_cache_holds_the_pruned_tokens_per_layer():
    model = tiny_model()
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, IvtpCache)
    text_tokens = batch["input_ids"].shape[1] - 36
    expected = [12, 12, 8, 8, 5, 5, 5, 5]  # tokens per layer: stage 1's 12, then the llm schedule (groups of 2)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [text_tokens + n for n in expected]
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    assert torch.equal(cache.layer_positions[-1], out.kept_positions)


def _geometry_7b_config():
    preset = json.load(open(__file__.rsplit("/tests/", 1)[0] + "/configuration/llava-1.5-7b-ivtp.json"))
    preset["vision_config"].update(hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=8)
    preset["text_config"].update(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, vocab_size=120,
        pad_token_id=0,
    )
    preset["image_token_index"] = 100
    return IvtpConfig(**preset)


def test_llava_7b_geometry_with_the_7b_preset():
    """336 px, patch 14, 24 vision layers, 32 LLM layers (tiny widths): counts per group end at 64."""
    config = _geometry_7b_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaIvtpForConditionalGeneration(config).eval()
    input_ids = torch.tensor([[1, 5, 6] + [100] * 576 + [7, 8, 9, 10]])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 336, 336), use_cache=True)
    assert out.vision_token_counts == tuple(config.schedule["vision"]) == (472, 392, 320, 264, 224, 184, 152, 120)
    assert out.llm_token_counts == tuple(config.schedule["llm"]) and out.llm_token_counts[-1] == 64
    per_layer = [layer.keys.shape[-2] - 7 for layer in output_cache(out).layers]
    assert per_layer == [120] * 3 + [104] * 3 + [88] * 3 + [72] * 3 + [64] * 20
    assert out.logits.shape[1] == 7 + 64


def test_loads_stock_checkpoints_without_missing_keys(tmp_path):
    model = tiny_model()
    stock = stock_twin(model)
    stock.save_pretrained(tmp_path / "stock")
    config = IvtpConfig(**tiny_config_dict())
    loaded, info = LlavaIvtpForConditionalGeneration.from_pretrained(
        tmp_path / "stock", config=config, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(loaded.lm_head.weight, stock.lm_head.weight)


def test_loads_llava_hf_on_disk_key_format(tmp_path):
    """llava-hf checkpoints store `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`."""
    model = tiny_model()
    state = llava_hf_state(model)
    folder = tmp_path / "llava-hf"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    loaded, info = LlavaIvtpForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(
        loaded.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight,
        model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight,
    )


def test_final_clip_cls_costs_one_row_and_equals_the_full_tower():
    from modeling_llava_ivtp.pruner_base import Pruner
    from modeling_llava_ivtp.pruner_ivtp import final_clip_cls

    model = tiny_model(schedule={"vision": [], "llm": []})
    pixels = make_pixels(2)
    with torch.no_grad():
        vision = model._run_vision_tower(pixels, Pruner(model.config, None))  # the base pruner keeps every token
        ours = final_clip_cls(model, vision["feature_layer_hidden_states"])
        stock = model.model.vision_tower(pixels).pooler_output
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------------
def test_wrong_placeholder_count():
    model = tiny_model()
    batch = make_batch()
    batch["input_ids"][0, -1] = IMAGE_TOKEN_ID  # 37 placeholders in sample 0
    with pytest.raises(ValueError, match="exactly 36 image placeholder"):
        run(model, batch)


def test_images_and_placeholders_disagree():
    model = tiny_model()
    batch = make_batch()
    batch["pixel_values"] = make_pixels(3)
    with pytest.raises(ValueError, match="for 3 images"):
        run(model, batch)


def test_two_images_in_one_sample_with_stage_2():
    model = tiny_model()
    prompt = make_prompt(2, 3) + [IMAGE_TOKEN_ID] * 36 + [5]
    with pytest.raises(ValueError, match="one image per sample"):
        run(model, {"input_ids": torch.tensor([prompt]), "pixel_values": make_pixels(2)})


def test_two_images_in_one_sample_vision_only():
    model = tiny_model(schedule={"vision": [24, 16, 12], "llm": []})
    prompt = make_prompt(2, 3) + [IMAGE_TOKEN_ID] * 36 + [5]
    out = run(model, {"input_ids": torch.tensor([prompt]), "pixel_values": make_pixels(2)})
    assert out.vision_keep_indices.shape == (2, 12)
    assert out.logits.shape[1] == len(prompt) - 2 * 36 + 2 * 12


def test_instruction_mask_of_the_wrong_shape():
    model = tiny_model()
    batch = make_batch()
    with pytest.raises(ValueError, match="instruction_mask"):
        run(model, batch, instruction_mask=torch.ones(2, 3, dtype=torch.bool))


def test_overriding_the_feature_layer_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="vision_feature_layer"):
        run(model, make_batch(), vision_feature_layer=-1)


def test_cache_must_be_an_ivtp_cache():
    from transformers import DynamicCache

    model = tiny_model()
    with pytest.raises(ValueError, match="IvtpCache"):
        with torch.no_grad():
            model(**make_batch(), **cache_kwargs(DynamicCache()), use_cache=True)


def test_stock_llava_class_is_untouched():
    """No monkeypatching: the stock class keeps its own forward."""
    assert LlavaForConditionalGeneration.forward is not LlavaIvtpForConditionalGeneration.forward
    assert "modeling_llava" in LlavaForConditionalGeneration.forward.__module__


def test_hidden_states_follow_the_pruned_lengths():
    model = tiny_model()
    batch = make_batch()
    out = run(model, batch, output_hidden_states=True)
    text_tokens = batch["input_ids"].shape[1] - 36
    lengths = [hidden.shape[1] - text_tokens for hidden in out.hidden_states]
    assert lengths == [12, 12, 8, 8, 5, 5, 5, 5, 5]  # input of each of the 8 layers, then the final norm
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_bfloat16_keeps_the_float32_tokens():
    """In bfloat16 the scores are still computed in float32 (vision probabilities, stage-2 block): on the tiny model
    the kept tokens equal float32's, with and without a cache, and the logits stay close."""
    model = sharpen_attention(tiny_model())
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch, use_cache=True)
        model = model.to(torch.bfloat16)
        half_batch = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
        cached = model(**half_batch, use_cache=True)
        uncached = model(**half_batch, use_cache=False)
    for out in (cached, uncached):
        assert out.logits.dtype == torch.bfloat16
        assert torch.equal(out.vision_keep_indices, reference.vision_keep_indices)
        assert all(torch.equal(a, b) for a, b in zip(out.llm_keep_indices, reference.llm_keep_indices))
        assert torch.equal(out.kept_positions, reference.kept_positions)
        real = batch["attention_mask"].gather(1, out.kept_positions.clamp_min(0)).bool() & (out.kept_positions >= 0)
        assert (out.logits.float()[real] - reference.logits[real]).abs().max() <= 0.02
    assert output_cache(cached).layers[0].keys.dtype == torch.bfloat16
