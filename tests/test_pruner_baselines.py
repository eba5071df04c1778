"""The pure math of the paper's baselines (TopK, spatial pooling, EViT, ToMe) against plain python references."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_llava_ivtp.pruner_evit import evit_keep_and_fuse
from modeling_llava_ivtp.pruner_pooling import pooling_grid_split, spatial_pooling
from modeling_llava_ivtp.pruner_tome import proportional_attention_bias, tome_bipartite_merge, tome_merge_step
from modeling_llava_ivtp.pruner_topk import topk_cls_similarity, topk_keep_indices
from modeling_llava_ivtp.pruner_base import select_keep_indices


def random_tensor(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_valid_indices(keep, batch, count, num_tokens):
    assert keep.dtype == torch.int64 and tuple(keep.shape) == (batch, count)
    assert (keep[:, 1:] > keep[:, :-1]).all(), "sorted and unique"
    assert ((keep >= 0) & (keep < num_tokens)).all()


def top_positions(scores, count):
    """Positions of the `count` largest of a python list, equal scores to the lower position, ascending."""
    ranked = sorted(range(len(scores)), key=lambda position: (-scores[position], position))
    return sorted(ranked[:count])


# TopK


def plain_cosine(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def test_topk_hand_computed():
    cls = torch.tensor([[1.0, 0.0]])
    # cosines with the CLS: 0, 1, -1, 0.707, 0.995
    patches = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [2.0, 0.2]]])
    assert topk_keep_indices(patches, cls, 2).tolist() == [[1, 4]]
    assert topk_keep_indices(patches, cls, 3).tolist() == [[1, 3, 4]]
    assert topk_cls_similarity(patches, cls).dtype == torch.float32


@pytest.mark.parametrize("num_keep", [1, 3, 8, 9])
def test_topk_matches_plain_reference(num_keep):
    patches, cls = random_tensor(2, 9, 4, seed=0), random_tensor(2, 4, seed=1)
    keep = topk_keep_indices(patches, cls, num_keep)
    assert_valid_indices(keep, 2, num_keep, 9)
    for b in range(2):
        scores = [plain_cosine(patches[b, i].tolist(), cls[b].tolist()) for i in range(9)]
        assert keep[b].tolist() == top_positions(scores, num_keep)


def test_topk_bad_arguments():
    with pytest.raises(ValueError, match="num_keep"):
        topk_keep_indices(torch.rand(1, 4, 2), torch.rand(1, 2), 5)
    with pytest.raises(ValueError, match="cls_feature"):
        topk_keep_indices(torch.rand(1, 4, 2), torch.rand(1, 3), 2)
    with pytest.raises(ValueError, match="patch_features"):
        topk_keep_indices(torch.rand(4, 2), torch.rand(1, 2), 2)


# Spatial pooling


def plain_pooling(grid, side, rows, columns):
    """grid: list of n python lists. Cells from explicit ceil boundaries, patches summed one by one."""
    row_bounds = [math.ceil(i * side / rows) for i in range(rows + 1)]
    column_bounds = [math.ceil(j * side / columns) for j in range(columns + 1)]
    positions, means = [], []
    for i in range(rows):
        for j in range(columns):
            members = [
                r * side + c
                for r in range(row_bounds[i], row_bounds[i + 1])
                for c in range(column_bounds[j], column_bounds[j + 1])
            ]
            means.append([sum(grid[p][d] for p in members) / len(members) for d in range(len(grid[0]))])
            centre_row = (row_bounds[i] + row_bounds[i + 1]) // 2
            centre_column = (column_bounds[j] + column_bounds[j + 1]) // 2
            positions.append(centre_row * side + centre_column)
    return positions, means


def test_pooling_split_rule():
    assert pooling_grid_split(64, 24) == (8, 8)
    assert pooling_grid_split(48, 24) == (6, 8)
    assert pooling_grid_split(6, 4) == (2, 3)
    assert pooling_grid_split(46, 24) == (2, 23)
    assert pooling_grid_split(1, 3) == (1, 1)


def test_pooling_hand_computed():
    features = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    keep, merged = spatial_pooling(features, 4)  # 2x2 cells of 2x2 patches, centre = lower-right of the middle
    assert keep.tolist() == [[5, 7, 13, 15]]
    assert merged.squeeze(-1).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    keep, merged = spatial_pooling(features, 6)  # 2x3 cells: columns {0,1}, {2}, {3}
    assert keep.tolist() == [[5, 6, 7, 13, 14, 15]]
    assert merged.squeeze(-1).tolist() == [[2.5, 4.0, 5.0, 10.5, 12.0, 13.0]]


@pytest.mark.parametrize("side,num_keep", [(3, 9), (3, 1), (3, 3), (3, 6), (4, 6), (5, 6), (6, 4), (7, 12)])
def test_pooling_matches_plain_reference(side, num_keep):
    features = random_tensor(2, side * side, 4, seed=side + num_keep)
    keep, merged = spatial_pooling(features, num_keep)
    assert_valid_indices(keep, 2, num_keep, side * side)
    assert merged.shape == (2, num_keep, 4) and merged.dtype == features.dtype
    rows, columns = pooling_grid_split(num_keep, side)
    for b in range(2):
        positions, means = plain_pooling(features[b].tolist(), side, rows, columns)
        assert keep[b].tolist() == positions
        torch.testing.assert_close(merged[b], torch.tensor(means))


def test_pooling_divisible_grid_is_avg_pool_and_keeps_dtype():
    features = random_tensor(2, 36, 4, seed=3).to(torch.bfloat16)
    _, merged = spatial_pooling(features, 9)
    image = features.float().reshape(2, 6, 6, 4).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(image, 2).permute(0, 2, 3, 1).reshape(2, 9, 4)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), expected.to(torch.bfloat16).float())


def test_pooling_bad_arguments():
    with pytest.raises(ValueError, match="num_keep"):
        spatial_pooling(torch.rand(1, 16, 2), 7)  # 7 = 1x7, wider than 4
    with pytest.raises(ValueError, match="num_keep"):
        spatial_pooling(torch.rand(1, 16, 2), 17)
    with pytest.raises(ValueError, match="num_keep"):
        spatial_pooling(torch.rand(1, 16, 2), 0)
    with pytest.raises(ValueError, match="square"):
        spatial_pooling(torch.rand(1, 10, 2), 2)


# EViT


def plain_evit(features, attention, num_keep, normalize=True):
    """features: list of n lists, attention: list of n floats. Returns (positions, rows, fused position)."""
    if num_keep == len(features):  # EViT keeps every token as it is when none is to go
        return list(range(num_keep)), features, -1
    ranked = sorted(range(len(attention)), key=lambda position: (-attention[position], position))
    attentive, rest = ranked[: num_keep - 1], ranked[num_keep - 1 :]
    mass = sum(attention[i] for i in rest) if normalize else 1.0
    fused = [sum(attention[i] * features[i][d] for i in rest) / mass for d in range(len(features[0]))]
    by_position = {i: features[i] for i in attentive}
    by_position[rest[0]] = fused
    positions = sorted(by_position)
    return positions, [by_position[p] for p in positions], rest[0]


def test_evit_hand_computed():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, -1.0]]])
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    keep, merged, fused_index = evit_keep_and_fuse(features, attention, 2)
    # attentive: patch 1; fused: patches 3, 2, 0 at the position of patch 3 (the most attended of them)
    assert keep.tolist() == [[1, 3]] and fused_index.tolist() == [3]
    fused = 0.3 * features[0, 3] + 0.2 * features[0, 2] + 0.1 * features[0, 0]  # EViT's code: the weighted sum
    torch.testing.assert_close(merged[0], torch.stack([features[0, 1], fused]))
    _, averaged, _ = evit_keep_and_fuse(features, attention, 2, normalize=True)  # our `fused="mean"`
    torch.testing.assert_close(averaged[0], torch.stack([features[0, 1], fused / 0.6]))


@pytest.mark.parametrize("num_keep", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("normalize", [True, False])
def test_evit_matches_plain_reference(num_keep, normalize):
    features = random_tensor(2, 9, 4, seed=num_keep)
    attention = random_tensor(2, 9, seed=10 + num_keep).softmax(-1)
    keep, merged, fused_index = evit_keep_and_fuse(features, attention, num_keep, normalize=normalize)
    assert_valid_indices(keep, 2, num_keep, 9)
    assert torch.equal(keep, select_keep_indices(attention, num_keep)), "kept positions are the plain top-k"
    for b in range(2):
        positions, rows, fused_position = plain_evit(features[b].tolist(), attention[b].tolist(), num_keep, normalize)
        assert keep[b].tolist() == positions and fused_index[b].item() == fused_position
        torch.testing.assert_close(merged[b], torch.tensor(rows))


def test_evit_keeping_all_is_identity_and_keeps_dtype():
    features = random_tensor(2, 9, 4, seed=5).to(torch.bfloat16)
    keep, merged, _ = evit_keep_and_fuse(features, random_tensor(2, 9, seed=6).softmax(-1), 9)
    assert keep.tolist() == [list(range(9))] * 2 and merged.dtype == torch.bfloat16
    assert torch.equal(merged, features)


def test_evit_zero_attention_falls_back_to_mean():
    features = torch.tensor([[[1.0], [3.0], [5.0], [8.0]]])
    keep, merged, fused_index = evit_keep_and_fuse(features, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 2, normalize=True)
    assert keep.tolist() == [[0, 1]] and fused_index.tolist() == [0]  # tie among the rest -> lower index
    assert merged[0, :, 0].tolist() == pytest.approx([(1.0 + 5.0 + 8.0) / 3, 3.0])


def test_evit_bad_arguments():
    with pytest.raises(ValueError, match="num_keep"):
        evit_keep_and_fuse(torch.rand(1, 4, 2), torch.rand(1, 4), 0)
    with pytest.raises(ValueError, match="cls_attention"):
        evit_keep_and_fuse(torch.rand(1, 4, 2), torch.rand(1, 5), 2)


# ToMe


def plain_tome(metric, features, sizes, num_merge, protected):
    """Lists in, lists out: explicit loops over sets A (even) and B (odd)."""
    n = len(features)
    set_a = [p for p in range(0, n, 2) if p >= protected]
    set_b = [p for p in range(1, n, 2) if p >= protected]
    matches = []
    for a in set_a:
        best, partner = -2.0, None
        for b in set_b:
            score = plain_cosine(metric[a], metric[b])
            if score > best:
                best, partner = score, b
        matches.append((-best, a, partner))
    members = {p: [p] for p in range(n)}
    for _, a, partner in sorted(matches)[:num_merge]:
        members[partner].append(a)
        del members[a]
    positions = sorted(members)
    new_sizes = [sum(sizes[i] for i in members[p]) for p in positions]
    rows = [
        [sum(sizes[i] * features[i][d] for i in members[p]) / size for d in range(len(features[0]))]
        for p, size in zip(positions, new_sizes)
    ]
    return positions, rows, new_sizes


def test_tome_hand_computed():
    # Token 0 (protected CLS) equals token 1; 2 and 5 point the same way (cos 1); 4 is close to 1 (cos 0.98).
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.2], [0.0, 2.0]]])
    features = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    sizes = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0]])
    keep, merged, new_sizes = tome_bipartite_merge(metric, features, 1, sizes)
    assert keep.tolist() == [[0, 1, 3, 4, 5]] and new_sizes.tolist() == [[1, 1, 1, 1, 4]]
    assert merged[0, -1].item() == pytest.approx((3 * 2.0 + 5.0) / 4)
    keep, merged, new_sizes = tome_bipartite_merge(metric, features, 2, sizes)
    assert keep.tolist() == [[0, 1, 3, 5]] and new_sizes.tolist() == [[1, 2, 1, 4]]
    assert merged.squeeze(-1).tolist() == [[0.0, 2.5, 3.0, 11 / 4]]
    keep, _, _ = tome_bipartite_merge(metric, features, 1, protected=0)
    assert keep.tolist() == [[1, 2, 3, 4, 5]], "unprotected, the CLS merges into its twin (lower A index on ties)"


def test_tome_ties():
    keep, _, new_sizes = tome_bipartite_merge(torch.ones(1, 6, 3), torch.rand(1, 6, 2), 2, protected=0)
    assert keep.tolist() == [[1, 3, 4, 5]] and new_sizes.tolist() == [[3, 1, 1, 1]]


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("num_merge", [0, 1, 3])
def test_tome_matches_plain_reference(protected, num_merge):
    metric, features = random_tensor(2, 9, 4, seed=protected), random_tensor(2, 9, 4, seed=7 + num_merge)
    sizes = random_tensor(2, 9, seed=11).abs() + 0.5
    keep, merged, new_sizes = tome_bipartite_merge(metric, features, num_merge, sizes, protected=protected)
    assert_valid_indices(keep, 2, 9 - num_merge, 9)
    assert merged.shape == (2, 9 - num_merge, 4) and new_sizes.dtype == torch.float32
    for b in range(2):
        positions, rows, expected_sizes = plain_tome(
            metric[b].tolist(), features[b].tolist(), sizes[b].tolist(), num_merge, protected
        )
        assert keep[b].tolist() == positions
        torch.testing.assert_close(merged[b], torch.tensor(rows))
        torch.testing.assert_close(new_sizes[b], torch.tensor(expected_sizes))
    torch.testing.assert_close(merged[:, :protected], features[:, :protected])  # protected tokens pass through


def test_tome_two_steps_preserve_total_size_and_weighted_mean():
    metric, features = random_tensor(2, 9, 4, seed=20), random_tensor(2, 9, 4, seed=21).double()
    keep, merged, sizes = tome_bipartite_merge(metric, features, 4)
    kept_metric = metric.gather(1, keep[..., None].expand(-1, -1, 4))
    keep_again, merged, sizes = tome_bipartite_merge(kept_metric, merged, 2, sizes)
    original = keep.gather(1, keep_again)
    assert_valid_indices(original, 2, 3, 9)
    assert original[:, 0].tolist() == [0, 0]
    torch.testing.assert_close(sizes.sum(-1), torch.full((2,), 9.0))
    torch.testing.assert_close((merged * sizes[..., None]).sum(1), features.sum(1), atol=1e-5, rtol=0)


def test_proportional_attention_equals_duplicated_keys():
    logits = random_tensor(1, 2, 3, 4, seed=30)  # (batch, heads, queries, keys)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0]])
    bias = proportional_attention_bias(sizes)
    assert bias.shape == (1, 1, 1, 4)
    got = (logits + bias).softmax(-1)
    repeats = torch.tensor([1, 2, 1, 3])
    duplicated = logits.repeat_interleave(repeats, dim=-1).softmax(-1)
    expected = torch.stack([chunk.sum(-1) for chunk in duplicated.split(repeats.tolist(), dim=-1)], dim=-1)
    torch.testing.assert_close(got, expected)


def test_tome_bad_arguments():
    with pytest.raises(ValueError, match="num_merge"):
        tome_bipartite_merge(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 5)  # cap (9 - 1) // 2 = 4
    with pytest.raises(ValueError, match="num_merge"):
        tome_bipartite_merge(torch.rand(1, 9, 2), torch.rand(1, 9, 2), -1)
    with pytest.raises(ValueError, match="sizes"):
        tome_bipartite_merge(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, torch.zeros(1, 9))
    with pytest.raises(ValueError, match="protected"):
        tome_bipartite_merge(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, protected=10)
    with pytest.raises(ValueError, match="metric"):
        tome_bipartite_merge(torch.rand(1, 8, 2), torch.rand(1, 9, 2), 1)
    identity = torch.arange(9).unsqueeze(0)
    with pytest.raises(ValueError, match="order"):  # not a permutation
        tome_merge_step(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, order=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="order"):  # the protected token (CLS) not first
        tome_merge_step(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, order=identity.roll(1, dims=1))
    with pytest.raises(ValueError, match="order"):  # wrong shape
        tome_merge_step(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, order=identity[:, :8])
    with pytest.raises(ValueError, match="order"):  # ToMe defines its order for one CLS at most
        tome_merge_step(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, protected=2, order=identity)
    step = tome_merge_step(torch.rand(1, 9, 2), torch.rand(1, 9, 2), 1, protected=0, order=identity.roll(1, dims=1))
    assert step.order is not None and sorted(step.order[0].tolist()) == list(range(8))
