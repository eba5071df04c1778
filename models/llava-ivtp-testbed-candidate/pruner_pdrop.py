"""PyramidDrop: drop image tokens stage by stage, ranked by the prompt's last token's attention, on plain tensors.

Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu, Lin, "PyramidDrop: Accelerating Your Large Vision-Language
Models via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247. Sec. 3.2: the LLM is split into S
stages; at the end of each stage the image tokens still present are ranked by the attention the last instruction
token pays them (a "lightweight attention": that one query row against all keys) and a ratio lambda of them is kept,
so stage s sees `N * lambda**s` of the `N` image tokens. Default for LLaVA-1.5-7B: S=4 stages, drops after layers
8, 16, 24, lambda=0.5 (official `scripts/v1_5/pdrop_eval`: `--layer_list [8,16,24]`,
`--image_token_ratio_list [1.0,0.5,0.25,0.125]`).

The official code (`modeling_llama_pdrop.py`, `pdrop_forward` / `pdrop_rank_drop`): after layer `l` of
`layer_list` minus one it ranks with `rank_layer = l + 1`, the next stage's first layer: that layer's `input_layernorm`
and q/k projections (rotary at the current positions) applied to layer `l`'s output, softmax over all keys (causal
and padding masked), mean over heads, sliced to the image keys; then it drops, and renumbers the positions of what
is left (`position_ids[i, :cur_len] = arange(cur_len)`; decode steps lower their ids by the tokens each stage
dropped). The query row at inference is `prompt_total_len - 1`, the prompt's last token (after LLaVA's template, the
":" of "ASSISTANT:"); in training it is the token before each answer span, the rows averaged. Keep counts are
fractions of the original `N`, not of the previous stage. We do the same: the runner calls the next layer's attention
module on the pruning layer's output for the scores alone (`llm_scoring_layer`), the default position rule is
`"renumbered"`, and `query_row="last"`. Option `query_row="last_instruction"` (ours) ranks by the last instruction
token, the same row at every step of decoding without a cache (which re-prunes every step, as PyramidDrop's code
does without a cache). Training ranks by the same row as inference here.

Budget: the budget counts image tokens in the LLM's last stage. We keep the S=4 even split of the layers and choose
lambda so that the last stage holds exactly `budget`: `lambda = (budget / N) ** (1 / (S - 1))`, counts rounded to the
nearest token. 72 of 576 gives the paper default (288, 144, 72); 64 of 576 gives lambda ~ 0.481, (277, 133, 64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .pruner_base import QUERY_ROWS, LlmLayerPruner, check_choice, check_int, register_pruner, select_keep_indices

PDROP_DEFAULT_STAGES = 4  # S; lambda follows from the budget (0.5 for the default 72 of 576)


class PDropSchedule(NamedTuple):
    """`layers[s]`: drop after this many LLM layers; `num_keep[s]`: image tokens kept from there on (of `N`)."""

    layers: tuple[int, ...]
    num_keep: tuple[int, ...]


def pdrop_scores(instruction_attention: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each candidate image token: attention from the instruction query rows, mean over heads and rows.

    Args:
        instruction_attention: `(batch, heads, queries, num_candidates)`, attention probabilities of the query rows
            (softmax over all keys, causal and padding masked), gathered at each sample's candidate image positions.
        query_mask: optional bool `(batch, queries)`, which query rows count (each sample needs at least one).

    Returns:
        `(batch, num_candidates)` float32.
    """
    if instruction_attention.dim() != 4:
        raise ValueError(
            "instruction_attention must be (batch, heads, queries, num_candidates), "
            f"got shape {tuple(instruction_attention.shape)}."
        )
    per_row = instruction_attention.float().mean(dim=1)  # (batch, queries, num_candidates)
    if query_mask is None:
        return per_row.mean(dim=1)
    if query_mask.shape != per_row.shape[:2]:
        raise ValueError(f"query_mask must have shape {tuple(per_row.shape[:2])}, got {tuple(query_mask.shape)}.")
    weights = query_mask.to(torch.float32)
    counts = weights.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("query_mask must select at least one query row in every sample.")
    return (per_row * weights.unsqueeze(-1)).sum(dim=1) / counts


def select_stage(scores: torch.Tensor, candidate_indices: torch.Tensor, num_keep: int) -> torch.Tensor:
    """One stage's drop: keep the `num_keep` best candidates, returned as original image-token indices.

    Args:
        scores: `(batch, num_candidates)`, from `pdrop_scores`.
        candidate_indices: `(batch, num_candidates)` int64, the original indices (in `[0, N)`) of the image tokens still
            present, ascending (all of `arange(N)` at the first stage).
        num_keep: `1 <= num_keep <= num_candidates`.

    Returns:
        `(batch, num_keep)` int64 original indices, ascending.
    """
    if candidate_indices.shape != scores.shape:
        raise ValueError(
            f"candidate_indices must have the shape of scores {tuple(scores.shape)}, "
            f"got {tuple(candidate_indices.shape)}."
        )
    return candidate_indices.gather(1, select_keep_indices(scores, num_keep))


def schedule_for_budget(
    num_patches: int, num_layers: int, budget: int, num_stages: int = PDROP_DEFAULT_STAGES
) -> PDropSchedule:
    """PyramidDrop's stage schedule for `budget` image tokens in the last stage (even split, geometric counts)."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}.")
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2, got {num_stages}.")
    if num_layers < num_stages:
        raise ValueError(f"num_layers must be >= num_stages ({num_stages}), got {num_layers}.")
    if not 1 <= budget <= num_patches:
        raise ValueError(f"budget must be in [1, {num_patches}] (num_patches), got {budget}.")
    # Even split of the layers into stages (paper: "evenly distributing layers"; 32 layers -> 8, 16, 24).
    layers = tuple(int(num_layers * stage / num_stages + 0.5) for stage in range(1, num_stages))
    ratio = (budget / num_patches) ** (1.0 / (num_stages - 1))  # lambda
    counts = [int(num_patches * ratio**stage + 0.5) for stage in range(1, num_stages - 1)]
    return PDropSchedule(layers=layers, num_keep=(*counts, budget))


@register_pruner
class PDropPruner(LlmLayerPruner):
    """PyramidDrop in the LLM: the layers split evenly into `stages`; at the end of each stage but the last, the
    visual tokens the query row attends to most in the next stage's first layer go on, geometrically fewer per stage,
    the last stage holding the budget; positions renumbered after each drop.

    Options: `stages` (4); `query_row`: `"last"` (PyramidDrop's code: the prompt's last token) or
    `"last_instruction"` (ours: the last token of the processor's `instruction_mask`)."""

    name = "pdrop"
    options = {"visual_tokens": 64, "stages": PDROP_DEFAULT_STAGES, "query_row": "last"}
    positions = "renumbered"  # the authors' code: see `pruner_base.POSITION_RULES`
    variable_lengths = True  # LLaVA-NeXT: each image's packed tokens, its own geometric counts (docs/llava-next.md)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_int(cls.name, "stages", values["stages"], 2, config.text_config.num_hidden_layers, "LLM stages")
        check_choice(cls.name, "query_row", values["query_row"], QUERY_ROWS, "the token whose attention ranks")


    def llm_counts(self):
        return self.llm_counts_for(self.config.num_patches)

    def llm_counts_for(self, tokens):
        config = self.config
        schedule = schedule_for_budget(tokens, config.text_config.num_hidden_layers, min(self.budget, tokens),
                                       self.values["stages"])
        # a stage ending after `n` layers prunes after layer index `n - 1`
        return {layers - 1: keep for layers, keep in zip(schedule.layers, schedule.num_keep)}

    def llm_scoring_layer(self, layer_idx):
        return layer_idx + 1  # `rank_layer = layer_idx + 1`: the next stage's first layer ranks

    def score(self, attention):
        return pdrop_scores(attention.unsqueeze(1))  # (images, 1 head, 1 row, visual)
