"""The accuracy testbed's synthetic task: deterministic, well-posed questions, labels that match the scene."""

import json

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
    assert testbed.MIN_OBJECTS <= len(scene.objects) <= testbed.MAX_OBJECTS
    check_answer(scene.question, scene.answer, scene.kind, scene.objects)


@pytest.mark.parametrize("index", range(20))
def test_training_turns_ask_about_the_same_scene(index):
    scene = testbed.example("train", index)
    turns = testbed.training_turns("train", index, 8)
    assert turns == testbed.training_turns("train", index, 8)  # deterministic
    assert turns[0] == (scene.question, scene.answer, scene.kind) and 2 <= len(turns) <= 8
    assert len({question for question, _, _ in turns}) == len(turns)
    for question, answer, kind in turns:
        check_answer(question, answer, kind, scene.objects)


def check_answer(question, answer, kind, objects):
    """The answer of `question` (of `kind`) follows from `objects`."""
    assert answer in testbed.ANSWERS
    words = question.rstrip("?").split()
    if kind == "color":
        matches = [o for o in objects if o.shape == words[-1]]
        assert len(matches) == 1 and matches[0].color == answer
    elif kind == "shape":
        matches = [o for o in objects if o.color == words[-2]]
        assert len(matches) == 1 and matches[0].shape == answer
    elif kind == "where":
        matches = [o for o in objects if o.shape == words[-1]]
        assert len(matches) == 1 and matches[0].place == answer and matches[0].clearly_placed
    elif kind == "count":
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

    work, out = tmp_path / "work", tmp_path / "model"
    assert testbed_train.main(["all", "--work", str(work), "--out", str(out), "--train", "48", "--validation", "16",
                               "--clip-steps", "2", "--llava-steps", "2"]) == 0
    clip, llava = (json.loads((work / f"{name}-metrics.json").read_text()) for name in ("clip", "llava"))
    assert 0.0 <= clip["patch_color_accuracy"] <= 1.0 and (work / "clip.pt").is_file()
    assert set(llava) >= {"accuracy", "accuracy_color", "train_seconds"}
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    scene = testbed.example("test", 0)
    inputs = processor(images=[scene.image], text=[f"USER: <image>\n{scene.question} ASSISTANT:"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert model.config.num_patches == 144 and model.dtype == torch.float32  # stored in float16, loaded in float32
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(name).dtype for name in stored.keys()} == {torch.float16}
    with pytest.raises(ValueError, match="--out"):
        testbed_train.save_checkpoint(work, out)  # never over an existing checkpoint without --overwrite


def test_conversations_label_only_the_answers():
    from modeling_llava_ivtp import testbed_train

    scenes = testbed.examples("train", 40)
    data = {"question": [s.question for s in scenes], "answer": [s.answer for s in scenes],
            "caption": [s.caption for s in scenes]}
    tokenizer = testbed_train.train_tokenizer(testbed_train.tokenizer_corpus(data))
    encoder = testbed_train.TurnEncoder(tokenizer, num_patches=144)
    turns = [("What color is the star?", "red"), ("Where is the star?", "left")]
    ids, labels = encoder([turns, turns[:1]])
    single, single_labels = testbed_train.encode_examples(tokenizer, ["What color is the star?"], ["red"], 144)
    width = single.shape[1]
    assert torch.equal(ids[1, :width], single[0]) and torch.equal(labels[1, :width], single_labels[0])  # = eval prompt
    answered = tokenizer.convert_ids_to_tokens(ids[0][labels[0] != -100])
    assert [token.lstrip("\u2581") for token in answered] == ["red", "</s>", "left", "</s>"]
    assert (ids[0] == tokenizer.convert_tokens_to_ids("<image>")).sum() == 144


def test_export_writes_llava_conversations(tmp_path):
    from modeling_llava_ivtp import testbed_train

    listing = testbed_train.export_conversations(tmp_path, start=5, count=3, turns=4)
    records = [json.loads(line) for line in listing.read_text().splitlines()]
    assert len(records) == 3 and all((tmp_path / record["image"]).is_file() for record in records)
    first = records[0]["conversations"]
    scene = testbed.example("train", 5)
    assert first[0] == {"from": "human", "value": f"<image>\n{scene.question}"}
    assert first[1] == {"from": "gpt", "value": scene.answer}
    assert [turn["from"] for turn in first] == ["human", "gpt"] * (len(first) // 2)
    with pytest.raises(ValueError, match="--out"):
        testbed_train.export_conversations(tmp_path, start=0, count=1, turns=2)  # never over existing data


def test_llava_resumes_and_never_reuses_features_of_another_clip(tmp_path):
    from modeling_llava_ivtp import testbed_train

    quiet = dict(batch_size=4, lr=1e-3, log=lambda line: None)
    testbed_train.train_clip(tmp_path, 16, 8, steps=1, seed=0, **quiet)
    testbed_train.train_llava(tmp_path, 16, 8, steps=1, seed=0, caption_share=0.0, **quiet)
    first = torch.load(tmp_path / "llava.pt", weights_only=True)
    resumed = testbed_train.train_llava(tmp_path, 16, 8, steps=2, seed=1, caption_share=0.0, resume=True, **quiet)
    assert resumed["steps"] == 3  # counted on from the saved run, whose weights it started from
    assert any(not torch.equal(value, first[name]) for name, value in torch.load(tmp_path / "llava.pt", weights_only=True).items())
    assert len(list(tmp_path.glob("features-train-16-clip-*.pt"))) == 1  # the resumed run reused the features
    testbed_train.train_clip(tmp_path, 16, 8, steps=1, seed=1, **quiet)  # another CLIP in the same folder
    testbed_train.train_llava(tmp_path, 16, 8, steps=1, seed=0, caption_share=0.0, **quiet)
    assert len(list(tmp_path.glob("features-train-16-clip-*.pt"))) == 2
