"""llama.cpp GGUF files: typed metadata and dequantized tensors, read through the ``gguf`` package (llama.cpp's own
reader, ``pip install gguf``; in ppojax's ``offline`` extra).

A GGUF file is a header of typed key-value metadata (``general.architecture``, ``llama.block_count``, the tokenizer's
vocabulary, ...) followed by tensors, each stored in a ggml type: a float type (F32, F16, BF16) or a block
quantization. A block of 32 weights in Q4_1, for instance, holds a float16 scale ``d``, a float16 minimum ``m`` and
32 4-bit codes ``q``, and decodes as ``w = d * q + m``; Q8_0 holds a scale and 32 int8 codes, ``w = d * q``.
:meth:`GGUFFile.tensor` returns the decoded float32 values (``gguf.quants.dequantize``) in numpy's row-major
order, which for a weight matrix is the ``[out, in]`` layout of the torch checkpoint it was converted from (ggml
lists dimensions innermost first, so the shape is reversed).

Which tensors mean what is the model family's business (``ModelFamily.gguf``, e.g. ``ppojax/models/llama/gguf.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ppojax.models import CheckpointError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
"""ggml tensor types ppojax decodes: the float types, the legacy block quantizations and the k-quants."""


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: `pip install gguf` (or "
                              "`pip install 'ppojax[offline]'`)") from None
    return gguf


class GGUFFile:
    """One GGUF file, opened read-only (memory-mapped): metadata by key, tensors by name, decoded on request."""

    def __init__(self, path: str | os.PathLike):
        gguf = _import_gguf()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # bad magic, truncated file, unknown version
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self._value_type = gguf.GGUFValueType
        self._tensors = {t.name: t for t in self._reader.tensors}

    @property
    def architecture(self) -> Optional[str]:
        """``general.architecture``: 'llama', 'qwen2', ..."""
        return self.get("general.architecture")

    def __contains__(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key``: an int, float, bool or str, or a list of them for an array."""
        field = self._reader.fields.get(key)
        if field is None or not field.types:
            return default
        VT = self._value_type
        if field.types[0] == VT.ARRAY:
            if field.types[-1] == VT.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i].tolist()[0] for i in field.data]
        if field.types[0] == VT.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        value = field.parts[field.data[0]].tolist()[0]
        return bool(value) if field.types[0] == VT.BOOL else value

    def array_length(self, key: str) -> Optional[int]:
        """Number of elements of array metadata ``key`` (None when absent), without decoding them."""
        field = self._reader.fields.get(key)
        if field is None or not field.types or field.types[0] != self._value_type.ARRAY:
            return None
        return len(field.data)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        """The ggml type name of tensor ``name`` ('F32', 'Q4_1', ...)."""
        return self._tensors[name].tensor_type.name

    def tensor_shape(self, name: str) -> tuple:
        """Shape of tensor ``name`` in numpy order (ggml's dimensions reversed): ``[out, in]`` for a weight."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

    def check_types(self) -> None:
        """One error listing every tensor whose ggml type ppojax cannot decode (checked before any decoding)."""
        bad = {}
        for name in self._tensors:
            kind = self.tensor_type(name)
            if kind not in SUPPORTED_TYPES:
                bad.setdefault(kind, []).append(name)
        if bad:
            found = "; ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]})" for kind, names in sorted(bad.items()))
            raise CheckpointError(f"{self.path}: unsupported GGUF tensor type(s): {found}. ppojax decodes "
                                  f"{', '.join(SUPPORTED_TYPES)}; re-quantize the model to one of those")

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` decoded to float32, shaped :meth:`tensor_shape`."""
        gguf = _import_gguf()
        t = self._tensors[name]
        if t.tensor_type.name not in SUPPORTED_TYPES:
            self.check_types()
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(self.tensor_shape(name))


def load_gguf(path: str | os.PathLike, **config_overrides):
    """``(config, params)`` of a GGUF file, by the family registered for its ``general.architecture``."""
    from ppojax.models import family_for_gguf_architecture

    f = GGUFFile(path)
    source = str(f.path)
    family = family_for_gguf_architecture(f.architecture, source)
    f.check_types()
    config = family.gguf.config_from_gguf(f, source, **config_overrides)
    return config, family.gguf.params_from_gguf(config, f, source)
