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
example), `max_removed_per_round=8`. The code's `--important_ratio` flag defaults to 0.5 (32 + 32). Other budgets:
`num_important = int(0.75 * budget)` (the code's `int(visual_token_num * important_ratio)`).

Where the released code leaves its rule: a round removes `r = min(8, R - num_diverse)` of `R` residual tokens, but
only among the `ceil(R / 2)` even-position ones, and the code indexes them as `R // 2 - r` rows: with few diverse
tokens the last rounds ask for more than there are (`expand(-1, R // 2 - r)` below -1 raises: 16 tokens at the 0.75
ratio, 12 + 4), and an odd `R` (an odd important count, e.g. 20 tokens: 15 + 5) mismatches the rows (it raises, or
at 0 rows drops one token more than asked). There the authors' code gives no answer of its rule; ours removes at most
the even-position tokens of a round (every one of them, the odd ones going on), which continues the same rule, and
says so once in a warning (`released_code_fails`).

Integration (site: vision tower, at `vision_feature_layer` = -2, before the projector): that layer's patch features
(CLS dropped, as LLaVA's "default" strategy) and its CLS attention row over the patches, head-averaged.
Our conventions: stable sorts throughout, so equal scores rank the lower index (earlier list position) first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .attention_rows import moved
from .pruner_base import VisionLayerPruner, check_int, crop_budget, register_pruner


logger = logging.get_logger(__name__)

# The README's 64-token example of the authors' code: 48 important + 16 diverse.
IMPORTANT_RATIO = 0.75


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

    ranked = torch.sort(moved(cls_attention, dtype=torch.float32), dim=-1, descending=True, stable=True).indices
    important, residual = ranked[:, :num_important], ranked[:, num_important:]  # residual: decreasing attention
    normalized = F.normalize(moved(features, dtype=torch.float32), dim=-1)
    similarity = normalized @ normalized.transpose(1, 2)  # (batch, n, n), once: the rounds only index it
    rows = torch.arange(features.shape[0], device=features.device)[:, None, None]
    while num_diverse > 0 and residual.shape[1] > num_diverse:
        even, odd = residual[:, 0::2], residual[:, 1::2]
        # at most the even-position tokens: where the released code fails (`released_code_fails`)
        num_removed = min(max_removed_per_round, residual.shape[1] - num_diverse, even.shape[1])
        duplication = similarity[rows, even[:, :, None], odd[:, None, :]].max(dim=-1).values  # (batch, ceil(R / 2))
        order = torch.sort(duplication, dim=-1, descending=True, stable=True).indices[:, num_removed:]
        residual = torch.cat([even.gather(1, order), odd], dim=1)
    keep_indices = torch.cat([important, residual[:, :num_diverse]], dim=1)
    return keep_indices.sort(dim=1).values


def released_code_fails(num_tokens: int, num_important: int, num_diverse: int, max_removed_per_round: int = 8) -> bool:
    """Whether VisPruner's released loop leaves the rule for these counts (it depends on the counts only). A round
    asks for `r` of the `ceil(R / 2)` even-position tokens and indexes them with `R // 2 - r` rows: below -1 the
    `expand` raises; with an odd `R` the rows mismatch the `ceil(R / 2) - r` survivors and raise, except at 1 (which
    broadcasts, correctly) and at 0 (which broadcasts to nothing: every even-position token goes, one more than asked,
    and the image can end with fewer tokens than the budget). At -1 every even-position token goes, as here."""
    residual = num_tokens - num_important
    while num_diverse > 0:
        removed = min(max_removed_per_round, residual - num_diverse)
        if removed <= 0:
            return False
        rows = residual // 2 - removed
        if rows < -1 or (residual % 2 and rows not in (1, -1)):
            return True
        residual -= min(removed, (residual + 1) // 2)
    return False


@register_pruner
class VisPrunerPruner(VisionLayerPruner):
    """VisPruner at LLaVA's feature layer: the important patches by that layer's CLS attention, then diverse ones
    among the rest. The paper's 64-token split is 48 important + 16 diverse; other budgets keep
    `int(0.75 * budget)` important ones (`important` overrides the count)."""

    name = "vispruner"
    options = {"visual_tokens": 64, "important": None}
    positions = "renumbered"  # the authors' code: see `pruner_base.POSITION_RULES`
    variable_lengths = True  # LLaVA-NeXT: each crop alone, the code's layout (`pack_crops`)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        if values["important"] is not None:
            check_int(cls.name, "important", values["important"], 0, crop_budget(config, values["visual_tokens"]),
                      "important tokens of a crop, the rest of its budget being diverse")

    def __init__(self, config, context):
        super().__init__(config, context)
        important, budget = self.values["important"], self.crop_budget  # per crop on LLaVA-NeXT
        self.important = int(budget * IMPORTANT_RATIO) if important is None else important
        if released_code_fails(config.num_patches, self.important, budget - self.important):
            logger.warning_once(
                f"VisPruner's released code leaves its rule for {self.important} important + "
                f"{budget - self.important} diverse of {config.num_patches} tokens (it stops with an error, or "
                "drops a token more than asked, where a round asks for more even-position tokens than there are or "
                "an odd count is left); llava-ivtp continues the rule, removing at most a round's even-position "
                "tokens (pruner_vispruner.py)."
            )

    def select(self, hidden_states, request, num_keep):
        cls_attention = request.probabilities[:, 0, 1:]
        return vispruner_keep_indices(hidden_states[:, 1:], cls_attention, self.important, num_keep - self.important)

    def pack_crops(self, layout, crop_features, patch_ids, newline, newlines, image=0, crop_hidden_states=None):
        """LLaVA-NeXT as VisPruner's code lays an image out (`llava_arch.py`: `_unpad` stripped from the merge type,
        so the plain "spatial" branch runs): the base crop's kept patches in order, then every tile's kept patches in
        raster order over the stitched grid of tiles; no unpadding (a patch on the letterbox padding may be kept), no
        newline. Fills the image's first placeholders (positions renumbered). (Its code also fixes every image's
        grid at 2 x 2 tiles in preprocessing; here the grid is the checkpoint's `image_grid_pinpoints`.)"""
        return layout.pack_base_then_tiles(crop_features, patch_ids, self.config.num_patches)
