"""Configuration of LLaVA-IVTP: `LlavaConfig` (LLaVA-1.5) or `LlavaNextConfig` (LLaVA-NeXT) plus the pruning method
(IVTP's two-stage schedule, or another method of the registry, `pruner_base.PRUNERS`) and its options. The fields
and their checks are one mixin, `IvtpFields`, shared by both hosts' configs."""

from __future__ import annotations

import math
import numbers

# First: the check of the installed transformers (remote code runs it on whatever release the user has), before
# anything that an unsupported release might fail to import.
from .transformers_compat import SUPPORTED_TRANSFORMERS  # noqa: F401, I001  (re-exported)

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaNextConfig

from .guidance_ivtp import validate_clip_text_encoder


SCHEDULE_STAGES = ("vision", "llm")
# How the stage-2 pseudo-CLS is formed (paper Table 6, last row first: the paper's method is the default).
# IvtpConfig's own fields on top of LlavaConfig's.
IVTP_FIELDS = ("schedule", "group_size", "tau", "clip_text_encoder", "guidance", "pruning_method", "pruning_options")

# The methods `pruning_method` takes (each a `Pruner` registered under its name; `None`: no pruning, stock Llava).
PRUNING_METHODS = (
    "ivtp", "random", "topk", "pooling", "evit", "tome", "topk_plus", "tome_plus", "fastv", "pdrop", "visionzip",
    "vispruner", "divprune", "cdpruner",
)


def stock_llava_fields(config_dict: dict) -> dict:
    """The stock host's fields (`LlavaConfig`'s, `LlavaNextConfig`'s) of an `IvtpConfig` / `IvtpNextConfig` dict:
    IVTP's own fields and the class identity removed."""
    drop = set(IVTP_FIELDS) | {"model_type", "architectures", "auto_map"}
    return {key: value for key, value in config_dict.items() if key not in drop}


GUIDANCE_MODES = ("clip_relevance", "embedding_relevance", "instruction_mean", "visual_cls")


def resolve_feature_layer_count(vision_feature_layer: int, num_vision_layers: int) -> int:
    """Number of vision encoder layers that run to produce the patch features LLaVA reads.

    `hidden_states[i]` of a CLIP encoder is the output of its first `i` layers (index 0 is the embeddings), so
    `vision_feature_layer=-2` on a 24-layer tower means 23 layers run.
    """
    count = vision_feature_layer if vision_feature_layer >= 0 else num_vision_layers + 1 + vision_feature_layer
    if not 1 <= count <= num_vision_layers:
        raise ValueError(
            f"`vision_feature_layer`={vision_feature_layer} selects no encoder layer of a {num_vision_layers}-layer "
            f"vision tower; allowed: 1..{num_vision_layers} or -{num_vision_layers}..-1."
        )
    return count


def _check_group_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`group_size` must be an integer >= 1 (layers per pruning group), got {value!r}.")
    return int(value)


def _check_tau(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`tau` must be a number in [-1, 1] (a cosine similarity threshold), got {value!r}.")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"`tau` must be in [-1, 1] (a cosine similarity threshold), got {value}.")
    return float(value)


def _check_guidance(value) -> str:
    if not isinstance(value, str) or value not in GUIDANCE_MODES:
        raise ValueError(f"`guidance` must be one of {list(GUIDANCE_MODES)}, got {value!r}.")
    return value


def _check_pruning_method(value) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in PRUNING_METHODS):
        raise ValueError(f"`pruning_method` must be one of {list(PRUNING_METHODS)} or None (no pruning), got {value!r}.")
    return value


def _check_clip_text_encoder(value) -> dict | None:
    if value is not None:
        validate_clip_text_encoder(value)
    return value


# IVTP fields whose rules need no other field: checked (and integral / real numbers stored as int / float) on
# assignment (`IvtpConfig.__setattr__`).
_FIELD_CHECKS = {
    "group_size": _check_group_size,
    "tau": _check_tau,
    "clip_text_encoder": _check_clip_text_encoder,
    "guidance": _check_guidance,
    "pruning_method": _check_pruning_method,
}


def layer_groups(num_layers: int, group_size: int) -> list[tuple[int, int]]:
    """Cut layers `0..num_layers-1` into `(first, last)` groups of `group_size`; the last group may be shorter."""
    return [(start, min(start + group_size, num_layers) - 1) for start in range(0, num_layers, group_size)]


class IvtpFields:
    """The pruning fields' rules and the geometry they are checked against, for any LLaVA host config whose vision
    tower is a CLIP run per image (LLaVA-1.5) or per crop (LLaVA-NeXT): `IvtpConfig`, `IvtpNextConfig`. The fields
    themselves are declared in each config (`IVTP_FIELDS`)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_seq_length is None:
            vision = self.vision_config
            if getattr(vision, "image_size", None) is None or getattr(vision, "patch_size", None) is None:
                raise ValueError(
                    "`image_seq_length` is not given and cannot be derived: `vision_config` has no `image_size` and "
                    "`patch_size`. Pass `image_seq_length` (image placeholder tokens per image)."
                )
            self.image_seq_length = self.num_patches
        self.check_ivtp()

    # --- derived geometry -------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Patch tokens per image (576 for LLaVA-1.5: (336 / 14) ** 2)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def max_visual_tokens(self) -> int:
        """The most visual tokens one image can bring (the bound of a budget): `num_patches` here; LLaVA-NeXT's
        longest packed sequence in `IvtpNextConfig`."""
        return self.num_patches

    @property
    def max_crops(self) -> int:
        """The most crops one image goes through the vision tower as: 1 here; LLaVA-NeXT's base crop and largest tile
        grid in `IvtpNextConfig`."""
        return 1

    def stage_two_bound(self, per_crop: int) -> int:
        """The most visual tokens one image brings to the LLM when every crop keeps `per_crop` patches: `per_crop`
        here (LLaVA-NeXT adds its crops and newline tokens)."""
        return per_crop

    @property
    def vision_layer_groups(self) -> list[tuple[int, int]]:
        """`(first, last)` vision layer of each stage-1 group, over the layers that run for patch features."""
        feature_layers = resolve_feature_layer_count(self.vision_feature_layer, self.vision_config.num_hidden_layers)
        return layer_groups(feature_layers, self.group_size)

    @property
    def llm_layer_groups(self) -> list[tuple[int, int]]:
        """`(first, last)` LLM layer of each stage-2 group."""
        return self.llm_groups(len(self.schedule["llm"]) if self.schedule else 0)

    def llm_groups(self, count: int) -> list[tuple[int, int]]:
        """`(first, last)` of the first `count` groups of `group_size` LLM layers (a method's LLM schedule)."""
        return layer_groups(self.group_size * count, self.group_size)

    @property
    def pruning_enabled(self) -> bool:
        """Whether the model prunes: a method is set (IVTP: with a schedule)."""
        if self.pruning_method is None:
            return False
        return self.pruning_method != "ivtp" or self.schedule is not None

    # --- validation -------------------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        # IVTP's single-field rules hold on assignment too (`config.tau = nan`, `from_pretrained(path, tau=nan)`),
        # checked before the value is stored. The schedule depends on other fields (geometry, group size): it is
        # checked whole by `check_ivtp`, which the model runs whenever it uses the config and before saving.
        check = _FIELD_CHECKS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def check_ivtp(self) -> None:
        """Check every IVTP field and the schedule against the geometry; the same errors as at construction.

        The model calls this on every forward, in `generate` and before saving, so a field edited after
        construction is never used, nor saved, unchecked."""
        for name, check in _FIELD_CHECKS.items():
            check(getattr(self, name))
        self._check_method()
        if self.schedule is not None:
            self._validate_schedule()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As [`PretrainedConfig.save_pretrained`], after `check_ivtp`: never writes a config that loading refuses."""
        self.check_ivtp()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _check_method(self) -> None:
        """The method's options, checked by its pruner; IVTP's budget derives its schedule; other methods take no
        `schedule` (IVTP's field: silently unused, it would look like it applied)."""
        from .pruners import PRUNERS, budget_schedule  # the registry imports the pruners (torch and transformers)

        method = self.pruning_method
        if method is None:
            return
        if method != "ivtp" and self.schedule is not None:
            raise ValueError(
                f"`schedule` is IVTP's pruning schedule; with pruning_method={method!r} it must be None (the budget is "
                "`pruning_options['visual_tokens']`)."
            )
        if method == "ivtp" and self.pruning_options is None:
            return
        values = PRUNERS[method].resolve_options(self)
        budget = values.get("visual_tokens")
        if method != "ivtp" or budget is None:
            return
        derived = budget_schedule(self, budget)
        if self.schedule is None:
            self.schedule = derived
        elif self.schedule != derived:
            raise ValueError(
                f"`schedule` {self.schedule} and `pruning_options['visual_tokens']`={budget} disagree: the budget "
                f"derives {derived} (the 7B preset's shape). Give one of them (pass schedule=None to derive it)."
            )

    def _validate_schedule(self) -> None:
        schedule = self.schedule
        if not isinstance(schedule, dict):
            raise ValueError(
                f'`schedule` must be None or a dict {{"vision": [...], "llm": [...]}}, got {type(schedule).__name__}.'
            )
        unknown = sorted(set(schedule) - set(SCHEDULE_STAGES))
        missing = [stage for stage in SCHEDULE_STAGES if stage not in schedule]
        if unknown or missing:
            raise ValueError(
                f"`schedule` must have exactly the keys {list(SCHEDULE_STAGES)}; unknown: {unknown}, missing: {missing}."
            )
        if self.vision_config.model_type != "clip_vision_model":
            raise ValueError(
                "IVTP prunes inside a CLIP vision tower: `vision_config.model_type` must be 'clip_vision_model', "
                f"got {self.vision_config.model_type!r}."
            )
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                "IVTP needs one vision feature layer: `vision_feature_layer` must be an int, got "
                f"{self.vision_feature_layer!r}."
            )
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "IVTP prunes patch tokens and keeps CLS out of the LLM: `vision_feature_select_strategy` must be "
                f"'default', got {self.vision_feature_select_strategy!r}."
            )
        if self.image_seq_length != self.num_patches:
            raise ValueError(
                f"`image_seq_length` ({self.image_seq_length}) must equal the patches per image "
                f"({self.num_patches} = ({self.vision_config.image_size} // {self.vision_config.patch_size}) ** 2)."
            )

        available = self.num_patches
        normalized = {}
        for stage in SCHEDULE_STAGES:
            if stage == "llm":  # per crop in the tower, per image in the LLM
                available = self.stage_two_bound(available)
            counts = schedule[stage]
            if not isinstance(counts, (list, tuple)):
                raise ValueError(f'`schedule["{stage}"]` must be a list of token counts, got {type(counts).__name__}.')
            normalized[stage] = []
            for index, count in enumerate(counts):
                if isinstance(count, bool) or not isinstance(count, numbers.Integral):
                    raise ValueError(f'`schedule["{stage}"][{index}]` must be an int, got {count!r}.')
                count = int(count)  # numpy and other integral numbers are stored as plain ints (JSON)
                normalized[stage].append(count)
                if count < 1:
                    raise ValueError(
                        f'`schedule["{stage}"][{index}]` = {count}: every group must keep at least 1 token.'
                    )
                if count > available:
                    if index:
                        what = "the previous group's count"
                    elif stage == "vision":
                        what = "the patches per crop" if self.max_crops > 1 else "the patches per image"
                    else:
                        what = "the visual tokens that enter the LLM (the last vision count, or every patch)"
                        if self.max_crops > 1:
                            what = "the most visual tokens an image brings to the LLM (`stage_two_bound`)"
                    raise ValueError(
                        f'`schedule["{stage}"][{index}]` = {count} is larger than {what} ({available}); counts '
                        "must not increase."
                    )
                available = count

        vision_groups = len(self.vision_layer_groups)
        if schedule["vision"] and len(schedule["vision"]) != vision_groups:
            feature_layers = resolve_feature_layer_count(self.vision_feature_layer, self.vision_config.num_hidden_layers)
            raise ValueError(
                f'`schedule["vision"]` must have one entry per vision group: {feature_layers} layers run for patch '
                f"features, in groups of {self.group_size} that is {vision_groups} entries, got "
                f"{len(schedule['vision'])} (or [] to turn stage 1 off)."
            )
        num_llm_layers = self.text_config.num_hidden_layers
        if self.group_size * len(schedule["llm"]) > num_llm_layers:
            raise ValueError(
                f'`schedule["llm"]` has {len(schedule["llm"])} groups of {self.group_size} layers = '
                f"{self.group_size * len(schedule['llm'])} layers, more than the LLM's {num_llm_layers}; at most "
                f"{num_llm_layers // self.group_size} entries are allowed."
            )
        plain = all(type(schedule[stage]) is list and all(type(c) is int for c in schedule[stage]) for stage in SCHEDULE_STAGES)
        if not plain or list(schedule) != list(SCHEDULE_STAGES):
            self.schedule = normalized


@strict
class IvtpConfig(IvtpFields, LlavaConfig):
    r"""
    Configuration of [`LlavaIvtpForConditionalGeneration`]: a [`LlavaConfig`] plus the pruning method and its fields.

    Args:
        pruning_method (`str`, *optional*, defaults to `"ivtp"`):
            The visual-token pruning method, one of `PRUNING_METHODS` (`"ivtp"`, `"random"`, `"topk"`, `"pooling"`,
            `"evit"`, `"tome"`, `"topk_plus"`, `"tome_plus"`, `"fastv"`, `"pdrop"`, `"visionzip"`, `"vispruner"`,
            `"divprune"`, `"cdpruner"`; each a file `pruner_<name>.py` citing its paper), or `None`: no pruning, the
            model is stock Llava. `"ivtp"` prunes when `schedule` is set (or derived from a budget).
        pruning_options (`dict`, *optional*):
            The method's options, checked by the method. Every method takes `visual_tokens`, the budget: visual tokens
            per image that reach the LLM's last layers, mapped to the method's own schedule by its paper's rule
            (default 64; for `"ivtp"` no default: `schedule` says it, or `visual_tokens` derives `schedule` with the
            7B preset's shape). Others: `fastv` `layer` (K, 2), `pdrop` `stages` (4), `visionzip` `dominant`
            (54 of 64), `vispruner` `important` (48 of 64), `random` `seed` (0).
        image_seq_length (`int`, *optional*):
            Image placeholder tokens per image. Defaults to the patches per image of the vision tower,
            `(image_size // patch_size) ** 2` (576 for LLaVA-1.5's 336 px CLIP with patch 14); a given value that
            differs from it is refused when pruning is on.
        group_size (`int`, *optional*, defaults to 3):
            Layers per pruning group, in the vision tower and in the LLM (paper sec. 4.1: 3). Attention rollout
            (eq. 3) aggregates the attention of a group's layers; tokens are pruned at the group's top layer.
        schedule (`dict`, *optional*):
            `{"vision": [k1, ..., kG], "llm": [m1, ..., mH]}`: patches (vision, CLS not counted) and visual tokens
            (LLM) kept after each group. One vision entry per group over the vision layers that run for patch
            features (23 for LLaVA-1.5 with `group_size=3`: 8 groups, the last of 2 layers); the LLM prunes in its
            first `group_size * H` layers. An empty list turns a stage off. `None` turns pruning off and the
            model equals stock Llava.
        tau (`float`, *optional*, defaults to 0.2):
            Relevance threshold of eq. 8: instruction tokens whose CLIP relevance is `>= tau` form the pseudo-CLS.
        clip_text_encoder (`dict`, *optional*):
            Architecture of the frozen open_clip text tower that scores the instruction (eq. 5-7):
            `{"model_name", "embed_dim", "quick_gelu", "text_cfg": {context_length, vocab_size, width, heads, layers}}`,
            e.g. `clip_text_encoder_spec("ViT-L-14-336")`. The model then holds the tower and CLIP's visual projection
            (`clip_text_model`, `clip_visual_projection`), frozen. `None`: no CLIP tower.
        guidance (`str`, *optional*, defaults to `"clip_relevance"`):
            How the stage-2 pseudo-CLS is formed (paper Table 6): `"clip_relevance"` (the paper: instruction tokens
            whose CLIP relevance to the image is `>= tau`), `"embedding_relevance"` (threshold on the cosine of the
            LLM's own token embeddings with the projected visual CLS), `"instruction_mean"` (every instruction token,
            no threshold), `"visual_cls"` (the visual CLS through the projector). Where a mode's inputs are missing
            the visual CLS is used, with a one-time warning naming what is missing.
    """

    model_type = "llava_ivtp"

    # `None`: derived from the vision geometry, `(image_size // patch_size) ** 2` (LlavaConfig's 576 holds for 336 px
    # with patch 14 only).
    image_seq_length: int | None = None
    group_size: int = 3
    schedule: dict | None = None
    tau: float = 0.2
    clip_text_encoder: dict | None = None
    guidance: str = "clip_relevance"
    pruning_method: str | None = "ivtp"
    pruning_options: dict | None = None


@strict
class IvtpNextConfig(IvtpFields, LlavaNextConfig):
    r"""
    Configuration of [`LlavaNextIvtpForConditionalGeneration`]: a [`LlavaNextConfig`] (LLaVA-NeXT, AnyRes: a base
    image and high-resolution tiles, each a crop through the same CLIP) plus the pruning fields of [`IvtpConfig`],
    with the same names, defaults and checks. `image_seq_length` is the patches of one crop (576 for a 336 px CLIP
    with patch 14). The budget `visual_tokens` counts the visual tokens of one image, all its crops; it is bounded by
    the longest packed sequence the grid allows (`max_visual_tokens`: 2,928 for LLaVA-1.6-7B's 2x2 grid); an image
    with fewer tokens than the budget keeps them all (`docs/llava-next.md`).
    """

    model_type = "llava_next_ivtp"

    @property
    def max_visual_tokens(self) -> int:
        """The longest packed sequence of one image: the base crop, then a grid of tiles at full size (no unpadding
        removes a row or column) with a newline after each row, over `image_grid_pinpoints`."""
        return self.stage_two_bound(self.num_patches)

    @property
    def max_crops(self) -> int:
        """The base crop and the largest grid of tiles `image_grid_pinpoints` allows (5 for LLaVA-1.6-7B)."""
        crop = self.vision_config.image_size
        return 1 + max((height // crop) * (width // crop) for height, width in self.image_grid_pinpoints)

    def stage_two_bound(self, per_crop: int) -> int:
        """The most visual tokens one image brings to the LLM when each crop keeps `per_crop` patches: every crop of
        a grid at full size (no unpadding), and a newline after each of the grid's rows."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        crop = self.vision_config.image_size
        return max((1 + (height // crop) * (width // crop)) * per_crop + (height // crop) * side
                   for height, width in self.image_grid_pinpoints)

    # `None`: derived from the vision geometry, `(image_size // patch_size) ** 2`: the patches of one crop.
    image_seq_length: int | None = None
    group_size: int = 3
    schedule: dict | None = None
    tau: float = 0.2
    clip_text_encoder: dict | None = None
    guidance: str = "clip_relevance"
    pruning_method: str | None = "ivtp"
    pruning_options: dict | None = None


# Remote code: `save_pretrained` copies this file (and what it imports) and writes `auto_map["AutoConfig"]`.
IvtpConfig.register_for_auto_class()
IvtpNextConfig.register_for_auto_class()

__all__ = ["IvtpConfig", "IvtpNextConfig"]
