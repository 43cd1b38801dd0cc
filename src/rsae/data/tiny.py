"""Tiny randomly initialised causal LMs saved as local Hugging Face directories (no download).

For tests and smoke runs: `make_tiny_lm(tmp_path / "lm", "llama")` writes a model and a BPE
tokenizer trained on `text` that `load_lm(<dir>)` and `lm.name_or_path=<dir>` accept.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

FAMILIES = ("gpt2", "neox", "llama", "gemma2")
SPECIAL = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

_WORDS = ("the king queen lord lady speak night day love death sword crown castle fair foul good ill "
          "what where when why how thou thee thy art hath doth shall will must may not and or but if "
          "come go stay fly run see hear tell know think dream sleep wake live die friend foe heart "
          "mind soul blood tears joy grief honour shame gold silver stone fire water air earth sea sky").split()


def sample_text(n_paragraphs: int = 200, seed: int = 0) -> str:
    """Deterministic pseudo-English paragraphs separated by blank lines."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def train_tokenizer(text: str, vocab_size: int = 256):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `text`, with BOS/EOS/PAD/UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)


def tiny_config(family: str, vocab_size: int, tokenizer, n_layers: int = 3, d_model: int = 32, n_positions: int = 256):
    import transformers as T

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    heads = dict(num_attention_heads=2, num_hidden_layers=n_layers, hidden_size=d_model,
                 intermediate_size=2 * d_model, max_position_embeddings=n_positions, vocab_size=vocab_size, **ids)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layers,
                            n_head=2, **ids)
    if family == "neox":
        return T.GPTNeoXConfig(**heads)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=1, **heads)
    if family == "gemma2":
        return T.Gemma2Config(num_key_value_heads=1, head_dim=d_model // 2, **heads)
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")


def make_tiny_lm(directory: str | Path, family: str = "llama", text: str | None = None, vocab_size: int = 256,
                 n_layers: int = 3, d_model: int = 32, seed: int = 0) -> Path:
    """Build, save and return a local HF directory with a tiny random `family` model + tokenizer."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = train_tokenizer(text if text is not None else sample_text(), vocab_size)
    config = tiny_config(family, len(tokenizer), tokenizer, n_layers, d_model)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
