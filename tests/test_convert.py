"""`llava-ivtp convert` on tiny checkpoints written here in llava-hf's and open_clip's on-disk formats, the model
card it writes, its refusals, and `--push-to-hub` against a recording stand-in for `HfApi`."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hub_cards import render_model_card
from llava_ivtp.cli import main as cli_main
from llava_ivtp.conversion.convert import VISION_EMBEDDINGS, ConversionError, convert, push_to_hub
from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration, LlavaIvtpProcessor
from modeling_llava_ivtp.guidance_ivtp import clip_token_features
from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE
from tiny_models import IMAGE_TOKEN_ID, TINY_SCHEDULE, RecordingHubApi, make_images, tiny_config_dict, write_llava_hf, write_open_clip


ROOT = Path(__file__).resolve().parents[1]
PRESET_7B = str(ROOT / "configuration" / "llava-1.5-7b-ivtp.json")
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    llava = write_llava_hf(root / "llava-hf")
    clip = write_open_clip(root / "clip", llava)
    preset = root / "tiny-preset.json"
    preset.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict(), "tau": 0.0}))
    return {"root": root, "llava": llava, "clip": clip, "preset": str(preset)}


def convert_args(sources, out, **overrides):
    args = {
        "--llava": str(sources["root"] / "llava-hf"), "--clip": f"local-dir:{sources['root'] / 'clip'}",
        "--preset": sources["preset"], "--out": str(out), "--clip-tokenizer": "ViT-L-14-336",
        "--base-model": "llava-hf/llava-1.5-7b-hf",
    }
    args.update(overrides)
    return ["convert"] + [item for pair in args.items() for item in pair if item is not None]


@pytest.fixture(scope="module")
def converted(sources):
    out = sources["root"] / "out"
    assert cli_main(convert_args(sources, out)) == 0
    return out


def test_converted_checkpoint_holds_every_llava_tensor_and_the_clip_text_tower(sources, converted):
    files = set(p.name for p in converted.iterdir())
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md", "modeling_llava_ivtp.py", "configuration_llava_ivtp.py", "processing_llava_ivtp.py"} <= files
    model, info = LlavaIvtpForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not any(info.values()), info
    config = model.config
    assert config.schedule == TINY_SCHEDULE and config.tau == 0.0 and config.group_size == 2
    assert config.clip_text_encoder == {
        "model_name": "ViT-L-14-336", "embed_dim": 16, "quick_gelu": True,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 4.0},
    }
    # every LLaVA tensor is the llava-hf checkpoint's (lm_head included)
    source = sources["llava"].state_dict()
    converted_state = model.state_dict()
    llava_keys = [k for k in converted_state if not k.startswith("clip_")]
    assert sorted(llava_keys) == sorted(source)
    for key in llava_keys:
        assert torch.equal(converted_state[key], source[key]), key
    # the CLIP text tower computes what open_clip's own model computes (weights, activation, widths all carried over)
    clip = sources["clip"]
    ids = torch.tensor([[49406, 320, 1929, 539, 49407] + [0] * 72])
    with torch.no_grad():
        ours = clip_token_features(model.clip_text_model, ids)[:, 4]
        theirs = clip.encode_text(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.clip_visual_projection.weight, clip.visual.proj.detach().t())


def test_converted_processor_and_generation(converted):
    processor = LlavaIvtpProcessor.from_pretrained(converted)
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE and processor.clip_model_name == "ViT-L-14-336"
    model = LlavaIvtpForConditionalGeneration.from_pretrained(converted).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the dog?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    assert inputs["instruction_mask"].any()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID],
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


def test_model_card_written_by_the_converter(converted):
    card = ModelCard.load(converted / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert data["license"] == "llama2"  # read from the base checkpoint's card
    assert "custom_code" in data["tags"]
    assert "trust_remote_code=True" in card.text and 'revision = "' in card.text
    for kept in TINY_SCHEDULE["vision"] + TINY_SCHEDULE["llm"]:
        assert f"| {kept} |" in card.text


def test_model_card_renders_the_7b_preset():
    config = IvtpConfig.from_json_file(PRESET_7B)
    card = render_model_card(config, base_model="llava-hf/llava-1.5-7b-hf", license="llama2",
                             clip_source="ViT-L-14-336:openai", repo_id="me/llava-1.5-7b-ivtp", revision="0" * 40)
    reparsed = ModelCard(str(card))  # metadata parses back from the rendered text
    assert reparsed.data.to_dict() == {
        "base_model": "llava-hf/llava-1.5-7b-hf", "library_name": "transformers", "license": "llama2",
        "pipeline_tag": "image-text-to-text", "tags": ["llava", "ivtp", "token-pruning", "image-text-to-text", "custom_code"],
    }
    text = card.text
    assert '"me/llava-1.5-7b-ivtp", "' + "0" * 40 + '"' in text
    assert "| 1: vision tower (attention rollout) | 0-2 | 472 |" in text
    assert "| 2: LLM (instruction-guided) | 9-11 | 64 |" in text
    assert "**the paper's figures**" in text and "8.228" in text and "15.364" in text
    # the analytic figure for this checkpoint is computed, not copied from the paper
    assert "Computed for this checkpoint's shapes" in text and "15.364 TFLOPs for stock LLaVA (53.1% of stock)" in text
    with pytest.raises(ValueError, match="license"):
        render_model_card(config, base_model="a/b", license="", clip_source="x")


def test_converter_refuses_another_clip(sources, tmp_path):
    write_open_clip(tmp_path / "other-clip", None, seed=5)
    with pytest.raises(ConversionError, match=r"is not the CLIP of --llava .*\n.*class_embedding differs"):
        convert(str(sources["root"] / "llava-hf"), f"local-dir:{tmp_path / 'other-clip'}", sources["preset"],
                tmp_path / "out", clip_tokenizer="ViT-L-14-336", base_model="a/b")


def test_converter_refuses_a_preset_for_another_architecture(sources, tmp_path):
    with pytest.raises(ConversionError, match=r"made for another architecture(.|\n)*text_config.hidden_size: preset 4096, checkpoint 32"):
        convert(str(sources["root"] / "llava-hf"), f"local-dir:{sources['root'] / 'clip'}", PRESET_7B,
                tmp_path / "out", clip_tokenizer="ViT-L-14-336", base_model="a/b")
    not_ivtp = tmp_path / "llava.json"
    not_ivtp.write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConversionError, match="--preset .*not an IVTP preset"):
        convert(str(sources["root"] / "llava-hf"), "ViT-L-14-336:openai", str(not_ivtp), tmp_path / "out")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--clip": "ViT-L-14-336:/no/such/open_clip_pytorch_model.bin"}, "neither an existing checkpoint file nor a pretrained tag"),
        ({"--clip": "ViT-L-14-336"}, r"give the weights as ViT-L-14-336:TAG \(openai\)"),
        ({"--clip": "ViT-Nope:openai"}, "not a built-in open_clip architecture"),
        ({"--clip": "local-dir:/no/such/dir"}, "needs open_clip_config.json and weights"),
        ({"--preset": "/no/such/preset.json"}, "--preset /no/such/preset.json: no such file"),
        ({"--llava": "/no/such/llava"}, "no such folder"),
        ({"--llava": "nobody/no-such-llava"}, "--llava nobody/no-such-llava: cannot read its config"),  # offline
        ({"--clip-tokenizer": "ViT-B-16-SigLIP"}, "Hugging Face / SigLIP tokenizer"),
        ({"--dtype": "int8"}, "--dtype int8: expected one of"),
    ],
)
def test_converter_refuses_bad_arguments(sources, tmp_path, capsys, change, message):
    assert cli_main(convert_args(sources, tmp_path / "out", **change)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def copy_without(source: Path, folder: Path, name: str) -> Path:
    shutil.copytree(source, folder)
    (folder / name).unlink()
    return folder


def test_converter_refuses_missing_files_and_metadata(sources, tmp_path):
    clip = f"local-dir:{sources['root'] / 'clip'}"
    broken = copy_without(sources["root"] / "llava-hf", tmp_path / "llava-no-weights", "model.safetensors")
    with pytest.raises(ConversionError, match="not a llava-hf checkpoint folder, missing model.safetensors"):
        convert(str(broken), clip, sources["preset"], tmp_path / "a", clip_tokenizer="ViT-L-14-336", base_model="a/b")
    no_card = copy_without(sources["root"] / "llava-hf", tmp_path / "llava-no-card", "README.md")
    with pytest.raises(ConversionError, match="--license"):
        convert(str(no_card), clip, sources["preset"], tmp_path / "b", clip_tokenizer="ViT-L-14-336", base_model="a/b")
    with pytest.raises(ConversionError, match="--base-model"):
        convert(str(no_card), clip, sources["preset"], tmp_path / "c",
                clip_tokenizer="ViT-L-14-336")
    with pytest.raises(ConversionError, match="--clip-tokenizer"):
        convert(str(no_card), clip, sources["preset"], tmp_path / "d")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--out .*not empty"):
        convert(str(no_card), clip, sources["preset"], occupied)


def test_push_to_hub_uploads_and_pins_the_card(converted, tmp_path):
    folder = tmp_path / "push"
    shutil.copytree(converted, folder)
    api = RecordingHubApi()
    commit = push_to_hub(folder, "me/tiny-ivtp", private=True, api=api)
    assert commit.oid == "2" * 40
    (create, repo, kwargs), upload, card_upload = api.calls
    assert (create, repo, kwargs["private"], kwargs["exist_ok"]) == ("create_repo", "me/tiny-ivtp", True, True)
    assert upload[0] == "upload_folder" and {"model.safetensors", "README.md", "config.json"} <= set(upload[2])
    assert card_upload[:3] == ("upload_file", "me/tiny-ivtp", "README.md")
    assert f'repo, revision = "me/tiny-ivtp", "{"1" * 40}"' in card_upload[3]
    assert ModelCard(card_upload[3]).data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert "open_clip `local-dir:" in card_upload[3]  # provenance carried over from the converter's card


def test_real_vit_l_14_336_maps_onto_the_7b_preset():
    """The real CLIP's architecture (on the meta device: shapes, no weights, nothing downloaded) gives the text tower
    spec of `clip_text_encoder_spec`, loads into our tower key for key, and its vision embeddings have the shapes of
    the 7B preset's vision tower."""
    import open_clip
    from transformers import CLIPVisionModel

    from llava_ivtp.conversion.convert import clip_text_spec
    from modeling_llava_ivtp.guidance_ivtp import build_clip_text_tower, clip_text_encoder_spec

    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True, device="meta")
    spec = clip_text_spec(clip, "ViT-L-14-336")
    assert spec == {**clip_text_encoder_spec("ViT-L-14-336"), "text_cfg": {**clip_text_encoder_spec("ViT-L-14-336")["text_cfg"], "mlp_ratio": 4.0}}
    config = IvtpConfig.from_json_file(PRESET_7B)
    with torch.device("meta"):
        tower = build_clip_text_tower(spec)
        vision = CLIPVisionModel(config.vision_config)
    clip_state = clip.state_dict()
    assert {k: v.shape for k, v in tower.state_dict().items()} == {k: clip_state[k].shape for k in tower.state_dict()}
    ours, theirs = dict(vision.named_parameters()), dict(clip.visual.named_parameters())
    for hf_name, clip_name in VISION_EMBEDDINGS:
        assert ours[hf_name].shape == theirs[clip_name].shape, hf_name
    assert clip.visual.proj.shape == (config.vision_config.hidden_size, spec["embed_dim"])


def test_converts_a_llava_next_checkpoint_with_its_preset(tmp_path, capsys):
    """A stock LLaVA-NeXT checkpoint in llava-hf's format + its CLIP + a NeXT preset -> a `LlavaNextIvtp` checkpoint:
    every LLaVA-NeXT tensor (`image_newline` included) unchanged, the NeXT processor with the guidance inputs, the
    NeXT card; a LLaVA-1.5 preset for it, or a NeXT preset for a LLaVA-1.5 checkpoint, is refused naming both."""
    from transformers import AutoProcessor

    from modeling_llava_ivtp import IvtpNextConfig, LlavaNextIvtpForConditionalGeneration, LlavaNextIvtpProcessor
    from tiny_models import make_next_batch, tiny_next_config_dict, write_llava_next_hf

    llava = write_llava_next_hf(tmp_path / "llava-next-hf")
    write_open_clip(tmp_path / "clip", llava)
    preset = tmp_path / "tiny-next-preset.json"
    IvtpNextConfig(**tiny_next_config_dict(pruning_method="ivtp", pruning_options={"visual_tokens": 32})).to_json_file(preset)
    args = ["convert", "--llava", str(tmp_path / "llava-next-hf"), "--clip", f"local-dir:{tmp_path / 'clip'}",
            "--preset", str(preset), "--out", str(tmp_path / "out"), "--clip-tokenizer", "ViT-L-14-336",
            "--base-model", "llava-hf/llava-v1.6-vicuna-7b-hf"]
    assert cli_main(args) == 0
    out = tmp_path / "out"
    model, info = LlavaNextIvtpForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.schedule == IvtpNextConfig(**tiny_next_config_dict(
        pruning_method="ivtp", pruning_options={"visual_tokens": 32})).schedule
    source = llava.state_dict()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_")}
    assert sorted(state) == sorted(source) and "model.image_newline" in state
    assert all(torch.equal(state[key], source[key]) for key in state)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == LlavaNextIvtpProcessor.__name__
    card = (out / "README.md").read_text()
    assert "LLaVA-NeXT" in card and "each crop" in card and "each image" in card and "license: llama2" in card
    with torch.no_grad():
        outputs = model(**make_next_batch(model.config))
    assert outputs.llm_keep_indices  # stage 2 ran
    one_five = tmp_path / "tiny-preset.json"
    one_five.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict()}))
    assert cli_main(args[:6] + [str(one_five), "--out", str(tmp_path / "out2")] + args[9:]) == 2
    assert "is a 'llava_ivtp' preset; --llava" in capsys.readouterr().err
    write_llava_hf(tmp_path / "llava-hf")
    assert cli_main(["convert", "--llava", str(tmp_path / "llava-hf")] + args[3:8] + [str(tmp_path / "out3")] + args[9:]) == 2
    error = capsys.readouterr().err
    assert "is a 'llava_next_ivtp' preset" in error and "LLaVA-1.5 checkpoint" in error
