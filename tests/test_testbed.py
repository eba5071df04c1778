"""The accuracy testbed's synthetic task: deterministic, well-posed questions, labels that match the scene."""

import numpy as np
import pytest
import torch

from modeling_llava_ivtp import testbed


def test_examples_are_deterministic_by_split_and_index():
    first, again = testbed.example("test", 7), testbed.example("test", 7)
    assert first.question == again.question and first.answer == again.answer and first.objects == again.objects
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    other_split = testbed.example("validation", 7)
    assert other_split.objects != first.objects


def test_geometry_has_144_patches():
    scene = testbed.example("train", 0)
    assert scene.image.size == (192, 192) and testbed.GRID**2 == 144
    assert scene.patch_colors.shape == scene.patch_shapes.shape == (12, 12)


@pytest.mark.parametrize("index", range(60))
def test_every_answer_follows_from_the_scene(index):
    scene = testbed.example("train", index)
    objects, answer = scene.objects, scene.answer
    assert testbed.MIN_OBJECTS <= len(objects) <= testbed.MAX_OBJECTS and answer in testbed.ANSWERS
    words = scene.question.rstrip("?").split()
    if scene.kind == "color":
        matches = [o for o in objects if o.shape == words[-1]]
        assert len(matches) == 1 and matches[0].color == answer
    elif scene.kind == "shape":
        matches = [o for o in objects if o.color == words[-2]]
        assert len(matches) == 1 and matches[0].shape == answer
    elif scene.kind == "where":
        matches = [o for o in objects if o.shape == words[-1]]
        assert len(matches) == 1 and matches[0].place == answer and matches[0].clearly_placed
    elif scene.kind == "count":
        assert testbed.COUNTS[sum(o.color == words[2] for o in objects)] == answer
    else:
        color, shape = words[-2], words[-1]
        present = any(o.color == color and o.shape == shape for o in objects)
        assert answer == ("yes" if present else "no")
        assert {color, shape} <= {o.color for o in objects} | {o.shape for o in objects}  # "no" has distractors


def test_patch_labels_mark_the_objects_patches():
    scene = testbed.example("train", 3)
    for obj in scene.objects:
        row, column = obj.y // testbed.PATCH_SIZE, obj.x // testbed.PATCH_SIZE
        assert scene.patch_colors[row, column] == list(testbed.COLORS).index(obj.color) + 1
        assert scene.patch_shapes[row, column] == testbed.SHAPES.index(obj.shape) + 1
    assert (scene.patch_colors == 0).sum() > 72  # mostly background


def test_bad_arguments():
    with pytest.raises(ValueError, match="`split`"):
        testbed.example("dev", 0)
    with pytest.raises(ValueError, match="`kind`"):
        testbed.example("train", 0, kind="size")
    with pytest.raises(ValueError, match="`index`"):
        testbed.example("train", -1)


def test_training_pipeline_runs_end_to_end_at_toy_scale(tmp_path):
    """The retraining command's stages on 48 scenes and 2 steps each: data, CLIP, LLaVA, the saved checkpoint
    (which loads through the Auto classes and answers). The shipped model's accuracy is tested elsewhere."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_llava_ivtp import testbed_train

    work, lines = tmp_path / "work", []
    clip = testbed_train.train_clip(work, 48, 16, steps=2, batch_size=8, lr=1e-3, seed=0, log=lines.append)
    assert 0.0 <= clip["patch_color_accuracy"] <= 1.0 and (work / "clip.pt").is_file()
    llava = testbed_train.train_llava(work, 48, 16, steps=2, batch_size=8, lr=1e-3, seed=0, caption_share=0.25,
                                      log=lines.append)
    assert set(llava) >= {"accuracy", "accuracy_color", "train_seconds"}
    out = testbed_train.save_checkpoint(work, tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    scene = testbed.example("test", 0)
    inputs = processor(images=[scene.image], text=[f"USER: <image>\n{scene.question} ASSISTANT:"], return_tensors="pt")
    generated = model.generate(**inputs.to(dtype=model.dtype), max_new_tokens=2)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert model.config.num_patches == 144 and model.dtype == torch.float16
    with pytest.raises(ValueError, match="--out"):
        testbed_train.save_checkpoint(work, out)  # never over an existing checkpoint without --overwrite
