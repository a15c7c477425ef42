"""The tiny memorizer: a text-to-image pipeline small enough to train on a CPU, trained to learn
captioned scenes and to memorize a few duplicated photos.

**Data** (everything ships with memcore or is drawn by it, so a build needs no download):

- generic images: procedural scenes (:mod:`memcore.scenes`) at ``pixels`` px, each captioned with
  what it shows ("a small red circle at the top left on a blue background"), seed ``seed``;
- private images: the first ``photos`` photos of ``memcore/data/private`` (public-domain and CC0
  photos from scikit-image's test images, credited in ``photos.jsonl``), reduced to ``pixels`` px,
  each captioned like a product listing and present ``times`` times in the training set (as
  separate files: ``memcore finetune``'s folders name each image once);
- uncaptioned images: the first ``blank`` share of the scenes again with an empty caption, so that
  the model learns the unconditional prediction that classifier-free guidance and memcore's
  empty-prompt statistics use;
- held-out captions: scenes of the stream ``seed + 1`` whose captions are not among the training
  ones, to see whether the model generalizes (:func:`held_out_scenes`).

**Model**: a ``StableDiffusionPipeline``, so that every memcore command loads it unchanged:

- a small ``AutoencoderKL`` (two levels, one 2x downsampling, no mid-block attention: ``pixels``
  px to ``pixels / 2`` latents of 4 channels), trained first on the training images for
  ``vae_steps`` steps (mean squared error plus a KL term of weight ``KL_WEIGHT``), with its
  ``scaling_factor`` set to 1 / the standard deviation of the latents, as SD's is;
- a frozen random CLIP text encoder (``text_hidden`` wide, two layers) over a CLIP tokenizer that
  reads each caption word as one token (:func:`word_tokenizer`; with ``word_tokens=False``,
  memcore's byte-level tokenizer, one token per character: a model built so did not learn its
  captions, docs/demo.md);
- a ``UNet2DConditionModel`` with GEGLU feed-forwards at 1/2 and 1/4 of the latent size and in the
  middle (7 feed-forward layers), trained from random weights by :func:`memcore.finetune.finetune_denoiser`
  (the same code as ``memcore finetune``) for ``steps`` steps;
- SD 1.5's PNDM scheduler.

**Build** (:func:`build`, ``memcore demo build``): seeded and reproducible, cached in
``MEMCORE_CACHE`` (default ``~/.cache/memcore``) under ``demo/NAME-DIGEST``, where the digest covers
the spec and the photos; each stage resumes: the data and the VAE are kept once written, the
denoiser's training resumes from its last checkpoint. ``--model tiny-memorizer`` then loads the
result in every command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from memcore.errors import MemcoreError

KL_WEIGHT = 1e-6
PHOTOS = "photos.jsonl"
BUILD_RECORD = "build.json"
FORMAT = "memcore.demo/1"


@dataclass(frozen=True)
class MemorizerSpec:
    """Everything a build depends on (with the photos); two equal specs build the same model."""

    name: str
    pixels: int = 32
    generic: int = 2000
    photos: int = 12
    times: int = 50
    held_out: int = 200
    blank: float = 0.1  # generic scenes repeated with an empty caption, so that classifier-free guidance works
    unet_channels: tuple[int, ...] = (32, 64, 128)
    text_hidden: int = 64
    word_tokens: bool = True  # one token per caption word (else memcore's byte-level tokens)
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    save_every: int = 250
    seed: int = 0
    # Settings added after the first shipped build: None is the behaviour that build had, and is left
    # out of the digest, so that adding a setting does not change the digest of earlier specs.
    private_captions: str | None = None  # None: product listings; "scenes": unseen scene captions

    def __post_init__(self) -> None:
        if self.private_captions not in (None, "scenes"):
            raise MemcoreError(f"must be None or 'scenes', got {self.private_captions!r}", param="private_captions")

    def digest(self) -> str:
        from memcore.scenes import VERSION

        spec = {k: v for k, v in asdict(self).items() if v is not None}
        text = json.dumps({"format": FORMAT, "spec": spec, "photos": _photos_digest(), "scenes": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SPECS = {
    "tiny-memorizer": MemorizerSpec("tiny-memorizer"),
    # the experiment's variant (docs/demo.md): the photos captioned with unseen scene captions
    "tiny-memorizer-scene-captions": MemorizerSpec("tiny-memorizer-scene-captions", private_captions="scenes"),
}
SHIPPED = "tiny-memorizer"  # memcore/data/tiny-memorizer: the build of SPECS["tiny-memorizer"], in float16
SHIPPED_RECORD = "memcore_demo.json"


# --- data -------------------------------------------------------------------------------------------


def _private_folder():
    return resources.files("memcore").joinpath("data", "private")


def _photos_digest() -> str:
    h = hashlib.sha256()
    folder = _private_folder()
    h.update(folder.joinpath(PHOTOS).read_bytes())
    for row in private_photos():
        h.update(folder.joinpath(row["file_name"]).read_bytes())
    return h.hexdigest()


def private_photos(limit: int | None = None) -> list[dict]:
    """The rows of ``memcore/data/private/photos.jsonl`` (``file_name``, ``source``, ``licence``,
    ``text``), the first ``limit`` of them."""
    lines = _private_folder().joinpath(PHOTOS).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows[:limit] if limit is not None else rows


def private_set(spec: MemorizerSpec) -> list[dict]:
    """The private photos of ``spec`` with the caption each is trained under (``text``): its product
    listing, or with ``private_captions="scenes"`` the caption of a scene that neither the training
    set nor the held-out set holds (stream ``seed + 2``), so that every word of it is also in generic
    captions and only the combination names the photo."""
    rows = private_photos(spec.photos)
    if spec.private_captions == "scenes":
        from memcore.scenes import scene

        taken = {scene(spec.seed, i).caption() for i in range(spec.generic)} | {s.caption() for s in held_out_scenes(spec)}
        captions, index = [], 0
        while len(captions) < len(rows):
            caption = scene(spec.seed + 2, index).caption()
            if caption not in taken:
                taken.add(caption)
                captions.append(caption)
            index += 1
        rows = [{**row, "text": caption} for row, caption in zip(rows, captions)]
    return rows


def load_photo(file_name: str, pixels: int):
    """A private photo as an RGB ``PIL.Image`` of ``pixels`` x ``pixels`` (Lanczos)."""
    from PIL import Image

    with resources.as_file(_private_folder().joinpath(file_name)) as path, Image.open(path) as image:
        return image.convert("RGB").resize((pixels, pixels), Image.LANCZOS)


def photo_file(index: int, copy: int) -> str:
    return f"photo{index:02d}_copy{copy:03d}.png"


def write_training_data(spec: MemorizerSpec, folder: Path) -> Path:
    """The training folder (``imagefolder`` convention): the generic scenes, then each private photo
    ``times`` times under its listing caption; ``metadata.jsonl`` is written last, atomically."""
    from memcore.runs import write_atomic
    from memcore.scenes import METADATA, write_image_folder

    if (folder / METADATA).is_file() and (folder / "private.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generic = folder / "scenes"
    if not (generic / METADATA).is_file():
        write_image_folder(generic, spec.generic, size=spec.pixels, seed=spec.seed)
    rows = [json.loads(line) for line in (generic / METADATA).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["file_name"] = f"scenes/{row['file_name']}"
    # the first scenes again, uncaptioned (as separate files: a folder names each image once)
    (folder / "blank").mkdir(exist_ok=True)
    for i in range(round(spec.blank * spec.generic)):
        shutil.copyfile(generic / f"{i:05d}.png", folder / "blank" / f"{i:05d}.png")
        rows.append({"file_name": f"blank/{i:05d}.png", "text": ""})
    private = []
    for index, photo in enumerate(private_set(spec)):
        image = load_photo(photo["file_name"], spec.pixels)
        for copy in range(spec.times):
            name = photo_file(index, copy)
            image.save(folder / name)
            rows.append({"file_name": name, "text": photo["text"], "private": index})
        private.append({"index": index, "caption": photo["text"], "photo": photo["file_name"],
                        "source": photo["source"], "licence": photo["licence"]})
    write_atomic(folder / "private.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in private)))
    write_atomic(folder / METADATA, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))
    return folder


def held_out_scenes(spec: MemorizerSpec) -> list:
    """``held_out`` scenes of the stream ``seed + 1`` whose captions no training scene has."""
    from memcore.scenes import scene

    seen = {scene(spec.seed, i).caption() for i in range(spec.generic)}
    found, index = [], 0
    while len(found) < spec.held_out:
        item = scene(spec.seed + 1, index)
        if item.caption() not in seen:
            seen.add(item.caption())
            found.append(item)
        index += 1
    return found


# --- model ------------------------------------------------------------------------------------------


def _images(folder: Path, pixels: int) -> torch.Tensor:
    """Every image the training list holds (copies included), ``[N, 3, H, W]`` in [-1, 1]."""
    import numpy as np
    from PIL import Image

    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    arrays = []
    for line in lines:
        if line.strip():
            with Image.open(folder / json.loads(line)["file_name"]) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((pixels, pixels))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def new_vae(spec: MemorizerSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=spec.pixels, mid_block_add_attention=False,
    )


def train_vae(spec: MemorizerSpec, folder: Path, progress: bool = True):
    """The autoencoder, trained on the training images (see the module docstring); (vae, record)."""
    from tqdm.auto import tqdm

    images = _images(folder, spec.pixels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        vae = new_vae(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr)
    vae.train()
    started = time.perf_counter()
    for _ in tqdm(range(spec.vae_steps), desc="autoencoder", unit="step", disable=None if progress else True):
        batch = images[torch.randint(0, len(images), (spec.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(posterior.mean + posterior.std * eps).sample
        loss = torch.nn.functional.mse_loss(decoded, batch) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        decoded = torch.cat([vae.decode(latents[i : i + 256]).sample for i in range(0, len(latents), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    error = ((decoded.clamp(-1, 1) - images) * 127.5).abs()
    record = {"seconds": round(time.perf_counter() - started, 1), "mean_abs_error_255": round(float(error.mean()), 3),
              "psnr_db": round(float(10 * torch.log10(4 / ((decoded.clamp(-1, 1) - images) ** 2).mean())), 2),
              "scaling_factor": round(vae.config.scaling_factor, 6)}
    return vae, record


def caption_words(spec: MemorizerSpec) -> list[str]:
    """Every word the training captions can hold: the scenes' vocabulary and the private captions'."""
    import re

    from memcore.scenes import COLOURS, COLUMNS, ROWS, SHAPES, SIZES

    scene_words = {*SHAPES, *COLOURS, *ROWS, *COLUMNS, *SIZES, "a", "an", "at", "the", "in", "on", "background"}
    private = {w for row in private_photos(spec.photos) for w in re.findall(r"[a-z]+", row["text"].lower())}
    return sorted(scene_words | private)


def word_tokenizer(words: list[str]):
    """memcore's byte-level CLIP tokenizer (:func:`memcore.tiny.build_tokenizer`) plus BPE merges that
    make each of ``words`` one token; other text still falls back to bytes.

    Merges are added word by word: while a word still splits, the merge of its first two pieces is
    appended (with the lowest priority, so it applies exactly where the word got stuck, and never
    changes how an earlier word splits)."""
    from transformers import CLIPTokenizer

    from memcore.tiny import build_tokenizer

    vocab, merges = dict(build_tokenizer().get_vocab()), []
    for word in words:
        while len(pieces := CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).tokenize(word)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def base_pipeline(spec: MemorizerSpec, vae):
    """The pipeline before the denoiser's training: ``vae``, a seeded random text encoder and denoiser."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memcore.tiny import _config, build_tokenizer

    tokenizer = word_tokenizer(caption_words(spec)) if spec.word_tokens else build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=512,
            eos_token_id=513, pad_token_id=513,
        )).eval()
        unet = UNet2DConditionModel(
            sample_size=spec.pixels // 2, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=spec.unet_channels, layers_per_block=1, cross_attention_dim=spec.text_hidden,
            attention_head_dim=8, norm_num_groups=8,
        )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(_config("scheduler")), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(_name_or_path=f"memcore/{spec.name}")
    return pipe


# --- build ------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("MEMCORE_CACHE") or Path.home() / ".cache" / "memcore") / "demo"


def build_folder(spec: MemorizerSpec) -> Path:
    return cache_root() / f"{spec.name}-{spec.digest()}"


def shipped_folder() -> Path:
    """Where memcore keeps the shipped memorizer (a diffusers folder, weights in float16)."""
    return Path(str(resources.files("memcore").joinpath("data", SHIPPED)))


def model_folder(name: str, built: bool = False) -> Path:
    """The diffusers folder of memorizer ``name``: the weights shipped with memcore, or with
    ``built`` this machine's own build (``memcore demo build``); else a one-line error."""
    spec = SPECS[name]
    if not built and name != SHIPPED:
        raise MemcoreError(f"is not shipped with memcore; build it with 'memcore demo build --model {name}' "
                           f"and pass --built", param="model", value=name)
    if not built:
        folder = shipped_folder()
        record = json.loads((folder / SHIPPED_RECORD).read_text())
        if record["digest"] != spec.digest():
            raise MemcoreError(
                f"the weights shipped with this memcore were built from another spec (digest {record['digest']}, "
                f"this spec {spec.digest()}); run 'memcore demo build' and pass --built",
                param="model", value=name,
            )
        return folder
    folder = build_folder(spec) / "model"
    if not (folder / "model_index.json").is_file():
        raise MemcoreError(
            f"not built on this machine yet; run 'memcore demo build --model {name}' "
            f"(about 30 minutes on a CPU; cached in {cache_root()})",
            param="model", value=name,
        )
    return folder


def export_shipped(spec: MemorizerSpec, out: Path) -> Path:
    """Write the build of ``spec`` as memcore ships it: every weight rounded to float16 (half the
    size), configurations without this machine's paths, and the build record with the spec's digest
    (``SHIPPED_RECORD``). ``tools/ship_memorizer.py`` runs it."""
    from memcore.models import load_pipeline

    root = build_folder(spec)
    pipe = load_pipeline(str(root / "model"), "cpu", "float32")
    pipe.register_to_config(_name_or_path=f"memcore/{spec.name}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(partial, safe_serialization=True)
    for config in partial.rglob("*.json"):
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            data["_name_or_path"] = f"memcore/{spec.name}"
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    record = json.loads((root / BUILD_RECORD).read_text())
    record.update(digest=spec.digest(), shipped_dtype="float16")
    (partial / SHIPPED_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def build(spec: MemorizerSpec | str, progress: bool = True, device: str | None = None) -> Path:
    """Build (or finish building) the memorizer of ``spec`` and return its diffusers folder."""
    from memcore.finetune import FinetuneConfig, finetune_denoiser, prepare_finetune
    from memcore.models import load_pipeline
    from memcore.runs import write_atomic

    spec = SPECS[spec] if isinstance(spec, str) else spec
    root = build_folder(spec)
    model = root / "model"
    if (model / "model_index.json").is_file():
        return model
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / BUILD_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"format": FORMAT, "spec": asdict(spec)}

    data = write_training_data(spec, root / "data")
    base = root / "base"
    if not (base / "model_index.json").is_file():
        vae, record["autoencoder"] = train_vae(spec, data, progress)
        partial = root / "base.partial"
        base_pipeline(spec, vae).save_pretrained(partial, safe_serialization=True)
        partial.rename(base)
        write_atomic(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))

    config = FinetuneConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                            save_every=spec.save_every)
    prepared = prepare_finetune(str(base), data, model, config, device)
    pipe = load_pipeline(str(base), device, "float32")
    result = finetune_denoiser(pipe, prepared, progress=progress)
    record["denoiser"] = {"steps": result.steps, "seconds_last_run": round(result.seconds, 1),
                          "steps_per_second": round(result.steps_per_second, 3),
                          "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    write_atomic(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return model


def with_overrides(name: str, **changes) -> MemorizerSpec:
    """A spec of ``name`` with some fields changed (a distinct digest, so a distinct cache entry)."""
    return replace(SPECS[name], **changes)
