"""Target families, prompt subsets and every tiny model family, end to end on the CPU."""

import logging

import pytest
import torch

from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.localization import localize, localize_subsets
from memcore.models import load_pipeline
from memcore.pruning import prune
from memcore.stats import collect_stats
from memcore.targets import FAMILIES, find_targets

SMALL = dict(timesteps=2, height=64, width=64, sparsity=0.05, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny models are faster on one thread than on two busy ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_family_names_and_shapes(tiny_pipe):
    values = find_targets(tiny_pipe, "attn2.to_v")
    assert [t.name for t in values][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    assert len(values) == 16 and all(t.shape[1] == 32 for t in values)  # in = the text encoder's width
    assert [t.name.replace("to_v", "to_k") for t in values] == [t.name for t in find_targets(tiny_pipe, "attn2.to_k")]
    text = find_targets(tiny_pipe, "text-mlp")
    assert all(t.name.startswith("text_encoder.") and t.name.endswith("layers.0.mlp.fc2") == (i == 0) for i, t in enumerate(text))
    assert len(text) == 2 and all(t.stage == "text" for t in text)
    chosen = find_targets(tiny_pipe, r"mid_block\..*\.attn1\.to_(q|k)")
    assert [t.name.rsplit(".", 1)[1] for t in chosen] == ["to_q", "to_k"]


@pytest.mark.parametrize(
    "target, message",
    [("(", "not a family"), (r"nothing\.here", "no matching Linear"), ("", "empty")],
)
def test_bad_targets(tiny_pipe, target, message):
    with pytest.raises(MemcoreError, match=message):
        find_targets(tiny_pipe, target)


def test_text_mlp_needs_the_pipeline(tiny_pipe):
    with pytest.raises(MemcoreError, match="whole pipeline"):
        find_targets(tiny_pipe.unet, "text-mlp")


def stored_text_inputs(pipe, prompts, target):
    """Every input of the text-encoder targets during one generation, by layer, in call order."""
    kept = {}
    handles = []
    for t in find_targets(pipe, "text-mlp"):
        def keep(module, args, name=t.name):
            kept.setdefault(name, []).append(args[0].detach().double())
        handles.append(t.linear.register_forward_pre_hook(keep))
    try:
        collect_stats(pipe, prompts, LocalizeConfig(**SMALL, batch_size=len(prompts), target=target))
    finally:
        for handle in handles:
            handle.remove()
    return kept


@pytest.mark.parametrize("rows", ["both", "cond"])
def test_text_mlp_statistics(tiny_pipe, prompts, rows):
    stats = collect_stats(tiny_pipe, prompts, LocalizeConfig(**SMALL, rows=rows, target="text-mlp"))
    # the text encoder runs on the prompts, then on the negative prompt "" of each: two encodings
    kept = stored_text_inputs(tiny_pipe, prompts, "text-mlp")
    for layer in stats.layers:
        prompts_in, negatives_in = kept[layer][:2]
        used = [prompts_in] if rows == "cond" else [prompts_in, negatives_in]
        x = torch.cat([u.reshape(-1, u.shape[-1]) for u in used])
        expected = ((x / x.norm(dim=1, keepdim=True)) ** 2).sum(0).float()
        torch.testing.assert_close(stats.mem[layer][0], expected, rtol=2e-6, atol=0, msg=layer)
        # the text encoders run once per generation: the same statistic at every call index
        assert torch.equal(stats.mem[layer][1], stats.mem[layer][0])
        assert torch.equal(stats.null[layer][1], stats.null[layer][0])


@pytest.mark.parametrize("target", ["attn2.to_v", "text-mlp", r"up_blocks\.1\..*\.attn1\.to_out\.0"])
def test_localize_and_prune_other_families(tiny_pipe, prompts, target):
    mask, stats = localize(tiny_pipe, prompts, LocalizeConfig(**SMALL, target=target))
    assert mask.metadata["target"] == stats.metadata["target"] == target
    assert mask.density() > 0
    targets = find_targets(tiny_pipe, target)
    before = {t.name: t.linear.weight.clone() for t in targets}
    zeroed = prune(tiny_pipe, mask)
    assert zeroed == sum(mask.count(n) for n in mask.layers)
    for t in targets:
        selected = mask.unpack(t.name)
        assert (t.linear.weight[selected] == 0).all()
        assert torch.equal(t.linear.weight[~selected], before[t.name][~selected])


def test_subsets_equal_separate_runs(tiny_pipe):
    subsets = {"a": ["a fox", "the wave", "a man"], "b": ["the wave", "a cat", "a fox", "a dog", "the wave"]}
    config = LocalizeConfig(**SMALL, batch_size=3)
    together = localize_subsets(tiny_pipe, subsets, config)
    assert list(together) == ["a", "b"]
    for name, prompts in subsets.items():
        mask, stats = localize(tiny_pipe, prompts, config)
        mask_t, stats_t = together[name]
        assert stats_t.metadata["subset"] == mask_t.metadata["subset"] == name
        assert stats_t.metadata["num_prompts"] == len(prompts)
        for layer in stats.layers:
            # batches differ (they span subsets), so sums differ in rounding only
            torch.testing.assert_close(stats_t.mem[layer], stats.mem[layer], rtol=1e-5, atol=1e-6, msg=layer)
            torch.testing.assert_close(stats_t.null[layer], stats.null[layer], rtol=1e-6, atol=0, msg=layer)
        assert all(torch.equal(mask_t.layers[n], mask.layers[n]) for n in mask.layers)


def test_empty_subset_is_refused(tiny_pipe):
    with pytest.raises(MemcoreError, match="subset b"):
        localize_subsets(tiny_pipe, {"a": ["x"], "b": []}, LocalizeConfig(**SMALL))


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl", "tiny-pixart", "tiny-sd3"])
def test_every_family_localizes_and_prunes(name, prompts):
    pipe = load_pipeline(name)
    config = LocalizeConfig(timesteps=3, steps=6, sparsity=0.05, progress=False)
    mask, stats = localize(pipe, prompts, config)
    assert mask.metadata["model_id"] == f"memcore/{name}"
    assert mask.density() > 0
    assert all((acc[:3] > 0).any() for acc in stats.mem.values())
    # stopping after tau calls sees the first calls of a full generation
    full = collect_stats(pipe, prompts, LocalizeConfig(timesteps=len(stats.metadata["call_timesteps"]), steps=6, progress=False))
    for layer in stats.layers:
        torch.testing.assert_close(stats.mem[layer], full.mem[layer][:3], rtol=1e-5, atol=1e-6, msg=layer)
    assert prune(pipe, mask) == sum(mask.count(n) for n in mask.layers)


def test_pixart_calls_after_tau_are_skipped(prompts):
    pipe = load_pipeline("tiny-pixart")
    calls = []
    # the denoiser is called at every step; its blocks run only for the first tau calls
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        collect_stats(pipe, prompts, LocalizeConfig(timesteps=2, steps=6, progress=False))
    finally:
        handle.remove()
    assert len(calls) == 2 * 2  # tau calls for the prompts' batch, tau for the empty prompt


def test_all_families_listed():
    assert FAMILIES == ("ffn", "attn2.to_k", "attn2.to_v", "text-mlp")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_truncation_is_reported_once(tiny_pipe, caplog):
    from memcore.config import resolve_generation
    from memcore.driver import initial_latent, run_first_calls

    long_prompt = "a very long prompt " * 30  # far beyond 77 tokens
    config = LocalizeConfig(**SMALL, batch_size=1)
    # what reaches the handlers of the pipeline's own logger
    source, seen = logging.getLogger(type(tiny_pipe).__module__), Collect()
    source.addHandler(seen)
    try:
        generation = resolve_generation(tiny_pipe, config)
        with torch.no_grad():  # the pipeline alone warns once per batch
            run_first_calls(tiny_pipe, [long_prompt], initial_latent(tiny_pipe, generation), generation, 1)
        assert sum(m.startswith("The following part of your input was truncated") for m in seen.messages) == 1
        seen.messages.clear()
        with caplog.at_level("WARNING", logger="memcore"):
            collect_stats(tiny_pipe, [long_prompt, "short"], config)
    finally:
        source.removeHandler(seen)
    assert not any(m.startswith("The following part of your input was truncated") for m in seen.messages)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("were truncated, as the pipeline does (1 batch)" in m for m in messages) == 1


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl", "tiny-pixart", "tiny-sd3"])
@pytest.mark.parametrize("target", ["attn2.to_v", "text-mlp"])
def test_other_target_families_on_every_family(name, target):
    pipe = load_pipeline(name)
    config = LocalizeConfig(timesteps=2, steps=4, sparsity=0.05, progress=False, target=target)
    if name == "tiny-sd3" and target == "attn2.to_v":  # joint attention only
        with pytest.raises(MemcoreError, match="no matching Linear"):
            localize(pipe, ["a fox", "the wave"], config)
        return
    mask, stats = localize(pipe, ["a fox", "the wave"], config)
    assert mask.metadata["target"] == target and len(mask.layers) == len(find_targets(pipe, target))
    assert all((acc > 0).any() for acc in stats.mem.values())
    assert prune(pipe, mask) == sum(mask.count(n) for n in mask.layers)
