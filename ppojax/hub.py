"""Hugging Face GPT-2 checkpoints in and out, through an explicit key map.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` when torch is
installed), or a hub id such as ``gpt2``. Every tensor of the checkpoint is used or the load fails naming the
leftovers; every shape is checked; the LM head is tied to the token embedding, as in GPT-2.

HF key (``transformer.`` prefix optional)      ppojax param (blocks stacked on a leading ``[n_layer]`` axis)
  wte.weight            [V, D]                   transformer/wte/embedding
  wpe.weight            [P, D]                   transformer/wpe/embedding
  h.{i}.ln_1.{weight,bias}                       transformer/h/ln_1/{scale,bias}[i]
  h.{i}.attn.c_attn.{weight [D,3D], bias}        transformer/h/c_attn/{kernel,bias}[i]
  h.{i}.attn.c_proj.{weight [D,D], bias}         transformer/h/c_proj/{kernel,bias}[i]
  h.{i}.ln_2.{weight,bias}                       transformer/h/ln_2/{scale,bias}[i]
  h.{i}.mlp.c_fc.{weight [D,4D], bias}           transformer/h/c_fc/{kernel,bias}[i]
  h.{i}.mlp.c_proj.{weight [4D,D], bias}         transformer/h/c_proj_mlp/{kernel,bias}[i]
  ln_f.{weight,bias}                             transformer/ln_f/{scale,bias}
  lm_head.weight        [V, D] (optional)        tied: must equal wte.weight
GPT-2's Conv1D stores weights as [in, out], Flax's kernel layout, so no transpose is needed. The non-parameter
buffers of old checkpoints (``h.{i}.attn.bias``, ``h.{i}.attn.masked_bias``: causal masks) are recognised and
skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from ppojax.models.gpt2 import GPT2Config

HUB_GPT2_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")

# (HF name inside a block, ppojax name, leaf) for the per-layer tensors.
_BLOCK_KEYS = (
    ("ln_1.weight", "ln_1", "scale"),
    ("ln_1.bias", "ln_1", "bias"),
    ("attn.c_attn.weight", "c_attn", "kernel"),
    ("attn.c_attn.bias", "c_attn", "bias"),
    ("attn.c_proj.weight", "c_proj", "kernel"),
    ("attn.c_proj.bias", "c_proj", "bias"),
    ("ln_2.weight", "ln_2", "scale"),
    ("ln_2.bias", "ln_2", "bias"),
    ("mlp.c_fc.weight", "c_fc", "kernel"),
    ("mlp.c_fc.bias", "c_fc", "bias"),
    ("mlp.c_proj.weight", "c_proj_mlp", "kernel"),
    ("mlp.c_proj.bias", "c_proj_mlp", "bias"),
)
_TOP_KEYS = (
    ("wte.weight", "wte", "embedding"),
    ("wpe.weight", "wpe", "embedding"),
    ("ln_f.weight", "ln_f", "scale"),
    ("ln_f.bias", "ln_f", "bias"),
)
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved as GPT-2; the message says what is wrong and what to do."""


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


# ----------------------------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf: Dict[str, Any], source: str = "config.json", **overrides) -> GPT2Config:
    """GPT2Config from a transformers ``config.json`` dict; refuses other architectures and unsupported options."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{source}: model_type is {model_type!r} (architectures {archs}); ppojax loads GPT-2 checkpoints "
            "(model_type 'gpt2') only"
        )
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (ppojax's GPT-2 uses {allowed[0]!r})")
    if hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{source}: tie_word_embeddings=false; ppojax's GPT-2 ties the LM head to wte")
    try:
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_embd=int(hf["n_embd"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_inner=None if hf.get("n_inner") is None else int(hf["n_inner"]),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r} of a GPT-2 config") from None
    fields.update(overrides)
    return GPT2Config(**fields)


def config_to_hf(config: GPT2Config) -> Dict[str, Any]:
    """A transformers GPT-2 ``config.json`` dict for ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def _read_tensors(directory: Path) -> Tuple[Dict[str, np.ndarray], str]:
    st = directory / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        tensors = {}
        try:
            with safe_open(str(st), framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:
            if "bfloat16" in str(e).lower() or "bf16" in str(e).lower():
                return _read_tensors_torch(st), st.name
            raise CheckpointError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        return tensors, st.name
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    if shards:
        from safetensors.numpy import load_file

        tensors = {}
        for shard in shards:
            tensors.update(load_file(str(shard)))
        return tensors, "model-*.safetensors"
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


def _read_tensors_torch(path: Path) -> Dict[str, np.ndarray]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} stores bfloat16 tensors; reading them needs torch installed") from None
    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def params_from_hf_tensors(config: GPT2Config, tensors: Dict[str, np.ndarray], source: str = "checkpoint",
                           dtype=None):
    """Map HF GPT-2 tensors onto ppojax's stacked parameter tree. Fails on leftovers, gaps and shape mismatches."""
    dtype = dtype or config.storage_dtype
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    remaining = dict(tensors)
    D, V, P, L, F = config.n_embd, config.vocab_size, config.n_positions, config.n_layer, config.mlp_width
    expected_top = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    expected_block = {
        "ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
    }
    missing = []

    def take(key, shape):
        full = prefix + key
        if full not in remaining:
            missing.append(full)
            return None
        value = np.asarray(remaining.pop(full))
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {full} has shape {tuple(value.shape)}, expected {tuple(shape)} for {config}"
            )
        return value

    import jax.numpy as jnp

    trunk: Dict[str, Any] = {}
    for hf_key, module, leaf in _TOP_KEYS:
        value = take(hf_key, expected_top[hf_key])
        trunk.setdefault(module, {})[leaf] = value
    blocks: Dict[str, Dict[str, list]] = {}
    for i in range(L):
        for hf_key, module, leaf in _BLOCK_KEYS:
            value = take(f"h.{i}.{hf_key}", expected_block[hf_key])
            blocks.setdefault(module, {}).setdefault(leaf, []).append(value)
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors of a {L}-layer GPT-2 are missing, e.g. {missing[:5]}; is config.json "
            "from the same checkpoint?"
        )
    lm_head = remaining.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(np.asarray(lm_head), trunk["wte"]["embedding"]):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; ppojax's GPT-2 ties the two")
    leftovers = [k for k in remaining if not k.endswith(_BUFFER_SUFFIXES)]
    if leftovers:
        raise CheckpointError(
            f"{source}: {len(leftovers)} tensors have no place in GPT-2's key map: {sorted(leftovers)[:10]}. "
            "Is this a GPT-2 checkpoint with an extra head (value/score head)? Load its trunk with the matching API."
        )
    trunk["h"] = {m: {leaf: np.stack(vals) for leaf, vals in leaves.items()} for m, leaves in blocks.items()}
    import jax

    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), {"transformer": trunk})


def params_to_hf_tensors(config: GPT2Config, params) -> Dict[str, np.ndarray]:
    """The inverse map: ppojax params -> ``transformer.*`` float32 tensors (the LM head is tied, so not written)."""
    trunk = params["transformer"]
    out = {}
    for hf_key, module, leaf in _TOP_KEYS:
        out["transformer." + hf_key] = trunk[module][leaf]
    for hf_key, module, leaf in _BLOCK_KEYS:
        stacked = trunk["h"][module][leaf]
        for i in range(config.n_layer):
            out[f"transformer.h.{i}.{hf_key}"] = stacked[i]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# Public API


def load_pretrained(name_or_path: str | os.PathLike, **config_overrides):
    """``(GPT2Config, params)`` from a hub id (``gpt2``, ``gpt2-medium``, ...) or a local transformers directory.

    ``config_overrides`` set numerics fields such as ``dtype="bfloat16"`` or ``remat=True``. Params are stored in
    ``param_dtype`` (float32 by default).
    """
    directory = resolve_checkpoint_dir(name_or_path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    config = config_from_hf(hf_config, source=str(config_file), **config_overrides)
    tensors, fname = _read_tensors(directory)
    params = params_from_hf_tensors(config, tensors, source=str(directory / fname))
    return config, params


def save_pretrained(path: str | os.PathLike, config: GPT2Config, params) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.GPT2LMHeadModel.from_pretrained`` loads.

    Accepts LM params or scalar-head params (the head is dropped: the export is the LM). The directory is written
    to a temporary sibling and renamed into place, so a failed save leaves nothing behind; an existing directory is
    replaced only after the new one is complete.
    """
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    if not isinstance(params, dict) or "transformer" not in params:
        raise CheckpointError("save_pretrained: params must be a ppojax GPT-2 param tree with a 'transformer' entry")
    tensors = params_to_hf_tensors(config, params)  # fails before anything is written
    expected = {
        "transformer.wte.weight": (config.vocab_size, config.n_embd),
        "transformer.wpe.weight": (config.n_positions, config.n_embd),
    }
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise CheckpointError(f"save_pretrained: {key} has shape {tensors[key].shape}, config says {shape}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"save_pretrained: cannot create {parent}: {e}") from e
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save_pretrained: {path} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            old.rmdir()
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_WARNED: set = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` each distinct message once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
