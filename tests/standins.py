"""Tiny random stand-ins for the metrics models, built offline in a second or two.

They have the published models' interfaces, not their weights: an SSCD descriptor (TorchScript,
images in, descriptors out), a ``transformers`` CLIP model with its processor, and an Inception
whose TorchScript ``forward(x, return_features=True)`` returns ``[N, 2048]`` features of images in
[0, 255]. Every builder seeds its own weights, so two builds are identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


class TinyDescriptor(torch.nn.Module):
    """An SSCD stand-in: a 1x1 convolution and global average pooling, descriptors of size 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class TinyInception(torch.nn.Module):
    """Stand-in for ``inception-2015-12-05.pt``: takes ``[N, 3, H, W]`` in [0, 255] and
    ``return_features``; the features are a random projection of a 2 x 2 average pooling (12 values),
    so that their covariance has rank up to 12."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)
        if return_features:
            return self.proj(pooled)
        return pooled


def write_sscd(path: str | os.PathLike) -> Path:
    """Save :class:`TinyDescriptor` as TorchScript at ``path`` (what ``metrics.load_sscd`` reads)."""
    torch.jit.script(TinyDescriptor()).save(str(path))
    return Path(path)


def write_inception(path: str | os.PathLike) -> Path:
    """Save :class:`TinyInception` as TorchScript at ``path`` (what ``metrics.load_inception`` reads)."""
    torch.jit.script(TinyInception()).save(str(path))
    return Path(path)


def build_clip(resize: bool = True):
    """A random ``transformers.CLIPModel`` (32 x 32 images, width 16) and its ``CLIPProcessor``.

    With ``resize`` the processor resizes and centre-crops any image to 32 x 32 (as the published
    processors do to 224); without, it takes 32 x 32 inputs as they are.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from memcore.tiny import build_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=12,
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        do_resize=resize, do_center_crop=resize, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def write_clip(folder: str | os.PathLike) -> Path:
    """Save :func:`build_clip`'s model and processor in ``folder`` (what ``metrics.load_clip`` reads)."""
    model, processor = build_clip(resize=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
