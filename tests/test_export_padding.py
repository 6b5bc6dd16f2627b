"""Exports run padded batches in transformers: for each family, with and without LoRA, the exported tokenizer pads
with an id inside the exported vocabulary and a padded batch through ``transformers`` gives, at every real token,
the logits of each text alone (the reference: the same model on the unpadded text)."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
TEXTS = ["The movie was", "The new teacher is here today and"]


def _check_padded_batch(export: Path, vocab_size: int) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert tok.pad_token_id is not None and tok.pad_token_id < vocab_size
    assert len(tok) <= vocab_size == model.get_input_embeddings().weight.shape[0]
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        logits = model(**batch).logits  # IndexError here before the fix: pad id = vocab_size
        for i, text in enumerate(TEXTS):
            alone = model(**tok([text], return_tensors="pt")).logits[0]
            real = logits[i][batch["attention_mask"][i] > 0]
            np.testing.assert_allclose(real.numpy(), alone.numpy(), atol=1e-4)


@pytest.mark.parametrize("family, lora", [("gpt2", 0), ("gpt2", 2), ("llama", 0), ("llama", 2)])
def test_a_padded_batch_runs_through_transformers_from_every_export(tmp_path, monkeypatch, family, lora):
    from ppojax.train import build_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sets = ["iterations=1", "logging.tensorboard=false", "logging.samples_every=0", f"model.family={family}",
            f"lora.rank={lora}"]
    with build_run(TINY, tmp_path / "run", overrides=sets) as run:
        assert run.train().exit_code == 0
        vocab = run.model_config.vocab_size
    _check_padded_batch(tmp_path / "run" / "export", vocab)
    if lora:  # the adapter's own copy of the tokenizer pads inside the vocabulary too
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "export-adapter")
        assert tok.pad_token_id < vocab and len(tok) <= vocab and tok.padding_side == "right"


def test_ppojax_reads_the_export_back_with_its_own_pad():
    """Loading an export with ppojax.load_tokenizer gives back a pad distinct from EOS (the training pitfall)."""
    import tempfile

    from ppojax.io.tokenizer import load_tokenizer, save_for_export

    tok = load_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as d:
        save_for_export(tok, d, 50257)
        saved = transformers.AutoTokenizer.from_pretrained(d)
        assert (saved.pad_token_id, len(saved), saved.padding_side) == (tok.eos_token_id, 50257, "right")
        again = load_tokenizer(d)
    assert again.pad_token_id != again.eos_token_id and again.padding_side == "left"
    assert again("The movie was")["input_ids"] == tok("The movie was")["input_ids"]


def test_an_adapter_trained_on_the_offline_gguf_names_its_true_base(tmp_path, monkeypatch):
    """PEFT's config names the hub model; a README beside it says the adapter was trained on the dequantized GGUF
    (and nothing is written for a base that came from the hub or a directory)."""
    from pathlib import Path

    from ppojax.io import hub
    from ppojax.train import run as runs

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(hub, "loaded_offline", lambda n: Path("/x/SmolLM2-135M-Instruct.Q4_1.gguf") if n == name
                        else None)
    runs._note_offline_base(tmp_path, "gpt2")
    assert not (tmp_path / "README.md").exists()
    runs._note_offline_base(tmp_path, name)
    text = (tmp_path / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and name in text and "/x/" not in text
