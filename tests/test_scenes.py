"""memcore.scenes: procedural captioned scenes, as an image folder that finetune reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memcore.errors import MemcoreError
from memcore.scenes import COLOURS, POSITIONS, SHAPES, Scene, draw, scene, write_image_folder


def test_a_scene_is_a_function_of_seed_and_index():
    assert [scene(3, i) for i in range(20)] == [scene(3, i) for i in range(20)]
    assert [scene(3, i) for i in range(20)] != [scene(4, i) for i in range(20)]
    many = [scene(0, i) for i in range(400)]
    assert {s.shape for s in many} == set(SHAPES) and {s.position for s in many} == set(POSITIONS)
    assert all(s.colour != s.background for s in many)


def test_caption_names_every_label():
    item = Scene("triangle", "red", "blue", "top left", "small")
    assert item.caption() == "a small red triangle at the top left on a blue background"
    assert Scene("circle", "green", "orange", "centre", "large").caption() == (
        "a large green circle in the centre on an orange background")


@pytest.mark.parametrize("position", POSITIONS)
def test_the_shape_is_where_the_caption_says(position):
    pixels = np.asarray(draw(Scene("square", "red", "blue", position, "large"), 48))
    row, column = (1, 1) if position == "centre" else (
        ("top", "middle", "bottom").index(position.split()[0]), ("left", "centre", "right").index(position.split()[1]))
    centre = pixels[row * 16 + 8, column * 16 + 8]
    assert tuple(centre) == COLOURS["red"]
    assert tuple(pixels[(row * 16 + 24) % 48, (column * 16 + 24) % 48]) == COLOURS["blue"]


def test_write_image_folder_is_read_by_finetune(tmp_path):
    from memcore.finetune import read_image_folder

    folder = write_image_folder(tmp_path / "scenes", 6, size=32, seed=1)
    examples = read_image_folder(folder)
    assert [e.file_name for e in examples] == [f"{i:05d}.png" for i in range(6)]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [scene(1, i).caption() for i in range(6)]
    assert rows[2]["shape"] == scene(1, 2).shape
    with pytest.raises(MemcoreError, match="already holds"):
        write_image_folder(folder, 6)
    with pytest.raises(MemcoreError, match="count"):
        write_image_folder(tmp_path / "none", 0)
