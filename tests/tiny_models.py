"""Tiny LLaVA-IVTP models and inputs built from configs, offline, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration
from modeling_llava_ivtp.configuration_llava_ivtp import stock_llava_fields
from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE


IMAGE_TOKEN_ID = 90
PAD_TOKEN_ID = 0
# 24 px images of 4 px patches: 36 patches. 7 vision layers, feature layer -2: 6 layers run, 3 groups of 2.
TINY_SCHEDULE = {"vision": [24, 16, 12], "llm": [8, 5]}


def tiny_config_dict(schedule=TINY_SCHEDULE, group_size: int = 2, **overrides) -> dict:
    vision = CLIPVisionConfig(
        image_size=24, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
        num_attention_heads=4, projection_dim=16,
    ).to_dict()
    text = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_TOKEN_ID, bos_token_id=1,
        eos_token_id=2,
    ).to_dict()
    config = dict(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, image_seq_length=36,
        schedule=schedule, group_size=group_size,
    )
    config.update(overrides)
    return config


def tiny_config(schedule=TINY_SCHEDULE, group_size: int = 2, attn_implementation: str = "sdpa", **overrides):
    config = IvtpConfig(**tiny_config_dict(schedule, group_size, **overrides))
    config._attn_implementation = attn_implementation
    return config


def tiny_model(schedule=TINY_SCHEDULE, group_size: int = 2, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(schedule, group_size, attn_implementation, **overrides)
    return LlavaIvtpForConditionalGeneration(config).eval()


def sharpen_attention(model, factor: float = 10.0):
    """Scale every query and key projection (vision tower, decoder, CLIP text tower) by `factor`, in place.

    At the tiny models' random init (std 0.02) every attention is close to uniform, so rollout carries no
    information and the scores reduce to value norms: a wrong key or query in the scoring would go unnoticed.
    With sharper attention the kept tokens depend on the attention probabilities.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(factor)
    return model


def stock_twin(model: LlavaIvtpForConditionalGeneration, attn_implementation: str = "sdpa"):
    """A stock `LlavaForConditionalGeneration` with the same weights."""
    config = LlavaConfig(**stock_llava_fields(model.config.to_dict()))
    config._attn_implementation = attn_implementation
    stock = LlavaForConditionalGeneration(config).eval()
    llava_weights = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_")}  # IVTP's CLIP parts
    missing, unexpected = stock.load_state_dict(llava_weights, strict=True)
    assert not missing and not unexpected
    return stock


def make_prompt(num_prefix: int, num_suffix: int, num_patches: int = 36, seed: int = 0) -> list[int]:
    """BOS, `num_prefix` text tokens, the image placeholders, `num_suffix` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 80, (num_prefix,), generator=generator).tolist()
    suffix = torch.randint(3, 80, (num_suffix,), generator=generator).tolist()
    return [1] + prefix + [IMAGE_TOKEN_ID] * num_patches + suffix


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def make_pixels(num_images: int, seed: int = 0, image_size: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, image_size, image_size, generator=generator)


def make_batch(lengths=((2, 5), (4, 9)), seed: int = 0):
    """A left-padded batch, one image per sample."""
    prompts = [make_prompt(prefix, suffix, seed=seed + row) for row, (prefix, suffix) in enumerate(lengths)]
    input_ids, attention_mask = left_pad(prompts)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": make_pixels(len(prompts), seed)}


TOKENIZER_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'-:\n"


def tiny_tokenizer():
    """A Llama-style (Metaspace, BPE, BOS added) tokenizer over the tiny vocabulary, built offline: one token per
    character, "\u2581" for a space; ids 0-2 are pad/BOS/EOS, `IMAGE_TOKEN_ID` is `<image>`, unused ids `<unusedN>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2, "\u2581": 3}
    for offset, character in enumerate(TOKENIZER_CHARACTERS):
        vocab[character] = 4 + offset
    vocab["<image>"] = IMAGE_TOKEN_ID
    for index in range(99):
        if index not in vocab.values():
            vocab[f"<unused{index}>"] = index
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unused98>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unused98>",
        additional_special_tokens=["<image>"], padding_side="left",
    )


# A narrow open_clip text tower with CLIP's real tokenizer vocabulary and context (ViT-L-14-336's tokenizer).
TINY_CLIP_TEXT = {
    "model_name": "ViT-L-14-336", "embed_dim": 16, "quick_gelu": True,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})


def tiny_processor(**overrides):
    """`LlavaIvtpProcessor` for the tiny models: 24 px images, 4 px patches (36 placeholders), the tiny tokenizer."""
    from modeling_llava_ivtp import LlavaIvtpProcessor

    settings = dict(
        patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, clip_model_name="ViT-L-14-336",
    )
    settings.update(overrides)
    return LlavaIvtpProcessor(tiny_image_processor(), tiny_tokenizer(), **settings)


def tiny_next_processor(**overrides):
    """`LlavaNextIvtpProcessor` for the tiny NeXT models: 24 px crops on the tiny grid pinpoints, 4 px patches."""
    from transformers import LlavaNextImageProcessor

    from modeling_llava_ivtp import LlavaNextIvtpProcessor

    settings = dict(
        patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, clip_model_name="ViT-L-14-336",
    )
    settings.update(overrides)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                              image_grid_pinpoints=TINY_GRID_PINPOINTS)
    return LlavaNextIvtpProcessor(image_processor, tiny_tokenizer(), **settings)


def make_images(count: int, seed: int = 0):
    """PIL images of random pixels, different sizes (the image processor resizes and crops them)."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    return [
        Image.fromarray(generator.integers(0, 256, (30 + 4 * index, 40, 3), dtype=np.uint8)) for index in range(count)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Files on disk in other projects' formats (for the converter, the README's snippets and the fine-tuning examples)
# ----------------------------------------------------------------------------------------------------------------
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 24, "patch_size": 4, "width": 32, "layers": 7, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def llava_hf_state(model) -> dict:
    """`model`'s weights under the keys llava-hf checkpoints store on disk (LLaVA-1.5 and LLaVA-NeXT alike):
    `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`, and the projector and
    NeXT's `image_newline` at the top."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("lm_head."):
            key = "language_model." + key
        elif key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            key = "vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key.startswith(("model.multi_modal_projector.", "model.image_newline")):
            key = key[len("model."):]
        state[key] = tensor.contiguous()
    return state


def write_llava_hf(folder, seed: int = 0) -> LlavaForConditionalGeneration:
    """A stock tiny LLaVA saved by transformers (llava-hf layout) with its processor and a card with a license."""
    from transformers import LlavaProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    settings = {k: v for k, v in tiny_config_dict().items() if k not in ("schedule", "group_size")}
    model = LlavaForConditionalGeneration(LlavaConfig(**settings)).eval()
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # random weights: never answer with <image>
    model.save_pretrained(folder)
    LlavaProcessor(
        image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer(), patch_size=4,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: llama2\n---\n# tiny llava\n")
    return model


def write_llava_next_hf(folder, seed: int = 0):
    """A stock tiny LLaVA-NeXT saved by transformers (llava-hf layout) with its `LlavaNextProcessor` and a card with a
    license: `write_llava_hf`'s NeXT twin."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    from modeling_llava_ivtp import IvtpNextConfig
    from modeling_llava_ivtp.configuration_llava_ivtp import stock_llava_fields

    folder = Path(folder)
    torch.manual_seed(seed)
    config = LlavaNextConfig(**stock_llava_fields(IvtpNextConfig(**tiny_next_config_dict()).to_dict()))
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]
    model.save_pretrained(folder)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                              image_grid_pinpoints=TINY_GRID_PINPOINTS)
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: llama2\n---\n# tiny llava-next\n")
    return model


def write_open_clip(folder, llava: LlavaForConditionalGeneration | None, seed: int = 1):
    """A tiny OpenAI-style open_clip CLIP in open_clip's folder format; with `llava`, its vision embeddings are the
    llava vision tower's (the same CLIP), otherwise random (another CLIP)."""
    import open_clip
    from safetensors.torch import save_file

    from llava_ivtp.conversion.convert import VISION_EMBEDDINGS

    folder = Path(folder)
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**TINY_CLIP_CFG).eval()
    if llava is not None:
        ours = dict(llava.model.vision_tower.named_parameters())
        theirs = dict(clip.visual.named_parameters())
        with torch.no_grad():
            for hf_name, clip_name in VISION_EMBEDDINGS:
                theirs[clip_name].copy_(ours[hf_name])
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")
    return clip


COLORS = {"Red.": (220, 30, 30), "Blue.": (30, 30, 220), "Green.": (30, 200, 30), "Gray.": (128, 128, 128)}


def write_color_dataset(folder, count: int = 8):
    """`folder/train.jsonl` in LLaVA's conversation format: questions about solid-colour images in
    `folder/images/` (the last conversation has two turns). Returns the file's path."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        answer = list(COLORS)[index % 4]
        pixels = np.zeros((24 + 2 * index, 24, 3), dtype=np.uint8) + np.array(COLORS[answer], dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        turns = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": answer}]
        if index == count - 1:
            turns += [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]
        lines.append(json.dumps({"image": f"images/{index}.png", "conversations": turns}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi` (no network): records calls, returns commit infos."""

    def __init__(self, *args, **kwargs):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("CommitInfo", (), {"oid": "1" * 40})()

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        self.calls.append(("upload_file", repo_id, path_in_repo, Path(path_or_fileobj).read_text()))
        return type("CommitInfo", (), {"oid": "2" * 40})()


# --- LLaVA-NeXT (AnyRes): the tiny tower's 24 px crops, tile grids of 1x2, 2x1 and 2x2 ------------------------------
TINY_GRID_PINPOINTS = [[24, 48], [48, 24], [48, 48]]


def tiny_next_config_dict(**overrides) -> dict:
    """The tiny LLaVA's settings as a LLaVA-NeXT: the same towers, a grid of tiles per image."""
    config = {k: v for k, v in tiny_config_dict(schedule=None).items() if k != "image_seq_length"}
    config.update(image_grid_pinpoints=TINY_GRID_PINPOINTS, pruning_method=None)
    config.update(overrides)
    return config


def tiny_next_model(attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    from modeling_llava_ivtp import IvtpNextConfig, LlavaNextIvtpForConditionalGeneration

    torch.manual_seed(seed)
    config = IvtpNextConfig(**tiny_next_config_dict(**overrides))
    config._attn_implementation = attn_implementation
    return LlavaNextIvtpForConditionalGeneration(config).eval()


def next_stock_twin(model, attn_implementation: str = "sdpa"):
    """A stock `LlavaNextForConditionalGeneration` with the same weights."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(**stock_llava_fields(model.config.to_dict()))
    config._attn_implementation = attn_implementation
    stock = LlavaNextForConditionalGeneration(config).eval()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_")}
    missing, unexpected = stock.load_state_dict(weights, strict=True)
    assert not missing and not unexpected
    return stock


def next_image_tokens(config, image_sizes) -> list[int]:
    """Placeholders per image, as `LlavaNextProcessor` counts them: the base crop's patches, then the tiles' grid
    unpadded to the image's aspect ratio with one newline per row."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = config.vision_config.image_size // config.vision_config.patch_size
    counts = []
    for size in image_sizes:
        rows, columns = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
        grid = unpad_image(torch.zeros(1, rows * side, columns * side), list(size))
        counts.append(side * side + grid.shape[1] * (grid.shape[2] + 1))
    return counts


def make_next_batch(config, image_sizes=((20, 40), (40, 36)), lengths=((2, 5), (4, 9)), seed: int = 0):
    """A left-padded batch, one image per sample, of the given sizes `(height, width)`: different aspect ratios give
    different crop and placeholder counts."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = next_image_tokens(config, image_sizes)
    prompts = [make_prompt(prefix, suffix, num_patches=count, seed=seed + row)
               for row, ((prefix, suffix), count) in enumerate(zip(lengths, counts))]
    input_ids, attention_mask = left_pad(prompts)
    crops = [image_size_to_num_patches(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
             for size in image_sizes]
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(prompts), max(crops), 3, 24, 24)
    for row, count in enumerate(crops):
        pixel_values[row, :count] = torch.randn(count, 3, 24, 24, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": torch.tensor(image_sizes)}
