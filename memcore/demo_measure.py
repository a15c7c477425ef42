"""What the tiny memorizer learned: caption consistency on held-out scenes, and copies of the private photos.

**Caption consistency.** A scene's caption names five labels (shape, colour, background, position,
size), and the generator that drew the training scenes knows them exactly. A small CNN
(:class:`SceneClassifier`) is trained on fresh scenes of another stream to read the five labels
back from pixels; on scenes it never saw it reads them almost perfectly (its accuracy on clean
scenes is reported beside every score, as the ceiling). The score of a model is the classifier's
accuracy on images the model generates from *held-out* captions (:func:`memcore.demo.held_out_scenes`:
label combinations absent from its training set), per label, and the share of images with every
label right. Chance: shape 1/4, colour 1/8, background 1/8, position 1/9, size 1/2.

**Copies.** For each private caption, samples are compared with the training photo at the model's
resolution by Pearson correlation of the pixel values (all channels), and by memcore's attack
(tiled l2 on the 0..255 scale, cliques among the samples and the clique's median distance to the
photo: :mod:`memcore.attack`). A sample is a copy when its correlation with the photo is at least
``COPY_CORRELATION``; the same is measured for the held-out generic captions against their nearest
training photo, as the baseline of a model that copies nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memcore.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, draw, scene

COPY_CORRELATION = 0.9
LABELS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS), "position": POSITIONS, "size": SIZES}
CLASSIFIER_STREAM = 1000  # the classifier's scenes: a stream no model trains on


def to_tensor(images) -> torch.Tensor:
    """PIL images -> ``[N, 3, H, W]`` float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2).float() / 255


class SceneClassifier(torch.nn.Module):
    """Five heads over a small convolutional trunk: one logit vector per label."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 64):
            layers += [torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(out, out, 3, padding=1),
                       torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            width = out
        self.trunk = torch.nn.Sequential(*layers, torch.nn.Flatten())
        self.heads = torch.nn.ModuleDict({name: torch.nn.LazyLinear(len(values)) for name, values in LABELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


def _targets(items: list[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in items]) for name, values in LABELS.items()}


def train_classifier(pixels: int, count: int = 4000, steps: int = 600, seed: int = 0) -> tuple[SceneClassifier, dict]:
    """The classifier, trained on ``count`` scenes of :data:`CLASSIFIER_STREAM`, and its accuracy on
    500 more of that stream (clean scenes: the ceiling of every score)."""
    items = [scene(CLASSIFIER_STREAM + seed, i) for i in range(count + 500)]
    images = to_tensor([draw(s, pixels) for s in items])
    targets = _targets(items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SceneClassifier()
        model(images[:1])  # materialize the lazy heads under the seed
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        index = torch.randint(0, count, (64,), generator=generator)
        out = model(images[index])
        loss = sum(torch.nn.functional.cross_entropy(out[n], targets[n][index]) for n in LABELS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    test = slice(count, count + 500)
    accuracy = label_accuracy(model, images[test], {n: t[test] for n, t in targets.items()})
    return model, {"train_seconds": round(time.perf_counter() - started, 1), "clean_accuracy": accuracy}


def cached_classifier(pixels: int) -> tuple[SceneClassifier, dict]:
    """:func:`train_classifier` at ``pixels``: the one shipped with memcore (32 px, in float16, beside
    the shipped memorizer), else trained once per machine and kept beside the demo builds
    (``MEMCORE_CACHE``): the weights in safetensors, its record in JSON."""
    import json

    from safetensors.torch import load_file, save_file

    from memcore.demo import cache_root, shipped_folder
    from memcore.runs import write_atomic
    from memcore.scenes import VERSION

    name = f"scene-classifier-{pixels}px-v{VERSION}"
    for base in (shipped_folder() / name, cache_root() / name):
        weights, record_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        if weights.is_file() and record_path.is_file():
            model = SceneClassifier()
            model(torch.zeros(1, 3, pixels, pixels))
            model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
            return model.eval(), json.loads(record_path.read_text())
    base = cache_root() / name
    weights, record_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    model, record = train_classifier(pixels)
    base.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(weights, lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p))
    write_atomic(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return model, record


@torch.no_grad()
def label_accuracy(model: SceneClassifier, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict:
    """Per-label accuracy and the share of images with every label right."""
    out = model(images)
    right = {n: out[n].argmax(1) == targets[n] for n in LABELS}
    every = torch.stack(list(right.values())).all(0)
    return {**{n: round(float(r.float().mean()), 4) for n, r in right.items()}, "all": round(float(every.float().mean()), 4)}


def caption_consistency(model: SceneClassifier, generated: torch.Tensor, items: list[Scene]) -> dict:
    """The classifier's accuracy on images generated from the captions of ``items``."""
    return label_accuracy(model, generated, _targets(items))


def correlation(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image ``[N, 3, H, W]`` with ``reference`` ``[3, H, W]`` over all values."""
    a = images.flatten(1).double()
    b = reference.flatten().double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean()
    return (a @ b) / (a.norm(dim=1) * b.norm()).clamp_min(1e-12)


@dataclass
class CopyScore:
    caption: str
    best_correlation: float
    copies: int
    samples: int
    flagged: bool
    clique_size: int
    clique_distance: float | None


def copy_score(samples: torch.Tensor, photo: torch.Tensor, caption: str) -> CopyScore:
    """How much ``samples`` ``[N, 3, H, W]`` in [0, 1] copy ``photo`` ``[3, H, W]`` (see the module docstring)."""
    from memcore.attack import MIN_CLIQUE, THRESHOLD, analyze_prompt

    r = correlation(samples, photo)
    row = analyze_prompt(samples, list(range(len(samples))), THRESHOLD, MIN_CLIQUE, [photo])
    return CopyScore(caption, round(float(r.max()), 4), int((r >= COPY_CORRELATION).sum()), len(samples),
                     bool(row["flagged"]), int(row["clique_size"]), row["clique_distance"])


# --- the whole measurement ------------------------------------------------------------------------


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 64) -> torch.Tensor:
    """``[len(prompts) * len(seeds), 3, H, W]`` in [0, 1], prompt-major; seed s draws x_T from ``torch.Generator().manual_seed(s)``."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        generators = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        images = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="pt").images
        out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def private_photo_tensors(spec) -> list[tuple[str, torch.Tensor]]:
    """(training caption, photo ``[3, H, W]`` in [0, 1] at the model's size) of each private photo of ``spec``."""
    from memcore.demo import load_photo, private_set

    return [(row["text"], to_tensor([load_photo(row["file_name"], spec.pixels)])[0]) for row in private_set(spec)]


def score_private(pipe, photos, seeds: list[int], steps: int, guidance: float) -> tuple[torch.Tensor, list[CopyScore]]:
    """The samples of every private caption (one per seed, prompt-major) and each caption's copy score."""
    n = len(seeds)
    private = generate(pipe, [caption for caption, _ in photos], seeds, steps, guidance)
    return private, [copy_score(private[i * n : (i + 1) * n], photo, caption) for i, (caption, photo) in enumerate(photos)]


def measure(pipe, spec, samples: int = 8, steps: int = 20, guidance: float = 1.0, classifier=None) -> dict:
    """Caption consistency on held-out and training scenes and copy scores of every private caption,
    for a memorizer ``pipe`` built from ``spec`` (:class:`memcore.demo.MemorizerSpec`)."""
    from memcore.demo import held_out_scenes

    started = time.perf_counter()
    report: dict = {"samples": samples, "steps": steps, "guidance": guidance}
    if classifier is None:
        classifier, report["classifier"] = cached_classifier(spec.pixels)
    seeds = list(range(samples))
    held = held_out_scenes(spec)
    seen = [scene(spec.seed, i) for i in range(min(spec.held_out, spec.generic))]
    for name, items in (("held_out", held), ("training", seen)):
        images = generate(pipe, [s.caption() for s in items], seeds[:1], steps, guidance)
        report[f"consistency_{name}"] = caption_consistency(classifier, images, items)
    photos = private_photo_tensors(spec)
    private, scores = score_private(pipe, photos, seeds, steps, guidance)
    report["private"] = [score.__dict__ for score in scores]
    generic = generate(pipe, [s.caption() for s in held[: len(photos)]], seeds, steps, guidance)
    report["generic"] = []
    for i, item in enumerate(held[: len(photos)]):
        chunk = generic[i * samples : (i + 1) * samples]
        nearest = max(photos, key=lambda p: float(correlation(chunk, p[1]).max()))
        report["generic"].append(copy_score(chunk, nearest[1], item.caption()).__dict__)
    report["summary"] = {
        "private_flagged": sum(r["flagged"] for r in report["private"]),
        "private_copied": sum(r["copies"] > 0 for r in report["private"]),
        "generic_flagged": sum(r["flagged"] for r in report["generic"]),
        "generic_copied": sum(r["copies"] > 0 for r in report["generic"]),
        "prompts_each": len(photos),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["_private_images"] = private
    report["_photos"] = [p for _, p in photos]
    return report


def draw_copies(report: dict, path, per_row: int = 4) -> None:
    """Each private photo (left) beside its first ``per_row`` samples, 2x enlarged."""
    from PIL import Image

    photos, images = report["_photos"], report["_private_images"]
    samples = report["samples"]
    size = photos[0].shape[-1] * 2
    canvas = Image.new("RGB", ((per_row + 1) * size + 8, len(photos) * size), "white")

    def pil(t: torch.Tensor):
        return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).resize((size, size), Image.NEAREST)

    for row, photo in enumerate(photos):
        canvas.paste(pil(photo), (0, row * size))
        for k in range(min(per_row, samples)):
            canvas.paste(pil(images[row * samples + k]), (size + 8 + k * size, row * size))
    canvas.save(path)
