"""The supported transformers range and the one module that owns the differences between releases.

CI runs the whole suite on the oldest and the newest supported release (`.ci/run`); these tests check the range
itself, the names each release gets, and that nothing this package does raises a deprecation warning on the
installed release (warnings count only where this package's code is on the stack: third-party deprecations are not
ours to fix).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import modeling_llava_ivtp
from modeling_llava_ivtp import transformers_compat
from modeling_llava_ivtp.transformers_compat import (
    CACHE_ARG,
    SUPPORTED_TRANSFORMERS,
    TESTED_MINORS,
    cache_kwargs,
    check_transformers_version,
    output_cache,
    output_image_features,
    warn_if_untested,
)
from tiny_models import (
    IMAGE_TOKEN_ID,
    TINY_CLIP_TEXT,
    make_batch,
    make_images,
    tiny_config_dict,
    tiny_model,
    tiny_processor,
)


ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(modeling_llava_ivtp.__file__).resolve().parent
OUR_FILES = {path.name for path in PACKAGE_DIR.glob("*.py")}
NEW_NAMES = Version(transformers.__version__).release[:2] >= (5, 24)


# ------------------------------------------------------------------------------------------------------------------
# The range
# ------------------------------------------------------------------------------------------------------------------
def test_pyproject_allows_exactly_the_tested_minors():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [dependency for dependency in dependencies if dependency.startswith("transformers")]
    assert SpecifierSet(requirement.removeprefix("transformers")) == SpecifierSet(",".join(SUPPORTED_TRANSFORMERS))
    specifier = SpecifierSet(",".join(SUPPORTED_TRANSFORMERS))
    first, last = TESTED_MINORS[0], TESTED_MINORS[-1]
    assert f"{first[0]}.{first[1]}.0" in specifier and f"{last[0]}.{last[1]}.9" in specifier
    assert f"{first[0]}.{first[1] - 1}.9" not in specifier  # older: refused by pip
    assert f"{last[0]}.{last[1] + 1}.0" not in specifier  # the next minor is untested: pip never resolves it
    assert Version(transformers.__version__).release[:2] in TESTED_MINORS, "the suite runs on a tested release"


@pytest.mark.parametrize("installed", ["5.22.2", "5.0.0", "4.57.6", "5.23.0.dev0"])
def test_older_release_is_an_import_error_naming_both_versions(installed):
    if installed == "5.23.0.dev0":  # a dev build counts as its minor: 5.23 is supported
        assert check_transformers_version(installed) is None
        return
    with pytest.raises(ImportError) as error:
        check_transformers_version(installed)
    assert installed in str(error.value) and ",".join(SUPPORTED_TRANSFORMERS) in str(error.value)


@pytest.mark.parametrize("installed", ["5.23.0", "5.23.4", "5.24.0", "5.24.3", "5.24.0rc1"])
def test_tested_release_is_silent(installed):
    assert check_transformers_version(installed) is None


@contextlib.contextmanager
def log_records(name: str):
    """Every record logger `name` (and its children) emits inside the block, `warning_once`'s memory cleared first."""
    records: list[logging.LogRecord] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Recorder(level=logging.WARNING)
    recorded = logging.getLogger(name)
    recorded.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-message memory (a functools.lru_cache)
    try:
        yield records
    finally:
        recorded.removeHandler(handler)


@pytest.mark.parametrize("installed", ["5.25.0", "5.25.0.dev0", "6.0.0"])
def test_newer_release_warns_once_naming_both_versions_then_runs(installed):
    message = check_transformers_version(installed)
    assert installed in message and ",".join(SUPPORTED_TRANSFORMERS) in message
    with log_records(transformers_compat.logger.name) as records:
        warn_if_untested(installed)
        warn_if_untested(installed)  # a second import (e.g. a checkpoint's remote-code copy) says nothing more
    assert [record.getMessage() for record in records if record.levelno == logging.WARNING] == [message]


# ------------------------------------------------------------------------------------------------------------------
# The names each release gets
# ------------------------------------------------------------------------------------------------------------------
def test_signatures_use_the_installed_release_cache_name():
    model = tiny_model()
    for method in (model.forward, model.prepare_inputs_for_generation):
        parameters = inspect.signature(method).parameters
        assert CACHE_ARG in parameters
        assert ("cache" in parameters) == NEW_NAMES and ("past_key_values" in parameters) != NEW_NAMES


def test_cache_reaches_the_model_under_either_name():
    """The installed release's name silently; on 5.24 the old name still works, with transformers' own
    `FutureWarning` (as stock Llava's forward gives it)."""
    model = tiny_model()
    batch = make_batch()
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        step = {"input_ids": torch.full((2, 1), 5), "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            by_name = model(**step, **cache_kwargs(output_cache(prefill)))
    assert output_cache(by_name) is output_cache(prefill)
    if NEW_NAMES:
        with torch.no_grad():
            prefill = model(**batch, use_cache=True)
            with pytest.warns(FutureWarning, match="past_key_values"):
                old = model(**step, past_key_values=output_cache(prefill))
        torch.testing.assert_close(old.logits, by_name.logits)


def test_image_features_are_where_the_installed_release_puts_them():
    model = tiny_model()
    with torch.no_grad():
        out = model(**make_batch(), use_cache=False)
    features = output_image_features(out)
    assert features.shape == (2, 12, 32)  # the 12 patches stage 1 kept, projected
    if NEW_NAMES:
        assert isinstance(out.image_outputs.pooler_output, list) and len(out.image_outputs.pooler_output) == 2
        assert "image_hidden_states" not in out.keys()
        assert isinstance(out.to_tuple(), tuple)  # the multimodal output's tuple form takes image_outputs apart
    else:
        assert out.image_hidden_states is features


def test_config_without_image_seq_length_derives_it_from_the_vision_geometry():
    from modeling_llava_ivtp import IvtpConfig

    settings = tiny_config_dict()
    settings.pop("image_seq_length")
    config = IvtpConfig(**settings)
    assert config.image_seq_length == 36 == (24 // 4) ** 2
    settings["vision_config"] = dict(settings["vision_config"], image_size=32)  # 64 patches
    settings["schedule"] = {"vision": [48, 40, 32], "llm": [8, 5]}
    assert IvtpConfig(**settings).image_seq_length == 64
    assert IvtpConfig().image_seq_length == 576  # LLaVA-1.5's 336 px, patch 14
    with pytest.raises(ValueError, match=r"`image_seq_length` \(36\) must equal the patches per image \(64"):
        IvtpConfig(**settings, image_seq_length=36)


# ------------------------------------------------------------------------------------------------------------------
# No deprecation warnings from this package's calls
# ------------------------------------------------------------------------------------------------------------------
def _is_ours(filename: str) -> bool:
    path = Path(filename)
    if path.name not in OUR_FILES:
        return False
    # the installed package, or a checkpoint's remote-code copy of it (transformers_modules/<checkpoint>/...)
    return path.resolve().parent == PACKAGE_DIR or "transformers_modules" in path.parts


def _caller_on_stack(is_caller) -> str | None:
    """The innermost frame on the current stack whose file `is_caller` accepts, as `file:line (function)`."""
    frame = sys._getframe(1)
    while frame is not None:
        if is_caller(frame.f_code.co_filename):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return None


@contextlib.contextmanager
def deprecations_raised_by(is_caller=_is_ours):
    """Collect the deprecations raised while a frame accepted by `is_caller` is on the stack: `FutureWarning` and
    `DeprecationWarning` (shown every time), and transformers' logged deprecation notices (`logger.warning_once`,
    e.g. the `past_key_values` and `image_hidden_states` renames of 5.24, which are not Python warnings)."""
    found: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            caller = _caller_on_stack(is_caller)
            if caller is not None:
                found.append(f"{category.__name__} via {caller}: {message}")

    class Deprecations(logging.Handler):
        def emit(self, record):
            caller = _caller_on_stack(is_caller)
            if "deprecat" in record.getMessage().lower() and caller is not None:
                found.append(f"logged via {caller}: {record.getMessage()}")

    handler = Deprecations(level=logging.WARNING)
    library_logger = logging.getLogger("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # restored by catch_warnings
        logging.Logger.warning_once.cache_clear()
        library_logger.addHandler(handler)
        try:
            yield found
        finally:
            library_logger.removeHandler(handler)


PROMPTS = ["USER: <image>\nWhat color is the dog? ASSISTANT:", "USER: <image>\nIs it big? ASSISTANT:"]
GREEDY = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]}


def exercise(model, processor, tmp_path: Path) -> None:
    """The package's public paths once each: forward (pruned and not; cache on and off; labels; hidden states),
    generate (greedy, beams, sampling, no cache, a second turn on the returned cache), a training step with
    activation checkpointing, save and reload through the Auto classes as remote code, the pipeline, the CLIs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    inputs = processor(images=make_images(2), text=PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**inputs, use_cache=True, output_hidden_states=True)
        model(**inputs, use_cache=False, labels=inputs["input_ids"])
        generated = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        conversation = torch.cat([generated.sequences, torch.full((2, 2), 7)], dim=1)
        model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation), max_new_tokens=2,
                       **cache_kwargs(output_cache(generated)), **GREEDY)
        model.generate(**inputs, max_new_tokens=3, num_beams=2, **GREEDY)
        model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5, suppress_tokens=[IMAGE_TOKEN_ID])
        model.generate(**inputs, max_new_tokens=2, use_cache=False, **GREEDY)
    stock = tiny_model(schedule=None)
    with torch.no_grad():
        stock(**make_batch(), use_cache=True)
        stock.generate(**make_batch(), max_new_tokens=2, **GREEDY)

    model.train()
    model.activation_checkpointing_enable()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.activation_checkpointing_disable()
    model.eval()

    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    remote = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    remote_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    remote_inputs = remote_processor(images=make_images(2), text=PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        remote.generate(**remote_inputs, max_new_tokens=2, **GREEDY)
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": make_images(1)[0]},
                                             {"type": "text", "text": "What is it?"}]}]
    pipe(text=messages, max_new_tokens=2, generate_kwargs=GREEDY)

    from modeling_llava_ivtp import IvtpConfig, cli

    preset = tmp_path / "tiny.json"
    IvtpConfig(**tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)).to_json_file(preset)
    with contextlib.redirect_stdout(None):
        assert cli.main(["flops", "--preset", str(preset), "--text-tokens", "8", "--breakdown-at", "8"]) == 0
        assert cli.main(["bench", "--config", str(preset), "--batch-sizes", "1", "--text-tokens", "8", "--threads",
                         "1", "--no-progress", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
                         "--json", str(tmp_path / "bench.json")]) == 0


def test_package_raises_no_deprecation_warning_on_the_installed_release(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)
    processor = tiny_processor()
    with deprecations_raised_by() as found:
        exercise(model, processor, tmp_path)
    assert found == [], "\n".join(found)


def test_the_deprecation_check_sees_what_it_is_meant_to_see():
    """The recorder catches a deprecated call when its caller is on the stack (here: this file), and ignores the
    same call made from elsewhere."""
    this_file = Path(__file__).name
    model = tiny_model()
    with torch.no_grad():
        out = model(**make_batch(), use_cache=True)
    with deprecations_raised_by(lambda filename: Path(filename).name == this_file) as found:
        warnings.warn("an old name", FutureWarning)
        if NEW_NAMES:
            out.past_key_values  # noqa: B018  transformers 5.24 logs that `past_key_values` is deprecated
            out.image_hidden_states  # noqa: B018
    assert found[0].startswith("FutureWarning via") and "an old name" in found[0]
    assert len(found) == (3 if NEW_NAMES else 1), found
    with deprecations_raised_by(lambda filename: False) as found:
        warnings.warn("an old name", FutureWarning)
    assert found == []


def test_only_the_compat_module_branches_on_the_transformers_version():
    """One place owns the differences: no other module of the package parses or compares versions (bench only
    records the installed ones in its report)."""
    for path in PACKAGE_DIR.glob("*.py"):
        if path.name == "transformers_compat.py":
            continue
        text = path.read_text()
        assert "packaging" not in text and "version.parse" not in text and ".release" not in text, path.name


@pytest.mark.skipif(not NEW_NAMES, reason="transformers 5.23 drops the cache of checkpointed layers even without "
                    "gradients (stock Llava then generates without a cache); 5.24 keeps it")
def test_generate_from_a_model_left_in_training_mode_with_checkpointing():
    model = tiny_model()
    batch = make_batch()
    expected = model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    model.train()
    model.activation_checkpointing_enable()
    with torch.no_grad():
        got = model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    assert torch.equal(got, expected)
