"""The pure functions of `pruning_ivtp` (and the generic top-k, `pruner_base.select_keep_indices`) on hand-built
tensors, with plain references and property tests."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_llava_ivtp.pruner_base import select_keep_indices
from modeling_llava_ivtp.pruning_ivtp import (
    attention_probabilities,
    cosine_relevance,
    pseudo_cls,
    span_mean,
    rollout_cls_row,
    token_scores,
    token_weights,
)


def random_attention(batch, n, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, n, generator=generator, dtype=torch.float64).softmax(dim=-1)


def plain_rollout(attentions):
    """Eq. 3 with matrices: R = N(A[l2] + I) ... N(A[l1+1] + I) A[l1], N re-normalising rows."""
    result = attentions[0]
    for attention in attentions[1:]:
        residual = attention + torch.eye(attention.shape[-1], dtype=attention.dtype)
        result = (residual / residual.sum(-1, keepdim=True)) @ result
    return result


@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
@pytest.mark.parametrize("cls_index", [0, 5])
def test_rollout_matches_matrix_product(group_size, cls_index):
    attentions = [random_attention(2, 6, seed) for seed in range(group_size)]
    expected = plain_rollout(attentions)[:, cls_index]
    got = rollout_cls_row(attentions[-1][:, cls_index], attentions[:-1], cls_index=cls_index)
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=1e-6)


def test_rollout_of_one_layer_is_plain_attention():
    attention = random_attention(2, 6, 0)
    torch.testing.assert_close(rollout_cls_row(attention[:, 0], [], 0), attention[:, 0].float())


def test_rollout_carries_a_vector_not_a_matrix():
    """Rows of a rollout are probability vectors: non-negative, summing to one."""
    attentions = [random_attention(3, 7, seed) for seed in range(3)]
    row = rollout_cls_row(attentions[-1][:, 0], attentions[:-1], 0)
    assert row.shape == (3, 7)
    assert (row >= 0).all()
    torch.testing.assert_close(row.sum(-1), torch.ones(3), atol=1e-6, rtol=0)


def test_attention_probabilities_match_softmax_and_respect_mask():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 4, 3, 8, generator=generator)
    keys = torch.randn(2, 4, 6, 8, generator=generator)
    allowed = torch.ones(2, 3, 6, dtype=torch.bool)
    allowed[0, :, 4:] = False
    got = attention_probabilities(queries, keys, 8**-0.5, allowed)
    logits = (queries @ keys.transpose(-1, -2)) * 8**-0.5
    logits[0, :, :, 4:] = float("-inf")
    torch.testing.assert_close(got, logits.softmax(-1).mean(1))
    assert got.dtype == torch.float32
    assert (got[0, :, 4:] == 0).all()


def test_token_scores_eq4():
    rollout = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    norms = torch.tensor([[4.0, 1.0, 1.0, 0.5]])
    expected = torch.tensor([[0.4, 0.2, 0.3, 0.2]]) / 1.1
    torch.testing.assert_close(token_scores(rollout, norms), expected)


def test_token_scores_degenerate_row_is_uniform():
    torch.testing.assert_close(token_scores(torch.zeros(1, 4), torch.ones(1, 4)), torch.full((1, 4), 0.25))


def test_token_weights_keep_what_the_normalised_scores_keep():
    """The pruner ranks eq. 4 before its normalisation: the same tokens kept, a row of zeros included."""
    generator = torch.Generator().manual_seed(3)
    rollout = torch.rand(64, 40, generator=generator)
    rollout[::7] = 0.0  # degenerate rows
    norms = torch.rand(64, 40, generator=generator) + 0.1
    torch.testing.assert_close(token_weights(rollout, norms), rollout * norms)
    for num_keep in (1, 9, 39):
        assert torch.equal(
            select_keep_indices(token_weights(rollout, norms), num_keep),
            select_keep_indices(token_scores(rollout, norms), num_keep),
        )


def test_select_keep_indices_sorted_top_k():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.3, 0.1, 0.2, 0.25, 0.15]])
    assert select_keep_indices(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert select_keep_indices(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_select_keep_indices_ties_are_deterministic():
    scores = torch.full((1, 6), 1 / 6)
    assert select_keep_indices(scores, 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("num_keep", [0, 7])
def test_select_keep_indices_rejects_bad_counts(num_keep):
    with pytest.raises(ValueError, match="num_keep"):
        select_keep_indices(torch.rand(1, 6), num_keep)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    n=st.integers(2, 12),
    group_size=st.integers(1, 4),
    data=st.data(),
)
def test_property_scores_and_indices(batch, n, group_size, data):
    seed = data.draw(st.integers(0, 10_000))
    num_keep = data.draw(st.integers(1, n - 1))
    attentions = [random_attention(batch, n, seed + layer) for layer in range(group_size)]
    row = rollout_cls_row(attentions[-1][:, 0], attentions[:-1], cls_index=0)
    norms = torch.rand(batch, n - 1, generator=torch.Generator().manual_seed(seed)) + 0.1
    scores = token_scores(row[:, 1:], norms)
    torch.testing.assert_close(scores.sum(-1), torch.ones(batch), atol=1e-5, rtol=0)
    keep = select_keep_indices(scores, num_keep)
    assert keep.shape == (batch, num_keep)
    assert (keep[:, 1:] > keep[:, :-1]).all(), "sorted and unique"
    assert ((keep >= 0) & (keep < n - 1)).all(), "in range of the patches (CLS is kept apart)"
    # every kept score is >= every dropped score
    for b in range(batch):
        kept = scores[b, keep[b]]
        dropped_mask = torch.ones(n - 1, dtype=torch.bool)
        dropped_mask[keep[b]] = False
        if dropped_mask.any():
            assert kept.min() >= scores[b, dropped_mask].max()


def test_pseudo_cls_eq8():
    embeddings = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    selected = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    fallback = torch.full((2, 3), -1.0)
    got = pseudo_cls(embeddings, selected, fallback=fallback)
    # sample 0: tokens 0 and 2 selected; sample 1: none -> fallback
    torch.testing.assert_close(got[0], (embeddings[0, 0] + embeddings[0, 2]) / 2)
    torch.testing.assert_close(got[1], fallback[1])
    assert pseudo_cls(embeddings, None, fallback) is fallback


def test_span_mean_eq7_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2, 9, generator=generator)
    valid = torch.rand(2, 9, generator=generator) > 0.3
    spans = torch.tensor([[[1, 4], [0, 0], [4, 5], [2, 9], [8, 9]], [[0, 9], [3, 3], [5, 7], [6, 8], [0, 1]]])
    mean, has = span_mean(values, valid, spans)
    for b in range(2):
        for t in range(5):
            start, end = spans[b, t].tolist()
            picked = [values[b, k] for k in range(start, end) if valid[b, k]]
            assert bool(has[b, t]) == bool(picked)
            expected = torch.stack(picked).mean() if picked else torch.tensor(0.0)
            torch.testing.assert_close(mean[b, t], expected)


def test_cosine_relevance_eq6():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    reference = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(cosine_relevance(features, reference), torch.tensor([[1.0, 0.0, -1.0]]))
