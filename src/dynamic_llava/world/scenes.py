"""A visual world we control: procedural scenes, their pictures, and LLaVA-format conversations about them.

A scene puts 1-4 objects (shape, colour, size) into distinct cells of a 3 x 3 grid on a plain,
slightly noisy background, so most image patches carry nothing, as in real photos. Questions ask
for a colour, a shape, a count, whether an object exists (POPE style, balanced yes/no), or where an
object is; a description names every cell in reading order (a long answer, >= 60 tokens). Every
draw comes from `numpy.random.default_rng(seed)`: the same seed gives the same world.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
QUESTION_TYPES = ("color", "shape", "count", "exist", "position")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # index into CELLS

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int  # grey level
    noise_seed: int

    def at(self, cell: int) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)


def sample_scene(rng: np.random.Generator, max_objects: int = 4) -> Scene:
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    objects = tuple(
        SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=SIZES[rng.integers(len(SIZES))],
            cell=int(cell),
        )
        for cell in sorted(cells)
    )
    return Scene(objects, background=int(rng.integers(90, 140)), noise_seed=int(rng.integers(2**31)))


def render(scene: Scene, image_size: int = 96) -> Image.Image:
    """The picture: background with mild noise, one filled shape per occupied cell."""
    rng = np.random.default_rng(scene.noise_seed)
    pixels = scene.background + rng.normal(0, 6, (image_size, image_size, 1))
    image = Image.fromarray(np.clip(np.repeat(pixels, 3, axis=2), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        half = cell * (0.42 if obj.size == "large" else 0.26)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:
            bar = half * 0.38
            draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=fill)
            draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=fill)
    return image


def describe(scene: Scene) -> str:
    """Every cell in reading order: the long answer (>= 60 tokens with the world's tokenizer)."""
    count = len(scene.objects)
    parts = [f"the image shows {NUMBERS[count]} object{'s' if count > 1 else ''} on a grey background ."]
    for index, name in enumerate(CELLS):
        obj = scene.at(index)
        parts.append(f"{name} : {obj.phrase if obj else 'no object'} .")
    return " ".join(parts)


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of one type about the scene, or None if the scene cannot pose it."""
    objects = scene.objects
    if kind == "count":
        return "how many objects are there ?", NUMBERS[len(objects)]
    if kind == "exist":
        if rng.random() < 0.5:
            obj = objects[rng.integers(len(objects))]
            return f"is there a {obj.color} {obj.shape} ?", "yes"
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[rng.integers(len(absent))]
        return f"is there a {color} {shape} ?", "no"
    unique_shapes = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    unique_colors = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    if kind == "color" and unique_shapes:
        obj = unique_shapes[rng.integers(len(unique_shapes))]
        return f"what color is the {obj.shape} ?", obj.color
    if kind == "shape" and unique_colors:
        obj = unique_colors[rng.integers(len(unique_colors))]
        return f"what shape is the {obj.color} object ?", obj.shape
    unique = [o for o in objects if sum((p.color, p.shape) == (o.color, o.shape) for p in objects) == 1]
    if kind == "position" and unique:
        obj = unique[rng.integers(len(unique))]
        return f"where is the {obj.color} {obj.shape} ?", CELLS[obj.cell]
    return None


def conversation(scene: Scene, rng: np.random.Generator, describe_share: float, max_turns: int = 3) -> list[dict]:
    """LLaVA turns: a description, or 1-`max_turns` short questions. The image comes with the first question,
    after it ("question\n<image>"): with causal attention the image tokens can then read the question, so each
    can tell whether it is what is asked about (LLaVA's data has the image on either side of the text)."""
    if rng.random() < describe_share:
        turns = [("describe the image .", describe(scene))]
    else:
        turns = []
        for _ in range(int(rng.integers(1, max_turns + 1))):
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
    return "describe"


SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


def write_split(root: Path, split: str, size: int, describe_share: float = 0.3, image_size: int = 96,
                seed: int = 0) -> Path:
    """Write `root/<split>.json` and `root/images/<split>/*.png`; returns the JSON path. Deterministic by seed."""
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(size):
        scene = sample_scene(rng)
        name = f"{split}/{index:06d}.png"
        render(scene, image_size).save(root / "images" / name)
        records.append({"id": f"{split}-{index}", "image": name,
                        "conversations": conversation(scene, rng, describe_share)})
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


def corpus() -> list[str]:
    """Every word this world can say, for training its tokenizer."""
    words = [*SHAPES, *COLORS, *SIZES, *NUMBERS, *" ".join(CELLS).split()]
    words += "there is are object objects a the what color shape how many where describe image".split()
    words += "yes no shows on grey background USER ASSISTANT".split()
    return [" ".join(words), ". ? : ,"]


__all__ = [
    "CELLS", "COLORS", "QUESTION_TYPES", "SHAPES", "Scene", "SceneObject", "ask", "conversation", "corpus",
    "describe", "question_type", "render", "sample_scene", "write_split",
]
