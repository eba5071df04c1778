"""The math of IVTP's group-wise token pruning (paper sec. 3.2-3.3), on plain tensors.

Torch only: no modules, no transformers imports. Every function takes tensors and returns tensors and indices, so
it can be tested on 2x6x4 tensors. The HF glue in `modeling_llava_ivtp.py` feeds it the attention probabilities
and value vectors of the layers it prunes in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_probabilities(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-averaged attention probabilities of eq. 2, in float32.

    Args:
        queries: `(batch, heads, rows, head_dim)`, the query rows that are needed.
        keys: `(batch, heads, cols, head_dim)`, every key those rows attend to (the softmax is over all of them).
        scaling: the layer's softmax scale (`head_dim ** -0.5`).
        allowed: optional bool `(batch, rows, cols)`: which keys each row may attend to (causal, padding).

    Returns:
        `(batch, rows, cols)` float32 probabilities, rows summing to 1, averaged over heads.
    """
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1).mean(dim=1)


def rollout_cls_row(
    top_cls_row: torch.Tensor, lower_attentions: list[torch.Tensor], cls_index: int
) -> torch.Tensor:
    """CLS row of the attention rollout with residual over one group (eq. 3).

    `R = N(A[l2] + I) · ... · N(A[l1+1] + I) · A[l1]`, where `N` re-normalises rows. Only the CLS row of `R` is
    needed, so the top layer's CLS row is carried down through the group as a row vector (vector x matrix);
    `R` is never formed. Rows of an attention matrix sum to one, so `N(A + I) = (A + I) / 2`.

    Args:
        top_cls_row: `(batch, n)`, the CLS row of the group's top layer `A[l2]` over the group's tokens.
        lower_attentions: the group's lower layers `[A[l1], ..., A[l2-1]]`, each `(batch, n, n)`; empty for a
            group of one layer (then `R = A[l1]`, plain attention).
        cls_index: index of the CLS (or pseudo-CLS) token among the `n` tokens.

    Returns:
        `(batch, n)` float32, the CLS row of `R`.
    """
    row = _float32(top_cls_row)
    if not lower_attentions:
        return row
    # Top layer: N(A[l2] + I) -- the identity adds the CLS's own residual. `row / 2` then `+ 1/2` at the CLS is
    # `(row + e_cls) / 2` to the bit (halving is exact), in two operators on a fresh tensor.
    row = row / 2.0
    row.select(1, cls_index).add_(0.5)
    row = row.unsqueeze(1)  # (batch, 1, n): a row vector through the group, one view
    for attention in reversed(lower_attentions[1:]):  # layers l2-1 .. l1+1
        row = (row + torch.bmm(row, _float32(attention))) / 2.0
    return torch.bmm(row, _float32(lower_attentions[0])).squeeze(1)  # layer l1: A[l1], no residual


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def token_scores(rollout_row: torch.Tensor, value_norms: torch.Tensor) -> torch.Tensor:
    """Importance of each candidate token (eq. 4): `R[cls, i] * ||V_i||`, normalised to sum to one.

    Args:
        rollout_row: `(batch, n)`, the rollout CLS row restricted to the candidate tokens.
        value_norms: `(batch, n)`, the L2 norm of each candidate's value vector at the group's top layer.
    """
    weighted = _float32(rollout_row) * _float32(value_norms)
    total = weighted.sum(dim=-1, keepdim=True)
    # Rollout rows and norms are non-negative; an all-zero row (degenerate weights) falls back to uniform scores.
    uniform = 1.0 / weighted.shape[-1]
    return torch.where(total > 0, weighted / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)


def token_weights(rollout_row: torch.Tensor, value_norms: torch.Tensor) -> torch.Tensor:
    """Eq. 4 before its normalisation, `R[cls, i] * ||V_i||`, `(batch, n)` float32: what the pruner ranks. Dividing
    a row by its positive sum keeps its order, and a row of zeros ranks every token equal, as `token_scores`' uniform
    fallback does, so the tokens kept are `token_scores`' (`select_keep_indices`), in one operator rather than six."""
    return _float32(rollout_row) * _float32(value_norms)


def cosine_relevance(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 6: cosine of every token feature with its sample's reference vector, in float32.

    Args:
        features: `(batch, seq_len, dim)`.
        reference: `(batch, dim)`.

    Returns:
        `(batch, seq_len)`.
    """
    return F.cosine_similarity(_float32(features), _float32(reference).unsqueeze(1), dim=-1)


def span_mean(values: torch.Tensor, valid: torch.Tensor, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7: for each span `[start, end)` over `values`' positions, the mean of the valid values inside it.

    Args:
        values: `(batch, source_len)`, e.g. CLIP token relevance.
        valid: `(batch, source_len)` bool, which values count.
        spans: `(batch, target_len, 2)` int, e.g. the CLIP tokens each LLM token overlaps; `(0, 0)` = none.

    Returns:
        `(mean, has_value)`, both `(batch, target_len)`; `mean` is 0 where `has_value` is False.
    """
    weights = valid.to(torch.float32)
    zero = values.new_zeros(values.shape[0], 1, dtype=torch.float32)
    value_sums = torch.cat([zero, (values.float() * weights).cumsum(dim=1)], dim=1)
    count_sums = torch.cat([zero, weights.cumsum(dim=1)], dim=1)
    start = spans[..., 0].clamp(0, values.shape[1]).long()
    end = spans[..., 1].clamp(0, values.shape[1]).long().maximum(start)
    total = value_sums.gather(1, end) - value_sums.gather(1, start)
    count = count_sums.gather(1, end) - count_sums.gather(1, start)
    has_value = count > 0
    return torch.where(has_value, total / count.clamp_min(1), torch.zeros_like(total)), has_value


def pseudo_cls(input_embeddings: torch.Tensor, selected: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Textual pseudo-CLS of eq. 8: the mean of the input embeddings of the `selected` tokens (the instruction tokens
    whose relevance is `>= tau`, or every instruction token, by guidance mode); where a sample selects none (or
    `selected` is None), the `fallback` (the visual CLS through the multimodal projector).

    Args:
        input_embeddings: `(batch, seq_len, hidden)`, the LLM input embeddings.
        selected: `(batch, seq_len)` bool, or None.
        fallback: `(batch, hidden)`.

    Returns:
        `(batch, hidden)`.
    """
    if selected is None:
        return fallback
    selected = selected.bool()
    counts = selected.sum(dim=-1, keepdim=True)
    summed = (input_embeddings * selected.unsqueeze(-1).to(input_embeddings.dtype)).sum(dim=1)
    mean = summed / counts.clamp_min(1).to(summed.dtype)
    return torch.where(counts > 0, mean, fallback.to(mean.dtype))
