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


def reference_stage_one(vision, config, pixels: torch.Tensor, shown: torch.Tensor | None = None):
    """Stage 1 on one image (or crop) `(channels, height, width)`: per group, the rollout's CLS row times the top
    layer's value norms keeps the top-k patches. `shown` `(patches,)` bool: patches that may be kept before the
    others (LLaVA-NeXT: a tile's patches on the letterbox padding rank last); ties go to the lower index. Returns the
    feature layer's hidden states `(1 + kept, hidden)` and the kept patches."""
    hidden = vision.pre_layrnorm(vision.embeddings(pixels[None].float()))[0]
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
        scores = scores / scores.sum()
        if shown is None:
            keep = topk_sorted(scores, k)
        else:
            rank = sorted(range(len(scores)), key=lambda j: (not bool(shown[patch_ids[j]]), -float(scores[j])))
            keep = torch.tensor(sorted(rank[:k]))
        hidden = torch.cat([hidden[:1], hidden[1:][keep]])
        patch_ids = patch_ids[keep]
    return hidden, patch_ids


@torch.no_grad()
def reference_forward(stock, config, input_ids: torch.Tensor, pixel_values: torch.Tensor, pseudo_cls=None):
    """`stock` must use eager attention. `input_ids` is 1-D (one sample, one image, no padding). `pseudo_cls`
    (a callable of the stage-1 output `(1 + kept, hidden)` -> `(hidden,)` in LLM space) replaces the visual CLS
    through the projector."""
    hidden, patch_ids = reference_stage_one(stock.model.vision_tower, config, pixel_values)
    features = stock.model.multi_modal_projector(hidden[1:])
    pseudo = stock.model.multi_modal_projector(hidden[0]) if pseudo_cls is None else pseudo_cls(hidden)
    out = reference_stage_two(stock, config, input_ids, features, patch_ids, pseudo, config.schedule["llm"])
    return {**out, "vision_keep_indices": patch_ids.sort().values}


@torch.no_grad()
def reference_next_forward(stock, config, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_size,
                           pseudo=None):
    """IVTP on LLaVA-NeXT by the host's stated rule, for one unpadded sample of one image: stage 1 on each crop alone
    (a tile's patches that stock unpadding removes rank last), the kept patches packed as stock
    `pack_image_features` packs an image (found by packing each patch's id), every newline kept, then stage 2 over
    the image's tokens with each group keeping `min(count, tokens held)`. `stock` is a stock
    `LlavaNextForConditionalGeneration` with eager attention; `pixel_values` `(crops, channels, height, width)`;
    `pseudo` `(hidden,)` the pseudo-CLS (default: the base crop's CLS through the projector)."""
    model, patches = stock.model, config.num_patches
    crops = pixel_values.shape[0]
    hidden_size = config.text_config.hidden_size
    source = packed_sources(stock, config, crops, image_size)
    shown = torch.zeros(crops * patches, dtype=torch.bool)
    shown[source[source >= 0]] = True
    full = torch.zeros(crops, patches, hidden_size)
    kept_source = torch.zeros(crops * patches, dtype=torch.bool)
    base_cls = None
    for crop in range(crops):
        hidden, patch_ids = reference_stage_one(model.vision_tower, config, pixel_values[crop],
                                                shown.view(crops, patches)[crop])
        full[crop, patch_ids] = model.multi_modal_projector(hidden[1:])
        kept_source[crop * patches + patch_ids] = True
        if crop == 0:
            base_cls = model.multi_modal_projector(hidden[0])
    packed, _ = model.pack_image_features([full], torch.tensor([image_size]), config.vision_feature_select_strategy,
                                          model.image_newline)
    packed = packed[0]
    kept = (source < 0) | kept_source[source.clamp_min(0)]
    positions = torch.where(kept)[0]
    pseudo = base_cls if pseudo is None else pseudo
    out = reference_stage_two(stock, config, input_ids, packed[positions], positions, pseudo, config.schedule["llm"])
    return {**out, "vision_keep_indices": positions}


def packed_sources(stock, config, crops: int, image_size) -> torch.Tensor:
    """For each token stock `pack_image_features` packs for an image of `crops` crops and `image_size`: the crop
    patch it is, `crop * patches + patch`, or -1 for a newline (found by packing each patch's id)."""
    model, patches = stock.model, config.num_patches
    ids = torch.arange(crops * patches, dtype=torch.float32).view(crops, patches, 1)
    ids = ids.expand(-1, -1, config.text_config.hidden_size)
    packed_ids, _ = model.pack_image_features([ids], torch.tensor([image_size]), config.vision_feature_select_strategy,
                                              model.image_newline)
    packed_ids = packed_ids[0]
    is_patch = (packed_ids == packed_ids[:, :1]).all(dim=1) & (packed_ids[:, 0] == packed_ids[:, 0].round())
    is_patch &= ~(packed_ids == model.image_newline.to(packed_ids)).all(dim=1)
    return torch.where(is_patch, packed_ids[:, 0].long(), -1)


def reference_stage_two(stock, config, input_ids, features, patch_ids, pseudo, llm_counts):
    """Stage 2 on the sequence `[prefix, image tokens (features, at image_start + patch_ids), pseudo-CLS, suffix]`:
    per LLM group the pseudo-CLS's rollout row keeps `min(count, tokens held)` image tokens."""
    language_model = stock.model.language_model
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
        keep = topk_sorted(scores / scores.sum(), min(llm_counts[segment_index], len(image_index)))
        llm_keep.append(positions[image_index[keep]] - image_start)
        survivors = torch.ones(len(positions), dtype=torch.bool)
        survivors[image_index] = False
        survivors[image_index[keep]] = True
        if segment_index == len(layer_groups) - 1:
            survivors[pseudo_index] = False
        hidden, positions, kind = hidden[survivors], positions[survivors], kind[survivors]
    logits = stock.lm_head(language_model.norm(hidden))
    return {"logits": logits, "kept_positions": positions, "llm_keep_indices": llm_keep}


# --- LLaVA-NeXT references shared by the methods' tests ------------------------------------------------------------
def base_then_tiles_block(projected: torch.Tensor, kept: list[list[int]], grid: tuple[int, int], side: int):
    """The peers' NeXT layout without unpadding or newlines (VisPruner's and CDPruner's plain "spatial" branch): the
    base crop's kept tokens in order, then the tiles' kept patches read in raster order off their stitched grid.
    `projected` `(crops, patches, hidden)`, `kept` each crop's kept patches (increasing)."""
    rows, columns = grid
    mask = torch.zeros(rows * side, columns * side, dtype=torch.bool)
    features = torch.zeros(rows * side, columns * side, projected.shape[-1])
    for tile, patches in enumerate(kept[1:]):
        for patch in patches:
            y, x = (tile // columns) * side + patch // side, (tile % columns) * side + patch % side
            mask[y, x] = True
            features[y, x] = projected[1 + tile, patch]
    return torch.cat([projected[0, kept[0]], features[mask]])


@torch.no_grad()
def stock_logits_with_block(stock, ids: torch.Tensor, image_token_id: int, block: torch.Tensor) -> torch.Tensor:
    """Stock decoder logits of the prompt `ids` (1-D) with its image placeholders replaced by `block` (as many
    tokens as the block holds, at fresh positions: the peers' code passes the shortened sequence)."""
    image = torch.where(ids == image_token_id)[0]
    embeds = stock.get_input_embeddings()(ids)
    sequence = torch.cat([embeds[: image[0]], block, embeds[image[-1] + 1 :]])[None]
    return stock.lm_head(stock.model.language_model(inputs_embeds=sequence).last_hidden_state)[0]


@torch.no_grad()
def stock_logits_at_kept(stock, ids: torch.Tensor, image_token_id: int, kept: torch.Tensor, features: torch.Tensor):
    """Stock decoder logits of the prompt `ids` (1-D) keeping only the placeholders `kept` (indices among the image's
    placeholders, increasing), which take `features` `(kept, hidden)`, every token at its original position.
    Returns `(logits (tokens, vocab), positions kept)`."""
    image = torch.where(ids == image_token_id)[0]
    embeds = stock.get_input_embeddings()(ids).clone()
    embeds[image[kept]] = features
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image] = False
    keep[image[kept]] = True
    positions = torch.where(keep)[0]
    hidden = stock.model.language_model(inputs_embeds=embeds[keep][None], position_ids=positions[None]).last_hidden_state
    return stock.lm_head(hidden)[0], positions
