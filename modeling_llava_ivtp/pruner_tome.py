"""ToMe baseline: bipartite soft matching, merging the `r` most similar tokens into their partners.

Source: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023,
arXiv:2210.09461, sec. 3 (token similarity, bipartite soft matching, tracking token size, eq. 1 proportional
attention); used as a baseline in the IVTP paper, sec. 4.1, Tables 1-3, 7 (ToMe+ reapplies it in the LLM).
Rule: tokens alternate into sets A (even positions) and B (odd positions); each A token's score is its best cosine
similarity to a B token, over the metric vectors (ToMe: the layer's keys averaged over heads); the `r` A tokens with
the highest scores are merged into their best B token by the size-weighted average `sum s_i x_i / sum s_i`, and the
sizes add up. Proportional attention then adds `log s` to the attention logits of every query (eq. 1).

Conventions: the first `protected` tokens (the CLS: `protected=1`, ToMe's `class_token=True`) neither merge nor
receive; `0 <= r <= (n - protected) // 2` (ToMe's cap; ToMe clamps, we refuse). Ties: an A token picks the lower B
index, and among equal scores the lower A index merges first. Survivors keep their original order (ToMe reorders
them as `[unmerged A, B]`).

Integration: a vision-layer site, between attention and MLP as in ToMe, so every later layer of the tower needs the
`log s` bias (`proportional_attention_bias`). Inputs: the layer's hidden states (CLS at index 0) and its keys,
`keys.mean(dim=1)` of `(batch, heads, n, head_dim)`; the sizes travel with the token state from layer to layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from .attention_rows import RowRequest
from .configuration_llava_ivtp import layer_groups
from .pruner_base import Pruner, Selection, register_pruner, two_site_schedule


def tome_bipartite_merge(
    metric: torch.Tensor,
    features: torch.Tensor,
    num_merge: int,
    sizes: torch.Tensor | None = None,
    protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step: remove `num_merge` tokens by merging them into their most similar partner.

    Args:
        metric: `(batch, n, c)`, what similarity is measured on (head-averaged keys).
        features: `(batch, n, dim)`, what is merged (hidden states).
        num_merge: `r`, `0 <= r <= (n - protected) // 2`.
        sizes: `(batch, n)` positive, how many patches each token already stands for; None = all ones.
        protected: `0 <= protected <= n` leading tokens kept out of the matching.

    Returns:
        `(keep_indices, merged_features, merged_sizes)`: `(batch, n - r)` int64, the surviving original positions,
        sorted; `(batch, n - r, dim)` in `features`' dtype, row `i` at `keep_indices[:, i]`; `(batch, n - r)` float32.
    """
    if metric.dim() != 3 or features.dim() != 3 or metric.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"metric and features must be (batch, n, c) and (batch, n, dim) with the same batch and n, got "
            f"{tuple(metric.shape)} and {tuple(features.shape)}."
        )
    batch, num_tokens, dim = features.shape
    if sizes is None:
        sizes = torch.ones(batch, num_tokens, device=features.device)
    elif tuple(sizes.shape) != (batch, num_tokens) or not bool((sizes > 0).all()):
        raise ValueError(f"sizes must be positive with shape (batch, n) = {(batch, num_tokens)}.")
    if not 0 <= protected <= num_tokens:
        raise ValueError(f"protected must be in [0, {num_tokens}], got {protected}.")
    max_merge = (num_tokens - protected) // 2
    if not 0 <= num_merge <= max_merge:
        raise ValueError(f"num_merge must be in [0, {max_merge}] for n={num_tokens}, protected={protected}.")
    sizes = sizes.float()
    positions = torch.arange(num_tokens, device=features.device)
    if num_merge == 0:
        return positions.expand(batch, -1), features, sizes

    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (batch, |A|, |B|)
    a_positions, b_positions = positions[::2], positions[1::2]
    blocked = (a_positions < protected)[:, None] | (b_positions < protected)[None, :]
    similarity = similarity.masked_fill(blocked, float("-inf"))
    best_score, best_b = similarity.max(dim=-1)  # first maximum: ties go to the lower B index
    merged_a = torch.sort(best_score, dim=-1, descending=True, stable=True).indices[:, :num_merge]
    sources = a_positions[merged_a]  # (batch, r) original positions merged away
    targets = b_positions[best_b.gather(1, merged_a)]
    destination = positions.expand(batch, -1).scatter(1, sources, targets)

    # Size-weighted average: sum s_i x_i and sum s_i over every token landing on a survivor.
    feature_sums = torch.zeros(batch, num_tokens, dim, device=features.device).scatter_add(
        1, destination.unsqueeze(-1).expand(-1, -1, dim), features.float() * sizes.unsqueeze(-1)
    )
    size_sums = torch.zeros_like(sizes).scatter_add(1, destination, sizes)
    survives = torch.ones_like(sizes, dtype=torch.bool).scatter(1, sources, False)
    keep_indices = torch.where(survives, positions, num_tokens).sort(dim=-1).values[:, : num_tokens - num_merge]
    merged_sizes = size_sums.gather(1, keep_indices)
    merged = feature_sums.gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, dim)) / merged_sizes.unsqueeze(-1)
    return keep_indices, merged.to(features.dtype), merged_sizes


def proportional_attention_bias(sizes: torch.Tensor) -> torch.Tensor:
    """ToMe eq. 1: `softmax(QK^T / sqrt(d) + log s)`; the `log s` term, to add to the attention logits.

    Args:
        sizes: `(batch, n)` positive token sizes.

    Returns:
        `(batch, 1, 1, n)` float32, broadcasting over heads and query rows (add it to an additive attention mask).
    """
    if sizes.dim() != 2:
        raise ValueError(f"sizes must be (batch, n), got shape {tuple(sizes.shape)}.")
    return sizes.float().log()[:, None, None, :]


def merge_counts(start: int, final: int, steps: int) -> list[int]:
    """Tokens each of `steps` ToMe steps removes to go from `start` to exactly `final`: ToMe's constant `r`
    (`ceil(left / steps left)` each step), raised where the later steps could not otherwise reach `final` (one
    bipartite step merges at most half the tokens, `n // 2`), never above that cap. Refused when no schedule can."""
    bounds = [final]  # the most tokens allowed after each step, from the last one back
    for _ in range(steps - 1):
        most = bounds[-1]
        while (most + 1) - (most + 1) // 2 <= bounds[-1]:
            most += 1
        bounds.append(most)
    bounds.reverse()
    removals, tokens = [], start
    for step in range(steps):
        removal = max(math.ceil((tokens - final) / (steps - step)), tokens - bounds[step])
        removal = min(removal, tokens // 2, tokens - final)
        removals.append(removal)
        tokens -= removal
    if tokens != final:
        raise ValueError(f"ToMe cannot merge {start} tokens down to {final} in {steps} steps (at most half a step).")
    return removals


@register_pruner
class TomePruner(Pruner):
    """ToMe in the vision tower: after every layer that runs for patch features, bipartite soft matching merges
    `r` tokens (keys averaged over heads as the metric, CLS protected, size-weighted means), with ToMe's proportional
    attention (`log s` added to every later layer's attention logits); `r` constant, so the last layer leaves the
    budget. After the layer, not between its attention and MLP as in ToMe: layers run unchanged."""

    name = "tome"
    options = {"visual_tokens": 64}

    def __init__(self, config, context):
        super().__init__(config, context)
        layers = config.vision_layer_groups[-1][1] + 1
        self.removals = merge_counts(config.num_patches, self.budget, layers)
        self.sizes = None  # (images, 1 + tokens), CLS first: this call's token sizes

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        try:
            merge_counts(config.num_patches, values["visual_tokens"], config.vision_layer_groups[-1][1] + 1)
        except ValueError as error:
            raise ValueError(f"`pruning_options['visual_tokens']` of pruning_method='tome': {error}") from None

    def vision_request(self, layer_idx, images, tokens):
        if not self.removals[layer_idx]:
            return None
        return RowRequest(scores=False, key_columns=torch.arange(tokens))

    def vision_mask(self, layer_idx):
        return None if self.sizes is None else proportional_attention_bias(self.sizes)

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if not self.removals[layer_idx]:
            return None
        keep, merged, self.sizes = tome_bipartite_merge(
            request.key_means, hidden_states, self.removals[layer_idx], sizes=self.sizes, protected=1
        )
        return Selection(keep[:, 1:] - 1, merged[:, 1:])  # the CLS (protected) stays first and unchanged


@register_pruner
class TomePlusPruner(Pruner):
    """ToMe+ (paper Table 7): ToMe in the vision tower to the 7B preset's vision share of the budget
    (`two_site_schedule`), then in the first LLM groups the visual tokens of each image are merged by bipartite
    soft matching after each group's last layer (keys over heads as the metric, repeated steps where more than half
    must go). Sizes restart at one in the LLM: proportional attention is not carried into the decoder."""

    name = "tome_plus"
    options = {"visual_tokens": 64}

    def __init__(self, config, context):
        super().__init__(config, context)
        schedule = two_site_schedule(config, self.budget)
        layers = config.vision_layer_groups[-1][1] + 1
        self.removals = merge_counts(config.num_patches, schedule["vision"][-1], layers)
        groups = layer_groups(config.group_size * len(schedule["llm"]), config.group_size)
        self.llm = {last: count for (_, last), count in zip(groups, schedule["llm"])}
        self.sizes = None

    vision_request = TomePruner.vision_request
    vision_mask = TomePruner.vision_mask
    after_vision_layer = TomePruner.after_vision_layer

    def llm_prune_layers(self):
        return sorted(self.llm)

    def llm_budget(self, layer_idx):
        return self.llm[layer_idx]

    def llm_request(self, layer_idx, view):
        if layer_idx not in self.llm:
            return None
        return RowRequest(batch=view.image_rows, scores=False, key_columns=view.visual_slots)

    def after_llm_layer(self, layer_idx, view, request, hidden_states):
        if layer_idx not in self.llm:
            return None
        rows = view.image_rows.to(hidden_states.device)
        features = hidden_states[rows.unsqueeze(-1), view.visual_slots.to(hidden_states.device)]
        metric = request.key_means
        keep = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        sizes = torch.ones(features.shape[:2], device=features.device)
        while features.shape[1] > self.llm[layer_idx]:
            step = min(features.shape[1] - self.llm[layer_idx], features.shape[1] // 2)
            survivors, features, sizes = tome_bipartite_merge(metric, features, step, sizes=sizes, protected=0)
            metric = metric.gather(1, survivors.to(metric.device).unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
            keep = keep.gather(1, survivors.to(keep.device))
        return Selection(keep, features)
