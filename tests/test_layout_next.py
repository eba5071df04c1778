"""`layout_next`: the map from a LLaVA-NeXT image's crops to its packed placeholders equals what stock
`LlavaNextModel.pack_image_features` builds, for every tile grid (a grid of one tile included) and aspect ratio, and
its length is the placeholder count the tiny batches use."""

from __future__ import annotations

import pytest
import torch

from modeling_llava_ivtp.layout_next import NEWLINE, next_layout, tile_grid
from tiny_models import TINY_GRID_PINPOINTS, next_image_tokens, tiny_next_model

LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def stock_packed(model, crop_features, image_size):
    packed, lengths = model.model.pack_image_features(
        [crop_features], torch.tensor([image_size]), "default", image_newline=model.model.image_newline
    )
    return packed[0]


@pytest.mark.parametrize("image_size", [(20, 40), (40, 36), (24, 24), (40, 20), (13, 47), (47, 13), (48, 48), (30, 31)])
def test_the_layout_packs_as_stock_llava_next(image_size):
    model = tiny_next_model()
    config = model.config
    layout = next_layout(image_size, config.image_grid_pinpoints, config.vision_config.image_size,
                         config.vision_config.patch_size)
    rows, columns = tile_grid(image_size, TINY_GRID_PINPOINTS, 24)
    assert layout.crops == 1 + rows * columns and layout.grid == (rows, columns)
    features = torch.randn(layout.crops, 36, config.text_config.hidden_size)
    with torch.no_grad():
        expected = stock_packed(model, features, image_size)
        got = layout.pack(features, model.model.image_newline)
    assert torch.equal(got, expected)
    assert layout.length == next_image_tokens(config, [image_size])[0]
    # every crop patch at most once, the base crop's first and whole
    sources = [source for source in layout.source if source != NEWLINE]
    assert sources[:36] == list(range(36)) and len(set(sources)) == len(sources)


def test_a_grid_of_one_tile_is_two_crops():
    model = tiny_next_model(image_grid_pinpoints=[[24, 24]])
    layout = next_layout((30, 20), [[24, 24]], 24, 4)
    assert layout.crops == 2 and layout.grid == (1, 1)
    features = torch.randn(2, 36, model.config.text_config.hidden_size)
    with torch.no_grad():
        assert torch.equal(layout.pack(features, model.model.image_newline),
                           stock_packed(model, features, (30, 20)))


@pytest.mark.parametrize("image_size, tokens", [((480, 640), 2340), ((672, 672), 576 + 48 * 49), ((336, 1008), 576 + 24 * 73)])
def test_llava_16_lengths(image_size, tokens):
    """At LLaVA-1.6's geometry (336 px crops of 14 px patches): a 640x480 image packs 576 + 36 x 49 tokens."""
    layout = next_layout(image_size, LLAVA_16_PINPOINTS, 336, 14)
    assert layout.length == tokens
