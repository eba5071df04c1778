"""EViT baseline: keep the attentive patches, fuse the inattentive ones into one token.

Source: Liang, Ge, Tong, Song, Wang, Xie, "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", ICLR 2022, arXiv:2202.07800, sec. 3 (attentive token identification, inattentive token
fusion); used as a baseline in the IVTP paper, sec. 4.1, Tables 1-2.
Rule: `a_i` = the CLS row of the layer's attention, averaged over heads, at patch `i`. The patches with the highest
`a_i` are kept; the rest `N` are fused into `x_fused = sum_{i in N} a_i x_i / sum_{i in N} a_i`.

Conventions (the paper leaves them open or differs):
- Budget: asked for `k` tokens, it returns exactly `k`: the `k - 1` most attended patches plus the fused token, so
  a baseline at 64 tokens feeds the LLM 64 tokens like every other method (EViT proper keeps `ceil(rate * n)`
  patches and appends the fused one). The kept positions are therefore the plain top-`k` by `a_i`.
- The fused token takes the position of the most attended inattentive patch (the `k`-th ranked), so it has a real
  grid position; ties go to the lower index, as in `select_keep_indices`.
- The fused token is EViT's released one (`youweiliang/evit`, `evit.py`, `EViTBlock.forward`): the attention-
  weighted *sum* `sum_{i in N} a_i x_i`, not divided by `sum a_i` (the paper's formula above is the normalised
  form). Option `fused="mean"` (ours, not EViT's) divides by `sum a_i`: a weighted average with the norm of a
  patch; an all-zero weight sum then falls back to the plain mean.

Integration: a vision-layer site, between attention and MLP as in EViT. Inputs are the patch features (CLS kept
apart by the caller) and the layer's head-averaged CLS attention row over the patches (`attn[:, :, 0, 1:].mean(1)`).
"""

from __future__ import annotations

import torch
from .attention_rows import moved
from .pruner_base import Selection, VisionLayerPruner, at_group_ends, budget_schedule, check_choice, register_pruner


# The fused token: EViT's released code ("sum", the default) or our normalised variant ("mean").
FUSED_TOKENS = ("sum", "mean")


def evit_keep_and_fuse(
    features: torch.Tensor, cls_attention: torch.Tensor, num_keep: int, normalize: bool = False,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`(num_keep - 1)` patches by CLS attention plus one fused token of the rest.

    Args:
        features: `(batch, n, dim)`, the patch tokens.
        cls_attention: `(batch, n)`, non-negative head-averaged CLS attention over the same patches.
        num_keep: `1 <= num_keep <= n`, tokens returned in total (fused one included).
        normalize: divide the fused sum by the inattentive tokens' attention mass (our `fused="mean"`); EViT's code
            does not (the default).
        valid: optional bool `(batch, n)`: the tokens that may be kept or fused (LLaVA-NeXT: a tile's patches on the
            letterbox padding may not); the others rank last and take no part in the fused token.

    Returns:
        `(keep_indices, merged_features, fused_index)`: `(batch, num_keep)` int64 sorted ascending;
        `(batch, num_keep, dim)` in `features`' dtype, row `i` at `keep_indices[:, i]`, the kept patches as they are
        and the fused token at `fused_index`; `(batch,)` int64, the position the fused token takes (-1 when every
        patch is kept: there is nothing to fuse, as in EViT's code).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, n, dim), got shape {tuple(features.shape)}.")
    if tuple(cls_attention.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"cls_attention must be (batch, n) = {tuple(features.shape[:2])}, got {tuple(cls_attention.shape)}."
        )
    num_tokens = features.shape[1]
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}.")
    if num_keep == num_tokens:  # every patch kept: nothing to fuse (EViT keeps the tokens as they are)
        return torch.arange(num_tokens, device=features.device).expand(features.shape[0], -1), features, \
            torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
    scores = moved(cls_attention, dtype=torch.float32)
    ranked = scores if valid is None else scores.masked_fill(~moved(valid, scores.device), float("-inf"))
    # Stable descending sort, as in `select_keep_indices`: ties go to the lower index.
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    fused_index = order[:, num_keep - 1]
    keep_indices = order[:, :num_keep].sort(dim=-1).values
    if valid is not None:
        scores = scores.masked_fill(~moved(valid, scores.device), 0.0)
    weights = scores.scatter(1, order[:, : num_keep - 1], 0.0)  # the inattentive tokens' scores, zeros elsewhere
    if normalize:
        inattentive = torch.ones_like(scores, dtype=torch.bool).scatter(1, order[:, : num_keep - 1], False)
        if valid is not None:
            inattentive &= moved(valid, inattentive.device)
        total = weights.sum(dim=-1, keepdim=True)
        uniform = moved(inattentive, dtype=torch.float32) / inattentive.sum(dim=-1, keepdim=True).clamp_min(1)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)
    fused = moved(torch.einsum("bn,bnd->bd", weights, moved(features, dtype=torch.float32)), dtype=features.dtype)
    kept = features.gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    is_fused = (keep_indices == fused_index[:, None]).unsqueeze(-1)
    if valid is not None:  # every valid token among the attentive ones: nothing to fuse, the last slot as it is
        left = moved(valid, order.device).scatter(1, order[:, : num_keep - 1], False).any(dim=-1)
        is_fused = is_fused & left.view(-1, 1, 1)
    return keep_indices, torch.where(is_fused, fused[:, None], kept), fused_index


@register_pruner
class EvitPruner(VisionLayerPruner):
    """EViT in the vision tower: after the last layer of each group of `config.group_size` layers, the patches the
    CLS attends to most in that layer, plus one token fusing the rest (counts geometric to the budget, IVTP's
    stage-1 spending). After the layer, not between its attention and MLP as in EViT: layers run unchanged.

    Options: `fused` -- `"sum"` (default, EViT's code: `sum a_i x_i`) or `"mean"` (ours: divided by `sum a_i`)."""

    name = "evit"
    options = {"visual_tokens": 64, "fused": "sum"}
    variable_lengths = True  # LLaVA-NeXT: each crop in the tower (`docs/llava-next.md`)

    def vision_counts(self):
        counts = budget_schedule(self.config, self.budget, llm=False)["vision"]
        return at_group_ends(self.config.vision_layer_groups, counts)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_choice(cls.name, "fused", values["fused"], FUSED_TOKENS,
                     "the fused token: EViT's attention-weighted sum, or our weighted average")

    def select(self, hidden_states, request, num_keep):
        valid = self.context.vision_valid if self.context is not None else None  # LLaVA-NeXT: a tile's padding
        keep, merged, _ = evit_keep_and_fuse(
            hidden_states[:, 1:], request.probabilities[:, 0, 1:], num_keep, normalize=self.values["fused"] == "mean",
            valid=valid,
        )
        return Selection(keep, merged)
