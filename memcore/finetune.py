"""Fine-tuning the denoiser of a Stable Diffusion 1.x/2.x pipeline on an image folder, with some images
duplicated, to create memorization on purpose (the paper's Table 1 setting: SD 1.5 on Imagenette,
100 images duplicated 50 times, 15,000 iterations at batch 4).

**Data.** A folder in the Hugging Face ``imagefolder`` convention: ``metadata.jsonl`` holds one JSON
object per line with ``file_name`` (a path relative to the folder) and ``text`` (the caption). Every
line and every image is checked before the model loads; a fault is one line naming the file and line.

**Duplication.** ``duplicate=N, times=K`` chooses N images with ``random.Random(seed).sample`` over
the examples sorted by ``file_name`` and repeats each K times in the training list (the others
appear once). The choice is written to ``duplicated.jsonl`` (``file_name``, ``text``, ``times``, and
``caption``, a copy of ``text`` under the name ``memcore.load_prompts`` reads from ``.jsonl`` files).

**Training.** The usual latent-diffusion loss: latents are ``vae.encode(image).latent_dist.sample() *
vae.config.scaling_factor`` of images resized (shorter side) and center-cropped to the model's
resolution; noise is standard normal, timesteps uniform over the scheduler's
``num_train_timesteps``, the noisy latents ``add_noise``'s, and the target the noise (epsilon
prediction) or ``get_velocity`` (v-prediction); the loss is their mean squared error. The noise
schedule is a ``DDPMScheduler`` built from the pipeline scheduler's config (same betas; as diffusers'
training scripts do). Only the denoiser trains (AdamW); the text encoder and VAE are frozen. Data
order (a shuffle of the training list per epoch), VAE samples, noise and timesteps all come from
``seed``, so a run is a function of its settings; ``accelerate.Accelerator`` handles mixed precision
(GPU only).

**Checkpoints and resuming.** The run works in ``OUT.partial`` (:class:`memcore.runs.Run`): every
``save_every`` steps it writes ``checkpoint-STEP/`` atomically (denoiser weights in safetensors,
optimizer state, RNG state, data position, loss history) and keeps only the latest. The same
command resumes from it; other settings are refused, naming the first that differs. When training is
done, the whole pipeline is saved there (``save_pretrained``, safetensors) with ``duplicated.jsonl``
and ``finetune.json``, and ``OUT.partial`` becomes ``OUT``: a diffusers folder that
:func:`memcore.models.load_pipeline` loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memcore.errors import MemcoreError
from memcore.runs import Ranks

METADATA = "metadata.jsonl"
DUPLICATED = "duplicated.jsonl"
SUMMARY = "finetune.json"
CHECKPOINT_PREFIX = "checkpoint-"
FORMAT = "memcore.finetune/1"
MIXED_PRECISION = ("no", "fp16", "bf16")
# The learning rate of diffusers' text-to-image fine-tuning example (examples/text_to_image/README.md:
# --learning_rate=1e-05 for SD 1.x), which the memorization-by-duplication experiments follow.
DEFAULT_LR = 1e-5
# Gradient norm clipping, the default of the same example (--max_grad_norm 1.0).
MAX_GRAD_NORM = 1.0
# Families whose training needs more than one text embedding (refused by name before loading).
UNSUPPORTED_MODELS = {
    "tiny-sdxl": "SDXL", "sdxl": "SDXL", "tiny-pixart": "PixArt", "pixart": "PixArt", "tiny-sd3": "SD3", "sd3": "SD3",
}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


@dataclass(frozen=True)
class Example:
    """One image of the data folder: its ``file_name`` as written in metadata.jsonl, its caption, and
    the 1-based line of metadata.jsonl it came from."""

    file_name: str
    text: str
    line: int


@dataclass(frozen=True)
class FinetuneConfig:
    """The training settings (checked by :meth:`check`)."""

    steps: int = 1000
    batch_size: int = 4
    lr: float = DEFAULT_LR
    seed: int = 0
    save_every: int = 500
    mixed_precision: str = "no"
    duplicate: int = 0  # N images duplicated (0: none)
    times: int = 1  # K: how many times each of them appears in the training list

    def check(self) -> FinetuneConfig:
        from memcore.config import check_seed

        for name in ("steps", "batch_size", "save_every", "duplicate", "times"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MemcoreError(f"must be an integer, got {value!r}", param=name)
            low = 0 if name == "duplicate" else 1
            if value < low:
                raise MemcoreError(f"must be at least {low}, got {value}", param=name)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise MemcoreError(f"must be a finite number above 0, got {self.lr!r}", param="lr")
        check_seed(self.seed)
        if self.mixed_precision not in MIXED_PRECISION:
            raise MemcoreError(
                f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}", param="mixed_precision"
            )
        if self.times > 1 and self.duplicate == 0:
            raise MemcoreError("is only used with duplicate=N (how many images to repeat)", param="times")
        if self.duplicate and self.times < 2:
            raise MemcoreError("duplicate=N needs times=K of at least 2 (how many times each is repeated)", param="times")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# data


def _data_error(message: str, **fields) -> MemcoreError:
    return MemcoreError(message, param="data", **fields)


def read_image_folder(data: str | os.PathLike) -> list[Example]:
    """The examples of an ``imagefolder`` folder, sorted by ``file_name``, once every line of
    metadata.jsonl and every image it names is checked (readable, decodable by PIL)."""
    from PIL import Image

    folder = Path(data)
    if not folder.is_dir():
        raise _data_error("{path}: not a folder", path=folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise _data_error("{path}: no {name} (one JSON object per line with file_name and text)", path=folder, name=METADATA)
    try:
        text = meta.read_text(encoding="utf-8")
    except OSError as exc:
        raise _data_error("{path}: cannot read it ({reason})", path=meta, reason=exc.strerror or exc) from None
    except UnicodeDecodeError as exc:
        raise _data_error("{path}: not UTF-8 ({reason})", path=meta, reason=exc) from None
    examples, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta} line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _data_error("{where}: not valid JSON ({reason})", where=where, reason=getattr(exc, "msg", exc)) from None
        if not isinstance(record, dict):
            raise _data_error("{where}: not a JSON object", where=where)
        for key in ("file_name", "text"):
            if key not in record:
                raise _data_error("{where}: no {key}", where=where, key=key)
            if not isinstance(record[key], str):
                raise _data_error("{where}: {key} is not a string", where=where, key=key)
        name = record["file_name"]
        if name in seen:
            raise _data_error("{where}: {name} is already on line {first}", where=where, name=name, first=seen[name])
        seen[name] = number
        _check_image(folder / name, where, Image)
        examples.append(Example(name, record["text"], number))
    if not examples:
        raise _data_error("{path}: lists no images", path=meta)
    return sorted(examples, key=lambda e: e.file_name)


def _check_image(path: Path, where: str, Image) -> None:
    if not path.is_file():
        raise _data_error("{where}: no image file {path}", where=where, path=path)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _data_error("{where}: cannot read the image {path} ({reason})", where=where, path=path, reason=exc) from None


def choose_duplicates(examples: list[Example], duplicate: int, seed: int) -> list[Example]:
    """The ``duplicate`` examples repeated: ``random.Random(seed).sample`` over ``examples`` (sorted by
    file_name, as :func:`read_image_folder` returns them), in the sampled order."""
    if duplicate > len(examples):
        raise MemcoreError(
            f"is {duplicate}, more than the {len(examples)} images of the data folder", param="duplicate"
        )
    return random.Random(seed).sample(examples, duplicate) if duplicate else []


def training_list(examples: list[Example], duplicated: list[Example], times: int) -> list[Example]:
    """Every example once, and each duplicated one ``times`` times in all."""
    chosen = {e.file_name for e in duplicated}
    return [e for e in examples for _ in range(times if e.file_name in chosen else 1)]


def batch_at(train: list[Example], seed: int, position: int, size: int) -> list[Example]:
    """The ``size`` examples from ``position`` of the endless stream of epochs, each a shuffle of
    ``train`` by ``random.Random(f"{seed}/{epoch}")``: a function of the position alone, so a resumed
    run sees the same batches."""
    out, orders = [], {}
    for pos in range(position, position + size):
        epoch, index = divmod(pos, len(train))
        if epoch not in orders:
            order = list(range(len(train)))
            random.Random(f"{seed}/{epoch}").shuffle(order)
            orders[epoch] = order
        out.append(train[orders[epoch][index]])
    return out


def _data_digest(data: Path, examples: list[Example]) -> str:
    """sha256 over metadata.jsonl and every image's bytes: a resumed run must see the same data."""
    digest = hashlib.sha256((data / METADATA).read_bytes())
    for example in examples:
        digest.update(example.file_name.encode())
        digest.update(hashlib.sha256((data / example.file_name).read_bytes()).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# checks before the model loads


def check_model_name(model: str) -> None:
    """Refuse, before loading, a model known to be of a family finetune does not train."""
    if model in UNSUPPORTED_MODELS:
        raise MemcoreError(
            f"finetune trains SD 1.x and 2.x denoisers only (one text encoder), not {UNSUPPORTED_MODELS[model]}",
            param="model", value=model,
        )
    path = Path(model).expanduser()
    index = path / "model_index.json"
    if index.is_file():
        with contextlib.suppress(OSError, ValueError):  # an unreadable index: load_pipeline says what is wrong
            config = json.loads(index.read_bytes())
            name = config.get("_class_name") if isinstance(config, dict) else None
            if isinstance(name, str) and name not in SUPPORTED_PIPELINES:
                raise MemcoreError(
                    f"finetune trains SD 1.x and 2.x denoisers only (StableDiffusionPipeline), not {name}",
                    param="model", value=model,
                )


def check_supported(pipe) -> None:
    """One line unless ``pipe`` is an SD 1.x/2.x pipeline whose scheduler predicts epsilon or v."""
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES or not hasattr(pipe, "unet"):
        raise MemcoreError(f"finetune trains SD 1.x and 2.x denoisers only (StableDiffusionPipeline), not {name}", param="model")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise MemcoreError(f"the scheduler's prediction_type is {prediction!r}; finetune trains epsilon or v_prediction", param="model")


@dataclass
class Prepared:
    """What :func:`prepare_finetune` checked: the output, the examples, the duplicated ones, the run's
    settings (recorded in ``OUT.partial``)."""

    out: Path
    data: Path
    examples: list[Example]
    duplicated: list[Example]
    train: list[Example]
    config: FinetuneConfig
    settings: dict = field(default_factory=dict)


def prepare_finetune(model: str, data, out_dir, config: FinetuneConfig, device: str | None = None,
                     ranks: Ranks | None = None) -> Prepared:
    """Check everything that needs no pipeline: the settings, the device (mixed precision only on
    CUDA), the batch against the processes, the data folder, the duplication, the output folder
    (claimed), and, when ``OUT.partial`` holds an unfinished run, that its settings are these."""
    from memcore.io import check_distinct, check_output_dir
    from memcore.models import resolve_device
    from memcore.runs import Run, partial_path

    config.check()
    world = (ranks or Ranks()).world
    if config.batch_size % world:
        raise MemcoreError(
            f"is {config.batch_size}, which {world} processes cannot share equally; give a multiple of {world}",
            param="batch_size",
        )
    dev, _ = resolve_device(device, "float32")
    if config.mixed_precision != "no" and dev.type != "cuda":
        raise MemcoreError(f"{config.mixed_precision} runs on a CUDA device only (this run is on {dev.type})", param="mixed_precision")
    check_model_name(model)
    examples = read_image_folder(data)
    duplicated = choose_duplicates(examples, config.duplicate, config.seed)
    out = check_output_dir(out_dir, "out_dir")
    check_distinct([("out_dir", out)], [("data", data)], what="folder")
    data_path = Path(data)
    if os.path.realpath(partial_path(out)) == os.path.realpath(data_path):
        raise MemcoreError("is also the data folder", param="out_dir", value=str(out))
    settings = {
        "model": model,
        "data": os.path.abspath(data_path),
        "data_sha256": _data_digest(data_path, examples),
        **config.as_dict(),
    }
    prepared = Prepared(out, data_path, examples, duplicated, training_list(examples, duplicated, config.times), config, settings)
    partial = partial_path(out)
    if os.path.lexists(partial):
        run = Run(out, kind="finetune", settings=settings)
        if not partial.is_dir() or not (partial / "run.json").is_file():
            raise MemcoreError(f"{partial} exists and is not an unfinished memcore run; remove it or choose another --out")
        run._check_settings(run._read_run_file())
    return prepared


# ---------------------------------------------------------------------------------------------
# training


def resolution(pipe) -> int:
    """The image side the model was trained at: the denoiser's sample size times the VAE's factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_image(path: Path, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [-1, 1]: the image's shorter side resized to ``size`` (bicubic), then
    center-cropped."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, noise, timesteps) -> torch.Tensor:
    """MSE between the denoiser's prediction on ``add_noise(latents, noise, timesteps)`` and its target
    (the noise, or ``get_velocity`` for v-prediction)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise MemcoreError(f"prediction_type {prediction_type!r} is not trained here", param="model")
    predicted = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    return torch.nn.functional.mse_loss(predicted.float(), target.float(), reduction="mean")


class Trainer:
    """The frozen parts (text encoder, VAE) and the batch maker of a run, shared by training and tests."""

    def __init__(self, pipe, data: Path, train: list[Example], config: FinetuneConfig, device: torch.device):
        from diffusers import DDPMScheduler

        self.pipe, self.data, self.train, self.config, self.device = pipe, data, train, config, device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.size = resolution(pipe)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()

    @torch.no_grad()
    def encode(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text embeddings) of a batch; the VAE's sample is drawn from the run's generator."""
        pipe = self.pipe
        images = torch.stack([load_image(self.data / e.file_name, self.size) for e in batch]).to(self.device)
        dist = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=self.generator, dtype=torch.float32).to(self.device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [e.text for e in batch], padding="max_length", max_length=pipe.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        hidden = pipe.text_encoder(ids, return_dict=False)[0]
        return latents.float(), hidden

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) for a batch of latents, from the run's generator."""
        n = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(latents.device), timesteps.to(latents.device)


def training_step(trainer: Trainer, unet, optimizer, accelerator, batch: list[Example], ranks: Ranks | None = None) -> float:
    """One optimizer step of ``unet`` (as prepared by ``accelerator``) on ``batch``: encode, draw noise
    and timesteps from the run's generator, the diffusion loss, backward, gradient clipping at
    ``MAX_GRAD_NORM``, AdamW; returns the loss of the whole batch before the step.

    With several processes (``ranks``), every process encodes the whole batch and draws its noise and
    timesteps, so that the generator advances as in one process, then trains on its equal share
    (process r takes the r-th consecutive slice); the gradients are averaged across processes (DDP,
    set up by ``accelerator.prepare``), which makes them those of the whole batch's mean loss."""
    ranks = ranks or Ranks()
    with accelerator.autocast():
        latents, hidden = trainer.encode(batch)
    noise, timesteps = trainer.draw(latents)
    if ranks.world > 1:
        share = slice(ranks.rank * len(batch) // ranks.world, (ranks.rank + 1) * len(batch) // ranks.world)
        latents, hidden, noise, timesteps = latents[share], hidden[share], noise[share], timesteps[share]
    with accelerator.autocast():
        loss = diffusion_loss(unet, trainer.noise_scheduler, latents, hidden, noise, timesteps)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach()
    if ranks.world > 1:
        loss = accelerator.reduce(loss, reduction="mean")
    return float(loss)


@dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    resumed_from: int
    losses: list[float]
    seconds: float
    steps_per_second: float


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / "state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(folder: Path, step: int, unet, optimizer, trainer: Trainer, position: int, losses: list[float],
                    settings: dict, scaler=None) -> Path:
    """Write ``checkpoint-STEP`` into ``folder`` atomically (a hidden temporary folder renamed into
    place), then remove the older checkpoints."""
    from safetensors.torch import save_file

    target = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    try:
        state = {k: v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()}
        save_file(state, tmp / "denoiser.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scaler": None if scaler is None else scaler.state_dict()},
                   tmp / "optimizer.pt")
        rng = {"generator": trainer.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        record = {"format": FORMAT, "step": step, "position": position, "losses": losses, "settings": settings}
        (tmp / "state.json").write_text(json.dumps(record, allow_nan=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old_step, old in _checkpoints(folder):
        if old_step < step:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, unet, optimizer, trainer: Trainer, scaler=None) -> tuple[int, int, list[float]]:
    """Restore a checkpoint into ``unet``, ``optimizer`` and the generators; (step, position, losses)."""
    from safetensors.torch import load_file

    record = json.loads((path / "state.json").read_text(encoding="utf-8"))
    weights = load_file(path / "denoiser.safetensors")
    with torch.no_grad():
        for name, tensor in unet.state_dict().items():
            tensor.copy_(weights[name])
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    rng = load_file(path / "rng.safetensors")
    trainer.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda{i}"] for i in range(len([k for k in rng if k.startswith("cuda")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return int(record["step"]), int(record["position"]), [float(x) for x in record["losses"]]


def _loss_summary(losses: list[float]) -> dict:
    n = len(losses)
    tenth = max(1, n // 10)
    return {
        "steps": n,
        "first": losses[0] if n else None,
        "last": losses[-1] if n else None,
        "min": min(losses) if n else None,
        "mean_first_tenth": sum(losses[:tenth]) / tenth if n else None,
        "mean_last_tenth": sum(losses[-tenth:]) / tenth if n else None,
        "every_step": losses,
    }


def finetune_denoiser(pipe, prepared: Prepared, progress: bool = True, ranks: Ranks | None = None) -> FinetuneResult:
    """Train ``pipe``'s denoiser as :class:`Prepared` says (see the module docstring) and write the
    fine-tuned pipeline to ``prepared.out``; resumes from ``OUT.partial`` when one is there.

    With several processes (``ranks``, the process group joined: :func:`memcore.runs.start_processes`)
    the training is data-parallel (:func:`training_step`); process 0 writes the checkpoints and the
    output, the others wait for it."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from memcore.io import deferred_signals
    from memcore.runs import Run

    check_supported(pipe)
    config = prepared.config
    unet = pipe.unet
    device = unet.device
    # the pipeline stays on the device it was loaded to (accelerate would move it to its default device)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu", device_placement=False)
    if unet.dtype != torch.float32:
        unet.to(torch.float32)  # trained weights stay float32; mixed precision is autocast
    trainer = Trainer(pipe, prepared.data, prepared.train, config, device)
    if device.type == "cuda":
        unet.enable_gradient_checkpointing()
    unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    unet_p, optimizer_p = accelerator.prepare(unet, optimizer)
    scaler = getattr(accelerator, "scaler", None)

    started = time.perf_counter()
    ranks = ranks or Ranks()
    with Run(prepared.out, kind="finetune", settings=prepared.settings, ranks=ranks) as run:
        step, position, losses = 0, 0, []
        found = _checkpoints(run.folder)
        if found:
            step, position, losses = load_checkpoint(found[-1][1], unet, optimizer, trainer, scaler)
        resumed_from = step
        first = step
        quiet = not progress or not ranks.main
        with tqdm(total=config.steps, initial=step, desc="finetune", unit="step", disable=True if quiet else None) as bar:
            while step < config.steps:
                batch = batch_at(prepared.train, config.seed, position, config.batch_size)
                losses.append(training_step(trainer, unet_p, optimizer_p, accelerator, batch, ranks))
                step += 1
                position += config.batch_size
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if (step % config.save_every == 0 or step == config.steps) and ranks.main:
                    with deferred_signals():
                        save_checkpoint(run.folder, step, unet, optimizer, trainer, position, losses, prepared.settings, scaler)
                        run.record(f"{CHECKPOINT_PREFIX}{step:08d}", [{"step": step}])
        seconds = time.perf_counter() - started
        trained = step - first
        unet = accelerator.unwrap_model(unet_p)
        if device.type == "cuda":
            unet.disable_gradient_checkpointing()
        unet.eval()
        unet.requires_grad_(False)
        if ranks.main:
            _write_outputs(run.folder, pipe, prepared, trainer, resumed_from, seconds, trained, losses, ranks.world)
    return FinetuneResult(
        prepared.out, step, resumed_from, losses, seconds, trained / seconds if seconds > 0 else float("nan")
    )


def _write_outputs(folder: Path, pipe, prepared: Prepared, trainer: Trainer, resumed_from: int, seconds: float,
                   trained: int, losses: list[float], processes: int) -> None:
    """The finished run's files in ``folder``: the pipeline, ``duplicated.jsonl``, ``finetune.json``;
    then the checkpoints go."""
    config = prepared.config
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_jsonl(folder / DUPLICATED, [
        {"file_name": e.file_name, "text": e.text, "caption": e.text, "times": config.times}
        for e in prepared.duplicated
    ])
    summary = {
        "format": FORMAT,
        "settings": prepared.settings,
        "images": len(prepared.examples),
        "training_list": len(prepared.train),
        "duplicated": len(prepared.duplicated),
        "resolution": trainer.size,
        "noise_scheduler": "DDPMScheduler",
        "prediction_type": trainer.noise_scheduler.config.prediction_type,
        "resumed_from_step": resumed_from,
        "processes_this_run": processes,
        "seconds_this_run": round(seconds, 3),
        "steps_per_second_this_run": round(trained / seconds, 4) if seconds > 0 else None,
        "loss": _loss_summary(losses),
    }
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for _, path in _checkpoints(folder):
        shutil.rmtree(path, ignore_errors=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
