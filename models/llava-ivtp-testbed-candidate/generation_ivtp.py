"""`generate` with pruned caches: cache preparation and the inputs of each step (guidance inputs on the steps that
prune, a continued conversation's new turn checked). The steps after a pruned prefill run in the model's forward."""

from __future__ import annotations

import torch

from transformers.masking_utils import create_masks_for_generate

from .cache_ivtp import IvtpCache, IvtpStaticCache
from .tokens_ivtp import check_static_backend, static_width_mask
from .transformers_compat import CACHE_ARG, cache_kwargs, takes_cache_kwarg
from .validation_ivtp import check_cache_class, check_no_placeholders_without_pixels, image_token_mask


# Inputs that guide pruning (the processor's extra outputs): like `pixel_values`, they are used on the step that
# prunes (the prefill) only. The first are aligned with `input_ids` (dim 1 is the sequence), the last is per sample.
SEQUENCE_GUIDANCE_INPUTS = ("instruction_mask", "clip_token_spans")
SAMPLE_GUIDANCE_INPUTS = ("clip_input_ids",)
GUIDANCE_INPUTS = SEQUENCE_GUIDANCE_INPUTS + SAMPLE_GUIDANCE_INPUTS


class PrunedGeneration:
    """Mixed into `LlavaIvtpForConditionalGeneration` before `LlavaForConditionalGeneration` (whose methods `super()`
    reaches): `generate` gets an `IvtpCache`, guidance inputs reach the steps that prune, and a continued
    conversation's new turn is checked. The steps themselves run in the model's forward (`modeling_llava_ivtp.py`)."""

    # ------------------------------------------------------------------------------------------------------------
    # generate
    # ------------------------------------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """IVTP: `generate` gets an `IvtpCache`, or with `cache_implementation="static"` an `IvtpStaticCache` sized
        as transformers sizes a `StaticCache` (`max_length - 1` logical tokens, or `max_cache_len`); caches that
        cannot hold per-layer token sets are refused up front. A text-only batch runs as stock Llava and takes any
        cache stock takes (static ones, compiled steps)."""
        pruning = self.config.pruning_enabled and model_kwargs.get("pixel_values") is not None
        if pruning and model_kwargs.get(CACHE_ARG) is not None:
            check_cache_class(model_kwargs[CACHE_ARG])
        if (
            not pruning
            or model_kwargs.get(CACHE_ARG) is not None
            or generation_config.use_cache is False
        ):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation == "static":
            # compiled decode steps: the pruned prefill fills it, then each layer gets a buffer for the new tokens
            check_static_backend(self.config.text_config)
            max_cache_length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
            if getattr(generation_config, "max_cache_len", None) is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            model_kwargs[CACHE_ARG] = IvtpStaticCache(config=self.config.text_config, max_cache_len=max_cache_length)
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"`cache_implementation={generation_config.cache_implementation!r}` cannot hold IVTP's pruned cache "
                "(each layer holds a different set of tokens; quantized and offloaded caches do not apply). Leave "
                "`cache_implementation` unset (an `IvtpCache`, a `DynamicCache`) or set it to 'static' (an "
                "`IvtpStaticCache`, for compiled decode steps)."
            )
        model_kwargs[CACHE_ARG] = IvtpCache(config=self.config.text_config)

    def create_masks_for_generate(self, *args, **kwargs):
        """The mask `generate` gives a step when the cache is compileable. Over an `IvtpStaticCache` the forward
        builds each run's masks itself: it gets the 2-D mask (at the cache's full width once the prefill has filled
        it, so every step has one shape); other caches get transformers' masks."""
        cache = kwargs.get(CACHE_ARG)
        if not isinstance(cache, IvtpStaticCache):
            return create_masks_for_generate(*args, **kwargs)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None or not cache.is_frozen:
            return attention_mask
        return static_width_mask(attention_mask.bool(), cache.max_cache_len)

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
        if is_first_iteration and self.config.pruning_enabled and kwargs.get("pixel_values") is None:
            self._check_new_turn(input_ids, inputs_embeds, attention_mask, cache)
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

    def _check_new_turn(self, input_ids, inputs_embeds, attention_mask, cache) -> None:
        """A conversation continued over a filled cache without `pixel_values`: its new turn must hold no image
        placeholders (they would run as text; the forward over a filled cache takes placeholders as ordinary tokens,
        since the model may generate the id). The tokens after the cache start with the previous answer's last token
        (`generate` never runs its last token through the model), which may be a generated placeholder: the new turn
        is what follows it. One read, once per `generate` call that continues a conversation."""
        held = host_past_length(cache)
        if held is None and isinstance(cache, IvtpStaticCache):
            held = int(cache.get_seq_length())  # a filled static cache counts on the device: one read per call
        if not held:
            return
        tokens = input_ids if input_ids is not None and input_ids.shape[1] > 0 else inputs_embeds
        given = tokens.shape[1]
        # Only the new tokens when the mask covers the whole conversation; else the conversation, cache first.
        unseen = given if attention_mask is not None and attention_mask.shape[-1] == held + given else given - held
        if unseen <= 1:
            return
        new_turn = slice(given - unseen + 1, given)
        if tokens is input_ids:
            placeholders = (input_ids[:, new_turn] == self.config.image_token_id).sum()
        else:
            placeholders = image_token_mask(self, None, inputs_embeds[:, new_turn]).sum()
        check_no_placeholders_without_pixels(self.config, int(placeholders), "The new turn after the cache")


def host_past_length(cache) -> int | None:
    """The cache's length before this call as a host int (0 without a cache); `None` where it is not known on the
    host without a read (a static cache counts its tokens on the device)."""
    if cache is None:
        return 0
    if isinstance(cache, IvtpStaticCache) and not cache.is_frozen:
        return cache.get_seq_length()  # a host count until the prefill has filled it
    if getattr(cache, "is_compileable", False):
        return None
    length = cache.get_seq_length()
    return length if isinstance(length, int) else None


__all__ = ["GUIDANCE_INPUTS", "PrunedGeneration", "SEQUENCE_GUIDANCE_INPUTS", "host_past_length"]
