"""The supported transformers range and the one module that owns the differences between releases.

CI runs the whole suite on the oldest supported release and on the newest release pip resolves (`.ci/run`); these
tests check the range itself, the names each release gets, and that nothing this package or its examples do raises a
deprecation warning on the installed release (warnings count only where our code is on the stack: third-party
deprecations that our calls do not cause are not ours to fix).
"""

from __future__ import annotations

import argparse
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

import llava_ivtp
import modeling_llava_ivtp
from modeling_llava_ivtp import transformers_compat
from modeling_llava_ivtp.transformers_compat import (
    CACHE_ARG,
    NEWEST_TESTED,
    OLDEST_SUPPORTED,
    SUPPORTED_TRANSFORMERS,
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
    write_color_dataset,
)


ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(modeling_llava_ivtp.__file__).resolve().parent
TOOLS_DIR = Path(llava_ivtp.__file__).resolve().parent  # the tools' package (cli, conversion, measuring, ...)
EXAMPLES_DIR = ROOT / "examples"
OUR_FILES = {path.name for path in PACKAGE_DIR.glob("*.py")}
EXAMPLE_FILES = {path.name for path in EXAMPLES_DIR.glob("*.py")}
NEW_NAMES = Version(transformers.__version__).release[:2] >= (5, 24)


# ------------------------------------------------------------------------------------------------------------------
# The range
# ------------------------------------------------------------------------------------------------------------------
def _release(minor: tuple[int, int], patch: int | str = 0) -> str:
    return f"{minor[0]}.{minor[1]}.{patch}"


OLDEST, NEWEST = OLDEST_SUPPORTED, NEWEST_TESTED
NEXT_MINOR = (NEWEST[0], NEWEST[1] + 1)


def _requirement() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [dependency for dependency in dependencies if dependency.startswith("transformers")]
    return requirement


def test_pyproject_states_the_supported_range():
    """pyproject.toml allows exactly the compat module's range: from the oldest supported minor (CI's oldest run) to
    the next major, so a new minor installs beside llava-ivtp the day it is out (and CI's newest run tests it)."""
    requirement = _requirement()
    specifier = SpecifierSet(requirement.removeprefix("transformers"))
    assert specifier == SpecifierSet(",".join(SUPPORTED_TRANSFORMERS)), (requirement, SUPPORTED_TRANSFORMERS)
    assert _release(OLDEST) in specifier and _release(OLDEST, 9) in specifier
    assert _release((OLDEST[0], OLDEST[1] - 1), 9) not in specifier  # older: refused by pip and at import
    assert OLDEST <= NEWEST and _release(NEWEST) in specifier
    assert _release(NEXT_MINOR) in specifier and f"{NEWEST[0]}.99.0" in specifier  # untested minors resolve
    assert f"{NEWEST[0] + 1}.0.0" not in specifier  # a next major is refused by pip
    installed = Version(transformers.__version__)
    assert installed.release[:2] >= OLDEST and installed.major < NEWEST[0] + 1, "the suite runs inside the range"


def test_the_readme_and_ci_state_the_same_range():
    """The README's install section names the requirement; CI's oldest run is pyproject's lower bound and its other
    run is the newest release pip resolves under the requirement."""
    requirement = _requirement()
    assert requirement.removeprefix("transformers") in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "newest $oldest" in ci and "--upgrade \"$requirement\"" in ci


@pytest.mark.parametrize("installed", ["5.22.2", "5.0.0", "4.57.6", "5.23.0.dev0"])
def test_older_release_is_an_import_error_naming_both_versions(installed):
    if installed == "5.23.0.dev0":  # a dev build counts as its minor: 5.23 is supported
        assert check_transformers_version(installed) is None
        return
    with pytest.raises(ImportError) as error:
        check_transformers_version(installed)
    assert installed in str(error.value) and ",".join(SUPPORTED_TRANSFORMERS) in str(error.value)


@pytest.mark.parametrize("installed", [_release(OLDEST), _release(OLDEST, 4), "5.24.0", "5.24.3", _release(NEWEST),
                                       _release(NEWEST, "0rc1"), _release(NEWEST, 7)])
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


@pytest.mark.parametrize("installed", [_release(NEXT_MINOR), _release(NEXT_MINOR, "0.dev0"), f"{NEWEST[0] + 1}.0.0"])
def test_newer_release_warns_once_naming_both_versions_then_runs(installed):
    """Newer than the newest tested release: a warning naming the installed and the newest tested release, once."""
    message = check_transformers_version(installed)
    assert installed in message and f"({NEWEST[0]}.{NEWEST[1]};" in message
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
    if path.name in EXAMPLE_FILES and path.resolve().parent == EXAMPLES_DIR:
        return True
    if TOOLS_DIR in path.resolve().parents:
        return True
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
    activation checkpointing, save and reload through the Auto classes as remote code, the pipeline, the CLIs, and
    the fine-tuning examples' `Trainer` (activation checkpointing on) and PEFT LoRA wrapping."""
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

    from llava_ivtp import cli
    from modeling_llava_ivtp import IvtpConfig

    preset = tmp_path / "tiny.json"
    IvtpConfig(**tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)).to_json_file(preset)
    from finetune import build_trainer, read_conversations  # examples/
    from finetune_lora import lora_model

    records = read_conversations(write_color_dataset(tmp_path / "data", count=2))
    settings = argparse.Namespace(output_dir=tmp_path / "trained", max_steps=1, batch_size=2, learning_rate=1e-3, seed=0)
    build_trainer(tiny_model(clip_text_encoder=TINY_CLIP_TEXT), processor, records, settings).train()
    lora_model(tiny_model())  # PEFT asks the model whether it checkpoints activations

    with contextlib.redirect_stdout(None):
        assert cli.main(["flops", "--preset", str(preset), "--text-tokens", "8", "--breakdown-at", "8"]) == 0
        assert cli.main(["bench", "--config", str(preset), "--batch-sizes", "1", "--text-tokens", "8", "--threads",
                         "1", "--no-progress", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
                         "--json", str(tmp_path / "bench.json")]) == 0


def test_package_raises_no_deprecation_warning_on_the_installed_release(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
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
    for path in [*PACKAGE_DIR.glob("*.py"), *TOOLS_DIR.rglob("*.py")]:
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
