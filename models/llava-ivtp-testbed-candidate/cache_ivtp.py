"""The KV caches of LLaVA-IVTP: a `DynamicCache` that knows which logical positions each layer holds, and its static
form for compiled decode steps (`IvtpStaticCache`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer


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

    def held_runs(self, num_layers: int | None = None) -> tuple[list[torch.Tensor], list[range]]:
        """The runs of layers: consecutive layers that share one record of held positions (a run of the prefill).
        Returns each run's record and its layers (the first `num_layers`, default all)."""
        records, runs = [], []
        for layer_idx in range(len(self.layer_positions) if num_layers is None else num_layers):
            held = self.layer_positions[layer_idx] if layer_idx < len(self.layer_positions) else None
            if held is None:
                raise ValueError(f"The IvtpCache has no record of the tokens layer {layer_idx} holds; prefill again.")
            if records and held is records[-1]:  # the run goes on
                runs[-1] = range(runs[-1].start, layer_idx + 1)
            else:
                records.append(held)
                runs.append(range(layer_idx, layer_idx + 1))
        return records, runs

    def set_logical_length(self, length: int) -> None:
        self.logical_length = int(length)

    def advance(self, num_new: int) -> None:
        """A step's `num_new` tokens were written: the logical length grows by them."""
        self.logical_length += num_new

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
        check_crop_count(tokens_to_remove)
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


class IvtpStaticCache(IvtpCache):
    """The static form of an `IvtpCache`, for decode steps that `torch.compile` and CUDA graphs can capture:
    `generate(..., cache_implementation="static")` with pruning builds one.

    The pruned prefill fills it as an `IvtpCache` (each layer holds the tokens pruning left it; the sizes follow
    from the batch's layout, read once). `freeze` (the forward calls it at the prefill's end) then moves each layer
    into a `StaticLayer` of `held + budget` slots, `budget = max_cache_len - prompt length`: the tokens it holds,
    then one slot per token to generate, written in place at the layer's own count (`StaticLayer.update`). The
    logical length is a device scalar advanced in place, and each layer's slots have fixed logical positions
    (`step_records`: the held tokens', then `prompt length + i` for new slot i). So every decode step has the same
    shapes and addresses and reads nothing from the device; its mask is one gather of the 2-D mask at those
    positions, causal by comparison with the step's positions.

    `max_cache_len` counts logical tokens (the prompt with its pruned placeholders, plus the tokens to generate),
    as `StaticCache`'s does. Layers with a sliding window are not supported.
    """

    def __init__(self, *args, max_cache_len: int, **kwargs):
        config = kwargs.get("config")
        text_config = config.get_text_config(decoder=True) if config is not None else None
        if getattr(text_config, "sliding_window", None) is not None:
            raise ValueError(
                "IvtpStaticCache does not support layers with a sliding window (the text config sets "
                f"`sliding_window={text_config.sliding_window}`); use an `IvtpCache` (leave `cache_implementation` "
                "unset)."
            )
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"`max_cache_len` must be a positive int (logical tokens), got {max_cache_len!r}.")
        super().__init__(*args, **kwargs)
        self.max_cache_len = max_cache_len
        self._clear_static()

    def _clear_static(self) -> None:
        # A flag, not `prompt_length is None`: compiled steps read it, and dynamo guards on the ints it reads (a
        # step must not depend on the prompt's length, which `max_cache_len` leaves free).
        self.frozen = False
        self.prompt_length: int | None = None  # host, set by `freeze`
        self.logical_position: torch.Tensor | None = None  # device scalar after `freeze`
        self.step_records: list[torch.Tensor | None] = [None] * len(self.layers)
        # per layer, the logical tokens before the new ones that the layer does not hold (renumbered positions:
        # the new tokens' ids are lowered by it); an int, or `(batch, 1)` on the device with padding slots
        self.step_offsets: list[int | torch.Tensor | None] = [None] * len(self.layers)
        self.step_runs: list[range] = []  # consecutive layers that share a record (host; steps read only these)

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_pruned(self) -> bool:
        return self.frozen or super().is_pruned  # frozen first: a compiled step reads no record

    @property
    def is_frozen(self) -> bool:
        """Whether the prefill has filled this cache and its layers are static buffers."""
        return self.frozen

    def freeze(self) -> None:
        """After the pruned prefill: each layer's keys and values move into a buffer with room for the tokens to
        generate; each layer's slots get their logical positions."""
        prompt = self.logical_length
        budget = self.max_cache_len - prompt
        if budget < 1:
            raise ValueError(
                f"The IvtpStaticCache holds {self.max_cache_len} logical tokens (`max_cache_len`) and the prompt has "
                f"{prompt}: no room for a generated token. Give a larger `max_cache_len` (in `generate`, "
                "`max_new_tokens`)."
            )
        records: dict[int, tuple] = {}
        for layer_idx, layer in enumerate(self.layers):
            positions = self.layer_positions[layer_idx]
            if positions is None or not getattr(layer, "is_initialized", False):
                raise RuntimeError(f"IvtpStaticCache layer {layer_idx} was not filled by the prefill.")
            held = layer.keys.shape[-2]
            static = StaticLayer(max_cache_len=held + budget)
            static.lazy_initialization(layer.keys, layer.values)
            static.keys[:, :, :held].copy_(layer.keys)
            static.values[:, :, :held].copy_(layer.values)
            static.cumulative_length.fill_(held)
            self.layers[layer_idx] = static
            if id(positions) not in records:
                new = torch.arange(prompt, self.max_cache_len, device=positions.device)
                offset = prompt - ((positions >= 0).sum(dim=1, keepdim=True) if self.padding_slots else held)
                records[id(positions)] = (torch.cat([positions, new.expand(positions.shape[0], -1)], dim=1), offset)
            self.step_records[layer_idx], self.step_offsets[layer_idx] = records[id(positions)]
        self.step_runs = self.held_runs()[1]
        self.frozen = True
        self.prompt_length = prompt
        self.logical_position = torch.tensor(prompt, device=self.layers[0].keys.device)
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs read them in place, copy nothing
            for value in (self.logical_position, *(value for value, _ in records.values()),
                          *(offset for _, offset in records.values() if isinstance(offset, torch.Tensor))):
                torch._dynamo.mark_static_address(value)

    def get_seq_length(self, layer_idx: int = 0):
        """The logical length; once frozen a device scalar (as `StaticCache`'s), so compiled steps do not
        specialise on it."""
        if self.is_frozen:
            return self.logical_position
        return super().get_seq_length(layer_idx)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def advance(self, num_new: int) -> None:
        if self.is_frozen:
            self.logical_position.add_(num_new)  # in place: its address stays
        else:
            super().advance(num_new)

    def _map_positions(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_positions(function)
        for per_layer in (self.step_records, self.step_offsets):
            done: dict[int, torch.Tensor] = {}
            for layer_idx, value in enumerate(per_layer):
                if isinstance(value, torch.Tensor):
                    if id(value) not in done:
                        done[id(value)] = function(value)
                    per_layer[layer_idx] = done[id(value)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_frozen:
            raise NotImplementedError("An IvtpStaticCache cannot be repeated along the batch once filled.")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_frozen:
            raise NotImplementedError("An IvtpStaticCache cannot select samples once filled.")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` generated tokens (a negative count). Once frozen, only tokens
        generated after the prompt can be removed (one read of the device for the current length)."""
        if not self.is_frozen:
            super().crop(tokens_to_remove)
            return
        check_crop_count(tokens_to_remove)
        generated = int(self.logical_position) - self.prompt_length
        if -tokens_to_remove > generated:
            raise ValueError(
                f"An IvtpStaticCache can only crop tokens generated after the prompt ({generated}); got "
                f"{-tokens_to_remove} to remove. Prefill again to shorten the prompt."
            )
        for layer in self.layers:  # each lowers its count (in place); the stale slots are masked, then rewritten
            layer.cumulative_length.sub_(-tokens_to_remove)  # (transformers 5.23's StaticLayer has no `crop`)
        self.logical_position.add_(tokens_to_remove)

    def reset(self) -> None:
        """Empty again: dynamic layers for the next prefill."""
        if self.is_frozen:
            self.layers = [DynamicLayer() for _ in self.layers]
        super().reset()
        self._clear_static()


def check_crop_count(tokens_to_remove: int) -> None:
    """`crop` takes a negative count of tokens to remove, as `DynamicCache.crop` does for this use."""
    if tokens_to_remove > 0:
        raise ValueError(
            f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. Use a negative integer "
            "to remove that number of tokens from the cache."
        )


def check_static_room(cache: IvtpStaticCache, past_length: int, num_new: int) -> None:
    """Tokens written past a static cache's slots would fail inside the kernel: say so before."""
    if past_length + num_new > cache.max_cache_len:
        raise ValueError(
            f"The IvtpStaticCache holds {cache.max_cache_len} logical tokens (`max_cache_len`); {past_length} are "
            f"filled and {num_new} more were given. Generate with a larger `max_cache_len`, or prefill again."
        )


def cache_bytes(cache) -> list[int]:
    """Bytes of keys and values each layer of a `DynamicCache` (an `IvtpCache` or not) holds, as stored."""
    sizes = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            sizes.append(0)
            continue
        sizes.append(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
    return sizes


__all__ = ["IvtpCache", "IvtpStaticCache", "cache_bytes", "check_static_room"]
