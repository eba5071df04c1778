"""The LLaVA-NeXT testbed: the v2 testbed model turned into a LLaVA-NeXT (AnyRes) model and fine-tuned on the
high-resolution scenes of `scenes.NEXT`, so that the pruning methods can be measured where an image has several
crops. One command (2 CPU cores):

    python -m llava_ivtp.testbed.train next --base models/llava-ivtp-testbed --work next-work \
        --out models/llava-next-ivtp-testbed

The model: `LlavaNextIvtpForConditionalGeneration` with the v2 checkpoint's vision tower, CLIP text tower and visual
projection (frozen), its projector, Llama and tokenizer (trained on), and LLaVA-NeXT's learned newline (new, trained).
`image_grid_pinpoints` are the grids of 192 px tiles `NEXT_PINPOINTS` (1 x 2, 2 x 1, 2 x 2), so an image brings the
base crop (the whole image shrunk to 192 px: 144 tokens), the tiles it needs, unpadded to its aspect ratio, and a
newline per row of patches: 444-744 visual tokens on the task's canvases. A small object, one patch in a tile, is
half a patch wide on the base crop: questions about it need the tiles.

Training: the tower's features of every crop of every training scene are computed once (float16, kept in memory);
then the projector, the Llama and the newline are trained at full tokens (pruning only at inference, as for v2) on
many questions per scene packed in one row (`train.QuestionPacker`, each question sees the image and itself), with
the loop of the v2 LLaVA stage (`train.optimise`). Each training row's visual tokens are packed exactly as the
model's own forward packs them (`layout_next.NextLayout.pack`: tested equal to the loaded checkpoint's forward). `tau`
is calibrated by the rule of `llava-ivtp calibrate-tau` on the NeXT validation questions; the checkpoint is written
with `LlavaNextIvtpProcessor` and a card, pruning with IVTP at `NEXT_BUDGET` visual tokens per image by default.
"""

from __future__ import annotations

import json
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from llava_ivtp.testbed import scenes
from llava_ivtp.testbed import train as v2


NEXT_PINPOINTS = [[192, 384], [384, 192], [384, 384]]  # (height, width) px: grids of 192 px tiles
NEXT_BUDGET = 160  # visual tokens per image the shipped config keeps (the peers' smallest NeXT budget)
NEXT_DEFAULTS = {"train": 6000, "validation": 500, "steps": 2000, "batch_size": 8, "lr": 3e-4, "questions": 24}


def next_image_processor():
    """LLaVA-NeXT's image processor at the testbed CLIP's size: 192 px crops, CLIP normalisation, `NEXT_PINPOINTS`."""
    from transformers import LlavaNextImageProcessor

    base = v2.image_processor()
    size = scenes.IMAGE_SIZE
    return LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=base.image_mean, image_std=base.image_std,
    )


def next_processor(tokenizer):
    from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE, LlavaNextIvtpProcessor

    return LlavaNextIvtpProcessor(
        next_image_processor(), tokenizer, patch_size=scenes.PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE, clip_model_name=v2.CLIP_MODEL_NAME,
    )


def next_model_from(base: Path, seed: int = 0):
    """`(model, tokenizer)`: a `LlavaNextIvtpForConditionalGeneration` holding every weight of the v2 checkpoint
    `base` (same names) and a fresh newline (LLaVA-NeXT's initialisation); IVTP at `NEXT_BUDGET` tokens, the
    checkpoint's guidance, group size and `tau`."""
    from transformers import PreTrainedTokenizerFast

    from modeling_llava_ivtp import IvtpNextConfig, LlavaIvtpForConditionalGeneration, LlavaNextIvtpForConditionalGeneration

    source = LlavaIvtpForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    old = source.config
    config = IvtpNextConfig(
        vision_config=old.vision_config.to_dict(), text_config=old.text_config.to_dict(),
        image_token_index=old.image_token_index, vision_feature_layer=old.vision_feature_layer,
        vision_feature_select_strategy=old.vision_feature_select_strategy, image_grid_pinpoints=NEXT_PINPOINTS,
        projector_hidden_act=old.projector_hidden_act, multimodal_projector_bias=old.multimodal_projector_bias,
        clip_text_encoder=old.clip_text_encoder, guidance=old.guidance, tau=old.tau, group_size=old.group_size,
        pruning_method="ivtp", pruning_options={"visual_tokens": NEXT_BUDGET}, pad_token_id=old.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaNextIvtpForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or missing != ["model.image_newline"]:
        raise RuntimeError(f"the v2 checkpoint {base} does not map onto the NeXT model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
    return model, tokenizer


def layout_of(config, image_size) -> "NextLayout":  # noqa: F821
    """The packed layout of an image of `image_size` `(height, width)` under `config`."""
    from modeling_llava_ivtp.layout_next import next_layout

    return next_layout(image_size, config.image_grid_pinpoints, config.vision_config.image_size,
                       config.vision_config.patch_size)


# ----------------------------------------------------------------------------------------------------------------
# Data: scenes, their crops' tower features, their questions
# ----------------------------------------------------------------------------------------------------------------
def _scene(job: tuple[str, int, int, tuple[str, ...]]) -> dict:
    split, index, questions, kinds = job
    scene = scenes.example(split, index, kinds=kinds, task=scenes.NEXT)
    turns = scenes.training_turns(split, index, questions, kinds, scenes.NEXT)
    return {"image": np.asarray(scene.image, dtype=np.uint8), "question": scene.question, "answer": scene.answer,
            "kind": scene.kind, "turns": [(q, a) for q, a, _ in turns]}


@torch.no_grad()
def crop_features(model, processor, images: list[np.ndarray], dtype=torch.float16) -> list[torch.Tensor]:
    """Per image, the frozen tower's patch features of each of its crops at the feature layer, `(crops, patches,
    hidden)` in `dtype` (float16 to hold a training set in memory), as the model's forward computes them (the image
    processor's crops, CLS dropped)."""
    from PIL import Image

    tower = model.model.vision_tower.eval()
    inputs = processor.image_processor([Image.fromarray(image) for image in images], return_tensors="pt")
    features = []
    for pixels, size in zip(inputs["pixel_values"], inputs["image_sizes"].tolist()):
        crops = layout_of(model.config, size).crops
        out = tower(pixel_values=pixels[:crops], output_hidden_states=True)
        features.append(out.hidden_states[model.config.vision_feature_layer][:, 1:].to(dtype).clone())
    return features


def build_next_split(model, processor, split: str, count: int, questions: int, kinds, log=print,
                     workers: int = 2, chunk: int = 100) -> dict:
    """Scenes `0..count-1` of `split` of `scenes.NEXT`: each image's size `(height, width)`, crop features, own
    question, answer and kind, and up to `questions` training turns. Scenes are drawn by `workers` spawned
    processes, a chunk at a time; the tower runs here."""
    start = time.time()
    data = {"sizes": [], "features": [], "question": [], "answer": [], "kind": [], "turns": []}
    jobs = [(split, index, questions, tuple(kinds)) for index in range(count)]
    with get_context("spawn").Pool(workers) as pool:
        for begin in range(0, count, chunk):
            rows = pool.map(_scene, jobs[begin:begin + chunk])
            data["features"] += crop_features(model, processor, [row["image"] for row in rows])
            data["sizes"] += [row["image"].shape[:2] for row in rows]
            for key in ("question", "answer", "kind", "turns"):
                data[key] += [row[key] for row in rows]
            if begin // chunk % 10 == 0:
                log(f"{split}: {begin + len(rows)} / {count} scenes in {time.time() - start:.0f} s")
    return data


def packed_visual_tokens(model, features: list[torch.Tensor], sizes) -> tuple[torch.Tensor, list[int]]:
    """Every image's visual tokens in the LLM's space, packed as the model's forward packs them (each crop through
    the projector, the tiles unpadded, the newline after each row), concatenated; and each image's count."""
    packed = []
    for crop_feature, size in zip(features, sizes):
        projected = model.model.multi_modal_projector(crop_feature.float())
        packed.append(layout_of(model.config, tuple(size)).pack(projected, model.model.image_newline))
    return torch.cat(packed), [len(tokens) for tokens in packed]


@torch.no_grad()
def next_accuracy(model, tokenizer, data: dict, count: int, batch: int = 25) -> dict:
    """Accuracy at full tokens on the first `count` scenes (the most likely first answer token, as
    `train.quick_accuracy`), per question kind."""
    model.eval()
    count = min(count, len(data["question"]))
    encoder = v2.TurnEncoder(tokenizer, 0)
    hits: dict[str, list[int]] = {}
    for begin in range(0, count, batch):
        rows = range(begin, min(begin + batch, count))
        visual, lengths = packed_visual_tokens(model, [data["features"][i] for i in rows], [data["sizes"][i] for i in rows])
        turns = [encoder.turn(data["question"][i], data["answer"][i], length) for i, length in zip(rows, lengths)]
        ids, labels = v2._right_padded([t for t, _ in turns], [label for _, label in turns], tokenizer.pad_token_id)
        first = (labels != -100).long().argmax(dim=1)
        logits = v2.full_token_logits(model, ids, None, projected=visual)
        predicted = logits[torch.arange(len(rows)), first - 1].argmax(-1)
        expected = ids[torch.arange(len(rows)), first]
        for i, hit in zip(rows, (predicted == expected).tolist()):
            hits.setdefault(data["kind"][i], []).append(int(hit))
    every = [hit for values in hits.values() for hit in values]
    return {"accuracy": sum(every) / len(every), **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


# ----------------------------------------------------------------------------------------------------------------
# Training and the checkpoint
# ----------------------------------------------------------------------------------------------------------------
def train_next(base: Path, work: Path, out: Path, train_count: int, val_count: int, steps: int, batch_size: int,
               lr: float, questions: int, seed: int = 0, kinds=scenes.TASK_KINDS, overwrite: bool = False,
               tau_questions: int | None = None, log=print) -> dict:
    """Build the NeXT model from `base`, train it on `scenes.NEXT` and write the checkpoint to `out` (see the module
    docstring); returns the figures the card states."""
    v2.check_checkpoint_out(out, overwrite)
    kinds = scenes.check_kinds(kinds)
    start = time.time()
    model, tokenizer = next_model_from(base, seed)
    processor = next_processor(tokenizer)
    train = build_next_split(model, processor, "train", train_count, questions, kinds, log)
    val = build_next_split(model, processor, "validation", val_count, 1, kinds, log)
    before = next_accuracy(model, tokenizer, val, val_count)
    log(f"features of {train_count} + {val_count} scenes in {time.time() - start:.0f} s; at the v2 weights: {json.dumps(before)}")
    packer = v2.QuestionPacker(tokenizer, 0, model.config.image_token_id)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def step_loss(step: int) -> torch.Tensor:
        index = torch.randint(0, train_count, (batch_size,), generator=generator).tolist()
        visual, lengths = packed_visual_tokens(model, [train["features"][i] for i in index], [train["sizes"][i] for i in index])
        ids, labels, positions, mask = packer([train["turns"][i] for i in index], lengths)
        return v2.llava_loss(model, ids, labels, None, mask, positions, projected=visual)

    v2.optimise(model, step_loss, steps, lr, lambda: next_accuracy(model, tokenizer, val, min(val_count, 200)),
                start, log, name="next")
    metrics = next_accuracy(model, tokenizer, val, val_count)
    metrics.update(train_seconds=time.time() - start, steps=steps, batch_size=batch_size, lr=lr, questions=questions,
                   train=train_count, validation=val_count, kinds=list(kinds), before=before, base=str(base))
    log(json.dumps(metrics))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), work / "next.pt")
    (work / "next-metrics.json").write_text(json.dumps(metrics, indent=2))
    save_next(model, processor, out, metrics, kinds, tau_questions or v2.TAU_CALIBRATION_QUESTIONS)
    return metrics


def save_next(model, processor, out: Path, metrics: dict, kinds, tau_questions: int) -> Path:
    """The checkpoint: `tau` calibrated on the first `tau_questions` NeXT validation questions (the rule of
    `llava-ivtp calibrate-tau`), float16 safetensors (loaded in float32), the processor, a card."""
    from llava_ivtp.evaluation.calibrate import calibrate

    model.load_state_dict({name: value.to(torch.float16).to(value.dtype) for name, value in model.state_dict().items()})
    records = [scenes.example("validation", index, kinds=kinds, task=scenes.NEXT).record() for index in range(tau_questions)]
    calibration = calibrate(model, processor, records, v2.TAU_QUANTILE)
    model.config.tau = calibration["tau"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict={name: value.to(torch.float16) for name, value in model.state_dict().items()})
    processor.save_pretrained(out)
    (out / "README.md").write_text(next_card(metrics, calibration))
    return out


def next_card(metrics: dict, calibration: dict) -> str:
    kinds = ", ".join(f"{key.removeprefix('accuracy_')} {value:.3f}" for key, value in metrics.items()
                      if key.startswith("accuracy_"))
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags: [llava-next, ivtp, token-pruning, testbed]
---

# llava-ivtp LLaVA-NeXT testbed

A tiny LLaVA-NeXT-IVTP (`LlavaNextIvtpForConditionalGeneration`), made by
`python -m llava_ivtp.testbed.train next` from the v2 testbed model `{metrics['base']}` and fine-tuned on the
high-resolution scenes of `llava_ivtp/testbed/scenes.py` (`scenes.NEXT`: 192-384 px canvases of coloured shapes,
one-word answers), to measure what pruning costs where an image has several crops. Not a general model.

- Towers: the v2 testbed's CLIP (192 px crops, patch 16: 144 patches per crop), frozen. AnyRes grids of 192 px
  tiles {NEXT_PINPOINTS} (height, width): an image brings 444-744 visual tokens (base crop, unpadded tiles, a
  newline per row).
- Projector, Llama and newline trained at full tokens, {metrics['steps']} steps of {metrics['batch_size']} scenes at lr
  {metrics['lr']:g}, up to {metrics['questions']} questions each, {metrics['train']} training scenes:
  validation accuracy {metrics['accuracy']:.3f} ({kinds}; {metrics['validation']} questions; at the v2 weights
  before training {metrics['before']['accuracy']:.3f}), {metrics['train_seconds'] / 60:.0f} min on 2 CPU cores.
- Pruning (IvtpNextConfig): IVTP at {NEXT_BUDGET} visual tokens per image; `tau` {calibration['tau']}:
  {calibration['rule']} ({calibration['questions']} NeXT validation questions).

Load with `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(path, trust_remote_code=True)`.
"""
