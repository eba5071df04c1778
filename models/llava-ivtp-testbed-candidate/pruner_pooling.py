"""Spatial pooling baseline: average the patch grid over `rows x columns` rectangular cells.

Source: the IVTP paper (Huang et al.), sec. 4.1 "Comparison Details", Tables 1-2 ("Spatial pooling", "subsampling
predicated on spatial correlations"). The paper gives no formula; the rule here:
- grid: `n = side * side` patches, row-major (patch `p` sits at row `p // side`, column `p % side`);
- split: `rows * columns == k` closest to square, `rows` = the largest divisor of `k` with `rows <= sqrt(k)`,
  `columns = k // rows` (so `rows <= columns`); a `k` whose split has `columns > side` (e.g. a prime above `side`)
  is refused;
- cells: patch row `r` belongs to cell row `r * rows // side` (columns likewise), a partition into cells whose
  heights (widths) differ by at most one; for `side % rows == 0` it is `avg_pool2d` with kernel `side // rows`;
- each cell's token is the plain mean of its patches and takes the position of the cell's centre patch
  (`(start + end) // 2` in each axis: the lower-right of the four central patches for even sizes).

Integration: after the vision tower, on the patch features of LLaVA's feature layer (CLS dropped), or on the
projected image features; no attention rows. LLaVA-1.5's projector is a GELU MLP, so the two sites differ.
"""

from __future__ import annotations

import math

import torch
from .attention_rows import moved
from .pruner_base import ProjectedPruner, Selection, crop_budget, register_pruner


def pooling_grid_split(num_keep: int, side: int) -> tuple[int, int]:
    """`(rows, columns)` with `rows * columns == num_keep`, closest to square, `rows <= columns <= side`."""
    if not 1 <= num_keep <= side * side:
        raise ValueError(f"num_keep must be in [1, {side * side}] for a {side}x{side} grid, got {num_keep}.")
    rows = max(d for d in range(1, math.isqrt(num_keep) + 1) if num_keep % d == 0)
    columns = num_keep // rows
    if columns > side:
        raise ValueError(
            f"num_keep={num_keep} splits at best into {rows}x{columns} cells, wider than the {side}x{side} grid; "
            f"num_keep must be rows*columns with both <= {side}."
        )
    return rows, columns


def spatial_pooling(features: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool a square, row-major patch grid down to `num_keep` tokens.

    Args:
        features: `(batch, side * side, dim)`.
        num_keep: the number of cells, `rows * columns` (see `pooling_grid_split`).

    Returns:
        `(keep_indices, merged_features)`: `(batch, num_keep)` int64, the centre patch of each cell (sorted
        ascending, as cells are row-major), and `(batch, num_keep, dim)` cell means in `features`' dtype; row `i`
        sits at position `keep_indices[:, i]`.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, side*side, dim), got shape {tuple(features.shape)}.")
    num_tokens = features.shape[1]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"features must hold a square grid of patches, got {num_tokens} tokens.")
    rows, columns = pooling_grid_split(num_keep, side)
    device = features.device
    line = torch.arange(side, device=device)
    # Cell of every patch, row-major over cells: cell row r*rows//side, cell column c*columns//side.
    cell = ((line * rows // side)[:, None] * columns + (line * columns // side)[None, :]).reshape(-1)
    membership = moved(torch.nn.functional.one_hot(cell, num_keep).T, dtype=torch.float32)  # (num_keep, n)
    weights = membership / membership.sum(dim=-1, keepdim=True)
    merged = moved(torch.einsum("kn,bnd->bkd", weights, moved(features, dtype=torch.float32)), dtype=features.dtype)

    return pooling_centres(num_keep, side, device).expand(features.shape[0], -1), merged


def pooling_centres(num_keep: int, side: int, device=None) -> torch.Tensor:
    """`(num_keep,)`: the centre patch of each cell of `spatial_pooling`'s grid, row-major (increasing)."""
    rows, columns = pooling_grid_split(num_keep, side)

    def centres(parts: int) -> torch.Tensor:
        # Cell j spans [ceil(j*side/parts), ceil((j+1)*side/parts)); its centre is (start + end) // 2.
        bounds = (torch.arange(parts + 1, device=device) * side + parts - 1) // parts
        return (bounds[:-1] + bounds[1:]) // 2

    return (centres(rows)[:, None] * side + centres(columns)[None, :]).reshape(-1)


@register_pruner
class PoolingPruner(ProjectedPruner):
    """Spatial pooling on the projected image features: the patch grid averaged over `rows x columns` cells to the
    budget (each cell's token at its centre patch)."""

    name = "pooling"
    options = {"visual_tokens": 64}
    variable_lengths = True  # LLaVA-NeXT: each crop's grid alone (`pack_crops`)
    prunes_crops = True

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        side = math.isqrt(config.num_patches)
        try:
            pooling_grid_split(crop_budget(config, values["visual_tokens"]), side)
        except ValueError as error:
            what = "a crop's share of it, visual_tokens // max_crops" if config.max_crops > 1 else "it"
            raise ValueError(f"`pruning_options['visual_tokens']` of pruning_method='pooling' ({what}): {error}") from None

    def on_projected(self, features):
        if self.config.max_crops > 1:  # LLaVA-NeXT: each crop's grid, before packing (`pack_crops`)
            return None
        return super().on_projected(features)

    def select(self, features, num_keep):
        return Selection(*spatial_pooling(features, num_keep))

    def pack_crops(self, layout, crop_features, patch_ids, newline, newlines, image=0, crop_hidden_states=None):
        """LLaVA-NeXT (ours; no published NeXT code): each crop's grid pooled alone to the budget's share
        (`visual_tokens // max_crops` cells), each cell's token where stock packing puts its centre patch; a cell
        whose centre lies on a tile's letterbox padding is left out (stock unpadding removes that place), and so
        are the newlines (nothing after the projector spends the budget over them)."""
        patches, share = self.config.num_patches, self.crop_budget
        keep, merged = spatial_pooling(crop_features, share)
        centres = pooling_centres(share, math.isqrt(patches))
        length = int(layout.shown(patches)[:, centres].sum())  # on the host: the cells' centres are fixed
        tokens, positions = layout.pack_kept(merged, keep, newline, patches, length, newlines=False)
        return tokens, positions, positions
