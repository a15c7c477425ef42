"""Procedural captioned scenes: an image folder that anyone can make, offline, in seconds.

Each scene is one shape (circle, square, triangle, diamond) of one colour, in one of nine positions
(a 3 x 3 grid), at one of two sizes, on a plain background of another colour. The caption names all
of it ("a small red circle at the top left on a blue background"), so a model that learns the
captions has learned something checkable, and the labels are written next to the caption.

:func:`write_image_folder` writes a folder in the Hugging Face ``imagefolder`` convention that
``memcore finetune`` reads: ``NNNNN.png`` and ``metadata.jsonl`` with ``file_name``, ``text`` and
the labels (``shape``, ``colour``, ``background``, ``position``, ``size``). A scene is a function of
``(seed, index)`` alone, so a folder of 100 scenes starts with the 10 scenes of a folder of 10.

Shapes are drawn at four times the size and reduced with a box filter, so edges are anti-aliased and
the pixels do not depend on PIL's rasterizer rounding at the final size.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from memcore.errors import MemcoreError

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (240, 200, 30),
    "purple": (148, 103, 189),
    "orange": (255, 127, 14),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
POSITIONS = tuple(f"{row} {column}" if (row, column) != ("middle", "centre") else "centre"
                  for row in ROWS for column in COLUMNS)
SIZES = ("small", "large")
SUPERSAMPLE = 4
VERSION = 2  # of the drawing and the captions: part of what a cached build depends on
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Scene:
    """What one image shows; :meth:`caption` says it in words."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    def caption(self) -> str:
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"a {self.size} {self.colour} {self.shape} {where} on {article} {self.background} background"


def scene(seed: int, index: int) -> Scene:
    """The scene at ``index`` of the stream of ``seed`` (shape and background colours differ)."""
    rng = random.Random(f"memcore.scenes:{seed}:{index}")
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(rng.choice(SHAPES), colour, background, rng.choice(POSITIONS), rng.choice(SIZES))


def draw(item: Scene, size: int = 64):
    """The scene as an RGB ``PIL.Image`` of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[item.background])
    row, column = _cell(item.position)
    cell = big / 3
    cx, cy = (column + 0.5) * cell, (row + 0.5) * cell
    radius = cell * (0.5 if item.size == "large" else 0.34)
    fill = COLOURS[item.colour]
    pen = ImageDraw.Draw(image)
    if item.shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif item.shape == "square":
        side = radius * 0.86
        pen.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif item.shape == "triangle":
        pen.polygon([(cx, cy - radius), (cx + radius * 0.92, cy + radius * 0.7), (cx - radius * 0.92, cy + radius * 0.7)],
                    fill=fill)
    else:  # diamond
        pen.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    return image.reduce(SUPERSAMPLE)


def _cell(position: str) -> tuple[int, int]:
    if position == "centre":
        return 1, 1
    row, column = position.split()
    return ROWS.index(row), COLUMNS.index(column)


def write_image_folder(folder: str | os.PathLike, count: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` scenes of the stream ``seed`` to ``folder`` (created; must not hold a
    ``metadata.jsonl``) as ``NNNNN.png`` plus ``metadata.jsonl``; the metadata is written last and
    atomically, so a folder with ``metadata.jsonl`` is complete."""
    from memcore.runs import write_atomic

    if count < 1:
        raise MemcoreError("must be at least 1 (got {count})", "count", count=count)
    if size < 8:
        raise MemcoreError("must be at least 8 pixels (got {size})", "size", size=size)
    folder = Path(folder)
    if (folder / METADATA).exists():
        raise MemcoreError("{path}: already holds an image folder", "folder", path=os.fspath(folder / METADATA))
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        item = scene(seed, index)
        name = f"{index:05d}.png"
        draw(item, size).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": item.caption(), **asdict(item)}))
    write_atomic(folder / METADATA, lambda path: Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return folder
