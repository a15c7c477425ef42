"""Layer discovery on every supported denoiser family, and the tiny pipelines that stand in for them.

The published configs (tests/configs, sources in its README) are instantiated on the meta device:
no weights, no download, the real module tree. The tiny pipelines are built and run for 2 steps.
"""

import functools
import json
from pathlib import Path

import pytest
import torch

from memcore.errors import MemcoreError
from memcore.models import TINY_MODELS, load_pipeline, model_id, resolve_model_id
from memcore.targets import find_targets
from memcore.tiny import FAMILIES, build

CONFIGS = Path(__file__).parent / "configs"


def layout(*blocks):
    """Expected (name, shape) in execution order from (block, attentions, depth, (out, in)) rows.

    ``depth`` is the number of transformer blocks in each attention of ``block``.
    """
    return [
        (f"{block}.attentions.{a}.transformer_blocks.{b}.ff.net.2", shape)
        for block, attentions, depth, shape in blocks
        for a in range(attentions)
        for b in range(depth)
    ]


def dit_layout(layers, shape):
    return [(f"transformer_blocks.{i}.ff.net.2", shape) for i in range(layers)]


def mmdit_layout(layers, shape):
    """SD3: every joint block has ``ff`` (image tokens), then ``ff_context`` (text tokens) but the last,
    which is ``context_pre_only`` (its text stream ends after the attention)."""
    return [
        (f"transformer_blocks.{i}.{ff}.net.2", shape)
        for i in range(layers)
        for ff in (("ff", "ff_context") if i < layers - 1 else ("ff",))
    ]


def sd_layout(widths, depth=1):
    """The SD 1.x / 2.x layout: 2 attentions in down blocks 0-2, 1 in the mid block, 3 in up blocks 1-3."""
    small, medium, large = ((w, 4 * w) for w in widths)
    return layout(
        ("down_blocks.0", 2, depth, small),
        ("down_blocks.1", 2, depth, medium),
        ("down_blocks.2", 2, depth, large),
        ("mid_block", 1, depth, large),
        ("up_blocks.1", 3, depth, large),
        ("up_blocks.2", 3, depth, medium),
        ("up_blocks.3", 3, depth, small),
    )


def sdxl_layout(widths, depths):
    """SDXL: no attention at the first level; the mid block and up block 0 take the deepest depth."""
    medium, large = ((w, 4 * w) for w in widths)
    return layout(
        ("down_blocks.1", 2, depths[0], medium),
        ("down_blocks.2", 2, depths[1], large),
        ("mid_block", 1, depths[1], large),
        ("up_blocks.0", 3, depths[1], large),
        ("up_blocks.1", 3, depths[0], medium),
    )


def check_targets(net, expected, geglu):
    targets = find_targets(net)
    found = [(t.name, t.shape) for t in targets]
    assert len(found) == len(expected), f"{len(found)} layers found, {len(expected)} expected"
    for i, (got, want) in enumerate(zip(found, expected)):
        assert got == want, f"layer {i}: found {got}, expected {want}"
    for t in targets:
        assert net.get_submodule(t.name) is t.linear
        first = net.get_submodule(t.name.rsplit(".", 1)[0] + ".0")
        if geglu:
            assert t.geglu is first, t.name
        else:
            assert t.geglu is None, t.name
    return targets


def meta_denoiser(file):
    from diffusers import SD3Transformer2DModel, Transformer2DModel, UNet2DConditionModel

    config = json.loads((CONFIGS / file).read_text())
    classes = {
        "UNet2DConditionModel": UNet2DConditionModel,
        "Transformer2DModel": Transformer2DModel,
        "SD3Transformer2DModel": SD3Transformer2DModel,
    }
    cls = classes[config["_class_name"]]
    with torch.device("meta"):
        return cls.from_config(config)


# --- published configs, on the meta device ----------------------------------------------------------


@pytest.mark.parametrize("file", ["sd15_unet.json", "sd21_unet.json"])
def test_sd1_and_sd2_have_16_geglu_layers(file):
    targets = check_targets(meta_denoiser(file), sd_layout((320, 640, 1280)), geglu=True)
    assert targets[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert targets[6].name == "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    assert targets[-1].name == "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"
    assert sum(t.linear.weight.numel() for t in targets) == 49_561_600  # docs/method.md section 1


def test_sd21_uses_linear_projections_and_per_block_heads():
    net = meta_denoiser("sd21_unet.json")
    attention = net.down_blocks[0].attentions[0]
    assert isinstance(attention.proj_in, torch.nn.Linear)
    assert attention.transformer_blocks[0].attn1.heads == 5
    assert net.down_blocks[2].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024


def test_sdxl_base_has_70_geglu_layers():
    net = meta_denoiser("sdxl_base_unet.json")
    targets = check_targets(net, sdxl_layout((640, 1280), (2, 10)), geglu=True)
    assert [t.name for t in targets[:2]] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
    ]
    assert targets[24].name == "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    assert targets[34].name == "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert targets[-1].name == "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2"
    blocks = [t.name.split(".")[0] for t in targets]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert net.add_embedding.linear_1.in_features == 2816


def test_pixart_xl_has_28_tanh_gelu_layers():
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.activations import GELU

    net = meta_denoiser("pixart_xl_2_1024_ms_transformer.json")
    assert isinstance(net, PixArtTransformer2DModel)  # diffusers remaps the published Transformer2DModel
    targets = check_targets(net, dit_layout(28, (1152, 4608)), geglu=False)
    for t in targets:
        activation = net.get_submodule(t.name.rsplit(".", 1)[0] + ".0")
        assert type(activation) is GELU and activation.approximate == "tanh"


def test_sd3_medium_has_47_tanh_gelu_layers():
    from diffusers.models.activations import GELU

    net = meta_denoiser("sd3_medium_transformer.json")
    assert len(net.transformer_blocks) == 24
    assert [b.context_pre_only for b in net.transformer_blocks] == [False] * 23 + [True]
    assert net.transformer_blocks[-1].ff_context is None
    targets = check_targets(net, mmdit_layout(24, (1536, 6144)), geglu=False)
    assert [t.name for t in targets[:3]] == [
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.1.ff.net.2",
    ]
    assert [t.name for t in targets[-2:]] == ["transformer_blocks.22.ff_context.net.2", "transformer_blocks.23.ff.net.2"]
    for t in targets:
        activation = net.get_submodule(t.name.rsplit(".", 1)[0] + ".0")
        assert type(activation) is GELU and activation.approximate == "tanh"
    assert sum(t.linear.weight.numel() for t in targets) == 47 * 1536 * 6144
    # SD3 medium has joint attention and no attn2 (SD 3.5's dual attention adds one): no cross-attention
    # family, the text keys are attn.add_k_proj
    with pytest.raises(MemcoreError, match="no matching Linear"):
        find_targets(net, "attn2.to_k")
    assert len(find_targets(net, r"transformer_blocks\.\d+\.attn\.add_k_proj")) == 24


# --- the tiny pipelines ------------------------------------------------------------------------------

TINY_LAYOUTS = {
    "tiny": (sd_layout((16, 32, 64)), True),
    "tiny-sd2": (sd_layout((16, 32, 64)), True),
    "tiny-sdxl": (sdxl_layout((32, 64), (1, 2)), True),
    "tiny-pixart": (dit_layout(3, (16, 64)), False),
    "tiny-sd3": (mmdit_layout(3, (32, 128)), False),
}
CALL_KWARGS = {
    "tiny": {},
    "tiny-sd2": {},
    "tiny-sdxl": {},
    "tiny-pixart": {"use_resolution_binning": False, "clean_caption": False},
    "tiny-sd3": {},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny models are far too small for intra-op threads to help; on a busy machine they hurt.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tiny(name):
    pipe = build(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def test_every_tiny_family_is_listed():
    assert TINY_MODELS == tuple(FAMILIES) == ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-pixart", "tiny-sd3")
    assert set(TINY_LAYOUTS) == set(FAMILIES)
    with pytest.raises(KeyError, match="tiny-sd4"):
        build("tiny-sd4")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_family_structure(name):
    expected, geglu = TINY_LAYOUTS[name]
    pipe = tiny(name)
    assert model_id(pipe) == name.replace("tiny", "memcore/tiny", 1)
    check_targets(denoiser_of(pipe), expected, geglu)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_family_is_a_function_of_the_seed(name):
    first, again, other = (denoiser_of(build(name, seed=s)).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_family_runs_its_own_pipeline(name):
    pipe = tiny(name)
    out = pipe("a painting of a fox", num_inference_steps=2, output_type="latent", **CALL_KWARGS[name])
    assert out.images.shape == (1, denoiser_of(pipe).config.in_channels, 16, 16)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl", "tiny-sd3"])
def test_tiny_family_decodes_to_pil(name):
    image = tiny(name)("", num_inference_steps=2, output_type="pil", **CALL_KWARGS[name]).images[0]
    assert image.size == (128, 128)


def test_tiny_family_traits():
    sd2, sdxl, pixart = tiny("tiny-sd2"), tiny("tiny-sdxl"), tiny("tiny-pixart")
    assert type(sd2.scheduler).__name__ == "DDIMScheduler"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection and isinstance(sd2.unet.config.attention_head_dim, (list, tuple))
    assert sd2.text_encoder.config.hidden_act == "gelu"

    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.config.force_zeros_for_empty_prompt
    width = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert sdxl.unet.config.cross_attention_dim == width
    pooled, time_ids = sdxl.text_encoder_2.config.projection_dim, 6 * sdxl.unet.config.addition_time_embed_dim
    assert sdxl.unet.config.projection_class_embeddings_input_dim == time_ids + pooled

    assert type(pixart).__name__ == "PixArtAlphaPipeline"
    assert type(pixart.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pixart.text_encoder).__name__ == "T5EncoderModel"
    assert type(pixart.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pixart.transformer.config.caption_channels == pixart.text_encoder.config.d_model
    assert pixart.text_encoder.config.vocab_size >= len(pixart.tokenizer)


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-pixart", "tiny-sd3"])
def test_load_pipeline_accepts_every_tiny_name(name):
    pipe = load_pipeline(name, device="cpu", dtype="float16")
    assert model_id(pipe) == f"memcore/{name}"
    assert denoiser_of(pipe).dtype == torch.float16


def test_aliases_for_new_families():
    assert resolve_model_id("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert resolve_model_id("pixart") == "PixArt-alpha/PixArt-XL-2-512x512"
    assert resolve_model_id("sd3") == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_tiny_sd3_traits():
    sd3 = tiny("tiny-sd3")
    assert type(sd3).__name__ == "StableDiffusion3Pipeline"
    assert type(sd3.transformer).__name__ == "SD3Transformer2DModel"
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sd3.scheduler.config.shift == 3.0
    assert [type(sd3.components[f"text_encoder{s}"]).__name__ for s in ("", "_2", "_3")] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel",
    ]
    net, vae = sd3.transformer.config, sd3.vae.config
    assert vae.latent_channels == net.in_channels == net.out_channels == 16
    assert vae.shift_factor is not None and vae.scaling_factor != 0.18215
    # the two CLIP hidden states, concatenated, are padded to the T5 width; their pooled outputs concatenated
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert net.joint_attention_dim == sd3.text_encoder_3.config.d_model >= clip_width
    pooled = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    assert net.pooled_projection_dim == pooled
    assert net.caption_projection_dim == net.num_attention_heads * net.attention_head_dim
    assert [b.context_pre_only for b in sd3.transformer.transformer_blocks] == [False, False, True]


def test_tiny_sd3_initial_latent_is_the_pipelines_own_draw():
    from memcore.config import LocalizeConfig, resolve_generation
    from memcore.driver import initial_latent

    pipe = tiny("tiny-sd3")
    generation = resolve_generation(pipe, LocalizeConfig(steps=2, seed=3))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    try:
        torch.manual_seed(generation.seed)
        pipe("a fox", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    # flow matching does not scale x_T (no init_noise_sigma): the first call sees the draw itself
    assert torch.equal(seen[0], initial_latent(pipe, generation))


@pytest.mark.parametrize(
    "file, count, key_in",
    [("sd15_unet.json", 16, 768), ("sd21_unet.json", 16, 1024), ("sdxl_base_unet.json", 70, 2048),
     ("pixart_xl_2_1024_ms_transformer.json", 28, 1152)],
)
def test_cross_attention_families_on_published_configs(file, count, key_in):
    net = meta_denoiser(file)
    ffn = find_targets(net)
    for family in ("attn2.to_k", "attn2.to_v"):
        targets = find_targets(net, family)
        assert len(targets) == count
        # one per transformer block, in the same execution order as the feed-forward layers
        assert [t.name.rsplit(".attn2.", 1)[0] for t in targets] == [t.name.rsplit(".ff.", 1)[0] for t in ffn]
        assert all(t.linear.in_features == key_in and t.stage == "denoiser" for t in targets)
