"""memcore.mitigation (Wen et al.'s optimized prompt embedding) on the tiny pipeline: 64 px, 2 steps."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli, user_error
from memcore import generate as gen
from memcore.config import LocalizeConfig, resolve_generation
from memcore.detection import DetectConfig, TextConditionalNormHook, detection_scores
from memcore.driver import initial_latent
from memcore.errors import MemcoreError
from memcore.mitigation import WenSettings, wen_prompt_embeds
from memcore.models import load_pipeline

PROMPT = "a painting of a fox"
SEED = 3
SIZE = 64
STEPS = 2
CAP = 3


def tiny():
    return load_pipeline("tiny", device="cpu", dtype="float32")


def weights_digest(pipe) -> str:
    digest = hashlib.sha256()
    for name in ("unet", "text_encoder", "vae"):
        for key, tensor in getattr(pipe, name).state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def settings(pipe):
    generation = resolve_generation(pipe, LocalizeConfig(steps=STEPS, height=SIZE, width=SIZE))
    return generation, initial_latent(pipe, replace(generation, seed=SEED))


@pytest.fixture(scope="module")
def capped():
    """One optimization that runs to the step cap (target 0 is never reached), with the weights'
    digest and requires_grad flags before and after."""
    pipe = tiny()
    generation, latent = settings(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    before = weights_digest(pipe)
    result = wen_prompt_embeds(pipe, [PROMPT], latent, generation, lr=0.05, target_loss=0.0, max_steps=CAP)
    return pipe, generation, latent, result, before, flags


def test_loss_decreases_to_the_cap(capped):
    pipe, _, _, result, _, _ = capped
    (losses,) = result.losses
    assert result.steps == [CAP] and len(losses) == CAP + 1
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert result.seconds[0] > 0


def test_weights_unchanged_and_frozen_again(capped):
    pipe, _, _, _, before, flags = capped
    assert weights_digest(pipe) == before
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_embeddings(capped):
    """The negative embedding is the pipeline's own empty prompt; the start token only decays (AdamW's
    weight decay, no gradient); the other tokens moved."""
    pipe, _, _, result, _, _ = capped
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    torch.testing.assert_close(result.negative_prompt_embeds, negative, rtol=0, atol=0)
    decay = (1 - 0.05 * 0.01) ** CAP
    torch.testing.assert_close(result.prompt_embeds[:, 0], positive[:, 0] * decay)
    assert (result.prompt_embeds[:, 1:] - positive[:, 1:]).abs().amax() > 1e-3


def test_first_loss_is_the_detection_score(capped):
    pipe, _, _, result, _, _ = capped
    config = DetectConfig(seeds=(SEED,), steps=STEPS, height=SIZE, width=SIZE, timesteps=1, progress=False)
    score = detection_scores(pipe, [PROMPT], config).norms[0, 0, 0]
    assert result.losses[0][0] == pytest.approx(score, rel=1e-5)


def test_last_loss_is_the_returned_embeddings(capped):
    """The detection formula, read by its hook from the pipeline run on the returned embeddings."""
    pipe, generation, latent, result, _, _ = capped
    hook = TextConditionalNormHook(1, pipe.unet.config.in_channels)
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)
    registry.register_hook(hook, "test_wen")

    def stop(pipeline, step, timestep, kwargs):
        pipeline._interrupt = True
        return kwargs

    try:
        pipe(
            prompt_embeds=result.prompt_embeds, negative_prompt_embeds=result.negative_prompt_embeds, latents=latent,
            num_inference_steps=STEPS, guidance_scale=generation.guidance, height=SIZE, width=SIZE,
            output_type="latent", callback_on_step_end=stop,
        )
    finally:
        registry.remove_hook("test_wen", recurse=False)
    assert float(hook.norms[0][0]) == pytest.approx(result.losses[0][-1], rel=1e-5)


def test_stops_at_the_target(capped):
    pipe, generation, latent, result, _, _ = capped
    full = result.losses[0]
    target = (full[1] + full[2]) / 2  # reached after the second step, not the first
    again = wen_prompt_embeds(pipe, [PROMPT], latent, generation, lr=0.05, target_loss=target, max_steps=CAP)
    assert again.steps == [2]
    np.testing.assert_allclose(again.losses[0], full[:3], rtol=1e-6)
    assert again.losses[0][-1] <= target < again.losses[0][-2]


def test_settings_checked():
    assert WenSettings() == WenSettings(lr=0.05, target_loss=3.0, max_steps=10)
    for kwargs, param in (
        ({"lr": 0}, "wen_lr"), ({"lr": float("nan")}, "wen_lr"), ({"target_loss": -1}, "wen_target_loss"),
        ({"max_steps": 0}, "wen_max_steps"), ({"max_steps": 2.5}, "wen_max_steps"),
    ):
        with pytest.raises(MemcoreError) as err:
            WenSettings(**kwargs)
        assert err.value.param == param


def test_no_steps_gives_the_unmitigated_images(tmp_path):
    """A target every prompt already meets: no step, and the embeddings passed as prompt_embeds give
    exactly the images the prompt gives."""
    pipe = tiny()
    common = {"steps": STEPS, "height": SIZE, "width": SIZE, "progress": False}
    plain = gen.generate(pipe, [PROMPT], [SEED], out_dir=tmp_path / "plain", **common)
    mitigated = gen.generate(
        pipe, [PROMPT], [SEED], out_dir=tmp_path / "wen", mitigation="wen", wen=WenSettings(target_loss=1e9), **common
    )
    with Image.open(plain.images[0]) as a, Image.open(mitigated.images[0]) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manifest = gen.load_manifest(tmp_path / "wen")
    assert manifest["images"][0]["mitigation"]["steps"] == 0
    assert gen.load_manifest(tmp_path / "plain")["mitigation"] is None


def test_other_families_refused(tmp_path):
    pipe = load_pipeline("tiny-sdxl", device="cpu", dtype="float32")
    with pytest.raises(MemcoreError, match="SD 1.x and 2.x only, not SDXL") as err:
        gen.generate(pipe, [PROMPT], [SEED], out_dir=tmp_path / "x", steps=STEPS, height=SIZE, width=SIZE, mitigation="wen")
    assert err.value.param == "mitigation"
    assert not (tmp_path / "x").exists()


def test_cli_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "generate", "--model", "tiny", "--device", "cpu", "--prompts", prompts, "--seeds", str(SEED),
        "--steps", STEPS, "--height", SIZE, "--width", SIZE, "--mitigation", "wen", "--wen-target-loss", "0",
        "--wen-max-steps", "2", "--wen-lr", "0.1", "--out", out, "--json",
    )
    assert code == 0, err
    assert json.loads(stdout)["mitigation"] == "wen"
    manifest = gen.load_manifest(out)
    summary = manifest["mitigation"]
    assert summary["method"] == "wen" and summary["lr"] == 0.1 and summary["target_loss"] == 0
    assert summary["max_steps"] == 2 and summary["images"] == 1 and summary["reached_target"] == 0
    assert summary["seconds"] > 0 and summary["seconds_per_image"] > 0
    (image,) = manifest["images"]
    record = image["mitigation"]
    assert record["steps"] == 2 and record["loss"] < record["initial_loss"] and not record["reached_target"]
    assert (out / image["original"]).is_file()

    # the manifest's mitigation records are checked like the rest of it
    raw = json.loads((out / "manifest.json").read_text())
    raw["images"][0]["mitigation"]["steps"] = -1
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(MemcoreError, match=r"images\[0\]\.mitigation\.steps"):
        gen.load_manifest(out)
    raw["images"][0]["mitigation"]["steps"] = 2
    raw["mitigation"]["lr"] = 0
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(MemcoreError, match=r"mitigation\.lr"):
        gen.load_manifest(out)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--mitigation", "wen", "--mask", "MASK"], "--mitigation wen: cannot be combined with --mask"),
        (["--mitigation", "wen", "--guidance", "1"], "--guidance: is 1; the wen mitigation needs classifier-free"),
        (["--mitigation", "wen", "--wen-lr", "0"], "--wen-lr: must be > 0"),
        (["--mitigation", "wen", "--wen-target-loss", "-1"], "--wen-target-loss: must be >= 0"),
        (["--mitigation", "wen", "--wen-max-steps", "0"], "--wen-max-steps: must be an integer in [1, "),
        (["--wen-lr", "0.1"], "--wen-lr is only used with --mitigation wen"),
        (["--mitigation", "wen", "--model", "tiny-sdxl"], "--mitigation wen: supports SD 1.x and 2.x only, not SDXL"),
        (["--mitigation", "wen", "--model", "pixart"], "--mitigation wen: supports SD 1.x and 2.x only, not PixArt"),
    ],
)
def test_user_mistakes(tmp_path, capsys, extra, words):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"not read before the check")
    extra = [str(mask) if e == "MASK" else e for e in extra]
    model = [] if "--model" in extra else ["--model", "tiny"]
    message = user_error(
        capsys, tmp_path, "generate", *model, "--prompts", "memorize_0", "--out", tmp_path / "out", *extra
    )
    assert message.startswith(words), message
