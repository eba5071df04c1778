"""The pure math of the LLM-site pruners FastV and PyramidDrop, against plain per-sample loops and hand-made cases."""

import math

import pytest
import torch

from modeling_llava_ivtp.pruner_fastv import fastv_keep_indices, fastv_scores
from modeling_llava_ivtp.pruner_fastv import schedule_for_budget as fastv_schedule
from modeling_llava_ivtp.pruner_pdrop import pdrop_scores, select_stage
from modeling_llava_ivtp.pruner_pdrop import schedule_for_budget as pdrop_schedule
from modeling_llava_ivtp.pruning_ivtp import attention_probabilities


def random_rows(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator, dtype=torch.float64).softmax(dim=-1)


def plain_top_k(scores, num_keep):
    """Per sample: sort by (score descending, index ascending), take `num_keep`, return them ascending."""
    kept = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda index: (-row[index], index))
        kept.append(sorted(order[:num_keep]))
    return torch.tensor(kept, dtype=torch.int64)


def plain_head_mean(attention):
    """`(batch, heads, ..., n)` -> mean over heads, one sample and one head at a time."""
    batch, heads = attention.shape[:2]
    rows = []
    for sample in range(batch):
        total = attention[sample, 0].clone()
        for head in range(1, heads):
            total = total + attention[sample, head]
        rows.append(total / heads)
    return torch.stack(rows)


# FastV


def test_fastv_scores_are_the_head_mean_in_float32():
    attention = random_rows(3, 4, 7).half()
    scores = fastv_scores(attention)
    assert scores.dtype == torch.float32 and scores.shape == (3, 7)
    torch.testing.assert_close(scores, plain_head_mean(attention.float()))


@pytest.mark.parametrize("num_keep", [1, 3, 6, 7])
def test_fastv_keep_indices_match_a_per_sample_loop(num_keep):
    attention = random_rows(4, 2, 7, seed=1)
    kept = fastv_keep_indices(attention, num_keep)
    assert kept.dtype == torch.int64
    torch.testing.assert_close(kept, plain_top_k(plain_head_mean(attention), num_keep))


def test_fastv_hand_computed_with_a_tie():
    # Head mean: [0.2, 0.3, 0.1, 0.2]; index 1 wins, then the tie 0 vs 3 goes to the lower index.
    attention = torch.tensor([[[0.1, 0.5, 0.1, 0.3], [0.3, 0.1, 0.1, 0.1]]])
    torch.testing.assert_close(fastv_scores(attention), torch.tensor([[0.2, 0.3, 0.1, 0.2]]))
    assert fastv_keep_indices(attention, 2).tolist() == [[0, 1]]


def test_fastv_selects_per_sample():
    attention = torch.tensor([[[0.1, 0.2, 0.7]], [[0.7, 0.2, 0.1]]])
    assert fastv_keep_indices(attention, 1).tolist() == [[2], [0]]
    assert fastv_keep_indices(attention[1:], 1).tolist() == [[0]]  # a sample's choice ignores its batch mates


def test_fastv_ranks_after_a_softmax_over_all_keys():
    """Restricting before or after the softmax ranks differently; the row must be softmaxed over every key first.

    Keys: [text, image 0, image 1]. Head A pours its mass on the text key, head B prefers image 1.
    """
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (batch, heads, keys) of the last token
    over_all_keys = logits.softmax(dim=-1)[..., 1:]
    over_image_keys = logits[..., 1:].softmax(dim=-1)
    assert fastv_keep_indices(over_all_keys, 1).tolist() == [[1]]
    assert fastv_keep_indices(over_image_keys, 1).tolist() == [[0]]  # a tie (0.5, 0.5), lower index


def test_fastv_on_a_left_padded_batch_matches_a_per_sample_softmax():
    """Last row of the layer's attention (softmax over all allowed keys), gathered at each sample's image positions."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, seq_len, head_dim, num_patches = 2, 3, 9, 4, 4
    queries = torch.randn(batch, heads, seq_len, head_dim, generator=generator)
    keys = torch.randn(batch, heads, seq_len, head_dim, generator=generator)
    padding = torch.tensor([[0] * 2 + [1] * 7, [1] * 9]).bool()  # sample 0 is left-padded by 2
    image_start = torch.tensor([3, 1])  # where each sample's image tokens begin
    # Batched, as the integration would: the last query row against every key, padding masked, softmax, per head.
    logits = queries[:, :, -1:] @ keys.transpose(-1, -2) * head_dim**-0.5  # (batch, heads, 1, seq_len)
    per_head = logits.masked_fill(~padding[:, None, None, :], float("-inf")).softmax(dim=-1)[:, :, 0]
    head_mean = attention_probabilities(queries[:, :, -1:], keys, head_dim**-0.5, padding[:, None, :])[:, 0]
    torch.testing.assert_close(per_head.mean(dim=1), head_mean)
    positions = image_start[:, None] + torch.arange(num_patches)
    image_rows = per_head.gather(2, positions[:, None, :].expand(-1, heads, -1))
    got = fastv_keep_indices(image_rows, 2)

    expected = []
    for sample in range(batch):
        start = int((~padding[sample]).sum())  # keys before `start` are padding
        probabilities = 0
        for head in range(heads):
            logits = keys[sample, head, start:] @ queries[sample, head, -1] * head_dim**-0.5  # real keys only
            probabilities = probabilities + logits.softmax(dim=-1) / heads
        offset = int(image_start[sample]) - start
        image = probabilities[offset : offset + num_patches]
        expected.append(plain_top_k(image[None], 2)[0])
    assert got.tolist() == torch.stack(expected).tolist()


def test_fastv_schedule_for_budget_follows_the_paper_default():
    assert fastv_schedule(576, 32, 64) == (2, 64)  # K=2, 64 image tokens from layer 3 on
    assert fastv_schedule(576, 32, 288) == (2, 288)  # the title: half of the tokens after layer 2
    assert fastv_schedule(576, 32, 576).num_keep == 576
    assert fastv_schedule(576, 32, 64, layer=3).layer == 3


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((576, 32, 0), "budget"),
        ((576, 32, 577), "budget"),
        ((0, 32, 1), "num_patches"),
        ((576, 32, 64, 0), "layer"),
        ((576, 32, 64, 32), "layer"),
        ((576, 2, 64, 2), "layer"),
    ],
)
def test_fastv_schedule_rejects_bad_arguments(arguments, name):
    with pytest.raises(ValueError, match=name):
        fastv_schedule(*arguments)


def test_fastv_rejects_a_row_without_heads():
    with pytest.raises(ValueError, match="last_token_attention"):
        fastv_scores(torch.rand(2, 5))


# PyramidDrop


def test_pdrop_single_query_row_is_the_head_mean():
    attention = random_rows(3, 4, 1, 6, seed=4)
    torch.testing.assert_close(pdrop_scores(attention), plain_head_mean(attention[:, :, 0]).float())


def test_pdrop_averages_only_the_masked_query_rows():
    attention = random_rows(2, 3, 4, 5, seed=5)
    query_mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    expected = []
    for sample in range(2):
        rows = [
            plain_head_mean(attention[sample : sample + 1, :, query])[0]
            for query in range(4)
            if query_mask[sample, query]
        ]
        expected.append(sum(rows) / len(rows))
    torch.testing.assert_close(pdrop_scores(attention, query_mask), torch.stack(expected).float())
    torch.testing.assert_close(pdrop_scores(attention), pdrop_scores(attention, torch.ones(2, 4).bool()))


def test_pdrop_stage_selection_by_hand():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.4, 0.1, 0.1, 0.4]])
    candidates = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    kept = select_stage(scores, candidates, 2)
    assert kept.dtype == torch.int64 and kept.tolist() == [[2, 5], [1, 6]]


def test_pdrop_pyramid_matches_a_per_sample_loop():
    """Three drops, each ranking the tokens still present by that stage's attention (a fresh random table)."""
    batch, num_patches, keep_counts = 3, 12, (8, 5, 2)
    tables = [random_rows(batch, 2, 1, num_patches, seed=10 + stage) for stage in range(3)]

    candidates = torch.arange(num_patches).expand(batch, -1)
    for table, num_keep in zip(tables, keep_counts):
        stage_attention = table.gather(3, candidates[:, None, None, :].expand(-1, 2, 1, -1))
        candidates = select_stage(pdrop_scores(stage_attention), candidates, num_keep)

    for sample in range(batch):
        present = list(range(num_patches))
        for table, num_keep in zip(tables, keep_counts):
            score = {index: float(table[sample, :, 0, index].mean()) for index in present}
            present = sorted(sorted(present, key=lambda index: (-score[index], index))[:num_keep])
        assert candidates[sample].tolist() == present


def test_pdrop_schedule_for_budget_reproduces_the_default_and_64_tokens():
    assert pdrop_schedule(576, 32, 72) == ((8, 16, 24), (288, 144, 72))  # lambda = 0.5, the paper's default
    ratio = (64 / 576) ** (1 / 3)
    assert pdrop_schedule(576, 32, 64) == ((8, 16, 24), (round(576 * ratio), round(576 * ratio**2), 64))
    assert pdrop_schedule(576, 32, 64).num_keep == (277, 133, 64)
    assert pdrop_schedule(576, 40, 64).layers == (10, 20, 30)  # 13B: the same even split
    assert pdrop_schedule(576, 32, 576).num_keep == (576, 576, 576)
    assert pdrop_schedule(576, 32, 64, num_stages=2) == ((16,), (64,))


@pytest.mark.parametrize("budget", range(1, 577, 23))
def test_pdrop_schedule_counts_shrink_stage_by_stage(budget):
    schedule = pdrop_schedule(576, 32, budget)
    counts = (576, *schedule.num_keep)
    assert list(counts) == sorted(counts, reverse=True)
    assert schedule.num_keep[-1] == budget
    assert math.isclose(schedule.num_keep[0], 576 * (budget / 576) ** (1 / 3), abs_tol=0.5)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((576, 32, 0), "budget"),
        ((576, 32, 577), "budget"),
        ((0, 32, 1), "num_patches"),
        ((576, 3, 64), "num_layers"),
        ((576, 32, 64, 1), "num_stages"),
    ],
)
def test_pdrop_schedule_rejects_bad_arguments(arguments, name):
    with pytest.raises(ValueError, match=name):
        pdrop_schedule(*arguments)


def test_pdrop_rejects_bad_shapes_and_empty_query_masks():
    with pytest.raises(ValueError, match="instruction_attention"):
        pdrop_scores(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="query_mask"):
        pdrop_scores(torch.rand(2, 3, 4, 5), torch.ones(2, 3).bool())
    with pytest.raises(ValueError, match="query_mask"):
        pdrop_scores(torch.rand(2, 3, 4, 5), torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="candidate_indices"):
        select_stage(torch.rand(2, 4), torch.arange(3).expand(2, -1), 2)
    with pytest.raises(ValueError, match="num_keep"):
        select_stage(torch.rand(2, 4), torch.arange(4).expand(2, -1), 5)
