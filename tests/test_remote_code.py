"""Self-contained remote-code checkpoints: saved with config/weights/processor/code, loaded in a fresh process by
the Auto classes with `trust_remote_code=True`, from the checkpoint's own files."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

import llava_ivtp
import modeling_llava_ivtp
from tiny_models import IMAGE_TOKEN_ID, TINY_CLIP_TEXT, make_images, tiny_model, tiny_processor


REMOTE_FILES = {
    "configuration_llava_ivtp.py", "modeling_llava_ivtp.py", "processing_llava_ivtp.py", "cache_ivtp.py",
    "guidance_ivtp.py", "pruning_ivtp.py", "transformers_compat.py", "validation_ivtp.py", "attention_rows.py",
    "generation_ivtp.py", "outputs_ivtp.py", "tokens_ivtp.py", "pruners.py", "pruner_base.py",
    *(f"pruner_{name}.py" for name in ("ivtp", "random", "topk", "pooling", "evit", "tome", "fastv", "pdrop",
                                       "visionzip", "vispruner", "divprune", "cdpruner")),
}
# A LLaVA-NeXT checkpoint carries these as well (`tests/test_next_host.py`).
NEXT_REMOTE_FILES = REMOTE_FILES | {"modeling_llava_next_ivtp.py", "layout_next.py"}
PROMPTS = ["USER: <image>\nWhat color is the dog? ASSISTANT:", "USER: <image>\nIs it big? ASSISTANT:"]
ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGE = Path(modeling_llava_ivtp.__file__).resolve().parent
TOOLS_PACKAGE = Path(llava_ivtp.__file__).resolve().parent
# The project's packages that a checkpoint does not carry: remote code importing one of them would fail to load.
NOT_IN_A_CHECKPOINT = {"llava_ivtp", "hub_cards", "llava_ivtp_presets"}


def run_fresh(script: str, tmp_path: Path) -> dict:
    """Run `script` in a new interpreter that cannot import the repository's package from its working directory;
    remote modules are cached under `tmp_path`. The script prints one JSON line last."""
    environment = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "tiny-llava-ivtp"
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)
    processor = tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = make_images(2)
    inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    torch.save({"state": model.state_dict(), "logits": logits, "tokens": tokens, "images": images, "inputs": dict(inputs)}, folder.parent / "expected.pt")
    return folder


def test_model_package_holds_exactly_the_remote_code():
    """`modeling_llava_ivtp/` is what a checkpoint carries: the remote files and `__init__.py`, no other module and
    no subfolder; the tools live in `llava_ivtp/`."""
    entries = {path.name for path in MODEL_PACKAGE.iterdir() if path.name != "__pycache__"}
    assert entries == NEXT_REMOTE_FILES | {"__init__.py"}, sorted(entries ^ (NEXT_REMOTE_FILES | {"__init__.py"}))
    assert not any(path.is_dir() for path in MODEL_PACKAGE.iterdir() if path.name != "__pycache__")


def imported_modules(source: str) -> set[str]:
    """The absolute modules a Python source imports (`import a.b`, `from a.b import c`, `importlib.import_module("a")`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def test_model_package_never_imports_the_tools():
    """The model's modules import each other relatively and never the tools (nor another package a checkpoint does
    not carry): read from the sources, and checked in a fresh interpreter that imports every model module."""
    for path in sorted(MODEL_PACKAGE.glob("*.py")):
        imported = {name.split(".")[0] for name in imported_modules(path.read_text())}
        assert not imported & NOT_IN_A_CHECKPOINT, (path.name, sorted(imported & NOT_IN_A_CHECKPOINT))
    modules = sorted(f"modeling_llava_ivtp.{name.removesuffix('.py')}" for name in NEXT_REMOTE_FILES)
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    environment.pop("PYTHONPATH", None)
    script = (f"import importlib, json, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
              "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=MODEL_PACKAGE.parent, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "modeling_llava_ivtp" in loaded and not loaded & NOT_IN_A_CHECKPOINT, sorted(loaded & NOT_IN_A_CHECKPOINT)


def test_tools_package_installs_every_subpackage():
    """pyproject.toml lists `llava_ivtp` and each of its subpackages (a folder of modules left out would be missing
    from the wheel, though an editable install finds it), and none of them is the model package's."""
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("llava_ivtp", *path.parent.relative_to(TOOLS_PACKAGE).parts))
             for path in TOOLS_PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert found == {name for name in packages if name.split(".")[0] == "llava_ivtp"}
    assert all((TOOLS_PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file() for name in found)
    assert "modeling_llava_ivtp" in packages and not any(name.startswith("modeling_llava_ivtp.") for name in packages)


def test_checkpoint_is_self_contained(checkpoint):
    files = set(os.listdir(checkpoint))
    assert REMOTE_FILES <= files
    # save_pretrained copies exactly the remote files: no tool module, no __init__.py
    assert {name for name in files if name.endswith(".py")} == REMOTE_FILES
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llava_ivtp.IvtpConfig",
        "AutoModel": "modeling_llava_ivtp.LlavaIvtpForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_llava_ivtp.LlavaIvtpForConditionalGeneration",
    }
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_llava_ivtp.LlavaIvtpProcessor"}
    assert processor_config["clip_model_name"] == "ViT-L-14-336"
    # the remote files import each other relatively, never the installed package
    for name in REMOTE_FILES:
        assert not re.search(r"^\s*(from|import)\s+modeling_llava_ivtp", (checkpoint / name).read_text(), re.MULTILINE)


def test_auto_classes_load_everything_from_the_checkpoints_own_code(checkpoint, tmp_path):
    result = run_fresh(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
        folder = {str(checkpoint)!r}
        expected = torch.load({str(checkpoint.parent / "expected.pt")!r}, weights_only=False)
        report = {{"config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__}}
        for auto in (AutoModel, AutoModelForImageTextToText):
            model, info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
            state = model.state_dict()
            report[auto.__name__] = {{
                "module": type(model).__module__, "class": type(model).__name__,
                "info": {{key: sorted(map(str, value)) for key, value in info.items()}},
                "same_keys": sorted(state) == sorted(expected["state"]),
                "all_equal": all(torch.equal(state[key], expected["state"][key]) for key in expected["state"]),
                "lm_head_equal": torch.equal(model.lm_head.weight, expected["state"]["lm_head.weight"]),
            }}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        report["processor"] = [type(processor).__module__, type(processor).__name__]
        inputs = processor(images=expected["images"], text={PROMPTS!r}, padding=True, return_tensors="pt")
        report["inputs_equal"] = sorted(inputs) == sorted(expected["inputs"]) and all(
            torch.equal(inputs[key], expected["inputs"][key]) for key in inputs
        )
        model.eval()
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[{IMAGE_TOKEN_ID}])
        report["logits_max_diff"] = float((logits - expected["logits"]).abs().max())
        report["tokens_equal"] = torch.equal(tokens, expected["tokens"])
        print(json.dumps(report))
        """,
        tmp_path,
    )
    assert result["config"].startswith("transformers_modules.")
    for auto in ("AutoModel", "AutoModelForImageTextToText"):
        loaded = result[auto]
        assert loaded["module"].startswith("transformers_modules.") and loaded["class"] == "LlavaIvtpForConditionalGeneration"
        assert loaded["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        assert loaded["same_keys"] and loaded["all_equal"] and loaded["lm_head_equal"]
    assert result["processor"][0].startswith("transformers_modules.") and result["processor"][1] == "LlavaIvtpProcessor"
    assert result["inputs_equal"]
    assert result["logits_max_diff"] <= 1e-5
    assert result["tokens_equal"]


def test_pipeline_answers_chat_messages_with_ivtp_guidance(checkpoint):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    assert type(pipe.model).__module__.startswith("transformers_modules.")
    assert type(pipe.processor).__name__ == "LlavaIvtpProcessor"
    images = make_images(2)
    questions = ["What color is the dog?", "Is it big?"]
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for image, question in zip(images, questions)
    ]
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:  # the prefill step
            seen.append({key: kwargs.get(key) for key in ("input_ids", "instruction_mask", "clip_input_ids", "clip_token_spans")})

    handle = pipe.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        single = pipe(text=messages[0], max_new_tokens=4, generate_kwargs={"do_sample": False})
        batch = pipe(text=messages, max_new_tokens=4, batch_size=2, generate_kwargs={"do_sample": False})
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[1]["input_ids"].shape[0] == 2
    # what reached the model is the processor's guidance for these conversations
    for row, conversation in enumerate(messages):
        direct = pipe.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        real = seen[1]["input_ids"][row] != pipe.processor.tokenizer.pad_token_id
        assert torch.equal(seen[1]["input_ids"][row][real], direct["input_ids"][0])
        for key in ("instruction_mask", "clip_token_spans"):
            assert torch.equal(seen[1][key][row][real], direct[key][0]), key
            assert seen[1][key][row][~real].abs().sum() == 0
        assert torch.equal(seen[1]["clip_input_ids"][row], direct["clip_input_ids"][0])
        tokens = pipe.model.generate(**direct, max_new_tokens=4, do_sample=False)
        answer = pipe.processor.decode(tokens[0, direct["input_ids"].shape[1]:], skip_special_tokens=True)
        assert batch[row][0]["generated_text"][-1] == {"role": "assistant", "content": answer}
    assert single[0]["generated_text"][-1] == batch[0][0]["generated_text"][-1]
    assert instruction_words(pipe.processor, seen[0]) == "Whatcoloristhedog?"


def instruction_words(processor, seen) -> str:
    return processor.tokenizer.decode(seen["input_ids"][0][seen["instruction_mask"][0].bool()])


def test_model_package_imports_form_no_cycle_and_the_runner_imports_no_method():
    """The model package's relative imports (module level or inside functions) form no cycle; the runner
    (`modeling_llava_ivtp.py`) and the generation mixin reach the methods only through the registry (`pruners.py`),
    and no method imports the configuration module."""
    import re

    package = Path(modeling_llava_ivtp.__file__).resolve().parent
    edges = {path.stem: set(re.findall(r"^\s*from \.(\w+) import", path.read_text(), flags=re.MULTILINE))
             for path in package.glob("*.py")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in edges.get(start, ()))

    assert [module for module in edges if reaches(module, module, {module})] == []
    for runner in ("modeling_llava_ivtp", "generation_ivtp"):
        assert not {name for name in edges[runner] if name.startswith("pruner_") and name != "pruner_base"}, runner
    assert all("configuration_llava_ivtp" not in edges[name] for name in edges if name.startswith("pruner_"))
