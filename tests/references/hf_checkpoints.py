"""Small Hugging Face checkpoint directories made in the test, never downloaded: a byte-level BPE
trained with ``tokenizers`` and a random transformers ``Mamba2ForCausalLM`` saved with
``save_pretrained`` (the layout ``spikemar.models.from_pretrained`` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spikemar.tokenizer import HFTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


def bpe_tokenizer(vocab_size: int, text: str = TEXT) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) with ``<|endoftext|>`` as id 0 and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return HFTokenizer(tok, eos_id=0)


def begin_of_text_tokenizer() -> HFTokenizer:
    """The test BPE with a post-processor that puts ``<|begin_of_text|>`` (id 300) before every
    text, as Llama-3's tokenizer (Llamba's) does; end of text stays id 0."""
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_str(bpe_tokenizer(300).to_dict()["json"])
    raw.add_special_tokens(["<|begin_of_text|>"])
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return HFTokenizer(raw, eos_id=0)


def write_mamba2_checkpoint(
    directory: str | Path, *, tied: bool = False, seed: int = 0, tokenizer: bool = True,
    **overrides: Any,
):  # fmt: skip
    """A tiny random ``Mamba2ForCausalLM`` (vocabulary 300) saved with ``save_pretrained``, with a
    BPE tokenizer of the same vocabulary; returns the transformers model (eval mode)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8,
                    head_dim=8, num_heads=8, expand=2, n_groups=1, conv_kernel=4, chunk_size=16,
                    tie_word_embeddings=tied)  # fmt: skip
    model = Mamba2ForCausalLM(Mamba2Config(**{**settings, **overrides})).eval()
    with torch.no_grad():  # away from the initial values, so a dropped tensor would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # transformers refuses safetensors for tied Mamba-2 weights: a tied model goes to .bin
    model.save_pretrained(directory, safe_serialization=not tied)
    if tokenizer:
        bpe_tokenizer(model.config.vocab_size).save(directory)
    return model
