"""Tool "surgery": delete, replace or permute the decoder blocks, restoring the model on exit.

Each method is a context manager that rearranges the HF ``ModuleList`` of decoder layers
(``model.blocks``) and puts the original list back on exit, also when the
block raised. Nothing else changes: the blocks keep their weights, their ``layer_idx`` (so each keeps its
own kv-cache slot and attention type) and their hook points, which follow the module, so
``blocks.2.hook_resid_post`` is the output of the original block 2 wherever it now runs, and the hooks of a
deleted block never fire. See ``docs/tools/surgery.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

from torch import nn

from mechscope.tools import BaseInterpretabilityTool


class BlockSurgery(BaseInterpretabilityTool):
    """Temporary rearrangements of the decoder blocks (tool ``"surgery"``)."""

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's decoder layers as they are now (inside a surgery: the rearranged list)."""
        return self.model.blocks

    def _index(self, layer: int) -> int:
        n = len(self.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"block {layer!r} is out of range: valid blocks are 0..{n - 1}")
        return layer

    def rearranged(self, new_blocks: Sequence[nn.Module]) -> AbstractContextManager[nn.ModuleList]:
        """Run with ``new_blocks`` as the decoder stack; the original stack comes back on exit.

        Every entry must be an ``nn.Module`` called like a decoder layer, and appear once (a module run
        twice would write its kv-cache slot twice): to run a block twice, pass a ``copy.deepcopy`` of it.
        """
        if not new_blocks:
            raise ValueError("the new stack is empty: keep at least one block")
        if not all(isinstance(b, nn.Module) for b in new_blocks):
            raise TypeError("every block must be a torch.nn.Module called like a decoder layer")
        if len({id(b) for b in new_blocks}) != len(new_blocks):
            raise ValueError("a block appears twice; pass copy.deepcopy(block) for the second use")
        return self._swapped(list(new_blocks))

    @contextmanager
    def _swapped(self, new_blocks: list[nn.Module]) -> Iterator[nn.ModuleList]:
        stack = self.blocks
        original = stack._modules.copy()
        stack._modules.clear()
        stack._modules.update({str(i): b for i, b in enumerate(new_blocks)})
        try:
            yield stack
        finally:
            stack._modules.clear()
            stack._modules.update(original)

    def delete(self, *layers: int) -> AbstractContextManager[nn.ModuleList]:
        """Context manager: run without blocks ``layers`` (the residual stream skips them)."""
        drop = {self._index(layer) for layer in layers}
        return self.rearranged([b for i, b in enumerate(self.blocks) if i not in drop])

    def replace(self, replacements: Mapping[int, nn.Module]) -> AbstractContextManager[nn.ModuleList]:
        """Context manager: block ``i`` replaced by ``replacements[i]`` for each key."""
        new = dict(enumerate(self.blocks))
        new.update({self._index(i): m for i, m in replacements.items()})
        return self.rearranged(list(new.values()))

    def permute(self, order: Sequence[int]) -> AbstractContextManager[nn.ModuleList]:
        """Context manager: run the blocks in ``order`` (a permutation of ``0..n_blocks-1``)."""
        n = len(self.blocks)
        if sorted(order) != list(range(n)):
            raise ValueError(f"order {list(order)} must be a permutation of 0..{n - 1}; use delete() to drop blocks")
        return self.rearranged([self.blocks[i] for i in order])
