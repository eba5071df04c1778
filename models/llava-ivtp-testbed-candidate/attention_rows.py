"""Attention rows from the layers' own computation: the attention backends the pruned model runs with.

A pruner that scores tokens by attention asks a layer for some rows of its attention matrix. With pruning on, the
model runs its layers with the recording twin of the backend the user chose: `"sdpa"` -> `"ivtp_sdpa"`, `"eager"`
-> `"ivtp_eager"`, `"flash_attention_2"` -> `"ivtp_flash_attention_2"`, `"flex_attention"`, or any name registered
through transformers' `AttentionInterface` (the twin is registered the first time a model uses the name). The twin
calls the user's backend unchanged -- the layer's output is that kernel's -- and when the layer call carries
`ivtp_rows=RowRequest(...)` it hands the request the very queries, keys (after rotary embedding), values and mask
the layer just used. The request computes what was asked -- the head-averaged float32 probabilities of the
requested query rows only, value norms, head-averaged keys -- when the pruner first reads it, after the layer has
returned (so a FLOP counter books scoring apart from the layer). Nothing is stored on a module: the request is a
per-call object that the layer call passes down.

Masks are built for the twin as for its backend (the twin is registered with the backend's mask function): a 4-D
tensor (sdpa, eager), a 2-D padding mask or none (flash attention: causal, padding by unpadding), a `BlockMask` (flex
attention), or none (a backend registered without a mask function). The rows read the mask in whichever form it
came. Two things only a 4-D mask or a `BlockMask` can say:
- the probe token's rule (it attends to the tokens up to its image and to itself; `segment_mask`): the runner passes
  `ivtp_probe` (each sample's last key slot the probe may see) and, where the mask cannot say it, the twin
  recomputes the probe's row of the output from the layer's q/k/v over the keys it may see (one row; every real
  token's row is the kernel's, and no real token attends to the probe);
- an additive bias (ToMe's proportional attention in the vision tower): a call whose mask is a 4-D tensor the
  backend cannot take runs with the eager function of the layer's family.
Layers whose every row is scored (IVTP's attention rollout in the vision tower) compute their probabilities
eagerly, whatever the backend (`_attention_with_every_row`): the scored matrix is the one the layer used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager_attention


TWIN_PREFIX = "ivtp_"
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
        (`None`: every key). `columns` stay slots; `column_places`, if the asker gives it, is `columns` as places
        among `keys` (computed once per token set rather than per layer).
    Index fields may also be a slice or a tuple of increasing slices (host-known ranges: one slicing operator
    each, where an index tensor takes a gather).
    shared: a dict the asker passes to every request of one token set (the same rows and keys at each layer of a
        run): what does not depend on the layer, as the picked mask, is computed once.
    rows_only: the call is made for the request alone (a scoring call of a layer on tokens it will not run on, as
        PyramidDrop scores with the next layer): the backend skips the attention kernel and returns zeros.

    Answers, read after the layer call: `probabilities` `(n, R, C)` float32, head-averaged; `value_norms` `(n, C')`
    float32; `key_means` `(n, C'', head_dim)` float32.
    """

    batch: torch.Tensor | None = None
    rows: torch.Tensor | slice | None = None
    columns: torch.Tensor | slice | tuple | None = None
    value_columns: torch.Tensor | slice | None = None
    key_columns: torch.Tensor | slice | None = None
    scores: bool = True
    keys: torch.Tensor | slice | tuple | None = None
    column_places: torch.Tensor | slice | tuple | None = None
    shared: dict | None = field(default=None, repr=False)
    rows_only: bool = False
    call: tuple | None = field(default=None, repr=False)  # what the layer's attention used (`attach`)
    full: torch.Tensor | None = field(default=None, repr=False)  # every row, when the layer computed them itself

    def attach(self, module, query, key, value, attention_mask, scaling, probe=None) -> None:
        self.call = (getattr(module, "is_causal", False), query, key, value, attention_mask, scaling, probe)

    def _call(self) -> tuple:
        if self.call is None:
            raise RuntimeError(
                "The layer did not answer the RowRequest: its attention backend is not a recording twin "
                f"(names starting with {TWIN_PREFIX!r}, `recording_backend`)."
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
            return torch.linalg.vector_norm(moved(values, dtype=torch.float32), dim=(1, 3))

    @property
    def key_means(self) -> torch.Tensor:
        key = self._call()[2]
        with torch.no_grad():
            return moved(_pick(key, self.batch, self.key_columns, dim=2), dtype=torch.float32).mean(dim=1)


def moved(tensor: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """`tensor` on `device` in `dtype` (`None`: as it is); no operator when it is there already."""
    if (device is None or tensor.device == torch.device(device)) and (dtype is None or tensor.dtype == dtype):
        return tensor
    return tensor.to(device=device, dtype=dtype)


def _take(tensor: torch.Tensor, index, dim: int) -> torch.Tensor:
    """The entries `index` of `tensor` along `dim`: `None` (all), a slice, a tuple of slices (concatenated), a 1-D
    tensor (the same entries for every sample) or a 2-D tensor `(n, k)` (per sample, along the batch)."""
    if index is None:
        return tensor
    if isinstance(index, slice):
        start, stop, step = index.indices(tensor.shape[dim])
        if step != 1:
            return tensor[(slice(None),) * dim + (index,)]
        return tensor.narrow(dim, start, max(stop - start, 0))  # one operator
    if isinstance(index, tuple):
        return torch.cat([_take(tensor, part, dim) for part in index], dim=dim)
    index = moved(index, tensor.device)
    if index.ndim == 1:
        return tensor.index_select(dim, index)
    shape = list(tensor.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (tensor.ndim - 1)
    view[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(shape))


def _pick(tensor: torch.Tensor, batch: torch.Tensor | None, index, dim: int) -> torch.Tensor:
    """`tensor[batch]` then, per sample, the entries `index` along `dim` (2: heads come first; `_take`)."""
    if batch is not None:
        tensor = tensor.index_select(0, moved(batch, tensor.device))
    return _take(tensor, index, dim)


@torch.no_grad()
def row_probabilities(request: RowRequest, is_causal, query, key, value, attention_mask, scaling, probe=None):
    """The requested rows of one attention call: `query` `(b, heads, q, d)`, `key` `(b, kv_heads, k, d)`, and the mask
    the backend got: a 4-D tensor (bool: allowed; float: added to the logits, as eager adds it), `None` (full
    attention, or causal where the module is, as sdpa decides), a 2-D padding mask (flash attention: causal where
    the module is, over the attended keys) or a `BlockMask` (flex attention: its rule, evaluated at the rows);
    `probe`: the probe's rule where the mask does not say it (`_probe_allowed`). Head-averaged float32
    probabilities `(n, R, C)`."""
    batch_size, num_heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    queries = _pick(query, request.batch, request.rows, dim=2)
    keys = _pick(key, request.batch, request.keys, dim=2)
    if keys.shape[1] != num_heads:  # grouped-query attention: each key head serves several query heads
        keys = keys.repeat_interleave(num_heads // keys.shape[1], dim=1)
    if queries.dtype != torch.float32:
        queries, keys = queries.float(), keys.float()
    logits = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None and probe is None and _sees_every_key(request, is_causal, num_queries, num_keys):
        pass  # no mask, and each requested row attends every key: nothing to mask
    elif not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4):  # not 4-D: `_allowed_keys`
        allowed = _allowed_keys(attention_mask, is_causal, batch_size, num_queries, num_keys, query.device)
        if probe is not None:
            allowed = _probe_allowed(allowed, probe, batch_size, num_queries, num_keys, query.device)
        if allowed is not None:
            allowed = _pick(allowed, request.batch, request.rows, dim=1)
            logits = logits.masked_fill(~_take(allowed, request.keys, 2).unsqueeze(1), lowest)
    else:
        mask = _requested_mask(request, attention_mask, batch_size, num_queries, num_keys, query.device)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(mask, lowest)
        else:
            logits = (logits + mask).clamp_min(lowest)
    probabilities = logits.softmax(dim=-1).mean(dim=1)
    if request.columns is None:
        return probabilities
    if request.keys is not None:  # slots -> places among the keys
        columns = request.column_places if request.column_places is not None else _places(request, num_keys)
    else:
        columns = request.columns
    if isinstance(columns, torch.Tensor) and columns.ndim == 2:
        columns = moved(columns, probabilities.device)
        return probabilities.gather(2, columns.unsqueeze(1).expand(-1, probabilities.shape[1], -1))
    return _take(probabilities, columns, 2)


def _sees_every_key(request: RowRequest, is_causal, num_queries: int, num_keys: int) -> bool:
    """Whether, without a mask, every requested row attends every key (host arithmetic): non-causal attention, or
    causal rows (bottom-right aligned) given as a slice at or after the last query that sees them all."""
    if not (is_causal and num_queries > 1):
        return True
    rows = request.rows
    if not isinstance(rows, slice):
        return False
    start, _, step = rows.indices(num_queries)
    return step == 1 and start >= num_queries - 1


def _requested_mask(request: RowRequest, attention_mask, batch_size: int, num_queries: int, num_keys: int, device):
    """A 4-D mask at the requested rows and keys, `(n, 1, R, K)`: bool `True` where a key is *not* attended, or a
    float bias. The layers of a run share their mask: with `request.shared` (a dict the asker passes to each
    request of one token set) it is picked once."""
    memo_key = ("mask", id(request.rows))  # the same rows object for the layers that ask the same rows
    entry = request.shared.get(memo_key) if request.shared is not None else None
    if entry is not None and entry[0] is attention_mask and entry[1] is request.rows:
        return entry[2]
    mask = attention_mask[:, 0, :, :num_keys].expand(batch_size, num_queries, -1)
    mask = _take(_pick(moved(mask, device), request.batch, request.rows, dim=1), request.keys, 2).unsqueeze(1)
    mask = ~mask if mask.dtype == torch.bool else mask.float()
    if request.shared is not None:
        request.shared[memo_key] = (attention_mask, request.rows, mask)
    return mask


def _places(request: RowRequest, num_keys: int) -> torch.Tensor:
    """`request.columns` (slots) as places among `request.keys`."""
    columns = request.columns
    keys = _take(torch.arange(num_keys, device=columns.device), request.keys, 0)
    return torch.searchsorted(keys, columns)


def _probe_allowed(allowed, probe: torch.Tensor, batch_size: int, num_queries: int, num_keys: int, device):
    """`allowed` `(b, q, k)` (or `None`: every key) with the probe's row -- the last query -- limited to the keys up to
    `probe` `(b,)` (each sample's last key slot before it may see) and its own."""
    keys = torch.arange(num_keys, device=device)
    probe_row = (keys <= torch.as_tensor(probe, device=device).reshape(-1, 1)) | (keys == num_keys - 1)
    if allowed is None:
        allowed = torch.ones(batch_size, num_queries, num_keys, dtype=torch.bool, device=device)
    return torch.cat([allowed[:, :-1], allowed[:, -1:] & probe_row.unsqueeze(1)], dim=1)


def _allowed_keys(attention_mask, is_causal, batch_size: int, num_queries: int, num_keys: int, device):
    """`(b, q, k)` bool, the keys each query attends under a mask that is not a 4-D tensor (`None`: every key): a flex
    `BlockMask` (its rule, evaluated), a 2-D padding mask (flash attention: padding, and causal where the module is,
    bottom-right aligned) or none (causal where the module is, as sdpa decides)."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # a `BlockMask`
        batch = torch.arange(batch_size, device=device).view(-1, 1, 1)
        queries, keys = torch.arange(num_queries, device=device), torch.arange(num_keys, device=device)
        head = torch.zeros((), dtype=torch.long, device=device)
        allowed = attention_mask.mask_mod(batch, head, queries.view(1, -1, 1), keys.view(1, 1, -1))
        return allowed.to(torch.bool).expand(batch_size, num_queries, num_keys)
    allowed = None
    if num_queries > 1 and is_causal:
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
        allowed = allowed.tril(num_keys - num_queries).expand(batch_size, -1, -1)
    if attention_mask is not None:  # padding: the keys each sample attends
        attended = attention_mask[:, -num_keys:].to(device, torch.bool).unsqueeze(1)
        allowed = attended.expand(-1, num_queries, -1) if allowed is None else allowed & attended
    return allowed


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
    if probabilities.dtype != value.dtype:
        probabilities = probabilities.to(value.dtype)
    if dropout and module.training:
        probabilities = F.dropout(probabilities, p=dropout, training=True)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def _probe_row_output(output, module, query, key, value, attention_mask, scaling, probe: torch.Tensor):
    """`output` `(b, q, heads, d)` with its last row -- the probe's -- recomputed from the layer's q/k/v over the keys
    the probe may see (`_probe_allowed`, within what the mask allows), softmax in float32 as the eager functions:
    for a mask that does not say the probe's rule. Every other row stays the kernel's (none attends to the probe)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    batch_size, num_queries, num_keys = query.shape[0], query.shape[2], key.shape[2]
    logits = torch.matmul(query[:, :, -1:].float(), key.float().transpose(-1, -2)) * scaling
    allowed = _allowed_keys(attention_mask, getattr(module, "is_causal", False), batch_size, num_queries, num_keys,
                            query.device)
    allowed = _probe_allowed(allowed, probe, batch_size, num_queries, num_keys, query.device)[:, -1:]
    logits = logits.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    row = torch.matmul(logits.softmax(dim=-1), value.float()).transpose(1, 2)
    return torch.cat([output[:, :-1], row.to(output.dtype)], dim=1)


def takes_dense_masks(name) -> bool:
    """Whether a backend's (or its twin's) masks are 4-D tensors: its mask function is sdpa's or eager's."""
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base_backend(name)) in (sdpa_mask, eager_mask)


def takes_bool_masks(name) -> bool:
    """Whether a backend's (or its twin's) masks are sdpa's: 4-D booleans, `True` where a key is attended."""
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base_backend(name)) is sdpa_mask


def _recording(base: str):
    dense_masks = takes_dense_masks(base)  # the twin is registered after its backend (and its mask function)

    def attention(module, query, key, value, attention_mask, *args, ivtp_rows: RowRequest | None = None,
                  ivtp_probe: torch.Tensor | None = None, **kwargs):
        dense = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4  # can say any rule
        probe = None if ivtp_probe is None or dense else ivtp_probe
        if ivtp_rows is not None and ivtp_rows.rows_only:
            ivtp_rows.attach(module, query, key, value, attention_mask, kwargs.get("scaling"), probe)
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
        if ivtp_rows is not None and ivtp_rows.every_row:
            return _attention_with_every_row(
                ivtp_rows, module, query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0)
            )
        if base == "eager" or (dense and not dense_masks):  # e.g. ToMe's bias on flash attention
            function = _eager_function(module)
        elif base in ALL_ATTENTION_FUNCTIONS:
            function = ALL_ATTENTION_FUNCTIONS[base]
        else:
            raise ValueError(
                f"attn_implementation {base!r} is not registered in transformers' AttentionInterface; register it "
                "(`AttentionInterface.register`) before running the model."
            )
        output = function(module, query, key, value, attention_mask, *args, **kwargs)
        if probe is not None:
            scaling = kwargs.get("scaling")
            output = (_probe_row_output(output[0], module, query, key, value, attention_mask, scaling, probe), *output[1:])
        if ivtp_rows is not None:
            ivtp_rows.attach(module, query, key, value, attention_mask, kwargs.get("scaling"), probe)
        return output

    attention.__name__ = f"ivtp_{base}_attention"
    return attention


def is_recording(name) -> bool:
    """Whether a backend name is a recording twin (`"ivtp_sdpa"`)."""
    return isinstance(name, str) and name.startswith(TWIN_PREFIX)


def base_backend(name):
    """The backend a (possibly recording) name runs: `"ivtp_sdpa"` -> `"sdpa"`; other names as they are."""
    return name[len(TWIN_PREFIX):] if is_recording(name) else name


def recording_backend(name):
    """The recording twin of a backend name (`"sdpa"` -> `"ivtp_sdpa"`), registered with transformers' attention
    and mask interfaces the first time (with the backend's mask function, if it has one); `None` and twins are
    returned as they are."""
    if name is None or is_recording(name):
        return name
    twin = TWIN_PREFIX + name
    registered = ALL_ATTENTION_FUNCTIONS._global_mapping.get(twin)
    if getattr(registered, "__module__", None) != __name__:  # absent, or another copy's (remote code, the package)
        AttentionInterface.register(twin, _recording(name))
        mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)
        if mask_function is not None:
            AttentionMaskInterface.register(twin, mask_function)
    return twin


def takes_masks(name) -> bool:
    """Whether a backend (or its twin) is handed masks: it has a mask function in transformers' mask interface."""
    return base_backend(name) in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


for _base in ("sdpa", "eager"):  # the stock ones at import; others when a model first runs with them
    recording_backend(_base)


__all__ = [
    "RowRequest", "base_backend", "is_recording", "moved", "recording_backend", "takes_bool_masks", "takes_dense_masks",
    "takes_masks",
]
