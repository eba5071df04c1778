"""The examples run offline as documented and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_generate_example_streams_a_batch_and_reports_the_cache():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    assert len(re.findall(r"^  step +\d+:", output, flags=re.MULTILINE)) == 3
    # 7B preset: 120 visual tokens in layers 0-2 ... 64 in layers 12-31; every row holds them plus its text.
    rows = re.findall(r"^\| (\d+) \| (\d+) \| \[([\d, ]+)\] \|", output, flags=re.MULTILINE)
    assert len(rows) == 32
    slots = [int(row[1]) for row in rows]
    visual = [120] * 3 + [104] * 3 + [88] * 3 + [72] * 3 + [64] * 20
    assert [s - v for s, v in zip(slots, visual)] == [slots[0] - 120] * 32
    assert "KV cache after prefill 308,281,344 B (294.00 MiB) vs stock 570,425,344 B (544.00 MiB): 46.0% less" in output


def test_speed_example_prunes_to_the_preset_and_times_both_models():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "speed.py"), "--repeats", "1"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    vision = [int(n) for n in re.findall(r"^  layers +\d+- *\d+: (\d+)$", output, flags=re.MULTILINE)]
    assert vision[-1] == 64 and vision == sorted(vision, reverse=True)  # the 7B preset: 64 tokens at the end
    grid = re.findall(r"^  ([.#]{24})$", output, flags=re.MULTILINE)
    assert len(grid) == 24 and "".join(grid).count("#") == 64
    assert re.search(r"stock Llava [0-9.]+ ms, LLaVA-IVTP [0-9.]+ ms, speed-up [0-9.]+x", output)


def test_target_coverage_pools_its_ranges_and_refuses_overlapping_ones(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import target_coverage
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from llava_ivtp.testbed import scenes

    out = tmp_path / "coverage.json"
    figures = target_coverage.main(["--limit", "6", "--ranges", "0", "6", "--json", str(out)])
    expected = {start: [scene for scene in scenes.examples("test", 6, start)
                        if scene.target is not None and scene.object_patches(scene.target)] for start in (0, 6)}
    assert figures["per_range"] == {"0": len(expected[0]), "6": len(expected[6])}
    assert figures["questions"] == len(expected[0]) + len(expected[6]) > 0
    for name, row in figures["coverage"].items():
        assert all(0.0 <= value <= 1.0 for value in row["ranges"])
        weighted = sum(value * len(expected[start]) for value, start in zip(row["ranges"], (0, 6)))
        assert abs(row["pooled"] - weighted / figures["questions"]) < 1e-9, name
        assert set(row["by_kind"]) == {scene.kind for found in expected.values() for scene in found}
    import json

    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    # other methods: the patches their last selection keeps; keeping every patch covers every object whole
    others = target_coverage.main(["--limit", "6", "--settings", "topk@144", "full", "random@16", "--visual-tokens", "16"])
    assert others["coverage"]["topk@144"]["pooled"] == others["coverage"]["full"]["pooled"] == 1.0
    assert others["relevance"] == {}
    assert 0.0 <= others["coverage"]["random@16"]["pooled"] < 1.0
    # the kept patches are the ones the method's selection names: a scene's coverage from its output by hand
    import torch
    from llava_ivtp.evaluation.eval import parse_setting, prompt_of
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(target_coverage.TESTBED_MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(target_coverage.TESTBED_MODEL, trust_remote_code=True)
    scene = expected[0][0]
    with parse_setting("divprune@16", model.config).applied(model), torch.no_grad():
        kept = target_coverage.final_patches(model, processor, scene)
        inputs = processor(images=[scene.image], text=[prompt_of(scene.question)], return_tensors="pt")
        out = model(**inputs, use_cache=False)
    assert kept == out.vision_keep_indices[0].tolist() and len(kept) == 16
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "target_coverage.py"), "--limit", "6",
                             "--ranges", "0", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 2 and "--ranges [0, 3]: starts must be >= 0 and at least --limit (6) apart" in result.stderr
