"""Tool "causal": causal tracing in the style of ROME (Meng et al. 2022).

The subject tokens' embeddings are corrupted with Gaussian noise; then, one (layer, position) at a time,
a hidden state is restored from the clean run, and the probability of the target token at the last
position is measured, averaged over the noise samples. See ``docs/tools/causal.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mechscope.models.names import block_hook
from mechscope.models.tokenizer import Input, tokenize
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import check_token_ids

#: what a restoration copies, per ``kind``: the residual stream entering block L, or a block's output
_KIND_HOOKS = {"resid": "hook_resid_pre", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


class CausalTracer(BaseInterpretabilityTool):
    """ROME-style causal tracing (tool ``"causal"``)."""

    def subject_positions(self, tokens: torch.Tensor, subject: str | Sequence[int]) -> list[int]:
        """Positions of the subject in ``tokens [pos]``: given as indices, or a substring of the decoded prompt.

        A substring selects every token that overlaps its first occurrence.
        """
        n = tokens.shape[-1]
        if not isinstance(subject, str):
            positions = sorted({int(p) % n for p in subject if -n <= int(p) < n})
            if len(positions) != len(list(subject)) or not positions:
                raise ValueError(f"subject positions {list(subject)} must be distinct indices in 0..{n - 1}")
            return positions
        pieces = [self.model.tokenizer.decode([t]) for t in tokens.tolist()]
        text = "".join(pieces)
        start = text.find(subject)
        if start < 0 or not subject:
            raise ValueError(f"subject {subject!r} is not in the prompt {text!r}; pass token indices instead")
        end, positions, offset = start + len(subject), [], 0
        for i, piece in enumerate(pieces):
            if offset < end and offset + len(piece) > start:
                positions.append(i)
            offset += len(piece)
        return positions

    def _restore_names(self, layer: int, kind: str, window: int) -> list[str]:
        n = self.model.cfg.n_layers
        if kind == "resid":
            return [block_hook(layer, _KIND_HOOKS[kind])]
        lo, hi = max(0, layer - window // 2), min(n, layer - window // 2 + window)
        return [block_hook(i, _KIND_HOOKS[kind]) for i in range(lo, hi)]

    @torch.no_grad()
    def trace(
        self,
        prompt: Input,
        target: int,
        subject: str | Sequence[int],
        kind: str = "resid",
        window: int = 10,
        noise: float = 3.0,
        n_samples: int = 10,
        seed: int = 0,
    ) -> dict:
        """Causal trace of ``target`` (a token id) after ``prompt`` (one sequence).

        ``kind="resid"`` restores ``blocks.L.hook_resid_pre`` at one position; ``"attn"`` / ``"mlp"`` restore
        ``hook_attn_out`` / ``hook_mlp_out`` of the ``window`` blocks centred on ``L`` (clipped at the ends).
        Noise: ``noise * std(W_E)``, i.i.d. Gaussian on ``hook_embed`` at the subject positions, one draw per
        sample (seeded). Returns ``scores [n_layers, pos]`` (mean target probability with the restoration),
        ``clean_prob``, ``corrupted_prob`` (floats), ``subject_positions``, ``noise_std``.
        """
        if kind not in _KIND_HOOKS:
            raise ValueError(f"kind={kind!r}: use one of {', '.join(_KIND_HOOKS)}")
        if window < 1 or n_samples < 1:
            raise ValueError(f"window ({window}) and n_samples ({n_samples}) must be at least 1")
        tokens, _ = tokenize(self.model.tokenizer, prompt)
        if tokens.shape[0] != 1:
            raise ValueError(f"trace takes one prompt, got a batch of {tokens.shape[0]}; trace them one at a time")
        tokens = tokens.to(self.model.device)
        if torch.as_tensor(target).numel() != 1:
            raise ValueError(f"target must be one token id, got {target!r}")
        target = int(check_token_ids(self.model, target))
        subj = self.subject_positions(tokens[0], subject)
        names = [block_hook(layer, _KIND_HOOKS[kind]) for layer in range(self.model.cfg.n_layers)]
        logits, clean_cache = self.model.run_with_cache(tokens, names_filter=names)

        def prob(lg: torch.Tensor) -> float:
            return float(lg[:, -1].float().softmax(-1)[:, target].mean())

        std = noise * float(self.model.W_E.float().std())
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(n_samples, len(subj), self.model.cfg.d_model, generator=gen) * std
        eps = eps.to(self.model.device, self.model.W_E.dtype)
        batch = tokens.expand(n_samples, -1)

        def corrupt(embed: torch.Tensor, hook) -> torch.Tensor:
            embed = embed.clone()
            embed[:, subj] += eps
            return embed

        corrupted_prob = prob(self.model.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)]))
        n_pos = tokens.shape[1]
        scores = torch.zeros(self.model.cfg.n_layers, n_pos)
        for layer in tqdm(range(self.model.cfg.n_layers), desc=f"causal trace ({kind})", leave=False):
            for pos in range(n_pos):

                def restore(act: torch.Tensor, hook, pos=pos) -> torch.Tensor:
                    act[:, pos] = clean_cache[hook.name][0, pos]
                    return act

                hooks = [("hook_embed", corrupt)] + [(n, restore) for n in self._restore_names(layer, kind, window)]
                scores[layer, pos] = prob(self.model.run_with_hooks(batch, fwd_hooks=hooks))
        return {
            "scores": scores,
            "clean_prob": prob(logits),
            "corrupted_prob": corrupted_prob,
            "subject_positions": subj,
            "noise_std": std,
        }
