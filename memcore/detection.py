"""Which prompts are memorized: the magnitude of the text-conditional noise prediction.

Wen, Liu, Chen and Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
ICLR 2024 (https://openreview.net/forum?id=84n3UwkH7b, arXiv 2407.21720; code
https://github.com/YuxinWenRick/diffusion_memorization), section 3.3: a prompt whose generation
regurgitates a training image pulls the noise prediction hard towards it from the first steps on,
so the text-conditional part of the prediction,

    d_t = || eps(x_t, e_p) - eps(x_t, e_empty) ||_2,

is large. Their pipeline (``local_sd_pipeline.py``, ``track_noise_norm=True``) records, at every
denoising step and for every image of the guided batch, the L2 norm (``norm(p=2)``, over channels
and pixels of the latent of that one image) of ``noise_pred_text - noise_pred_uncond``, the two
halves of the classifier-free-guidance batch, before the guidance scale multiplies it. The
detection score of a prompt is the mean of ``d_t`` over the first T steps (the paper reports T = 1,
10 and all 50 steps) and over its n generations (``detect_mem.py``: n = 4 images per prompt by
default, 50 DDIM steps, guidance 7.5). A higher score means more likely memorized. Anchor on SD 1.5,
500 memorized prompts against 500 non-memorized ones: an AUC of about 0.96 at the first step
(0.962 as reproduced in the README of github.com/randomnameforicml/icml-2026).

Here the pipeline's own ``__call__`` runs each generation (:mod:`memcore.driver`) and stops after T
denoiser calls; a hook on the denoiser reads its output, the guided batch [uncond..., cond...], and
computes ``d_t`` for each prompt. No image is decoded. As everywhere in memcore, all prompts share
the initial latent x_T of a seed (Wen et al. draw a seed per prompt), and the scheduler is the
pipeline's own unless the caller changes it (Wen et al. switch SD to DDIM). A model that predicts
a learned variance beside the noise (PixArt: twice the latent's channels) is scored on the noise
channels only, the part guidance combines.

:func:`roc` turns scores of memorized and non-memorized prompts into the ROC curve, its AUC (ties
counted half) and the TPR at 1% FPR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from memcore.config import LocalizeConfig, check_batch_size, check_guidance, check_image_settings, check_timesteps
from memcore.errors import MemcoreError

HOOK_NAME = "memcore_detect"
DEFAULT_SEEDS = (0, 1, 2, 3)  # four generations per prompt, as detect_mem.py's num_images_per_prompt
MAX_FPR = 0.01


@dataclass(frozen=True)
class DetectConfig:
    """What ``memcore detect`` does. ``None`` means the pipeline's own default.

    Attributes:
        steps: inference steps of each generation (default: the pipeline's, 50 for SD).
        guidance: guidance scale; must exceed 1, so that the pipeline runs the guided batch.
        seeds: one generation per seed; all prompts share the x_T of a seed.
        height, width: image size in pixels (default: the model's).
        timesteps: T, the first denoiser calls averaged into the score (default 1: the first step).
        batch_size: prompts per generation.
        progress: show a progress bar over denoiser calls.
    """

    steps: int | None = None
    guidance: float | None = None
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    height: int | None = None
    width: int | None = None
    timesteps: int = 1
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        from memcore.generate import check_seeds

        object.__setattr__(self, "seeds", tuple(check_seeds(self.seeds)))
        check_timesteps(self.timesteps)
        check_batch_size(self.batch_size)
        check_image_settings(self.steps, self.height, self.width)
        check_guidance(self.guidance)
        if self.guidance is not None and self.guidance <= 1:
            raise MemcoreError(
                f"must be greater than 1 for detection (the score compares the two halves of the guided batch), "
                f"got {self.guidance}",
                param="guidance",
            )

    def generation_config(self) -> LocalizeConfig:
        return LocalizeConfig(
            steps=self.steps, guidance=self.guidance, seed=self.seeds[0], height=self.height, width=self.width,
            timesteps=self.timesteps, batch_size=self.batch_size,
        )


@dataclass
class DetectionScores:
    """Scores of ``prompts``: ``scores[i]`` is the mean of ``norms[i]`` over seeds and call indices.

    Attributes:
        prompts: the prompts, in order.
        norms: float64 [prompts, seeds, timesteps], d_t of every prompt, seed and call index.
        seeds: the seeds, one generation each.
        metadata: model, settings in force and the call timesteps.
    """

    prompts: list[str]
    norms: np.ndarray
    seeds: list[int]
    metadata: dict = field(default_factory=dict)

    @property
    def per_call(self) -> np.ndarray:
        """[prompts, timesteps]: d_t averaged over the seeds."""
        return self.norms.mean(axis=1)

    @property
    def scores(self) -> np.ndarray:
        """[prompts]: the detection score (mean over seeds and the first T calls)."""
        return self.norms.mean(axis=(1, 2))


class TextConditionalNormHook(ModelHook):
    """Reads each guided denoiser output [uncond..., cond...] and stores ||cond - uncond||_2 per image."""

    def __init__(self, num_calls: int, noise_channels: int):
        super().__init__()
        self.num_calls, self.noise_channels = num_calls, noise_channels
        self.calls = 0
        self.norms: list[torch.Tensor] = []

    def start(self) -> None:
        self.calls, self.norms = 0, []

    def post_forward(self, module, output):
        self.calls += 1
        if self.calls <= self.num_calls:
            sample = output[0] if isinstance(output, tuple) else output.sample
            if sample.shape[0] % 2:
                raise MemcoreError(f"detect: a denoiser batch of {sample.shape[0]} is not a guided batch")
            uncond, cond = sample[:, : self.noise_channels].float().chunk(2)
            self.norms.append((cond - uncond).flatten(1).norm(p=2, dim=1).cpu())
        return output


def detection_scores(
    pipe, prompts: list[str], config: DetectConfig | None = None, *, run=None, ranks=None
) -> DetectionScores | None:
    """The memorization score of every prompt (Wen et al., ICLR 2024; see the module docstring).

    For each seed, the prompts run in batches of ``config.batch_size`` from that seed's x_T, through
    the pipeline's own ``__call__``, for the first ``config.timesteps`` denoiser calls.

    With ``run`` (a :class:`memcore.runs.Run`) each batch's norms are recorded in it, batches it
    holds already are skipped, and the processes of a ``torchrun`` launch (``ranks``) share the
    batches: process 0 returns every score, the others ``None``.
    """
    from memcore.config import check_calls, resolve_generation
    from memcore.driver import initial_latent, is_guided, run_first_calls, truncation_reported_once
    from memcore.models import denoiser, model_id

    config = config or DetectConfig()
    prompts = list(prompts)
    if not prompts:
        raise MemcoreError("empty; nothing to score", param="prompts")
    generation = resolve_generation(pipe, config.generation_config(), images=min(config.batch_size, len(prompts)))
    if not is_guided(pipe, generation):
        why = (
            f"is {generation.guidance:g}"
            if generation.guidance <= 1
            else "is ignored by this model (guidance-distilled: no unconditional half)"
        )
        raise MemcoreError(
            f"{why}; detection needs classifier-free guidance (a guided batch), e.g. 7.5", param="guidance"
        )
    tau = check_calls(generation, config.timesteps)
    net = denoiser(pipe)
    noise_channels = net.config.in_channels
    from memcore.generate import work_items
    from memcore.runs import Ranks

    ranks = ranks or Ranks()
    items = work_items(len(prompts), list(config.seeds), config.batch_size, "detect")
    todo = [item for item in ranks.mine(items) if run is None or not run.done(item.key)]
    norms = np.zeros((len(prompts), len(config.seeds), tau), dtype=np.float64)
    column = {seed: s for s, seed in enumerate(config.seeds)}
    hook = TextConditionalNormHook(tau, noise_channels)
    registry = HookRegistry.check_if_exists_or_initialize(net)
    registry.register_hook(hook, HOOK_NAME)
    started = time.perf_counter()
    try:
        with (
            torch.no_grad(),
            truncation_reported_once(pipe),
            tqdm(
                total=len(todo) * tau, desc="denoiser calls" if ranks.world == 1 else f"denoiser calls ({ranks})",
                unit="call", disable=None if config.progress and ranks.main else True,
            ) as bar,
        ):
            latents = {}
            for item in todo:
                if item.seed not in latents:
                    latents = {item.seed: initial_latent(pipe, replace(generation, seed=item.seed))}
                hook.start()
                run_first_calls(pipe, [prompts[i] for i in item.prompts], latents[item.seed], generation, tau, on_call=bar.update)
                if len(hook.norms) != tau:
                    raise MemcoreError(f"detect: {len(hook.norms)} denoiser calls seen, {tau} expected")
                block = torch.stack(hook.norms, dim=1).double().numpy()
                norms[item.prompts.start : item.prompts.stop, column[item.seed], :] = block
                if run is not None:
                    run.record(item.key, [], {"norms": block})
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
    if run is not None:
        run.gather()
        if not ranks.main:
            return None
        for item, (_, arrays) in zip(items, run.load_all([item.key for item in items])):
            norms[item.prompts.start : item.prompts.stop, column[item.seed], :] = arrays["norms"]
    metadata = {
        "model_id": model_id(pipe),
        "dtype": str(net.dtype).removeprefix("torch."),
        "timesteps": tau,
        "seeds": list(config.seeds),
        "batch_size": config.batch_size,
        "seconds": round(time.perf_counter() - started, 3),
        **{k: v for k, v in generation.as_dict().items() if k != "seed"},
    }
    return DetectionScores(prompts=prompts, norms=norms, seeds=list(config.seeds), metadata=metadata)


@dataclass(frozen=True)
class Roc:
    """The ROC curve of scores where higher means positive (memorized).

    ``fpr``, ``tpr`` and ``thresholds`` hold one point per distinct score, from the highest score
    down, after the point (0, 0) at threshold +inf: a prompt is called positive when its score is
    >= the threshold. ``auc`` is the area under the curve (trapezoids), which equals the probability
    that a random positive scores above a random negative, ties counted half. ``tpr_at_fpr`` is the
    highest TPR over the thresholds whose FPR is at most ``max_fpr``.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    tpr_at_fpr: float
    max_fpr: float

    def as_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_fpr": self.tpr_at_fpr, "max_fpr": self.max_fpr}


def roc(scores_pos, scores_neg, max_fpr: float = MAX_FPR) -> Roc:
    """The exact ROC of positives ``scores_pos`` against negatives ``scores_neg`` (see :class:`Roc`)."""
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise MemcoreError("needs at least one positive and one negative score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise MemcoreError("scores must be finite")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # the curve moves once per distinct score
    tp = np.cumsum(labels)[last_of_tie]
    fp = np.cumsum(1 - labels)[last_of_tie]
    tpr = np.r_[0.0, tp / pos.size]
    fpr = np.r_[0.0, fp / neg.size]
    thresholds = np.r_[np.inf, scores[last_of_tie]]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    allowed = np.r_[0.0, fp] <= max_fpr * neg.size * (1 + 1e-12)  # counted, not compared as rounded rates
    return Roc(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc, tpr_at_fpr=float(tpr[allowed].max()), max_fpr=max_fpr)
