"""EViT as its authors' code runs it (`youweiliang/evit`, `evit.py`: `Attention.forward` ranks the patches by the
head-averaged CLS attention row, `torch.topk(cls_attn, left_tokens)`; `EViTBlock.forward` fuses the rest as
`torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1)`, an attention-weighted *sum*).

The reference below is written from that reading, per image, on the stock CLIP layers with eager attention: after
the last layer of each group it keeps the `k - 1` most attended patches and one fused token (the project's budget
convention; the fused token sits at the position of the most attended inattentive patch). The model's kept patches
and the image features that reach the LLM must equal it.
"""

from __future__ import annotations

import pytest
import torch

from modeling_llava_ivtp.pruner_evit import EvitPruner
from modeling_llava_ivtp.transformers_compat import output_image_features
from tiny_models import make_pixels, make_prompt, sharpen_attention, tiny_model


def eager_cls_row(layer, hidden: torch.Tensor) -> torch.Tensor:
    """`(images, patches)`: the CLS row of `layer`'s attention probabilities over the patches, head-averaged, from
    its own projections (plain softmax, as the eager CLIP attention computes it)."""
    images, tokens, width = hidden.shape
    heads = layer.self_attn.num_heads
    normed = layer.layer_norm1(hidden)
    queries = layer.self_attn.q_proj(normed).view(images, tokens, heads, -1).transpose(1, 2)
    keys = layer.self_attn.k_proj(normed).view(images, tokens, heads, -1).transpose(1, 2)
    probabilities = ((queries @ keys.transpose(-1, -2)) * queries.shape[-1] ** -0.5).softmax(-1)
    return probabilities.mean(dim=1)[:, 0, 1:]


def official_evit_step(patches: list[torch.Tensor], attention: list[float], num_keep: int, fused: str):
    """One image, one EViT step as released: top-`(num_keep - 1)` by attention, the rest fused by the attention-
    weighted sum (`fused="mean"`: our variant, divided by the rest's attention mass). Returns `{index: feature}`."""
    ranked = sorted(range(len(attention)), key=lambda index: (-attention[index], index))
    attentive, rest = ranked[: num_keep - 1], ranked[num_keep - 1 :]
    token = sum(attention[index] * patches[index] for index in rest)
    if fused == "mean":
        token = token / sum(attention[index] for index in rest)
    kept = {index: patches[index] for index in attentive}
    kept[rest[0]] = token
    return kept


@pytest.mark.parametrize("fused", [None, "sum", "mean"])
def test_evit_keeps_and_fuses_as_the_released_code(fused):
    options = {"visual_tokens": 8} if fused is None else {"visual_tokens": 8, "fused": fused}
    model = sharpen_attention(tiny_model(schedule=None, pruning_method="evit", pruning_options=options))
    schedule = EvitPruner(model.config, None).counts  # {last layer of a group: patches kept after it}
    pixels = make_pixels(2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([make_prompt(2, 3)] * 2), pixel_values=pixels, use_cache=False)
        tower = model.model.vision_tower
        expected_keep, expected_features = [], []
        for image in range(2):
            hidden = tower.pre_layrnorm(tower.embeddings(pixels[image : image + 1]))
            patch_ids = list(range(36))
            for layer_idx, layer in enumerate(tower.encoder.layers[: max(schedule) + 1]):
                row = eager_cls_row(layer, hidden)[0]
                hidden = layer(hidden, None)
                if layer_idx not in schedule:
                    continue
                kept = official_evit_step(list(hidden[0, 1:]), row.tolist(), schedule[layer_idx], fused or "sum")
                order = sorted(kept)
                patch_ids = [patch_ids[index] for index in order]
                hidden = torch.cat([hidden[:, :1], torch.stack([kept[index] for index in order])[None]], dim=1)
            expected_keep.append(patch_ids)
            expected_features.append(model.model.multi_modal_projector(hidden[0, 1:]))
    assert out.vision_keep_indices.tolist() == expected_keep
    torch.testing.assert_close(output_image_features(out), torch.stack(expected_features), atol=1e-5, rtol=1e-5)


def test_the_default_fused_token_is_the_released_sum_not_an_average():
    """On the tiny model the two differ: the default is not the average."""
    kwargs = dict(schedule=None, pruning_method="evit")
    default = sharpen_attention(tiny_model(**kwargs, pruning_options={"visual_tokens": 8}))
    mean = sharpen_attention(tiny_model(**kwargs, pruning_options={"visual_tokens": 8, "fused": "mean"}))
    batch = {"input_ids": torch.tensor([make_prompt(2, 3)]), "pixel_values": make_pixels(1)}
    with torch.no_grad():
        a, b = output_image_features(default(**batch, use_cache=False)), output_image_features(mean(**batch, use_cache=False))
    assert not torch.allclose(a, b)


def test_evit_fused_option_is_checked():
    with pytest.raises(ValueError, match=r"`pruning_options\['fused'\]`.*\['sum', 'mean'\].*'average'"):
        tiny_model(schedule=None, pruning_method="evit", pruning_options={"visual_tokens": 8, "fused": "average"})


def test_evit_on_llava_next_keeps_each_crops_share_shown_patches_first():
    """LLaVA-NeXT (ours): each crop through the tower alone with the schedule of the budget's share (`visual_tokens
    // 5`); a tile's patches on the letterbox padding rank below every shown patch and take no part in the fused
    token (where no shown patch is left to fuse, the last slot keeps its own features); the kept patches packed in
    stock order, those the unpadding removes left out, no newline."""
    from reference_ivtp import packed_sources
    from tiny_models import make_next_batch, next_stock_twin, tiny_next_model

    model = sharpen_attention(tiny_next_model(pruning_method="evit", pruning_options={"visual_tokens": 60}))
    schedule = EvitPruner(model.config, None).counts
    assert schedule[max(schedule)] == 12
    batch = make_next_batch(model.config)
    stock = next_stock_twin(model)
    tower = model.model.vision_tower
    layouts = model.image_layouts(batch["image_sizes"])
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        for row in range(2):
            crops = layouts[row].crops
            source = packed_sources(stock, model.config, crops, batch["image_sizes"][row].tolist())
            place = {int(s): j for j, s in enumerate(source.tolist()) if s >= 0}
            tokens = {}
            for crop in range(crops):
                hidden = tower.pre_layrnorm(tower.embeddings(batch["pixel_values"][row, crop : crop + 1]))
                patch_ids = list(range(36))
                for layer_idx, layer in enumerate(tower.encoder.layers[: max(schedule) + 1]):
                    attention = eager_cls_row(layer, hidden)[0].tolist()
                    hidden = layer(hidden, None)
                    if layer_idx not in schedule:
                        continue
                    shown = [crop * 36 + patch in place for patch in patch_ids]
                    ranked = sorted(range(len(patch_ids)), key=lambda i: (not shown[i], -attention[i], i))
                    keep = schedule[layer_idx]
                    attentive, slot = ranked[: keep - 1], ranked[keep - 1]
                    rest = [i for i in ranked[keep - 1 :] if shown[i]]
                    kept = {i: hidden[0, 1 + i] for i in attentive}
                    kept[slot] = sum(attention[i] * hidden[0, 1 + i] for i in rest) if rest else hidden[0, 1 + slot]
                    order = sorted(kept)
                    patch_ids = [patch_ids[i] for i in order]
                    hidden = torch.cat([hidden[:, :1], torch.stack([kept[i] for i in order])[None]], dim=1)
                features = model.model.multi_modal_projector(hidden[0, 1:])
                for patch, feature in zip(patch_ids, features):
                    if crop * 36 + patch in place:
                        tokens[place[crop * 36 + patch]] = feature
            expected = sorted(tokens)
            ours = out.vision_keep_indices[row]
            assert ours[ours >= 0].tolist() == expected, row
            first = sum(int((out.vision_keep_indices[r] >= 0).sum()) for r in range(row))  # the images' rows, flat
            torch.testing.assert_close(output_image_features(out)[first : first + len(expected)],
                                       torch.stack([tokens[j] for j in expected]), atol=1e-5, rtol=1e-5)
