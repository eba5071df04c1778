"""CDPruner's conditional-DPP token selection, on plain tensors.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", 2025,
arXiv 2506.10967; method section (conditional similarity, DPP MAP); rule as in the authors' code
(Theia-4869/CDPruner, `llava/model/llava_arch.py`, `encode_images`):

- similarity `S = cos(x_i, x_j)` of the projected visual features (multimodal projector output), in float32;
- relevance, for LLaVA: `r_i = mean_m(-cos(v_i, t_m))` between the CLIP image embedding of patch i
  (`visual_projection(post_layernorm(patch feature at vision_feature_layer))`) and the CLIP text embedding of each
  77-token segment m of the instruction (the question without LLaVA's answer-format suffix), then min-max
  normalised, `(r - min r + 1e-6) / (max r - min r)` (the negative sign is theirs);
- kernel `L = diag(r) S diag(r)`; the code's optional `exp(theta / (2 (1 - theta)) r)` reweighting is off by default;
- keep k tokens by the fast greedy MAP inference of Chen, Zhang, Zhou (NeurIPS 2018): incremental Cholesky rows
  `c`, gains `d_i^2 = L_ii - ||c_i||^2`, pick `argmax d^2` each step.

Default for 64 tokens on LLaVA-1.5: k = 64, no split, no extra hyperparameter.

Integration (site: projected features, before the LLM): the projector's output for the image tokens, and the
relevance from this project's CLIP text tower and visual projection (those stage 2 loads) on the instruction.
Our conventions: min-max per image (the official code normalises over the whole batch; it runs with batch 1);
gains below 1e-6 of the largest diagonal count as zero, so once the kernel's rank is spent the picks go to the lower
index instead of to rounding noise; ties to the lower index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .guidance_ivtp import clip_token_features
from .attention_rows import moved
from .pruner_base import ProjectedPruner, register_pruner


logger = logging.get_logger(__name__)


def instruction_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CDPruner's LLaVA relevance: mean negative cosine to the text segments, min-max normalised per image.

    Args:
        image_embeds: `(batch, n, dim)`, CLIP image embeddings of the patches.
        text_embeds: `(batch, segments, dim)`, CLIP text embeddings of the instruction's segments.

    Returns:
        `(batch, n)` float32, in `(0, 1]` up to the `1e-6` offset; all ones where a row is constant.
    """
    if image_embeds.dim() != 3 or text_embeds.dim() != 3 or text_embeds.shape[::2] != image_embeds.shape[::2]:
        raise ValueError(
            f"image_embeds (batch, n, dim) and text_embeds (batch, segments, dim) must agree, "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    image_unit = F.normalize(moved(image_embeds, dtype=torch.float32), dim=-1)
    cosine = image_unit @ F.normalize(moved(text_embeds, dtype=torch.float32), dim=-1).transpose(1, 2)
    relevance = (-cosine).mean(dim=-1)
    low, high = relevance.amin(dim=-1, keepdim=True), relevance.amax(dim=-1, keepdim=True)
    scaled = (relevance - low + 1e-6) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(high > low, scaled, torch.ones_like(relevance))


def cdpruner_keep_indices(features: torch.Tensor, relevance: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` tokens picked by greedy MAP of the conditional DPP `diag(r) S diag(r)`.

    Args:
        features: `(batch, n, dim)`, the projected visual features.
        relevance: `(batch, n)`, non-negative instruction relevance (see `instruction_relevance`).
        num_keep: `1 <= num_keep <= n`.

    Returns:
        `(batch, num_keep)` int64, sorted ascending.
    """
    if features.dim() != 3 or relevance.shape != features.shape[:2]:
        raise ValueError(
            f"features must be (batch, n, dim) and relevance (batch, n), "
            f"got {tuple(features.shape)} and {tuple(relevance.shape)}."
        )
    batch, num_tokens, _ = features.shape
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}.")

    normalized = F.normalize(moved(features, dtype=torch.float32), dim=-1)
    relevance = moved(relevance, dtype=torch.float32)
    similarity = normalized @ normalized.transpose(1, 2)
    # cos(x_i, x_i) is 1: set it exactly, or with equal relevance the first pick would go to rounding noise
    similarity.diagonal(dim1=1, dim2=2).fill_(1.0)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    gains = kernel.diagonal(dim1=1, dim2=2).clone()  # d_i^2, the log-det gain of adding i
    tolerance = 1e-6 * gains.amax(dim=-1, keepdim=True)
    cholesky_rows = kernel.new_zeros(batch, num_keep, num_tokens)
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    keep_indices = torch.empty(batch, num_keep, dtype=torch.long, device=features.device)
    rows = torch.arange(batch, device=features.device)
    for step in range(num_keep):
        pick = gains.masked_fill(picked, float("-inf")).argmax(dim=-1)
        keep_indices[:, step] = pick
        picked[rows, pick] = True
        pivot = gains[rows, pick]
        # e_i = (L_ji - <c_j, c_i>) / d_j; a spent direction (zero gain) adds no new row.
        projected = torch.einsum("bs,bsn->bn", cholesky_rows[rows, :step, pick], cholesky_rows[:, :step])
        scale = torch.where(pivot > 0, pivot.clamp_min(torch.finfo(torch.float32).tiny).rsqrt(), 0.0)
        new_row = (kernel[rows, pick] - projected) * scale.unsqueeze(-1)
        cholesky_rows[:, step] = new_row
        gains = gains - new_row.square()
        gains = torch.where(gains > tolerance, gains, torch.zeros_like(gains))
    return keep_indices.sort(dim=1).values


@register_pruner
class CdPrunerPruner(ProjectedPruner):
    """CDPruner on the projected image features: greedy MAP of the DPP `diag(r) S diag(r)`, with `S` the features'
    cosine similarity and `r` each patch's relevance to the instruction (CLIP image embedding of the patch,
    `clip_visual_projection(post_layernorm(feature))`, against the CLIP text embedding of the instruction: one
    segment, `clip_input_ids` as the processor gives it). Needs the CLIP text tower (`config.clip_text_encoder`);
    where the instruction inputs are missing the relevance is uniform (plain DPP diversity), with a one-time warning.
    """

    name = "cdpruner"
    options = {"visual_tokens": 64}
    positions = "renumbered"  # the authors' code: see `pruner_base.POSITION_RULES`
    variable_lengths = True  # LLaVA-NeXT: each crop after the projector, the code's layout (`pack_crops`)
    prunes_crops = True

    def __init__(self, config, context):
        super().__init__(config, context)
        self.texts = None  # each image's instruction embedding, computed once per call (`image_texts`)

    def on_projected(self, features):
        if self.config.max_crops > 1:  # LLaVA-NeXT: done per crop, before packing (`pack_crops`)
            return None
        return super().on_projected(features)

    def select(self, features, num_keep):
        texts = self.image_texts(features.device)
        if texts is None:
            relevance = torch.ones(features.shape[:2], device=features.device)
        else:
            relevance = self.relevance(self.context.vision["patch_hidden_states"], texts)
        return cdpruner_keep_indices(features, relevance.to(features.device), num_keep)

    def pack_crops(self, layout, crop_features, patch_ids, newline, newlines, image=0, crop_hidden_states=None):
        """LLaVA-NeXT as CDPruner's code runs it (`llava_arch.py`, `encode_images`): each crop alone keeps the
        budget's share (`visual_tokens // 5`: its scripts' 128 / 64 / 32 for 640 / 320 / 160) by the DPP, the
        relevance min-max normalised over all the image's crops together; then the code's plain "spatial" layout
        (`_unpad` stripped): the base crop's kept tokens in order, the tiles' in raster order over the stitched grid
        of tiles, no unpadding, no newline (`NextLayout.pack_base_then_tiles`)."""
        crops, patches = crop_features.shape[:2]
        texts = self.image_texts(crop_features.device)
        if texts is None:
            relevance = torch.ones(crops, patches, device=crop_features.device)
        else:  # one normalisation over the image's crops, as the code's over its batch of crops
            relevance = self.relevance(crop_hidden_states.reshape(1, crops * patches, -1), texts[image : image + 1])
            relevance = relevance.view(crops, patches)
        kept = cdpruner_keep_indices(crop_features, relevance.to(crop_features.device), min(self.crop_budget, patches))
        features = crop_features.gather(1, kept.unsqueeze(-1).expand(-1, -1, crop_features.shape[-1]))
        return layout.pack_base_then_tiles(features, moved(patch_ids, kept.device).gather(1, kept), self.config.num_patches)

    @torch.no_grad()
    def image_texts(self, device) -> torch.Tensor | None:
        """`(images, dim)`: the CLIP text embedding of each image's sample's instruction (one segment,
        `clip_input_ids` as the processor gives it), or `None` where the text tower or the CLIP ids are missing
        (then the relevance is uniform, with a one-time warning)."""
        if self.texts is not None:
            return self.texts
        context = self.context
        model, clip_input_ids = context.model, context.guidance.get("clip_input_ids")
        if getattr(model, "clip_text_model", None) is None or clip_input_ids is None:
            missing = [] if clip_input_ids is not None else ["clip_input_ids"]
            if getattr(model, "clip_text_model", None) is None:
                missing.append("config.clip_text_encoder (the CLIP text tower)")
            logger.warning_once(
                f"CDPruner's instruction relevance needs {missing}, which were not given; it selects by diversity "
                "alone. Use LlavaIvtpProcessor to get `clip_input_ids`."
            )
            return None
        clip_input_ids = context.clip_input_ids(device)
        tokens = clip_token_features(model.clip_text_model, clip_input_ids)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), clip_input_ids.argmax(dim=1)]
        # one instruction per sample, one image per sample that has one: each image takes its sample's text
        sample_of_image = torch.repeat_interleave(
            torch.arange(len(context.images_per_sample), device=pooled.device),
            context.images_per_sample.to(pooled.device),
        )
        self.texts = pooled[sample_of_image]
        return self.texts

    @torch.no_grad()
    def relevance(self, patch_hidden_states: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """`(images, patches)`: each patch's relevance to its image's text (`instruction_relevance`), from the
        feature layer's patch states `(images, patches, hidden)` through CLIP's post-layernorm and projection."""
        model = self.context.model
        image_embeds = model.clip_visual_projection(model.model.vision_tower.post_layernorm(patch_hidden_states))
        return instruction_relevance(image_embeds, texts.unsqueeze(1).to(image_embeds.dtype))
