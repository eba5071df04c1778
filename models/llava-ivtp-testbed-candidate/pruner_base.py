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

A method that acts at one site implements one function on a base class that does the rest (requests, top-k,
budgets, outputs): `ProjectedPruner.score` or `.select` (site 2: random, pooling, DivPrune, CDPruner),
`VisionLayerPruner.select` (site 1, by the layer's CLS row: TopK, EViT, VisionZip, VisPruner), `LlmLayerPruner
.llm_counts` (site 3, by one query row's attention: FastV, PyramidDrop). IVTP, ToMe and the two-site TopK+ and ToMe+
implement the hooks above themselves.

A `Selection` holds sorted indices into the tokens of the site (and, for merging methods, the merged features of the
kept tokens, which keep the kept tokens' positions). A pruner is built per forward call (`Pruner(config, context)`),
so what it gathers over layers lives on that object, never on a module.

Rotary positions after pruning follow the method's published code (`Pruner.positions`, every method's option
`positions`): `"original"` -- the kept tokens keep the position ids of the logical sequence (IVTP, FastV; pruning
leaves gaps); `"renumbered"` -- after every pruning step the tokens that go on close the gaps, each token's id
lowered by the tokens of its sample pruned before it (VisionZip, VisPruner, DivPrune and CDPruner pass the
shortened sequence with fresh ids 0..L'-1; PyramidDrop renumbers after each drop). The runner applies the rule at
prefill and on every decode step over the pruned cache (a layer's new tokens sit after the tokens it holds).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.profiler import record_function

from .attention_rows import RowRequest, moved
from .tokens_ivtp import prefix_mask


def profiler_label(name: str):
    """`record_function(name)` while a profiler runs (`llava-ivtp bench` books the pruning's own work by these
    labels); otherwise nothing, so an unprofiled forward dispatches no label operators."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return record_function(name)


# Rotary positions after pruning (module docstring): ids of the logical sequence, or gaps closed at every step.
POSITION_RULES = ("original", "renumbered")
# The query row of methods that rank by one token's attention (FastV, PyramidDrop; `LlmView.query_slots`).
QUERY_ROWS = ("last", "last_instruction")


@dataclass
class Selection:
    """`keep` `(n, k)` int64, increasing: the tokens kept at a site; `merged` `(n, k, hidden)`: their new features
    (merging methods), or `None` to keep their features.

    `ordered` (the vision tower's feature layer only): `merged` holds the tokens in the order they enter the LLM
    (they fill the first `k` placeholders of their image), and `keep` says which patch each stands for, in that
    order (-1: none, e.g. a CLS token), as VisionZip's code hands the projector its block of tokens."""

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    ordered: bool = False


@dataclass
class PruneContext:
    """What a pruner may read of one forward call. `model` is the `LlavaIvtpForConditionalGeneration`; `guidance`
    the instruction inputs as given (`instruction_mask`, `clip_input_ids`, `clip_token_spans`, each possibly
    `None`); `images_per_sample` `(batch,)`, and `images` the same per sample on the host; `clip_length` (host),
    one past the last end token of `clip_input_ids` (`clip_input_ids()`). The runner fills `vision` (the vision
    tower's outputs: patch and CLS hidden states at the feature layer) once stage 1 has run, and defers `visual_cls`
    (the projected CLS, computed when first read); at the LLM's entry, `packed_guidance` (the sequence-aligned
    guidance gathered at the tokens that enter, the instruction mask limited to real slots) and `image_end_position`
    `(batch,)`, the rotary position right after each sample's image block (after its last token for a sample without
    an image): where a probe token sits. `visual_lengths` (host): every image's visual tokens in order where images
    differ (LLaVA-NeXT: each image's packed length; a site-2 pruner then gets `(images, max length, hidden)` and
    `visual_valid`), else `None` (`num_patches` each). `vision_valid` (LLaVA-NeXT, in the vision tower): `(crops,
    tokens)` bool, which of each crop's current patch tokens show the image (a tile's patches on the letterbox padding,
    which stock unpadding removes, do not), kept up to date by the runner after each selection; `None` where all do."""

    model: torch.nn.Module
    guidance: dict
    images_per_sample: torch.Tensor
    images: tuple = ()
    clip_length: int | None = None
    visual_lengths: tuple | None = None
    vision_valid: torch.Tensor | None = None
    vision: dict = field(default_factory=dict)
    deferred: dict = field(default_factory=dict, repr=False)  # name -> function of no arguments, or its value

    def defer(self, name: str, compute) -> None:
        """`compute()` gives the field `name` when a pruner first reads it: a method that never does (most do not
        read `packed_guidance` or `image_end_position`) dispatches nothing for it."""
        self.deferred[name] = compute

    def _deferred(self, name: str):
        value = self.deferred.get(name)
        if callable(value):
            value = self.deferred[name] = value()
        return value

    def visual_valid(self, width: int, device) -> torch.Tensor | None:
        """`(images, width)` bool: which of each image's `width` padded token slots hold one of its tokens
        (`visual_lengths`); `None` where every image has them all."""
        if self.visual_lengths is None or min(self.visual_lengths) == width:
            return None
        return prefix_mask(self.visual_lengths, width, device)

    def clip_input_ids(self, device) -> torch.Tensor:
        """`guidance["clip_input_ids"]` on `device`, cut after the last sample's end token: the CLIP text tower is
        causal, so no token up to an end token sees what follows it (open_clip pads every text to its context of 77;
        a prompt's instruction is a few of those)."""
        clip_input_ids = self.guidance["clip_input_ids"]
        if self.clip_length is not None:
            clip_input_ids = clip_input_ids[:, : self.clip_length]
        return moved(clip_input_ids, device)

    def per_sample(self, per_image: torch.Tensor) -> torch.Tensor:
        """`per_image` `(images, ...)` of each sample's (only) image, zeros for a sample without one
        (`sample_visual_cls`); as it is when every sample has one image (`images`, known on the host)."""
        if self.images and all(count == 1 for count in self.images):
            return per_image
        return sample_visual_cls(per_image, self.images_per_sample)

    @property
    def visual_cls(self) -> torch.Tensor | None:
        """`(images, hidden)`: the CLS of each image at the feature layer through the multimodal projector."""
        return self._deferred("visual_cls")

    @property
    def packed_guidance(self) -> dict | None:
        return self._deferred("packed_guidance")

    @property
    def image_end_position(self) -> torch.Tensor | None:
        return self._deferred("image_end_position")


@dataclass
class LlmView:
    """What the runner shows a pruner at an LLM layer: the token state, the samples with an image (`image_rows`,
    `(images,)`), and the slots of their visual tokens (`visual_slots`, `(images, visual)`)."""

    tokens: object
    image_rows: torch.Tensor
    _visual_slots: torch.Tensor | None = field(default=None, repr=False)

    @property
    def visual_range(self) -> slice | None:
        """The slots of the visual tokens when they are one range shared by every sample (host-known: each sample has
        one image at the same slot, as at batch size 1), else `None`. Index by it rather than by `visual_slots`: a
        slice is one operator and no gather."""
        return self.tokens.visual_range

    @property
    def visual_slots(self) -> torch.Tensor:
        """`(images, visual)`, computed on first use (a plain attribute, which a compiler traces)."""
        if self._visual_slots is None:
            self._visual_slots = self.tokens.visual_slots(self.image_rows)
        return self._visual_slots

    @property
    def visual_valid(self) -> torch.Tensor | None:
        """`(images, visual)` bool: which entries of `visual_slots` hold one of the image's tokens, where images hold
        different counts (LLaVA-NeXT; the rest point at slot 0); `None` where every image holds `visual`."""
        held = self.tokens.image_kept
        if held is None:
            return None
        # LLM-site pruning has one image per sample: the view's rows are the images, in order
        counts = [sample[-1] for sample, has_image in zip(held, self.tokens.has_image) if has_image]
        if min(counts) == self.tokens.visual:
            return None
        return prefix_mask(counts, self.tokens.visual, self.image_rows.device)

    @property
    def probe_slot(self) -> int:
        return self.tokens.length - 1

    @property
    def last_slot(self) -> int:
        """The last real token of every row (rows are left-padded; the probe, when present, comes after it)."""
        return self.tokens.last_real_slot

    @property
    def batch(self) -> torch.Tensor | None:
        """`RowRequest.batch` for the image rows: `None` when every sample has an image (nothing to select)."""
        return None if all(self.tokens.has_image) else self.image_rows

    def image_keys(self) -> tuple[slice, ...]:
        """The slots a visual token or the probe can attend to -- every slot up to the last one that can hold a
        visual token (`TokenState.visual_end`, a host bound), then the probe's -- as host ranges, for
        `RowRequest.keys`."""
        tokens = self.tokens
        end = min(tokens.visual_end, tokens.last_real_slot + 1)
        return (slice(0, end), slice(self.probe_slot, self.probe_slot + 1)) if tokens.probe else (slice(0, end),)

    def query_slots(self, query_row: str, instruction_mask: torch.Tensor | None) -> torch.Tensor:
        """`(images, 1)`: the query row a method ranks by (`QUERY_ROWS`): the last token of the input (`"last"`: at
        prefill, the prompt's last token, as FastV's and PyramidDrop's code take it), or the last instruction token
        (`"last_instruction"`, `last_instruction_slots`)."""
        if query_row == "last_instruction":
            return self.last_instruction_slots(instruction_mask)
        return torch.full((len(self.image_rows), 1), self.last_slot, dtype=torch.long, device=self.image_rows.device)

    def last_instruction_slots(self, instruction_mask: torch.Tensor | None) -> torch.Tensor:
        """`(images, 1)`: the slot of each image's sample's last instruction token (`instruction_mask`, aligned with
        `input_ids`, as the processor gives it), or of its last token where there is none. Tokens generated since
        the prompt are not instruction, so decoding without a cache asks the same row at every step."""
        tokens = self.tokens
        rows = moved(self.image_rows, tokens.positions.device)
        last = torch.full((len(rows), 1), self.last_slot, dtype=torch.long, device=rows.device)
        if instruction_mask is None:
            return last
        positions = tokens.positions[rows]
        mask = moved(instruction_mask, positions.device, torch.bool)[rows]
        is_instruction = mask.gather(1, positions.clamp_min(0)) & (positions >= 0)
        slots = torch.arange(positions.shape[1], device=positions.device)
        found = torch.where(is_instruction, slots, -1).amax(dim=1, keepdim=True)
        return torch.where(found >= 0, found, last)


class Pruner:
    """Base class: a method that never prunes. Subclasses override the hooks of the sites they act at.

    `options` are the method's `config.pruning_options` and their defaults; every method takes `visual_tokens`, the
    budget: visual tokens per image that reach the LLM's last layers (the paper's "number of visual tokens"), which
    the method maps to its own schedule by its paper's rule. `check_options` validates them (called by the config).
    """

    name: ClassVar[str] = ""
    options: ClassVar[dict] = {}  # every registered method: {"visual_tokens": 64 (the papers' setting), ...}
    positions: ClassVar[str] = "original"  # the position rule of the method's code: one of POSITION_RULES
    # Whether the method runs on images of different lengths (LLaVA-NeXT's packed sequences: `visual_lengths`).
    variable_lengths: ClassVar[bool] = False
    # Whether it prunes each crop of a LLaVA-NeXT image after the projector, before packing (`pack_crops`), rather
    # than the packed sequence (`on_projected`): CDPruner's NeXT code.
    prunes_crops: ClassVar[bool] = False

    def __init__(self, config, context: PruneContext | None):
        self.config = config
        self.context = context
        self.values = self.resolve_options(config)
        self.budget = self.values.get("visual_tokens")

    @classmethod
    def resolve_options(cls, config) -> dict:
        """`config.pruning_options` over the defaults, checked: unknown names and bad values are refused."""
        given = config.pruning_options or {}
        if not isinstance(given, dict):
            raise ValueError(f"`pruning_options` must be a dict (or None), got {type(given).__name__}.")
        defaults = {**cls.options, "positions": cls.positions}  # every method takes the position rule
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(
                f"`pruning_options` of pruning_method={cls.name!r} has unknown options {unknown}; allowed: "
                f"{sorted(defaults)}."
            )
        values = {**defaults, **given}
        check_choice(cls.name, "positions", values["positions"], POSITION_RULES,
                     f"rotary positions after pruning; the method's code: {cls.positions!r}")
        cls.check_options(config, values)
        return values

    @classmethod
    def check_options(cls, config, values: dict) -> None:
        """Checks `visual_tokens` (`positions`, every method's, is checked by `resolve_options`); subclasses check their
        own options too (call this first)."""
        if "visual_tokens" in cls.options:
            check_int(cls.name, "visual_tokens", values["visual_tokens"], 1, config.max_visual_tokens,
                      "visual tokens per image that reach the LLM's last layers")

    @property
    def crop_budget(self) -> int:
        """The budget of one crop through the vision tower (`crop_budget`)."""
        return crop_budget(self.config, self.budget)

    def pack_crops(self, layout, crop_features: torch.Tensor, patch_ids: torch.Tensor, newline: torch.Tensor,
                   newlines: bool, image: int = 0, crop_hidden_states: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LLaVA-NeXT: one image's tokens for the LLM from what its crops kept in the tower -- `crop_features`
        `(crops, k, hidden)` projected, standing for `patch_ids` `(crops, k)`; `crop_hidden_states` the same
        tokens at the tower's feature layer; `image` its index in the batch's images -- by the image's `layout`
        (`layout_next.NextLayout`). Returns the tokens `(n, hidden)` (`n` known on the host), the index in the
        image's full packed sequence each stands for (-1: none), and the placeholders they fill (their own: each
        token where stock packing puts its patch). Default: the kept patches in stock order, those the unpadding
        removes left out, every newline where `newlines` (`NextLayout.pack_kept`)."""
        patches = self.config.num_patches
        length = layout.kept_length(crop_features.shape[1], patches, newlines)
        tokens, positions = layout.pack_kept(crop_features, patch_ids, newline, patches, length, newlines)
        return tokens, positions, positions

    def shown_first(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` `(crops, patches)` of the vision tower's current patches with the patches that do not show the
        image (`PruneContext.vision_valid`: a LLaVA-NeXT tile's letterbox padding) at -inf, so they are kept last."""
        valid = self.context.vision_valid if self.context is not None else None
        return scores if valid is None else scores.masked_fill(~moved(valid, scores.device), float("-inf"))

    def held_counts(self, count: int) -> int | tuple:
        """Visual tokens kept per image by an LLM-site count: `count`, or, where images entered the LLM with
        different counts (LLaVA-NeXT: `vision["image_kept"]`), the smaller of `count` and each image's (an image
        holding fewer keeps them all; counts never increase, so its entry count is what it holds)."""
        held = self.context.vision.get("image_kept") if self.context is not None else None
        return count if held is None else tuple(min(count, tokens) for tokens in held)

    @property
    def renumbers(self) -> bool:
        """Whether the tokens that go on after a pruning step close the gaps in their position ids."""
        return self.values["positions"] == "renumbered"

    # --- site 1: the vision tower -----------------------------------------------------------------------------
    def vision_request(self, layer_idx: int, images: int, tokens: int) -> RowRequest | None:
        return None

    def after_vision_layer(self, layer_idx: int, hidden_states: torch.Tensor, request: RowRequest | None):
        """`hidden_states` `(images, 1 + tokens, hidden)`, the CLS first; a `Selection` of the patch tokens."""
        return None

    def vision_mask(self, layer_idx: int) -> torch.Tensor | None:
        """An additive attention mask for vision layer `layer_idx` (e.g. ToMe's proportional attention), or `None`."""
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

    def llm_scoring_layer(self, layer_idx: int) -> int:
        """The layer whose attention answers the request of pruning layer `layer_idx`: the layer itself, or (as
        PyramidDrop's code) the next one, whose attention the runner then calls on the pruning layer's output for
        the scores alone, before that layer runs on the kept tokens."""
        return layer_idx

    def after_llm_layer(
        self, layer_idx: int, view: LlmView, request: RowRequest | None, hidden_states: torch.Tensor
    ) -> Selection | None:
        """Called after every layer the pruner's token set passes (with what `llm_request` asked, if anything) and
        the layer's output `hidden_states` (over the view's slots); a `Selection` of each image's visual tokens
        (in `view.visual_slots` order) after a pruning layer."""
        return None

    def llm_budget(self, layer_idx: int) -> int:
        """Visual tokens per image kept after pruning layer `layer_idx` (the runner sizes the token state by it)."""
        raise NotImplementedError

    # --- outputs --------------------------------------------------------------------------------------------------
    def outputs(self) -> dict:
        """Extra output fields, over the packed slots the LLM entered with (the runner unpacks them)."""
        return {}


def as_selection(selected) -> Selection:
    """A `Selection` from what a one-site method's `select` returns: a `Selection`, or the kept indices."""
    return selected if isinstance(selected, Selection) else Selection(selected)


class ProjectedPruner(Pruner):
    """A method that selects among each image's projected features, once, before the LLM (site 2). Implement one
    function: `score` (the top `visual_tokens` are kept, in their order) or `select` (any rule: greedy, merging)."""

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """`features` `(images, patches, hidden)` -> `(images, patches)`: the highest-scoring `visual_tokens` stay."""
        raise NotImplementedError(f"{type(self).__name__} implements `score` or `select`.")

    def select(self, features: torch.Tensor, num_keep: int) -> Selection | torch.Tensor:
        """`(images, num_keep)` increasing indices, or a `Selection` (with merged features for a merging method).
        Images of different lengths (`context.visual_valid`): the padded slots score lowest, so an image shorter
        than `num_keep` keeps all of its tokens first (the runner drops the rest)."""
        scores = self.score(features)
        valid = self.context.visual_valid(features.shape[1], scores.device) if self.context is not None else None
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        return select_keep_indices(scores, num_keep)

    def on_projected(self, features):
        return as_selection(self.select(features, min(self.budget, features.shape[1])))


class VisionLayerPruner(Pruner):
    """A method that selects patches after vision layers (site 1), from the layer's output and, if it asks, the
    layer's CLS row of attention (`asks_cls_row`) and head-averaged keys (`asks_key_means`). Implement one function,
    `select`; by default it acts once, after the layer LLaVA reads its features from, with the whole budget
    (`vision_counts` says otherwise: `{layer: patches kept after it}`)."""

    asks_cls_row: ClassVar[bool] = True
    asks_key_means: ClassVar[bool] = False

    def __init__(self, config, context):
        super().__init__(config, context)
        self.counts = self.vision_counts()

    def vision_counts(self) -> dict[int, int]:
        return {self.config.vision_layer_groups[-1][1]: self.crop_budget}

    def select(self, hidden_states: torch.Tensor, request: RowRequest | None, num_keep: int):
        """`hidden_states` `(images, 1 + patches, hidden)`, the CLS first; `request` answers with `probabilities`
        `(images, 1, 1 + patches)` (the CLS row) and `key_means` `(images, 1 + patches, head_dim)` where asked.
        Returns the kept patches (CLS excluded) or a `Selection`."""
        raise NotImplementedError(f"{type(self).__name__} implements `select`.")

    def vision_request(self, layer_idx, images, tokens):
        if layer_idx not in self.counts or not (self.asks_cls_row or self.asks_key_means):
            return None
        key_columns = slice(0, tokens) if self.asks_key_means else None  # host ranges: one narrow each
        return RowRequest(rows=slice(0, 1), key_columns=key_columns, scores=self.asks_cls_row)

    def after_vision_layer(self, layer_idx, hidden_states, request):
        if layer_idx not in self.counts:
            return None
        return as_selection(self.select(hidden_states, request, self.counts[layer_idx]))


class LlmLayerPruner(Pruner):
    """A method that ranks each image's visual tokens after LLM layers (site 3) by the attention one query row pays
    them in the layer (option `query_row`, `LlmView.query_slots`). Implement one function, `llm_counts` (`{layer:
    visual tokens kept after it}`); `score` maps the row's head-averaged attention `(images, 1, visual)` to scores
    (default: the attention itself); `llm_scoring_layer` may name another layer to score with."""

    def __init__(self, config, context):
        super().__init__(config, context)
        lengths = context.visual_lengths if context is not None else None
        if lengths is None:
            self.counts = self.llm_counts()
        else:  # images of different lengths (LLaVA-NeXT): each image's own schedule, at the same layers
            per_image = [self.llm_counts_for(length) for length in lengths]
            if any(sorted(counts) != sorted(per_image[0]) for counts in per_image):
                raise ValueError(f"{self.name}: the images' schedules prune after different layers: {per_image}.")
            self.counts = {layer: tuple(counts[layer] for counts in per_image) for layer in per_image[0]}

    def llm_counts(self) -> dict[int, int]:
        raise NotImplementedError(f"{type(self).__name__} implements `llm_counts`.")

    def llm_counts_for(self, tokens: int) -> dict[int, int]:
        """`llm_counts` for an image of `tokens` visual tokens (a method with `variable_lengths` implements it)."""
        raise NotImplementedError(f"{type(self).__name__} does not run on images of different lengths.")

    def score(self, attention: torch.Tensor) -> torch.Tensor:
        return attention[:, 0]

    def llm_prune_layers(self):
        return sorted(self.counts)

    def llm_budget(self, layer_idx):
        return self.counts[layer_idx]

    def llm_request(self, layer_idx, view):
        if layer_idx not in self.counts:
            return None
        query_row, one_layout = self.values["query_row"], view.visual_range is not None
        if one_layout and query_row == "last":  # one layout (host): the last slot, a slice
            rows = slice(view.last_slot, view.last_slot + 1)
        else:
            rows = view.query_slots(query_row, self.context.guidance.get("instruction_mask"))
        if one_layout:  # every sample has its image in one slot range
            return RowRequest(rows=rows, columns=view.visual_range)
        return RowRequest(batch=view.image_rows, rows=rows, columns=view.visual_slots)

    def after_llm_layer(self, layer_idx, view, request, hidden_states):
        if layer_idx not in self.counts:
            return None
        scores, counts = self.score(request.probabilities), self.counts[layer_idx]
        if isinstance(counts, int):
            return Selection(select_keep_indices(scores, counts))
        valid = view.visual_valid
        if valid is not None:
            scores = scores.masked_fill(~moved(valid, scores.device), float("-inf"))
        return Selection(select_keep_indices_per_row(scores, counts))


def select_keep_indices(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` highest-scoring tokens per row, in increasing (original) order.

    Args:
        scores: `(batch, n)`.
        num_keep: `1 <= num_keep <= n`.

    Returns:
        `(batch, num_keep)` int64, sorted, unique, in `[0, n)`.
    """
    num_tokens = scores.shape[-1]
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}.")
    if num_keep == num_tokens:
        return torch.arange(num_tokens, device=scores.device).expand(scores.shape[0], -1)
    # Ties go to the lower index (stable sort), so the choice is deterministic.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :num_keep].sort(dim=-1).values


def select_keep_indices_per_row(scores: torch.Tensor, counts: tuple) -> torch.Tensor:
    """`select_keep_indices` with a count per row (host): `(rows, max(counts))`, each row's `counts[row]`
    highest-scoring indices in increasing order, then -1."""
    width = max(counts)
    if min(counts) == width:
        return select_keep_indices(scores, width)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :width]
    taken = prefix_mask(counts, width, scores.device)
    spare = scores.shape[-1]  # the entries past a row's count sort last, then read -1
    picked = torch.where(taken, order, spare).sort(dim=-1).values
    return torch.where(picked == spare, -1, picked)


def crop_budget(config, budget: int) -> int:
    """The budget of one crop through the vision tower: `budget` where an image is one crop; where it is up to
    `config.max_crops` (LLaVA-NeXT), `budget // max_crops`, at least 1 and at most a crop's patches (the split of
    `budget_schedule` and of the peers' LLaVA-NeXT code: 640 = 5 x 128)."""
    crops = config.max_crops
    return budget if crops == 1 else max(1, min(config.num_patches, budget // crops))


def check_choice(method: str, name: str, value, allowed, what: str):
    if value not in allowed:
        raise ValueError(
            f"`pruning_options[{name!r}]` of pruning_method={method!r} ({what}) must be one of {list(allowed)}, got "
            f"{value!r}."
        )
    return value


def check_int(method: str, name: str, value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"`pruning_options[{name!r}]` of pruning_method={method!r} ({what}) must be an int in [{low}, {high}], "
            f"got {value!r}."
        )
    return value


# The one budget rule. A budget `K` (visual tokens per image in the LLM's last layers) becomes per-group counts that
# each keep their share `s` of the log-reduction from the `P` patches to `K`: `P * (K / P) ** s`, rounded to the
# presets' grid (multiples of 8 at 576 patches), never increasing, the last exactly `K`. The shares are the 7B preset's
# (`configuration/llava-1.5-7b-ivtp.json`: `log(c / 576) / log(64 / 576)` for each of its counts, 8 vision groups
# then 4 LLM groups; on another geometry the curve is read at the groups it has); a method that prunes in the vision
# tower only spends the reduction evenly over its groups (share `g / G`: geometric counts).
PRESET_PATCHES, PRESET_FINAL = 576, 64
PRESET_VISION = (472, 392, 320, 264, 224, 184, 152, 120)
PRESET_LLM = (104, 88, 72, 64)


def budget_schedule(config, budget: int, llm: bool = True) -> dict:
    """`{"vision": [...], "llm": [...]}`: patches kept after each vision group of `config.group_size` layers and
    visual tokens kept after each LLM group, for `budget` (the rule above). `llm=True`: both stages shaped as the 7B
    preset, with up to four LLM groups, fewer where the LLM cannot hold them before its last layer (none: the vision
    tower spends the whole reduction); for the 7B preset's geometry and a budget of 64 this is the preset.
    `llm=False`: the vision tower only, geometric. IVTP's `visual_tokens`, `llava-ivtp eval`'s `ivtp@K` /
    `stage1@K`, `bench --kept`, `flops` and every method with a schedule (TopK, EViT, TopK+, ToMe+) use it.

    Where an image is up to `config.max_crops` crops through the vision tower (LLaVA-NeXT), the vision counts are per
    crop: the schedule of the crop's share of the budget, `budget // max_crops` (at most a crop's patches), the split
    the peers' LLaVA-NeXT code uses (640 = 5 x 128). The LLM counts are per image, from the most tokens an image can
    bring after the tower (`config.stage_two_bound`: every crop at the last vision count, and the newline tokens)
    down to `budget`, shaped as the preset's LLM groups (none where that bound is within the budget). An image that
    holds fewer tokens than a count keeps them all."""
    vision_groups = len(config.vision_layer_groups)
    llm_groups = min(len(PRESET_LLM), (config.text_config.num_hidden_layers - 1) // config.group_size) if llm else 0
    patches = config.num_patches
    if config.max_crops == 1:
        counts = _preset_counts(patches, budget, vision_groups, llm_groups)
        return {"vision": counts[:vision_groups], "llm": counts[vision_groups:]}
    vision = _preset_counts(patches, max(1, min(patches, budget // config.max_crops)), vision_groups, llm_groups)
    vision = vision[:vision_groups]
    start = config.stage_two_bound(vision[-1] if vision else patches)
    if start <= budget or not llm_groups:
        return {"vision": vision, "llm": []}
    vision_end = _shares(PRESET_VISION)[-1]  # the preset's LLM shares from its last vision group's (0) to 1
    shares = [(share - vision_end) / (1 - vision_end)
              for share in _interpolate(_shares(PRESET_LLM), vision_end, llm_groups)]
    counts, previous = [], start
    for share in shares:
        previous = max(budget, min(previous, round(start * (budget / start) ** share)))
        counts.append(previous)
    counts[-1] = budget
    return {"vision": vision, "llm": counts}


def _preset_counts(patches: int, budget: int, vision_groups: int, llm_groups: int) -> list[int]:
    """`budget_schedule`'s counts for one image of `patches` patches: the vision groups', then the LLM groups'
    (none: the vision groups spend the reduction evenly, geometric counts)."""
    if llm_groups:
        shares = _interpolate(_shares(PRESET_VISION), 0.0, vision_groups)
        shares += _interpolate(_shares(PRESET_LLM), shares[-1], llm_groups)
    else:
        shares = [group / vision_groups for group in range(1, vision_groups + 1)]
    multiple = max(1, (8 * patches) // PRESET_PATCHES)
    counts, previous = [], patches
    for share in shares:
        value = multiple * round(patches * (budget / patches) ** share / multiple)
        previous = max(budget, min(previous, value))
        counts.append(previous)
    counts[-1] = budget
    return counts


def at_group_ends(groups, counts) -> dict[int, int]:
    """`{last layer of each group: its count}` for `(first, last)` layer groups and their counts."""
    return {last: count for (_, last), count in zip(groups, counts)}


def _shares(counts) -> list[float]:
    return [math.log(count / PRESET_PATCHES) / math.log(PRESET_FINAL / PRESET_PATCHES) for count in counts]


def _interpolate(shares: list[float], start: float, steps: int) -> list[float]:
    """The curve through `(0, start), (j / len, shares[j - 1])` read at `g / steps`, `g = 1..steps`."""
    points = [(0.0, start)] + [((j + 1) / len(shares), share) for j, share in enumerate(shares)]
    out = []
    for step in range(1, steps + 1):
        x = step / steps
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= x <= x1:
                out.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
                break
    return out


def sample_visual_cls(visual_cls: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
    """The projected visual CLS of each sample's (only) image; zeros for samples without an image."""
    has_image = images_per_sample > 0
    first_image = (torch.cumsum(images_per_sample, dim=0) - images_per_sample).clamp_max(visual_cls.shape[0] - 1)
    picked = visual_cls[moved(first_image, visual_cls.device)]
    return picked * has_image.to(picked.device, picked.dtype).unsqueeze(-1)


PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(cls: type[Pruner]) -> type[Pruner]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`.")
    PRUNERS[cls.name] = cls
    return cls


__all__ = [
    "POSITION_RULES", "QUERY_ROWS", "LlmLayerPruner", "LlmView", "PRUNERS", "ProjectedPruner", "PruneContext", "Pruner",
    "Selection", "VisionLayerPruner", "as_selection", "at_group_ends", "budget_schedule", "check_choice", "check_int",
    "crop_budget",
    "register_pruner", "sample_visual_cls", "select_keep_indices", "select_keep_indices_per_row",
]
