"""HookedModel: a Hugging Face causal LM with TransformerLens hook points, cache and generation.

The forward pass is transformers' own; hooks are PyTorch hooks that exist only while a hook function or
a cache asks for them, plus one attention function (see :mod:`mechscope.models.attention`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from mechscope.models.adapters import adapter_for, hooked_config
from mechscope.models.attention import register_attention
from mechscope.models.cache import ActivationCache
from mechscope.models.hooks import HookFn, HookRegistry, read_only
from mechscope.models.loading import load_hf
from mechscope.models.names import POINT_DIMS, ModulePoint, module_hook, parse_hook, stop_layer_for
from mechscope.models.points import PointSet
from mechscope.models.sampling import sample_next
from mechscope.models.tokenizer import Input, byte_tokenizer, tokenize
from mechscope.models.weights import WeightViews

HookSpec: TypeAlias = tuple[str | Callable[[str], bool], HookFn]
NamesFilter: TypeAlias = str | Iterable[str] | Callable[[str], bool] | None


class _StopForward(Exception):
    """Raised by the stop hook of ``stop_at_layer``; caught by the model."""


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
    ):
        super().__init__()
        if isinstance(model, PretrainedConfig):
            model = AutoModelForCausalLM.from_config(model)
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"HookedModel wraps a transformers PreTrainedModel or config, got {type(model).__name__}")
        self.adapter = adapter_for(model.config)
        model.eval()
        model.set_attn_implementation(register_attention(model.config._attn_implementation))
        self.model = model
        self.cfg = hooked_config(model.config, self.adapter)
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns); earlier releases
        # know only past_key_values
        forward_args = inspect.signature(model.forward).parameters
        self._kv_cache_argument = "cache" if "cache" in forward_args else "past_key_values"
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        self.name = name or getattr(model.config, "name_or_path", "") or f"random-{self.cfg.family}"
        self.registry = HookRegistry()
        self.points = PointSet(model, self.adapter, self.cfg, self.registry)
        # what run_with_cache keeps by default: attn.hook_result ([batch, pos, head, d_model]) only when asked for
        self._cached_by_default = [n for n in self.points.names if parse_hook(n).point != "attn.hook_result"]
        self.eval()

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> HookedModel:
        """Wrap a transformers causal LM you already built (in place: its attention is re-routed)."""
        return cls(hf_model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **hf_kwargs,
    ) -> HookedModel:
        """Load a hub id, a local HF directory, a ``.gguf`` file, or a short name such as ``"smollm2-135m"``.

        ``dtype`` defaults to float32 (interpretability wants exact arithmetic); ``device`` to CPU.
        """
        model, tokenizer = load_hf(name_or_path, dtype=dtype, device=device, **hf_kwargs)
        return cls(model, tokenizer, name=name_or_path)

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
        at ``attn.hook_q`` / ``hook_z``, ``(n_key_value_heads, d_head)`` at ``hook_k`` / ``hook_v``,
        ``(n_heads, d_model)`` at ``hook_result``, ``(d_mlp,)`` in the MLP, ``(d_vocab,)`` at ``hook_logits``;
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
        return stop_layer_for(names, self.cfg.n_layers, self.adapter.layers)

    # ---- tokens ------------------------------------------------------------------------------------
    def to_tokens(self, input: Input, prepend_bos: bool | None = None, padding_side: str = "right") -> torch.Tensor:
        """Token ids ``[batch, pos]`` on the model's device (padded with the pad/EOS token)."""
        return tokenize(self.tokenizer, input, prepend_bos, padding_side)[0].to(self.device)

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """Decode one id or ``[pos]`` to a string, ``[batch, pos]`` to a list of strings."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 0:
            tokens = tokens.reshape(1)
        if tokens.ndim == 1:
            return self.tokenizer.decode(tokens.tolist())
        return self.tokenizer.batch_decode(tokens.tolist())

    def to_str_tokens(self, input: Input, prepend_bos: bool | None = None) -> list[str]:
        """Each token of one sequence as its own string."""
        tokens = self.to_tokens(input, prepend_bos) if not isinstance(input, torch.Tensor) else input
        if not (tokens.ndim == 1 or tokens.shape[0] == 1):
            raise ValueError("to_str_tokens takes a single sequence; index the batch first")
        return self.tokenizer.batch_decode([[t] for t in tokens.reshape(-1).tolist()])

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
        resolved = [
            (n, fn, d)
            for hooks, d in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd"))
            for name, fn in hooks
            for n in self.points.resolve(name)
        ]
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
        cache_kwarg = {self._kv_cache_argument: kv_cache}
        return self._logits(tokens, attention_mask, position_ids=position_ids, use_cache=True, **cache_kwarg)

    def forward(
        self,
        input: Input,
        return_type: str | None = "logits",
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        stop_at_layer: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run the model. Returns logits ``[batch, pos, d_vocab]`` (``return_type="logits"``), the mean
        next-token loss (``"loss"``), both (``"both"``) or nothing (``None``).

        Text is tokenised with :meth:`to_tokens`; padded batches get an attention mask automatically.
        ``stop_at_layer=L`` runs blocks ``0..L-1`` only and returns ``None``.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        tokens, mask = tokenize(self.tokenizer, input, prepend_bos)
        tokens = tokens.to(self.device)
        mask = attention_mask if attention_mask is not None else mask
        mask = mask.to(self.device) if mask is not None else None
        if stop_at_layer is not None:
            self._run_until(tokens, mask, stop_at_layer)
            return None
        logits = self._logits(tokens, mask, use_cache=False)
        if return_type in ("logits", None):
            return logits if return_type else None
        loss = lm_loss(logits, tokens, mask)
        return loss if return_type == "loss" else (logits, loss)

    def _run_until(self, tokens: torch.Tensor, mask: torch.Tensor | None, stop_at_layer: int) -> None:
        n = self.cfg.n_layers
        layer = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        if not 0 <= layer <= n:
            raise ValueError(f"stop_at_layer={stop_at_layer} is out of range: valid values are {-n}..{n}")
        blocks = self.blocks
        if layer == n:
            handle = self.points.add_stop(blocks[n - 1], before=False, exc=_StopForward)
        else:
            handle = self.points.add_stop(blocks[layer], before=True, exc=_StopForward)
        try:
            self.model(input_ids=tokens, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()

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
        """Run the model and keep activations: ``(logits, ActivationCache)``.

        ``names_filter`` is a hook name, a list of names, or a predicate on names; ``None`` caches every
        canonical point except ``attn.hook_result`` (ask for it by name). Tensors are detached, and moved
        or cast only when ``device`` / ``dtype`` are given. With ``stop_at_layer`` logits are ``None``.
        """
        if names_filter is None:
            names = self._cached_by_default
        elif isinstance(names_filter, str) or callable(names_filter):
            names = self.points.resolve(names_filter)
        else:
            names = [n for f in names_filter for n in self.points.resolve(f)]
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
        (``hook_k``/``hook_v`` see every key position, cached ones included).
        """
        tokens, mask = tokenize(self.tokenizer, input, prepend_bos, padding_side="left")
        tokens = tokens.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        eos = self.tokenizer.eos_token_id
        batch = tokens.shape[0]
        full_mask = mask.to(self.device) if mask is not None else torch.ones_like(tokens)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
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


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, pos, vocab]`` on ``tokens [batch, pos]``."""
    pred, target = logits[:, :-1].float(), tokens[:, 1:]
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return losses.mean()
    keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(losses.dtype)
    return (losses * keep).sum() / keep.sum()


HookedAutoModel = HookedModel
