"""VisPruner's important + diverse token selection, on plain tensors.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025, arXiv 2412.01818; method section, important tokens then diverse tokens; rule as in the
authors' code (Theia-4869/VisPruner, `llava/model/llava_arch.py`, `encode_images`):

1. Important: the `num_important` patches with the largest CLS attention (head-averaged) at the feature layer.
2. Diverse: the other patches, ranked by decreasing CLS attention, lose near-duplicates round by round until
   `num_diverse` are left. Each round splits the ranked list into even and odd positions, scores every even-position
   token by its largest cosine similarity to an odd-position one (features L2-normalised), and removes the
   `min(max_removed_per_round, left - num_diverse)` highest-scoring ones. The list for the next round is the
   surviving even-position tokens (by decreasing score) followed by the odd-position ones (their order unchanged).

Default for 64 tokens on LLaVA-1.5: `num_important=48, num_diverse=16` (important ratio 0.75, the README's 64-token
example), `max_removed_per_round=8`. The code's `--important_ratio` flag defaults to 0.5 (32 + 32).

Integration (site: vision tower, at `vision_feature_layer` = -2, before the projector): that layer's patch features
(CLS dropped, as LLaVA's "default" strategy) and its CLS attention row over the patches, head-averaged.
Our conventions: stable sorts throughout, so equal scores rank the lower index (earlier list position) first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .attention_rows import RowRequest
from .pruner_base import Pruner, Selection, check_int, register_pruner


def vispruner_keep_indices(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    num_important: int,
    num_diverse: int,
    max_removed_per_round: int = 8,
) -> torch.Tensor:
    """Indices of the important and diverse tokens kept by VisPruner.

    Args:
        features: `(batch, n, dim)`, the feature layer's patch features.
        cls_attention: `(batch, n)`, the CLS row of that layer's attention over the patches, head-averaged.
        num_important: `>= 0`; num_diverse: `>= 0`; their sum must be in `[1, n]`.
        max_removed_per_round: `>= 1`, near-duplicates removed per round (official: 8).

    Returns:
        `(batch, num_important + num_diverse)` int64, sorted ascending.
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (batch, n, dim), got {tuple(features.shape)}.")
    batch, num_tokens, _ = features.shape
    if cls_attention.shape != (batch, num_tokens):
        raise ValueError(f"cls_attention must have shape {(batch, num_tokens)}, got {tuple(cls_attention.shape)}.")
    if num_important < 0 or num_diverse < 0 or not 1 <= num_important + num_diverse <= num_tokens:
        raise ValueError(
            f"num_important and num_diverse must be >= 0 with a sum in [1, {num_tokens}], "
            f"got {num_important} and {num_diverse}."
        )
    if max_removed_per_round < 1:
        raise ValueError(f"max_removed_per_round must be >= 1, got {max_removed_per_round}.")

    ranked = torch.sort(cls_attention.float(), dim=-1, descending=True, stable=True).indices
    important, residual = ranked[:, :num_important], ranked[:, num_important:]  # residual: decreasing attention
    normalized = F.normalize(features.float(), dim=-1)
    similarity = normalized @ normalized.transpose(1, 2)  # (batch, n, n), once: the rounds only index it
    rows = torch.arange(features.shape[0], device=features.device)[:, None, None]
    while num_diverse > 0 and residual.shape[1] > num_diverse:
        num_removed = min(max_removed_per_round, residual.shape[1] - num_diverse)
        even, odd = residual[:, 0::2], residual[:, 1::2]
        duplication = similarity[rows, even[:, :, None], odd[:, None, :]].max(dim=-1).values  # (batch, ceil(R / 2))
        order = torch.sort(duplication, dim=-1, descending=True, stable=True).indices[:, num_removed:]
        residual = torch.cat([even.gather(1, order), odd], dim=1)
    keep_indices = torch.cat([important, residual[:, :num_diverse]], dim=1)
    return keep_indices.sort(dim=1).values


@register_pruner
class VisPrunerPruner(Pruner):
    """VisPruner at LLaVA's feature layer: the important patches by that layer's CLS attention, then diverse ones
    among the rest. The paper's 64-token split is 48 important + 16 diverse (`important` overrides the 3:1
    ratio for other budgets)."""

    name = "vispruner"
    options = {"visual_tokens": 64, "important": None}

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        if values["important"] is not None:
            check_int(cls.name, "important", values["important"], 0, values["visual_tokens"],
                      "important tokens, the rest of the budget being diverse")

    def __init__(self, config, context):
        super().__init__(config, context)
        important = self.values["important"]
        self.important = round(self.budget * 48 / 64) if important is None else important
        self.layer = config.vision_layer_groups[-1][1]

    def vision_request(self, layer_idx, images, tokens):
        return RowRequest(rows=torch.zeros(1, dtype=torch.long)) if layer_idx == self.layer else None

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if layer_idx != self.layer:
            return None
        keep = vispruner_keep_indices(
            hidden_states[:, 1:], request.probabilities[:, 0, 1:], self.important, self.budget - self.important
        )
        return Selection(keep)
