"""Placing the model with accelerate's device maps: an explicit multi-entry map (some decoder layers, the stage-2
ones included, offloaded to disk and loaded by accelerate's hooks at use) and "auto"; forward and generate run
through it and match the model in one piece."""

import pytest
import torch

from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration
from tiny_models import IMAGE_TOKEN_ID, TINY_CLIP_TEXT, make_images, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_map")
    model = tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)
    model.save_pretrained(folder / "model")
    inputs = tiny_processor()(
        images=make_images(2), text=["USER: <image>\nWhat color is the dog? ASSISTANT:", "USER: <image>\nIs it? ASSISTANT:"],
        padding=True, return_tensors="pt",
    )
    return folder, model, inputs


def check_same(model, placed, inputs):
    with torch.no_grad():
        torch.testing.assert_close(placed(**inputs, use_cache=False).logits, model(**inputs, use_cache=False).logits)
    settings = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    assert torch.equal(placed.generate(**inputs, **settings), model.generate(**inputs, **settings))


def test_explicit_multi_entry_device_map_with_disk_offload(saved):
    folder, model, inputs = saved
    offloaded = (2, 3, 6)  # layers 2-3 are the second stage-2 pruning group: scoring calls their q/k projections
    device_map = {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
        **{f"model.language_model.layers.{i}": "disk" if i in offloaded else "cpu" for i in range(8)},
        "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
        "clip_text_model": "cpu", "clip_visual_projection": "cpu",
    }
    placed = LlavaIvtpForConditionalGeneration.from_pretrained(
        folder / "model", device_map=device_map, offload_folder=folder / "offload"
    ).eval()
    assert placed.hf_device_map == device_map
    assert placed.model.language_model.layers[2].self_attn.q_proj.weight.device.type == "meta"  # on disk until used
    check_same(model, placed, inputs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only placement")
def test_device_map_auto_on_cpu(saved):
    folder, model, inputs = saved
    placed = LlavaIvtpForConditionalGeneration.from_pretrained(folder / "model", device_map="auto").eval()
    # one device here (CPU): accelerate places everything on it (no hooks needed, so no `hf_device_map`)
    assert {parameter.device.type for parameter in placed.parameters()} == {"cpu"}
    check_same(model, placed, inputs)
