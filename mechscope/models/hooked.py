"""HookedModel: a Hugging Face causal LM with TransformerLens hook points, cache and generation.

The forward pass is transformers' own; hooks are PyTorch hooks that exist only while a hook function or
a cache asks for them, plus one attention function (see :mod:`mechscope.models.attention`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from mechscope.models.adapters import adapter_for, hooked_config
from mechscope.models.attention import register_attention
from mechscope.models.cache import ActivationCache
from mechscope.models.config import HookedConfig
from mechscope.models.hooks import HookFn, HookRegistry, read_only
from mechscope.models.loading import load_hf
from mechscope.models.names import OPT_IN_POINTS, POINT_DIMS, ModulePoint, module_hook, parse_hook, stop_layer_for
from mechscope.models.points import PointSet
from mechscope.models.sampling import check_sampling, sample_next
from mechscope.models.tokenizer import Input, byte_tokenizer, check_ids, tokenize
from mechscope.models.weights import WeightViews
from mechscope.settings import device_problem

HookSpec: TypeAlias = tuple[str | Callable[[str], bool], HookFn]
NamesFilter: TypeAlias = str | Iterable[str] | Callable[[str], bool] | None


class _StopForward(Exception):
    """Raised by the stop hook of ``stop_at_layer`` with the residual stream there; caught by the model."""

    def __init__(self, residual: torch.Tensor):
        super().__init__("stop_at_layer")
        self.residual = residual


@dataclass
class Generation:
    """What :meth:`HookedModel.generate` returns.

    ``tokens`` ``[batch, prompt_pos + new]`` is the (left-padded) prompt followed by the new tokens;
    ``strings`` the decoded prompt + continuation; ``new_tokens`` ``[batch, new]`` and ``new_strings``
    the continuation alone. After an end-of-sequence token a row is filled with EOS.
    """

    tokens: torch.Tensor
    strings: list[str]
    new_tokens: torch.Tensor
    new_strings: list[str]


def sample_positions(numel: int, samples: int) -> Tensor:
    """``min(samples, numel)`` evenly spaced positions in ``[0, numel)``, the first and the last included: int64
    ``[n]``, computed in integers (a float32 ``linspace`` rounds past the end above 2**24 elements)."""
    n = min(samples, numel)
    return torch.arange(n, dtype=torch.int64) * max(numel - 1, 0) // max(n - 1, 1)


class HookedModel(WeightViews, nn.Module):
    """A causal LM with named hook points (alias ``HookedAutoModel``).

    ``HookedModel(config)`` builds a randomly initialised model from a transformers config (see
    :func:`mechscope.HookedAutoConfig`); ``HookedModel(hf_model, tokenizer)`` and
    :meth:`from_hf` wrap a model you built; :meth:`from_pretrained` loads one.

    Wrapping switches the HF model's attention to mechscope's dispatcher, which calls the original
    implementation unless a hook on that layer's attention is active.
    """

    def __init__(
        self,
        model: PreTrainedModel | PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str | None = None,
        *,
        use_attn_in: bool = False,
        use_split_qkv_input: bool = False,
        use_hook_mlp_in: bool = False,
    ):
        super().__init__()
        if isinstance(model, PretrainedConfig):
            model = AutoModelForCausalLM.from_config(model)
        if not isinstance(model, PreTrainedModel):
            fix = (
                f": load a name or path with HookedModel.from_pretrained({model!r})"
                if isinstance(model, (str, os.PathLike))
                else ""
            )
            raise TypeError(
                f"HookedModel wraps a transformers PreTrainedModel or config, got {type(model).__name__}{fix}"
            )
        self.adapter = adapter_for(model.config)
        model.eval()
        model.set_attn_implementation(register_attention(model.config._attn_implementation))
        self.model = model
        self.cfg = hooked_config(model.config, self.adapter)
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        self.name = name or getattr(model.config, "name_or_path", "") or f"random-{self.cfg.family}"
        self.registry = HookRegistry()
        self.points = PointSet(model, self.adapter, self.cfg, self.registry)
        self._set_flags(
            {"use_attn_in": use_attn_in, "use_split_qkv_input": use_split_qkv_input, "use_hook_mlp_in": use_hook_mlp_in}
        )
        self.eval()

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf(
        cls, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, **options: bool
    ) -> HookedModel:
        """Wrap a transformers causal LM you already built (in place: its attention is re-routed); ``options``: the
        opt-in hook flags (``use_split_qkv_input=True``, ...)."""
        return cls(hf_model, tokenizer)._set_flags(options)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **hf_kwargs,
    ) -> HookedModel:
        """Load a hub id, a local HF directory, a ``.gguf`` file, or a short name such as ``"smollm2-135m"``.

        ``dtype`` defaults to float32 (interpretability wants exact arithmetic); ``device`` to CPU. The opt-in hook
        flags (``use_attn_in``, ``use_split_qkv_input``, ``use_hook_mlp_in``) go to the model, every other keyword
        to transformers' ``from_pretrained``.
        """
        options = {flag: bool(hf_kwargs.pop(flag)) for flag in OPT_IN_POINTS if flag in hf_kwargs}
        model, tokenizer = load_hf(name_or_path, dtype=dtype, device=device, **hf_kwargs)
        return cls(model, tokenizer, name=name_or_path)._set_flags(options)

    def fingerprint(self, samples: int = 64) -> str:
        """SHA-256 of the model's weights, cheaply: the family, every parameter and buffer's name, shape and dtype,
        and ``samples`` evenly spaced values of each (as float64). Caches keyed by it (activation shards,
        co-occurrence counts) tell two models of the same name apart (every random model is ``random-<family>``)."""
        digest = hashlib.sha256(self.cfg.family.encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            picks = sample_positions(flat.numel(), samples).to(flat.device)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(flat[picks].double().cpu().numpy().tobytes())
        return digest.hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The HF decoder blocks, indexable (``model.blocks[3]``); inside a block surgery, the rearranged list."""
        return self.adapter.blocks(self.points.backbone)

    @property
    def ln_final(self) -> nn.Module:
        """The final norm module (its weights and bias included in its output; see :attr:`ln_final_w`)."""
        return self.points.backbone.get_submodule(self.adapter.final_norm)

    def block_part(self, layer: int, part: str) -> nn.Module:
        """The HF module of ``part`` in block ``layer``: ``"attn"`` (its ``o_proj``), ``"ln1"``, ``"ln2"``, ``"mlp"``
        (its ``mlp_in``, ``mlp_up`` of gated MLPs, ``mlp_down``), and ``"attn_out"`` / ``"mlp_out"``, the modules
        whose outputs the block adds to the residual stream (Gemma 2's post-norms, else attention and the MLP)."""
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
            raise ValueError(f"layer={layer!r} is out of range: this model has {n} layers, valid are 0..{n - 1}")
        return self.blocks[layer].get_submodule(self.adapter.part_path(part))

    def module_hook(self, module: nn.Module, which: ModulePoint = "post") -> str:
        """The module point of a submodule of the backbone: ``<path>.hook_result_pre`` (its first input) or
        ``<path>.hook_result_post`` (its output), e.g. for ``model.ln_final``."""
        path = next((n for n, m in self.points.backbone.named_modules() if m is module and n), None)
        if path is None:
            raise ValueError(f"this {type(module).__name__} is not a submodule of the model's backbone")
        return module_hook(path, which)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_vocab]``: the unembedding ``resid @ W_U + b_U``, as TransformerLens's
        ``model.unembed``. The final norm is not applied (apply :attr:`ln_final` first, as TransformerLens does),
        nor Gemma 2's final soft-cap of the logits (``cfg.output_logits_soft_cap``)."""
        return self.model.get_submodule(self.adapter.lm_head)(resid)

    def hook_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one position's activation at hook ``name``, from the config (no forward pass).

        ``(d_model,)`` on the residual stream and at norm outputs, ``(1,)`` at ``hook_scale``, ``(n_heads, d_head)``
        at ``attn.hook_q`` / ``hook_rot_q`` / ``hook_z``, ``(n_key_value_heads, d_head)`` at ``hook_k`` /
        ``hook_rot_k`` / ``hook_v``, ``(n_heads, d_model)`` at ``hook_result`` and ``hook_attn_in`` /
        ``hook_q_input``, ``(n_key_value_heads, d_model)`` at ``hook_k_input`` / ``hook_v_input``, ``(d_mlp,)`` in
        the MLP, ``(d_vocab,)`` at ``unembed.hook_out`` and ``hook_logits``;
        at a module point the width of the module's input or output. The activation is
        ``[batch, pos, *hook_shape(name)]``; attention maps (``[batch, head, query_pos, key_pos]``) raise.
        """
        self.points.resolve(name)  # unknown names fail here, with the closest valid ones
        parsed = parse_hook(name)
        if parsed.module is not None:
            return self.points.module_shape(name)
        dims = POINT_DIMS[parsed.point]
        if dims is None:
            raise ValueError(
                f"{name} is an attention map [batch, head, query_pos, key_pos]: it has no per-position shape "
                f"(n_heads = {self.cfg.n_heads}; key_pos is the length of the sequence)"
            )
        return tuple(d if isinstance(d, int) else int(getattr(self.cfg, d)) for d in dims)

    def hook_width(self, name: str) -> int:
        """The length of one position's vector at ``name`` as SAEs and activation stores read it: per-head points
        flattened (``n_heads * d_head`` at ``attn.hook_z``, see :func:`~mechscope.models.points.token_vectors`)."""
        return math.prod(self.hook_shape(name))

    def stop_layer_for(self, names: Iterable[str]) -> int | None:
        """The smallest ``stop_at_layer`` that still runs every hook in ``names`` (``None``: the whole model), module
        points inside a block included; see :func:`mechscope.models.names.stop_layer_for`."""
        names = list(names)
        for name in names:
            self.points.resolve(name)  # a name this model does not have fails here, naming the valid ones
        return stop_layer_for(names, self.cfg.n_layers, self.adapter.layers)

    # ---- tokens ------------------------------------------------------------------------------------
    def _tokens(
        self, input: Input, prepend_bos: bool | None, padding_side: str, extra: int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens [batch, pos], mask [batch, pos] or None)`` of ``input`` on the model's device, ids checked against
        the vocabulary and, unless ``extra`` is None, ``pos + extra`` against ``n_ctx``."""
        tokens, mask = tokenize(self.tokenizer, input, prepend_bos, padding_side)
        check_ids(tokens, self.cfg.d_vocab)
        n_ctx = self.cfg.n_ctx
        if extra is not None and tokens.shape[-1] + extra > n_ctx:
            fix = (
                f"lower max_new_tokens or keep the last {n_ctx - extra} prompt tokens (tokens[:, -{n_ctx - extra}:])"
                if extra
                else f"truncate it (tokens[:, :{n_ctx}]) or split it into windows of {n_ctx}"
            )
            more = f" + {extra} new tokens" if extra else ""
            raise ValueError(
                f"input of {tokens.shape[-1]} tokens{more} is longer than the model's context n_ctx = {n_ctx}; {fix}"
            )
        return tokens.to(self.device), mask.to(self.device) if mask is not None else None

    def to_tokens(self, input: Input, prepend_bos: bool | None = None, padding_side: str = "right") -> torch.Tensor:
        """Token ids ``[batch, pos]`` on the model's device (padded with the pad/EOS token); texts longer than
        ``n_ctx`` are kept whole (split them before running them)."""
        return self._tokens(input, prepend_bos, padding_side, extra=None)[0]

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """Decode one id or ``[pos]`` to a string, ``[batch, pos]`` to a list of strings."""
        tokens = torch.as_tensor(tokens)
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"to_string takes integer token ids, got dtype {tokens.dtype}; convert with .long()")
        if tokens.ndim > 2:
            raise ValueError(
                f"to_string takes one id, ids [pos] or [batch, pos], got shape {tuple(tokens.shape)}: index the batch"
            )
        check_ids(tokens.reshape(1, -1), self.cfg.d_vocab)
        if tokens.ndim == 0:
            tokens = tokens.reshape(1)
        if tokens.ndim == 1:
            return self.tokenizer.decode(tokens.tolist())
        return self.tokenizer.batch_decode(tokens.tolist())

    def to_str_tokens(self, input: Input, prepend_bos: bool | None = None) -> list[str]:
        """Each token of one sequence as its own string."""
        tokens = self.to_tokens(input, prepend_bos)
        if tokens.shape[0] != 1:
            raise ValueError("to_str_tokens takes a single sequence; index the batch first")
        return self.tokenizer.batch_decode([[t] for t in tokens.reshape(-1).tolist()])

    # ---- TransformerLens's opt-in hook points -------------------------------------------------------
    def _set_flags(self, flags: dict[str, bool]) -> HookedModel:
        """Set the opt-in flags that are on (names checked); returns the model."""
        unknown = sorted(set(flags) - set(OPT_IN_POINTS))
        if unknown:
            raise TypeError(f"unknown model options {unknown}; the opt-in hook flags are {', '.join(OPT_IN_POINTS)}")
        for flag, on in flags.items():
            if on:
                self._set_flag(flag, True)
        return self

    def _set_flag(self, flag: str, on: bool) -> None:
        if flag == "use_attn_in" and on and self.cfg.n_key_value_heads != self.cfg.n_heads:
            raise ValueError(
                f"use_attn_in: this {self.cfg.family} model has grouped-query attention ({self.cfg.n_heads} query "
                f"heads over {self.cfg.n_key_value_heads} key/value heads), so the heads have no common input; use "
                "use_split_qkv_input (hook_q_input / hook_k_input / hook_v_input), as TransformerLens does"
            )
        self.cfg = HookedConfig(**{**self.cfg.to_dict(), flag: bool(on)})
        self.points.cfg = self.cfg
        self.points.refresh()

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Serve ``blocks.L.hook_attn_in`` ``[batch, pos, n_heads, d_model]``: the block's input once per head, each
        head's q, k and v computed from its own copy (TransformerLens's ``use_attn_in``; not with grouped-query
        attention). Off by default: when on, ``run_with_cache`` keeps it too."""
        self._set_flag("use_attn_in", use_attn_in)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Serve ``blocks.L.hook_q_input`` ``[batch, pos, n_heads, d_model]`` and ``hook_k_input`` / ``hook_v_input``
        ``[batch, pos, n_key_value_heads, d_model]``: separate per-head inputs of q, k and v
        (TransformerLens's ``use_split_qkv_input``). Off by default."""
        self._set_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Serve ``blocks.L.hook_mlp_in`` ``[batch, pos, d_model]``: the MLP's input before ln2, whose edits reach
        the MLP but not the residual stream (TransformerLens's ``use_hook_mlp_in``). Off by default."""
        self._set_flag("use_hook_mlp_in", use_hook_mlp_in)

    # ---- hooks -------------------------------------------------------------------------------------
    def hook_names(self, include_module_points: bool = False) -> list[str]:
        """Every canonical hook name; with ``include_module_points`` also ``<module>.hook_result_pre/post``."""
        names = list(self.points.names)
        return names + self.points.generic_names() if include_module_points else names

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd") -> None:
        """Attach ``hook`` until :meth:`reset_hooks` (``dir`` "fwd" or "bwd")."""
        names = self.points.resolve(name)
        for n in names:
            self.registry.add(n, hook, dir)
        self.points.sync()

    def reset_hooks(self) -> None:
        """Remove every hook function and every PyTorch hook mechscope installed."""
        self.registry.clear()
        self.points.sync()

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = ()) -> Iterator[HookedModel]:
        """Context manager: the given hooks are attached inside the block and removed after it, even on error."""
        pairs = [(_hook_pair(spec, d), d) for hooks, d in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")) for spec in hooks]
        resolved = [(n, fn, d) for (name, fn), d in pairs for n in self.points.resolve(name)]
        try:
            for n, fn, d in resolved:
                self.registry.add(n, fn, d)
            self.points.sync()
            yield self
        finally:
            for n, fn, d in resolved:
                self.registry.remove(n, fn, d)
            self.points.sync()

    # ---- running -----------------------------------------------------------------------------------
    def _logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, **hf_kwargs) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=attention_mask, **hf_kwargs)
        logits = out.logits
        if "hook_logits" in self.registry.active_names():
            logits, _ = self.registry("hook_logits", logits)
        return logits

    def new_kv_cache(self) -> DynamicCache:
        """An empty key/value cache for :meth:`step`."""
        return DynamicCache(config=self.model.config)

    def step(
        self,
        tokens: torch.Tensor,
        kv_cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One incremental forward pass: logits ``[batch, pos, d_vocab]`` of ``tokens`` ``[batch, pos]``
        following those already in ``kv_cache`` (which it extends), with the active hooks applied.

        ``attention_mask`` ``[batch, cached + pos]`` covers the cached and the new tokens; ``position_ids``
        ``[batch, pos]`` are the new tokens' positions.
        """
        if not isinstance(kv_cache, Cache):
            raise TypeError(
                f"kv_cache must be a transformers Cache, got {type(kv_cache).__name__}: start with model.new_kv_cache()"
            )
        return self._logits(tokens, attention_mask, position_ids=position_ids, use_cache=True, cache=kv_cache)

    def forward(
        self,
        input: Input,
        return_type: str | None = "logits",
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        stop_at_layer: int | None = None,
        padding_side: str = "right",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run the model. Returns logits ``[batch, pos, d_vocab]`` (``return_type="logits"``), the mean
        next-token loss (``"loss"``), both (``"both"``) or nothing (``None``).

        Text is tokenised with :meth:`to_tokens` (texts of different lengths padded on ``padding_side``) and gets an
        attention mask; ``attention_mask`` ``[batch, pos]`` (1 = real token) overrides it. With a mask, each real
        token's position counts the real tokens before it (as ``generate`` and TransformerLens do), so a left- or
        right-padded row gives the logits of that row alone. ``stop_at_layer=L`` runs the embeddings and blocks
        ``0..L-1`` only (negative ``L`` counts from the end) and returns the residual stream there
        ``[batch, pos, d_model]`` (``blocks.L.hook_resid_pre``; after the last block for ``L = n_layers``), as
        TransformerLens does.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        tokens, mask = self._tokens(input, prepend_bos, padding_side)
        mask = _user_mask(attention_mask, tokens).to(self.device) if attention_mask is not None else mask
        positions = positions_from_mask(mask) if mask is not None else None
        if stop_at_layer is not None:
            return self._run_until(tokens, mask, positions, stop_at_layer)
        logits = self._logits(tokens, mask, position_ids=positions, use_cache=False)
        if return_type in ("logits", None):
            return logits if return_type else None
        loss = lm_loss(logits, tokens, mask)
        return loss if return_type == "loss" else (logits, loss)

    def _run_until(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, stop_at_layer: int
    ) -> torch.Tensor:
        n = self.cfg.n_layers
        integer = isinstance(stop_at_layer, (int, np.integer)) or (
            isinstance(stop_at_layer, torch.Tensor)
            and stop_at_layer.numel() == 1
            and not stop_at_layer.is_floating_point()
        )
        if isinstance(stop_at_layer, bool) or getattr(stop_at_layer, "dtype", None) == torch.bool or not integer:
            raise TypeError(
                f"stop_at_layer must be an int in {-n}..{n} (or None for the whole model), got "
                f"{type(stop_at_layer).__name__} {stop_at_layer!r}: pass int(value)"
            )
        stop_at_layer = int(stop_at_layer)
        layer = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        if not 0 <= layer <= n:
            raise ValueError(f"stop_at_layer={stop_at_layer} is out of range: valid values are {-n}..{n}")
        blocks = self.blocks
        if layer == n:
            stop = self.points.add_stop(blocks[n - 1], before=False, exc=_StopForward)
        else:
            stop = self.points.add_stop(blocks[layer], before=True, exc=_StopForward)
        try:
            self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False)
        except _StopForward as reached:
            return reached.residual
        finally:
            stop.remove()
        raise RuntimeError(f"the forward pass never reached block {layer}")  # a block list rearranged mid-run

    def run_with_hooks(
        self,
        input: Input,
        fwd_hooks: Iterable[HookSpec] = (),
        bwd_hooks: Iterable[HookSpec] = (),
        **forward_kwargs,
    ):
        """Run the model with temporary hooks; they are removed afterwards, even if a hook raised."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(input, **forward_kwargs)

    def run_with_cache(
        self,
        input: Input,
        names_filter: NamesFilter = None,
        stop_at_layer: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **forward_kwargs,
    ) -> tuple[torch.Tensor | None, ActivationCache]:
        """Run the model and keep activations: ``(what forward returns, ActivationCache)``.

        ``names_filter`` is a hook name, a list of names, or a predicate on names; ``None`` caches every
        canonical point except ``attn.hook_result`` (ask for it by name), opt-in points included when their
        option is on. Tensors are detached, and moved or cast only when ``device`` / ``dtype`` are given. With
        ``stop_at_layer`` the first element is the residual stream there, as :meth:`forward` returns it.
        """
        if names_filter is None:
            names = [n for n in self.points.names if parse_hook(n).point != "attn.hook_result"]
        elif isinstance(names_filter, str) or callable(names_filter):
            names = self.points.resolve(names_filter)
        elif isinstance(names_filter, Iterable):
            names = [n for f in names_filter for n in self.points.resolve(f)]
            if not names:
                raise ValueError(
                    "names_filter is empty, so nothing would be cached: pass the hook names to keep, or None for "
                    "every point"
                )
        else:
            raise TypeError(
                f"names_filter must be a hook name, a list of names, a predicate on names or None, got "
                f"{type(names_filter).__name__} {names_filter!r}"
            )
        if device is not None and not isinstance(device, torch.device) and device_problem(str(device)) is not None:
            raise ValueError(f"run_with_cache(device=...): {device_problem(str(device))}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"run_with_cache(dtype=...) takes a torch.dtype such as torch.float16, got {dtype!r}")
        store: dict[str, torch.Tensor] = {}

        @read_only
        def keep(tensor: torch.Tensor, hook) -> None:
            t = tensor.detach()
            if device is not None or dtype is not None:
                t = t.to(device=device, dtype=dtype)
            store[hook.name] = t

        with self.hooks([(n, keep) for n in names]):
            logits = self(input, stop_at_layer=stop_at_layer, **forward_kwargs)
        return logits, ActivationCache(store, self.cfg, model=self)

    # ---- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input: Input,
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_p: float | None = None,
        top_k: int | None = None,
        do_sample: bool = True,
        fwd_hooks: Iterable[HookSpec] = (),
        stop_at_eos: bool = True,
        prepend_bos: bool | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Sample a continuation, applying ``fwd_hooks`` at every step, with a kv cache.

        ``do_sample=False`` or ``temperature=0`` is greedy. Prompts of different lengths are left-padded.
        Hooks see every step's activations: the whole prompt on the first step, then one new position
        (``hook_rot_k`` sees every key position, cached ones included; ``hook_k`` / ``hook_v`` the new ones).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        for flag, value in (("do_sample", do_sample), ("stop_at_eos", stop_at_eos)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        check_sampling(temperature, top_k, top_p)
        tokens, mask = self._tokens(input, prepend_bos, "left", extra=max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        eos = self.tokenizer.eos_token_id
        batch = tokens.shape[0]
        full_mask = mask if mask is not None else torch.ones_like(tokens)
        positions = positions_from_mask(full_mask)
        kv = self.new_kv_cache()
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        new = []
        step_input = tokens
        with self.hooks(fwd_hooks):
            for _ in range(max_new_tokens):
                logits = self.step(step_input, kv, full_mask if mask is not None else None, positions)
                nxt = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
                if eos is not None:
                    nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
                    finished |= nxt == eos
                new.append(nxt)
                if stop_at_eos and eos is not None and bool(finished.all()):
                    break
                step_input = nxt[:, None]
                full_mask = torch.cat([full_mask, torch.ones_like(step_input)], dim=-1)
                positions = positions[:, -1:] + 1
        new_tokens = torch.stack(new, dim=1) if new else tokens[:, :0]
        all_tokens = torch.cat([tokens, new_tokens], dim=1)
        decode = self.tokenizer.batch_decode
        return Generation(
            tokens=all_tokens,
            strings=decode(all_tokens.tolist(), skip_special_tokens=True),
            new_tokens=new_tokens,
            new_strings=decode(new_tokens.tolist(), skip_special_tokens=True),
        )


def _hook_pair(spec: object, direction: str) -> tuple[str | Callable[[str], bool], HookFn]:
    """One ``(name or predicate, hook function)`` entry of ``fwd_hooks`` / ``bwd_hooks``, checked."""
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
        raise TypeError(
            f"each entry of {direction}_hooks is a (hook name or predicate, hook function) pair, got {spec!r}; "
            "a single hook is a list of one pair: [(name, hook)]"
        )
    return spec[0], spec[1]


def _user_mask(mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A user's ``attention_mask``, checked against ``tokens`` ``[batch, pos]``: same shape, 0/1 values."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch tensor [batch, pos] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape {tuple(tokens.shape)}: "
            "pass a mask [batch, pos] of the tokens' shape (1 = real token, 0 = padding)"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask holds values other than 0 and 1: pass 1 for real tokens, 0 for padding")
    empty = (mask == 0).all(dim=-1).nonzero()
    if len(empty):
        raise ValueError(
            f"attention_mask row {int(empty[0])} is all 0, so that sequence has no real token: drop the row, or "
            "mark its real tokens with 1"
        )
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, pos]`` of an attention mask ``[batch, pos]`` (1 = real token): the number of real tokens
    before each one (padding gets 0), so left padding does not shift the real tokens' positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, pos, vocab]`` on ``tokens [batch, pos]``."""
    pred, target = logits[:, :-1].float(), tokens[:, 1:]
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return losses.mean()
    keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(losses.dtype)
    return (losses * keep).sum() / keep.sum()


HookedAutoModel = HookedModel
