"""The settings `advise` compares, and each one's codes as columns of the tapped model's rows.

A candidate is what `extract` would make with `--layer`, `--pooling` and the backbone's
sizes: its codes here are built from the same pooled taps, so what `advise` measures is
what those commands give. Several layers are joined as `extract --layer a,b` joins them:
each layer's vector scaled to unit length, then concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cnncodes.advise.network import TapLayout, pooled


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way of making codes from the tapped rows.

    Attributes:
        backbone: the registry name.
        layers: one layer, or several joined (each L2-normalised).
        pooling: `avg`, `max` or `gem`.
        sizes: `mean` or `kept` (only differs when the backbone has several code sizes).
    """

    backbone: str
    layers: tuple[str, ...]
    pooling: str
    sizes: str = "mean"

    @property
    def name(self) -> str:
        """A short stable name, e.g. `mobilenetv2/out_relu/avg` or `…/block_13_expand_relu+out_relu/gem/kept`."""
        kept = "/sizes-kept" if self.sizes == "kept" else ""
        return f"{self.backbone}/{'+'.join(self.layers)}/{self.pooling}{kept}"

    @property
    def layer_option(self) -> str:
        """The value of `extract --layer` that makes these codes."""
        return ",".join(self.layers)

    def codes(self, rows: np.ndarray, layout: TapLayout) -> np.ndarray:
        """This candidate's codes of every row.

        Args:
            rows: (n, width) rows of the tapped model of this backbone.
            layout: their layout.

        Returns:
            (n, d) float64 codes.
        """
        per_size = [self._at(rows, layout, size) for size in layout.sizes]
        if self.sizes == "kept":
            return np.hstack(per_size)
        return np.mean(per_size, axis=0)

    def _at(self, rows: np.ndarray, layout: TapLayout, size: int) -> np.ndarray:
        parts = [
            pooled(rows, layout, layer=layer, pooling=self.pooling, size=size).astype(np.float64)
            for layer in self.layers
        ]
        if len(parts) == 1:
            return parts[0]
        return np.hstack([p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts])


def default_candidate(layout: TapLayout) -> Candidate:
    """What `extract` makes with every default: the deepest tap, average-pooled, sizes averaged."""
    return Candidate(backbone=layout.backbone, layers=(layout.layers[-1],), pooling="avg")


def single_candidates(layout: TapLayout) -> list[Candidate]:
    """Every tap with every pooling, sizes averaged (extract's way with several sizes)."""
    return [
        Candidate(backbone=layout.backbone, layers=(layer,), pooling=how)
        for layer in layout.layers
        for how in layout.poolings
    ]


def kept_candidates(best: Sequence[tuple[Candidate, float]], layout: TapLayout, *, count: int = 3) -> list[Candidate]:
    """The best few single candidates again with their sizes kept side by side (none for one size).

    Keeping the sizes mostly moves a candidate by a little, so the variants of the clearly worse
    depths and poolings are not worth their decomposition.

    Args:
        best: single candidates (sizes averaged) with their held-out accuracy.
        layout: the layout the candidates come from.
        count: how many of the best get the variant.

    Returns:
        The variants, best first.
    """
    if len(layout.sizes) < 2:
        return []
    ranked = sorted(best, key=lambda pair: -pair[1])[:count]
    return [replace(c, sizes="kept") for c, _ in ranked]


def joined_candidates(best: Sequence[tuple[Candidate, float]], layout: TapLayout) -> list[Candidate]:
    """The best two and three depths joined, with the pooling and sizes of the best single candidate.

    Depths are ranked by their candidates with that pooling and sizes averaged (every depth has one).

    Args:
        best: single-depth candidates with their held-out accuracy.
        layout: the layout the candidates come from.

    Returns:
        Up to two joined candidates (none when the backbone has fewer than two taps).
    """
    top = max(best, key=lambda pair: pair[1])[0]
    same = [(c, acc) for c, acc in best if c.pooling == top.pooling and c.sizes == "mean"]
    ranked = [c.layers[0] for c, _ in sorted(same, key=lambda pair: -pair[1])]
    joined = []
    for count in (2, 3):
        if len(ranked) >= count:
            chosen = tuple(layer for layer in layout.layers if layer in ranked[:count])  # shallow to deep
            joined.append(Candidate(backbone=top.backbone, layers=chosen, pooling=top.pooling, sizes=top.sizes))
    return joined
