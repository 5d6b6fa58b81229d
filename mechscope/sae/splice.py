"""Splicing an SAE into a model: replace an activation by its reconstruction, and hook the latents.

One forward hook at the SAE's hook point computes, for the activation ``x [batch, pos, d_in]``::

    latents = sae.encode(x)                          # [batch, pos, d_sae]  ("<hook>.hook_sae_acts_post")
    latents = latent_hook(latents, hook)             # each latent hook in turn: steering, ablation, reading
    x_out   = sae.decode(latents)                    # include_error=False: the reconstruction replaces x
    x_out   = x + sae.decode(latents) - sae(x)       # include_error=True: x_hat + (x - x_hat), with x_hat the
                                                     # reconstruction of the *unedited* latents

With the error term and no edit, the activation is left exactly as it was, so the model's output is unchanged;
an edit changes the activation by exactly ``decode(edited) - decode(original)``. Latent hooks have the hook
signature ``fn(latents, hook) -> latents | None`` (``hook.name`` is ``"<hook_name>.hook_sae_acts_post"``, the name
SAELens's ``HookedSAETransformer`` uses); returning a tensor replaces the latents, and in-place edits count too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor

from mechscope.models.hooked import HookedModel
from mechscope.models.hooks import HookPoint
from mechscope.models.names import sae_hook
from mechscope.models.points import token_vectors
from mechscope.sae.model import SparseAutoencoder

LatentHookFn = Callable[[Tensor, HookPoint], "Tensor | None"]


def resolve_hook_name(sae: SparseAutoencoder, hook_name: str | None) -> str:
    """``hook_name``, or the one the SAE was trained on (``sae.cfg.hook_name``) when it is None."""
    name = hook_name if hook_name is not None else sae.cfg.hook_name
    if name is None:
        raise ValueError(
            "this SAE's cfg.hook_name is None, so mechscope does not know where to splice it: pass hook_name= "
            "(e.g. 'blocks.3.hook_resid_post'), or set it with sae.cfg = dataclasses.replace(sae.cfg, hook_name=...)"
        )
    return name


def check_trained_hook(sae: SparseAutoencoder, hook_name: str, allow_hook_mismatch: bool = False) -> None:
    """Refuse to run ``sae`` at ``hook_name`` when its config says it was trained on another hook (widths can match by
    chance: every residual-stream hook of a model is as wide), unless ``allow_hook_mismatch`` says it is on purpose."""
    trained = sae.cfg.hook_name
    if trained is not None and trained != hook_name and not allow_hook_mismatch:
        raise ValueError(
            f"the SAE was trained on {trained!r} but is asked to run at {hook_name!r}: use the hook it was trained "
            "on (leave the hook name unset), or, to run it elsewhere on purpose, pass allow_hook_mismatch=True "
            "(allow_hook_mismatch = true in a config file)"
        )


def check_width(sae: SparseAutoencoder, x: Tensor, hook_name: str) -> None:
    """Fail, naming both sizes, when the activation ``x [..., d]`` at ``hook_name`` is not ``sae.cfg.d_in`` wide."""
    d_in = sae.cfg.d_in
    if x.shape[-1] != d_in:
        raise ValueError(
            f"the SAE has d_in={d_in} but the activation at {hook_name} has size {x.shape[-1]} "
            f"(shape {tuple(x.shape)}): splice it at a hook point of size {d_in}, such as the one it was "
            f"trained on (sae.cfg.hook_name={sae.cfg.hook_name!r})"
        )


class SAESplice:
    """The forward hook that splices ``sae`` in at ``hook_name`` (see the module docstring), and its latent hooks.

    Use it as the hook list of ``model.run_with_hooks(..., fwd_hooks=splice)``, ``model.hooks(splice)`` or
    ``model.generate(..., fwd_hooks=splice)`` (iterating it yields ``(hook_name, hook_fn)`` pairs), or through
    :func:`spliced`. With ``cache=True`` every forward pass stores, detached, in ``splice.cache``:

    - ``"<hook_name>.hook_sae_input"``: the activation ``x [batch, pos, d_in]`` (per-head points flattened);
    - ``"<hook_name>.hook_sae_acts_post"``: the latents ``[batch, pos, d_sae]`` after the latent hooks;
    - ``"<hook_name>.hook_sae_recons"``: their reconstruction ``[batch, pos, d_in]``;
    - ``"<hook_name>.hook_sae_error"``: ``x - sae(x)`` (the unedited reconstruction's error) ``[batch, pos, d_in]``.

    Each pass overwrites the previous one (in ``generate``, the cache holds the last step).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        hook_name: str,
        include_error: bool = False,
        latent_hooks: Iterable[LatentHookFn] = (),
        cache: bool = False,
    ) -> None:
        self.sae = sae
        self.hook_name = hook_name
        self.include_error = include_error
        self.latent_hooks: list[LatentHookFn] = list(latent_hooks)
        self.cache_enabled = cache
        self.cache: dict[str, Tensor] = {}
        self.latent_point = HookPoint(sae_hook(hook_name, "hook_sae_acts_post"))

    @property
    def latent_hook_name(self) -> str:
        """``"<hook_name>.hook_sae_acts_post"``, the ``hook.name`` latent hooks receive."""
        return self.latent_point.name

    @property
    def fwd_hooks(self) -> list[tuple[str, SAESplice]]:
        """``[(hook_name, self)]``, for ``run_with_hooks`` / ``hooks`` / ``generate``."""
        return [(self.hook_name, self)]

    def __iter__(self) -> Iterator[tuple[str, SAESplice]]:
        return iter(self.fwd_hooks)

    def add_latent_hook(self, fn: LatentHookFn) -> SAESplice:
        """Append ``fn(latents [batch, pos, d_sae], hook) -> latents | None``; returns ``self`` for chaining."""
        self.latent_hooks.append(fn)
        return self

    def remove_latent_hooks(self) -> None:
        """Drop every latent hook."""
        self.latent_hooks.clear()

    def __call__(self, x: Tensor, hook: HookPoint) -> Tensor | None:
        """The forward hook: ``x [..., d_in]`` -> the spliced activation ``[..., d_in]`` (``None``: unchanged).

        At a per-head point (``attn.hook_z`` ...) ``x [..., head, d_head]`` is read as ``[..., head * d_head]`` and
        the result shaped back (see :func:`~mechscope.models.points.token_vectors`); so are the cached tensors.
        """
        flat = token_vectors(x, self.hook_name)
        check_width(self.sae, flat, hook.name)
        x_sae = flat.to(self.sae.W_enc.dtype)
        out = self.sae.forward_with_latents(x_sae)
        latents = out.latents
        for fn in self.latent_hooks:
            new = fn(latents, self.latent_point)
            if new is not None:
                if new.shape != latents.shape:
                    raise ValueError(
                        f"latent hook {getattr(fn, '__name__', fn)!r} on {self.latent_hook_name} returned shape "
                        f"{tuple(new.shape)}, but the latents have shape {tuple(latents.shape)}"
                    )
                latents = new
        # the reconstruction was computed before the hooks ran, so in-place edits of the latents show up here
        recons = self.sae.decode(latents, x=x_sae) if self.latent_hooks else out.reconstruction
        if self.cache_enabled:
            name = self.hook_name
            self.cache[sae_hook(name, "hook_sae_input")] = flat.detach()
            self.cache[sae_hook(name, "hook_sae_acts_post")] = latents.detach()
            self.cache[sae_hook(name, "hook_sae_recons")] = recons.detach()
            self.cache[sae_hook(name, "hook_sae_error")] = (x_sae - out.reconstruction).detach()
        if not self.include_error:
            return recons.to(x.dtype).view(x.shape)
        if not self.latent_hooks:
            return None  # x_hat + (x - x_hat) with nothing edited is x itself, exactly
        return x + (recons - out.reconstruction).to(x.dtype).view(x.shape)


def splice_sae(
    model: HookedModel,
    sae: SparseAutoencoder,
    hook_name: str | None = None,
    include_error: bool = False,
    latent_hooks: Iterable[LatentHookFn] = (),
    cache: bool = False,
    allow_hook_mismatch: bool = False,
) -> SAESplice:
    """The hooks that splice ``sae`` into ``model`` at ``hook_name`` (default ``sae.cfg.hook_name``).

    Returns an :class:`SAESplice`: pass it as ``fwd_hooks`` (alone, or ``[*splice, other_hook]``), add latent hooks
    with ``latent_hooks=[fn]`` or ``splice.add_latent_hook(fn)``, and read ``splice.cache`` when ``cache=True``.
    The hook name is checked against the model now (and against the SAE's own ``cfg.hook_name``: a different one
    needs ``allow_hook_mismatch=True``); the SAE's ``d_in`` against the activation when it runs.
    """
    name = resolve_hook_name(sae, hook_name)
    model.points.resolve(name)  # an unknown name raises here, listing the closest valid ones
    check_trained_hook(sae, name, allow_hook_mismatch)
    return SAESplice(sae, name, include_error=include_error, latent_hooks=latent_hooks, cache=cache)


@contextmanager
def spliced(
    model: HookedModel,
    sae: SparseAutoencoder,
    hook_name: str | None = None,
    include_error: bool = False,
    latent_hooks: Iterable[LatentHookFn] = (),
    cache: bool = False,
    allow_hook_mismatch: bool = False,
) -> Iterator[SAESplice]:
    """Context manager: every forward pass of ``model`` inside the block runs with ``sae`` spliced in.

    Arguments as :func:`splice_sae`; yields the :class:`SAESplice`, whose latent hooks can still be changed inside
    the block. The hook is removed on exit, even when something raised::

        with spliced(model, sae, include_error=True) as splice:
            splice.add_latent_hook(lambda z, hook: z.index_fill_(-1, torch.tensor([7]), 0.0))  # ablate latent 7
            logits = model(tokens)
    """
    splice = splice_sae(
        model,
        sae,
        hook_name,
        include_error=include_error,
        latent_hooks=latent_hooks,
        cache=cache,
        allow_hook_mismatch=allow_hook_mismatch,
    )
    with model.hooks(splice.fwd_hooks):
        yield splice


__all__ = [
    "LatentHookFn",
    "SAESplice",
    "check_trained_hook",
    "check_width",
    "resolve_hook_name",
    "splice_sae",
    "spliced",
]
