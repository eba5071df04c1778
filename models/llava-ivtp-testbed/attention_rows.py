"""Attention rows from the layers' own computation: the attention backends the pruned model runs with.

A pruner that scores tokens by attention asks a layer for some rows of its attention matrix. The model runs its
layers with `"ivtp_sdpa"` (or `"ivtp_eager"`): registered through transformers' `AttentionInterface`, they call the
stock `"sdpa"` (`"eager"`) function unchanged, and when the layer call carries `ivtp_rows=RowRequest(...)` they hand
the request the very queries, keys (after rotary embedding), values and 4-D mask the layer just used. The request
computes what was asked -- the head-averaged float32 probabilities of the requested query rows only, value norms,
head-averaged keys -- when the pruner first reads it, after the layer has returned (so a FLOP counter books scoring
apart from the layer). Nothing is stored on a module: the request is a per-call object that the layer call passes
down.

Masks: the names are registered with stock `sdpa_mask` / `eager_mask` too, so masks are built as for sdpa / eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager_attention


# The backend a config names -> the recording backend the model runs with instead (same numbers).
RECORDING_BACKENDS = {"sdpa": "ivtp_sdpa", "eager": "ivtp_eager"}
BASE_BACKENDS = {recording: base for base, recording in RECORDING_BACKENDS.items()}


@dataclass
class RowRequest:
    """What a pruner asks of one layer call. All index tensors are in the layer's token coordinates (slot `i` = the
    `i`-th token the layer sees).

    batch: `(n,)` samples to score (`None`: all).
    rows: `(n, R)` query rows, or `(R,)` the same for every sample (`None`: every row).
    columns: `(n, C)` (or `(C,)`) keys to return of each row (`None`: every key). The softmax is over every key
        the row attends to under the layer's own mask; columns only select what is returned.
    value_columns: `(n, C')` (or `(C',)`) tokens whose value-vector norm over every head (eq. 4) is wanted.
    key_columns: `(n, C'')` (or `(C'',)`) tokens whose keys, averaged over heads, are wanted.
    scores: whether `probabilities` are wanted (`False`: keys or values only).
    keys: `(K,)` increasing slots, the same for every sample: every key the requested rows attend to lies among them
        (the asker's promise, e.g. the tokens up to an image's end), so the softmax is computed over these only
        (`None`: every key). `columns` stay slots.
    rows_only: the call is made for the request alone (a scoring call of a layer on tokens it will not run on, as
        PyramidDrop scores with the next layer): the backend skips the attention kernel and returns zeros.

    Answers, read after the layer call: `probabilities` `(n, R, C)` float32, head-averaged; `value_norms` `(n, C')`
    float32; `key_means` `(n, C'', head_dim)` float32.
    """

    batch: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    value_columns: torch.Tensor | None = None
    key_columns: torch.Tensor | None = None
    scores: bool = True
    keys: torch.Tensor | None = None
    rows_only: bool = False
    call: tuple | None = field(default=None, repr=False)  # what the layer's attention used (`attach`)
    full: torch.Tensor | None = field(default=None, repr=False)  # every row, when the layer computed them itself

    def attach(self, module, query, key, value, attention_mask, scaling) -> None:
        self.call = (getattr(module, "is_causal", False), query, key, value, attention_mask, scaling)

    def _call(self) -> tuple:
        if self.call is None:
            raise RuntimeError(
                "The layer did not answer the RowRequest: its attention backend is not a recording one "
                f"({sorted(BASE_BACKENDS)})."
            )
        return self.call

    @property
    def every_row(self) -> bool:
        return self.scores and self.batch is None and self.rows is None and self.columns is None

    @property
    def probabilities(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        return row_probabilities(self, *self._call())

    @property
    def value_norms(self) -> torch.Tensor:
        value = self._call()[3]
        with torch.no_grad():
            values = _pick(value, self.batch, self.value_columns, dim=2)
            return torch.linalg.vector_norm(values.float(), dim=(1, 3))

    @property
    def key_means(self) -> torch.Tensor:
        key = self._call()[2]
        with torch.no_grad():
            return _pick(key, self.batch, self.key_columns, dim=2).float().mean(dim=1)


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
def row_probabilities(request: RowRequest, is_causal, query, key, value, attention_mask, scaling) -> torch.Tensor:
    """The requested rows of one attention call: `query` `(b, heads, q, d)`, `key` `(b, kv_heads, k, d)`, and the mask
    the backend got (bool: allowed; float: added to the logits, as eager adds it; `None`: full attention, or causal
    where the module is, as sdpa decides). Head-averaged float32 probabilities `(n, R, C)`."""
    batch_size, num_heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    queries = _pick(query, request.batch, request.rows, dim=2)
    keys = _pick(key, request.batch, request.keys, dim=2)
    if keys.shape[1] != num_heads:  # grouped-query attention: each key head serves several query heads
        keys = keys.repeat_interleave(num_heads // keys.shape[1], dim=1)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None:
        if num_queries > 1 and is_causal:
            allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device)
            allowed = allowed.tril(num_keys - num_queries)
            allowed = _pick(allowed.expand(batch_size, -1, -1), request.batch, request.rows, dim=1)
            logits = logits.masked_fill(~_key_columns(allowed, request.keys).unsqueeze(1), lowest)
    else:
        mask = attention_mask[:, :, :, :num_keys].expand(batch_size, -1, num_queries, -1)[:, 0]
        mask = _pick(mask.to(query.device), request.batch, request.rows, dim=1)
        mask = _key_columns(mask, request.keys).unsqueeze(1)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, lowest)
        else:
            logits = (logits + mask.float()).clamp_min(lowest)
    probabilities = logits.softmax(dim=-1).mean(dim=1)
    if request.columns is None:
        return probabilities
    columns = request.columns.to(probabilities.device)
    if request.keys is not None:  # slots -> places among the keys
        columns = torch.searchsorted(request.keys.to(columns.device), columns)
    columns = columns.expand(probabilities.shape[0], -1) if columns.ndim == 1 else columns
    return probabilities.gather(2, columns.unsqueeze(1).expand(-1, probabilities.shape[1], -1))


def _key_columns(mask: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """`(n, R, num_keys)` -> the columns of `keys` (all without)."""
    return mask if keys is None else mask[:, :, keys.to(mask.device)]


def _eager_function(module):
    """The stock eager function of the module's family: Llama-style decoders (grouped keys) or CLIP."""
    return llama_eager_attention if hasattr(module, "num_key_value_groups") else clip_eager_attention


def _attention_with_every_row(request: RowRequest, module, query, key, value, attention_mask, scaling, dropout):
    """Eager attention (logits in the model's dtype, softmax in float32, as CLIP's and Llama's eager functions),
    keeping the head-averaged probabilities for the request: when every row is asked for (attention rollout), the
    layer's own probability matrix is the one scored, not a second one computed beside it."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", False):
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        attention_mask = causal.tril(key.shape[2] - query.shape[2])[None, None]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[2]]
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min) if mask.dtype == torch.bool else logits + mask
    probabilities = logits.softmax(dim=-1, dtype=torch.float32)
    with torch.no_grad():
        request.full = probabilities.mean(dim=1)
    probabilities = F.dropout(probabilities.to(value.dtype), p=dropout, training=module.training)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def _recording(base: str):
    def attention(module, query, key, value, attention_mask, *args, ivtp_rows: RowRequest | None = None, **kwargs):
        if ivtp_rows is not None and ivtp_rows.rows_only:
            ivtp_rows.attach(module, query, key, value, attention_mask, kwargs.get("scaling"))
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
        if ivtp_rows is not None and ivtp_rows.every_row:
            return _attention_with_every_row(
                ivtp_rows, module, query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0)
            )
        function = _eager_function(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        output = function(module, query, key, value, attention_mask, *args, **kwargs)
        if ivtp_rows is not None:
            ivtp_rows.attach(module, query, key, value, attention_mask, kwargs.get("scaling"))
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
