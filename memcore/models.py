"""Loading a diffusers pipeline by alias, hub id or local folder, offline first.

A local folder is checked before diffusers reads it (model_index.json, each component's folder,
JSON files and weights), and anything it holds that cannot be loaded is one line naming the folder
and the file or component. Weights are read from safetensors only: pickled weights (``.bin``,
``.pt``, ``.ckpt``) are refused, since unpickling can run code. An uncached hub id is looked for on
the hub only once the hub's endpoint answers within ``HUB_PROBE_TIMEOUT_S``.
"""

from __future__ import annotations

import http.client
import inspect
import json
import logging
import ssl
import threading
import traceback
import types
import urllib.error
import urllib.request
from pathlib import Path

import torch

from memcore.errors import MemcoreError, Param
from memcore.tiny import FAMILIES

DEMO_MODELS = ("tiny-memorizer",)  # memcore.demo: shipped with memcore, rebuilt by `memcore demo build`

logger = logging.getLogger("memcore")

TINY = "tiny"
# The embedded random-weight pipelines (see ``memcore.tiny``), one per supported architecture.
TINY_MODELS = tuple(FAMILIES)

ALIASES = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2-base": "stabilityai/stable-diffusion-2-base",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sd2": "stabilityai/stable-diffusion-2",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "pixart": "PixArt-alpha/PixArt-XL-2-512x512",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(name, name)
    if key not in DTYPES:
        raise MemcoreError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}", param="dtype")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA in float16 when present, else CPU in float32."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise MemcoreError("not a torch device (cpu, cuda, cuda:1, ...)", param="device", value=device) from None
        check_device(dev, device)
    resolved = parse_dtype(dtype)
    if resolved is None:
        resolved = torch.float16 if dev.type == "cuda" else torch.float32
    return dev, resolved


def check_device(dev: torch.device, given: object) -> None:
    """A device a model can run on here: the CPU, a CUDA device this machine has, or another
    accelerator torch reports available (``mps``, ``xpu``); never ``meta``, which holds no values."""
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemcoreError("CUDA is not available on this machine", param="device", value=given)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise MemcoreError(f"this machine has {count} CUDA device{'s' if count != 1 else ''}, cuda:0 to cuda:{count - 1}", param="device", value=given)
        return
    available = {"mps": lambda: torch.backends.mps.is_available()}.get(dev.type)
    if available is None:
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", None) if dev.type != "meta" else None
    if available is None or not available():
        raise MemcoreError(f"cannot run a model on {dev.type} here; use cpu or cuda", param="device", value=given)


def resolve_model_id(model: str) -> str:
    """The hub id for an alias, otherwise ``model`` itself."""
    return ALIASES.get(model, model)


def _load_kwargs(config: dict) -> dict:
    # The safety checker is never used (nothing is decoded to pixels when localizing) and is large.
    if "safety_checker" in config:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


# Weight files by format. diffusers and transformers read both; memcore reads safetensors only, since
# unpickling a file can run any code it holds.
_SAFETENSORS = (".safetensors", ".safetensors.index.json")
_PICKLED = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")
_CONVERT = (
    "convert it once, where you trust the file: "
    "DiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER) writes safetensors"
)


def _folder_error(model: str, message: str, **fields) -> MemcoreError:
    return MemcoreError(message, param="model", value=model, **fields)


def _read_json(model: str, file: Path, shown: str):
    """The parsed content of ``file`` (``shown`` is how messages name it), else a one-line error."""
    try:
        return json.loads(file.read_bytes())
    except OSError as exc:
        raise _folder_error(model, "cannot read {file} ({reason})", file=shown, reason=exc.strerror or exc) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _folder_error(model, "{file} is not valid JSON ({reason})", file=shown, reason=exc) from None
    except RecursionError:
        raise _folder_error(model, "{file} is not valid JSON (nested too deep)", file=shown) from None


def _pipeline_class(model: str, config: dict):
    import diffusers

    if "_class_name" not in config:
        raise _folder_error(model, "model_index.json names no pipeline class (_class_name)")
    name = config["_class_name"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise _folder_error(model, "model_index.json: _class_name {name!r} is not a diffusers pipeline", name=name)
    return cls


def _component_class(model: str, name: str, library: str, class_name: str):
    import importlib

    import diffusers.pipelines

    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    elif isinstance(getattr(diffusers.pipelines, library, None), types.ModuleType):
        module = getattr(diffusers.pipelines, library)  # e.g. ["stable_diffusion", "StableDiffusionSafetyChecker"]
    else:
        raise _folder_error(
            model, "model_index.json: component {name} comes from {library!r}, not from diffusers or transformers",
            name=name, library=library,
        )
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise _folder_error(
            model, "model_index.json: component {name}: {library} has no class {cls!r}", name=name, library=library, cls=class_name
        )
    return cls


def _check_folder(model: str, path: Path) -> dict:
    """The parsed ``model_index.json`` of the pipeline folder ``path``, once its layout is checked.

    Each failure is one line naming the file or the component: no ``model_index.json`` or one that
    is not a JSON object naming a diffusers pipeline; a component with no folder, an empty one, a
    JSON file that does not parse, a class its library lacks, or a model whose weights are not in
    safetensors (pickled weights are refused, with how to convert them).
    """
    if not path.is_dir():
        raise _folder_error(model, "a file, not a diffusers pipeline folder (a folder holding model_index.json)")
    index = path / "model_index.json"
    if not index.is_file():
        raise _folder_error(model, "not a diffusers pipeline folder (no model_index.json)")
    config = _read_json(model, index, "model_index.json")
    if not isinstance(config, dict):
        raise _folder_error(model, "model_index.json is not a JSON object")
    pipeline = _pipeline_class(model, config)
    skipped = _load_kwargs(config)
    # as diffusers reads it: the components are the parameters of the pipeline without a default, and
    # its optional components; the other entries are settings
    parameters = inspect.signature(pipeline.__init__).parameters
    optional = getattr(pipeline, "_optional_components", ())
    for name, spec in config.items():
        if name not in parameters or name in skipped:
            continue
        if parameters[name].default is not inspect.Parameter.empty and name not in optional:
            continue
        if spec == [None, None]:  # not part of this pipeline
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)):
            raise _folder_error(
                model, "model_index.json: component {name} is {spec}, not [library, class]", name=name, spec=json.dumps(spec)
            )
        _check_component(model, path, name, _component_class(model, name, *spec))
    return config


def _check_component(model: str, path: Path, name: str, cls: type) -> None:
    folder = path / name
    if not folder.is_dir():
        raise _folder_error(model, "component {name} has no folder {name}/", name=name)
    try:
        files = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    except OSError as exc:
        raise _folder_error(model, "cannot read {name}/ ({reason})", name=name, reason=exc.strerror or exc) from None
    if not files:
        raise _folder_error(model, "component {name}: its folder {name}/ holds no files", name=name)
    for file in files:
        if file.endswith(".json"):
            content = _read_json(model, folder / file, f"{name}/{file}")
            if not isinstance(content, dict):  # configs, tokenizers, vocabularies, weight indexes
                raise _folder_error(model, "{file} is not a JSON object", file=f"{name}/{file}")
    if not issubclass(cls, torch.nn.Module) or any(file.endswith(_SAFETENSORS) for file in files):
        return
    pickled = [file for file in files if file.endswith(_PICKLED)]
    if pickled:
        raise _folder_error(
            model, "component {name} holds its weights only as pickle ({file}), which memcore does not load "
            "(unpickling can run any code); {convert}",
            name=name, file=f"{name}/{pickled[0]}", convert=_CONVERT,
        )
    raise _folder_error(model, "component {name}: no weights (*.safetensors) in {name}/", name=name)


def _failed_component(exc: BaseException) -> str | None:
    """The pipeline component diffusers was loading when ``exc`` was raised, when it was loading one."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == "load_sub_model" and frame.f_globals.get("__name__", "").startswith("diffusers."):
            name = frame.f_locals.get("name")
            return name if isinstance(name, str) else None
    return None


def _raised_in(exc: BaseException, module: str) -> bool:
    """Whether ``exc`` was raised by code of ``module``."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    return bool(frames) and frames[-1][0].f_globals.get("__name__") == module


def _from_folder(model: str, path: Path, dtype: torch.dtype):
    """The pipeline in the folder ``path``; whatever the folder holds that cannot be loaded is one line.

    Past the checks of :func:`_check_folder`, diffusers and transformers raise OSError for missing or
    unreadable files, ValueError for configs or weights that do not fit (shapes, values); safetensors
    raises SafetensorError for a damaged weights file, huggingface_hub's strict dataclasses
    StrictDataclassError for a config field of the wrong type, and transformers RuntimeError from
    its loading report when a checkpoint's names or shapes differ from its config. Anything else is
    a bug and keeps its traceback.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    config = _check_folder(model, path)
    try:
        return DiffusionPipeline.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, **_load_kwargs(config)
        )
    except RuntimeError as exc:
        if not _raised_in(exc, "transformers.utils.loading_report"):
            raise
        raise _cannot_load(model, exc, "its weights do not match its config.json (names or shapes differ)") from None
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as exc:
        raise _cannot_load(model, exc, _one_line(exc)) from None


def _cannot_load(model: str, exc: BaseException, reason: str) -> MemcoreError:
    component = _failed_component(exc)
    if component is None:
        return _folder_error(model, "cannot load the pipeline: {reason}", reason=reason)
    return _folder_error(model, "cannot load component {name}: {reason}", name=component, reason=reason)


# How long the hub's endpoint may take to answer before an uncached model is refused: without this,
# an unreachable hub costs about 30 s of retries before the same refusal.
HUB_PROBE_TIMEOUT_S = 3.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is an answer: do not follow it
        return None


def _probe(endpoint: str, timeout: float) -> str | None:
    """None when ``endpoint`` answers an HTTP request (with any status), else why it did not."""
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # any status is an answer
        return None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # the TLS handshake got an answer; the hub client takes over
            return None
        return str(exc.reason)
    except (OSError, http.client.HTTPException) as exc:  # a timeout while reading, a dropped connection
        return str(exc) or type(exc).__name__
    except ValueError as exc:  # HF_ENDPOINT is no http(s) URL
        return str(exc)


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub at ``endpoint`` answers within ``timeout`` seconds, else why it did not.

    The request runs in a daemon thread because resolving the host name is not bounded by socket
    timeouts; a thread still waiting after ``timeout`` is left behind and exits with the process.
    """
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_probe(endpoint, timeout))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            outcome.append(exc)

    thread = threading.Thread(target=run, name="memcore-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"nothing within {timeout:g} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _from_hub(model: str, repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    try:
        config = DiffusionPipeline.load_config(repo_id, local_files_only=True)
        local_only = True
    except (OSError, ValueError):
        config, local_only = None, False
    if not local_only and constants.is_offline_mode():
        raise MemcoreError(
            "{repo_id} is not in the local cache ({cache}) and the hub is offline (HF_HUB_OFFLINE is set); "
            "download it first or pass {path} to a diffusers folder",
            param="model", value=model, repo_id=repo_id, cache=constants.HF_HUB_CACHE, path=Param("model", "PATH"),
        )
    if not local_only:
        unreachable = hub_unreachable(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
        if unreachable is not None:
            raise MemcoreError(
                "{repo_id} is not in the local cache ({cache}) and the hub at {endpoint} does not answer ({reason}; "
                "HF_HUB_OFFLINE is unset); download it where the hub is reachable, or pass {path} to a diffusers folder",
                param="model", value=model, repo_id=repo_id, cache=constants.HF_HUB_CACHE,
                endpoint=constants.ENDPOINT, reason=unreachable, path=Param("model", "PATH"),
            )
    try:
        if config is None:
            logger.info("memcore: %s not in the local cache; downloading from the hub", repo_id)
            config = DiffusionPipeline.load_config(repo_id)
        return DiffusionPipeline.from_pretrained(
            repo_id, dtype=dtype, local_files_only=local_only, **_load_kwargs(config)
        )
    except (OSError, ValueError, ConnectionError) as exc:
        raise MemcoreError(
            "cannot load {repo_id}: not in the local cache ({cache}) and the hub could not be reached ({reason}); "
            "pass {path} to a diffusers folder",
            param="model", value=model, repo_id=repo_id, cache=constants.HF_HUB_CACHE, reason=_first_line(exc),
            path=Param("model", "PATH"),
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_pipeline(model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Load a diffusers pipeline and move it to ``device`` in ``dtype``.

    ``model`` is one of ``TINY_MODELS`` (``tiny``, ``tiny-sd2``, ``tiny-sdxl``, ``tiny-pixart``, ``tiny-sd3``: the
    embedded random-weight models), an alias (``sd15``, ``sdxl``, ``pixart``, ...), a local
    diffusers folder (weights in safetensors), or a hub id. The local cache is tried first; the hub
    is used only when the model is not cached, ``HF_HUB_OFFLINE`` is unset and the hub answers within
    ``HUB_PROBE_TIMEOUT_S``.
    """
    dev, dt = resolve_device(device, dtype)
    if model in FAMILIES:
        pipe = FAMILIES[model](dtype=dt)
    elif model in DEMO_MODELS:
        from memcore.demo import model_folder

        folder = model_folder(model)
        pipe = _from_folder(str(folder), folder, dt)
    else:
        path = Path(model).expanduser()
        repo_id = resolve_model_id(model)
        try:
            exists = path.exists()
        except OSError as exc:  # a folder on the way that cannot be read
            raise MemcoreError("cannot look at it ({reason})", param="model", value=model, reason=exc.strerror or exc) from None
        if exists:
            pipe = _from_folder(model, path, dt)
        elif model.startswith((".", "/", "~")) or repo_id.count("/") != 1:
            raise MemcoreError(
                f"no such folder, and not a known alias ({', '.join(ALIASES)}) or hub id", param="model", value=model
            )
        else:
            pipe = _from_hub(model, repo_id, dt)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_id(pipe) -> str:
    """The name a pipeline was loaded from (hub id or folder), for provenance."""
    return str(getattr(pipe.config, "_name_or_path", "") or type(pipe).__name__)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MemcoreError(f"{type(pipe).__name__} has no unet or transformer to localize in")
