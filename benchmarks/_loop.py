"""What the benchmarks hand to the library's one loop (``ppojax.train.loop.train``): pre-generated prompts as a
prompt source."""

from __future__ import annotations


class Prompts:
    """Pre-generated prompts as a ``PromptSource``: ``batch(it)`` is iteration ``it``'s ``(ids, mask)``.

    Args:
      ids: ``[iterations, batch, P]`` (one batch per iteration) or ``[batch, P]`` (the same prompts every iteration).
      mask: ``[batch, P]``, or shaped like ``ids``; None: all ones (full-length prompts, no padding).
      on_device: hand out device arrays, put there before the iteration's timed phases start (as the benchmarks'
        own loops did); False: host arrays, as ``PromptLoader`` does (a mesh run lays them out with ``shard_batch``).
    """

    def __init__(self, ids, mask=None, *, on_device: bool = True):
        import numpy as np

        self.ids = ids
        self.mask = np.ones(ids.shape[-2:], np.int32) if mask is None else mask
        self.on_device = on_device

    def batch(self, it: int):
        import jax.numpy as jnp
        import numpy as np

        ids = self.ids[it] if self.ids.ndim == 3 else self.ids
        mask = self.mask[it] if self.mask.ndim == 3 else self.mask
        to = jnp.asarray if self.on_device else np.asarray
        return to(ids), to(mask)
