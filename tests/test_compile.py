"""The capture under torch.compile (``memcore localize --compile``): the denoiser, its capture hooks
and the fused ops trace as one graph with no break, and localize gives the same statistics and
masks, bit for bit, as eager."""

from __future__ import annotations

import functools

import pytest
import torch

from memcore.capture import CaptureState, apply_capture
from memcore.config import LocalizeConfig
from memcore.targets import find_targets

PROMPTS = ["a painting of a fox", "the great wave, print", "portrait of a man in a hat"]


def _denoiser_inputs(pipe, batch: int):
    net = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, net.config.in_channels, 16, 16, generator=g)
    text = torch.randn(batch, 77, net.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(500), text


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_capture_traces_as_one_graph(tiny_pipe, fused):
    """torch._dynamo.explain on the hooked denoiser: one graph, no break, the capture ops inside it."""
    net = tiny_pipe.unet
    targets = find_targets(tiny_pipe, "ffn")
    accumulators = {t.name: torch.zeros(2, t.linear.in_features) for t in targets}
    state = CaptureState(num_calls=2, guided=True)
    sample, timestep, text = _denoiser_inputs(tiny_pipe, 2)
    with torch.no_grad(), apply_capture(net, targets, state, fused=fused):
        state.start_run(accumulators)
        state.begin_call()  # what the call counter does, outside the graph
        # the denoiser's own forward, as compiled() compiles it: the counter hook wraps it from outside
        explained = torch._dynamo.explain(type(net).forward)(net, sample, timestep, text)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function"}
    wanted = "memcore.geglu_accumulate" if fused else "memcore.sqnorm_accumulate"
    assert any(wanted in op for op in ops), sorted(ops)


@pytest.mark.slow
def test_compiled_localize_matches_eager(tiny_pipe, monkeypatch):
    """A batch of prompts and the empty prompt (two graphs): statistics and masks are
    identical with and without compile, and the pipeline is left uncompiled. Dynamo and
    AOTAutograd's functionalization of the accumulating ops are what memcore relies on; inductor's
    code generation (minutes of C++ compiling on two CPU cores) is torch's, so the test compiles
    with the ``aot_eager`` backend."""
    from memcore.localization import localize

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    settings = dict(timesteps=2, steps=3, batch_size=2, progress=False)
    eager_mask, eager_stats = localize(tiny_pipe, PROMPTS[:2], LocalizeConfig(**settings))
    mask, stats = localize(tiny_pipe, PROMPTS[:2], LocalizeConfig(compile=True, **settings))
    assert "forward" not in vars(tiny_pipe.unet)
    for layer in eager_stats.layers:
        assert torch.equal(stats.mem[layer], eager_stats.mem[layer]), layer
        assert torch.equal(stats.null[layer], eager_stats.null[layer]), layer
        assert torch.equal(mask.layers[layer], eager_mask.layers[layer]), layer
