"""Train the accuracy testbed's tiny CLIP and tiny LLaVA-IVTP here, from scratch, on the synthetic task of
`scenes.py` (2 CPU cores), and write the checkpoint the repository ships. One command does it all:

    python -m llava_ivtp.testbed.train all --work testbed-work --out models/llava-ivtp-testbed

(stages `clip`, `llava`, `save` run the parts; `export` writes fine-tuning data for `examples/finetune.py`).

CLIP = the HF CLIP vision tower as LLaVA uses it (192 px, patch 16, 144 patches), the open_clip text tower that
`IvtpConfig.clip_text_encoder` describes (with open_clip's ViT-L-14-336 tokenizer, as the processor uses), and the
visual projection, trained with CLIP's symmetric contrastive loss on the scene captions. Auxiliary supervision makes
the patch features informative: linear heads on the feature layer's patch tokens predict each patch's colour class
and shape class (0 = background) from `Example.patch_colors` / `patch_shapes`, background patches weighted 0.1 in
the shape loss, the patch's own row and column (without it the object patches' features lost their place: a linear
probe read the column third at 0.38, chance 0.33), and the third (left / middle / right) and the size (big / small)
of the object covering the patch, so that every patch of an object carries its place and size as it carries its
colour. One image-level label set trains the CLS at the feature layer: which (colour, shape, size) objects the
image shows (multi-hot, `presence_labels`), as a classifier's CLS is trained, so that the CLS the CLS-ranked
methods read has to gather every object (without it, it attended to orange objects and background:
`docs/accuracy.md`). The heads are thrown away after training. The first third of the steps trains on these labels
alone and the rest adds the contrastive loss (trained jointly from the start, the contrastive gradient kept the
shape head at chance for 450 steps; alone, shape reached 0.55 in 250). There is no per-token text-to-image
objective (it would favour IVTP's eq. 6). Its scenes are those of v2's six-kind cycle (`scenes.V2_SIX_KINDS`,
`all --clip-kinds`, `clip --kinds`), as the shipped tower's were: the seventh kind, `largest`, adds questions and no
objects.

LLaVA = that vision tower frozen, a projector and a small Llama trained at full tokens (pruning only at inference,
the paper's pure-inference setting) on many questions per scene packed in one row (each sees the image and itself),
with a BPE tokenizer trained on the task's text, on the seven kinds (`scenes.TASK_KINDS`, `--kinds`): 4,000
steps; the first 300 take every scene from the `sparse` training split (1-2 big objects), the rest a quarter of each
batch; every scene's questions also ask the place of every object a `where` question can name
(`scenes.place_turns`). Without the sparse start and the places
(`--sparse-first 0 --no-every-place`) the model learns every kind but `where`, which stays at chance: it learns to
pick the object a colour question names, never the one a `where` question names (`docs/accuracy.md`, "How `where`
was learned"). `--place-steps N` adds a second phase continued from the first (half of each batch sparse, every place
asked), which did not teach `where` to a model trained without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llava_ivtp.testbed import scenes


CLIP_MODEL_NAME = "ViT-L-14-336"  # its tokenizer (open_clip's SimpleTokenizer, 77 tokens, 49408 ids)
VISION = {
    "image_size": scenes.IMAGE_SIZE, "patch_size": scenes.PATCH_SIZE, "hidden_size": 128, "intermediate_size": 512,
    "num_hidden_layers": 7, "num_attention_heads": 4, "projection_dim": 128,
}
CLIP_TEXT = {
    "model_name": CLIP_MODEL_NAME, "embed_dim": 128, "quick_gelu": True,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
FEATURE_LAYER = -2  # LLaVA's vision_feature_layer: the patch features are the second-to-last layer's output


def image_processor():
    """The image processor the testbed model ships with (CLIP normalisation, 192 px)."""
    from transformers import CLIPImageProcessor

    size = scenes.IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _scene_arrays(job: tuple[str, int, tuple[str, ...]]) -> dict:
    split, index, kinds = job
    scene = scenes.example(split, index, kinds=kinds)
    return {
        "image": np.asarray(scene.image, dtype=np.uint8),
        "caption": scene.caption,
        "patch_colors": scene.patch_colors.reshape(-1),
        "patch_shapes": scene.patch_shapes.reshape(-1),
        **object_labels(scene),
        "question": scene.question,
        "answer": scene.answer,
        "kind": scene.kind,
    }


def object_labels(scene: scenes.Example) -> dict:
    """Per patch, the place (third) and the size of the object covering it: `patch_thirds` 0 background, 1 + index
    in `scenes.PLACES`; `patch_sizes` 0 background, 1 big, 2 small."""
    owners = scene.patch_objects.reshape(-1)
    thirds = np.array([0] + [1 + scenes.PLACES.index(o.place) for o in scene.objects])
    sizes = np.array([0] + [2 if o.small else 1 for o in scene.objects])
    return {"patch_thirds": thirds[owners], "patch_sizes": sizes[owners]}


def split_name(split: str, count: int, kinds=scenes.TASK_KINDS) -> str:
    """The name the cached arrays and features of scenes `0..count-1` of `split` go by: a scene depends on its
    question's kind, so on the cycle of `kinds`."""
    return f"{split}-{count}-{'+'.join(scenes.check_kinds(kinds))}"


def build_split(split: str, count: int, work: Path, workers: int = 2, kinds=scenes.TASK_KINDS) -> dict:
    """Scenes `0..count-1` of `split` (their question kinds cycling through `kinds`) as arrays, cached in
    `work/{split_name}.npz` (rebuilt only when missing)."""
    path = work / f"{split_name(split, count, kinds)}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return {key: data[key] for key in data.files}
    jobs = [(split, index, tuple(kinds)) for index in range(count)]
    with Pool(workers) as pool:
        rows = pool.map(_scene_arrays, jobs, chunksize=64)
    data = {key: np.stack([row[key] for row in rows]) if key.startswith(("image", "patch")) else
            np.array([row[key] for row in rows]) for key in rows[0]}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """`(n, 192, 192, 3)` uint8 -> normalised `(n, 3, 192, 192)` float32, as the shipped processor does."""
    processor = image_processor()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------------
class TinyClip(nn.Module):
    """Vision tower (HF `CLIPVisionModel`), text tower (open_clip), visual projection, and the auxiliary heads."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from modeling_llava_ivtp.guidance_ivtp import build_clip_text_tower

        config = CLIPVisionConfig(**VISION)
        config._attn_implementation = "sdpa"
        self.vision = CLIPVisionModel(config)
        self.text = build_clip_text_tower(CLIP_TEXT)
        self.visual_projection = nn.Linear(VISION["hidden_size"], CLIP_TEXT["embed_dim"], bias=False)
        self.color_head = nn.Linear(VISION["hidden_size"], len(scenes.COLORS) + 1)
        self.shape_head = nn.Linear(VISION["hidden_size"], len(scenes.SHAPES) + 1)
        self.place_head = nn.Linear(VISION["hidden_size"], 2 * scenes.GRID)  # the patch's row and column
        # the place (third) and the size of the object covering the patch
        self.object_head = nn.Linear(VISION["hidden_size"], len(scenes.PLACES) + 1 + 3)
        # which objects (colour, shape, size) the image shows, from the CLS at the feature layer
        self.presence_head = nn.Sequential(nn.LayerNorm(VISION["hidden_size"]), nn.Linear(VISION["hidden_size"], PRESENCE_LABELS))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None):
        from modeling_llava_ivtp.guidance_ivtp import clip_token_features

        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        patches = out.hidden_states[FEATURE_LAYER][:, 1:]
        presence = self.presence_head(out.hidden_states[FEATURE_LAYER][:, 0])
        image = F.normalize(self.visual_projection(out.pooler_output), dim=-1)  # final CLS after post_layernorm
        text = None
        if text_ids is not None:
            features = clip_token_features(self.text, text_ids)
            text = F.normalize(features[torch.arange(text_ids.shape[0]), text_ids.argmax(dim=-1)], dim=-1)
        return (image, text, self.color_head(patches), self.shape_head(patches), self.place_head(patches),
                self.object_head(patches), presence)


AUXILIARY_ONLY_SHARE = 1 / 3  # of the CLIP's steps train on the patch labels alone, before the contrastive loss joins
AUXILIARY_WEIGHT = 3.0  # patch-label loss against the contrastive loss (shared vision tower)
BACKGROUND_SHAPE_WEIGHT = 0.1
PRESENCE_LABELS = 2 * (len(scenes.COLORS) + len(scenes.SHAPES))  # the colours and shapes of big and of small objects
PRESENCE_WEIGHT = 1 / 4  # the presence loss is summed over its labels: 1/4 puts it near one object's patch losses


def presence_labels(colors: np.ndarray, shapes: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """`(images, PRESENCE_LABELS)` multi-hot: which colours and which shapes the big objects of each image show, then
    which the small ones show, read from the per-patch labels (an object another one hides entirely is not
    labelled). Colours and shapes apart, not their pairs: a CLS that averages its patches can tell which colours and
    shapes it saw, not which went together (pairs stayed at the prior for 400 steps)."""
    colors, shapes, sizes = (torch.from_numpy(np.asarray(a)).long() for a in (colors, shapes, sizes))
    ncolors, nshapes = len(scenes.COLORS), len(scenes.SHAPES)
    multi_hot = torch.zeros(colors.shape[0], PRESENCE_LABELS)
    for size in (1, 2):  # big, small
        offset = (size - 1) * (ncolors + nshapes)
        shown = ((colors > 0) & (sizes == size)).float()
        multi_hot.scatter_add_(1, offset + (colors - 1).clamp(min=0), shown)
        multi_hot.scatter_add_(1, offset + ncolors + (shapes - 1).clamp(min=0), shown)
    return multi_hot.clamp(max=1)


def presence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return PRESENCE_WEIGHT * F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / logits.shape[0]


def patch_places() -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch, row-major."""
    index = torch.arange(scenes.GRID**2)
    return index // scenes.GRID, index % scenes.GRID


def place_loss(place_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the place head: each patch's row and column from its own feature."""
    rows, columns = patch_places()
    batch = place_logits.shape[0]
    row_logits, column_logits = place_logits.split(scenes.GRID, dim=-1)
    return (F.cross_entropy(row_logits.flatten(0, 1), rows.repeat(batch))
            + F.cross_entropy(column_logits.flatten(0, 1), columns.repeat(batch))) / 2


def object_loss(object_logits: torch.Tensor, thirds: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the object head: the covering object's third and size (background weighted as in the shape
    loss)."""
    third_logits, size_logits = object_logits.split([len(scenes.PLACES) + 1, 3], dim=-1)
    third_weights = torch.ones(len(scenes.PLACES) + 1)
    third_weights[0] = BACKGROUND_SHAPE_WEIGHT
    size_weights = torch.tensor([BACKGROUND_SHAPE_WEIGHT, 1.0, 1.0])
    return (F.cross_entropy(third_logits.flatten(0, 1), thirds.flatten(), weight=third_weights)
            + F.cross_entropy(size_logits.flatten(0, 1), sizes.flatten(), weight=size_weights)) / 2


def clip_tokens(texts) -> torch.Tensor:
    import open_clip

    return open_clip.get_tokenizer(CLIP_MODEL_NAME)(list(texts))


def train_clip(work: Path, train_count: int, val_count: int, steps: int, batch_size: int, lr: float, seed: int,
               kinds=scenes.V2_SIX_KINDS, log=print) -> dict:
    torch.manual_seed(seed)
    start = time.time()
    train = build_split("train", train_count, work, kinds=kinds)
    val = build_split("validation", val_count, work, kinds=kinds)
    log(f"data: {train_count} train / {val_count} validation scenes in {time.time() - start:.0f} s")
    train_pixels, val_pixels = pixel_values(train["image"]), pixel_values(val["image"])
    train_text, val_text = clip_tokens(train["caption"]), clip_tokens(val["caption"])
    train_colors, train_shapes = torch.from_numpy(train["patch_colors"]), torch.from_numpy(train["patch_shapes"])
    train_thirds, train_sizes = torch.from_numpy(train["patch_thirds"]), torch.from_numpy(train["patch_sizes"])
    train_presence = presence_labels(train["patch_colors"], train["patch_shapes"], train["patch_sizes"])

    model = TinyClip()
    # Background patches (most of them) count BACKGROUND_SHAPE_WEIGHT in the shape loss: enough that background
    # features say "no shape", little enough that the objects' shapes are what the loss is about.
    shape_weights = torch.ones(len(scenes.SHAPES) + 1)
    shape_weights[0] = BACKGROUND_SHAPE_WEIGHT
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, train_count, (batch_size,), generator=generator)
        warming = step < steps * AUXILIARY_ONLY_SHARE  # first the patch labels alone (see the module docstring)
        image, text, color_logits, shape_logits, place_logits, object_logits, presence_logits = model(
            train_pixels[index], None if warming else train_text[index])
        if warming:
            contrastive = torch.zeros(())
        else:
            logits = model.logit_scale.exp().clamp(max=100) * image @ text.t()
            targets = torch.arange(batch_size)
            contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        auxiliary = (
            F.cross_entropy(color_logits.flatten(0, 1), train_colors[index].flatten())
            + F.cross_entropy(shape_logits.flatten(0, 1), train_shapes[index].flatten(), weight=shape_weights)
            + place_loss(place_logits)
            + object_loss(object_logits, train_thirds[index], train_sizes[index])
        )
        presence = presence_loss(presence_logits, train_presence[index])
        loss = contrastive + AUXILIARY_WEIGHT * auxiliary + presence
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"clip step {step:4d} loss {loss.item():.3f} (contrastive {contrastive.item():.3f}, "
                f"patch labels {auxiliary.item():.3f}, presence {presence.item():.3f}) {time.time() - start:.0f} s")
        if (step + 1) % 300 == 0 and step != steps - 1:
            log(json.dumps(evaluate_clip(model, val_pixels[:500], val_text[:500], {k: v[:500] for k, v in val.items()})))
            model.train()
    metrics = evaluate_clip(model, val_pixels, val_text, val)
    metrics["train_seconds"] = time.time() - start
    metrics["kinds"] = list(kinds)
    log(json.dumps(metrics))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), work / "clip.pt")
    (work / "clip-metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def evaluate_clip(model: TinyClip, pixels: torch.Tensor, text_ids: torch.Tensor, data: dict, chunk: int = 250) -> dict:
    """Image-to-text retrieval among `chunk` scenes, and per-patch colour / shape accuracy on object patches."""
    model.eval()
    correct, total, color_hits, shape_hits, column_hits, object_patches = 0, 0, 0, 0, 0, 0
    third_hits, small_hits, small_shape_hits, small_patches = 0, 0, 0, 0
    presence_hits, presence_shown, presence_said = 0, 0, 0
    _, columns = patch_places()
    for begin in range(0, pixels.shape[0], chunk):
        image, text, color_logits, shape_logits, place_logits, object_logits, presence_logits = model(
            pixels[begin:begin + chunk], text_ids[begin:begin + chunk])
        shown = presence_labels(*(data[key][begin:begin + chunk] for key in ("patch_colors", "patch_shapes", "patch_sizes")))
        said = presence_logits > 0
        presence_hits += int((said & (shown > 0)).sum())
        presence_shown, presence_said = presence_shown + int(shown.sum()), presence_said + int(said.sum())
        correct += int((image @ text.t()).argmax(dim=1).eq(torch.arange(image.shape[0])).sum())
        total += image.shape[0]
        colors = torch.from_numpy(data["patch_colors"][begin:begin + chunk])
        shapes = torch.from_numpy(data["patch_shapes"][begin:begin + chunk])
        on_object = colors > 0
        color_hits += int((color_logits.argmax(-1) == colors)[on_object].sum())
        shape_hits += int((shape_logits.argmax(-1) == shapes)[on_object].sum())
        column_hits += int((place_logits[..., scenes.GRID:].argmax(-1) == columns)[on_object].sum())
        object_patches += int(on_object.sum())
        thirds = torch.from_numpy(data["patch_thirds"][begin:begin + chunk])
        small = torch.from_numpy(data["patch_sizes"][begin:begin + chunk]) == 2
        third_logits, size_logits = object_logits.split([len(scenes.PLACES) + 1, 3], dim=-1)
        third_hits += int((third_logits.argmax(-1) == thirds)[on_object].sum())
        small_hits += int((size_logits.argmax(-1) == 2)[small].sum())
        small_shape_hits += int((shape_logits.argmax(-1) == shapes)[small].sum())
        small_patches += int(small.sum())
    return {
        "image_to_text_retrieval": correct / total, "retrieval_pool": chunk,
        "patch_color_accuracy": color_hits / object_patches, "patch_shape_accuracy": shape_hits / object_patches,
        "patch_column_accuracy": column_hits / object_patches, "patch_object_third_accuracy": third_hits / object_patches,
        "small_patch_size_accuracy": small_hits / small_patches, "small_patch_shape_accuracy": small_shape_hits / small_patches,
        "cls_presence_recall": presence_hits / presence_shown, "cls_presence_precision": presence_hits / max(presence_said, 1),
    }


# ----------------------------------------------------------------------------------------------------------------
# The LLM's tokenizer, trained offline on the task's text
# ----------------------------------------------------------------------------------------------------------------
PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"


def train_tokenizer(texts, vocab_size: int = 320):
    """A Llama-style BPE tokenizer (Metaspace, BOS added) trained on `texts` with 🤗 tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK, IMAGE], show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE], padding_side="left",
    )


def tokenizer_corpus(data: dict) -> list[str]:
    prompts = [f"USER: {IMAGE}\n{q} ASSISTANT: {a}" for q, a in zip(data["question"], data["answer"])]
    captions = [f"USER: {IMAGE}\nDescribe the image. ASSISTANT: {c}" for c in data["caption"]]
    return prompts + captions + [" ".join(scenes.ANSWERS)] * 50  # every answer word, also the rare ones


# ----------------------------------------------------------------------------------------------------------------
# The tiny LLaVA-IVTP: frozen vision tower, projector + Llama trained at full tokens
# ----------------------------------------------------------------------------------------------------------------
TEXT = {
    "hidden_size": 160, "intermediate_size": 480, "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 512, "rope_theta": 10000.0,
}
TESTBED_SCHEDULE = {"vision": [112, 88, 72], "llm": [68, 64]}  # 64 visual tokens in the LLM's last layers
GROUP_SIZE = 2


def llava_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig

    from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **TEXT,
    )
    config = IvtpConfig(
        vision_config=CLIPVisionConfig(**VISION).to_dict(), text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), vision_feature_layer=FEATURE_LAYER,
        schedule=TESTBED_SCHEDULE, group_size=GROUP_SIZE, clip_text_encoder=CLIP_TEXT, guidance="clip_relevance",
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return config


def build_llava(work: Path, tokenizer):
    """The testbed model with the trained CLIP's vision tower, text tower and visual projection in it."""
    torch.manual_seed(0)
    model = build_llava_shell(tokenizer)
    clip = TinyClip()
    clip.load_state_dict(torch.load(work / "clip.pt", weights_only=True))
    model.model.vision_tower.load_state_dict(clip.vision.state_dict())
    model.clip_text_model.load_state_dict(clip.text.state_dict())
    model.clip_visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return model


def clip_from_checkpoint(checkpoint: Path, work: Path) -> Path:
    """`work/clip.pt` from the vision tower, CLIP text tower and visual projection of a testbed checkpoint, so that
    the LLaVA stage can train on the towers of a model already trained (`train llava --clip-from`); the auxiliary
    heads, thrown away when that model was saved, stay at their initialisation (the LLaVA stage does not use them).
    `clip-metrics.json` names the checkpoint and keeps the vision bullet of its card. Refused when `work` already
    holds a `clip.pt`."""
    from modeling_llava_ivtp.modeling_llava_ivtp import LlavaIvtpForConditionalGeneration

    if (work / "clip.pt").exists():
        raise ValueError(f"{work / 'clip.pt'} exists; use another --work (it is never overwritten).")
    model = LlavaIvtpForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    torch.manual_seed(0)
    clip = TinyClip()
    clip.vision.load_state_dict(model.model.vision_tower.state_dict())
    clip.text.load_state_dict(model.clip_text_model.state_dict())
    clip.visual_projection.load_state_dict(model.clip_visual_projection.state_dict())
    card = (checkpoint / "README.md").read_text() if (checkpoint / "README.md").is_file() else ""
    start, end = card.find("- Vision:"), card.find("\n- LLM:")
    work.mkdir(parents=True, exist_ok=True)
    torch.save(clip.state_dict(), work / "clip.pt")
    metrics = {"from_checkpoint": str(checkpoint), "vision_bullet": card[start:end] if 0 <= start < end else None}
    (work / "clip-metrics.json").write_text(json.dumps(metrics, indent=2))
    return work / "clip.pt"


@torch.no_grad()
def vision_features(model, pixels: torch.Tensor, chunk: int = 200) -> torch.Tensor:
    """The frozen tower's patch features at the feature layer, `(n, 144, hidden)` (what the projector reads)."""
    tower = model.model.vision_tower.eval()
    parts = []
    for begin in range(0, pixels.shape[0], chunk):
        out = tower(pixel_values=pixels[begin:begin + chunk], output_hidden_states=True)
        parts.append(out.hidden_states[FEATURE_LAYER][:, 1:].clone())
    return torch.cat(parts)


def encode_examples(tokenizer, questions, answers, num_patches: int):
    """Token ids of `USER: <image>\\n{question} ASSISTANT: {answer}</s>` with the image expanded to its
    placeholders, and labels on the answer (and EOS) only. Right-padded tensors."""
    encoder = TurnEncoder(tokenizer, num_patches)
    rows = [encoder.turn(question, answer) for question, answer in zip(questions, answers)]
    return _right_padded([ids for ids, _ in rows], [labels for _, labels in rows], tokenizer.pad_token_id)


class TurnEncoder:
    """Token ids and labels of one question about an image, exactly as evaluation prompts it:
    `USER: <image>\\n{question} ASSISTANT: {answer}</s>`, the image expanded to its placeholders (`num_patches`, or
    the image's own count: a LLaVA-NeXT image has as many as its packed sequence), labels on the answer and its EOS
    only; token lists are cached per text."""

    def __init__(self, tokenizer, num_patches: int):
        self.tokenizer, self.num_patches = tokenizer, num_patches
        self.cache: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}

    def turn(self, question: str, answer: str, num_patches: int | None = None) -> tuple[list[int], list[int]]:
        num_patches = self.num_patches if num_patches is None else num_patches
        key = (question, answer, num_patches)
        if key not in self.cache:
            head = f"USER: {IMAGE * num_patches}\n{question} ASSISTANT:"
            prompt = self.tokenizer(head)["input_ids"]
            full = self.tokenizer(f"{head} {answer}")["input_ids"]
            if full[: len(prompt)] != prompt:
                raise RuntimeError(f"the prompt's tokens are not a prefix of the turn's: {question!r} {answer!r}")
            full = full + [self.tokenizer.eos_token_id]
            self.cache[key] = (full, [-100] * len(prompt) + full[len(prompt):])
        return self.cache[key]


class QuestionPacker:
    """Many questions about one image in one training row, each seeing the image and itself only.

    A row is the shared head (`<s>USER: ` and the image placeholders) followed by one segment per question (the rest
    of that question's evaluation prompt, its answer and EOS). The attention mask lets every segment see the head and
    its own earlier tokens, never another question or answer; position ids restart after the head for each segment.
    So each segment's logits are those of the question asked alone, the evaluation prompt (tested), while the image
    features pass through the LLM once for all its questions."""

    def __init__(self, tokenizer, num_patches: int, image_token_id: int):
        self.turns, self.image_token_id = TurnEncoder(tokenizer, num_patches), image_token_id
        self.pad_id = tokenizer.pad_token_id

    def split(self, question: str, answer: str, num_patches: int | None = None) -> tuple[list[int], list[int], list[int]]:
        """`(head, segment ids, segment labels)` of one question; the head ends at the last image placeholder."""
        ids, labels = self.turns.turn(question, answer, num_patches)
        cut = len(ids) - ids[::-1].index(self.image_token_id)
        return ids[:cut], ids[cut:], labels[cut:]

    def __call__(self, conversations: list[list[tuple[str, str]]], num_patches: list[int] | None = None):
        """`(ids, labels, position_ids, attention_mask)`: right-padded `(batch, length)` tensors and a boolean
        `(batch, 1, length, length)` mask (True = attend), one row per conversation; `num_patches`: each row's
        image placeholders (default: the packer's)."""
        rows = []
        for row, questions in enumerate(conversations):
            head = None
            ids, labels, positions, segments = [], [], [], []
            for number, (question, answer) in enumerate(questions, start=1):
                this_head, segment, segment_labels = self.split(
                    question, answer, None if num_patches is None else num_patches[row])
                if head is None:
                    head = this_head
                    ids, labels = list(head), [-100] * len(head)
                    positions, segments = list(range(len(head))), [0] * len(head)
                elif this_head != head:
                    raise RuntimeError(f"question {question!r} does not start with the image's tokens")
                ids += segment
                labels += segment_labels
                positions += range(len(head), len(head) + len(segment))
                segments += [number] * len(segment)
            rows.append((ids, labels, positions, segments))
        length = max(len(row[0]) for row in rows)
        shape = (len(rows), length)
        ids, labels = torch.full(shape, self.pad_id), torch.full(shape, -100)
        positions, segments = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
        for index, row in enumerate(rows):
            for tensor, values in zip((ids, labels, positions, segments), row):
                tensor[index, : len(values)] = torch.tensor(values)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        query, key = segments[:, :, None], segments[:, None, :]
        mask = causal & ((query == key) | (key == 0)) & (key >= 0) & (query >= 0)
        mask |= torch.eye(length, dtype=torch.bool)  # padding sees itself (no empty softmax row)
        return ids, labels, positions, mask[:, None]


def _right_padded(rows, labels, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    target = torch.full((len(rows), length), -100, dtype=torch.long)
    for row, (tokens, label) in enumerate(zip(rows, labels)):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        target[row, : len(label)] = torch.tensor(label)
    return ids, target


def full_token_logits(model, ids, features, attention_mask=None, position_ids=None, projected=None):
    """Stock Llava's forward at full tokens on precomputed patch features: placeholders replaced by the projected
    features (or by `projected`, the visual tokens already in the LLM's space, every placeholder's in order: a
    LLaVA-NeXT image's packed sequence), the decoder, the LM head. The mask is the padding mask of `ids` unless a
    4-D one is given."""
    embeds = model.get_input_embeddings()(ids)
    image = ids == model.config.image_token_id
    if projected is None:
        projected = model.model.multi_modal_projector(features)
    projected = projected.to(embeds.dtype)
    embeds = embeds.masked_scatter(image.unsqueeze(-1), projected.reshape(-1, embeds.shape[-1]))
    if attention_mask is None:
        attention_mask = (ids != model.config.text_config.pad_token_id).long()
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
    return model.lm_head(hidden)


def llava_loss(model, ids, labels, features, attention_mask=None, position_ids=None, projected=None):
    """Cross-entropy of `full_token_logits` on the labelled tokens."""
    logits = full_token_logits(model, ids, features, attention_mask, position_ids, projected)[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def cached_features(model, split: str, count: int, work: Path, clip_digest: str,
                    kinds=scenes.TASK_KINDS) -> torch.Tensor:
    """The frozen tower's features of scenes `0..count-1` of `split`, cached in `work` under the name of the CLIP
    they came from (so a retrained CLIP in the same work folder never meets the features of an earlier one)."""
    cached = work / f"features-{split_name(split, count, kinds)}-clip-{clip_digest}.pt"
    if cached.is_file():
        return torch.load(cached, weights_only=True)
    features = vision_features(model, pixel_values(build_split(split, count, work, kinds=kinds)["image"]))
    torch.save(features, cached)
    return features


def init_projector(model) -> None:
    """LLaVA's projector (linear, GELU, linear) with weights N(0, 1 / fan_in) and zero biases, so the visual tokens
    enter the LLM at the scale of the CLIP features (norm ~40 here) instead of ~0.02 x that (the text config's
    initializer range). Measured with it: the LLM starts using the image after ~400 steps."""
    projector = model.model.multi_modal_projector
    for linear in (projector.linear_1, projector.linear_2):
        nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
        nn.init.zeros_(linear.bias)


def optimise(model, step_loss, steps: int, lr: float, check, start: float, log, name: str = "llava") -> None:
    """The LLaVA stages' loop: AdamW (betas 0.9 / 0.98, no weight decay) on the projector, the LLM and (LLaVA-NeXT)
    the newline, the towers frozen; a linear warm-up over 5% of the steps, then cosine decay; gradients clipped to
    norm 1. `step_loss(step)` draws a batch and returns its loss; `check()` returns the validation figures logged
    every 250 steps. Leaves the model in eval mode."""
    model.model.vision_tower.requires_grad_(False)
    model.clip_text_model.requires_grad_(False)
    model.clip_visual_projection.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
    )
    model.train()
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"{name} step {step:4d} loss {loss.item():.3f} {time.time() - start:.0f} s")
        if (step + 1) % 250 == 0 and step != steps - 1:
            log(json.dumps(check()))
            model.train()
    model.eval()


def train_llava(work: Path, train_count: int, val_count: int, steps: int, batch_size: int, lr: float, seed: int,
                questions: int = 24, sparse: int = 0, sparse_share: float = 0.0, sparse_first: int = 0,
                every_place: bool = False, resume: bool = False, kinds=scenes.TASK_KINDS, log=print) -> dict:
    """Projector + Llama at full tokens, vision tower and CLIP frozen. Each training row is one scene with up to
    `questions` distinct questions about it (`scenes.training_turns`), packed so that each question sees the image
    and itself only (`QuestionPacker`): the evaluation prompt, many answers per image forward. A share
    `sparse_share` of each batch's rows comes from the first `sparse` scenes of the `sparse` split (1-2 big objects:
    see `scenes.SPLITS`), and every row of the first `sparse_first` steps. `every_place` adds to each scene's questions the place of every object a `where` question
    can name (`scenes.place_turns`). `resume` continues from `work`'s saved model and tokenizer for `steps` more (a new warm-up
    and cosine decay). `kinds`: the question kinds the scenes cycle through and their questions are drawn from."""
    if (sparse_share or sparse_first) and not sparse:
        raise ValueError("sparse_share > 0 or sparse_first > 0 needs sparse scenes (sparse > 0).")
    start = time.time()
    kinds = scenes.check_kinds(kinds)
    train = build_split("train", train_count, work, kinds=kinds)
    val = build_split("validation", val_count, work, kinds=kinds)
    before = {}
    if resume:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
        before = json.loads((work / "llava-metrics.json").read_text())
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(train))
    split_answers = [answer for answer in scenes.ANSWERS if len(tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]) != 1]
    if split_answers:
        raise RuntimeError(f"answers that are not one token of the trained tokenizer: {split_answers}")
    model = build_llava(work, tokenizer)
    if resume:
        model.load_state_dict(torch.load(work / "llava.pt", weights_only=True))
    else:
        init_projector(model)
    # The frozen tower's features, reused by a resumed run; named by the CLIP they came from, so a retrained CLIP
    # in the same work folder never meets the features of an earlier one.
    clip_digest = hashlib.sha256((work / "clip.pt").read_bytes()).hexdigest()[:12]
    features = cached_features(model, "train", train_count, work, clip_digest, kinds)
    def conversation(split: str, index: int) -> list[tuple[str, str]]:
        turns = [(q, a) for q, a, _ in scenes.training_turns(split, index, questions, kinds)]
        if every_place:
            turns += [(q, a) for q, a, _ in scenes.place_turns(split, index, kinds) if (q, a) not in turns]
        return turns

    conversations = [conversation("train", index) for index in range(train_count)]
    sparse_features = cached_features(model, "sparse", sparse, work, clip_digest, kinds) if sparse else None
    sparse_conversations = [conversation("sparse", index) for index in range(sparse)]
    mixed_sparse_rows = round(batch_size * sparse_share)
    log(f"features and {sum(map(len, conversations))} questions of {train_count} scenes in {time.time() - start:.0f} s; "
        f"vocabulary {len(tokenizer)}")
    packer = QuestionPacker(tokenizer, model.config.num_patches, model.config.image_token_id)

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def step_loss(step: int) -> torch.Tensor:
        sparse_rows = batch_size if step < sparse_first else mixed_sparse_rows
        index = torch.randint(0, train_count, (batch_size - sparse_rows,), generator=generator).tolist()
        rows, row_features = [conversations[scene] for scene in index], features[index]
        if sparse_rows:
            extra = torch.randint(0, sparse, (sparse_rows,), generator=generator).tolist()
            rows += [sparse_conversations[scene] for scene in extra]
            row_features = torch.cat([row_features, sparse_features[extra]])
        ids, labels, positions, mask = packer(rows)
        return llava_loss(model, ids, labels, row_features, mask, positions)

    optimise(model, step_loss, steps, lr, lambda: quick_accuracy(model, tokenizer, val, count=300), start, log)
    metrics = quick_accuracy(model, tokenizer, val, count=val_count)
    metrics["train_seconds"] = time.time() - start + before.get("train_seconds", 0.0)
    metrics["steps"] = steps + before.get("steps", 0)
    metrics["phases"] = before.get("phases", []) + [{
        "steps": steps, "batch_size": batch_size, "lr": lr, "questions": questions, "sparse": sparse,
        "sparse_share": sparse_share, "sparse_first": sparse_first, "every_place": every_place, "resume": resume,
        "kinds": list(kinds)}]
    log(json.dumps(metrics))
    tokenizer.save_pretrained(work / "tokenizer")
    torch.save(model.state_dict(), work / "llava.pt")
    (work / "llava-metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def quick_accuracy(model, tokenizer, data: dict, count: int) -> dict:
    """Accuracy at full tokens on the first `count` scenes: the most likely next token after the prompt against the
    answer's first token (the answers are single tokens of this tokenizer), per question kind."""
    model.eval()
    count = min(count, len(data["question"]))
    num_patches = model.config.num_patches
    features = vision_features(model, pixel_values(data["image"][:count]))
    ids, labels = encode_examples(tokenizer, data["question"][:count], data["answer"][:count], num_patches)
    first_answer = (labels != -100).long().argmax(dim=1)
    hits: dict[str, list[int]] = {}
    for begin in range(0, count, 100):
        rows = slice(begin, min(begin + 100, count))
        batch = ids[rows]
        logits = full_token_logits(model, batch, features[rows])
        position = first_answer[rows] - 1
        predicted = logits[torch.arange(batch.shape[0]), position].argmax(-1)
        expected = batch[torch.arange(batch.shape[0]), first_answer[rows]]
        for kind, hit in zip(data["kind"][rows], (predicted == expected).tolist()):
            hits.setdefault(str(kind), []).append(int(hit))
    every = [hit for values in hits.values() for hit in values]
    return {"accuracy": sum(every) / len(every), **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning data for examples/finetune.py (the paper's retraining mode)
# ----------------------------------------------------------------------------------------------------------------
def export_conversations(out: Path, start: int, count: int, turns: int, overwrite: bool = False) -> Path:
    """Training scenes `start..start+count-1` as LLaVA-format JSON lines (`out/train.jsonl`, images in
    `out/images/`), each a conversation of up to `turns` questions (`scenes.training_turns`)."""
    listing = out / "train.jsonl"
    if listing.exists() and not overwrite:
        raise ValueError(f"--out {out}: already holds train.jsonl (pass --overwrite to replace it).")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(start, start + count):
        name = f"images/train-{index:06d}.png"
        scenes.example("train", index).image.save(out / name)
        conversation = []
        for number, (question, answer, _) in enumerate(scenes.training_turns("train", index, turns)):
            conversation += [{"from": "human", "value": f"<image>\n{question}" if number == 0 else question},
                             {"from": "gpt", "value": answer}]
        lines.append(json.dumps({"image": name, "conversations": conversation}))
    listing.write_text("\n".join(lines) + "\n")
    return listing


# ----------------------------------------------------------------------------------------------------------------
# The shipped checkpoint
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(work: Path, out: Path, overwrite: bool = False,
                    tau_questions: int | None = None) -> Path:
    """`work`'s trained LLaVA-IVTP as a remote-code checkpoint: IvtpConfig + fp16 safetensors + `LlavaIvtpProcessor`
    + the package's files + a card with the training figures. `tau` is calibrated as `llava-ivtp calibrate-tau`
    does (`TAU_QUANTILE` of the instruction tokens' relevance on the first `TAU_CALIBRATION_QUESTIONS` validation
    questions, or `tau_questions`), on the weights as stored."""
    from llava_ivtp.evaluation.calibrate import calibrate
    from transformers import PreTrainedTokenizerFast

    from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE, LlavaIvtpProcessor

    check_checkpoint_out(out, overwrite)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    model = build_llava_shell(tokenizer)
    state = torch.load(work / "llava.pt", weights_only=True)
    model.load_state_dict({name: value.to(torch.float16).to(value.dtype) for name, value in state.items()})
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
    processor = LlavaIvtpProcessor(
        image_processor(), tokenizer, patch_size=scenes.PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE, clip_model_name=CLIP_MODEL_NAME,
    )
    metrics = {name: json.loads((work / f"{name}-metrics.json").read_text()) for name in ("clip", "llava")}
    kinds = trained_kinds(metrics["llava"])
    records = [scenes.example("validation", index, kinds=kinds).record()
               for index in range(tau_questions or TAU_CALIBRATION_QUESTIONS)]
    calibration = calibrate(model, processor, records, TAU_QUANTILE)
    model.config.tau = calibration["tau"]
    out.mkdir(parents=True, exist_ok=True)
    # Stored in float16 (half the size), computed in float32: the config keeps float32, so `from_pretrained` loads
    # float32 weights by default (float16 matmuls on a CPU are slow and round the tiny model's logits).
    model.save_pretrained(out, state_dict={name: value.to(torch.float16) for name, value in model.state_dict().items()})
    processor.save_pretrained(out)
    metrics["tau"] = calibration
    (work / "tau-calibration.json").write_text(json.dumps(calibration, indent=2))
    (out / "README.md").write_text(testbed_card(metrics))
    return out


def trained_kinds(llava_metrics: dict) -> tuple[str, ...]:
    """The question kinds the LLaVA stage trained on (its last phase's; runs that did not record them trained on
    v2's six)."""
    phases = llava_metrics.get("phases") or [{}]
    return tuple(phases[-1].get("kinds", scenes.V2_SIX_KINDS))


def check_checkpoint_out(out: Path, overwrite: bool) -> None:
    """A checkpoint is never written over existing files without `overwrite`."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: exists and is not empty (pass --overwrite to replace its files).")


def build_llava_shell(tokenizer):
    """The testbed model with fresh weights (the architecture `llava_config` describes)."""
    from modeling_llava_ivtp.modeling_llava_ivtp import LlavaIvtpForConditionalGeneration

    return LlavaIvtpForConditionalGeneration(llava_config(tokenizer)).eval()


def vision_bullet(clip: dict) -> str:
    """The card's bullet on the CLIP stage: its figures, or (`--clip-from`) the bullet of the checkpoint whose towers
    the model holds."""
    if "from_checkpoint" in clip:
        copied = f"  The towers are those of `{clip['from_checkpoint']}` (`train llava --clip-from`)."
        return f"{clip['vision_bullet']}\n{copied}" if clip["vision_bullet"] else f"- Vision: {copied.strip()}"
    return f"""- Vision: CLIP ViT, 192 px, patch 16 (144 patches), {VISION['num_hidden_layers']} layers of width {VISION['hidden_size']};
  CLIP text tower: open_clip, {CLIP_TEXT['text_cfg']['layers']} layers of width {CLIP_TEXT['text_cfg']['width']} (ViT-L-14-336's tokenizer).
  Trained with CLIP's contrastive loss, per-patch labels (colour, shape, row and column, the covering object's
  third and size) and image-level labels on the feature layer's CLS (the colours and shapes of the big and of the
  small objects shown; recall {clip.get('cls_presence_recall', float('nan')):.3f}, precision {clip.get('cls_presence_precision', float('nan')):.3f}):
  image-to-text retrieval {clip['image_to_text_retrieval']:.3f} among {clip['retrieval_pool']},
  patch colour {clip['patch_color_accuracy']:.3f}, patch shape {clip['patch_shape_accuracy']:.3f}, patch column
  {clip.get('patch_column_accuracy', float('nan')):.3f}, object third {clip.get('patch_object_third_accuracy', float('nan')):.3f}, small-object patch shape
  {clip.get('small_patch_shape_accuracy', float('nan')):.3f} (validation), {clip['train_seconds'] / 60:.0f} min on 2 CPU cores{scenes_of(clip)}."""


def scenes_of(clip: dict) -> str:
    """The card's words on the scenes the CLIP stage trained on (runs that did not record them: v2's six kinds)."""
    kinds = clip.get("kinds", list(scenes.V2_SIX_KINDS))
    return f", on the scenes of the cycle of {len(kinds)} kinds ({', '.join(f'`{kind}`' for kind in kinds)})"


def testbed_card(metrics: dict) -> str:
    clip, llava = metrics["clip"], metrics["llava"]
    asked = trained_kinds(llava)
    kinds = ", ".join(f"{key.removeprefix('accuracy_')} {value:.3f}" for key, value in llava.items()
                      if key.startswith("accuracy_"))
    phases = "; then ".join(
        f"{phase['steps']} steps of {phase['batch_size']} scenes at lr {phase['lr']:g}, up to {phase['questions']} questions "
        f"each, a share {phase['sparse_share']:g} of each batch from {phase['sparse']} sparse scenes (every scene of the first "
        f"{phase['sparse_first']} steps){', every place asked' if phase['every_place'] else ''}"
        for phase in llava.get("phases", [])) or "options not recorded"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags: [llava, ivtp, token-pruning, testbed]
---

# llava-ivtp testbed

A tiny LLaVA-IVTP trained from scratch by `python -m llava_ivtp.testbed.train` on the synthetic task of
`llava_ivtp/testbed/scenes.py` (scenes of coloured shapes, one-word answers), to measure what pruning costs in
accuracy. Not a general model: it knows 6 colours, 6 shapes, big and small objects, and the {len(asked)} kinds of
question of the testbed's task v2 ({", ".join(f"`{kind}`" for kind in asked)}).

{vision_bullet(clip)}
- LLM: Llama, {TEXT['num_hidden_layers']} layers of width {TEXT['hidden_size']}, BPE tokenizer trained on the task's text;
  projector and LLM trained at full tokens (vision frozen), {llava['steps']} steps ({phases}):
  validation accuracy {llava['accuracy']:.3f} ({kinds}), {llava['train_seconds'] / 60:.0f} min on 2 CPU cores.
- Pruning schedule (IvtpConfig): {TESTBED_SCHEDULE}, group size {GROUP_SIZE}; `tau` {metrics['tau']['tau']}: {metrics['tau']['rule']}
  ({metrics['tau']['questions']} validation questions, {metrics['tau']['tokens']} instruction tokens; the paper's 0.2
  lets {metrics['tau']['share_at_or_above_previous_tau']:.0%} of those tokens through).

Load with `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(path, trust_remote_code=True)`.
"""


TAU_QUANTILE = 0.75  # the rule of `llava-ivtp calibrate-tau`, fixed before any accuracy of v2 was seen
TAU_CALIBRATION_QUESTIONS = 500
CLIP_DEFAULTS = {"steps": 1500, "batch_size": 32, "lr": 1e-3}
LLAVA_DEFAULTS = {"steps": 4000, "batch_size": 16, "lr": 1e-3, "questions": 24, "sparse": 4000, "sparse_share": 0.25,
                  "sparse_first": 300, "every_place": True}
# The LLaVA stage's second phase (`--place-steps`, 0 skips it): continued from the first with a new warm-up and
# cosine decay, half of each batch from the sparse split, and the place of every object asked (see the module
# docstring for why).
PLACE_PHASE = {"steps": 0, "sparse_share": 0.5, "sparse_first": 0, "every_place": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_ivtp.testbed.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    stages = {
        "all": "everything from scratch: the CLIP, the LLaVA-IVTP, the checkpoint (--out)",
        "clip": "train the tiny CLIP", "llava": "train the tiny LLaVA-IVTP on the trained CLIP",
    }
    for name, help_text in stages.items():
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("--work", type=Path, default=Path("testbed-work"))
        stage.add_argument("--train", type=int, default=12000, help="training scenes")
        stage.add_argument("--validation", type=int, default=1000, help="validation scenes")
        stage.add_argument("--seed", type=int, default=0)
        stage.add_argument("--kinds", default=",".join(scenes.V2_SIX_KINDS if name == "clip" else scenes.TASK_KINDS),
                           help=f"question kinds, comma-separated, from {','.join(scenes.QUESTION_KINDS)}"
                           + (" (the CLIP's scenes: by default v2's six-kind cycle, as the shipped tower's)"
                              if name == "clip" else ""))
        if name == "all":
            stage.add_argument("--clip-kinds", default=",".join(scenes.V2_SIX_KINDS),
                               help="the question kinds of the CLIP stage's scenes (default: v2's six-kind cycle, "
                               "whose scenes trained the shipped model's tower)")
            stage.add_argument("--out", type=Path, required=True)
            stage.add_argument("--overwrite", action="store_true")
            stage.add_argument("--clip-steps", type=int, default=CLIP_DEFAULTS["steps"])
            stage.add_argument("--llava-steps", type=int, default=LLAVA_DEFAULTS["steps"])
            stage.add_argument("--sparse", type=int, default=LLAVA_DEFAULTS["sparse"],
                               help="sparse-split scenes the LLaVA stage mixes in")
            stage.add_argument("--place-steps", type=int, default=PLACE_PHASE["steps"],
                               help="steps of the LLaVA stage's place phase (0: none)")
            stage.add_argument("--tau-questions", type=int, default=TAU_CALIBRATION_QUESTIONS,
                               help="validation questions tau is calibrated on")
            continue
        for option, value in (CLIP_DEFAULTS if name == "clip" else LLAVA_DEFAULTS).items():
            if isinstance(value, bool):
                stage.add_argument(f"--{option.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
            else:
                stage.add_argument(f"--{option.replace('_', '-')}", type=type(value), default=value)
        if name == "llava":
            stage.add_argument("--resume", action="store_true", help="continue training the saved model")
            stage.add_argument("--clip-from", type=Path, default=None,
                               help="a testbed checkpoint whose towers to train on (written to WORK/clip.pt first)")
            stage.add_argument("--place-steps", type=int, default=PLACE_PHASE["steps"],
                               help="steps of the place phase after the first (0: none)")
    save = sub.add_parser("save", help="write the trained model as a remote-code checkpoint")
    save.add_argument("--work", type=Path, default=Path("testbed-work"))
    save.add_argument("--out", type=Path, required=True)
    save.add_argument("--overwrite", action="store_true")
    save.add_argument("--tau-questions", type=int, default=TAU_CALIBRATION_QUESTIONS,
                      help="validation questions tau is calibrated on")
    from llava_ivtp.testbed.train_next import NEXT_DEFAULTS

    next_stage = sub.add_parser("next", help="the LLaVA-NeXT testbed: a v2 checkpoint made a LLaVA-NeXT model and "
                                "fine-tuned on the high-resolution scenes (llava_ivtp/testbed/train_next.py)")
    next_stage.add_argument("--base", type=Path, required=True, help="the v2 testbed checkpoint it starts from")
    next_stage.add_argument("--work", type=Path, default=Path("next-work"))
    next_stage.add_argument("--out", type=Path, required=True)
    next_stage.add_argument("--overwrite", action="store_true")
    next_stage.add_argument("--seed", type=int, default=0)
    next_stage.add_argument("--kinds", default=",".join(scenes.TASK_KINDS),
                            help=f"question kinds, comma-separated, from {','.join(scenes.QUESTION_KINDS)}")
    next_stage.add_argument("--tau-questions", type=int, default=TAU_CALIBRATION_QUESTIONS,
                            help="NeXT validation questions tau is calibrated on")
    for option, value in NEXT_DEFAULTS.items():
        next_stage.add_argument(f"--{option.replace('_', '-')}", type=type(value), default=value)
    export = sub.add_parser("export", help="training scenes as LLaVA-format JSON lines for examples/finetune.py")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--start", type=int, default=0)
    export.add_argument("--count", type=int, default=2000)
    export.add_argument("--turns", type=int, default=8)
    export.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.stage == "export":
        print(export_conversations(args.out, args.start, args.count, args.turns, args.overwrite))
        return 0
    if args.stage in ("save", "all", "next"):  # a clear command-line error, and before an hour of training
        try:
            check_checkpoint_out(args.out, args.overwrite)
        except ValueError as error:
            parser.error(str(error))

    def kinds_of(option: str) -> tuple[str, ...]:
        try:
            return scenes.check_kinds(tuple(getattr(args, option.replace("-", "_")).split(",")))
        except ValueError as error:
            parser.error(f"--{option}: {error}")

    kinds = kinds_of("kinds") if hasattr(args, "kinds") else scenes.TASK_KINDS
    # the CLIP stage's scenes: `clip --kinds`, `all --clip-kinds`
    clip_kinds = kinds_of("clip-kinds") if args.stage == "all" else kinds
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.stage == "next":
        from llava_ivtp.testbed.train_next import train_next

        if not (args.base / "config.json").is_file():
            parser.error(f"--base {args.base}: not a checkpoint folder (no config.json).")
        train_next(args.base, args.work, args.out, args.train, args.validation, args.steps, args.batch_size, args.lr,
                   args.questions, args.seed, kinds, args.overwrite, args.tau_questions, log)
        print(args.out)
        return 0
    common = {"work": args.work, "train_count": getattr(args, "train", None), "val_count": getattr(args, "validation", None),
              "seed": getattr(args, "seed", 0), "kinds": kinds}
    if args.stage in ("clip", "all"):
        options = ({**CLIP_DEFAULTS, "steps": args.clip_steps} if args.stage == "all" else
                   {key: getattr(args, key) for key in CLIP_DEFAULTS})
        train_clip(**{**common, "kinds": clip_kinds}, **options, log=log)
    if getattr(args, "clip_from", None) is not None:
        try:
            clip_from_checkpoint(args.clip_from, args.work)
        except (ValueError, OSError) as error:
            parser.error(f"--clip-from {args.clip_from}: {error}")
    if args.stage in ("llava", "all"):
        options = ({**LLAVA_DEFAULTS, "steps": args.llava_steps, "sparse": args.sparse} if args.stage == "all" else
                   {**{key: getattr(args, key) for key in LLAVA_DEFAULTS}, "resume": args.resume})
        train_llava(**common, **options, log=log)
        if args.place_steps:
            train_llava(**common, **{**options, **PLACE_PHASE, "steps": args.place_steps, "resume": True}, log=log)
    if args.stage in ("save", "all"):
        print(save_checkpoint(args.work, args.out, args.overwrite, args.tau_questions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
