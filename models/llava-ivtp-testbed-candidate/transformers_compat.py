"""The one place that knows which transformers release is installed and what differs between the supported ones.

The rest of the package is written against the newest supported release's names and calls what this module gives
it; no other module compares versions. Remote code imports this file first (the configuration does), so a
checkpoint's code checks the transformers the user already has, where no pip pin applies.

What changed from 5.23 to 5.24 that this package depends on:

- The KV cache is called `cache` instead of `past_key_values`: in model, decoder-layer and
  `prepare_inputs_for_generation` signatures, in `create_causal_mask`, in output classes and in `generate`'s
  `model_kwargs`. 5.24 still takes the old name with a `FutureWarning` (removed in 5.40): `CACHE_ARG`,
  `cache_kwargs`, `takes_cache_kwarg` and `output_cache` give the installed release's name.
- Llava's outputs derive from `MultimodalCausalLMOutputWithPast`: the projected image features moved from
  `image_hidden_states` (a tensor) to `image_outputs.pooler_output` (a list, one tensor per image), and
  `image_hidden_states` became a deprecated property: `image_output_fields` and `output_image_features`.

From 5.24 to 5.25: `gradient_checkpointing` became a deprecated alias of `activation_checkpointing` (in
`TrainingArguments`, and `is_gradient_checkpointing` of `is_activation_checkpointing`), with a `FutureWarning`. The new
names exist in 5.23 already, so the package and its examples use them on every release; PEFT still reads the model's
`is_gradient_checkpointing`, which the model class answers without the warning (`ActivationCheckpointingNames`).
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from packaging import version
from transformers.utils import logging


# One name for the package and every remote-code copy of this file, so `warning_once` says it once per process.
logger = logging.get_logger("llava_ivtp")

# The supported range: from the oldest release CI tests (pyproject's lower bound) up to, not including, the next
# major. CI runs the whole suite on that oldest release and on the newest one pip resolves, so a release that breaks
# the package fails CI the day it appears. `NEWEST_TESTED` is the newest release CI has passed on: raise it when CI
# passes on a newer one. pyproject.toml states exactly `SUPPORTED_TRANSFORMERS` (tests/test_transformers_compat.py).
OLDEST_SUPPORTED = (5, 23)
NEWEST_TESTED = (5, 25)
SUPPORTED_TRANSFORMERS = (f">={OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]}.0", f"<{NEWEST_TESTED[0] + 1}")


def check_transformers_version(installed: str) -> str | None:
    """Check an installed transformers version against the supported range and the newest tested release.

    Raises `ImportError` (naming both) for a release older than the oldest supported minor; returns the warning to
    give once for a release newer than the newest tested minor, a next major included (a checkpoint's remote code
    runs where no pip pin applies: it runs, and may work); `None` for a tested release. Pre-releases and dev builds
    count as their minor (5.26.0.dev0 is 5.26).
    """
    minor = version.parse(installed).release[:2]
    supported = ",".join(SUPPORTED_TRANSFORMERS)
    oldest = f"{OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]}"
    newest = f"{NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}"
    if minor < OLDEST_SUPPORTED:
        raise ImportError(
            f"llava-ivtp supports transformers {supported} (tested: {oldest} to {newest}), but transformers "
            f"{installed} is installed. Install a supported release: pip install 'transformers{supported}'"
        )
    if minor > NEWEST_TESTED:
        return (
            f"transformers {installed} is newer than the newest release llava-ivtp was tested with ({newest}; "
            f"supported: {supported}, tested: {oldest} to {newest}). It runs and may work; if it fails, install the "
            f"newest tested release: pip install 'transformers~={newest}.0'"
        )
    return None


def warn_if_untested(installed: str) -> None:
    """What importing the package does with the installed version: `check_transformers_version`, and its warning
    given once per process (also when the package and a checkpoint's remote-code copy are both imported)."""
    message = check_transformers_version(installed)
    if message is not None:
        logger.warning_once(message)


_INSTALLED = transformers.__version__
warn_if_untested(_INSTALLED)

_NEW_NAMES = version.parse(_INSTALLED).release[:2] >= (5, 24)

# --- the KV cache's name ------------------------------------------------------------------------------------------
# What transformers calls the KV cache in signatures, outputs and `generate`'s model kwargs.
CACHE_ARG = "cache" if _NEW_NAMES else "past_key_values"
_OLD_CACHE_ARG = "past_key_values"


def cache_kwargs(cache) -> dict:
    """The keyword argument that passes `cache` to a transformers function or output class of this release."""
    return {CACHE_ARG: cache}


def output_cache(outputs):
    """The cache a model output or `generate`'s output holds (`outputs.cache`; `past_key_values` before 5.24)."""
    return getattr(outputs, CACHE_ARG)


def takes_cache_kwarg(function):
    """Decorate a method written with a `cache` parameter so that it is called as transformers of this release calls
    it: on 5.24 and later, as the stock methods are (`past_key_values` still accepted, with their `FutureWarning`);
    before, under the name `past_key_values`, which is what that release's `generate` passes and inspects."""
    if _NEW_NAMES:
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg(_OLD_CACHE_ARG, "5.40.0", new_name="cache")(function)

    signature = inspect.signature(function)
    if "cache" not in signature.parameters:
        raise TypeError(f"{function.__qualname__} has no `cache` parameter to expose as `past_key_values`.")

    @functools.wraps(function)
    def renamed(*args, **kwargs):
        if _OLD_CACHE_ARG in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the cache once, as `past_key_values` (transformers < 5.24), not also as `cache`.")
            kwargs["cache"] = kwargs.pop(_OLD_CACHE_ARG)
        return function(*args, **kwargs)

    renamed.__signature__ = signature.replace(
        parameters=[
            parameter.replace(name=_OLD_CACHE_ARG) if name == "cache" else parameter
            for name, parameter in signature.parameters.items()
        ]
    )
    return renamed


# --- activation checkpointing -------------------------------------------------------------------------------------
class ActivationCheckpointingNames:
    """Mixed into the model class: `is_gradient_checkpointing` answers as `is_activation_checkpointing` on every
    release, without the `FutureWarning` 5.25 gives for the old name (removed in v6). PEFT (0.21) still reads the old
    name when it wraps a model (`get_peft_model`, `PeftModel`), so every LoRA user would see the warning; the answer is
    the one transformers gives."""

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing


def checkpointing_drops_cache(model) -> bool:
    """Whether the decoder layers of `model` run without their cache in this call: training with activation
    checkpointing; on 5.24 and later only when gradients are on (without them nothing is checkpointed, e.g. when
    generating from a model left in training mode)."""
    drops = model.training and model.is_activation_checkpointing
    return drops and torch.is_grad_enabled() if _NEW_NAMES else drops


# --- the image features in outputs --------------------------------------------------------------------------------
def image_output_fields(image_features) -> dict:
    """The output fields that carry the projected image features `(num_images, tokens, hidden)`: `image_outputs`
    (its `pooler_output` a list with one tensor per image, as stock Llava gives) on 5.24 and later,
    `image_hidden_states` before."""
    if _NEW_NAMES:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image_outputs": BaseModelOutputWithPooling(pooler_output=list(image_features))}
    return {"image_hidden_states": image_features}


def output_image_features(outputs):
    """The projected image features of a Llava output as one `(num_images, tokens, hidden)` tensor, or `None`."""
    if _NEW_NAMES:
        image_outputs = outputs.image_outputs
        if image_outputs is None or image_outputs.pooler_output is None:
            return None
        return torch.stack(list(image_outputs.pooler_output))
    return outputs.image_hidden_states


__all__ = [
    "ActivationCheckpointingNames",
    "CACHE_ARG",
    "NEWEST_TESTED",
    "OLDEST_SUPPORTED",
    "SUPPORTED_TRANSFORMERS",
    "cache_kwargs",
    "check_transformers_version",
    "checkpointing_drops_cache",
    "image_output_fields",
    "output_cache",
    "output_image_features",
    "takes_cache_kwarg",
    "warn_if_untested",
]
