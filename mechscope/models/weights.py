"""Weight views with TransformerLens names and shapes, read through the architecture adapter.

:class:`WeightViews` is a mixin of :class:`~mechscope.models.HookedModel`: ``model.W_Q`` and friends are
properties computed from the wrapped HF model's parameters on each access, in TransformerLens's layout
(inputs multiply from the left, ``x @ W``; one leading dimension per layer and one per head). Stacked
views are new tensors that stay on the autograd graph of the parameters; ``W_E`` (except Gemma's),
``W_pos`` and ``W_U`` share storage with the model. Absent biases are zeros.

Fused projections are split here: GPT-2's ``c_attn`` (``[q | k | v]``, Conv1D ``[in, out]``), GPT-NeoX's
``query_key_value`` (per head ``[q, k, v]``), Phi-3's ``qkv_proj`` (``[q | k | v]``) and
``gate_up_proj`` (``[gate | up]``).

Norm weights are the multiplier the norm applies to its normalised input (``hook_normalized``): for
Gemma's ``(1 + weight)`` RMSNorm that is ``1 + weight``, not the raw parameter, so everywhere
``norm output == hook_normalized * w + b``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from mechscope.models.adapters import Adapter
from mechscope.models.config import HookedConfig
from mechscope.models.factored import FactoredMatrix

Pair = tuple[torch.Tensor, torch.Tensor]


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, a parameter or buffer; a ``TypeError`` naming the module when it has no such tensor."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r}")
    return value


def optional_tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` if it is a tensor (a bias, say), else ``None``."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def linear_in_out(module: nn.Module) -> Pair:
    """``(weight [in, out], bias [out])`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``; a zero bias if it has none."""
    weight = tensor_attr(module, "weight")
    w = weight if type(module).__name__ == "Conv1D" else weight.T
    bias = optional_tensor_attr(module, "bias")
    return w, bias if bias is not None else w.new_zeros(w.shape[1])


#: the fused q/k/v projections mechscope knows, by module name, and how their output features are laid out:
#: ``"concat"`` ``[q | k | v]`` (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``), ``"per_head"`` ``[head, (q, k, v), d_head]``
#: (GPT-NeoX's ``query_key_value``)
FUSED_QKV = {"c_attn": "concat", "qkv_proj": "concat", "query_key_value": "per_head"}


def qkv_projections(attn: nn.Module) -> tuple[tuple[nn.Module, ...], str | None]:
    """The modules that project q, k and v in one attention module: ``((q_proj, k_proj, v_proj), None)``, or
    ``((fused,), layout)`` with ``layout`` a value of :data:`FUSED_QKV`."""
    if hasattr(attn, "q_proj"):
        return tuple(attn.get_submodule(n) for n in ("q_proj", "k_proj", "v_proj")), None
    for name, layout in FUSED_QKV.items():
        if hasattr(attn, name):
            return (attn.get_submodule(name),), layout
    raise ValueError(
        f"no q/k/v projection found in {type(attn).__name__}: teach mechscope/models/weights.py its layout"
    )


def split_qkv(fused: torch.Tensor, layout: str, cfg: HookedConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., features]`` of a fused projection -> q ``[..., n_heads * d_head]``, k and v
    ``[..., n_key_value_heads * d_head]`` (its output, or the columns of its ``[in, out]`` weight)."""
    h, kv, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    if layout == "per_head":
        per_head = fused.unflatten(-1, (h, 3, d))
        q, k, v = (per_head[..., i, :].flatten(-2) for i in range(3))
        return q, k, v
    q, k, v = fused.split([h * d, kv * d, kv * d], dim=-1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, cfg: HookedConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`: q, k, v ``[..., heads * d_head]`` -> the fused ``[..., features]``."""
    if layout == "per_head":
        return torch.stack([t.unflatten(-1, (cfg.n_heads, cfg.d_head)) for t in (q, k, v)], dim=-2).flatten(-3)
    return torch.cat([q, k, v], dim=-1)


def qkv_in_out(attn: nn.Module, cfg: HookedConfig) -> tuple[Pair, Pair, Pair]:
    """The q, k, v projections of one attention module, each ``(weight [d_model, heads * d_head], bias)``.

    q has ``n_heads`` heads, k and v ``n_key_value_heads``.
    """
    modules, layout = qkv_projections(attn)
    if layout is None:
        q, k, v = (linear_in_out(m) for m in modules)
        return q, k, v
    w, b = linear_in_out(modules[0])
    q, k, v = zip(split_qkv(w, layout, cfg), split_qkv(b, layout, cfg), strict=True)
    return q, k, v


def mlp_in_out(block: nn.Module, adapter: Adapter, part: str) -> Pair:
    """``(weight [in, out], bias)`` of an MLP projection of ``block``: ``part`` is "in" (the up projection of
    gated MLPs, the input projection of plain ones), "gate" (gated MLPs) or "out" (the down projection)."""
    if part == "out":
        return linear_in_out(block.get_submodule(adapter.part_path("mlp_down")))
    if adapter.mlp_kind == "fused_gated":  # [gate | up]
        w, b = linear_in_out(block.get_submodule(adapter.part_path("mlp_in")))
        i = 0 if part == "gate" else 1
        return w.chunk(2, dim=-1)[i], b.chunk(2)[i]
    gated_up = part == "in" and adapter.mlp_kind == "gated"
    return linear_in_out(block.get_submodule(adapter.part_path("mlp_up" if gated_up else "mlp_in")))


def norm_weight_bias(module: nn.Module, kind: str) -> Pair:
    """``(w, b)`` ``[d_model]`` with ``norm output == normalized * w + b``: ``w`` is ``1 + weight`` for
    ``rms_offset`` (Gemma), ``b`` zeros when the norm has no bias (every RMSNorm)."""
    weight = tensor_attr(module, "weight")
    w = 1 + weight if kind == "rms_offset" else weight
    bias = optional_tensor_attr(module, "bias")
    return w, bias if bias is not None else w.new_zeros(w.shape)


class WeightViews:
    """TransformerLens weight views as properties; mixed into HookedModel (uses ``model``, ``adapter``, ``cfg``).

    Shapes: ``W_E [d_vocab, d_model]``, ``W_pos [n_ctx, d_model]``, ``W_U [d_model, d_vocab]``,
    ``b_U [d_vocab]``; ``W_Q/W_K/W_V [n_layers, n_heads, d_model, d_head]`` (K and V repeated to every
    query head; ``_W_K/_W_V [n_layers, n_key_value_heads, d_model, d_head]`` un-repeated),
    ``b_Q/b_K/b_V [n_layers, n_heads, d_head]`` (``_b_K/_b_V`` un-repeated), ``W_O [n_layers, n_heads, d_head,
    d_model]``, ``b_O [n_layers, d_model]``, ``W_in/W_gate [n_layers, d_model, d_mlp]``, ``b_in/b_gate
    [n_layers, d_mlp]``, ``W_out [n_layers, d_mlp, d_model]``, ``b_out [n_layers, d_model]``,
    ``ln1_w/ln1_b/ln2_w/ln2_b [n_layers, d_model]``, ``ln_final_w/ln_final_b [d_model]``;
    ``OV`` and ``QK`` factored ``[n_layers, n_heads, d_model, d_model]``.
    """

    model: PreTrainedModel
    adapter: Adapter
    cfg: HookedConfig

    # ---- helpers -------------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        return self.model.get_submodule(self.adapter.backbone)

    def _per_layer(self, fn: Callable[[nn.Module], Pair]) -> Pair:
        """``fn(block)`` for every block, each of the pair stacked over layers."""
        first, second = zip(*(fn(block) for block in self.adapter.blocks(self._backbone())), strict=True)
        return torch.stack(first), torch.stack(second)

    def _heads(self, which: int, repeat_kv: bool = True) -> Pair:
        """Projection ``which`` (0 q, 1 k, 2 v): ``W [n_layers, heads, d_model, d_head]``, ``b [n_layers, heads,
        d_head]``; k and v heads repeated to ``n_heads`` (as grouped-query attention uses them) if ``repeat_kv``."""
        w, b = self._per_layer(lambda blk: qkv_in_out(blk.get_submodule(self.adapter.attn), self.cfg)[which])
        w = w.unflatten(-1, (-1, self.cfg.d_head)).transpose(1, 2)
        b = b.unflatten(-1, (-1, self.cfg.d_head))
        groups = self.cfg.n_heads // w.shape[1]
        if repeat_kv and groups > 1:
            w, b = w.repeat_interleave(groups, dim=1), b.repeat_interleave(groups, dim=1)
        return w, b

    def _mlp(self, part: str) -> Pair:
        if part == "gate" and not self.cfg.gated_mlp:
            raise ValueError(f"W_gate/b_gate: {self.cfg.family} has a plain MLP (no gate projection); use W_in")
        return self._per_layer(lambda blk: mlp_in_out(blk, self.adapter, part))

    def _norm(self, which: str) -> Pair:
        path = self.adapter.ln1 if which == "ln1" else self.adapter.ln2
        return self._per_layer(lambda blk: norm_weight_bias(blk.get_submodule(path), self.adapter.norm_kind))

    # ---- embeddings and unembedding --------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:  # noqa: N802
        """Token embedding ``[d_vocab, d_model]`` as added to the residual: ``hook_embed == W_E[tokens]``.

        Gemma's ``sqrt(d_model)`` embedding scale is folded in (as TransformerLens does).
        """
        embed = self._backbone().get_submodule(self.adapter.embed)
        weight, scale = tensor_attr(embed, "weight"), optional_tensor_attr(embed, "embed_scale")
        return weight if scale is None else weight * scale.to(weight.dtype)

    @property
    def W_pos(self) -> torch.Tensor:  # noqa: N802
        """Learned position embedding ``[n_ctx, d_model]`` (GPT-2); rotary models have none and raise."""
        if not self.adapter.pos_embed:
            raise ValueError(
                f"W_pos: {self.cfg.family} has {self.cfg.positional_embedding_type} position embeddings, "
                "applied to queries and keys inside attention; only learned ('standard') positions have a W_pos"
            )
        return tensor_attr(self._backbone().get_submodule(self.adapter.pos_embed), "weight")

    @property
    def W_U(self) -> torch.Tensor:  # noqa: N802
        """Unembedding ``[d_model, d_vocab]``: ``logits == final norm output @ W_U + b_U``
        (before Gemma 2's final soft-cap)."""
        return linear_in_out(self.model.get_submodule(self.adapter.lm_head))[0]

    @property
    def b_U(self) -> torch.Tensor:  # noqa: N802
        """Unembedding bias ``[d_vocab]`` (zeros when the head has none)."""
        return linear_in_out(self.model.get_submodule(self.adapter.lm_head))[1]

    # ---- attention ---------------------------------------------------------------------------------
    @property
    def W_Q(self) -> torch.Tensor:  # noqa: N802
        """Query weights ``[n_layers, n_heads, d_model, d_head]`` (before rotary and Qwen 3's q-norm)."""
        return self._heads(0)[0]

    @property
    def W_K(self) -> torch.Tensor:  # noqa: N802
        """Key weights ``[n_layers, n_heads, d_model, d_head]``, each kv head repeated for its query heads."""
        return self._heads(1)[0]

    @property
    def W_V(self) -> torch.Tensor:  # noqa: N802
        """Value weights ``[n_layers, n_heads, d_model, d_head]``, each kv head repeated for its query heads."""
        return self._heads(2)[0]

    @property
    def _W_K(self) -> torch.Tensor:  # noqa: N802
        """Key weights ``[n_layers, n_key_value_heads, d_model, d_head]``, one per kv head."""
        return self._heads(1, repeat_kv=False)[0]

    @property
    def _W_V(self) -> torch.Tensor:  # noqa: N802
        """Value weights ``[n_layers, n_key_value_heads, d_model, d_head]``, one per kv head."""
        return self._heads(2, repeat_kv=False)[0]

    @property
    def b_Q(self) -> torch.Tensor:  # noqa: N802
        """Query bias ``[n_layers, n_heads, d_head]``."""
        return self._heads(0)[1]

    @property
    def b_K(self) -> torch.Tensor:  # noqa: N802
        """Key bias ``[n_layers, n_heads, d_head]`` (repeated like ``W_K``)."""
        return self._heads(1)[1]

    @property
    def b_V(self) -> torch.Tensor:  # noqa: N802
        """Value bias ``[n_layers, n_heads, d_head]`` (repeated like ``W_V``)."""
        return self._heads(2)[1]

    @property
    def _b_K(self) -> torch.Tensor:  # noqa: N802
        """Key bias ``[n_layers, n_key_value_heads, d_head]``."""
        return self._heads(1, repeat_kv=False)[1]

    @property
    def _b_V(self) -> torch.Tensor:  # noqa: N802
        """Value bias ``[n_layers, n_key_value_heads, d_head]``."""
        return self._heads(2, repeat_kv=False)[1]

    def _o_proj(self) -> Pair:
        w, b = self._per_layer(
            lambda blk: linear_in_out(blk.get_submodule(self.adapter.attn).get_submodule(self.adapter.o_proj))
        )
        return w.unflatten(1, (self.cfg.n_heads, self.cfg.d_head)), b

    @property
    def W_O(self) -> torch.Tensor:  # noqa: N802
        """Output weights ``[n_layers, n_heads, d_head, d_model]``:
        ``hook_result[..., h, :] == hook_z[..., h, :] @ W_O[l, h]``."""
        return self._o_proj()[0]

    @property
    def b_O(self) -> torch.Tensor:  # noqa: N802
        """Output bias ``[n_layers, d_model]``, added once to the sum over heads."""
        return self._o_proj()[1]

    @property
    def OV(self) -> FactoredMatrix:  # noqa: N802
        """``W_V @ W_O`` per head, factored: ``[n_layers, n_heads, d_model, d_model]`` (biases not included)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:  # noqa: N802
        """``W_Q @ W_K^T`` per head, factored: ``[n_layers, n_heads, d_model, d_model]``
        (no biases, rotary, scaling or soft-cap)."""
        return FactoredMatrix(self.W_Q, self.W_K.mT)

    # ---- MLP ---------------------------------------------------------------------------------------
    @property
    def W_in(self) -> torch.Tensor:  # noqa: N802
        """MLP input ``[n_layers, d_model, d_mlp]``: the up projection of gated MLPs (TransformerLens's convention)."""
        return self._mlp("in")[0]

    @property
    def b_in(self) -> torch.Tensor:
        """Bias of ``W_in`` ``[n_layers, d_mlp]``."""
        return self._mlp("in")[1]

    @property
    def W_gate(self) -> torch.Tensor:  # noqa: N802
        """Gate projection of gated MLPs ``[n_layers, d_model, d_mlp]``:
        ``mlp.hook_pre == ln2 output @ W_gate + b_gate``. Plain MLPs raise."""
        return self._mlp("gate")[0]

    @property
    def b_gate(self) -> torch.Tensor:
        """Bias of ``W_gate`` ``[n_layers, d_mlp]``."""
        return self._mlp("gate")[1]

    @property
    def W_out(self) -> torch.Tensor:  # noqa: N802
        """MLP output ``[n_layers, d_mlp, d_model]``: the down projection, applied to ``mlp.hook_post``."""
        return self._mlp("out")[0]

    @property
    def b_out(self) -> torch.Tensor:
        """Bias of ``W_out`` ``[n_layers, d_model]``."""
        return self._mlp("out")[1]

    # ---- norms -------------------------------------------------------------------------------------
    @property
    def ln1_w(self) -> torch.Tensor:
        """Multiplier of the pre-attention norm ``[n_layers, d_model]`` (``1 + weight`` for Gemma)."""
        return self._norm("ln1")[0]

    @property
    def ln1_b(self) -> torch.Tensor:
        """Bias of the pre-attention norm ``[n_layers, d_model]`` (zeros for RMSNorm)."""
        return self._norm("ln1")[1]

    @property
    def ln2_w(self) -> torch.Tensor:
        """Multiplier of the pre-MLP norm ``[n_layers, d_model]`` (``1 + weight`` for Gemma)."""
        return self._norm("ln2")[0]

    @property
    def ln2_b(self) -> torch.Tensor:
        """Bias of the pre-MLP norm ``[n_layers, d_model]`` (zeros for RMSNorm)."""
        return self._norm("ln2")[1]

    @property
    def ln_final_w(self) -> torch.Tensor:
        """Multiplier of the final norm ``[d_model]`` (``1 + weight`` for Gemma)."""
        return self._final_norm()[0]

    @property
    def ln_final_b(self) -> torch.Tensor:
        """Bias of the final norm ``[d_model]`` (zeros for RMSNorm)."""
        return self._final_norm()[1]

    def _final_norm(self) -> Pair:
        return norm_weight_bias(self._backbone().get_submodule(self.adapter.final_norm), self.adapter.norm_kind)
