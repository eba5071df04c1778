"""VisPruner as its authors' code runs it (`Theia-4869/VisPruner`, `llava/model/llava_arch.py`, `encode_images`), and
what the project does where that code stops with an error.

From the reading: the patches ranked by the feature layer's head-averaged CLS attention (descending); the first
`int(T * 0.75)` are important; the rest lose near-duplicates round by round (`r = min(8, R - T_div)` of the
even-position tokens with the largest best-cosine to an odd-position token), the survivors of the evens (by
decreasing score) then the odds going on, until `T_div` are left.
"""

from __future__ import annotations

import logging

import pytest
import torch

from modeling_llava_ivtp.pruner_vispruner import released_code_fails, vispruner_keep_indices
from modeling_llava_ivtp.transformers_compat import output_image_features
from tiny_models import make_pixels, make_prompt, sharpen_attention, tiny_model


def plain_vispruner(features: torch.Tensor, attention: list[float], important_count: int, diverse_count: int):
    """One image: the official rule on Python lists (stable sorts: ties to the earlier list position); a round never
    removes more than its even-position tokens (the project's continuation where the released code fails)."""
    ranked = sorted(range(len(attention)), key=lambda index: (-attention[index], index))
    important, residual = ranked[:important_count], ranked[important_count:]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    while diverse_count > 0 and len(residual) > diverse_count:
        even, odd = residual[0::2], residual[1::2]
        removed = min(8, len(residual) - diverse_count, len(even))
        best = [max(float(unit[a] @ unit[b]) for b in odd) if odd else float("-inf") for a in even]
        order = sorted(range(len(even)), key=lambda index: (-best[index], index))
        residual = [even[index] for index in order[removed:]] + odd
    return sorted(important + residual[:diverse_count])


def released_loop_leaves_the_rule(num_tokens: int, num_important: int, num_diverse: int) -> bool:
    """The shapes of the released loop on a batch of 2 (random scores): whether its indexing raises, or a round keeps
    another number of even-position tokens than the rule (`ceil(R / 2) - min(r, ceil(R / 2))`)."""
    batch = 2
    residual = torch.arange(num_important, num_tokens).expand(batch, -1)
    try:
        while num_diverse > 0:
            size = residual.shape[1]
            removed = min(8, size - num_diverse)
            if removed <= 0:
                break
            evens = (size + 1) // 2
            distinct = torch.rand(batch, evens).argsort(dim=-1, descending=True)[:, removed:]
            rows = torch.arange(batch).unsqueeze(-1).expand(-1, size // 2 - removed)
            kept_evens = residual[..., ::2][rows, distinct]
            if kept_evens.shape[1] != evens - min(removed, evens):
                return True
            residual = torch.cat([kept_evens, residual[..., 1::2]], dim=-1)
    except (RuntimeError, IndexError):  # a negative `expand`, or rows that do not broadcast
        return True
    return False


@pytest.mark.parametrize("num_tokens", [576, 36])
def test_released_code_fails_exactly_where_the_released_loop_raises(num_tokens):
    for total in range(1, min(num_tokens, 80) + 1):
        important = int(total * 0.75)
        assert released_code_fails(num_tokens, important, total - important) == released_loop_leaves_the_rule(
            num_tokens, important, total - important
        ), total
    assert not released_code_fails(576, 48, 16) and released_code_fails(576, 12, 4) and released_code_fails(576, 15, 5)


def model_and_reference(total: int):
    model = sharpen_attention(tiny_model(schedule=None, pruning_method="vispruner",
                                         pruning_options={"visual_tokens": total}))
    pixels = make_pixels(2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([make_prompt(2, 3)] * 2), pixel_values=pixels, use_cache=False)
        tower = model.model.vision_tower
        eager = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            stock = tower(pixels, output_hidden_states=True, output_attentions=True)
        finally:
            tower.set_attn_implementation(eager)
    features = stock.hidden_states[-2][:, 1:]
    attention = stock.attentions[len(stock.hidden_states) - 3].mean(dim=1)[:, 0, 1:]
    important = int(total * 0.75)
    expected = [plain_vispruner(features[image], attention[image].tolist(), important, total - important)
                for image in range(2)]
    return out.vision_keep_indices.tolist(), expected


def test_vispruner_keeps_the_released_codes_tokens():
    """16 of 36 (12 important + 4 diverse): a budget where the released code runs."""
    assert not released_code_fails(36, 12, 4)
    kept, expected = model_and_reference(16)
    assert kept == expected


def test_vispruner_where_the_released_code_fails_continues_its_rule_and_warns_once(caplog):
    """8 of 36 (6 + 2): the released code stops with an error; ours removes at most the evens of a round, says so."""
    assert released_code_fails(36, 6, 2)
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-message memory
    with caplog.at_level(logging.WARNING):
        kept, expected = model_and_reference(8)
    assert kept == expected
    warnings = [record.getMessage() for record in caplog.records if "VisPruner's released code" in record.getMessage()]
    assert len(warnings) == 1 and "6 important + 2 diverse of 36" in warnings[0]


def test_the_important_count_is_the_released_floor():
    """`int(T * 0.75)`: 10 tokens give 7 important (round() would give 8)."""
    from modeling_llava_ivtp.pruner_vispruner import VisPrunerPruner

    model = tiny_model(schedule=None, pruning_method="vispruner", pruning_options={"visual_tokens": 10})
    assert VisPrunerPruner(model.config, None).important == 7


def test_pure_function_with_ties_matches_the_plain_reference():
    """Equal attention and duplicated features: the stable order decides, as in the reference."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]] * 3)[None]
    attention = [0.5] * 18
    for important, diverse in ((3, 5), (0, 4), (6, 2), (2, 9)):
        kept = vispruner_keep_indices(features, torch.tensor([attention]), important, diverse)
        assert kept[0].tolist() == plain_vispruner(features[0], attention, important, diverse), (important, diverse)


def test_vispruner_on_llava_next_is_the_released_codes_layout():
    """On LLaVA-NeXT each crop goes through the rule alone with the budget's share (`visual_tokens // 5`: 80 -> 16 =
    12 important + 4 diverse, as the code's `--visual_token_num 128 / 64 / 32` for 640 / 320 / 160), and the image's
    block is the code's "spatial" layout (`_unpad` stripped): the base crop's kept patches in order, then the tiles'
    kept patches read in raster order off the stitched grid of tiles, no unpadding, no newline; the LLM gets it with
    fresh position ids, as stock LLaVA-NeXT's decoder on that block."""
    import copy

    from reference_ivtp import base_then_tiles_block, stock_logits_with_block
    from tiny_models import IMAGE_TOKEN_ID, make_next_batch, next_stock_twin, tiny_next_model

    model = sharpen_attention(tiny_next_model(pruning_method="vispruner", pruning_options={"visual_tokens": 80}))
    batch = make_next_batch(model.config)
    stock = next_stock_twin(model)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layouts = model.image_layouts(batch["image_sizes"])
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        pixels = batch["pixel_values"][row][: layouts[row].crops]
        with torch.no_grad():
            out = model(input_ids=ids[None], pixel_values=pixels[None], image_sizes=batch["image_sizes"][row:row + 1],
                        use_cache=False)
            vision = tower(pixels, output_hidden_states=True, output_attentions=True)
            features = vision.hidden_states[-2][:, 1:]
            attention = vision.attentions[len(vision.hidden_states) - 3].mean(dim=1)[:, 0, 1:]
            kept = [plain_vispruner(features[crop], attention[crop].tolist(), 12, 4) for crop in range(len(pixels))]
            projected = model.model.multi_modal_projector(features)
            block = base_then_tiles_block(projected, kept, layouts[row].grid, side)
            assert block.shape[0] == 16 * layouts[row].crops
            torch.testing.assert_close(output_image_features(out)[0], block, atol=1e-5, rtol=1e-5)
        logits = stock_logits_with_block(stock, ids, IMAGE_TOKEN_ID, block)
        torch.testing.assert_close(out.logits[0], logits, atol=2e-5, rtol=1e-5)
