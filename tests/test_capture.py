"""Capture on the tiny pipeline against statistics computed from activations stored by plain hooks."""

import pytest
import torch

from helpers import backend_device, backends, needs_cuda
from memcore.config import LocalizeConfig, resolve_generation
from memcore.driver import initial_latent
from memcore.models import denoiser
from memcore.stats import collect_stats
from memcore.targets import find_targets


def stored_inputs(pipe, prompts, steps=None):
    """Inputs of every target Linear per denoiser call of a full generation: {(layer, call): X}.

    Kept by plain torch hooks while memcore's capture hooks run too, so that X is what the model
    computes under capture (the fused GEGLU's output rounds like, not bit-for-bit as, PyTorch's).
    """
    from memcore.capture import CaptureState, apply_capture

    net = denoiser(pipe)
    targets = find_targets(net)
    calls = [-1]
    kept = {}
    handles = [net.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))]
    for target in targets:
        def keep(module, args, name=target.name):
            kept[(name, calls[0])] = args[0].detach().clone()
        handles.append(target.linear.register_forward_pre_hook(keep))
    generation = resolve_generation(pipe, LocalizeConfig(steps=steps))
    calls_total = len(generation.call_timesteps)
    state = CaptureState(num_calls=calls_total)
    state.start_run({t.name: torch.zeros(calls_total, t.linear.in_features) for t in targets})
    try:
        with torch.no_grad(), apply_capture(net, targets, state):
            pipe(
                prompt=prompts,
                num_inference_steps=generation.steps,
                latents=initial_latent(pipe, generation).repeat(len(prompts), 1, 1, 1),
                output_type="latent",
            )
    finally:
        for handle in handles:
            handle.remove()
    return kept


def statistic(x, rows, token_norm):
    """docs/method.md section 2 written out: sum over rows of xhat^2 (float64), rows 'both' or 'cond'."""
    x = x.double()
    if rows == "cond":
        x = x[x.shape[0] // 2 :]
    x = x.reshape(-1, x.shape[-1])
    if token_norm:
        norm = x.norm(dim=1, keepdim=True)
        x = torch.where(norm > 0, x / norm, torch.zeros_like(x))
    return (x**2).sum(0)


@pytest.mark.parametrize("rows", ["both", "cond"])
@pytest.mark.parametrize("token_norm", [True, False])
def test_hook_statistics_equal_stored_activations(tiny_pipe, prompts, rows, token_norm):
    tau = 3
    kept = stored_inputs(tiny_pipe, prompts, steps=5)
    null_kept = stored_inputs(tiny_pipe, [""], steps=5)
    config = LocalizeConfig(steps=5, timesteps=tau, rows=rows, token_norm=token_norm, batch_size=len(prompts), progress=False)
    stats = collect_stats(tiny_pipe, prompts, config)
    assert stats.layers == [t.name for t in find_targets(tiny_pipe.unet)]
    for layer in stats.layers:
        for t in range(tau):
            expected = statistic(kept[(layer, t)], rows, token_norm).float()
            torch.testing.assert_close(stats.mem[layer][t], expected, rtol=2e-6, atol=0, msg=f"mem {layer} call {t}")
            expected_null = len(prompts) * statistic(null_kept[(layer, t)], rows, token_norm).float()
            torch.testing.assert_close(stats.null[layer][t], expected_null, rtol=2e-6, atol=0, msg=f"null {layer} call {t}")


def test_stopping_early_sees_the_first_calls_of_a_full_generation(tiny_pipe, prompts):
    full = stored_inputs(tiny_pipe, prompts, steps=8)
    assert max(call for _, call in full) == 8  # PNDM: 9 denoiser calls for 8 steps
    stats = collect_stats(tiny_pipe, prompts, LocalizeConfig(steps=8, timesteps=4, batch_size=3, progress=False))
    for layer in stats.layers:
        for t in range(4):
            expected = statistic(full[(layer, t)], "both", True).float()
            torch.testing.assert_close(stats.mem[layer][t], expected, rtol=2e-6, atol=0)


def test_default_schedule_is_sd15_pndm(tiny_pipe):
    generation = resolve_generation(tiny_pipe, LocalizeConfig())
    assert (generation.steps, generation.guidance, generation.height, generation.width) == (50, 7.5, 128, 128)
    assert len(generation.call_timesteps) == 51
    assert generation.call_timesteps[:4] == [981, 961, 961, 941]


def test_batch_sizes_agree(tiny_pipe):
    prompts = ["one", "two two", "three three three", "four", "five"]
    base = LocalizeConfig(timesteps=2, progress=False)
    one = collect_stats(tiny_pipe, prompts, LocalizeConfig(timesteps=2, batch_size=1, progress=False))
    four = collect_stats(tiny_pipe, prompts, LocalizeConfig(timesteps=2, batch_size=4, progress=False))
    assert base.batch_size == 4
    for layer in one.layers:
        torch.testing.assert_close(one.mem[layer], four.mem[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.null[layer], four.null[layer], rtol=1e-5, atol=1e-6)


def test_one_null_run_times_n_equals_n_null_runs(tiny_pipe, prompts):
    stats = collect_stats(tiny_pipe, prompts, LocalizeConfig(timesteps=2, progress=False))
    # N separate generations of the empty prompt, one per batch, are the memorized statistic of [""] * N
    separate = collect_stats(tiny_pipe, [""] * len(prompts), LocalizeConfig(timesteps=2, batch_size=1, progress=False))
    for layer in stats.layers:
        torch.testing.assert_close(stats.null[layer], separate.mem[layer], rtol=1e-6, atol=0)


def test_initial_latent_is_the_pipelines_own_draw(tiny_pipe):
    generation = resolve_generation(tiny_pipe, LocalizeConfig(seed=3))
    ours = initial_latent(tiny_pipe, generation)
    torch.manual_seed(3)
    theirs = tiny_pipe.prepare_latents(1, 4, 128, 128, torch.float32, torch.device("cpu"), None)
    torch.testing.assert_close(ours * tiny_pipe.scheduler.init_noise_sigma, theirs, rtol=0, atol=0)


def test_hooks_are_removed_when_the_run_fails(tiny_pipe, prompts):
    net = tiny_pipe.unet
    calls = []

    def fail_on_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    handle = net.register_forward_pre_hook(fail_on_second_call)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            collect_stats(tiny_pipe, prompts, LocalizeConfig(timesteps=3, progress=False))
    finally:
        handle.remove()
    for module in net.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook("memcore_capture") is None
    # and a later run works and is unaffected
    stats = collect_stats(tiny_pipe, prompts, LocalizeConfig(timesteps=1, progress=False))
    assert all(torch.isfinite(acc).all() and (acc > 0).any() for acc in stats.mem.values())


def test_fused_geglu_capture_equals_input_hooks(tiny_pipe, prompts):
    from memcore.capture import CaptureState, apply_capture
    from memcore.driver import is_guided, run_first_calls

    net = tiny_pipe.unet
    targets = find_targets(net)
    assert all(t.geglu is not None for t in targets)  # SD: every feed-forward is GEGLU -> dropout -> Linear
    generation = resolve_generation(tiny_pipe, LocalizeConfig(height=64, width=64))
    latent = initial_latent(tiny_pipe, generation)
    results = {}
    for fused in (True, False):
        accumulators = {t.name: torch.zeros(3, t.linear.in_features) for t in targets}
        state = CaptureState(num_calls=3, guided=is_guided(tiny_pipe, generation))
        with torch.no_grad(), apply_capture(net, targets, state, fused=fused):
            state.start_run(accumulators)
            run_first_calls(tiny_pipe, prompts, latent, generation, 3)
        results[fused] = accumulators
    for name in results[True]:
        torch.testing.assert_close(results[True][name], results[False][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows", ["both", "cond"])
def test_fused_geglu_routes_prompt_ranges_like_input_hooks(tiny_pipe, prompts, rows):
    from memcore.capture import CaptureState, Destination, apply_capture
    from memcore.driver import is_guided, run_first_calls

    net = tiny_pipe.unet
    targets = find_targets(net)
    generation = resolve_generation(tiny_pipe, LocalizeConfig(height=64, width=64))
    latent = initial_latent(tiny_pipe, generation)
    results = {}
    for fused in (True, False):
        first, rest = ({t.name: torch.zeros(2, t.linear.in_features) for t in targets} for _ in range(2))
        state = CaptureState(num_calls=2, rows=rows, guided=is_guided(tiny_pipe, generation))
        with torch.no_grad(), apply_capture(net, targets, state, fused=fused):
            state.start_run([Destination(first, 0, 1), Destination(rest, 1, len(prompts))])
            run_first_calls(tiny_pipe, prompts, latent, generation, 2)
        results[fused] = (first, rest)
    for part in range(2):
        for name, acc in results[True][part].items():
            assert (acc > 0).all(), name
            torch.testing.assert_close(acc, results[False][part][name], rtol=1e-5, atol=1e-6, msg=name)
    # the two destinations split what one destination for the whole batch collects
    whole = collect_stats(tiny_pipe, prompts, LocalizeConfig(height=64, width=64, timesteps=2, rows=rows, batch_size=3, progress=False))
    for name in whole.layers:
        torch.testing.assert_close(results[False][0][name] + results[False][1][name], whole.mem[name], rtol=1e-5, atol=1e-6)


# --- every backend of the fused op, and the GPU ------------------------------------------------------


@pytest.mark.parametrize("backend", backends("geglu_accumulate", only=("cpu", "triton", "cuda")))
def test_fused_capture_on_each_backend_routes_prompt_ranges(backend):
    """Capture through the fused GEGLU of ``backend`` (first prompt range) and the statistic op (second
    range), against unfused capture on the reference backend, on the backend's device."""
    from memcore.capture import CaptureState, Destination, apply_capture
    from memcore.driver import is_guided, run_first_calls
    from memcore.models import load_pipeline
    from memcore.ops import use_backend

    device = backend_device(backend)
    pipe = load_pipeline("tiny", device=device, dtype="float32")
    targets = find_targets(pipe.unet)
    generation = resolve_generation(pipe, LocalizeConfig(height=32, width=32))
    latent = initial_latent(pipe, generation)
    prompts = ["a painting of a fox", "the great wave", "a man in a hat"]
    results = {}
    for name, fused in ((backend, True), ("reference", False)):
        parts = [{t.name: torch.zeros(1, t.linear.in_features, device=device) for t in targets} for _ in range(2)]
        state = CaptureState(num_calls=1, guided=is_guided(pipe, generation))
        with torch.no_grad(), use_backend(name), apply_capture(pipe.unet, targets, state, fused=fused):
            state.start_run([Destination(parts[0], 0, 2), Destination(parts[1], 2, 3)])
            run_first_calls(pipe, prompts, latent, generation, 1)
        results[name] = parts
    for part in range(2):
        for layer, acc in results[backend][part].items():
            assert (acc > 0).all(), layer
            torch.testing.assert_close(acc, results["reference"][part][layer], rtol=1e-5, atol=1e-6, msg=layer)


@needs_cuda
@pytest.mark.parametrize("backend", backends("geglu_accumulate", only=("triton", "cuda")))
def test_localize_on_gpu(backend):
    """localize on the GPU: statistics within float32 noise of the reference backend's (the fused GEGLU
    may round X differently in the last bit), and the mask exactly the reference's mask of those
    statistics."""
    from memcore.localization import localize
    from memcore.mask import compute_mask
    from memcore.models import load_pipeline
    from memcore.ops import use_backend

    pipe = load_pipeline("tiny", device="cuda", dtype="float32")
    prompts = ["a painting of a fox", "the great wave, print", "portrait of a man in a hat"]
    config = LocalizeConfig(timesteps=3, sparsity=0.05, progress=False)
    with use_backend("reference"):
        _, want_stats = localize(pipe, prompts, config)
    with use_backend(backend):
        got, got_stats = localize(pipe, prompts, config)
    for name in want_stats.layers:
        torch.testing.assert_close(got_stats.mem[name], want_stats.mem[name], rtol=1e-4, atol=1e-6)
    with use_backend("reference"):
        want = compute_mask(pipe, got_stats, config.sparsity)
    for name in want.layers:
        assert torch.equal(got.layers[name].cpu(), want.layers[name].cpu()), name


@needs_cuda
@pytest.mark.parametrize("backend", backends("geglu_accumulate", only=("triton", "cuda")))
def test_subsets_on_gpu_match_separate_runs(backend):
    """Batches spanning subsets route prompt ranges through the fused GEGLU and the statistic op."""
    from memcore.localization import localize, localize_subsets
    from memcore.models import load_pipeline
    from memcore.ops import use_backend

    pipe = load_pipeline("tiny", device="cuda", dtype="float32")
    subsets = {"a": ["a fox", "the wave", "a man"], "b": ["the wave", "a cat", "a dog"]}
    config = LocalizeConfig(timesteps=2, sparsity=0.05, batch_size=4, progress=False)
    with use_backend(backend):
        together = localize_subsets(pipe, subsets, config)
        for name, prompts in subsets.items():
            _, stats = localize(pipe, prompts, config)
            for layer in stats.layers:
                torch.testing.assert_close(together[name][1].mem[layer], stats.mem[layer], rtol=1e-4, atol=1e-6)
