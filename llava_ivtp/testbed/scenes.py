"""The accuracy testbed's task (v2): synthetic scenes of big and small coloured shapes and questions whose answer
depends on one object among distractors, on every object of a colour, or on the scene's largest object.
Deterministic by split and index; nothing is downloaded.

Each scene is a 192 px image (12 x 12 = 144 patches of 16 px, so 64 / 32 / 16 kept tokens are 44% / 22% / 11%) with
3-6 big objects (24-38 px) and 2-3 small ones (12-16 px, about one patch), 6 shapes x 6 colours, on a cluttered grey
background (a soft texture with grey specks and strokes). A question is one of seven kinds (`QUESTION_KINDS`),
each with a one-word answer:

- `color`: "What color is the star?" (a big object; the shape occurs once in the scene, big or small);
- `shape`: "What shape is the purple object?" (a big object; the colour occurs once in the scene);
- `exists`: "Is there a green triangle?" (any size; yes / no balanced; a "no" scene holds that colour and that shape
  apart);
- `where`: "Where is the circle?" (a big object, its shape once in the scene; left / middle / right by its centre,
  at least 8 px from a third's edge);
- `count`: "How many red objects are there?" (big and small; zero .. four): every object of the colour counts;
- `small`: a question about one small object, named by the question, in one of three forms: "What color is the
  small star?", "Where is the small star?" (its shape once in the scene), "Is there a small green triangle?" (a "no"
  scene holds green and triangle apart, or a big green triangle only). The kind where what to keep depends on the
  question: the object covers one to four patches of 144;
- `largest`: a question about the largest object of the scene, the same words for every scene, in one of two
  forms: "What color is the largest object?", "Where is the largest object?" (largest by drawn area, `object_area`,
  at least `LARGEST_MARGIN` times the next one's, so that the answer is plain to see; for `where` also clearly
  placed). The kind where the question does not say what to keep: it names
  no attribute, so instruction-guided and vision-only methods face the same choice.

`example(split, index)` cycles through the seven kinds (`TASK_KINDS`, the task the shipped model was trained and is
measured on); `kinds=` chooses another cycle (`V2_SIX_KINDS`: the cycle before `largest`, whose scenes trained the
shipped model's vision tower).

A scene also has a caption (for CLIP's contrastive training: "a small red star on the left, ...") and per-patch
labels (the object covering most of each patch and its colour and shape, 0 for background; a small object also
labels the patch holding most of it) that training may use as auxiliary supervision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


IMAGE_SIZE = 192
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 x 12 = 144 patches
COLORS = {
    "red": (215, 38, 38),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (232, 205, 35),
    "purple": (145, 55, 190),
    "orange": (240, 128, 28),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
QUESTION_KINDS = ("color", "shape", "exists", "where", "count", "small", "largest")  # every kind the generator asks
# The kinds `example(split, index)` cycles through by default: the task the shipped model was trained and measured on.
TASK_KINDS = QUESTION_KINDS
# v2's cycle before `largest` (2026-12-06): its scenes trained the shipped model's CLIP (`train clip`'s default).
V2_SIX_KINDS = QUESTION_KINDS[:6]
PLACES = ("left", "middle", "right")
SMALL_FORMS = ("color", "where", "exists")  # what a `small` question asks of the small object
# What a `largest` question asks of the largest object. Not its shape: squares and circles cover the most of their
# bounding box, so they are the largest object of most scenes, and the answer could be guessed.
LARGEST_FORMS = ("color", "where")
LARGEST_MARGIN = 1.3  # the largest object's drawn area is at least this times the next one's
COUNTS = ("zero", "one", "two", "three", "four")
ANSWERS = (*COLORS, *SHAPES, "yes", "no", *PLACES, *COUNTS)
SPLITS = {"train": 0, "validation": 1, "test": 2, "sparse": 3}
# `sparse` is a training split of simpler scenes (1-2 big objects, see `scene_objects`): a question about a big
# object's place can be answered there from every object's features together, which is where a model starts learning
# to read place; validation and test have only the full scenes.
SPARSE_BIG_OBJECTS = (1, 2)
BIG_OBJECTS, SMALL_OBJECTS = (3, 6), (2, 3)  # how many of each, inclusive
BIG_SIZES, SMALL_SIZES = (24, 38), (12, 16)  # bounding box side, px, inclusive
MIN_OBJECTS, MAX_OBJECTS = BIG_OBJECTS[0] + SMALL_OBJECTS[0], BIG_OBJECTS[1] + SMALL_OBJECTS[1]
PLACE_MARGIN = 8  # px an object's centre keeps from the edge of its third, so "where" has one answer


@dataclass(frozen=True)
class Task:
    """A family of scenes: the canvases a scene is drawn on (`(width, height)` px, one drawn per scene when there
    are several), how many big and small objects it holds (inclusive), and `stream`, what its random streams add to
    `(split, index, kind)` so that tasks never share a scene."""

    name: str
    canvases: tuple[tuple[int, int], ...]
    big_objects: tuple[int, int]
    small_objects: tuple[int, int]
    stream: tuple[int, ...] = ()


# v2: every scene 192 x 192 (one crop of the testbed CLIP). `NEXT`: the same objects at the same sizes on canvases up
# to twice as large (LLaVA-NeXT's AnyRes cuts them into 192 px tiles, beside the whole image shrunk to 192 px, where a
# small object is half a patch wide), with one to two more small objects.
V2 = Task("v2", ((IMAGE_SIZE, IMAGE_SIZE),), BIG_OBJECTS, SMALL_OBJECTS)
NEXT = Task("next", ((384, 384), (384, 288), (288, 384), (384, 192), (192, 384)), BIG_OBJECTS, (3, 5), stream=(1,))
TASKS = {task.name: task for task in (V2, NEXT)}


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    x: int  # centre, px
    y: int
    size: int  # bounding box side, px
    canvas_width: int = field(default=IMAGE_SIZE, repr=False)  # of the scene it is in: its thirds

    @property
    def small(self) -> bool:
        return self.size <= SMALL_SIZES[1]

    @property
    def place(self) -> str:
        return PLACES[min(self.x * 3 // self.canvas_width, 2)]

    @property
    def area(self) -> int:
        """The drawn area in pixels (`object_area`)."""
        return object_area(self)

    @property
    def clearly_placed(self) -> bool:
        third = self.canvas_width / 3
        offset = self.x - third * math.floor(self.x / third)
        return PLACE_MARGIN <= offset <= third - PLACE_MARGIN


@dataclass
class Example:
    """One question about one scene."""

    split: str
    index: int
    image: Image.Image
    question: str
    answer: str
    kind: str
    objects: list[SceneObject]
    caption: str
    # per 16 px patch of the canvas, (GRID, GRID) for v2 (rows, columns): 0 background, else 1 + index in COLORS /
    # in SHAPES / in `objects`
    patch_colors: np.ndarray = field(repr=False)
    patch_shapes: np.ndarray = field(repr=False)
    patch_objects: np.ndarray = field(repr=False)
    target: SceneObject | None = None  # the object the question is about (None for count / a "no")
    task: str = "v2"  # the name of its `Task`

    def record(self) -> dict:
        """The evaluation record: image, question, answers."""
        return {"image": self.image, "question": self.question, "answers": [self.answer], "kind": self.kind}

    def object_patches(self, obj: SceneObject) -> set[int]:
        """The flat indices (row-major over the GRID x GRID patches) of the patches labelled with `obj` -- the
        patches that show it."""
        found = self.patch_objects.reshape(-1) == self.objects.index(obj) + 1
        return set(np.flatnonzero(found).tolist())


def check_kinds(kinds) -> tuple[str, ...]:
    """`kinds` as a tuple of distinct question kinds; `ValueError` naming what is allowed otherwise."""
    if isinstance(kinds, str) or not kinds or any(k not in QUESTION_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"`kinds` must be distinct kinds from {list(QUESTION_KINDS)}, got {kinds!r}.")
    return tuple(kinds)


def example(split: str, index: int, kind: str | None = None, kinds=TASK_KINDS, task: Task = V2) -> Example:
    """Example `index` of `split` of `task`; its question kind cycles through `kinds` (by default `TASK_KINDS`)
    unless `kind` is given. A scene and its question depend on `(task, split, index, kind)` only, not on `kinds`."""
    if not isinstance(task, Task):
        raise ValueError(f"`task` must be a scenes.Task such as {list(TASKS)}, got {task!r}.")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"`index` must be an int >= 0, got {index!r}.")
    kinds = check_kinds(kinds)
    kind = kinds[index % len(kinds)] if kind is None else kind
    if kind not in QUESTION_KINDS:
        raise ValueError(f"`kind` must be one of {list(QUESTION_KINDS)}, got {kind!r}.")
    rng, canvas, objects, (question, answer, target) = _draw(split, index, kind, task)
    image, labels = _render(rng, objects, canvas)
    patch_objects = patch_object_labels(labels, objects)
    patch_colors, patch_shapes = _attribute_labels(patch_objects, objects)
    return Example(
        split=split, index=index, image=image, question=question, answer=answer, kind=kind, objects=objects,
        caption=caption(objects, rng), patch_colors=patch_colors, patch_shapes=patch_shapes,
        patch_objects=patch_objects, target=target, task=task.name,
    )


def _draw(split: str, index: int, kind: str, task: Task = V2):
    """The random stream of example `(task, split, index, kind)`, its canvas, its objects and its question (nothing
    drawn yet)."""
    rng = np.random.default_rng([SPLITS[split], index, QUESTION_KINDS.index(kind), *task.stream])
    canvas = task.canvases[int(rng.integers(len(task.canvases)))] if len(task.canvases) > 1 else task.canvases[0]
    forms = {"small": SMALL_FORMS, "largest": LARGEST_FORMS}.get(kind)
    form = forms[int(rng.integers(len(forms)))] if forms else None  # drawn once: balanced
    big_objects = SPARSE_BIG_OBJECTS if split == "sparse" else task.big_objects
    while True:  # a scene that cannot carry this kind of question is drawn again (from the same stream)
        objects = _scene_objects(rng, big_objects, task.small_objects, canvas)
        asked = _question(rng, kind, objects, form)
        if asked is not None:
            return rng, canvas, objects, asked


def training_turns(split: str, index: int, count: int, kinds=TASK_KINDS, task: Task = V2) -> list[tuple[str, str, str]]:
    """Up to `count` distinct `(question, answer, kind)` about the scene of `example(split, index, kinds=kinds,
    task=task)`: its own question first, then questions of every kind of `kinds` drawn in turn from a stream of
    their own (for training several answers per image; the image is not rendered)."""
    kinds = check_kinds(kinds)
    kind = kinds[index % len(kinds)]
    _, _, objects, (question, answer, _) = _draw(split, index, kind, task)
    turns, seen = [(question, answer, kind)], {question}
    rng = np.random.default_rng([SPLITS[split], index, len(kinds), *task.stream])
    for attempt in range(4 * count):
        if len(turns) >= count:
            break
        other = kinds[attempt % len(kinds)]
        asked = _question(rng, other, objects)
        if asked is not None and asked[0] not in seen:
            seen.add(asked[0])
            turns.append((asked[0], asked[1], other))
    return turns


def place_turns(split: str, index: int, kinds=TASK_KINDS, task: Task = V2) -> list[tuple[str, str, str]]:
    """Every `where` question the scene of `example(split, index, kinds=kinds, task=task)` can carry: "Where is the
    X?" for each big object and "Where is the small X?" for each small one whose shape occurs once in the scene and
    that is clearly placed (for training: the place of each object in turn)."""
    kinds = check_kinds(kinds)
    kind = kinds[index % len(kinds)]
    _, _, objects, _ = _draw(split, index, kind, task)
    shapes = [o.shape for o in objects]
    return [(f"Where is the {'small ' if o.small else ''}{o.shape}?", o.place, "small" if o.small else "where")
            for o in objects if shapes.count(o.shape) == 1 and o.clearly_placed]


def scene_of(spec: str) -> Example:
    """The example named `SPLIT:INDEX` (e.g. `test:3`, as the command lines take it); `ValueError` otherwise."""
    split, _, index = spec.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise ValueError(f"{spec}: expected SPLIT:INDEX with SPLIT in {list(SPLITS)}.")
    return example(split, int(index))


def examples(split: str, count: int, start: int = 0, kinds=TASK_KINDS, task: Task = V2) -> list[Example]:
    return [example(split, index, kinds=kinds, task=task) for index in range(start, start + count)]


def caption(objects: list[SceneObject], rng: np.random.Generator | None = None) -> str:
    """"a red star on the left, a small blue circle in the middle, ...", objects in a random order."""
    order = list(range(len(objects))) if rng is None else list(rng.permutation(len(objects)))
    where = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
    words = [f"{'small ' if objects[i].small else ''}{objects[i].color} {objects[i].shape} {where[objects[i].place]}"
             for i in order]
    return ", ".join(f"{'an' if word[0] in 'aeiou' else 'a'} {word}" for word in words)


# ----------------------------------------------------------------------------------------------------------------
# Scenes and questions
# ----------------------------------------------------------------------------------------------------------------
def _scene_objects(rng: np.random.Generator, big_objects: tuple[int, int], small_objects: tuple[int, int] = SMALL_OBJECTS,
                   canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> list[SceneObject]:
    """Big objects first, then small ones (how many: inclusive ranges), none closer than 4 px to another, on a
    `canvas` of `(width, height)` px."""
    width, height = canvas
    objects: list[SceneObject] = []
    for (low, high), (smallest, largest) in ((big_objects, BIG_SIZES), (small_objects, SMALL_SIZES)):
        count, placed, attempts = int(rng.integers(low, high + 1)), 0, 0
        while placed < count and attempts < 500:
            attempts += 1
            size = int(rng.integers(smallest, largest + 1))
            half = size // 2 + 2
            x, y = (int(v) for v in rng.integers([half, half], [width - half, height - half]))
            if any(abs(x - o.x) < (size + o.size) // 2 + 4 and abs(y - o.y) < (size + o.size) // 2 + 4
                   for o in objects):
                continue
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            objects.append(SceneObject(color, shape, x, y, size, canvas_width=width))
            placed += 1
    return objects


def _question(rng, kind: str, objects: list[SceneObject], form: str | None = None):
    """`(question, answer, target)` of `kind` about `objects`, or None when the scene cannot carry one; `form` is
    the form of a `small` question (drawn when None)."""
    def unique(attribute, small=False):
        values = [getattr(o, attribute) for o in objects]
        return [o for o in objects if values.count(getattr(o, attribute)) == 1 and o.small == small]

    def pick(candidates):
        return candidates[int(rng.integers(len(candidates)))] if candidates else None

    if kind == "color":
        target = pick(unique("shape"))
        return None if target is None else (f"What color is the {target.shape}?", target.color, target)
    if kind == "shape":
        target = pick(unique("color"))
        return None if target is None else (f"What shape is the {target.color} object?", target.shape, target)
    if kind == "where":
        target = pick([o for o in unique("shape") if o.clearly_placed])
        return None if target is None else (f"Where is the {target.shape}?", target.place, target)
    if kind == "count":
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        number = sum(o.color == color for o in objects)
        if number >= len(COUNTS):
            return None
        return f"How many {color} objects are there?", COUNTS[number], None
    if kind == "largest":
        form = form or LARGEST_FORMS[int(rng.integers(len(LARGEST_FORMS)))]
        first, second = sorted(objects, key=object_area, reverse=True)[:2]
        if object_area(first) < LARGEST_MARGIN * object_area(second) or (form == "where" and not first.clearly_placed):
            return None
        if form == "where":
            return "Where is the largest object?", first.place, first
        return "What color is the largest object?", first.color, first
    if kind == "small":
        form = form or SMALL_FORMS[int(rng.integers(len(SMALL_FORMS)))]
        if form == "exists":
            return _exists(rng, objects, small=True)
        candidates = unique("shape", small=True)
        if form == "where":
            target = pick([o for o in candidates if o.clearly_placed])
            return None if target is None else (f"Where is the small {target.shape}?", target.place, target)
        target = pick(candidates)
        return None if target is None else (f"What color is the small {target.shape}?", target.color, target)
    return _exists(rng, objects, small=False)


def _exists(rng, objects: list[SceneObject], small: bool):
    """"Is there a (small) green triangle?": yes for a pair in the scene (a small one when `small`); no for a pair
    whose colour and shape are both in the scene apart, or (when `small`) a pair the scene holds only big."""
    asked = [o for o in objects if o.small] if small else objects
    present = {(o.color, o.shape) for o in asked}
    def question(color, shape):
        words = f"{'small ' if small else ''}{color} {shape}"
        return f"Is there {'an' if words[0] in 'aeiou' else 'a'} {words}?"

    if rng.random() < 0.5:
        if not asked:  # every small object failed to find room
            return None
        target = asked[int(rng.integers(len(asked)))]
        return question(target.color, target.shape), "yes", target
    colors, shapes = {o.color for o in objects}, {o.shape for o in objects}
    absent = sorted((c, s) for c in colors for s in shapes if (c, s) not in present)
    if not absent:
        return None
    color, shape = absent[int(rng.integers(len(absent)))]
    return question(color, shape), "no", None


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
def _render(rng, objects: list[SceneObject], canvas: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> tuple[Image.Image, np.ndarray]:
    """The RGB image of `canvas` `(width, height)` and a label map (`0` background, `1 + i` object `i`)."""
    image = _background(rng, canvas)
    labels = Image.new("L", canvas, 0)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for index, obj in enumerate(objects):
        jitter = rng.integers(-18, 19, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter))
        for target, value in ((draw, fill), (label_draw, index + 1)):
            _draw_shape(target, obj, value)
    return image, np.asarray(labels)


def _background(rng, canvas: tuple[int, int]) -> Image.Image:
    """Soft texture (one coarse cell per 32 px), grey specks and strokes (as many per pixel on every canvas)."""
    width, height = canvas
    coarse = rng.normal(0.0, 1.0, size=(6 * height // IMAGE_SIZE, 6 * width // IMAGE_SIZE))
    texture = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize(canvas, Image.BICUBIC))
    base = float(rng.uniform(95, 165))
    grey = np.clip(base + 14 * texture + rng.normal(0, 5, size=(height, width)), 0, 255)
    image = Image.fromarray(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    scale = width * height / IMAGE_SIZE**2
    for _ in range(int(rng.integers(round(25 * scale), round(45 * scale)))):  # grey clutter: specks and short strokes
        x, y = (int(v) for v in rng.integers([0, 0], [width, height]))
        tone = int(np.clip(base + rng.normal(0, 45), 0, 255))
        if rng.random() < 0.6:
            radius = int(rng.integers(1, 4))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(tone,) * 3)
        else:
            dx, dy = (int(v) for v in rng.integers(-10, 11, size=2))
            draw.line([x, y, x + dx, y + dy], fill=(tone,) * 3, width=int(rng.integers(1, 3)))
    return image.filter(ImageFilter.SMOOTH)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    x, y, r = obj.x, obj.y, obj.size / 2
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=fill)
    elif obj.shape == "cross":
        w = r * 0.33
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:  # star: five points
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)


def object_area(obj: SceneObject) -> int:
    """The pixels `obj` covers when drawn (a circle of side 30 covers more than a star of side 34): it drawn alone,
    as `_render` draws it (objects never overlap and never touch the border, so this is its area in the scene)."""
    side = obj.size + 8
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), replace(obj, x=side // 2, y=side // 2), 1)
    return int(np.asarray(mask).sum())


def patch_object_labels(labels: np.ndarray, objects: list[SceneObject]) -> np.ndarray:
    """Per patch, `1 + i` for the object `i` covering most of it when that covers at least a quarter of it, else 0;
    a small object also labels the patch holding most of it (so every object has at least one patch)."""
    rows, columns = labels.shape[0] // PATCH_SIZE, labels.shape[1] // PATCH_SIZE
    patches = labels.reshape(rows, PATCH_SIZE, columns, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(rows * columns, -1)
    cover = np.stack([(patches == index + 1).sum(axis=1) for index in range(len(objects))], axis=1)
    owner = np.where(cover.max(axis=1) >= PATCH_SIZE * PATCH_SIZE // 4, cover.argmax(axis=1) + 1, 0)
    for index, obj in enumerate(objects):
        if obj.small and not (owner == index + 1).any():
            owner[int(cover[:, index].argmax())] = index + 1
    return owner.reshape(rows, columns)


def _attribute_labels(patch_objects: np.ndarray, objects: list[SceneObject]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, the colour class and shape class of the object `patch_objects` names (0 background)."""
    colors = np.array([0] + [list(COLORS).index(o.color) + 1 for o in objects])
    shapes = np.array([0] + [SHAPES.index(o.shape) + 1 for o in objects])
    return colors[patch_objects], shapes[patch_objects]


__all__ = [
    "ANSWERS", "COLORS", "COUNTS", "Example", "GRID", "IMAGE_SIZE", "LARGEST_FORMS", "LARGEST_MARGIN", "NEXT",
    "PATCH_SIZE", "PLACES", "QUESTION_KINDS", "SHAPES", "SPLITS", "SceneObject", "TASKS", "TASK_KINDS", "Task", "V2",
    "V2_SIX_KINDS",
    "caption", "check_kinds", "example",
    "examples", "object_area", "patch_object_labels", "place_turns", "training_turns",
]
