"""Where the testbed CLIP's CLS attends: the picture and the figures `docs/accuracy.md` compares with what is
reported of CLIP ViT-L-14-336's CLS.

The methods that rank patches by the vision tower's CLS (TopK, EViT, VisionZip, TopK+, IVTP's stage 1, and
VisPruner's important tokens) read the CLS row of the attention at the feature layer (LLaVA's
`vision_feature_layer`, the second-to-last layer), averaged over heads. This script draws that row over a few
validation scenes and measures, over `--limit` validation scenes:

- the share of the CLS's attention on object patches (against the share of the patches that are objects), on the
  patches of small objects, and on the `--top` patches it ranks highest;
- the share of those top patches that show an object, and the share of scenes where every object (every small
  object) has a patch among them;
- per colour, the CLS's mean attention on a patch of an object of that colour, over its mean on any object patch
  (1.0 for every colour if the CLS does not prefer one);
- the mean norm of the top patches' features against the other patches' (high-norm "artifact" tokens are what the
  CLS of large ViTs attends to, reported for OpenAI's CLIP ViT-L by Darcet et al., "Vision Transformers Need
  Registers", 2024).

    python examples/cls_attention.py [--model DIR] [--limit 300] [--top 16] [--out docs/accuracy/cls-attention.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ivtp.testbed import scenes as testbed


TESTBED_MODEL = Path(__file__).resolve().parent.parent / "models" / "llava-ivtp-testbed"


@torch.no_grad()
def cls_rows(model, processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """`(attention, norms)`: the CLS row of the head-averaged attention at the feature layer over the patches,
    `(images, patches)`, and the patches' feature norms at that layer."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(model.dtype)
    tower = model.model.vision_tower
    out = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer
    attention = out.attentions[layer].mean(dim=1)[:, 0, 1:]
    norms = out.hidden_states[layer][:, 1:].norm(dim=-1)
    return attention, norms


def measure(model, processor, examples, top: int) -> dict:
    mass_objects, share_objects, mass_small, share_small, mass_top = [], [], [], [], []
    top_on_objects, every_object, every_small, norm_ratio = [], [], [], []
    by_color = {color: [] for color in testbed.COLORS}
    object_patch_attention = []
    for begin in range(0, len(examples), 50):
        batch = examples[begin:begin + 50]
        attention, norms = cls_rows(model, processor, [scene.image for scene in batch])
        for scene, row, norm in zip(batch, attention, norms):
            owners = torch.from_numpy(scene.patch_objects.reshape(-1))
            on_object = owners > 0
            small = torch.zeros_like(on_object)
            for index, obj in enumerate(scene.objects):
                if obj.small:
                    small |= owners == index + 1
            order = row.argsort(descending=True)[:top]
            chosen = torch.zeros_like(on_object)
            chosen[order] = True
            mass_objects.append(float(row[on_object].sum() / row.sum()))
            share_objects.append(float(on_object.float().mean()))
            mass_small.append(float(row[small].sum() / row.sum()))
            share_small.append(float(small.float().mean()))
            mass_top.append(float(row[order].sum() / row.sum()))
            top_on_objects.append(float(on_object[order].float().mean()))
            kept = set(owners[chosen].tolist())
            every_object.append(all(index + 1 in kept for index in range(len(scene.objects))))
            every_small.append(all(index + 1 in kept for index, obj in enumerate(scene.objects) if obj.small))
            norm_ratio.append(float(norm[chosen].mean() / norm[~chosen].mean()))
            share = row / row.sum()
            object_patch_attention += share[on_object].tolist()
            for index, obj in enumerate(scene.objects):
                by_color[obj.color] += share[owners == index + 1].tolist()
    mean = lambda values: round(statistics.mean(values), 3)  # noqa: E731
    return {
        "scenes": len(examples), "top": top,
        "attention_on_objects": mean(mass_objects), "patches_on_objects": mean(share_objects),
        "attention_on_small_objects": mean(mass_small), "patches_on_small_objects": mean(share_small),
        "attention_on_top": mean(mass_top), "top_patches_on_objects": mean(top_on_objects),
        "scenes_with_every_object_in_top": mean(every_object), "scenes_with_every_small_object_in_top": mean(every_small),
        "top_norm_over_other_norm": mean(norm_ratio),
        "attention_per_patch_by_color_over_object_mean": {
            color: round(statistics.mean(values) / statistics.mean(object_patch_attention), 2)
            for color, values in by_color.items() if values},
    }


def picture(model, processor, examples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention, _ = cls_rows(model, processor, [scene.image for scene in examples])
    grid = testbed.GRID
    figure, axes = plt.subplots(2, len(examples), figsize=(2.2 * len(examples), 4.6), squeeze=False)
    for column, (scene, row) in enumerate(zip(examples, attention)):
        axes[0][column].imshow(scene.image)
        axes[0][column].set_title(f"validation:{scene.index}", fontsize=8)
        heat = (row / row.max()).reshape(grid, grid).numpy()
        axes[1][column].imshow(scene.image)
        axes[1][column].imshow(np.kron(heat, np.ones((testbed.PATCH_SIZE, testbed.PATCH_SIZE))), cmap="magma",
                               alpha=0.65, vmin=0, vmax=1)
        axes[1][column].set_title("CLS attention", fontsize=8)
        for axis in axes[:, column]:
            axis.axis("off")
    figure.suptitle("The testbed CLIP's CLS row of attention at the feature layer (head mean, scaled to its maximum)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TESTBED_MODEL))
    parser.add_argument("--limit", type=int, default=300, help="validation scenes measured")
    parser.add_argument("--top", type=int, default=16, help="the patches the CLS ranks highest")
    parser.add_argument("--pictured", type=int, default=6, help="validation scenes drawn")
    parser.add_argument("--out", type=Path, default=None, help="the picture (PNG); none when not given")
    args = parser.parse_args(argv)
    if args.limit < 1 or not 1 <= args.top <= testbed.GRID**2:
        parser.error(f"--limit must be >= 1 and --top in 1..{testbed.GRID ** 2}")
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True,
                                                        attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    figures = measure(model, processor, testbed.examples("validation", args.limit), args.top)
    print(json.dumps(figures, indent=2))
    if args.out is not None:
        picture(model, processor, testbed.examples("validation", args.pictured), args.out)
        print(args.out)
    return figures


if __name__ == "__main__":
    main()
