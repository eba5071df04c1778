"""`llava-ivtp flops`: FLOPs of stock LLaVA-1.5, vision-only TopK and IVTP, counted on the real forward.

Every figure comes from `torch.utils.flop_counter.FlopCounterMode` around the model classes' own `forward`
(`transformers.LlavaForConditionalGeneration` for stock LLaVA, `LlavaIvtpForConditionalGeneration` for TopK and
IVTP). The models are built on the meta device, without weights, so LLaVA-1.5-7B and -13B shapes count in seconds on
a CPU. Nothing is computed analytically.

How a weight-free forward can run the pruning: `WeightFreeMode` (a `TorchDispatchMode`) lets every floating-point
activation stay a meta tensor (shape only, nothing computed) while the integer bookkeeping of the forward (input ids,
masks, kept indices, counts) stays real on the CPU. The one place where weights decide values the forward reads is
the choice of tokens: `sort`/`topk` of the importance scores. There the scores are taken as zeros, so the kept
tokens are the first ones in order -- which tokens are kept does not change any shape, hence not the FLOPs, because
the schedule fixes how many are kept. (A weight-dependent value copied to the CPU, like IVTP's instruction relevance,
also becomes zeros: it only picks which tokens eq. 8 averages.) Anything that would read a weight-dependent value
into Python or into a shape (`.item()`, `nonzero` on a meta tensor) raises instead of guessing. `tests/test_flops.py` checks that this gives, module by module, the
same counts as `FlopCounterMode` on a real CPU forward of a small model with random weights.

Counting convention (the paper's, Tables 1-3 and 9): one prefill forward, batch 1, one 336 px image (576 patches)
plus N text tokens (every non-image token of the prompt, BOS included); 2 FLOPs per multiply-add; every
matmul, linear, convolution and attention product (`QK^T` and `AV` over the full `T x T`, causal or not); the LM head
over every token that reaches it; vision layers up to the feature layer (23 of 24 for `vision_feature_layer=-2`).
Norms, activations, softmax and element-wise ops are not counted (FlopCounterMode has no formula for them).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from llava_ivtp_presets import PRESETS, preset_path

from modeling_llava_ivtp.configuration_llava_ivtp import (
    PRUNING_METHODS,
    IvtpConfig,
    IvtpNextConfig,
    resolve_feature_layer_count,
    stock_llava_fields,
)
from modeling_llava_ivtp.layout_next import next_layout
from modeling_llava_ivtp.modeling_llava_ivtp import LlavaIvtpForConditionalGeneration
from modeling_llava_ivtp.modeling_llava_next_ivtp import LlavaNextIvtpForConditionalGeneration
from modeling_llava_ivtp.pruner_base import budget_schedule


aten = torch.ops.aten

DEFAULT_TEXT_TOKENS = (128, 256, 512, 1024)
BREAKDOWN_TEXT_TOKENS = 512  # the paper's Table 1, 2 and 9 setting
DEFAULT_PREFIX_TOKENS = 5  # BOS + "USER:" of LLaVA-1.5's prompt format, before the image
DEFAULT_CLIP_MODEL = "ViT-L-14-336"  # LLaVA-1.5's vision tower is OpenAI CLIP ViT-L/14 at 336 px

# FlopCounterMode has no formula for the CPU flash kernel that `scaled_dot_product_attention` picks for real CPU
# tensors (on meta tensors the same call decomposes into two counted `bmm`s); count it as torch's own sdpa formula.


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


# ----------------------------------------------------------------------------------------------------------------
# Weight-free execution
# ----------------------------------------------------------------------------------------------------------------
META = torch.device("meta")
CPU = torch.device("cpu")
# Ops whose outputs the forward uses as indices: run them on zeros in place of weight-dependent (meta) inputs.
INDEX_OPS = {aten.sort, aten.topk, aten.argsort, aten.argmax, aten.argmin, aten.kthvalue}
INDEX_OVERLOADS = {aten.max.dim, aten.min.dim}  # with indices; the plain reductions are values (stay meta)
# Ops that would read a weight-dependent value into Python or into a shape: refused on meta inputs.
DATA_DEPENDENT_OPS = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten.unique_dim,
                      aten._unique2, aten.unique_consecutive, aten.item}


def _is_meta(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


def _is_meta_device(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


class WeightFreeMode(TorchDispatchMode):
    """Run a forward whose weights live on the meta device: activations stay meta, bookkeeping stays real.

    - Ops on meta tensors run on meta (shape only); real CPU tensors they meet are moved to meta for the op.
    - Tensors the forward creates or moves "to the model's device" (factories, `.to(meta)`) are made on the CPU, so
      index arithmetic (aranges, masks, gathers of indices) keeps its values.
    - Index-producing ops (`sort`, `topk`, `argmax`, ...) on meta inputs run on zeros: deterministic indices of the
      right count. In-place writes of meta values into a real tensor write zeros.
    - `.item()`, `nonzero` and the like on a meta tensor raise: their result would depend on the weights.

    `substituted` lists the ops that ran on zeros in place of meta inputs.
    """

    def __init__(self):
        super().__init__()
        self.substituted: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        packet = func._overloadpacket
        if _is_meta_device(kwargs.get("device")) and not any(_is_meta(t) for t in tensors):
            # A factory or a copy "to the model's device" of real data: keep it real, on the CPU.
            return func(*args, **{**kwargs, "device": CPU})
        if not any(_is_meta(t) for t in tensors):
            return func(*args, **kwargs)
        if packet in DATA_DEPENDENT_OPS:
            raise RuntimeError(
                f"{func} reads a value that depends on the weights, which a weight-free (meta) forward does not have; "
                "count this model with real weights (count_forward(..., weight_free=False))."
            )
        schema_args = func._schema.arguments
        writes_real_self = (
            bool(schema_args)
            and schema_args[0].alias_info is not None
            and schema_args[0].alias_info.is_write
            and isinstance(args[0], torch.Tensor)
            and not _is_meta(args[0])
        )
        copies_to_real = packet is aten._to_copy and kwargs.get("device") is not None and not _is_meta_device(kwargs["device"])
        if packet in INDEX_OPS or func in INDEX_OVERLOADS or writes_real_self or copies_to_real:
            self.substituted.append(str(func))
            args, kwargs = tree_map(
                lambda t: torch.zeros(t.shape, dtype=t.dtype, device=CPU) if _is_meta(t) else t, (args, kwargs)
            )
            return func(*args, **kwargs)
        args, kwargs = tree_map(lambda t: t.to(META) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT's default image for a count: 672 x 672, the 2 x 2 grid at full size (LLaVA-1.6-7B: 5 crops, 2,928 tokens)
DEFAULT_NEXT_IMAGE_SIZE = (672, 672)


def is_next(config) -> bool:
    """Whether `config` is a LLaVA-NeXT one (`IvtpNextConfig` or stock `LlavaNextConfig`)."""
    return isinstance(config, (IvtpNextConfig, LlavaNextConfig))


def host_name(config) -> str:
    return "LLaVA-NeXT" if is_next(config) else "LLaVA-1.5"


def stock_llava_config(config: IvtpConfig) -> LlavaConfig:
    """The stock `LlavaConfig` (`LlavaNextConfig` for LLaVA-NeXT) of the same architecture (IVTP's fields removed)."""
    stock_class = LlavaNextConfig if is_next(config) else LlavaConfig
    stock = stock_class(**stock_llava_fields(config.to_dict()))
    stock._attn_implementation = config._attn_implementation or "sdpa"
    return stock


def _patches(config) -> int:
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def visual_tokens_into_llm(config) -> int:
    """Visual tokens per image that enter the LLM under `config`'s schedule (all patches without one)."""
    schedule = getattr(config, "schedule", None)
    return schedule["vision"][-1] if schedule and schedule["vision"] else _patches(config)


def final_visual_tokens(config) -> int:
    """Visual tokens per image that reach the last LLM layer under `config`'s schedule (all patches without one)."""
    schedule = getattr(config, "schedule", None)
    return schedule["llm"][-1] if schedule and schedule["llm"] else visual_tokens_into_llm(config)


def topk_config(config: IvtpConfig, vision_schedule: list[int] | None = None, final: int | None = None) -> IvtpConfig:
    """Vision-only pruning (stage 1 only, no CLIP text tower) with `vision_schedule`, by default geometric from the
    patches to `final` (`budget_schedule(..., llm=False)`; `final` defaults to the tokens `config` keeps in the end,
    64 for the LLaVA-1.5 presets)."""
    final = final_visual_tokens(config) if final is None else final
    if not 1 <= final <= config.max_visual_tokens:
        raise ValueError(
            f"TopK's final token count must be in [1, {config.max_visual_tokens}] (the visual tokens of an image), got "
            f"{final}."
        )
    values = config.to_dict()
    vision_schedule = vision_schedule or budget_schedule(config, final, llm=False)["vision"]
    values.update(schedule={"vision": list(vision_schedule), "llm": []}, pruning_method="ivtp", pruning_options=None)
    values["clip_text_encoder"] = None
    topk = type(config).from_dict(values)
    topk._attn_implementation = config._attn_implementation or "sdpa"
    return topk


def ivtp_config(config: IvtpConfig, clip_model: str = DEFAULT_CLIP_MODEL) -> tuple[IvtpConfig, str | None]:
    """The preset as it runs with instruction guidance: a preset without a CLIP text tower gets `clip_model`'s
    (architecture only). Returns the config and a note saying what was added, or None."""
    if config.clip_text_encoder is not None or not config.pruning_enabled or not config.schedule["llm"]:
        return config, None
    if config.guidance != "clip_relevance":
        return config, None
    from modeling_llava_ivtp.guidance_ivtp import clip_text_encoder_spec

    values = config.to_dict()
    values["clip_text_encoder"] = clip_text_encoder_spec(clip_model)
    guided = type(config).from_dict(values)
    guided._attn_implementation = config._attn_implementation or "sdpa"
    return guided, f"the preset has no CLIP text tower (`clip_text_encoder` is null); counted with open_clip {clip_model}'s"


MODEL_CLASSES = {
    IvtpConfig: LlavaIvtpForConditionalGeneration, LlavaConfig: LlavaForConditionalGeneration,
    IvtpNextConfig: LlavaNextIvtpForConditionalGeneration, LlavaNextConfig: LlavaNextForConditionalGeneration,
}


def build_weight_free(config) -> torch.nn.Module:
    """The model class of `config` (stock Llava for a `LlavaConfig`, IVTP for an `IvtpConfig`; their LLaVA-NeXT
    twins for `LlavaNextConfig` and `IvtpNextConfig`) on the meta device."""
    model_class = MODEL_CLASSES[type(config)]
    if config._attn_implementation is None:
        config._attn_implementation = "sdpa"
    with torch.device(META):
        model = model_class(config)
    return model.eval()


def clip_context_length(config) -> int | None:
    spec = getattr(config, "clip_text_encoder", None)
    return None if spec is None else spec["text_cfg"]["context_length"]


def example_inputs(
    config,
    text_tokens: int,
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
    batch_size: int = 1,
    device: torch.device | str = CPU,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_NEXT_IMAGE_SIZE,
) -> dict:
    """A prompt of `prefix_tokens` text tokens (BOS first), one image's placeholders, then the rest of the
    `text_tokens` text tokens (the instruction), as `LlavaIvtpProcessor` would lay it out. LLaVA-NeXT: an image of
    `image_size` `(height, width)`, its crops and as many placeholders as its packed sequence (`layout_next.py`).

    `pixel_values` are on `device` (meta for a weight-free count). For a model with a CLIP text tower the guidance
    tensors are added: the instruction is every text token after the image; `clip_input_ids` fill CLIP's whole
    context (start, content, end, zero padding), as the processor pads them, and instruction token `j` overlaps CLIP
    token `j + 1` while CLIP has room.
    """
    if not 1 <= prefix_tokens < text_tokens:
        raise ValueError(f"`prefix_tokens` must be in [1, text_tokens - 1] = [1, {text_tokens - 1}], got {prefix_tokens}.")
    generator = torch.Generator().manual_seed(seed)
    text_config, vision_config = config.text_config, config.vision_config
    image_token = config.image_token_id
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    crops = None
    if is_next(config):
        layout = next_layout(image_size, config.image_grid_pinpoints, vision_config.image_size, vision_config.patch_size)
        patches, crops = layout.length, layout.crops
    vocab = [token for token in range(3, min(text_config.vocab_size, 30000)) if token != image_token]
    vocab = torch.tensor(vocab)
    suffix = text_tokens - prefix_tokens
    prefix_ids = vocab[torch.randint(len(vocab), (batch_size, prefix_tokens - 1), generator=generator)]
    suffix_ids = vocab[torch.randint(len(vocab), (batch_size, suffix), generator=generator)]
    input_ids = torch.cat(
        [
            torch.ones(batch_size, 1, dtype=torch.long),
            prefix_ids,
            torch.full((batch_size, patches), image_token, dtype=torch.long),
            suffix_ids,
        ],
        dim=1,
    )
    shape = (batch_size, vision_config.num_channels, vision_config.image_size, vision_config.image_size)
    if crops is not None:
        shape = (batch_size, crops, *shape[1:])
    if torch.device(device).type == "meta":
        pixel_values = torch.empty(shape, device=META)
    else:
        pixel_values = torch.randn(shape, generator=generator).to(device)
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
    if crops is not None:
        inputs["image_sizes"] = torch.tensor([list(image_size)] * batch_size)
    context = clip_context_length(config)
    if context is not None:
        length = input_ids.shape[1]
        first = prefix_tokens + patches
        instruction_mask = torch.zeros(batch_size, length, dtype=torch.bool)
        instruction_mask[:, first:] = True
        content = min(suffix, context - 2)
        clip_vocab = config.clip_text_encoder["text_cfg"]["vocab_size"]
        sot, eot = clip_vocab - 2, clip_vocab - 1  # open_clip: start and end are the two largest ids
        clip_input_ids = torch.zeros(batch_size, context, dtype=torch.long)
        clip_input_ids[:, 0] = sot
        clip_input_ids[:, 1 : 1 + content] = torch.randint(256, sot, (batch_size, content), generator=generator)
        clip_input_ids[:, 1 + content] = eot
        clip_token_spans = torch.zeros(batch_size, length, 2, dtype=torch.long)
        positions = torch.arange(1, 1 + content)
        clip_token_spans[:, first : first + content, 0] = positions
        clip_token_spans[:, first : first + content, 1] = positions + 1
        inputs.update(instruction_mask=instruction_mask, clip_input_ids=clip_input_ids, clip_token_spans=clip_token_spans)
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
def count_forward(
    model: torch.nn.Module, inputs: dict, weight_free: bool = True, use_cache: bool = True
) -> tuple[dict[str, int], list[str], object]:
    """FLOPs of `model(**inputs, use_cache=use_cache)` per module, as `FlopCounterMode.get_flop_counts()` keys them
    (`"Global"` is everything), summed over ops. `weight_free`: run under `WeightFreeMode` (meta weights). The
    default counts the prefill `generate` runs (with a cache, from which stage-2 scoring reads keys and values).

    Returns `(counts, substituted, outputs)`: `substituted` lists the ops `WeightFreeMode` ran on zeros, `outputs`
    is what the forward returned (meta tensors for a weight-free count).
    The fused CPU multi-head-attention fast path (opaque to FlopCounterMode) is turned off while counting.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    weight_free_mode = WeightFreeMode() if weight_free else None
    try:
        with torch.no_grad():
            if weight_free_mode is not None:
                weight_free_mode.__enter__()
            try:
                with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS) as counter:
                    outputs = model(**inputs, use_cache=use_cache)
            finally:
                if weight_free_mode is not None:
                    weight_free_mode.__exit__(None, None, None)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return counts, (weight_free_mode.substituted if weight_free_mode is not None else []), outputs


@dataclass
class Breakdown:
    """FLOPs of one forward by part (integers). `total = vit + llm + extra`.

    vit: patch embedding and the vision layers up to the feature layer (what runs for patch features).
    llm: decoder layers (every token they see, IVTP's pseudo-CLS row included), rotary tables, LM head, and the
        multimodal projector (for IVTP also its one-row call on the visual CLS).
    extra: everything else the forward runs: IVTP's scoring (attention probabilities and value norms computed beside
        the layers, rollout), the CLIP image embedding of eq. 6 (last vision layer's CLS row, CLIP's visual projection)
        and the CLIP text tower.
    clip_text_tower: the part of `extra` run inside the CLIP text tower's modules (its final projection, a bare
        parameter matmul, is in `extra` only: 2 * context * width * embed_dim FLOPs).
    not_counted: run by the forward but outside the convention: the vision layers after the feature layer, which the
        stock forward runs and discards (for IVTP such layers only run for the CLIP image embedding: extra).
    """

    text_tokens: int
    vit: int
    llm: int
    extra: int
    total: int
    clip_text_tower: int = 0
    not_counted: int = 0
    visual_tokens_into_llm: int = 0
    visual_tokens_last_layer: int = 0
    mean_visual_tokens_per_llm_layer: float = 0.0
    substituted_ops: list[str] = field(default_factory=list)
    visual_tokens_per_llm_layer: list[int] = field(default_factory=list)


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    root = type(model).__name__
    return {id(module): (f"{root}.{name}" if name else root) for name, module in model.named_modules()}


def part_breakdown(model: torch.nn.Module, counts: dict[str, int], text_tokens: int, num_images: int) -> Breakdown:
    """Split `count_forward`'s per-module counts into ViT / LLM / extra (see `Breakdown`).

    FlopCounterMode books an op under every module whose forward is running, so the parts sum modules that never
    run inside each other: each vision and decoder layer's own forward, the LM head, the projector. Scoring reads
    the rows it asked for after the layer has returned (`attention_rows.RowRequest`), so it lands in no layer: it is
    in `extra`.
    """
    names = _module_names(model)
    config = model.config
    vision_tower = model.model.vision_tower
    language_model = model.model.language_model
    vision_layers = list(vision_tower.encoder.layers)
    feature_layers = resolve_feature_layer_count(config.vision_feature_layer, len(vision_layers))

    def total(modules) -> int:
        return sum(counts.get(names[id(module)], 0) for module in modules if module is not None)

    def executed(module) -> int:
        """Ops run inside `module`'s forward, or else inside its children's (IVTP calls the CLIP tower's parts)."""
        if module is None:
            return 0
        if names[id(module)] in counts:
            return counts[names[id(module)]]
        return sum(executed(child) for child in module.children())

    is_ivtp = isinstance(model, (LlavaIvtpForConditionalGeneration, LlavaNextIvtpForConditionalGeneration)) and config.pruning_enabled
    vit = total([vision_tower.embeddings, getattr(vision_tower, "pre_layrnorm", None)])
    vit += sum(executed(layer) for layer in vision_layers[:feature_layers])
    after_feature_layer = total(vision_layers[feature_layers:])
    llm = total([*language_model.layers, getattr(language_model, "rotary_emb", None), model.lm_head, model.model.multi_modal_projector])
    clip_text = executed(getattr(model, "clip_text_model", None))
    everything = counts.get("Global", 0)
    not_counted = 0 if is_ivtp else after_feature_layer
    extra = everything - vit - llm - not_counted
    return Breakdown(
        text_tokens=text_tokens, vit=vit, llm=llm, extra=extra, total=vit + llm + extra, clip_text_tower=clip_text,
        not_counted=not_counted, visual_tokens_into_llm=visual_tokens_into_llm(config),
        visual_tokens_last_layer=final_visual_tokens(config),
        mean_visual_tokens_per_llm_layer=float(final_visual_tokens(config)),
    )


def measure(
    config,
    text_tokens: int,
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
    batch_size: int = 1,
    model: torch.nn.Module | None = None,
    image_size: tuple[int, int] = DEFAULT_NEXT_IMAGE_SIZE,
) -> Breakdown:
    """Count one weight-free forward of `config`'s model class over `example_inputs` and split it by part."""
    model = model if model is not None else build_weight_free(config)
    inputs = example_inputs(model.config, text_tokens, prefix_tokens, batch_size, device=META, image_size=image_size)
    counts, substituted, outputs = count_forward(model, inputs, weight_free=True)
    breakdown = part_breakdown(model, counts, text_tokens, num_images=inputs["pixel_values"].shape[0])
    breakdown.substituted_ops = sorted(set(substituted))
    per_layer = visual_tokens_per_llm_layer(model.config, inputs["input_ids"], outputs)
    breakdown.visual_tokens_into_llm, breakdown.visual_tokens_last_layer = per_layer[0], per_layer[-1]
    breakdown.mean_visual_tokens_per_llm_layer = sum(per_layer) / len(per_layer)
    breakdown.visual_tokens_per_llm_layer = per_layer
    return breakdown


def visual_tokens_per_llm_layer(config, input_ids: torch.Tensor, outputs) -> list[int]:
    """Visual tokens per image that each LLM layer held in the forward (the output's host-side sizes); every
    placeholder for a forward that pruned nothing."""
    per_layer = getattr(outputs, "visual_tokens_per_layer", None)
    if not per_layer:
        return [int((input_ids[0] == config.image_token_id).sum())] * config.text_config.num_hidden_layers
    return list(per_layer)


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------
def resolve_preset(preset: str | None, model_size: str | None) -> Path:
    if preset is not None:
        path = Path(preset)
    else:
        path = preset_path(model_size or "7b")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        flag = f"--preset {path}" if preset is not None else f"--model-size {model_size or '7b'}: {path}"
        raise FileNotFoundError(
            f"{flag}: IvtpConfig preset {what}. Pass `--preset PATH` (a JSON such as the repository's "
            "configuration/llava-1.5-7b-ivtp.json)."
        )
    return path


def read_preset(path: Path) -> IvtpConfig:
    """An IvtpConfig JSON file (an `IvtpNextConfig` where its `model_type` is "llava_next_ivtp"); a `ValueError`
    saying what is wrong with it otherwise."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        raw = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not JSON ({error}).") from None
    except OSError as error:
        raise ValueError(f"cannot be read ({error}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object of IvtpConfig fields, got a JSON {type(raw).__name__}.")
    config_class = IvtpNextConfig if raw.get("model_type") == IvtpNextConfig.model_type else IvtpConfig
    try:
        return config_class.from_dict(raw)
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ValueError(f"not a valid {config_class.__name__}: {error}") from None


def flops_report(
    preset: IvtpConfig,
    text_tokens=DEFAULT_TEXT_TOKENS,
    topk_vision: list[int] | None = None,
    topk_tokens: int | None = None,
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
    batch_size: int = 1,
    clip_model: str = DEFAULT_CLIP_MODEL,
    preset_name: str = "",
    methods: list[str] = (),
    visual_tokens: int | None = None,
    image_size: tuple[int, int] = DEFAULT_NEXT_IMAGE_SIZE,
) -> dict:
    """Counted FLOPs of stock LLaVA, TopK and IVTP (`preset`) at each text length, as a JSON-ready dict; then one row
    per pruning method of `methods` at the budget `visual_tokens` (default: the tokens the preset keeps in the end).
    A LLaVA-NeXT preset counts LLaVA-NeXT with one image of `image_size` `(height, width)`."""
    if preset._attn_implementation is None:
        preset._attn_implementation = "sdpa"
    guided, clip_note = ivtp_config(preset, clip_model)
    topk = topk_config(preset, topk_vision, topk_tokens)
    rows = [
        ("stock", f"{host_name(preset)} (stock)", stock_llava_config(preset), None),
        ("topk", f"TopK (vision only, to {topk.schedule['vision'][-1]}{' per crop' if is_next(preset) else ''})",
         topk, topk.schedule),
        ("ivtp", "IVTP (preset)", guided, guided.schedule),
    ]
    budget = visual_tokens if visual_tokens is not None else final_visual_tokens(preset)
    for method in methods:
        # IVTP and CDPruner read the instruction through the CLIP text tower: counted with it, as the IVTP row
        values = guided.to_dict() if method in ("ivtp", "cdpruner") else preset.to_dict()
        values.update(schedule=None, pruning_method=method, pruning_options={"visual_tokens": budget})
        config = type(preset).from_dict(values)
        config._attn_implementation = "sdpa"
        rows.append((f"method:{method}", f"{method} @{budget}", config, config.schedule))
    text = preset.text_config
    report = {
        "preset": preset_name,
        "unit": "TFLOPs (1e12 FLOPs, 2 FLOPs per multiply-add)",
        "batch_size": batch_size,
        "prefix_tokens": prefix_tokens,
        "host": host_name(preset),
        "image_size": list(image_size) if is_next(preset) else None,
        "image_tokens": example_inputs(preset, 8, 1, image_size=image_size)["input_ids"].eq(preset.image_token_id).sum().item(),
        "model": {
            "vision_layers_run": resolve_feature_layer_count(preset.vision_feature_layer, preset.vision_config.num_hidden_layers),
            "vision_layers": preset.vision_config.num_hidden_layers,
            "vision_hidden_size": preset.vision_config.hidden_size,
            "llm_layers": text.num_hidden_layers,
            "llm_hidden_size": text.hidden_size,
            "llm_intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
        },
        "clip_text_tokens": clip_context_length(guided),
        "clip_text_model_name": None if guided.clip_text_encoder is None else guided.clip_text_encoder["model_name"],
        "clip_text_note": clip_note,
        "rows": [],
    }
    stock_totals = {}
    for key, label, config, schedule in rows:
        model = build_weight_free(config)
        results = []
        for length in text_tokens:
            breakdown = measure(config, length, prefix_tokens, batch_size, model=model, image_size=image_size)
            values = asdict(breakdown)
            values["scoring"] = values["extra"] - values["clip_text_tower"]
            parts = ("vit", "llm", "extra", "total", "clip_text_tower", "scoring", "not_counted")
            tflops = {part: values[part] / 1e12 for part in parts}
            if key == "stock":
                stock_totals[length] = breakdown.total
            result = {
                "text_tokens": length,
                "tflops": tflops,
                "flops": {part: values[part] for part in parts},
                "visual_tokens_into_llm": breakdown.visual_tokens_into_llm,
                "visual_tokens_last_layer": breakdown.visual_tokens_last_layer,
                "mean_visual_tokens_per_llm_layer": breakdown.mean_visual_tokens_per_llm_layer,
                "ratio_to_stock": breakdown.total / stock_totals[length],
                "weight_free_substitutions": breakdown.substituted_ops,
            }
            results.append(result)
        report["rows"].append({"key": key, "label": label, "model_class": type(model).__name__, "schedule": schedule, "results": results})
    return report


CONVENTION = (
    "one prefill forward (use_cache=True, as in generate), batch {batch}, one image ({patches}) and N text tokens (every "
    "non-image prompt token: {prefix} before the image incl. BOS, the rest after it); 2 FLOPs per multiply-add; "
    "matmuls, linears, convolutions and attention products over the full T x T (no causal discount); LM head over every "
    "token that reaches it; ViT = patch embedding + vision layers up to the feature layer ({vit_layers} of "
    "{all_layers}); LLM = decoder layers + LM head + multimodal projector; extra = IVTP's scoring and rollout, the CLIP "
    "image embedding of eq. 6 and the CLIP text tower."
)


def _format_tflops(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def render_markdown(report: dict, breakdown_at: int) -> str:
    lengths = [result["text_tokens"] for result in report["rows"][0]["results"]]
    host = report.get("host", "LLaVA-1.5")
    lines = [f"# FLOPs of {host} with and without token pruning ({Path(report['preset']).name or 'preset'})", ""]
    model = report["model"]
    lines.append(
        f"Counted by `torch.utils.flop_counter.FlopCounterMode` on the model classes' real forward, weight-free (meta "
        f"device). LLM: {model['llm_layers']} layers x {model['llm_hidden_size']}; ViT: {model['vision_layers_run']} of "
        f"{model['vision_layers']} layers x {model['vision_hidden_size']}. TFLOPs."
    )
    lines.append("")
    lines.append("## Total TFLOPs vs text tokens (paper Table 3)")
    lines.append("")
    lines.append("| method | " + " | ".join(str(length) for length in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for row in report["rows"]:
        cells = []
        for result in row["results"]:
            cell = _format_tflops(result["tflops"]["total"], 2)
            if row["key"] != "stock":
                cell += f" ({100 * (result['ratio_to_stock'] - 1):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    at = breakdown_at if breakdown_at in lengths else lengths[0]
    lines.append(f"## TFLOPs by part at {at} text tokens (paper Table 9)")
    lines.append("")
    lines.append("| method | visual tokens in LLM | mean per LLM layer | ViT | LLM | extra | total | vs stock |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        result = next(result for result in row["results"] if result["text_tokens"] == at)
        tflops = result["tflops"]
        extra = _format_tflops(tflops["extra"]) if tflops["extra"] else "-"
        change = "" if row["key"] == "stock" else f"{100 * (result['ratio_to_stock'] - 1):+.1f}%"
        tokens = str(result["visual_tokens_into_llm"])
        if result["visual_tokens_last_layer"] != result["visual_tokens_into_llm"]:
            tokens += f" -> {result['visual_tokens_last_layer']}"
        lines.append(
            f"| {row['label']} | {tokens} | {result['mean_visual_tokens_per_llm_layer']:.1f} | {_format_tflops(tflops['vit'])} | "
            f"{_format_tflops(tflops['llm'])} | {extra} | {_format_tflops(tflops['total'])} | {change} |"
        )
    lines.append("")
    stock = report["rows"][0]["results"][lengths.index(at)]["tflops"]
    ivtp = next(row for row in report["rows"] if row["key"] == "ivtp")
    ivtp_at = ivtp["results"][lengths.index(at)]["tflops"]
    notes = [
        "Convention: " + CONVENTION.format(
            batch=report["batch_size"], prefix=report["prefix_tokens"],
            patches=(f"{report['image_tokens']} patch tokens" if not report.get("image_size") else
                     f"{report['image_size'][0]} x {report['image_size'][1]} px: {report['image_tokens']} visual tokens, "
                     "base crop, unpadded tiles and newlines"),
            vit_layers=model["vision_layers_run"], all_layers=model["vision_layers"],
        ),
        f"Not counted: the stock forward also runs the vision layers after the feature layer and discards them "
        f"({_format_tflops(stock['not_counted'], 4)} TFLOPs at {at} text tokens).",
    ]
    for row in report["rows"][1:]:
        schedule = row["schedule"]
        if row["key"].startswith("method:") and row["key"] != "method:ivtp":
            continue
        if schedule is None:
            notes.append(f"{row['label']}: the preset's schedule is null (pruning off: stock Llava's computation).")
        else:
            notes.append(f"{row['label']} schedule: vision {schedule['vision'] or 'none'}, LLM {schedule['llm'] or 'none'}.")
    if report["clip_text_tokens"] is not None:
        clip = (
            f"CLIP text tower ({report['clip_text_model_name']}) runs over its whole context of {report['clip_text_tokens']} "
            "tokens whatever the instruction's length (LlavaIvtpProcessor pads `clip_input_ids` to it; longer "
            f"instructions are cut). IVTP's extra at {at} text tokens: CLIP text tower "
            f"{_format_tflops(ivtp_at['clip_text_tower'], 4)} + scoring, rollout and CLIP image embedding "
            f"{_format_tflops(ivtp_at['scoring'], 4)} TFLOPs."
        )
        if report["clip_text_note"]:
            clip += f" Note: {report['clip_text_note']}."
        notes.append(clip)
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    paragraphs = [
        "FLOPs of stock LLaVA-1.5 (transformers LlavaForConditionalGeneration), vision-only TopK pruning and IVTP, "
        "counted by torch's FlopCounterMode on the real forward of each model class, built weight-free on the meta "
        "device (LLaVA-1.5-7B/13B shapes count in seconds on a CPU). Prints the analogues of the paper's Table 3 "
        "(total vs text length) and Table 9 (ViT / LLM / extra).",
        "Convention (the paper's): " + CONVENTION.format(
            batch="B (--batch-size)", patches="576 patch tokens; LLaVA-NeXT: --image-size", prefix="--prefix-tokens", vit_layers=23, all_layers="24 for LLaVA-1.5"
        ),
        "Instruction length for 'extra': the CLIP text tower always runs over its whole context (77 tokens for "
        "ViT-L-14-336), as LlavaIvtpProcessor pads clip_input_ids to it, so its cost does not depend on the "
        "instruction's length. On the LLM side the instruction is every text token after the image.",
    ]
    parser.description = "\n\n".join(textwrap.fill(paragraph, width=100) for paragraph in paragraphs)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="IvtpConfig JSON for the IVTP row (default: configuration/llava-1.5-7b-ivtp.json)")
    source.add_argument(
        "--model-size", choices=sorted(PRESETS), help="use the installed LLaVA-1.5 preset of this size (7b or 13b)"
    )
    parser.add_argument(
        "--text-tokens", type=int, nargs="+", default=list(DEFAULT_TEXT_TOKENS), metavar="N",
        help="text lengths (non-image tokens of the prompt), default: 128 256 512 1024 (paper Table 3)",
    )
    parser.add_argument(
        "--breakdown-at", type=int, default=None, metavar="N",
        help="text length of the per-part table, one of --text-tokens (default: 512, the paper's Table 9 setting, "
        "if listed, else the first)",
    )
    parser.add_argument(
        "--topk-vision", type=lambda text: [int(value) for value in text.split(",")], default=None, metavar="K1,...,KG",
        help="the TopK row's vision schedule, one count per vision group (default: geometric decay from the patches "
        "to --topk-tokens, multiples of 8); TopK prunes in the vision tower only",
    )
    parser.add_argument(
        "--topk-tokens", type=int, default=None, metavar="N",
        help="visual tokens TopK keeps (default: as many as the preset keeps in the end, 64 for LLaVA-1.5's presets)",
    )
    parser.add_argument(
        "--prefix-tokens", type=int, default=DEFAULT_PREFIX_TOKENS, metavar="N",
        help="text tokens before the image, BOS included (default 5: '<s> USER:'); the rest follow it",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per forward (paper: 1)")
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL,
        help="open_clip architecture of the CLIP text tower when the preset has none (default ViT-L-14-336)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=[], metavar="METHOD",
        help=f"also count these pruning methods at the budget --visual-tokens, one row each: {', '.join(PRUNING_METHODS)} "
        "or 'all'",
    )
    parser.add_argument(
        "--visual-tokens", type=int, default=None, metavar="K",
        help="the --methods rows' budget: visual tokens per image in the LLM's last layers (default: as many as the "
        "preset keeps in the end, 64 for LLaVA-1.5's presets)",
    )
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=list(DEFAULT_NEXT_IMAGE_SIZE), metavar=("HEIGHT", "WIDTH"),
        help="LLaVA-NeXT presets (configuration/llava-v1.6-vicuna-7b-ivtp.json): the image's size, which decides its "
        "crops and visual tokens (default 672 672: the 2 x 2 grid, 2,928 tokens for LLaVA-1.6-7B)",
    )
    parser.add_argument("--format", choices=("md", "json"), default="md", help="markdown tables (default) or JSON")


def run(args) -> int:
    """Prints the report to stdout; writes no file. Every refusal is one line on stderr (`cli.report_error`)."""
    from llava_ivtp.cli import report_error

    try:
        path = resolve_preset(args.preset, args.model_size)
    except FileNotFoundError as error:
        return report_error("flops", error)
    if args.batch_size < 1 or min(args.text_tokens) < 2:
        return report_error("flops", "--batch-size must be >= 1 and every --text-tokens >= 2")
    if args.breakdown_at is None:
        args.breakdown_at = BREAKDOWN_TEXT_TOKENS if BREAKDOWN_TEXT_TOKENS in args.text_tokens else args.text_tokens[0]
    if args.breakdown_at not in args.text_tokens:
        return report_error(
            "flops", f"--breakdown-at {args.breakdown_at} is not one of --text-tokens {args.text_tokens}"
        )
    try:
        preset = read_preset(path)
    except ValueError as error:
        return report_error("flops", f"--preset {path}: {error}")
    preset._attn_implementation = "sdpa"
    methods = list(PRUNING_METHODS) if args.methods == ["all"] else args.methods
    unknown = [method for method in methods if method not in PRUNING_METHODS]
    if unknown:
        return report_error("flops", f"--methods {unknown} are not methods; allowed: {list(PRUNING_METHODS)} or all")
    try:
        report = flops_report(
            preset, args.text_tokens, args.topk_vision, args.topk_tokens, args.prefix_tokens, args.batch_size, args.clip_model,
            preset_name=str(path), methods=methods, visual_tokens=args.visual_tokens, image_size=tuple(args.image_size),
        )
    except ValueError as error:
        return report_error("flops", error)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(render_markdown(report, args.breakdown_at), end="")
    return 0


__all__ = [
    "Breakdown",
    "WeightFreeMode",
    "add_arguments",
    "build_weight_free",
    "count_forward",
    "example_inputs",
    "flops_report",
    "final_visual_tokens",
    "measure",
    "part_breakdown",
    "run",
    "visual_tokens_into_llm",
]
