"""VisionZip's dominant + contextual token selection, on plain tensors.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv 2412.04467; method section, "Dominant Token Selection" and "Contextual Tokens Merging"; rule as in
the authors' code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`):

1. Dominant: the tokens with the largest CLS attention (summed over heads; the mean ranks the same) at the feature
   layer. The official code always keeps the CLS token itself and counts it among the dominant tokens.
2. Contextual: the remaining tokens, in original order, give `num_contextual` targets evenly spaced among them
   (every `step = max(1, remaining // num_contextual)`-th, the first `num_contextual`). Every other remaining token
   goes to the target whose key is most cosine-similar (keys of the same layer, averaged over heads). A group's
   feature is `target + mean(assigned tokens)` (just `target` if none), exactly as the official code computes it;
   the paper's text speaks of averaging, which would be `(target + sum) / (1 + count)`.

Default for 64 tokens on LLaVA-1.5: `dominant=54, contextual=10` (README), where 54 = CLS + 53 patches.

Integration (site: vision tower, at `vision_feature_layer` = -2, before the projector): that layer's output
features, its CLS attention row over the tokens (head-averaged), and its key states averaged over heads. Two
conventions are open to the caller: run on all 577 tokens with `cls_index=0` (official: the CLS feature goes to
the projector as one of the 64), or on the 576 patches with `cls_index=None` (LLaVA's "default" strategy drops CLS).
Our convention: a contextual token takes its target's position; rows come back in original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pruning_ivtp import select_keep_indices
from .attention_rows import RowRequest
from .pruner_base import Pruner, Selection, check_int, register_pruner


def visionzip_keep_indices(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    num_dominant: int,
    num_contextual: int,
    cls_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant tokens by CLS attention plus contextual groups merged by key similarity.

    Args:
        features: `(batch, n, dim)`, the feature layer's output.
        cls_attention: `(batch, n)`, the CLS row of that layer's attention (head-averaged or summed).
        keys: `(batch, n, key_dim)`, that layer's key states averaged over heads (the merge metric).
        num_dominant: dominant tokens kept, the CLS token included when `cls_index` is given.
        num_contextual: contextual groups; `num_dominant + num_contextual` must be in `[1, n]`.
        cls_index: a token always kept as dominant (the CLS), or None.

    Returns:
        `(keep_indices, kept_features)`: int64 `(batch, k)` sorted ascending, `k = num_dominant + num_contextual`,
        and `(batch, k, dim)` in `features.dtype`, row i being the token at `keep_indices[:, i]` (dominant:
        unchanged; contextual: its group's merged feature, sitting at the target's position).
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (batch, n, dim), got {tuple(features.shape)}.")
    batch, num_tokens, dim = features.shape
    if cls_attention.shape != (batch, num_tokens) or keys.shape[:2] != (batch, num_tokens) or keys.dim() != 3:
        raise ValueError(
            f"cls_attention must be {(batch, num_tokens)} and keys {(batch, num_tokens)} + (key_dim,), "
            f"got {tuple(cls_attention.shape)} and {tuple(keys.shape)}."
        )
    if num_dominant < 0 or num_contextual < 0 or not 1 <= num_dominant + num_contextual <= num_tokens:
        raise ValueError(
            f"num_dominant and num_contextual must be >= 0 with a sum in [1, {num_tokens}], "
            f"got {num_dominant} and {num_contextual}."
        )
    if cls_index is not None and not (0 <= cls_index < num_tokens and num_dominant >= 1):
        raise ValueError(f"cls_index must be in [0, {num_tokens}) and needs num_dominant >= 1, got {cls_index}.")

    scores = cls_attention.float().clone()
    if cls_index is not None:
        scores[:, cls_index] = float("inf")  # the CLS is always dominant
    dominant = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    if num_dominant > 0:
        dominant.scatter_(1, select_keep_indices(scores, num_dominant), True)
    keep = dominant.clone()
    kept_features = features.float().clone()

    num_remaining = num_tokens - num_dominant
    if num_contextual > 0:
        # Remaining tokens in original order (each row has the same count).
        remaining = mask_to_indices(~dominant, num_remaining)
        step = max(1, num_remaining // num_contextual)
        is_target = torch.zeros(num_remaining, dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, num_remaining, step, device=features.device)[:num_contextual]] = True
        targets, others = remaining[:, is_target], remaining[:, ~is_target]  # (batch, C), (batch, R - C)
        metric = F.normalize(keys.float(), dim=-1)
        similarity = gather_rows(metric, others) @ gather_rows(metric, targets).transpose(1, 2)  # (batch, R - C, C)
        assignment = F.one_hot(similarity.argmax(dim=-1), num_contextual).float()  # ties: the first target
        counts = assignment.sum(dim=1).clamp_min(1).unsqueeze(-1)  # (batch, C, 1)
        merged = (
            gather_rows(kept_features, targets)
            + assignment.transpose(1, 2) @ gather_rows(kept_features, others) / counts
        )
        kept_features = kept_features.scatter(1, targets.unsqueeze(-1).expand(-1, -1, dim), merged)  # autograd-safe
        keep.scatter_(1, targets, True)

    keep_indices = mask_to_indices(keep, num_dominant + num_contextual)
    return keep_indices, gather_rows(kept_features, keep_indices).to(features.dtype)


def mask_to_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the `count` True entries of each row of a bool `(batch, n)` mask."""
    return torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count].sort(dim=1).values


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, index[b, i]]` for `(batch, n, dim)` and `(batch, k)`."""
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


@register_pruner
class VisionZipPruner(Pruner):
    """VisionZip at LLaVA's feature layer: the dominant patches by that layer's CLS attention, plus contextual
    tokens merging the rest by key similarity. The paper's 64-token split for LLaVA-1.5 is 54 dominant + 10
    contextual; other budgets keep that ratio (`dominant` overrides it). The CLS is not among the dominant tokens:
    LLaVA's `default` feature strategy drops it, so the budget counts patches only."""

    name = "visionzip"
    options = {"visual_tokens": 64, "dominant": None}
    positions = "renumbered"  # the authors' code: see `pruner_base.POSITION_RULES`

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        if values["dominant"] is not None:
            check_int(cls.name, "dominant", values["dominant"], 0, values["visual_tokens"],
                      "dominant tokens, the rest of the budget being contextual")

    def __init__(self, config, context):
        super().__init__(config, context)
        dominant = self.values["dominant"]
        self.dominant = round(self.budget * 54 / 64) if dominant is None else dominant
        self.layer = config.vision_layer_groups[-1][1]

    def vision_request(self, layer_idx, images, tokens):
        if layer_idx != self.layer:
            return None
        return RowRequest(rows=torch.zeros(1, dtype=torch.long), key_columns=torch.arange(tokens))

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if layer_idx != self.layer:
            return None
        keep, kept = visionzip_keep_indices(
            hidden_states[:, 1:], request.probabilities[:, 0, 1:], request.key_means[:, 1:], self.dominant,
            self.budget - self.dominant,
        )
        return Selection(keep, kept)
