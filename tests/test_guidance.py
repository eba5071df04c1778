"""Instruction guidance on the model side (eq. 5-8, Table 6): the CLIP text tower against open_clip's own forward,
relevance and pseudo-CLS against a plain reference, the question steering stage 2, guidance modes, saving."""

import copy

import pytest
import torch

from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration
from modeling_llava_ivtp.guidance_ivtp import clip_token_features
from modeling_llava_ivtp.transformers_compat import output_image_features
from reference_ivtp import reference_forward
from tiny_models import TINY_CLIP_TEXT, make_pixels, make_prompt, stock_twin, tiny_model


SOT, EOT = 49406, 49407


def clip_ids(content: list[int]) -> torch.Tensor:
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, : len(content) + 2] = torch.tensor([SOT, *content, EOT])
    return ids


def guided_inputs(prompt: list[int], clip_content: list[int], clip_of_token: dict[int, tuple[int, int]]):
    """One sample: instruction = the tokens in `clip_of_token` (prompt index -> CLIP position range)."""
    input_ids = torch.tensor([prompt])
    instruction = torch.zeros_like(input_ids, dtype=torch.bool)
    spans = torch.zeros(1, len(prompt), 2, dtype=torch.long)
    for index, (start, end) in clip_of_token.items():
        instruction[0, index] = True
        spans[0, index] = torch.tensor([start, end])
    return dict(
        input_ids=input_ids, pixel_values=make_pixels(1), instruction_mask=instruction,
        clip_input_ids=clip_ids(clip_content), clip_token_spans=spans,
    )


@pytest.fixture(scope="module")
def model():
    return tiny_model(clip_text_encoder=TINY_CLIP_TEXT)


def test_token_features_are_open_clips_own(model):
    """Eq. 5 per token = open_clip's `ln_final` tokens times the projection; at the end token, its pooled output."""
    tower = copy.deepcopy(model.clip_text_model)
    tower.output_tokens = True
    ids = clip_ids([320, 1929, 533, 518, 2368, 269])
    with torch.no_grad():
        pooled, tokens = tower(ids)
        ours = clip_token_features(model.clip_text_model, ids)
    torch.testing.assert_close(ours, tokens @ tower.text_projection)
    torch.testing.assert_close(ours[0, 7], pooled[0])


def test_token_features_take_the_fused_attention_kernel(model):
    """At inference each block's attention is torch's fused kernel (the boolean causal mask allows it), within
    rounding of open_clip's own forward; where the fused kernel cannot run (gradients on), the features are open_clip's
    to the bit."""
    from llava_ivtp.measuring.dispatch import count_dispatched

    tower = copy.deepcopy(model.clip_text_model)
    tower.output_tokens = True
    ids = clip_ids([320, 1929, 533, 518, 2368, 269])
    with torch.no_grad():
        _, tokens = tower(ids)
        counted = count_dispatched(lambda: clip_token_features(model.clip_text_model, ids))
        ours = clip_token_features(model.clip_text_model, ids)
    layers = len(model.clip_text_model.transformer.resblocks)
    assert counted.by_name["_native_multi_head_attention"] == layers
    assert counted.by_name["scaled_dot_product_attention"] == 0
    torch.testing.assert_close(ours, tokens @ tower.text_projection)
    trainable = copy.deepcopy(model.clip_text_model).requires_grad_(True)
    trainable.output_tokens = True
    with torch.enable_grad():
        _, reference = trainable(ids)
        composite = clip_token_features(trainable, ids)
    assert torch.equal(composite, reference @ trainable.text_projection)


def plain_guidance(model, inputs, tau):
    """Relevance (eq. 6-7) and the pseudo-CLS (eq. 8) by loops over a plain forward of every remaining CLIP layer."""
    stock = stock_twin(model, attn_implementation="eager")
    vision = stock.model.vision_tower
    selected, relevance = [], {}

    def pseudo(stage_1_output):
        hidden = stage_1_output[None]
        first_unrun = model.config.vision_layer_groups[-1][1] + 1
        for layer in vision.encoder.layers[first_unrun:]:
            hidden = layer(hidden, None)
        image = model.clip_visual_projection(vision.post_layernorm(hidden[0, 0]))
        tower = copy.deepcopy(model.clip_text_model)
        tower.output_tokens = True
        _, tokens = tower(inputs["clip_input_ids"])
        features = tokens[0] @ tower.text_projection
        end = int(inputs["clip_input_ids"][0].argmax())
        embeds = stock.model.language_model.embed_tokens(inputs["input_ids"][0])
        for index in inputs["instruction_mask"][0].nonzero()[:, 0].tolist():
            start, stop = inputs["clip_token_spans"][0, index].tolist()
            values = [torch.cosine_similarity(features[k], image, dim=0) for k in range(start, stop) if 0 < k < end]
            if values:
                relevance[index] = float(torch.stack(values).mean())
                if relevance[index] >= tau:
                    selected.append(index)
        if not selected:
            return stock.model.multi_modal_projector(stage_1_output[0])
        return embeds[selected].mean(0)

    with torch.no_grad():
        out = reference_forward(stock, model.config, inputs["input_ids"][0], inputs["pixel_values"][0], pseudo)
    return out, relevance, selected


def test_relevance_and_pseudo_cls_against_a_plain_reference(model):
    prompt = make_prompt(3, 8)  # BOS, 3 text, 36 image, 8 text: the instruction is the last 6 tokens
    start = 1 + 3 + 36 + 2
    # LLM token -> CLIP positions: one-to-one, one-to-two, two-to-one (shared), one token with no CLIP token.
    clip_of_token = {start: (1, 2), start + 1: (2, 4), start + 2: (4, 5), start + 3: (4, 5), start + 4: (0, 0), start + 5: (5, 6)}
    inputs = guided_inputs(prompt, [320, 1929, 533, 518, 2368], clip_of_token)
    with torch.no_grad():
        probe = model(**inputs, use_cache=False)
    known = probe.instruction_relevance[0][~probe.instruction_relevance[0].isnan()]
    assert len(known) == 5, "the token without a CLIP token has no relevance"
    distinct = known.unique()  # ascending; tokens 2 and 3 share one CLIP token, so 4 values
    model.config.tau = float(distinct[1] + distinct[2]) / 2  # between two values: some pass, some do not
    try:
        expected, relevance, selected = plain_guidance(model, inputs, model.config.tau)
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
    finally:
        model.config.tau = 0.2
    assert 0 < len(selected) < 5
    got = {i: float(v) for i, v in enumerate(out.instruction_relevance[0]) if not v.isnan()}
    assert got.keys() == relevance.keys()
    assert all(abs(got[i] - relevance[i]) <= 1e-5 for i in got)
    assert out.pseudo_cls_tokens[0].nonzero()[:, 0].tolist() == selected
    assert [k[0].tolist() for k in out.llm_keep_indices] == [k.tolist() for k in expected["llm_keep_indices"]]
    assert (out.logits[0] - expected["logits"]).abs().max() <= 1e-5


def test_the_clip_tower_reads_up_to_the_last_end_token(model):
    """open_clip pads every text to 77 positions; the tower is causal, so a batch's CLIP ids are cut after its last end
    token (known from the prefill's one read). Each sample's relevance is the one it gets alone, cut at its own end
    (against open_clip's tower over all 77: `test_relevance_and_pseudo_cls_against_a_plain_reference`)."""
    prompt = make_prompt(3, 8)
    start = 1 + 3 + 36 + 2
    long = guided_inputs(prompt, [320, 1929, 533, 518, 2368], {start: (1, 3), start + 1: (3, 6)})
    short = guided_inputs(prompt, [320, 1929], {start: (1, 2), start + 1: (2, 3)})
    batch = {name: torch.cat([long[name], short[name]]) for name in long}
    seen = []
    hook = model.clip_text_model.token_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=False)
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 7])]  # start, 5 content tokens, end
    for row, inputs in enumerate((long, short)):
        with torch.no_grad():
            alone = model(**inputs, use_cache=False)
        torch.testing.assert_close(out.instruction_relevance[row], alone.instruction_relevance[0], equal_nan=True)
        assert torch.equal(out.pseudo_cls_tokens[row], alone.pseudo_cls_tokens[0])


def test_the_question_steers_stage_2_toward_the_patches_it_names():
    """Construct it: the embedding of word A is the image features of the top-left patches, word B's of the
    bottom-right ones; Q/K/V are near-identity and RoPE near-flat, so the pseudo-CLS attends to features like
    itself. Only the question changes; stage 2 keeps patches of the named region."""
    model = tiny_model(schedule={"vision": [], "llm": [12, 6]}, clip_text_encoder=TINY_CLIP_TEXT, tau=-1.0)
    text = model.model.language_model
    head_dim, kv_heads = 8, 2
    subspace = torch.eye(32)[: head_dim * kv_heads]  # keys: the first 16 dims; each query head reads its kv head's
    query = torch.cat([subspace[head_dim * (h // 2) : head_dim * (h // 2 + 1)] for h in range(4)])
    with torch.no_grad():
        text.rotary_emb.inv_freq.mul_(1e-6)  # (near) no rotation: attention compares contents, not positions
        for layer in text.layers[:4]:  # the stage-2 window: attention compares hidden states; no MLP change
            layer.self_attn.q_proj.weight.copy_(query * 4.0)
            layer.self_attn.k_proj.weight.copy_(subspace * 4.0)
            layer.self_attn.v_proj.weight.copy_(subspace)
            layer.mlp.down_proj.weight.zero_()
    prompt_a, prompt_b = make_prompt(2, 3), make_prompt(2, 3)
    word_a, word_b = 50, 51
    question_slot = len(prompt_a) - 2
    prompt_a[question_slot], prompt_b[question_slot] = word_a, word_b
    pixels = make_pixels(1)
    with torch.no_grad():
        features = output_image_features(model(input_ids=torch.tensor([prompt_a]), pixel_values=pixels, use_cache=False))[0]
        embeddings = model.get_input_embeddings()
        top_left = [0, 1, 6, 7]
        bottom_right = [28, 29, 34, 35]
        embeddings.weight[word_a] = features[top_left].mean(0)
        embeddings.weight[word_b] = features[bottom_right].mean(0)
    kept = {}
    for name, prompt in (("a", prompt_a), ("b", prompt_b)):
        inputs = guided_inputs(prompt, [320], {question_slot: (1, 2)})
        inputs["pixel_values"] = pixels
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        assert out.pseudo_cls_tokens[0].nonzero()[:, 0].tolist() == [question_slot]
        kept[name] = set(out.llm_keep_indices[-1][0].tolist())
    assert kept["a"] != kept["b"]
    assert len(kept["a"] & set(top_left)) > len(kept["b"] & set(top_left))
    assert len(kept["b"] & set(bottom_right)) > len(kept["a"] & set(bottom_right))


def _example_inputs():
    prompt = make_prompt(3, 8)
    start = 1 + 3 + 36 + 2
    return guided_inputs(prompt, [320, 1929, 533, 518], {start + i: (1 + i, 2 + i) for i in range(4)})


@pytest.mark.parametrize("mode", ["instruction_mean", "embedding_relevance", "visual_cls"])
def test_guidance_modes_of_table_6(model, mode):
    inputs = _example_inputs()
    twin = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, guidance=mode)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = twin(**inputs, use_cache=False)
        visual = twin(**{k: v for k, v in inputs.items() if k in ("input_ids", "pixel_values")}, use_cache=False)
    instruction = inputs["instruction_mask"][0]
    if mode == "visual_cls":
        assert out.pseudo_cls_tokens is None
        torch.testing.assert_close(out.logits, visual.logits)
        return
    stock = stock_twin(twin, attn_implementation="eager")
    embeds = stock.model.language_model.embed_tokens(inputs["input_ids"][0])
    if mode == "instruction_mean":
        assert torch.equal(out.pseudo_cls_tokens[0], instruction)
        assert out.instruction_relevance is None
        selected = instruction
    else:  # cosine of the LLM's own embeddings with the visual CLS through the projector, thresholded
        relevance = out.instruction_relevance[0]
        assert bool(relevance[instruction].isfinite().all()) and bool(relevance[~instruction].isnan().all())
        selected = instruction & (relevance >= twin.config.tau)
        assert torch.equal(out.pseudo_cls_tokens[0], selected)

    def pseudo(stage_1_output):
        if not bool(selected.any()):
            return stock.model.multi_modal_projector(stage_1_output[0])
        if mode == "embedding_relevance":  # the reference's own relevance, from the same visual CLS
            reference = stock.model.multi_modal_projector(stage_1_output[0])
            mine = torch.cosine_similarity(embeds[instruction], reference[None], dim=-1)
            torch.testing.assert_close(mine, out.instruction_relevance[0][instruction], atol=1e-5, rtol=1e-5)
        return embeds[selected].mean(0)

    with torch.no_grad():
        expected = reference_forward(stock, twin.config, inputs["input_ids"][0], inputs["pixel_values"][0], pseudo)
    assert [k[0].tolist() for k in out.llm_keep_indices] == [k.tolist() for k in expected["llm_keep_indices"]]
    assert (out.logits[0] - expected["logits"]).abs().max() <= 1e-5


def test_missing_guidance_inputs_fall_back_to_the_visual_cls(model):
    inputs = _example_inputs()
    partial = {k: v for k, v in inputs.items() if k != "clip_token_spans"}
    bare = {k: v for k, v in inputs.items() if k in ("input_ids", "pixel_values")}
    with torch.no_grad():
        out = model(**partial, use_cache=False)
        plain = model(**bare, use_cache=False)
    assert out.pseudo_cls_tokens is None
    torch.testing.assert_close(out.logits, plain.logits)


def test_clip_parts_are_frozen_saved_and_loaded(model, tmp_path):
    assert not any(p.requires_grad for p in model.clip_text_model.parameters())
    assert not model.clip_visual_projection.weight.requires_grad
    model.train()
    try:
        assert model.training and not model.clip_text_model.training
    finally:
        model.eval()
    model.save_pretrained(tmp_path)
    loaded, info = LlavaIvtpForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = model.state_dict()
    assert any(key.startswith("clip_text_model.") for key in saved) and "clip_visual_projection.weight" in saved
    assert all(torch.equal(saved[key], value) for key, value in loaded.state_dict().items())
    inputs = _example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs, use_cache=False).logits, model(**inputs, use_cache=False).logits)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("guidance", "clip", "guidance"),
        ("clip_text_encoder", {"model_name": "ViT-L-14-336"}, "missing"),
        ("clip_text_encoder", dict(TINY_CLIP_TEXT, embed_dim=0), "embed_dim"),
        ("clip_text_encoder", dict(TINY_CLIP_TEXT, text_cfg={**TINY_CLIP_TEXT["text_cfg"], "hf_model_name": "x"}), "unknown"),
        ("clip_text_encoder", dict(TINY_CLIP_TEXT, text_cfg={**TINY_CLIP_TEXT["text_cfg"], "heads": 5}), "divisible"),
    ],
)
def test_bad_guidance_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**{field: value})


def test_guidance_tensors_of_the_wrong_shape_are_refused(model):
    inputs = _example_inputs()
    for name, bad in [
        ("clip_token_spans", inputs["clip_token_spans"][..., :1]),
        ("clip_input_ids", inputs["clip_input_ids"][0]),
        ("clip_token_spans", inputs["clip_token_spans"] + 100),
    ]:
        with pytest.raises(ValueError, match=name):
            model(**dict(inputs, **{name: bad}), use_cache=False)
