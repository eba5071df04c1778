"""The KV cache of LLaVA-IVTP: a `DynamicCache` that knows which logical positions each layer holds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache


class IvtpCache(DynamicCache):
    """A `DynamicCache` whose layers hold different tokens after pruning.

    IVTP prunes visual tokens once, at prefill: layers before the first LLM pruning group hold every token that
    reached the LLM, each later group fewer; the pruned tokens' keys and values are not stored at all. Each layer
    records the *logical* positions of the tokens it holds: indices into the `input_ids` the processor produced
    (576 placeholders per image), -1 for a padding slot of a sample that holds fewer tokens than others.

    Two lengths matter:
    - `get_seq_length()` is the logical length (prompt tokens, pruned ones included, plus the tokens generated
      since). `generate` slices `input_ids`, extends the 2-D attention mask and places position ids with it.
    - `get_query_offset(layer_idx)` and `get_mask_sizes(..., layer_idx)` are per layer and physical (what the layer
      holds), which is what the 4-D masks of that layer index.

    Beam search (`reorder_cache`), `batch_repeat_interleave`, `batch_select_indices`, `crop` and `reset` keep the
    positions in step with the keys and values. Layers that share one record (a pruning group) keep sharing it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_positions: list[torch.Tensor | None] = [None] * len(self.layers)
        self.logical_length = 0
        # The prefill's position rule (`pruner_base.POSITION_RULES`): with "renumbered", a layer's new tokens sit
        # right after the tokens it holds, not at their logical position.
        self.renumbered_positions = False
        # Whether a layer may hold a padding slot (-1), known on the host at prefill: without one, a step of one new
        # token and no 2-D mask attends every key a layer holds, and needs no mask (as stock's step).
        self.padding_slots = False

    # ------------------------------------------------------------------------------------------------------------
    # What the model records
    # ------------------------------------------------------------------------------------------------------------
    @property
    def is_pruned(self) -> bool:
        """Whether an IVTP prefill filled this cache (its layers may hold different tokens)."""
        return any(positions is not None for positions in self.layer_positions)

    def record_positions(self, layer_idx: int, positions: torch.Tensor) -> None:
        """Record that layer `layer_idx` now holds the tokens at `positions` (`(batch, held)`, -1: padding slot)."""
        while len(self.layer_positions) <= layer_idx:
            self.layer_positions.append(None)
        held = self.layers[layer_idx].get_seq_length()
        if positions.shape[-1] != held:
            raise RuntimeError(
                f"IvtpCache layer {layer_idx} holds {held} tokens but {positions.shape[-1]} positions were recorded."
            )
        self.layer_positions[layer_idx] = positions

    def set_logical_length(self, length: int) -> None:
        self.logical_length = int(length)

    def drop_last_token(self, layer_idx: int) -> None:
        """Remove the last cached token of a layer: the pseudo-CLS, which must never stay in the cache."""
        self.layers[layer_idx].crop(-1)

    # ------------------------------------------------------------------------------------------------------------
    # Lengths
    # ------------------------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length: tokens of the prompt (pruned ones included) plus the tokens generated since."""
        if self.is_pruned:
            return self.logical_length
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Where the new queries start among the keys this layer holds: the layer's physical length."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    # ------------------------------------------------------------------------------------------------------------
    # Operations of `generate`: every one moves the positions with the keys and values
    # ------------------------------------------------------------------------------------------------------------
    def _map_positions(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `function` to each distinct positions record once, so layers that shared a record still do."""
        done: dict[int, torch.Tensor] = {}
        for layer_idx, positions in enumerate(self.layer_positions):
            if positions is None:
                continue
            if id(positions) not in done:
                done[id(positions)] = function(positions)
            self.layer_positions[layer_idx] = done[id(positions)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda positions: positions.index_select(0, beam_idx.to(positions.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda positions: positions.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda positions: positions[indices.to(positions.device)])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` logical tokens (a negative count, as `DynamicCache.crop` takes).

        Each layer drops the tokens it holds at those positions. Cropping into the pruned image region is refused
        when samples of the batch would lose different numbers of tokens (their images sit at different positions).
        """
        if not self.is_pruned:
            super().crop(tokens_to_remove)
            return
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. Use a negative integer "
                "to remove that number of tokens from the cache."
            )
        if tokens_to_remove == 0:
            return
        new_length = max(self.logical_length + tokens_to_remove, 0)
        if new_length == 0:
            self.reset()
            return
        drops: dict[int, int] = {}
        for layer_idx, positions in enumerate(self.layer_positions):
            if positions is None:
                continue
            if id(positions) not in drops:
                per_sample = (positions >= new_length).sum(dim=1)
                if bool((per_sample != per_sample[0]).any()):
                    raise ValueError(
                        f"Cannot crop the IVTP cache to {new_length} tokens: that cuts into the pruned image tokens, "
                        f"which samples of the batch hold at different positions ({per_sample.tolist()} to remove "
                        "per sample). Crop to a length past every image, or prefill again."
                    )
                drops[id(positions)] = int(per_sample[0]) if per_sample.numel() else 0
            self.layers[layer_idx].crop(-drops[id(positions)])
        self._map_positions(lambda positions: positions[:, : positions.shape[1] - drops[id(positions)]])
        self.logical_length = new_length

    def reset(self) -> None:
        super().reset()
        self.layer_positions = [None] * len(self.layers)
        self.logical_length = 0
        self.renumbered_positions = False
        self.padding_slots = False


def cache_bytes(cache) -> list[int]:
    """Bytes of keys and values each layer of a `DynamicCache` (an `IvtpCache` or not) holds, as stored."""
    sizes = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            sizes.append(0)
            continue
        sizes.append(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
    return sizes


__all__ = ["IvtpCache", "cache_bytes"]
