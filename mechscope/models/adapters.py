"""One small adapter per architecture family: where each part of a block lives in the HF module tree.

Adding a family means adding one :class:`Adapter` entry to ``ADAPTERS``: the attribute paths of the
embedding, the blocks and their norms, attention, MLP and the unembedding, the MLP shape, and the norm
style. Everything else (hook points, caching, generation) works from these paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mechscope.models.config import HookedConfig


@dataclass(frozen=True)
class Adapter:
    """Module paths of one family. Paths inside a block are relative to the block module."""

    family: str
    backbone: str  # the decoder stack inside the *ForCausalLM model
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    attn: str
    o_proj: str  # relative to ``attn``
    ln1: str
    ln2: str
    attn_out: str  # the module whose output the block adds to the residual after attention
    mlp: str
    mlp_out: str  # the module whose output the block adds to the residual after the MLP
    mlp_in: str  # relative to ``mlp``: gate projection (gated) or input projection (plain)
    mlp_down: str  # relative to ``mlp``
    mlp_kind: str = "gated"  # "gated" (gate_proj & up_proj), "fused_gated" (gate_up_proj), "plain"
    mlp_up: str | None = None  # relative to ``mlp``, gated MLPs only
    norm_kind: str = "rms"  # "layer", "rms" (weight * x_hat) or "rms_offset" ((1 + weight) * x_hat)
    pos_embed: str | None = None  # learned absolute positions, relative to the backbone
    post_norms: bool = False  # attn_out and mlp_out are norms of the sublayer outputs (Gemma 2: ln1_post, ln2_post)

    def blocks(self, backbone: nn.Module) -> nn.ModuleList:
        """The decoder blocks of ``backbone``, as they are now."""
        blocks = backbone.get_submodule(self.layers)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{self.family}: {self.layers} is a {type(blocks).__name__}, not the ModuleList of blocks")
        return blocks

    def block(self, backbone: nn.Module, layer: int) -> nn.Module:
        return self.blocks(backbone)[layer]

    def part_path(self, part: str) -> str:
        """The path inside a block of ``part``: one of :data:`BLOCK_PARTS`."""
        inner = {"o_proj": self.attn, "mlp_in": self.mlp, "mlp_up": self.mlp, "mlp_down": self.mlp}
        if part not in BLOCK_PARTS:
            raise ValueError(f"{part!r} is not a part of a block; the parts are {', '.join(BLOCK_PARTS)}")
        path = getattr(self, part)
        if path is None:
            raise ValueError(f"a {self.family} block has no {part} (its MLP is {self.mlp_kind})")
        return f"{inner[part]}.{path}" if part in inner else path


#: the parts of a block :meth:`Adapter.part_path` finds: attention and its output projection, the norms, the
#: modules whose outputs the block adds to the residual, the MLP and its projections
BLOCK_PARTS = ("attn", "o_proj", "ln1", "ln2", "attn_out", "mlp", "mlp_out", "mlp_in", "mlp_up", "mlp_down")

_LLAMA: dict[str, Any] = dict(
    backbone="model",
    embed="embed_tokens",
    layers="layers",
    final_norm="norm",
    lm_head="lm_head",
    attn="self_attn",
    o_proj="o_proj",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn_out="self_attn",
    mlp="mlp",
    mlp_out="mlp",
    mlp_in="gate_proj",
    mlp_up="up_proj",
    mlp_down="down_proj",
)

ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        family="gpt2",
        backbone="transformer",
        embed="wte",
        pos_embed="wpe",
        layers="h",
        final_norm="ln_f",
        lm_head="lm_head",
        attn="attn",
        o_proj="c_proj",
        ln1="ln_1",
        ln2="ln_2",
        attn_out="attn",
        mlp="mlp",
        mlp_out="mlp",
        mlp_in="c_fc",
        mlp_down="c_proj",
        mlp_kind="plain",
        norm_kind="layer",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        backbone="gpt_neox",
        embed="embed_in",
        layers="layers",
        final_norm="final_layer_norm",
        lm_head="lm_head",
        attn="attention",
        o_proj="dense",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        attn_out="attention",
        mlp="mlp",
        mlp_out="mlp",
        mlp_in="dense_h_to_4h",
        mlp_down="dense_4h_to_h",
        mlp_kind="plain",
        norm_kind="layer",
    ),
    "llama": Adapter(family="llama", **_LLAMA),
    "mistral": Adapter(family="mistral", **_LLAMA),
    "qwen2": Adapter(family="qwen2", **_LLAMA),
    "qwen3": Adapter(family="qwen3", **_LLAMA),
    "gemma": Adapter(family="gemma", **{**_LLAMA, "norm_kind": "rms_offset"}),
    "gemma2": Adapter(
        family="gemma2",
        **{
            **_LLAMA,
            "norm_kind": "rms_offset",
            "attn_out": "post_attention_layernorm",
            "ln2": "pre_feedforward_layernorm",
            "mlp_out": "post_feedforward_layernorm",
            "post_norms": True,
        },
    ),
    "phi3": Adapter(
        family="phi3",
        **{**_LLAMA, "mlp_in": "gate_up_proj", "mlp_up": None, "mlp_kind": "fused_gated"},
    ),
}


def adapter_for(hf_config) -> Adapter:
    """The adapter of a transformers config's ``model_type``; a clear error for families not covered."""
    family = getattr(hf_config, "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(
            f"mechscope has no adapter for model_type {family!r}. Supported families: "
            f"{', '.join(sorted(ADAPTERS))}. Add one in mechscope/models/adapters.py (a dozen module paths)."
        )
    return ADAPTERS[family]


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def hooked_config(hf_config, adapter: Adapter) -> HookedConfig:
    """Read a :class:`HookedConfig` (TransformerLens field names) off a transformers config."""
    c = hf_config
    d_model = _first(c, "hidden_size", "n_embd")
    n_heads = _first(c, "num_attention_heads", "n_head")
    d_head = _first(c, "head_dim", default=d_model // n_heads)
    return HookedConfig(
        n_layers=_first(c, "num_hidden_layers", "n_layer"),
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=_first(c, "num_key_value_heads", default=n_heads),
        d_head=d_head,
        d_mlp=_first(c, "intermediate_size", "n_inner", default=4 * d_model),
        d_vocab=c.vocab_size,
        n_ctx=_first(c, "max_position_embeddings", "n_positions"),
        act_fn=_first(c, "hidden_activation", "hidden_act", "activation_function"),
        normalization_type="LN" if adapter.norm_kind == "layer" else "RMS",
        positional_embedding_type="standard" if adapter.pos_embed else "rotary",
        family=adapter.family,
        gated_mlp=adapter.mlp_kind != "plain",
        parallel_attn_mlp=bool(getattr(c, "use_parallel_residual", False)),
        output_logits_soft_cap=float(getattr(c, "final_logit_softcapping", None) or -1.0),
    )
