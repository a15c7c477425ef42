"""The experiment on the tiny memorizer (``memcore demo run``): the paper's whole story in miniature.

1. **Detect.** Wen et al.'s score (:mod:`memcore.detection`) of every private caption and of as many
   generic training captions (the *control* set), and the ROC AUC of private against control.
2. **Localize.** For each target family (``ffn``, the paper's; ``attn2.to_v``; ``attn2.to_k``), the
   statistics of the private captions and, separately, of the control captions
   (:func:`memcore.collect_stats`, once per family), then the mask of each sparsity from them
   (:func:`memcore.compute_mask`).
3. **Prune and measure again.** For each family and sparsity, three masks are pruned in turn from
   the same weights (restored between them):

   - ``private``: the method's mask, from the private captions;
   - ``control``: the mask the method finds for generic captions (is what it finds specific to
     memorization?);
   - ``random``: as many weights per layer as ``private``, drawn uniformly (seeded): is pruning
     *those* weights better than pruning any?

   Each pruned model, and the model before pruning, is measured the same way:

   - memorization: the samples of every private caption against its photo
     (:func:`memcore.demo_measure.copy_score`: attack flags, copies at correlation >= 0.9, the best
     correlation);
   - generic quality: caption consistency on held-out captions (the scene classifier's accuracy,
     mean of the five labels, and all five right), and the denoising loss on held-out scenes (the
     training objective, at seeded noise and timesteps, the same for every model).

Every sample starts from its seed's x_T, so the models differ only by their weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from memcore.errors import MemcoreError

FAMILIES = ("ffn", "attn2.to_v", "attn2.to_k")
MASKS = ("private", "control", "random")
LOSS_SEED = 1234  # the denoising loss's noise and timesteps


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of :func:`run_experiment`.

    Attributes:
        families: the target families to localize and prune.
        sparsities: s of each mask (k = floor(s * in) per row and call index, union over
            ``timesteps`` calls, so a mask holds more than s of its weights).
        samples: samples per private caption (seeds 0 .. samples - 1).
        steps: inference steps of every generation.
        guidance: guidance scale of the measuring generations (1: none).
        consistency: held-out captions generated (one sample each) for caption consistency.
        loss_images: held-out scenes in the denoising loss.
        localize_guidance: guidance scale of detection and localization (both read the guided batch).
        timesteps: tau, the denoiser calls localization scores.
        figure_samples: samples per model in the picture.
        seed: seed of the random masks.
    """

    families: tuple[str, ...] = FAMILIES
    sparsities: tuple[float, ...] = (0.01, 0.1, 0.4)
    samples: int = 8
    steps: int = 20
    guidance: float = 1.0
    consistency: int = 100
    loss_images: int = 200
    localize_guidance: float = 7.5
    timesteps: int = 10
    figure_samples: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        from memcore import targets
        from memcore.config import check_timesteps

        if not self.families:
            raise MemcoreError("needs at least one target family", param="families")
        for family in self.families:
            if family not in targets.FAMILIES:
                raise MemcoreError(f"{family!r} is not one of {', '.join(targets.FAMILIES)}", param="families")
        if len(set(self.families)) != len(self.families):
            raise MemcoreError(f"names a family twice: {', '.join(self.families)}", param="families")
        if not self.sparsities:
            raise MemcoreError("needs at least one sparsity", param="sparsities")
        for s in self.sparsities:
            if not 0 < s <= 1:
                raise MemcoreError(f"must each be in (0, 1], got {s:g}", param="sparsities")
        check_timesteps(self.timesteps)
        if self.consistency < 1 or self.loss_images < 1:
            raise MemcoreError("must be at least 1", param="consistency" if self.consistency < 1 else "loss_images")
        if self.samples < 3:
            raise MemcoreError(f"must be at least 3 (the attack's smallest clique), got {self.samples}", param="samples")
        if self.figure_samples > self.samples:
            raise MemcoreError(f"must be at most samples ({self.samples}), got {self.figure_samples}", param="figure_samples")


# --- measuring one model ----------------------------------------------------------------------------


@dataclass
class Probe:
    """What every model is measured on: fixed captions, photos, scenes, noise and timesteps."""

    photos: list  # [(caption, photo [3, H, W] in [0, 1])]
    held_out: list  # Scenes whose captions the model never saw
    loss_latents: torch.Tensor  # [N, C, h, w], the held-out scenes encoded (scaled)
    loss_noise: torch.Tensor
    loss_timesteps: torch.Tensor
    loss_captions: list[str]
    classifier: object


def make_probe(pipe, spec, config: ExperimentConfig, classifier=None) -> Probe:
    from memcore.demo import held_out_scenes
    from memcore.demo_measure import cached_classifier, private_photo_tensors, to_tensor
    from memcore.scenes import draw

    if classifier is None:
        classifier, _ = cached_classifier(spec.pixels)
    photos = private_photo_tensors(spec)
    held = held_out_scenes(spec)
    consistency = held[: config.consistency]
    # the loss scenes: held-out ones, cycled when the spec holds fewer than asked for
    loss_scenes = [held[i % len(held)] for i in range(config.loss_images)]
    pixels = to_tensor([draw(s, spec.pixels) for s in loss_scenes]) * 2 - 1
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(LOSS_SEED)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    return Probe(photos, consistency, latents.float().cpu(), noise, timesteps, [s.caption() for s in loss_scenes],
                 classifier)


@torch.no_grad()
def denoising_loss(pipe, probe: Probe, batch: int = 100) -> float:
    """Mean squared error of the denoiser's noise prediction on ``probe``'s held-out scenes."""
    from diffusers import DDPMScheduler

    noising = DDPMScheduler.from_config(pipe.scheduler.config)
    net, device = pipe.unet, pipe.unet.device
    total = 0.0
    for start in range(0, len(probe.loss_latents), batch):
        part = slice(start, start + batch)
        embeds, _ = pipe.encode_prompt(probe.loss_captions[part], device, 1, False)
        noise = probe.loss_noise[part].to(device, net.dtype)
        t = probe.loss_timesteps[part].to(device)
        noisy = noising.add_noise(probe.loss_latents[part].to(device, net.dtype), noise, t)
        predicted = net(noisy, t, encoder_hidden_states=embeds).sample
        total += float(torch.nn.functional.mse_loss(predicted.float(), noise.float(), reduction="sum"))
    return total / probe.loss_noise.numel()


def measure_model(pipe, probe: Probe, config: ExperimentConfig) -> dict:
    """Memorization and generic quality of ``pipe`` as it is now (see the module docstring)."""
    from memcore.demo_measure import caption_consistency, generate, score_private

    seeds = list(range(config.samples))
    private, scores = score_private(pipe, probe.photos, seeds, config.steps, config.guidance)
    generic = generate(pipe, [s.caption() for s in probe.held_out], seeds[:1], config.steps, config.guidance)
    consistency = caption_consistency(probe.classifier, generic, probe.held_out)
    labels = [v for k, v in consistency.items() if k != "all"]
    return {
        "private_flagged": sum(s.flagged for s in scores),
        "private_copied": sum(s.copies > 0 for s in scores),
        "copies": sum(s.copies for s in scores),
        "best_correlation_mean": round(sum(s.best_correlation for s in scores) / len(scores), 4),
        "per_photo": [{"flagged": s.flagged, "copies": s.copies, "best_correlation": s.best_correlation,
                       "clique_distance": s.clique_distance} for s in scores],
        "consistency_mean": round(sum(labels) / len(labels), 4),
        "consistency_all": consistency["all"],
        "consistency": consistency,
        "denoising_loss": round(denoising_loss(pipe, probe), 5),
        "_samples": torch.stack([private[i * config.samples : i * config.samples + config.figure_samples]
                                 for i in range(len(probe.photos))]),
    }


# --- masks ------------------------------------------------------------------------------------------


def random_like(mask, seed: int) -> dict[str, torch.Tensor]:
    """Boolean masks with as many weights per layer as ``mask``, at uniformly random places."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in mask.layers:
        rows, cols = mask.shape(name)
        chosen = torch.randperm(rows * cols, generator=generator)[: mask.count(name)]
        flat = torch.zeros(rows * cols, dtype=torch.bool)
        flat[chosen] = True
        out[name] = flat.view(rows, cols)
    return out


class Weights:
    """The weights of every target Linear of some families, to restore after each pruning."""

    def __init__(self, pipe, families):
        from memcore.targets import find_targets

        self.linears = {t.name: t.linear for family in families for t in find_targets(pipe, family)}
        self.saved = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, linear in self.linears.items():
            linear.weight.copy_(self.saved[name])

    @torch.no_grad()
    def zero(self, selected: dict[str, torch.Tensor]) -> int:
        for name, chosen in selected.items():
            self.linears[name].weight.masked_fill_(chosen.to(self.linears[name].weight.device), 0)
        return sum(int(c.sum()) for c in selected.values())


# --- the experiment -----------------------------------------------------------------------------------


def control_captions(spec, count: int) -> list[str]:
    """``count`` generic training captions, one per scene, all distinct."""
    from memcore.scenes import scene

    found, index = [], 0
    while len(found) < count and index < spec.generic:
        caption = scene(spec.seed, index).caption()
        if caption not in found:
            found.append(caption)
        index += 1
    return found


def run_experiment(pipe, spec, config: ExperimentConfig | None = None, classifier=None, progress: bool = True) -> dict:
    """Detect, localize, prune and measure (see the module docstring); the report as a dict (keys
    starting with ``_`` hold tensors for the pictures)."""
    from tqdm.auto import tqdm

    from memcore.config import LocalizeConfig
    from memcore.detection import DetectConfig, detection_scores, roc
    from memcore.mask import compute_mask
    from memcore.stats import collect_stats

    config = config or ExperimentConfig()
    started = time.perf_counter()
    probe = make_probe(pipe, spec, config, classifier)
    private = [caption for caption, _ in probe.photos]
    control = control_captions(spec, len(private))
    report: dict = {"config": asdict(config), "private_captions": private, "control_captions": control}

    detect_started = time.perf_counter()
    scores = detection_scores(pipe, private + control, DetectConfig(
        steps=config.steps, guidance=config.localize_guidance, seeds=(0, 1, 2, 3), progress=False))
    curve = roc(scores.scores[: len(private)], scores.scores[len(private) :])
    report["detect"] = {"auc": round(curve.auc, 4), "private_scores": [round(float(x), 4) for x in scores.scores[: len(private)]],
                        "control_scores": [round(float(x), 4) for x in scores.scores[len(private) :]],
                        "seconds": round(time.perf_counter() - detect_started, 1)}

    weights = Weights(pipe, config.families)
    conditions = [(f, s, m) for f in config.families for s in config.sparsities for m in MASKS]
    bar = tqdm(total=1 + len(conditions), desc="models measured", unit="model", disable=None if progress else True)
    report["before"] = measure_model(pipe, probe, config)
    bar.update()
    report["after"] = []
    for family in config.families:
        localize = LocalizeConfig(steps=config.steps, guidance=config.localize_guidance, timesteps=config.timesteps,
                                  target=family, progress=False)
        stats = {"private": collect_stats(pipe, private, localize), "control": collect_stats(pipe, control, localize)}
        total = sum(math.prod(linear.weight.shape) for name, linear in weights.linears.items()
                    if name in stats["private"].metadata["shapes"])
        for sparsity in config.sparsities:
            masks = {which: compute_mask(pipe, stats[which], sparsity, force=True) for which in ("private", "control")}
            selections = {which: {name: m.unpack(name) for name in m.layers} for which, m in masks.items()}
            selections["random"] = random_like(masks["private"], config.seed)
            for which in MASKS:
                row = {"family": family, "sparsity": sparsity, "mask": which}
                zeroed = weights.zero(selections[which])
                row["pruned"] = zeroed
                row["density"] = round(zeroed / total, 5)
                if zeroed == 0:
                    row["skipped"] = "empty mask (k = floor(s * in) = 0)"
                else:
                    row.update(measure_model(pipe, probe, config))
                weights.restore()
                report["after"].append(row)
                bar.update()
            report.setdefault("_masks", {})[(family, sparsity)] = masks["private"]
    bar.close()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["_photos"] = torch.stack([photo for _, photo in probe.photos])
    return report


# --- what it writes ---------------------------------------------------------------------------------


def table(report: dict) -> str:
    """The report as a Markdown table, one row per model."""
    before = report["before"]
    n = len(report["private_captions"])
    lines = [
        f"| model | pruned weights | private captions flagged (of {n}) | copied (of {n}) | best correlation, mean "
        "| held-out consistency (mean of 5 labels) | all 5 labels | denoising loss |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cells(m: dict) -> str:
        change = 100 * (m["denoising_loss"] / before["denoising_loss"] - 1)
        return (f"{m['private_flagged']} | {m['private_copied']} | {m['best_correlation_mean']:.3f} | "
                f"{m['consistency_mean']:.3f} | {m['consistency_all']:.2f} | {m['denoising_loss']:.4f} ({change:+.1f}%)")

    lines.append(f"| before pruning | 0 | {before['private_flagged']} | {before['private_copied']} | "
                 f"{before['best_correlation_mean']:.3f} | {before['consistency_mean']:.3f} | "
                 f"{before['consistency_all']:.2f} | {before['denoising_loss']:.4f} |")
    for row in report["after"]:
        name = f"`{row['family']}` s = {row['sparsity']:g}, {row['mask']}"
        if "skipped" in row:
            lines.append(f"| {name} | 0 | {row['skipped']} | | | | | |")
        else:
            lines.append(f"| {name} | {row['pruned']:,} ({100 * row['density']:.2f}%) | {cells(row)} |")
    return "\n".join(lines) + "\n"


def draw_figure(report: dict, path, sparsity: float | None = None) -> None:
    """For each private photo (a row): the photo, then the samples before pruning, then after pruning
    each family's ``private`` mask at ``sparsity`` (default: the largest), 3x enlarged, with headers."""
    from PIL import Image, ImageDraw

    sparsity = max(report["config"]["sparsities"]) if sparsity is None else sparsity
    photos = report["_photos"]
    groups = [("training photo", None), ("before", report["before"])]
    for row in report["after"]:
        if row["mask"] == "private" and row["sparsity"] == sparsity and "skipped" not in row:
            groups.append((f"{row['family']} s={sparsity:g}", row))
    per = report["before"]["_samples"].shape[1]
    size, gap, header = photos.shape[-1] * 3, 6, 16
    widths = [size] + [per * size] * (len(groups) - 1)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(groups) - 1), header + len(photos) * size), "white")
    pen = ImageDraw.Draw(canvas)

    def pil(t: torch.Tensor):
        array = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        return Image.fromarray(array).resize((size, size), Image.NEAREST)

    x = 0
    for (title, measured), width in zip(groups, widths):
        pen.text((x + 2, 2), title, fill="black")
        for r in range(len(photos)):
            if measured is None:
                canvas.paste(pil(photos[r]), (x, header + r * size))
            else:
                for k in range(per):
                    canvas.paste(pil(measured["_samples"][r, k]), (x + k * size, header + r * size))
        x += width + gap
    canvas.save(path)


def public(report: dict) -> dict:
    """The report without its tensors, for JSON."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(report)
