"""The hook-name grammar: every hook name is parsed and built here, and nowhere else.

Names are TransformerLens's::

    hook_embed  hook_pos_embed                                  before the blocks
    blocks.L.<point>                                            a point of block L (BLOCK_POINTS): blocks.3.attn.hook_z
    ln_final.hook_scale  ln_final.hook_normalized               after the blocks (FINAL_POINTS)
    unembed.hook_in  unembed.hook_out  hook_logits
    <module>.hook_result_pre  <module>.hook_result_post         module points: a backbone submodule's first input and
                                                                its output, e.g. layers.0.self_attn.hook_result_post
    <hook name>.hook_sae_input ... .hook_sae_error              an SAE spliced in at <hook name> (SAELens's names)

``parse_hook(name)`` reads a name into a :class:`HookName` and ``str()`` of that rebuilds it; ``block_hook``,
``module_hook`` and ``sae_hook`` build names, ``get_act_name`` expands TransformerLens shorthand.
``hook_layer`` gives the block a name belongs to, ``stop_layer_for`` the ``stop_at_layer`` that still reaches a
set of names, ``is_per_head`` / ``is_attention_map`` / ``POINT_DIMS`` what one position's activation looks like.
Which names a given model serves (and their range of layers) is the model's business:
``HookedModel.hook_names()``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

#: one position's activation per point: its shape as HookedConfig field names (or 1), ``None`` for the attention
#: maps ``[batch, head, query_pos, key_pos]``, which have no per-position vector
Dims = tuple[str | int, ...] | None

#: the points of every block, in the order a forward pass reaches them (a model serves those its family has)
BLOCK_POINTS: dict[str, Dims] = {
    "hook_resid_pre": ("d_model",),
    "hook_attn_in": ("n_heads", "d_model"),  # opt-in: use_attn_in
    "hook_q_input": ("n_heads", "d_model"),  # opt-in: use_split_qkv_input
    "hook_k_input": ("n_key_value_heads", "d_model"),
    "hook_v_input": ("n_key_value_heads", "d_model"),
    "ln1.hook_scale": (1,),
    "ln1.hook_normalized": ("d_model",),
    "attn.hook_q": ("n_heads", "d_head"),  # the projections, before q/k-norm and rotary
    "attn.hook_k": ("n_key_value_heads", "d_head"),
    "attn.hook_v": ("n_key_value_heads", "d_head"),
    "attn.hook_rot_q": ("n_heads", "d_head"),  # rotary models: after rotary
    "attn.hook_rot_k": ("n_key_value_heads", "d_head"),
    "attn.hook_attn_scores": None,
    "attn.hook_pattern": None,
    "attn.hook_z": ("n_heads", "d_head"),
    "attn.hook_result": ("n_heads", "d_model"),
    "ln1_post.hook_scale": (1,),  # Gemma 2's norm of the attention output
    "ln1_post.hook_normalized": ("d_model",),
    "hook_attn_out": ("d_model",),
    "hook_resid_mid": ("d_model",),
    "hook_mlp_in": ("d_model",),  # opt-in: use_hook_mlp_in
    "ln2.hook_scale": (1,),
    "ln2.hook_normalized": ("d_model",),
    "mlp.hook_pre": ("d_mlp",),
    "mlp.hook_pre_linear": ("d_mlp",),
    "mlp.hook_post": ("d_mlp",),
    "ln2_post.hook_scale": (1,),  # Gemma 2's norm of the MLP output
    "ln2_post.hook_normalized": ("d_model",),
    "hook_mlp_out": ("d_model",),
    "hook_resid_post": ("d_model",),
}
#: the names before the blocks, and after them, in forward order
EMBED_POINTS: dict[str, Dims] = {"hook_embed": ("d_model",), "hook_pos_embed": ("d_model",)}
FINAL_POINTS: dict[str, Dims] = {
    "ln_final.hook_scale": (1,),
    "ln_final.hook_normalized": ("d_model",),
    "unembed.hook_in": ("d_model",),  # the unembedding's input (the final norm's output)
    "unembed.hook_out": ("d_vocab",),  # its output, before Gemma 2's final soft-cap
    "hook_logits": ("d_vocab",),  # the logits the model returns
}
#: every canonical point (block points without their ``blocks.L.`` prefix) and its per-position shape
POINT_DIMS: dict[str, Dims] = {**EMBED_POINTS, **BLOCK_POINTS, **FINAL_POINTS}
#: the points of the attention function, served by :mod:`mechscope.models.attention` (``hook_rot_q/k`` only on
#: rotary models)
ROTARY_POINTS = ("attn.hook_rot_q", "attn.hook_rot_k")
ATTN_POINTS = (*ROTARY_POINTS, "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z")
#: the points that exist only when the model option of the same name is on (TransformerLens's opt-in flags)
OPT_IN_POINTS: dict[str, tuple[str, ...]] = {
    "use_attn_in": ("hook_attn_in",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_hook_mlp_in": ("hook_mlp_in",),
}
ModulePoint = Literal["pre", "post"]
#: module points: ``<module>.hook_result_pre`` (first input) and ``<module>.hook_result_post`` (output)
MODULE_POINTS: dict[ModulePoint, str] = {"pre": "hook_result_pre", "post": "hook_result_post"}
#: the points of a spliced SAE (SAELens's names), after the hook name it reads
SAE_POINTS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error")

#: points whose activation is ``[batch, pos, head, d]``: one vector per head
PER_HEAD_POINTS = tuple(p for p, dims in BLOCK_POINTS.items() if dims is not None and len(dims) == 2)
ATTENTION_MAPS = tuple(p for p, dims in BLOCK_POINTS.items() if dims is None)
_PER_HEAD_SUFFIXES = tuple("." + p for p in PER_HEAD_POINTS)
_MAP_SUFFIXES = tuple("." + p for p in ATTENTION_MAPS)

_BLOCK_RE = re.compile(r"blocks\.(-?(?:0|[1-9][0-9]*))\.(.+)")
_FORMS = (
    "hook_embed, hook_pos_embed, blocks.L.<point> (e.g. blocks.0.hook_resid_post), ln_final.hook_scale, "
    "ln_final.hook_normalized, unembed.hook_in, unembed.hook_out, hook_logits, or <module>.hook_result_pre / "
    "<module>.hook_result_post; "
    "model.hook_names() lists a model's names"
)


@dataclass(frozen=True)
class HookName:
    """One hook name, parsed: ``str(hook_name)`` rebuilds it.

    ``point`` is the block point (``"attn.hook_z"``) when ``layer`` is set, the module point
    (``"hook_result_post"``) when ``module`` is set, else the name itself (``"hook_embed"``, ``"hook_logits"``);
    ``sae`` is the SAE point (``"hook_sae_acts_post"``) of a name after a spliced SAE.
    """

    point: str
    layer: int | None = None
    module: str | None = None
    sae: str | None = None

    def __str__(self) -> str:
        if self.layer is not None:
            base = f"blocks.{self.layer}.{self.point}"
        elif self.module is not None:
            base = f"{self.module}.{self.point}"
        else:
            base = self.point
        return f"{base}.{self.sae}" if self.sae is not None else base


@lru_cache(maxsize=4096)
def parse_hook(name: str) -> HookName:
    """Read a hook name (see the module docstring); a ``ValueError`` naming the valid forms otherwise.

    The grammar does not know a model: any integer layer parses (``HookedModel`` checks the range), and any
    module path before ``.hook_result_pre/post``.
    """
    if not isinstance(name, str):
        raise TypeError(f"a hook name is a string, got {type(name).__name__}")
    base, _, last = name.rpartition(".")
    if last in SAE_POINTS and base:
        inner = parse_hook(base)
        if inner.sae is not None:
            raise ValueError(f"hook name {name!r}: an SAE point follows the hook name the SAE reads, once")
        return HookName(inner.point, inner.layer, inner.module, last)
    if name in EMBED_POINTS or name in FINAL_POINTS:
        return HookName(name)
    m = _BLOCK_RE.fullmatch(name)
    if m:
        point = m.group(2)
        if point not in BLOCK_POINTS:
            close = difflib.get_close_matches(point, BLOCK_POINTS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"hook name {name!r}: {point!r} is not a point of a block; {hint}{_points_of_a_block()}")
        return HookName(point, layer=int(m.group(1)))
    if name.startswith("blocks."):
        raise ValueError(
            f"hook name {name!r}: 'blocks.' is followed by the layer (an integer without leading zeros) and a point, "
            "e.g. 'blocks.0.hook_resid_post' (get_act_name('resid_post', 0))"
        )
    if last in MODULE_POINTS.values() and base:
        return HookName(last, module=base)
    if _ALIASES.get(name, name) in (*_SHORTHAND, *_NORM_POINTS, *_OUTER):
        raise ValueError(f"{name!r} is TransformerLens shorthand: get_act_name({name!r}, layer) gives the hook name")
    raise ValueError(f"{name!r} is not a hook name; hook names are {_FORMS}")


def _points_of_a_block() -> str:
    return f"the points of a block are {', '.join(BLOCK_POINTS)}"


def block_hook(layer: int, point: str) -> str:
    """``blocks.{layer}.{point}``, e.g. ``block_hook(3, "attn.hook_z") == "blocks.3.attn.hook_z"``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"a block's layer is an int, got {layer!r}")
    if point not in BLOCK_POINTS:
        raise ValueError(f"{point!r} is not a point of a block; {_points_of_a_block()}")
    return f"blocks.{layer}.{point}"


def module_hook(module: str, which: ModulePoint = "post") -> str:
    """The module point of a backbone submodule: ``<module>.hook_result_pre`` (its first input) or ``_post``
    (its output), e.g. ``module_hook("layers.0.self_attn") == "layers.0.self_attn.hook_result_post"``."""
    if which not in MODULE_POINTS:
        raise ValueError(f"which={which!r}: a module point is 'pre' (the module's first input) or 'post' (its output)")
    if not module:
        raise ValueError("a module point needs the module's path in the backbone, e.g. 'layers.0.mlp'")
    return f"{module}.{MODULE_POINTS[which]}"


def sae_hook(hook_name: str, point: str) -> str:
    """``<hook_name>.<point>``: a point of an SAE spliced in at ``hook_name`` (``point`` one of SAE_POINTS)."""
    if point not in SAE_POINTS:
        raise ValueError(f"{point!r} is not a point of a spliced SAE; those are {', '.join(SAE_POINTS)}")
    return f"{hook_name}.{point}"


def hook_names(n_layers: int) -> list[str]:
    """Every canonical name a model of ``n_layers`` blocks may serve, in forward order."""
    return [*EMBED_POINTS, *(block_hook(i, p) for i in range(n_layers) for p in BLOCK_POINTS), *FINAL_POINTS]


def hook_layer(name: str, blocks_module: str | None = None) -> int | None:
    """The block ``name`` belongs to, or ``None`` outside the blocks.

    With ``blocks_module`` (the backbone path of the block list, e.g. ``"layers"``, GPT-2's ``"h"``) module points
    inside a block count too: ``hook_layer("layers.2.mlp.hook_result_post", "layers") == 2``.
    """
    parsed = parse_hook(name)
    if parsed.layer is not None or parsed.module is None or blocks_module is None:
        return parsed.layer
    prefix = blocks_module + "."
    if not parsed.module.startswith(prefix):
        return None
    index = parsed.module[len(prefix) :].partition(".")[0]
    return int(index) if index.isdigit() else None


def stop_layer_for(names: Iterable[str], n_layers: int, blocks_module: str | None = None) -> int | None:
    """The smallest ``stop_at_layer`` whose run still reaches every hook in ``names``; ``None``: run the whole model.

    A block's points need that block (``blocks.L.*`` -> ``L + 1``, ``hook_resid_pre`` included: the stop hook of
    block ``L`` fires before it); the embeddings need no block (0); the final norm, the logits and module points
    outside the blocks need the whole model. ``blocks_module``: see :func:`hook_layer`.
    """
    last = -1
    for name in names:
        layer = hook_layer(name, blocks_module)
        if layer is not None:
            last = max(last, layer)
        elif parse_hook(name).point not in EMBED_POINTS:
            return None
    return min(last + 1, n_layers)


def is_per_head(name: str) -> bool:
    """Whether the activation at ``name`` is ``[batch, pos, head, d]`` (``attn.hook_q/k/v/z/result``)."""
    return name.endswith(_PER_HEAD_SUFFIXES)  # == parse_hook(name).point in PER_HEAD_POINTS, for block points


def is_attention_map(name: str) -> bool:
    """Whether ``name`` is an attention map ``[batch, head, query_pos, key_pos]`` (scores or pattern), which has no
    per-token vector."""
    return name.endswith(_MAP_SUFFIXES)


# ---- TransformerLens shorthand ----------------------------------------------------------------------------------
def _shorthand() -> dict[str, str]:
    """``"resid_post" -> "hook_resid_post"``, ``"z" -> "attn.hook_z"``, ``"post" -> "mlp.hook_post"``, ..."""
    out = {}
    for point in BLOCK_POINTS:
        part, _, hook = point.rpartition(".")
        if part in ("", "attn", "mlp"):
            out[hook.removeprefix("hook_")] = point
    return out


_SHORTHAND = _shorthand()
#: TransformerLens's aliases of activation names and of layer types
_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
_LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}
_NORM_POINTS = ("scale", "normalized")
_OUTER = ("embed", "pos_embed", "logits")
#: compact forms: a name, the layer, then an optional layer type ("k6", "resid_pre5", "scale4ln1")
_COMPACT_RE = re.compile(r"([a-z][a-z_]*?)_?(\d+)([a-z][a-z0-9_]*)?")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """Full hook name from TransformerLens shorthand (``transformer_lens.utils.get_act_name``).

    ``get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"``, ``("pattern", 0)`` / ``("attn", 0)`` ->
    ``blocks.0.attn.hook_pattern``, ``("rot_q", 1)`` -> ``blocks.1.attn.hook_rot_q``, ``("scale", 2, "ln1")`` ->
    ``blocks.2.ln1.hook_scale``, ``("scale")`` -> ``ln_final.hook_scale``, ``("embed")`` -> ``hook_embed``; compact
    forms put the layer (and a layer type) in the name: ``"k6"``, ``"pre5"``, ``"scale4ln1"``, ``"resid_pre5"``.
    TransformerLens's aliases work (``attn_logits``, ``key``/``query``/``value``, ``mlp_pre``/``mlp_post``; layer
    types ``a``/``attention``, ``m``, ``b``/``block``). Full names pass through.

    Where TransformerLens builds a name no model has, this differs: ``"resid_pre5"`` (TransformerLens:
    ``hook_resid_pre5``) and ``("scale", 2)`` without a layer type (TransformerLens: ``blocks.2.hook_scale``; here
    ``ln1``'s); unknown shorthand raises instead of building a name.
    """
    if "." in name or name.startswith("hook_"):
        return name
    compact = _COMPACT_RE.fullmatch(name)
    if compact is not None:
        name, layer, layer_type = compact.group(1), compact.group(2), compact.group(3) or layer_type
    name = _ALIASES.get(name, name)
    if isinstance(layer, str):
        layer = int(layer)
    if layer_type is not None:
        layer_type = _LAYER_TYPES.get(layer_type, layer_type)
    if name in _OUTER:
        return f"hook_{name}"
    if name in _NORM_POINTS:
        if layer is None:
            return f"ln_final.hook_{name}"
        return block_hook(layer, f"{layer_type or 'ln1'}.hook_{name}")
    if layer is None:
        raise ValueError(f"{name!r} is a per-block activation: give a layer, e.g. cache[{name!r}, 0]")
    if name in _SHORTHAND:
        return block_hook(layer, _SHORTHAND[name])
    raise KeyError(
        f"unknown activation shorthand {name!r}; known: {sorted({*_SHORTHAND, 'embed', 'pos_embed', *_NORM_POINTS})}"
    )
