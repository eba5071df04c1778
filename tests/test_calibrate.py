"""`llava-ivtp calibrate-tau` on a toy-scale testbed checkpoint: tau is the stated quantile of the relevances the
model computes, `--write` changes `tau` and nothing else (the old file kept), bad arguments are refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from llava_ivtp.cli import main as cli_main
from llava_ivtp.evaluation.calibrate import CalibrationError, calibrate, check_calibratable
from llava_ivtp.evaluation.eval import load_records, prompt_of


@pytest.fixture(scope="module")
def checkpoint(toy_testbed_checkpoint):
    return toy_testbed_checkpoint


def loaded(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval(),
            AutoProcessor.from_pretrained(path, trust_remote_code=True))


def reference_relevances(model, processor, records):
    """Eq. 7 relevance of the instruction tokens straight from the model's outputs, one question at a time."""
    values = []
    for record in records:
        inputs = processor(images=[record["image"]], text=[prompt_of(record["question"])], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        relevance = out.instruction_relevance[0][inputs["instruction_mask"][0].bool()]
        values += relevance[torch.isfinite(relevance)].tolist()
    return values


def test_tau_is_the_quantile_of_the_relevances_and_lets_that_share_through(checkpoint):
    model, processor = loaded(checkpoint)
    records, _ = load_records("testbed:validation", 6)
    report = calibrate(model, processor, records, q=0.75)
    values = reference_relevances(model, processor, records)
    assert report["tokens"] == len(values) > 6 and report["questions"] == 6
    assert report["tau"] == pytest.approx(float(np.quantile(values, 0.75)), abs=1e-4)
    assert report["share_at_or_above_tau"] == pytest.approx(0.25, abs=1.5 / len(values) + 1e-9)
    assert report["previous_tau"] == model.config.tau  # the checkpoint's own (save_checkpoint calibrated it)
    # Run with the calibrated tau, the pseudo-CLS averages the tokens at or above it: about a quarter of them.
    model.config.tau = report["tau"]
    chosen = total = 0
    for record in records:
        inputs = processor(images=[record["image"]], text=[prompt_of(record["question"])], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        relevance = out.instruction_relevance[0]
        chosen += int(out.pseudo_cls_tokens[0].sum())
        total += int(torch.isfinite(relevance[inputs["instruction_mask"][0].bool()]).sum())
    assert chosen == round(report["share_at_or_above_tau"] * total)


def test_write_sets_tau_only_and_keeps_the_old_file(checkpoint, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    before = (folder / "config.json").read_text()
    report_path = tmp_path / "report.json"
    argv = ["calibrate-tau", "--model", str(folder), "--limit", "4", "--quantile", "0.5", "--write",
            "--json", str(report_path), "--threads", "1"]
    assert cli_main(argv) == 0
    report = json.loads(report_path.read_text())
    assert f"tau = {report['tau']}" in capsys.readouterr().out
    after = json.loads((folder / "config.json").read_text())
    old = json.loads(before)
    assert after["tau"] == report["tau"] != old["tau"]
    assert {k: v for k, v in after.items() if k != "tau"} == {k: v for k, v in old.items() if k != "tau"}
    assert (folder / "config.json.before-calibrate-tau").read_text() == before
    model, _ = loaded(folder)
    assert model.config.tau == report["tau"]
    # A second --write would lose the first copy: refused, naming it; nothing changed.
    assert cli_main(argv[:-2] + ["--json", str(tmp_path / "again.json")]) == 2
    assert "config.json.before-calibrate-tau exists" in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text()) == after


def test_refusals(checkpoint, tmp_path, capsys):
    def refused(extra, *fragments):
        assert cli_main(["calibrate-tau", "--model", str(checkpoint), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llava-ivtp calibrate-tau: error:") and all(f in err for f in fragments), err

    refused(["--quantile", "1.5"], "--quantile 1.5", "(0, 1)")
    refused(["--limit", "0"], "--limit 0")
    refused(["--dataset", "testbed:dev"], "--dataset testbed:dev")
    mine = tmp_path / "notes.json"
    mine.write_text("{}")
    refused(["--json", str(mine)], "--json")
    assert mine.read_text() == "{}"
    assert cli_main(["calibrate-tau", "--model", "someone/model", "--write"]) == 2
    assert "--write" in capsys.readouterr().err
    model, _ = loaded(checkpoint)
    for fields, fragment in (({"guidance": "visual_cls"}, "config.guidance"),
                             ({"pruning_method": "fastv", "schedule": None}, "config.pruning_method"),
                             ({"pruning_method": None, "schedule": None}, "config.pruning_method")):
        config = model.config.__class__(**{**model.config.to_dict(), **fields})
        with pytest.raises(CalibrationError, match=fragment):
            check_calibratable(config)
