"""``fastdiff text`` and the pydoc corpus / objective used to train a built-in text model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fastdiff.cli import main
from fastdiff.models import pydoc_text
from fastdiff.pipelines import MaskedDiffusionLMPipeline
from fastdiff.schedulers import MaskedDiffusionScheduler


@pytest.fixture(scope="module")
def tokenizer():
    train, _ = pydoc_text.corpus()
    return pydoc_text.train_tokenizer(train[:5])


def test_corpus_split_and_tokenizer(tokenizer):
    train, valid = pydoc_text.corpus()
    assert len(valid) >= 10 and not set(train) & set(valid)
    assert tokenizer.mask_token_id is not None and tokenizer.eos_token_id is not None
    text = 'The "assert" statement\n'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    stream = pydoc_text.token_stream(tokenizer, train[:2])
    assert int((stream == tokenizer.eos_token_id).sum()) == 2


def test_objective_bounds_and_trains(tokenizer):
    model = pydoc_text.build_model(tokenizer)
    batch = pydoc_text.token_stream(tokenizer, pydoc_text.corpus()[0][:1])[:128].reshape(4, 32)
    elbo = pydoc_text.masked_diffusion_loss(model, batch, tokenizer.mask_token_id, torch.Generator().manual_seed(0))
    plain = pydoc_text.masked_diffusion_loss(model, batch, tokenizer.mask_token_id, torch.Generator().manual_seed(0),
                                             elbo=False)
    assert torch.isfinite(elbo) and torch.isfinite(plain)
    plain.backward()
    assert model.get_input_embeddings().weight.grad is not None
    evaluated = pydoc_text.evaluate(model.eval(), tokenizer, pydoc_text.corpus()[1][:2], passes=1)
    assert evaluated["valid_perplexity_bound"] > 1 and evaluated["valid_tokens"] % pydoc_text.SEQUENCE_LENGTH == 0


def test_cli_text(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    MaskedDiffusionLMPipeline(model, tokenizer, MaskedDiffusionScheduler()).save_pretrained(tmp_path / "pipe")
    path = tmp_path / "text.json"
    assert main(["text", "--model", str(tmp_path / "pipe"), "--prompt", "Slicings\n", "--gen-length", "16",
                 "--sampler", "fast-dllm:threshold=0.9", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["nfe"] <= 16 and len(record["sequences"][0]) == 16
    assert "model calls for 16 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["text", "--model", str(tmp_path / "pipe"), "--gen-length", "10", "--block-length", "4"])
    assert "must be a multiple of block_length" in capsys.readouterr().err
