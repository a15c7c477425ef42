"""What careless or hostile input to --target and --model ends with: one line, exit code 2, and soon.

- regular expressions from users and files run under one time budget over the module names, and
  patterns that would unroll into huge programs are refused before they are compiled;
- every way a local model folder can be broken is one line naming the folder and the file or the
  component; pickled weights are refused;
- an uncached hub id with the hub unreachable is refused at once, without a download attempt.

Model folders are the tiny pipeline saved with ``save_pretrained``, then broken.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import pathlib
import re
import shutil
import socket
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memcore.models as models
import memcore.targets as targets
from cli_helpers import user_error
from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.localization import localize
from memcore.models import load_pipeline
from memcore.targets import check_family, compile_pattern, find_targets, matching_names

# Backtracks catastrophically on the regex engine too: each digit can be eaten by either branch.
CATASTROPHIC = r"(.|.)*\d\d"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
UNET_PICKLE = "unet/diffusion_pytorch_model.bin"
TEXT_PICKLE = "text_encoder/pytorch_model.bin"


@pytest.fixture
def short_budget(monkeypatch):
    monkeypatch.setattr(targets, "PATTERN_BUDGET_S", 0.3)


# ---------------------------------------------------------------------------------------------
# regular expressions


def test_catastrophic_pattern_is_stopped_by_the_budget(tiny_pipe, short_budget):
    linears = [name for name, m in tiny_pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    started = time.monotonic()
    with pytest.raises(MemcoreError) as caught:
        find_targets(tiny_pipe, CATASTROPHIC)
    assert time.monotonic() - started < 30  # not the years the pattern would take
    error = caught.value
    assert error.param == "target"
    assert str(error) == (
        f"target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over {len(linears)} "
        "module names (catastrophic backtracking?); simplify it"
    )


def test_the_budget_is_for_the_whole_search(monkeypatch):
    # every match is instant, but the clock says a second passes per name: a budget per name would
    # never run out, one for the whole search runs out at the third name
    clock = iter(range(1000))
    monkeypatch.setattr(targets.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(targets, "PATTERN_BUDGET_S", 2.5)
    with pytest.raises(MemcoreError, match="did not finish within 2.5 s over 10 module names"):
        matching_names(r"name\d", [f"name{i}" for i in range(10)])
    clock = iter(range(1000))  # two names take two of the 2.5 s
    assert matching_names(r"name[01]", ["name1", "other"]) == ["name1"]


def test_a_pattern_that_hangs_python_re_is_answered_at_once(tiny_pipe):
    # (.*)*x backtracks forever on Python's re over these names; the regex engine sees no "x" at the end
    with pytest.raises(MemcoreError, match="no matching Linear layers"):
        find_targets(tiny_pipe, "(.*)*x")


ORDINARY = [
    r"mid_block\..*\.attn1\.to_(q|k)",
    r".*ff\.net\.2",
    r"(down|up)_blocks\.[0-9]+\..*to_[kv]",
    r".*attn2\.to_(?:k|v)",
    r"(?i).*TO_OUT\.0",
    r".*\.proj_(in|out)",
    r"[a-z_]+\.\d\..*",
    r".*(?<!attn1)\.to_q",
    r"(?P<block>down|up)_blocks\..*(?P=block)?.*",
    r".*\bff\b.*",
    r"^down.*$",
    r".{10,40}",
    r"[^.]+\.[^.]+",
    r"(?x) mid_block \. .* \. to_v   # verbose",
    r".*?net\.(?=2)2",
    r"(up|down)_blocks\.1\.(attentions|resnets)\.\d+(\..+)?",
    r"time_embedding\.linear_[12]|conv_in",
]


@pytest.mark.parametrize("pattern", ORDINARY)
def test_patterns_match_as_python_re_does(tiny_pipe, pattern):
    names = [name for name, _ in tiny_pipe.unet.named_modules()]
    expected = [name for name in names if re.fullmatch(pattern, name)]
    assert matching_names(pattern, names) == expected
    assert expected or pattern.startswith(r"time_embedding"), "the comparison should select something"


@pytest.mark.parametrize("pattern", ["(", "a)", r"\p{L}", "(?i)a(?i)", "a{2,1}", "[z-a]", "(?P<x>a)(?P<x>b)"])
def test_syntax_is_that_of_python_re(pattern):
    with pytest.raises(re.error):
        re.compile(pattern)
    with pytest.raises(MemcoreError, match=r"not a family \(ffn, .*\) nor a valid regular expression"):
        check_family(pattern)


@pytest.mark.parametrize("pattern", ["(x{3000}){3000}", "((a{100}){100}){100}", "(?:x{1000}|y){1000}"])
def test_patterns_that_unroll_into_huge_programs_are_refused_before_compiling(monkeypatch, pattern):
    # the regex engine would take seconds and gigabytes to compile these
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled")

    monkeypatch.setattr(targets.regex, "compile", no_compile)
    with pytest.raises(MemcoreError, match="too large once its repetitions are unrolled"):
        check_family(pattern)


def test_modest_repetitions_compile():
    assert compile_pattern(r"(x{100}){100}|a{1,65535}|(b{0,3000}){0,3000}|.*").fullmatch("a")


def test_deeply_nested_groups_are_one_error():
    for depth in (400, 5000):
        with pytest.raises(MemcoreError, match="nests its groups too deep"):
            check_family("(" * depth + "a" + ")" * depth)


def test_every_user_pattern_goes_through_matching_names(tiny_pipe, monkeypatch):
    seen = []
    original = targets.matching_names

    def spy(target, names):
        seen.append(target)
        return original(target, names)

    monkeypatch.setattr(targets, "matching_names", spy)
    find_targets(tiny_pipe, r".*attn2\.to_v")
    for family in targets.FAMILIES:
        find_targets(tiny_pipe, family)
    assert seen == [r".*attn2\.to_v"]


def test_cli_target_catastrophic(tmp_path, capsys, short_budget):
    message = user_error(
        capsys, tmp_path, "localize", "--model", "tiny", "--prompts", "memorize_0",
        "--target", CATASTROPHIC, "--out", tmp_path / "mask.safetensors",
    )
    assert message.startswith(f"--target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over ")
    assert message.endswith("module names (catastrophic backtracking?); simplify it")


def test_cli_target_too_large(tmp_path, capsys):
    message = user_error(
        capsys, tmp_path, "localize", "--model", "tiny", "--prompts", "memorize_0",
        "--target", "(x{3000}){3000}", "--out", tmp_path / "mask.safetensors",
    )
    assert "too large once its repetitions are unrolled" in message


def test_cli_prune_with_a_mask_recording_a_catastrophic_target(tmp_path, capsys, tiny_pipe, short_budget):
    settings = LocalizeConfig(timesteps=1, height=64, width=64, progress=False)
    mask, _ = localize(tiny_pipe, ["a painting of a fox"], settings)
    real = tmp_path / "real.safetensors"
    mask.save(real)
    # the same file with only its recorded target changed
    with safe_open(str(real), framework="pt") as handle:
        metadata = handle.metadata()
    recorded = json.loads(metadata["memcore"])
    assert recorded["format"] == "memcore.mask/1" and recorded["target"] == "ffn"
    recorded["target"] = CATASTROPHIC
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(real), hostile, metadata={**metadata, "memcore": json.dumps(recorded)})
    message = user_error(capsys, tmp_path, "prune", "--model", "tiny", "--mask", hostile, "--out", tmp_path / "pruned")
    # the pattern is the file's: prune has no --target flag to blame
    assert message.startswith(f"the mask records target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over ")


# ---------------------------------------------------------------------------------------------
# local model folders


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    load_pipeline("tiny", device="cpu", dtype="float32").save_pretrained(folder)
    return folder


@pytest.fixture
def folder(tmp_path, saved_tiny):
    copy = tmp_path / "model"
    shutil.copytree(saved_tiny, copy)
    return copy


def edit_json(path, change):
    content = json.loads(path.read_text())
    path.write_text(json.dumps(change(content)))


def pickle_weights(folder, safetensors_name, pickle_name, keep_safetensors=False, extra=None):
    state = load_file(folder / safetensors_name)
    if extra is not None:
        state["extra"] = extra
    torch.save(state, folder / pickle_name)
    if not keep_safetensors:
        (folder / safetensors_name).unlink()


class NotAWeight:
    """Pickled with a state dict, it makes torch.load(weights_only=True) fail."""


def set_item(key, value):
    def change(content):
        content[key] = value
        return content

    return change


def write(path, text):
    def breaks(folder):
        (folder / path).write_text(text)

    return breaks


def remove(path):
    def breaks(folder):
        target = folder / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return breaks


def truncate(path, size):
    def breaks(folder):
        data = (folder / path).read_bytes()
        (folder / path).write_bytes(data[:size])

    return breaks


def wrong_shape(path, suffix):
    def breaks(folder):
        state = load_file(folder / path)
        key = next(k for k in state if k.endswith(suffix))
        state[key] = torch.zeros(3, 3)
        save_file(state, folder / path, metadata={"format": "pt"})

    return breaks


def index(change):
    return lambda folder: edit_json(folder / "model_index.json", change)


def config(path, change):
    return lambda folder: edit_json(folder / path, change)


def empty_folder(path):
    def breaks(folder):
        shutil.rmtree(folder / path)
        (folder / path).mkdir()

    return breaks


def localize_error(capsys, tmp_path, model) -> str:
    """The error line of ``memcore localize --model MODEL`` (checked by ``user_error``)."""
    out = tmp_path / "mask.safetensors"
    return user_error(capsys, tmp_path, "localize", "--model", model, "--prompts", "memorize_0", "--out", out)


PICKLE_ADVICE = "which memcore does not load (unpickling can run any code); convert it once"

BROKEN_FOLDERS = {
    "index-not-json": (write("model_index.json", "{not json"), "model_index.json is not valid JSON (Expecting property"),
    "index-not-utf": (lambda f: (f / "model_index.json").write_bytes(b"\xff\xfe{"), "model_index.json is not valid JSON"),
    "index-a-list": (write("model_index.json", "[1, 2]"), "model_index.json is not a JSON object"),
    "index-a-folder": (lambda f: ((f / "model_index.json").unlink(), (f / "model_index.json").mkdir()), "no model_index.json"),
    "no-class-name": (
        index(lambda c: {k: v for k, v in c.items() if k != "_class_name"}), "names no pipeline class (_class_name)"
    ),
    "unknown-pipeline": (
        index(set_item("_class_name", "NoSuchPipeline")), "_class_name 'NoSuchPipeline' is not a diffusers pipeline"
    ),
    "model-not-pipeline": (
        index(set_item("_class_name", "UNet2DConditionModel")),
        "_class_name 'UNet2DConditionModel' is not a diffusers pipeline",
    ),
    "class-name-a-number": (index(set_item("_class_name", 3)), "_class_name 3 is not a diffusers pipeline"),
    "component-a-string": (index(set_item("unet", "foo")), 'component unet is "foo", not [library, class]'),
    "component-null": (index(set_item("unet", None)), "component unet is null, not [library, class]"),
    "component-half": (
        index(set_item("unet", ["diffusers", None])), 'component unet is ["diffusers", null], not [library, class]'
    ),
    "unknown-diffusers-class": (
        index(set_item("unet", ["diffusers", "UNetNoSuchModel"])), "component unet: diffusers has no class 'UNetNoSuchModel'"
    ),
    "unknown-transformers-class": (
        index(set_item("text_encoder", ["transformers", "CLIPNoSuchModel"])),
        "component text_encoder: transformers has no class 'CLIPNoSuchModel'",
    ),
    "unknown-scheduler": (
        index(set_item("scheduler", ["diffusers", "NoScheduler"])), "component scheduler: diffusers has no class 'NoScheduler'"
    ),
    "unknown-library": (
        index(set_item("text_encoder", ["nosuchlib", "CLIPTextModel"])),
        "component text_encoder comes from 'nosuchlib', not from diffusers or transformers",
    ),
    "unet-folder-missing": (remove("unet"), "component unet has no folder unet/"),
    "unet-folder-a-file": (lambda f: (shutil.rmtree(f / "unet"), (f / "unet").write_text("x")), "component unet has no folder unet/"),
    # diffusers would load a tokenizer of nothing from the pipeline folder itself
    "tokenizer-folder-missing": (remove("tokenizer"), "component tokenizer has no folder tokenizer/"),
    "tokenizer-folder-empty": (empty_folder("tokenizer"), "component tokenizer: its folder tokenizer/ holds no files"),
    "scheduler-folder-missing": (remove("scheduler"), "component scheduler has no folder scheduler/"),
    "unet-config-not-json": (write("unet/config.json", "{oops"), "unet/config.json is not valid JSON"),
    "unet-config-a-list": (write("unet/config.json", "[]"), "unet/config.json is not a JSON object"),
    "text-config-not-json": (write("text_encoder/config.json", "{oops"), "text_encoder/config.json is not valid JSON"),
    "text-config-a-list": (write("text_encoder/config.json", "[]"), "text_encoder/config.json is not a JSON object"),
    "tokenizer-not-json": (write("tokenizer/tokenizer.json", "{x"), "tokenizer/tokenizer.json is not valid JSON"),
    "tokenizer-a-list": (write("tokenizer/tokenizer.json", "[]"), "tokenizer/tokenizer.json is not a JSON object"),
    "scheduler-config-not-json": (
        write("scheduler/scheduler_config.json", "{x"), "scheduler/scheduler_config.json is not valid JSON"
    ),
    "unet-no-weights": (remove(UNET_WEIGHTS), "component unet: no weights (*.safetensors) in unet/"),
    "unet-weights-truncated": (
        truncate(UNET_WEIGHTS, 1000), "cannot load component unet: Unable to load weights from checkpoint file"
    ),
    "text-weights-truncated": (
        truncate(TEXT_WEIGHTS, 1000), "cannot load component text_encoder: Error while deserializing header"
    ),
    "text-weights-empty": (truncate(TEXT_WEIGHTS, 0), "cannot load component text_encoder: Error while deserializing header"),
    "unet-weights-wrong-shape": (wrong_shape(UNET_WEIGHTS, "conv_in.bias"), "cannot load component unet: Cannot load"),
    "text-weights-wrong-shape": (
        wrong_shape(TEXT_WEIGHTS, "fc2.weight"),
        "cannot load component text_encoder: its weights do not match its config.json",
    ),
    "text-config-wrong-type": (
        config("text_encoder/config.json", set_item("hidden_size", "abc")),
        "cannot load component text_encoder: Validation error for field 'hidden_size'",
    ),
    "unet-config-wrong-value": (
        config("unet/config.json", set_item("block_out_channels", "abc")),
        "cannot load component unet: Must provide the same number of `block_out_channels`",
    ),
    # pickled weights, whatever the component and whatever the pickle holds
    "unet-pickled": (
        lambda f: pickle_weights(f, UNET_WEIGHTS, UNET_PICKLE),
        f"component unet holds its weights only as pickle ({UNET_PICKLE}), {PICKLE_ADVICE}",
    ),
    "unet-pickled-object": (
        lambda f: pickle_weights(f, UNET_WEIGHTS, UNET_PICKLE, extra=NotAWeight()),
        f"component unet holds its weights only as pickle ({UNET_PICKLE}), {PICKLE_ADVICE}",
    ),
    "text-pickled": (
        lambda f: pickle_weights(f, TEXT_WEIGHTS, TEXT_PICKLE),
        f"component text_encoder holds its weights only as pickle ({TEXT_PICKLE}), {PICKLE_ADVICE}",
    ),
    # torch.load(weights_only=True) refuses this one; transformers let that end in a traceback
    "text-pickled-object": (
        lambda f: pickle_weights(f, TEXT_WEIGHTS, TEXT_PICKLE, extra=NotAWeight()),
        f"component text_encoder holds its weights only as pickle ({TEXT_PICKLE}), {PICKLE_ADVICE}",
    ),
    "vae-pickled-pt": (
        lambda f: pickle_weights(f, "vae/diffusion_pytorch_model.safetensors", "vae/weights.pt"),
        f"component vae holds its weights only as pickle (vae/weights.pt), {PICKLE_ADVICE}",
    ),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_folder(case, folder, tmp_path, capsys):
    breaks, expected = BROKEN_FOLDERS[case]
    breaks(folder)
    message = localize_error(capsys, tmp_path, folder)
    assert message.startswith(f"--model {folder}: "), message
    assert expected in message, message


def test_model_is_a_plain_file(tmp_path, capsys):
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(b"x")
    message = localize_error(capsys, tmp_path, plain)
    assert message == f"--model {plain}: a file, not a diffusers pipeline folder (a folder holding model_index.json)"


def test_model_is_an_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = localize_error(capsys, tmp_path, empty)
    assert message == f"--model {empty}: not a diffusers pipeline folder (no model_index.json)"


def deny(monkeypatch, method, denied):
    """Make ``Path.method`` raise PermissionError on ``denied``, as it does for other users than root."""
    original = getattr(pathlib.Path, method)

    def guarded(self, *args, **kwargs):
        if self == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, guarded)


@pytest.mark.parametrize(
    "method, where, expected",
    [
        ("read_bytes", "model_index.json", "cannot read model_index.json (Permission denied)"),
        ("read_bytes", "unet/config.json", "cannot read unet/config.json (Permission denied)"),
        ("iterdir", "unet", "cannot read unet/ (Permission denied)"),
        ("exists", "", "cannot look at it (Permission denied)"),
    ],
)
def test_unreadable(folder, tmp_path, capsys, monkeypatch, method, where, expected):
    deny(monkeypatch, method, folder / where if where else folder)
    message = localize_error(capsys, tmp_path, folder)
    assert message == f"--model {folder}: {expected}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_for_real(folder, tmp_path, capsys):
    (folder / "model_index.json").chmod(0)
    try:
        message = localize_error(capsys, tmp_path, folder)
    finally:
        (folder / "model_index.json").chmod(0o644)
    assert message == f"--model {folder}: cannot read model_index.json (Permission denied)"


def test_folder_loads_the_same_weights(folder, tiny_pipe):
    from memcore.targets import weights_sha256

    loaded = load_pipeline(str(folder), device="cpu", dtype="float32")
    assert weights_sha256(find_targets(loaded)) == weights_sha256(find_targets(tiny_pipe))


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_safetensors_beside_pickle_are_read_and_the_pickle_never_opened(folder, tiny_pipe, monkeypatch, component):
    from memcore.targets import weights_sha256

    names = {"unet": (UNET_WEIGHTS, UNET_PICKLE), "text_encoder": (TEXT_WEIGHTS, TEXT_PICKLE)}
    pickle_weights(folder, *names[component], keep_safetensors=True, extra=NotAWeight())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_pipeline(str(folder), device="cpu", dtype="float32")
    assert weights_sha256(find_targets(loaded, "text-mlp")) == weights_sha256(find_targets(tiny_pipe, "text-mlp"))
    assert weights_sha256(find_targets(loaded)) == weights_sha256(find_targets(tiny_pipe))


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), TypeError("a bug"), KeyError("a bug")])
def test_a_bug_while_loading_keeps_its_traceback(folder, monkeypatch, bug):
    from diffusers import DiffusionPipeline

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", broken)
    with pytest.raises(type(bug)) as caught:
        load_pipeline(str(folder), device="cpu")
    assert caught.value is bug and not isinstance(caught.value, MemcoreError)


def test_library_error_names_the_model_parameter(folder):
    (folder / "model_index.json").write_text("[]")
    with pytest.raises(MemcoreError) as caught:
        load_pipeline(str(folder), device="cpu")
    assert caught.value.param == "model"
    assert str(caught.value) == f"model {folder}: model_index.json is not a JSON object"


# ---------------------------------------------------------------------------------------------
# the hub, unreachable

REPO = "someone/some-model"


@pytest.fixture
def hub_online(monkeypatch):
    """HF_HUB_OFFLINE unset (tests/conftest.py sets it), no proxy, and every way to download failing the test."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    downloads = []
    local_config = DiffusionPipeline.load_config.__func__

    def load_config(cls, name, *args, local_files_only=False, **kwargs):
        if not local_files_only:
            downloads.append(("load_config", name))
            raise OSError(f"{name} is not on the hub")
        return local_config(cls, name, *args, local_files_only=local_files_only, **kwargs)

    def refuse(*args, **kwargs):
        downloads.append(("from_pretrained", args))
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(DiffusionPipeline, "load_config", classmethod(load_config))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(DiffusionPipeline, "download", refuse)
    return downloads


def point_hub_at(monkeypatch, url):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # read from HF_ENDPOINT when huggingface_hub is imported


@pytest.fixture
def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_port():
    """A socket that accepts connections (the kernel does, up to the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class _Unsupported(http.server.BaseHTTPRequestHandler):
    """Answers every request with 501 (it has no do_HEAD)."""

    def log_message(self, *args):
        pass


class _Redirect(_Unsupported):
    def do_HEAD(self):
        self.send_response(302)
        self.send_header("Location", "http://127.0.0.1:9/elsewhere")  # a closed port: not followed
        self.end_headers()


@pytest.fixture(params=["unsupported", "redirect"])
def answering_port(request):
    """A local HTTP server answering every HEAD: 501, or a redirect to a closed port."""
    handler = _Redirect if request.param == "redirect" else _Unsupported
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_probe_outcomes(closed_port, silent_port, answering_port):
    assert "Connection refused" in models.hub_unreachable(closed_port, timeout=5)
    started = time.monotonic()
    assert models.hub_unreachable(silent_port, timeout=0.3) in ("timed out", "nothing within 0.3 s")
    assert time.monotonic() - started < 20
    assert models.hub_unreachable(answering_port, timeout=5) is None
    assert "unknown url type" in models.hub_unreachable("not-a-url", timeout=5)


@pytest.mark.parametrize("port", ["closed_port", "silent_port"])
def test_uncached_id_with_the_hub_unreachable_fails_at_once(request, tmp_path, capsys, monkeypatch, hub_online, port):
    from huggingface_hub import constants

    url = request.getfixturevalue(port)
    point_hub_at(monkeypatch, url)
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    message = localize_error(capsys, tmp_path, REPO)
    assert time.monotonic() - started < 30  # no retries (they took about 30 s)
    assert message.startswith(
        f"--model {REPO}: {REPO} is not in the local cache ({constants.HF_HUB_CACHE}) and the hub at {url} does not answer ("
    )
    assert message.endswith(
        "; HF_HUB_OFFLINE is unset); download it where the hub is reachable, or pass --model PATH to a diffusers folder"
    )
    if port == "closed_port":
        assert "Connection refused" in message
    else:  # the socket's timeout or the thread's, whichever came first
        assert "(timed out;" in message or "(nothing within 0.5 s;" in message
    assert hub_online == []


def test_uncached_alias_names_the_hub_id(tmp_path, capsys, monkeypatch, hub_online, closed_port):
    monkeypatch.setitem(models.ALIASES, "some-alias", REPO)
    point_hub_at(monkeypatch, closed_port)
    message = localize_error(capsys, tmp_path, "some-alias")
    assert message.startswith(f"--model some-alias: {REPO} is not in the local cache")
    assert hub_online == []


def test_when_the_hub_answers_the_download_goes_ahead(tmp_path, capsys, monkeypatch, hub_online, answering_port):
    point_hub_at(monkeypatch, answering_port)
    message = localize_error(capsys, tmp_path, REPO)
    assert hub_online == [("load_config", REPO)]
    assert f"cannot load {REPO}:" in message and "is not on the hub" in message


def test_offline_mode_still_refuses_without_probing(tmp_path, capsys, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("probed the hub")

    monkeypatch.setattr(models, "hub_unreachable", no_probe)
    message = localize_error(capsys, tmp_path, REPO)
    assert "HF_HUB_OFFLINE is set" in message


# ---------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize(
    "device, expect",
    [
        ("nonsense", "--device nonsense: not a torch device (cpu, cuda, cuda:1, ...)"),
        ("meta", "--device meta: cannot run a model on meta here; use cpu or cuda"),
        ("cuda:99", "--device cuda:99: CUDA is not available on this machine"),
    ],
)
def test_devices_a_model_cannot_run_on(tmp_path, capsys, monkeypatch, device, expect):
    if device == "cuda:99" and torch.cuda.is_available():
        expect = f"--device cuda:99: this machine has {torch.cuda.device_count()} CUDA device"
    message = user_error(
        capsys, tmp_path, "localize", "--model", "tiny", "--prompts", "memorize_0", "--device", device,
        "--out", tmp_path / "mask.safetensors",
    )
    assert message.startswith(expect), message


def test_cuda_index_beyond_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MemcoreError, match=r"^device cuda:2: this machine has 2 CUDA devices, cuda:0 to cuda:1$"):
        models.resolve_device("cuda:2", None)
    assert models.resolve_device("cuda:1", None) == (torch.device("cuda:1"), torch.float16)
