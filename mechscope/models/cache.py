"""ActivationCache: the activations of one forward pass, by hook name, with TransformerLens helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechscope.models.config import HookedConfig
from mechscope.models.names import get_act_name


class ActivationCache(Mapping):
    """Activations by hook name. ``cache["blocks.3.hook_resid_post"]`` or ``cache["resid_post", 3]``.

    Tensors keep their batch dimension: residual activations are ``[batch, pos, d_model]``.
    """

    def __init__(self, activations: dict[str, torch.Tensor], cfg: HookedConfig):
        self._acts = dict(activations)
        self.cfg = cfg

    # ---- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, key) -> torch.Tensor:
        name = get_act_name(*key) if isinstance(key, tuple) else get_act_name(key)
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
        """A copy with every tensor moved to ``device`` and floating tensors cast to ``dtype``."""
        moved = {
            k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in self._acts.items()
        }
        return ActivationCache(moved, self.cfg)

    # ---- stacking and the residual stream ----------------------------------------------------------
    def stack_activation(self, name: str, layer: int | None = None, sublayer_type: str | None = None) -> torch.Tensor:
        """``[n_layers_used, *activation_shape]``: ``name`` (a shorthand like "resid_post") of blocks 0..layer-1."""
        n = self.cfg.n_layers if layer is None or layer == -1 else layer
        return torch.stack([self[get_act_name(name, i, sublayer_type)] for i in range(n)])

    def _layer(self, layer: int | None) -> int:
        n = self.cfg.n_layers
        layer = n if layer is None else (layer + n if layer < 0 else layer)
        if not 0 <= layer <= n:
            raise ValueError(f"layer {layer} is out of range: valid layers are 0..{n} ({n} = the final residual)")
        return layer

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream before each block up to ``layer``: ``[components, batch, pos, d_model]``.

        Includes ``resid_pre`` of blocks ``0..layer-1`` (and ``resid_mid`` with ``incl_mid``), then
        ``resid_pre`` of ``layer``, or the final ``resid_post`` when ``layer`` is None or n_layers.
        """
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer + 1):
            if i == self.cfg.n_layers:
                parts.append(self["resid_post", i - 1])
                labels.append("final_post")
                break
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if incl_mid and i < layer:
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        return self._stacked(parts, labels, layer, apply_ln, return_labels)

    def decompose_resid(
        self,
        layer: int | None = None,
        mode: str = "all",
        incl_embeds: bool = True,
        apply_ln: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Components whose sum is the residual before block ``layer``: ``[components, batch, pos, d_model]``.

        Components are ``embed`` (+ ``pos_embed``), then each earlier block's ``attn_out`` and ``mlp_out``
        (``mode`` "attn" or "mlp" keeps one kind). With ``layer`` None or n_layers they sum to the final
        residual.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            for name in ("embed", "pos_embed"):
                if get_act_name(name) in self._acts:
                    parts.append(self[name])
                    labels.append(name)
        for i in range(layer):
            if mode in ("all", "attn"):
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp"):
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        return self._stacked(parts, labels, layer, apply_ln, return_labels)

    def _stacked(self, parts: list[torch.Tensor], labels: list[str], layer: int, apply_ln: bool, return_labels: bool):
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Normalise a stack ``[..., batch, pos, d_model]`` with the norm that reads the residual at ``layer``.

        As in TransformerLens: centre (LayerNorm only) and divide by that norm's cached ``hook_scale``
        (``ln_final`` for the final residual, else ``blocks.layer.ln1``). The norm's weight and bias are
        not applied, so the final residual maps to ``ln_final.hook_normalized``.
        """
        layer = self._layer(layer)
        scale = self["scale"] if layer == self.cfg.n_layers else self["scale", layer, "ln1"]
        if self.cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / scale

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
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ActivationCache:
        """Read a cache written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "mechscope_cfg" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an ActivationCache (no mechscope_cfg metadata)")
        cfg = HookedConfig(**json.loads(meta["mechscope_cfg"]))
        return cls(load_file(str(path), device=str(device)), cfg)
