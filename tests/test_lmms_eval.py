"""The `llava_ivtp` lmms-eval model: found through the entry point, run end to end by the `lmms-eval` command line on a
task made from local files (testbed questions exported by `llava-ivtp export-testbed`), with the same answers and
accuracy as `llava-ivtp eval` on the same questions and setting; its requests, `model_args` and refusals."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from lmms_eval.api.instance import Instance
from llava_ivtp.cli import main as cli_main
from llava_ivtp.evaluation.eval import Setting, load_records, parse_setting, prompt_of, run_setting
from llava_ivtp.evaluation.lmms_eval_model import LlavaIvtp, manifests, pruning_setting
from llava_ivtp.testbed.export import TASK, export
from tiny_models import tiny_config_dict, write_llava_hf, write_open_clip


ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "llava-ivtp-testbed"
QUESTIONS = 24


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms") / "task"
    export(folder, "test", QUESTIONS)
    return folder


@pytest.fixture(scope="module")
def lmms_model():
    return LlavaIvtp(pretrained=str(MODEL), method="ivtp", budget=16, device="cpu", batch_size=5)


def _requests(task_folder, model, count, gen_kwargs, request_type="generate_until"):
    """lmms-eval's requests for the first `count` documents of the exported task (as its simple tasks build them)."""
    sys.path.insert(0, str(task_folder))
    try:
        import utils  # the task's utils.py
    finally:
        sys.path.remove(str(task_folder))
    documents = [json.loads(line) for line in (task_folder / "test.jsonl").read_text().splitlines()][:count]
    model.task_dict = {TASK: {"test": documents}}
    requests = []
    for doc_id, document in enumerate(documents):
        second = gen_kwargs if request_type == "generate_until" else " " + document["answers"][0]
        arguments = (utils.doc_to_text(document), second, utils.doc_to_visual, doc_id, TASK, "test")
        requests.append(Instance(request_type, arguments, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}))
    return requests, utils


def test_entry_point_registers_the_model():
    (point,) = [point for point in entry_points(group="lmms_eval.models") if point.name == "llava_ivtp"]
    (manifest,) = point.load()()
    assert manifest.model_id == "llava_ivtp" and manifest.simple_class_path.endswith(".LlavaIvtp")
    from lmms_eval.models import get_model

    assert get_model("llava_ivtp") is LlavaIvtp and manifests()[0] == manifest


def test_lmms_eval_command_line_matches_llava_ivtp_eval(task, tmp_path):
    """`lmms-eval --model llava_ivtp` on the local-files task = `llava-ivtp eval` on the same JSON lines: accuracy,
    and each question's answer."""
    results = tmp_path / "eval.json"
    assert cli_main(["eval", "--model", str(MODEL), "--dataset", str(task / "test.jsonl"), "--settings", "ivtp@16",
                     "--batch-size", "8", "--json", str(results), "--no-progress"]) == 0
    expected = json.loads(results.read_text())["settings"]["ivtp@16"]

    out = tmp_path / "lmms"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_EVALUATE_OFFLINE": "1", "WANDB_MODE": "disabled", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    command = [
        str(Path(sys.executable).parent / "lmms-eval"), "--model", "llava_ivtp",
        "--model_args", f"pretrained={MODEL},method=ivtp,budget=16,device=cpu",
        "--tasks", TASK, "--include_path", str(task), "--batch_size", "8",
        "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"|{TASK}|" in run.stdout.replace(" ", "")  # the results table
    (results_file,) = out.rglob("*_results.json")
    measured = json.loads(results_file.read_text())["results"][TASK]
    assert measured["exact_match,none"] == pytest.approx(expected["exact_match"], abs=1e-12)
    assert json.loads(results_file.read_text())["n-samples"][TASK]["effective"] == QUESTIONS

    # Answer by answer, against `eval`'s own loop on the same records.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)
    records, _ = load_records(str(task / "test.jsonl"), None)
    predictions = run_setting(model, processor, records, parse_setting("ivtp@16", model.config), 8, 4)["predictions"]
    (samples_file,) = out.rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    answers = [sample["filtered_resps"] for sample in samples]  # one answer each (a list in some lmms-eval releases)
    assert [answer[0] if isinstance(answer, list) else answer for answer in answers] == predictions
    assert 0 < expected["exact_match"] < 1  # a trained model: some right, some wrong


def test_generate_until_is_the_eval_loop_batched(task, lmms_model):
    """Requests in batches of 5 with padding: each answer is `llava-ivtp eval`'s for the question (its prompt
    layout too), and the task's `until` strings cut the text."""
    requests, _ = _requests(task, lmms_model, 7, {"max_new_tokens": 4, "temperature": 0, "do_sample": False})
    answers = lmms_model.generate_until(requests)
    records, _ = load_records(str(task / "test.jsonl"), 7)
    model = lmms_model.model
    # The model already runs ivtp@16 (its `model_args`): the eval loop with no further change.
    expected = run_setting(model, lmms_model.processor, records, Setting("as loaded", {}), 5, 4)["predictions"]
    assert answers == expected
    assert lmms_model.prompt(records[0]["question"], 1) == prompt_of(records[0]["question"])

    cut = [answer.split("e")[0].strip() for answer in answers]
    requests, _ = _requests(task, lmms_model, 7, {"max_new_tokens": 4, "until": ["e"]})
    assert lmms_model.generate_until(requests) == cut


def test_loglikelihood_is_the_continuations_mean_negative_log_likelihood(task):
    """Stock (method=none) and pruned: the returned value is the mean NLL of the continuation's tokens under the
    model's own logits, computed here by hand; greedy says whether argmax decoding gives it."""
    for method in ("none", "ivtp"):
        model = LlavaIvtp(pretrained=str(MODEL), method=method, **({} if method == "none" else {"budget": 16}),
                          device="cpu")
        requests, utils = _requests(task, model, 4, None, request_type="loglikelihood")
        values = model.loglikelihood(requests)
        for request, (nll, greedy) in zip(requests, values):
            context, continuation, _, doc_id, _, _ = request.args
            images = utils.doc_to_visual(model.task_dict[TASK]["test"][doc_id])
            prompt = model.prompt(context, 1)
            prompt_ids = model.processor(images=images, text=[prompt], return_tensors="pt")["input_ids"]
            inputs = model.processor(images=images, text=[prompt + continuation], return_tensors="pt")
            with torch.no_grad():
                output = model.model(**inputs, use_cache=False)
            ids = inputs["input_ids"][0]
            positions = output.kept_positions[0] if output.kept_positions is not None else torch.arange(len(ids))
            log_probs = output.logits[0].float().log_softmax(-1)
            picked = [(slot, int(positions[slot + 1])) for slot in range(len(positions) - 1)
                      if int(positions[slot + 1]) >= prompt_ids.shape[1]]
            assert picked  # the continuation has tokens
            manual = -torch.stack([log_probs[slot, ids[target]] for slot, target in picked]).mean()
            assert nll == pytest.approx(float(manual), rel=1e-4)
            assert greedy == all(int(log_probs[slot].argmax()) == int(ids[target]) for slot, target in picked)


def test_stock_llava_hf_checkpoint_with_preset_and_clip(tmp_path):
    """`pretrained` a stock llava-hf folder + `preset` + `clip`: converted in memory as `llava-ivtp convert` writes
    it (same weights, same config); without them, a clear refusal."""
    llava = write_llava_hf(tmp_path / "llava-hf")
    write_open_clip(tmp_path / "clip", llava)
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict(), "tau": 0.0}))
    clip = f"local-dir:{tmp_path / 'clip'}"
    model = LlavaIvtp(pretrained=str(tmp_path / "llava-hf"), preset=str(preset), clip=clip,
                      clip_tokenizer="ViT-L-14-336", device="cpu")
    assert model.setting is None and model.model.config.schedule == tiny_config_dict()["schedule"]
    assert model.model.clip_text_model is not None
    stock = llava.state_dict()
    ours = model.model.state_dict()
    assert all(torch.equal(ours[key], value) for key, value in stock.items())
    assert cli_main(["convert", "--llava", str(tmp_path / "llava-hf"), "--clip", clip, "--preset", str(preset),
                     "--out", str(tmp_path / "converted"), "--clip-tokenizer", "ViT-L-14-336",
                     "--base-model", "llava-hf/llava-1.5-7b-hf"]) == 0
    converted = LlavaIvtp(pretrained=str(tmp_path / "converted"), device="cpu")
    assert converted.model.config.to_dict()["schedule"] == model.model.config.to_dict()["schedule"]
    assert all(torch.equal(converted.model.state_dict()[key], value) for key, value in ours.items())

    with pytest.raises(ValueError, match="stock llava-hf checkpoint: give `preset`"):
        LlavaIvtp(pretrained=str(tmp_path / "llava-hf"), device="cpu")
    with pytest.raises(ValueError, match="`preset` and `clip` go together"):
        LlavaIvtp(pretrained=str(tmp_path / "llava-hf"), preset=str(preset), device="cpu")
    with pytest.raises(ValueError, match=r"model_args `preset` /no/such.json: no such file"):
        LlavaIvtp(pretrained=str(tmp_path / "llava-hf"), preset="/no/such.json", clip=clip, device="cpu")


def test_model_args_map_to_the_eval_settings():
    from modeling_llava_ivtp import IvtpConfig
    from modeling_llava_ivtp.pruner_base import budget_schedule

    config = IvtpConfig.from_pretrained(MODEL)
    assert pruning_setting(config) is None
    assert pruning_setting(config, method="none").fields == {"pruning_method": None}
    assert pruning_setting(config, method="ivtp", budget=32).fields == parse_setting("ivtp@32", config).fields
    assert pruning_setting(config, budget=32, guidance="visual_cls").fields == \
        parse_setting("ivtp@32:visual_cls", config).fields
    assert pruning_setting(config, method="fastv", budget=16).fields == parse_setting("fastv@16", config).fields
    options = pruning_setting(config, method="fastv", budget=16, pruning_options='{"layer": 3}').fields
    assert options["pruning_options"] == {"visual_tokens": 16, "layer": 3}
    schedule = budget_schedule(config, 24)  # a schedule of the model's geometry
    assert pruning_setting(config, schedule=json.dumps(schedule)).fields["schedule"] == schedule
    assert pruning_setting(config, tau=0.5).fields == {"tau": 0.5}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"method": "fastvv"}, "`method` must be `none` or one of"),
        ({"budget": 0}, "`budget` must be a visual-token count >= 1"),
        ({"budget": 10_000}, "K must be in"),
        ({"method": "none", "budget": 16}, r"method=none \(stock Llava\) takes no \['budget'\]"),
        ({"budget": 16, "schedule": '{"vision": [16], "llm": []}'}, "`budget` and `schedule` both given"),
        ({"method": "fastv", "schedule": '{"vision": [16], "llm": []}'}, "`schedule` is IVTP's"),
        ({"method": "fastv", "pruning_options": "layer=3"}, "`pruning_options` must be a JSON object"),
        ({"method": "fastv", "pruning_options": '{"layers": 3}'}, "unknown options"),
        ({"guidance": "psychic"}, "`guidance` must be one of"),
    ],
)
def test_bad_model_args_are_refused_naming_them(arguments, message):
    from modeling_llava_ivtp import IvtpConfig

    with pytest.raises(ValueError, match=message):
        pruning_setting(IvtpConfig.from_pretrained(MODEL), **arguments)


def test_other_refusals(lmms_model):
    with pytest.raises(ValueError, match=r"model_args \['temprature'\] are not arguments of llava_ivtp"):
        LlavaIvtp(pretrained=str(MODEL), temprature=0.2)
    with pytest.raises(ValueError, match="batch_size must be a number"):
        LlavaIvtp(pretrained=str(MODEL), batch_size="auto")
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        LlavaIvtp(pretrained=str(MODEL), dtype="int4")
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lmms_model.generate_until_multi_round([])


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    """A tiny LLaVA-NeXT IVTP checkpoint converted from llava-hf's format (`llava-ivtp convert`)."""
    from modeling_llava_ivtp import IvtpNextConfig
    from tiny_models import tiny_next_config_dict, write_llava_next_hf

    root = tmp_path_factory.mktemp("next-checkpoint")
    llava = write_llava_next_hf(root / "llava-next-hf")
    write_open_clip(root / "clip", llava)
    preset = root / "preset.json"
    IvtpNextConfig(**tiny_next_config_dict(pruning_method="ivtp", pruning_options={"visual_tokens": 40})).to_json_file(preset)
    assert cli_main(["convert", "--llava", str(root / "llava-next-hf"), "--clip", f"local-dir:{root / 'clip'}",
                     "--preset", str(preset), "--out", str(root / "out"), "--clip-tokenizer", "ViT-L-14-336",
                     "--base-model", "llava-hf/llava-v1.6-vicuna-7b-hf"]) == 0
    return root / "out"


def test_a_llava_next_checkpoint_runs_through_the_model_and_llava_ivtp_eval(task, next_checkpoint, tmp_path):
    """The checkpoint picks its host: a converted LLaVA-NeXT checkpoint loads the NeXT classes, and its answers in
    padded batches (the testbed's 192 px images: 5 crops each) are `llava-ivtp eval`'s loop's; `llava-ivtp eval`
    measures it too, each setting's visual tokens within its budget."""
    lmms_model = LlavaIvtp(pretrained=str(next_checkpoint), method="visionzip", budget=30, device="cpu", batch_size=3)
    assert type(lmms_model.model).__name__ == "LlavaNextIvtpForConditionalGeneration"
    assert type(lmms_model.processor).__name__ == "LlavaNextIvtpProcessor"
    requests, _ = _requests(task, lmms_model, 5, {"max_new_tokens": 3, "temperature": 0, "do_sample": False})
    answers = lmms_model.generate_until(requests)
    records, _ = load_records(str(task / "test.jsonl"), 5)
    expected = run_setting(lmms_model.model, lmms_model.processor, records, Setting("as loaded", {}), 3, 3)["predictions"]
    assert answers == expected and len(answers) == 5
    out = tmp_path / "next-eval.json"
    assert cli_main(["eval", "--model", str(next_checkpoint), "--dataset", str(task / "test.jsonl"), "--limit", "4",
                     "--settings", "full", "ivtp@40", "visionzip@30", "--batch-size", "2", "--max-new-tokens", "2",
                     "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["full"]["visual_tokens"] == 192  # 192 px: the 2 x 2 grid at full size, every packed token
    assert settings["ivtp@40"]["visual_tokens"] == 40 and settings["visionzip@30"]["visual_tokens"] == 30
    assert settings["visionzip@30"]["tflops"] < settings["full"]["tflops"]


def test_show_draws_every_crop_of_a_llava_next_image(next_checkpoint, tmp_path):
    """`llava-ivtp show` on a LLaVA-NeXT checkpoint: each panel is every crop the tower saw (the base crop, then the
    tiles stitched into their grid), the patches of the kept tokens clear and the rest greyed; newlines are counted."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_ivtp.evaluation.show import crop_panel, pruning_of

    picture = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "next-fig5.png"
    assert cli_main(["show", "--model", str(next_checkpoint), "--image", str(picture), "--question", "What is it?",
                     "--settings", "ivtp@40", "topk@20", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    model = AutoModelForImageTextToText.from_pretrained(next_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(next_checkpoint, trust_remote_code=True)
    result = pruning_of(model, processor, Image.open(picture).convert("RGB"), "What is it?")
    layout = model.image_layouts([result["image_sizes"]])[0]
    assert result["image_sizes"] == [40, 36] and result["crops"].shape == (layout.crops, 24, 24, 3)
    clear, _ = crop_panel(model, result["crops"], result["image_sizes"], None)
    grey, _ = crop_panel(model, result["crops"], result["image_sizes"], [])
    for title, kept in result["stages"]:
        panel, newlines = crop_panel(model, result["crops"], result["image_sizes"], kept)
        sources = [layout.source[index] for index in kept if index >= 0]
        assert newlines == sum(source < 0 for source in sources), title
        # 4 px blocks: a tile's patch is one (2 x 2 tiles of 24 px stitched: 48 px high), a base crop's patch four
        # (the base crop is scaled to the stitched grid's height); blocks greying leaves as they are (the white gap,
        # the letterbox padding's flat colour where it is the grey) are left out
        blocks = [(y, x) for y in range(0, clear.shape[0], 4) for x in range(0, clear.shape[1], 4)
                  if not np.array_equal(clear[y : y + 4, x : x + 4], grey[y : y + 4, x : x + 4])]
        untouched = sum(np.array_equal(panel[y : y + 4, x : x + 4], clear[y : y + 4, x : x + 4]) for y, x in blocks)
        base = sum(0 <= source < 36 for source in sources)
        tiles = sum(source >= 36 for source in sources)
        assert untouched == 4 * base + tiles, title
