"""VisionZip as its authors' code runs it (`dvlab-research/VisionZip`: `visionzip/main.py` sets `dominant_num =
dominant - 1`; `clip_encoder.py`, `CLIPVisionTower_VisionZip.forward`; `llava_arch.py` builds the sequence and
passes `position_ids=None`).

From the reading, at the feature layer (`hidden_states[-2]`, the attention and mean-over-heads keys of the same
layer): the CLS's attention summed over heads ranks the patches; the top `dominant - 1` and the CLS are the dominant
tokens (kept in their order); the other patches, in order, give `contextual` targets every `max(1, R // contextual)`-
th; each other token joins the target with the most cosine-similar key; a contextual token is `target + mean(its
tokens)`; the projector gets `cat([dominant, contextual])`, and the LLM that block with fresh position ids.
"""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_llava_ivtp.transformers_compat import output_image_features
from tiny_models import IMAGE_TOKEN_ID, make_batch, sharpen_attention, stock_twin, tiny_model


def feature_layer_inputs(model, pixels):
    """Stock eager CLIP: the feature layer's output, its attention probabilities, and its keys averaged over heads
    (the code's `metric`, from the layer's own `k_proj` on its normalised input)."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    out = eager(pixels, output_hidden_states=True, output_attentions=True)
    layer_idx = len(out.hidden_states) - 3
    layer = eager.vision_model.encoder.layers[layer_idx] if hasattr(eager, "vision_model") else eager.encoder.layers[layer_idx]
    heads = layer.self_attn.num_heads
    layer_input = out.hidden_states[layer_idx]
    keys = layer.self_attn.k_proj(layer.layer_norm1(layer_input))
    keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)
    return out.hidden_states[-2], out.attentions[layer_idx], keys


def official_visionzip(hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                       contextual: int) -> tuple[list[int], torch.Tensor]:
    """One image: `(ids, tokens)` of the block the projector gets; ids -1 for the CLS, else the patch (a contextual
    token: its target)."""
    cls_attention = attention[:, 0, 1:].sum(dim=0)  # heads summed
    ranked = sorted(range(len(cls_attention)), key=lambda index: (-float(cls_attention[index]), index))
    top = sorted(ranked[: dominant - 1])
    ids = [-1] + top
    tokens = [hidden[0]] + [hidden[1 + index] for index in top]
    rest = [index for index in range(len(cls_attention)) if index not in set(top)]
    step = max(1, len(rest) // contextual)
    targets = [rest[position] for position in range(0, len(rest), step)][:contextual]
    others = [index for index in rest if index not in set(targets)]
    unit = torch.nn.functional.normalize(keys[1:], dim=-1)
    groups = {target: [] for target in targets}
    for index in others:
        similarity = [float(unit[index] @ unit[target]) for target in targets]
        groups[targets[similarity.index(max(similarity))]].append(index)  # the first best target
    for target in targets:
        members = groups[target]
        merged = hidden[1 + target] + (torch.stack([hidden[1 + m] for m in members]).mean(0) if members else 0)
        ids.append(target)
        tokens.append(merged)
    return ids, torch.stack(tokens)


@pytest.mark.parametrize("budget, dominant", [(8, None), (12, 9), (8, 1)])
def test_visionzip_hands_the_llm_the_released_codes_block(budget, dominant):
    options = {"visual_tokens": budget} if dominant is None else {"visual_tokens": budget, "dominant": dominant}
    model = sharpen_attention(tiny_model(schedule=None, pruning_method="visionzip", pruning_options=options))
    dominant = dominant or round(budget * 54 / 64)
    batch = make_batch(((2, 5), (4, 9)))
    position_ids = (batch["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(**batch, position_ids=position_ids, use_cache=False)
        hidden, attention, keys = feature_layer_inputs(model, batch["pixel_values"])
        stock = stock_twin(model)
        for row in range(2):
            ids, tokens = official_visionzip(hidden[row], attention[row], keys[row], dominant, budget - dominant)
            assert out.vision_keep_indices[row].tolist() == ids
            block = model.model.multi_modal_projector(tokens)
            torch.testing.assert_close(output_image_features(out)[row], block, atol=1e-5, rtol=1e-5)
            real = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            image = torch.where(real == IMAGE_TOKEN_ID)[0]
            embeds = stock.get_input_embeddings()(real)
            sequence = torch.cat([embeds[: image[0]], block, embeds[image[-1] + 1 :]])[None]
            logits = stock.lm_head(stock.model.language_model(inputs_embeds=sequence).last_hidden_state)[0]
            rows = (out.kept_positions[row] >= 0) & batch["attention_mask"][row].gather(
                0, out.kept_positions[row].clamp_min(0)).bool()
            torch.testing.assert_close(out.logits[row][rows], logits, atol=2e-5, rtol=1e-5)


def test_the_patches_layout_is_ours_and_differs():
    """`layout="patches"` (no CLS, each token at its patch's place) keeps another set of tokens."""
    batch = make_batch(((2, 5),))
    kwargs = dict(schedule=None, pruning_method="visionzip")
    with torch.no_grad():
        official = sharpen_attention(tiny_model(**kwargs, pruning_options={"visual_tokens": 8}))(**batch, use_cache=False)
        ours = sharpen_attention(tiny_model(**kwargs, pruning_options={"visual_tokens": 8, "layout": "patches"}))(
            **batch, use_cache=False)
    assert official.vision_keep_indices[0, 0] == -1 and bool((ours.vision_keep_indices >= 0).all())
    assert ours.vision_keep_indices[0].tolist() == sorted(ours.vision_keep_indices[0].tolist())


def test_visionzip_options_are_checked():
    with pytest.raises(ValueError, match=r"`pruning_options\['layout'\]`.*\['visionzip', 'patches'\]"):
        tiny_model(schedule=None, pruning_method="visionzip", pruning_options={"visual_tokens": 8, "layout": "cls"})
    with pytest.raises(ValueError, match=r"`pruning_options\['dominant'\]`.*\[1, 8\]"):
        tiny_model(schedule=None, pruning_method="visionzip", pruning_options={"visual_tokens": 8, "dominant": 0})


def official_next_layout(crops: list[tuple[list[int], torch.Tensor]], grid: tuple[int, int], side: int, dominant: int):
    """VisionZip's LLaVA-NeXT layout of one image (`llava_arch.py`, `restore_image_features_sorted`) from each crop's
    `(ids, tokens)`: the base crop's block as it is; each tile's dominant patches scattered into a zeroed grid of its
    patches, the tiles stitched into one `(rows * side, columns * side)` grid and read back in raster order; then the
    tiles' CLS tokens; then each tile's contextual tokens. No unpadding, no newline."""
    rows, columns = grid
    base_ids, base_tokens = crops[0]
    stitched = {}
    for tile, (ids, tokens) in enumerate(crops[1:]):
        for position in range(1, dominant):
            patch = ids[position]
            row = (tile // columns) * side + patch // side
            column = (tile % columns) * side + patch % side
            stitched[row * columns * side + column] = tokens[position]
    dominant_tokens = [stitched[key] for key in sorted(stitched)]
    cls_tokens = [tokens[0] for _, tokens in crops[1:]]
    contextual = [token for _, tokens in crops[1:] for token in tokens[dominant:]]
    return torch.cat([base_tokens, torch.stack(dominant_tokens + cls_tokens + contextual)])


def test_visionzip_on_llava_next_is_the_released_codes_layout():
    """On LLaVA-NeXT each crop goes through VisionZip alone with the same `dominant + contextual` (the budget's share
    of a crop, `visual_tokens // 5`: 60 -> 12 = 10 + 2, as the paper's 640 -> 108 + 20), and the image's block is
    the code's layout (`official_next_layout`); the LLM gets it with fresh position ids, as stock LLaVA-NeXT's decoder
    on that block."""
    from reference_ivtp import stock_logits_with_block
    from tiny_models import make_next_batch, next_stock_twin, tiny_next_model

    model = sharpen_attention(tiny_next_model(pruning_method="visionzip", pruning_options={"visual_tokens": 60}))
    batch = make_next_batch(model.config)
    stock = next_stock_twin(model)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layouts = model.image_layouts(batch["image_sizes"])
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        pixels = batch["pixel_values"][row][: layouts[row].crops]
        with torch.no_grad():
            out = model(input_ids=ids[None], pixel_values=pixels[None], image_sizes=batch["image_sizes"][row:row + 1],
                        use_cache=False)
            hidden, attention, keys = feature_layer_inputs(model, pixels)
            crops = [official_visionzip(hidden[crop], attention[crop], keys[crop], 10, 2) for crop in range(len(pixels))]
            block = model.model.multi_modal_projector(official_next_layout(crops, layouts[row].grid, side, 10))
            assert block.shape[0] == 12 * layouts[row].crops
            torch.testing.assert_close(output_image_features(out)[0], block, atol=1e-5, rtol=1e-5)
        logits = stock_logits_with_block(stock, ids, IMAGE_TOKEN_ID, block)
        torch.testing.assert_close(out.logits[0], logits, atol=2e-5, rtol=1e-5)
