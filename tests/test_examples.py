"""The example scripts run, on small settings, and report what they measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subset_experiment_on_tiny(tmp_path):
    subsets = []
    for i, text in enumerate(["a painting of a fox\nthe great wave", "the great wave\na red car", "a man\na cat"]):
        subsets.append(tmp_path / f"set{i}.txt")
        subsets[-1].write_text(text)
    control = tmp_path / "control.txt"
    control.write_text("a bowl of fruit\na city street\na dog on a beach\na plate of food\n")
    argv = [sys.executable, str(ROOT / "examples" / "subset_experiment.py"), "--subsets", *map(str, subsets),
            "--control", str(control), "--out", str(tmp_path / "run"), "--timesteps", "2", "--steps", "3",
            "--model", "not-a-cached/model"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped not-a-cached/model" in done.stdout
    report = json.loads(done.stdout[done.stdout.index("[") :])
    (tiny,) = report
    assert tiny["subsets"] == 3 and tiny["control_subsets"] == 2
    groups = tiny["iou_by_group"]
    assert {g: groups[g]["pairs"] for g in groups} == {"memorized": 3, "control": 1, "memorized_vs_control": 6}
    out = Path(tiny["out"])
    assert (out / "analysis" / "iou_heatmap.png").stat().st_size > 1000
    assert len(list((out / "masks").glob("*.safetensors"))) == 5
    assert (out / "pictures" / "grid.png").is_file()


def test_subset_experiment_defaults_are_built_in_sets():
    import importlib.util

    import memcore

    spec = importlib.util.spec_from_file_location("subset_experiment", ROOT / "examples" / "subset_experiment.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    subsets = memcore.load_subsets(example.DEFAULT_SUBSETS)
    assert list(subsets) == [f"memorize_{i}" for i in range(10)]
    controls = example.control_subsets(subsets, example.DEFAULT_CONTROL)
    assert len(controls) == 10 and all(len(p) == 10 for p in controls.values())
    assert not {p for ps in controls.values() for p in ps} & {p for ps in subsets.values() for p in ps}


def _example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wanda_example_prunes_every_linear_of_a_llama_in_order():
    import torch

    from memcore.ops import prune_mask

    wanda = _example("wanda_prune")
    model, tokens = wanda.tiny_llama()
    first = wanda.decoder_layers(model)[0].self_attn.q_proj
    # the first layer sees the unpruned model's inputs: its mask is prune_mask of those inputs' squares
    seen = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    expected = prune_mask(first.weight, (seen[0].double() ** 2).sum(0).float(), 0.5, squared=True)
    fractions = wanda.wanda(model, tokens, 0.5)
    assert len(fractions) == 14 and set(fractions.values()) == {0.5}
    assert torch.equal(first.weight == 0, expected)
    for layer in wanda.decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                assert ((module.weight == 0).sum(1) == module.in_features // 2).all()

    model, tokens = wanda.tiny_llama()
    wanda.wanda(model, tokens, n=2, m=4)
    mlp = wanda.decoder_layers(model)[1].mlp.down_proj
    assert ((mlp.weight == 0).reshape(mlp.out_features, -1, 4).sum(-1) == 2).all()


def test_wanda_example_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "wanda_prune.py"), "--nm", "2:4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pruned 14 Linear layers, 0.500-0.500 of each (2:4)" in done.stdout


def test_tiny_memorizer_example_writes_the_table(tmp_path):
    out = tmp_path / "experiment"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_memorizer.py"), "--out", str(out),
                           "--families", "attn2.to_k", "--sparsities", "0.1", "--samples", "3", "--consistency", "5"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["copies.png", "report.json", "table.md"]
    report = json.loads((out / "report.json").read_text())
    assert [(r["family"], r["mask"]) for r in report["after"]] == [("attn2.to_k", m) for m in ("private", "control", "random")]
    assert "detection AUC" in done.stdout and (out / "table.md").read_text() in done.stdout
