"""The README's snippets, run as written on tiny models, in the README's order, in one working folder.

Every ```python / ```bash block of the README is preceded by `<!-- test: NAME -->` (run here) or
`<!-- not run by tests/test_readme.py: REASON -->`. Python blocks share one namespace (the README reads top to
bottom); bash blocks run in `bash -e` with this interpreter first on PATH. The only edits are the placeholders in
`PLACEHOLDERS`: the real models' sources become tiny files written here (a llava-hf-format LLaVA, an open_clip-format
CLIP, a preset for their shapes), and a real fine-tune's length becomes two steps. `--push-to-hub` cannot reach the
hub offline: the publish block runs with `huggingface_hub.HfApi` replaced by a recorder. On transformers 5.23 the
README's note on the cache's name applies (`cache` -> `past_key_values`).
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_llava_ivtp.transformers_compat import CACHE_ARG
from tiny_models import RecordingHubApi, make_images, tiny_config_dict, write_color_dataset, write_llava_hf, write_open_clip


ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- (test: (?P<name>[\w-]+)|not run by tests/test_readme.py: [^>]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)
FENCE = re.compile(r"^```(python|bash)$", re.M)
EXPECTED = ["convert", "llava-hf", "load", "generate", "generate-static", "methods", "guidance", "pipeline", "finetune", "lora-train", "lora-load", "publish"]


def readme_blocks() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    blocks = [(m["name"], m["lang"], m["code"]) for m in BLOCK.finditer(text)]
    assert len(blocks) == len(FENCE.findall(text)), "a python/bash block of the README has no test/not-run marker"
    return [block for block in blocks if block[0]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    sources = folder / "sources"
    llava = write_llava_hf(sources / "llava-hf")
    write_open_clip(sources / "clip", llava)
    (sources / "tiny-preset.json").write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict(), "tau": 0.0}))
    make_images(1)[0].save(folder / "example.jpg")
    write_color_dataset(folder)
    (folder / "examples").symlink_to(ROOT / "examples")
    placeholders = {
        "--llava llava-hf/llava-1.5-7b-hf": f"--llava {sources / 'llava-hf'} --base-model llava-hf/llava-1.5-7b-hf",
        '"llava-hf/llava-1.5-7b-hf"': f'"{sources / "llava-hf"}"',
        "ViT-L-14-336:openai": f"local-dir:{sources / 'clip'} --clip-tokenizer ViT-L-14-336",
        "configuration/llava-1.5-7b-ivtp.json": str(sources / "tiny-preset.json"),
        "--max-steps 1000": "--max-steps 2",
    }
    if CACHE_ARG == "past_key_values":  # transformers 5.23, as the README's note says
        placeholders.update({"generated.cache": "generated.past_key_values", "cache=cache": "past_key_values=cache"})
    return folder, placeholders


def substitute(code: str, placeholders: dict) -> str:
    for old, new in placeholders.items():
        code = code.replace(old, new)
    return code


def test_readme_has_a_tested_snippet_per_use():
    assert [name for name, _, _ in readme_blocks()] == EXPECTED


def test_readme_snippets_run_as_written(workspace, monkeypatch):
    import huggingface_hub

    folder, placeholders = workspace
    monkeypatch.chdir(folder)
    namespace: dict = {}
    printed: dict[str, str] = {}
    hub = RecordingHubApi()
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                       HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder / "modules"))
    for name, lang, code in readme_blocks():
        code = substitute(code, placeholders)
        if lang == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=environment,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"README block {name!r} failed:\n{result.stderr[-4000:]}"
            printed[name] = result.stdout
            continue
        if name == "publish":
            monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: hub)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(code, f"README.md:{name}", "exec"), namespace)
        printed[name] = output.getvalue()

    # what each use produced
    assert (folder / "llava-1.5-7b-ivtp" / "model.safetensors").is_file()
    assert namespace["plain"].config.clip_text_encoder is None and namespace["plain"].config.schedule is not None
    assert type(namespace["model"]).__module__.startswith("transformers_modules.")  # the checkpoint's own code
    assert type(namespace["processor"]).__name__ == "LlavaIvtpProcessor"
    assert namespace["out"].llm_token_counts == (8, 5)  # the tiny preset's schedule ran
    assert namespace["fastv_out"].visual_tokens_per_layer == (36, 36) + (16,) * 6  # FastV: K = 2, then the budget
    assert namespace["fastv"].config.pruning_method == "fastv" and namespace["fastv"].config.schedule is None
    assert namespace["more"].shape[1] > namespace["conversation_ids"].shape[1]
    assert len(printed["pipeline"].splitlines()) == 2
    assert "both pruning stages ran in 2 of 2" in printed["finetune"]
    assert (folder / "llava-1.5-7b-ivtp-ft" / "model.safetensors").is_file()
    assert (folder / "llava-1.5-7b-ivtp-lora" / "adapter_model.safetensors").is_file()
    assert type(namespace["merged"]).__name__ == "LlavaIvtpForConditionalGeneration"
    assert (folder / "llava-1.5-7b-ivtp-merged" / "model.safetensors").is_file()
    kinds = [call[0] for call in hub.calls]
    assert kinds == ["create_repo", "upload_folder", "upload_file"] and hub.calls[0][1] == "your-name/llava-1.5-7b-ivtp"
    assert printed["publish"].strip() == "2" * 40
    assert f'"your-name/llava-1.5-7b-ivtp", "{"1" * 40}"' in (folder / "llava-1.5-7b-ivtp" / "README.md").read_text()
