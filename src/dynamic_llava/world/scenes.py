"""A visual world we control: procedural scenes, their pictures, and LLaVA-format conversations about them.

A scene puts 1-4 small objects (shape, colour, size) into distinct cells of a 3 x 3 grid, each at a random
offset inside its cell, on a plain, slightly noisy background. A cluttered world (`clutter` > 0) also strews
clutter / 2 to clutter small specks over it (dots, bars and posts in colours no object has, in patches no object
touches): irrelevant but varied content, as real photos have. An object covers only a few image patches
(`object_patches`), so most image tokens carry nothing, as in real photos, and a random 20% keep often
loses whole objects. Objects are drawn to share colours and shapes with each other, so that questions
cannot be answered from a bag of words:

- colour / shape / position questions name one object whose other attribute also occurs elsewhere
  where the scene allows it;
- existence questions are "yes" half the time for every object count, and most "no" answers in
  multi-object scenes are binding traps (the colour and the shape both occur, on different objects);
- a description names every cell in reading order (>= 60 tokens), read from the image;
- a listing names the objects in a random order and then backwards: its second part depends on the
  order the first part chose, which nothing in the image or the prompt gives (`list` answers).

Every draw comes from `numpy.random.default_rng(seed)`: the same seed gives the same world.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from math import comb
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
GRID = 3
IMAGE_SIZE, PATCH_SIZE = 96, 12  # 8 x 8 = 64 image tokens
CLUTTER_COLORS = {"orange": (240, 140, 30), "brown": (120, 75, 40), "pink": (245, 160, 200), "cyan": (60, 205, 215),
                  "olive": (130, 130, 20), "black": (25, 25, 25)}
CLUTTER_KINDS = ("dot", "bar", "post")
HALF_WIDTH = {"small": 0.28, "large": 0.38}  # half the object's width, as a share of a cell's
COVERED = 0.25  # a patch shows an object when the object covers at least this share of it
QUESTION_TYPES = ("color", "shape", "count", "exist", "position")
LONG_TYPES = ("describe", "list")
DESCRIBE_PROMPT = "describe the image ."
LIST_PROMPT = "list the objects , then name them backwards ."
TRAP_SHARE = 0.9  # of "no" existence answers, where the scene allows a binding trap


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # index into CELLS
    dx: float = 0.0  # offset of the centre from the cell's centre, as a share of the cell
    dy: float = 0.0

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Speck:
    """Clutter: a small dot, bar or post in a colour no object has, inside one image patch that no object touches."""

    patch: int  # row-major index of the image patch it sits in
    kind: str
    color: str
    dx: float = 0.0  # offset of the centre from the patch's centre, in pixels
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int  # grey level
    noise_seed: int
    clutter: tuple[Speck, ...] = ()

    def at(self, cell: int) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)


def sample_scene(rng: np.random.Generator, max_objects: int = 4, min_objects: int = 1, clutter: int = 0) -> Scene:
    """1-4 objects in distinct cells, no two with the same colour and shape; each new object shares its
    colour (35%) or its shape (35%) with an earlier one, so that attributes recur across objects. With
    `clutter` > 0, clutter // 2 to clutter specks too (0 draws nothing more: the plain world is unchanged)."""
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    pairs: list[tuple[str, str]] = []
    objects = []
    for cell in cells:
        while True:
            color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            draw = rng.random()
            if pairs and draw < 0.35:
                color = pairs[rng.integers(len(pairs))][0]
            elif pairs and draw < 0.7:
                shape = pairs[rng.integers(len(pairs))][1]
            if (color, shape) not in pairs:
                break
        pairs.append((color, shape))
        size = SIZES[rng.integers(len(SIZES))]
        room = 0.5 - HALF_WIDTH[size] - 0.03
        dx, dy = (float(v) for v in rng.uniform(-room, room, 2))
        objects.append(SceneObject(shape=shape, color=color, size=size, cell=cell, dx=dx, dy=dy))
    scene = Scene(tuple(objects), background=int(rng.integers(90, 140)), noise_seed=int(rng.integers(2**31)))
    return replace(scene, clutter=_clutter(scene, clutter, rng)) if clutter > 0 else scene


def _clutter(scene: Scene, most: int, rng: np.random.Generator) -> tuple[Speck, ...]:
    """most // 2 to `most` specks in distinct patches that no object touches: content that a selection by
    diversity alone spends its budget on, and a learned one can tell is never asked about."""
    free = np.flatnonzero(coverage(scene).sum(axis=0) == 0)
    count = min(int(rng.integers(most // 2, most + 1)), len(free))
    patches = sorted(int(p) for p in rng.choice(free, size=count, replace=False))
    names = list(CLUTTER_COLORS)
    return tuple(Speck(patch=p, kind=CLUTTER_KINDS[rng.integers(len(CLUTTER_KINDS))],
                       color=names[rng.integers(len(names))], dx=float(rng.uniform(-2, 2)),
                       dy=float(rng.uniform(-2, 2)))
                 for p in patches)


def _draw_speck(draw: ImageDraw.ImageDraw, speck: Speck, image_size: int) -> None:
    patch = image_size / (IMAGE_SIZE // PATCH_SIZE)
    row, col = divmod(speck.patch, IMAGE_SIZE // PATCH_SIZE)
    cx, cy = (col + 0.5) * patch + speck.dx * patch / PATCH_SIZE, (row + 0.5) * patch + speck.dy * patch / PATCH_SIZE
    r = 0.22 * patch
    fill = CLUTTER_COLORS[speck.color]
    if speck.kind == "dot":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif speck.kind == "bar":
        draw.rectangle((cx - 1.4 * r, cy - 0.4 * r, cx + 1.4 * r, cy + 0.4 * r), fill=fill)
    else:
        draw.rectangle((cx - 0.4 * r, cy - 1.4 * r, cx + 0.4 * r, cy + 1.4 * r), fill=fill)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int, fill) -> None:
    cell = image_size / GRID
    row, col = divmod(obj.cell, GRID)
    half = cell * HALF_WIDTH[obj.size]
    cx, cy = (col + 0.5 + obj.dx) * cell, (row + 0.5 + obj.dy) * cell
    box = (cx - half, cy - half, cx + half, cy + half)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - 0.85 * half, cy - 0.85 * half, cx + 0.85 * half, cy + 0.85 * half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        bar = half * 0.38
        draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=fill)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The picture: background with mild noise, the clutter specks, one filled shape per object."""
    rng = np.random.default_rng(scene.noise_seed)
    pixels = scene.background + rng.normal(0, 6, (image_size, image_size, 1))
    image = Image.fromarray(np.clip(np.repeat(pixels, 3, axis=2), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for speck in scene.clutter:
        _draw_speck(draw, speck, image_size)
    for obj in scene.objects:
        _draw(draw, obj, image_size, COLORS[obj.color])
    return image


def coverage(scene: Scene, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """float [objects, patches]: the share of each image patch (row-major) that each object covers."""
    side = image_size // patch_size
    shares = []
    for obj in scene.objects:
        mask = Image.new("L", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(mask), obj, image_size, 255)
        grid = np.asarray(mask, dtype=np.float32).reshape(side, patch_size, side, patch_size) / 255.0
        shares.append(grid.mean(axis=(1, 3)).reshape(-1))
    return np.stack(shares) if shares else np.zeros((0, side * side), dtype=np.float32)


def object_patches(scene: Scene, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> list[list[int]]:
    """For each object, the patches that show it (covered >= `COVERED`; at least its best-covered one)."""
    shares = coverage(scene, image_size, patch_size)
    return [sorted(set(np.flatnonzero(s >= COVERED).tolist()) | {int(s.argmax())}) for s in shares]


def random_keep_loss_rate(scenes, keep_rate: float, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> float:
    """Expected share of objects of which a uniform random keep of floor(rate x tokens) image tokens keeps
    no patch (exact, hypergeometric): how often random pruning erases an object."""
    tokens = (image_size // patch_size) ** 2
    kept = int(keep_rate * tokens)
    losses = [comb(tokens - len(p), kept) / comb(tokens, kept)
              for scene in scenes for p in object_patches(scene, image_size, patch_size)]
    return float(np.mean(losses))


def describe(scene: Scene) -> str:
    """Every cell in reading order: the long answer read from the image (>= 60 tokens)."""
    count = len(scene.objects)
    parts = [f"the image shows {NUMBERS[count]} object{'s' if count > 1 else ''} on a grey background ."]
    for index, name in enumerate(CELLS):
        obj = scene.at(index)
        parts.append(f"{name} : {obj.phrase if obj else 'no object'} .")
    return " ".join(parts)


def listing(scene: Scene, rng: np.random.Generator) -> str:
    """The objects in a random order, then their names backwards: the second part follows the order that the
    first part chose, so it can only be produced by reading the answer's own earlier text."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    first = " ; ".join(f"{o.phrase} at {CELLS[o.cell]}" for o in order)
    return f"{first} . backwards : {' , '.join(o.name for o in reversed(order))} ."


def _prefer(candidates: list[SceneObject], confusable, rng: np.random.Generator) -> SceneObject:
    """A random candidate, among those that `confusable` holds for when there are any."""
    pool = [o for o in candidates if confusable(o)] or candidates
    return pool[rng.integers(len(pool))]


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of one type about the scene, or None if the scene cannot pose it."""
    objects = scene.objects
    if kind == "count":
        return "how many objects are there ?", NUMBERS[len(objects)]
    if kind == "describe":
        return DESCRIBE_PROMPT, describe(scene)
    if kind == "list":
        return LIST_PROMPT, listing(scene, rng)
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    if kind == "exist":
        if rng.random() < 0.5:
            obj = objects[rng.integers(len(objects))]
            return f"is there a {obj.color} {obj.shape} ?", "yes"
        present = set(zip(colors, shapes))
        traps = sorted({(c, s) for c in colors for s in shapes} - present)
        if traps and rng.random() < TRAP_SHARE:
            color, shape = traps[rng.integers(len(traps))]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[rng.integers(len(absent))]
        return f"is there a {color} {shape} ?", "no"
    if kind == "color":
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if unique:
            obj = _prefer(unique, lambda o: colors.count(o.color) > 1, rng)
            return f"what color is the {obj.shape} ?", obj.color
    if kind == "shape":
        unique = [o for o in objects if colors.count(o.color) == 1]
        if unique:
            obj = _prefer(unique, lambda o: shapes.count(o.shape) > 1, rng)
            return f"what shape is the {obj.color} object ?", obj.shape
    if kind == "position":
        obj = _prefer(list(objects), lambda o: colors.count(o.color) > 1 or shapes.count(o.shape) > 1, rng)
        return f"where is the {obj.color} {obj.shape} ?", CELLS[obj.cell]
    return None


def is_trap(scene: Scene, question: str) -> bool:
    """Whether an existence question is a binding trap: its colour and its shape both occur, never together."""
    color, shape = question.split()[3:5]
    colors, shapes = [o.color for o in scene.objects], [o.shape for o in scene.objects]
    return color in colors and shape in shapes and (color, shape) not in set(zip(colors, shapes))


def sample_turn(rng: np.random.Generator, kind: str, min_objects: int = 1,
                clutter: int = 0) -> tuple[Scene, tuple[str, str]]:
    """A scene (`clutter`: as `sample_scene`) and a question of `kind` about it (scenes that cannot pose it
    are drawn again); listings get 3-4 objects, so that their answers are long."""
    min_objects = max(min_objects, 3) if kind == "list" else min_objects
    while True:
        scene = sample_scene(rng, min_objects=min_objects, clutter=clutter)
        qa = ask(scene, kind, rng)
        if qa is not None:
            return scene, qa


def conversation(scene: Scene, first: tuple[str, str], rng: np.random.Generator, max_turns: int = 3) -> list[dict]:
    """LLaVA turns: `first`, then (after a short question) 0-`max_turns - 1` more short questions. The image
    comes with the first question, after it ("question\\n<image>"): with causal attention the image tokens can
    then read the question, so each can tell whether it is what is asked about."""
    turns = [first]
    if first[0] not in (DESCRIBE_PROMPT, LIST_PROMPT):
        for _ in range(int(rng.integers(0, max_turns))):
            qa = ask(scene, QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))], rng)
            turns.append(qa if qa is not None else ask(scene, "count", rng))
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"from": "human", "value": question + ("\n<image>" if i == 0 else "")})
        messages.append({"from": "gpt", "value": answer})
    return messages


def question_type(question: str) -> str:
    """The type of a question this world asks (for per-type accuracy)."""
    if question.startswith("how many"):
        return "count"
    if question.startswith("is there"):
        return "exist"
    if question.startswith("what color"):
        return "color"
    if question.startswith("what shape"):
        return "shape"
    if question.startswith("where"):
        return "position"
    if question.startswith("list"):
        return "list"
    return "describe"


SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
DEFAULT_MIX = {"color": 0.14, "shape": 0.14, "count": 0.14, "exist": 0.14, "position": 0.14, "describe": 0.15,
               "list": 0.15}


def write_split(root: Path, split: str, size: int, mix: dict[str, float] | None = None,
                image_size: int = IMAGE_SIZE, seed: int = 0, max_turns: int = 3, clutter: int = 0) -> Path:
    """Write `root/<split>.json` and `root/images/<split>/*.png`; returns the JSON path. The first turn of each
    record has a type drawn from `mix` (type -> share); `clutter`: as `sample_scene`. Deterministic by seed."""
    mix = mix or DEFAULT_MIX
    kinds, weights = list(mix), np.array(list(mix.values()), dtype=float)
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(size):
        scene, first = sample_turn(rng, kinds[rng.choice(len(kinds), p=weights / weights.sum())], clutter=clutter)
        name = f"{split}/{index:06d}.png"
        render(scene, image_size).save(root / "images" / name)
        records.append({"id": f"{split}-{index}", "image": name,
                        "conversations": conversation(scene, first, rng, max_turns)})
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


def corpus() -> list[str]:
    """Every word this world can say, for training its tokenizer."""
    words = [*SHAPES, *COLORS, *SIZES, *NUMBERS, *" ".join(CELLS).split()]
    words += "there is are object objects a the what color shape how many where describe image".split()
    words += "yes no shows on grey background list then name them backwards at USER ASSISTANT".split()
    return [" ".join(words), ". ? : , ;"]


__all__ = [
    "CELLS", "CLUTTER_COLORS", "CLUTTER_KINDS", "COLORS", "DEFAULT_MIX", "Speck", "LONG_TYPES", "QUESTION_TYPES",
    "SHAPES", "Scene", "SceneObject", "ask",
    "conversation", "corpus", "coverage", "describe", "is_trap", "listing", "object_patches", "question_type",
    "random_keep_loss_rate", "render", "sample_scene", "sample_turn", "write_split",
]
