"""Transformer Debugger's ``Transformer`` on top of a mechscope :class:`~mechscope.models.hooked.HookedModel`.

There is no second transformer: the forward pass is the wrapped Hugging Face model's, and every
``TransformerHooks`` location runs as a mechscope hook point (table in ``docs/tdb.md``), converted to and from
Transformer Debugger's tensor layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.pytorch_utils import Conv1D

from mechscope.compat.tdb.hooks import FwdBwdHooks, TransformerHooks
from mechscope.models.config import HookedConfig
from mechscope.models.hooked import HookedModel
from mechscope.models.hooks import HookPoint, read_only
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


@dataclass(frozen=True)
class TransformerConfig(HookedConfig):
    """``xf.cfg``: the mechscope model's :class:`~mechscope.models.config.HookedConfig` (every field, e.g.
    ``d_mlp``, ``family``) with Transformer Debugger's ``TransformerConfig`` names added: ``d_ff`` (= ``d_mlp``),
    ``ctx_window`` (= ``n_ctx``), ``m_mlp``, ``m_attn``, ``d_attn_qk``, ``d_attn_v``, ``d_head_qk``, ``d_head_v``."""

    @classmethod
    def of(cls, cfg: HookedConfig) -> TransformerConfig:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init})

    @property
    def d_ff(self) -> int:
        return self.d_mlp

    @property
    def ctx_window(self) -> int:
        return self.n_ctx

    @property
    def m_mlp(self) -> float:
        return self.d_mlp / self.d_model

    @property
    def d_attn_qk(self) -> int:
        return self.n_heads * self.d_head

    @property
    def d_attn_v(self) -> int:
        return self.n_heads * self.d_head

    @property
    def m_attn(self) -> float:
        return self.d_attn_qk / self.d_model

    @property
    def d_head_qk(self) -> int:
        return self.d_head

    @property
    def d_head_v(self) -> int:
        return self.d_head


class TransposedConv1D:
    """A GPT-2 ``Conv1D`` (weight stored ``[in, out]``) in ``nn.Linear``'s layout, as Transformer Debugger's layers.

    ``weight`` ``[out, in]`` is the parameter transposed: a view that shares its storage and autograd graph, whose
    ``.grad`` is the parameter's gradient transposed (None before a backward pass). ``bias`` is the module's;
    calling it calls the module.
    """

    def __init__(self, conv: Conv1D) -> None:
        self.conv = conv

    @property
    def weight(self) -> torch.Tensor:
        param = self.conv.weight
        view = param.t()
        view.retain_grad()  # reading .grad of this non-leaf view is then not a warning
        if param.grad is not None:
            view.grad = param.grad.t()
        return view

    @property
    def bias(self) -> torch.Tensor:
        return self.conv.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def __repr__(self) -> str:
        return f"TransposedConv1D(in={self.conv.weight.shape[0]}, out={self.conv.weight.shape[1]})"


def linear_layout(module: nn.Module) -> nn.Module | TransposedConv1D:
    """``module`` with ``weight [out, in]``: an ``nn.Linear`` itself, a ``Conv1D`` as :class:`TransposedConv1D`."""
    return TransposedConv1D(module) if isinstance(module, Conv1D) else module


@dataclass(frozen=True)
class MLPLayers:
    """``in_layer``: the projection whose output is ``mlp.pre_act`` (the gate projection of gated MLPs);
    ``out_layer``: the projection of ``mlp.post_act`` back to the residual stream. Both in ``nn.Linear``'s layout."""

    in_layer: nn.Module | TransposedConv1D
    out_layer: nn.Module | TransposedConv1D


@dataclass(frozen=True)
class TransformerLayer:
    """One entry of ``xf.xf_layers``: the HF modules of a block under Transformer Debugger's names (``mlp``,
    ``ln_1`` before attention, ``ln_2`` before the MLP). Their parameters are the model's own."""

    mlp: MLPLayers
    ln_1: nn.Module
    ln_2: nn.Module


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
#: TDB's per-block norms and mechscope's names for them
_TORSO_NORMS = {"ln_attn": "ln1", "ln_mlp": "ln2"}
#: the three locations of TDB's NormalizationHooks
_NORM_PARTS = ("post_mean_subtraction", "scale", "post_scale")


@dataclass(frozen=True)
class _Norm:
    """One norm of the model as TDB's ``NormalizationHooks`` see it: its location prefix (``resid.torso.ln_attn``),
    layer (None for the final norm), HF module and mechscope's scale and normalized points."""

    location: str
    layer: int | None
    module: nn.Module
    scale_point: str
    normalized_point: str


def _run_tdb(fwd_bwd: FwdBwdHooks, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, bool]:
    """``(value, edited)`` after the TDB hooks of one location: edited if they returned another tensor or changed
    ``x`` in place (always assumed for inference-mode tensors, which keep no version counter)."""
    version = None if x.is_inference() else x._version
    y = fwd_bwd(x, **kwargs)
    return y, y is not x or version is None or x._version != version


def _norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if eps is None:
        raise ValueError(f"the norm {type(module).__name__} has no eps or variance_epsilon")
    return float(eps)


class Transformer(torch.nn.Module):
    """Transformer Debugger's ``Transformer`` API over a mechscope ``HookedModel``.

    ``xf(tokens, H=None, pad=None, hooks=None) -> (logits [batch, pos, n_vocab], H)``; pass ``H`` back with
    the next tokens to continue the sequences. ``xf.sample(...)`` samples with hooks. ``xf.model`` is the
    underlying ``HookedModel``, ``xf.cfg`` its config with TDB's names, ``xf.xf_layers`` its blocks' layers.
    """

    def __init__(self, model: HookedModel) -> None:
        super().__init__()
        self.model = model
        self.cfg = TransformerConfig.of(model.cfg)
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

    @property
    def xf_layers(self) -> list[TransformerLayer]:
        """Each block's layers under Transformer Debugger's names: ``xf.xf_layers[0].mlp.in_layer.weight.grad``."""
        model = self.model
        return [
            TransformerLayer(
                mlp=MLPLayers(
                    in_layer=linear_layout(model.block_part(layer, "mlp_in")),
                    out_layer=linear_layout(model.block_part(layer, "mlp_down")),
                ),
                ln_1=model.block_part(layer, "ln1"),
                ln_2=model.block_part(layer, "ln2"),
            )
            for layer in range(self.cfg.n_layers)
        ]

    # ---- hooks ------------------------------------------------------------------------------------
    def _location_points(self) -> dict[str, str | list[str]]:
        """TDB location -> its mechscope hook point, or (per-layer locations) its point in every layer; the
        norms' own locations (post_mean_subtraction, scale, post_scale) are in :meth:`_norms`."""
        model, layers = self.model, range(self.cfg.n_layers)
        # TDB's q and k are those the scores use: after rotary on rotary models (mechscope's hook_rot_q / hook_rot_k)
        rotated = {"attn.q": "attn.hook_rot_q", "attn.k": "attn.hook_rot_k"}
        if self.cfg.positional_embedding_type != "rotary":
            rotated = {}
        points: dict[str, str | list[str]] = {
            tdb: [block_hook(layer, rotated.get(tdb, point)) for layer in layers]
            for tdb, point in _BLOCK_LOCATIONS.items()
        }
        points["resid.post_emb"] = block_hook(0, "hook_resid_pre")
        points["resid.post_ln_f"] = model.module_hook(model.ln_final, "post")
        points["logits"] = "hook_logits"
        for tdb, ours in _TORSO_NORMS.items():
            points[f"resid.torso.post_{tdb}"] = [model.module_hook(model.block_part(i, ours)) for i in layers]
        return points

    def _norms(self) -> list[_Norm]:
        model = self.model
        norms = [
            _Norm(
                f"resid.torso.{tdb}",
                layer,
                model.block_part(layer, ours),
                block_hook(layer, f"{ours}.hook_scale"),
                block_hook(layer, f"{ours}.hook_normalized"),
            )
            for layer in range(self.cfg.n_layers)
            for tdb, ours in _TORSO_NORMS.items()
        ]
        return [*norms, _Norm("resid.ln_f", None, model.ln_final, "ln_final.hook_scale", "ln_final.hook_normalized")]

    def _converters(self, location: str, layer: int | None) -> tuple[Callable, Callable]:
        """``(to_tdb, from_tdb)`` for one location: mechscope tensor -> TDB tensor and back.

        ``to_tdb`` returns views where it can, so an in-place edit by a TDB hook reaches mechscope's tensor.
        """
        if location in ("attn.q", "attn.k") and layer is not None:
            # TDB scales q and k each by scaling ** 0.5, so that q . k is already the scaled logit
            attn = self.model.block_part(layer, "attn")
            root = float(getattr(attn, "scaling", self.cfg.d_head**-0.5)) ** 0.5
            return (lambda t: t * root, lambda t: t / root)
        if location in ("attn.qk_logits", "attn.qk_probs"):
            return (lambda t: t.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2))
        return (lambda t: t, lambda t: t)

    def _mechscope_hooks(self, hooks: TransformerHooks) -> list[tuple[str, Callable]]:
        """The mechscope ``(hook point, fn)`` pairs that run the non-empty locations of ``hooks``.

        As Transformer Debugger's ``run_torso``, each layer runs its own deep copy of ``hooks`` with ``layer``
        bound; the locations before and after the blocks run ``hooks`` itself.
        """
        active = [location for location, fwd_bwd in hooks.locations() if not fwd_bwd.is_empty()]
        if "attn.qk_softmax_denominator" in active:
            raise NotImplementedError(
                "attn.qk_softmax_denominator hooks are not supported by mechscope.compat.tdb: hook attn.qk_logits "
                "(the scores) or attn.qk_probs (the pattern) instead"
            )
        if "resid.torso.post_attn" in active and self.cfg.parallel_attn_mlp:
            raise ValueError(
                f"resid.torso.post_attn does not exist in {self.cfg.family}: attention and MLP run in parallel "
                "on the same residual (hook resid.torso.delta_attn or resid.torso.post_mlp instead)"
            )
        per_layer = any(location.startswith(("mlp.", "attn.", "resid.torso.")) for location in active)
        model_wide = dict(hooks.locations())
        copies = [
            dict(deepcopy(hooks).bind(layer=layer).locations()) if per_layer else model_wide
            for layer in range(self.cfg.n_layers)
        ]
        at = lambda location, layer: model_wide[location] if layer is None else copies[layer][location]  # noqa: E731
        pairs = []
        for location in active:
            if location.rsplit(".", 1)[-1] in _NORM_PARTS:
                continue  # the norms' own locations, below
            points = self._points[location]
            if isinstance(points, str):
                pairs.append((points, self._wrap(at(location, None), location, None)))
            else:
                pairs += [(p, self._wrap(at(location, layer), location, layer)) for layer, p in enumerate(points)]
        for norm in self._norms():
            parts = {part: at(f"{norm.location}.{part}", norm.layer) for part in _NORM_PARTS}
            if not all(part.is_empty() for part in parts.values()):
                pairs += self._norm_hooks(norm, parts)
        return pairs

    def _wrap(self, fwd_bwd: FwdBwdHooks, location: str, layer: int | None) -> Callable:
        to_tdb, from_tdb = self._converters(location, layer)
        kwargs: dict[str, Any] = {}
        if location == "mlp.post_act" and layer is not None:
            kwargs["out_layer"] = linear_layout(self.model.block_part(layer, "mlp_down"))

        def run(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            y, edited = _run_tdb(fwd_bwd, to_tdb(tensor), kwargs)
            return from_tdb(y) if edited else None  # untouched: mechscope keeps its fast path

        return run

    def _norm_hooks(self, norm: _Norm, parts: dict[str, FwdBwdHooks]) -> list[tuple[str, Callable]]:
        """Run TDB's ``post_mean_subtraction``, ``scale`` and ``post_scale`` hooks of one norm with TDB's arithmetic.

        ``post_mean_subtraction`` sees the norm's input minus its mean (LayerNorm) or the input itself (RMSNorm),
        a copy: the residual stream is never changed. If those hooks change it to ``y``, the norm goes on from
        ``y`` as Transformer Debugger's ``Norm`` does, with no second mean subtraction: ``scale`` becomes
        ``sqrt(mean(y ** 2) + eps)``, ``post_scale`` ``y / scale``, and the output ``post_scale * weight + bias``
        (mechscope's norm point applies the weight and bias to an edited ``post_scale``).
        """
        state: dict[str, torch.Tensor] = {}
        layer_norm, eps = self.cfg.normalization_type == "LN", _norm_eps(norm.module)

        @read_only  # the norm's input stays as it is
        def mean_subtracted(tensor: torch.Tensor, hook: HookPoint) -> None:
            x = tensor - tensor.mean(-1, keepdim=True) if layer_norm else tensor.clone()
            y, edited = _run_tdb(parts["post_mean_subtraction"], x, {})
            if edited:
                state["y"] = y

        def scale(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            y = state.get("y")
            value = tensor if y is None else (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            value, edited = _run_tdb(parts["scale"], value, {})
            if y is not None:
                state["scale"] = value
            return value if edited or y is not None else None

        def post_scale(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            y = state.pop("y", None)
            value = tensor if y is None else y / state.pop("scale")
            value, edited = _run_tdb(parts["post_scale"], value, {})
            return value if edited or y is not None else None

        pairs: list[tuple[str, Callable]] = [(norm.scale_point, scale), (norm.normalized_point, post_scale)]
        if not parts["post_mean_subtraction"].is_empty():
            pairs.insert(0, (self.model.module_hook(norm.module, "pre"), mean_subtracted))
        return pairs

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
