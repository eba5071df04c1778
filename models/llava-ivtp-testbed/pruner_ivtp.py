"""IVTP (Huang et al., "IVTP: Instruction-guided Visual Token Pruning for Large Vision-Language Models", ECCV 2024).

Stage 1 (sec. 3.2): group-wise token pruning (GTP) in the vision tower. Per group of `group_size` layers, the CLS row
of the attention rollout with residual (eq. 3), times the norms of the top layer's value vectors (eq. 4), ranks the
patches; the top-k are kept after the group's top layer (`schedule["vision"]`).
Stage 2 (sec. 3.3): GTP again in the first LLM layers (`schedule["llm"]`), with a textual pseudo-CLS as the probe:
the instruction tokens whose CLIP relevance to the image (eq. 5-7) is at least `tau`, averaged (eq. 8); it sees the
tokens up to its image and no real token sees it. `config.guidance` selects the pseudo-CLS (paper Table 6).

The math is in `pruning_ivtp.py`; this file asks the layers for the rows it needs and keeps what a group gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from transformers.utils import logging

from .attention_rows import RowRequest
from .guidance_ivtp import clip_content_mask, clip_token_features
from .pruner_base import LlmView, Pruner, PruneContext, Selection, register_pruner
from .pruning_ivtp import cosine_relevance, pseudo_cls, rollout_cls_row, select_keep_indices, span_mean, token_scores


logger = logging.get_logger(__name__)


@register_pruner
class IvtpPruner(Pruner):
    name = "ivtp"

    def __init__(self, config, context: PruneContext):
        super().__init__(config, context)
        self.vision_groups = {
            last: (first, count) for (first, last), count in zip(config.vision_layer_groups, config.schedule["vision"])
        }
        self.llm_groups = {
            last: (first, count) for (first, last), count in zip(config.llm_layer_groups, config.schedule["llm"])
        }
        self.lower: list[torch.Tensor] = []  # the current group's lower-layer attention (this call's)
        self.relevance = self.selected = None

    @staticmethod
    def _group_of(groups: dict, layer_idx: int):
        for last, (first, count) in groups.items():
            if first <= layer_idx <= last:
                return last, count
        return None, None

    # --- stage 1 ------------------------------------------------------------------------------------------------
    def vision_request(self, layer_idx, images, tokens):
        last, _ = self._group_of(self.vision_groups, layer_idx)
        if last is None:
            return None
        if layer_idx < last:  # rollout needs every row of the lower layers
            return RowRequest()
        device = self.context.images_per_sample.device
        every = torch.arange(tokens, device=device)
        return RowRequest(rows=torch.zeros(1, dtype=torch.long, device=device), value_columns=every)

    def after_vision_layer(self, layer_idx, hidden_states, request):
        last, count = self._group_of(self.vision_groups, layer_idx)
        if last is None:
            return None
        if layer_idx < last:
            self.lower.append(request.probabilities)
            return None
        with torch.no_grad(), record_function("ivtp/vision_scoring"):  # profiler label only
            rollout = rollout_cls_row(request.probabilities[:, 0], self.lower, cls_index=0)  # eq. 3
            scores = token_scores(rollout[:, 1:], request.value_norms[:, 1:])  # eq. 4, CLS excluded
            self.lower = []
            return Selection(select_keep_indices(scores, count))

    # --- stage 2 ------------------------------------------------------------------------------------------------
    def llm_prune_layers(self):
        return sorted(self.llm_groups)

    def llm_budget(self, layer_idx):
        return self.llm_groups[layer_idx][1]

    def llm_probe(self, tokens):
        with record_function("ivtp/guidance"):
            self.relevance, self.selected = instruction_relevance(self.config, self.context, tokens.hidden_states)
        with record_function("ivtp/pseudo_cls"):
            fallback = sample_visual_cls(self.context.visual_cls, self.context.images_per_sample)
            return pseudo_cls(tokens.hidden_states, self.selected, fallback=fallback), self.context.image_end_position

    def llm_request(self, layer_idx, view: LlmView):
        last, _ = self._group_of(self.llm_groups, layer_idx)
        if last is None:
            return None
        # Rows and columns: the visual tokens, then the pseudo-CLS (its rule and causality are the layer's mask).
        probe = torch.full_like(view.visual_slots[:, :1], view.probe_slot)
        block = torch.cat([view.visual_slots, probe], dim=1)
        if layer_idx < last:
            return RowRequest(batch=view.image_rows, rows=block, columns=block)
        return RowRequest(batch=view.image_rows, rows=probe, columns=block, value_columns=view.visual_slots)

    def after_llm_layer(self, layer_idx, view, request):
        last, count = self._group_of(self.llm_groups, layer_idx)
        if last is None:
            return None
        if layer_idx < last:
            self.lower.append(request.probabilities)
            return None
        with torch.no_grad(), record_function("ivtp/llm_scoring"):
            top_row = request.probabilities[:, 0]
            rollout = rollout_cls_row(top_row, self.lower, cls_index=top_row.shape[-1] - 1)
            scores = token_scores(rollout[:, :-1], request.value_norms)  # eq. 4 over the visual tokens
            self.lower = []
            return Selection(select_keep_indices(scores, count))

    def outputs(self):
        return {"instruction_relevance": (self.relevance, float("nan")), "pseudo_cls_tokens": (self.selected, False)}


def instruction_relevance(config, context: PruneContext, embeddings: torch.Tensor):
    """Relevance of each kept token and the tokens eq. 8 averages, by `config.guidance` (paper Table 6).

    `embeddings` `(batch, kept)` are the tokens entering the LLM; `context.packed_guidance` their guidance inputs.
    Returns `(relevance, selected)`, `(batch, kept)` each, or `(None, None)` when the pseudo-CLS is the visual CLS
    (mode `"visual_cls"`, or the mode's inputs are missing: warned once, naming them).
    """
    model, guidance, mode = context.model, context.packed_guidance, config.guidance
    if mode == "visual_cls":
        return None, None
    needed = {
        "instruction_mean": ["instruction_mask"],
        "embedding_relevance": ["instruction_mask"],
        "clip_relevance": ["instruction_mask", "clip_input_ids", "clip_token_spans"],
    }[mode]
    missing = [name for name in needed if guidance[name] is None]
    if mode == "clip_relevance" and getattr(model, "clip_text_model", None) is None:
        missing.append("config.clip_text_encoder (the CLIP text tower)")
    if missing:
        logger.warning_once(
            f"IVTP guidance {mode!r} needs {missing}, which were not given; stage 2 prunes with the visual CLS as "
            "the pseudo-CLS. Use LlavaIvtpProcessor to get the guidance inputs."
        )
        return None, None
    instruction = guidance["instruction_mask"]
    if mode == "instruction_mean":
        return None, instruction
    images_per_sample = context.images_per_sample
    if mode == "embedding_relevance":
        relevance = cosine_relevance(embeddings, sample_visual_cls(context.visual_cls, images_per_sample))
        relevance = torch.where(instruction, relevance, torch.full_like(relevance, float("nan")))
        return relevance, instruction & (relevance >= config.tau)
    with torch.no_grad():
        with record_function("ivtp/guidance/clip_image_embedding"):
            image_embedding = model.clip_visual_projection(
                final_clip_cls(model, context.vision["feature_layer_hidden_states"])
            )
        clip_input_ids = guidance["clip_input_ids"].to(image_embedding.device)
        with record_function("ivtp/guidance/clip_text_tower"):
            text_features = clip_token_features(model.clip_text_model, clip_input_ids)
        reference = sample_visual_cls(image_embedding, images_per_sample.to(image_embedding.device))
        clip_relevance = cosine_relevance(text_features, reference.to(text_features.dtype))  # eq. 6
        relevance, has_relevance = span_mean(  # eq. 7
            clip_relevance, clip_content_mask(clip_input_ids), guidance["clip_token_spans"].to(clip_relevance.device)
        )
    relevance, has_relevance = relevance.to(instruction.device), has_relevance.to(instruction.device)
    has_relevance = has_relevance & instruction
    relevance = torch.where(has_relevance, relevance, torch.full_like(relevance, float("nan")))
    return relevance, has_relevance & (relevance >= config.tau)


def sample_visual_cls(visual_cls: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
    """The projected visual CLS of each sample's (only) image; zeros for samples without an image."""
    has_image = images_per_sample > 0
    first_image = (torch.cumsum(images_per_sample, dim=0) - images_per_sample).clamp_max(visual_cls.shape[0] - 1)
    picked = visual_cls[first_image.to(visual_cls.device)]
    return picked * has_image.to(picked.device, picked.dtype).unsqueeze(-1)


def final_clip_cls(model, feature_layer_hidden_states: torch.Tensor) -> torch.Tensor:
    """The vision tower's final CLS (after its last layer and `post_layernorm`) from the feature layer's output
    `(images, 1 + kept, hidden)`: the layers after the feature layer run on the kept tokens, the last one for its CLS
    query only (every key and value, one output row) -- never a second vision pass. Returns `(images, hidden)`."""
    vision_tower = model.model.vision_tower
    layers = vision_tower.encoder.layers
    first_unrun = model.config.vision_layer_groups[-1][1] + 1
    hidden_states = feature_layer_hidden_states
    for layer in layers[first_unrun:-1]:
        hidden_states = layer(hidden_states, None)
    if first_unrun < len(layers):
        hidden_states = _clip_layer_cls_row(layers[-1], hidden_states)
    return vision_tower.post_layernorm(hidden_states[:, 0])


def _clip_layer_cls_row(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """`CLIPEncoderLayer.forward` for the CLS query only: `(images, 1, hidden)`. Only the final CLS of the tower is
    needed here (CLIP's image embedding, eq. 6), and a stock layer call computes every row; the layer's submodules
    are called (`layer_norm1`, `q_proj`, `k_proj`, `v_proj`, `out_proj`, `layer_norm2`, `mlp`)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)

    def heads(states):
        return states.view(states.shape[0], states.shape[1], -1, attention.head_dim).transpose(1, 2)

    queries = heads(attention.q_proj(normed[:, :1]))
    attended = F.scaled_dot_product_attention(
        queries, heads(attention.k_proj(normed)), heads(attention.v_proj(normed)), scale=attention.scale
    )
    attended = attended.transpose(1, 2).reshape(hidden_states.shape[0], 1, -1)
    cls_state = hidden_states[:, :1] + attention.out_proj(attended)
    return cls_state + layer.mlp(layer.layer_norm2(cls_state))


__all__ = ["IvtpPruner", "final_clip_cls", "instruction_relevance", "sample_visual_cls"]
