"""Hypothesis strategies for hard Jacobians: each example is built from a drawn seed and recipe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

KINDS = ("random", "rank_deficient", "duplicate", "opposite", "zero_row", "colinear", "norm_spread", "orthogonal",
         "low_rank", "low_rank_spread")


def conditioned_low_rank(k: int, d: int, r: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """K rows of rank r whose nonzero structure is well conditioned: r orthogonal rows with norms
    in [1, 10] and K − r random combinations of them, shuffled; every row then multiplied by
    10^U(−spread, spread). The scaled Gramian's nonzero eigenvalues stay well above float32's noise
    floor, so that every precision can resolve the rank (which is what the precision tests check)."""
    r = max(1, min(r, k, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    base = q.T * rng.uniform(1.0, 10.0, size=(r, 1))
    j = np.concatenate([base, rng.standard_normal((k - r, r)) @ base])[rng.permutation(k)]
    return j * 10.0 ** rng.uniform(-spread, spread, size=(k, 1)) if spread else j


@dataclass(frozen=True)
class Case:
    kind: str
    k: int
    d: int
    scale: float
    seed: int

    def numpy(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        k, d = self.k, self.d
        j = rng.standard_normal((k, d))
        if self.kind == "rank_deficient" and k > 1:
            r = int(rng.integers(1, k))
            j = rng.standard_normal((k, r)) @ rng.standard_normal((r, d))
        elif self.kind == "duplicate" and k > 1:
            j[int(rng.integers(1, k))] = j[0]
        elif self.kind == "opposite" and k > 1:
            j[int(rng.integers(1, k))] = -j[0] * rng.uniform(0.5, 2.0)
        elif self.kind == "zero_row":
            j[int(rng.integers(0, k))] = 0.0
        elif self.kind == "colinear" and k > 1:
            j[int(rng.integers(1, k))] = j[0] * rng.uniform(0.5, 2.0) + 1e-7 * rng.standard_normal(d)
        elif self.kind == "norm_spread":
            j *= 10.0 ** rng.uniform(-6, 6, size=(k, 1))
        elif self.kind in ("low_rank", "low_rank_spread"):
            r = int(rng.integers(1, k)) if k > 1 else 1
            j = conditioned_low_rank(k, d, r, 6.0 if self.kind == "low_rank_spread" else 0.0, rng)
        elif self.kind == "orthogonal":
            q, _ = np.linalg.qr(rng.standard_normal((max(d, k), k)))
            j = (q[:d, :k].T if d >= k else rng.standard_normal((k, d))) * rng.uniform(0.1, 10, size=(k, 1))
        return j * self.scale

    def full_rank(self) -> np.ndarray:
        """The Jacobian, widened where D < K by random columns (scaled like each row) so that G
        is invertible and no better conditioned than the rows themselves."""
        jn = self.numpy()
        if self.d < self.k:
            norms = np.linalg.norm(jn, axis=1, keepdims=True)
            extra = np.random.default_rng(self.seed).standard_normal((self.k, self.k))
            jn = np.concatenate([jn, extra * np.where(norms > 0, norms, self.scale)], 1)
        return jn

    def tensor(self, device: str = "cpu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(self.numpy(), dtype=dtype, device=device)


@st.composite
def cases(draw, kinds=KINDS, min_k: int = 1, max_k: int = 12, max_d: int = 40, scales: bool = True) -> Case:
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, max_d)) if kind != "orthogonal" else draw(st.integers(k, max(k, max_d)))
    scale = 10.0 ** draw(st.integers(-8, 8)) if scales else 1.0
    return Case(kind, k, d, scale, draw(st.integers(0, 2**32 - 1)))


def large_k_cases(kinds=KINDS) -> st.SearchStrategy[Case]:
    """K up to 64, the bar's upper end."""
    return cases(kinds=kinds, min_k=16, max_k=64, max_d=96)
