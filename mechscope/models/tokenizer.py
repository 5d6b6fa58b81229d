"""Turning user input into token ids, and the byte-level tokenizer random models get by default."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

Input = str | Sequence[str] | torch.Tensor | np.ndarray | Sequence[int]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 0-255) and ``<|endoftext|>`` (256) as BOS/EOS/PAD.

    Random models built from a config have no tokenizer of their own; this one needs no download and
    round-trips any text exactly.
    """
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    input: Input,
    prepend_bos: bool | None = None,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens [batch, pos], attention_mask [batch, pos] or None)`` for text or token ids (a tensor, a
    numpy array or a list of ints).

    ``prepend_bos=None`` keeps the tokenizer's own behaviour; ``True`` makes sure each text starts with
    BOS; ``False`` adds no special tokens. Texts of different lengths are padded on ``padding_side``
    and get a mask (1 = real token); equal lengths get ``None``.
    """
    if isinstance(input, np.ndarray):
        input = torch.from_numpy(input)
    if isinstance(input, torch.Tensor):
        tokens = input if input.ndim == 2 else input.reshape(1, -1)
        return tokens.long(), None
    if isinstance(input, str):
        input = [input]
    if not isinstance(input, Sequence) or len(input) == 0:
        raise TypeError("input must be a string, a non-empty list of strings, or token ids")
    if all(isinstance(t, int) for t in input):
        return torch.tensor([list(input)], dtype=torch.long), None
    if not all(isinstance(t, str) for t in input):
        raise TypeError("a list input must hold only strings or only token ids")
    ids = [tokenizer(t, add_special_tokens=prepend_bos is None)["input_ids"] for t in input]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but this tokenizer has no BOS token; pass prepend_bos=None")
        ids = [s if s[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *s] for s in ids]
    longest = max(len(s) for s in ids)
    if all(len(s) == longest for s in ids):
        return torch.tensor(ids, dtype=torch.long), None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    tokens = torch.full((len(ids), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, s in enumerate(ids):
        sl = slice(longest - len(s), longest) if padding_side == "left" else slice(0, len(s))
        tokens[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return tokens, mask


def token_strings(tokenizer: PreTrainedTokenizerBase, d_vocab: int) -> list[str]:
    """The string of every token id ``0..d_vocab-1`` (ids past the tokenizer's vocabulary, as padded
    embeddings have them, read ``"<id N>"``)."""
    known = min(len(tokenizer), d_vocab)
    return [*tokenizer.batch_decode([[i] for i in range(known)]), *(f"<id {i}>" for i in range(known, d_vocab))]
