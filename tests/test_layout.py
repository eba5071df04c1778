"""The pruning loop's host-side sizes against the packed tensors they size, and the prefill's reads of the device.

The loop never asks the device how many tokens a row kept (`TokenState` knows it from one read per prefill): if
that arithmetic were off, `pack_rows` would silently drop or pad tokens.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_llava_ivtp.tokens_ivtp import TokenState, true_indices, unpack
from modeling_llava_ivtp.transformers_compat import cache_kwargs, output_cache
from tiny_models import IMAGE_TOKEN_ID, TINY_CLIP_TEXT, left_pad, make_pixels, make_prompt, stock_twin, tiny_model


NUM_PATCHES = 6


def _check(tokens: TokenState, kept_per_row: torch.Tensor) -> None:
    """The host sizes are the tensors' sizes: no token dropped, padding slots first, `visual` tokens per image.
    With a probe, the last slot is the probe (position -1, not padding)."""
    assert tokens.positions.shape[1] == tokens.length
    real = tokens.length - tokens.probe
    for row, pad in enumerate(tokens.pads):
        padding = tokens.positions[row, :real] < 0
        assert int(padding.sum()) == pad and bool(padding[:pad].all())  # padding slots come first
        assert real - pad == int(kept_per_row[row])  # no token dropped
    if tokens.probe:
        assert bool(tokens.attention_mask[:, -1].all()) and not bool(tokens.is_visual[:, -1].any())
    rows = tokens.image_rows
    if rows:
        assert tokens.is_visual[rows].sum(dim=1).tolist() == [tokens.visual] * len(rows)
        slots = tokens.visual_slots(torch.tensor(rows))
        assert bool(tokens.is_visual[torch.tensor(rows).unsqueeze(-1), slots].all())
        # The host's key range for image rows (`RowRequest.keys`) holds every visual token, exactly (one image).
        assert int(slots[:, -1].max()) + 1 <= tokens.visual_end <= tokens.last_real_slot + 1
        last_kept = [
            int(((tokens.positions[row] >= 0) & (tokens.positions[row] <= tokens.last_placeholder[row])).nonzero().max())
            for row in rows
        ]
        assert tokens.visual_end == max(last_kept) + 1


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_token_state_sizes_the_packed_token_sets(data):
    batch = data.draw(st.integers(1, 4), label="batch")
    length = data.draw(st.integers(NUM_PATCHES + 2, 16), label="length")
    contiguous = data.draw(st.booleans(), label="contiguous")
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        padding = data.draw(st.integers(0, length - NUM_PATCHES - 1), label="padding")
        if not data.draw(st.booleans(), label="has_image"):
            continue
        if contiguous:
            start = data.draw(st.integers(padding, length - NUM_PATCHES), label="start")
            is_image[row, start : start + NUM_PATCHES] = True
        else:  # text between an image's placeholders
            places = data.draw(st.permutations(range(padding, length)), label="places")[:NUM_PATCHES]
            is_image[row, list(places)] = True
    kept = data.draw(st.integers(1, NUM_PATCHES), label="kept")
    placeholders = is_image.sum(dim=1).tolist()

    # Stage 1 kept `kept` patches of each image (any of them).
    keep = ~is_image
    for row in range(batch):
        image_slots = is_image[row].nonzero()[:, 0]
        if len(image_slots):
            chosen = data.draw(st.permutations(image_slots.tolist()), label="stage-1 choice")[:kept]
            keep[row, chosen] = True
    logical = {
        "hidden_states": torch.zeros(batch, length, 0),
        "positions": torch.arange(length).expand(batch, -1),
        "position_ids": torch.arange(length).expand(batch, -1),
        "attention_mask": torch.ones(batch, length, dtype=torch.bool),
        "is_visual": is_image,
        "patch_index": torch.full((batch, length), -1),
    }
    last_placeholder = torch.where(is_image, torch.arange(length), -1).amax(dim=1).tolist()
    tokens, index, slot_valid = TokenState.entering_llm(logical, keep, placeholders, last_placeholder, NUM_PATCHES, kept)
    assert torch.equal(slot_valid.sum(dim=1), keep.sum(dim=1))
    _check(tokens, keep.sum(dim=1))

    # The probe slot at the end, then groups keeping fewer visual tokens of each image.
    tokens = tokens.append_probe(torch.zeros(batch, 0), torch.zeros(batch, dtype=torch.long))
    _check(tokens, keep.sum(dim=1))
    for num_keep in data.draw(st.lists(st.integers(1, kept), max_size=3).map(sorted), label="groups")[::-1]:
        keep = ~tokens.is_visual
        for row in tokens.image_rows:
            visual = tokens.is_visual[row].nonzero()[:, 0].tolist()
            keep[row, data.draw(st.permutations(visual), label="stage-2 choice")[:num_keep]] = True
        kept_per_row = (keep & (tokens.positions >= 0)).sum(dim=1)
        tokens = tokens.keep_visual(keep, num_keep)
        _check(tokens, kept_per_row)
    kept_per_row = (tokens.positions >= 0).sum(dim=1)
    tokens = tokens.drop_probe()
    _check(tokens, kept_per_row)


def test_true_indices_and_unpack_equal_their_plain_versions():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(5, 11, dtype=torch.bool)
    for row in range(5):
        mask[row, torch.randperm(11, generator=generator)[:4]] = True
    expected = torch.stack([row.nonzero()[:, 0] for row in mask])
    assert torch.equal(true_indices(mask, 4), expected)

    index = torch.tensor([[0, 0, 2, 5], [1, 3, 4, 6]])
    slot_valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    values = torch.arange(8.0).view(2, 4)
    got = unpack(values, index, slot_valid, 7, float("nan"))
    plain = torch.full((2, 7), float("nan"))
    for row in range(2):
        for slot in range(4):
            if slot_valid[row, slot]:
                plain[row, index[row, slot]] = values[row, slot]
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())


# ------------------------------------------------------------------------------------------------------------------
# Reads of the device
# ------------------------------------------------------------------------------------------------------------------
# Ops that hand a tensor's value to Python (or size a tensor by it): on a GPU each waits for the device.
READ_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "masked_select")


class CountReads(TorchDispatchMode):
    """Reads of tensor values by the host. `Tensor.tolist()` reads without dispatching on the CPU, so the fixture
    `count_tolist` wraps it for the test (the model's intended reads are two `tolist` calls per pruned prefill)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in READ_OPS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_tolist(monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def tolist(tensor):
        calls.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return calls


def _padded_batch_with_a_text_only_sample():
    input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9, 10, 11], make_prompt(2, 5, seed=1), make_prompt(4, 3)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": make_pixels(2)}


@pytest.mark.parametrize("use_cache", [False, True])
def test_pruned_prefill_reads_the_device_twice_and_decode_never(use_cache, count_tolist):
    """One read of the batch layout at the start, one of the kept counts at the end; nothing in between."""
    model = tiny_model()
    batch = _padded_batch_with_a_text_only_sample()
    with torch.no_grad():
        with CountReads() as stock_reads:
            stock_twin(model)(**batch, use_cache=use_cache)
        count_tolist.clear()
        with CountReads() as prefill_reads:
            out = model(**batch, use_cache=use_cache)
        assert prefill_reads.reads == []
        # layout and input values (4 facts + the ids' extremes, x batch); 2 kept counts
        assert count_tolist == [(6, batch["input_ids"].shape[0]), (2,)]
        assert out.llm_token_counts == (8, 5)
        if use_cache:
            next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
            count_tolist.clear()
            with CountReads() as decode_reads:
                model(input_ids=next_token, attention_mask=mask, **cache_kwargs(output_cache(out)))
            # Nothing: a step over a filled cache dispatches stock's operators (a placeholder id is an ordinary
            # token there, and an id out of range meets the embedding's own error).
            assert decode_reads.reads == [] and count_tolist == []
    assert stock_reads.reads, "the counter sees stock Llava's reads (its placeholder check)"


def test_a_step_over_a_static_cache_reads_nothing(count_tolist):
    """The static form of the pruned cache (compiled steps, CUDA graphs): its steps read nothing either."""
    from modeling_llava_ivtp.cache_ivtp import IvtpStaticCache
    from modeling_llava_ivtp.tokens_ivtp import static_width_mask

    model = tiny_model()
    batch = _padded_batch_with_a_text_only_sample()
    prompt = batch["input_ids"].shape[1]
    cache = IvtpStaticCache(config=model.config.text_config, max_cache_len=prompt + 4)
    with torch.no_grad():
        out = model(**batch, **cache_kwargs(cache), use_cache=True)
        next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        mask = static_width_mask(torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1).bool(),
                                 prompt + 4)
        count_tolist.clear()
        with CountReads() as decode_reads:
            model(input_ids=next_token, attention_mask=mask, **cache_kwargs(cache))
    assert decode_reads.reads == [] and count_tolist == []
    assert cache.is_frozen and cache.padding_slots


def test_unpadded_batch_without_attention_mask_has_no_padding_slots(count_tolist):
    model = tiny_model()
    input_ids = torch.tensor([make_prompt(3, 5, seed=2), make_prompt(3, 5, seed=3)])
    pixel_values = make_pixels(2)
    count_tolist.clear()
    with torch.no_grad():
        with CountReads() as reads:
            out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
    assert reads.reads == [] and count_tolist == [(6, 2), (2,)]
    assert bool((out.kept_positions >= 0).all())
    assert all(bool((positions >= 0).all()) for positions in output_cache(out).layer_positions)


@pytest.mark.parametrize("path", ["pruned", "pruning off", "no image"])
def test_clip_token_spans_past_the_clip_context_are_refused(path):
    """Checked in the pruned prefill's one read, and on a text-only batch with pruning on (where the spans go unused).
    With pruning off the model is stock Llava, operator for operator: the spans are unused and not read."""
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, **({"schedule": None} if path == "pruning off" else {}))
    context = TINY_CLIP_TEXT["text_cfg"]["context_length"]
    input_ids = torch.tensor([make_prompt(2, 5)] if path != "no image" else [[1, 5, 6, 7, 8]])
    spans = torch.zeros(1, input_ids.shape[1], 2, dtype=torch.long)
    spans[0, -2] = torch.tensor([context - 1, context + 3])
    message = rf"`clip_token_spans` must hold \[start, end\) ranges with 0 <= start <= end <= {context} .* ends up to {context + 3}\."
    inputs = dict(
        input_ids=input_ids,
        pixel_values=make_pixels(1) if path != "no image" else None,
        instruction_mask=input_ids != IMAGE_TOKEN_ID,
        clip_input_ids=torch.zeros(1, context, dtype=torch.long),
        clip_token_spans=spans,
    )
    if path == "pruning off":
        with torch.no_grad():
            unguided = model(input_ids=input_ids, pixel_values=inputs["pixel_values"]).logits
            assert torch.equal(model(**inputs).logits, unguided)
        return
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize("method", ["ivtp", "fastv"])
def test_placeholders_split_by_text_are_pruned_as_one_image(method):
    """An image whose placeholders a text token splits (not the processor's layout, but stock Llava fills them in
    order): the host's one-block arithmetic does not apply (the layout read says so), every text token stays, the
    kept visual tokens are placeholders, as many as the schedule keeps, and the split equals the block layout's
    choice of patches."""
    model = tiny_model() if method == "ivtp" else tiny_model(schedule=None, pruning_method=method, pruning_options={"visual_tokens": 8})
    block = make_prompt(2, 4, seed=5)
    split = block[:3 + 20] + [7] + block[3 + 20:]  # a text token after the image's 20th placeholder
    with torch.no_grad():
        outs = {name: model(input_ids=torch.tensor([ids]), pixel_values=make_pixels(1), use_cache=True)
                for name, ids in (("block", block), ("split", split))}
    kept = outs["split"].kept_positions[0].tolist()
    text = [position for position, token in enumerate(split) if token != IMAGE_TOKEN_ID]
    assert set(text) <= set(kept)
    visual = [position for position in kept if split[position] == IMAGE_TOKEN_ID]
    assert len(visual) == len(kept) - len(text) == outs["block"].kept_positions.shape[1] - (len(block) - 36)
    for name in ("block", "split"):
        assert all(bool((indices >= 0).all()) for indices in outs[name].llm_keep_indices)
    torch.testing.assert_close(outs["split"].vision_keep_indices, outs["block"].vision_keep_indices)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_one_block_packing_equals_the_packed_mask(data):
    """The host-known paths for the processor's layout (one block of placeholders per sample, at one slot) build
    the same token state as packing a mask over the sequence: the LLM's entry (`entering_one_block`), a selection in
    the visual range (`keep_visual_slots`), with original and with renumbered positions."""
    batch = data.draw(st.integers(1, 3), label="batch")
    start = data.draw(st.integers(0, 4), label="start")
    length = start + NUM_PATCHES + data.draw(st.integers(0, 4), label="after")
    renumber = data.draw(st.booleans(), label="renumber")
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    is_image[:, start : start + NUM_PATCHES] = True
    kept = data.draw(st.integers(1, NUM_PATCHES), label="kept")
    keep_indices = torch.stack([
        torch.tensor(sorted(data.draw(st.permutations(range(NUM_PATCHES)), label="patches")[:kept]))
        for _ in range(batch)
    ])
    keep = ~is_image
    keep[:, start:start + NUM_PATCHES] |= torch.zeros(batch, NUM_PATCHES, dtype=torch.bool).scatter(1, keep_indices, True)
    order = torch.arange(length).expand(batch, -1)
    position_ids = order - (~keep).long().cumsum(dim=1) if renumber else order
    logical = {
        "hidden_states": torch.zeros(batch, length, 0), "positions": order, "position_ids": position_ids,
        "attention_mask": torch.ones(batch, length, dtype=torch.bool), "is_visual": is_image,
        "patch_index": torch.where(is_image, order - start, -1),
    }
    last = [start + NUM_PATCHES - 1] * batch
    packed, index, _ = TokenState.entering_llm(logical, keep, [NUM_PATCHES] * batch, last, NUM_PATCHES, kept)
    block, block_index = TokenState.entering_one_block(
        start, keep_indices, None, logical["attention_mask"], is_image, NUM_PATCHES, last, renumber=renumber
    )
    assert torch.equal(index, block_index)
    fields = ("positions", "position_ids", "attention_mask", "is_visual", "patch_index")
    for name in fields:
        assert torch.equal(getattr(packed, name), getattr(block, name)), name
    assert (packed.length, packed.pads, packed.visual) == (block.length, block.pads, block.visual)
    assert block.slot_positions == renumber and block.visual_range == slice(start, start + kept)

    # A later selection inside the visual range: by index ranges, and by a packed mask.
    block = replace(block, hidden_states=torch.randn(batch, block.length, 3))
    num_keep = data.draw(st.integers(1, kept), label="num_keep")
    chosen = torch.stack([
        torch.tensor(sorted(data.draw(st.permutations(range(kept)), label="choice")[:num_keep])) for _ in range(batch)
    ]) + start
    by_ranges = block.keep_visual_slots(chosen, num_keep, renumber=renumber)
    by_mask = replace(block, slot_positions=False).keep_visual(
        (~block.is_visual).scatter(1, chosen, True), num_keep, renumber=renumber
    )
    for name in ("hidden_states", *fields):
        assert torch.equal(getattr(by_ranges, name), getattr(by_mask, name)), name
    assert (by_ranges.length, by_ranges.pads, by_ranges.visual) == (by_mask.length, by_mask.pads, by_mask.visual)
