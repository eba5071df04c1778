"""ToMe baseline: bipartite soft matching, merging the `r` most similar tokens into their partners.

Source: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023,
arXiv:2210.09461, sec. 3 (token similarity, bipartite soft matching, tracking token size, eq. 1 proportional
attention); used as a baseline in the IVTP paper, sec. 4.1, Tables 1-3, 7 (ToMe+ reapplies it in the LLM). Official
code: `facebookresearch/ToMe`, `tome/merge.py` (`bipartite_soft_matching`, `merge_wavg`), `tome/patch/timm.py`.
Rule: the tokens of the current sequence alternate into sets A (even positions) and B (odd positions); each A
token's score is its best cosine similarity to a B token, over the metric vectors (ToMe: the layer's keys averaged
over heads); the `r` A tokens with the highest scores are merged into their best B token by the size-weighted
average `sum s_i x_i / sum s_i` (`merge_wavg`), and the sizes add up. Proportional attention then adds `log s` to
the attention logits of every query (eq. 1). ToMe's merge returns the sequence `[unmerged A, B]`: the unmerged A
tokens sorted by their A index with a CLS (`class_token=True`), else in score order (highest first), then every B
token -- so the next step's even/odd split runs over that reordered sequence.

Conventions: the first `protected` tokens of the sequence (the CLS: `protected=1`, ToMe's `class_token=True`)
neither merge nor receive; `0 <= r <= (n - protected) // 2` (ToMe's cap; ToMe clamps, we refuse). Ties (ToMe's
`argsort(descending=True)` is not stable): an A token picks the lower B index, and among equal scores the lower A
index merges first (and, without a CLS, comes first among the unmerged). Order, option `order`:
`"official"` (default): the pruner tracks, per image, ToMe's sequence order (a permutation of the current tokens)
from step to step -- through the vision tower and, for ToMe+, on into every LLM step of the same forward -- so each
step's A/B split, matching and merging are the official chain's. The runner still receives the survivors sorted by
their original position (a `Selection`), so the LLM sees them in patch order at their own positions: only the
matching follows ToMe's order. `"original"` (ours): every step splits the tokens in their original order (the
survivors keep it).

Integration: a vision-layer site, after the layer (ToMe merges between attention and MLP), so every later layer of
the tower needs the `log s` bias (`proportional_attention_bias`). Inputs: the layer's hidden states (CLS at index 0)
and its keys, `keys.mean(dim=1)` of `(batch, heads, n, head_dim)`; the sizes and the order travel with the token
state from layer to layer, on the pruner (built per forward).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from .attention_rows import RowRequest, moved
from .pruner_base import Pruner, Selection, at_group_ends, budget_schedule, check_choice, crop_budget, register_pruner

TOME_ORDERS = ("official", "original")


class TomeStep(NamedTuple):
    """One ToMe step's result. `keep` `(batch, n - r)` int64: the surviving input indices, sorted; `merged`
    `(batch, n - r, dim)`: their features, row `i` at `keep[:, i]`; `sizes` `(batch, n - r)` float32, likewise;
    `order` `(batch, n - r)` int64: ToMe's sequence after the step (`[unmerged A, B]`), as indices into `keep`
    (`None` where `protected > 1`: ToMe defines the order for a CLS only)."""

    keep: torch.Tensor
    merged: torch.Tensor
    sizes: torch.Tensor
    order: torch.Tensor | None


def _check_tome_step(metric, features, num_merge, sizes, protected, order, check_values) -> None:
    """The arguments of `tome_merge_step` (see there); values are read back only with `check_values`."""
    if metric.dim() != 3 or features.dim() != 3 or metric.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"metric and features must be (batch, n, c) and (batch, n, dim) with the same batch and n, got "
            f"{tuple(metric.shape)} and {tuple(features.shape)}."
        )
    batch, num_tokens, _ = features.shape
    device = features.device
    if sizes is not None and tuple(sizes.shape) != (batch, num_tokens):
        raise ValueError(f"sizes must be positive with shape (batch, n) = {(batch, num_tokens)}.")
    if not 0 <= protected <= num_tokens:
        raise ValueError(f"protected must be in [0, {num_tokens}], got {protected}.")
    max_merge = (num_tokens - protected) // 2
    if not 0 <= num_merge <= max_merge:
        raise ValueError(f"num_merge must be in [0, {max_merge}] for n={num_tokens}, protected={protected}.")
    if order is not None and (protected > 1 or tuple(order.shape) != (batch, num_tokens) or order.dtype != torch.int64):
        raise ValueError(
            f"order must be int64 of shape (batch, n) = {(batch, num_tokens)} with protected <= 1, got "
            f"{order.dtype} {tuple(order.shape)} with protected={protected}."
        )
    checks = []  # read back together: one wait for the device
    if sizes is not None and check_values:
        checks.append(("sizes must be positive", (sizes > 0).all()))
    if order is not None and check_values:
        order = moved(order, device)
        positions = torch.arange(num_tokens, device=device)
        permutation = (order.sort(dim=-1).values == positions).all() & (order[:, :protected] == 0).all()
        checks.append(("order must be a permutation of range(n) per row, the protected token first", permutation))
    if checks:
        passed = torch.stack([check.to(device) for _, check in checks]).tolist()
        for (message, _), ok in zip(checks, passed):
            if not ok:
                raise ValueError(f"{message} (batch={batch}, n={num_tokens}).")


def tome_merge_step(
    metric: torch.Tensor,
    features: torch.Tensor,
    num_merge: int,
    sizes: torch.Tensor | None = None,
    protected: int = 1,
    order: torch.Tensor | None = None,
    check_values: bool = True,
) -> TomeStep:
    """One ToMe step over the sequence `order`: remove `num_merge` tokens by merging them into their most similar
    partner (`bipartite_soft_matching` + `merge_wavg` of ToMe's code, ties broken as the module says).

    Args:
        metric: `(batch, n, c)`, what similarity is measured on (head-averaged keys).
        features: `(batch, n, dim)`, what is merged (hidden states).
        num_merge: `r`, `0 <= r <= (n - protected) // 2`.
        sizes: `(batch, n)` positive, how many patches each token already stands for; None = all ones.
        protected: `0 <= protected <= n` leading tokens of the sequence kept out of the matching (1: ToMe's
            `class_token=True`, the unmerged A tokens then come back sorted; 0: they come back in score order).
        order: `(batch, n)` int64, a permutation of `range(n)` per row: ToMe's sequence, `order[:, j]` the input index
            of its `j`-th token, the protected tokens first (`order[:, :protected] == arange(protected)`, `protected
            <= 1`); None = the inputs' own order.
        check_values: read `sizes` and `order` back to check their values (one wait for the device). The pruners
            pass `False`: they give the sizes and orders the previous step returned (and a prefill must not wait for
            the device at every layer, nor can a meta-device FLOP count read values).

    Returns:
        A `TomeStep`; its `keep`, `merged` and `sizes` are in the inputs' (sorted) order whatever `order` is.
    """
    _check_tome_step(metric, features, num_merge, sizes, protected, order, check_values)
    batch, num_tokens, dim = features.shape
    device = features.device
    positions = torch.arange(num_tokens, device=device)
    if order is not None:
        order = moved(order, device)
    if sizes is None:
        sizes = torch.ones(batch, num_tokens, device=device)
    sizes = moved(sizes, dtype=torch.float32)
    sequence = positions.expand(batch, -1) if order is None else order
    if num_merge == 0:
        return TomeStep(positions.expand(batch, -1), features, sizes, None if protected > 1 else sequence)

    set_a, set_b = sequence[:, ::2], sequence[:, 1::2]  # input indices of A (even) and B (odd) sequence positions
    metric = moved(metric, dtype=torch.float32)
    unit = metric / metric.norm(dim=-1, keepdim=True)  # ToMe's normalisation, as its code writes it
    if order is not None:  # the metric in ToMe's sequence, one gather; A and B are its even and odd rows
        unit = unit.gather(1, order.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (batch, |A|, |B|)
    protected_b = protected // 2  # B tokens that may not receive (A's protected rows are left out of the ranking)
    if protected_b:
        similarity[..., :protected_b] = float("-inf")
    best_score, best_b = similarity.max(dim=-1)  # first maximum: ties go to the lower B index
    # ToMe's `edge_idx` over the A tokens that may merge (a protected one's -inf row ranks last, so it never merges;
    # leaving it out of the sort says so without reading the scores, which a weight-free FLOP count does not have)
    protected_a = (protected + 1) // 2
    ranked = torch.sort(best_score[:, protected_a:], dim=-1, descending=True, stable=True).indices + protected_a
    merged_a = ranked[:, :num_merge]
    sources = set_a.gather(1, merged_a)  # (batch, r) input indices merged away
    targets = set_b.gather(1, best_b.gather(1, merged_a))
    destination = positions.expand(batch, -1).scatter(1, sources, targets)

    # Size-weighted average: sum s_i x_i and sum s_i over every token landing on a survivor.
    feature_sums = torch.zeros(batch, num_tokens, dim, device=device).scatter_add(
        1, destination.unsqueeze(-1).expand(-1, -1, dim), moved(features, dtype=torch.float32) * sizes.unsqueeze(-1)
    )
    size_sums = torch.zeros_like(sizes).scatter_add(1, destination, sizes)
    # index bookkeeping from the positions, not from `sizes` (float: a meta tensor in a weight-free FLOP count)
    survives = destination == positions  # a merged token's destination is its B partner, never itself
    keep_indices = torch.where(survives, positions, num_tokens).sort(dim=-1).values[:, : num_tokens - num_merge]
    merged_sizes = size_sums.gather(1, keep_indices)
    merged = feature_sums.gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, dim)) / merged_sizes.unsqueeze(-1)

    next_order = None if protected > 1 else _next_order(ranked[:, num_merge:], protected_a, set_a, set_b, survives)
    return TomeStep(keep_indices, moved(merged, dtype=features.dtype), merged_sizes, next_order)


def _next_order(unmerged_a, protected_a: int, set_a, set_b, survives) -> torch.Tensor:
    """ToMe's sequence after a step, `[unmerged A, B]`, as indices into the survivors: the unmerged A tokens in score
    order, or sorted by A index with a protected CLS (ToMe's `unm_idx`)."""
    if protected_a:
        protected_first = torch.arange(protected_a, device=unmerged_a.device).expand(unmerged_a.shape[0], -1)
        unmerged_a = torch.cat([protected_first, unmerged_a], dim=1).sort(dim=-1).values
    next_sequence = torch.cat([set_a.gather(1, unmerged_a), set_b], dim=1)  # input indices, `[unm, dst]`
    rank = survives.long().cumsum(dim=-1) - 1  # a survivor's index into `keep_indices`
    return rank.gather(1, next_sequence)


def tome_bipartite_merge(
    metric: torch.Tensor,
    features: torch.Tensor,
    num_merge: int,
    sizes: torch.Tensor | None = None,
    protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on the tokens in their own order (`tome_merge_step` with `order=None`).

    Returns:
        `(keep_indices, merged_features, merged_sizes)`: `(batch, n - r)` int64, the surviving original positions,
        sorted; `(batch, n - r, dim)` in `features`' dtype, row `i` at `keep_indices[:, i]`; `(batch, n - r)` float32.
    """
    step = tome_merge_step(metric, features, num_merge, sizes=sizes, protected=protected)
    return step.keep, step.merged, step.sizes


def proportional_attention_bias(sizes: torch.Tensor) -> torch.Tensor:
    """ToMe eq. 1: `softmax(QK^T / sqrt(d) + log s)`; the `log s` term, to add to the attention logits.

    Args:
        sizes: `(batch, n)` positive token sizes.

    Returns:
        `(batch, 1, 1, n)` float32, broadcasting over heads and query rows (add it to an additive attention mask).
    """
    if sizes.dim() != 2:
        raise ValueError(f"sizes must be (batch, n), got shape {tuple(sizes.shape)}.")
    return moved(sizes, dtype=torch.float32).log()[:, None, None, :]


def merge_counts(start: int, final: int, steps: int) -> list[int]:
    """Tokens each of `steps` ToMe steps removes to go from `start` to exactly `final`: ToMe's constant `r`
    (`ceil(left / steps left)` each step), raised where the later steps could not otherwise reach `final` (one
    bipartite step merges at most half the tokens, `n // 2`), never above that cap. Refused when no schedule can.

    The most tokens a step may leave is the largest `m` that one step can bring down to the next step's bound `b`:
    `m - m // 2 = ceil(m / 2) <= b`, i.e. `m = 2b` (`b` itself where `b <= 0`)."""
    bounds = [final]  # the most tokens allowed after each step, from the last one back
    for _ in range(steps - 1):
        bounds.append(max(bounds[-1], 2 * bounds[-1]))
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


def check_order(method: str, values: dict) -> None:
    check_choice(method, "order", values["order"], TOME_ORDERS, "the sequence order ToMe's bipartite split runs over")


@register_pruner
class TomePruner(Pruner):
    """ToMe in the vision tower: after every layer that runs for patch features, bipartite soft matching merges
    `r` tokens (keys averaged over heads as the metric, CLS protected, size-weighted means), with ToMe's proportional
    attention (`log s` added to every later layer's attention logits); `r` constant, so the last layer leaves the
    budget. After the layer, not between its attention and MLP as in ToMe: layers run unchanged.

    Options: `order` -- `"official"` (default, ToMe's code: each step splits ToMe's reordered sequence
    `[unmerged A, B]` of the step before) or `"original"` (ours: each step splits the tokens in patch order)."""

    name = "tome"
    options = {"visual_tokens": 64, "order": "official"}
    variable_lengths = True  # LLaVA-NeXT: each crop in the tower, the survivors laid out as `pack_crops` says

    def __init__(self, config, context):
        super().__init__(config, context)
        layers = config.vision_layer_groups[-1][1] + 1
        self.removals = merge_counts(config.num_patches, self.crop_budget, layers)
        self.official = self.values["order"] == "official"
        self.sizes = None  # (images, 1 + tokens), CLS first: this call's token sizes
        self.order = None  # (images, 1 + tokens): ToMe's sequence over them (official order); None = as they are

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_order(cls.name, values)
        try:
            merge_counts(config.num_patches, crop_budget(config, values["visual_tokens"]),
                         config.vision_layer_groups[-1][1] + 1)
        except ValueError as error:
            raise ValueError(f"`pruning_options['visual_tokens']` of pruning_method={cls.name!r}: {error}") from None

    def vision_request(self, layer_idx, images, tokens):
        if not self.removals[layer_idx]:
            return None
        return RowRequest(scores=False, key_columns=slice(0, tokens))

    def vision_mask(self, layer_idx):
        return None if self.sizes is None else proportional_attention_bias(self.sizes)

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if not self.removals[layer_idx]:
            return None
        step = tome_merge_step(
            request.key_means, hidden_states, self.removals[layer_idx], sizes=self.sizes, protected=1,
            order=self.order if self.official else None, check_values=False,
        )
        self.sizes = step.sizes
        if self.official:
            self.order = step.order
        return Selection(step.keep[:, 1:] - 1, step.merged[:, 1:])  # the CLS (protected) stays first and unchanged

    def pack_crops(self, layout, crop_features, patch_ids, newline, newlines, image=0, crop_hidden_states=None):
        """LLaVA-NeXT (ours): a merged token stands for a group of patches, which may mix a tile's letterbox padding
        with the image, not for one place, so stock unpadding (which removes places) does not apply: each crop's
        survivors are laid out as the peers' code lays out per-crop tokens without unpadding -- the base crop's in
        order, then the tiles' in raster order over the stitched grid of tiles -- each image bringing its crops'
        share, filling its first placeholders; no newline (`NextLayout.pack_base_then_tiles`)."""
        return layout.pack_base_then_tiles(crop_features, patch_ids, self.config.num_patches)


@register_pruner
class TomePlusPruner(Pruner):
    """ToMe+ (paper Table 7): ToMe in the vision tower to the 7B preset's vision share of the budget
    (`budget_schedule`), then in the first LLM groups the visual tokens of each image are merged by bipartite
    soft matching after each group's last layer (keys over heads as the metric, no token protected, repeated steps
    where more than half must go). Sizes restart at one in each LLM group: proportional attention is not carried into
    the decoder. Options: `order` as for `tome`; with `"official"` ToMe's sequence order is carried from the vision
    tower into the LLM and from step to step and group to group there (without a CLS the unmerged A tokens come
    back in score order)."""

    name = "tome_plus"
    options = {"visual_tokens": 64, "order": "official"}
    variable_lengths = True  # LLaVA-NeXT: the tower per crop (as `tome`), then the LLM per image

    def __init__(self, config, context):
        super().__init__(config, context)
        schedule = budget_schedule(config, self.budget)
        layers = config.vision_layer_groups[-1][1] + 1
        self.removals = merge_counts(config.num_patches, schedule["vision"][-1], layers)
        self.llm = at_group_ends(config.llm_groups(len(schedule["llm"])), schedule["llm"])
        self.official = self.values["order"] == "official"
        self.sizes = None
        self.order = None  # (images, 1 + tokens): the vision tower's ToMe order (official order)
        self.llm_order = None  # (images, visual tokens): their ToMe order in the LLM (official order)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_order(cls.name, values)

    vision_request = TomePruner.vision_request
    vision_mask = TomePruner.vision_mask
    after_vision_layer = TomePruner.after_vision_layer
    pack_crops = TomePruner.pack_crops

    def llm_prune_layers(self):
        return sorted(self.llm)

    def llm_budget(self, layer_idx):
        return self.held_counts(self.llm[layer_idx])

    def llm_request(self, layer_idx, view):
        if layer_idx not in self.llm:
            return None
        return RowRequest(batch=view.image_rows, scores=False, key_columns=view.visual_slots)

    def after_llm_layer(self, layer_idx, view, request, hidden_states):
        if layer_idx not in self.llm:
            return None
        rows = view.image_rows.to(hidden_states.device)
        features = hidden_states[rows.unsqueeze(-1), view.visual_slots.to(hidden_states.device)]
        counts = self.llm_budget(layer_idx)
        if not isinstance(counts, int):  # LLaVA-NeXT: images holding different counts, each merged alone
            return self._merge_per_image(layer_idx, view, features, request.key_means, counts)
        metric = request.key_means
        keep = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        sizes = torch.ones(features.shape[:2], device=features.device)
        order = None
        if self.official:
            # The LLM's visual tokens are the tower's survivors in patch order: first the tower's ToMe order
            # without its CLS (first), then the order the previous LLM group left.
            order = self.llm_order
            if order is None and self.order is not None:
                order = self.order[:, 1:] - 1
            order = None if order is None else order.to(features.device)
        while features.shape[1] > self.llm[layer_idx]:
            step = min(features.shape[1] - self.llm[layer_idx], features.shape[1] // 2)
            merge = tome_merge_step(metric, features, step, sizes=sizes, protected=0, order=order, check_values=False)
            survivors, features, sizes = merge.keep, merge.merged, merge.sizes
            order = merge.order if self.official else None
            metric = metric.gather(1, survivors.to(metric.device).unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
            keep = keep.gather(1, survivors.to(keep.device))
        self.llm_order = order
        return Selection(keep, features)

    def _merge_per_image(self, layer_idx, view, features, metric, counts: tuple) -> Selection:
        """`after_llm_layer` where images hold different counts (LLaVA-NeXT): each image's held tokens (the first of
        its row, `LlmView.visual_valid`) merged alone down to its count, in their own order at every step (the
        tower's order is per crop, not per image); rows padded with -1 and zeros."""
        held = [sample[-1] for sample, has_image in zip(view.tokens.image_kept, view.tokens.has_image) if has_image]
        width = max(counts)
        keep = torch.full((len(counts), width), -1, dtype=torch.long, device=features.device)
        merged = features.new_zeros(len(counts), width, features.shape[-1])
        for row, (tokens, count) in enumerate(zip(held, counts)):
            image, image_metric = features[row : row + 1, :tokens], metric[row : row + 1, :tokens]
            survivors = torch.arange(tokens, device=features.device)[None]
            sizes = torch.ones(1, tokens, device=features.device)
            while image.shape[1] > count:
                step = min(image.shape[1] - count, image.shape[1] // 2)
                merge = tome_merge_step(image_metric, image, step, sizes=sizes, protected=0, check_values=False)
                image, sizes = merge.merged, merge.sizes
                image_metric = image_metric.gather(1, merge.keep.to(image_metric.device).unsqueeze(-1).expand(
                    -1, -1, image_metric.shape[-1]))
                survivors = survivors.gather(1, merge.keep.to(survivors.device))
            keep[row, :count] = survivors[0]
            merged[row, :count] = image[0]
        return Selection(keep, merged)
