"""Transformer Debugger's ``Transformer`` on top of a mechscope :class:`~mechscope.models.hooked.HookedModel`.

There is no second transformer: the forward pass is the wrapped Hugging Face model's, and every
``TransformerHooks`` location runs as a mechscope hook point (table in ``docs/tdb.md``), converted to and from
Transformer Debugger's tensor layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from mechscope.compat.tdb.hooks import FwdBwdHooks, TransformerHooks
from mechscope.models.hooked import HookedModel
from mechscope.models.hooks import HookPoint
from mechscope.models.names import block_hook


def get_default_device() -> torch.device:
    """CUDA device 0 if available, else Apple MPS (not under pytest), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if torch.backends.mps.is_available() and "PYTEST_CURRENT_TEST" not in os.environ:
        return torch.device("mps", 0)
    return torch.device("cpu")


class Encoding:
    """A tiktoken-like view of a Hugging Face tokenizer: ``encode``, ``decode``, ``decode_batch``, ``n_vocab``.

    ``encode`` adds no BOS (as tiktoken does not); ``<|endoftext|>`` and other special tokens in the text
    are encoded as their special ids.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @property
    def n_vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def eot_token(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str, **_: Any) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str], **_: Any) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, tokens: list[int]) -> str:
        return self.decode_batch([tokens])[0]

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(batch)


@dataclass
class HiddenState:
    """What ``xf(tokens)`` returns besides logits: the kv cache, the attention mask so far
    ``[batch, seen_pos]`` (0 on padding) and each row's next position ``prev_lens`` ``[batch, 1]``."""

    kv: DynamicCache
    mask: torch.Tensor
    prev_lens: torch.Tensor

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cached ``(keys, values)``, each ``[batch, kv_head, seen_pos, d_head]``."""
        cache_layer = self.kv.layers[layer]
        keys, values = getattr(cache_layer, "keys", None), getattr(cache_layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"layer {layer} has cached no keys and values yet: run the model on some tokens first")
        return keys, values


def _prep_left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ``(tokens [batch, max_len], pad [batch, max_len])``, pad True where padded."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([[True] * (width - len(p)) + [False] * len(p) for p in prompts], device=device)
    return tokens, pad


def nucleus_sample(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sample ``[...]`` from ``logits [..., n_vocab]`` among the most likely tokens whose cumulative
    probability (the token's own included) stays within ``top_p``; the most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    limit = torch.maximum(cum[..., :1], torch.full_like(cum[..., :1], top_p))
    sorted_logits = sorted_logits.masked_fill(cum > limit, float("-inf"))
    choice = torch.multinomial(sorted_logits.softmax(-1).reshape(-1, cum.shape[-1]), 1).reshape(cum.shape[:-1])
    return order.gather(-1, choice[..., None])[..., 0]


#: TDB locations served by one point of every block, and that point
_BLOCK_LOCATIONS = {
    "mlp.pre_act": "mlp.hook_pre",
    "mlp.post_act": "mlp.hook_post",
    "attn.q": "attn.hook_q",
    "attn.k": "attn.hook_k",
    "attn.v": "attn.hook_v",
    "attn.qk_logits": "attn.hook_attn_scores",
    "attn.qk_probs": "attn.hook_pattern",
    "attn.v_out": "attn.hook_z",
    "resid.torso.delta_attn": "hook_attn_out",
    "resid.torso.post_attn": "hook_resid_mid",
    "resid.torso.delta_mlp": "hook_mlp_out",
    "resid.torso.post_mlp": "hook_resid_post",
}
# TDB's per-block norms and mechscope's names for them
_TORSO_NORMS = {"ln_attn": "ln1", "ln_mlp": "ln2"}


class Transformer(torch.nn.Module):
    """Transformer Debugger's ``Transformer`` API over a mechscope ``HookedModel``.

    ``xf(tokens, H=None, pad=None, hooks=None) -> (logits [batch, pos, n_vocab], H)``; pass ``H`` back with
    the next tokens to continue the sequences. ``xf.sample(...)`` samples with hooks. ``xf.model`` is the
    underlying ``HookedModel``.
    """

    def __init__(self, model: HookedModel) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.enc = Encoding(model.tokenizer)
        self.n_vocab = model.cfg.d_vocab
        self._points = self._location_points()

    @classmethod
    def load(
        cls,
        name_or_path: str,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
    ) -> Transformer:
        """Load anything :meth:`HookedModel.from_pretrained` accepts (a local folder, a hub id, a short name)."""
        device = device if device is not None else get_default_device()
        return cls(HookedModel.from_pretrained(name_or_path, dtype=dtype, device=device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- hooks ------------------------------------------------------------------------------------
    def _location_points(self) -> dict[str, str | list[str]]:
        """TDB location -> its mechscope hook point, or (per-layer locations) its point in every layer."""
        model, layers = self.model, range(self.cfg.n_layers)
        # TDB's q and k are those the scores use: after rotary on rotary models (mechscope's hook_rot_q / hook_rot_k)
        rotated = {"attn.q": "attn.hook_rot_q", "attn.k": "attn.hook_rot_k"}
        if self.cfg.positional_embedding_type != "rotary":
            rotated = {}
        points: dict[str, str | list[str]] = {
            tdb: [block_hook(layer, rotated.get(tdb, point)) for layer in layers]
            for tdb, point in _BLOCK_LOCATIONS.items()
        }
        points.update(
            {
                "resid.post_emb": block_hook(0, "hook_resid_pre"),
                "resid.post_ln_f": model.module_hook(model.ln_final, "post"),
                "resid.ln_f.post_mean_subtraction": model.module_hook(model.ln_final, "pre"),
                "resid.ln_f.scale": "ln_final.hook_scale",
                "resid.ln_f.post_scale": "ln_final.hook_normalized",
            }
        )
        for tdb, ours in _TORSO_NORMS.items():
            norms = [model.block_part(layer, ours) for layer in layers]
            points[f"resid.torso.post_{tdb}"] = [model.module_hook(norm, "post") for norm in norms]
            points[f"resid.torso.{tdb}.post_mean_subtraction"] = [model.module_hook(norm, "pre") for norm in norms]
            points[f"resid.torso.{tdb}.scale"] = [block_hook(layer, f"{ours}.hook_scale") for layer in layers]
            points[f"resid.torso.{tdb}.post_scale"] = [block_hook(layer, f"{ours}.hook_normalized") for layer in layers]
        return points

    def _converters(self, location: str, layer: int | None) -> tuple[Callable, Callable]:
        """``(to_tdb, from_tdb)`` for one location: mechscope tensor -> TDB tensor and back.

        ``to_tdb`` returns views where it can, so an in-place edit by a TDB hook reaches mechscope's tensor.
        """
        same = (lambda t: t, lambda t: t)
        if location in ("attn.q", "attn.k") and layer is not None:
            # TDB scales q and k each by scaling ** 0.5, so that q . k is already the scaled logit
            attn = self.model.block_part(layer, "attn")
            root = float(getattr(attn, "scaling", self.cfg.d_head**-0.5)) ** 0.5
            return (lambda t: t * root, lambda t: t / root)
        if location in ("attn.qk_logits", "attn.qk_probs"):
            return (lambda t: t.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2))
        if location.endswith("post_mean_subtraction") and self.cfg.normalization_type == "LN":
            return (lambda t: t - t.mean(-1, keepdim=True), lambda t: t)
        return same

    def _mechscope_hooks(self, hooks: TransformerHooks) -> list[tuple[str, Callable]]:
        """The mechscope ``(hook point, fn)`` pairs that run the non-empty locations of ``hooks``."""
        pairs = []
        for location, fwd_bwd in hooks.locations():
            if fwd_bwd.is_empty():
                continue
            if location == "attn.qk_softmax_denominator":
                raise ValueError("attn.qk_softmax_denominator hooks are not supported by mechscope.compat.tdb")
            if location == "logits":
                pairs.append(("hook_logits", self._wrap(fwd_bwd, location, None)))
                continue
            if location == "resid.torso.post_attn" and self.cfg.parallel_attn_mlp:
                raise ValueError(
                    f"resid.torso.post_attn does not exist in {self.cfg.family}: attention and MLP run in parallel "
                    "on the same residual (hook resid.torso.delta_attn or resid.torso.post_mlp instead)"
                )
            points = self._points[location]
            if isinstance(points, str):
                pairs.append((points, self._wrap(fwd_bwd, location, None)))
            else:
                pairs += [(point, self._wrap(fwd_bwd, location, layer)) for layer, point in enumerate(points)]
        return pairs

    def _wrap(self, fwd_bwd: FwdBwdHooks, location: str, layer: int | None) -> Callable:
        to_tdb, from_tdb = self._converters(location, layer)
        kwargs: dict[str, Any] = {} if layer is None else {"layer": layer}
        if location == "mlp.post_act" and layer is not None:
            kwargs["out_layer"] = self.model.block_part(layer, "mlp_down")

        def run(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            x = to_tdb(tensor)
            version = x._version if not x.is_inference() else None
            y = fwd_bwd(x, **kwargs)
            if y is x and version is not None and x._version == version:
                return None  # untouched: mechscope keeps its fast path
            return from_tdb(y)

        return run

    # ---- running ----------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        H: HiddenState | None = None,  # noqa: N803 (TDB's name)
        pad: torch.Tensor | None = None,
        hooks: TransformerHooks | None = None,
    ) -> tuple[torch.Tensor, HiddenState]:
        """Logits ``[batch, pos, n_vocab]`` for ``tokens [batch, pos]`` (long) and the updated state.

        ``pad [batch, pos]`` (bool, True = padding) marks left padding on the first call. With ``H`` from a
        previous call, ``tokens`` continue those sequences (no padding). Hooks see the new positions only
        (``attn.k`` of rotary models and the key axis of ``qk_logits``/``qk_probs`` include cached positions; TDB's
        ``attn.v``, and ``attn.k`` of GPT-2, include them too, mechscope's ``hook_v`` / ``hook_k`` do not).
        """
        if tokens.dtype != torch.long:
            raise TypeError(f"tokens must be a long tensor of token ids, got {tokens.dtype}")
        tokens = tokens.to(self.device)
        batch = tokens.shape[0]
        if H is None:
            H = HiddenState(  # noqa: N806 (TDB's name)
                kv=self.model.new_kv_cache(),
                mask=torch.zeros(batch, 0, dtype=torch.long, device=self.device),
                prev_lens=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            )
        keep = torch.ones_like(tokens) if pad is None else (~pad.to(self.device)).long()
        positions = (keep.cumsum(-1) - 1).clamp(min=0) + H.prev_lens
        H.mask = torch.cat([H.mask, keep], dim=-1)
        H.prev_lens = positions[:, -1:] + 1
        padded = bool((H.mask == 0).any())
        with self.model.hooks(self._mechscope_hooks(hooks) if hooks is not None else ()):
            logits = self.model.step(tokens, H.kv, H.mask if padded else None, positions)
        return logits, H

    def sample(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        num_tokens: int = 5,
        temperature: float = 1.0,
        top_p: float | None = None,
        hooks: TransformerHooks | None = None,
    ) -> dict[str, list]:
        """Sample ``num_tokens`` tokens after each prompt (prompts of different lengths are left-padded).

        ``temperature=0`` is greedy (argmax; ``top_p`` ignored); ``top_p`` is nucleus sampling; otherwise the
        tokens are drawn from the full softmax of ``logits / temperature``. ``hooks`` run at every step.
        Returns ``{"tokens": list[list[int]], "strings": list[str]}``, the continuation only.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts[0], str):
            token_lists = [self.enc.encode(p) for p in prompts]
        elif isinstance(prompts[0], int):
            token_lists = [list(prompts)]
        else:
            token_lists = [list(p) for p in prompts]
        tokens, left_pad = _prep_left_padded(token_lists, self.device)
        pad: torch.Tensor | None = left_pad  # the first step only
        out: dict[str, list] = {"tokens": [[] for _ in token_lists], "strings": ["" for _ in token_lists]}
        H = None  # noqa: N806
        with torch.no_grad():
            for _ in range(num_tokens):
                logits, H = self.forward(tokens, H, pad, hooks=hooks)  # noqa: N806
                last = logits[:, -1].float()
                if temperature == 0:
                    nxt = last.argmax(-1)
                elif top_p is not None:
                    nxt = nucleus_sample(last / temperature, top_p)
                else:
                    nxt = torch.multinomial((last / temperature).softmax(-1), 1)[:, 0]
                tokens, pad = nxt[:, None], None
                for row, token in enumerate(nxt.tolist()):
                    out["tokens"][row].append(token)
                    out["strings"][row] += self.enc.decode([token])
        return out
