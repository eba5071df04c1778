"""Rotary positions after pruning, as each method's code gives them (`pruner_base.POSITION_RULES`).

VisionZip, VisPruner, DivPrune and CDPruner prune before the LLM; their code (`llava_arch.py`,
`prepare_inputs_labels_for_multimodal`) builds the shortened sequence and passes `position_ids=None`, so the LLM
numbers it 0..L'-1 from each sample's first token. The reference here is exactly that: stock Llama layers fed the
shortened sequence (the text embeddings with the kept image features in the image's place) and fresh position ids.
With `positions="original"` the same sequence keeps the ids it had in the full prompt (gaps where tokens went).
"""

from __future__ import annotations

import pytest
import torch

from modeling_llava_ivtp.transformers_compat import output_image_features
from tiny_models import IMAGE_TOKEN_ID, make_batch, sharpen_attention, stock_twin, tiny_model


BUDGET = 8
PRE_LLM_METHODS = ["visionzip", "vispruner", "divprune", "cdpruner"]


def pruned_model(method: str, **options):
    return sharpen_attention(tiny_model(schedule=None, pruning_method=method,
                                        pruning_options={"visual_tokens": BUDGET, **options}))


def stock_on_the_shortened_sequence(model, batch, out, keep_original_ids: bool, in_order: bool = False):
    """Per sample, unpadded: the logits stock Llama layers give the sequence the LLM receives. `in_order`: the image
    features come as one block in the method's order (VisionZip's layout), else each at its patch's place."""
    stock = stock_twin(model)
    features = output_image_features(out)
    logits = []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            image = torch.where(ids == IMAGE_TOKEN_ID)[0]
            embeds = stock.get_input_embeddings()(ids)
            count = out.vision_keep_indices.shape[1]
            kept = image[:count] if in_order else image[out.vision_keep_indices[row]]  # in the order they enter
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[image] = False
            keep[kept] = True
            embeds[kept] = features[row]
            position_ids = torch.where(keep)[0] if keep_original_ids else torch.arange(int(keep.sum()))
            hidden = stock.model.language_model(inputs_embeds=embeds[keep][None], position_ids=position_ids[None])
            logits.append(stock.lm_head(hidden.last_hidden_state)[0])
    return logits


@pytest.mark.parametrize("method", PRE_LLM_METHODS)
@pytest.mark.parametrize("rule", [None, "original"])
def test_pre_llm_methods_give_the_llm_the_shortened_sequence(method, rule):
    options = {} if rule is None else {"positions": rule}
    model = pruned_model(method, **options)
    batch = make_batch(((2, 5), (4, 9)))
    position_ids = (batch["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)  # as `generate` gives them
    with torch.no_grad():
        out = model(**batch, position_ids=position_ids, use_cache=False)
    expected = stock_on_the_shortened_sequence(model, batch, out, keep_original_ids=rule == "original",
                                               in_order=method == "visionzip")
    for row, reference in enumerate(expected):
        real = out.kept_positions[row] >= 0
        real &= batch["attention_mask"][row].gather(0, out.kept_positions[row].clamp_min(0)).bool()
        torch.testing.assert_close(out.logits[row][real], reference, atol=2e-5, rtol=1e-5)


def test_the_two_rules_give_different_logits():
    """The check above can tell the rules apart: renumbering moves every token after the image."""
    batch = make_batch(((2, 5),))
    with torch.no_grad():
        renumbered = pruned_model("divprune")(**batch, use_cache=False).logits
        original = pruned_model("divprune", positions="original")(**batch, use_cache=False).logits
    assert not torch.allclose(renumbered, original, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "ivtp"])
def test_the_position_rule_is_checked(method):
    """Every method's `positions` option is checked, IVTP's too (its options allow no budget)."""
    options = {"visual_tokens": 8, "positions": "gapless"}
    with pytest.raises(ValueError, match=r"`pruning_options\['positions'\]`.*\['original', 'renumbered'\].*'gapless'"):
        tiny_model(schedule=None, pruning_method=method, pruning_options=options)


@pytest.mark.parametrize("method, rule", [("fastv", "original"), ("pdrop", "renumbered"), ("visionzip", "renumbered"),
                                          ("vispruner", "renumbered"), ("divprune", "renumbered"),
                                          ("cdpruner", "renumbered"), ("ivtp", "original"), ("tome", "original")])
def test_each_method_defaults_to_its_codes_rule(method, rule):
    from modeling_llava_ivtp.pruners import PRUNERS

    assert PRUNERS[method].positions == rule
