"""Where does "Where is the circle?" fail? Linear probes for the asked object's place (left / middle / right) at
three depths of the testbed model, at full tokens.

For `where` questions about an object that owns at least one patch, three features are read off one forward:

- `vision`: the vision tower's feature-layer output (what the projector gets), averaged over the object's patches;
- `projector`: the multimodal projector's output, averaged over the same patches (what the LLM gets);
- `answer state`: the LLM's last hidden state at the last prompt token (where the answer is predicted).

A linear probe (softmax regression, standardised features) is trained on the `train` split's questions and scored
on the `test` split's. If the vision features carry the place and the answer state does not, the LLM did not learn
to read it; if the projector already lost it, the projector did.

    python examples/where_probe.py [--model DIR] [--train 400] [--test 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_ivtp.testbed import scenes as testbed


TESTBED_MODEL = Path(__file__).resolve().parent.parent / "models" / "llava-ivtp-testbed"
DEPTHS = ("vision", "projector", "answer state")


@torch.no_grad()
def features(model, processor, split: str, count: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`({depth: (questions, width)}, places)` for the `where` questions of `split` 0..count-1 whose object owns a
    patch (an object can be too small to be the majority of any patch)."""
    rows, places = {depth: [] for depth in DEPTHS}, []
    for index in range(count):
        scene = testbed.example(split, index, kind="where")
        patches = sorted(scene.object_patches(scene.target)) if scene.target is not None else []
        if not patches:
            continue
        inputs = processor(images=[scene.image], text=f"USER: <image>\n{scene.question} ASSISTANT:", return_tensors="pt")
        out = model(**inputs, output_hidden_states=True)
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patch_features = tower.hidden_states[model.config.vision_feature_layer][0, 1:]
        rows["vision"].append(patch_features[patches].mean(dim=0))
        rows["projector"].append(model.model.multi_modal_projector(patch_features)[patches].mean(dim=0))
        rows["answer state"].append(out.hidden_states[-1][0, -1])
        places.append(testbed.PLACES.index(scene.answer))
    return {depth: torch.stack(values).float() for depth, values in rows.items()}, torch.tensor(places)


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 300) -> float:
    """Held-out accuracy of a softmax regression trained with Adam (weight decay 1e-3) on standardised features."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], len(testbed.PLACES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(dim=-1) == test_y).float().mean().item()


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TESTBED_MODEL))
    parser.add_argument("--train", type=int, default=400, help="train-split where-questions to fit the probes on")
    parser.add_argument("--test", type=int, default=200, help="test-split where-questions to score them on")
    args = parser.parse_args(argv)
    if args.train < 3 or args.test < 1:
        parser.error("--train must be >= 3 and --test >= 1")
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    model.config.schedule = None  # full tokens: the probe asks what the unpruned model knows
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    train_x, train_y = features(model, processor, "train", args.train)
    test_x, test_y = features(model, processor, "test", args.test)
    print(f"where-questions with the object on a patch: {len(train_y)} train, {len(test_y)} test; "
          f"majority-class share of the test questions {torch.bincount(test_y).max().item() / len(test_y):.3f}")
    accuracy = {}
    for depth in DEPTHS:
        accuracy[depth] = probe_accuracy(train_x[depth], train_y, test_x[depth], test_y)
        print(f"  {depth:>12}: probe accuracy {accuracy[depth]:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
