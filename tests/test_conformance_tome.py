"""ToMe (`tome`, `tome_plus`) against the official code's chain, `facebookresearch/ToMe` `tome/merge.py`.

`bipartite_soft_matching(metric, r, class_token)` splits the *current sequence* into A (even positions) and B (odd
positions), blocks the CLS row when `class_token`, matches each A token to its most similar B token, merges the `r`
best-scoring A tokens (`merge_wavg`: `merge(x * size, "sum") / merge(size, "sum")`) and returns the sequence
`cat([unm, dst])`: the unmerged A tokens (sorted by A index when `class_token`, else in score order), then every B
token. The next step splits that reordered sequence. The reference below is written from that reading, one sample
at a time with python lists; the pruners are driven as the runner drives them (`_run_vision_tower`, `_select_llm`).

Also `merge_counts`, whose bound used to be found by a loop exponential in the number of steps.
"""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_batch, tiny_config, tiny_model

from modeling_llava_ivtp import IvtpConfig
from modeling_llava_ivtp.pruner_tome import TomePlusPruner, TomePruner, merge_counts, tome_merge_step

PRESET = Path(__file__).resolve().parents[1] / "configuration" / "llava-1.5-7b-ivtp.json"


def random_tensor(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- merge_counts ------------------------------------------------------------------------------------------------


def brute_force_merge_counts(start, final, steps):
    """A brute-force definition of `merge_counts`: its bound found by counting up one token at a time."""
    bounds = [final]
    for _ in range(steps - 1):
        most = bounds[-1]
        while (most + 1) - (most + 1) // 2 <= bounds[-1]:
            most += 1
        bounds.append(most)
    bounds.reverse()
    removals, tokens = [], start
    for step in range(steps):
        removal = max(math.ceil((tokens - final) / (steps - step)), tokens - bounds[step])
        removal = min(removal, tokens // 2, tokens - final)
        removals.append(removal)
        tokens -= removal
    if tokens != final:
        raise ValueError("unreachable")
    return removals


def test_the_most_tokens_one_step_brings_down_to_b_is_2b():
    """`m - m // 2 = ceil(m / 2) <= b` holds up to `m = 2b`: the closed form of the old counting loop."""
    for bound in range(60):
        largest = max(m for m in range(4 * bound + 8) if m - m // 2 <= bound)
        assert largest == 2 * bound
    for bound in range(-10, 60):  # the old loop counts up from `b`, so for b <= 0 it stays at `b`
        most = bound
        while (most + 1) - (most + 1) // 2 <= bound:
            most += 1
        assert most == max(bound, 2 * bound)


def test_merge_counts_equals_the_brute_force_definition():
    for start in range(26):
        for final in range(-2, 28):
            for steps in range(7):
                try:
                    expected = brute_force_merge_counts(start, final, steps)
                except ValueError:
                    with pytest.raises(ValueError, match="ToMe cannot merge"):
                        merge_counts(start, final, steps)
                    continue
                assert merge_counts(start, final, steps) == expected, (start, final, steps)
    # A few larger ones the old loop still finishes quickly.
    for start, final, steps in ((576, 64, 8), (576, 120, 10), (300, 5, 9), (1000, 1, 12)):
        assert merge_counts(start, final, steps) == brute_force_merge_counts(start, final, steps)


def test_merge_counts_and_the_options_at_7b_depths_take_well_under_a_second():
    """576 patches over LLaVA-1.5-7B's 23 vision layers took ~30-60 s per call with the old loop (and it ran in
    `check_options` and `__init__`): a bound on a pathological loop, not a benchmark."""
    preset = json.loads(PRESET.read_text())
    began = time.perf_counter()
    for budget in (64, 32, 16):
        counts = merge_counts(576, budget, 23)
        assert len(counts) == 23 and sum(counts) == 576 - budget
        assert all(0 <= count for count in counts)
    for method, pruner in (("tome", TomePruner), ("tome_plus", TomePlusPruner)):
        for budget in (64, 32, 16):
            config = IvtpConfig(**dict(preset, schedule=None, pruning_method=method,
                                       pruning_options={"visual_tokens": budget}))
            assert config.num_patches == 576 and config.vision_layer_groups[-1][1] + 1 == 23
            built = pruner(config, None)
            assert len(built.removals) == 23
    elapsed = time.perf_counter() - began
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert merge_counts(576, 64, 23) == [23] * 6 + [22] * 17


# --- the official chain, one sample at a time ----------------------------------------------------------------------


def cosine(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def official_step(sequence, metric, features, sizes, r, class_token):
    """One `bipartite_soft_matching` + `merge_wavg` step on one sample.

    `sequence`: token ids in ToMe's order; `metric`, `features`: {id: list of floats}; `sizes`: {id: float}.
    Returns `(next sequence, features, sizes)` over the survivors. Ties: the first best B, and a stable sort by score
    (ToMe's `argsort(descending=True)` leaves them unspecified; ours is documented).
    """
    set_a, set_b = sequence[0::2], sequence[1::2]
    best = []
    for i, a in enumerate(set_a):
        score, partner = -math.inf, None
        if not (class_token and i == 0):  # `scores[..., 0, :] = -math.inf`
            for j, b in enumerate(set_b):
                similarity = cosine(metric[a], metric[b])
                if similarity > score:
                    score, partner = similarity, j
        best.append((score, partner))
    edge = sorted(range(len(set_a)), key=lambda i: -best[i][0])  # python's sort is stable
    src, unm = edge[:r], edge[r:]
    if class_token:
        unm = sorted(unm)
    groups = {b: [b] for b in set_b}
    for i in src:
        groups[set_b[best[i][1]]].append(set_a[i])
    next_features, next_sizes = {}, {}
    for i in unm:
        next_features[set_a[i]], next_sizes[set_a[i]] = features[set_a[i]], sizes[set_a[i]]
    for b, members in groups.items():
        total = sum(sizes[t] for t in members)
        next_sizes[b] = total
        next_features[b] = [sum(sizes[t] * features[t][d] for t in members) / total for d in range(len(features[b]))]
    return [set_a[i] for i in unm] + set_b, next_features, next_sizes


def as_dict(tensor_rows, ids):
    """{id: row as a list} for the rows of a (n, c) tensor, row `k` belonging to `ids[k]`."""
    return {int(token): [float(x) for x in row] for token, row in zip(ids, tensor_rows)}


class FakeRequest:
    """What the runner hands a pruner after a layer: the head-averaged keys of the layer's current tokens."""

    def __init__(self, key_means):
        self.key_means = key_means


def gather_rows(table, ids):
    """`table` `(images, N, c)` indexed by original id; the rows of the current tokens `ids` `(images, n)`."""
    return table.gather(1, ids.unsqueeze(-1).expand(-1, -1, table.shape[-1]))


def drive_vision(pruner, metrics, features):
    """Runs `pruner.after_vision_layer` over the steps as `_run_vision_tower` applies its selections (CLS kept first,
    the kept patches gathered, their merged features in). Layers are left out: each step's metric is given, its
    features are the previous step's. Yields per step `(ids (images, 1 + n) original ids, hidden, sizes, order)`."""
    images, tokens, _ = features.shape
    ids = torch.arange(tokens).expand(images, -1)
    hidden = features
    for layer_idx, metric in enumerate(metrics):
        selection = pruner.after_vision_layer(layer_idx, hidden, FakeRequest(gather_rows(metric, ids)))
        if selection is None:
            yield ids, hidden, pruner.sizes, pruner.order
            continue
        assert (selection.keep[:, 1:] > selection.keep[:, :-1]).all(), "the runner's contract: sorted indices"
        hidden = torch.cat([hidden[:, :1], selection.merged.to(hidden.dtype)], dim=1)
        ids = torch.cat([ids[:, :1], ids[:, 1:].gather(1, selection.keep)], dim=1)
        yield ids, hidden, pruner.sizes, pruner.order


def reference_vision(metrics, features, removals, sample, official=True):
    """The official chain (CLS protected: `class_token=True`) on one sample; `official=False`: the original-order rule
    (every step splits the tokens in their original order). Yields `(sequence, features, sizes)` per step."""
    tokens = features.shape[1]
    sequence = list(range(tokens))
    rows = as_dict(features[sample], range(tokens))
    sizes = {token: 1.0 for token in range(tokens)}
    for metric, r in zip(metrics, removals):
        if r:
            if not official:
                sequence = sorted(sequence)
            metric_rows = as_dict(metric[sample], range(tokens))
            sequence, rows, sizes = official_step(sequence, metric_rows, rows, sizes, r, class_token=True)
        yield sequence, rows, sizes


def assert_step_matches(ids, hidden, sizes, order, sample, sequence, rows, expected_sizes, official=True):
    kept = sorted(sequence)
    assert ids[sample].tolist() == kept, "the kept set (original ids), sorted"
    torch.testing.assert_close(hidden[sample], torch.tensor([rows[t] for t in kept]), atol=1e-5, rtol=0)
    if sizes is not None:
        torch.testing.assert_close(sizes[sample], torch.tensor([expected_sizes[t] for t in kept]), atol=1e-5, rtol=0)
    if official and order is not None:
        assert ids[sample][order[sample]].tolist() == sequence, "the tracked order is ToMe's sequence"


def tome_pruner(method="tome", order=None):
    options = {"visual_tokens": 8} if order is None else {"visual_tokens": 8, "order": order}
    cls = TomePruner if method == "tome" else TomePlusPruner
    return cls(tiny_config(schedule=None, pruning_method=method, pruning_options=options), None)


@pytest.mark.parametrize(
    "patches, removals",
    [(39, merge_counts(39, 8, 6)), (143, merge_counts(143, 16, 23)), (36, [0, 5, 0, 9, 4, 2])],
    ids=["40-tokens-6-steps", "7b-like-schedule-144-tokens", "with-idle-layers"],
)
def test_vision_chain_follows_the_official_chain(patches, removals):
    images, tokens = 2, patches + 1
    metrics = [random_tensor(images, tokens, 6, seed=100 + step) for step in range(len(removals))]
    features = random_tensor(images, tokens, 5, seed=7)
    pruner = tome_pruner()
    pruner.removals = removals  # this forward's schedule (per-call state on the pruner)
    driven = list(drive_vision(pruner, metrics, features))
    for sample in range(images):
        reference = list(reference_vision(metrics, features, removals, sample))
        for (ids, hidden, sizes, order), (sequence, rows, expected_sizes) in zip(driven, reference, strict=True):
            assert_step_matches(ids, hidden, sizes, order, sample, sequence, rows, expected_sizes)
    # The proportional attention of the next layer: log of the tracked sizes, CLS first.
    final_sizes = []
    for sample in range(images):
        *_, (_, _, expected_sizes) = reference_vision(metrics, features, removals, sample)
        final_sizes.append([expected_sizes[token] for token in sorted(expected_sizes)])
    torch.testing.assert_close(pruner.vision_mask(len(removals)), torch.tensor(final_sizes).log()[:, None, None, :])
    assert driven[-1][0].shape[1] == tokens - sum(removals)


def test_the_official_order_changes_the_merges():
    """Over 23 steps the official chain and the original-order rule keep different tokens (so the tests above
    could tell them apart), and the `original` option is the original-order rule."""
    patches, removals = 143, merge_counts(143, 16, 23)
    metrics = [random_tensor(1, patches + 1, 6, seed=300 + step) for step in range(23)]
    features = random_tensor(1, patches + 1, 5, seed=8)
    kept = {}
    for order in ("official", "original"):
        pruner = tome_pruner(order=order)
        pruner.removals = removals
        kept[order] = list(drive_vision(pruner, metrics, features))[-1][0][0].tolist()
    assert kept["official"] != kept["original"]


@pytest.mark.parametrize("patches, removals", [(39, merge_counts(39, 8, 6)), (143, merge_counts(143, 16, 23))])
def test_original_order_option_is_the_original_order_rule(patches, removals):
    images, tokens = 2, patches + 1
    metrics = [random_tensor(images, tokens, 6, seed=200 + step) for step in range(len(removals))]
    features = random_tensor(images, tokens, 5, seed=9)
    pruner = tome_pruner(order="original")
    pruner.removals = removals
    driven = list(drive_vision(pruner, metrics, features))
    assert pruner.order is None
    for sample in range(images):
        reference = reference_vision(metrics, features, removals, sample, official=False)
        for (ids, hidden, sizes, _), (sequence, rows, expected_sizes) in zip(driven, reference, strict=True):
            assert_step_matches(ids, hidden, sizes, None, sample, sequence, rows, expected_sizes, official=False)


def test_the_tiny_model_follows_the_official_chain():
    """End to end: the keys and layer outputs the tiny model's vision tower computes (captured with hooks), fed to
    the reference, give the model's `vision_keep_indices`, the next layers' inputs and proportional attention."""
    model = tiny_model(schedule=None, pruning_method="tome", pruning_options={"visual_tokens": 8})
    layers = model.model.vision_tower.encoder.layers[: model.config.vision_layer_groups[-1][1] + 1]
    heads = model.config.vision_config.num_attention_heads
    captured = {"keys": [], "inputs": [], "masks": [], "outputs": []}

    def keys_hook(module, args, output):
        captured["keys"].append(output.view(*output.shape[:2], heads, -1).mean(dim=2).detach())

    def input_hook(module, args, kwargs):
        captured["inputs"].append(args[0].detach())
        captured["masks"].append(args[1] if len(args) > 1 else kwargs.get("attention_mask"))

    def output_hook(module, args, output):
        captured["outputs"].append((output[0] if isinstance(output, tuple) else output).detach())

    handles = []
    for layer in layers:
        handles.append(layer.self_attn.k_proj.register_forward_hook(keys_hook))
        handles.append(layer.register_forward_pre_hook(input_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(output_hook))
    batch = make_batch()
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured["keys"]) == len(captured["outputs"]) == len(layers)
    removals = merge_counts(model.config.num_patches, 8, len(layers))
    for sample in range(batch["pixel_values"].shape[0]):
        sequence = list(range(model.config.num_patches + 1))
        sizes, rows = {token: 1.0 for token in sequence}, None
        for layer_idx, r in enumerate(removals):
            kept = sorted(sequence)
            if layer_idx:  # the layer's input: the merged tokens of the step before, CLS first; sizes as log s
                torch.testing.assert_close(
                    captured["inputs"][layer_idx][sample], torch.tensor([rows[t] for t in kept]), atol=1e-5, rtol=0
                )
                expected_mask = torch.tensor([sizes[t] for t in kept]).log()
                torch.testing.assert_close(captured["masks"][layer_idx][sample, 0, 0], expected_mask)
            metric = as_dict(captured["keys"][layer_idx][sample], kept)
            rows = as_dict(captured["outputs"][layer_idx][sample], kept)
            sequence, rows, sizes = official_step(sequence, metric, rows, sizes, r, class_token=True)
        patches = [token - 1 for token in sorted(sequence) if token]
        assert out.vision_keep_indices[sample].tolist() == patches


# --- the LLM steps of tome_plus: no CLS, unmerged A tokens in score order -------------------------------------------


def reference_llm_groups(sequence, group_metrics, group_features, targets):
    """ToMe+ in the LLM on one sample: per group, steps of `min(n - target, n // 2)` (`class_token=False`) with that
    group's metric, sizes from one; the sequence carried from step to step and group to group."""
    for metric, features, target in zip(group_metrics, group_features, targets):
        sizes = {token: 1.0 for token in sequence}
        rows = {token: features[token] for token in sequence}
        while len(sequence) > target:
            r = min(len(sequence) - target, len(sequence) // 2)
            sequence, rows, sizes = official_step(sequence, metric, rows, sizes, r, class_token=False)
        yield sequence, rows


def test_pure_step_chain_without_class_token_follows_the_official_chain():
    """`tome_merge_step(protected=0, order=...)` step by step: kept set, features, sizes and order at every step."""
    tokens, dim = 40, 5
    features = random_tensor(2, tokens, dim, seed=40)
    for sample in range(2):
        sequence = list(range(tokens))
        rows = as_dict(features[sample], sequence)
        sizes = {token: 1.0 for token in sequence}
        ids, hidden, tracked_sizes, order = torch.arange(tokens)[None], features[sample : sample + 1], None, None
        for step, r in enumerate((20, 8, 5, 3, 1, 1)):
            metric = random_tensor(1, tokens, 6, seed=50 + step)
            result = tome_merge_step(gather_rows(metric, ids), hidden, r, sizes=tracked_sizes, protected=0, order=order)
            ids, hidden, tracked_sizes, order = ids.gather(1, result.keep), result.merged, result.sizes, result.order
            sequence, rows, sizes = official_step(sequence, as_dict(metric[0], range(tokens)), rows, sizes, r, False)
            assert_step_matches(ids, hidden, tracked_sizes, order, 0, sequence, rows, sizes)


def drive_llm(pruner, group_metrics, group_features, visual, text=3):
    """Runs `after_llm_layer` over the pruning layers as `_select_llm` applies the selections: the visual tokens sit
    after `text` text tokens; each group's features and metric are given (by id). Yields `(ids, merged)`."""
    images = group_metrics[0].shape[0]
    ids = torch.arange(visual).expand(images, -1)  # patch ids of each image's visual tokens, sorted
    view = SimpleNamespace(image_rows=torch.arange(images))
    for layer_idx, metric, features in zip(pruner.llm_prune_layers(), group_metrics, group_features):
        view.visual_slots = text + torch.arange(ids.shape[1]).expand(images, -1)
        hidden = torch.cat([torch.zeros(images, text, features.shape[-1]), gather_rows(features, ids)], dim=1)
        selection = pruner.after_llm_layer(layer_idx, view, FakeRequest(gather_rows(metric, ids)), hidden)
        assert (selection.keep[:, 1:] > selection.keep[:, :-1]).all()
        ids = ids.gather(1, selection.keep)
        yield ids, selection.merged


def test_tome_plus_llm_groups_follow_the_official_chain():
    images, visual, targets = 2, 39, (12, 5, 2)  # more than half must go in each group: two steps each
    group_metrics = [random_tensor(images, visual, 6, seed=60 + g) for g in range(3)]
    group_features = [random_tensor(images, visual, 4, seed=70 + g) for g in range(3)]
    pruner = tome_pruner("tome_plus")
    pruner.llm = {1: 12, 3: 5, 5: 2}
    driven = list(drive_llm(pruner, group_metrics, group_features, visual))
    for sample in range(images):
        reference = reference_llm_groups(
            list(range(visual)), [as_dict(m[sample], range(visual)) for m in group_metrics],
            [as_dict(f[sample], range(visual)) for f in group_features], targets,
        )
        for (ids, merged), (sequence, rows) in zip(driven, reference, strict=True):
            assert ids[sample].tolist() == sorted(sequence)
            torch.testing.assert_close(merged[sample], torch.tensor([rows[t] for t in sorted(sequence)]), atol=1e-5,
                                       rtol=0)
        assert ids[sample][pruner.llm_order[sample]].tolist() == sequence


def test_tome_plus_carries_the_vision_order_into_the_llm():
    """One forward's chain: the tower's ToMe sequence (its CLS left out) is the LLM's first sequence."""
    images, patches, removals, targets = 2, 35, [6, 5, 4], (9, 4)
    metrics = [random_tensor(images, patches + 1, 6, seed=80 + step) for step in range(3)]
    features = random_tensor(images, patches + 1, 5, seed=90)
    pruner = tome_pruner("tome_plus")
    pruner.removals, pruner.llm = removals, {2: 9, 4: 4}
    *_, (vision_ids, _, _, _) = drive_vision(pruner, metrics, features)
    visual = vision_ids.shape[1] - 1
    group_metrics = [random_tensor(images, patches, 6, seed=95 + g) for g in range(2)]
    group_features = [random_tensor(images, patches, 4, seed=97 + g) for g in range(2)]
    # The LLM's visual tokens are the tower's survivors in patch order; the driver indexes them 0..visual-1.
    survivors = vision_ids[:, 1:] - 1
    driven = list(drive_llm(pruner, [gather_rows(m, survivors) for m in group_metrics],
                            [gather_rows(f, survivors) for f in group_features], visual))
    for sample in range(images):
        *_, (sequence, _, _) = reference_vision(metrics, features, removals, sample)
        llm_sequence = [token - 1 for token in sequence if token]  # patch ids, the CLS left out
        reference = reference_llm_groups(
            llm_sequence, [as_dict(m[sample], range(patches)) for m in group_metrics],
            [as_dict(f[sample], range(patches)) for f in group_features], targets,
        )
        for (ids, merged), (expected, rows) in zip(driven, reference, strict=True):
            patch_ids = survivors[sample][ids[sample]]
            assert patch_ids.tolist() == sorted(expected)
            torch.testing.assert_close(merged[sample], torch.tensor([rows[t] for t in sorted(expected)]), atol=1e-5,
                                       rtol=0)
        assert survivors[sample][ids[sample][pruner.llm_order[sample]]].tolist() == expected
    original = tome_pruner("tome_plus", order="original")
    original.removals, original.llm = removals, {2: 9, 4: 4}
    list(drive_vision(original, metrics, features))
    list(drive_llm(original, [gather_rows(m, survivors) for m in group_metrics],
                   [gather_rows(f, survivors) for f in group_features], visual))
    assert original.order is None and original.llm_order is None


# --- ties, by hand ---------------------------------------------------------------------------------------------------


def test_ties_with_a_class_token():
    """Every similarity equal: the lower A index merges first, into the lower B index; the unmerged A tokens come back
    sorted (CLS first), then B; the next step splits that sequence -- unlike the original-order rule."""
    features = torch.arange(7, dtype=torch.float32).reshape(1, 7, 1)
    step = tome_merge_step(torch.ones(1, 7, 3), features, 2, protected=1)
    # A = 0 (CLS, blocked), 2, 4, 6; B = 1, 3, 5: tokens 2 and 4 merge into 1; unmerged A sorted: 0, 6.
    assert step.keep.tolist() == [[0, 1, 3, 5, 6]] and step.sizes.tolist() == [[1, 3, 1, 1, 1]]
    assert step.merged[0].squeeze(-1).tolist() == pytest.approx([0.0, 7 / 3, 3.0, 5.0, 6.0])
    assert step.keep[0][step.order[0]].tolist() == [0, 6, 1, 3, 5]
    again = tome_merge_step(torch.ones(1, 5, 3), step.merged, 1, sizes=step.sizes, protected=1, order=step.order)
    # Sequence 0, 6, 1, 3, 5: A = 0, 1, 5; B = 6, 3: token 1 (size 3) merges into token 6.
    kept = step.keep.gather(1, again.keep)
    assert kept.tolist() == [[0, 3, 5, 6]] and again.sizes.tolist() == [[1, 1, 1, 4]]
    assert again.merged[0, -1].item() == pytest.approx((3 * 7 / 3 + 6) / 4)
    assert kept[0][again.order[0]].tolist() == [0, 5, 6, 3]
    original = tome_merge_step(torch.ones(1, 5, 3), step.merged, 1, sizes=step.sizes, protected=1)
    # Original order 0, 1, 3, 5, 6: A = 0, 3, 6; B = 1, 5: token 3 merges into token 1.
    assert step.keep.gather(1, original.keep).tolist() == [[0, 1, 5, 6]] and original.sizes.tolist() == [[1, 4, 1, 1]]


def test_ties_without_a_class_token():
    step = tome_merge_step(torch.ones(1, 6, 3), torch.rand(1, 6, 2), 2, protected=0)
    # A = 0, 2, 4; B = 1, 3, 5; equal scores: A 0 and 2 merge into 1; the unmerged A (4) first, then B.
    assert step.keep.tolist() == [[1, 3, 4, 5]] and step.sizes.tolist() == [[3, 1, 1, 1]]
    assert step.keep[0][step.order[0]].tolist() == [4, 1, 3, 5]
    # Equal scores among the unmerged keep the lower A index first.
    step = tome_merge_step(torch.ones(1, 8, 3), torch.rand(1, 8, 2), 1, protected=0)
    assert step.keep[0][step.order[0]].tolist() == [2, 4, 6, 1, 3, 5, 7]


def test_unmerged_a_tokens_come_back_in_score_order_without_a_class_token():
    # B: 1 -> (1, 0), 3 -> (0, 1), 5 -> (-1, 0); A: 0 -> (1, 2) (best cos 0.894), 2 -> (1, 3) (0.949), 4 -> (0, 1) (1).
    metric = torch.tensor([[[1.0, 2.0], [1.0, 0.0], [1.0, 3.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]])
    features = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    step = tome_merge_step(metric, features, 1, protected=0)
    assert step.keep.tolist() == [[0, 1, 2, 3, 5]] and step.merged.squeeze(-1).tolist() == [[0, 1, 2, 3.5, 5]]
    assert step.keep[0][step.order[0]].tolist() == [2, 0, 1, 3, 5], "unmerged A by score (2 before 0), then B"
    with_cls = tome_merge_step(metric, features, 1, protected=1)  # token 0 is then a CLS: unmerged A sorted
    assert with_cls.keep[0][with_cls.order[0]].tolist() == [0, 2, 1, 3, 5]


# --- the option --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "tome_plus"])
def test_the_order_option(method):
    assert tome_pruner(method).values["order"] == "official"
    assert tome_pruner(method, order="original").values["order"] == "original"
    for bad in ("sorted", None, 1):
        with pytest.raises(ValueError, match=r"`pruning_options\['order'\]`.*'official', 'original'"):
            tiny_config(schedule=None, pruning_method=method, pruning_options={"visual_tokens": 8, "order": bad})


def test_tome_on_llava_next_merges_each_crop_as_on_llava_1_5_and_lays_them_out_without_unpadding():
    """LLaVA-NeXT (ours): each crop goes through the tower's ToMe chain alone, to the budget's share (60 // 5 = 12 per
    crop) -- the chain the LLaVA-1.5 host runs on one image, checked against the official one above -- and the
    survivors are laid out as the peers' per-crop code lays out tokens without unpadding: the base crop's in order,
    then the tiles' in raster order over the stitched grid; no newline."""
    from modeling_llava_ivtp.transformers_compat import output_image_features
    from tiny_models import make_next_batch, make_prompt, tiny_next_model

    next_model = tiny_next_model(pruning_method="tome", pruning_options={"visual_tokens": 60})
    one_image = tiny_model(schedule=None, pruning_method="tome", pruning_options={"visual_tokens": 12})
    weights = {k: v for k, v in next_model.state_dict().items() if k.startswith(("model.vision_tower", "model.multi_modal"))}
    missing = one_image.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys
    batch = make_next_batch(next_model.config)
    layouts = next_model.image_layouts(batch["image_sizes"])
    side = 6
    with torch.no_grad():
        out = next_model(**batch, use_cache=False)
        first = 0
        for row in range(2):
            crops = layouts[row].crops
            pixels = batch["pixel_values"][row, :crops]
            per_crop = one_image(input_ids=torch.tensor([make_prompt(2, 3)] * crops), pixel_values=pixels, use_cache=False)
            kept, features = per_crop.vision_keep_indices, output_image_features(per_crop).view(crops, 12, -1)
            columns = layouts[row].grid[1]
            tiles = sorted((((tile // columns) * side + int(patch) // side) * columns * side
                            + (tile % columns) * side + int(patch) % side, tile, j)
                           for tile in range(crops - 1) for j, patch in enumerate(kept[1 + tile]))
            block = torch.cat([features[0], torch.stack([features[1 + tile, j] for _, tile, j in tiles])])
            torch.testing.assert_close(output_image_features(out)[first : first + len(block)], block, atol=1e-5, rtol=1e-5)
            first += len(block)
