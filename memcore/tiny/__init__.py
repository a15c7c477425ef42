"""The embedded tiny model: Stable Diffusion 1.5's architecture at toy width, random weights.

It has SD 1.5's block layout (three cross-attention down blocks, a cross-attention mid block, three
cross-attention up blocks, two layers per block), so the same 16 feed-forward layers, with widths
16/32/64 instead of 320/640/1280; SD 1.5's PNDM scheduler; a 2-layer CLIP text encoder; and a
byte-level CLIP tokenizer (514 tokens, no merges) built in memory. The weights are a function of the
seed alone, so two builds are bit-identical. Nothing is downloaded.
"""

from __future__ import annotations

import json
from importlib import resources

import torch

MODEL_ID = "memcore/tiny"


def _config(name: str) -> dict:
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2 and CLIP)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tokenizer():
    """A CLIPTokenizer over single bytes: every byte alone, and word-final (``</w>``), plus BOS/EOS."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny StableDiffusionPipeline on the CPU (well under a second, imports aside).

    The weights are drawn in float32 from ``seed`` and then cast to ``dtype``.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_config("unet"))
        vae = AutoencoderKL.from_config(_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
    if dtype != torch.float32:
        for module in (unet, vae, text_encoder):
            module.to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(_config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(_name_or_path=MODEL_ID)
    return pipe
