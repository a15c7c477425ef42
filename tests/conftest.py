import os

import pytest
import torch

# Tests never touch the network, and transformers' import-time notices are noise here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU the Triton kernels are tested in the interpreter. Triton reads this when it is first
# imported (diffusers imports it during collection), so it is set here, before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Under ``--benchmark-only``, a test that takes no ``benchmark`` is deselected (one count in the
    summary line) rather than skipped (one ``SKIPPED`` line each under ``-ra``, hundreds of them
    around the benchmark tables)."""
    if not config.getoption("benchmark_only", default=False):
        return
    chosen = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if len(chosen) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
        items[:] = chosen


@pytest.fixture
def tiny_pipe():
    from memcore.models import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


@pytest.fixture
def prompts():
    return ["a painting of a fox", "the great wave, print", "portrait of a man in a hat"]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the mistake under test must be refused first."""
    import memcore.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments, inputs and outputs were checked")

    monkeypatch.setattr(memcore.models, "load_pipeline", refuse)
