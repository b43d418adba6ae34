"""Tiny Hugging Face tokenizers and causal LMs built offline (nothing downloads) for the LLM platform tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "home", "and", "then", "it", "slept"]
SPECIALS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"

#: A Llama architecture small enough for sub-second tests.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}


def make_tokenizer(
    folder: Path,
    words: list[str] = WORDS,
    scheme: str = "plain",
    chat_template: str | None = None,
    specials: dict[str, str] = SPECIALS,
) -> Path:
    """A WordLevel tokenizer over ``specials`` + ``words`` saved with ``save_pretrained`` into ``folder``.

    ``scheme``: ``"plain"`` (whitespace split), ``"byte_level"`` (tokens written GPT-2 style: ``Ġword`` for a
    word after a space) or ``"metaspace"`` (SentencePiece style: ``▁word``). Ids: the specials first, in order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    marker = {"plain": "", "byte_level": "Ġ", "metaspace": "▁"}[scheme]
    tokens = list(specials.values()) + [marker + w for w in words] + ([w for w in words] if marker else [])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    if scheme == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
    elif scheme == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if chat_template is not None:
        fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def make_model_folder(folder: Path, config: dict[str, Any] = TINY_LLAMA, seed: int = 0) -> Path:
    """A randomly initialised causal LM saved with ``save_pretrained`` (safetensors) into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(str(folder))
    return folder
