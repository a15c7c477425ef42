"""The command line end to end on the tiny model, and its answers to bad input."""

import json
import os
import re

import pytest
import torch

from memcore.cli import main
from memcore.mask import Mask
from memcore.targets import find_targets

FAST = ["--timesteps", "2", "--height", "64", "--width", "64", "--sparsity", "0.05"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a painting of a fox\n\nthe great wave, print\nportrait of a man in a hat")
    return path


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_localize_then_prune(tmp_path, capsys, prompt_file):
    from diffusers import StableDiffusionPipeline

    from memcore.models import load_pipeline

    mask_path, stats_path = tmp_path / "mask.safetensors", tmp_path / "stats.safetensors"
    code, out, err = run(
        capsys, "localize", "--model", "tiny", "--prompts", prompt_file, "--out", mask_path,
        "--stats-out", stats_path, "--json", *FAST,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_prompts"] == 3 and summary["layers"] == 16 and summary["masked_weights"] > 0
    mask = Mask.load(mask_path)
    assert mask.metadata["model_id"] == "memcore/tiny" and mask.metadata["timesteps"] == 2

    # the mask command recomputes the same mask from the statistics without running the model
    again = tmp_path / "again.safetensors"
    code, _, err = run(capsys, "mask", "--model", "tiny", "--stats", stats_path, "--sparsity", "0.05", "--out", again)
    assert code == 0, err
    recomputed = Mask.load(again)
    assert all(torch.equal(mask.layers[n], recomputed.layers[n]) for n in mask.layers)

    pruned_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", "tiny", "--mask", mask_path, "--out", pruned_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["zeroed_weights"] == summary["masked_weights"]

    original = load_pipeline("tiny")
    pruned = StableDiffusionPipeline.from_pretrained(pruned_dir, local_files_only=True)
    targets = {t.name for t in find_targets(pruned.unet)}
    before = dict(original.unet.named_parameters())
    for name, param in pruned.unet.named_parameters():
        layer = name.removesuffix(".weight")
        if layer in targets and name.endswith(".weight"):
            selected = mask.unpack(layer)
            assert (param[selected] == 0).all(), name
            assert torch.equal(param[~selected], before[name][~selected]), name
        else:
            assert torch.equal(param, before[name]), name
    for part in ("text_encoder", "vae"):
        for (name, a), b in zip(getattr(original, part).named_parameters(), getattr(pruned, part).parameters()):
            assert torch.equal(a, b), f"{part}.{name}"


def test_env_reports_backends(capsys):
    code, out, _ = run(capsys, "env", "--json")
    info = json.loads(out)
    assert code == 0 and info["backends"]["reference"] == "available"
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}


def assert_user_error(capsys, tmp_path, argv, expect):
    before = set(os.listdir(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    # loading progress bars may precede it; the error itself is one line, the last
    errors = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert errors[0].startswith("memcore ") and expect in errors[0], errors[0]
    assert set(os.listdir(tmp_path)) == before, "an output was left behind"


@pytest.mark.parametrize(
    "content, name, expect",
    [
        ("", "empty.txt", "no prompts"),
        ("\n   \n\n", "blank.txt", "no prompts"),
        ("a prompt\n", "prompts.yaml", "extension"),
        ('{"caption": "ok"}\n{"caption": \n', "bad.jsonl", ":2:"),
    ],
)
def test_bad_prompt_files(tmp_path, capsys, content, name, expect):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "mask.safetensors"
    assert_user_error(capsys, tmp_path, ["localize", "--model", "tiny", "--prompts", path, "--out", out], expect)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--sparsity", "0"], "--sparsity"),
        (["--sparsity", "1.5"], "--sparsity"),
        (["--timesteps", "0"], "--timesteps"),
        (["--timesteps", "52"], "51 denoiser calls"),
        (["--model", "/nonexistent/model"], "no such folder"),
        (["--model", "someone/not-cached-model"], "not in the local cache"),
        (["--out", "/nonexistent/folder/mask.safetensors"], "does not exist"),
        (["--target", "(unclosed"], "--target"),
        (["--target", r"nothing\.matches"], "no matching Linear"),
    ],
)
def test_bad_localize_arguments(tmp_path, capsys, prompt_file, args, expect):
    work = tmp_path / "work"
    work.mkdir()
    base = {"--model": "tiny", "--prompts": str(prompt_file), "--out": str(work / "mask.safetensors")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["localize", *[x for pair in base.items() for x in pair]]
    assert_user_error(capsys, work, argv, expect)


def test_missing_model_folder_without_model_index(tmp_path, capsys, prompt_file):
    empty = tmp_path / "not_a_pipeline"
    empty.mkdir()
    argv = ["localize", "--model", empty, "--prompts", prompt_file, "--out", tmp_path / "m.safetensors"]
    assert_user_error(capsys, tmp_path, argv, "model_index.json")


def test_mask_for_other_weights_or_layers_is_refused(tmp_path, capsys, prompt_file):
    from memcore.models import load_pipeline

    mask_path = tmp_path / "mask.safetensors"
    assert run(capsys, "localize", "--model", "tiny", "--prompts", prompt_file, "--out", mask_path, *FAST)[0] == 0

    other = load_pipeline("tiny")
    with torch.no_grad():
        other.unet.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2].weight[0, 0] += 1
    other.save_pretrained(tmp_path / "other")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["prune", "--model", tmp_path / "other", "--mask", mask_path, "--out", work / "pruned"]
    assert_user_error(capsys, work, argv, "other weights")
    # --force applies it to the same shapes
    assert run(capsys, *argv, "--force")[0] == 0

    mask = Mask.load(mask_path)
    for key in ("shapes", "k", "density"):  # a consistent file whose layers are not the model's
        mask.metadata[key] = {name.replace("down_blocks", "downs"): v for name, v in mask.metadata[key].items()}
    mask.metadata["layers"] = list(mask.metadata["shapes"])
    mask.layers = {name.replace("down_blocks", "downs"): t for name, t in mask.layers.items()}
    mask.save(tmp_path / "renamed.safetensors")
    argv = ["prune", "--model", "tiny", "--mask", tmp_path / "renamed.safetensors", "--out", work / "p2", "--force"]
    assert_user_error(capsys, work, argv, "target layers differ")


def test_not_a_mask_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not safetensors at all")
    work = tmp_path / "work"
    work.mkdir()
    assert_user_error(capsys, work, ["prune", "--model", "tiny", "--mask", bogus, "--out", work / "p"], "safetensors")


def test_localize_compile_runs_the_capture_compiled(tmp_path, capsys, prompt_file, monkeypatch):
    """--compile runs the capture inside memcore.stats.compiled (recorded here, not compiled:
    tests/test_compile.py compiles and compares with eager)."""
    import contextlib

    import memcore.stats

    seen = []

    @contextlib.contextmanager
    def recording(denoiser, enabled=True):
        seen.append(enabled)
        yield

    monkeypatch.setattr(memcore.stats, "compiled", recording)
    out = tmp_path / "mask.safetensors"
    code, _, err = run(capsys, "localize", "--model", "tiny", "--prompts", prompt_file, "--out", out, "--compile", *FAST)
    assert code == 0, err
    assert seen == [True] and out.is_file()
    code, _, err = run(capsys, "localize", "--model", "tiny", "--prompts", prompt_file, "--out", out, *FAST)
    assert code == 0, err
    assert seen == [True, False]


def test_localize_subsets_writes_one_mask_per_subset(tmp_path, capsys):
    subsets = tmp_path / "subsets"
    subsets.mkdir()
    (subsets / "memorize_10.txt").write_text("a painting of a fox\nthe great wave, print")
    (subsets / "memorize_2.txt").write_text("the great wave, print\nportrait of a man in a hat")
    (subsets / "notes.md").write_text("not a prompt file")
    out, stats = tmp_path / "masks", tmp_path / "stats"
    argv = ["localize", "--model", "tiny", "--subsets", subsets, "--out", out, "--stats-out", stats, "--per-step", "--json"]
    code, stdout, err = run(capsys, *argv, *FAST)
    assert code == 0, err
    summary = json.loads(stdout)
    assert list(summary["subsets"]) == ["memorize_2", "memorize_10"]  # natural order
    assert sorted(p.name for p in out.iterdir()) == ["memorize_10.safetensors", "memorize_2.safetensors"]
    assert sorted(p.name for p in stats.iterdir()) == ["memorize_10.safetensors", "memorize_2.safetensors"]
    mask = Mask.load(out / "memorize_2.safetensors")
    assert mask.metadata["subset"] == "memorize_2" and mask.metadata["num_prompts"] == 2 and mask.per_step

    # the folder exists now: refused before any work, and nothing is touched
    code, _, err = run(capsys, *argv, *FAST)
    assert code == 2 and "already exists" in err


def test_localize_subsets_refuses_duplicate_names(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "set.txt").write_text("a fox")
    argv = ["localize", "--model", "tiny", "--subsets", tmp_path / "a" / "set.txt", tmp_path / "b" / "set.txt",
            "--out", tmp_path / "masks"]
    code, _, err = run(capsys, *argv, *FAST)
    assert code == 2 and "subset name 'set'" in err
    assert not (tmp_path / "masks").exists()


def test_localize_other_target_family(tmp_path, capsys, prompt_file):
    out = tmp_path / "mask.safetensors"
    code, _, err = run(capsys, "localize", "--model", "tiny", "--prompts", prompt_file, "--target", "attn2.to_v", "--out", out, *FAST)
    assert code == 0, err
    assert Mask.load(out).metadata["target"] == "attn2.to_v"
    pruned = tmp_path / "pruned"
    code, out_text, err = run(capsys, "prune", "--model", "tiny", "--mask", out, "--out", pruned)
    assert code == 0, err


def test_help_lists_every_model_name(capsys):
    from memcore.models import ALIASES, TINY_MODELS

    with pytest.raises(SystemExit):
        main(["localize", "--help"])
    # argparse wraps lines after hyphens ("tiny-" / "sd3"): undo that before looking for the names
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))
    assert all(name in text for name in (*ALIASES, *TINY_MODELS))


def test_analyze_and_generate(tmp_path, capsys, prompt_file):
    subsets = []
    for i, text in enumerate(["a painting of a fox\nthe great wave, print", "the great wave, print\na red car", "a fox\na man"]):
        subsets.append(tmp_path / f"set{i}.txt")
        subsets[-1].write_text(text)
    masks = tmp_path / "masks"
    code, _, err = run(capsys, "localize", "--model", "tiny", "--subsets", *subsets, "--out", masks, "--per-step", *FAST)
    assert code == 0, err
    files = sorted(masks.iterdir())

    code, out, err = run(capsys, "analyze", masks, "--out", tmp_path / "analysis", "--json")  # a folder of masks
    assert code == 0, err
    summary = json.loads(out)
    assert summary["masks"] == ["set0", "set1", "set2"] and 0 < summary["iou"] <= 1
    assert (tmp_path / "analysis" / "iou_heatmap.png").stat().st_size > 1000

    code, out, err = run(capsys, "analyze", *files[:2], "--control", files[2], "--out", tmp_path / "groups", "--json")
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert {g: groups[g]["pairs"] for g in groups} == {"memorized": 1, "memorized_vs_control": 2}
    assert (tmp_path / "groups" / "groups.csv").is_file()

    # one mask: a pairwise statistic is refused, density alone is fine
    code, _, err = run(capsys, "analyze", files[0], "--out", tmp_path / "one")
    assert code == 2 and "at least two masks" in err
    code, _, err = run(capsys, "analyze", files[0], "--out", tmp_path / "one", "--density-only")
    assert code == 0, err
    code, _, err = run(capsys, "analyze", *files, "--names", "a,b", "--out", tmp_path / "named")
    assert code == 2 and "--names" in err

    out_dir = tmp_path / "pictures"
    argv = ["generate", "--model", "tiny", "--prompts", prompt_file, "--seeds", "0-1", "--mask", files[0], "--out", out_dir,
            "--steps", "2", "--height", "64", "--width", "64", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["images"] == 3 * 2 * 2 and summary["zeroed_weights"] > 0
    from PIL import Image

    from memcore.generate import grid_size

    assert Image.open(out_dir / "grid.png").size == grid_size(3, 2, 64, 64, pruned=True) == tuple(summary["grid_size"])
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, *[a if a != "0-1" else "1,x" for a in argv[:-1]], "--out", tmp_path / "other")
    assert code == 2 and "--seeds" in err


def test_iou_of_two_masks_without_per_step(tmp_path, capsys, prompt_file):
    paths = []
    for sparsity in ("0.05", "0.1"):
        paths.append(tmp_path / f"mask_{sparsity}.safetensors")
        argv = ["localize", "--model", "tiny", "--prompts", prompt_file, "--out", paths[-1], *FAST[:-2], "--sparsity", sparsity]
        code, _, err = run(capsys, *argv)
        assert code == 0, err
    code, out, err = run(capsys, "iou", *paths, "--json")
    assert code == 0, err
    summary = json.loads(out)
    # every weight of the s = 0.05 mask is in the s = 0.1 mask: IoU = |small| / |large|
    small, large = (Mask.load(p) for p in paths)
    assert summary["iou"] == pytest.approx(small.density() / large.density())
    assert 0 < summary["iou_chance"] < summary["iou"] and len(summary["layers"]) == 16
    code, _, err = run(capsys, "analyze", *paths, "--out", tmp_path / "analysis")
    assert code == 2 and "per-step" in err and "memcore iou" in err


# ---------------------------------------------------------------------------------------------
# The library's errors name parameters; the terminal shows the same errors in flags.


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Statistics (tau 2), their mask and three masks without per-step data, saved; the tiny pipeline."""
    from memcore.config import LocalizeConfig
    from memcore.mask import compute_mask
    from memcore.models import load_pipeline
    from memcore.stats import collect_stats

    folder = tmp_path_factory.mktemp("saved")
    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    config = LocalizeConfig(timesteps=2, height=64, width=64, progress=False)
    stats = collect_stats(pipe, ["a painting of a fox", "the great wave"], config)
    stats.save(folder / "stats.safetensors")
    for i, sparsity in enumerate((0.05, 0.1, 0.2)):
        compute_mask(pipe, stats, sparsity=sparsity).save(folder / f"mask{i}.safetensors")
    return folder


def error_line(capsys, tmp_path, argv) -> str:
    before = set(os.listdir(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err, (out, err)
    assert set(os.listdir(tmp_path)) == before, "an output was left behind"
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, line",
    [
        (["--sparsity", "2"], "--sparsity: must be in (0, 1], got 2.0"),
        (["--timesteps", "0"], "--timesteps: must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--height", "12"], "--height: must be a positive multiple of 8, got 12"),
        (["--target", ""], "--target: empty; choose one of ffn, attn2.to_k, attn2.to_v, text-mlp or a regular expression"),
        (["--out", "{tmp}"], "--out {tmp}: is a directory"),
        (["--stats-out", "/nonexistent/s.safetensors"], "--stats-out /nonexistent/s.safetensors: folder /nonexistent does not exist"),
    ],
)
def test_localize_refuses_bad_values_in_flags_before_loading(tmp_path, capsys, prompt_file, no_model, args, line):
    argv = ["localize", "--model", "tiny", "--prompts", prompt_file, "--out", tmp_path / "m.safetensors"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert error_line(capsys, tmp_path, argv) == "memcore localize: error: " + line.format(tmp=tmp_path)


def test_localize_subsets_refuses_one_folder_for_both(tmp_path, capsys, prompt_file, no_model):
    argv = ["localize", "--model", "tiny", "--subsets", prompt_file, "--out", tmp_path / "o", "--stats-out", tmp_path / "o"]
    assert error_line(capsys, tmp_path, argv) == "memcore localize: error: --stats-out: must be another folder than --out"


@pytest.mark.parametrize(
    "args, line",
    [
        (["--sparsity", "0"], "--sparsity: must be in (0, 1], got 0.0"),
        (["--timesteps", "0"], "--timesteps: must be at least 1, got 0"),
        (["--timesteps", "3"], "--timesteps: 3 is more than the 2 calls the statistics hold"),
    ],
)
def test_mask_refuses_bad_values_in_flags_before_loading(tmp_path, capsys, saved, no_model, args, line):
    argv = ["mask", "--model", "tiny", "--stats", saved / "stats.safetensors", "--out", tmp_path / "m.safetensors", *args]
    assert error_line(capsys, tmp_path, argv) == "memcore mask: error: " + line


@pytest.mark.parametrize(
    "args, line",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--width", "60"], "--width: must be a positive multiple of 8, got 60"),
        (["--seeds", "3-1"], "--seeds: range '3-1' runs backwards"),
        (["--mask", "{tmp}/none.safetensors"], "--mask {tmp}/none.safetensors: no such file"),
        (["--out", "{tmp}"], "--out {tmp}: already exists; choose a new folder"),
    ],
)
def test_generate_refuses_bad_values_in_flags_before_loading(tmp_path, capsys, prompt_file, no_model, args, line):
    argv = ["generate", "--model", "tiny", "--prompts", prompt_file, "--out", tmp_path / "g"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert error_line(capsys, tmp_path, argv) == "memcore generate: error: " + line.format(tmp=tmp_path)


@pytest.mark.parametrize("command", ["prune", "mask", "generate"])
def test_other_weights_advise_the_force_flag(tmp_path, capsys, prompt_file, saved, monkeypatch, command):
    import memcore.models

    other = memcore.models.load_pipeline("tiny", device="cpu", dtype="float32")
    with torch.no_grad():
        find_targets(other)[0].linear.weight[0, 0] += 1
    monkeypatch.setattr(memcore.models, "load_pipeline", lambda *args, **kwargs: other)
    argv = {
        "prune": ["--mask", saved / "mask0.safetensors"],
        "mask": ["--stats", saved / "stats.safetensors"],
        "generate": ["--mask", saved / "mask0.safetensors", "--prompts", prompt_file, "--steps", "2", "--height", "64", "--width", "64"],
    }[command]
    out = tmp_path / ("m.safetensors" if command == "mask" else "o")
    line = error_line(capsys, tmp_path, [command, "--model", "tiny", *argv, "--out", out])
    what = "the statistics file" if command == "mask" else "the mask"
    assert line == (
        f"memcore {command}: error: {what} was made from other weights (model 'memcore/tiny', dtype float32); "
        "use --force to apply it anyway"
    )


def test_analyze_errors_in_flags(tmp_path, capsys, saved):
    masks = [saved / f"mask{i}.safetensors" for i in range(3)]
    argv = ["analyze", *masks, "--names", "a,b", "--out", tmp_path / "a"]
    assert error_line(capsys, tmp_path, argv) == "memcore analyze: error: --names: 2 names for 3 masks"
    (tmp_path / "file").write_text("")
    argv = ["analyze", *masks, "--out", tmp_path / "file"]
    assert error_line(capsys, tmp_path, argv) == f"memcore analyze: error: --out {tmp_path / 'file'}: exists and is not a folder"
    argv = ["analyze", *masks, "--out", tmp_path / "a"]
    assert error_line(capsys, tmp_path, argv) == (
        f"memcore analyze: error: {masks[0]}: mask has no per-step data; recompute it with --per-step "
        "(memcore mask --per-step or memcore localize --per-step), or compare two masks with memcore iou"
    )


def test_model_and_device_errors_in_flags(tmp_path, capsys, prompt_file):
    argv = ["localize", "--prompts", prompt_file, "--out", tmp_path / "m.safetensors"]
    line = error_line(capsys, tmp_path, [*argv, "--model", "someone/not-cached-model"])
    assert line.startswith("memcore localize: error: --model someone/not-cached-model: someone/not-cached-model ")
    assert line.endswith(" pass --model PATH to a diffusers folder")
    line = error_line(capsys, tmp_path, [*argv, "--model", "tiny", "--device", "nonsense"])
    assert line == "memcore localize: error: --device nonsense: not a torch device (cpu, cuda, cuda:1, ...)"


def test_flag_words_come_from_the_parser():
    from test_errors import CASES

    from memcore.cli import FlagWords, build_parser
    from memcore.errors import Call, Param, Pass

    words = FlagWords(build_parser(), "localize")
    assert words(Param("out_dir")) == "--out" and words(Param("stats_out")) == "--stats-out"
    assert words(Param("token_norm", False)) == "--no-token-norm" and words(Param("token_norm")) == "--no-token-norm"
    assert words(Param("model", "PATH")) == "--model PATH"
    assert words(Pass("force")) == "use --force"  # localize has no --force: found in another command
    assert words(Call("compute_mask", (Param("per_step", True),))) == "memcore mask --per-step"
    assert words(Call("mask_iou")) == "memcore iou"
    # no flag says these: they keep the library's words
    assert words(Param("masks")) == "masks" and words(Param("per_step", False)) == "per_step=False"
    assert words(Call("density")) == "density()"
    # every parameter the library's errors name, but the positional masks, is a flag of some command
    named = {param for _, param, _ in CASES} - {None, "masks"}
    assert {name: words(Param(name)) for name in named} == {
        name: "--" + {"out_dir": "out"}.get(name, name).replace("_", "-") for name in named
    }
