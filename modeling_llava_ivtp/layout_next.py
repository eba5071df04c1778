"""Where each of a LLaVA-NeXT image's visual tokens comes from: the map between the crops' patches and the packed
sequence of placeholders (`LlavaNextModel.pack_image_features`), as indices, so that a pruner can score per crop
and the runner can place what it keeps.

One image of size `(height, width)` is cut into crops: the base image, then the tiles of the grid that
`select_best_resolution` picks among `image_grid_pinpoints`, row by row. Its packed sequence is the base crop's
patches in order, then the tiles stitched into one grid of `rows * side` by `columns * side` patches (`side` patches
per crop edge), unpadded to the image's aspect ratio (the rows or columns of letterbox padding removed, as many on
each side), each row followed by the learned newline. (A grid of one tile still makes two crops, the base and the tile.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution


NEWLINE = -1  # the source of a newline token in `NextLayout.source`


@dataclass(frozen=True)
class NextLayout:
    """One image's packed visual tokens. `source[j]`: the crop patch token `j` is, as `crop * patches + patch` into
    the image's crops' patches flattened (crop 0 the base), or `NEWLINE`. `crops`: how many crops the image has;
    `grid`: `(rows, columns)` of tiles."""

    source: tuple[int, ...]
    crops: int
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        return len(self.source)

    def shown(self, patches: int) -> torch.Tensor:
        """`(crops, patches)` bool: which of each crop's patches the packed sequence holds (every patch of the base
        crop; a tile's patches on the letterbox padding are unpadded away)."""
        shown = torch.zeros(self.crops * patches, dtype=torch.bool)
        shown[torch.tensor([source for source in self.source if source != NEWLINE])] = True
        return shown.view(self.crops, patches)

    def kept_length(self, per_crop: int, patches: int, newlines: bool = True) -> int:
        """The packed length when each crop keeps `per_crop` of its patches, those shown first (`shown`): the base
        crop's, each tile's up to the patches it shows, and (`newlines`) every newline."""
        shown = self.shown(patches).sum(dim=1).tolist()
        kept = min(per_crop, shown[0]) + sum(min(per_crop, count) for count in shown[1:])
        return kept + (self.source.count(NEWLINE) if newlines else 0)

    def pack_kept(self, crop_features: torch.Tensor, kept: torch.Tensor, newline: torch.Tensor, patches: int,
                  length: int, newlines: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed sequence of the kept patches -- `crop_features` `(crops, k, hidden)` of the patches `kept`
        `(crops, k)` of each crop's `patches` -- in stock order, the patches the unpadding removes left out, and
        every newline (`newlines`) or none: `(length, hidden)`, and each token's index in the full packed sequence
        `(length,)`. `length` (host) is `kept_length`."""
        crops, _, hidden = crop_features.shape
        device = kept.device
        flat_kept = (kept + torch.arange(crops, device=device).unsqueeze(1) * patches).flatten()
        grid = crop_features.new_zeros(crops * patches, hidden).index_copy(0, flat_kept, crop_features.reshape(-1, hidden))
        flat = torch.cat([grid, newline.to(grid).unsqueeze(0)])  # the newline last, as in `pack`
        is_kept = torch.zeros(crops * patches + 1, dtype=torch.bool, device=device).index_fill(0, flat_kept, True)
        is_kept[-1] = newlines
        index = torch.tensor([crops * patches if source == NEWLINE else source for source in self.source], device=device)
        order = torch.arange(len(self.source), device=device)
        positions = torch.where(is_kept.index_select(0, index), order, len(self.source)).sort().values[:length]
        # A selection that keeps the shown patches first holds `length` packed tokens; `llava-ivtp flops`' weight-free
        # count keeps arbitrary patches (its scores are zeros): the clamp only keeps its shapes valid.
        return flat.index_select(0, index.index_select(0, positions.clamp_max(len(self.source) - 1))), positions

    def tile_raster(self, tile_patch_ids: torch.Tensor, patches: int) -> torch.Tensor:
        """For patches `tile_patch_ids` `(tiles, k)` of each tile (the crops after the base), their raster index over
        the stitched grid of tiles at full size (before unpadding): the order the peers' NeXT code reads kept tile
        patches in."""
        side = round(patches ** 0.5)
        columns = self.grid[1]
        tile = torch.arange(tile_patch_ids.shape[0], device=tile_patch_ids.device).unsqueeze(1)
        row = (tile // columns) * side + tile_patch_ids // side
        column = (tile % columns) * side + tile_patch_ids % side
        return row * (columns * side) + column

    def pack_base_then_tiles(self, crop_features: torch.Tensor, patch_ids: torch.Tensor,
                             patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The peers' NeXT layout without unpadding or newlines (VisPruner's and CDPruner's code): the base crop's
        kept patches in order, then every tile's kept patches in raster order over the stitched grid of tiles.
        `crop_features` `(crops, k, hidden)` stand for `patch_ids` `(crops, k)`, increasing per crop. Returns
        `Pruner.pack_crops`' triple: the tokens, the packed index each stands for (-1: a patch the stock unpadding
        removes), and the image's first placeholders, which they fill."""
        hidden, device = crop_features.shape[-1], patch_ids.device
        order = self.tile_raster(patch_ids[1:], patches).flatten().argsort()
        tokens = torch.cat([crop_features[0], crop_features[1:].reshape(-1, hidden).index_select(0, order)])
        crop_of = torch.arange(self.crops, device=device).unsqueeze(1)
        sources = (crop_of * patches + patch_ids)
        sources = torch.cat([sources[0], sources[1:].flatten().index_select(0, order)])
        return tokens, self.packed_index(sources, patches), torch.arange(len(tokens), device=device)

    def packed_index(self, sources: torch.Tensor, patches: int) -> torch.Tensor:
        """For crop patches `sources` (`crop * patches + patch`; -1: none), their index in the packed sequence, or
        -1 where it has none (a patch the unpadding removes)."""
        index = torch.full((self.crops * patches + 1,), -1, dtype=torch.long)
        at = [j for j, source in enumerate(self.source) if source != NEWLINE]
        index[torch.tensor([self.source[j] for j in at])] = torch.tensor(at)
        index = index.to(sources.device)
        return index[torch.where(sources >= 0, sources, self.crops * patches)]

    def pack(self, crop_features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """`(length, hidden)`: the packed sequence from `crop_features` `(crops, patches, hidden)` and `newline`
        `(hidden,)`, as stock LLaVA-NeXT packs them (one gather)."""
        flat = crop_features.reshape(-1, crop_features.shape[-1])
        flat = torch.cat([flat, newline.to(flat).unsqueeze(0)])
        index = torch.tensor([len(flat) - 1 if source == NEWLINE else source for source in self.source],
                             device=flat.device)
        return flat.index_select(0, index)


def tile_grid(image_size, grid_pinpoints, crop_size: int) -> tuple[int, int]:
    """`(rows, columns)` of high-resolution tiles for an image of `image_size` `(height, width)`."""
    height, width = select_best_resolution(tuple(int(value) for value in image_size), grid_pinpoints)
    return height // crop_size, width // crop_size


def unpadded_span(original: tuple[int, int], current: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a `current` `(height, width)` patch grid that show an image of `original`
    `(height, width)` letterboxed into it (the padding removed as evenly as stock LLaVA-NeXT removes it)."""
    original_height, original_width = original
    current_height, current_width = current
    if original_width / original_height > current_width / current_height:  # wider than the grid: rows padded
        kept = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - kept) // 2
        return slice(padding, current_height - padding), slice(0, current_width)
    kept = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - kept) // 2
    return slice(0, current_height), slice(padding, current_width - padding)


def next_layout(image_size, grid_pinpoints, crop_size: int, patch_size: int) -> NextLayout:
    """The packed layout of one image of `image_size` `(height, width)` (see the module docstring)."""
    side = crop_size // patch_size
    patches = side * side
    rows, columns = tile_grid(image_size, grid_pinpoints, crop_size)
    crops = 1 + rows * columns
    base = list(range(patches))
    # stitched grid: row r = tile_row * side + y, column c = tile_column * side + x
    r = torch.arange(rows * side).view(-1, 1)
    c = torch.arange(columns * side).view(1, -1)
    tile = (r // side) * columns + c // side
    source = (1 + tile) * patches + (r % side) * side + c % side
    row_span, column_span = unpadded_span(tuple(int(v) for v in image_size), (rows * side, columns * side))
    source = source[row_span, column_span]
    with_newlines = torch.cat([source, torch.full((source.shape[0], 1), NEWLINE)], dim=1)
    return NextLayout(tuple(base + with_newlines.flatten().tolist()), crops, (rows, columns))
