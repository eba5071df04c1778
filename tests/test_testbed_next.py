"""The LLaVA-NeXT testbed: the high-resolution scenes of `scenes.NEXT` and the model `train next` makes from the v2
checkpoint (`llava_ivtp/testbed/train_next.py`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_ivtp.testbed import scenes
from test_testbed import check_answer

V2_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "llava-ivtp-testbed"
# the packed visual tokens of each canvas (width, height): the base crop's 144, then the tiles' patches unpadded to
# the canvas, a newline after each row (2 x 2 tiles of 12 x 12 patches for the first three, 1 x 2 and 2 x 1 after)
PACKED_TOKENS = {(384, 384): 144 + 24 * 25, (384, 288): 144 + 18 * 25, (288, 384): 144 + 24 * 19,
                 (384, 192): 144 + 12 * 25, (192, 384): 144 + 24 * 13}


@pytest.mark.parametrize("index", range(30))
def test_next_scenes_answer_their_questions_on_every_canvas(index):
    scene = scenes.example("train", index, task=scenes.NEXT)
    assert scene.image.size in scenes.NEXT.canvases and scene.task == "next"
    width, height = scene.image.size
    assert scene.patch_objects.shape == (height // scenes.PATCH_SIZE, width // scenes.PATCH_SIZE)
    small = sum(o.small for o in scene.objects)
    assert scenes.NEXT.small_objects[0] <= small <= scenes.NEXT.small_objects[1]
    assert scenes.NEXT.big_objects[0] <= len(scene.objects) - small <= scenes.NEXT.big_objects[1]
    for obj in scene.objects:
        assert obj.canvas_width == width and obj.size // 2 < obj.x < width - obj.size // 2
        assert obj.size // 2 < obj.y < height - obj.size // 2
    check_answer(scene.question, scene.answer, scene.kind, scene.objects)
    for question, answer, kind in scenes.training_turns("train", index, 12, task=scenes.NEXT):
        check_answer(question, answer, kind, scene.objects)


def test_next_scenes_use_every_canvas_and_never_a_v2_scene():
    drawn = [scenes.example("validation", index, task=scenes.NEXT) for index in range(60)]
    assert set(Counter(scene.image.size for scene in drawn)) == set(scenes.NEXT.canvases)
    assert all(scene.objects != scenes.example("validation", scene.index).objects for scene in drawn[:12])
    wide = next(scene for scene in drawn if scene.image.size[0] == 384)  # thirds of the canvas's own width
    assert all(obj.place == scenes.PLACES[min(obj.x // 128, 2)] for obj in wide.objects)


@pytest.fixture(scope="module")
def next_testbed():
    from llava_ivtp.testbed import train_next

    model, tokenizer = train_next.next_model_from(V2_CHECKPOINT)
    return model, train_next.next_processor(tokenizer)


def scene_on(canvas):
    return next(scenes.example("test", index, task=scenes.NEXT) for index in range(200)
                if scenes.example("test", index, task=scenes.NEXT).image.size == canvas)


@pytest.mark.parametrize("canvas", sorted(PACKED_TOKENS))
def test_the_training_forward_is_the_models_own(next_testbed, canvas):
    """What training feeds the LLM -- the crops' features through the projector, packed with the newline, in the
    placeholders of the prompt as evaluation writes it -- equals the checkpoint's own forward with pruning off, on
    every canvas; the placeholder count is the image's packed length."""
    from llava_ivtp.testbed import train as v2
    from llava_ivtp.testbed import train_next

    model, processor = next_testbed
    scene = scene_on(canvas)
    features = train_next.crop_features(model, processor, [np.asarray(scene.image)], dtype=torch.float32)
    width, height = canvas
    assert features[0].shape == (train_next.layout_of(model.config, (height, width)).crops, 144, 128)
    visual, lengths = train_next.packed_visual_tokens(model, features, [(height, width)])
    assert lengths == [PACKED_TOKENS[canvas]]
    ids, labels = v2.TurnEncoder(processor.tokenizer, 0).turn(scene.question, scene.answer, lengths[0])
    prompt = len(labels) - sum(label != -100 for label in labels)
    inputs = processor(images=[scene.image], text=[f"USER: <image>\n{scene.question} ASSISTANT:"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids[:prompt]
    with torch.no_grad():
        trained = v2.full_token_logits(model, torch.tensor([ids]), None, projected=visual)
        model.config.pruning_method = None
        try:
            own = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
        finally:
            model.config.pruning_method = "ivtp"
    assert own.shape == trained.shape
    torch.testing.assert_close(trained, own, atol=1e-4, rtol=1e-4)


def test_next_model_holds_the_v2_weights(next_testbed):
    from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration

    model, _ = next_testbed
    source = LlavaIvtpForConditionalGeneration.from_pretrained(V2_CHECKPOINT, dtype=torch.float32).state_dict()
    state = model.state_dict()
    assert set(state) - set(source) == {"model.image_newline"}
    assert all(torch.equal(state[name], value) for name, value in source.items())
    assert model.config.pruning_options == {"visual_tokens": 160} and model.config.max_visual_tokens == 744


def test_train_next_writes_a_checkpoint_the_auto_classes_load(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_ivtp.testbed import train as v2

    work, out = tmp_path / "work", tmp_path / "model"
    arguments = ["next", "--base", str(V2_CHECKPOINT), "--work", str(work), "--out", str(out), "--train", "6",
                 "--validation", "4", "--steps", "2", "--batch-size", "2", "--questions", "3", "--tau-questions", "3"]
    assert v2.main(arguments) == 0
    metrics = json.loads((work / "next-metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics) >= {"before", "accuracy_color", "train_seconds"}
    card = (out / "README.md").read_text()
    assert "2 steps of 2 scenes" in card and "IVTP at 160 visual tokens per image" in card
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LlavaNextIvtpForConditionalGeneration" and model.dtype == torch.float32
    assert model.config.tau == json.loads((out / "config.json").read_text())["tau"]
    scene = scene_on((384, 288))
    inputs = processor(images=[scene.image], text=[f"USER: <image>\n{scene.question} ASSISTANT:"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # never over an existing checkpoint
        v2.main(arguments)
    assert f"--out {out}: exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        v2.main(["next", "--base", str(tmp_path), "--out", str(tmp_path / "other")])
    assert "--base" in capsys.readouterr().err
