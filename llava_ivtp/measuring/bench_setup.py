"""`llava-ivtp bench`, its setup: the named shapes and configs, the kept-token schedule, the models (stock and IVTP
on the same weights) and the prompts."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch


COMMAND = "bench"
# The keys of every report (`--json`); an existing report with them and no `"tool"` mark is one written before it.
REPORT_KEYS = ("meta", "flops", "results")
VARIANTS = ("stock_sdpa", "ivtp_sdpa", "ivtp_eager")
VARIANT_TITLES = {"stock_sdpa": "stock Llava (sdpa)", "ivtp_sdpa": "IVTP (sdpa)", "ivtp_eager": "IVTP (eager)"}
PLOT_KEPT_DEFAULT = (16, 32, 64, 128, 256, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt layout: LLaVA-1.5's system prompt and "USER:" before the image (about 35 tokens), "ASSISTANT:" at the end.
PREFIX_TOKENS = 35
ANSWER_PROMPT_TOKENS = 5
VISION_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TEXT_DIMS = VISION_DIMS + ("num_key_value_heads", "vocab_size")
# Width divisor of the reduced shape: 7B's depths, token geometry and schedule, every width / 8, head dims kept.
NARROW_DIVISOR = 8


class BenchError(ValueError):
    """A bad command line: the message names the flag."""


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _read_preset(size: str) -> dict:
    """The installed LLaVA-1.5 preset of `size` (the repository's configuration/, shipped as `llava_ivtp_presets`)."""
    from llava_ivtp_presets import preset_path

    return json.loads(preset_path(size).read_text())


NEXT_PRESET = "llava-v1.6-vicuna-7b-ivtp.json"


def _read_next_preset() -> dict:
    """The installed LLaVA-1.6-7B (LLaVA-NeXT) preset, its schedule derived from its budget (640 tokens)."""
    import llava_ivtp_presets

    from modeling_llava_ivtp import IvtpNextConfig

    config = json.loads((Path(llava_ivtp_presets.__file__).with_name(NEXT_PRESET)).read_text())
    return _with_schedule(config, IvtpNextConfig)


def _with_schedule(config_dict: dict, config_class) -> dict:
    """`config_dict` with the schedule its budget derives written out and the budget dropped (the bench reads the
    schedule)."""
    derived = config_class(**copy.deepcopy(config_dict)).schedule
    return dict(config_dict, schedule=derived, pruning_options=None)


def is_next(config_dict: dict) -> bool:
    """Whether a config dict is a LLaVA-NeXT one (`IvtpNextConfig`)."""
    return config_dict.get("model_type") == "llava_next_ivtp"


def host_classes(config_dict: dict):
    """`(IVTP config class, IVTP model class, stock config class, stock model class)` of the config's host."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    from modeling_llava_ivtp import (
        IvtpConfig,
        IvtpNextConfig,
        LlavaIvtpForConditionalGeneration,
        LlavaNextIvtpForConditionalGeneration,
    )

    if is_next(config_dict):
        return IvtpNextConfig, LlavaNextIvtpForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration
    return IvtpConfig, LlavaIvtpForConditionalGeneration, LlavaConfig, LlavaForConditionalGeneration


def config_of(config_dict: dict):
    """The IVTP config (`IvtpConfig` or `IvtpNextConfig`) of a config dict."""
    return host_classes(config_dict)[0](**copy.deepcopy(config_dict))


def bench_image_size(config) -> tuple[int, int] | None:
    """LLaVA-NeXT: the image the bench feeds, the largest grid of `image_grid_pinpoints` at full size (LLaVA-1.6-7B:
    672 x 672, 5 crops, 2,928 tokens); `None` for LLaVA-1.5."""
    if config.max_crops == 1:
        return None
    return tuple(max(config.image_grid_pinpoints, key=lambda size: (size[0] * size[1], size[0])))


def image_tokens(config) -> int:
    """Image placeholders of the bench's prompt: `num_patches`, or the packed length of `bench_image_size`."""
    size = bench_image_size(config)
    if size is None:
        return config.num_patches
    vision = config.vision_config
    from modeling_llava_ivtp.layout_next import next_layout

    return next_layout(size, config.image_grid_pinpoints, vision.image_size, vision.patch_size).length


def clip_spec_vit_l14_336() -> dict:
    from modeling_llava_ivtp.guidance_ivtp import clip_text_encoder_spec

    return clip_text_encoder_spec("ViT-L-14-336")


def _narrow_7b(config: dict | None = None) -> dict:
    """LLaVA-1.5-7B's depths (24 vision layers, 32 LLM layers), 576 patches of a 336 px image, the 7B preset's
    schedule (8 vision groups, 4 LLM groups of 3 layers, 64 tokens kept), every width divided by 8 with the head
    dimensions kept (vision 2 heads of 64, LLM 4 heads of 128), LLaMA's vocabulary; CLIP text tower (ViT-L-14-336's
    12 layers and 77 tokens) at width 96 and embedding 96. `config`: another 7B preset narrowed the same way."""
    config = _read_preset("7b") if config is None else config
    vision, text = config["vision_config"], config["text_config"]
    d = NARROW_DIVISOR
    vision.update(
        hidden_size=vision["hidden_size"] // d, intermediate_size=vision["intermediate_size"] // d,
        num_attention_heads=vision["num_attention_heads"] // d, projection_dim=vision["projection_dim"] // d,
    )
    text.update(
        hidden_size=text["hidden_size"] // d, intermediate_size=text["intermediate_size"] // d,
        num_attention_heads=text["num_attention_heads"] // d, num_key_value_heads=text["num_key_value_heads"] // d,
    )
    clip = clip_spec_vit_l14_336()
    clip["embed_dim"] //= d
    clip["text_cfg"].update(width=clip["text_cfg"]["width"] // d, heads=2)
    config["clip_text_encoder"] = clip
    return config


NAMED_CONFIGS = {
    "7b": (
        "configuration/llava-1.5-7b-ivtp.json: LLaVA-1.5-7B, the paper's schedule", lambda: _read_preset("7b")
    ),
    "13b": ("configuration/llava-1.5-13b-ivtp.json: LLaVA-1.5-13B", lambda: _read_preset("13b")),
    "7b-narrow": ("LLaVA-1.5-7B depths, 576 patches, the 7B schedule, widths / 8 (CPU)", _narrow_7b),
    "next-7b": (f"configuration/{NEXT_PRESET}: LLaVA-NeXT-7B, IVTP at 640 tokens", _read_next_preset),
    "next-7b-narrow": ("LLaVA-NeXT-7B depths and grid (a 672 x 672 image: 5 crops, 2,928 tokens), IVTP at 640, "
                       "widths / 8 (CPU)", lambda: _narrow_7b(_read_next_preset())),
}


def load_config_dict(spec: str) -> tuple[dict, str]:
    """`--config`: a named shape or the path of an IvtpConfig JSON. Returns the config dict and its description."""
    if spec in NAMED_CONFIGS:
        description, build = NAMED_CONFIGS[spec]
        return build(), description
    path = Path(spec)
    if path.is_file():
        try:
            config_dict = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BenchError(f"--config {spec}: not a JSON file ({error}).") from None
        except OSError as error:
            raise BenchError(f"--config {spec}: cannot be read ({error}).") from None
        if not isinstance(config_dict, dict):
            raise BenchError(
                f"--config {spec}: expected a JSON object of IvtpConfig fields, got a JSON {type(config_dict).__name__}."
            )
        return config_dict, str(path)
    raise BenchError(
        f"--config {spec!r} is neither a named shape ({', '.join(NAMED_CONFIGS)}) nor an existing IvtpConfig JSON file."
    )


def kept_schedule(config_dict: dict, kept: int) -> dict:
    """IVTP's schedule for `kept` visual tokens on the geometry of `config_dict`: the project's one budget rule
    (`modeling_llava_ivtp.pruner_base.budget_schedule`), so `--kept K` runs what `pruning_options={"visual_tokens":
    K}` runs. For the 7B preset's geometry, e.g., 16 -> vision [416, 304, 224, 160, 120, 88, 64, 48], LLM
    [32, 24, 16, 16]."""
    from modeling_llava_ivtp.pruner_base import budget_schedule

    return budget_schedule(config_of(dict(config_dict, schedule=None)), kept)


def stock_config_dict(config_dict: dict) -> dict:
    """The `LlavaConfig` fields of an IVTP config dict (IVTP's own fields and identity removed)."""
    from modeling_llava_ivtp.configuration_llava_ivtp import stock_llava_fields

    return stock_llava_fields(copy.deepcopy(config_dict))


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------
def build_models(config_dict: dict, device: torch.device, dtype: torch.dtype, seed: int, methods=()) -> dict:
    """IVTP (sdpa), stock Llava (sdpa) and IVTP (eager) holding the same weights, in eval mode on `device`; and one
    model per pruning method of `methods` (sdpa, the same weights), at the config's final visual tokens. The weights
    are held once: every other model's parameters are IVTP's own tensors (`load_state_dict(assign=True)`), so the
    variants fit where one model does (each is built with weights of its own first, which the shared ones
    replace)."""
    config_class, model_class, stock_config_class, stock_class = host_classes(config_dict)
    torch.manual_seed(seed)
    with torch.device(device):
        ivtp = model_class._from_config(
            config_class(**copy.deepcopy(config_dict)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
        stock = stock_class._from_config(
            stock_config_class(**stock_config_dict(config_dict)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    weights = ivtp.state_dict()
    shared = {key: value for key, value in weights.items() if not key.startswith("clip_")}
    result = stock.load_state_dict(shared, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"stock Llava and IVTP do not share their LLaVA weights: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    eager = build_ivtp_model(config_dict, weights, device, dtype, attn_implementation="eager")
    models = {"stock_sdpa": stock, "ivtp_sdpa": ivtp, "ivtp_eager": eager}
    for method in methods:
        models[f"method:{method}"] = build_ivtp_model(method_config_dict(config_dict, method), weights, device, dtype)
    return models


def method_config_dict(config_dict: dict, method: str) -> dict:
    """`config_dict` pruned by `method` at the budget its schedule ends with (the `--kept` count)."""
    schedule = config_dict["schedule"]
    kept = (schedule["llm"] or schedule["vision"])[-1]
    return dict(copy.deepcopy(config_dict), schedule=None, pruning_method=method,
                pruning_options={"visual_tokens": kept})


def variant_title(name: str) -> str:
    return VARIANT_TITLES.get(name, f"{name.removeprefix('method:')} (sdpa)")


def build_ivtp_model(config_dict: dict, weights: dict, device, dtype, attn_implementation: str = "sdpa"):
    config_class, model_class, _, _ = host_classes(config_dict)
    with torch.device(device):
        model = model_class._from_config(
            config_class(**copy.deepcopy(config_dict)), dtype=dtype, attn_implementation=attn_implementation
        ).eval()
    model.load_state_dict(weights, strict=True, assign=True)  # the given tensors themselves: no copy of the weights
    return model


@dataclass
class PromptLayout:
    prefix: int  # text tokens between BOS and the image
    suffix: int  # text tokens after the image
    instruction: int  # of the suffix, the instruction (the rest is "ASSISTANT:")
    clip_tokens: int  # instruction tokens that get a CLIP token (CLIP reads context - 2 content tokens)


def prompt_layout(text_tokens: int, clip_context: int = 77) -> PromptLayout:
    prefix = min(PREFIX_TOKENS, (text_tokens - 1) // 4)
    suffix = text_tokens - 1 - prefix
    instruction = suffix - min(ANSWER_PROMPT_TOKENS, suffix - 1)
    return PromptLayout(prefix, suffix, instruction, min(instruction, clip_context - 2))


def build_inputs(config, batch_size: int, text_tokens: int, device, dtype, seed: int) -> tuple[dict, dict]:
    """Prompts of `text_tokens` text tokens (BOS included) around one image's placeholders, one image per sample, all
    of one length (no padding), random ids and pixels; and IVTP's guidance inputs as `LlavaIvtpProcessor` makes them:
    the instruction (the text after the image, "ASSISTANT:" excluded), its CLIP ids (start, content, end, padding)
    and each LLM token's CLIP span (one CLIP token per LLM token, none past CLIP's context, like long text).

    Returns `(common, guidance)`: `common` for both models, `guidance` for IVTP only.
    """
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    clip = config.clip_text_encoder
    layout = prompt_layout(text_tokens, clip["text_cfg"]["context_length"] if clip else 77)
    image_token = config.image_token_index
    high = min(text.vocab_size, image_token) if image_token >= 4 else text.vocab_size
    bos = text.bos_token_id if text.bos_token_id is not None else 1
    prefix = torch.randint(3, high, (batch_size, layout.prefix), generator=generator)
    suffix = torch.randint(3, high, (batch_size, layout.suffix), generator=generator)
    placeholders = image_tokens(config)
    image = torch.full((batch_size, placeholders), image_token)
    input_ids = torch.cat([torch.full((batch_size, 1), bos), prefix, image, suffix], dim=1)
    image_size = config.vision_config.image_size
    channels = config.vision_config.num_channels
    shape = (batch_size, channels, image_size, image_size)
    size = bench_image_size(config)  # LLaVA-NeXT: the image's crops, and its size
    if size is not None:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        shape = (batch_size, image_size_to_num_patches(list(size), config.image_grid_pinpoints, image_size), *shape[1:])
    pixel_values = torch.randn(*shape, generator=generator)
    common = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }
    if size is not None:
        common["image_sizes"] = torch.tensor([list(size)] * batch_size, device=device)
    guidance = {}
    if clip is not None:
        sequence = input_ids.shape[1]
        start = 1 + layout.prefix + placeholders
        instruction_mask = torch.zeros(batch_size, sequence, dtype=torch.bool)
        instruction_mask[:, start : start + layout.instruction] = True
        context, vocab = clip["text_cfg"]["context_length"], clip["text_cfg"]["vocab_size"]
        clip_ids = torch.zeros(batch_size, context, dtype=torch.long)
        clip_ids[:, 0] = vocab - 2  # start of text
        content = torch.randint(1, vocab - 2, (batch_size, layout.clip_tokens), generator=generator)
        clip_ids[:, 1 : 1 + layout.clip_tokens] = content
        clip_ids[:, 1 + layout.clip_tokens] = vocab - 1  # end of text (the largest id)
        spans = torch.zeros(batch_size, sequence, 2, dtype=torch.long)
        offsets = torch.arange(layout.clip_tokens)
        spans[:, start : start + layout.clip_tokens, 0] = 1 + offsets
        spans[:, start : start + layout.clip_tokens, 1] = 2 + offsets
        guidance = {
            "instruction_mask": instruction_mask.to(device),
            "clip_input_ids": clip_ids.to(device),
            "clip_token_spans": spans.to(device),
        }
    return common, guidance


__all__ = [
    "BenchError", "NAMED_CONFIGS", "bench_image_size", "config_of", "host_classes", "image_tokens", "is_next", "VARIANTS", "VARIANT_TITLES", "build_inputs", "build_ivtp_model", "build_models",
    "kept_schedule", "load_config_dict",
]
