"""`llava-ivtp eval` on a toy-scale testbed checkpoint: every setting measured, results resumable, bad arguments
refused. The accuracy of the shipped model is not what is checked here."""

import json

import pytest

from llava_ivtp.cli import main as cli_main
from llava_ivtp.evaluation.eval import EvalError, parse_setting, visual_tokens


@pytest.fixture(scope="module")
def checkpoint(toy_testbed_checkpoint):
    return toy_testbed_checkpoint


def test_grid_is_measured_and_resumes(checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    argv = ["eval", "--model", str(checkpoint), "--dataset", "testbed:test", "--limit", "6", "--batch-size", "3",
            "--settings", "full", "ivtp@16", "ivtp@16:visual_cls", "stage1@16", "random@16", "--json", str(results),
            "--markdown", str(tmp_path / "table.md"), "--threads", "1"]
    assert cli_main(argv) == 0
    report = json.loads(results.read_text())
    assert list(report["settings"]) == ["full", "ivtp@16", "ivtp@16:visual_cls", "stage1@16", "random@16"]
    full, pruned, stage1 = report["settings"]["full"], report["settings"]["ivtp@16"], report["settings"]["stage1@16"]
    assert full["visual_tokens"] == 144 and pruned["visual_tokens"] == 16 and stage1["visual_tokens"] == 16
    assert pruned["tflops"] < full["tflops"] and stage1["tflops"] < full["tflops"]
    assert stage1["mean_visual_tokens_per_llm_layer"] == 16 < pruned["mean_visual_tokens_per_llm_layer"]
    randomly = report["settings"]["random@16"]
    assert randomly["visual_tokens"] == 16 == randomly["mean_visual_tokens_per_llm_layer"]
    assert randomly["tflops"] < full["tflops"]
    for entry in report["settings"].values():
        assert entry["questions"] == 6 and 0 <= entry["exact_match"] <= 1 and 0 <= entry["vqa_accuracy"] <= 1
        assert entry["prefill_ms_per_batch"] > 0
    assert "| ivtp@16 | 16 |" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    assert cli_main(argv[:-6] + ["--settings", "full", "ivtp@32", "--json", str(results), "--threads", "1"]) == 0
    assert "full: already in the results, skipped" in capsys.readouterr().out
    assert set(json.loads(results.read_text())["settings"]) == {"full", "ivtp@16", "ivtp@16:visual_cls", "stage1@16",
                                                                 "random@16", "ivtp@32"}


def test_every_registered_method_is_a_setting(checkpoint, tmp_path):
    """`METHOD@K` for every method of the registry: measured with its budget, its mean tokens per LLM layer as its
    forward held them (FastV: every token in its first layers) and its TFLOPs."""
    from modeling_llava_ivtp.configuration_llava_ivtp import PRUNING_METHODS

    results = tmp_path / "results.json"
    methods = [method for method in PRUNING_METHODS if method != "ivtp"]
    argv = ["eval", "--model", str(checkpoint), "--dataset", "testbed:test", "--limit", "2", "--batch-size", "2",
            "--settings", "full", *[f"{method}@16" for method in methods], "--json", str(results), "--threads", "1",
            "--no-progress"]
    assert cli_main(argv) == 0
    settings = json.loads(results.read_text())["settings"]
    full = settings["full"]
    for method in methods:
        entry = settings[f"{method}@16"]
        assert entry["visual_tokens"] == 16, method
        assert entry["fields"] == {"schedule": None, "pruning_method": method, "pruning_options": {"visual_tokens": 16}}
        assert 16 <= entry["mean_visual_tokens_per_llm_layer"] < full["mean_visual_tokens_per_llm_layer"], method
        assert entry["tflops"] < full["tflops"], method
    assert settings["fastv@16"]["mean_visual_tokens_per_llm_layer"] > 16  # its first layers see every token
    assert settings["topk@16"]["mean_visual_tokens_per_llm_layer"] == 16


def test_results_of_another_run_are_not_mixed_in(checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"model": "someone-else", "settings": {}}))
    code = cli_main(["eval", "--model", str(checkpoint), "--limit", "2", "--settings", "full", "--json", str(results)])
    assert code == 2 and "--json" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("ivtp@0", "K must be in"), ("ivtp@999", "K must be in"),
                                           ("ivtp@16:nope", "guidance"), ("nope@16", "expected full"),
                                           ("pooling@13", "pooling"), ("fastv@16:visual_cls", "no guidance"),
                                           ("stage1@16:visual_cls", "no guidance"),
                                           ("random@16:visual_cls", "no guidance"), ("random@0", "K must be in"),
                                           ("evit@16:fused=nope", "fused"), ("fastv@16:layer", "NAME=VALUE"),
                                           ("fastv@16:visual_tokens=8", "the budget is K"),
                                           ("ivtp@16:tau=0.1", "preset:PATH"), ("random@16:seed=1,=2", "NAME=VALUE"),
                                           ("fastv@16:layer=2,layer=3", "'layer' is given twice")])
def test_bad_settings(checkpoint, spec, message):
    from modeling_llava_ivtp import IvtpConfig

    config = IvtpConfig.from_pretrained(checkpoint)
    with pytest.raises(EvalError, match=message):
        parse_setting(spec, config)


def test_method_options_in_a_setting(checkpoint):
    """`METHOD@K:NAME=VALUE[,NAME=VALUE]`: the method's other options beside the budget, JSON values or strings."""
    from modeling_llava_ivtp import IvtpConfig

    config = IvtpConfig.from_pretrained(checkpoint)
    setting = parse_setting("evit@16:fused=mean", config)
    assert setting.fields["pruning_options"] == {"visual_tokens": 16, "fused": "mean"}
    assert parse_setting("fastv@16:layer=3", config).fields["pruning_options"] == {"visual_tokens": 16, "layer": 3}
    assert parse_setting("random@16:seed=4", config).config_of(config).pruning_options == {"visual_tokens": 16, "seed": 4}


def test_a_setting_prunes_a_model_saved_without_pruning():
    """A checkpoint saved with pruning off (a full-token fine-tune, `schedule=None`) runs every setting: the fields
    are set on the model's own config, which its submodules hold (their attention backend follows it), and are back
    afterwards."""
    import torch

    from modeling_llava_ivtp import IvtpConfig
    from tiny_models import make_batch, stock_twin, tiny_model

    model = tiny_model(schedule=None)
    config = model.config
    batch = make_batch()
    for spec in ("ivtp@8", "fastv@8", "divprune@8"):
        with parse_setting(spec, config).applied(model) as applied:
            assert applied is config and config.pruning_enabled
            with torch.no_grad():
                out = model(**batch, use_cache=False)
            assert out.visual_tokens_per_layer[-1] == 8, spec
        assert model.config is config and config.schedule is None and config.pruning_options is None
        assert config.pruning_method == "ivtp" and not config.pruning_enabled
    with torch.no_grad():  # and it is stock again
        torch.testing.assert_close(model(**batch).logits, stock_twin(model)(**batch).logits, atol=1e-5, rtol=0)
    from llava_ivtp.evaluation.eval import Setting

    bad = Setting("bad", {"pruning_method": "fastv", "schedule": {"vision": [], "llm": [4]}})
    with pytest.raises(ValueError, match="must be None"):  # a bad combination leaves the config as it was
        bad.apply_to(config)
    assert config.pruning_method == "ivtp" and config.schedule is None and isinstance(config, IvtpConfig)


def test_visual_tokens_per_llm_layer():
    """From what the forward's layers held: TINY_SCHEDULE (vision [24, 16, 12], llm [8, 5], group 2, 8 LLM layers)."""
    import torch

    from tiny_models import make_batch, tiny_model

    model = tiny_model()
    with torch.no_grad():
        held = model(**make_batch(), use_cache=False).visual_tokens_per_layer
    assert held == (12, 12, 8, 8, 5, 5, 5, 5)
    assert visual_tokens(model.config, held) == {"visual_tokens": 5, "mean_visual_tokens_per_llm_layer": (12 * 2 + 8 * 2 + 5 * 4) / 8}
    assert visual_tokens(model.config, None) == {"visual_tokens": 36, "mean_visual_tokens_per_llm_layer": 36.0}


def test_overlay_marks_exactly_the_kept_patches():
    import numpy as np

    from llava_ivtp.evaluation.show import overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    kept = [0, 5, 7, 15]  # a 4 x 4 grid of 12 px patches
    out = overlay(image, kept, grid=4)
    for patch in range(16):
        row, column = divmod(patch, 4)
        block = (slice(12 * row, 12 * row + 12), slice(12 * column, 12 * column + 12))
        if patch in kept:
            assert np.array_equal(out[block], image[block])
        else:
            assert not np.array_equal(out[block], image[block])


def test_show_writes_the_figure_of_each_setting(checkpoint, tmp_path):
    from PIL import Image

    from llava_ivtp.evaluation.show import pruning_of

    out = tmp_path / "fig5.png"
    assert cli_main(["show", "--model", str(checkpoint), "--testbed", "test:3", "--settings", "stage1@16", "ivtp@16",
                     "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_ivtp.testbed import scenes as testbed

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    scene = testbed.example("test", 3)
    result = pruning_of(model, processor, scene.image, scene.question)
    assert [len(kept) for _, kept in result["stages"]] == [72, 68, 64]  # the schedule the checkpoint ships with
    assert "".join(token for token, _, _ in result["instruction"]).strip() == scene.question


def test_quickstart_answers_with_and_without_pruning_and_draws_the_kept_patches(checkpoint, tmp_path):
    """examples/quickstart.py on the toy checkpoint (untrained answers; the mechanics are what is checked)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    picture = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py"), "--model", str(checkpoint),
                             "--repeats", "1", "--out", str(picture)], capture_output=True, text=True, timeout=600,
                            cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    assert re.search(r"^Q: .+\(expected: \w+\)$", output, flags=re.MULTILINE), output
    assert re.search(r"^ +full: '.*' +all 144 visual tokens; prefill [0-9.]+ ms$", output, flags=re.MULTILINE), output
    pruned = re.search(r"^ +ivtp@16: '.*' +visual tokens 144 -> vision tower \[([\d, ]+)\] -> LLM \[([\d, ]+)\]; "
                       r"prefill [0-9.]+ ms$", output, flags=re.MULTILINE)
    assert pruned and pruned.group(2).split(", ")[-1] == "16", output
    assert "prefill speed-up" in output and Image.open(picture).size[0] > 0


def test_testbed_ranges_start_where_asked_and_bad_specs_are_refused():
    from llava_ivtp.evaluation.eval import load_records
    from llava_ivtp.testbed import scenes as testbed

    records, description = load_records("testbed:test:1000", 3)
    assert description == "testbed test 1000..1002"
    assert [r["question"] for r in records] == [testbed.example("test", i).question for i in (1000, 1001, 1002)]
    assert load_records("testbed:validation", 2)[1] == "testbed validation 0..1"
    records, description = load_records("testbed-next:test:5", 2)  # the LLaVA-NeXT testbed's scenes
    assert description == "testbed-next test 5..6"
    assert [r["image"].size for r in records] == [testbed.example("test", i, task=testbed.NEXT).image.size for i in (5, 6)]
    assert [r["question"] for r in records] == [testbed.example("test", i, task=testbed.NEXT).question for i in (5, 6)]
    for spec in ("testbed:dev", "testbed:test:-1", "testbed:test:x", "testbedx:test", "testbed-next:dev"):
        with pytest.raises(EvalError, match=r"expected testbed\[:SPLIT\[:START\]\]"):
            load_records(spec, 2)


def test_ranges_pool_by_question_counts_overall_and_per_kind():
    import sys
    from pathlib import Path

    from llava_ivtp.evaluation.eval import pooled

    def results(span, em, em_where, n_where, n):
        entry = {"exact_match": em, "exact_match_where": em_where, "questions_where": n_where, "questions": n,
                 "exact_match_stderr": 0.0, "tflops": 1e-3, "mean_visual_tokens_per_llm_layer": 16.0}
        return {"model": "m", "dataset": f"testbed test {span}", "questions": n,
                "settings": {"full": dict(entry), "ivtp@16": dict(entry)}}

    a, b = results("0..99", 0.8, 0.5, 20, 100), results("100..399", 0.6, 0.25, 60, 300)
    merged = pooled([a, b])
    entry = merged["settings"]["full"]
    assert entry["exact_match"] == pytest.approx((80 + 180) / 400) and entry["questions"] == 400
    assert entry["exact_match_where"] == pytest.approx((10 + 15) / 80) and entry["questions_where"] == 80
    assert entry["exact_match_stderr"] == pytest.approx((0.65 * 0.35 / 400) ** 0.5)
    del b["settings"]["ivtp@16"]
    assert list(pooled([a, b])["settings"]) == ["full"]  # only settings measured in every range
    with pytest.raises(EvalError, match="different models"):
        pooled([a, {**b, "model": "other"}])
    del a["settings"]["full"]["questions_where"]
    with pytest.raises(EvalError, match="no question count for kind 'where'"):
        pooled([a, b])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        from ranges_table import table
    finally:
        sys.path.pop(0)
    text = table([results("0..99", 0.8, 0.5, 20, 100), results("100..399", 0.6, 0.25, 60, 300)], ["full"])
    assert "| `full` | 0.800 | 0.600 | 0.650 ± 0.024 | 0.31 |" in text
