"""Every pruning method of the registry through everything the project does: the invariants, parametrized over
`PRUNERS` and over both hosts (a method added to the registry is tested here without a line more).

The hosts: LLaVA-1.5 (the tiny model, 36 patches per image, a left-padded batch of three samples) and LLaVA-NeXT
(the tiny NeXT model: a padded batch of a wide and a near-square image, 114 and 168 packed tokens from 3 and 5
crops). Each method runs at a budget of 8 visual tokens per image, with sharpened attention so that attention-based
choices depend on the attention, and with the processor's `instruction_mask`. After the invariants: each method's
rule against a reference written on stock modules, per host.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_llava_ivtp import IvtpConfig, IvtpNextConfig
from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS
from modeling_llava_ivtp.pruners import PRUNERS
from modeling_llava_ivtp.transformers_compat import cache_kwargs, output_cache
from tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TINY_CLIP_TEXT,
    left_pad,
    make_batch,
    make_next_batch,
    make_pixels,
    make_prompt,
    next_stock_twin,
    sharpen_attention,
    tiny_model,
    tiny_next_config_dict,
    tiny_next_model,
)


BUDGET = 8
METHODS = sorted(PRUNERS)
HOSTS = ("llava", "next")
FIXED = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, suppress_tokens=[IMAGE_TOKEN_ID, 2])
# Methods whose NeXT layout is their code's (or, for ToMe, ours) without unpadding: an image brings each crop's
# share, and a token may stand for no place of stock packing (a CLS, a patch on the padding: -1 in
# `vision_keep_indices`; on LLaVA-1.5, VisionZip's CLS and ToMe's merged tokens).
UNPLACED = ("cdpruner", "tome", "tome_plus", "visionzip", "vispruner")


def method_model(method: str, attn_implementation: str = "sdpa", options: dict | None = None, **overrides):
    extra = {"clip_text_encoder": TINY_CLIP_TEXT} if method == "cdpruner" else {}
    model = tiny_model(
        schedule=None, pruning_method=method, pruning_options={"visual_tokens": BUDGET, **(options or {})},
        attn_implementation=attn_implementation, **extra, **overrides,
    )
    return sharpen_attention(model)


def next_method_model(method: str, attn_implementation: str = "sdpa", options: dict | None = None, **overrides):
    if method == "ivtp":  # the instruction steers stage 2 (the CLIP-relevance guidance needs the processor's CLIP ids)
        overrides = {"guidance": "instruction_mean", **overrides}
    if method == "cdpruner":
        overrides = {"clip_text_encoder": TINY_CLIP_TEXT, **overrides}
    model = tiny_next_model(attn_implementation=attn_implementation, pruning_method=method,
                            pruning_options={"visual_tokens": BUDGET, **(options or {})}, **overrides)
    return sharpen_attention(model)


def host_model(host: str, method: str, attn_implementation: str = "sdpa", options: dict | None = None, **overrides):
    build = method_model if host == "llava" else next_method_model
    return build(method, attn_implementation, options, **overrides)


def host_batch(host: str) -> dict:
    if host == "llava":
        return with_instruction(make_batch(((2, 5), (4, 9), (1, 3))))
    return with_instruction(make_next_batch(IvtpNextConfig(**tiny_next_config_dict())))


# Methods that rank by the input's last token (FastV's and PyramidDrop's code): decoding without a cache re-prunes
# every step with that step's newest token, as their code does, so it need not keep what the cached prefill kept.
# The cache-against-no-cache invariants run them with the row that stays the same, the last instruction token.
LAST_TOKEN_ROW = {"fastv", "pdrop"}


def same_row_at_every_step(host: str, method: str, model):
    return host_model(host, method, options={"query_row": "last_instruction"}) if method in LAST_TOKEN_ROW else model


def with_instruction(batch: dict) -> dict:
    """The batch with an instruction mask: the text after the image but its last two tokens (the template's)."""
    ids = batch["input_ids"]
    after_image = torch.cumsum(ids == IMAGE_TOKEN_ID, dim=1) > 0
    instruction = after_image & (ids != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    instruction[:, -2:] = False
    return dict(batch, instruction_mask=instruction)


def image_inputs(batch: dict) -> dict:
    return {name: batch[name] for name in ("pixel_values", "image_sizes") if name in batch}


def alone(batch: dict, row: int) -> dict:
    """One sample of a padded batch as it is sent alone: its real tokens, its image."""
    real = batch["attention_mask"][row].bool()
    return {"input_ids": batch["input_ids"][row:row + 1, real], "instruction_mask": batch["instruction_mask"][row:row + 1, real],
            **{name: value[row:row + 1] for name, value in image_inputs(batch).items()}}


def same_selection(alone_keep: torch.Tensor, batch_keep: torch.Tensor) -> bool:
    """A sample's kept indices alone equal its row of the batch's, which is padded with -1 past the sample's own
    count (on LLaVA-NeXT images of one batch bring different counts)."""
    count = alone_keep.shape[0]
    return torch.equal(batch_keep[:count], alone_keep) and bool((batch_keep[count:] == -1).all())


@pytest.fixture(scope="module", params=HOSTS)
def host(request):
    return request.param


@pytest.fixture(scope="module")
def batch(host):
    return host_batch(host)


@pytest.fixture(scope="module")
def next_batch():
    return host_batch("next")


@pytest.fixture(scope="module", params=METHODS)
def method(request):
    return request.param


@pytest.fixture(scope="module")
def model(host, method):
    return host_model(host, method)


def test_the_registry_is_the_configs_list_of_methods():
    assert sorted(PRUNERS) == sorted(PRUNING_METHODS)
    assert len(PRUNING_METHODS) == 14
    for name, cls in PRUNERS.items():
        module = sys.modules[cls.__module__]
        assert cls.name == name and module.__name__.endswith("pruner_" + name.removesuffix("_plus"))
        assert module.__doc__ and len(module.__doc__) > 200, f"{name}: cite the method's paper and rule"
        assert cls.variable_lengths, f"{name}: every method runs on the NeXT host"


def next_entry_counts(model, out, batch) -> list[int]:
    """What each image brings to the LLM on the NeXT host: its whole packed sequence, or, where the method pruned each
    crop in the tower, what the crops kept (a tile's padding patches last) and, where it prunes in the LLM too, every
    newline (`NextLayout.kept_length`)."""
    layouts = model.image_layouts(batch["image_sizes"])
    if model.config.pruning_method == "cdpruner":  # its code: each crop's share after the projector, no unpadding
        share = PRUNERS["cdpruner"](model.config, None).crop_budget
        return [layout.crops * share for layout in layouts]
    if model.config.pruning_method == "pooling":  # each crop's cells whose centre patch is not padding
        from modeling_llava_ivtp.pruner_pooling import pooling_centres

        share, patches = PRUNERS["pooling"](model.config, None).crop_budget, model.config.num_patches
        return [int(layout.shown(patches)[:, pooling_centres(share, 6)].sum()) for layout in layouts]
    if not out.vision_token_counts:
        return [layout.length for layout in layouts]
    if model.config.pruning_method in UNPLACED:  # what each crop kept, no unpadding, no newline
        return [layout.crops * out.vision_token_counts[-1] for layout in layouts]
    newlines = bool(out.llm_keep_indices)
    return [layout.kept_length(out.vision_token_counts[-1], model.config.num_patches, newlines) for layout in layouts]


def test_the_budget_reaches_the_last_layers(host, model, method, batch):
    """Every method spends the budget it is given: the LLM's last layer holds `BUDGET` visual tokens of each image --
    on LLaVA-NeXT, or what the image brought where that is less: a method pruning each crop in the tower gives each
    crop `budget // max_crops` (8 // 5 = 1 here), so an image brings at most its crops' share (the peers' rule: 640 =
    5 x 128 on LLaVA-1.6-7B)."""
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    rows = batch["input_ids"].shape[0]
    if host == "llava":
        expected = [BUDGET] * rows
        assert (out.llm_token_counts or out.vision_token_counts or (out.vision_keep_indices.shape[1],))[-1] == BUDGET
    else:
        entered = next_entry_counts(model, out, batch)
        expected = [min(BUDGET, count) for count in entered]
        if out.vision_token_counts:
            crop_budget = PRUNERS[method](model.config, None).crop_budget
            assert crop_budget == BUDGET // 5
            if not out.llm_keep_indices:  # the tower only: each crop keeps its share
                assert out.vision_token_counts[-1] == crop_budget and expected == entered and expected[1] < BUDGET
        elif method in ("cdpruner", "pooling"):  # each crop after the projector keeps its share
            assert expected == entered and expected[1] < BUDGET
        else:
            assert expected == [BUDGET, BUDGET]
        if out.llm_keep_indices:  # what entered the LLM: -1 past each image's own count
            assert out.vision_keep_indices.shape == (rows, max(entered))
            if method not in UNPLACED:
                assert (out.vision_keep_indices >= 0).sum(dim=1).tolist() == entered
    held = output_cache(out).layer_positions[-1]
    for row in range(rows):
        tokens = batch["input_ids"][row, held[row][held[row] >= 0]]
        assert int((tokens == IMAGE_TOKEN_ID).sum()) == expected[row], (host, method, row)
    final = out.llm_keep_indices[-1] if out.llm_keep_indices else out.vision_keep_indices
    assert final.shape == (rows, max(expected))
    if method not in UNPLACED:
        assert ((final >= 0).sum(dim=1) == torch.tensor(expected)).all()


def test_cached_generate_equals_decoding_without_a_cache(host, model, method, batch):
    """Greedy, sampling with a seed, and beams: the pruned cache gives what re-pruning every step gives."""
    model = same_row_at_every_step(host, method, model)
    for kwargs in (dict(FIXED), dict(FIXED, do_sample=True, temperature=0.8), dict(FIXED, num_beams=2)):
        torch.manual_seed(3)
        cached = model.generate(**batch, max_new_tokens=8, **kwargs)
        torch.manual_seed(3)
        uncached = model.generate(**batch, max_new_tokens=8, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), (host, method, kwargs)


def test_multi_turn_continuation_equals_the_conversation_from_scratch(host, model, method, batch):
    model = same_row_at_every_step(host, method, model)
    rows = batch["input_ids"].shape[0]
    first = model.generate(**batch, max_new_tokens=5, return_dict_in_generate=True, **FIXED)
    second_turn = torch.randint(3, 80, (rows, 4), generator=torch.Generator().manual_seed(11))
    conversation = torch.cat([first.sequences, second_turn], dim=1)
    grown = conversation.shape[1] - batch["input_ids"].shape[1]
    attention_mask = torch.cat([batch["attention_mask"], torch.ones(rows, grown, dtype=torch.long)], dim=1)
    instruction = torch.cat([batch["instruction_mask"], torch.zeros(rows, grown, dtype=torch.bool)], dim=1)
    continued = model.generate(input_ids=conversation, attention_mask=attention_mask,
                               **cache_kwargs(output_cache(first)), max_new_tokens=6, **FIXED)
    from_scratch = model.generate(input_ids=conversation, attention_mask=attention_mask, instruction_mask=instruction,
                                  **image_inputs(batch), max_new_tokens=6, **FIXED)
    assert torch.equal(continued, from_scratch), (host, method)


def test_a_generated_placeholder_is_an_ordinary_token_over_the_pruned_cache(host, model, method, batch):
    """Forced to emit the image placeholder id, the model decodes over its pruned cache as the stock host does (the id
    is text there), and the conversation continues from that answer without `pixel_values`."""
    rows = batch["input_ids"].shape[0]
    emits = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, sequence_bias={(IMAGE_TOKEN_ID,): 1e4})
    first = model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, **emits)
    assert (first.sequences[:, batch["input_ids"].shape[1]:] == IMAGE_TOKEN_ID).all(), (host, method)
    conversation = torch.cat([first.sequences, torch.full((rows, 2), 7)], dim=1)
    attention_mask = torch.ones_like(conversation)
    attention_mask[:, : batch["input_ids"].shape[1]] = batch["attention_mask"]
    continued = model.generate(input_ids=conversation, attention_mask=attention_mask,
                               **cache_kwargs(output_cache(first)), max_new_tokens=2, **FIXED)
    assert continued.shape == (rows, conversation.shape[1] + 2), (host, method)


def test_a_sample_alone_equals_the_same_sample_in_a_padded_batch(host, model, method, batch):
    """On LLaVA-NeXT the batch holds images of different aspect ratios (different packed lengths)."""
    with torch.no_grad():
        batched = model(**batch, use_cache=False)
    tokens = model.generate(**batch, max_new_tokens=6, **FIXED)[:, batch["input_ids"].shape[1]:]
    for row in range(batch["input_ids"].shape[0]):
        single_input = alone(batch, row)
        with torch.no_grad():
            single = model(**single_input, use_cache=False)
        assert same_selection(single.vision_keep_indices[0], batched.vision_keep_indices[row]), (host, method, row)
        for alone_keep, batch_keep in zip(single.llm_keep_indices, batched.llm_keep_indices, strict=True):
            assert same_selection(alone_keep[0], batch_keep[row]), (host, method, row)
        offset = int((~batch["attention_mask"][row].bool()).sum())
        slots = batched.kept_positions[row] >= offset
        assert torch.equal(batched.kept_positions[row][slots] - offset, single.kept_positions[0])
        assert (batched.logits[row][slots] - single.logits[0]).abs().max() <= 1e-4, (host, method)
        alone_tokens = model.generate(**single_input, max_new_tokens=6, **FIXED)[0, single_input["input_ids"].shape[1]:]
        assert torch.equal(alone_tokens, tokens[row]), (host, method, row)


def test_sdpa_and_eager_keep_the_same_tokens(host, method, batch):
    sdpa, eager = host_model(host, method, "sdpa"), host_model(host, method, "eager")
    with torch.no_grad():
        a, b = sdpa(**batch, use_cache=False), eager(**batch, use_cache=False)
    assert torch.equal(a.vision_keep_indices, b.vision_keep_indices), (host, method)
    assert all(torch.equal(x, y) for x, y in zip(a.llm_keep_indices, b.llm_keep_indices, strict=True)), (host, method)
    assert torch.equal(a.kept_positions, b.kept_positions)
    real = batch["attention_mask"].gather(1, a.kept_positions.clamp_min(0)).bool() & (a.kept_positions >= 0)
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-4, (host, method)
    assert torch.equal(sdpa.generate(**batch, max_new_tokens=6, **FIXED), eager.generate(**batch, max_new_tokens=6, **FIXED))


def test_a_text_only_sample_passes_unpruned_beside_pruned_ones(host, model, method):
    text = [1, 5, 6, 7, 8, 9]
    if host == "llava":
        prompt, images = make_prompt(2, 5, seed=1), {"pixel_values": make_pixels(1)}
    else:  # one wide image (3 crops)
        one = make_next_batch(model.config, image_sizes=((20, 40),), lengths=((2, 5),), seed=1)
        prompt, images = one["input_ids"][0].tolist(), image_inputs(one)
    input_ids, attention_mask = left_pad([text, prompt])
    with torch.no_grad():
        together = model(input_ids=input_ids, attention_mask=attention_mask, **images, use_cache=False)
        by_itself = model(input_ids=torch.tensor([text]), use_cache=False)
    assert (together.logits[0][-len(text):] - by_itself.logits[0]).abs().max() <= 1e-4, (host, method)
    assert together.vision_keep_indices.shape == (1, together.vision_keep_indices.shape[1])


def newline_indices(model, batch) -> list[set]:
    from modeling_llava_ivtp.layout_next import NEWLINE

    return [{j for j, source in enumerate(layout.source) if source == NEWLINE}
            for layout in model.image_layouts(batch["image_sizes"])]


def test_training_step_with_labels_reaches_the_projector(host, method, batch):
    """The loss over the kept tokens (labels gathered at them) back-propagates through the pruned forward; on
    LLaVA-NeXT a kept newline token carries the gradient to `image_newline`, and only a kept one."""
    model = host_model(host, method).train()
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool() | (batch["input_ids"] == IMAGE_TOKEN_ID), -100)
    out = model(**batch, labels=labels, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    gradient = model.model.multi_modal_projector.linear_1.weight.grad
    assert gradient is not None and float(gradient.abs().sum()) > 0, (host, method)
    if host == "next":
        newline = model.model.image_newline.grad
        kept_newline = any(int(index) in layout_newlines
                           for keep, layout_newlines in zip(out.vision_keep_indices, newline_indices(model, batch))
                           for index in keep)
        assert (newline is not None and float(newline.abs().sum()) > 0) == kept_newline, method


def test_options_are_checked_by_the_method():
    for name in METHODS:
        with pytest.raises(ValueError, match=rf"`pruning_options\['visual_tokens'\]` of pruning_method='{name}'"):
            IvtpConfig(**_tiny_dict(name, {"visual_tokens": 37}))
        with pytest.raises(ValueError, match=rf"pruning_method='{name}' has unknown options \['kept'\]"):
            IvtpConfig(**_tiny_dict(name, {"kept": 8}))
    with pytest.raises(ValueError, match=r"`pruning_method` must be one of .* got 'fast_v'"):
        IvtpConfig(**_tiny_dict("fast_v", None))
    with pytest.raises(ValueError, match=r"`schedule` is IVTP's pruning schedule; with pruning_method='fastv'"):
        IvtpConfig(**dict(_tiny_dict("fastv", None), schedule={"vision": [24, 16, 12], "llm": [8, 5]}))
    with pytest.raises(ValueError, match=r"`pruning_options\['layer'\]` of pruning_method='fastv'"):
        IvtpConfig(**_tiny_dict("fastv", {"visual_tokens": 8, "layer": 8}))


def _tiny_dict(method, options):
    from tiny_models import tiny_config_dict

    return tiny_config_dict(schedule=None, pruning_method=method, pruning_options=options)


def test_ivtp_budget_derives_the_7b_presets_shape():
    """`pruning_options={"visual_tokens": K}` for IVTP derives its schedule; for the 7B geometry at 64 it is the preset."""
    from pathlib import Path

    preset = json.loads((Path(__file__).resolve().parents[1] / "configuration" / "llava-1.5-7b-ivtp.json").read_text())
    budget = dict(preset, schedule=None, pruning_method="ivtp", pruning_options={"visual_tokens": 64})
    assert IvtpConfig(**budget).schedule == preset["schedule"]
    config = IvtpConfig(**dict(budget, pruning_options={"visual_tokens": 16}))
    assert config.schedule["llm"][-1] == 16 and len(config.schedule["vision"]) == 8
    reloaded = IvtpConfig(**config.to_dict())  # both fields saved: they agree, nothing re-derived
    assert reloaded.schedule == config.schedule
    with pytest.raises(ValueError, match=r"`schedule` .* and `pruning_options\['visual_tokens'\]`=16 disagree"):
        IvtpConfig(**dict(preset, pruning_method="ivtp", pruning_options={"visual_tokens": 16}))


LOAD_ALL = """
import json, sys, torch
from transformers import AutoModelForImageTextToText
expected = torch.load(sys.argv[1])
report = {}
for method, item in expected.items():
    model = AutoModelForImageTextToText.from_pretrained(item["folder"], trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**item["inputs"], use_cache=False)
    report[method] = {
        "module": type(model).__module__, "method": model.config.pruning_method,
        "options": model.config.pruning_options, "logits": float((out.logits - item["logits"]).abs().max()),
        "keep": bool(torch.equal(out.vision_keep_indices, item["keep"])),
    }
print(json.dumps(report))
"""


@pytest.mark.parametrize("host", HOSTS)
def test_save_and_load_as_remote_code_gives_the_same_outputs(host, tmp_path):
    """Every method's checkpoint loads through `AutoModelForImageTextToText` with `trust_remote_code` in a fresh
    interpreter (the checkpoint's own copy of the package) and gives the same logits and kept tokens."""
    batch, expected = host_batch(host), {}
    for method in METHODS:
        model = host_model(host, method)
        folder = tmp_path / method
        model.save_pretrained(folder)
        with torch.no_grad():
            out = model(**batch, use_cache=False)
        expected[method] = {"folder": str(folder), "inputs": dict(batch), "logits": out.logits,
                            "keep": out.vision_keep_indices}
        reloaded = type(model).from_pretrained(folder).eval()
        assert reloaded.config.pruning_method == method and reloaded.config.pruning_options == {"visual_tokens": BUDGET}
        with torch.no_grad():
            assert torch.equal(reloaded(**batch, use_cache=False).logits, out.logits), (host, method)
    torch.save(expected, tmp_path / "expected.pt")
    environment = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    environment.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_ALL), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report) == METHODS
    for method, item in report.items():
        assert item["module"].startswith("transformers_modules."), item
        assert item["method"] == method and item["options"] == {"visual_tokens": BUDGET}
        assert item["keep"] and item["logits"] <= 1e-5, (method, item)


@pytest.mark.parametrize("attention, aggregation", [
    ("rollout", "mean"), ("rollout", "max"), ("rollout", "multiply"), ("group", "residual"), ("layer", "residual"),
])
def test_ivtp_ablations_against_a_plain_reference(attention, aggregation):
    """Paper Tables 4 and 5 on the first vision group (later groups keep everything): stock eager CLIP layers'
    CLS attention rows, combined as the option says, times the scoring layer's value norms, top-k per image."""
    schedule = {"vision": [24, 24, 24], "llm": []}
    model = sharpen_attention(tiny_model(schedule=schedule, pruning_options={"attention": attention,
                                                                               "aggregation": aggregation}))
    pixels = make_pixels(2)
    batch = {"input_ids": torch.tensor([make_prompt(2, 3)] * 2), "pixel_values": pixels}
    with torch.no_grad():
        kept = model(**batch, use_cache=False).vision_keep_indices
        tower = model.model.vision_tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        keep = torch.arange(36).expand(2, -1)
        rows = []
        for layer_idx, layer in enumerate(tower.encoder.layers[:2]):  # group 1: layers 0 and 1
            normed = layer.layer_norm1(hidden)
            queries = layer.self_attn.q_proj(normed).view(2, -1, 4, 8).transpose(1, 2)
            keys = layer.self_attn.k_proj(normed).view(2, -1, 4, 8).transpose(1, 2)
            probabilities = ((queries @ keys.transpose(-1, -2)) * 8 ** -0.5).softmax(-1).mean(1)
            rows.append(probabilities[:, 0, 1:])
            norms = layer.self_attn.v_proj(normed)[:, 1:].norm(dim=-1)
            hidden = layer(hidden, None)
            if attention == "layer" and layer_idx == 0:  # layer-wise: 36 -> 29 (geometric to 24) after layer 0
                scores = rows[0] * norms
                first = scores.topk(29, dim=-1).indices.sort(dim=-1).values
                keep = keep.gather(1, first)
                hidden = torch.cat([hidden[:, :1], hidden[:, 1:].gather(1, first[..., None].expand(-1, -1, 32))], 1)
                rows = []
        stacked = torch.stack(rows)
        row = {"mean": stacked.mean(0), "max": stacked.amax(0), "multiply": stacked.prod(0)}.get(aggregation, rows[-1])
        if attention != "rollout":
            row = rows[-1]
        expected = keep.gather(1, (row * norms).topk(24, dim=-1).indices.sort(dim=-1).values)
    assert torch.equal(kept, expected.sort(dim=-1).values)


def test_topk_at_the_feature_layer_against_a_plain_reference():
    """`site="feature_layer"`: cosine of each patch with the CLS of the feature layer's output, top-k per image."""
    model = tiny_model(schedule=None, pruning_method="topk", pruning_options={"visual_tokens": 8, "site": "feature_layer"})
    pixels = make_pixels(2)
    with torch.no_grad():
        kept = model(input_ids=torch.tensor([make_prompt(2, 3)] * 2), pixel_values=pixels, use_cache=False)
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    similarity = torch.nn.functional.cosine_similarity(features[:, 1:], features[:, :1], dim=-1)
    assert torch.equal(kept.vision_keep_indices, similarity.topk(8, dim=-1).indices.sort(dim=-1).values)
    assert kept.vision_token_counts == (8,)


def _stock_inputs(model, pixels):
    """What stock Llava computes for an unpruned forward: the feature layer's hidden states and the CLS attention of
    the layer that produced them (eager, `output_attentions`), and the projected patch features."""
    import copy

    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    out = eager(pixels, output_hidden_states=True, output_attentions=True)
    layer = len(out.hidden_states) - 3  # hidden_states[-2] is the output of layer index -2
    features = out.hidden_states[-2]
    cls_row = out.attentions[layer].mean(dim=1)[:, 0]  # (images, tokens)
    return features, cls_row, model.model.multi_modal_projector(features[:, 1:])


@pytest.mark.parametrize("method", ["random", "pooling", "divprune", "visionzip", "vispruner", "cdpruner"])
def test_feature_layer_and_projected_methods_against_stock_features(method):
    """The kept patches equal the method's rule applied to what stock modules compute (eager CLIP attention rows,
    the projector's output), so the seam feeds each method the right tensors."""
    from modeling_llava_ivtp.pruner_cdpruner import cdpruner_keep_indices
    from modeling_llava_ivtp.pruner_divprune import divprune_keep_indices
    from modeling_llava_ivtp.pruner_pooling import spatial_pooling
    from modeling_llava_ivtp.pruner_visionzip import visionzip_tokens
    from modeling_llava_ivtp.pruner_vispruner import vispruner_keep_indices
    from modeling_llava_ivtp.pruner_base import select_keep_indices

    model = method_model(method)
    pixels = make_pixels(2)
    with torch.no_grad():
        kept = model(input_ids=torch.tensor([make_prompt(2, 3)] * 2), pixel_values=pixels, use_cache=False)
        features, cls_row, projected = _stock_inputs(model, pixels)
    if method == "random":
        order = torch.rand(36, generator=torch.Generator().manual_seed(0))
        expected = select_keep_indices(order[None], BUDGET).expand(2, -1)
    elif method == "pooling":
        expected = spatial_pooling(projected, BUDGET)[0]
    elif method == "divprune":
        expected = divprune_keep_indices(projected, BUDGET)
    elif method == "cdpruner":  # no instruction given: uniform relevance, diversity alone
        expected = cdpruner_keep_indices(projected, torch.ones(2, 36), BUDGET)
    elif method == "vispruner":
        expected = vispruner_keep_indices(features[:, 1:], cls_row[:, 1:], 6, 2)
    else:
        tower = model.model.vision_tower
        last = tower.encoder.layers[len(tower.encoder.layers) - 2]
        with torch.no_grad():
            keys = last.self_attn.k_proj(last.layer_norm1(_stock_input_of_layer(model, pixels)))
        keys = keys.view(2, 37, 4, 8).mean(dim=2)
        expected = visionzip_tokens(features, cls_row, keys, 7, 1)[0]  # the CLS (-1), 6 dominant, 1 contextual
    assert torch.equal(kept.vision_keep_indices, expected), method


def _stock_input_of_layer(model, pixels):
    """The input of the vision layer that produces the feature layer's output (stock, every token)."""
    tower = model.model.vision_tower
    return tower(pixels, output_hidden_states=True).hidden_states[-3]


@pytest.mark.parametrize("query_row", ["last", "last_instruction"])
def test_fastv_against_stock_eager_attention(query_row):
    """FastV keeps the visual tokens the query row attends to most in layer K (head-averaged), read from stock Llava's
    eager `output_attentions`: by default the prompt's last token (FastV's code), as an option the last instruction
    token -- the seam's recorded row is that row."""
    from tiny_models import stock_twin

    model = method_model("fastv", options={"query_row": query_row})
    batch = with_instruction(make_batch(((2, 5), (4, 9))))
    with torch.no_grad():
        kept = model(**batch, use_cache=False)
        stock = stock_twin(model, attn_implementation="eager")(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            output_attentions=True,
        )
    attention = stock.attentions[1].mean(dim=1)  # layer K = 2: index 1
    for row in range(2):
        last = batch["input_ids"].shape[1] - 1
        if query_row == "last_instruction":
            last = int(torch.where(batch["instruction_mask"][row])[0].max())
        image = torch.where(batch["input_ids"][row] == IMAGE_TOKEN_ID)[0]
        scores = attention[row, last, image]
        expected = scores.topk(BUDGET).indices.sort().values
        assert torch.equal(kept.llm_keep_indices[0][row], expected), row


def test_hf_trainer_fine_tunes_with_pruning_on(host, method, batch, tmp_path):
    """Two steps of `transformers.Trainer` with activation checkpointing, pruning in every step: the loss is finite and
    the projector moves."""
    from transformers import Trainer, TrainingArguments

    model = host_model(host, method)
    labels = batch["input_ids"].masked_fill(
        ~batch["attention_mask"].bool() | (batch["input_ids"] == IMAGE_TOKEN_ID), -100
    )
    rows = [{name: value[row] for name, value in dict(batch, labels=labels).items()} for row in range(len(labels))]
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        activation_checkpointing=True, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
        logging_steps=1, dataloader_num_workers=0,
    )
    collate = lambda items: {name: torch.stack([item[name] for item in items]) for name in items[0]}  # noqa: E731
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)), (host, method)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, before), (host, method)



# ------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT: each rule against a reference on stock LLaVA-NeXT
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("next_method", ["random", "divprune"])
def test_next_pruned_forward_is_stock_llava_next_on_the_kept_tokens(next_method, next_batch):
    """Against stock modules: the kept tokens are the method's rule on stock LLaVA-NeXT's packed features (base crop,
    unpadded tiles, newlines), and the logits are stock LLaVA-NeXT's decoder run on the prompt with only those image
    tokens, at the method's positions (random: the original ids; DivPrune: renumbered, as its code)."""
    from modeling_llava_ivtp.pruner_base import select_keep_indices
    from modeling_llava_ivtp.pruner_divprune import divprune_keep_indices

    next_model = next_method_model(next_method)
    stock = next_stock_twin(next_model)
    for row in range(2):
        single = alone(next_batch, row)
        with torch.no_grad():
            ours = next_model(**single, use_cache=False)
            packed = stock.model.get_image_features(single["pixel_values"], single["image_sizes"]).pooler_output[0]
        if next_method == "random":
            order = torch.rand(packed.shape[0], generator=torch.Generator().manual_seed(0))
            expected = select_keep_indices(order[None], BUDGET)[0]
        else:
            expected = divprune_keep_indices(packed[None], BUDGET)[0]
        assert torch.equal(ours.vision_keep_indices[0], expected), (next_method, row)
        ids = single["input_ids"][0]
        image = torch.where(ids == IMAGE_TOKEN_ID)[0]
        embeds = stock.get_input_embeddings()(ids.clamp_max(stock.config.text_config.vocab_size - 1)).clone()
        embeds[image] = packed
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[image] = False
        keep[image[expected]] = True
        positions = torch.arange(len(ids))[keep]
        if next_model.config.pruning_options.get("positions", PRUNERS[next_method].positions) == "renumbered":
            positions = torch.arange(int(keep.sum()))
        with torch.no_grad():
            hidden = stock.model.language_model(inputs_embeds=embeds[keep][None], position_ids=positions[None]).last_hidden_state
            logits = stock.lm_head(hidden)
        assert torch.equal(ours.kept_positions[0], torch.where(keep)[0])
        assert (ours.logits - logits).abs().max() <= 1e-4, (next_method, row)




def test_next_fastv_against_stock_eager_attention(next_batch):
    """FastV on LLaVA-NeXT ranks each image's packed tokens (base crop, unpadded tiles, newlines) by the last token's
    head-averaged attention in layer K, read from stock LLaVA-NeXT's eager `output_attentions`, in a padded batch of
    images with different packed lengths."""
    model = next_method_model("fastv", "eager")
    with torch.no_grad():
        kept = model(**next_batch, use_cache=False)
        stock = next_stock_twin(model, "eager")(
            input_ids=next_batch["input_ids"], attention_mask=next_batch["attention_mask"],
            pixel_values=next_batch["pixel_values"], image_sizes=next_batch["image_sizes"], output_attentions=True,
        )
    attention = stock.attentions[1].mean(dim=1)  # layer K = 2: index 1
    last = next_batch["input_ids"].shape[1] - 1
    for row in range(2):
        image = torch.where(next_batch["input_ids"][row] == IMAGE_TOKEN_ID)[0]
        expected = attention[row, last, image].topk(BUDGET).indices.sort().values
        assert torch.equal(kept.llm_keep_indices[0][row], expected), row


@pytest.mark.parametrize("next_method", METHODS)
def test_next_a_budget_above_an_images_length_keeps_that_image_whole(next_method, next_batch):
    """The budget counts one image's tokens, all crops, up to the longest packed sequence (`max_visual_tokens`, 192
    here): 120 keeps the wide image's 114 tokens and 120 of the other's 168, alone as in the batch. A method that
    prunes each crop in the tower first brings at most what the crops kept (`next_entry_counts`)."""
    model = tiny_next_model(pruning_method=next_method, pruning_options={"visual_tokens": 120})
    assert model.config.max_visual_tokens == 192
    with torch.no_grad():
        out = model(**next_batch, use_cache=True)
    held = output_cache(out).layer_positions[-1]
    counts = [int((next_batch["input_ids"][row, held[row][held[row] >= 0]] == IMAGE_TOKEN_ID).sum()) for row in range(2)]
    expected = [min(120, count) for count in next_entry_counts(model, out, next_batch)]
    per_image = not out.vision_token_counts and next_method not in ("cdpruner", "pooling")  # else per crop first
    assert expected == [114, 120] if per_image else expected[0] < 114 and expected[1] <= 120
    assert counts == expected, next_method
    tokens = model.generate(**next_batch, max_new_tokens=4, **FIXED)[:, next_batch["input_ids"].shape[1]:]
    for row in range(2):
        single = alone(next_batch, row)
        assert torch.equal(model.generate(**single, max_new_tokens=4, **FIXED)[0, single["input_ids"].shape[1]:], tokens[row])
    with pytest.raises(ValueError, match=r"`pruning_options\['visual_tokens'\]` .* must be an int in \[1, 192\]"):
        tiny_next_model(pruning_method=next_method, pruning_options={"visual_tokens": 193})


def test_next_visual_features_are_stock_packing_with_each_images_base_crop():
    """The NeXT host's features hook: each image's packed sequence as stock `get_image_features` builds it (zeros past
    its length), and, per image, the CLS and the feature layer's hidden states of its base crop (what a method reads
    for the whole image: the visual CLS, CLIP's image embedding)."""
    from modeling_llava_ivtp.modeling_llava_ivtp import ImageBatch
    from modeling_llava_ivtp.pruner_base import PruneContext

    model = next_method_model("random")
    batch = make_next_batch(model.config)
    stock = next_stock_twin(model)
    lengths = tuple(layout.length for layout in model.image_layouts(batch["image_sizes"]))
    images = ImageBatch(per_sample=torch.ones(2, dtype=torch.long), counts=(1, 1),
                        lengths=tuple((length,) for length in lengths), sizes=batch["image_sizes"].tolist())
    context = PruneContext(model=model, guidance={}, images_per_sample=images.per_sample, images=images.counts,
                           visual_lengths=lengths)
    with torch.no_grad():
        vision = model._visual_features(batch["pixel_values"], PRUNERS["random"](model.config, context), images)
        packed = stock.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        base = stock.model.vision_tower(batch["pixel_values"][:, 0], output_hidden_states=True)
    feature_layer = base.hidden_states[model.config.vision_feature_layer]
    torch.testing.assert_close(vision["feature_layer_hidden_states"], feature_layer, atol=1e-5, rtol=0)
    torch.testing.assert_close(vision["cls_hidden_state"], feature_layer[:, 0], atol=1e-5, rtol=0)
    for image, length in enumerate(lengths):
        torch.testing.assert_close(vision["features"][image, :length], packed[image], atol=1e-5, rtol=0)
        assert not vision["features"][image, length:].any()


@pytest.mark.parametrize("guidance", ["visual_cls", "instruction_mean"])
def test_next_ivtp_is_its_rule_on_stock_llava_next(guidance, next_batch):
    """IVTP on LLaVA-NeXT against a reference of the host's rule written on stock modules (`reference_ivtp.py`): stage
    1 on each crop alone through the stock vision tower (full rollout matrices; a tile's patches on the letterbox
    padding rank last), the kept patches packed by stock `pack_image_features` with every newline, stage 2 over the
    image's tokens with the pseudo-CLS (the base crop's CLS, or the instruction tokens' mean), each group keeping
    the smaller of its count and the tokens held; each sample of the padded batch against the reference alone."""
    from reference_ivtp import reference_next_forward

    model = next_method_model("ivtp", "eager", options={"visual_tokens": 32}, guidance=guidance)
    stock = next_stock_twin(model, "eager")
    with torch.no_grad():
        batched = model(**next_batch, use_cache=False)
    layouts = model.image_layouts(next_batch["image_sizes"])
    for row in range(2):
        real = next_batch["attention_mask"][row].bool()
        ids = next_batch["input_ids"][row][real]
        pseudo = None
        if guidance == "instruction_mean":
            with torch.no_grad():
                pseudo = stock.get_input_embeddings()(ids[next_batch["instruction_mask"][row][real]]).mean(0)
        reference = reference_next_forward(stock, model.config, ids, next_batch["pixel_values"][row][: layouts[row].crops],
                                           next_batch["image_sizes"][row].tolist(), pseudo)
        kept = batched.vision_keep_indices[row]
        assert torch.equal(kept[kept >= 0], reference["vision_keep_indices"]), (guidance, row)
        for group, expected in enumerate(reference["llm_keep_indices"]):
            ours = batched.llm_keep_indices[group][row]
            assert torch.equal(ours[ours >= 0], expected), (guidance, row, group)
        offset = int((~real).sum())
        slots = batched.kept_positions[row] >= offset
        assert torch.equal(batched.kept_positions[row][slots] - offset, reference["kept_positions"])
        assert (batched.logits[row][slots] - reference["logits"]).abs().max() <= 1e-4, (guidance, row)


def test_next_topk_is_its_rule_on_stock_llava_next(next_batch):
    """TopK on LLaVA-NeXT (`site="feature_layer"`: one selection where LLaVA reads its features): on each crop, the
    `budget // max_crops` patches of the stock vision tower's feature layer most similar to the crop's CLS, a tile's
    padding patches last; packed in stock `pack_image_features` order without the newlines (the tower-only rule), and
    the logits are stock LLaVA-NeXT's decoder on the prompt with those tokens at their original positions."""
    from reference_ivtp import packed_sources, stock_logits_at_kept

    model = next_method_model("topk", options={"visual_tokens": 20, "site": "feature_layer"})
    stock = next_stock_twin(model)
    config, patches = model.config, model.config.num_patches
    with torch.no_grad():
        batched = model(**next_batch, use_cache=False)
    layouts = model.image_layouts(next_batch["image_sizes"])
    for row in range(2):
        crops = layouts[row].crops
        pixels = next_batch["pixel_values"][row][:crops]
        source = packed_sources(stock, config, crops, next_batch["image_sizes"][row].tolist())
        shown = torch.zeros(crops * patches, dtype=torch.bool)
        shown[source[source >= 0]] = True
        with torch.no_grad():
            feature_layer = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        kept = torch.zeros(crops * patches, dtype=torch.bool)
        for crop in range(crops):
            similarity = torch.nn.functional.cosine_similarity(feature_layer[crop, 1:], feature_layer[crop, :1], dim=-1)
            order = sorted(range(patches), key=lambda p: (not bool(shown[crop * patches + p]), -float(similarity[p])))
            kept[crop * patches + torch.tensor(order[: 20 // 5])] = True
        expected = torch.where((source >= 0) & kept[source.clamp_min(0)])[0]
        ours = batched.vision_keep_indices[row]
        assert torch.equal(ours[ours >= 0], expected), row
        real = next_batch["attention_mask"][row].bool()
        ids = next_batch["input_ids"][row][real]
        with torch.no_grad():
            packed = stock.model.get_image_features(pixels[None], next_batch["image_sizes"][row:row + 1]).pooler_output[0]
        logits, positions = stock_logits_at_kept(stock, ids, IMAGE_TOKEN_ID, expected, packed[expected])
        offset = int((~real).sum())
        slots = batched.kept_positions[row] >= offset
        assert torch.equal(batched.kept_positions[row][slots] - offset, positions)
        assert (batched.logits[row][slots] - logits).abs().max() <= 1e-4, row


def test_next_cdpruner_is_its_codes_rule(next_batch):
    """CDPruner on LLaVA-NeXT as its code runs it (`encode_images` on an image's crops): per crop the budget's share
    (`visual_tokens // 5`, its scripts' 128 / 64 / 32 for 640 / 320 / 160) by the greedy DPP over the projected
    features (brute-force log-det greedy here), the relevance -- negative cosine of each patch's CLIP embedding
    (the feature layer through `post_layernorm` and the visual projection) to the instruction's -- min-max
    normalised over all the image's crops at once; the base crop's kept tokens, then the tiles' in raster order over
    the stitched grid, no unpadding, no newline; stock LLaVA-NeXT's decoder on that block at fresh positions."""
    from reference_ivtp import base_then_tiles_block, stock_logits_with_block
    from test_pruner_peers import plain_dpp_greedy

    model = next_method_model("cdpruner", options={"visual_tokens": 30})
    stock = next_stock_twin(model)
    clip_ids = torch.zeros(1, 77, dtype=torch.long)
    clip_ids[0, :6] = torch.tensor([49406, 320, 1125, 533, 518, 49407])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layouts = model.image_layouts(next_batch["image_sizes"])
    for row in range(2):
        real = next_batch["attention_mask"][row].bool()
        ids = next_batch["input_ids"][row][real]
        pixels = next_batch["pixel_values"][row][: layouts[row].crops]
        with torch.no_grad():
            out = model(input_ids=ids[None], pixel_values=pixels[None], image_sizes=next_batch["image_sizes"][row:row + 1],
                        clip_input_ids=clip_ids, use_cache=False)
            hidden = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
            projected = stock.model.multi_modal_projector(hidden)
            image_embeds = model.clip_visual_projection(stock.model.vision_tower.post_layernorm(hidden))
            text = model.clip_text_model(clip_ids)
            text = text[0] if isinstance(text, tuple) else text
            cosine = torch.nn.functional.cosine_similarity(image_embeds, text.reshape(1, 1, -1), dim=-1)
            relevance = -cosine
            relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
        kept = [plain_dpp_greedy(projected[crop], relevance[crop], 30 // 5) for crop in range(len(pixels))]
        block = base_then_tiles_block(projected, kept, layouts[row].grid, side)
        assert block.shape[0] == 6 * layouts[row].crops
        logits = stock_logits_with_block(stock, ids, IMAGE_TOKEN_ID, block)
        torch.testing.assert_close(out.logits[0], logits, atol=2e-5, rtol=1e-5)


def test_next_pooling_is_its_rule_on_stock_llava_next(next_batch):
    """Pooling on LLaVA-NeXT (ours): each crop's projected grid average-pooled alone to the budget's share (45 // 5
    = 9 cells of 2 x 2 patches here: `avg_pool2d`), each cell at its centre patch's place in stock packing, the cells
    centred on a tile's padding and the newlines left out; the logits are stock LLaVA-NeXT's decoder on those tokens
    at their original positions."""
    from reference_ivtp import packed_sources, stock_logits_at_kept

    model = next_method_model("pooling", options={"visual_tokens": 45})
    stock = next_stock_twin(model)
    layouts = model.image_layouts(next_batch["image_sizes"])
    with torch.no_grad():
        batched = model(**next_batch, use_cache=False)
    for row in range(2):
        crops = layouts[row].crops
        pixels = next_batch["pixel_values"][row][:crops]
        source = packed_sources(stock, model.config, crops, next_batch["image_sizes"][row].tolist())
        with torch.no_grad():
            hidden = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
            projected = stock.model.multi_modal_projector(hidden[:, 1:])  # (crops, 36, hidden)
            grid = projected.view(crops, 6, 6, -1).permute(0, 3, 1, 2)
            cells = torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(crops, 9, -1)
        centre = torch.tensor([(2 * (cell // 3) + 1) * 6 + 2 * (cell % 3) + 1 for cell in range(9)])
        place = {int(s): j for j, s in enumerate(source.tolist()) if s >= 0}
        tokens = sorted((place[crop * 36 + int(centre[cell])], crop, cell) for crop in range(crops) for cell in range(9)
                        if crop * 36 + int(centre[cell]) in place)
        expected = torch.tensor([at for at, _, _ in tokens])
        ours = batched.vision_keep_indices[row]
        assert torch.equal(ours[ours >= 0], expected), row
        real = next_batch["attention_mask"][row].bool()
        ids = next_batch["input_ids"][row][real]
        features = torch.stack([cells[crop, cell] for _, crop, cell in tokens])
        logits, positions = stock_logits_at_kept(stock, ids, IMAGE_TOKEN_ID, expected, features)
        offset = int((~real).sum())
        slots = batched.kept_positions[row] >= offset
        assert torch.equal(batched.kept_positions[row][slots] - offset, positions)
        assert (batched.logits[row][slots] - logits).abs().max() <= 1e-4, row
