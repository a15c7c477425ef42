"""Embedded tiny models: the published architectures at toy width, random weights, built offline.

Five families, each a diffusers pipeline whose denoiser has the block layout of the real model and
widths of 16 to 64, so that localizing on it exercises the same code paths in about a second:

``tiny``
    Stable Diffusion 1.5: three cross-attention down blocks, a cross-attention mid block, three
    cross-attention up blocks, two layers per block, so the same 16 feed-forward (GEGLU) layers
    with widths 16/32/64 instead of 320/640/1280; PNDM with ``skip_prk_steps``; a 2-layer CLIP
    text encoder (quick_gelu).
``tiny-sd2``
    Stable Diffusion 2.1 (768-v): SD 1.5's layout with per-block head counts, linear projections in
    and out of the transformers, upcast attention; DDIM with v-prediction; a gelu CLIP encoder.
``tiny-sdxl``
    SDXL base: three levels (no attention at the first), several transformer blocks per attention
    (``transformer_layers_per_block`` [1, 1, 2], the mid block takes the last), two text encoders
    whose hidden states are concatenated, "text_time" added conditioning (pooled text embedding
    and six size numbers); Euler with leading spacing; empty prompts give zero embeddings.
``tiny-pixart``
    PixArt-alpha: a DiT (PixArtTransformer2DModel, ada_norm_single) whose feed-forward is a
    tanh-approximated GELU MLP, not a GEGLU; a T5 encoder; DPM-Solver++. Call it with
    ``use_resolution_binning=False`` (binning knows only 256, 512 and 1024 px) and
    ``clean_caption=False`` (cleaning needs bs4 and ftfy).
``tiny-sd3``
    Stable Diffusion 3 (medium): an MMDiT (SD3Transformer2DModel) of 3 joint blocks, each with a
    tanh-GELU feed-forward for the image tokens (``ff``) and, except the last (``context_pre_only``),
    one for the text tokens (``ff_context``): 5 feed-forward layers; two CLIP encoders with
    projection (their hidden states concatenated, then padded to the T5 width) and a T5 encoder;
    a 16-channel VAE with shift and scaling factors; flow-matching Euler with shift 3.

Every text encoder reads the same byte-level CLIP tokenizer (514 tokens, no merges) built in
memory. All images are 128 px (16 x 16 latents). The weights are a function of the seed alone, so
two builds are bit-identical. The configs are the JSON files next to this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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


def _seeded(seed: int, dtype: torch.dtype, **factories: Callable[[], torch.nn.Module]) -> dict:
    """Call each factory in order under ``seed`` (float32 weights), then cast to ``dtype``.

    The global RNG is left as it was. The order of ``factories`` is part of the weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {name: make().eval() for name, make in factories.items()}
    if dtype != torch.float32:
        for module in modules.values():
            module.to(dtype)
    return modules


def _named(pipe, name: str):
    pipe.register_to_config(_name_or_path=name)
    return pipe


def _unet(config: str):
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel.from_config(_config(config))


def _vae(**overrides):
    from diffusers import AutoencoderKL

    return lambda: AutoencoderKL.from_config({**_config("vae"), **overrides})


def _clip(config: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    return lambda: model(CLIPTextConfig(**_config(config)))


def _stable_diffusion(seed: int, dtype: torch.dtype, unet: str, text_encoder: str, scheduler, scheduler_config: str):
    from diffusers import StableDiffusionPipeline

    parts = _seeded(seed, dtype, unet=_unet(unet), vae=_vae(), text_encoder=_clip(text_encoder))
    return StableDiffusionPipeline(
        **parts,
        tokenizer=build_tokenizer(),
        scheduler=scheduler.from_config(_config(scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``tiny``: the SD 1.5 StableDiffusionPipeline, on the CPU (well under a second, imports aside)."""
    from diffusers import PNDMScheduler

    return _named(_stable_diffusion(seed, dtype, "unet", "text_encoder", PNDMScheduler, "scheduler"), MODEL_ID)


def build_tiny_sd2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``tiny-sd2``: an SD 2.1 (768-v) StableDiffusionPipeline with a v-prediction DDIM scheduler."""
    from diffusers import DDIMScheduler

    pipe = _stable_diffusion(seed, dtype, "sd2_unet", "sd2_text_encoder", DDIMScheduler, "sd2_scheduler")
    return _named(pipe, f"{MODEL_ID}-sd2")


def build_tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``tiny-sdxl``: an SDXL base StableDiffusionXLPipeline with two CLIP text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = _seeded(
        seed,
        dtype,
        unet=_unet("sdxl_unet"),
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip("text_encoder"),
        text_encoder_2=_clip("sdxl_text_encoder_2", projection=True),
    )
    pipe = StableDiffusionXLPipeline(
        **parts,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(_config("sdxl_scheduler")),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _named(pipe, f"{MODEL_ID}-sdxl")


def build_tiny_pixart(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``tiny-pixart``: a PixArt-alpha PixArtAlphaPipeline (DiT denoiser, T5 text encoder)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    parts = _seeded(
        seed,
        dtype,
        transformer=lambda: PixArtTransformer2DModel.from_config(_config("pixart_transformer")),
        vae=_vae(),
        text_encoder=lambda: T5EncoderModel(T5Config(**_config("pixart_text_encoder"))),
    )
    pipe = PixArtAlphaPipeline(
        **parts,
        tokenizer=build_tokenizer(),
        scheduler=DPMSolverMultistepScheduler.from_config(_config("pixart_scheduler")),
    )
    return _named(pipe, f"{MODEL_ID}-pixart")


def build_tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``tiny-sd3``: a Stable Diffusion 3 StableDiffusion3Pipeline (MMDiT denoiser, two CLIPs and a T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    parts = _seeded(
        seed,
        dtype,
        transformer=lambda: SD3Transformer2DModel.from_config(_config("sd3_transformer")),
        vae=_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        ),
        text_encoder=_clip("sd3_text_encoder", projection=True),
        text_encoder_2=_clip("sd3_text_encoder_2", projection=True),
        text_encoder_3=lambda: T5EncoderModel(T5Config(**_config("sd3_text_encoder_3"))),
    )
    pipe = StableDiffusion3Pipeline(
        **parts,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        tokenizer_3=build_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_config("sd3_scheduler")),
    )
    return _named(pipe, f"{MODEL_ID}-sd3")


FAMILIES: dict[str, Callable] = {
    "tiny": build_tiny_pipeline,
    "tiny-sd2": build_tiny_sd2,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-pixart": build_tiny_pixart,
    "tiny-sd3": build_tiny_sd3,
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny pipeline ``name`` (a key of ``FAMILIES``) with weights drawn from ``seed``."""
    if name not in FAMILIES:
        raise KeyError(f"unknown tiny model {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name](seed=seed, dtype=dtype)
