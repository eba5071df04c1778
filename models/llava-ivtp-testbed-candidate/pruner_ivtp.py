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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .attention_rows import RowRequest, moved
from .guidance_ivtp import clip_content_mask, clip_token_features
from .pruner_base import (
    LlmView,
    PruneContext,
    Pruner,
    Selection,
    check_choice,
    check_int,
    profiler_label,
    register_pruner,
    select_keep_indices,
    select_keep_indices_per_row,
)
from .pruning_ivtp import cosine_relevance, pseudo_cls, rollout_cls_row, span_mean, token_weights


logger = logging.get_logger(__name__)

ATTENTION_MODES = ("rollout", "group", "layer")  # paper Table 4: rollout, group-wise, layer-wise
AGGREGATIONS = ("residual", "mean", "max", "multiply")  # paper Table 5


@register_pruner
class IvtpPruner(Pruner):
    """IVTP's two stages, and the paper's ablations of its scoring as options (`pruning_options`):

    - `attention` (Table 4): `"rollout"` (the method: group-wise attention rollout, eq. 3), `"group"` (the CLS row
      of each group's top layer alone, pruning per group), `"layer"` (the CLS row of the current layer, pruning after
      every layer of a group, the group's reduction spread geometrically over its layers);
    - `aggregation` (Table 5, with `"rollout"`): how a group's layers combine -- `"residual"` (eq. 3), or the
      element-wise `"mean"`, `"max"` or `"multiply"` of the layers' CLS rows;
    - `visual_tokens`: a budget from which the config derives `schedule` (the 7B preset's shape); `None`: the
      schedule as given.

    Every variant weights the scores by the value norms of the scoring layer (eq. 4).
    """

    name = "ivtp"
    options = {"visual_tokens": None, "attention": "rollout", "aggregation": "residual"}
    variable_lengths = True  # LLaVA-NeXT: stage 1 per crop, stage 2 per image (`docs/llava-next.md`)

    @classmethod
    def check_options(cls, config, values):
        if values["visual_tokens"] is not None:
            check_int(cls.name, "visual_tokens", values["visual_tokens"], 1, config.max_visual_tokens,
                      "visual tokens per image that reach the LLM's last layers")
        check_choice(cls.name, "attention", values["attention"], ATTENTION_MODES, "the scoring attention, Table 4")
        check_choice(cls.name, "aggregation", values["aggregation"], AGGREGATIONS, "across a group's layers, Table 5")

    def __init__(self, config, context: PruneContext):
        super().__init__(config, context)
        self.attention, self.aggregation = self.values["attention"], self.values["aggregation"]
        self.vision = self._targets(config.vision_layer_groups, config.schedule["vision"], config.num_patches)
        self.llm = self._targets(config.llm_layer_groups, config.schedule["llm"], None)
        self.gathered: list[torch.Tensor] = []  # the current group's attention so far (this call's)
        self.relevance = self.selected = None
        self.stage_two = None  # the stage-2 requests' indices for the current token set (`llm_request`)

    def _targets(self, groups, counts, start) -> dict[int, tuple[int, int, int | None]]:
        """`{layer: (first layer of its group, last layer of its group, tokens kept after it or None)}` over the
        groups' layers. `"layer"` mode prunes after every layer (`start`: the tokens before the first group, `None`
        for the LLM, whose start is the vision tower's last count)."""
        if start is None:  # the LLM: what an image brings (its crops' last vision count, LLaVA-NeXT's newlines)
            start = self.config.stage_two_bound((self.config.schedule["vision"] or [self.config.num_patches])[-1])
        previous = start
        targets = {}
        for (first, last), count in zip(groups, counts):
            for layer_idx in range(first, last + 1):
                keep = count if layer_idx == last else None
                if self.attention == "layer" and layer_idx < last:
                    step = (layer_idx - first + 1) / (last - first + 1)
                    keep = max(count, round(previous * (count / previous) ** step))
                targets[layer_idx] = (first, last, keep)
            previous = count
        return targets

    def _request(self, targets, layer_idx, block, cls_row, value_columns, batch=None):
        """What a layer of a group is asked: every row of the block (a lower layer of a residual rollout), or the
        CLS row over the block, with the value norms where the layer scores."""
        if layer_idx not in targets:
            return None
        first, last, keep = targets[layer_idx]
        scores_here = keep is not None
        if self.attention == "rollout" and self.aggregation == "residual" and not scores_here:
            return RowRequest(batch=batch, rows=block, columns=block)
        if self.attention == "group" and not scores_here:
            return None
        values = value_columns if scores_here else None
        return RowRequest(batch=batch, rows=cls_row, columns=block, value_columns=values)

    def _select(self, targets, layer_idx, request, cls_index, candidates, valid=None, counts=None, padded=False):
        """After a layer of a group: gather its attention; where it prunes, the kept `candidates` (a slice of the
        block's columns). LLaVA-NeXT: `valid` `(n, block)` bool says which of the block's tokens may be kept (a
        tile's patches on the letterbox padding may not: they rank last) or, with `padded`, which exist (images of
        different lengths: the others are padding entries, whose attention is zeroed, as if absent); `counts` the
        tokens kept per row (host), where rows keep different counts."""
        if layer_idx not in targets or request is None:
            return None
        _, _, keep = targets[layer_idx]
        probabilities = request.probabilities
        if padded:  # padding entries: no attention to or from them
            pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
            probabilities = probabilities * (pair if probabilities.shape[1] > 1 else pair[:, -1:]).to(probabilities.dtype)
        if keep is None:
            self.gathered.append(probabilities if probabilities.shape[1] > 1 else probabilities[:, 0])
            return None
        row = probabilities[:, 0]
        if self.attention == "rollout" and self.aggregation == "residual":
            row = rollout_cls_row(row, self.gathered, cls_index=cls_index)  # eq. 3
        elif self.attention == "rollout":
            rows = torch.stack([*self.gathered, moved(row, dtype=torch.float32)])
            row = {"mean": rows.mean(0), "max": rows.amax(0), "multiply": rows.prod(0)}[self.aggregation]
        self.gathered = []
        scores = token_weights(row[:, candidates], request.value_norms)  # eq. 4
        if valid is not None:
            scores = scores.masked_fill(~valid[:, candidates], float("-inf"))
        if counts is not None:
            return Selection(select_keep_indices_per_row(scores, counts))
        return Selection(select_keep_indices(scores, keep))

    # --- stage 1 ------------------------------------------------------------------------------------------------
    def vision_request(self, layer_idx, images, tokens):
        # The CLS row; value norms of the patches (the CLS is never pruned).
        return self._request(self.vision, layer_idx, None, slice(0, 1), slice(1, None))

    def after_vision_layer(self, layer_idx, hidden_states, request):
        valid = self.context.vision_valid if self.context is not None else None  # LLaVA-NeXT: a tile's padding
        if valid is not None:  # the CLS first
            valid = torch.cat([valid.new_ones(valid.shape[0], 1), moved(valid, hidden_states.device)], dim=1)
        with torch.no_grad(), profiler_label("ivtp/vision_scoring/rollout"):  # profiler label only
            selection = self._select(self.vision, layer_idx, request, 0, slice(1, None), valid)  # CLS excluded
        return selection

    # --- stage 2 ------------------------------------------------------------------------------------------------
    def llm_prune_layers(self):
        return sorted(layer for layer, (_, _, keep) in self.llm.items() if keep is not None)

    def llm_budget(self, layer_idx):
        return self.held_counts(self.llm[layer_idx][2])

    def llm_probe(self, tokens):
        with profiler_label("ivtp/probe/guidance"):
            self.relevance, self.selected = instruction_relevance(self.config, self.context, tokens.hidden_states)
        with profiler_label("ivtp/probe/pseudo_cls"):
            fallback = self.context.per_sample(self.context.visual_cls)
            return pseudo_cls(tokens.hidden_states, self.selected, fallback=fallback), self.context.image_end_position

    def llm_request(self, layer_idx, view: LlmView):
        if layer_idx not in self.llm:
            return None
        if self.stage_two is None or self.stage_two.view is not view:  # once per token set: its layers share it
            self.stage_two = _stage_two_index(view)
        index = self.stage_two
        request = self._request(self.llm, layer_idx, index.block, index.probe_row, index.visual, batch=view.batch)
        if request is not None:
            request.keys, request.column_places, request.shared = index.keys, index.places, index.shared
        return request

    def after_llm_layer(self, layer_idx, view, request, hidden_states):
        valid = view.visual_valid  # images holding different counts (LLaVA-NeXT); the probe, last, exists
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        budget = self.llm_budget(layer_idx) if self.llm.get(layer_idx, (0, 0, None))[2] is not None else None
        counts = budget if isinstance(budget, tuple) else None
        with torch.no_grad(), profiler_label("ivtp/llm_scoring/rollout"):
            return self._select(self.llm, layer_idx, request, view.tokens.visual, slice(None, -1), valid, counts,
                                padded=valid is not None)

    def outputs(self):
        return {"instruction_relevance": (self.relevance, float("nan")), "pseudo_cls_tokens": (self.selected, False)}


@dataclass
class _StageTwoIndex:
    """What stage 2 asks of every scored layer of one token set: the rows and columns (the visual tokens, then the
    pseudo-CLS, whose rule and causality are the layer's mask), the probe's row, the visual tokens' slots, and the
    keys the rows can see -- nothing past their image, and the probe -- with the columns' places among them (the
    visual slots keep theirs; the probe's comes right after the image's range). `shared`: what the layers compute
    once for all (`RowRequest.shared`)."""

    view: LlmView
    block: torch.Tensor
    probe_row: slice
    visual: torch.Tensor | slice
    keys: torch.Tensor | tuple
    places: torch.Tensor
    shared: dict = field(default_factory=dict)


def _stage_two_index(view: LlmView) -> _StageTwoIndex:
    keys = view.image_keys()
    probe_row, image_end = slice(view.probe_slot, view.probe_slot + 1), keys[0].stop
    visual = view.visual_range
    if visual is not None:  # one layout: 1-D indices (each pick one `index_select`)
        device = view.image_rows.device
        block = torch.arange(visual.start, visual.stop + 1, device=device)
        block[-1] = view.probe_slot
        keys = torch.arange(image_end + 1, device=device)
        keys[-1] = view.probe_slot
        places = torch.arange(visual.start, visual.stop + 1, device=device)
        places[-1] = image_end
    else:
        visual = view.visual_slots
        probe = torch.full_like(visual[:, :1], view.probe_slot)
        block = torch.cat([visual, probe], dim=1)
        places = torch.cat([visual, torch.full_like(probe, image_end)], dim=1)
    return _StageTwoIndex(view, block, probe_row, visual, keys, places)


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
    if mode == "embedding_relevance":
        relevance = cosine_relevance(embeddings, context.per_sample(context.visual_cls))
        relevance = torch.where(instruction, relevance, torch.full_like(relevance, float("nan")))
        return relevance, instruction & (relevance >= config.tau)
    with torch.no_grad():
        with profiler_label("ivtp/probe/clip_image_embedding"):
            image_embedding = model.clip_visual_projection(
                final_clip_cls(model, context.vision["feature_layer_hidden_states"])
            )
        clip_input_ids = context.clip_input_ids(image_embedding.device)
        with profiler_label("ivtp/probe/clip_text_tower"):
            text_features = clip_token_features(model.clip_text_model, clip_input_ids)
        reference = context.per_sample(image_embedding)
        clip_relevance = cosine_relevance(text_features, moved(reference, dtype=text_features.dtype))  # eq. 6
        relevance, has_relevance = span_mean(  # eq. 7
            clip_relevance, clip_content_mask(clip_input_ids), moved(guidance["clip_token_spans"], clip_relevance.device)
        )
    relevance, has_relevance = moved(relevance, instruction.device), moved(has_relevance, instruction.device)
    has_relevance = has_relevance & instruction
    relevance = torch.where(has_relevance, relevance, torch.full_like(relevance, float("nan")))
    return relevance, has_relevance & (relevance >= config.tau)


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


__all__ = ["IvtpPruner", "final_clip_cls", "instruction_relevance"]
