"""Checks of LLaVA-IVTP's forward inputs: every bad input gets a `ValueError` that names it and says what is allowed.

Shapes and dtypes are checked on the host, for free. Values (token ids inside the vocabulary, CLIP ids and CLIP
spans in range, image placeholders) need the tensors' contents: `value_rows` lists what to read, one number per
sample, and the model reads them together with what its prefill reads anyway (one `tolist` per prefill); `check_values`
then judges them on the host. Decode steps over a pruned cache read nothing from an accelerator: their values are
checked only when the tensors are on the CPU, where reading costs nothing (on a GPU an out-of-vocabulary id stops at
the embedding's own device-side check).
"""

from __future__ import annotations

import torch

from .attention_rows import base_backend, moved, takes_masks
from .cache_ivtp import IvtpCache
from .transformers_compat import CACHE_ARG


INTEGER_DTYPES = (torch.long, torch.int, torch.int16, torch.int8, torch.uint8)


def _shape(tensor) -> tuple:
    return tuple(tensor.shape)


def check_sequence_inputs(
    config, input_ids, inputs_embeds, attention_mask, position_ids, labels, past_length: int | None, pruning: bool
) -> tuple[int, int]:
    """`input_ids` / `inputs_embeds`, `attention_mask`, `position_ids` and `labels` against each other and the config.

    `past_length` is the cache's (logical) length before these tokens: a 2-D `attention_mask` covers it too (`None`:
    not known on the host, e.g. a static cache's length is a device tensor; the mask's length is then not checked).
    `pruning` refuses masks other than 2-D (the pruned layers build their own 4-D masks). Returns `(batch, length)`.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    hidden_size = config.text_config.hidden_size
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be a 2-D tensor `(batch, sequence)` of token ids, got {_describe(input_ids)}.")
        if input_ids.dtype not in INTEGER_DTYPES:
            raise ValueError(f"`input_ids` must hold integer token ids (torch.long), got dtype {input_ids.dtype}.")
        batch_size, length = input_ids.shape
        name = "input_ids"
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be `(batch, sequence, {hidden_size})` (the text model's hidden size), got "
                f"{_describe(inputs_embeds)}."
            )
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"`inputs_embeds` must be a floating-point tensor, got dtype {inputs_embeds.dtype}.")
        batch_size, length = inputs_embeds.shape[:2]
        name = "inputs_embeds"
    if batch_size == 0 or length == 0:
        raise ValueError(f"`{name}` is empty (shape {_shape(input_ids if input_ids is not None else inputs_embeds)}): "
                         "give at least one sample of at least one token.")
    if attention_mask is not None and pruning and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"`attention_mask` must be a 2-D tensor with pruning, got {type(attention_mask).__name__}.")
    if isinstance(attention_mask, torch.Tensor) and past_length is not None:  # stock also takes e.g. a BlockMask
        if attention_mask.ndim == 2 or pruning:
            expected = (batch_size, past_length + length)
            if _shape(attention_mask) != expected:
                cached = f"the cache's {past_length} tokens plus " if past_length else ""
                raise ValueError(
                    f"`attention_mask` must be 2-D `(batch, {cached}sequence)` = {expected}, got shape "
                    f"{_shape(attention_mask)}."
                )
            if attention_mask.is_floating_point() and pruning:
                raise ValueError(f"`attention_mask` must be a 0/1 (bool or integer) tensor, got dtype {attention_mask.dtype}.")
    if position_ids is not None:
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.ndim != 2
            or position_ids.shape[0] not in (1, batch_size)
            or position_ids.shape[1] != length
        ):
            raise ValueError(
                f"`position_ids` must be `(batch, sequence)` = {(batch_size, length)} (or `(1, {length})`), got "
                f"{_describe(position_ids)}."
            )
        if position_ids.dtype not in INTEGER_DTYPES:
            raise ValueError(f"`position_ids` must be an integer tensor, got dtype {position_ids.dtype}.")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or _shape(labels) != (batch_size, length):
            raise ValueError(
                f"`labels` must have the shape of `{name}`'s first two dimensions {(batch_size, length)} (one label "
                f"per token, -100 for none), got {_describe(labels)}."
            )
        if labels.dtype not in INTEGER_DTYPES:
            raise ValueError(f"`labels` must be integer token ids (-100: no label), got dtype {labels.dtype}.")
    return batch_size, length


def check_pixel_values(config, pixel_values) -> None:
    """`(num_images, channels, height, width)` at the vision tower's channels and image size."""
    vision = config.vision_config
    expected = (vision.num_channels, vision.image_size, vision.image_size)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or _shape(pixel_values)[1:] != expected:
        raise ValueError(
            f"`pixel_values` must be `(num_images, {expected[0]}, {expected[1]}, {expected[2]})` (channels, height and "
            f"width of the vision tower: {vision.num_channels} channels, {vision.image_size} px), got "
            f"{_describe(pixel_values)}. The model's processor produces them."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"`pixel_values` must be a floating-point tensor, got dtype {pixel_values.dtype}.")


def clip_limits(config) -> tuple[int | None, int | None]:
    """The CLIP text tower's context length and vocabulary size (`None`, `None` without a tower)."""
    spec = getattr(config, "clip_text_encoder", None)
    if spec is None:
        return None, None
    return spec["text_cfg"]["context_length"], spec["text_cfg"]["vocab_size"]


def check_guidance_shapes(config, guidance: dict, reference) -> None:
    """Shapes and dtypes of the processor's guidance tensors, each error naming the field and what is allowed."""
    expected = None if reference is None else tuple(reference.shape[:2])
    mask, clip_ids, spans = guidance["instruction_mask"], guidance["clip_input_ids"], guidance["clip_token_spans"]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or expected is None or _shape(mask) != expected:
            raise ValueError(f"`instruction_mask` must have the shape of `input_ids` {expected}, got {_describe(mask)}.")
        if mask.dtype not in (torch.bool, *INTEGER_DTYPES):
            raise ValueError(f"`instruction_mask` must be a bool or integer 0/1 tensor, got {mask.dtype}.")
    if spans is not None:
        if not isinstance(spans, torch.Tensor) or expected is None or _shape(spans) != (*expected, 2):
            raise ValueError(
                f"`clip_token_spans` must have shape {(*expected, 2) if expected else None} (input_ids' shape, then "
                f"[start, end)), got {_describe(spans)}."
            )
        if spans.dtype not in INTEGER_DTYPES:
            raise ValueError(f"`clip_token_spans` must be an integer tensor, got {spans.dtype}.")
    if clip_ids is not None:
        if not isinstance(clip_ids, torch.Tensor) or clip_ids.ndim != 2 or (
            expected is not None and clip_ids.shape[0] != expected[0]
        ):
            raise ValueError(
                f"`clip_input_ids` must be `(batch_size, clip_context_length)` with batch_size "
                f"{expected[0] if expected else None}, got {_describe(clip_ids)}."
            )
        if clip_ids.dtype not in INTEGER_DTYPES:
            raise ValueError(f"`clip_input_ids` must be an integer tensor, got {clip_ids.dtype}.")
        context, _ = clip_limits(config)
        if context is not None and clip_ids.shape[1] > context:
            raise ValueError(
                f"`clip_input_ids` has {clip_ids.shape[1]} positions, more than the CLIP text tower's context of "
                f"{context} (config.clip_text_encoder['text_cfg']['context_length']). Use the processor's CLIP tokenizer."
            )


def value_rows(input_ids, guidance: dict, device) -> dict[str, torch.Tensor]:
    """What `check_values` needs, one number per sample (`(batch,)` each) on `device`: token id extremes, the CLIP
    ids' extremes and end token (the largest id, as open_clip's pooling takes it), and the spans' smallest start,
    largest end and whether any start exceeds its end."""
    rows = {}
    if input_ids is not None and input_ids.numel():
        rows["ids_min"] = input_ids.amin(dim=1)
        rows["ids_max"] = input_ids.amax(dim=1)
    clip_ids, spans = guidance.get("clip_input_ids"), guidance.get("clip_token_spans")
    if clip_ids is not None and clip_ids.numel():
        rows["clip_min"] = clip_ids.amin(dim=1)
        rows["clip_max"] = clip_ids.amax(dim=1)
        rows["clip_end"] = clip_ids.argmax(dim=1)
    if spans is not None and spans.numel():
        rows["span_start_min"] = spans[..., 0].amin(dim=1)
        rows["span_end_max"] = spans[..., 1].amax(dim=1)
        rows["span_reversed"] = (spans[..., 0] > spans[..., 1]).any(dim=1)
    return {name: moved(row, device, torch.long) for name, row in rows.items()}


def read_rows(rows: dict[str, torch.Tensor], flat: dict[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Every row (`(batch,)` each) and every `flat` tensor (1-D, any length; integers) in one read from the device."""
    if not flat:
        if not rows:
            return {}
        values = torch.stack(list(rows.values())).tolist()
        return dict(zip(rows, values))
    reference = next(iter(rows.values())) if rows else next(iter(flat.values()))
    parts = [torch.stack(list(rows.values())).reshape(-1)] if rows else []
    parts += [moved(tensor, reference.device, torch.long).reshape(-1) for tensor in flat.values()]
    values = torch.cat(parts).tolist()
    batch = len(reference) if rows else 0
    facts = {name: values[row * batch : (row + 1) * batch] for row, name in enumerate(rows)}
    offset = batch * len(rows)
    for name, tensor in flat.items():
        facts[name] = values[offset : offset + tensor.numel()]
        offset += tensor.numel()
    return facts


def check_values(config, facts: dict[str, list[int]], guidance: dict) -> None:
    """Judge what `value_rows` read: ids inside the vocabularies, spans inside `clip_input_ids`."""
    vocab_size = config.text_config.vocab_size
    if "ids_min" in facts and (min(facts["ids_min"]) < 0 or max(facts["ids_max"]) >= vocab_size):
        raise ValueError(
            f"`input_ids` must be token ids in [0, {vocab_size}) (text_config.vocab_size), got values from "
            f"{min(facts['ids_min'])} to {max(facts['ids_max'])}."
        )
    _, clip_vocab = clip_limits(config)
    if "clip_min" in facts and clip_vocab is not None and (min(facts["clip_min"]) < 0 or max(facts["clip_max"]) >= clip_vocab):
        raise ValueError(
            f"`clip_input_ids` must be CLIP token ids in [0, {clip_vocab}) (the CLIP text tower's vocabulary), got "
            f"values from {min(facts['clip_min'])} to {max(facts['clip_max'])}."
        )
    if "span_start_min" in facts:
        clip_ids = guidance.get("clip_input_ids")
        context = clip_ids.shape[1] if clip_ids is not None else clip_limits(config)[0]
        start, end, reversed_ = min(facts["span_start_min"]), max(facts["span_end_max"]), any(facts["span_reversed"])
        if start < 0 or reversed_ or (context is not None and end > context):
            bound = f"{context} (`clip_input_ids`' length)" if context is not None else "the CLIP context"
            raise ValueError(
                f"`clip_token_spans` must hold [start, end) ranges with 0 <= start <= end <= {bound}; got starts from "
                f"{start}, ends up to {end}{', and a start after its end' if reversed_ else ''}."
            )


def check_output_requests(config, kwargs: dict) -> None:
    """Attention weights cannot be returned by a pruned forward (layers see different token sets, sdpa computes no
    weights); asked for by argument or by the config, the answer is the same error."""
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(config, "output_attentions", False) or getattr(config.text_config, "output_attentions", False)
    if requested:
        raise ValueError(
            "`output_attentions` is not supported with IVTP pruning: layers see different token sets (set "
            "`output_attentions` to False in the call and in `config` / `config.text_config`, or turn pruning off "
            "with `config.schedule = None`)."
        )


def hidden_state_selection(request, num_layers: int) -> set[int] | None | bool:
    """`output_hidden_states` as stock Llava takes it: `None`/`False` (none), `True` (all `num_layers + 1`), an
    index or a list of indices into those (negative counts from the end). Returns `False`, `None` (all) or the set
    of selected indices; an index out of range is an error rather than dropped."""
    if request is None or request is False:
        return False
    if request is True:
        return None
    indices = [request] if isinstance(request, int) else request
    if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"`output_hidden_states` must be a bool, an int or a list of ints, got {request!r}.")
    total = num_layers + 1
    outside = [i for i in indices if not -total <= i < total]
    if outside:
        raise ValueError(
            f"`output_hidden_states` indices {outside} are out of range: there are {total} hidden states (the "
            f"embeddings and {num_layers} layers), indices -{total}..{total - 1}."
        )
    return {i % total for i in indices}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {_shape(value)} ({value.dtype})"
    return type(value).__name__


def check_placeholders(config, placeholder_counts: list[int], num_images: int) -> None:
    """Each sample's image placeholders: whole images, as many as `pixel_values` has."""
    num_patches = config.num_patches
    if any(count % num_patches for count in placeholder_counts) or (
        sum(count // num_patches for count in placeholder_counts) != num_images
    ):
        raise ValueError(
            f"Each image needs exactly {num_patches} image placeholder tokens (id {config.image_token_id}): got "
            f"{placeholder_counts} placeholders per sample for {num_images} images. Use the model's processor, which "
            "expands `<image>` to the right count."
        )


def check_llm_site_images(config, images_per_sample: tuple, llm_site: bool) -> None:
    """One image per sample where a method prunes in the LLM (`llm_site`: one probe / one visual block per sample)."""
    if llm_site and any(count > 1 for count in images_per_sample):
        raise ValueError(
            f"pruning_method={config.pruning_method!r} prunes in the LLM, one image per sample (one visual block, one "
            f"probe per sample); got {list(images_per_sample)} images per sample. "
            "For several images per sample use a method that prunes in the vision tower or on the projected features "
            "(for IVTP: schedule['llm'] = [])."
        )


def image_token_mask(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """`(batch, length)` bool: the image placeholders of `input_ids`, or the rows of `inputs_embeds` equal to the
    placeholder's embedding (`model.get_input_embeddings()`)."""
    if input_ids is not None:
        return input_ids == model.config.image_token_id
    image_embedding = model.get_input_embeddings()(
        torch.full((), model.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
    )
    return (inputs_embeds == image_embedding).all(dim=-1)


def check_no_placeholders_without_pixels(config, placeholders: int, where: str) -> None:
    """Image placeholders in tokens that carry no image (no `pixel_values`, and no cache that holds their image) would
    run as text: refused when pruning is on. `where` names the tokens checked."""
    if placeholders:
        raise ValueError(
            f"{where} holds {placeholders} image placeholder tokens (id {config.image_token_id}) but no "
            "`pixel_values`: pass the images as `pixel_values` (the processor returns them), or remove the "
            "placeholders for a text-only prompt. (To continue a conversation after a pruned prefill, pass the "
            "returned cache: it already holds the image.)"
        )


def check_prunable_inputs(config, vision_feature_layer, vision_feature_select_strategy, kwargs) -> None:
    """What a pruned prefill cannot take: another feature layer or strategy, other image inputs."""
    if vision_feature_layer is not None and vision_feature_layer != config.vision_feature_layer:
        raise ValueError(
            f"`vision_feature_layer`={vision_feature_layer} differs from the config's "
            f"{config.vision_feature_layer}, which the pruning schedule is built for; leave it unset."
        )
    if (
        vision_feature_select_strategy is not None
        and vision_feature_select_strategy != config.vision_feature_select_strategy
    ):
        raise ValueError(
            "`vision_feature_select_strategy` must be left unset (the schedule is built for the config's "
            f"{config.vision_feature_select_strategy!r}), got {vision_feature_select_strategy!r}."
        )
    for name in ("image_sizes", "mm_encoder_outputs"):
        if kwargs.get(name) is not None:
            raise ValueError(f"`{name}` is not supported with IVTP pruning: pass `pixel_values` (LLaVA-1.5 images).")


def check_backend_masks(text_config) -> None:
    """For a padded run (input padding or padding slots): a backend registered without a mask function is handed no
    mask, so it can run a pruned prefill only where every slot is an attended token, e.g. at batch size 1."""
    if not takes_masks(text_config._attn_implementation):
        raise ValueError(
            f"attn_implementation={base_backend(text_config._attn_implementation)!r} has no mask function "
            "(`AttentionMaskInterface`), so its layers see no padding mask; this batch is padded (different prompt "
            "lengths, or samples with and without an image). Register a mask function for it, run one sample at a "
            "time, or use 'sdpa'."
        )


def check_cache_class(cache) -> None:
    if not isinstance(cache, IvtpCache):
        raise ValueError(
            f"IVTP stores a different set of tokens per layer, which a {type(cache).__name__} cannot "
            f"hold (static, quantized, offloaded and compiled caches included). Pass `{CACHE_ARG}=None` (an "
            "`IvtpCache` is created) or an empty `IvtpCache`; in `generate`, leave `cache_implementation` unset."
        )

def check_prefill_cache(cache) -> None:
    if cache is None:
        return
    check_cache_class(cache)
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"IVTP prunes the image once, at prefill: `pixel_values` need an empty `{CACHE_ARG}`, this one "
            f"holds {cache.get_seq_length()} tokens. To continue a conversation about the same image, "
            "pass the whole conversation's `input_ids` with the returned cache and without `pixel_values`; "
            "`prefill_chunk_size` cannot be used with pruning."
        )
