"""A slow, plain reference of IVTP for one unpadded sample, written independently of the package's code paths.

It runs the stock layers of a stock `LlavaForConditionalGeneration` with eager attention, takes attention weights
from the stock attention modules, forms the full rollout matrices (matrix products, eq. 3), inserts the pseudo-CLS
*between* the image and the text as the paper does (with a mask that hides it from the text), and removes the
pruned tokens by hand.
"""

from __future__ import annotations

import torch


def rollout_matrix(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 3 with explicit row re-normalisation: `N(A[l2] + I) ... N(A[l1+1] + I) A[l1]`, full matrices."""
    result = attentions[0]
    for attention in attentions[1:]:
        with_residual = attention + torch.eye(attention.shape[-1], dtype=attention.dtype)
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        result = with_residual @ result
    return result


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


@torch.no_grad()
def reference_forward(stock, config, input_ids: torch.Tensor, pixel_values: torch.Tensor, pseudo_cls=None):
    """`stock` must use eager attention. `input_ids` is 1-D (one sample, one image, no padding). `pseudo_cls`
    (a callable of the stage-1 output `(1 + kept, hidden)` -> `(hidden,)` in LLM space) replaces the visual CLS
    through the projector."""
    vision = stock.model.vision_tower
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values[None].float()))[0]
    patch_ids = torch.arange(config.num_patches)
    for (first, last), k in zip(config.vision_layer_groups, config.schedule["vision"]):
        attentions = []
        for layer in vision.encoder.layers[first : last + 1]:
            normed = layer.layer_norm1(hidden[None])
            _, weights = layer.self_attn(normed)  # stock eager attention: (1, heads, n, n)
            attentions.append(weights[0].mean(0).double())
            values = layer.self_attn.v_proj(normed)[0]
            hidden = layer(hidden[None], None)[0]
        row = rollout_matrix(attentions)[0, 1:]
        scores = row * values[1:].norm(dim=-1).double()
        keep = topk_sorted(scores / scores.sum(), k)
        hidden = torch.cat([hidden[:1], hidden[1:][keep]])
        patch_ids = patch_ids[keep]
    features = stock.model.multi_modal_projector(hidden[1:])
    pseudo = stock.model.multi_modal_projector(hidden[0]) if pseudo_cls is None else pseudo_cls(hidden)

    image_slots = (input_ids == config.image_token_id).nonzero()[:, 0]
    image_start, image_end = int(image_slots[0]), int(image_slots[-1])
    embeds = stock.model.language_model.embed_tokens(input_ids)
    # The sequence: [prefix, kept image tokens, pseudo-CLS, suffix]; track each token's original position id.
    kept_image_positions = image_start + patch_ids
    positions = torch.cat([
        torch.arange(image_start), kept_image_positions, torch.tensor([image_end + 1]),
        torch.arange(image_end + 1, len(input_ids)),
    ])
    hidden = torch.cat([embeds[:image_start], features, pseudo[None], embeds[image_end + 1:]])
    kind = torch.cat([  # 0 text, 1 image, 2 pseudo-CLS
        torch.zeros(image_start), torch.ones(len(patch_ids)), torch.tensor([2.0]),
        torch.zeros(len(input_ids) - image_end - 1),
    ]).long()
    language_model = stock.model.language_model
    llm_keep = []
    layer_groups = list(config.llm_layer_groups)
    window_end = layer_groups[-1][1] + 1 if layer_groups else 0
    segments = layer_groups + [(window_end, config.text_config.num_hidden_layers - 1)]
    for segment_index, (first, last) in enumerate(segments):
        pruning = segment_index < len(layer_groups)
        n = len(positions)
        order = torch.arange(n)
        allowed = order[None, :] <= order[:, None]  # causal in sequence order
        pseudo_slot = (kind == 2).nonzero()
        if len(pseudo_slot):
            allowed[:, int(pseudo_slot[0])] = False  # no real token attends to the pseudo-CLS
            allowed[int(pseudo_slot[0]), int(pseudo_slot[0])] = True
        mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        cos_sin = language_model.rotary_emb(hidden[None], positions[None])
        attentions = []
        for layer in language_model.layers[first : last + 1]:
            normed = layer.input_layernorm(hidden[None])
            _, weights = layer.self_attn(normed, position_embeddings=cos_sin, attention_mask=mask)
            attentions.append(weights[0].mean(0).double())
            values = layer.self_attn.v_proj(normed)[0]
            hidden = layer(hidden[None], attention_mask=mask, position_embeddings=cos_sin, position_ids=positions[None])[0]
        if not pruning:
            continue
        pseudo_index = int((kind == 2).nonzero()[0])
        image_index = (kind == 1).nonzero()[:, 0]
        row = rollout_matrix(attentions)[pseudo_index, image_index]
        scores = row * values[image_index].norm(dim=-1).double()
        keep = topk_sorted(scores / scores.sum(), config.schedule["llm"][segment_index])
        llm_keep.append(positions[image_index[keep]] - image_start)
        survivors = torch.ones(len(positions), dtype=torch.bool)
        survivors[image_index] = False
        survivors[image_index[keep]] = True
        if segment_index == len(layer_groups) - 1:
            survivors[pseudo_index] = False
        hidden, positions, kind = hidden[survivors], positions[survivors], kind[survivors]
    logits = stock.lm_head(language_model.norm(hidden))
    return {
        "logits": logits,
        "kept_positions": positions,
        "vision_keep_indices": patch_ids.sort().values,
        "llm_keep_indices": llm_keep,
    }
