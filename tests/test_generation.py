"""`generate` with IVTP's pruned KV cache: every decoding path against the same decoding without a cache (each step
re-prunes from scratch), per-layer cache contents, batch layouts, continuation, cache operations and refusals.

The tiny vocabulary contains the image placeholder id; it is suppressed while generating, as a sampled placeholder
would be read as an image token by the prefill-from-scratch path (stock Llava behaves the same).
"""

import copy
import threading

import pytest
import torch
from transformers import DynamicCache, StaticCache, TextIteratorStreamer
from transformers.cache_utils import StaticLayer

from modeling_llava_ivtp import IvtpCache
from modeling_llava_ivtp.cache_ivtp import IvtpStaticCache
from modeling_llava_ivtp.tokens_ivtp import static_width_mask
from modeling_llava_ivtp.transformers_compat import CACHE_ARG, cache_kwargs, output_cache
from tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TOKENIZER_CHARACTERS,
    left_pad,
    make_pixels,
    make_prompt,
    make_batch,
    stock_twin,
    tiny_model,
    tiny_tokenizer,
)


EOS_TOKEN_ID = 2
LENGTHS_OF_3 = ((2, 5), (4, 9), (1, 3))  # (text before, text after) the image: three prompt lengths
GREEDY = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, suppress_tokens=[IMAGE_TOKEN_ID])
# Fixed length: EOS suppressed too, so every row generates every step.
FIXED = dict(GREEDY, suppress_tokens=[IMAGE_TOKEN_ID, EOS_TOKEN_ID])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch3():
    return make_batch(LENGTHS_OF_3)


def new_tokens(sequences, batch):
    return sequences[:, batch["input_ids"].shape[1] :]


def test_greedy_with_cache_equals_a_loop_of_full_forwards(model, batch3):
    """32 tokens, batch of 3, left padding: each loop step re-prunes the whole sequence with `use_cache=False`."""
    steps = 32
    generated = model.generate(**batch3, max_new_tokens=steps, **FIXED)
    input_ids, attention_mask = batch3["input_ids"], batch3["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch3["pixel_values"], use_cache=False
            ).logits[:, -1]
            logits[:, FIXED["suppress_tokens"]] = -float("inf")
            next_token = logits.argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    assert generated.shape == (3, batch3["input_ids"].shape[1] + steps)
    assert torch.equal(generated, input_ids)


def test_greedy_128_new_tokens_with_and_without_cache(model, batch3):
    with_cache = model.generate(**batch3, max_new_tokens=128, **FIXED)
    without = model.generate(**batch3, max_new_tokens=128, use_cache=False, **FIXED)
    assert new_tokens(with_cache, batch3).shape == (3, 128)
    assert torch.equal(with_cache, without)


def test_decode_logits_match_full_forwards(model, batch3):
    """Not only the argmax: the decode step's logits equal the last row of a full re-pruned forward."""
    out = model.generate(
        **batch3, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **FIXED
    )
    sequences = out.sequences
    attention_mask = torch.cat([batch3["attention_mask"], torch.ones(3, 6, dtype=torch.long)], dim=1)
    for step, step_logits in enumerate(out.logits):
        length = batch3["input_ids"].shape[1] + step
        with torch.no_grad():
            full = model(
                input_ids=sequences[:, :length], attention_mask=attention_mask[:, :length],
                pixel_values=batch3["pixel_values"], use_cache=False,
            ).logits[:, -1]
        assert (step_logits - full).abs().max() <= 1e-4


def test_a_step_without_a_mask_needs_none_unless_the_cache_holds_padding_slots(model):
    """One new token, no 2-D mask: with no padding slot in the pruned cache, the step attends every key each layer
    holds and runs without a mask, as stock's step does -- its logits those of the step with an all-ones mask, in
    fewer operators. A text-only sample beside one with an image leaves padding slots, which stay masked."""
    from llava_ivtp.measuring.dispatch import count_dispatched

    with_padding_slots = dict(zip(("input_ids", "attention_mask"), left_pad([make_prompt(2, 5), [1, 5, 6, 7, 8]])))
    with_padding_slots["pixel_values"] = make_pixels(1)
    for batch, padding_slots in ((make_batch(((2, 5),)), False), (make_batch(((2, 5), (0, 1))), False),
                                 (with_padding_slots, True)):
        with torch.no_grad():
            prefill = model(**batch, use_cache=True)
        cache = output_cache(prefill)
        assert cache.padding_slots is padding_slots
        rows, length = batch["input_ids"].shape
        step = dict(input_ids=prefill.logits[:, -1:].argmax(-1), use_cache=True)
        results = {}
        for name, mask in (("none", None), ("ones", torch.ones(rows, length + 1, dtype=torch.long))):
            with torch.no_grad():
                counted = count_dispatched(lambda: model(**step, attention_mask=mask, **{CACHE_ARG: copy.deepcopy(cache)}))
                logits = model(**step, attention_mask=mask, **{CACHE_ARG: copy.deepcopy(cache)}).logits
            results[name] = (logits, counted.total)
        torch.testing.assert_close(results["none"][0], results["ones"][0], rtol=0, atol=1e-5)
        if padding_slots:
            assert torch.equal(results["none"][0], results["ones"][0])
        else:
            assert results["none"][1] < results["ones"][1]


def test_beam_search_with_cache_equals_without(model, batch3):
    kwargs = dict(GREEDY, num_beams=3, max_new_tokens=20)
    with_cache = model.generate(**batch3, **kwargs)
    without = model.generate(**batch3, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    several = model.generate(**batch3, num_return_sequences=3, **kwargs)
    several_without = model.generate(**batch3, num_return_sequences=3, use_cache=False, **kwargs)
    assert several.shape[0] == 9
    assert torch.equal(several, several_without)


@pytest.mark.parametrize(
    "sampling", [dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=20, num_return_sequences=2)], ids=str
)
def test_sampling_with_a_seed_with_cache_equals_without(model, batch3, sampling):
    kwargs = dict(do_sample=True, max_new_tokens=24, pad_token_id=PAD_TOKEN_ID, suppress_tokens=[IMAGE_TOKEN_ID])
    torch.manual_seed(7)
    with_cache = model.generate(**batch3, **sampling, **kwargs)
    torch.manual_seed(7)
    without = model.generate(**batch3, use_cache=False, **sampling, **kwargs)
    assert torch.equal(with_cache, without)
    torch.manual_seed(8)
    other_seed = model.generate(**batch3, **sampling, **kwargs)
    assert not torch.equal(with_cache, other_seed), "sampling should depend on the seed"


def test_cache_after_prefill_holds_the_schedule_layer_by_layer(model, batch3):
    """TINY_SCHEDULE, group_size 2: layers 0-1 hold stage 1's 12 visual tokens, 2-3 hold 8, 4-7 hold 5 (+ text)."""
    with torch.no_grad():
        out = model(**batch3, use_cache=True)
    cache = output_cache(out)
    mask = batch3["attention_mask"].bool()
    text_per_sample = (mask.sum(dim=1) - 36).tolist()
    longest_text = max(text_per_sample)
    visual_per_layer = [12, 12, 8, 8, 5, 5, 5, 5]
    for layer_idx, (layer, visual) in enumerate(zip(cache.layers, visual_per_layer)):
        assert layer.keys.shape == (3, 2, longest_text + visual, 8), layer_idx  # (batch, kv heads, held, head dim)
        assert layer.values.shape == layer.keys.shape
        positions = cache.layer_positions[layer_idx]
        assert positions.shape == (3, longest_text + visual)
        for row in range(3):
            held = positions[row][positions[row] >= 0]
            is_image = batch3["input_ids"][row, held] == IMAGE_TOKEN_ID
            assert int(is_image.sum()) == visual, (layer_idx, row)
            assert int((~is_image & mask[row, held]).sum()) == text_per_sample[row]
            assert torch.equal(held, held.sort().values)
    # Layers of one pruning group share one record; the prompt's logical length is answered.
    assert cache.layer_positions[2] is cache.layer_positions[3]
    assert cache.get_seq_length() == batch3["input_ids"].shape[1]
    assert [cache.get_query_offset(i) for i in range(8)] == [longest_text + v for v in visual_per_layer]

    # Each decode step adds one token to every layer, at the next logical position.
    generated = model.generate(**batch3, max_new_tokens=5, return_dict_in_generate=True, **FIXED)
    decoded = output_cache(generated)
    assert [layer.keys.shape[-2] for layer in decoded.layers] == [longest_text + v + 4 for v in visual_per_layer]
    assert decoded.get_seq_length() == batch3["input_ids"].shape[1] + 4
    last = batch3["input_ids"].shape[1] + 3
    assert all(int(positions[0, -1]) == last for positions in decoded.layer_positions)


def test_a_sample_alone_equals_the_same_sample_in_a_padded_batch(model, batch3):
    batched = new_tokens(model.generate(**batch3, max_new_tokens=24, **FIXED), batch3)
    for row in range(3):
        real = batch3["attention_mask"][row].bool()
        alone = {
            "input_ids": batch3["input_ids"][row : row + 1, real],
            "pixel_values": batch3["pixel_values"][row : row + 1],
        }
        tokens = model.generate(**alone, max_new_tokens=24, **FIXED)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(tokens[0], batched[row]), row


def test_sdpa_and_eager_generate_the_same_tokens(batch3):
    sdpa = tiny_model(attn_implementation="sdpa")
    eager = tiny_model(attn_implementation="eager")
    assert all(torch.equal(a, b) for a, b in zip(sdpa.state_dict().values(), eager.state_dict().values()))
    tokens_sdpa = sdpa.generate(**batch3, max_new_tokens=32, **FIXED)
    tokens_eager = eager.generate(**batch3, max_new_tokens=32, **FIXED)
    assert torch.equal(tokens_sdpa, tokens_eager)


def test_multi_turn_continuation_equals_the_whole_conversation_from_scratch(model, batch3):
    first = model.generate(**batch3, max_new_tokens=10, return_dict_in_generate=True, **FIXED)
    cache = output_cache(first)
    second_turn = torch.randint(3, 80, (3, 6), generator=torch.Generator().manual_seed(11))
    conversation = torch.cat([first.sequences, second_turn], dim=1)
    attention_mask = torch.cat(
        [batch3["attention_mask"], torch.ones(3, conversation.shape[1] - batch3["input_ids"].shape[1], dtype=torch.long)],
        dim=1,
    )
    continued = model.generate(
        input_ids=conversation, attention_mask=attention_mask, **cache_kwargs(cache), max_new_tokens=12, **FIXED
    )
    from_scratch = model.generate(
        input_ids=conversation, attention_mask=attention_mask, pixel_values=batch3["pixel_values"],
        max_new_tokens=12, **FIXED,
    )
    assert continued.shape == from_scratch.shape == (3, conversation.shape[1] + 12)
    assert torch.equal(continued, from_scratch)
    # The continued cache still holds the pruned image: the last layers keep 5 visual tokens per sample.
    held_tokens = continued.gather(1, cache.layer_positions[-1].clamp_min(0))
    assert (held_tokens == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [5, 5, 5]
    assert cache.get_seq_length() == continued.shape[1] - 1


def test_pruning_off_generates_like_stock_llava(batch3):
    model = tiny_model(schedule=None)
    stock = stock_twin(model)
    assert torch.equal(
        model.generate(**batch3, max_new_tokens=20, **FIXED), stock.generate(**batch3, max_new_tokens=20, **FIXED)
    )


def test_keep_all_schedule_generates_like_stock_llava(batch3):
    """IVTP's own prefill and decode loops, with nothing pruned, against stock Llava's generate with its cache."""
    model = tiny_model(schedule={"vision": [36, 36, 36], "llm": [36, 36]})
    stock = stock_twin(model)
    ours = model.generate(**batch3, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, **FIXED)
    theirs = stock.generate(**batch3, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, **FIXED)
    assert isinstance(output_cache(ours), IvtpCache) and output_cache(ours).is_pruned
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        assert (a - b).abs().max() <= 1e-5


def test_inputs_embeds_generate_like_input_ids(model, batch3):
    embeds = model.get_input_embeddings()(batch3["input_ids"])
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=batch3["attention_mask"], pixel_values=batch3["pixel_values"],
        max_new_tokens=16, **FIXED,
    )
    from_ids = model.generate(**batch3, max_new_tokens=16, **FIXED)
    assert torch.equal(from_embeds, new_tokens(from_ids, batch3))


def test_eos_stops_each_row_and_pads_it(model, batch3):
    free = new_tokens(model.generate(**batch3, max_new_tokens=16, **FIXED), batch3)
    stop_token = int(free[0, 3])  # a token row 0 emits at step 4
    stopped = new_tokens(
        model.generate(**batch3, max_new_tokens=16, eos_token_id=stop_token, **GREEDY), batch3
    )
    for row in range(3):
        hits = (free[row] == stop_token).nonzero()
        if len(hits) == 0:
            assert torch.equal(stopped[row], free[row])
            continue
        end = int(hits[0]) + 1
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert bool((stopped[row, end:] == PAD_TOKEN_ID).all())
    assert stopped.shape[1] < 16 or bool((stopped == PAD_TOKEN_ID).any())


def test_stop_strings_and_a_streamer(model, batch3):
    tokenizer = tiny_tokenizer()
    alone = {key: value[1:2] for key, value in batch3.items()}
    free = new_tokens(model.generate(**alone, max_new_tokens=20, **FIXED), alone)[0]
    character_ids = [int(token) for token in free[3:] if 4 <= int(token) < 4 + len(TOKENIZER_CHARACTERS)]
    stop_id = character_ids[0]  # a token that is one character (not a space, not special)
    stop = tokenizer.decode([stop_id])
    assert len(stop) == 1
    first_hit = int((free == stop_id).nonzero()[0]) + 1
    stopped = new_tokens(
        model.generate(**alone, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer, **FIXED), alone
    )[0]
    assert torch.equal(stopped, free[:first_hit])

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}

    def run():
        result["tokens"] = model.generate(**alone, max_new_tokens=20, streamer=streamer, **FIXED)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert torch.equal(new_tokens(result["tokens"], alone)[0], free)
    assert streamed == tokenizer.decode(free) and len(streamed) > 0


def test_prompt_lookup_decoding_crops_the_pruned_cache(model, batch3):
    """Candidate tokens are verified several at a time and the rejected ones cropped from every layer."""
    alone = {key: value[1:2] for key, value in batch3.items()}
    plain = model.generate(**alone, max_new_tokens=24, **FIXED)
    lookup = model.generate(**alone, max_new_tokens=24, prompt_lookup_num_tokens=3, **FIXED)
    assert torch.equal(plain, lookup)


def test_guidance_inputs_reach_the_prefill_step_only(model, batch3):
    """`instruction_mask` goes with `pixel_values`: on prefill (cut to the step's tokens), never on decode steps; with
    `use_cache=False` every step prunes, so it comes every step, zero-padded over the generated tokens."""
    instruction_mask = batch3["attention_mask"].bool() & (batch3["input_ids"] != IMAGE_TOKEN_ID)
    inputs = dict(batch3, instruction_mask=instruction_mask, use_cache=True)
    prefill = model.prepare_inputs_for_generation(**cache_kwargs(IvtpCache()), is_first_iteration=True, **inputs)
    assert torch.equal(prefill["instruction_mask"], instruction_mask)
    longer = torch.cat([batch3["input_ids"], torch.full((3, 1), 5)], dim=1)
    decode = model.prepare_inputs_for_generation(
        **dict(inputs, input_ids=longer), next_sequence_length=1, is_first_iteration=False
    )
    assert "instruction_mask" not in decode and "pixel_values" not in decode
    no_cache = model.prepare_inputs_for_generation(**dict(inputs, input_ids=longer, use_cache=False))
    assert torch.equal(no_cache["instruction_mask"][:, :-1], instruction_mask)
    assert not bool(no_cache["instruction_mask"][:, -1].any())
    # And through generate, both ways.
    with_mask = model.generate(**batch3, instruction_mask=instruction_mask, max_new_tokens=8, **FIXED)
    without_cache = model.generate(
        **batch3, instruction_mask=instruction_mask, max_new_tokens=8, use_cache=False, **FIXED
    )
    assert torch.equal(with_mask, without_cache)


# ----------------------------------------------------------------------------------------------------------------
# IvtpCache operations
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def prefilled(model, batch3):
    with torch.no_grad():
        return output_cache(model(**batch3, use_cache=True))


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone(), positions.clone())
            for layer, positions in zip(cache.layers, cache.layer_positions)]


def test_reorder_and_batch_operations_move_positions_with_keys(prefilled):
    before = _snapshot(prefilled)
    order = torch.tensor([2, 0, 0])
    prefilled.reorder_cache(order)
    for (keys, values, positions), layer, held in zip(before, prefilled.layers, prefilled.layer_positions):
        assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
        assert torch.equal(held, positions[order])
    assert prefilled.layer_positions[2] is prefilled.layer_positions[3], "a group keeps one shared record"

    prefilled.batch_repeat_interleave(2)
    assert prefilled.layers[0].keys.shape[0] == 6
    assert torch.equal(prefilled.layer_positions[0], before[0][2][order].repeat_interleave(2, dim=0))
    prefilled.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(prefilled.layer_positions[-1], before[-1][2][[2, 0]])
    assert torch.equal(prefilled.layers[-1].keys, before[-1][0][[2, 0]])


def test_crop_removes_generated_tokens_and_refuses_cutting_into_images(model, batch3, prefilled):
    prompt_length = batch3["input_ids"].shape[1]
    before = _snapshot(prefilled)
    with torch.no_grad():
        model(
            input_ids=torch.full((3, 2), 5), attention_mask=torch.ones(3, prompt_length + 2, dtype=torch.long),
            **cache_kwargs(prefilled),
        )
    assert prefilled.get_seq_length() == prompt_length + 2
    prefilled.crop(0)
    assert prefilled.get_seq_length() == prompt_length + 2
    prefilled.crop(-2)
    assert prefilled.get_seq_length() == prompt_length
    for (keys, _, positions), layer, held in zip(before, prefilled.layers, prefilled.layer_positions):
        assert torch.equal(layer.keys, keys) and torch.equal(held, positions)
    with pytest.raises(ValueError, match="negative"):
        prefilled.crop(3)
    # Row 0's image starts at 3, row 1's at 5 (padding differs): cutting at 10 removes different counts per row.
    with pytest.raises(ValueError, match="image tokens"):
        prefilled.crop(10 - prompt_length)
    prefilled.reset()
    assert prefilled.get_seq_length() == 0 and not prefilled.is_pruned


# ----------------------------------------------------------------------------------------------------------------
# The static pruned cache (`cache_implementation="static"`): compiled, CUDA-graph-capturable decode steps
# ----------------------------------------------------------------------------------------------------------------
STATIC_SETTINGS = {
    "ivtp": {},
    "ivtp, eager": {"attn_implementation": "eager"},
    "ivtp, renumbered": {"pruning_options": {"positions": "renumbered"}},
    "pdrop": {"schedule": None, "pruning_method": "pdrop", "pruning_options": {"visual_tokens": 8}},
    "fastv, renumbered": {"schedule": None, "pruning_method": "fastv",
                          "pruning_options": {"visual_tokens": 8, "positions": "renumbered"}},
    "visionzip": {"schedule": None, "pruning_method": "visionzip", "pruning_options": {"visual_tokens": 8}},
}


@pytest.mark.parametrize("setting", sorted(STATIC_SETTINGS))
def test_a_static_cache_generates_what_the_pruned_dynamic_cache_does(batch3, setting):
    """Padded batch of 3: the same tokens, per-step logits within float32 rounding (the static steps attend over
    their whole buffers with the slots not yet written masked); each layer a `StaticLayer` of its held tokens plus
    one slot per logical token left to `max_cache_len`."""
    model = tiny_model(**STATIC_SETTINGS[setting])
    settings = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **FIXED)
    dynamic = model.generate(**batch3, **settings)
    static = model.generate(**batch3, **settings, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, theirs in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    cache, pruned = output_cache(static), output_cache(dynamic)
    prompt = batch3["input_ids"].shape[1]
    assert isinstance(cache, IvtpStaticCache) and cache.is_frozen and cache.prompt_length == prompt
    assert cache.max_cache_len == prompt + 6 - 1  # `max_length - 1`, as transformers sizes a StaticCache
    assert int(cache.get_seq_length()) == pruned.get_seq_length() == prompt + 5  # the last token is never fed
    for layer, record, held, dynamic_layer in zip(cache.layers, cache.step_records, cache.layer_positions, pruned.layers):
        assert isinstance(layer, StaticLayer)
        assert layer.keys.shape[2] == held.shape[1] + cache.max_cache_len - prompt == record.shape[1]
        assert int(layer.cumulative_length) == dynamic_layer.keys.shape[2]
        written = dynamic_layer.keys.shape[2]
        torch.testing.assert_close(layer.keys[:, :, :written], dynamic_layer.keys, rtol=0, atol=1e-6)
        assert torch.equal(record[:, : held.shape[1]], held)
        assert torch.equal(record[:, held.shape[1]:], torch.arange(prompt, cache.max_cache_len).expand(3, -1))


@pytest.mark.parametrize("decoding", [dict(num_beams=3), dict(do_sample=True, top_k=5)], ids=["beams", "sampling"])
def test_a_static_cache_decodes_beams_and_samples_as_the_dynamic_one(model, batch3, decoding):
    runs = []
    for extra in ({}, {"cache_implementation": "static"}):
        torch.manual_seed(1)
        runs.append(model.generate(**batch3, max_new_tokens=5, **dict(FIXED, **decoding), **extra))
    assert torch.equal(*runs)


def test_a_conversation_continues_over_a_static_cache(model, batch3):
    """A new turn over a filled static cache (a multi-token step, causal among its tokens) then its answer: the
    tokens of the same over the dynamic cache; a turn beyond `max_cache_len` is refused before anything is written."""
    settings = dict(max_new_tokens=4, return_dict_in_generate=True, **FIXED)
    first = [model.generate(**batch3, **settings),
             model.generate(**batch3, **settings, cache_implementation="static", max_cache_len=64)]
    assert isinstance(output_cache(first[1]), IvtpStaticCache)
    turn = torch.tensor([[5, 6, 7]] * 3)
    answers = []
    for out in first:
        sequences = torch.cat([out.sequences, turn], dim=1)
        mask = torch.cat([batch3["attention_mask"],
                          torch.ones(3, sequences.shape[1] - batch3["input_ids"].shape[1], dtype=torch.long)], dim=1)
        answers.append(model.generate(input_ids=sequences, attention_mask=mask, **cache_kwargs(output_cache(out)),
                                      **settings).sequences)
    assert torch.equal(*answers)
    cache = output_cache(first[1])
    filled = int(cache.get_seq_length())
    too_long = torch.full((3, 64 - filled + 1), 5)
    with pytest.raises(ValueError, match="max_cache_len"):
        with torch.no_grad():
            model(input_ids=too_long, attention_mask=torch.ones(3, 65, dtype=torch.long), **cache_kwargs(cache))
    with pytest.raises(ValueError, match="max_cache_len"):
        static_width_mask(torch.ones(3, 65, dtype=torch.bool), 64)


def test_a_static_cache_crops_generated_tokens_and_resets(model, batch3):
    """Crop lowers the counts (the stale slots are masked, then written again); cropping into the prompt is
    refused; reset gives dynamic layers for the next prefill, which fills and freezes the cache again."""
    prompt = batch3["input_ids"].shape[1]
    cache = IvtpStaticCache(config=model.config.text_config, max_cache_len=prompt + 8)
    with torch.no_grad():
        model(**batch3, **cache_kwargs(cache), use_cache=True)
        assert cache.is_frozen and int(cache.get_seq_length()) == prompt
        counts = [int(layer.cumulative_length) for layer in cache.layers]
        step = dict(input_ids=torch.full((3, 1), 5), attention_mask=torch.ones(3, prompt + 1, dtype=torch.long))
        first = model(**step, **cache_kwargs(cache)).logits
        model(input_ids=torch.full((3, 1), 6), attention_mask=torch.ones(3, prompt + 2, dtype=torch.long),
              **cache_kwargs(cache))
        assert [int(layer.cumulative_length) for layer in cache.layers] == [count + 2 for count in counts]
        cache.crop(-2)
        assert int(cache.get_seq_length()) == prompt
        assert [int(layer.cumulative_length) for layer in cache.layers] == counts
        torch.testing.assert_close(model(**step, **cache_kwargs(cache)).logits, first, rtol=0, atol=0)
        with pytest.raises(ValueError, match="generated after the prompt"):
            cache.crop(-2)
        with pytest.raises(ValueError, match="negative"):
            cache.crop(1)
        cache.reset()
        assert not cache.is_frozen and not cache.is_pruned and cache.get_seq_length() == 0
        assert not any(isinstance(layer, StaticLayer) for layer in cache.layers)
        model(**batch3, **cache_kwargs(cache), use_cache=True)
        assert cache.is_frozen and [int(layer.cumulative_length) for layer in cache.layers] == counts


def test_a_static_cache_without_room_or_with_an_unsupported_layout_is_refused(model, batch3):
    prompt = batch3["input_ids"].shape[1]
    with pytest.raises(ValueError, match="no room for a generated token"):
        with torch.no_grad():
            model(**batch3, **cache_kwargs(IvtpStaticCache(config=model.config.text_config, max_cache_len=prompt)),
                  use_cache=True)
    with pytest.raises(ValueError, match="max_cache_len"):
        IvtpStaticCache(config=model.config.text_config, max_cache_len=0)
    sliding = copy.deepcopy(model.config.text_config)
    sliding.sliding_window = 4
    with pytest.raises(ValueError, match="sliding_window=4"):
        IvtpStaticCache(config=sliding, max_cache_len=64)
    flex = tiny_model(attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation"):
        flex.generate(**batch3, max_new_tokens=2, cache_implementation="static", **GREEDY)


# ----------------------------------------------------------------------------------------------------------------
# What cannot work says so
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["offloaded", "quantized"])
def test_caches_that_cannot_hold_pruned_layers_are_refused(model, batch3, implementation):
    with pytest.raises(ValueError, match="Leave\n?.*`cache_implementation` unset|Leave `cache_implementation`"):
        model.generate(**batch3, max_new_tokens=2, cache_implementation=implementation, **GREEDY)


@pytest.mark.parametrize("cache_class", [StaticCache, DynamicCache])
def test_user_caches_other_than_ivtp_cache_are_refused(model, batch3, cache_class):
    kwargs = {"max_cache_len": 256} if cache_class is StaticCache else {}
    cache = cache_class(config=model.config.text_config, **kwargs)
    with pytest.raises(ValueError, match="IvtpCache"):
        model.generate(**batch3, max_new_tokens=2, **cache_kwargs(cache), **GREEDY)


def test_new_image_with_a_filled_cache_is_refused(model, batch3, prefilled):
    with pytest.raises(ValueError, match=f"empty `{CACHE_ARG}`"):
        with torch.no_grad():
            model(**batch3, **cache_kwargs(prefilled))
    with pytest.raises(ValueError, match="instruction_mask"):
        with torch.no_grad():
            model(
                input_ids=torch.full((3, 1), 5), instruction_mask=torch.ones(3, 1, dtype=torch.bool),
                attention_mask=torch.ones(3, batch3["input_ids"].shape[1] + 1, dtype=torch.long),
                **cache_kwargs(prefilled),
            )
    with pytest.raises(ValueError, match="attention_mask"):
        with torch.no_grad():
            model(input_ids=torch.full((3, 1), 5), attention_mask=torch.ones(3, 4), **cache_kwargs(prefilled))


def test_text_only_prompts_generate_through_the_stock_path(model):
    """No image: nothing to prune; an IvtpCache still serves as a plain dynamic cache."""
    input_ids, attention_mask = left_pad([[1, 5, 6, 7], [1, 8, 9]])
    stock = stock_twin(model)
    ours = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, **FIXED)
    theirs = stock.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, **FIXED)
    assert torch.equal(ours, theirs)


def test_measured_cache_bytes_equal_the_analytic_count(model):
    """`kv_cache_bytes_per_layer` (used for the 7B figures) against the tensors a prefill actually stores."""
    from llava_ivtp.measuring.analytic_flops import kv_cache_bytes_per_layer
    from modeling_llava_ivtp.cache_ivtp import cache_bytes

    prompt = make_prompt(3, 7)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), pixel_values=make_pixels(1), use_cache=True)
    text_tokens = len(prompt) - 36
    measured = cache_bytes(output_cache(out))
    assert measured == kv_cache_bytes_per_layer(model.config, text_tokens, bytes_per_value=4)
    assert measured[0] == 2 * 2 * 8 * (text_tokens + 12) * 4  # K and V, 2 kv heads of 8 dims, fp32
    stock = stock_twin(model)
    with torch.no_grad():
        stock_cache = output_cache(stock(input_ids=torch.tensor([prompt]), pixel_values=make_pixels(1), use_cache=True))
    assert cache_bytes(stock_cache) == [2 * 2 * 8 * len(prompt) * 4] * 8


def test_batch_with_a_text_only_sample_generates_like_alone(model):
    """A sample without an image passes unpruned (its layers hold all its tokens) beside pruned samples."""
    prompts = [make_prompt(2, 5), [1, 5, 6, 7, 8, 9, 10], make_prompt(4, 2, seed=3)]
    input_ids, attention_mask = left_pad(prompts)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=make_pixels(2))
    with_cache = model.generate(**inputs, max_new_tokens=20, **FIXED)
    assert torch.equal(with_cache, model.generate(**inputs, max_new_tokens=20, use_cache=False, **FIXED))
    text_alone = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=20, **FIXED)
    assert torch.equal(text_alone[0, -20:], with_cache[1, -20:])


# ------------------------------------------------------------------------------------------------------------------
# A model that generates the image placeholder id
# ------------------------------------------------------------------------------------------------------------------
# The bias makes every step emit the placeholder id: over a cache that holds the image it is an ordinary token.
EMITS_PLACEHOLDER = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, sequence_bias={(IMAGE_TOKEN_ID,): 1e4})


@pytest.mark.parametrize("lookup", [None, 3], ids=["greedy-batch-of-3", "prompt-lookup-alone"])
def test_generated_placeholders_are_ordinary_tokens_as_in_stock_llava(batch3, lookup):
    """Nothing pruned (keep-all schedule): IVTP's runner and stock Llava's generate agree token for token and logit
    for logit while the model emits the placeholder id, and when the conversation goes on over the cache from an
    answer made of placeholders. Prompt lookup (batch 1 only) copies the prompt's placeholder run as candidates:
    several placeholders in one step over the cache."""
    model = tiny_model(schedule={"vision": [36, 36, 36], "llm": [36, 36]})
    stock = stock_twin(model)
    settings = dict(EMITS_PLACEHOLDER, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    batch = batch3
    if lookup:
        settings["prompt_lookup_num_tokens"] = lookup
        batch = {name: value[1:2] for name, value in batch3.items()}
    ours, theirs = model.generate(**batch, **settings), stock.generate(**batch, **settings)
    assert (new_tokens(ours.sequences, batch) == IMAGE_TOKEN_ID).all()
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        assert (a - b).abs().max() <= 1e-5
    size = batch["input_ids"].shape[0]
    turn = torch.randint(3, 80, (size, 4), generator=torch.Generator().manual_seed(5))
    conversation = torch.cat([ours.sequences, turn], dim=1)
    mask = torch.ones_like(conversation)
    mask[:, : batch["input_ids"].shape[1]] = batch["attention_mask"]
    continued = {
        name: runner.generate(input_ids=conversation, attention_mask=mask, **cache_kwargs(output_cache(generated)),
                              max_new_tokens=3, **FIXED)
        for name, runner, generated in (("ours", model, ours), ("stock", stock, theirs))
    }
    assert torch.equal(continued["ours"], continued["stock"])
    assert continued["ours"].shape == (size, conversation.shape[1] + 3)


def test_a_pruned_model_emitting_placeholders_decodes_over_its_cache(model, batch3):
    """The real schedule: decode steps whose token is a generated placeholder run as text over the pruned cache (the
    same logits as feeding the steps one by one), and the conversation continues from an answer that ends in one."""
    generated = model.generate(**batch3, max_new_tokens=4, output_logits=True, return_dict_in_generate=True,
                               **EMITS_PLACEHOLDER)
    assert (new_tokens(generated.sequences, batch3) == IMAGE_TOKEN_ID).all()
    with torch.no_grad():  # the same steps by hand: prefill, then one placeholder at a time over the cache
        out = model(**batch3, use_cache=True)
        mask = batch3["attention_mask"]
        for step, logits in enumerate(generated.logits[1:]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            out = model(input_ids=torch.full((3, 1), IMAGE_TOKEN_ID), attention_mask=mask,
                        **cache_kwargs(output_cache(out)))
            assert (out.logits[:, -1] - logits).abs().max() <= 1e-5, step
    cache = output_cache(generated)
    turn = torch.randint(3, 80, (3, 4), generator=torch.Generator().manual_seed(5))
    # A new turn that holds placeholders but no image is still refused, even right after a placeholder answer (one
    # placeholder per sample: 3).
    bad = torch.cat([generated.sequences, torch.full((3, 1), IMAGE_TOKEN_ID), turn], dim=1)
    with pytest.raises(ValueError, match="new turn after the cache holds 3 image placeholder"):
        model.generate(input_ids=bad, attention_mask=torch.ones_like(bad), **cache_kwargs(cache), max_new_tokens=2,
                       **FIXED)
    conversation = torch.cat([generated.sequences, turn], dim=1)
    mask = torch.ones_like(conversation)
    mask[:, : batch3["input_ids"].shape[1]] = batch3["attention_mask"]
    continued = model.generate(input_ids=conversation, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=3,
                               **FIXED)
    assert continued.shape == (3, conversation.shape[1] + 3)
    assert cache.get_seq_length() == continued.shape[1] - 1


def test_labels_of_steps_over_the_pruned_cache_give_their_loss(model, batch3):
    """A step over the pruned cache takes labels aligned with its own `input_ids`, like a prefill: its loss is the
    cross-entropy of its logits against the next label (the last row has none)."""
    with torch.no_grad():
        prefill = model(**batch3, use_cache=True)
        step_ids = torch.randint(3, 80, (3, 4), generator=torch.Generator().manual_seed(2))
        step_labels = step_ids.masked_fill(step_ids < 10, -100)
        mask = torch.cat([batch3["attention_mask"], torch.ones_like(step_ids)], dim=1)
        step = model(input_ids=step_ids, attention_mask=mask, labels=step_labels, **cache_kwargs(output_cache(prefill)))
    expected = torch.nn.functional.cross_entropy(
        step.logits[:, :-1].reshape(-1, step.logits.shape[-1]), step_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(step.loss, expected)
    assert step.kept_positions.tolist() == [list(range(batch3["input_ids"].shape[1], mask.shape[1]))] * 3
