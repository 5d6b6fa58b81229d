"""Tool "neurons": top activating corpus examples of a neuron or direction, and the loss effect of ablating it.

A *unit* is a direction ``d`` at a hook point: an MLP neuron ``i`` at ``blocks.L.mlp.hook_post`` is the basis
vector ``e_i``; any other direction (a residual direction, an SAE decoder row) is given as a vector. Its
activation at a token is ``act · d``. See ``docs/tools/neurons.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechscope.data import iter_texts, pack_contexts
from mechscope.models.hooked import lm_loss
from mechscope.tools import BaseInterpretabilityTool

ABLATIONS = ("zero", "mean")


class NeuronTools(BaseInterpretabilityTool):
    """Top activating examples and ablation effects (tool ``"neurons"``).

    ``corpus`` is token ids ``[n_contexts, context_length]``, or a :func:`mechscope.data.iter_texts` source
    (``None`` = the embedded default corpus) packed into ``context_length`` contexts up to ``n_tokens`` tokens.
    """

    # ---- inputs ------------------------------------------------------------------------------------
    def _direction(self, hook_name: str, neuron: int | None, direction: torch.Tensor | None) -> torch.Tensor:
        d = self.model.hook_shape(hook_name)[-1]  # the last dimension, which `act · d` contracts
        if (neuron is None) == (direction is None):
            raise ValueError("give exactly one of neuron= (an index into the last dimension) or direction= (a vector)")
        if neuron is not None:
            if not 0 <= neuron < d:
                raise ValueError(f"neuron={neuron} is out of range for {hook_name}: valid indices are 0..{d - 1}")
            return torch.nn.functional.one_hot(torch.tensor(neuron), d).float()
        direction = torch.as_tensor(direction).float().reshape(-1)
        if direction.numel() != d:
            raise ValueError(f"direction has {direction.numel()} entries but {hook_name} has width {d}")
        return direction

    def corpus_tokens(
        self, corpus: torch.Tensor | str | Path | None = None, n_tokens: int = 16_384, context_length: int = 64
    ) -> torch.Tensor:
        """``[n_contexts, context_length]`` token ids (at most ``n_tokens`` tokens, whole contexts only)."""
        if isinstance(corpus, torch.Tensor):
            if corpus.ndim != 2:
                raise ValueError(f"corpus tokens must be [n_contexts, context_length], got {tuple(corpus.shape)}")
            return corpus
        n = max(1, n_tokens // context_length)
        contexts = list(itertools.islice(pack_contexts(iter_texts(corpus), self.model.tokenizer, context_length), n))
        if not contexts:
            raise ValueError(f"the corpus {corpus!r} holds fewer than context_length={context_length} tokens")
        return torch.stack(contexts)

    def _batches(self, tokens: torch.Tensor, batch_size: int, desc: str) -> Iterator[torch.Tensor]:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, leave=False):
            yield tokens[start : start + batch_size].to(self.model.device)

    @torch.no_grad()
    def _activations(self, tokens: torch.Tensor, hook_name: str, d: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``act · d`` for every token: ``[n_contexts, context_length]``."""
        stop = self.model.stop_layer_for([hook_name])
        out = []
        for batch in self._batches(tokens, batch_size, f"scanning {hook_name}"):
            _, cache = self.model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=stop)
            out.append((cache[hook_name].float() @ d.to(self.model.device)).cpu())
        return torch.cat(out)

    # ---- top examples ------------------------------------------------------------------------------
    def top_activating(
        self,
        hook_name: str,
        neuron: int | None = None,
        direction: torch.Tensor | None = None,
        k: int = 10,
        corpus: torch.Tensor | str | Path | None = None,
        n_tokens: int = 16_384,
        context_length: int = 64,
        window: tuple[int, int] = (10, 3),
        batch_size: int = 16,
    ) -> list[dict]:
        """The ``k`` tokens with the largest activation ``act · d``, largest first.

        Each entry: ``value``, ``context`` (row in the corpus), ``position``, ``token`` (its string), and
        ``tokens`` (the strings of the window: ``window[0]`` tokens before, the token, ``window[1]`` after)
        with ``index`` (the token's place in that list).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an int >= 1 (the number of examples to return)")
        d = self._direction(hook_name, neuron, direction)
        tokens = self.corpus_tokens(corpus, n_tokens, context_length)
        acts = self._activations(tokens, hook_name, d, batch_size)
        values, flat = acts.reshape(-1).topk(min(k, acts.numel()))
        examples = []
        for value, f in zip(values.tolist(), flat.tolist(), strict=True):
            row, pos = divmod(f, acts.shape[1])
            lo, hi = max(0, pos - window[0]), min(acts.shape[1], pos + window[1] + 1)
            strings = [self.model.tokenizer.decode([t]) for t in tokens[row, lo:hi].tolist()]
            examples.append(
                {
                    "value": value,
                    "context": row,
                    "position": pos,
                    "token": strings[pos - lo],
                    "tokens": strings,
                    "index": pos - lo,
                }
            )
        return examples

    # ---- ablation ----------------------------------------------------------------------------------
    def ablation_effect(
        self,
        hook_name: str,
        neuron: int | None = None,
        direction: torch.Tensor | None = None,
        mode: str = "zero",
        corpus: torch.Tensor | str | Path | None = None,
        n_tokens: int = 16_384,
        context_length: int = 64,
        batch_size: int = 16,
    ) -> dict[str, float]:
        """Mean next-token loss over the corpus with and without the unit.

        With ``u = d / ‖d‖`` and ``c = act · u``, the ablated activation is ``act - c u`` (``mode="zero"``:
        the neuron set to 0, or the direction projected out) or ``act - (c - mean(c)) u`` (``"mean"``: the
        component replaced by its mean over the corpus). Returns ``loss``, ``ablated_loss``, ``delta``.
        """
        if mode not in ABLATIONS:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(ABLATIONS)}")
        u = self._direction(hook_name, neuron, direction)
        u = (u / u.norm()).to(self.model.device)
        tokens = self.corpus_tokens(corpus, n_tokens, context_length)
        mean = float(self._activations(tokens, hook_name, u, batch_size).mean()) if mode == "mean" else 0.0

        def ablate(act: torch.Tensor, hook) -> torch.Tensor:
            c = act.float() @ u
            return act - ((c - mean)[..., None] * u).to(act.dtype)

        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in self._batches(tokens, batch_size, f"ablating on {hook_name}"):
                weight = batch.shape[0] / tokens.shape[0]
                totals[0] += weight * float(lm_loss(self.model(batch), batch))
                totals[1] += weight * float(
                    lm_loss(self.model.run_with_hooks(batch, fwd_hooks=[(hook_name, ablate)]), batch)
                )
        return {"loss": float(totals[0]), "ablated_loss": float(totals[1]), "delta": float(totals[1] - totals[0])}
