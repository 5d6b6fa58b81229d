"""``model.cfg``: the architecture summary under TransformerLens field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HookedConfig:
    """Shapes and kinds of a hooked model, named as in TransformerLens's ``HookedTransformerConfig``.

    ``normalization_type`` is ``"LN"`` (LayerNorm) or ``"RMS"``; ``positional_embedding_type`` is
    ``"standard"`` (learned absolute) or ``"rotary"``; ``family`` is the transformers ``model_type``;
    ``output_logits_soft_cap`` is the final soft-cap ``c * tanh(logits / c)`` of the logits (Gemma 2), -1.0 without.

    The ``use_*`` flags are TransformerLens's opt-in hook points, off by default (set them with
    ``HookedModel(..., use_split_qkv_input=True)`` or ``model.set_use_split_qkv_input(True)``):
    ``use_attn_in`` serves ``blocks.L.hook_attn_in``, ``use_split_qkv_input`` ``blocks.L.hook_q_input`` /
    ``hook_k_input`` / ``hook_v_input``, ``use_hook_mlp_in`` ``blocks.L.hook_mlp_in``.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization_type: str
    positional_embedding_type: str
    family: str
    gated_mlp: bool
    parallel_attn_mlp: bool
    output_logits_soft_cap: float = -1.0
    use_attn_in: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False

    def to_dict(self) -> dict:
        return asdict(self)
