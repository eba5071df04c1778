"""DivPrune's max-min diversity selection, on plain tensors.

Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025,
arXiv 2503.02175; method section: keep the subset S of size k that maximises the max-min diversity
`min_{i != j in S} d(i, j)` (MMDP), with the cosine distance `d(i, j) = 1 - cos(v_i, v_j)`, solved greedily as in
the authors' code (vbdi/divprune, `LLaVA/llava/model/llava_arch.py`, `DivPrune`):

- first pick: the token farthest from its nearest neighbour, `argmax_j min_{i != j} d(i, j)`;
- then, each step: the unpicked token farthest from the picked set, `argmax_j min_{s in S} d(s, j)`.

Default on LLaVA-1.5: the paper's retained ratio 0.098 (`round(0.098 * 576) = 56` tokens); at a 64-token budget
DivPrune simply keeps k = 64 (it has no split).

Integration (site: projected features, before the LLM): the multimodal projector's output for the image tokens
(the LLM input embeddings of the image span), nothing else. Our conventions: ties go to the lower index
(`argmax` returns the first maximum); a picked token is never picked again (the official loop can repeat one when
all distances left are zero, e.g. duplicated features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .attention_rows import moved
from .pruner_base import ProjectedPruner, register_pruner


def divprune_keep_indices(features: torch.Tensor, num_keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `num_keep` tokens picked by greedy max-min cosine diversity.

    Args:
        features: `(batch, n, dim)`, the projected visual features of each image.
        num_keep: `1 <= num_keep <= n`.
        valid: `(batch, n)` bool, the tokens each image has (images of different lengths, padded; `None`: all).
            Only valid tokens are picked, while any are left; an image with fewer than `num_keep` has its own
            tokens first in its row, then indices of padded slots (the runner drops those).

    Returns:
        `(batch, num_keep)` int64, sorted ascending.
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (batch, n, dim), got {tuple(features.shape)}.")
    batch, num_tokens, _ = features.shape
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}.")

    normalized = F.normalize(moved(features, dtype=torch.float32), dim=-1)
    distance = 1.0 - normalized @ normalized.transpose(1, 2)  # (batch, n, n)
    eye = torch.eye(num_tokens, dtype=torch.bool, device=features.device)
    # Before the first pick, a token's distance to "the set" is its distance to its nearest other token.
    nearest = distance.masked_fill(eye, float("inf"))
    if valid is not None:  # padded slots are no one's neighbour
        nearest = nearest.masked_fill(~valid.unsqueeze(2), float("inf"))
    set_distance = nearest.amin(dim=1)
    if num_tokens == 1:
        set_distance = torch.zeros_like(set_distance)
    if valid is not None:
        # A padded slot sits at -1 from every token: below every unpicked valid token (distances are in [0, 2]),
        # above every picked one (-inf), so it is picked only once its image has none left, lowest index first.
        # An image with one token: its distance to the set is 0, as above.
        set_distance = torch.where(valid, set_distance.masked_fill(set_distance.isinf(), 0.0), -1.0)
        distance = distance.masked_fill(~valid.unsqueeze(1), -1.0)
    # A token's distance to itself is -inf: once picked, the minimum keeps it at -inf, so it is never picked again
    # (three operators a step: argmax, the picked row, the minimum).
    distance = distance.masked_fill(eye, float("-inf"))
    rows = torch.arange(batch, device=features.device)
    picks = []
    for step in range(num_keep):
        pick = set_distance.argmax(dim=-1)
        picks.append(pick)
        picked_row = distance[rows, pick]  # (batch, n)
        set_distance = picked_row if step == 0 else torch.minimum(set_distance, picked_row)
    return torch.stack(picks, dim=1).sort(dim=1).values


@register_pruner
class DivPrunePruner(ProjectedPruner):
    """DivPrune on the projected image features: greedy max-min cosine diversity to the budget."""

    name = "divprune"
    options = {"visual_tokens": 64}
    positions = "renumbered"  # the authors' code: see `pruner_base.POSITION_RULES`
    # LLaVA-NeXT: the authors' code runs on the packed sequence (unpadded, the newline tokens among the candidates)
    variable_lengths = True

    def select(self, features, num_keep):
        valid = self.context.visual_valid(features.shape[1], features.device) if self.context is not None else None
        return divprune_keep_indices(features, num_keep, valid)
