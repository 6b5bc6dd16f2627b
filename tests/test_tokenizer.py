"""The tokenizer works offline, with a pad id distinct from EOS and left padding."""

import json

import pytest

import ppojax
from ppojax.io import tokenizer as tok_module


def test_hello_world_offline():
    tok = ppojax.load_tokenizer("gpt2")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_offline_files_are_gpt2s_bpe():
    enc, bpe = tok_module._gpt2_bpe_files()
    vocab = json.loads(enc.read_text())
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    assert bpe.read_text().splitlines()[0].startswith("#version")


def test_pad_is_distinct_from_eos_and_on_the_left():
    tok = ppojax.load_tokenizer("gpt2")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    batch = tok(["Hello world<|endoftext|>", "Hi"], padding=True)
    assert batch["input_ids"][0][-1] == 50256 and batch["attention_mask"][0][-1] == 1  # the real EOS is kept
    assert batch["attention_mask"][1] == [0, 0, 1]
    assert batch["input_ids"][1][0] == tok.pad_token_id
    assert tok.decode(batch["input_ids"][1], skip_special_tokens=True) == "Hi"


def test_local_directory_round_trip(tmp_path):
    tok = ppojax.load_tokenizer("gpt2")
    tok.save_pretrained(tmp_path / "tok")
    again = ppojax.load_tokenizer(tmp_path / "tok")
    assert again("Hello world")["input_ids"] == [15496, 995] and again.pad_token_id == tok.pad_token_id


def test_unknown_offline_tokenizer_errors():
    with pytest.raises(ppojax.HubUnreachableError, match="cannot be reached"):
        ppojax.load_tokenizer("some-org/not-cached-anywhere")
    with pytest.raises(FileNotFoundError):
        ppojax.load_tokenizer("./no/such/dir")
