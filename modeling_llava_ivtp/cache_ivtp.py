"""The KV cache of LLaVA-IVTP: a `DynamicCache` that knows which logical positions each layer holds."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache


class IvtpCache(DynamicCache):
    """A `DynamicCache` whose layers hold different tokens after pruning.

    IVTP prunes visual tokens once, at prefill: layers before the first LLM pruning group hold every token that
    reached the LLM, each later group fewer. Besides keys and values, each layer records the logical positions
    (indices into the `input_ids` the processor produced) of the tokens it holds, so `get_seq_length()` can answer
    the logical length that `generate`'s attention-mask bookkeeping expects.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_positions: list[torch.Tensor | None] = [None] * len(self.layers)
        self.logical_length = 0

    def record_positions(self, layer_idx: int, positions: torch.Tensor, logical_length: int) -> None:
        """Record that layer `layer_idx` now holds the tokens at `positions` (`(batch, held)`, -1 for padding slots)."""
        while len(self.layer_positions) <= layer_idx:
            self.layer_positions.append(None)
        self.layer_positions[layer_idx] = positions
        self.logical_length = max(self.logical_length, logical_length)

    def drop_last_token(self, layer_idx: int) -> None:
        """Remove the last cached token of a layer: the pseudo-CLS, which must never stay in the cache."""
        self.layers[layer_idx].crop(-1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length: tokens of the prompt (pruned ones included) plus the tokens generated."""
        if self.logical_length:
            return self.logical_length
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        super().reset()
        self.layer_positions = [None] * len(self.layers)
        self.logical_length = 0


__all__ = ["IvtpCache"]
