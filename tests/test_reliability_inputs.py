"""Careless or hostile input where it enters: prompt files and numbers, refused in one line.

Each class of bad input goes through the command line (``memcore localize`` and ``memcore generate``:
exit 2, one line, no traceback, nothing left behind; before the model loads wherever that is
possible) and through the library (``load_prompts``, ``LocalizeConfig``, ``generate``).
"""

from __future__ import annotations

import codecs
import math
import os
import re
import socket
import stat
from types import SimpleNamespace

import pytest
from cli_helpers import user_error

import memcore
import memcore.cli
import memcore.config
import memcore.driver
from memcore import generate as gen
from memcore.config import MAX_IMAGE_SIDE, MAX_STEPS, Generation, LocalizeConfig, resolve_generation
from memcore.errors import MemcoreError
from memcore.models import load_pipeline
from memcore.prompts import MAX_PROMPT_FILE_BYTES, load_prompts

FAST = ["--timesteps", "2", "--height", "64", "--width", "64"]
GENERATE = ["--steps", "2", "--height", "64", "--width", "64", "--seeds", "0"]


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.txt"
    path.write_text("a painting of a fox\nthe great wave\n")
    return path


def localize_error(capsys, tmp_path, *args) -> str:
    return user_error(capsys, tmp_path, "localize", "--model", "tiny", "--out", tmp_path / "m.safetensors", *args)


def generate_error(capsys, tmp_path, *args) -> str:
    return user_error(capsys, tmp_path, "generate", "--model", "tiny", "--out", tmp_path / "g", *args)


# ---------------------------------------------------------------- prompt files: what each holds


# Each writes a file and returns it with what the error says after the file's name.


def _utf16_without_bom(folder):
    path = folder / "utf16.txt"
    path.write_bytes("a painting of a fox\nthe great wave\n".encode("utf-16-le"))
    return path, ": line 1 contains NUL bytes: UTF-16 without a byte-order mark, or a binary file? save it as UTF-8"


def _nul_on_line_3(folder):
    path = folder / "binary.txt"
    path.write_bytes(b"first\r\nsecond\rthird \x00\x01\x02\nfourth\n")
    return path, ": line 3 contains NUL bytes: UTF-16 without a byte-order mark, or a binary file? save it as UTF-8"


def _unterminated_quote(folder):
    path = folder / "quote.csv"
    path.write_text('id,prompt\n0,"a cat, a dog"\n1,"never closed\n2,third\n3,fourth\n')
    return path, ":3: a quoted field opened on line 3 is never closed"


def _unterminated_quote_semicolon(folder):
    path = folder / "quote.csv"
    path.write_text('id;prompt;url\n0;"two\nlines";u\n1;x;"open\n')
    return path, ":4: a quoted field opened on line 4 is never closed"


def _text_after_closing_quote(folder):
    path = folder / "strict.csv"
    path.write_text('id,prompt\n0,ok\n1,"quoted"then more\n')
    return path, ":3: bad CSV ("  # the csv module's own words follow


def _lone_surrogate(folder):
    path = folder / "surrogate.jsonl"
    path.write_text('{"caption": "fine"}\n\n{"caption": "\\ud800"}\n')
    return path, (
        ":3: lone surrogate \\ud800 in a prompt (half of a UTF-16 pair, from a JSON escape?); write the character itself"
    )


def _nul_escape(folder):
    path = folder / "nul.jsonl"
    path.write_text('{"prompt": "a\\u0000b"}\n')
    return path, ":1: a prompt contains a NUL character (\\u0000)"


def _latin1(folder):
    path = folder / "latin1.txt"
    path.write_bytes("ok\ncafé\n".encode("latin-1"))
    return path, ": line 2 is not valid UTF-8 (byte 6); save it as UTF-8"


def _bad_utf16_after_bom(folder):
    path = folder / "broken16.txt"
    path.write_bytes(codecs.BOM_UTF16_LE + "ok\n".encode("utf-16-le") + b"\x00\xd8" + "x".encode("utf-16-le"))
    return path, ": line 2 is not valid UTF-16-LE, the encoding its byte-order mark names (byte 8); save it as UTF-8"


CONTENT = {
    "utf16-no-bom": _utf16_without_bom,
    "nul": _nul_on_line_3,
    "csv-quote": _unterminated_quote,
    "csv-quote-semicolon": _unterminated_quote_semicolon,
    "csv-strict": _text_after_closing_quote,
    "json-surrogate": _lone_surrogate,
    "json-nul": _nul_escape,
    "latin1": _latin1,
    "utf16-bom-broken": _bad_utf16_after_bom,
}


def _says(text: str, path, expected: str) -> bool:
    return text.startswith(f"{path}{expected}") and (expected.endswith("(") or text == f"{path}{expected}")


@pytest.mark.parametrize("case", CONTENT, ids=list(CONTENT))
def test_bad_prompt_content_in_the_library(tmp_path, case):
    path, expected = CONTENT[case](tmp_path)
    with pytest.raises(MemcoreError) as info:
        load_prompts(path)
    assert _says(str(info.value), path, expected), str(info.value)
    assert "\n" not in str(info.value) and info.value.param is None


@pytest.mark.parametrize("case", CONTENT, ids=list(CONTENT))
def test_bad_prompt_content_on_the_command_line(tmp_path, capsys, no_model, case):
    path, expected = CONTENT[case](tmp_path)
    line = localize_error(capsys, tmp_path, "--prompts", path, *FAST)
    assert _says(line, path, expected), line
    line = generate_error(capsys, tmp_path, "--prompts", path, *GENERATE)
    assert _says(line, path, expected), line


def test_lines_are_counted_in_the_file_not_in_rows(tmp_path):
    # a row spanning lines 2-3 before the row at fault, and blank lines: the line is the file's
    path = tmp_path / "rows.csv"
    path.write_text('id,prompt,url\n0,"one\ntwo",u\n\n\n1,"x"y,u\n')
    with pytest.raises(MemcoreError, match=r"rows\.csv:6: bad CSV \(") as info:
        load_prompts(path)
    assert "\n" not in str(info.value)
    path.write_text('id,prompt,url\n0,"one\ntwo","three\n\n1,x,u\n')
    with pytest.raises(MemcoreError, match=r"^.*rows\.csv:3: a quoted field opened on line 3 is never closed$"):
        load_prompts(path)


def test_unterminated_quote_beyond_the_field_size_limit(tmp_path):
    # csv gives up on the field's size before the end of the file; the quote is still named
    path = tmp_path / "long.csv"
    path.write_text('id,prompt\n0,ok\n1,"open\n' + "2,a row of a long file\n" * 20000)
    with pytest.raises(MemcoreError, match=r"long\.csv:3: a quoted field opened on line 3 is never closed$"):
        load_prompts(path)


def test_quotes_inside_fields_and_surrogate_pairs_still_read(tmp_path):
    path = tmp_path / "fine.csv"
    path.write_text('id,prompt\n0,5" tall\n1,"say ""hi"""\n2,"two\nlines"\n')
    assert load_prompts(path) == ['5" tall', 'say "hi"', "two\nlines"]
    path = tmp_path / "pair.jsonl"
    path.write_text('{"caption": "smile \\ud83d\\ude00"}\n')
    assert load_prompts(path) == ["smile \U0001f600"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-8"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_byte_order_mark_names_the_encoding(tmp_path, encoding, suffix):
    bom = {
        "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE, "utf-8": codecs.BOM_UTF8,
    }[encoding]
    text = {
        ".txt": "café 東京\r\nthe great wave\r\n",
        ".jsonl": '{"caption": "café 東京"}\r\n{"prompt": "the great wave"}\r\n',
        ".csv": 'id,prompt\r\n0,"café 東京"\r\n1,the great wave\r\n',
    }[suffix]
    utf8 = tmp_path / f"plain{suffix}"
    utf8.write_bytes(text.encode("utf-8"))
    marked = tmp_path / f"marked{suffix}"
    marked.write_bytes(bom + text.encode(encoding))
    assert load_prompts(marked) == load_prompts(utf8) == ["café 東京", "the great wave"]


# ---------------------------------------------------------------- prompt files: what the path is


def _fifo(folder):
    path = folder / "fifo.txt"
    os.mkfifo(path)
    return path, "is not a regular file (a FIFO)"


def _link_to(device):
    def make(folder):
        if not os.path.exists(device):
            pytest.skip(f"no {device} here")
        path = folder / "endless.txt"
        path.symlink_to(device)
        return path, f"is not a regular file (a link to {device}, a character device)"

    return make


def _socket(folder):
    path = folder / "s.txt"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
    except OSError as e:  # a path longer than a socket address allows
        pytest.skip(f"cannot bind a socket at {path}: {e}")
    finally:
        server.close()
    return path, "is not a regular file (a socket)"


def _too_large(folder):
    path = folder / "huge.txt"
    with open(path, "wb") as f:  # sparse: no disk used, nothing read
        f.truncate(MAX_PROMPT_FILE_BYTES + 1)
    return path, f"is 64.0 MiB, over the {MAX_PROMPT_FILE_BYTES // 2**20} MiB limit for a prompt file"


PATHS = {
    "fifo": _fifo,
    "dev-zero": _link_to("/dev/zero"),
    "dev-urandom": _link_to("/dev/urandom"),
    "socket": _socket,
    "too-large": _too_large,
}


@pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices and sockets as files are POSIX")
@pytest.mark.parametrize("case", PATHS, ids=list(PATHS))
def test_not_a_regular_file_or_too_large(tmp_path, capsys, no_model, case):
    path, message = PATHS[case](tmp_path)
    assert not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) > MAX_PROMPT_FILE_BYTES
    with pytest.raises(MemcoreError) as info:
        load_prompts(path)
    assert str(info.value) == f"{path}: {message}"
    assert localize_error(capsys, tmp_path, "--prompts", path, *FAST) == f"{path}: {message}"
    assert generate_error(capsys, tmp_path, "--prompts", path, *GENERATE) == f"{path}: {message}"


def test_size_limit_is_inclusive(tmp_path):
    path = tmp_path / "limit.txt"
    path.write_bytes(b"a" * (MAX_PROMPT_FILE_BYTES - 2) + b"\nb")
    assert [len(p) for p in load_prompts(path)] == [MAX_PROMPT_FILE_BYTES - 2, 1]


def test_a_link_to_a_regular_file_is_read(tmp_path, good):
    link = tmp_path / "link.txt"
    link.symlink_to(good)
    assert load_prompts(link) == load_prompts(good)


# ---------------------------------------------------------------- numbers before the model loads

BAD_NUMBERS = [
    (["--guidance", "inf"], "--guidance: must be a finite number, got inf"),
    (["--guidance=-inf"], "--guidance: must be a finite number, got -inf"),
    (["--guidance", "nan"], "--guidance: must be a finite number, got nan"),
    (["--height", "1048576"], f"--height: must be at most {MAX_IMAGE_SIDE} pixels, got 1048576"),
    (["--width", str(MAX_IMAGE_SIDE + 8)], f"--width: must be at most {MAX_IMAGE_SIDE} pixels, got {MAX_IMAGE_SIDE + 8}"),
    (["--steps", str(MAX_STEPS + 1)], f"--steps: must be at most {MAX_STEPS}, got {MAX_STEPS + 1}"),
]


@pytest.mark.parametrize("args, line", BAD_NUMBERS + [
    (["--seed", str(2**64)], f"--seed: {2**64} is out of range (0 .. 2**64 - 1)"),
    (["--seed", "-1"], "--seed: -1 is out of range (0 .. 2**64 - 1)"),
])
def test_localize_refuses_numbers_before_loading(tmp_path, capsys, good, no_model, args, line):
    assert localize_error(capsys, tmp_path, "--prompts", good, *FAST, *args) == line


@pytest.mark.parametrize("args, line", BAD_NUMBERS + [
    (["--seeds", str(2**64)], f"--seeds: {2**64} is out of range (0 .. 2**64 - 1)"),
    (["--seeds", "-1"], "--seeds: bad item '-1' in '-1' (use non-negative integers and ranges like 0-3)"),
])
def test_generate_refuses_numbers_before_loading(tmp_path, capsys, good, no_model, args, line):
    assert generate_error(capsys, tmp_path, "--prompts", good, *GENERATE, *args) == line


def test_largest_seed_is_accepted(tmp_path, capsys, good, no_model):
    # 2**64 - 1 passes every check: the (refused) model load is what stops the run
    with pytest.raises(AssertionError, match="model was loaded"):
        memcore.cli.main(["localize", "--model", "tiny", "--prompts", str(good), "--out", str(tmp_path / "m"),
                          "--seed", str(2**64 - 1)])


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"guidance": math.inf}, "guidance", "must be a finite number, got inf"),
        ({"guidance": math.nan}, "guidance", "must be a finite number, got nan"),
        ({"guidance": "7.5"}, "guidance", "must be a number, got '7.5'"),
        ({"seed": -1}, "seed", "-1 is out of range (0 .. 2**64 - 1)"),
        ({"seed": 2**64}, "seed", f"{2**64} is out of range (0 .. 2**64 - 1)"),
        ({"seed": 1.0}, "seed", "1.0 is not an integer"),
        ({"seed": True}, "seed", "True is not an integer"),
        ({"height": 1048576}, "height", f"must be at most {MAX_IMAGE_SIDE} pixels, got 1048576"),
        ({"width": 64.0}, "width", "must be an integer, got 64.0"),
        ({"steps": 10**9}, "steps", f"must be at most {MAX_STEPS}, got 1000000000"),
        ({"steps": 2.5}, "steps", "must be an integer, got 2.5"),
        ({"timesteps": 2.0}, "timesteps", "must be an integer, got 2.0"),
        ({"batch_size": "4"}, "batch_size", "must be an integer, got '4'"),
    ],
)
def test_localize_config_refuses_numbers(kwargs, param, message):
    with pytest.raises(MemcoreError) as info:
        LocalizeConfig(**kwargs)
    assert info.value.param == param and str(info.value) == f"{param}: {message}"


def test_localize_config_accepts_the_edges():
    config = LocalizeConfig(seed=2**64 - 1, guidance=-3.0, height=MAX_IMAGE_SIDE, width=8, steps=MAX_STEPS)
    assert config.seed == 2**64 - 1 and config.guidance == -3.0


def test_seeds_share_the_seed_check():
    # one check, two parameter names: localize's seed and generate's list of seeds
    for seed in (-1, 2**64, 1.0):
        with pytest.raises(MemcoreError) as single:
            LocalizeConfig(seed=seed)
        with pytest.raises(MemcoreError) as listed:
            gen.check_seeds([0, seed])
        assert str(single.value).removeprefix("seed: ") == str(listed.value).removeprefix("seeds: ")


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"guidance": math.inf}, "guidance", "must be a finite number, got inf"),
        ({"guidance": math.nan}, "guidance", "must be a finite number, got nan"),
        ({"height": 1048576}, "height", f"must be at most {MAX_IMAGE_SIDE} pixels, got 1048576"),
        ({"steps": MAX_STEPS + 1}, "steps", f"must be at most {MAX_STEPS}, got {MAX_STEPS + 1}"),
    ],
)
def test_generate_checks_numbers_without_a_pipeline(tmp_path, kwargs, param, message):
    with pytest.raises(MemcoreError) as info:
        gen.check_generate_arguments([0], out_dir=tmp_path / "g", **kwargs)
    assert info.value.param == param and str(info.value) == f"{param}: {message}"
    with pytest.raises(MemcoreError) as info:  # the pipeline is never touched
        gen.generate(object(), ["a"], [0], out_dir=tmp_path / "g", progress=False, **kwargs)
    assert str(info.value) == f"{param}: {message}" and not (tmp_path / "g").exists()


# ---------------------------------------------------------------- numbers the model decides


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_pipeline(name, device="cpu", dtype="float32")
        return cache[name]

    return get


STEPS_LINE = "must be at most 1000 with {}, the number of timesteps the model was trained on; got 5000"


@pytest.mark.parametrize(
    "model, scheduler",
    [
        ("tiny", "PNDMScheduler"),  # quietly repeats timestep 1 beyond 1000 steps
        ("tiny-sdxl", "EulerDiscreteScheduler"),  # the same, with leading spacing
        ("tiny-sd2", "DDIMScheduler"),  # raises its own ValueError
        ("tiny-pixart", "DPMSolverMultistepScheduler"),  # repeats timesteps
    ],
)
def test_steps_beyond_the_scheduler(pipes, model, scheduler):
    pipe = pipes(model)
    with pytest.raises(MemcoreError) as info:
        resolve_generation(pipe, LocalizeConfig(steps=5000))
    assert info.value.param == "steps" and str(info.value) == "steps: " + STEPS_LINE.format(scheduler)
    assert len(resolve_generation(pipe, LocalizeConfig(steps=1000)).call_timesteps) >= 1000


def test_flow_matching_takes_more_steps_than_training_timesteps(pipes):
    generation = resolve_generation(pipes("tiny-sd3"), LocalizeConfig(steps=1500, height=64, width=64))
    assert len(generation.call_timesteps) == 1500 and len(set(generation.call_timesteps)) == 1500


def test_scheduler_refusal_is_one_line(pipes, monkeypatch):
    pipe = pipes("tiny-sd2")

    def refuse(self, *args, **kwargs):
        raise ValueError("this scheduler has\nits own reasons")

    monkeypatch.setattr(type(pipe.scheduler), "set_timesteps", refuse)
    with pytest.raises(MemcoreError, match=r"^steps: DDIMScheduler refuses 20: this scheduler has$"):
        resolve_generation(pipe, LocalizeConfig(steps=20))


def test_steps_beyond_the_scheduler_on_the_command_line(tmp_path, capsys, good):
    line = localize_error(capsys, tmp_path, "--prompts", good, *FAST, "--steps", "5000")
    assert line == "--steps: " + STEPS_LINE.format("PNDMScheduler")
    line = generate_error(capsys, tmp_path, "--prompts", good, *GENERATE, "--steps", "5000")
    assert line == "--steps: " + STEPS_LINE.format("PNDMScheduler")


@pytest.mark.parametrize(
    "model, size, param, message",
    [
        ("tiny-pixart", (72, 64), "height", "must be a multiple of 16 for this model (VAE scale 8 x patch size 2), got 72"),
        ("tiny-sd3", (64, 40), "width", "must be a multiple of 16 for this model (VAE scale 8 x patch size 2), got 40"),
        ("tiny-sd3", (400, 64), "height",
         "must be at most 384 for this model (its position embedding covers 24 patches of 16 pixels a side), got 400"),
    ],
)
def test_sizes_the_model_refuses(pipes, tmp_path, capsys, model, size, param, message):
    height, width = size
    with pytest.raises(MemcoreError) as info:
        memcore.localize(pipes(model), ["a"], LocalizeConfig(timesteps=1, steps=2, height=height, width=width))
    assert info.value.param == param and str(info.value) == f"{param}: {message}"
    args = ["--prompts", tmp_path / "p.txt", "--model", model, "--height", str(height), "--width", str(width)]
    (tmp_path / "p.txt").write_text("a\n")
    line = localize_error(capsys, tmp_path, *args, "--timesteps", "1", "--steps", "2")
    assert line == f"--{param}: {message}"
    line = generate_error(capsys, tmp_path, *args, "--steps", "2", "--seeds", "0")
    assert line == f"--{param}: {message}"


def test_largest_tensor_of_each_kind(pipes):
    pipe = pipes("tiny")  # UNet: block_out_channels[0] 16, 4 latent channels; VAE: 8 channels, scale 8
    generation = resolve_generation(pipe, LocalizeConfig(height=64, width=128))
    assert memcore.config.largest_tensor(pipe, generation) == (2 * 16 * 8 * 16 * 4, "the denoiser's first feature map")
    assert memcore.config.largest_tensor(pipe, generation, images=3, decode=True) == (
        3 * 8 * 64 * 128 * 4, "the VAE decoder's last feature map"
    )
    unguided = resolve_generation(pipe, LocalizeConfig(height=64, width=128, guidance=1.0))
    assert memcore.config.largest_tensor(pipe, unguided)[0] == 16 * 8 * 16 * 4
    pixart = pipes("tiny-pixart")  # DiT: patch 2, 2 heads x 8 = 16 wide, 4 latent channels: a tie, latents first
    generation = resolve_generation(pixart, LocalizeConfig(height=64, width=64))
    assert memcore.config.largest_tensor(pixart, generation, images=3) == (3 * 2 * 4 * 8 * 8 * 4, "the denoiser's input latents")


def test_largest_tensor_of_a_dit():
    # PixArt-XL-2-512's transformer in float16: 16 heads of 72, patch 2, 4 latent channels
    import torch

    net = torch.nn.Linear(1, 1)
    net.config = SimpleNamespace(in_channels=4, patch_size=2, num_attention_heads=16, attention_head_dim=72)
    net.dtype = torch.float16
    pipe = SimpleNamespace(transformer=net, vae_scale_factor=8, vae=None)
    generation = Generation(steps=20, guidance=4.5, seed=0, height=512, width=768, scheduler="", call_timesteps=[])
    tokens = (512 // 16) * (768 // 16)
    assert memcore.config.largest_tensor(pipe, generation) == (2 * tokens * 1152 * 2, "the denoiser's patch tokens")


def test_available_memory_on_the_cpu():
    import torch

    available = memcore.config.available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert available is not None and 0 < available <= total
    assert memcore.config.available_memory(torch.device("meta")) is None


@pytest.fixture
def little_memory(monkeypatch):
    """The CPU has 1 KiB available: every generation's largest tensor is refused, before allocation."""
    monkeypatch.setattr(memcore.config, "available_memory", lambda device: 1024)

    def refuse(*args, **kwargs):
        raise AssertionError("x_T was drawn before the memory was checked")

    monkeypatch.setattr(memcore.driver, "initial_latent", refuse)


def test_memory_is_checked_before_allocation(tmp_path, capsys, good, little_memory):
    # 2 prompts a batch x 2 guided rows x 16 channels x 8 x 8 latent pixels x 4 bytes
    line = localize_error(capsys, tmp_path, "--prompts", good, *FAST)
    assert line == (
        "--height 64 and --width 64 need at least 16.0 KiB for one tensor (the denoiser's first feature map, "
        "2 images), more than the 1.0 KiB available on cpu; lower them or --batch-size"
    )
    line = localize_error(capsys, tmp_path, "--prompts", good, *FAST, "--batch-size", "1")
    assert line == (
        "--height 64 and --width 64 need at least 8.0 KiB for one tensor (the denoiser's first feature map, "
        "1 image), more than the 1.0 KiB available on cpu; lower them"
    )
    # 2 prompts a batch x 8 channels x 64 x 64 pixels x 4 bytes
    line = generate_error(capsys, tmp_path, "--prompts", good, *GENERATE)
    assert line == (
        "--height 64 and --width 64 need at least 256.0 KiB for one tensor (the VAE decoder's last feature map, "
        "2 images), more than the 1.0 KiB available on cpu; lower them or --batch-size"
    )
    line = generate_error(capsys, tmp_path, "--prompts", good, *GENERATE, "--batch-size", "1")
    assert "128.0 KiB" in line and line.endswith("(the VAE decoder's last feature map, 1 image), more than the 1.0 KiB available on cpu; lower them")


def test_memory_in_library_words(tmp_path, pipes, little_memory):
    with pytest.raises(MemcoreError) as info:
        gen.generate(pipes("tiny"), ["a", "b", "c"], [0], out_dir=tmp_path / "g", steps=2, height=64, width=64,
                     batch_size=2, progress=False)
    assert info.value.param == "height" and not (tmp_path / "g").exists()
    assert str(info.value) == (
        "height=64 and width=64 need at least 256.0 KiB for one tensor (the VAE decoder's last feature map, "
        "2 images), more than the 1.0 KiB available on cpu; lower them or batch_size"
    )
    with pytest.raises(MemcoreError, match=r"^height=64 and width=64 need at least 8\.0 KiB .* lower them$"):
        memcore.localize(pipes("tiny"), ["a"], LocalizeConfig(timesteps=1, steps=2, height=64, width=64))


@pytest.mark.parametrize("command", ["localize", "detect"])
def test_more_timesteps_than_the_denoiser_calls(tmp_path, capsys, good, command):
    out = tmp_path / ("m.safetensors" if command == "localize" else "d")
    message = user_error(capsys, tmp_path, command, "--model", "tiny", "--prompts", good, "--steps", "2",
                         "--timesteps", "50", "--height", "64", "--width", "64", "--out", out)
    assert re.fullmatch(r"--timesteps: 50 is more than the \d+ denoiser calls of 2 steps", message), message
