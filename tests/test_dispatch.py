"""Operators a forward dispatches (`llava_ivtp.measuring.dispatch`; on a GPU each computing operator is about one
kernel launch, so at batch 1 the count predicts launch-bound time on any device). The stock route is stock Llava's,
operator for operator; a pruned prefill's bookkeeping does not grow with the batch or the prompt; a decode step over
a pruned cache dispatches what stock's does; the stock route compiles with `fullgraph=True` as stock Llava does."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import CompileConfig

from llava_ivtp.measuring.dispatch import count_dispatched, per_step
from modeling_llava_ivtp.pruners import PRUNERS
from tiny_models import IMAGE_TOKEN_ID, TINY_CLIP_TEXT, left_pad, make_batch, stock_twin, tiny_model

# kept_positions (every position on the stock route): an arange and its expand.
KEPT_POSITIONS = collections.Counter({"arange": 1, "expand": 1})


def _prefill(model, batch):
    return count_dispatched(lambda: model(**batch))


def _generate_steps(model, batch):
    def run(new_tokens):
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, suppress_tokens=[IMAGE_TOKEN_ID])
    return per_step(run, 2, 5)


def _method_model(method):
    extra = {"clip_text_encoder": TINY_CLIP_TEXT} if method == "cdpruner" else {}
    return tiny_model(schedule=None, pruning_method=method, pruning_options={"visual_tokens": 8}, **extra)


def test_the_counter_counts_every_operator_and_the_views_apart():
    def run():
        values = torch.zeros(6)
        (values.view(2, 3) * 2).sum()

    count = count_dispatched(run)
    assert count.by_name["zeros"] == 1 and count.by_name["view"] == 1
    assert count.by_name["mul"] == 1 and count.by_name["sum"] == 1
    assert count.views == 1 and count.total == sum(count.by_name.values()) == count.views + count.computing
    with pytest.raises(ValueError, match="last"):
        per_step(lambda n: None, 3, 3)


def test_pruning_off_dispatches_what_stock_llava_does():
    model = tiny_model(schedule=None)
    stock = stock_twin(model)
    batch = make_batch(((2, 5), (4, 9)))
    ours, theirs = _prefill(model, batch), _prefill(stock, batch)
    assert ours.by_name - theirs.by_name == KEPT_POSITIONS and not theirs.by_name - ours.by_name
    assert _generate_steps(model, batch) == _generate_steps(stock, batch) + KEPT_POSITIONS.total()


def test_a_text_only_batch_with_pruning_on_adds_only_the_input_check():
    """Stock's operators, plus one read of the ids (their range, and image placeholders that no image backs)."""
    model = tiny_model()
    stock = stock_twin(model)
    input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    ours, theirs = _prefill(model, batch), _prefill(stock, batch)
    extra = ours.by_name - theirs.by_name - KEPT_POSITIONS
    assert not theirs.by_name - ours.by_name
    assert extra["eq"] == 1 and extra["sum"] == 1 and extra["stack"] == 1  # placeholders, the one read
    assert sum(extra.values()) <= 12, extra


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_pruned_prefill_operators_do_not_grow_with_the_batch_or_the_prompt(method):
    """Bookkeeping per pruning step, not per sample or token: batch 1, a batch of 3 of one layout and a longer prompt
    dispatch the same operators; padded batches (each sample its own layout) of 3 and 5 the same as each other."""
    model = _method_model(method)
    same_layout = [_prefill(model, make_batch(layout)).total for layout in (((2, 5),), ((2, 5),) * 3, ((4, 9),))]
    assert len(set(same_layout)) == 1, same_layout
    padded = [_prefill(model, make_batch(layout)).total
              for layout in (((2, 5), (4, 9), (1, 3)), ((2, 5), (4, 9), (1, 3), (3, 3), (5, 1)))]
    assert padded[0] == padded[1], padded


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("layout", [((2, 5),), ((2, 5), (4, 9))], ids=["batch 1", "padded batch"])
def test_decode_steps_over_a_pruned_cache_cost_a_few_operators_per_run_of_layers(method, layout):
    """A step over the pruned cache dispatches stock Llava's operators plus, per run of layers that hold one token
    set, its mask from the held positions (a few operators) and, where positions are renumbered, its rotary table;
    nothing that grows with the cache or reads the device. (Stock, unpadded at batch 1, reads the device to skip its
    mask; the pruned cache keeps an explicit mask, which with grouped keys also repeats them: two operators per
    layer.)"""
    model = _method_model(method)
    batch = make_batch(layout)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    runs = len({id(positions) for positions in cache.layer_positions})
    layers = model.config.text_config.num_hidden_layers
    ours, stock = _generate_steps(model, batch), _generate_steps(stock_twin(model), batch)
    assert ours - stock <= 26 * runs + 2 * layers, (ours, stock, runs)

    def run(new_tokens):
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, suppress_tokens=[IMAGE_TOKEN_ID])
    assert per_step(run, 5, 8) == ours  # the same at a longer cache


@pytest.mark.parametrize("route", ["pruning off", "text only, pruning on"])
def test_the_stock_route_generates_with_a_fullgraph_compiled_forward(route):
    """`generate` with a static cache and `compile_config=CompileConfig(fullgraph=True)` (transformers compiles the
    forward of the decode steps): no graph break -- no input check reads the device under compilation -- and the
    tokens of the eager run."""
    model = tiny_model(**({"schedule": None} if route == "pruning off" else {}))
    if route == "pruning off":
        batch = make_batch(((2, 5), (4, 9)))
    else:
        input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told (its tests)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(**batch, **settings)
        compiled = model.generate(**batch, **settings, compile_config=compile_config)
    assert torch.equal(compiled, eager)
    assert getattr(model, "_compiled_call", None) is not None  # the decode steps did run compiled


@pytest.mark.parametrize("layout, options", [
    (((2, 5), (4, 9)), {"positions": "renumbered"}),
], ids=["padded batch, renumbered positions"])
def test_pruned_decode_steps_over_a_static_cache_compile_to_one_graph(layout, options):
    """What CUDA graphs (`mode="reduce-overhead"`) need of a step, checked without a GPU: `generate` with
    `cache_implementation="static"` and `CompileConfig(fullgraph=True)` compiles the pruned decode steps once -- one
    graph, no break, no recompilation over the steps -- and gives the eager tokens; a second call with the same
    `max_cache_len` and a longer prompt compiles nothing more. Driven by hand, the compiled steps write the cache
    in place: every buffer keeps its address, the logits are the dynamic cache's. One layout, the most demanding (a
    padded batch, renumbered positions: per-run offsets); batch 1 with original positions is compiled the same way
    by `tests/test_bench.py::test_compiled_prefill_runner_reports_graphs_and_keeps_the_outputs`; the static cache
    runs eagerly for every method in a padded batch in `tests/test_generation.py`. (Each compile costs about a
    minute here.)"""
    from torch._dynamo.utils import counters

    from modeling_llava_ivtp.cache_ivtp import IvtpStaticCache
    from modeling_llava_ivtp.tokens_ivtp import static_width_mask
    from modeling_llava_ivtp.transformers_compat import cache_kwargs, output_cache

    model = tiny_model(**({"pruning_options": options} if options else {}))
    batch = make_batch(layout)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                    suppress_tokens=[IMAGE_TOKEN_ID], max_cache_len=batch["input_ids"].shape[1] + 12)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model.generate(**batch, **{k: v for k, v in settings.items() if k != "max_cache_len"})
        compiled = model.generate(**batch, **settings, cache_implementation="static", compile_config=compile_config)
        assert torch.equal(compiled, eager)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        longer = make_batch(tuple((before + 3, after) for before, after in layout))
        settings["max_cache_len"] = batch["input_ids"].shape[1] + 12  # the same buffers' shapes
        model.generate(**longer, **settings, cache_implementation="static", compile_config=compile_config)
        assert counters["stats"]["unique_graphs"] == 1

        prompt = batch["input_ids"].shape[1]
        dynamic_out = model(**batch, use_cache=True)
        cache = IvtpStaticCache(config=model.config.text_config, max_cache_len=prompt + 8)
        static_out = model(**batch, **cache_kwargs(cache), use_cache=True)
        addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        step = torch.compile(model.forward, fullgraph=True)
        dynamic, mask = output_cache(dynamic_out), batch["attention_mask"]
        token = static_out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            ours = step(input_ids=token, attention_mask=static_width_mask(mask.bool(), prompt + 8),
                        **cache_kwargs(cache)).logits
            theirs = model(input_ids=token, attention_mask=mask, **cache_kwargs(dynamic)).logits
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
            token = theirs[:, -1:].argmax(-1)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses
    assert int(cache.get_seq_length()) == prompt + 4
