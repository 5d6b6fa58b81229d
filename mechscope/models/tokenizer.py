"""Turning user input into token ids, and the byte-level tokenizer random models get by default."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

Input = str | Sequence[str] | torch.Tensor | np.ndarray | Sequence[int]

#: the token input forms every model method accepts, for error messages
ACCEPTED = "accepted: a str, a list of str, an integer torch tensor or numpy array [pos] or [batch, pos], a list of int"


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
    if prepend_bos is not None and not isinstance(prepend_bos, (bool, np.bool_)):
        raise TypeError(f"prepend_bos must be True, False or None (the tokenizer's default), got {prepend_bos!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(input, (bytes, bytearray, memoryview)):
        raise TypeError(f"{type(input).__name__} is not token input ({ACCEPTED}); decode the bytes to a str first")
    if isinstance(input, np.ndarray):
        if input.dtype.kind not in "iu":
            raise TypeError(f"a numpy array of dtype {input.dtype} is not token ids ({ACCEPTED})")
        input = torch.from_numpy(input)
    if isinstance(input, torch.Tensor):
        if input.is_meta:
            raise ValueError(f"token ids on the meta device have no values ({ACCEPTED}); pass ids on a real device")
        if input.dtype == torch.bool or input.is_floating_point() or input.is_complex():
            raise TypeError(f"a tensor of dtype {input.dtype} is not token ids ({ACCEPTED}); convert with .long()")
        if input.ndim not in (1, 2):
            raise ValueError(
                f"token ids have 1 dim [pos] or 2 dims [batch, pos], got shape {tuple(input.shape)}"
                + ("; index the batch or reshape to [batch, pos]" if input.ndim > 2 else "; use tokens.reshape(1, 1)")
            )
        tokens = input if input.ndim == 2 else input[None]
        _check_not_empty(tokens)
        return tokens.long(), None
    if isinstance(input, str):
        input = [input]
    if not isinstance(input, Sequence):
        raise TypeError(f"{type(input).__name__} is not token input ({ACCEPTED})")
    if len(input) == 0:
        raise ValueError(f"the input is an empty {type(input).__name__}; pass at least one text or token id")
    if all(_is_id(t) for t in input):
        return torch.tensor([[int(t) for t in input]], dtype=torch.long), None
    if not all(isinstance(t, str) for t in input):
        raise TypeError(
            f"a list input holds only strings or only integer token ids ({ACCEPTED}), got {_describe(input)}"
        )
    ids = [tokenizer(t, add_special_tokens=prepend_bos is None)["input_ids"] for t in input]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but this tokenizer has no BOS token; pass prepend_bos=None")
        ids = [s if s[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *s] for s in ids]
    for i, s in enumerate(ids):
        if not s:
            raise ValueError(
                f"text {i} ({input[i]!r}) has no tokens (this tokenizer adds no BOS); pass a non-empty text"
                + (" or prepend_bos=True" if tokenizer.bos_token_id is not None else "")
            )
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


def check_ids(tokens: torch.Tensor, d_vocab: int) -> None:
    """Refuse ids ``[batch, pos]`` outside ``0..d_vocab-1``, naming the first bad id and where it is."""
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token id {int(tokens[b, p])} at [batch {b}, pos {p}] is out of range: this model's vocabulary has "
            f"{d_vocab} ids, valid ids are 0..{d_vocab - 1}"
        )


def _check_not_empty(tokens: torch.Tensor) -> None:
    if tokens.numel() == 0:
        raise ValueError(f"token input of shape {tuple(tokens.shape)} is empty; pass at least one token per sequence")


def _is_id(t: object) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def _describe(input: Sequence) -> str:
    return f"a {type(input).__name__} of {', '.join(sorted({type(t).__name__ for t in input}))}"


def token_strings(tokenizer: PreTrainedTokenizerBase, d_vocab: int) -> list[str]:
    """The string of every token id ``0..d_vocab-1`` (ids past the tokenizer's vocabulary, as padded
    embeddings have them, read ``"<id N>"``)."""
    known = min(len(tokenizer), d_vocab)
    return [*tokenizer.batch_decode([[i] for i in range(known)]), *(f"<id {i}>" for i in range(known, d_vocab))]
