"""Attention rows from the layers' own computation: the attention backends the pruned model runs with.

A pruner that scores tokens by attention asks a layer for some rows of its attention matrix. The model runs its
layers with `"ivtp_sdpa"` (or `"ivtp_eager"`): registered through transformers' `AttentionInterface`, they call the
stock `"sdpa"` (`"eager"`) function unchanged, and when the layer call carries `ivtp_rows=RowRequest(...)` they also
compute, from the very queries, keys (after rotary embedding), values and 4-D mask the layer just used, the
head-averaged float32 probabilities of the requested query rows only (and the value norms of eq. 4 where asked).
Nothing is stored on a module: the request is a per-call object that the layer call passes down, and the answer is
written on it.

Masks: the names are registered with stock `sdpa_mask` / `eager_mask` too, so masks are built as for sdpa / eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager_attention

from .pruning_ivtp import attention_probabilities


# The backend a config names -> the recording backend the model runs with instead (same numbers).
RECORDING_BACKENDS = {"sdpa": "ivtp_sdpa", "eager": "ivtp_eager"}
BASE_BACKENDS = {recording: base for base, recording in RECORDING_BACKENDS.items()}


@dataclass
class RowRequest:
    """What a pruner asks of one layer call; the recording backend fills `probabilities` and `value_norms`.

    All index tensors are in the layer's token coordinates (slot `i` = the `i`-th token the layer sees).

    batch: `(n,)` samples to score (`None`: all).
    rows: `(n, R)` query rows, or `(R,)` the same for every sample (`None`: every row).
    columns: `(n, C)` (or `(C,)`) keys to return of each row (`None`: every key). The softmax is over every key the row
        attends to under the layer's own mask; columns only select what is returned.
    value_columns: `(n, C')` (or `(C',)`) tokens whose value-vector norm (over every head, eq. 4) to return (`None`: none).

    After the call: `probabilities` `(n, R, C)` float32, head-averaged; `value_norms` `(n, C')` float32.
    """

    batch: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    value_columns: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    value_norms: torch.Tensor | None = None


def _pick(tensor: torch.Tensor, batch: torch.Tensor | None, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """`tensor[batch]` then, per sample, the entries `index` `(n, k)` along `dim` (2: heads come first)."""
    if batch is not None:
        tensor = tensor[batch.to(tensor.device)]
    if index is None:
        return tensor
    index = index.to(tensor.device)
    if index.ndim == 1:  # the same entries for every sample
        index = index.unsqueeze(0).expand(tensor.shape[0], -1)
    shape = list(tensor.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (tensor.ndim - 1)
    view[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(shape))


@torch.no_grad()
def record_rows(request: RowRequest, module, query, key, value, attention_mask, scaling) -> None:
    """Fill `request` from one attention call: `query` `(b, heads, q, d)`, `key`/`value` `(b, kv_heads, k, d)`."""
    batch_size, num_heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    queries = _pick(query, request.batch, request.rows, dim=2)
    keys = _pick(key, request.batch, None, dim=2)
    if keys.shape[1] != num_heads:  # grouped-query attention: each key head serves several query heads
        keys = keys.repeat_interleave(num_heads // keys.shape[1], dim=1)
    if attention_mask is None:  # no mask: full attention, or causal where the module is (sdpa's own rule)
        allowed = torch.ones(batch_size, num_queries, num_keys, dtype=torch.bool, device=query.device)
        if num_queries > 1 and getattr(module, "is_causal", False):
            allowed = allowed.tril(num_keys - num_queries)
    else:
        mask = attention_mask[:, :, :, :num_keys]
        allowed = (mask if mask.dtype == torch.bool else mask == 0).expand(batch_size, -1, num_queries, -1)[:, 0]
    allowed = _pick(allowed.to(query.device), request.batch, request.rows, dim=1)
    probabilities = attention_probabilities(queries, keys, scaling, allowed)
    if request.columns is not None:
        columns = request.columns.to(probabilities.device)
        columns = columns.expand(probabilities.shape[0], -1) if columns.ndim == 1 else columns
        probabilities = probabilities.gather(2, columns.unsqueeze(1).expand(-1, probabilities.shape[1], -1))
    request.probabilities = probabilities
    if request.value_columns is not None:
        values = _pick(value, request.batch, request.value_columns, dim=2)
        request.value_norms = torch.linalg.vector_norm(values.float(), dim=(1, 3))


def _eager_function(module):
    """The stock eager function of the module's family: Llama-style decoders (grouped keys) or CLIP."""
    return llama_eager_attention if hasattr(module, "num_key_value_groups") else clip_eager_attention


def _recording(base: str):
    def attention(module, query, key, value, attention_mask, *args, ivtp_rows: RowRequest | None = None, **kwargs):
        function = _eager_function(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        output = function(module, query, key, value, attention_mask, *args, **kwargs)
        if ivtp_rows is not None:
            record_rows(ivtp_rows, module, query, key, value, attention_mask, kwargs.get("scaling"))
        return output

    attention.__name__ = f"ivtp_{base}_attention"
    return attention


for _base, _name in RECORDING_BACKENDS.items():
    AttentionInterface.register(_name, _recording(_base))
    AttentionMaskInterface.register(_name, sdpa_mask if _base == "sdpa" else eager_mask)


def base_backend(name: str | None) -> str | None:
    """The stock backend a (possibly recording) backend name runs: `"ivtp_sdpa"` -> `"sdpa"`."""
    return BASE_BACKENDS.get(name, name)


def recording_backend(name: str | None) -> str | None:
    """The recording twin of a stock backend name (`"sdpa"` -> `"ivtp_sdpa"`); other names are returned as they are."""
    return RECORDING_BACKENDS.get(name, name)


def records_rows(name: str | None) -> bool:
    return name in BASE_BACKENDS


__all__ = ["RowRequest", "base_backend", "recording_backend", "records_rows", "RECORDING_BACKENDS"]
