"""Masks on the tiny model against docs/method.md section 3, the mask file, and pruning in Python."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_mask_equal, mask_oracle

from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.localization import localize
from memcore.mask import Mask, compute_mask, top_k
from memcore.pruning import prune
from memcore.targets import find_targets


@pytest.fixture
def localized(tiny_pipe, prompts):
    config = LocalizeConfig(timesteps=3, sparsity=0.05, per_step=True, height=64, width=64, progress=False)
    mask, stats = localize(tiny_pipe, prompts, config)
    return mask, stats


def test_mask_on_tiny_equals_spec(tiny_pipe, localized):
    mask, stats = localized
    for target in find_targets(tiny_pipe.unet):
        norms, null = stats.norms(target.name, 3)
        k = math.floor(0.05 * target.linear.in_features)
        weight = target.linear.weight.detach()
        assert_mask_equal(mask.layers[target.name], mask_oracle(weight, norms, null, k), weight.shape[1])
        for t in range(3):
            want_t = mask_oracle(weight, norms[t : t + 1], null[t : t + 1], k)
            assert_mask_equal(mask.per_step[target.name][t], want_t, weight.shape[1])
    assert 0 < mask.density() < 0.05


def test_mask_file_round_trip(tmp_path, localized):
    import os
    import stat

    mask, stats = localized
    mask.save(tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    loaded = Mask.load(tmp_path / "m.safetensors")
    assert loaded.metadata == mask.metadata
    for name in mask.layers:
        assert torch.equal(loaded.layers[name], mask.layers[name])
        assert torch.equal(loaded.per_step[name], mask.per_step[name])
        assert torch.equal(loaded.unpack(name), mask.unpack(name))
    meta = loaded.metadata
    assert meta["timestep_values"] == [981, 961, 961] and meta["num_prompts"] == 3 and meta["rows"] == "both"
    assert len(meta["weights_sha256"]) == 64 and len(meta["prompts_sha256"]) == 64
    assert set(meta["density"]) == set(meta["layers"])


def test_mask_file_is_numpy_packbits(tmp_path, localized):
    from safetensors.numpy import load_file

    mask, _ = localized
    mask.save(tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    for name in mask.layers:
        dense = mask.unpack(name).numpy()
        np.testing.assert_array_equal(raw[name], np.packbits(dense, axis=1, bitorder="little"))


def test_stats_round_trip_and_recompute(tmp_path, tiny_pipe, localized):
    from memcore.stats import Statistics

    mask, stats = localized
    stats.save(tmp_path / "s.safetensors")
    loaded = Statistics.load(tmp_path / "s.safetensors")
    assert loaded.metadata == stats.metadata
    again = compute_mask(tiny_pipe, loaded, sparsity=0.05, timesteps=3)
    assert all(torch.equal(again.layers[n], mask.layers[n]) for n in mask.layers)
    fewer = compute_mask(tiny_pipe, loaded, sparsity=0.05, timesteps=1)
    for name in mask.layers:  # tau = 1 is the first per-step mask
        assert torch.equal(fewer.layers[name], mask.per_step[name][0])
    with pytest.raises(MemcoreError, match="timesteps"):
        compute_mask(tiny_pipe, loaded, sparsity=0.05, timesteps=4)


def test_prune_in_place(tiny_pipe, localized):
    mask, _ = localized
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    zeroed = prune(tiny_pipe, mask)
    assert zeroed == sum(mask.count(n) for n in mask.layers) > 0
    for name, param in tiny_pipe.unet.named_parameters():
        layer = name.removesuffix(".weight")
        if layer in mask.layers:
            selected = mask.unpack(layer)
            assert (param[selected] == 0).all() and torch.equal(param[~selected], before[name][~selected])
        else:
            assert torch.equal(param, before[name])
    with pytest.raises(MemcoreError, match="other weights"):
        prune(tiny_pipe, mask)  # the weights changed: the hash no longer matches


@pytest.mark.parametrize("s, n, k", [(0.01, 1280, 12), (0.01, 2560, 25), (0.01, 5120, 51), (0.29, 100, 29), (1, 7, 7), (0.5, 1, 0)])
def test_top_k(s, n, k):
    assert top_k(s, n) == k


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_localize_gives_the_same_mask_with_every_backend(tiny_pipe, prompts, backend):
    """Statistics and mask with every op forced onto one backend, GEGLU unfused (the fused GEGLU,
    which rounds the model's activations differently, is compared with the unfused one in
    test_capture.py)."""
    from memcore.ops import use_backend
    from memcore.ops._backend import triton_usable
    from memcore.ops._ext import extension

    if backend == "cpu" and extension() is None:
        pytest.skip("memcore._C is not built")
    if backend == "triton" and not triton_usable(torch.device("cpu")):
        pytest.skip("triton is not installed or TRITON_INTERPRET is not set")
    config = LocalizeConfig(timesteps=2, sparsity=0.05, height=64, width=64, progress=False, fuse_geglu=False)
    with use_backend("reference"):
        want, _ = localize(tiny_pipe, prompts, config)
    with use_backend(backend):
        got, _ = localize(tiny_pipe, prompts, config)
    for name in want.layers:
        assert torch.equal(got.layers[name], want.layers[name]), name
