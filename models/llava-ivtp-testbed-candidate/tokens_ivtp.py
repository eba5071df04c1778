"""The token state of a pruned prefill: what one LLM layer sees, on the device and on the host, updated together.

Rows are samples, left-padded to one length (`pack_rows`). The device tensors are gathers from the logical sequence
(the `input_ids` the processor produced); the host fields are the sizes, known from one read of the device per
prefill, so the pruning loop never waits for the device to size a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    create_causal_mask,
)

from .attention_rows import moved, takes_bool_masks, takes_dense_masks
from .transformers_compat import cache_kwargs


_DEVICE_FIELDS = ("hidden_states", "positions", "position_ids", "attention_mask", "is_visual", "patch_index")


@dataclass
class TokenState:
    """The tokens one LLM layer sees.

    Device (one row per sample): `hidden_states`; `positions`, each slot's index in `input_ids` (-1: a padding slot
    or the probe); `position_ids`, the rotary positions the tokens keep; `attention_mask`, the 2-D padding mask
    gathered at the kept tokens; `is_visual`, image tokens; `patch_index`, their patch (0..num_patches-1, else -1).

    Host: `num_patches`; per sample `has_image`; `length`, the slots per row; `pads[b]`, the slots before sample
    `b`'s first token (its own input padding tokens are tokens); `visual`, the visual tokens each sample with an image
    holds; `last_placeholder`, per sample, the input position of its last image placeholder (-1 without an image);
    `probe`, whether the last slot of every row is a probe token (a pruner's pseudo-CLS, which no real token attends
    to); `images`, per sample, its images; `image_blocks`, whether each sample's placeholders form one block (read
    at prefill: the processor's layout), which `visual_range` needs; `slot_positions`, whether every row's position
    ids are its slots 0, 1, ... (renumbered positions without padding slots: a pruned set's rotary rows are then the
    first rows of its predecessor's); `image_lengths` and `image_kept`, per sample, the placeholders of each of its
    images and the visual tokens each holds, where images differ (LLaVA-NeXT: each image has its own packed length;
    `None`: every image has `num_patches` placeholders and holds `visual` tokens).

    `rotary`: the decoder's rotary table `(cos, sin)` at the slots, once a run has computed it (`None` before, and
    after renumbering or a new slot): later runs gather theirs from it rather than recompute it.
    """

    hidden_states: torch.Tensor
    positions: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    is_visual: torch.Tensor
    patch_index: torch.Tensor
    num_patches: int
    has_image: list[bool]
    length: int
    pads: list[int]
    visual: int
    last_placeholder: list[int]
    probe: bool = False
    images: tuple = ()
    image_blocks: bool = False
    slot_positions: bool = False
    rotary: tuple | None = None
    image_lengths: tuple | None = None
    image_kept: tuple | None = None

    @classmethod
    def entering_llm(cls, logical: dict, keep: torch.Tensor, placeholders: list[int], last_placeholder: list[int],
                     num_patches: int, kept_per_image: int, image_lengths: tuple | None = None,
                     image_kept: tuple | None = None) -> tuple[TokenState, torch.Tensor, torch.Tensor]:
        """The tokens that enter the LLM: those of `keep` `(batch, sequence)` (every non-image token and
        `kept_per_image` placeholders of each image). `logical` holds the device fields over the whole sequence;
        `placeholders` and `last_placeholder` are per sample, read on the host. Images of different lengths
        (LLaVA-NeXT) give `image_lengths` and `image_kept` per sample instead (the placeholders of each of its
        images and how many of them `keep` holds; `kept_per_image` is then the largest).
        Returns the state (hidden states still those of `logical`, gathered) and the packing `(index, slot_valid)`."""
        sequence_length = keep.shape[1]
        if image_lengths is None:
            counts = [sequence_length - count + (count // num_patches) * kept_per_image for count in placeholders]
            images = tuple(count // num_patches for count in placeholders)
        else:
            counts = [sequence_length - count + sum(kept) for count, kept in zip(placeholders, image_kept)]
            images = tuple(len(lengths) for lengths in image_lengths)
            image_lengths, image_kept = tuple(map(tuple, image_lengths)), tuple(map(tuple, image_kept))
        length = max(counts)
        index, slot_valid = pack_rows(keep, length)
        state = cls(**_gather(logical, index, slot_valid, all_valid=min(counts) == length), num_patches=num_patches,
                    has_image=[count > 0 for count in placeholders],
                    length=length, pads=[length - count for count in counts], visual=kept_per_image,
                    last_placeholder=list(last_placeholder), images=images, image_lengths=image_lengths,
                    image_kept=image_kept)
        return state, index, slot_valid

    @classmethod
    def entering_one_block(cls, start: int, keep_indices: torch.Tensor, position_ids, attention_mask: torch.Tensor,
                           image_mask: torch.Tensor, num_patches: int, last_placeholder: list[int],
                           renumber: bool = False):
        """`entering_llm` where every sample has one image whose placeholders are one block at slot `start` (known on
        the host): the tokens before it, its kept placeholders `start + keep_indices` `(batch, kept)` (increasing),
        the tokens after it -- the packing without a mask to pack. `position_ids` `None`: the positions, which with
        `renumber` are the slots (the pruned placeholders' gaps closed). Returns the state (hidden states still to be
        filled) and the packing `index` (every slot holds a token)."""
        batch_size, sequence_length = image_mask.shape
        device = image_mask.device
        index = _range_index(keep_indices + start, start, start + num_patches, sequence_length)
        is_visual = image_mask.gather(1, index)
        kept = keep_indices.shape[1]
        if renumber:
            if position_ids is not None:
                raise ValueError("entering_one_block renumbers the default positions only.")
            position_ids = torch.arange(index.shape[1], device=device).expand(batch_size, -1)
        elif position_ids is not None:
            position_ids = moved(position_ids, device).expand(batch_size, -1).gather(1, index)
        state = cls(
            hidden_states=None, positions=index, position_ids=index if position_ids is None else position_ids,
            attention_mask=attention_mask.gather(1, index), is_visual=is_visual,
            patch_index=torch.where(is_visual, index - start, -1), num_patches=num_patches,
            has_image=[True] * batch_size, length=sequence_length - num_patches + kept, pads=[0] * batch_size,
            visual=kept, last_placeholder=last_placeholder, images=(1,) * batch_size, image_blocks=True,
            slot_positions=renumber,
        )
        return state, index

    @property
    def image_rows(self) -> list[int]:
        return [row for row, has_image in enumerate(self.has_image) if has_image]

    @property
    def last_real_slot(self) -> int:
        """The slot of every row's last real token (the probe, when present, comes after it)."""
        return self.length - 1 - int(self.probe)

    def probe_key_end(self) -> torch.Tensor | int:
        """`(batch,)`: the last slot the probe may attend to besides itself -- each sample's last visual slot (-1
        for a sample without an image, whose probe sees only itself); an `int` when it is one slot for every sample
        (`visual_range`, known on the host)."""
        if self.visual_range is not None:
            return self.visual_range.stop - 1
        slots = torch.arange(self.is_visual.shape[1], device=self.hidden_states.device)
        return torch.where(moved(self.is_visual, slots.device), slots, -1).amax(dim=1)

    def _last_image(self, row: int) -> tuple[int, int]:
        """Sample `row`'s last image: its placeholders and the visual tokens it holds (host)."""
        if self.image_lengths is None:
            return self.num_patches, self.visual
        return self.image_lengths[row][-1], self.image_kept[row][-1]

    @property
    def visual_end(self) -> int:
        """One past the last slot, over the samples with an image, that can hold a visual token (host arithmetic):
        the slots kept up to each sample's last placeholder. Exact for one image per sample; with several, a bound
        (the pruned tokens of its earlier images are not subtracted), which is all a key range needs."""
        ends = []
        for row, (pad, last, has_image) in enumerate(zip(self.pads, self.last_placeholder, self.has_image)):
            if has_image:
                placeholders, held = self._last_image(row)
                ends.append(pad + last + 1 - placeholders + held)
        return max(ends, default=0)

    @property
    def visual_range(self) -> slice | None:
        """The slots of the visual tokens when every sample has one image and its tokens start at the same slot
        and are as many (host arithmetic: every token before an image is kept), else `None`."""
        if not self.image_blocks or not self.images or any(count != 1 for count in self.images):
            return None
        last_images = [self._last_image(row) for row in range(len(self.pads))]
        starts = {pad + last + 1 - placeholders
                  for pad, last, (placeholders, _) in zip(self.pads, self.last_placeholder, last_images)}
        if len(starts) != 1 or len({held for _, held in last_images}) != 1:
            return None
        start = starts.pop()
        return slice(start, start + self.visual)

    def visual_slots(self, image_rows: torch.Tensor) -> torch.Tensor:
        """`(images, visual)`: the slots of each image's visual tokens, in order (rows: `image_rows`)."""
        return true_indices(self.is_visual[image_rows], self.visual)

    def keep_visual(self, keep: torch.Tensor, kept: int | tuple, renumber: bool = False) -> TokenState:
        """Keep the slots of `keep` `(batch, length)`: every non-visual slot and `kept` visual tokens of each image
        (an int, or per image in order where images hold different counts: LLaVA-NeXT, one image per sample).
        Every other slot stays (the padding slots of shorter rows too), so rows without an image keep their length.
        `renumber`: each kept token's position id is lowered by the tokens of its row dropped before it."""
        image_kept = None
        if self.image_kept is None and isinstance(kept, int):
            counts = [self.length - (self.visual - kept if has_image else 0) for has_image in self.has_image]
        else:
            per_image = iter((kept,) * sum(self.has_image) if isinstance(kept, int) else kept)
            image_kept = tuple((next(per_image),) if has_image else () for has_image in self.has_image)
            counts = [self.length - (self._last_image(row)[1] - now[0] if now else 0)
                      for row, now in enumerate(image_kept)]
            kept = max((now[0] for now in image_kept if now), default=0)
        length = max(counts)
        index, slot_valid = pack_rows(keep, length)
        all_valid = min(counts) == length
        fields = {name: getattr(self, name) for name in _DEVICE_FIELDS}
        pads = [pad + length - count for pad, count in zip(self.pads, counts)]
        if renumber and self.slot_positions and all_valid:
            return replace(self._kept_as_slots(index, length, kept), image_kept=image_kept)
        if renumber:
            fields["position_ids"] = self.position_ids - moved((~keep).long().cumsum(dim=1), self.position_ids.device)
        gathered = _gather(fields, index, slot_valid, all_valid=all_valid)
        rotary = None if renumber else _gather_rotary(self.rotary, index)  # kept positions: their rows of the table
        return replace(self, **gathered, length=length, visual=kept, rotary=rotary, pads=pads, slot_positions=False,
                       image_kept=image_kept)

    def keep_visual_slots(self, chosen: torch.Tensor, kept: int, renumber: bool = False) -> TokenState:
        """`keep_visual` where the visual tokens lie in one slot range for every row (`visual_range`): keep the
        increasing slots `chosen` `(batch, kept)` of that range and every slot outside it. The packing is the range's
        head, `chosen` and its tail -- no mask to pack. `renumber` needs `slot_positions` (the ids stay the slots)."""
        if renumber and not self.slot_positions:
            raise ValueError("keep_visual_slots renumbers positions that are the slots only (`slot_positions`).")
        visual = self.visual_range
        index = _range_index(chosen, visual.start, visual.stop, self.length)
        length = self.length - self.visual + kept
        if renumber:
            return self._kept_as_slots(index, length, kept)
        fields = {name: getattr(self, name) for name in _DEVICE_FIELDS}
        return replace(self, **_gather(fields, index, None, all_valid=True), length=length, visual=kept,
                       rotary=_gather_rotary(self.rotary, index), slot_positions=False,
                       image_kept=self._kept_by_every_image(kept))

    def _kept_as_slots(self, index: torch.Tensor, length: int, kept: int) -> TokenState:
        """The slots `index` `(batch, length)` kept, every row full, with renumbered positions where the ids are the
        slots (`slot_positions`): they stay the slots, and the rotary rows are the table's first `length`."""
        fields = {name: getattr(self, name) for name in _DEVICE_FIELDS if name != "position_ids"}
        position_ids = torch.arange(length, device=self.position_ids.device).expand(index.shape[0], -1)
        return replace(self, **_gather(fields, index, None, all_valid=True), position_ids=position_ids,
                       length=length, visual=kept, rotary=_rotary_prefix(self.rotary, length),
                       image_kept=self._kept_by_every_image(kept))

    def _kept_by_every_image(self, kept: int) -> tuple | None:
        """`image_kept` once every image holds `kept` tokens (`None` stays `None`)."""
        return None if self.image_kept is None else tuple((kept,) * len(held) for held in self.image_kept)

    def append_probe(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> TokenState:
        """One more slot at the end of every row: the probe token, at rotary position `position_ids` `(batch,)`."""
        batch_size = hidden.shape[0]
        column = torch.ones(batch_size, 1, dtype=torch.bool, device=self.is_visual.device)
        minus_one = torch.full((batch_size, 1), -1, dtype=torch.long, device=self.positions.device)
        return replace(
            self,
            hidden_states=torch.cat([self.hidden_states, hidden.unsqueeze(1).to(self.hidden_states)], dim=1),
            positions=torch.cat([self.positions, minus_one], dim=1),
            position_ids=torch.cat([self.position_ids, position_ids.to(self.position_ids).unsqueeze(1)], dim=1),
            attention_mask=torch.cat([self.attention_mask, moved(column, self.attention_mask.device)], dim=1),
            is_visual=torch.cat([self.is_visual, ~column], dim=1),
            patch_index=torch.cat([self.patch_index, moved(minus_one, self.patch_index.device)], dim=1),
            length=self.length + 1,
            probe=True,
            rotary=None,
            slot_positions=False,
        )

    def drop_probe(self) -> TokenState:
        return replace(self, **{name: getattr(self, name)[:, :-1] for name in _DEVICE_FIELDS},
                       length=self.length - 1, probe=False, rotary=_rotary_prefix(self.rotary, self.length - 1))


def _gather(tensors: dict, index: torch.Tensor, slot_valid: torch.Tensor, all_valid: bool = False) -> dict:
    """The device fields at the packed slots `index` `(batch, kept)`; padding slots are marked (-1, not attended).
    `all_valid` (known on the host: every row keeps as many tokens as the longest) says there are none to mark."""
    hidden = tensors["hidden_states"]
    if all_valid:
        return {
            "hidden_states": hidden.gather(1, moved(index, hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])),
            **{name: tensors[name].gather(1, index) for name in _DEVICE_FIELDS[1:] if name in tensors},
        }
    return {
        "hidden_states": hidden.gather(1, moved(index, hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])),
        "positions": tensors["positions"].gather(1, index).masked_fill(~slot_valid, -1),
        "position_ids": tensors["position_ids"].gather(1, index),
        "attention_mask": tensors["attention_mask"].gather(1, index) & slot_valid,
        "is_visual": tensors["is_visual"].gather(1, index) & slot_valid,
        "patch_index": tensors["patch_index"].gather(1, index).masked_fill(~slot_valid, -1),
    }


def _gather_rotary(rotary: tuple | None, index: torch.Tensor) -> tuple | None:
    """The rotary table's `(cos, sin)` rows at the packed slots `index` `(batch, kept)` (`None` stays `None`)."""
    if rotary is None:
        return None
    table_index = moved(index, rotary[0].device).unsqueeze(-1).expand(-1, -1, rotary[0].shape[-1])
    return tuple(table.gather(1, table_index) for table in rotary)


def _rotary_prefix(rotary: tuple | None, length: int) -> tuple | None:
    """The rotary table's first `length` rows (`None` stays `None`)."""
    return None if rotary is None else tuple(table[:, :length] for table in rotary)


def _range_index(chosen: torch.Tensor, start: int, stop: int, length: int) -> torch.Tensor:
    """The packing `(batch, start + kept + length - stop)` that keeps every slot before `start`, the increasing
    slots `chosen` `(batch, kept)` of `[start, stop)`, and every slot from `stop` to `length` (host-known ranges)."""
    batch_size, device = chosen.shape[0], chosen.device
    parts = [chosen]
    if start > 0:
        parts.insert(0, torch.arange(start, device=device).expand(batch_size, -1))
    if stop < length:
        parts.append(torch.arange(stop, length, device=device).expand(batch_size, -1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else chosen


def unpack(values: torch.Tensor | None, index: torch.Tensor, slot_valid: torch.Tensor | None, length: int, fill):
    """Put `(batch, kept)` values of packed slots back at their `(batch, length)` input positions, `fill` elsewhere."""
    if values is None:
        return None
    # Padding slots write to a spare last column, which is cut off (a scatter: no wait for the device).
    target = moved(index if slot_valid is None else torch.where(slot_valid, index, length), values.device)
    out = torch.full((values.shape[0], length + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, target, values)[:, :length]


def prefix_mask(counts, width: int, device) -> torch.Tensor:
    """`(rows, width)` bool: each row's first `counts[row]` entries (`counts` on the host, one per row)."""
    return torch.arange(width, device=device) < torch.tensor(counts, device=device).unsqueeze(1)


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `True` entries of each row of `mask`, in order, `(rows, count)`: every row has exactly `count`.

    `nonzero` would wait for the device to learn the size; the size is known here, so the ranks are scattered.
    """
    rows, length = mask.shape
    rank = torch.where(mask, mask.long().cumsum(dim=1) - 1, count)  # non-True entries go to a spare column
    slots = torch.arange(length, device=mask.device).expand(rows, -1)
    out = torch.zeros(rows, count + 1, dtype=torch.long, device=mask.device)
    return out.scatter(1, rank, slots)[:, :count]


def pack_rows(keep: torch.Tensor, max_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the `True` entries of each row of `keep`, in order, right-aligned (left-padded) to one length.

    `max_kept` is the largest row count (known on the host: counting here would wait for the device). Returns
    `(index, slot_valid)`, both `(batch, max_kept)`; padding slots point at index 0, not valid.
    """
    sequence_length = keep.shape[1]
    order = torch.arange(sequence_length, device=keep.device).expand_as(keep)
    marked = torch.where(keep, order, torch.full_like(order, -1))
    packed = marked.sort(dim=1).values[:, sequence_length - max_kept :]
    slot_valid = packed >= 0
    return packed.clamp_min(0), slot_valid


def segment_mask(text_config, tokens: TokenState, cache, layer_idx: int, unpadded: bool = False, probe_end=None):
    """The mask of one segment, in the backend's form (4-D for sdpa and eager, a `BlockMask` for flex attention, a
    2-D padding mask or none for flash attention, none for a backend without masks): causal over the kept tokens
    (order is kept), padding, and in 4-D masks the probe's rule (`probe_end`, `TokenState.probe_key_end`); for the
    other forms the recording backend recomputes the probe's row (`attention_rows`).

    `unpadded` (known on the host) says every slot is an attended token: the padding mask is left out, which
    spares building it and the backend's check of it (a wait for the device).

    Segments with the pseudo-CLS: for sdpa's boolean masks the mask is built here from one slot range
    (`_probe_bool_mask`, the same values in about a dozen operators); for other 4-D masks (eager's) through the
    attention implementation's registered mask function with broadcasting (`use_vmap=False`): the pseudo-CLS rule is
    index-based, and `create_causal_mask` would `vmap` it element by element (6 ms against 1 ms per segment of 633
    tokens on 2 CPU cores). The prefill's cache is empty (`check_prefill_cache`), so keys are the segment's tokens.
    """
    if not tokens.probe or not takes_dense_masks(text_config._attn_implementation):
        return create_causal_mask(
            config=text_config,
            inputs_embeds=tokens.hidden_states,
            attention_mask=None if unpadded else tokens.attention_mask,
            **cache_kwargs(cache),
            position_ids=None,  # kept positions have gaps: they must not be read as packed sequences
            layer_idx=layer_idx,
            allow_is_causal_skip=unpadded,  # with padding, skip the backend's check (a read of the device)
        )
    batch_size, num_slots = tokens.is_visual.shape
    device = tokens.hidden_states.device
    pseudo_slot = num_slots - 1
    visual_end = probe_end if probe_end is not None else tokens.probe_key_end()
    padding = None if unpadded else tokens.attention_mask.to(device=device, dtype=torch.bool)
    if takes_bool_masks(text_config._attn_implementation):
        return _probe_bool_mask(batch_size, num_slots, visual_end, padding, device)
    if isinstance(visual_end, int):
        visual_end = torch.full((batch_size,), visual_end, dtype=torch.long, device=device)

    def pseudo_cls_rule(batch_idx, head_idx, q_idx, kv_idx):  # index-based: broadcasts over (b, h, q, kv)
        return (q_idx != pseudo_slot) | (kv_idx <= visual_end[batch_idx]) | (kv_idx == pseudo_slot)

    mask_function = ALL_MASK_ATTENTION_FUNCTIONS[text_config._attn_implementation]
    return mask_function(
        batch_size=batch_size,
        q_length=num_slots,
        kv_length=num_slots,
        mask_function=and_masks(causal_mask_function, pseudo_cls_rule),
        attention_mask=padding,
        allow_is_causal_skip=False,
        dtype=tokens.hidden_states.dtype,
        config=text_config,
        use_vmap=False,
        device=device,
    )


def _probe_bool_mask(batch_size: int, num_slots: int, visual_end, padding, device) -> torch.Tensor:
    """sdpa's boolean mask `(batch, 1, slots, slots)` of a segment whose last slot is the probe, as its mask function
    gives it for `causal & pseudo_cls_rule & padding` (`segment_mask`): every real token's row causal, the probe's
    row the slots up to `visual_end` (an `int`, or `(batch,)`) and itself; keys of padding (`padding`, `(batch,
    slots)`, or `None`) excluded. Built from one slot range in about a dozen operators (sdpa_mask's index arithmetic
    takes about 35); for an `int` `visual_end` (one layout, known on the host), a lower triangle whose probe row is
    cleared past it, in about six."""
    if isinstance(visual_end, int):
        allowed = torch.ones(num_slots, num_slots, dtype=torch.bool, device=device).tril()
        allowed[-1, visual_end + 1 : -1] = False  # the probe: up to `visual_end`, and itself
        allowed = allowed.view(1, 1, num_slots, num_slots)
        if padding is not None:
            return allowed & padding.view(batch_size, 1, 1, num_slots)
        return allowed.expand(batch_size, 1, -1, -1)
    slots = torch.arange(num_slots, device=device)
    causal = (slots <= slots.unsqueeze(1))[:-1].expand(batch_size, -1, -1)
    probe_row = (slots <= moved(visual_end, device).unsqueeze(1)) | (slots == num_slots - 1)
    allowed = torch.cat([causal, probe_row.expand(batch_size, -1).unsqueeze(1)], dim=1)
    if padding is not None:
        allowed = allowed & padding.unsqueeze(1)
    return allowed.unsqueeze(1)


def step_mask(text_config, kv_mask: torch.Tensor, hidden_states: torch.Tensor, cache, layer_idx: int):
    """The mask of the new tokens of a step over a pruned cache, for the layers of one run: `kv_mask` `(batch, keys)`
    says which of the layer's keys (the tokens it holds, then the new ones) are attended. Always a mask (whether it
    could be skipped would be a read of the device).

    For a backend whose masks are sdpa's booleans (and no sliding window), the mask is built here as
    `create_causal_mask` builds it -- `kv_mask`, and causal among the new tokens -- in one to three operators rather
    than sdpa_mask's index arithmetic (about 25); other backends get `create_causal_mask`'s."""
    if takes_bool_masks(text_config._attn_implementation) and getattr(text_config, "sliding_window", None) is None:
        num_new, num_keys = hidden_states.shape[1], kv_mask.shape[1]
        mask = moved(kv_mask.view(kv_mask.shape[0], 1, 1, num_keys), hidden_states.device)
        if num_new > 1:  # new token i sees the held tokens and new tokens 0..i
            causal = torch.ones(num_new, num_keys, dtype=torch.bool, device=mask.device).tril(num_keys - num_new)
            mask = mask & causal
        return mask
    return create_causal_mask(
        config=text_config, inputs_embeds=hidden_states, attention_mask=kv_mask, **cache_kwargs(cache),
        position_ids=None, layer_idx=layer_idx, allow_is_causal_skip=False,
    )


def static_width_mask(attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """A 2-D boolean mask over the logical tokens so far, at a static cache's full logical width: the positions
    not reached yet are not attended. The same width every step, so a compiled step sees one shape."""
    length = attention_mask.shape[1]
    if length > width:
        raise ValueError(
            f"`attention_mask` covers {length} tokens, more than the IvtpStaticCache's `max_cache_len` ({width})."
        )
    if length == width:
        return attention_mask
    return torch.cat([attention_mask, attention_mask.new_zeros(attention_mask.shape[0], width - length)], dim=1)


def static_step_mask(text_config, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask of a step over an `IvtpStaticCache` from `allowed` `(batch, 1, new, slots)`: as it is for sdpa's
    boolean masks, additive (0 or the dtype's minimum) for eager's. Backends whose masks are not 4-D tensors are
    refused where the cache is made (`check_static_backend`)."""
    if takes_bool_masks(text_config._attn_implementation):
        return allowed
    check_static_backend(text_config)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def check_static_backend(text_config) -> None:
    """An `IvtpStaticCache`'s steps build 4-D masks: sdpa's or eager's (and their recording twins)."""
    if not takes_dense_masks(text_config._attn_implementation):
        raise ValueError(
            f"An IvtpStaticCache needs an attention backend with 4-D masks: `attn_implementation` is "
            f"{text_config._attn_implementation!r}; use 'sdpa' or 'eager', or leave `cache_implementation` unset "
            "(an `IvtpCache`)."
        )


def layer_segments(prune_layers: list[int], num_layers: int) -> list[tuple[int, int]]:
    """`(first, last)` of each run of decoder layers that sees one token set: up to each pruning layer, the rest."""
    segments, start = [], 0
    for layer_idx in prune_layers:
        segments.append((start, layer_idx))
        start = layer_idx + 1
    if start < num_layers:
        segments.append((start, num_layers - 1))
    return segments


__all__ = [
    "TokenState", "check_static_backend", "layer_segments", "pack_rows", "prefix_mask", "segment_mask", "static_step_mask",
    "static_width_mask", "step_mask", "true_indices", "unpack",
]
