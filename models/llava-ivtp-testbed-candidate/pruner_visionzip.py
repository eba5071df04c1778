"""VisionZip's dominant + contextual token selection, on plain tensors.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv 2412.04467; method section, "Dominant Token Selection" and "Contextual Tokens Merging"; rule as in
the authors' code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`):

1. Dominant: the tokens with the largest CLS attention (summed over heads; the mean ranks the same) at the feature
   layer. The official code always keeps the CLS token itself and counts it among the dominant tokens.
2. Contextual: the remaining tokens, in original order, give `num_contextual` targets evenly spaced among them
   (every `step = max(1, remaining // num_contextual)`-th, the first `num_contextual`). Every other remaining token
   goes to the target whose key is most cosine-similar (keys of the same layer, averaged over heads). A group's
   feature is `target + mean(assigned tokens)` (just `target` if none), exactly as the official code computes it;
   the paper's text speaks of averaging, which would be `(target + sum) / (1 + count)`.

Default for 64 tokens on LLaVA-1.5: `dominant=54, contextual=10` (README), where 54 = CLS + 53 patches
(`visionzip(model, dominant=54, contextual=10)` sets `dominant_num = dominant - 1` patches).

The tokens the LLM receives (`visionzip/clip_encoder.py`, `CLIPVisionTower_VisionZip.forward`, and `llava_arch.py`):
`cat([dominant_tokens, contextual_tokens])`, the dominant ones being the CLS and the 53 patches in their original
order (a `masked_select`), the contextual ones in their targets' order; the projector maps all 64 and the LLM gets
them as one block with fresh position ids (`position_ids=None`). That is the default here (`layout="visionzip"`):
the CLS's feature at the feature layer reaches the LLM, the block comes in VisionZip's order, and the position rule
is `"renumbered"`. Option `layout="patches"` (ours) keeps patches only (LLaVA's "default" strategy drops the CLS):
`dominant` patches plus the contextual tokens, each contextual token at its target's position, in patch order.

Integration (site: vision tower, at `vision_feature_layer` = -2, before the projector): that layer's output
features, its CLS attention row over the tokens (head-averaged; the code sums over heads, which ranks the same), and
its key states averaged over heads (the code's `metric`: the layer's keys before rotary-free CLIP attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_rows import moved
from .pruner_base import (
    Selection,
    VisionLayerPruner,
    check_choice,
    check_int,
    crop_budget,
    register_pruner,
    select_keep_indices,
)


# Which tokens reach the LLM: VisionZip's (the CLS and the dominant patches, then the contextual tokens) or ours
# (patches only, at their positions).
LAYOUTS = ("visionzip", "patches")


def visionzip_keep_indices(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    num_dominant: int,
    num_contextual: int,
    cls_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant tokens by CLS attention plus contextual groups merged by key similarity.

    Args:
        features: `(batch, n, dim)`, the feature layer's output.
        cls_attention: `(batch, n)`, the CLS row of that layer's attention (head-averaged or summed).
        keys: `(batch, n, key_dim)`, that layer's key states averaged over heads (the merge metric).
        num_dominant: dominant tokens kept, the CLS token included when `cls_index` is given.
        num_contextual: contextual groups; `num_dominant + num_contextual` must be in `[1, n]`.
        cls_index: a token always kept as dominant (the CLS), or None.

    Returns:
        `(keep_indices, kept_features, contextual)`: int64 `(batch, k)` sorted ascending, `k = num_dominant +
        num_contextual`; `(batch, k, dim)` in `features.dtype`, row i being the token at `keep_indices[:, i]`
        (dominant: unchanged; contextual: its group's merged feature, sitting at the target's position); bool
        `(batch, k)`, which rows are contextual tokens.
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (batch, n, dim), got {tuple(features.shape)}.")
    batch, num_tokens, dim = features.shape
    if cls_attention.shape != (batch, num_tokens) or keys.shape[:2] != (batch, num_tokens) or keys.dim() != 3:
        raise ValueError(
            f"cls_attention must be {(batch, num_tokens)} and keys {(batch, num_tokens)} + (key_dim,), "
            f"got {tuple(cls_attention.shape)} and {tuple(keys.shape)}."
        )
    if num_dominant < 0 or num_contextual < 0 or not 1 <= num_dominant + num_contextual <= num_tokens:
        raise ValueError(
            f"num_dominant and num_contextual must be >= 0 with a sum in [1, {num_tokens}], "
            f"got {num_dominant} and {num_contextual}."
        )
    if cls_index is not None and not (0 <= cls_index < num_tokens and num_dominant >= 1):
        raise ValueError(f"cls_index must be in [0, {num_tokens}) and needs num_dominant >= 1, got {cls_index}.")

    scores = moved(cls_attention, dtype=torch.float32).clone()
    if cls_index is not None:
        scores[:, cls_index] = float("inf")  # the CLS is always dominant
    dominant = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    if num_dominant > 0:
        dominant.scatter_(1, select_keep_indices(scores, num_dominant), True)
    keep = dominant.clone()
    kept_features = moved(features, dtype=torch.float32).clone()

    num_remaining = num_tokens - num_dominant
    if num_contextual > 0:
        # Remaining tokens in original order (each row has the same count).
        remaining = mask_to_indices(~dominant, num_remaining)
        step = max(1, num_remaining // num_contextual)
        is_target = torch.zeros(num_remaining, dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, num_remaining, step, device=features.device)[:num_contextual]] = True
        targets, others = remaining[:, is_target], remaining[:, ~is_target]  # (batch, C), (batch, R - C)
        metric = F.normalize(moved(keys, dtype=torch.float32), dim=-1)
        similarity = gather_rows(metric, others) @ gather_rows(metric, targets).transpose(1, 2)  # (batch, R - C, C)
        assignment = F.one_hot(similarity.argmax(dim=-1), num_contextual).float()  # ties: the first target
        counts = assignment.sum(dim=1).clamp_min(1).unsqueeze(-1)  # (batch, C, 1)
        merged = (
            gather_rows(kept_features, targets)
            + assignment.transpose(1, 2) @ gather_rows(kept_features, others) / counts
        )
        kept_features = kept_features.scatter(1, targets.unsqueeze(-1).expand(-1, -1, dim), merged)  # autograd-safe
        keep.scatter_(1, targets, True)

    keep_indices = mask_to_indices(keep, num_dominant + num_contextual)
    contextual = ~dominant.gather(1, keep_indices)
    return keep_indices, moved(gather_rows(kept_features, keep_indices), dtype=features.dtype), contextual


def visionzip_tokens(
    features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, num_dominant: int, num_contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's tokens of each image as its code hands them to the projector: the CLS, the `num_dominant - 1`
    patches it attends to most (in their order), then the `num_contextual` contextual tokens (in their targets'
    order).

    Args:
        features: `(batch, 1 + n, dim)`, the feature layer's output, the CLS first.
        cls_attention: `(batch, 1 + n)`, the CLS row of that layer's attention (head-averaged or summed).
        keys: `(batch, 1 + n, key_dim)`, that layer's key states averaged over heads.
        num_dominant: dominant tokens, the CLS included (`>= 1`); num_contextual: `>= 0`, the sum at most `1 + n`.

    Returns:
        `(patch_ids, tokens)`: int64 `(batch, k)`, the patch each token stands for (-1: the CLS; a contextual token:
        its target), in VisionZip's order; `(batch, k, dim)` in `features.dtype`.
    """
    if num_dominant < 1:
        raise ValueError(f"num_dominant counts the CLS: it must be >= 1, got {num_dominant}.")
    if num_dominant == 1 and num_contextual == 0:  # the CLS alone (a budget of one token)
        return features.new_full((features.shape[0], 1), -1, dtype=torch.long), features[:, :1]
    keep, kept, contextual = visionzip_keep_indices(
        features[:, 1:], cls_attention[:, 1:], keys[:, 1:], num_dominant - 1, num_contextual
    )
    order = torch.sort(contextual.to(torch.int8), dim=1, stable=True).indices  # dominant first, each in order
    cls_id = keep.new_full((keep.shape[0], 1), -1)
    patch_ids = torch.cat([cls_id, keep.gather(1, order)], dim=1)
    tokens = torch.cat([features[:, :1], gather_rows(kept, order)], dim=1)
    return patch_ids, tokens


def mask_to_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the `count` True entries of each row of a bool `(batch, n)` mask."""
    return torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count].sort(dim=1).values


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, index[b, i]]` for `(batch, n, dim)` and `(batch, k)`."""
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


@register_pruner
class VisionZipPruner(VisionLayerPruner):
    """VisionZip at LLaVA's feature layer: the CLS and the patches it attends to most (dominant), plus contextual
    tokens merging the rest by key similarity, handed to the LLM as one block in VisionZip's order with fresh position
    ids. The 64-token split for LLaVA-1.5 is 54 dominant (the CLS included) + 10 contextual; other budgets keep that
    ratio (`dominant` overrides it).

    Options: `dominant`; `layout`: `"visionzip"` (the code's: the CLS among the dominant tokens, VisionZip's order)
    or `"patches"` (ours: patches only, `dominant` of them, each token at its patch's position)."""

    name = "visionzip"
    options = {"visual_tokens": 64, "dominant": None, "layout": "visionzip"}
    positions = "renumbered"  # llava_arch.py passes the shortened sequence with position_ids=None
    asks_key_means = True  # contextual tokens merge by key similarity
    variable_lengths = True  # LLaVA-NeXT: each crop alone, the code's layout (`pack_crops`)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        check_choice(cls.name, "layout", values["layout"], LAYOUTS, "which tokens reach the LLM, in which order")
        if values["dominant"] is not None:
            low = 1 if values["layout"] == "visionzip" else 0
            check_int(cls.name, "dominant", values["dominant"], low, crop_budget(config, values["visual_tokens"]),
                      "dominant tokens of a crop (the CLS among them with layout 'visionzip'), the rest of its budget "
                      "being contextual")

    def __init__(self, config, context):
        super().__init__(config, context)
        dominant = self.values["dominant"]
        # per crop on LLaVA-NeXT: 640 / 320 / 160 give 108 + 20 / 54 + 10 / 27 + 5 (the paper's Table 9)
        self.dominant = max(1, round(self.crop_budget * 54 / 64)) if dominant is None else dominant

    def pack_crops(self, layout, crop_features, patch_ids, newline, newlines, image=0, crop_hidden_states=None):
        """LLaVA-NeXT as VisionZip's code lays an image out (`llava_arch.py`, `restore_image_features_sorted`): the
        base crop's tokens as the tower gave them (the CLS, the dominant patches, the contextual tokens); then every
        tile's dominant patches in raster order over the stitched grid of tiles (no unpadding: a patch on the
        letterbox padding stays), then the tiles' CLS tokens, then their contextual tokens, tile by tile; no
        newline. Fills the image's first placeholders (positions renumbered)."""
        if self.values["layout"] != "visionzip":
            return super().pack_crops(layout, crop_features, patch_ids, newline, newlines)
        patches, dominant = self.config.num_patches, self.dominant
        tiles, hidden = crop_features.shape[0] - 1, crop_features.shape[-1]
        device = patch_ids.device
        ids = patch_ids[1:]
        dominant_ids = ids[:, 1:dominant]  # the CLS first, then the dominant patches
        order = layout.tile_raster(dominant_ids, patches).flatten().argsort()
        tokens = torch.cat([
            crop_features[0],
            crop_features[1:, 1:dominant].reshape(-1, hidden).index_select(0, order),
            crop_features[1:, 0],
            crop_features[1:, dominant:].reshape(-1, hidden),
        ])
        crop_of = torch.arange(1, tiles + 1, device=device).unsqueeze(1)
        sources = torch.cat([
            patch_ids[0],
            (crop_of * patches + dominant_ids).flatten().index_select(0, order),
            torch.full((tiles,), -1, dtype=torch.long, device=device),
            torch.where(ids[:, dominant:] >= 0, crop_of * patches + ids[:, dominant:], -1).flatten(),
        ])
        stands_for = layout.packed_index(sources, patches)
        return tokens, stands_for, torch.arange(len(tokens), device=device)

    def select(self, hidden_states, request, num_keep):
        contextual = num_keep - self.dominant
        if self.values["layout"] == "visionzip":
            patch_ids, tokens = visionzip_tokens(
                hidden_states, request.probabilities[:, 0], request.key_means, self.dominant, contextual
            )
            return Selection(patch_ids, tokens, ordered=True)
        keep, kept, _ = visionzip_keep_indices(
            hidden_states[:, 1:], request.probabilities[:, 0, 1:], request.key_means[:, 1:], self.dominant, contextual
        )
        return Selection(keep, kept)
