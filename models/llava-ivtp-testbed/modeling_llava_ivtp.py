"""LLaVA-IVTP: `LlavaForConditionalGeneration` with IVTP's two-stage group-wise visual token pruning.

Adapted from transformers 5.23 `models/llava/modeling_llava.py` (the forward), `models/clip/modeling_clip.py`
(`CLIPVisionModel.forward` and the `CLIPEncoder` loop) and `models/llama/modeling_llama.py` (the `LlamaModel`
loop); IVTP changes marked "IVTP:". Stock layers run as they are, with the configured attention backend; the
attention probabilities that scoring needs are computed beside them from the layers' own projections.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import GenerationMixin, LlavaForConditionalGeneration
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    create_causal_mask,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils import logging

from .cache_ivtp import IvtpCache
from .configuration_llava_ivtp import IvtpConfig
from .guidance_ivtp import build_clip_text_tower, clip_content_mask, clip_token_features
from .transformers_compat import (
    CACHE_ARG,
    cache_kwargs,
    checkpointing_drops_cache,
    image_output_fields,
    takes_cache_kwarg,
)
from .validation_ivtp import (
    check_guidance_shapes,
    check_output_requests,
    check_pixel_values,
    check_sequence_inputs,
    check_values,
    hidden_state_selection,
    read_rows,
    value_rows,
)
from .pruning_ivtp import (
    attention_probabilities,
    cosine_relevance,
    pseudo_cls,
    span_mean,
    rollout_cls_row,
    select_keep_indices,
    token_scores,
)


logger = logging.get_logger(__name__)

# Inputs that guide pruning (the processor's extra outputs): like `pixel_values`, they are used on the step that
# prunes (the prefill) only. The first are aligned with `input_ids` (dim 1 is the sequence), the last is per sample.
SEQUENCE_GUIDANCE_INPUTS = ("instruction_mask", "clip_token_spans")
SAMPLE_GUIDANCE_INPUTS = ("clip_input_ids",)
GUIDANCE_INPUTS = SEQUENCE_GUIDANCE_INPUTS + SAMPLE_GUIDANCE_INPUTS

# llava-hf checkpoints store `language_model.lm_head`, `language_model.model.*`, `vision_tower.*`: the conversion
# mapping of the stock "llava" model type renames them. Custom-code classes only get mappings registered for them,
# so register llava's for this class; both the installed package and the remote-code copy run this line.
register_checkpoint_conversion_mapping(
    "LlavaIvtpForConditionalGeneration", get_checkpoint_conversion_mapping("llava"), overwrite=True
)


@dataclass
class IvtpCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    kept_positions (`torch.LongTensor` of shape `(batch_size, kept_len)`, *optional*):
        For each row of `logits`, its index in `input_ids`; -1 marks a padding slot (a sample of a batch that kept
        fewer tokens than the others). With pruning off this is `arange(sequence_length)`.
    vision_keep_indices (`torch.LongTensor` of shape `(num_images, k_final)`, *optional*):
        Indices (0..num_patches-1, row-major in the patch grid) of the patches stage 1 kept, in increasing order.
    llm_keep_indices (`tuple(torch.LongTensor)`, *optional*):
        One entry per stage-2 group: `(batch_size, m_g)` patch indices (0..num_patches-1) of the visual tokens
        kept after that group, for samples with an image (-1 rows for samples without one).
    vision_token_counts (`tuple(int)`, *optional*):
        Patch tokens (CLS not counted) that stage 1 kept after each vision group, read off the pruned tensors.
    llm_token_counts (`tuple(int)`, *optional*):
        Visual tokens per image that stage 2 kept after each LLM group, read off the pruned tensors.
    instruction_relevance (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Relevance of each `input_ids` token to its image under the guidance mode (eq. 7 for `"clip_relevance"`, the
        embedding cosine for `"embedding_relevance"`); NaN where a token has none (not instruction, no CLIP token).
    pseudo_cls_tokens (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
        The `input_ids` tokens averaged into each sample's pseudo-CLS (eq. 8); all False where the visual CLS was used.
    """

    kept_positions: torch.LongTensor | None = None
    vision_keep_indices: torch.LongTensor | None = None
    llm_keep_indices: tuple[torch.LongTensor, ...] | None = None
    vision_token_counts: tuple[int, ...] | None = None
    llm_token_counts: tuple[int, ...] | None = None
    instruction_relevance: torch.FloatTensor | None = None
    pseudo_cls_tokens: torch.BoolTensor | None = None


@dataclass
class _TokenSet:
    """The tokens one LLM layer sees, as gathers from the logical sequence (one row per sample).

    `positions` index `input_ids` (-1: padding slot), `position_ids` are the rotary positions the tokens keep,
    `attention_mask` is the 2-D padding mask gathered at the kept tokens, `is_visual` marks image tokens and
    `patch_index` their patch (0..num_patches-1, -1 for non-visual tokens).
    """

    hidden_states: torch.Tensor
    positions: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    is_visual: torch.Tensor
    patch_index: torch.Tensor

    def gather(self, index: torch.Tensor, slot_valid: torch.Tensor) -> _TokenSet:
        hidden_index = index.unsqueeze(-1).expand(-1, -1, self.hidden_states.shape[-1])
        return _TokenSet(
            hidden_states=self.hidden_states.gather(1, hidden_index),
            positions=self.positions.gather(1, index).masked_fill(~slot_valid, -1),
            position_ids=self.position_ids.gather(1, index),
            attention_mask=self.attention_mask.gather(1, index) & slot_valid,
            is_visual=self.is_visual.gather(1, index) & slot_valid,
            patch_index=self.patch_index.gather(1, index).masked_fill(~slot_valid, -1),
        )

    def append(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> _TokenSet:
        """Append one token per sample at the end (the pseudo-CLS slot)."""
        batch_size = hidden.shape[0]
        column = torch.ones(batch_size, 1, dtype=torch.bool, device=hidden.device)
        minus_one = torch.full((batch_size, 1), -1, dtype=torch.long, device=hidden.device)
        return _TokenSet(
            hidden_states=torch.cat([self.hidden_states, hidden.unsqueeze(1).to(self.hidden_states.dtype)], dim=1),
            positions=torch.cat([self.positions, minus_one], dim=1),
            position_ids=torch.cat([self.position_ids, position_ids.unsqueeze(1)], dim=1),
            attention_mask=torch.cat([self.attention_mask, column], dim=1),
            is_visual=torch.cat([self.is_visual, ~column], dim=1),
            patch_index=torch.cat([self.patch_index, minus_one], dim=1),
        )

    def drop_last(self) -> _TokenSet:
        return _TokenSet(*(tensor[:, :-1] for tensor in vars(self).values()))


@dataclass
class _VisualBlock:
    """Stage-2 scoring layout of one segment, for the samples with an image (`image_rows`).

    `visual_slots` `(images, V)` and `key_slots` `(keys,)` index the segment's token slots; `block_columns`
    `(images, V + 1)` are the visual tokens and the pseudo-CLS in key coordinates, `row_slots` the same rows as
    slots; `allowed` `(images, V + 1, keys)` says which keys each block row attends to; `cos`/`sin` are the rotary
    embeddings at the keys, `row_cos`/`row_sin` at the rows.
    """

    image_rows: torch.Tensor
    visual_slots: torch.Tensor
    key_slots: torch.Tensor
    block_columns: torch.Tensor
    allowed: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    row_slots: torch.Tensor
    row_cos: torch.Tensor
    row_sin: torch.Tensor

    def to(self, device: torch.device) -> _VisualBlock:
        if self.cos.device == device:
            return self
        return _VisualBlock(*(tensor.to(device) for tensor in vars(self).values()))


@dataclass
class _HostLayout:
    """Where each sample's tokens sit in the packed token sets, known on the host.

    Read from the device once per prefill (each sample's image placeholders and the index of its last one); every
    row length, padding and slot bound of the pruning loop follows from these and the schedule's counts, so the
    loop never waits for the device to size a tensor. Rows are left-padded to the longest (`_pack_rows`).

    `pads[b]` is the number of slots before sample `b`'s first token (its own input padding tokens are tokens),
    `length` the slots per row and `visual` the visual tokens each sample with an image holds now.
    """

    num_patches: int
    has_image: list[bool]
    last_placeholder: list[int]
    length: int
    pads: list[int]
    visual: int

    @classmethod
    def entering_llm(cls, sequence_length: int, num_patches: int, placeholders: list[int], last_placeholder: list[int],
                     kept_per_image: int) -> _HostLayout:
        """The tokens that enter the LLM: every non-image token, `kept_per_image` placeholders of each image."""
        counts = [sequence_length - count + (count // num_patches) * kept_per_image for count in placeholders]
        length = max(counts)
        return cls(num_patches, [count > 0 for count in placeholders], last_placeholder, length,
                   [length - count for count in counts], kept_per_image)

    @property
    def image_rows(self) -> list[int]:
        return [row for row, has_image in enumerate(self.has_image) if has_image]

    def append_slot(self) -> _HostLayout:
        """One more slot at the end of every row (the pseudo-CLS)."""
        return replace(self, length=self.length + 1)

    def drop_last_slot(self) -> _HostLayout:
        return replace(self, length=self.length - 1)

    def visual_end(self) -> int:
        """One past the last slot, over the samples with an image, that can hold a visual token: the tokens kept up
        to each sample's last placeholder. Exact when an image's placeholders are contiguous (the processor's
        layout); otherwise a bound, and the scoring's mask excludes the text slots in between."""
        return max(
            pad + last + 1 - self.num_patches + self.visual
            for pad, last, has_image in zip(self.pads, self.last_placeholder, self.has_image)
            if has_image
        )

    def keep_visual(self, kept: int) -> _HostLayout:
        """After a stage-2 group that keeps `kept` visual tokens of each image; every other slot stays (the
        padding slots of shorter rows too), so rows without an image keep their length."""
        counts = [self.length - (self.visual - kept if has_image else 0) for has_image in self.has_image]
        length = max(counts)
        return replace(
            self, length=length, pads=[pad + length - count for pad, count in zip(self.pads, counts)], visual=kept
        )


def _unpack(values: torch.Tensor | None, index: torch.Tensor, slot_valid: torch.Tensor, length: int, fill):
    """Put `(batch, kept)` values of packed slots back at their `(batch, length)` input positions, `fill` elsewhere."""
    if values is None:
        return None
    # Padding slots write to a spare last column, which is cut off (a scatter: no wait for the device).
    target = torch.where(slot_valid, index, length).to(values.device)
    out = torch.full((values.shape[0], length + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, target, values)[:, :length]


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `True` entries of each row of `mask`, in order, `(rows, count)`: every row has exactly `count`.

    `nonzero` would wait for the device to learn the size; the size is known here, so the ranks are scattered.
    """
    rows, length = mask.shape
    rank = torch.where(mask, mask.long().cumsum(dim=1) - 1, count)  # non-True entries go to a spare column
    slots = torch.arange(length, device=mask.device).expand(rows, -1)
    out = torch.zeros(rows, count + 1, dtype=torch.long, device=mask.device)
    return out.scatter(1, rank, slots)[:, :count]


def _pack_rows(keep: torch.Tensor, max_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the `True` entries of each row of `keep`, in order, right-aligned (left-padded) to one length.

    `max_kept` is the largest row count (known on the host from the layout: counting here would wait for the
    device). Returns `(index, slot_valid)`, both `(batch, max_kept)`; padding slots point at index 0, not valid.
    """
    sequence_length = keep.shape[1]
    order = torch.arange(sequence_length, device=keep.device).expand_as(keep)
    marked = torch.where(keep, order, torch.full_like(order, -1))
    packed = marked.sort(dim=1).values[:, sequence_length - max_kept :]
    slot_valid = packed >= 0
    return packed.clamp_min(0), slot_valid


# The modules IVTP adds to Llava (instruction guidance); llava-hf checkpoints lack them.
CLIP_PARTS = ("clip_text_model.", "clip_visual_projection.")

# Attention implementations stage 2 runs with: they take the 4-D mask that isolates the pseudo-CLS.
STAGE_2_ATTENTION = ("sdpa", "eager")


class LlavaIvtpForConditionalGeneration(LlavaForConditionalGeneration, GenerationMixin):
    """LLaVA-1.5 with Instruction-guided Visual Token Pruning (IVTP).

    Same modules and parameter names as [`LlavaForConditionalGeneration`], so llava-hf checkpoints load unchanged.
    With `config.schedule` set, the forward prunes visual tokens in two stages:

    1. in the CLIP vision tower, group-wise token pruning (GTP): per group of `group_size` layers, attention rollout
       with residual (eq. 3) of the CLS row times the value norms (eq. 4) keeps the top-k patches;
    2. in the first `group_size * len(schedule["llm"])` LLM layers, GTP again, with a textual pseudo-CLS (eq. 8)
       that attends to the tokens up to the image and that no real token attends to.

    Kept tokens keep their original position ids. With `config.schedule=None` the model is stock Llava.
    """

    config_class = IvtpConfig
    config: IvtpConfig

    def __init__(self, config: IvtpConfig):
        config.check_ivtp()  # fields edited after the config was made (e.g. `from_pretrained(path, schedule=...)`)
        super().__init__(config)
        if config.clip_text_encoder is not None:
            # IVTP: the frozen CLIP text tower (eq. 5) and CLIP's visual projection, which maps the vision tower's
            # final CLS into the joint space (eq. 6). Neither is in llava-hf checkpoints; both are saved with ours.
            self.clip_text_model = build_clip_text_tower(config.clip_text_encoder)
            self.clip_visual_projection = nn.Linear(
                config.vision_config.hidden_size, config.clip_text_encoder["embed_dim"], bias=False
            )
            self.clip_text_model.requires_grad_(False)
            self.clip_visual_projection.requires_grad_(False)
            self.clip_text_model.eval()
        if config.pruning_enabled and config.schedule["llm"]:
            self._check_llm_supports_scoring()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As [`PreTrainedModel.from_pretrained`], but a checkpoint that lacks the weights of the CLIP text tower its
        config names (`config.clip_text_encoder`) is refused: guidance would run on random weights.

        `clip_text_tower_loaded_later=True` lets them be missing for a caller that fills them itself (the converter).
        """
        loaded_later = kwargs.pop("clip_text_tower_loaded_later", False)
        with_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in info["missing_keys"] if key.startswith(CLIP_PARTS))
        if missing and not loaded_later:
            raise ValueError(
                f"`config.clip_text_encoder` names a CLIP text tower, but {pretrained_model_name_or_path} has no weights "
                f"for it ({len(missing)} missing, e.g. {missing[:3]}): instruction guidance would run on random "
                "weights. Convert the llava-hf checkpoint with `llava-ivtp convert --llava ... --clip ARCH:TAG`, which "
                "adds the tower and `clip_visual_projection` from the CLIP the vision tower came from, or load with "
                "`clip_text_encoder=None` (stage 2 then prunes with the visual CLS)."
            )
        return (model, info) if with_info else model

    @classmethod
    def is_custom_code(cls) -> bool:
        """`False`: weights this class initialises (missing from a checkpoint, or a new model) get each submodel's own
        init, as stock Llava's do (the CLIP vision tower CLIP's, the decoder Llama's).

        transformers treats every class defined outside it as custom code whose init may write parameters without
        its guarded `transformers.initialization` functions, and then skips any module without parameters of its own
        (CLIP's attention and MLP blocks set their projections' scales there, so those would keep the generic
        std 0.02). This class initialises only through those functions (`_init_weights` below), so the shortcut is
        not needed."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "clip_text_model", None):  # the open_clip tower's own (non-module) parameters
            hf_init.normal_(module.positional_embedding, std=0.01)
            hf_init.normal_(module.text_projection, std=module.width**-0.5)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As [`PreTrainedModel.save_pretrained`]; the checkpoint is self-contained remote code: the config's `auto_map`
        sends `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` to this package's files, copied beside the
        weights. Save the processor into the same folder for `AutoProcessor`."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def train(self, mode: bool = True):
        """As `nn.Module.train`, except that the frozen CLIP text tower stays in eval mode."""
        super().train(mode)
        if getattr(self, "clip_text_model", None) is not None:
            self.clip_text_model.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------
    def _check_llm_supports_scoring(self) -> None:
        """Stage 2 computes queries and keys with the decoder layers' own modules; say clearly when it cannot."""
        language_model = self.model.language_model
        layer = language_model.layers[0]
        attention = getattr(layer, "self_attn", None)
        needed = ["q_proj", "k_proj", "v_proj", "head_dim", "scaling", "num_key_value_groups"]
        missing = [name for name in needed if attention is None or not hasattr(attention, name)]
        if not hasattr(layer, "input_layernorm"):
            missing.append("input_layernorm")
        if not hasattr(language_model, "rotary_emb"):
            missing.append("rotary_emb")
        if attention is not None and (hasattr(attention, "q_norm") or hasattr(attention, "k_norm")):
            missing.append("(no q_norm/k_norm)")
        if self._rotary_function() is None:
            missing.append("apply_rotary_pos_emb")
        if missing:
            raise ValueError(
                f"IVTP stage 2 supports Llama-style decoders (LLaVA-1.5's Vicuna); text_config.model_type="
                f"{self.config.text_config.model_type!r} lacks {missing}. Use schedule['llm'] = [] for vision-only "
                "pruning."
            )

    def _rotary_function(self):
        """The decoder's own `apply_rotary_pos_emb`, from the module that defines its attention class."""
        attention = self.model.language_model.layers[0].self_attn
        return getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)

    def _check_prunable_inputs(self, vision_feature_layer, vision_feature_select_strategy, kwargs):
        if vision_feature_layer is not None and vision_feature_layer != self.config.vision_feature_layer:
            raise ValueError(
                f"`vision_feature_layer`={vision_feature_layer} differs from the config's "
                f"{self.config.vision_feature_layer}, which the pruning schedule is built for; leave it unset."
            )
        if (
            vision_feature_select_strategy is not None
            and vision_feature_select_strategy != self.config.vision_feature_select_strategy
        ):
            raise ValueError(
                "`vision_feature_select_strategy` must be left unset (the schedule is built for the config's "
                f"{self.config.vision_feature_select_strategy!r}), got {vision_feature_select_strategy!r}."
            )
        for name in ("image_sizes", "mm_encoder_outputs"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` is not supported with IVTP pruning: pass `pixel_values` (LLaVA-1.5 images).")
        attn_implementation = self.config.text_config._attn_implementation or ""
        if self.config.schedule["llm"] and attn_implementation not in STAGE_2_ATTENTION:
            raise ValueError(
                f"IVTP stage 2 isolates its pseudo-CLS with a 4-D mask; text_config._attn_implementation="
                f"{attn_implementation!r} is not one of {STAGE_2_ATTENTION} (flash-attention takes no 4-D mask, and "
                "flex attention has not been tested). Load the model with attn_implementation='sdpa' (or 'eager'), "
                "or use schedule['llm'] = [] for vision-only pruning."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    @takes_cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        instruction_mask: torch.Tensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_token_spans: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple | IvtpCausalLMOutputWithPast:
        r"""
        Same arguments as [`LlavaForConditionalGeneration.forward`], plus:

        instruction_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The tokens of the instruction (the user's text: not image placeholders, not chat-template role words,
            never answer tokens) that the textual pseudo-CLS (eq. 8) may average.
        clip_input_ids (`torch.LongTensor` of shape `(batch_size, clip_context_length)`, *optional*):
            The instruction tokenized by CLIP's tokenizer (start, content, end, padding), from `LlavaIvtpProcessor`.
        clip_token_spans (`torch.LongTensor` of shape `(batch_size, sequence_length, 2)`, *optional*):
            For each `input_ids` token, the range `[start, end)` of `clip_input_ids` positions whose text overlaps
            it (eq. 7); `(0, 0)` for none. From `LlavaIvtpProcessor`.

        Returns an [`IvtpCausalLMOutputWithPast`]: `logits` has one row per token that reached the last layer, and
        `kept_positions` says which `input_ids` index each row belongs to.
        """
        guidance = {"instruction_mask": instruction_mask, "clip_input_ids": clip_input_ids, "clip_token_spans": clip_token_spans}
        return_dict = kwargs.pop("return_dict", None)
        config = self.config
        config.check_ivtp()  # fields edited after construction are checked before they are used
        pruned_cache = isinstance(cache, IvtpCache) and cache.is_pruned
        pruning = config.pruning_enabled and (pixel_values is not None or pruned_cache)
        if config.pruning_enabled and pixel_values is not None:
            self._check_prefill_cache(cache)  # first: an image after a filled cache is the thing to say
        check_sequence_inputs(
            config, input_ids, inputs_embeds, attention_mask, position_ids, labels,
            past_length=_host_past_length(cache), pruning=pruning,
        )
        check_guidance_shapes(config, guidance, input_ids if input_ids is not None else inputs_embeds)
        if pixel_values is not None:
            check_pixel_values(config, pixel_values)
        request = kwargs.pop("output_hidden_states", None)
        if request is None:
            request = config.output_hidden_states or config.text_config.output_hidden_states
        selection = hidden_state_selection(request, config.text_config.num_hidden_layers)
        if pruning:
            check_output_requests(config, kwargs)
            if config.schedule["llm"]:
                self._check_llm_supports_scoring()
        # IVTP: steps after a pruned prefill attend to the pruned cache, each layer to the tokens it holds.
        if pixel_values is None and pruned_cache:
            given = [name for name, value in guidance.items() if value is not None]
            if given:
                raise ValueError(
                    f"{given} guide pruning at prefill; they cannot be passed with a cache that was already pruned "
                    "(decode steps and conversation continuations take only the new tokens' inputs)."
                )
            self._check_values_without_pixels(input_ids, inputs_embeds, cache, guidance)
            outputs = self._forward_with_pruned_cache(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                logits_to_keep=logits_to_keep,
                output_hidden_states=selection is not False,
                **kwargs,
            )
        # IVTP: without a schedule or without images this is stock Llava (samples without an image pass unpruned).
        elif not config.pruning_enabled or pixel_values is None:
            self._check_values_without_pixels(input_ids, inputs_embeds, cache, guidance)
            outputs = super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                labels=labels,
                logits_to_keep=logits_to_keep,
                use_cache=use_cache,
                return_dict=True,
                # An index list is selected below (stock 5.24 fails on one when images are given).
                output_hidden_states=selection is not False,
                **cache_kwargs(cache),
                **kwargs,
            )
            sequence = (input_ids if input_ids is not None else inputs_embeds).shape
            kept_positions = torch.arange(sequence[1], device=outputs.logits.device).expand(sequence[0], -1)
            outputs = IvtpCausalLMOutputWithPast(
                **outputs, kept_positions=slice_logits_to_keep(kept_positions.unsqueeze(-1), logits_to_keep)[..., 0]
            )
        else:
            self._check_prunable_inputs(vision_feature_layer, vision_feature_select_strategy, kwargs)
            use_cache = use_cache if use_cache is not None else config.text_config.use_cache
            if use_cache and checkpointing_drops_cache(self):
                # As the stock decoder does: checkpointed layers recompute their forward and cannot fill a cache.
                logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing in training; using `use_cache=False`.")
                use_cache = False
            outputs = self._forward_pruned(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                logits_to_keep=logits_to_keep,
                guidance=guidance,
                use_cache=use_cache,
                output_hidden_states=selection is not False,
                **kwargs,
            )
        if selection and outputs.hidden_states is not None:  # an index selection: the others are None, as stock
            outputs.hidden_states = tuple(
                hidden if index in selection else None for index, hidden in enumerate(outputs.hidden_states)
            )
        return outputs if return_dict is not False else outputs.to_tuple()

    def _check_values_without_pixels(self, input_ids, inputs_embeds, cache, guidance: dict) -> None:
        """Values of a forward without `pixel_values` (no schedule, no image, or a step over a pruned cache): token
        and CLIP ids, spans, and, when pruning is on, image placeholders (they would run as text). One read, on a
        prefill (or on the CPU, where it is free); a step over a filled cache on an accelerator reads nothing."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if _host_past_length(cache) != 0 and reference.device.type != "cpu":
            return
        rows = value_rows(input_ids, guidance, reference.device)
        pruning = self.config.pruning_enabled
        if pruning:
            rows["placeholders"] = self._image_token_mask(input_ids, inputs_embeds).sum(dim=1).long()
        facts = read_rows(rows)
        check_values(self.config, facts, guidance)
        if pruning and sum(facts["placeholders"]):
            raise ValueError(
                f"The input holds {sum(facts['placeholders'])} image placeholder tokens (id "
                f"{self.config.image_token_id}) but no `pixel_values`: pass the images as `pixel_values` (the "
                "processor returns them), or remove the placeholders for a text-only prompt. (To continue a "
                "conversation after a pruned prefill, pass the returned cache: it already holds the image.)"
            )

    @staticmethod
    def _check_cache_class(cache) -> None:
        if not isinstance(cache, IvtpCache):
            raise ValueError(
                f"IVTP stores a different set of tokens per layer, which a {type(cache).__name__} cannot "
                f"hold (static, quantized, offloaded and compiled caches included). Pass `{CACHE_ARG}=None` (an "
                "`IvtpCache` is created) or an empty `IvtpCache`; in `generate`, leave `cache_implementation` unset."
            )

    def _check_prefill_cache(self, cache) -> None:
        if cache is None:
            return
        self._check_cache_class(cache)
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"IVTP prunes the image once, at prefill: `pixel_values` need an empty `{CACHE_ARG}`, this one "
                f"holds {cache.get_seq_length()} tokens. To continue a conversation about the same image, "
                "pass the whole conversation's `input_ids` with the returned cache and without `pixel_values`; "
                "`prefill_chunk_size` cannot be used with pruning."
            )

    def _read_layout(self, image_mask: torch.Tensor, attention_mask: torch.Tensor, input_ids, guidance: dict):
        """What the host needs of a batch, in one read from the device: per sample, its image placeholders and the
        index of its last one (-1: none), and whether every token is attended. The input values are checked in the
        same read (`value_rows`: token and CLIP ids, spans)."""
        sequence_length = image_mask.shape[1]
        order = torch.arange(sequence_length, device=image_mask.device)
        rows = {
            "placeholders": image_mask.sum(dim=1),
            "last_placeholder": torch.where(image_mask, order, -1).amax(dim=1),
            "fully_attended": attention_mask.all(dim=1).long(),
            **value_rows(input_ids, guidance, image_mask.device),
        }
        facts = read_rows(rows)  # IVTP: the one host read of a pruned prefill
        check_values(self.config, facts, guidance)
        return facts["placeholders"], facts["last_placeholder"], all(facts["fully_attended"])

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(dim=-1)

    def _forward_pruned(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        cache,
        inputs_embeds,
        labels,
        logits_to_keep,
        guidance,
        use_cache,
        **kwargs,
    ) -> IvtpCausalLMOutputWithPast:
        config = self.config
        image_mask = self._image_token_mask(input_ids, inputs_embeds)
        batch_size, sequence_length = image_mask.shape
        num_patches = config.num_patches
        placeholders = image_mask.sum(dim=1)
        images_per_sample = placeholders // num_patches
        full_attention_mask = (
            torch.ones_like(image_mask) if attention_mask is None else attention_mask.to(image_mask.device).bool()
        )
        # IVTP: the prefill's one wait for the device: each sample's placeholders and layout (see `_HostLayout`).
        placeholder_counts, last_placeholder, fully_attended = self._read_layout(
            image_mask, full_attention_mask, input_ids, guidance
        )
        if any(count % num_patches for count in placeholder_counts) or (
            sum(count // num_patches for count in placeholder_counts) != pixel_values.shape[0]
        ):
            raise ValueError(
                f"Each image needs exactly {num_patches} image placeholder tokens (id {config.image_token_id}): got "
                f"{placeholder_counts} placeholders per sample for {pixel_values.shape[0]} images. Use the "
                "model's processor, which expands `<image>` to the right count."
            )
        if config.schedule["llm"] and any(count > num_patches for count in placeholder_counts):
            raise ValueError(
                "IVTP stage 2 prunes one image per sample (one pseudo-CLS per image block); got "
                f"{[count // num_patches for count in placeholder_counts]} images per sample. Use schedule['llm'] = "
                "[] for several images."
            )

        # IVTP stage 1: group-wise token pruning in the vision tower.
        vision = self._prune_vision_tower(pixel_values)
        image_features = self.model.multi_modal_projector(vision["patch_hidden_states"])
        visual_cls = self.model.multi_modal_projector(vision["cls_hidden_state"])

        # The tokens that enter the LLM: every non-image token, and the placeholders of the kept patches.
        with record_function("ivtp/llm_entry_selection"):  # profiler label only (llava-ivtp bench)
            placeholder_rank = image_mask.long().cumsum(dim=1) - 1
            patch_of_token = torch.where(
                image_mask, placeholder_rank % num_patches, torch.full_like(placeholder_rank, -1)
            )
            image_of_token = torch.where(image_mask, placeholder_rank // num_patches, torch.zeros_like(placeholder_rank))
            image_offset = torch.cumsum(images_per_sample, dim=0) - images_per_sample
            global_image = (image_of_token + image_offset.unsqueeze(1)).clamp_max(pixel_values.shape[0] - 1)
            kept_patch = torch.zeros(pixel_values.shape[0], num_patches, dtype=torch.bool, device=image_mask.device)
            kept_patch.scatter_(1, vision["keep_indices"].to(image_mask.device), True)
            keep = ~image_mask | kept_patch[global_image, patch_of_token.clamp_min(0)]
            layout = _HostLayout.entering_llm(
                sequence_length, num_patches, placeholder_counts, last_placeholder, vision["keep_indices"].shape[1]
            )
            index, slot_valid = _pack_rows(keep, layout.length)

        if inputs_embeds is None:
            token_embeds = self.get_input_embeddings()(input_ids.gather(1, index))
        else:
            token_embeds = inputs_embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        if position_ids is None:
            position_ids = torch.arange(sequence_length, device=image_mask.device).unsqueeze(0)
        logical = _TokenSet(
            hidden_states=token_embeds.new_zeros(batch_size, sequence_length, 0),
            positions=torch.arange(sequence_length, device=image_mask.device).expand(batch_size, -1),
            position_ids=position_ids.to(image_mask.device).expand(batch_size, -1),
            attention_mask=full_attention_mask,
            is_visual=image_mask,
            patch_index=patch_of_token,
        )
        tokens = logical.gather(index, slot_valid)
        is_visual = tokens.is_visual.unsqueeze(-1)
        tokens.hidden_states = token_embeds.masked_scatter(
            is_visual, image_features.to(token_embeds.dtype).reshape(-1, token_embeds.shape[-1])
        )

        # IVTP stage 2: the pseudo-CLS (eq. 5-8), over the kept tokens (instruction tokens are text: always kept).
        relevance, selected = None, None
        if config.schedule["llm"]:
            with record_function("ivtp/guidance"):
                packed_guidance = {
                    name: None if value is None else value.to(index.device).gather(
                        1, index.view(*index.shape, *[1] * (value.ndim - 2)).expand(-1, -1, *value.shape[2:])
                    )
                    for name, value in guidance.items()
                    if name in SEQUENCE_GUIDANCE_INPUTS
                }
                packed_guidance["clip_input_ids"] = guidance["clip_input_ids"]
                if packed_guidance["instruction_mask"] is not None:
                    packed_guidance["instruction_mask"] = packed_guidance["instruction_mask"].bool() & slot_valid
                relevance, selected = self._instruction_relevance(
                    tokens.hidden_states, vision, visual_cls, images_per_sample, packed_guidance
                )
        with record_function("ivtp/pseudo_cls"):
            pseudo = pseudo_cls(
                tokens.hidden_states, selected, fallback=self._sample_visual_cls(visual_cls, images_per_sample)
            )
            # Position of the pseudo-CLS: right after its image block (the first text position after the image).
            pseudo_position = torch.where(image_mask, logical.position_ids, -1).amax(dim=1) + 1
            pseudo_position = torch.where(images_per_sample > 0, pseudo_position, logical.position_ids.amax(dim=1) + 1)

        if not use_cache:
            cache = None
        elif cache is None:
            cache = IvtpCache(config=config.text_config)

        hidden_states, tokens, llm_keep, llm_counts, all_hidden = self._run_language_model(
            tokens, layout, fully_attended, images_per_sample > 0, pseudo, pseudo_position, cache, use_cache,
            **kwargs,
        )
        if use_cache:
            cache.set_logical_length(sequence_length)

        kept_positions = tokens.positions
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        kept_positions = slice_logits_to_keep(kept_positions.unsqueeze(-1), logits_to_keep)[..., 0]

        loss = None
        if labels is not None:
            # IVTP: labels at the kept positions (pruned positions are image tokens); padding slots are ignored.
            kept_labels = labels.to(kept_positions.device).gather(1, kept_positions.clamp_min(0))
            kept_labels = kept_labels.masked_fill(kept_positions < 0, -100)
            loss = self.loss_function(
                logits=logits, labels=kept_labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return IvtpCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden,
            **cache_kwargs(cache),
            **image_output_fields(image_features),
            kept_positions=kept_positions,
            vision_keep_indices=vision["keep_indices"],
            llm_keep_indices=llm_keep,
            vision_token_counts=vision["counts"],
            # Read last, once the whole forward is queued on the device.
            llm_token_counts=tuple(torch.stack(llm_counts).tolist()) if llm_counts else (),
            instruction_relevance=_unpack(relevance, index, slot_valid, sequence_length, float("nan")),
            pseudo_cls_tokens=_unpack(selected, index, slot_valid, sequence_length, False),
        )

    def _instruction_relevance(self, embeddings, vision: dict, visual_cls, images_per_sample, guidance: dict):
        """Relevance of each kept token and the tokens eq. 8 averages, by `config.guidance` (paper Table 6).

        Returns `(relevance, selected)`, `(batch, kept)` each, or `(None, None)` when the pseudo-CLS is the visual
        CLS (mode `"visual_cls"`, or the mode's inputs are missing: warned once, naming them).
        """
        config = self.config
        mode = config.guidance
        if mode == "visual_cls":
            return None, None
        needed = {
            "instruction_mean": ["instruction_mask"],
            "embedding_relevance": ["instruction_mask"],
            "clip_relevance": ["instruction_mask", "clip_input_ids", "clip_token_spans"],
        }[mode]
        missing = [name for name in needed if guidance[name] is None]
        if mode == "clip_relevance" and getattr(self, "clip_text_model", None) is None:
            missing.append("config.clip_text_encoder (the CLIP text tower)")
        if missing:
            logger.warning_once(
                f"IVTP guidance {mode!r} needs {missing}, which were not given; stage 2 prunes with the visual CLS as "
                "the pseudo-CLS. Use LlavaIvtpProcessor to get the guidance inputs."
            )
            return None, None
        instruction = guidance["instruction_mask"]
        if mode == "instruction_mean":
            return None, instruction
        if mode == "embedding_relevance":
            reference = self._sample_visual_cls(visual_cls, images_per_sample)
            relevance = cosine_relevance(embeddings, reference)
            relevance = torch.where(instruction, relevance, torch.full_like(relevance, float("nan")))
            return relevance, instruction & (relevance >= config.tau)
        with torch.no_grad():
            with record_function("ivtp/guidance/clip_image_embedding"):
                image_embedding = self.clip_visual_projection(
                    self.final_clip_cls(vision["feature_layer_hidden_states"])
                )
            clip_input_ids = guidance["clip_input_ids"].to(image_embedding.device)
            with record_function("ivtp/guidance/clip_text_tower"):
                text_features = clip_token_features(self.clip_text_model, clip_input_ids)
            reference = self._sample_visual_cls(image_embedding, images_per_sample.to(image_embedding.device))
            clip_relevance = cosine_relevance(text_features, reference.to(text_features.dtype))  # eq. 6
            relevance, has_relevance = span_mean(  # eq. 7
                clip_relevance, clip_content_mask(clip_input_ids), guidance["clip_token_spans"].to(clip_relevance.device)
            )
        relevance, has_relevance = relevance.to(instruction.device), has_relevance.to(instruction.device)
        has_relevance = has_relevance & instruction
        relevance = torch.where(has_relevance, relevance, torch.full_like(relevance, float("nan")))
        return relevance, has_relevance & (relevance >= config.tau)

    @staticmethod
    def _sample_visual_cls(visual_cls: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
        """The projected visual CLS of each sample's (only) image; zeros for samples without an image."""
        has_image = images_per_sample > 0
        first_image = (torch.cumsum(images_per_sample, dim=0) - images_per_sample).clamp_max(visual_cls.shape[0] - 1)
        picked = visual_cls[first_image.to(visual_cls.device)]
        return picked * has_image.to(picked.device, picked.dtype).unsqueeze(-1)

    # ------------------------------------------------------------------------------------------------------------
    # Stage 1: the vision tower
    # ------------------------------------------------------------------------------------------------------------
    def _prune_vision_tower(self, pixel_values: torch.Tensor) -> dict:
        """Run the CLIP encoder up to the feature layer, pruning patches at the top layer of each group.

        Adapted from transformers 5.23 `CLIPVisionModel.forward` / `CLIPEncoder.forward`.
        """
        vision_tower = self.model.vision_tower
        hidden_states = vision_tower.embeddings(pixel_values)
        hidden_states = vision_tower.pre_layrnorm(hidden_states)
        num_images = hidden_states.shape[0]
        keep_indices = torch.arange(self.config.num_patches, device=hidden_states.device).expand(num_images, -1)
        layers = vision_tower.encoder.layers
        counts = self.config.schedule["vision"]
        groups = self.config.vision_layer_groups
        if not counts:  # IVTP: stage 1 off -- run the feature layers unpruned.
            for layer in layers[: groups[-1][1] + 1]:
                hidden_states = layer(hidden_states, None)
        kept_counts = []
        for (first, last), num_keep in zip(groups, counts):
            lower_attentions = []
            for layer_idx in range(first, last + 1):
                if layer_idx < last:  # lower layers: the full attention matrix (rows: every token)
                    hidden_states, attention = _clip_layer_scored(layers[layer_idx], hidden_states, top=False)
                    lower_attentions.append(attention)
                else:  # top layer: only the CLS row, and the value norms of eq. 4
                    hidden_states, (top_cls_row, value_norms) = _clip_layer_scored(
                        layers[layer_idx], hidden_states, top=True
                    )
            with torch.no_grad(), record_function("ivtp/vision_scoring"):  # profiler label only
                rollout = rollout_cls_row(top_cls_row, lower_attentions, cls_index=0)  # eq. 3
                scores = token_scores(rollout[:, 1:], value_norms[:, 1:])  # eq. 4, CLS excluded
                keep = select_keep_indices(scores, num_keep)
            with record_function("ivtp/vision_selection"):
                patches = hidden_states[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
                hidden_states = torch.cat([hidden_states[:, :1], patches], dim=1)  # CLS always kept, order kept
                keep_indices = keep_indices.gather(1, keep)
            kept_counts.append(hidden_states.shape[1] - 1)
        return {
            "patch_hidden_states": hidden_states[:, 1:],
            "cls_hidden_state": hidden_states[:, 0],
            "feature_layer_hidden_states": hidden_states,
            "keep_indices": keep_indices,
            "counts": tuple(kept_counts),
        }

    def final_clip_cls(self, feature_layer_hidden_states: torch.Tensor) -> torch.Tensor:
        """The vision tower's final CLS (after its last layer and `post_layernorm`) from the feature layer's output.

        The layers between the feature layer and the last one run on the kept tokens; the last layer computes only
        its CLS query row -- never a second vision pass.

        Args:
            feature_layer_hidden_states: `(num_images, 1 + kept, hidden)`, CLS first.

        Returns:
            `(num_images, hidden)`.
        """
        vision_tower = self.model.vision_tower
        layers = vision_tower.encoder.layers
        first_unrun = self.config.vision_layer_groups[-1][1] + 1
        hidden_states = feature_layer_hidden_states
        for layer in layers[first_unrun:-1]:
            hidden_states = layer(hidden_states, None)
        if first_unrun < len(layers):
            hidden_states = _clip_layer_cls_row(layers[-1], hidden_states)
        return vision_tower.post_layernorm(hidden_states[:, 0])

    # ------------------------------------------------------------------------------------------------------------
    # Stage 2: the language model
    # ------------------------------------------------------------------------------------------------------------
    def _run_language_model(
        self,
        tokens: _TokenSet,
        layout: _HostLayout,
        fully_attended: bool,
        has_image: torch.Tensor,
        pseudo: torch.Tensor,
        pseudo_position: torch.Tensor,
        cache,
        use_cache,
        **kwargs,
    ):
        """The decoder loop of `LlamaModel.forward` over pruned token sets (adapted from transformers 5.23).

        Layers are run in segments that see one token set: each stage-2 group, then the remaining layers. Sizes come
        from `layout` (host-side), so the loop does not wait for the device; `fully_attended` says the input had no
        padding; `has_image` is the device-side twin of `layout.has_image` (copying host values to a GPU would wait
        for it). Returns the kept counts as device tensors, which the caller reads once the forward is queued.
        """
        config = self.config
        language_model = self.model.language_model
        output_hidden_states = kwargs.pop("output_hidden_states")  # resolved by `forward`
        groups = config.llm_layer_groups
        device = tokens.hidden_states.device
        has_image = has_image.to(device)
        if groups:
            # IVTP: the pseudo-CLS slot sits after every real token, so causality alone keeps real tokens from
            # attending to it; its mask row lets it see the tokens up to its image (and itself).
            with record_function("ivtp/llm_selection"):  # profiler label only (llava-ivtp bench)
                tokens = tokens.append(pseudo, pseudo_position.to(tokens.position_ids.device))
                layout = layout.append_slot()
        segments = self._llm_segments()

        all_hidden = () if output_hidden_states else None
        llm_keep, kept_counts = [], []
        any_image = bool(groups) and any(layout.has_image)
        image_rows = _true_indices(has_image.unsqueeze(0), len(layout.image_rows))[0] if any_image else None
        for segment_index, (first, last, prunes) in enumerate(segments):
            with record_function("ivtp/segment_setup"):  # a mask and rotary table per segment (stock: one)
                # Without padding slots or input padding the 2-D mask is all ones: leave it out (nothing to read).
                unpadded = fully_attended and not any(layout.pads)
                mask = self._segment_mask(tokens, cache, first, with_pseudo=prunes, unpadded=unpadded)
                position_embeddings = language_model.rotary_emb(
                    tokens.hidden_states, position_ids=tokens.position_ids
                )
            hidden_states = tokens.hidden_states
            scoring = prunes and any_image
            if scoring:
                with torch.no_grad(), record_function("ivtp/llm_scoring"):
                    block = self._visual_block(tokens, image_rows, layout.visual, layout.visual_end())
            lower_attentions = []
            held = tokens.positions[:, :-1] if prunes else tokens.positions  # one record shared by the segment
            for layer_idx in range(first, last + 1):
                layer = language_model.layers[layer_idx]
                if output_hidden_states:
                    all_hidden += (hidden_states[:, :-1] if prunes else hidden_states,)
                layer_input = hidden_states
                hidden_states = layer(
                    hidden_states,
                    attention_mask=mask,
                    position_ids=tokens.position_ids,
                    **cache_kwargs(cache),
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
                if scoring:
                    with torch.no_grad(), record_function("ivtp/llm_scoring"):
                        device = hidden_states.device  # the layer's (a device map may put layers apart)
                        cached = _layer_keys_values(cache, layer_idx, layer_input.shape[1], device)
                        scored = self._llm_attention_block(
                            layer, layer_input.to(device), block.to(device), layer_idx == last, cached
                        )
                    if layer_idx < last:
                        lower_attentions.append(scored[0])
                    else:
                        top_row, value_norms = scored
                if cache is not None:
                    if prunes:
                        cache.drop_last_token(layer_idx)  # IVTP: the pseudo-CLS never enters the KV cache
                    cache.record_positions(layer_idx, held)
            tokens.hidden_states = hidden_states
            if not prunes:
                continue
            num_keep = config.schedule["llm"][segment_index]
            if scoring:
                with torch.no_grad(), record_function("ivtp/llm_scoring"):
                    rollout = rollout_cls_row(top_row, lower_attentions, cls_index=top_row.shape[-1] - 1)
                    scores = token_scores(rollout[:, :-1], value_norms)  # eq. 4 over the visual tokens
                    selected = select_keep_indices(scores, num_keep)
            with record_function("ivtp/llm_selection"):
                keep = ~tokens.is_visual
                keep_patches = torch.full(
                    (tokens.is_visual.shape[0], num_keep), -1, dtype=torch.long, device=keep.device
                )
                if scoring:
                    chosen_slots = block.visual_slots.gather(1, selected)
                    keep[image_rows] = keep[image_rows].scatter(1, chosen_slots, True)
                    keep_patches[image_rows] = tokens.patch_index[image_rows].gather(1, chosen_slots)
                llm_keep.append(keep_patches)
                layout = layout.keep_visual(num_keep) if scoring else layout
                index, slot_valid = _pack_rows(keep, layout.length)
                tokens = tokens.gather(index, slot_valid)
                # Visual tokens per image, off the pruned tensors; read by the caller with the logits.
                kept_counts.append(torch.where(has_image, tokens.is_visual.sum(dim=1), 0).max())
                if segment_index == len(groups) - 1:
                    tokens = tokens.drop_last()  # IVTP: the pseudo-CLS leaves after the last stage-2 group
                    layout = layout.drop_last_slot()

        hidden_states = language_model.norm(tokens.hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, tokens, tuple(llm_keep), kept_counts, all_hidden

    def _llm_segments(self) -> list[tuple[int, int, bool]]:
        """`(first_layer, last_layer, prunes)` of each run of decoder layers that sees one token set."""
        groups = self.config.llm_layer_groups
        num_layers = self.config.text_config.num_hidden_layers
        segments = [(first, last, True) for first, last in groups]
        start = groups[-1][1] + 1 if groups else 0
        if start < num_layers:
            segments.append((start, num_layers - 1, False))
        return segments

    # ------------------------------------------------------------------------------------------------------------
    # Steps after prefill: decoding (and conversation continuation) with the pruned cache
    # ------------------------------------------------------------------------------------------------------------
    def _forward_with_pruned_cache(
        self,
        input_ids,
        attention_mask,
        position_ids,
        cache: IvtpCache,
        inputs_embeds,
        labels,
        logits_to_keep,
        **kwargs,
    ) -> IvtpCausalLMOutputWithPast:
        """New tokens through the decoder when each layer's cache holds its own (pruned) token set.

        Per segment of layers that hold one token set, the 2-D attention mask (logical: cache length + new tokens,
        as `generate` keeps it) is gathered at the positions the segment holds, then causal masking runs over the
        layer's physical keys. New tokens get logical positions (and, unless given, rotary positions) after the cache.
        """
        language_model = self.model.language_model
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch_size, num_new = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_length = cache.get_seq_length()
        cached_batch = cache.layers[0].keys.shape[0]
        if cached_batch != batch_size:
            raise ValueError(f"The cache holds {cached_batch} samples but {batch_size} were given.")
        if attention_mask is None:  # its shape, when given, was checked by `check_sequence_inputs`
            attention_mask = torch.ones(batch_size, past_length + num_new, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(device).bool()
        new_positions = torch.arange(past_length, past_length + num_new, device=device).expand(batch_size, -1)
        if position_ids is None:
            position_ids = new_positions
        position_ids = position_ids.to(device).expand(batch_size, -1)
        position_embeddings = language_model.rotary_emb(inputs_embeds, position_ids=position_ids)
        output_hidden_states = kwargs.pop("output_hidden_states")  # resolved by `forward`
        kwargs.pop("use_cache", None)

        all_hidden = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for first, last, _ in self._llm_segments():
            held = cache.layer_positions[first]
            if held is None:
                raise ValueError(f"The IvtpCache has no record of the tokens layer {first} holds; prefill again.")
            kv_positions = torch.cat([held.to(device), new_positions], dim=1)
            kv_mask = attention_mask.gather(1, kv_positions.clamp_min(0)) & (kv_positions >= 0)
            mask = create_causal_mask(
                config=self.config.text_config,
                inputs_embeds=hidden_states,
                attention_mask=kv_mask,
                **cache_kwargs(cache),
                position_ids=None,
                layer_idx=first,
                # IVTP: an explicit mask per segment; checking whether it could be skipped reads the device, once
                # per segment and step (stock Llava reads once per step).
                allow_is_causal_skip=False,
            )
            for layer_idx in range(first, last + 1):
                if output_hidden_states:
                    all_hidden += (hidden_states,)
                hidden_states = language_model.layers[layer_idx](
                    hidden_states,
                    attention_mask=mask,
                    position_ids=position_ids,
                    **cache_kwargs(cache),
                    use_cache=True,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
                cache.record_positions(layer_idx, kv_positions)
        cache.set_logical_length(past_length + num_new)
        hidden_states = language_model.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)

        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return IvtpCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden,
            **cache_kwargs(cache),
            kept_positions=slice_logits_to_keep(new_positions.unsqueeze(-1), logits_to_keep)[..., 0],
        )

    # ------------------------------------------------------------------------------------------------------------
    # generate
    # ------------------------------------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """IVTP: `generate` gets an `IvtpCache`; caches that cannot hold per-layer token sets are refused up front."""
        if self.config.pruning_enabled and model_kwargs.get(CACHE_ARG) is not None:
            self._check_cache_class(model_kwargs[CACHE_ARG])
        if (
            not self.config.pruning_enabled
            or model_kwargs.get(CACHE_ARG) is not None
            or generation_config.use_cache is False
        ):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"`cache_implementation={generation_config.cache_implementation!r}` cannot hold IVTP's pruned cache "
                "(each layer holds a different set of tokens, so static, quantized, offloaded and compiled caches do "
                "not apply). Leave `cache_implementation` unset: an `IvtpCache` (a `DynamicCache`) is used."
            )
        model_kwargs[CACHE_ARG] = IvtpCache(config=self.config.text_config)

    @takes_cache_kwarg
    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        """Stock inputs, plus IVTP's guidance inputs on the steps that prune.

        Like `pixel_values`, guidance inputs reach the model on the prefill step only (with a cache) or on every step
        (`use_cache=False`, which prunes from scratch each step). On the first step they go as given, so the forward
        checks them against `input_ids` exactly as when it is called directly; on later steps without a cache the
        tokens generated since are appended as not-instruction (zeros), which is the only padding done here.
        """
        given = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        if is_first_iteration and isinstance(cache, IvtpCache) and cache.is_pruned:  # a conversation continued
            held = cache.get_seq_length()
            # transformers also takes only the new tokens when `attention_mask` covers the whole conversation
            only_new_with_full_mask = attention_mask is not None and attention_mask.shape[-1] == held + given
            if given <= held and not only_new_with_full_mask:
                raise ValueError(
                    f"The cache holds the first {held} tokens of the conversation (the prompt with its image "
                    f"placeholders, and the tokens generated since); `input_ids` must hold the whole conversation: those "
                    f"{held} tokens, then the new ones. Got {given} tokens: pass `generated.sequences` with the new "
                    "turn appended, not the new turn alone."
                )
        guidance = {name: kwargs.pop(name) for name in GUIDANCE_INPUTS if kwargs.get(name) is not None}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            **cache_kwargs(cache),
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if guidance and (is_first_iteration or not kwargs.get("use_cache", True)):
            step_inputs = model_inputs.get("input_ids")
            if step_inputs is None:
                step_inputs = model_inputs["inputs_embeds"]
            step = step_inputs.shape[1]
            for name, value in guidance.items():
                if name in SEQUENCE_GUIDANCE_INPUTS:
                    if not is_first_iteration and step > value.shape[1]:
                        # a later step without a cache: the generated tokens are not instruction, overlap no CLIP token
                        padding = value.new_zeros(value.shape[0], step - value.shape[1], *value.shape[2:])
                        value = torch.cat([value, padding], dim=1)
                    elif is_first_iteration and step < given:
                        # a first step over a filled cache takes the new tokens only: so does their guidance, once it
                        # is known to cover the whole input as `input_ids` does
                        if value.shape[1] != given:
                            raise ValueError(
                                f"`{name}` must have one entry per token of `input_ids` ({given}), got "
                                f"{value.shape[1]}."
                            )
                        value = value[:, given - step :]
                model_inputs[name] = value.to(step_inputs.device)
        return model_inputs

    def _segment_mask(self, tokens: _TokenSet, cache, layer_idx: int, with_pseudo: bool, unpadded: bool = False):
        """The 4-D mask of one segment: causal over the kept tokens (order is kept), padding, pseudo-CLS rules.

        `unpadded` (known on the host) says every slot is an attended token: the padding mask is left out, which
        spares building it and the backend's check of it (a wait for the device).

        Segments with the pseudo-CLS build their mask through the attention implementation's registered mask
        function with broadcasting (`use_vmap=False`): the pseudo-CLS rule is index-based, and `create_causal_mask`
        would `vmap` it element by element (6 ms against 1 ms per segment of 633 tokens on 2 CPU cores). The
        prefill's cache is empty (`_check_prefill_cache`), so keys are the segment's tokens.
        """
        if not with_pseudo:
            return create_causal_mask(
                config=self.config.text_config,
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
        slots = torch.arange(num_slots, device=device)
        # Last visual slot of each sample; samples without an image let the pseudo-CLS see only itself.
        visual_end = torch.where(tokens.is_visual.to(device), slots, -1).amax(dim=1)

        def pseudo_cls_rule(batch_idx, head_idx, q_idx, kv_idx):  # index-based: broadcasts over (b, h, q, kv)
            return (q_idx != pseudo_slot) | (kv_idx <= visual_end[batch_idx]) | (kv_idx == pseudo_slot)

        mask_function = ALL_MASK_ATTENTION_FUNCTIONS[self.config.text_config._attn_implementation]
        return mask_function(
            batch_size=batch_size,
            q_length=num_slots,
            kv_length=num_slots,
            mask_function=and_masks(causal_mask_function, pseudo_cls_rule),
            attention_mask=None if unpadded else tokens.attention_mask.to(device=device, dtype=torch.bool),
            allow_is_causal_skip=False,
            dtype=tokens.hidden_states.dtype,
            config=self.config.text_config,
            use_vmap=False,
            device=device,
        )

    def _visual_block(
        self, tokens: _TokenSet, image_rows: torch.Tensor, num_visual: int, key_end: int
    ) -> _VisualBlock:
        """The index bookkeeping of stage-2 scoring for one segment (its token set is fixed across its layers).

        Rows of the block: the visual tokens (`num_visual` per image), then the pseudo-CLS. Keys: every slot before
        `key_end` (past the last visual one, from the host's layout) plus the pseudo-CLS, so the softmax is over
        everything each row attends to. Only samples with an image count.
        """
        is_visual = tokens.is_visual[image_rows]
        num_images, num_slots = is_visual.shape
        device = is_visual.device
        pseudo_slot = num_slots - 1
        visual_slots = _true_indices(is_visual, num_visual)
        key_slots = torch.cat([torch.arange(key_end, device=device), torch.full((1,), pseudo_slot, device=device)])
        pseudo_column = torch.full((num_images, 1), key_end, dtype=torch.long, device=device)
        block_columns = torch.cat([visual_slots, pseudo_column], dim=1)  # in key coordinates

        # Which keys each row attends to: causal by slot, padding, and the pseudo-CLS's own rule.
        row_slots = torch.cat([visual_slots, torch.full_like(pseudo_column, pseudo_slot)], dim=1)
        key_grid = key_slots.view(1, 1, -1)
        visual_end = visual_slots[:, -1].view(-1, 1, 1)
        is_pseudo_row = (row_slots == pseudo_slot).unsqueeze(-1)
        allowed = torch.where(
            is_pseudo_row, (key_grid <= visual_end) | (key_grid == pseudo_slot), key_grid <= row_slots.unsqueeze(-1)
        )
        allowed = allowed & tokens.attention_mask[image_rows][:, key_slots].unsqueeze(1)
        key_positions = tokens.position_ids[image_rows][:, key_slots]
        cos, sin = self.model.language_model.rotary_emb(tokens.hidden_states, position_ids=key_positions)
        row_index = block_columns.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        return _VisualBlock(
            image_rows, visual_slots, key_slots, block_columns, allowed, cos, sin,
            row_slots=row_slots, row_cos=cos.gather(1, row_index), row_sin=sin.gather(1, row_index),
        )

    def _llm_attention_block(
        self, layer, hidden_states: torch.Tensor, block: _VisualBlock, top: bool, cached: tuple | None = None
    ):
        """Attention probabilities of one decoder layer over the visual block and the pseudo-CLS row.

        Keys (and the values of eq. 4) are the layer's own: `cached` holds what the layer just wrote to the cache,
        `(batch, kv_heads, slots, head_dim)` after its rotary embedding. Without a cache (`use_cache=False`, gradient
        checkpointing) they are computed again with the layer's `input_layernorm`, `k_proj`, `v_proj` and rotary
        embedding. Queries are computed from the layer's input for the block rows only. Returns the block restricted
        to `[visual tokens..., pseudo-CLS]` columns: a `(V + 1, V + 1)` matrix per image sample for a lower layer;
        for the top layer the pseudo-CLS row only and the value norms of the visual tokens (eq. 4).
        """
        attention = layer.self_attn
        apply_rotary = self._rotary_function()
        block_rows = slice(-1, None) if top else slice(None)  # the top layer needs the pseudo-CLS row only
        allowed = block.allowed[:, block_rows]
        rows = block.image_rows.unsqueeze(-1)  # indexing (rows, slots) together copies only the rows needed

        def heads(states):
            return states.view(states.shape[0], states.shape[1], -1, attention.head_dim).transpose(1, 2)

        def gather_rows(states, columns):
            return states.gather(1, columns.unsqueeze(-1).expand(-1, -1, states.shape[-1]))

        if cached is None:
            key_hidden = layer.input_layernorm(hidden_states[rows, block.key_slots])
            keys = heads(attention.k_proj(key_hidden))
            keys, _ = apply_rotary(keys, keys, block.cos, block.sin)
            query_hidden = gather_rows(key_hidden, block.block_columns[:, block_rows])
        else:  # (images, keys, kv_heads, head_dim) -> (images, kv_heads, keys, head_dim)
            keys = cached[0][rows, :, block.key_slots].transpose(1, 2)
            query_hidden = layer.input_layernorm(hidden_states[rows, block.row_slots[:, block_rows]])
        queries = heads(attention.q_proj(query_hidden))
        queries, _ = apply_rotary(queries, queries, block.row_cos[:, block_rows], block.row_sin[:, block_rows])
        if attention.num_key_value_groups > 1:
            keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)
        probabilities = attention_probabilities(queries, keys, attention.scaling, allowed)
        columns = block.block_columns.unsqueeze(1).expand(-1, probabilities.shape[1], -1)
        restricted = probabilities.gather(2, columns)
        if not top:
            return (restricted,)
        if cached is None:
            value_norms = attention.v_proj(gather_rows(key_hidden, block.visual_slots)).float().norm(dim=-1)
        else:  # the norm over every head of each visual token's value: (images, visual, kv_heads, head_dim)
            value_norms = torch.linalg.vector_norm(cached[1][rows, :, block.visual_slots].float(), dim=(2, 3))
        return restricted[:, 0], value_norms


def _host_past_length(cache) -> int | None:
    """The cache's length before this call as a host int (0 without a cache); `None` where it is not known on the
    host without a read (a static cache counts its tokens on the device)."""
    if cache is None:
        return 0
    if getattr(cache, "is_compileable", False):
        return None
    length = cache.get_seq_length()
    return length if isinstance(length, int) else None


def _layer_keys_values(
    cache, layer_idx: int, num_slots: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values a decoder layer just wrote to the prefill's cache, if it wrote them (all `num_slots`)
    and they are still on the layer's `device`; otherwise `None`, and scoring computes them again."""
    if cache is None or layer_idx >= len(cache.layers):
        return None
    layer_cache = cache.layers[layer_idx]
    keys = getattr(layer_cache, "keys", None)
    if keys is None or keys.ndim != 4 or keys.shape[-2] != num_slots:
        return None  # the layer ran without the cache (gradient checkpointing in training drops it)
    if keys.device != device:
        return None  # an offloading cache has moved them already
    return keys, layer_cache.values


# ------------------------------------------------------------------------------------------------------------------
# CLIP encoder layer helpers: queries, keys and values from the layer's own modules.
# ------------------------------------------------------------------------------------------------------------------
def _clip_heads(attention, states: torch.Tensor) -> torch.Tensor:
    return states.view(states.shape[0], states.shape[1], -1, attention.head_dim).transpose(1, 2)


def _clip_layer_scored(layer, hidden_states: torch.Tensor, top: bool):
    """One CLIP encoder layer that also returns what stage-1 scoring reads from its own queries, keys and values.

    Same arithmetic as `CLIPEncoderLayer.forward` with eager attention (pre-norm attention and MLP, each with a
    residual; softmax in float32; attention dropout in training), computed here so that the probabilities are not
    computed twice (in float32 this equals eager CLIP exactly; against sdpa CLIP it differs as eager does):

    - a lower layer of a group returns its head-averaged attention probabilities `(images, tokens, tokens)`, float32.
      Rollout needs every row, so the layer's output is computed from the same probabilities (`softmax(QK^T) V`);
    - the top layer returns the CLS row of its probabilities `(images, tokens)` and the value norms of eq. 4
      `(images, tokens)`; its output comes from `scaled_dot_product_attention` on the same queries, keys and values.

    The layer's submodules are called (`layer_norm1`, `q_proj`, `k_proj`, `v_proj`, `out_proj`, `layer_norm2`,
    `mlp`), so adapters on them apply; the layer's gradient checkpointing does not (the vision tower is frozen in
    LLaVA-1.5's training).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    queries = _clip_heads(attention, attention.q_proj(normed))
    keys = _clip_heads(attention, attention.k_proj(normed))
    flat_values = attention.v_proj(normed)
    values = _clip_heads(attention, flat_values)
    dropout = attention.dropout if attention.training else 0.0
    if top:
        attended = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout, scale=attention.scale)
        with torch.no_grad(), record_function("ivtp/vision_scoring"):  # profiler label only
            scored = (
                attention_probabilities(queries[:, :, :1], keys, attention.scale)[:, 0],
                flat_values.float().norm(dim=-1),
            )
    else:  # as CLIP's eager attention: logits in the model's dtype, softmax in float32 (the scores are float32)
        logits = torch.matmul(queries, keys.transpose(-1, -2)) * attention.scale
        probabilities = logits.softmax(dim=-1, dtype=torch.float32)
        with torch.no_grad(), record_function("ivtp/vision_scoring"):
            scored = probabilities.mean(dim=1)
        probabilities = F.dropout(probabilities.to(values.dtype), p=dropout, training=attention.training)
        attended = torch.matmul(probabilities, values)
    return _clip_layer_after_attention(layer, hidden_states, attended), scored


def _clip_layer_cls_row(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder layer computed for its CLS query only: `(images, 1, hidden)`.

    Same arithmetic as `CLIPEncoderLayer.forward` (pre-norm attention and MLP, each with a residual), with one
    query row: every key and value, one output row.
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    queries = _clip_heads(attention, attention.q_proj(normed[:, :1]))
    keys = _clip_heads(attention, attention.k_proj(normed))
    values = _clip_heads(attention, attention.v_proj(normed))
    attended = F.scaled_dot_product_attention(queries, keys, values, scale=attention.scale)
    return _clip_layer_after_attention(layer, hidden_states[:, :1], attended)


def _clip_layer_after_attention(layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of `CLIPEncoderLayer.forward` after the attention product `attended` `(images, heads, rows, head_dim)`:
    heads merged, `out_proj` added to `residual` `(images, rows, hidden)`, then the MLP with its residual."""
    attended = attended.transpose(1, 2).reshape(residual.shape[0], residual.shape[1], -1)
    hidden_states = residual + layer.self_attn.out_proj(attended)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


# Remote code: `save_pretrained` copies this file and every file it imports relatively, and writes
# `auto_map["AutoModelForImageTextToText"]` (`save_pretrained` adds "AutoModel" for the same class).
LlavaIvtpForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["LlavaIvtpForConditionalGeneration", "IvtpCausalLMOutputWithPast"]
