"""FastV: after LLM layer K, keep the image tokens the last token attends to most, on plain tensors.

Chen, Zhao, Liu, Bai, Lin, Zhou, Chang, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764. Sec. 4.1: the first K layers see every
image token; after layer K the image tokens are ranked by the attention they receive in layer K and only the top ones
go on to the later layers (paper default K=2, R=50% dropped).

The ranking row: the paper ranks a token by the attention it receives averaged over all query rows; the official code
(`pkunlp-icler/FastV`, `modeling_llama.py`, `fast_v_inplace`) takes only the *last token's* row of layer K's
head-averaged attention probabilities (softmax over all keys), sliced to the image keys: at prefill the prompt's last
token (after LLaVA's template, the ":" of "ASSISTANT:"). We follow the code (`query_row="last"`). Decoding without a
cache re-prunes every step, so there (as in FastV's code) the row is each step's newest token and the kept tokens may
change from step to step; option `query_row="last_instruction"` (ours) ranks by the last instruction token
(`instruction_mask`), which stays the same row at every step. Kept tokens keep their original position ids, as in
the code.

Budget: the budget counts image tokens in the LLM's last layers, so FastV keeps exactly `budget` tokens after layer
`K = 2` (64 of 576 -> K=2, keep 64). Torch only: the HF glue gathers the attention row and applies the indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .attention_rows import moved
from .pruner_base import QUERY_ROWS, LlmLayerPruner, check_choice, check_int, register_pruner, select_keep_indices

# K of the paper's title and defaults ("after layer 2"; README: K=2 with R=25/50/75%).
FASTV_DEFAULT_LAYER = 2


class FastVSchedule(NamedTuple):
    """`layer`: K, the number of LLM layers that see every image token (the scores come from the K-th layer, index
    `K - 1`); `num_keep`: the image tokens layers `K + 1 ...` see."""

    layer: int
    num_keep: int


def fastv_scores(last_token_attention: torch.Tensor) -> torch.Tensor:
    """Importance of each image token: the attention the last token pays it in layer K, averaged over heads.

    Args:
        last_token_attention: `(batch, heads, num_patches)`, the last query row of layer K's attention probabilities
            (softmax over all keys, causal and padding masked), gathered at each sample's image-token positions.

    Returns:
        `(batch, num_patches)` float32.
    """
    if last_token_attention.dim() != 3:
        raise ValueError(
            f"last_token_attention must be (batch, heads, num_patches), got shape {tuple(last_token_attention.shape)}."
        )
    return moved(last_token_attention, dtype=torch.float32).mean(dim=1)


def fastv_keep_indices(last_token_attention: torch.Tensor, num_keep: int) -> torch.Tensor:
    """`(batch, num_keep)` int64 indices (into `num_patches`) of the kept image tokens, per sample, ascending."""
    return select_keep_indices(fastv_scores(last_token_attention), num_keep)


def schedule_for_budget(
    num_patches: int, num_layers: int, budget: int, layer: int = FASTV_DEFAULT_LAYER
) -> FastVSchedule:
    """FastV's own configuration for `budget` image tokens in the LLM's last layers: `(K=layer, keep=budget)`."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}.")
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer (K) must be in [1, {num_layers - 1}] for num_layers={num_layers}, got {layer}.")
    if not 1 <= budget <= num_patches:
        raise ValueError(f"budget must be in [1, {num_patches}] (num_patches), got {budget}.")
    return FastVSchedule(layer=layer, num_keep=budget)


@register_pruner
class FastVPruner(LlmLayerPruner):
    """FastV in the LLM: the first `layer` (K) layers see every visual token; after layer K, the visual tokens the
    last token attends to most in layer K (head-averaged, softmax over every key) go on, the budget of them.

    Options: `layer` (K, 2); `query_row`: `"last"` (FastV's code: the input's last token) or `"last_instruction"`
    (ours: the last token of the processor's `instruction_mask`, the last token without one)."""

    name = "fastv"
    options = {"visual_tokens": 64, "layer": FASTV_DEFAULT_LAYER, "query_row": "last"}
    variable_lengths = True  # LLaVA-NeXT: an image's packed tokens (no NeXT code of FastV's; docs/llava-next.md)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_int(cls.name, "layer", values["layer"], 1, config.text_config.num_hidden_layers - 1,
                  "K: the LLM layers that see every visual token")
        check_choice(cls.name, "query_row", values["query_row"], QUERY_ROWS, "the token whose attention ranks")


    def llm_counts(self):
        return self.llm_counts_for(self.config.num_patches)

    def llm_counts_for(self, tokens):
        schedule = schedule_for_budget(tokens, self.config.text_config.num_hidden_layers, min(self.budget, tokens),
                                       self.values["layer"])
        return {schedule.layer - 1: schedule.num_keep}  # the scores come from the K-th layer, index K - 1

    def score(self, attention):
        return fastv_scores(attention)
