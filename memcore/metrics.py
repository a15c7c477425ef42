"""Memorization and quality metrics: SSCD copy similarity, CLIP score, FID and KID.

Images enter as float tensors ``[N, 3, H, W]`` with values in [0, 1] (RGB). No weights are
downloaded: every model loads from a local file or the local Hugging Face cache, and a missing or
unreadable one is a single :class:`~memcore.errors.MemcoreError` line saying where to get it.
Definitions, conventions and sources are in ``docs/metrics.md``.

- **SSCD** (Pizzi et al., CVPR 2022; https://github.com/facebookresearch/sscd-copy-detection): the
  published TorchScript descriptor; a generation's score is the largest cosine similarity between
  its embedding and those of its prompt's training images.
- **CLIP score**: cosine similarity of the L2-normalized image and text embeddings of a
  ``transformers.CLIPModel``, not multiplied by 100 (as in the authors' code).
- **FID / KID** from feature matrices, in float64; the Inception features come from the TorchScript
  Inception of StyleGAN2-ADA, the one clean-fid loads.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from memcore.errors import MemcoreError

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

# --- SSCD ---------------------------------------------------------------------------------------

SSCD_FILE = "sscd_disc_mixup.torchscript.pt"
"""The SSCD authors' recommended default model (ResNet-50, 512 dimensions)."""
SSCD_URL = f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{SSCD_FILE}"
SSCD_LARGE_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"
"""ResNeXt-101, 1024 dimensions: the file Wen et al.'s and the paper authors' evaluations load."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESSING = ("wen", "sscd")
"""SSCD input conventions.

``"wen"``: Wen et al. (ICLR 2024), ``measure_SSCD_similarity`` in ``optim_utils.py`` of
https://github.com/YuxinWenRick/diffusion_memorization (credited there to somepago/DCR, and copied
by the paper's authors into ruchikachavhan/concept-prune ``benchmarking/inference_mem.py``): resize
the shorter side to 256 (aspect ratio kept), centre crop 224 x 224, normalize with mean and std 0.5.

``"sscd"``: the SSCD authors' README ("skew_320"): resize to 320 x 320 (aspect ratio not kept),
normalize with the ImageNet mean and std.
"""

SSCD_THRESHOLDS = (0.5, 0.7)


def _load_torchscript(path: str | os.PathLike, param: str, what: str, url: str) -> torch.jit.ScriptModule:
    shown = os.fspath(path)
    if not Path(shown).is_file():
        raise MemcoreError(
            "{path}: no {what} file here; download the published weights from {url}",
            param, path=shown, what=what, url=url,
        )
    try:
        model = torch.jit.load(shown, map_location="cpu")
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MemcoreError(
            "{path}: not a TorchScript {what} file ({reason}); download the published weights from {url}",
            param, path=shown, what=what, reason=reason[:200], url=url,
        ) from None
    return model.eval()


def load_sscd(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a published SSCD TorchScript file (e.g. ``sscd_disc_mixup.torchscript.pt``) on the CPU.

    Raises:
        MemcoreError: the file is missing or is not TorchScript (one line naming the path and
            :data:`SSCD_URL`).
    """
    return _load_torchscript(path, "sscd", "SSCD TorchScript", SSCD_URL)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor in [0, 1], got {images.dtype}")
    return images


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize (torchvision's ``Resize`` on tensors with ``antialias=True``)."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _shorter_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side becomes ``short``, the longer one is truncated."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def _center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop`` offsets (``round((H - size) / 2)``); inputs here are never smaller."""
    height, width = images.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def sscd_preprocess(images: torch.Tensor, preprocessing: str = "wen") -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] -> the SSCD input of convention ``preprocessing``
    (:data:`PREPROCESSING`). Plain torch (torchvision is not a dependency): the resize is bilinear
    with antialiasing, as torchvision's tensor ``Resize``; PIL's bilinear filter, which the cited
    code applied to PIL images, differs from it by rounding-level amounts."""
    images = _check_images(images)
    if preprocessing == "wen":
        images = _resize(images, _shorter_side_size(images.shape[-2], images.shape[-1], 256))
        return _normalize(_center_crop(images, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if preprocessing == "sscd":
        return _normalize(_resize(images, (320, 320)), IMAGENET_MEAN, IMAGENET_STD)
    raise MemcoreError(
        "must be one of {choices}, got {got!r}", "preprocessing", choices=", ".join(PREPROCESSING), got=preprocessing
    )


@torch.no_grad()
def sscd_embed(model, images: torch.Tensor, preprocessing: str = "wen", batch_size: int = 32) -> torch.Tensor:
    """L2-normalized SSCD embeddings ``[N, D]`` (float32, on the CPU) of ``images`` in [0, 1].

    The model runs on the device and dtype of ``images``; it must already be there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = sscd_preprocess(images[start : start + batch_size], preprocessing)
        out.append(F.normalize(model(batch).float(), p=2, dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def sscd_similarity(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix ``[len(gen), len(ref)]`` of two sets of embeddings (normalized here
    again, so raw descriptors work too)."""
    return F.normalize(gen, p=2, dim=1) @ F.normalize(ref, p=2, dim=1).T


def sscd_scores(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-generation score: the largest similarity to any of the prompt's ground-truth images
    (``ref``: one or more), as Wen et al. and the paper's authors take it."""
    if ref.shape[0] == 0:
        raise ValueError("ref: a prompt needs at least one ground-truth image")
    return sscd_similarity(gen, ref).max(dim=1).values


@dataclass(frozen=True)
class SSCDSummary:
    """Summary of SSCD scores ``[prompts, seeds]``.

    Attributes:
        per_prompt: mean over seeds, one value per prompt.
        mean: mean of all scores (the mean of ``per_prompt`` when every prompt has as many seeds).
        share_above: fraction of generations whose score is strictly greater than each threshold.
    """

    per_prompt: tuple[float, ...]
    mean: float
    share_above: dict[float, float]


def summarize_sscd(scores: torch.Tensor, thresholds: tuple[float, ...] = SSCD_THRESHOLDS) -> SSCDSummary:
    """Summarize per-generation scores ``[prompts, seeds]`` (a 1-D tensor is one seed per prompt)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.dim() == 1:
        s = s[:, None]
    if s.dim() != 2 or s.numel() == 0:
        raise ValueError(f"scores: expected a non-empty [prompts, seeds] tensor, got {tuple(s.shape)}")
    return SSCDSummary(
        per_prompt=tuple(s.mean(dim=1).tolist()),
        mean=float(s.mean()),
        share_above={float(t): float((s > t).double().mean()) for t in thresholds},
    )


# --- CLIP score ---------------------------------------------------------------------------------

CLIP_MODEL_ID = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
"""Default CLIP for the memorized prompts: OpenCLIP ViT-g-14 trained on LAION-2B
(``laion2b_s12b_b42k``), the reference model of the paper's authors' memorization evaluation
(ruchikachavhan/concept-prune ``benchmarking/inference_mem.py``: ``reference_model = 'ViT-g-14'``,
``--reference_model_pretrain laion2b_s12b_b42k``, the default of Wen et al.'s ``inference_mem.py``,
both through ``open_clip``). This hub repository holds the same weights in transformers format."""
CLIP_COCO_MODEL_ID = "openai/clip-vit-base-patch32"
"""The CLIP the authors use for COCO prompts (concept-prune ``benchmarking/eval_coco.py``, with
``transformers.CLIPModel``)."""


def load_clip(model_id: str | os.PathLike = CLIP_MODEL_ID, device: str | torch.device = "cpu") -> tuple[CLIPModel, CLIPProcessor]:
    """A ``transformers`` CLIP model and processor from a local folder or the local Hugging Face
    cache (never downloaded).

    Raises:
        MemcoreError: the model is not available locally (one line naming it and how to get it).
    """
    from transformers import CLIPModel, CLIPProcessor

    source = os.fspath(model_id)
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise MemcoreError(
            "{model}: no CLIP model and processor in this folder or the local Hugging Face cache ({reason}); "
            "download it once with `hf download {model}` (or pass a local folder)",
            "clip", model=source, reason=reason,
        ) from None
    return model.to(device).eval(), processor


@torch.no_grad()
def clip_score(model, processor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """CLIP score of each (image, prompt) pair: ``cos(f_img, f_txt)``, the dot product of the
    L2-normalized ``get_image_features`` and ``get_text_features`` (float32, on the CPU, in [-1, 1]).

    Not multiplied by 100 and not clipped at 0: the authors' code (Wen et al.'s
    ``measure_CLIP_similarity``, concept-prune's ``eval_coco.py``) reports the plain cosine;
    torchmetrics' ``CLIPScore`` reports ``100 * max(cos, 0)`` instead. Images are ``[N, 3, H, W]``
    in [0, 1] and go through the processor with ``do_rescale=False``; text is padded and truncated
    to the model's context length.
    """
    images = _check_images(images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {images.shape[0]} images")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = processor.image_processor(images=list(images.float().cpu()), do_rescale=False, return_tensors="pt")
    text = processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
    image_features = _features(model.get_image_features(pixel_values=pixels["pixel_values"].to(device, dtype)))
    text_features = _features(
        model.get_text_features(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))
    )
    image_features = F.normalize(image_features.float(), p=2, dim=-1)
    text_features = F.normalize(text_features.float(), p=2, dim=-1)
    return (image_features * text_features).sum(dim=-1).cpu()


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or (in some transformers versions) an output object."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


# --- FID and KID ---------------------------------------------------------------------------------

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
"""TorchScript port of the TensorFlow FID Inception (StyleGAN2-ADA); clean-fid loads this file."""


def load_inception(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load the StyleGAN2-ADA TorchScript Inception (``inception-2015-12-05.pt``) on the CPU.

    Raises:
        MemcoreError: the file is missing or is not TorchScript (one line naming the path and
            :data:`INCEPTION_URL`).
    """
    return _load_torchscript(path, "inception", "Inception TorchScript", INCEPTION_URL)


@torch.no_grad()
def inception_features(model, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """2048-d pool features ``[N, 2048]`` (float64) of ``images`` in [0, 1].

    Images are quantized to 8 bits (``round(255 x)``, as saving them would) and passed as float
    values in [0, 255] with ``return_features=True``; the TorchScript model resizes to 299 x 299 and
    normalizes inside (clean-fid's ``InceptionV3W`` with ``resize_inside=True``).
    """
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = torch.round(images[start : start + batch_size].clamp(0, 1) * 255).float()
        feats = model(batch, return_features=True)
        out.append(feats.reshape(batch.shape[0], -1).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 2048))


def fid_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased: divided by N - 1, as ``np.cov``) of ``features [N, D]``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: need a [N, D] matrix with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def save_fid_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` and ``sigma`` to ``path`` as ``.npz`` (the keys pytorch-fid and clean-fid use)."""
    mu, sigma = _check_statistics(np.asarray(mu), np.asarray(sigma), None)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_fid_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` and ``sigma`` (float64) from an ``.npz`` file.

    Raises:
        MemcoreError: missing or unreadable file, a key missing, shapes that do not match, values
            that are not finite (one line naming the file).
    """
    shown = os.fspath(path)
    if not Path(shown).is_file():
        raise MemcoreError("{path}: no such file", "fid_reference", path=shown)
    try:
        with np.load(shown, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise MemcoreError("{path}: no {key} array in this .npz file", "fid_reference", path=shown, key=missing[0])
            mu, sigma = data["mu"], data["sigma"]
    except MemcoreError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise MemcoreError("{path}: not a readable .npz file ({reason})", "fid_reference", path=shown, reason=str(error)[:200]) from None
    return _check_statistics(mu, sigma, shown)


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, path: str | None) -> tuple[np.ndarray, np.ndarray]:
    problem = None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        problem = f"mu {mu.shape} and sigma {sigma.shape} are not a [D] mean and a [D, D] covariance"
    elif not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        problem = f"mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}"
    elif not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        problem = "mu or sigma holds values that are not finite"
    if problem is not None:
        if path is None:
            raise ValueError(problem)
        raise MemcoreError("{path}: {problem}", "fid_reference", path=path, problem=problem)
    return mu.astype(np.float64), sigma.astype(np.float64)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 set to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrt(sigma1 sigma2)`` for covariances, computed as ``tr sqrt(A sigma2 A)`` with
    ``A = sqrt(sigma1)``: that matrix is symmetric PSD and similar to ``sigma1 sigma2``'s square, so
    both traces agree, and its eigenvalues come from ``eigh`` (real, no complex round-off)."""
    a = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = a @ np.asarray(sigma2, dtype=np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians, in float64:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)`` (Heusel et al., 2017)."""
    mu1, sigma1 = _check_statistics(np.asarray(mu1), np.asarray(sigma1), None)
    mu2, sigma2 = _check_statistics(np.asarray(mu2), np.asarray(sigma2), None)
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x . y / d + 1)^3`` (Binkowski et al., 2018), ``d`` the feature size."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with :func:`polynomial_kernel` of two samples of the same size m:
    ``sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"need two samples of the same size m >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation (``ddof=0``) over ``subsets`` of
    :func:`mmd2_unbiased` on random subsets.

    Subset ``s`` takes ``rng.choice(N1, m, replace=False)`` then ``rng.choice(N2, m, replace=False)``
    with ``rng = np.random.default_rng(seed)``, ``m = min(subset_size, N1, N2)``, in that order.
    """
    x = np.asarray(features1, dtype=np.float64)
    y = np.asarray(features2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features: need [N, D] matrices of the same D, got {x.shape} and {y.shape}")
    if subsets < 1:
        raise ValueError(f"subsets: must be at least 1, got {subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size: need at least 2 features per subset, got {m}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        ix = rng.choice(x.shape[0], m, replace=False)
        iy = rng.choice(y.shape[0], m, replace=False)
        values[s] = mmd2_unbiased(x[ix], y[iy])
    return float(values.mean()), float(values.std())


__all__ = [
    "CLIP_COCO_MODEL_ID",
    "CLIP_MODEL_ID",
    "INCEPTION_URL",
    "PREPROCESSING",
    "SSCD_URL",
    "SSCDSummary",
    "clip_score",
    "fid_statistics",
    "frechet_distance",
    "inception_features",
    "kid",
    "load_clip",
    "load_fid_statistics",
    "load_inception",
    "load_sscd",
    "mmd2_unbiased",
    "polynomial_kernel",
    "save_fid_statistics",
    "sscd_embed",
    "sscd_preprocess",
    "sscd_scores",
    "sscd_similarity",
    "summarize_sscd",
    "trace_sqrt_product",
]
