"""TopK baseline: keep the patches whose features are most similar to the CLS feature.

Source: the IVTP paper (Huang et al., "IVTP: Instruction-guided Visual Token Pruning for Large Vision-Language
Models"), sec. 4.1 "Comparison Details", Tables 1-3, 7, 9: "topK based on patch token similarity with the CLS token".
Rule: `score_i = cos(x_i, x_cls)` over the patch features `x_i` of one layer; keep the `k` highest scores.

Integration: a vision-layer site. Inputs are the layer's hidden states split into the CLS feature (index 0, kept apart
by the caller) and the patch features; no attention rows are needed. The paper's Table 9 gives TopK a ViT cost of
0.190 vs 0.361 TFLOPs, so it pruned inside the ViT, not only at LLaVA's feature layer (`vision_feature_layer=-2`);
the function is layer-agnostic. TopK+ (Table 7) reapplies the same rule in the LLM.
"""

from __future__ import annotations

import torch

from .attention_rows import moved
from .pruning_ivtp import cosine_relevance
from .pruner_base import (
    Pruner,
    Selection,
    VisionLayerPruner,
    at_group_ends,
    budget_schedule,
    register_pruner,
    select_keep_indices,
    select_keep_indices_per_row,
)


def topk_cls_similarity(patch_features: torch.Tensor, cls_feature: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch feature with its image's CLS feature, in float32.

    Args:
        patch_features: `(batch, n, dim)`, the patch tokens (CLS excluded).
        cls_feature: `(batch, dim)`, the CLS token of the same layer.

    Returns:
        `(batch, n)` float32 scores in `[-1, 1]`.
    """
    if patch_features.dim() != 3:
        raise ValueError(f"patch_features must be (batch, n, dim), got shape {tuple(patch_features.shape)}.")
    expected = (patch_features.shape[0], patch_features.shape[2])
    if tuple(cls_feature.shape) != expected:
        raise ValueError(f"cls_feature must be (batch, dim) = {expected}, got shape {tuple(cls_feature.shape)}.")
    return cosine_relevance(patch_features, cls_feature)


def topk_keep_indices(patch_features: torch.Tensor, cls_feature: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` patches most similar to the CLS feature, sorted ascending.

    Args:
        patch_features: `(batch, n, dim)`.
        cls_feature: `(batch, dim)`.
        num_keep: `1 <= num_keep <= n`.

    Returns:
        `(batch, num_keep)` int64, sorted, unique, in `[0, n)`; equal scores go to the lower index.
    """
    return select_keep_indices(topk_cls_similarity(patch_features, cls_feature), num_keep)


@register_pruner
class TopKPruner(VisionLayerPruner):
    """TopK in the vision tower: the patches most similar to the layer's CLS. `site="groups"` (default): after the last
    layer of each group of `config.group_size` layers, counts geometric from every patch to the budget (IVTP's
    stage-1 spending; the paper's Table 9 gives TopK a ViT cost below stock's, so it pruned inside the tower);
    `site="feature_layer"`: once, after the layer LLaVA reads its features from."""

    name = "topk"
    options = {"visual_tokens": 64, "site": "groups"}
    asks_cls_row = False  # similarity to the CLS feature, not attention
    variable_lengths = True  # LLaVA-NeXT: each crop in the tower (`docs/llava-next.md`)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        if values["site"] not in ("groups", "feature_layer"):
            raise ValueError(
                "`pruning_options['site']` of pruning_method='topk' must be 'groups' or 'feature_layer', got "
                f"{values['site']!r}."
            )

    def vision_counts(self):
        if self.values["site"] == "feature_layer":
            return super().vision_counts()
        counts = budget_schedule(self.config, self.budget, llm=False)["vision"]
        return at_group_ends(self.config.vision_layer_groups, counts)

    def select(self, hidden_states, request, num_keep):
        return select_keep_indices(self.shown_first(topk_cls_similarity(hidden_states[:, 1:], hidden_states[:, 0])), num_keep)


@register_pruner
class TopKPlusPruner(Pruner):
    """TopK+ (paper Table 7): TopK in the vision tower, then in the first LLM groups the visual tokens most similar
    to a probe -- the projected visual CLS, carried through the layers as IVTP's pseudo-CLS is (so the rule is
    TopK's, extended into the LLM). Budget split as the 7B preset's (`budget_schedule`)."""

    name = "topk_plus"
    options = {"visual_tokens": 64}
    variable_lengths = True  # LLaVA-NeXT: each crop in the tower, each image in the LLM (`docs/llava-next.md`)

    def __init__(self, config, context):
        super().__init__(config, context)
        schedule = budget_schedule(config, self.budget)
        self.vision = at_group_ends(config.vision_layer_groups, schedule["vision"])
        self.llm = at_group_ends(config.llm_groups(len(schedule["llm"])), schedule["llm"])

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if layer_idx not in self.vision:
            return None
        scores = self.shown_first(topk_cls_similarity(hidden_states[:, 1:], hidden_states[:, 0]))
        return Selection(select_keep_indices(scores, self.vision[layer_idx]))

    def llm_prune_layers(self):
        return sorted(self.llm)

    def llm_budget(self, layer_idx):
        return self.held_counts(self.llm[layer_idx])

    def llm_probe(self, tokens):
        context = self.context
        return context.per_sample(context.visual_cls), context.image_end_position

    def after_llm_layer(self, layer_idx, view, request, hidden_states):
        if layer_idx not in self.llm:
            return None
        if view.visual_range is not None:  # one layout (host): every sample's image at one slot range
            visual, probe = hidden_states[:, view.visual_range], hidden_states[:, view.probe_slot]
        else:
            rows = moved(view.image_rows, hidden_states.device)
            visual = hidden_states[rows.unsqueeze(-1), moved(view.visual_slots, hidden_states.device)]
            probe = hidden_states[rows, view.probe_slot]
        counts = self.llm_budget(layer_idx)
        if isinstance(counts, int):
            return Selection(topk_keep_indices(visual, probe, counts))
        scores = topk_cls_similarity(visual, probe)  # images holding different counts (LLaVA-NeXT)
        valid = view.visual_valid
        if valid is not None:
            scores = scores.masked_fill(~moved(valid, scores.device), float("-inf"))
        return Selection(select_keep_indices_per_row(scores, counts))
