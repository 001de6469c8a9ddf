"""Load any saved dictionary as an `eval.Dictionary` (the one loader; eval/ never imports saes/ or snmf/).

Specs understood by `load_dictionary(spec, ...)`:
  <dir>                 config.json with "format": "featureatlas-sae/1"   -> saes.io.load_sae (SAE or transcoder)
  <dir>                 cfg.json (+ sae_weights.safetensors), SAELens      -> saes.saelens.import_saelens
  <dir>                 config.json with "method": snmf|diffmeans|pca      -> snmf.io.load
  <dir>@level=N, <dir>@N, or level=N
                        level N of an SNMF hierarchy (hierarchy.safetensors: Z{N}_DxK, Y{N}_KxKprev);
                        level 0 is the main fit (the same as <dir>)         -> eval.adapters.HierarchyLevelDictionary
  neurons:<hook>[:split]
                        the raw neurons at <hook> (e.g. neurons:mlp_hidden.15); `dim` (the hook's width,
                        model.hook_dim(hook) or store.dim(hook)) is required -> eval.adapters.NeuronDictionary
`dictionary_info(spec, dic)` gives the catalog.json entry (name, kind, hook, hook_out, n_features, path, level).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from featureatlas.activation_store.runs import published
from featureatlas.eval.adapters import DictionaryError, HierarchyLevelDictionary, NeuronDictionary, write_hook

SAE_FORMAT = "featureatlas-sae/1"
SNMF_METHODS = ("snmf", "diffmeans", "pca")
HIERARCHY_FILE = "hierarchy.safetensors"
_LEVEL_RE = re.compile(r"^(?P<path>.+?)@(?:level=)?(?P<level>-?\d+)$")


def parse_spec(spec: str, level: int | None = None) -> tuple[str, int | None]:
    """(path or neurons spec, level): '<dir>@level=2' or '<dir>@2' -> ('<dir>', 2); a `level` argument wins
    only when the spec has none (both given and different is an error)."""
    spec = str(spec)
    m = _LEVEL_RE.match(spec)
    if m:
        found = int(m.group("level"))
        if level is not None and level != found:
            raise DictionaryError(f"{spec!r} names level {found} but level={level} was also given; give one")
        return m.group("path"), found
    return spec, level


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DictionaryError(f"{path} is not valid JSON ({e}); the dictionary directory is damaged, save it again") \
            from None


def _kind_of(path: Path) -> tuple[str, dict]:
    """('sae' | 'saelens' | 'snmf' | 'diffmeans' | 'pca', config dict) of a saved directory."""
    if not path.is_dir():
        raise DictionaryError(f"dictionary {str(path)!r} not found: give a directory written by train-sae / "
                              "train-snmf, a SAELens directory, or neurons:<hook>")
    published(path)  # completes a publish that a crash interrupted, so config and weights match
    cfile = path / "config.json"
    if cfile.exists():
        cfg = _read_json(cfile)
        if cfg.get("format") == SAE_FORMAT:
            return "sae", cfg
        if cfg.get("method") in SNMF_METHODS:
            return cfg["method"], cfg
        if "format" in cfg:
            raise DictionaryError(f"{cfile} has format {cfg['format']!r}; this version reads {SAE_FORMAT!r}")
    if (path / "cfg.json").exists():
        return "saelens", _read_json(path / "cfg.json")
    raise DictionaryError(f"{path} holds no config.json (featureatlas SAE / SNMF) and no cfg.json (SAELens): "
                          "not a saved dictionary")


def _neurons(spec: str, dim: int | None) -> NeuronDictionary:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and parts[2] != "split"):
        raise DictionaryError(f"bad neurons spec {spec!r}; write neurons:<hook> or neurons:<hook>:split "
                              "(e.g. neurons:mlp_hidden.15)")
    if dim is None:
        raise DictionaryError(f"{spec}: the neurons' count is the hook's width; pass dim=model.hook_dim(hook) "
                              "or store.dim(hook)")
    return NeuronDictionary(parts[1], int(dim), split_sign=len(parts) == 3)


def _hierarchy_level(path: Path, base, cfg: dict, level: int) -> HierarchyLevelDictionary:
    ranks = list((cfg.get("hierarchy") or {}).get("ranks") or [])
    hfile = path / HIERARCHY_FILE
    if not ranks or not hfile.exists():
        raise DictionaryError(f"{path} has no SNMF hierarchy (level {level} asked); train with --hierarchy, "
                              "or load level 0")
    if not 0 < level < len(ranks):
        raise DictionaryError(f"{path}: level {level} does not exist; levels are 0..{len(ranks) - 1} "
                              f"(ranks {ranks})")
    from safetensors.numpy import safe_open

    want = {f"Z{level}_DxK"} | {f"Y{i}_KxKprev" for i in range(1, level + 1)}
    with safe_open(str(hfile), framework="numpy") as f:
        t = {name: f.get_tensor(name) for name in f.keys() if name in want}
    missing = sorted(want - set(t))
    if missing:
        raise DictionaryError(f"{hfile} lacks {missing}; the hierarchy was not saved completely, train it again")
    ys = tuple(np.asarray(t[f"Y{i}_KxKprev"], np.float32) for i in range(1, level + 1))
    level_cfg = {**cfg, "level": level, "n_features": int(ranks[level])}
    return HierarchyLevelDictionary(base, level, ys, np.asarray(t[f"Z{level}_DxK"], np.float32), level_cfg)


def load_dictionary(spec: str | Path, *, level: int | None = None, dim: int | None = None):
    """Load a saved dictionary (see the module docstring for the specs); returns an eval.Dictionary."""
    spec, level = parse_spec(str(spec), level)
    if spec.startswith("neurons:"):
        if level not in (None, 0):
            raise DictionaryError("neurons have no hierarchy levels; drop @level")
        return _neurons(spec, dim)
    path = Path(spec)
    kind, cfg = _kind_of(path)
    if level not in (None, 0) and kind != "snmf":
        raise DictionaryError(f"{path} is a {kind} dictionary; hierarchy levels exist for SNMF results only")
    if kind == "sae":
        from featureatlas.saes.io import load_sae

        return load_sae(path)
    if kind == "saelens":
        from featureatlas.saes.saelens import import_saelens

        return import_saelens(path)
    from featureatlas.snmf.io import load

    base = load(str(path))
    if level in (None, 0):
        return base
    return _hierarchy_level(path, base, cfg, level)


def dictionary_info(spec: str | Path, dic, name: str | None = None) -> dict:
    """The catalog.json entry of a loaded dictionary: name, kind, hook, hook_out, n_features, path, level."""
    path, level = parse_spec(str(spec))
    if path.startswith("neurons:"):
        kind = "neurons"
    else:
        kind, cfg = _kind_of(Path(path))
        if kind in ("sae", "saelens"):
            kind = "transcoder" if write_hook(dic) != dic.hook else "sae"
    return {"name": name or _default_name(path, level), "kind": kind, "hook": dic.hook, "hook_out": write_hook(dic),
            "n_features": int(dic.n_features), "path": path, "level": level or 0}


def _default_name(path: str, level: int | None) -> str:
    base = path.replace(":", "-") if path.startswith("neurons:") else Path(path).name
    return f"{base}-L{level}" if level else base


def load_for_store(spec: str | Path, store):
    """`load_dictionary`, with a neurons spec's width taken from the store's hook (checked against it)."""
    path, level = parse_spec(str(spec))
    dim = None
    if path.startswith("neurons:"):
        hook = path.split(":")[1]
        store.check_hook(hook)
        dim = store.dim(hook)
    return load_dictionary(spec, level=level, dim=dim)
