"""LLaVA-NeXT-IVTP: `LlavaNextForConditionalGeneration` (LLaVA-1.6, AnyRes) as a second host of the pruning methods.

LLaVA-NeXT feeds one image as crops -- the base image resized to the vision tower's size, then the tiles of the
grid `image_grid_pinpoints` chooses for the image's size -- each through the same CLIP. The tiles' features are
stitched into one grid, unpadded to the image's aspect ratio and given the learned `image_newline` after each row;
the base crop's 576 tokens come first. An image thus has 1,000-2,900 visual tokens (LLaVA-1.6-7B), and images of
different aspect ratios have different counts.

The host holds the same pruning fields as `LlavaIvtpForConditionalGeneration` (`IvtpNextConfig`), loads llava-hf
LLaVA-NeXT checkpoints unchanged, and with pruning off is stock LLaVA-NeXT. It prunes through the same runner
(`PrunedRunner`): its images are the packed sequences stock LLaVA-NeXT builds (`layout_next.py`), one length per
image. How each method spends its budget over an image's crops, and what it does with the unpadding and the newline
tokens, is in `docs/llava-next.md`: a method prunes each crop in the vision tower, each crop after the projector,
the packed sequence, or in the LLM, and lays out what an image keeps by its code's rule (`Pruner.pack_crops`). Every
registered method runs here (`Pruner.variable_lengths`); a config naming one without that rule is refused.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationMixin, LlavaNextForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_llava_ivtp import IvtpNextConfig
from .generation_ivtp import PrunedGeneration
from .layout_next import NextLayout, next_layout
from .modeling_llava_ivtp import ImageBatch, IvtpHost, PrunedRunner
from .outputs_ivtp import IvtpCausalLMOutputWithPast
from .pruners import PRUNERS
from .tokens_ivtp import prefix_mask
from .transformers_compat import ActivationCheckpointingNames, takes_cache_kwarg


# llava-hf LLaVA-NeXT checkpoints store `language_model.*`, `vision_tower.*`, `multi_modal_projector.*` and
# `image_newline` at the top: the stock "llava_next" mapping renames them (registered for this class, as for
# `LlavaIvtpForConditionalGeneration`; the installed package and the remote-code copy both run this line).
_NEXT_MAPPING = get_checkpoint_conversion_mapping("llava_next")
if _NEXT_MAPPING is None:  # every supported release has it; without it llava-hf keys would load as missing
    raise ImportError("transformers has no checkpoint conversion mapping for 'llava_next'.")
register_checkpoint_conversion_mapping("LlavaNextIvtpForConditionalGeneration", _NEXT_MAPPING, overwrite=True)


def check_next_pruning(config: IvtpNextConfig) -> None:
    """The config's fields, and a method this host runs (`Pruner.variable_lengths`: every registered one has a rule
    for images of different lengths), refused otherwise, naming the field."""
    config.check_ivtp()
    if config.pruning_enabled and not PRUNERS[config.pruning_method].variable_lengths:
        supported = sorted(name for name, pruner in PRUNERS.items() if pruner.variable_lengths)
        raise ValueError(
            f"pruning_method={config.pruning_method!r} does not run on the LLaVA-NeXT host yet (its images have packed "
            f"sequences of different lengths); the methods that do: {supported}. Set `pruning_method=None` to run stock "
            "LLaVA-NeXT, or use LlavaIvtpForConditionalGeneration (LLaVA-1.5) for the other methods."
        )


class LlavaNextIvtpForConditionalGeneration(
    IvtpHost, PrunedRunner, ActivationCheckpointingNames, PrunedGeneration, LlavaNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT (LLaVA-1.6) with the pruning fields of LLaVA-IVTP (`IvtpNextConfig`).

    Same modules and parameter names as [`LlavaNextForConditionalGeneration`], so llava-hf LLaVA-NeXT checkpoints
    load unchanged; with `clip_text_encoder` set it also holds IVTP's frozen CLIP text tower and visual projection.
    With pruning off (`pruning_method=None`, or `"ivtp"` without a schedule) the forward is stock LLaVA-NeXT's, and
    its output also says which `input_ids` index each row of `logits` belongs to (`kept_positions`). With pruning on,
    each image's packed visual tokens (base crop, unpadded tiles, newlines) are pruned to the budget
    `visual_tokens` per image (see the module's docstring for the methods this host runs).
    """

    config_class = IvtpNextConfig
    config: IvtpNextConfig
    takes_image_sizes = True

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
        return self._ivtp_forward(
            guidance, input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels, logits_to_keep=logits_to_keep, use_cache=use_cache, **kwargs,
        )

    # ------------------------------------------------------------------------------------------------------------
    # The runner's host hooks
    # ------------------------------------------------------------------------------------------------------------
    def _image_batch(self, image_mask, placeholder_counts: list[int], pixel_values, sizes) -> ImageBatch:
        """Each image's packed length from its size (`image_layouts`); each sample's placeholders must be whole
        images, in order, as many as `pixel_values` holds."""
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs `image_sizes` (num_images, 2) with `pixel_values`: the processor gives both.")
        if len(sizes) != pixel_values.shape[0]:
            raise ValueError(
                f"`image_sizes` has {len(sizes)} images but `pixel_values` has {pixel_values.shape[0]}."
            )
        lengths = [layout.length for layout in self.image_layouts(sizes)]
        per_sample, next_image = [], 0
        for count in placeholder_counts:
            taken = []
            while sum(taken) < count and next_image < len(lengths):
                taken.append(lengths[next_image])
                next_image += 1
            if sum(taken) != count:
                break
            per_sample.append(tuple(taken))
        if len(per_sample) != len(placeholder_counts) or next_image != len(lengths):
            raise ValueError(
                f"Each image needs as many image placeholder tokens (id {self.config.image_token_id}) as its packed "
                f"features: the images' sizes give {lengths} tokens, the samples hold {placeholder_counts} "
                "placeholders. Use the model's processor, which expands `<image>` to each image's count."
            )
        counts = tuple(len(sample) for sample in per_sample)
        return ImageBatch(per_sample=torch.tensor(counts, device=image_mask.device), counts=counts,
                          lengths=tuple(per_sample), sizes=sizes)

    def _check_pixels(self, pixel_values, image_sizes) -> None:
        """`(num_images, crops, channels, height, width)` (or the crops stacked, 4-D) at the vision tower's channels
        and size, floating point, with `image_sizes` `(num_images, 2)`."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (4, 5) or tuple(pixel_values.shape[-3:]) != expected:
            raise ValueError(
                f"`pixel_values` must be `(num_images, crops, {expected[0]}, {expected[1]}, {expected[2]})` (each image's "
                f"crops at the vision tower's {vision.num_channels} channels and {vision.image_size} px), got "
                f"{tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__}. "
                "The model's processor produces them."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a floating-point tensor, got dtype {pixel_values.dtype}.")
        if image_sizes is None or not isinstance(image_sizes, torch.Tensor) and not isinstance(image_sizes, (list, tuple)):
            raise ValueError("LLaVA-NeXT needs `image_sizes` `(num_images, 2)` (height, width) with `pixel_values`.")

    def _visual_features(self, pixel_values, pruner, images: ImageBatch) -> dict:
        """Every image's crops through the vision tower (`_run_vision_tower`, where a method may prune each crop: a
        tile's patches on the letterbox padding rank last, `PruneContext.vision_valid`) and the projector, packed
        as stock LLaVA-NeXT packs them (base crop, unpadded tiles, a newline per row: `NextLayout.pack`; of the
        patches each crop kept, with every newline where the method prunes in the LLM too: `NextLayout.pack_kept`;
        or by the method's own layout, `Pruner.pack_crops`) and padded to `(images, longest, hidden)`. `keep_indices`
        index each image's full packed sequence (-1 past its count, or for a token standing for no packed place);
        `placement`, the placeholders the tokens fill; the CLS and the feature layer's hidden states are each
        image's base crop's."""
        layouts = self.image_layouts(images.sizes)
        if pixel_values.dim() == 5:  # (images, max crops, channels, height, width): each image's own crops
            pixel_values = torch.cat([pixels[: layout.crops] for pixels, layout in zip(pixel_values, layouts)])
        patches = self.config.num_patches
        shown = torch.cat([layout.shown(patches) for layout in layouts])
        if pruner.context is not None and not bool(shown.all()):
            pruner.context.vision_valid = shown.to(pixel_values.device)
        vision = self._run_vision_tower(pixel_values, pruner)
        crop_features = self.model.multi_modal_projector(vision["patch_hidden_states"])
        # every patch of every crop (no selection in the tower, none per crop after it): stock packing
        stock = (crop_features.shape[1] == patches and vision["placement"] is vision["keep_indices"]
                 and not pruner.prunes_crops)
        # the newlines enter the LLM where a method prunes there (it spends the budget over them too); a method
        # that prunes in the tower only leaves them out, so that an image brings at most the budget
        newlines = bool(pruner.llm_prune_layers())
        packed, stands_for, placement, first_crops, crop = [], [], [], [], 0
        for image, layout in enumerate(layouts):
            features = crop_features[crop : crop + layout.crops]
            if stock:
                packed.append(layout.pack(features, self.model.image_newline))
            else:  # what each crop kept, by the method's rule (`Pruner.pack_crops`)
                kept = vision["keep_indices"][crop : crop + layout.crops]
                tokens, at, place = pruner.pack_crops(
                    layout, features, kept, self.model.image_newline, newlines, image=image,
                    crop_hidden_states=vision["patch_hidden_states"][crop : crop + layout.crops],
                )
                packed.append(tokens)
                stands_for.append(at)
                placement.append(place)
            first_crops.append(crop)
            crop += layout.crops
        image_kept = tuple(len(tokens) for tokens in packed)
        for image, (kept, length) in enumerate(zip(image_kept, images.flat_lengths)):
            if kept > length:  # a layout that is not stock's (VisionZip's: every crop's tokens, no unpadding)
                raise ValueError(
                    f"pruning_method={self.config.pruning_method!r} gives image {image} {kept} tokens, more than its "
                    f"{length} placeholders (its packed length under stock LLaVA-NeXT); lower "
                    "`pruning_options['visual_tokens']`."
                )
        features = pad_sequence(packed, batch_first=True)  # zeros past each image's count
        if stock:
            order = torch.arange(features.shape[1], device=features.device)
            keep_indices = placement = torch.where(prefix_mask(image_kept, features.shape[1], order.device), order, -1)
        else:
            keep_indices = pad_sequence(stands_for, batch_first=True, padding_value=-1)
            same = all(at is place for at, place in zip(stands_for, placement))
            placement = keep_indices if same else pad_sequence(placement, batch_first=True, padding_value=-1)
        # per image, its base crop's: the whole image at the tower's size (the CLS a method reads for the image)
        base_crops = torch.tensor(first_crops, device=vision["cls_hidden_state"].device)
        return {
            "features": features, "keep_indices": keep_indices, "placement": placement, "counts": vision["counts"],
            "cls_hidden_state": vision["cls_hidden_state"].index_select(0, base_crops), "image_kept": image_kept,
            "feature_layer_hidden_states": vision["feature_layer_hidden_states"].index_select(0, base_crops),
        }


# `auto_map["AutoModelForImageTextToText"]` (`save_pretrained` adds "AutoModel" for the same class).
LlavaNextIvtpForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["LlavaNextIvtpForConditionalGeneration"]
