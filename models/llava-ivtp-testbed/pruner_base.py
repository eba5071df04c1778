"""The seam between the pruned-token runner (`modeling_llava_ivtp.py`) and the pruning methods (`pruner_*.py`).

The runner owns everything generic -- the token state, masks, rotary positions, the pruned KV cache, decoding,
labels and outputs. A pruner owns one method's rule. It acts at up to three sites of a prefill:

1. after a vision layer: `vision_request` asks for attention rows of the layer (a `RowRequest`, answered by the
   recording attention backend from the layer's own computation); `after_vision_layer` may return a `Selection`
   of the patch tokens (CLS excluded, it always stays);
2. on the projected image features: `on_projected` may return a `Selection` of each image's tokens;
3. after an LLM layer of `llm_prune_layers`: `llm_request` asks for rows (the probe token's, the last token's...),
   `after_llm_layer` returns a `Selection` of each image's visual tokens. A pruner may add a probe token
   (`llm_probe`): it runs through the layers up to the last pruning layer, attends to the tokens up to its image,
   no real token attends to it, and it never enters the cache.

A `Selection` holds sorted indices into the tokens of the site (and, for merging methods, the merged features of the
kept tokens, which keep the kept tokens' positions). A pruner is built per forward call (`Pruner(config, context)`),
so what it gathers over layers lives on that object, never on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .attention_rows import RowRequest


@dataclass
class Selection:
    """`keep` `(n, k)` int64, increasing: the tokens kept at a site; `merged` `(n, k, hidden)`: their new features
    (merging methods), or `None` to keep their features."""

    keep: torch.Tensor
    merged: torch.Tensor | None = None


@dataclass
class PruneContext:
    """What a pruner may read of one forward call. `model` is the `LlavaIvtpForConditionalGeneration`; `guidance`
    the instruction inputs as given (`instruction_mask`, `clip_input_ids`, `clip_token_spans`, each possibly
    `None`); `images_per_sample` `(batch,)`. The runner fills `vision` (the vision tower's outputs: patch and CLS
    hidden states at the feature layer) and `visual_cls` (the projected CLS) once stage 1 has run; at the LLM's
    entry, `packed_guidance` (the sequence-aligned guidance gathered at the tokens that enter, the instruction mask
    limited to real slots) and `image_end_position` `(batch,)`, the rotary position right after each sample's image
    block (after its last token for a sample without an image): where a probe token sits."""

    model: torch.nn.Module
    guidance: dict
    images_per_sample: torch.Tensor
    vision: dict = field(default_factory=dict)
    visual_cls: torch.Tensor | None = None
    packed_guidance: dict | None = None
    image_end_position: torch.Tensor | None = None


@dataclass
class LlmView:
    """What the runner shows a pruner at an LLM layer: the token state, the samples with an image (`image_rows`,
    `(images,)`), and the slots of their visual tokens (`visual_slots`, `(images, visual)`)."""

    tokens: object
    image_rows: torch.Tensor
    visual_slots: torch.Tensor

    @property
    def probe_slot(self) -> int:
        return self.tokens.length - 1

    @property
    def last_slot(self) -> int:
        """The last real token of every row (rows are left-padded; the probe, when present, comes after it)."""
        return self.tokens.last_real_slot


class Pruner:
    """Base class: a method that never prunes. Subclasses override the hooks of the sites they act at."""

    name: ClassVar[str] = ""

    def __init__(self, config, context: PruneContext):
        self.config = config
        self.context = context

    # --- site 1: the vision tower -----------------------------------------------------------------------------
    def vision_request(self, layer_idx: int, images: int, tokens: int) -> RowRequest | None:
        return None

    def after_vision_layer(self, layer_idx: int, hidden_states: torch.Tensor, request: RowRequest | None):
        return None

    # --- site 2: the projected features -----------------------------------------------------------------------
    def on_projected(self, features: torch.Tensor) -> Selection | None:
        return None

    # --- site 3: the LLM ----------------------------------------------------------------------------------------
    def llm_prune_layers(self) -> list[int]:
        """The LLM layers after which this pruner selects visual tokens, increasing."""
        return []

    def llm_probe(self, tokens) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(hidden (batch, hidden), position_ids (batch,))` of a probe token, or `None`."""
        return None

    def llm_request(self, layer_idx: int, view: LlmView) -> RowRequest | None:
        return None

    def after_llm_layer(self, layer_idx: int, view: LlmView, request: RowRequest | None) -> Selection | None:
        return None

    def llm_budget(self, layer_idx: int) -> int:
        """Visual tokens per image kept after pruning layer `layer_idx` (the runner sizes the token state by it)."""
        raise NotImplementedError

    # --- outputs --------------------------------------------------------------------------------------------------
    def outputs(self) -> dict:
        """Extra output fields, over the packed slots the LLM entered with (the runner unpacks them)."""
        return {}


PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(cls: type[Pruner]) -> type[Pruner]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`.")
    PRUNERS[cls.name] = cls
    return cls


__all__ = ["LlmView", "PRUNERS", "PruneContext", "Pruner", "Selection", "register_pruner"]
