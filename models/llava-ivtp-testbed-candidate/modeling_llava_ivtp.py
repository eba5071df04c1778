"""LLaVA-IVTP: `LlavaForConditionalGeneration` with visual-token pruning -- the generic pruned-token runner.

Adapted from transformers 5.23 `models/llava/modeling_llava.py` (the forward), `models/clip/modeling_clip.py`
(`CLIPVisionModel.forward` and the `CLIPEncoder` loop) and `models/llama/modeling_llama.py` (the `LlamaModel`
loop). The stock layers run as they are; the method's rule is a pruner (`pruner_base.py`, one file per method) that
the runner asks where to prune, and the attention rows it scores with come from the layers' own computation
(`attention_rows.py`). The runner owns the token state, masks, rotary positions, the pruned KV cache, decoding,
labels and outputs. It is one mixin, `PrunedRunner`, shared by both hosts (`LlavaIvtpForConditionalGeneration` here,
`LlavaNextIvtpForConditionalGeneration` in `modeling_llava_next_ivtp.py`); a host gives its images' placeholder
counts (`_image_batch`: `num_patches` each on LLaVA-1.5, each image's packed length on LLaVA-NeXT) and its visual
features (`_visual_features`). Where images differ in length, the token state carries a count per image.

A pruned prefill, top-down (`forward` -> `_ivtp_forward` -> `_forward_pruned`):

1. Checks and one read. `forward` checks the inputs' shapes and the config; `_read_layout` reads, in one transfer
   from the device, each sample's image placeholders and last placeholder, whether any token is padding, and the
   values of the token and CLIP ids. Every size the rest of the prefill needs follows from this read and the
   method's budgets, so nothing else waits for the device until the logits are queued.
2. The pruner. `PRUNERS[config.pruning_method](config, context)` builds the method's pruner for this call; what it
   gathers lives on it, never on a module.
3. The vision tower (`_run_vision_tower`, site 1). CLIP's layers run up to the feature layer; before a layer the
   pruner may ask it for attention rows (`vision_request` -> a `RowRequest` the layer's attention call answers);
   after it, `after_vision_layer` may return a `Selection` of the patches (CLS kept, order kept; or, VisionZip's
   block, an ordered selection at the feature layer).
4. The projected features (site 2). The projector maps the kept patches (and the CLS, for pruners that read it);
   `on_projected` may select among them.
5. The LLM's entry (`_enter_llm`). Only the kept patches' placeholders enter, each taking its patch's feature;
   every other token enters unchanged. The token state (`TokenState`, `tokens_ivtp.py`) packs each sample's tokens
   into rows (samples that keep different counts are left-padded), with their logical positions and position ids
   (original, or renumbered where the method's code closes the gaps). The guidance inputs are gathered at the
   tokens that entered.
6. The LLM (`_run_language_model`): the runs of `_prefill_runs` through the one decoder loop `_run_decoder`. A run
   is the layers up to the next pruning layer (`layer_segments`): one mask (`segment_mask`, in the backend's form),
   one rotary table, one record of the positions the cache layers hold. A pruner with a probe token (IVTP's
   pseudo-CLS, TopK+'s visual CLS) appends it after every real token: it attends to the tokens up to its image, no
   real token attends to it, it never enters the cache, and it leaves after the last pruning layer. Per layer the
   pruner may ask rows (`LlmScoring`); after the run's last layer its `Selection` keeps each image's visual tokens
   (`_select_llm`), and the next run starts from the kept tokens.
7. The head (`_head`). The final norm's output goes through the LM head for every row that reached the last layer;
   `kept_positions` says which `input_ids` index each row is; labels are taken at those positions. The counts the
   pruner kept are read with the logits.

Steps over the pruned cache (decoding, a continued conversation; `_forward_with_pruned_cache`) take the same
decoder loop with the runs of `_step_runs`: layers that share one record of held positions, each with the logical
mask gathered at those positions and the new tokens placed after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import GenerationMixin, LlavaForConditionalGeneration
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging

from .attention_rows import RowRequest, base_backend, moved, recording_backend
from .cache_ivtp import IvtpCache, IvtpStaticCache, check_static_room
from .configuration_llava_ivtp import IvtpConfig
from .generation_ivtp import SEQUENCE_GUIDANCE_INPUTS, PrunedGeneration, host_past_length
from .guidance_ivtp import build_clip_text_tower
from .outputs_ivtp import IvtpCausalLMOutputWithPast
from .pruner_base import LlmView, PruneContext, Selection, profiler_label
from .pruners import PRUNERS
from .tokens_ivtp import (
    TokenState, layer_segments, prefix_mask, segment_mask, static_step_mask, static_width_mask, step_mask, true_indices,
    unpack,
)
from .transformers_compat import (
    ActivationCheckpointingNames,
    cache_kwargs,
    checkpointing_drops_cache,
    image_output_fields,
    takes_cache_kwarg,
)
from .validation_ivtp import (
    check_guidance_shapes,
    check_no_placeholders_without_pixels,
    check_output_requests,
    check_pixel_values,
    check_llm_site_images,
    check_placeholders,
    check_prefill_cache,
    check_prunable_inputs,
    check_sequence_inputs,
    check_backend_masks,
    check_values,
    hidden_state_selection,
    image_token_mask,
    read_rows,
    value_rows,
)


logger = logging.get_logger(__name__)

# llava-hf checkpoints store `language_model.lm_head`, `language_model.model.*`, `vision_tower.*`: the conversion
# mapping of the stock "llava" model type renames them. Custom-code classes only get mappings registered for them,
# so register llava's for this class; both the installed package and the remote-code copy run this line.
register_checkpoint_conversion_mapping(
    "LlavaIvtpForConditionalGeneration", get_checkpoint_conversion_mapping("llava"), overwrite=True
)


@dataclass
class LayerRun:
    """Decoder layers that see one token set: their input (`None`: the previous run's output), one mask, position
    ids and rotary table, and the logical positions their cache layers hold (`held`). `probe_end`: the last row is
    the probe token, which attends to the slots up to `probe_end` `(batch,)` and itself (left out of the
    hidden-state outputs and of the cache; the layers get it as `ivtp_probe`, for backends whose masks cannot say
    it). `scoring`: the pruner's per-layer requests (an `LlmScoring`). The decoder loop sets `output`, the run's last
    layer's output."""

    layers: range
    hidden_states: torch.Tensor | None
    mask: object
    position_ids: torch.Tensor
    position_embeddings: tuple
    held: torch.Tensor
    probe_end: torch.Tensor | None = None
    scoring: LlmScoring | None = None
    output: torch.Tensor | None = None


@dataclass
class LlmScoring:
    """A prefill run's per-layer work for the pruner: ask a layer for attention rows (`request`), then read them
    (`after_layer`). A pruner that scores with another layer (`Pruner.llm_scoring_layer`, PyramidDrop: the next)
    gets that layer's attention over this layer's output, rows only. `selection`: the last layer's answer."""

    pruner: object
    view: LlmView
    layers: nn.ModuleList
    mask: object
    position_embeddings: tuple
    pending: RowRequest | None = None
    scorer: nn.Module | None = None
    selection: Selection | None = None

    def request(self, layer_idx: int) -> RowRequest | None:
        """The request for the layer call (`None` where the rows come from another layer or nothing is asked)."""
        self.pending = self.pruner.llm_request(layer_idx, self.view)
        scoring_layer = self.pruner.llm_scoring_layer(layer_idx) if self.pending is not None else layer_idx
        self.scorer = self.layers[scoring_layer] if scoring_layer != layer_idx else None
        return self.pending if self.scorer is None else None

    def after_layer(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        if self.scorer is not None:  # the scoring layer's attention over this layer's output, rows only
            with profiler_label("ivtp/llm_scoring"), torch.no_grad():
                self.pending.rows_only = True
                self.scorer.self_attn(
                    self.scorer.input_layernorm(hidden_states), position_embeddings=self.position_embeddings,
                    attention_mask=self.mask, ivtp_rows=self.pending,
                )
        with profiler_label("ivtp/llm_scoring"):
            self.selection = self.pruner.after_llm_layer(layer_idx, self.view, self.pending, hidden_states)


@dataclass
class LlmPass:
    """What the LLM part of a pruned prefill leaves: the token state after the last run, per pruning layer the
    kept patches and the kept count (device tensors), and the visual tokens each layer held."""

    tokens: TokenState
    keep: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    per_layer: tuple = ()


# The modules IVTP adds to Llava (instruction guidance); llava-hf checkpoints lack them.
CLIP_PARTS = ("clip_text_model.", "clip_visual_projection.")


class IvtpHost:
    """What every LLaVA-IVTP host model adds to its stock class (`LlavaIvtpForConditionalGeneration`,
    `LlavaNextIvtpForConditionalGeneration`): IVTP's frozen CLIP text tower and visual projection, the recording twins
    of the attention backend, loading that refuses a missing text tower, initialisation, and saving as remote code."""

    def _add_clip_parts(self) -> None:
        """IVTP: the frozen CLIP text tower (eq. 5) and CLIP's visual projection, which maps the vision tower's final
        CLS into the joint space (eq. 6), when `config.clip_text_encoder` names one. Neither is in llava-hf
        checkpoints; both are saved with ours."""
        config = self.config
        if config.clip_text_encoder is None:
            return
        self.clip_text_model = build_clip_text_tower(config.clip_text_encoder)
        self.clip_visual_projection = nn.Linear(
            config.vision_config.hidden_size, config.clip_text_encoder["embed_dim"], bias=False
        )
        self.clip_text_model.requires_grad_(False)
        self.clip_visual_projection.requires_grad_(False)
        self.clip_text_model.eval()

    def _use_recording_backends(self) -> None:
        """With pruning on, the layers run with the recording twin of the configured backend (`"sdpa"` ->
        `"ivtp_sdpa"`, any registered name likewise: the same kernel, and the twin answers a pruner's `RowRequest`;
        `attention_rows.py`); with pruning off, with the backend itself, as the stock host (eager's `output_attentions`
        included). Configs save the backend's own name."""
        mapping = recording_backend if self.config.pruning_enabled else base_backend
        for sub_config in (self.config, self.config.text_config, self.config.vision_config):
            name = mapping(sub_config._attn_implementation)
            if name != sub_config._attn_implementation_internal:  # (no write when unchanged: nothing for a compiler)
                sub_config._attn_implementation_internal = name

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """As [`PreTrainedModel.set_attn_implementation`], with the recording twins of `"sdpa"` and `"eager"`."""
        if isinstance(attn_implementation, str):
            attn_implementation = base_backend(attn_implementation)
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self._use_recording_backends()

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
        init, as the stock host's do (the CLIP vision tower CLIP's, the decoder Llama's).

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


class PrunedRunner:
    """The pruned-token runner every host shares (module docstring): the forward for a host's own signature
    (`_ivtp_forward`), a pruned prefill, steps over a pruned cache, the LLM's entry, the vision site and the
    decoder loop. A host supplies its images (`_image_batch`: how many placeholders each image has) and its visual
    features (`_visual_features`: the vision tower and projector, site 1, as the host's stock model runs them)."""

    takes_image_sizes = False  # LLaVA-NeXT's images come with their sizes; LLaVA-1.5 refuses them when pruning

    def _ivtp_forward(
        self, guidance: dict, input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds,
        vision_feature_layer, vision_feature_select_strategy, labels, logits_to_keep, use_cache, image_sizes=None,
        **kwargs,
    ) -> tuple | IvtpCausalLMOutputWithPast:
        """Every host's forward, after its own signature: `guidance` holds the instruction inputs; `image_sizes`
        (LLaVA-NeXT) the images' sizes. Steps over a pruned cache, stock without pruning or images, else a pruned
        prefill."""
        return_dict = kwargs.pop("return_dict", None)
        config = self.config
        pruned_cache = isinstance(cache, IvtpCache) and cache.is_pruned
        self._check_call(input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, labels, guidance,
                         pruning=config.pruning_enabled and (pixel_values is not None or pruned_cache), kwargs=kwargs,
                         image_sizes=image_sizes)
        request = kwargs.pop("output_hidden_states", None)
        if request is None:
            request = config.output_hidden_states or config.text_config.output_hidden_states
        selection = hidden_state_selection(request, config.text_config.num_hidden_layers)
        # Steps after a pruned prefill attend to the pruned cache, each layer to the tokens it holds.
        if pixel_values is None and pruned_cache:
            outputs = self._forward_with_pruned_cache(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep, guidance=guidance,
                output_hidden_states=selection is not False, **kwargs,
            )
        # Without pruning or without images this is stock Llava (samples without an image pass unpruned).
        elif not config.pruning_enabled or pixel_values is None:
            if config.pruning_enabled:  # pruning off: exactly stock Llava's operators (its own errors for bad ids)
                self._check_values_without_pixels(input_ids, inputs_embeds, cache, guidance)
            images = {} if image_sizes is None else {"image_sizes": image_sizes}
            outputs = self._forward_stock(
                input_ids=input_ids, pixel_values=pixel_values, **images, attention_mask=attention_mask,
                position_ids=position_ids, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                logits_to_keep=logits_to_keep, use_cache=use_cache, cache=cache,
                # An index list is selected below (stock 5.24 fails on one when images are given).
                output_hidden_states=selection is not False, **kwargs,
            )
        else:
            given = kwargs if self.takes_image_sizes else {**kwargs, "image_sizes": image_sizes}
            check_prunable_inputs(config, vision_feature_layer, vision_feature_select_strategy, given)
            outputs = self._forward_pruned(
                input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
                position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, labels=labels,
                logits_to_keep=logits_to_keep, guidance=guidance, use_cache=use_cache,
                output_hidden_states=selection is not False, **kwargs,
            )
        if selection and outputs.hidden_states is not None:  # an index selection: the others are None, as stock
            outputs.hidden_states = tuple(
                hidden if index in selection else None for index, hidden in enumerate(outputs.hidden_states)
            )
        return outputs if return_dict is not False else outputs.to_tuple()

    def _check_pixels(self, pixel_values, image_sizes) -> None:
        """The images' shapes (LLaVA-1.5: `(num_images, channels, height, width)`)."""
        check_pixel_values(self.config, pixel_values)

    def _image_batch(self, image_mask, placeholder_counts: list[int], pixel_values, sizes) -> ImageBatch:
        """The images of a pruned prefill (LLaVA-1.5: `num_patches` placeholders each, whole images, as many as
        `pixel_values` holds)."""
        num_patches = self.config.num_patches
        check_placeholders(self.config, placeholder_counts, pixel_values.shape[0])
        return ImageBatch(per_sample=image_mask.sum(dim=1) // num_patches,
                          counts=tuple(count // num_patches for count in placeholder_counts))

    def _visual_features(self, pixel_values, pruner, images: ImageBatch) -> dict:
        """Site 1 and the projector: the vision tower's outputs (`_run_vision_tower`) and `features`, the projected
        patches `(images, tokens, hidden)`."""
        vision = self._run_vision_tower(pixel_values, pruner)
        vision["features"] = self.model.multi_modal_projector(vision["patch_hidden_states"])
        return vision

    def _check_call(self, input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, labels, guidance,
                    pruning: bool, kwargs: dict, image_sizes=None) -> None:
        """The checks of every forward that read nothing from the device: the config (fields edited after construction
        are checked before they are used; the backend set after construction gets its recording twin), the cache, the
        sequence inputs' shapes, the guidance's and the images'; with pruning, the outputs it cannot give."""
        config = self.config
        config.check_ivtp()
        self._use_recording_backends()
        if config.pruning_enabled and pixel_values is not None:
            check_prefill_cache(cache)  # first: an image after a filled cache is the thing to say
        check_sequence_inputs(
            config, input_ids, inputs_embeds, attention_mask, position_ids, labels,
            past_length=host_past_length(cache), pruning=pruning,
        )
        check_guidance_shapes(config, guidance, input_ids if input_ids is not None else inputs_embeds)
        if pixel_values is not None:
            self._check_pixels(pixel_values, image_sizes)
        if pruning:
            check_output_requests(config, kwargs)

    def _forward_stock(self, input_ids, inputs_embeds, logits_to_keep, cache, **kwargs) -> IvtpCausalLMOutputWithPast:
        """Stock Llava's forward; `kept_positions` is every position."""
        outputs = super().forward(
            input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, return_dict=True,
            **cache_kwargs(cache), **kwargs,
        )
        kept_positions = stock_kept_positions(input_ids if input_ids is not None else inputs_embeds, logits_to_keep,
                                              outputs.logits.device)
        return IvtpCausalLMOutputWithPast(**outputs, kept_positions=kept_positions)

    def _check_values_without_pixels(self, input_ids, inputs_embeds, cache, guidance: dict) -> None:
        """Values of a forward without `pixel_values` (no schedule, no image, or a step over a pruned cache): token
        and CLIP ids, spans, and, when pruning is on and the cache is empty, image placeholders (with no image
        anywhere they would run as text). Over a filled cache placeholders are ordinary tokens, as in stock Llava: the
        model may generate the id, and a decode step or an earlier answer then holds it (a new turn's placeholders
        are checked by `generate`, `prepare_inputs_for_generation`). One read, on a prefill; a step over a filled cache
        reads nothing (out-of-range ids there meet the embedding's own error, as in stock Llava), nor does a compiled
        forward."""
        reference = input_ids if input_ids is not None else inputs_embeds
        past_length = host_past_length(cache)
        if past_length != 0 or torch.compiler.is_compiling():
            return  # compiled: no read of the device (a graph break); the eager call raises what it finds
        rows = value_rows(input_ids, guidance, reference.device)
        check_placeholders_here = self.config.pruning_enabled and past_length == 0
        if check_placeholders_here:
            rows["placeholders"] = image_token_mask(self, input_ids, inputs_embeds).sum(dim=1).long()
        facts = read_rows(rows)
        check_values(self.config, facts, guidance)
        if check_placeholders_here:
            check_no_placeholders_without_pixels(self.config, sum(facts["placeholders"]), "The input")

    def _read_layout(self, image_mask: torch.Tensor, attention_mask: torch.Tensor, input_ids, guidance: dict,
                     image_sizes: torch.Tensor | None = None):
        """What the host needs of a batch, in one read from the device: per sample, its image placeholders, the
        position of its last one, and whether every token is attended; the CLIP ids the text tower needs (one past
        the last end token; `None` without CLIP ids); whether each sample's placeholders form one block; the images'
        sizes (`image_sizes`, LLaVA-NeXT; else `None`). The input values are checked in the same read (`value_rows`:
        token and CLIP ids, spans)."""
        order = torch.arange(image_mask.shape[1], device=image_mask.device)
        rows = {
            "placeholders": image_mask.sum(dim=1),
            "first_placeholder": torch.where(image_mask, order, image_mask.shape[1]).amin(dim=1),
            "last_placeholder": torch.where(image_mask, order, -1).amax(dim=1),
            "fully_attended": attention_mask.all(dim=1).long(),
            **value_rows(input_ids, guidance, image_mask.device),
        }
        flat = None if image_sizes is None else {"image_sizes": image_sizes}  # per image (height, width)
        facts = read_rows(rows, flat)  # the one host read of a pruned prefill
        check_values(self.config, facts, guidance)
        clip_length = max(facts["clip_end"]) + 1 if "clip_end" in facts else None
        # every sample's placeholders in one block (the processor's layout): its image's tokens have one slot range
        blocks = all(last - first + 1 == count for first, last, count in
                     zip(facts["first_placeholder"], facts["last_placeholder"], facts["placeholders"]) if count)
        sizes = facts.get("image_sizes")
        sizes = None if sizes is None else [tuple(sizes[i : i + 2]) for i in range(0, len(sizes), 2)]
        return facts["placeholders"], facts["last_placeholder"], all(facts["fully_attended"]), clip_length, blocks, sizes

    def _forward_pruned(
        self, input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, labels, logits_to_keep,
        guidance, use_cache, image_sizes=None, **kwargs,
    ) -> IvtpCausalLMOutputWithPast:
        config = self.config
        use_cache = use_cache if use_cache is not None else config.text_config.use_cache
        if use_cache and checkpointing_drops_cache(self):
            # As the stock decoder does: checkpointed layers recompute their forward and cannot fill a cache.
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing in training; using `use_cache=False`.")
            use_cache = False
        image_mask = image_token_mask(self, input_ids, inputs_embeds)
        sequence_length = image_mask.shape[1]
        full_attention_mask = (
            torch.ones_like(image_mask) if attention_mask is None else moved(attention_mask, image_mask.device, torch.bool)
        )
        # The prefill's one wait for the device: each sample's placeholders and layout (see `TokenState`).
        placeholder_counts, last_placeholder, fully_attended, clip_length, blocks, sizes = self._read_layout(
            image_mask, full_attention_mask, input_ids, guidance, image_sizes
        )
        images = self._image_batch(image_mask, placeholder_counts, pixel_values, sizes)
        context = PruneContext(model=self, guidance=guidance, images_per_sample=images.per_sample,
                               images=images.counts, clip_length=clip_length, visual_lengths=images.flat_lengths)
        pruner = PRUNERS[config.pruning_method](config, context)
        check_llm_site_images(config, images.counts, llm_site=bool(pruner.llm_prune_layers()))

        vision = self._visual_features(pixel_values, pruner, images)
        image_features = vision["features"]
        context.vision = vision
        context.defer("visual_cls", lambda: self.model.multi_modal_projector(vision["cls_hidden_state"]))
        with profiler_label("ivtp/projected_scoring"):  # profiler labels: the pruner's own work (llava-ivtp bench)
            selection = pruner.on_projected(image_features)
        image_kept = vision.get("image_kept")
        if selection is not None:
            image_features = _apply_selection(image_features, selection)
            kept = moved(selection.keep, vision["keep_indices"].device)
            if images.lengths is not None:  # an image shorter than the selection keeps all of its tokens
                image_kept = tuple(min(kept.shape[1], length) for length in images.flat_lengths)
                kept = kept.clamp_min(0)
            same = vision["placement"] is vision["keep_indices"]  # no ordered selection before: one gather
            vision["keep_indices"] = _gather_kept(vision["keep_indices"], kept, image_kept)
            vision["placement"] = vision["keep_indices"] if same else _gather_kept(vision["placement"], kept, image_kept)
        if image_kept is not None:
            image_features = _valid_rows(image_features, image_kept)

        tokens, index, slot_valid, pruned_before_end = self._enter_llm(
            image_mask, vision["placement"], image_features, input_ids, inputs_embeds, position_ids,
            full_attention_mask, placeholder_counts, last_placeholder, pruner.renumbers, images.per_sample, blocks,
            images.lengths, None if image_kept is None else images.per_sample_values(image_kept),
        )

        def packed_guidance():
            with profiler_label("ivtp/guidance"):
                return _pack_guidance(guidance, index, slot_valid)

        def image_end_position():
            with profiler_label("ivtp/guidance"):
                end = _image_end_position(image_mask, position_ids, images.per_sample)
                # renumbered: the image ends that many positions earlier
                return end if pruned_before_end is None else end - pruned_before_end

        context.defer("packed_guidance", packed_guidance)  # computed if the pruner reads them
        context.defer("image_end_position", image_end_position)

        if not use_cache:
            cache = None
        elif cache is None:
            cache = IvtpCache(config=config.text_config)
        if cache is not None:
            cache.renumbered_positions = pruner.renumbers  # decode steps continue the prefill's rule
        hidden_states, tokens, llm_keep, llm_counts, all_hidden, per_layer = self._run_language_model(
            tokens, fully_attended, images.per_sample, pruner, cache, use_cache, **kwargs
        )
        if use_cache:
            cache.set_logical_length(sequence_length)
            if isinstance(cache, IvtpStaticCache):
                cache.freeze()  # the layers move into buffers with room for the tokens to generate

        extra = {name: unpack(values, index, slot_valid, sequence_length, fill)
                 for name, (values, fill) in pruner.outputs().items()}
        return self._head(
            hidden_states, tokens.positions, labels, logits_to_keep, kwargs,
            hidden_states=all_hidden,
            **cache_kwargs(cache),
            **image_output_fields(image_features),
            vision_keep_indices=vision["keep_indices"],
            llm_keep_indices=llm_keep,
            vision_token_counts=vision["counts"],
            # Read last, once the whole forward is queued on the device.
            llm_token_counts=tuple(torch.stack(llm_counts).tolist()) if llm_counts else (),
            visual_tokens_per_layer=per_layer,
            **extra,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Steps over a pruned cache: decoding, a continued conversation
    # ------------------------------------------------------------------------------------------------------------
    def _forward_with_pruned_cache(
        self, input_ids, attention_mask, position_ids, cache: IvtpCache, inputs_embeds, labels, logits_to_keep,
        guidance: dict, **kwargs,
    ) -> IvtpCausalLMOutputWithPast:
        """New tokens through the decoder when each layer's cache holds its own (pruned) token set.

        New tokens get logical positions (and, unless given, rotary positions) after the cache; the 2-D attention mask
        is logical (cache length + new tokens, as `generate` keeps it).
        """
        given = [name for name, value in guidance.items() if value is not None]
        if given:
            raise ValueError(
                f"{given} guide pruning at prefill; they cannot be passed with a cache that was already pruned "
                "(decode steps and conversation continuations take only the new tokens' inputs)."
            )
        self._check_values_without_pixels(input_ids, inputs_embeds, cache, guidance)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch_size, num_new = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_length = cache.get_seq_length()
        cached_batch = cache.layers[0].keys.shape[0]
        if cached_batch != batch_size:
            raise ValueError(f"The cache holds {cached_batch} samples but {batch_size} were given.")
        static = isinstance(cache, IvtpStaticCache)  # frozen: a pruned cache is frozen at prefill
        if static:  # the length is a device scalar: positions by tensor arithmetic, the mask at full width
            if num_new > 1 and not torch.compiler.is_compiling():  # a new turn (one read); a step's room is generate's
                check_static_room(cache, int(past_length), num_new)
            new_positions = (torch.arange(num_new, device=device) + past_length).expand(batch_size, -1)
            if attention_mask is not None:
                attention_mask = static_width_mask(moved(attention_mask, device, torch.bool), cache.max_cache_len)
        else:
            # Its shape, when given, was checked by `check_sequence_inputs`. Without one, one new token and no
            # padding slot in the cache: every held key is attended, no mask (`_step_runs`).
            if attention_mask is not None:
                attention_mask = moved(attention_mask, device, torch.bool)
            elif num_new > 1 or cache.padding_slots:
                attention_mask = torch.ones(batch_size, past_length + num_new, dtype=torch.bool, device=device)
            new_positions = torch.arange(past_length, past_length + num_new, device=device).expand(batch_size, -1)
        if position_ids is None:
            position_ids = new_positions
        output_hidden_states = kwargs.pop("output_hidden_states")  # resolved by `forward`
        kwargs.pop("use_cache", None)
        step_runs = self._static_step_runs if static else self._step_runs
        runs = step_runs(
            inputs_embeds, attention_mask, moved(position_ids, device).expand(batch_size, -1), new_positions, cache,
            past_length,
        )
        all_hidden = self._run_decoder(runs, cache, True, output_hidden_states, **kwargs)
        hidden_states, all_hidden = self._final_norm(runs[-1].output, all_hidden)
        cache.advance(num_new)
        return self._head(hidden_states, new_positions, labels, logits_to_keep, kwargs, label_offset=past_length,
                          hidden_states=all_hidden, **cache_kwargs(cache))

    def _static_step_runs(self, hidden_states, attention_mask, position_ids, new_positions, cache: IvtpStaticCache,
                          past_length: torch.Tensor) -> list[LayerRun]:
        """The runs of a step over a frozen `IvtpStaticCache`: the shapes of every step are the same. Per run, the
        layers' slots (`cache.step_records`: the held tokens' logical positions, then the generated tokens') are
        attended where the 2-D mask (at full width, `static_width_mask`) allows and the slot's position is at most
        the query's (causal, and slots not yet written are left out); padding slots never. Nothing is recorded,
        and the prefill's records are not read (their shapes vary with the prompt): the runs, slots' positions and
        offsets are fixed at `freeze`."""
        rotary_emb = self.model.language_model.rotary_emb
        tables = {}  # per offset of renumbered positions (`cache.step_offsets`), or one
        runs = []
        for layers in cache.step_runs:
            record, offset = cache.step_records[layers.start], cache.step_offsets[layers.start]
            offset = offset if cache.renumbered_positions else 0
            key = offset if isinstance(offset, int) else ("per sample", id(offset))
            if key not in tables:
                tables[key] = rotary_emb(hidden_states, position_ids=position_ids if key == 0 else position_ids - offset)
            position_embeddings = tables[key]
            allowed = record.unsqueeze(1) <= new_positions.unsqueeze(-1)  # (batch, new, slots)
            if attention_mask is not None:
                allowed = allowed & attention_mask.gather(1, record.clamp_min(0) if cache.padding_slots else record
                                                          ).unsqueeze(1)
            if cache.padding_slots:
                allowed = allowed & (record >= 0).unsqueeze(1)
            mask = static_step_mask(self.config.text_config, allowed.unsqueeze(1), hidden_states.dtype)
            runs.append(LayerRun(layers, None if runs else hidden_states, mask, position_ids, position_embeddings,
                                 held=None))
        return runs

    def _step_runs(self, hidden_states, attention_mask, position_ids, new_positions, cache: IvtpCache,
                   past_length: int) -> list[LayerRun]:
        """The runs of a step over the pruned cache: consecutive layers that share one record of held positions (a
        run of the prefill). Per run, the logical 2-D mask is gathered at the positions the run holds, then causal
        masking runs over the layer's physical keys. Where the prefill renumbered positions
        (`cache.renumbered_positions`), the new tokens' ids are lowered, per run, by the logical tokens the run does
        not hold: they sit right after the tokens it holds, as a prefill of the whole sequence would place them.
        `attention_mask` `None`: one new token that attends every key each layer holds (no mask, as stock's step)."""
        held_runs, layer_runs = cache.held_runs(self.config.text_config.num_hidden_layers)
        tables = self._step_rotary(hidden_states, position_ids, held_runs, cache, past_length)
        runs = []
        for held, layers, position_embeddings in zip(held_runs, layer_runs, tables):
            record = torch.cat([moved(held, hidden_states.device), new_positions], dim=1)
            mask = None
            if attention_mask is not None:
                if cache.padding_slots:
                    kv_mask = attention_mask.gather(1, record.clamp_min(0)) & (record >= 0)
                else:  # every slot a layer holds is a token (host: no padding slot at prefill)
                    kv_mask = attention_mask.gather(1, record)
                mask = step_mask(self.config.text_config, kv_mask, hidden_states, cache, layers.start)
            runs.append(LayerRun(layers, None if runs else hidden_states, mask, position_ids, position_embeddings,
                                 held=record))
        return runs

    def _step_rotary(self, hidden_states, position_ids, held_runs: list, cache: IvtpCache, past_length: int) -> list:
        """Each run's rotary table for a step's new tokens. Original positions: one table. Renumbered
        (`cache.renumbered_positions`): per run, the ids lowered by the logical tokens before this step that the run
        does not hold -- without padding slots a host count per run, and one table for every run's ids stacked
        along the batch, split into the runs' parts."""
        rotary_emb = self.model.language_model.rotary_emb
        if not cache.renumbered_positions:
            return [rotary_emb(hidden_states, position_ids=position_ids)] * len(held_runs)
        if cache.padding_slots:
            return [
                rotary_emb(hidden_states, position_ids=position_ids - moved(
                    past_length - (held >= 0).sum(dim=1, keepdim=True), position_ids.device))
                for held in held_runs
            ]
        offsets = [past_length - held.shape[1] for held in held_runs]
        distinct = sorted(set(offsets))
        shifted = [position_ids - offset if offset else position_ids for offset in distinct]
        if len(shifted) == 1:
            return [rotary_emb(hidden_states, position_ids=shifted[0])] * len(held_runs)
        cos, sin = rotary_emb(hidden_states, position_ids=torch.cat(shifted, dim=0))  # the runs' ids, stacked
        parts = zip(cos.view(len(distinct), *position_ids.shape, -1).unbind(0),
                    sin.view(len(distinct), *position_ids.shape, -1).unbind(0))
        tables = dict(zip(distinct, parts))
        return [tables[offset] for offset in offsets]

    # ------------------------------------------------------------------------------------------------------------
    # The head, the loss and the output of a pruned forward
    # ------------------------------------------------------------------------------------------------------------
    def _head(self, last_hidden_state, positions, labels, logits_to_keep, loss_kwargs: dict, label_offset: int = 0,
              **outputs) -> IvtpCausalLMOutputWithPast:
        """The LM head, the loss and the output of a pruned forward (a prefill, or steps over a pruned cache).

        `last_hidden_state` `(batch, rows, hidden)` after the final norm; `positions` `(batch, rows)`, the logical
        index of each row (-1: a padding slot). `labels` are aligned with this call's `input_ids`, whose first token
        sits at logical position `label_offset` (0 at prefill, the cache's length on a step): each row takes its
        position's label; padding slots are ignored (-100). `outputs`: the other fields of the output."""
        logits = self.lm_head(slice_logits_to_keep(last_hidden_state, logits_to_keep))
        kept_positions = slice_logits_to_keep(positions.unsqueeze(-1), logits_to_keep)[..., 0]
        loss = None
        if labels is not None:
            # Labels at the kept positions (pruned positions are image tokens); padding slots are ignored.
            label_index = kept_positions.to(labels.device) - label_offset
            kept_labels = labels.gather(1, label_index.clamp_min(0)).masked_fill(label_index < 0, -100)
            loss = self.loss_function(
                logits=logits, labels=kept_labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
        return IvtpCausalLMOutputWithPast(loss=loss, logits=logits, kept_positions=kept_positions, **outputs)

    # ------------------------------------------------------------------------------------------------------------
    # Site 2 and the LLM's entry: the projected features take their placeholders
    # ------------------------------------------------------------------------------------------------------------
    def _enter_llm(self, image_mask, keep_indices, image_features, input_ids, inputs_embeds, position_ids,
                   attention_mask, placeholder_counts, last_placeholder, renumber: bool, images_per_sample,
                   blocks: bool, image_lengths: tuple | None = None, image_kept: tuple | None = None):
        """The tokens that enter the LLM: every non-image token, and the placeholders of the kept patches, which
        take the image features. `renumber`: the position ids close the pruned placeholders' gaps (`pruner_base`'s
        position rules). `images_per_sample` `(batch,)` on the device; `blocks` (host): each sample's placeholders
        are one block. Images of different lengths (LLaVA-NeXT) come with `image_lengths` and `image_kept`
        (`_entry_index`). Returns the token state, its packing `(index, slot_valid)` of the sequence (`slot_valid`
        `None`: every slot holds a token), and with `renumber` the placeholders each sample lost `(batch,)` (else
        `None`)."""
        num_patches, device = self.config.num_patches, image_mask.device
        starts = {last + 1 - num_patches for last in last_placeholder}
        one_block = (image_lengths is None and blocks and len(starts) == 1
                     and all(count == num_patches for count in placeholder_counts))
        if one_block and (not renumber or position_ids is None):
            with profiler_label("ivtp/llm_entry_selection"):
                tokens, index = TokenState.entering_one_block(
                    starts.pop(), moved(keep_indices, device), position_ids, attention_mask, image_mask, num_patches,
                    list(last_placeholder), renumber,
                )
            slot_valid, pruned_before_end = None, None
            if renumber:  # every image lost as many placeholders
                pruned_before_end = torch.full((image_mask.shape[0],), num_patches - tokens.visual, device=device)
        else:
            tokens, index, slot_valid, pruned_before_end = self._entry_index(
                image_mask, keep_indices, position_ids, attention_mask, placeholder_counts, last_placeholder,
                renumber, images_per_sample, image_lengths, image_kept,
            )
        if inputs_embeds is None:
            token_embeds = self.get_input_embeddings()(input_ids.gather(1, index))
        else:
            token_embeds = inputs_embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        hidden_states = token_embeds.masked_scatter(
            tokens.is_visual.unsqueeze(-1), moved(image_features, dtype=token_embeds.dtype).reshape(-1, token_embeds.shape[-1])
        )
        return replace(tokens, hidden_states=hidden_states, image_blocks=blocks), index, slot_valid, pruned_before_end

    def _entry_index(self, image_mask, keep_indices, position_ids, attention_mask, placeholder_counts,
                     last_placeholder, renumber: bool, images_per_sample, image_lengths: tuple | None = None,
                     image_kept: tuple | None = None):
        """`_enter_llm`'s token state and packing for any layout: the kept tokens marked over the sequence, packed.
        Where images differ in length (LLaVA-NeXT), `image_lengths` and `image_kept` (host, per sample: the
        placeholders of each of its images and how many it keeps); `keep_indices` then marks the entries of an image
        keeping fewer than its row holds with -1."""
        batch_size, sequence_length = image_mask.shape
        num_patches, num_images = self.config.num_patches, keep_indices.shape[0]
        device = image_mask.device
        with profiler_label("ivtp/llm_entry_selection"):  # profiler label only (llava-ivtp bench)
            placeholder_rank = image_mask.cumsum(dim=1) - 1  # int64, as a bool cumsum is
            if image_lengths is None:
                patch_of_token = torch.where(image_mask, placeholder_rank % num_patches, -1)
                image_of_token = torch.where(image_mask, placeholder_rank // num_patches, 0)
                image_offset = torch.cumsum(images_per_sample, dim=0) - images_per_sample
                global_image = (image_of_token + image_offset.unsqueeze(1)).clamp_max(num_images - 1)
                width = num_patches
            else:  # each placeholder's image and index in it, from the images' lengths (host)
                lengths = [length for sample in image_lengths for length in sample]
                starts, before = [], 0
                for length in lengths:
                    starts.append(before)
                    before += length
                sample_start = [sum(map(sum, image_lengths[:row])) for row in range(batch_size)]
                overall_rank = placeholder_rank + torch.tensor(sample_start, device=device).unsqueeze(1)
                image_starts = torch.tensor(starts, device=device)
                global_image = (torch.bucketize(overall_rank, image_starts, right=True) - 1).clamp(0, num_images - 1)
                patch_of_token = torch.where(image_mask, overall_rank - image_starts[global_image], -1)
                width = max(lengths)
            kept_indices = moved(keep_indices, device)
            if image_kept is None:
                kept_patch = torch.zeros(num_images, width, dtype=torch.bool, device=device)
                kept_patch.scatter_(1, kept_indices, True)
            else:  # a spare last column takes the -1 entries of images keeping fewer tokens than others
                kept_patch = torch.zeros(num_images, width + 1, dtype=torch.bool, device=device)
                kept_patch.scatter_(1, torch.where(kept_indices >= 0, kept_indices, width), True)
            keep = ~image_mask | kept_patch[global_image, patch_of_token.clamp_min(0)]
            order = torch.arange(sequence_length, device=device)
            if position_ids is None:
                position_ids = order.unsqueeze(0)
            position_ids = moved(position_ids, device).expand(batch_size, -1)
            pruned_before_end = None
            if renumber:  # each kept token's id lowered by the placeholders of its sample pruned before it
                pruned = (~keep).cumsum(dim=1)  # int64
                position_ids, pruned_before_end = position_ids - pruned, pruned[:, -1]
            logical = {
                "hidden_states": image_mask.new_zeros(batch_size, sequence_length, 0, dtype=torch.float32),
                "positions": order.expand(batch_size, -1),
                "position_ids": position_ids,
                "attention_mask": attention_mask,
                "is_visual": image_mask,
                "patch_index": patch_of_token,
            }
            tokens, index, slot_valid = TokenState.entering_llm(
                logical, keep, placeholder_counts, last_placeholder, num_patches, keep_indices.shape[1],
                image_lengths=image_lengths, image_kept=image_kept,
            )
        return tokens, index, slot_valid, pruned_before_end

    # ------------------------------------------------------------------------------------------------------------
    # Site 1: the vision tower
    # ------------------------------------------------------------------------------------------------------------
    def _run_vision_tower(self, pixel_values: torch.Tensor, pruner) -> dict:
        """Run the CLIP encoder up to the feature layer; the pruner may select patches after any layer.

        Adapted from transformers 5.23 `CLIPVisionModel.forward` / `CLIPEncoder.forward`: the stock layers run with
        the configured backend; a layer the pruner asks rows of also records them (`attention_rows.py`).
        """
        vision_tower = self.model.vision_tower
        hidden_states = vision_tower.pre_layrnorm(vision_tower.embeddings(pixel_values))
        num_images = hidden_states.shape[0]
        keep_indices = torch.arange(self.config.num_patches, device=hidden_states.device).expand(num_images, -1)
        placement = None
        kept_counts = []
        feature_layers = self.config.vision_layer_groups[-1][1] + 1
        for layer_idx, layer in enumerate(vision_tower.encoder.layers[:feature_layers]):
            request = pruner.vision_request(layer_idx, num_images, hidden_states.shape[1])
            hidden_states = layer(hidden_states, pruner.vision_mask(layer_idx), **_rows_kwarg(request))
            with profiler_label("ivtp/vision_scoring"):
                selection = pruner.after_vision_layer(layer_idx, hidden_states, request)
            if selection is None:
                continue
            with profiler_label("ivtp/vision_selection"):
                if selection.ordered:  # the tokens in the LLM's order, filling the image's first placeholders
                    if layer_idx != feature_layers - 1:
                        raise ValueError(f"{pruner.name}: an ordered selection comes at the feature layer only.")
                    patches = moved(selection.merged, dtype=hidden_states.dtype)
                    stands_for = moved(selection.keep, keep_indices.device)
                    keep_indices = torch.where(stands_for >= 0, keep_indices.gather(1, stands_for.clamp_min(0)), -1)
                    placement = torch.arange(patches.shape[1], device=keep_indices.device).expand(num_images, -1)
                else:
                    patches = _apply_selection(hidden_states[:, 1:], selection)
                    keep_indices = keep_indices.gather(1, moved(selection.keep, keep_indices.device))
                    context = pruner.context
                    if context is not None and context.vision_valid is not None:  # the kept patches' validity
                        context.vision_valid = context.vision_valid.gather(1, moved(selection.keep, context.vision_valid.device))
                hidden_states = torch.cat([hidden_states[:, :1], patches], dim=1)  # CLS always kept, order kept
            kept_counts.append(hidden_states.shape[1] - 1)
        return {
            "patch_hidden_states": hidden_states[:, 1:],
            "cls_hidden_state": hidden_states[:, 0],
            "feature_layer_hidden_states": hidden_states,
            "keep_indices": keep_indices,
            # which placeholders of each image the tokens fill (in order): their patches', or the first ones
            "placement": keep_indices if placement is None else placement,
            "counts": tuple(kept_counts),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Site 3: the language model
    # ------------------------------------------------------------------------------------------------------------
    def _run_language_model(self, tokens: TokenState, fully_attended, images_per_sample, pruner, cache, use_cache,
                            **kwargs):
        """The LLM over pruned token sets: the runs of `_prefill_runs` through the one decoder loop. Returns the
        final hidden states, the final token state, the kept patches and counts (device tensors, which the caller
        reads once the forward is queued) per pruning layer, the hidden states per layer and the visual tokens each
        layer held."""
        output_hidden_states = kwargs.pop("output_hidden_states")  # resolved by `forward`
        llm = LlmPass(tokens)
        runs = self._prefill_runs(llm, fully_attended, images_per_sample, pruner, cache)
        all_hidden = self._run_decoder(runs, cache, use_cache, output_hidden_states, **kwargs)
        hidden_states, all_hidden = self._final_norm(llm.tokens.hidden_states, all_hidden)
        return hidden_states, llm.tokens, tuple(llm.keep), llm.counts, all_hidden, llm.per_layer

    def _prefill_runs(self, llm: LlmPass, fully_attended, images_per_sample, pruner, cache):
        """Yields the runs of a pruned prefill: up to each pruning layer, then the rest (`layer_segments`); each run
        gets its mask and rotary table, and after it the pruner's selection makes the next run's tokens (`llm`
        holds the state). Sizes come from the token state's host fields, so nothing waits for the device;
        `fully_attended` says the input had no padding; `images_per_sample` `(batch,)` on the device."""
        language_model = self.model.language_model
        tokens = llm.tokens
        prune_layers = pruner.llm_prune_layers()
        # the device twin of `tokens.has_image`, for the LLM site only
        has_image = moved(images_per_sample, tokens.hidden_states.device) > 0 if prune_layers else None
        any_image = bool(prune_layers) and any(tokens.has_image)
        image_rows = true_indices(has_image.unsqueeze(0), len(tokens.image_rows))[0] if any_image else None
        with profiler_label("ivtp/probe"):
            probe = pruner.llm_probe(tokens) if prune_layers else None
        if probe is not None:  # it sits after every real token: causality keeps them from attending to it
            with profiler_label("ivtp/llm_selection"):
                tokens = tokens.append_probe(*probe)
        for first, last in layer_segments(prune_layers, self.config.text_config.num_hidden_layers):
            with profiler_label("ivtp/segment_setup"):  # a mask and rotary table per run (stock: one)
                # Without padding slots or input padding the 2-D mask is all ones: leave it out (nothing to read).
                unpadded = fully_attended and not any(tokens.pads)
                if not unpadded:
                    check_backend_masks(self.config.text_config)
                probe_end = tokens.probe_key_end() if tokens.probe else None
                mask = segment_mask(self.config.text_config, tokens, cache, first, unpadded, probe_end)
                position_embeddings = tokens.rotary
                if position_embeddings is None:  # the first run; later ones gather theirs (`keep_visual`)
                    position_embeddings = language_model.rotary_emb(tokens.hidden_states, position_ids=tokens.position_ids)
                    tokens = replace(tokens, rotary=position_embeddings)
            if cache is not None and any(tokens.pads):
                cache.padding_slots = True  # rows of different lengths: the shorter ones hold padding slots
            view = LlmView(tokens, image_rows) if any_image else None
            scoring = None if view is None else LlmScoring(pruner, view, language_model.layers, mask, position_embeddings)
            llm.per_layer += (tokens.visual if any(tokens.has_image) else 0,) * (last - first + 1)
            run = LayerRun(
                range(first, last + 1), tokens.hidden_states, mask, tokens.position_ids, position_embeddings,
                held=tokens.positions[:, :-1] if tokens.probe else tokens.positions, probe_end=probe_end,
                scoring=scoring,
            )
            yield run
            tokens = replace(tokens, hidden_states=run.output)
            if last in prune_layers:
                selection = scoring.selection if scoring is not None else None
                tokens, kept_patches = self._select_llm(tokens, view, selection, pruner.llm_budget(last), pruner.renumbers)
                llm.keep.append(kept_patches)
                # Visual tokens per image, off the pruned tensors; read by the caller with the logits.
                llm.counts.append(torch.where(has_image, tokens.is_visual.sum(dim=1), 0).max())
                if last == prune_layers[-1] and tokens.probe:
                    tokens = tokens.drop_probe()  # the probe leaves after the last pruning layer
        llm.tokens = tokens

    def _run_decoder(self, runs, cache, use_cache, output_hidden_states: bool, **kwargs):
        """The decoder loop of `LlamaModel.forward` (adapted from transformers 5.23), written once for a pruned
        prefill and for steps over a pruned cache: each `LayerRun` is a run of layers that sees one token set. A
        run's layers may be asked for attention rows (`LayerRun.scoring`); every layer records the positions its
        cache holds. Returns the hidden states at each layer's input (or `None`); sets each run's `output`."""
        layers = self.model.language_model.layers
        all_hidden = () if output_hidden_states else None
        hidden_states = None
        for run in runs:
            hidden_states = run.hidden_states if run.hidden_states is not None else hidden_states
            probe = {} if run.probe_end is None else {"ivtp_probe": run.probe_end}
            for layer_idx in run.layers:
                if output_hidden_states:
                    all_hidden += (hidden_states[:, :-1] if probe else hidden_states,)
                request = run.scoring.request(layer_idx) if run.scoring is not None else None
                hidden_states = layers[layer_idx](
                    hidden_states, attention_mask=run.mask, position_ids=run.position_ids, **cache_kwargs(cache),
                    use_cache=use_cache, position_embeddings=run.position_embeddings, **_rows_kwarg(request),
                    **probe, **kwargs,
                )
                if run.scoring is not None:
                    run.scoring.after_layer(layer_idx, hidden_states)
                if cache is not None:
                    if probe:
                        cache.drop_last_token(layer_idx)  # the probe never enters the KV cache
                    if run.held is not None:  # `None`: a static cache's fixed records
                        cache.record_positions(layer_idx, run.held)
            run.output = hidden_states
        return all_hidden

    def _final_norm(self, hidden_states, all_hidden):
        """The decoder's final norm; its output is the last entry of the hidden states per layer."""
        hidden_states = self.model.language_model.norm(hidden_states)
        return hidden_states, (all_hidden + (hidden_states,) if all_hidden is not None else None)

    @staticmethod
    def _select_llm(tokens: TokenState, view: LlmView | None, selection, num_keep: int | tuple, renumber: bool):
        """Keep each image's selected visual tokens (every other token stays; `renumber`: the position ids close the
        gaps). `num_keep` per image where images keep different counts (LLaVA-NeXT; the selection's rows then end in
        -1). Returns the new state and the kept patches `(batch, num_keep)` (-1 rows for samples without an image,
        -1 past an image's count)."""
        if not isinstance(num_keep, int):
            if len(set(num_keep)) == 1:
                num_keep = num_keep[0]
            else:
                return _select_llm_per_image(tokens, view, selection, num_keep, renumber)
        with profiler_label("ivtp/llm_selection"):
            if view is not None and view.visual_range is not None:  # one range, every sample: no row indexing
                chosen = moved(selection.keep, tokens.is_visual.device) + view.visual_range.start
                kept_patches = tokens.patch_index.gather(1, chosen)
                if selection.merged is not None:
                    merged = moved(selection.merged, dtype=tokens.hidden_states.dtype)
                    index = moved(chosen, merged.device).unsqueeze(-1).expand(-1, -1, merged.shape[-1])
                    tokens = replace(tokens, hidden_states=tokens.hidden_states.scatter(1, index, merged))
                if not renumber or tokens.slot_positions:
                    return tokens.keep_visual_slots(chosen, num_keep, renumber=renumber), kept_patches
                keep = (~tokens.is_visual).scatter(1, chosen, True)
            else:
                keep = ~tokens.is_visual
                kept_patches = torch.full((keep.shape[0], num_keep), -1, dtype=torch.long, device=keep.device)
            if view is not None and view.visual_range is None:
                chosen = view.visual_slots.gather(1, moved(selection.keep, view.visual_slots.device))
                rows = view.image_rows
                keep[rows] = keep[rows].scatter(1, chosen, True)
                kept_patches[rows] = tokens.patch_index[rows].gather(1, chosen)
                if selection.merged is not None:
                    hidden = tokens.hidden_states.clone()
                    hidden[rows.unsqueeze(-1), chosen] = moved(selection.merged, dtype=hidden.dtype)
                    tokens = replace(tokens, hidden_states=hidden)
            return tokens.keep_visual(keep, num_keep, renumber=renumber), kept_patches


def _select_llm_per_image(tokens: TokenState, view: LlmView, selection, num_keep: tuple, renumber: bool):
    """`_select_llm` where images keep different counts (`num_keep` per image; the selection's entries past an
    image's count are -1)."""
    with profiler_label("ivtp/llm_selection"):
        keep = ~tokens.is_visual
        width = max(num_keep)
        picked = moved(selection.keep, view.visual_slots.device)
        taken = picked >= 0
        chosen = view.visual_slots.gather(1, picked.clamp_min(0))
        rows = view.image_rows
        spare = keep.shape[1]  # the entries past a count mark a spare column, cut off
        marked = torch.cat([keep[rows], keep.new_zeros(len(rows), 1)], dim=1).scatter(1, torch.where(taken, chosen, spare), True)
        keep[rows] = marked[:, :spare]
        kept_patches = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
        kept_patches[rows] = torch.where(taken, tokens.patch_index[rows].gather(1, chosen), -1)
        if selection.merged is not None:  # merged features at the kept slots (the -1 entries into a spare column)
            hidden = tokens.hidden_states.clone()
            size = hidden.shape[-1]
            rows_hidden = torch.cat([hidden[rows], hidden.new_zeros(len(rows), 1, size)], dim=1)
            index = torch.where(taken, chosen, spare).unsqueeze(-1).expand(-1, -1, size)
            rows_hidden = rows_hidden.scatter(1, index, moved(selection.merged, dtype=hidden.dtype))
            hidden[rows] = rows_hidden[:, :spare]
            tokens = replace(tokens, hidden_states=hidden)
        return tokens.keep_visual(keep, num_keep, renumber=renumber), kept_patches


class LlavaIvtpForConditionalGeneration(
    IvtpHost, PrunedRunner, ActivationCheckpointingNames, PrunedGeneration, LlavaForConditionalGeneration, GenerationMixin
):
    """LLaVA-1.5 with visual-token pruning: IVTP (Instruction-guided Visual Token Pruning) or another method of the
    registry (`config.pruning_method`, `pruners.py`).

    Same modules and parameter names as [`LlavaForConditionalGeneration`], so llava-hf checkpoints load unchanged.
    With IVTP (`config.schedule` set) the forward prunes visual tokens in two stages:

    1. in the CLIP vision tower, group-wise token pruning (GTP): per group of `group_size` layers, attention rollout
       with residual (eq. 3) of the CLS row times the value norms (eq. 4) keeps the top-k patches;
    2. in the first `group_size * len(schedule["llm"])` LLM layers, GTP again, with a textual pseudo-CLS (eq. 8)
       that attends to the tokens up to the image and that no real token attends to.

    Other methods prune at their own sites (a vision layer, the projected features, an LLM layer) through the same
    runner. Kept tokens keep their original position ids. With `config.pruning_method=None` the model is stock Llava.
    """

    config_class = IvtpConfig
    config: IvtpConfig

    def __init__(self, config: IvtpConfig):
        config.check_ivtp()  # fields edited after the config was made (e.g. `from_pretrained(path, schedule=...)`)
        super().__init__(config)
        self._add_clip_parts()
        self._use_recording_backends()

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
        return self._ivtp_forward(
            guidance, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, labels=labels, logits_to_keep=logits_to_keep,
            use_cache=use_cache, **kwargs,
        )



def stock_kept_positions(reference: torch.Tensor, logits_to_keep, device) -> torch.Tensor:
    """`kept_positions` of a stock forward over `reference` (`input_ids` or `inputs_embeds`): the positions
    `logits_to_keep` keeps. Two operators beside stock's (an arange and its expand) for an int."""
    batch_size, length = reference.shape[:2]
    if isinstance(logits_to_keep, int):
        first = length - logits_to_keep if 0 < logits_to_keep < length else 0
        return torch.arange(first, length, device=device).expand(batch_size, -1)
    every = torch.arange(length, device=device).expand(batch_size, -1)
    return slice_logits_to_keep(every.unsqueeze(-1), logits_to_keep)[..., 0]


def _rows_kwarg(request) -> dict:
    """The per-call kwarg that asks a layer's recording attention for rows (none when nothing is asked)."""
    return {} if request is None else {"ivtp_rows": request}


def _apply_selection(features: torch.Tensor, selection: Selection) -> torch.Tensor:
    """`(n, tokens, hidden)` -> `(n, k, hidden)`: the kept tokens, or their merged features."""
    if selection.merged is not None:
        return moved(selection.merged, dtype=features.dtype)
    keep = moved(selection.keep, features.device)
    return features.gather(1, keep.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


@dataclass
class ImageBatch:
    """The images of a pruned prefill. `per_sample` `(batch,)` on the device and `counts` (host): each sample's
    images. `lengths` (host, per sample, each of its images' placeholders) where images differ in length
    (LLaVA-NeXT), else `None` (`num_patches` each)."""

    per_sample: torch.Tensor
    counts: tuple
    lengths: tuple | None = None
    sizes: list | None = None  # LLaVA-NeXT: each image's (height, width), read on the host

    @property
    def flat_lengths(self) -> tuple | None:
        """Every image's placeholders in order (`None`: `num_patches` each)."""
        return None if self.lengths is None else tuple(length for sample in self.lengths for length in sample)

    def per_sample_values(self, values) -> tuple:
        """`values`, one per image in order, grouped per sample as `lengths` is."""
        values = iter(values)
        return tuple(tuple(next(values) for _ in sample) for sample in self.lengths)


def _gather_kept(indices: torch.Tensor, kept: torch.Tensor, image_kept: tuple | None) -> torch.Tensor:
    """`indices` `(images, n)` at the selected entries `kept` `(images, k)`; with `image_kept` (host), an image's
    entries past its count are -1."""
    gathered = indices.gather(1, kept)
    if image_kept is None or min(image_kept) == kept.shape[1]:
        return gathered
    return torch.where(prefix_mask(image_kept, kept.shape[1], kept.device), gathered, -1)


def _valid_rows(features: torch.Tensor, image_kept: tuple) -> torch.Tensor:
    """`(sum(image_kept), hidden)`: each image's first `image_kept` rows of `features` `(images, k, hidden)`, in
    order (the rows its placeholders take); the features themselves where every image keeps `k`."""
    width = features.shape[1]
    if min(image_kept) == width:
        return features
    rows = [image * width + j for image, count in enumerate(image_kept) for j in range(count)]
    return features.reshape(-1, features.shape[-1]).index_select(0, torch.tensor(rows, device=features.device))


def _image_end_position(image_mask: torch.Tensor, position_ids, images_per_sample: torch.Tensor) -> torch.Tensor:
    """`(batch,)`: the rotary position right after each sample's image block (after its last token without one)."""
    if position_ids is None:
        position_ids = torch.arange(image_mask.shape[1], device=image_mask.device).unsqueeze(0)
    position_ids = moved(position_ids, image_mask.device).expand(image_mask.shape[0], -1)
    image_end = torch.where(image_mask, position_ids, -1).amax(dim=1) + 1
    return torch.where(images_per_sample > 0, image_end, position_ids.amax(dim=1) + 1)


def _pack_guidance(guidance: dict, index: torch.Tensor, slot_valid: torch.Tensor | None) -> dict:
    """The guidance inputs at the tokens that enter the LLM: sequence-aligned ones gathered at `index`
    `(batch, kept)`, the instruction mask limited to real slots (`slot_valid`; `None`: every slot); per-sample ones
    as they are."""
    packed = {}
    for name, value in guidance.items():
        if value is not None and name in SEQUENCE_GUIDANCE_INPUTS:
            value = moved(value, index.device)
            value = value.gather(1, index.view(*index.shape, *[1] * (value.ndim - 2)).expand(-1, -1, *value.shape[2:]))
        packed[name] = value
    if packed.get("instruction_mask") is not None:
        packed["instruction_mask"] = moved(packed["instruction_mask"], dtype=torch.bool)
        if slot_valid is not None:
            packed["instruction_mask"] = packed["instruction_mask"] & slot_valid
    return packed


# Remote code: `save_pretrained` copies this file and every file it imports relatively, and writes
# `auto_map["AutoModelForImageTextToText"]` (`save_pretrained` adds "AutoModel" for the same class).
LlavaIvtpForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["LlavaIvtpForConditionalGeneration", "IvtpCausalLMOutputWithPast"]
