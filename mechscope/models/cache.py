"""ActivationCache: the activations of one forward pass, by hook name, with TransformerLens's helpers.

The residual-stream helpers follow TransformerLens 3.x's ``ActivationCache`` (same arguments, labels and
values on the same weights): ``accumulated_resid`` (logit lens), ``decompose_resid``, ``stack_head_results``,
``stack_neuron_results`` and ``get_full_resid_decomposition`` (direct logit attribution), ``apply_ln_to_stack``
and ``logit_attrs``. The ones that need weights (head and neuron results, biases, the final norm, the
unembedding) read them from the model that made the cache (``cache.model``); a cache loaded from a file has
none until one is given (``ActivationCache.load(path, model=model)``).

Layers: ``layer`` is the block whose input is meant, ``0..n_layers``; ``n_layers``, ``-1`` and ``None`` all
mean the final residual stream (the input of the unembedding). Other negative layers count back from there
(``-2`` is the input of the last block).

Positions: ``pos_slice`` is TransformerLens's slice input, applied to the position dimension: an int (that
position; the dimension goes), a tuple (``(a, b)`` is ``a:b``), a ``slice``, a list or tensor of indices, or
``None`` (every position).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mechscope.models.config import HookedConfig
from mechscope.models.names import block_hook, get_act_name

SliceInput: TypeAlias = int | slice | tuple[int | None, ...] | Sequence[int] | torch.Tensor | np.ndarray | None
Tokens: TypeAlias = str | int | torch.Tensor


class CacheModel(Protocol):
    """What the weight-reading helpers of :class:`ActivationCache` need of a model (a ``HookedModel`` has it)."""

    cfg: HookedConfig

    @property
    def W_O(self) -> torch.Tensor: ...  # noqa: N802 (TransformerLens's weight names)

    @property
    def b_O(self) -> torch.Tensor: ...  # noqa: N802

    @property
    def W_out(self) -> torch.Tensor: ...  # noqa: N802

    @property
    def b_out(self) -> torch.Tensor: ...

    @property
    def W_U(self) -> torch.Tensor: ...  # noqa: N802

    @property
    def ln_final(self) -> nn.Module: ...

    def to_tokens(self, input: str, prepend_bos: bool | None = None) -> torch.Tensor: ...


def apply_slice(tensor: torch.Tensor, index: SliceInput, dim: int) -> torch.Tensor:
    """``tensor`` indexed along ``dim`` by a TransformerLens slice input (see the module docstring)."""
    key: int | slice | torch.Tensor
    if index is None:
        return tensor
    if isinstance(index, bool):
        raise TypeError("a slice input is an int, a tuple, a slice, a list or tensor of indices, or None; got a bool")
    if isinstance(index, int):
        key = index
    elif isinstance(index, tuple):
        key = slice(*index)
    elif isinstance(index, slice):
        key = index
    elif isinstance(index, list | torch.Tensor | np.ndarray):
        key = torch.as_tensor(index, device=tensor.device)
        if key.dtype.is_floating_point or key.dtype == torch.bool:
            raise TypeError(f"index lists and tensors hold integer indices, got dtype {key.dtype}")
    else:
        raise TypeError(
            f"slice input {index!r}: give an int, a tuple ((a, b) is a:b), a slice, a list or tensor of indices, "
            "or None (everything)"
        )
    return tensor[(slice(None),) * (dim % tensor.ndim) + (key,)]


class ActivationCache(Mapping):
    """Activations by hook name. ``cache["blocks.3.hook_resid_post"]``, ``cache["resid_post", 3]``,
    ``cache["resid_post", -1]`` (the last block).

    Tensors keep their batch dimension: residual activations are ``[batch, pos, d_model]``. ``model`` is the
    model the activations came from (``run_with_cache`` sets it); the helpers that read weights need it.
    """

    def __init__(self, activations: dict[str, torch.Tensor], cfg: HookedConfig, model: CacheModel | None = None):
        self._acts = dict(activations)
        self.cfg = cfg
        self.model = model

    # ---- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], key[1] + self.cfg.n_layers, *key[2:])
            name = get_act_name(*key)
        else:
            name = get_act_name(key)
        if name not in self._acts:
            raise KeyError(
                f"{name!r} is not in this cache; it holds {len(self._acts)} activations "
                "(run_with_cache(names_filter=...) chooses which)"
            )
        return self._acts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self._acts)[:4])}, ...)"

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A copy with every tensor moved to ``device`` and floating tensors cast to ``dtype`` (same model)."""
        moved = {
            k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in self._acts.items()
        }
        return ActivationCache(moved, self.cfg, self.model)

    # ---- helpers -----------------------------------------------------------------------------------
    def _layer(self, layer: int | None, mlp_input: bool = False) -> int:
        """``layer`` as ``0..n_layers``: None and -1 are n_layers, other negatives count back from there."""
        n = self.cfg.n_layers
        if layer is None:
            return n
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer is an int (or None), got {layer!r}")
        resolved = layer + n + 1 if layer < 0 else layer
        if not 0 <= resolved <= n:
            raise ValueError(
                f"layer {layer} is out of range: give 0..{n} (the input of that block; {n}, -1 or None: the "
                f"final residual, the input of the unembedding), or -{n + 1}..-1"
            )
        if mlp_input and resolved == n:
            raise ValueError(
                "mlp_input=True means the input of block `layer`'s MLP; the final residual has none: "
                f"give a layer below {n}"
            )
        return resolved

    def _model(self, what: str) -> CacheModel:
        if self.model is None:
            raise ValueError(
                f"{what} needs the model's weights, and this cache has no model (a cache read from a file has "
                "none): ActivationCache.load(path, model=model), or set cache.model = model"
            )
        return self.model

    def _component_shape(self, pos_slice: SliceInput) -> torch.Size:
        """``[*batch_and_pos, d_model]``: the shape of one residual component after ``pos_slice``."""
        return apply_slice(self["embed"], pos_slice, -2).shape

    def _empty(self, pos_slice: SliceInput, width: int | None = None) -> torch.Tensor:
        """A stack of no components, ``[0, *batch_and_pos, width or d_model]``."""
        shape = self._component_shape(pos_slice)
        return self["embed"].new_zeros(0, *shape[:-1], width or shape[-1])

    def _embeds(self, pos_slice: SliceInput) -> tuple[list[torch.Tensor], list[str]]:
        """``hook_embed`` and ``hook_pos_embed`` (those in the cache), position-sliced, and their labels."""
        names = [n for n in ("embed", "pos_embed") if get_act_name(n) in self._acts]
        return [apply_slice(self[n], pos_slice, -2) for n in names], names

    def _resid_at(self, layer: int, pos_slice: SliceInput) -> torch.Tensor:
        """The residual stream at ``layer`` (``resid_post`` of block ``layer - 1``; ``resid_pre`` of block 0)."""
        resid = self["resid_post", layer - 1] if layer > 0 else self["resid_pre", 0]
        return apply_slice(resid, pos_slice, -2)

    def _ln_scale(
        self, layer: int, mlp_input: bool, pos_slice: SliceInput, batch_slice: SliceInput = None
    ) -> torch.Tensor:
        """The cached ``hook_scale`` ``[*batch_and_pos, 1]`` of the norm that reads the residual at ``layer``."""
        scale = self["scale"] if layer == self.cfg.n_layers else self["scale", layer, "ln2" if mlp_input else "ln1"]
        return apply_slice(apply_slice(scale, pos_slice, -2), batch_slice, 0)

    def _transform(
        self,
        stack: torch.Tensor,
        layer: int,
        mlp_input: bool,
        pos_slice: SliceInput,
        apply_ln: bool,
        project: torch.Tensor | None,
    ) -> torch.Tensor:
        """``stack`` through :meth:`apply_ln_to_stack` (if ``apply_ln``), then ``@ project`` (if given)."""
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return stack if project is None else stack @ project.to(stack)

    # ---- stacking and the residual stream ----------------------------------------------------------
    def stack_activation(self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None):
        """``[layers_covered, *activation_shape]``: ``activation_name`` (a shorthand such as "resid_post") of
        blocks ``0..layer-1``; ``layer`` -1, None or n_layers: every block."""
        n = self._layer(layer)
        return torch.stack([self[get_act_name(activation_name, i, sublayer_type)] for i in range(n)])

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream at each block up to ``layer`` (logit lens): ``[components, *batch_and_pos, d_model]``.

        ``resid_pre`` of blocks ``0..layer-1`` (labels ``"{l}_pre"``; with ``incl_mid`` each followed by its
        ``resid_mid``, ``"{l}_mid"``), then ``resid_pre`` of ``layer`` (plus its ``resid_mid`` with ``mlp_input``),
        or, when ``layer`` is the final residual, the last block's ``resid_post`` (``"final_post"``).

        ``apply_ln`` as TransformerLens 3.x: up to the final residual, every component goes through the model's
        final norm, weights included, with statistics recomputed from that component (``model.ln_final(c)``;
        the last row is then ``ln_final``'s output); up to an earlier ``layer``, each is centred (LayerNorm) and
        divided by the cached ``hook_scale`` of ``layer``'s ``ln1`` (``ln2`` with ``mlp_input``).
        """
        layer = self._layer(layer)
        n = self.cfg.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Components whose sum is the residual at ``layer``: ``[components, *batch_and_pos, d_model]``.

        ``embed`` (and ``pos_embed`` for learned positions; not with ``incl_embeds=False``), then each earlier
        block's ``"{l}_attn_out"`` and ``"{l}_mlp_out"`` (``mode`` "attn" or "mlp" keeps one kind), and with
        ``mlp_input`` the attention output of ``layer`` itself (the residual the MLP of ``layer`` reads).
        ``apply_ln`` centres (LayerNorm) and divides by the cached scale of the norm that reads that residual.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer, mlp_input)
        parts, labels = self._embeds(pos_slice) if incl_embeds else ([], [])
        kinds = [k for k, keep in (("attn_out", mode != "mlp"), ("mlp_out", mode != "attn")) if keep]
        blocks = [(i, kind) for i in range(layer) for kind in kinds]
        if mlp_input and mode != "mlp":
            blocks.append((layer, "attn_out"))
        for i, kind in blocks:
            parts.append(apply_slice(self[kind, i], pos_slice, -2))
            labels.append(f"{i}_{kind}")
        stack = torch.stack(parts) if parts else self._empty(pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """A stack ``[components, *batch_and_pos, d_model]`` as the norm that reads the residual at ``layer``
        sees it (``ln1`` of block ``layer``, ``ln2`` with ``mlp_input``, ``ln_final`` at the final residual).

        As TransformerLens: centre each component (LayerNorm only) and divide by that norm's cached
        ``hook_scale``, computed from the whole residual, so the map is linear and the components still sum
        to the norm's ``hook_normalized``; the norm's weight and bias are not applied. ``pos_slice`` is the
        slice already applied to the stack's positions (it is applied to the scale); ``batch_slice`` is applied
        to both (to the stack's dimension 1 only if ``has_batch_dim``).

        ``recompute_ln=True`` at the final residual instead applies the model's final norm to each component
        on its own (statistics from that component, weight and bias included), for logit-lens views.
        """
        layer = self._layer(layer, mlp_input)
        if has_batch_dim:
            residual_stack = apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self.cfg.n_layers:
            return self._model("apply_ln_to_stack(recompute_ln=True)").ln_final(residual_stack)
        if self.cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / self._ln_scale(layer, mlp_input, pos_slice, batch_slice)

    # ---- direct logit attribution ------------------------------------------------------------------
    def compute_head_results(self) -> None:
        """Put each head's output ``blocks.L.attn.hook_result`` ``[batch, pos, head, d_model]`` (``z @ W_O`` per
        head, no bias) in the cache, from the cached ``hook_z``; nothing to do if the cache has them already."""
        names = [block_hook(i, "attn.hook_result") for i in range(self.cfg.n_layers)]
        if all(n in self._acts for n in names):
            return
        W_O = self._model("compute_head_results").W_O  # noqa: N806 [n_layers, head, d_head, d_model]
        for i, name in enumerate(names):
            z = self["z", i]
            self._acts[name] = torch.einsum("...hd,hdm->...hm", z, W_O[i].to(z))

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Each head's output in blocks ``0..layer-1``: ``[layer * n_heads, *batch_and_pos, d_model]``, labels
        ``"L{l}H{h}"``; with ``incl_remainder`` a last ``"remainder"``, the rest of the residual after block
        ``layer - 1`` (embeddings, MLPs, biases). Computes the head results first (:meth:`compute_head_results`).
        ``apply_ln``: as :meth:`apply_ln_to_stack` at ``layer``."""
        layer = self._layer(layer)
        if layer > 0:
            self.compute_head_results()
        heads = [apply_slice(self["result", i], pos_slice, -3).movedim(-2, 0) for i in range(layer)]
        stack = torch.cat(heads) if heads else self._empty(pos_slice)
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(self.cfg.n_heads)]
        if incl_remainder:
            stack = torch.cat([stack, self._resid_at(layer, pos_slice)[None] - stack.sum(0, keepdim=True)])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: SliceInput = None,
        pos_slice: SliceInput = None,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each neuron's output in block ``layer``, ``mlp.hook_post * W_out[layer]``: ``[*batch_and_pos, neurons,
        d_model]`` (an int ``neuron_slice`` drops the neuron dimension). With ``project_output_onto``
        (``[d_model]`` or ``[d_model, k]``) the ``d_model`` dimension is replaced by the projection (it goes, or
        becomes ``k``) without the ``d_model`` results being formed."""
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer is a block, 0..{n - 1} (or -{n}..-1 from the end), got {layer!r}")
        project, squeeze = _as_2d(project_output_onto)
        W_out = self._model("get_neuron_results").W_out  # noqa: N806
        out = _neuron_results(self["post", layer], W_out[layer], pos_slice, neuron_slice, project)
        return out.squeeze(-1) if squeeze else out

    def _neuron_stack(
        self,
        n_blocks: int,
        layer: int,
        mlp_input: bool,
        pos_slice: SliceInput,
        neurons: SliceInput,
        apply_ln: bool,
        project: torch.Tensor | None,
    ) -> torch.Tensor:
        """The neuron results of blocks ``0..n_blocks-1``, ``[n_blocks * neurons, *batch_and_pos, d_model or k]``,
        each as :meth:`_transform` at ``layer`` would leave it, computed from ``W_out`` (centred for LayerNorm,
        projected) so that the ``[..., neurons, d_model]`` results are formed only without a projection."""
        if n_blocks == 0:
            return self._empty(pos_slice, None if project is None else project.shape[1])
        W_out = self._model("stack_neuron_results").W_out  # noqa: N806
        scale = self._ln_scale(layer, mlp_input, pos_slice) if apply_ln else None
        centre = apply_ln and self.cfg.normalization_type == "LN"
        per_block = [
            _neuron_results(self["post", i], W_out[i], pos_slice, neurons, project, centre, scale)
            for i in range(n_blocks)
        ]
        return torch.cat(per_block, dim=-2).movedim(-2, 0)

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: SliceInput = None,
        neuron_slice: SliceInput = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Each neuron's output in blocks ``0..layer-1``: ``[layer * neurons, *batch_and_pos, d_model]``, labels
        ``"L{l}N{n}"``. ``neuron_slice`` picks the neurons of every block (an int picks one and keeps the
        dimension); ``incl_remainder`` adds the rest of the residual at ``layer`` (``"remainder"``); ``apply_ln``
        as :meth:`apply_ln_to_stack` at ``layer``; ``project_output_onto`` (``[d_model]`` or ``[d_model, k]``)
        replaces ``d_model`` by the projection (it goes, or becomes ``k``), never forming the ``d_model`` stack."""
        layer = self._layer(layer)
        if isinstance(neuron_slice, int) and not isinstance(neuron_slice, bool):
            neuron_slice = [neuron_slice]
        project, squeeze = _as_2d(project_output_onto)
        stack = self._neuron_stack(layer, layer, False, pos_slice, neuron_slice, apply_ln, project)
        neurons = apply_slice(torch.arange(self.cfg.d_mlp), neuron_slice, 0).tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in neurons]
        if incl_remainder:
            total = self._transform(self._resid_at(layer, pos_slice)[None], layer, False, pos_slice, apply_ln, project)
            stack = torch.cat([stack, total - stack.sum(0, keepdim=True)])
            labels.append("remainder")
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        return_labels: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every component of the residual at ``layer`` (the input of its MLP with ``mlp_input``), summing to it:
        ``[components, *batch_and_pos, d_model]``.

        In order: each head's result (``"L{l}H{h}"``), each neuron's (``"L{l}N{n}"``; each block's
        ``"{l}_mlp_out"`` with ``expand_neurons=False``), ``embed``, ``pos_embed`` (learned positions), and
        ``"bias"``, the attention and (with ``expand_neurons``) MLP output biases of those blocks. ``apply_ln``
        as :meth:`apply_ln_to_stack` at ``layer``; ``project_output_onto`` as in :meth:`stack_neuron_results`.
        """
        layer = self._layer(layer, mlp_input)
        project, squeeze = _as_2d(project_output_onto)

        def transform(stack: torch.Tensor) -> torch.Tensor:
            return self._transform(stack, layer, mlp_input, pos_slice, apply_ln, project)

        heads, labels = self.stack_head_results(layer + mlp_input, pos_slice=pos_slice, return_labels=True)
        parts = [transform(heads)]
        if layer > 0 and expand_neurons:
            parts.append(self._neuron_stack(layer, layer, mlp_input, pos_slice, None, apply_ln, project))
            labels += [f"L{i}N{n}" for i in range(layer) for n in range(self.cfg.d_mlp)]
        elif layer > 0:
            mlps, mlp_labels = self.decompose_resid(
                layer, mlp_input, "mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
            )
            parts.append(transform(mlps))
            labels += mlp_labels
        embeds, embed_labels = self._embeds(pos_slice)
        parts += [transform(e[None]) for e in embeds]
        bias = accumulated_bias(self._model("get_full_resid_decomposition"), layer, mlp_input, expand_neurons)
        parts.append(transform(bias.to(heads).expand(1, *self._component_shape(pos_slice))))
        stack = torch.cat(parts)
        stack = stack.squeeze(-1) if squeeze else stack
        labels += [*embed_labels, "bias"]
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: Tokens,
        incorrect_tokens: Tokens | None = None,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of ``incorrect_tokens``):
        ``[components, *batch_and_pos]``.

        The stack ``[components, *batch_and_pos, d_model]`` goes through :meth:`apply_ln_to_stack` at the final
        residual (``pos_slice``, ``batch_slice``, ``has_batch_dim`` are passed on), then is dotted with the
        tokens' unembedding columns (:func:`tokens_to_residual_directions`): a token (a string of one token, an
        int, a one-element tensor) or a tensor ``[batch]`` / ``[batch, pos]`` of them. As in TransformerLens the
        final norm's weight and the unembedding bias are not applied: fold the norm's weight into ``W_U`` first
        if the model has one that matters.
        """
        model = self._model("logit_attrs")
        directions = tokens_to_residual_directions(model, tokens)
        if incorrect_tokens is not None:
            shapes = _token_shape(tokens), _token_shape(incorrect_tokens)
            if shapes[0] != shapes[1]:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(shapes[0])} and "
                    f"{tuple(shapes[1])}"
                )
            directions = directions - tokens_to_residual_directions(model, incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        return (scaled * directions.to(scaled)).sum(-1)

    # ---- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write every activation to one safetensors file (the model config goes in its metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for k, v in self._acts.items():
            t = v.detach().contiguous().cpu()
            if (
                t.untyped_storage().data_ptr() in seen
            ):  # one tensor cached under two names (resid_post L = resid_pre L+1)
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[k] = t
        save_file(tensors, str(path), metadata={"mechscope_cfg": json.dumps(self.cfg.to_dict())})
        return path

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", model: CacheModel | None = None
    ) -> ActivationCache:
        """Read a cache written by :meth:`save`; ``model`` (the one that made it) for the weight-reading helpers."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "mechscope_cfg" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an ActivationCache (no mechscope_cfg metadata)")
        cfg = HookedConfig(**json.loads(meta["mechscope_cfg"]))
        if model is not None and model.cfg != cfg:
            raise ValueError(f"{path} was cached from another architecture than this model's: {cfg} vs {model.cfg}")
        return cls(load_file(str(path), device=str(device)), cfg, model)


# ---- model-side pieces (TransformerLens's HookedTransformer methods of the same names) ------------------------
def to_single_token(model: CacheModel, string: str) -> int:
    """The id of ``string``, which must be exactly one token (no BOS is added)."""
    ids = model.to_tokens(string, prepend_bos=False).reshape(-1)
    if ids.numel() != 1:
        raise ValueError(f"{string!r} is {ids.numel()} tokens, not one; pass token ids (model.to_tokens) instead")
    return int(ids.item())


def tokens_to_residual_directions(model: CacheModel, tokens: Tokens) -> torch.Tensor:
    """The unembedding columns ``W_U[:, t]`` of ``tokens``: ``[d_model]`` for one token (a string of one
    token, an int, a one-element tensor), ``[*tokens.shape, d_model]`` for a tensor of several."""
    W_U = model.W_U  # noqa: N806
    if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
        return W_U[:, tokens.to(W_U.device)].movedim(0, -1)
    if isinstance(tokens, str):
        return W_U[:, to_single_token(model, tokens)]
    if isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
        return W_U[:, int(tokens.item())]
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        return W_U[:, tokens]
    raise TypeError(f"tokens: give a string of one token, an int or a tensor of token ids, got {tokens!r}")


def accumulated_bias(
    model: CacheModel, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> torch.Tensor:
    """``[d_model]``: the output biases added to the residual before ``layer`` (``0..n_layers``): ``b_O`` and
    (with ``include_mlp_biases``) ``b_out`` of blocks ``0..layer-1``, and with ``mlp_input`` ``b_O`` of ``layer``."""
    n = model.cfg.n_layers
    if not 0 <= layer <= n or (mlp_input and layer == n):
        raise ValueError(f"layer must be in 0..{n} ({n - 1} at most with mlp_input), got {layer}")
    b_O = model.b_O  # noqa: N806
    total = b_O[:layer].sum(0)
    if include_mlp_biases:
        total = total + model.b_out[:layer].sum(0)
    return total + b_O[layer] if mlp_input else total


def _token_shape(tokens: Tokens) -> torch.Size:
    return tokens.shape if isinstance(tokens, torch.Tensor) else torch.Size()


def _as_2d(project: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """``(project as [d_model, k], whether it was [d_model])``."""
    if project is None or project.ndim == 2:
        return project, False
    if project.ndim == 1:
        return project[:, None], True
    raise ValueError(f"project_output_onto is [d_model] or [d_model, k], got shape {tuple(project.shape)}")


def _neuron_results(
    post: torch.Tensor,
    w_out: torch.Tensor,
    pos_slice: SliceInput,
    neurons: SliceInput,
    project: torch.Tensor | None,
    centre: bool = False,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``post [batch, pos, d_mlp]`` times ``w_out [d_mlp, d_model]`` per neuron: ``[*batch_and_pos, neurons, d]``.

    The rows of ``w_out`` are centred first if ``centre`` and projected (``d = k``) if ``project [d_model, k]``;
    the activations are divided by ``scale [*batch_and_pos, 1]`` if given (``neurons`` must then keep its
    dimension). Centring and the scale together are :meth:`ActivationCache.apply_ln_to_stack`, by linearity.
    """
    acts = apply_slice(apply_slice(post, pos_slice, -2), neurons, -1)
    w = apply_slice(w_out, neurons, 0).to(acts)
    if centre:
        w = w - w.mean(-1, keepdim=True)
    if project is not None:
        w = w @ project.to(w)
    if scale is not None:
        acts = acts / scale
    return acts[..., None] * w
