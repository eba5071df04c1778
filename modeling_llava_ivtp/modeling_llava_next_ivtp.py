"""LLaVA-NeXT-IVTP: `LlavaNextForConditionalGeneration` (LLaVA-1.6, AnyRes) as a second host of the pruning methods.

LLaVA-NeXT feeds one image as crops -- the base image resized to the vision tower's size, then the tiles of the
grid `image_grid_pinpoints` chooses for the image's size -- each through the same CLIP. The tiles' features are
stitched into one grid, unpadded to the image's aspect ratio and given the learned `image_newline` after each row;
the base crop's 576 tokens come first. An image thus has 1,000-2,900 visual tokens (LLaVA-1.6-7B), and images of
different aspect ratios have different counts.

The host holds the same pruning fields as `LlavaIvtpForConditionalGeneration` (`IvtpNextConfig`), loads llava-hf
LLaVA-NeXT checkpoints unchanged, and with pruning off is stock LLaVA-NeXT. How each method spends its budget over
an image's crops, and what it does with the unpadding and the newline tokens, is in `docs/llava-next.md`; the
pruned forward for this host is not implemented yet: a model whose config prunes is refused.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, LlavaNextForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_llava_ivtp import IvtpNextConfig
from .generation_ivtp import PrunedGeneration, host_past_length
from .layout_next import NextLayout, next_layout
from .modeling_llava_ivtp import IvtpHost, stock_kept_positions
from .outputs_ivtp import IvtpCausalLMOutputWithPast
from .transformers_compat import ActivationCheckpointingNames, cache_kwargs, takes_cache_kwarg
from .validation_ivtp import check_guidance_shapes, check_sequence_inputs


# llava-hf LLaVA-NeXT checkpoints store `language_model.*`, `vision_tower.*`, `multi_modal_projector.*` and
# `image_newline` at the top: the stock "llava_next" mapping renames them (registered for this class, as for
# `LlavaIvtpForConditionalGeneration`; the installed package and the remote-code copy both run this line).
_NEXT_MAPPING = get_checkpoint_conversion_mapping("llava_next")
if _NEXT_MAPPING is None:  # every supported release has it; without it llava-hf keys would load as missing
    raise ImportError("transformers has no checkpoint conversion mapping for 'llava_next'.")
register_checkpoint_conversion_mapping("LlavaNextIvtpForConditionalGeneration", _NEXT_MAPPING, overwrite=True)


def check_next_pruning(config: IvtpNextConfig) -> None:
    """The NeXT host runs with pruning off only (for now): a config that prunes is refused, naming the fields."""
    config.check_ivtp()
    if config.pruning_enabled:
        raise ValueError(
            f"LlavaNextIvtpForConditionalGeneration does not prune yet: pruning_method={config.pruning_method!r}"
            + (f" with schedule={config.schedule}" if config.schedule is not None else "")
            + " is not supported on the LLaVA-NeXT host. Set `pruning_method=None` (or, for 'ivtp', `schedule=None`) "
            "to run stock LLaVA-NeXT, or use LlavaIvtpForConditionalGeneration (LLaVA-1.5) to prune."
        )


class LlavaNextIvtpForConditionalGeneration(
    IvtpHost, ActivationCheckpointingNames, PrunedGeneration, LlavaNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT (LLaVA-1.6) with the pruning fields of LLaVA-IVTP (`IvtpNextConfig`).

    Same modules and parameter names as [`LlavaNextForConditionalGeneration`], so llava-hf LLaVA-NeXT checkpoints
    load unchanged; with `clip_text_encoder` set it also holds IVTP's frozen CLIP text tower and visual projection.
    With pruning off (`pruning_method=None`, or `"ivtp"` without a schedule) the forward is stock LLaVA-NeXT's, and
    its output also says which `input_ids` index each row of `logits` belongs to (`kept_positions`). A config that
    prunes is refused (see the module's docstring).
    """

    config_class = IvtpNextConfig
    config: IvtpNextConfig

    def __init__(self, config: IvtpNextConfig):
        check_next_pruning(config)
        super().__init__(config)
        self._add_clip_parts()
        self._use_recording_backends()

    def image_layouts(self, image_sizes) -> list[NextLayout]:
        """Per image of `image_sizes` `(num_images, 2)` (height, width; a tensor or a list), where each of its packed
        visual tokens comes from: a crop's patch or the newline (`layout_next.py`)."""
        vision = self.config.vision_config
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        return [next_layout(size, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
                for size in sizes]

    @takes_cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
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
        Same arguments as [`LlavaNextForConditionalGeneration.forward`], plus the guidance inputs of
        [`LlavaIvtpForConditionalGeneration.forward`] (`instruction_mask`, `clip_input_ids`, `clip_token_spans`),
        whose shapes are checked; with pruning off nothing reads them (`generate` passes them on its first step only,
        as `PrunedGeneration` does for LLaVA-1.5).

        Returns an [`IvtpCausalLMOutputWithPast`]: stock LLaVA-NeXT's output, and `kept_positions`, the `input_ids`
        index of each row of `logits`.
        """
        guidance = {"instruction_mask": instruction_mask, "clip_input_ids": clip_input_ids, "clip_token_spans": clip_token_spans}
        check_next_pruning(self.config)  # fields edited after construction
        self._use_recording_backends()
        return_dict = kwargs.pop("return_dict", None)
        check_sequence_inputs(
            self.config, input_ids, inputs_embeds, attention_mask, position_ids, labels,
            past_length=host_past_length(cache), pruning=False,
        )
        reference = input_ids if input_ids is not None else inputs_embeds
        check_guidance_shapes(self.config, guidance, reference)
        outputs = super().forward(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, return_dict=True, **cache_kwargs(cache), **kwargs,
        )
        outputs = IvtpCausalLMOutputWithPast(
            **outputs, kept_positions=stock_kept_positions(reference, logits_to_keep, outputs.logits.device)
        )
        return outputs if return_dict is not False else outputs.to_tuple()


# `auto_map["AutoModelForImageTextToText"]` (`save_pretrained` adds "AutoModel" for the same class).
LlavaNextIvtpForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["LlavaNextIvtpForConditionalGeneration"]
