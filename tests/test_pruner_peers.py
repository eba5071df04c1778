"""The pure math of the peer pruners (VisionZip, VisPruner, DivPrune, CDPruner) against plain per-sample references
written with python lists and loops, on hand-built cases worked out by hand, and invariants."""

import math

import pytest
import torch

from modeling_llava_ivtp.pruner_cdpruner import cdpruner_keep_indices, instruction_relevance
from modeling_llava_ivtp.pruner_divprune import divprune_keep_indices
from modeling_llava_ivtp.pruner_visionzip import visionzip_keep_indices
from modeling_llava_ivtp.pruner_vispruner import vispruner_keep_indices


def random_tensors(batch, n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, dim, generator=generator)
    attention = torch.rand(batch, n, generator=generator).softmax(dim=-1)
    keys = torch.randn(batch, n, dim, generator=generator)
    return features, attention, keys


def cosine(u, v):
    u, v = [float(x) for x in u], [float(x) for x in v]
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def first_argmax(values):
    best = 0
    for position, value in enumerate(values):
        if value > values[best]:
            best = position
    return best


# --- plain references, one sample at a time ---------------------------------------------------------------------


def plain_visionzip(features, attention, keys, num_dominant, num_contextual, cls_index):
    n = len(attention)
    candidates = sorted((i for i in range(n) if i != cls_index), key=lambda i: (-float(attention[i]), i))
    dominant = [cls_index] if cls_index is not None else []
    dominant += candidates[: num_dominant - len(dominant)]
    remaining = [i for i in range(n) if i not in dominant]
    rows = {i: [float(x) for x in features[i]] for i in dominant}
    if num_contextual:
        step = max(1, len(remaining) // num_contextual)
        targets = remaining[::step][:num_contextual]
        members = {t: [] for t in targets}
        for i in remaining:
            if i not in targets:
                members[targets[first_argmax([cosine(keys[i], keys[t]) for t in targets])]].append(i)
        for t in targets:
            mean = [
                sum(float(features[m][d]) for m in members[t]) / max(1, len(members[t]))
                for d in range(len(features[t]))
            ]
            rows[t] = [float(features[t][d]) + mean[d] for d in range(len(mean))]
    order = sorted(rows)
    return order, [rows[i] for i in order]


def plain_vispruner(features, attention, num_important, num_diverse, max_removed=8):
    ranked = sorted(range(len(attention)), key=lambda i: (-float(attention[i]), i))
    important, residual = ranked[:num_important], ranked[num_important:]
    while num_diverse > 0 and len(residual) > num_diverse:
        removed = min(max_removed, len(residual) - num_diverse)
        even, odd = residual[0::2], residual[1::2]
        scores = [max(cosine(features[e], features[o]) for o in odd) for e in even]
        order = sorted(range(len(even)), key=lambda p: (-scores[p], p))
        residual = [even[p] for p in order[removed:]] + odd
    return sorted(important + residual[:num_diverse])


def plain_divprune(features, num_keep):
    n = len(features)
    distance = [[1.0 - cosine(features[i], features[j]) for j in range(n)] for i in range(n)]
    nearest = [min([distance[i][j] for i in range(n) if i != j], default=0.0) for j in range(n)]
    chosen = [first_argmax(nearest)]
    while len(chosen) < num_keep:
        left = [j for j in range(n) if j not in chosen]
        spread = [min(distance[s][j] for s in chosen) for j in left]
        chosen.append(left[first_argmax(spread)])
    return sorted(chosen)


def plain_dpp_greedy(features, relevance, num_keep):
    """Greedy MAP by brute force: each step adds the token that maximises det(L[S, S]), in float64."""
    n = len(features)
    kernel = torch.tensor(
        [
            [float(relevance[i]) * cosine(features[i], features[j]) * float(relevance[j]) for j in range(n)]
            for i in range(n)
        ],
        dtype=torch.float64,
    )
    chosen = []
    while len(chosen) < num_keep:
        left = [j for j in range(n) if j not in chosen]
        dets = [torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]).item() for j in left]
        chosen.append(left[first_argmax(dets)])
    return sorted(chosen)


# --- against the references --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_dominant,num_contextual,cls_index", [(3, 2, None), (4, 3, 0), (1, 0, 4), (0, 3, None), (5, 4, None)]
)
def test_visionzip_matches_plain_reference(num_dominant, num_contextual, cls_index):
    features, attention, keys = random_tensors(2, 9, 4, seed=num_dominant * 10 + num_contextual)
    keep, kept, _ = visionzip_keep_indices(features, attention, keys, num_dominant, num_contextual, cls_index)
    for b in range(2):
        order, rows = plain_visionzip(features[b], attention[b], keys[b], num_dominant, num_contextual, cls_index)
        assert keep[b].tolist() == order
        torch.testing.assert_close(kept[b], torch.tensor(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "num_important,num_diverse,max_removed", [(2, 3, 8), (0, 4, 2), (3, 0, 8), (1, 6, 1), (4, 5, 8)]
)
def test_vispruner_matches_plain_reference(num_important, num_diverse, max_removed):
    features, attention, _ = random_tensors(2, 9, 4, seed=num_important * 10 + num_diverse)
    keep = vispruner_keep_indices(features, attention, num_important, num_diverse, max_removed)
    for b in range(2):
        assert keep[b].tolist() == plain_vispruner(features[b], attention[b], num_important, num_diverse, max_removed)


@pytest.mark.parametrize("num_keep", [1, 2, 4, 7, 9])
def test_divprune_matches_plain_reference(num_keep):
    features, _, _ = random_tensors(2, 9, 4, seed=num_keep)
    keep = divprune_keep_indices(features, num_keep)
    for b in range(2):
        assert keep[b].tolist() == plain_divprune(features[b], num_keep)


@pytest.mark.parametrize("dim,num_keep", [(4, 1), (4, 3), (4, 4), (12, 6), (12, 9)])
def test_cdpruner_matches_brute_force_log_det_greedy(dim, num_keep):
    features, attention, _ = random_tensors(2, 9, dim, seed=dim + num_keep)
    relevance = attention / attention.amax(dim=-1, keepdim=True)
    keep = cdpruner_keep_indices(features, relevance, num_keep)
    for b in range(2):
        assert keep[b].tolist() == plain_dpp_greedy(features[b], relevance[b], num_keep)


def test_instruction_relevance_matches_plain_reference():
    generator = torch.Generator().manual_seed(0)
    image_embeds, text_embeds = torch.randn(2, 9, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    got = instruction_relevance(image_embeds, text_embeds)
    for b in range(2):
        raw = [-sum(cosine(image_embeds[b, i], t) for t in text_embeds[b]) / 3 for i in range(9)]
        low, high = min(raw), max(raw)
        torch.testing.assert_close(
            got[b], torch.tensor([(r - low + 1e-6) / (high - low) for r in raw]), atol=1e-5, rtol=1e-5
        )
    constant = instruction_relevance(torch.ones(1, 4, 4), torch.ones(1, 2, 4))
    assert constant.tolist() == [[1.0] * 4]


# --- hand-computed cases -----------------------------------------------------------------------------------------


def test_visionzip_hand_case():
    # Dominant: the top-2 attention, tokens 1 and 3. Remaining [0, 2, 4, 5], two groups: step 2, targets 0 and 4.
    # Token 2's key is nearest target 0's, token 5's nearest target 4's: merged = target + mean(its members).
    features = torch.tensor([[[float(i), 10.0 * i] for i in range(6)]])
    attention = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 0.1], [0.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    keep, kept, _ = visionzip_keep_indices(features, attention, keys, num_dominant=2, num_contextual=2)
    assert keep.tolist() == [[0, 1, 3, 4]]
    assert kept.tolist() == [[[2.0, 20.0], [1.0, 10.0], [3.0, 30.0], [9.0, 90.0]]]
    # With token 0 as CLS it is dominant whatever its attention: dominant {0, 1}, remaining [2, 3, 4, 5] -> targets
    # 2 and 4; token 3's key (zero) has cosine 0 with both, so it goes to the first target.
    keep, kept, _ = visionzip_keep_indices(features, attention, keys, num_dominant=2, num_contextual=2, cls_index=0)
    assert keep.tolist() == [[0, 1, 2, 4]]
    assert kept[0, 2].tolist() == [2.0 + 3.0, 20.0 + 30.0] and kept[0, 3].tolist() == [9.0, 90.0]


def test_vispruner_hand_case():
    # Ranked by attention: 0 (important), then residual [1, 2, 3, 4, 5]; one token removed per round:
    # round 1: even [1, 3, 5] vs odd [2, 4]: token 1 duplicates token 2 (1.0) -> removed; residual [3, 5, 2, 4].
    # round 2: even [3, 2] vs odd [5, 4]: both 0.707 (tie) -> the earlier, 3, removed; residual [2, 5, 4].
    # round 3: even [2, 4] vs odd [5]: -1.0 and -0.707 -> 4 removed; residual [2, 5].
    root = 1.0 / math.sqrt(2.0)
    features = torch.tensor([[[0.0, -1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [root, root], [-1.0, 0.0]]])
    attention = torch.tensor([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    assert vispruner_keep_indices(features, attention, 1, 2, max_removed_per_round=1).tolist() == [[0, 2, 5]]
    # Eight per round (the default) removes every even-position token at once: residual = odd = [2, 4].
    assert vispruner_keep_indices(features, attention, 1, 2).tolist() == [[0, 2, 4]]


def test_divprune_hand_case_with_duplicates():
    # Tokens 0 and 1 are duplicates. Nearest-neighbour distances [0, 0, 1, 1, 1] -> first pick 2 (lowest of the
    # ties); distances to {2}: 1, 1, -, 1, 2 -> 4; to {2, 4}: 1, 1, -, 1 -> 0; then 3 (1 vs 0); the duplicate last.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    expected = {1: [2], 2: [2, 4], 3: [0, 2, 4], 4: [0, 2, 3, 4], 5: [0, 1, 2, 3, 4]}
    for num_keep, indices in expected.items():
        assert divprune_keep_indices(features, num_keep).tolist() == [indices]
    # All identical: every distance is zero, yet no token is picked twice.
    assert divprune_keep_indices(torch.ones(1, 4, 3), 4).tolist() == [[0, 1, 2, 3]]


def test_cdpruner_hand_cases():
    # Duplicates: gains [1, 1, 0.25] -> 0; then token 1's gain is 1 - 1 = 0 and token 2's 0.25 -> 2.
    duplicates = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert cdpruner_keep_indices(duplicates, torch.tensor([[1.0, 1.0, 0.5]]), 2).tolist() == [[0, 2]]
    # Relevance conditions the choice: gains [0.04, 1, 1] -> 1; then 0.04 - 0.16^2 = 0.0144 vs 1 - 0.6^2 -> 2.
    features = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
    assert cdpruner_keep_indices(features, torch.tensor([[0.2, 1.0, 1.0]]), 2).tolist() == [[1, 2]]
    # Rank spent (two directions, four tokens): the rest go to the lower index, never twice.
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]])
    assert cdpruner_keep_indices(features, torch.ones(1, 4), 4).tolist() == [[0, 1, 2, 3]]
    assert cdpruner_keep_indices(features, torch.ones(1, 4), 3).tolist() == [[0, 1, 2]]


# --- invariants and arguments ------------------------------------------------------------------------------------

PRUNERS = {
    "visionzip": lambda f, a, k, num: visionzip_keep_indices(f, a, k, num - num // 3, num // 3)[0],
    "visionzip_cls": lambda f, a, k, num: visionzip_keep_indices(f, a, k, num - num // 3, num // 3, cls_index=0)[0],
    "vispruner": lambda f, a, k, num: vispruner_keep_indices(f, a, num - num // 4, num // 4),
    "divprune": lambda f, a, k, num: divprune_keep_indices(f, num),
    "cdpruner": lambda f, a, k, num: cdpruner_keep_indices(f, a, num),
}


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("num_keep", [1, 3, 8, 9])
def test_indices_are_sorted_unique_in_range_and_per_sample(name, num_keep):
    features, attention, keys = random_tensors(3, 9, 4, seed=7)
    keep = PRUNERS[name](features, attention, keys, num_keep)
    assert keep.dtype == torch.int64 and keep.shape == (3, num_keep)
    assert ((keep >= 0) & (keep < 9)).all()
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted and unique
    for b in range(3):  # a sample alone gives what it gets inside the batch
        alone = PRUNERS[name](features[b : b + 1], attention[b : b + 1], keys[b : b + 1], num_keep)
        assert alone.tolist() == keep[b : b + 1].tolist()


def test_visionzip_keeps_the_feature_dtype_and_the_cls():
    features, attention, keys = random_tensors(2, 9, 4, seed=3)
    keep, kept, _ = visionzip_keep_indices(features.bfloat16(), attention, keys.bfloat16(), 3, 2, cls_index=5)
    assert kept.dtype == torch.bfloat16 and kept.shape == (2, 5, 4)
    assert (keep == 5).any(dim=1).all()


def test_bad_arguments_name_the_argument():
    features, attention, keys = random_tensors(2, 9, 4, seed=0)
    with pytest.raises(ValueError, match="num_dominant"):
        visionzip_keep_indices(features, attention, keys, 6, 4)
    with pytest.raises(ValueError, match="cls_index"):
        visionzip_keep_indices(features, attention, keys, 0, 2, cls_index=0)
    with pytest.raises(ValueError, match="cls_attention"):
        visionzip_keep_indices(features, attention[:, :8], keys, 2, 2)
    with pytest.raises(ValueError, match="features"):
        vispruner_keep_indices(features[0], attention, 2, 2)
    with pytest.raises(ValueError, match="num_important"):
        vispruner_keep_indices(features, attention, 0, 0)
    with pytest.raises(ValueError, match="max_removed_per_round"):
        vispruner_keep_indices(features, attention, 2, 2, max_removed_per_round=0)
    with pytest.raises(ValueError, match="num_keep"):
        divprune_keep_indices(features, 10)
    with pytest.raises(ValueError, match="num_keep"):
        cdpruner_keep_indices(features, attention, 0)
    with pytest.raises(ValueError, match="relevance"):
        cdpruner_keep_indices(features, attention[:1], 3)
    with pytest.raises(ValueError, match="text_embeds"):
        instruction_relevance(features, keys[:, :, :3])
