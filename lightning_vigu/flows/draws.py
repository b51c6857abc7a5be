"""The samplers' random draws: from one ``torch.Generator`` or from one generator per batch row.

With one generator, a sample depends on the whole batch it was drawn in (its place in the
batch, the batch's size). :class:`RowGenerators` gives every batch row its own generator, seeded
by that row's seed, and the draw helpers below draw each row's share from its own generator, so
a sample depends on its seed alone: the same clip gets the same sample in any batch, on any
number of ranks. A plain generator (or ``None``) goes straight to torch, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class RowGenerators:
    """One ``torch.Generator`` per batch row, row ``i`` seeded by ``seeds[i]``.

    Args:
        seeds: one seed per batch row.
        device: where the generators live (``cpu``; :func:`on_device` derives others).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)


Generators = torch.Generator | RowGenerators | None


def seeded(seed: int | Sequence[int], rows: int) -> torch.Generator | RowGenerators:
    """The sampling generator of a batch of ``rows``: one CPU generator for an ``int`` seed,
    :class:`RowGenerators` for a sequence of seeds (one per row)."""
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    seeds = list(seed)
    if len(seeds) != rows:
        raise ValueError(
            f"got {len(seeds)} seeds for a batch of {rows}: pass one seed per prompt or video "
            "(a sequence of that length), or one int for the whole batch"
        )
    return RowGenerators(seeds)


def _derived_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def on_device(generator: Generators, device: torch.device | str) -> Generators:
    """Generators on ``device`` derived from ``generator`` (itself when already there): each new
    generator is seeded once from the one it replaces, so no large tensor leaves the device."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    if isinstance(generator, RowGenerators):
        return RowGenerators([_derived_seed(g) for g in generator.generators], device)
    return torch.Generator(device).manual_seed(_derived_seed(generator))


def _per_row(
    draw: Callable[[torch.Generator], Tensor], shape: Sequence[int], rows: RowGenerators
) -> Tensor:
    """``draw(g)`` of shape ``shape[1:]`` for each row's generator, stacked to ``shape``."""
    if len(shape) == 0 or shape[0] != len(rows):
        raise ValueError(
            f"a per-row draw of shape {tuple(shape)} needs one generator per row (dim 0), "
            f"got {len(rows)} (one per seed): pass as many seeds as the batch has rows"
        )
    return torch.stack([draw(g) for g in rows.generators])


def randn(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal draws of ``shape`` (dim 0 = batch rows for :class:`RowGenerators`)."""
    if isinstance(generator, RowGenerators):
        return _per_row(
            lambda g: torch.randn(shape[1:], generator=g, device=device, dtype=dtype),
            shape,
            generator,
        )
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: Generators, device: torch.device | str) -> Tensor:
    """Uniform ``[0, 1)`` draws of ``shape`` (dim 0 = batch rows for :class:`RowGenerators`)."""
    if isinstance(generator, RowGenerators):
        return _per_row(
            lambda g: torch.rand(shape[1:], generator=g, device=device), shape, generator
        )
    return torch.rand(shape, generator=generator, device=device)


def randint(
    high: int, shape: Sequence[int], generator: Generators, device: torch.device | str
) -> Tensor:
    """Integers in ``[0, high)`` of ``shape`` (dim 0 = batch rows for :class:`RowGenerators`)."""
    if isinstance(generator, RowGenerators):
        return _per_row(
            lambda g: torch.randint(0, high, shape[1:], generator=g, device=device),
            shape,
            generator,
        )
    return torch.randint(0, high, shape, generator=generator, device=device)
