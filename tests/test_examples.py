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
