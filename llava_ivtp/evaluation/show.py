"""`llava-ivtp show` (paper Fig. 5): one image and question -> a PNG with the patches each pruning setting keeps.

For every setting (e.g. `stage1@16`, TopK-like vision-only pruning, against `ivtp@16`), one row: the patches kept
after stage 1 and after each LLM group, pruned patches greyed out on the image; under the rows, the instruction's
tokens coloured by their relevance to the image (eq. 7), those `>= tau` (averaged into the pseudo-CLS, eq. 8)
underlined. `render` returns the figure, `overlay` the image of one panel. A LLaVA-NeXT checkpoint shows every crop
the vision tower saw (`crop_panel`): the base crop, then the tiles stitched into the grid (letterbox padding
included), each kept token on the patch it stands for (the newline tokens are counted in the title).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


COMMAND = "show"


def overlay(image: np.ndarray, kept: list[int], grid, strength: float = 0.75) -> np.ndarray:
    """`image` `(H, W, 3)` uint8 with every patch not in `kept` (row-major indices of a `grid` x `grid` patch grid,
    or `(rows, columns)`) blended towards grey by `strength`; kept patches are unchanged."""
    rows, columns = (grid, grid) if isinstance(grid, int) else grid
    height, width = image.shape[:2]
    patch_h, patch_w = height // rows, width // columns
    keep = np.zeros(rows * columns, dtype=bool)
    keep[np.asarray(kept, dtype=np.int64)] = True
    mask = np.kron(keep.reshape(rows, columns), np.ones((patch_h, patch_w), dtype=bool))
    out = image.astype(np.float32).copy()
    out[~mask] = out[~mask] * (1 - strength) + 200.0 * strength
    return out.astype(np.uint8)


@torch.no_grad()
def pruning_of(model, processor, image, question: str) -> dict:
    """One forward: the patches kept after stage 1 and after each LLM group, and the instruction's tokens with
    their relevance and whether they formed the pseudo-CLS."""
    from llava_ivtp.evaluation.eval import prompt_of

    inputs = processor(images=[image], text=[prompt_of(question)], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model(**inputs, use_cache=False, logits_to_keep=1)
    crops = crop_images(processor, inputs) if "image_sizes" in inputs else None
    stages = []
    if out.vision_keep_indices is not None and model.config.schedule and model.config.schedule["vision"]:
        stages.append(("after stage 1", out.vision_keep_indices[0].tolist()))
    for group, kept in enumerate(out.llm_keep_indices or ()):
        stages.append((f"after LLM group {group + 1}", kept[0].tolist()))
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    mask = inputs["instruction_mask"][0].bool().tolist() if "instruction_mask" in inputs else [False] * len(tokens)
    relevance = out.instruction_relevance[0].tolist() if out.instruction_relevance is not None else None
    selected = out.pseudo_cls_tokens[0].tolist() if out.pseudo_cls_tokens is not None else [False] * len(tokens)
    instruction = [
        (token.replace("\u2581", " "), None if relevance is None else relevance[i], bool(selected[i]))
        for i, token in enumerate(tokens) if mask[i]
    ]
    return {"stages": stages, "instruction": instruction, "crops": crops,
            "image_sizes": inputs["image_sizes"][0].tolist() if crops is not None else None}


def crop_images(processor, inputs) -> np.ndarray:
    """LLaVA-NeXT: the crops the vision tower saw `(crops, H, W, 3)` uint8, the processor's `pixel_values` with its
    normalisation undone (the stitched tiles show the letterbox padding as the tower saw it)."""
    image_processor = processor.image_processor
    mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = inputs["pixel_values"][0].float().cpu().numpy() * std + mean
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def crop_panel(model, crops: np.ndarray, image_size, kept: list[int] | None) -> tuple[np.ndarray, int]:
    """LLaVA-NeXT: one panel of every crop -- the base crop, a white gap, the tiles stitched into their grid -- with
    the patches of the packed tokens `kept` (indices into the image's packed sequence; -1: none; `None`: all of them)
    left clear and the rest greyed; returns it and how many kept tokens are newlines."""
    from modeling_llava_ivtp.layout_next import NEWLINE

    layout = model.image_layouts([list(image_size)])[0]
    kept = range(layout.length) if kept is None else kept
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    patches, (rows, columns) = side * side, layout.grid
    sources = [layout.source[index] for index in kept if index >= 0]
    base = [source for source in sources if source != NEWLINE and source < patches]
    tiles = []
    for source in sources:
        if source == NEWLINE or source < patches:
            continue
        tile, patch = divmod(source - patches, patches)
        tiles.append(((tile // columns) * side + patch // side) * columns * side + (tile % columns) * side + patch % side)
    height, width = crops.shape[1:3]
    stitched = crops[1 : 1 + rows * columns].reshape(rows, columns, height, width, 3)
    stitched = stitched.transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, 3)
    left = overlay(crops[0], base, side)
    right = overlay(stitched, tiles, (rows * side, columns * side))
    scale = right.shape[0] // left.shape[0]
    left = np.kron(left, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else left
    canvas = np.full((max(left.shape[0], right.shape[0]), left.shape[1] + 8 + right.shape[1], 3), 255, dtype=np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + 8 :] = right
    return canvas, sum(source == NEWLINE for source in sources)


def render(model, processor, image, question: str, settings: list[str]):
    """The figure: a row per setting (the image, then the kept patches after each pruning step), the instruction's
    tokens by relevance below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llava_ivtp.evaluation.eval import parse_setting

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pixels = np.asarray(image.convert("RGB").resize((model.config.vision_config.image_size,) * 2))
    rows = []
    for spec in settings:
        with parse_setting(spec, model.config).applied(model) as config:
            rows.append((spec, pruning_of(model, processor, image, question), config.tau))
    columns = 1 + max(len(result["stages"]) for _, result, _ in rows)
    width = 2.3 * columns
    figure, axes = plt.subplots(len(rows), columns, figsize=(width, 2.4 * len(rows) + 1.3), squeeze=False)
    for row, (spec, result, _) in enumerate(rows):
        if result["crops"] is not None:  # LLaVA-NeXT: every crop, as the tower saw them
            axes[row][0].imshow(crop_panel(model, result["crops"], result["image_sizes"], None)[0])
        else:
            axes[row][0].imshow(pixels)
        axes[row][0].set_title(spec, fontsize=9)
        for column, (title, kept) in enumerate(result["stages"], start=1):
            if result["crops"] is not None:
                panel, newlines = crop_panel(model, result["crops"], result["image_sizes"], kept)
                count = sum(index >= 0 for index in kept)
                axes[row][column].imshow(panel)
                axes[row][column].set_title(f"{title}: {count} ({newlines} newlines)", fontsize=8)
                continue
            axes[row][column].imshow(overlay(pixels, kept, grid))
            axes[row][column].set_title(f"{title}: {len(kept)}", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout(rect=(0, 1.3 / (2.4 * len(rows) + 1.3), 1, 1))
    # The instruction, one token after another across the figure, coloured by relevance (bold: in the pseudo-CLS).
    guided = next((result for spec, result, _ in rows if any(r is not None for _, r, _ in result["instruction"])), None)
    height = 2.4 * len(rows) + 1.3
    figure.text(0.02, 0.9 / height, f"Q: {question}", fontsize=9)
    if guided is not None:
        colormap = plt.get_cmap("viridis")
        x = 0.02
        for token, relevance, selected in guided["instruction"]:
            color = "grey" if relevance is None else colormap(max(0.0, min(1.0, (relevance + 1) / 2)))
            label = token.strip() if relevance is None else f"{token.strip()} ({relevance:+.2f})"
            figure.text(x, 0.55 / height, label, fontsize=8, color=color, fontweight="bold" if selected else "normal")
            x += (len(label) + 2) * 8 * 0.62 / 72 / width
        figure.text(0.02, 0.2 / height, f"relevance to the image (eq. 7); bold: >= tau = {rows[0][2]}, averaged into "
                    "the pseudo-CLS (eq. 8)", fontsize=7)
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (loaded with trust_remote_code)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an image file (with --question)")
    source.add_argument("--testbed", metavar="SPLIT:INDEX", help="a testbed scene and its question, e.g. test:5 (a question about a small object)")
    parser.add_argument("--question", default=None)
    parser.add_argument("--settings", nargs="+", default=["stage1@16", "ivtp@16"])
    parser.add_argument("--out", type=Path, required=True,
                        help="the figure to write (.png, .pdf or .svg): a new path, or a figure this command wrote "
                        "(replaced)")


def run(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from llava_ivtp.cli import load_ivtp_checkpoint, prepare_output, report_error, resolve_checkpoint, save_figure
    from llava_ivtp.evaluation.eval import EvalError

    try:
        prepare_output("--out", args.out, EvalError, command=COMMAND, kind="figure")
        if args.image is not None and args.out.expanduser().resolve() == args.image.expanduser().resolve():
            raise EvalError(f"--out {args.out}: is also --image; give the figure its own path.")
        resolve_checkpoint("--model", args.model, EvalError)  # before anything is read or loaded
        if args.testbed is not None:
            from llava_ivtp.testbed import scenes

            try:
                scene = scenes.scene_of(args.testbed)
            except ValueError as error:
                raise EvalError(f"--testbed {error}") from None
            image, question = scene.image, args.question or scene.question
        else:
            if args.question is None:
                raise EvalError("--image needs --question.")
            if not args.image.is_file():
                raise EvalError(f"--image {args.image}: no such file.")
            try:
                image, question = Image.open(args.image).convert("RGB"), args.question
            except (UnidentifiedImageError, OSError) as error:
                raise EvalError(f"--image {args.image}: not an image file PIL can read ({error}).") from None
        model, processor = load_ivtp_checkpoint("--model", args.model, EvalError)
        figure = render(model, processor, image, question, args.settings)
    except EvalError as error:
        return report_error(COMMAND, error)
    save_figure(figure, args.out, COMMAND, dpi=110)
    print(args.out)
    return 0


__all__ = ["add_arguments", "crop_images", "crop_panel", "overlay", "pruning_of", "render", "run"]
