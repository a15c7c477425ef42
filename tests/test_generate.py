"""memcore.generate on the tiny pipeline: 64 px, 2 steps, 2 prompts x 3 seeds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from memcore import generate as gen
from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.models import load_pipeline

PROMPTS = ["a painting of a fox", "the great wave off kanagawa, woodblock print, " * 6]
SEEDS = [0, 1, 7]
SIZE = 64
SETTINGS = {"steps": 2, "height": SIZE, "width": SIZE, "progress": False}


def tiny():
    return load_pipeline("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def real_mask():
    from memcore.localization import localize

    config = LocalizeConfig(timesteps=2, height=SIZE, width=SIZE, sparsity=0.05, progress=False)
    mask, _ = localize(tiny(), PROMPTS, config)
    return mask


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def expected_size(rows, cols, blocks):
    """The documented geometry, written out independently of grid_size()."""
    block_w = cols * SIZE + (cols - 1) * gen.GAP
    width = 2 * gen.MARGIN + blocks * block_w + (blocks - 1) * gen.BLOCK_GAP
    height = 2 * gen.MARGIN + (gen.HEADER if blocks == 2 else 0) + gen.SEED_BAND + rows * (SIZE + gen.CAPTION)
    return width, height


def test_parse_seeds():
    assert gen.parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert gen.parse_seeds("0-3") == [0, 1, 2, 3]
    assert gen.parse_seeds(" 5, 1-2 ,9") == [5, 1, 2, 9]
    assert gen.parse_seeds("4-4") == [4]


@pytest.mark.parametrize("text", ["", "a", "-1", "3-1", "1,1", "0-", "1.5", "1,,2", "0-2,1", "0-99999999"])
def test_parse_seeds_rejects(text):
    with pytest.raises(MemcoreError, match="^seeds: ") as info:
        gen.parse_seeds(text)
    assert info.value.param == "seeds"


@pytest.mark.parametrize("seeds", [[], [-1], [True], [1.0], [2**64], [3, 3]])
def test_check_seeds_rejects(seeds):
    with pytest.raises(MemcoreError, match="^seeds: ") as info:
        gen.check_seeds(seeds)
    assert info.value.param == "seeds"


def test_originals(tmp_path):
    out = tmp_path / "gen"
    result = gen.generate(tiny(), PROMPTS, SEEDS, out_dir=out, **SETTINGS)

    assert result.grid_size == expected_size(2, 3, 1) == (216, 224)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == result.grid_size
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(f"p{i:03d}_s{s}.png" for i in range(2) for s in SEEDS)
    assert result.pruned_images == [] and result.zeroed is None
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "manifest.json"]

    # Each tile of the grid is its image, where the geometry says it is.
    grid = pixels(result.grid)
    for row in range(2):
        for col, seed in enumerate(SEEDS):
            x = gen.MARGIN + col * (SIZE + gen.GAP)
            y = gen.MARGIN + gen.SEED_BAND + row * (SIZE + gen.CAPTION)
            np.testing.assert_array_equal(grid[y : y + SIZE, x : x + SIZE], pixels(out / "images" / f"p{row:03d}_s{seed}.png"))

    # Different seeds, different x_T, different images.
    for row in range(2):
        a, b, c = (pixels(out / "images" / f"p{row:03d}_s{s}.png") for s in SEEDS)
        assert not np.array_equal(a, b) and not np.array_equal(b, c)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["seeds"] == SEEDS and manifest["mask"] is None
    assert manifest["settings"]["steps"] == 2 and manifest["settings"]["height"] == SIZE
    assert manifest["grid"]["size"] == list(result.grid_size)
    assert len(manifest["images"]) == 6


def test_empty_mask_gives_the_same_images(tmp_path, real_mask):
    """Same x_T per seed: with no weight masked, pruned images equal the originals pixel for pixel."""
    for packed in real_mask.layers.values():
        assert packed.any()
    empty = type(real_mask)(layers={k: torch.zeros_like(v) for k, v in real_mask.layers.items()}, metadata=real_mask.metadata)
    out = tmp_path / "gen"
    result = gen.generate(tiny(), PROMPTS, SEEDS, mask=empty, out_dir=out, **SETTINGS)

    assert result.zeroed == 0
    assert result.grid_size == expected_size(2, 3, 2) == (440, 244)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == result.grid_size
    assert len(result.images) == len(result.pruned_images) == 6
    for original, pruned in zip(result.images, result.pruned_images):
        assert pruned.name == original.name.replace(".png", "_pruned.png")
        np.testing.assert_array_equal(pixels(original), pixels(pruned))


def test_real_mask_changes_images(tmp_path, real_mask):
    pipe = tiny()
    mask_file = tmp_path / "mask.safetensors"
    real_mask.save(mask_file)
    out = tmp_path / "gen"
    result = gen.generate(pipe, PROMPTS, SEEDS[:2], mask=mask_file, out_dir=out, **SETTINGS)

    assert result.zeroed == sum(real_mask.count(name) for name in real_mask.layers) > 0
    differ = [not np.array_equal(pixels(a), pixels(b)) for a, b in zip(result.images, result.pruned_images)]
    assert any(differ)
    # The pipeline was pruned in place.
    from memcore.targets import find_targets

    for target in find_targets(pipe):
        assert not target.linear.weight[real_mask.unpack(target.name)].any()
    summary = json.loads((out / "manifest.json").read_text())["mask"]
    assert summary["path"] == str(mask_file) and summary["zeroed"] == result.zeroed
    assert summary["sparsity"] == 0.05


def snapshot(folder):
    return sorted(p.name for p in folder.iterdir())


def test_existing_out_dir(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    with pytest.raises(MemcoreError, match="already exists"):
        gen.generate(tiny(), PROMPTS, SEEDS, out_dir=out, **SETTINGS)
    assert snapshot(out) == [] and snapshot(tmp_path) == ["gen"]


@pytest.mark.parametrize(
    "prompts, seeds",
    [([], SEEDS), ("a fox", SEEDS), ([1, 2], SEEDS), (PROMPTS, []), (PROMPTS, [-3]), (PROMPTS, [0, 0])],
)
def test_bad_prompts_or_seeds(tmp_path, prompts, seeds):
    with pytest.raises(MemcoreError):
        gen.generate(tiny(), prompts, seeds, out_dir=tmp_path / "gen", **SETTINGS)
    assert snapshot(tmp_path) == []


def test_mask_for_another_model(tmp_path, real_mask):
    """Refused before any image is generated: nothing written, the pipeline left as it was."""
    name = next(iter(real_mask.metadata["shapes"]))
    metadata = json.loads(json.dumps(real_mask.metadata))
    metadata["shapes"][name][0] += 1
    other = type(real_mask)(layers=real_mask.layers, metadata=metadata)
    pipe = tiny()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(MemcoreError, match="target layers differ"):
        gen.generate(pipe, PROMPTS, SEEDS, mask=other, out_dir=tmp_path / "gen", **SETTINGS)
    assert snapshot(tmp_path) == []
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_mask_file_missing(tmp_path):
    with pytest.raises(MemcoreError, match="no such file"):
        gen.generate(tiny(), PROMPTS, SEEDS, mask=tmp_path / "none.safetensors", out_dir=tmp_path / "gen", **SETTINGS)
    assert snapshot(tmp_path) == []


def test_caption_wrapping():
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=gen.FONT_SIZE)
    lines = gen._wrap(draw, "word " * 200, 150, font)
    assert len(lines) == gen.CAPTION_LINES and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 150 for line in lines)
    assert gen._wrap(draw, "short", 150, font) == ["short"]
    assert gen._wrap(draw, "x" * 500, 150, font)[0].startswith("xxx")


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl", "tiny-pixart", "tiny-sd3"])
def test_every_family_draws_before_and_after_pruning(tmp_path, name):
    from memcore.localization import localize

    config = LocalizeConfig(timesteps=2, steps=3, height=SIZE, width=SIZE, sparsity=0.05, progress=False)
    mask, _ = localize(load_pipeline(name), PROMPTS[:1], config)
    result = gen.generate(load_pipeline(name), PROMPTS[:1], [0, 1], out_dir=tmp_path / "out", mask=mask, **SETTINGS)
    assert result.zeroed > 0
    with Image.open(result.grid) as grid:
        assert grid.size == gen.grid_size(1, 2, SIZE, SIZE, pruned=True)
    assert any(not np.array_equal(pixels(a), pixels(b)) for a, b in zip(result.images, result.pruned_images))
