"""Fuzzing: every method and chain against hard Jacobians in every dtype and layout, checking answers.

Each example builds a Jacobian J64 in float64 (``strategies.Case``: random, rank-deficient, duplicate,
opposite, zero and nearly colinear rows, norms spread over 10^±6, orthogonal, well-conditioned low
rank with and without spread; scales from 10^-30 to 10^30 as the dtype allows), rounds it to the
drawn dtype and lays it out as a contiguous, transposed, expanded (stride 0) tensor, or a pytree
with 1-D leaves (scalar parameters) and leaves of mixed ranks. Then:

* the result has the documented shape, dtype and device, and is finite for finite input;
* the float64 answer on J64 agrees with an independent oracle where one exists (numpy or scipy:
  closed forms, least squares, bounded least squares, optimality certificates, a reimplementation of
  the random draws);
* the float32, bfloat16 and float16 answers agree with the float64 answer within a bound that
  depends on the dtype and on how well J64 determines the answer at that precision (``_allowed``),
  or with an oracle that accepts every answer consistent with the rounding (Krum's selection,
  GradDrop's draws). Examples that no precision can settle (a scaled eigenvalue of J J64ᵀ between
  float64's rounding and the dtype's noise floor) check only the form; ``make fuzz`` prints how
  many, as hypothesis events.

``make test`` runs 25 examples per case, ``make fuzz`` 2000.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import gradagg

from asserts import CROSS, DEVICES, STATEFUL, init_for, losses_for, options_for
from precision import (
    BOUND,
    DEGENERATE_ABS,
    UNIT,
    degenerate_tasks,
    error,
    graddrop_oracle,
    krum_admissible,
    krum_scores,
)
from strategies import KINDS, Case

METHODS = sorted(gradagg.methods())  # the cross-Gramian methods get cross=(J, J): one batch, twice
CHAINS = [("pcgrad", "nsgd"), ("gradvac", "mgda"), (("cagrad", {"c": 1.0}), ("trimmed_mean", {"trim": 1})),
          ("upgrad", "graddrop")]
# float16 only holds magnitudes in about [6e-5, 6e4]; the wider types take the whole range.
SCALES = {torch.float16: (-2, 2), torch.bfloat16: (-20, 20), torch.float32: (-20, 20), torch.float64: (-30, 30)}
LAYOUTS = ("contiguous", "transposed", "expanded", "tree", "scalars", "mixed_ranks")
#: Methods whose answer depends on G beyond its diagonal, hence on rank decisions.
SPECTRAL = {"mgda", "upgrad", "dualproj", "cagrad", "imtl_g", "config", "aligned_mtl", "nash_mtl", "fairgrad",
            "pcgrad", "gradvac", "krum"}
#: Methods whose answer is a minimum-norm point or a projection: ill-conditioned where 0 is near, but
#: not in, the hull of the gradients.
HULL = {"mgda", "upgrad", "dualproj", "cagrad", "nash_mtl", "fairgrad"}


def _layout(base: torch.Tensor, layout: str, cut: int):
    k, d = base.shape
    if layout == "transposed":
        return base.T.contiguous().T  # non-contiguous rows
    if layout == "expanded":
        return base[:1].expand(k, d)  # stride 0 over K
    if layout == "tree":
        return {"a": base[:, :cut], "b": [base[:, cut:].reshape(k, -1, 1)]}
    if layout == "scalars":  # the Jacobians of scalar parameters: leaves [K]
        return [base[:, i] for i in range(d)]
    if layout == "mixed_ranks":
        a, b = cut // 2, cut
        return [base[:, 0], base[:, 1:a + 1].reshape(k, -1), base[:, a + 1:b + 1].reshape(k, -1, 1),
                base[:, b + 1:].reshape(k, 1, -1, 1)] if d > 1 else [base[:, 0]]
    return base


def _flat(out) -> torch.Tensor:
    leaves = [out] if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


@st.composite
def jacobians(draw, device):
    dtype = draw(st.sampled_from(list(SCALES)))
    lo, hi = SCALES[dtype]
    kinds = [k for k in KINDS if not (dtype == torch.float16 and "spread" in k)]  # 1e±6 leaves float16
    case = Case(draw(st.sampled_from(kinds)), draw(st.integers(1, 16)), draw(st.integers(1, 48)),
                10.0 ** draw(st.integers(lo, hi)), draw(st.integers(0, 2**32 - 1)))
    j64 = case.numpy()
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "expanded":
        j64 = np.repeat(j64[:1], case.k, 0)
    base = torch.tensor(j64, device=device).to(dtype)
    assume(bool(torch.isfinite(base).all()))
    jac = _layout(base, layout, draw(st.integers(0, case.d)))
    note(f"{case}, {dtype}, {layout}")
    return jac, j64, case.k, dtype


def run(method, jac, k, device, seed: int = 0):
    stateful = method in STATEFUL or method in CROSS or not isinstance(method, str)
    opts = options_for(method, k) if isinstance(method, str) else {}
    if opts is None:
        return None
    state = None
    if stateful:
        try:
            state = init_for(method, k)
        except ValueError:  # a chain without stateful members
            state = None
    gen = torch.Generator(device=device).manual_seed(seed)
    if method in CROSS:
        opts = {**opts, "cross": (jac, jac)}
    return gradagg.aggregate(jac, method, state=state, generator=gen, **losses_for(method, k, device), **opts)


# --- oracles for the float64 answer --------------------------------------------------------------


def _keys(k: int) -> np.ndarray:
    """The generator's first draw, as PCGrad and GradVac make it: uniform keys [K, K]."""
    return torch.rand(k, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()


def pcgrad_rows(j: np.ndarray) -> np.ndarray:
    """PCGrad's projected rows, by the paper's loop on J itself, in the orders the keys give (row i
    visits the other tasks by increasing key)."""
    k = len(j)
    keys = _keys(k)
    rows = j.copy()
    for i in range(k):
        for t in sorted((t for t in range(k) if t != i), key=lambda t: keys[i, t]):
            dot, sq = rows[i] @ j[t], j[t] @ j[t]
            if dot < 0 and sq > 0:
                rows[i] = rows[i] - dot / sq * j[t]
    return rows


def oracle(method, j: np.ndarray, device) -> np.ndarray | None:
    """An independent float64 answer for J, or None where none is cheap and exact."""
    k = len(j)
    norms = np.linalg.norm(j, axis=1)
    if method == "sum":
        return j.sum(0)
    if method == "mean":
        return j.mean(0)
    if method == "constant":
        return np.arange(1.0, k + 1) @ j
    if method == "random":
        draws = torch.randn(k, generator=torch.Generator(device=device).manual_seed(0), dtype=torch.float64,
                            device=device)
        return torch.softmax(draws, 0).cpu().numpy() @ j
    if method in ("gradnorm", "gradnorm_loss"):  # the first call uses θ = 0: w = 1
        return j.sum(0)
    if method == "nsgd":  # before update_at, r = 1: α = n/Σn, m = Σ α n, w = m/n
        alive = norms > 0
        if not alive.any():
            return np.zeros(j.shape[1])
        m = (norms / norms.sum()) @ norms
        return (m / norms[alive]) @ j[alive]
    if method in ("pcgrad", "gradvac"):  # GradVac's first call is PCGrad's
        return pcgrad_rows(j).sum(0)
    if method == "trimmed_mean":
        trim = options_for(method, k)["trim"]
        return np.sort(j, 0)[trim: k - trim].mean(0)
    if method == "config":
        alive = norms > 0
        if not alive.any():
            return np.zeros(j.shape[1])
        units = j[alive] / norms[alive, None]
        x = np.linalg.lstsq(units, np.ones(alive.sum()), rcond=1e-6)[0]  # σ² cut at 1e-12, as gradagg's
        if np.linalg.norm(x) <= 1e-7 * np.sqrt(alive.sum()):  # 1 ⊥ the range: no direction
            return np.zeros(j.shape[1])
        unit = x / np.linalg.norm(x)
        return (j @ unit).sum() * unit
    if method in ("upgrad", "dualproj"):
        from oracles import dual_cone_projection

        lower = np.eye(k) / k if method == "upgrad" else np.full((1, k), 1.0 / k)
        scale = max(norms.max(), 1e-300)  # BVLS's tolerances are absolute: solve at unit scale
        return sum(dual_cone_projection(j / scale, row) for row in lower) @ j
    return None


def _check_oracle(method, ref: np.ndarray, j: np.ndarray, device) -> None:
    norms = np.linalg.norm(j, axis=1)
    scale = norms.max() if len(j) else 1.0
    if method in SPECTRAL and ((_scaled_spectrum(j) > 1e-24) & (_scaled_spectrum(j) <= 1e-10)).any():
        event("oracle skipped: a scaled eigenvalue at float64's own floor")
        return  # float64's floor decides such a direction either way; the oracles take it as signal
    if method == "mgda" and norms.max() > 0:  # optimality certificate of the weights (Frank-Wolfe gap)
        w = gradagg.weights(torch.tensor(j, device=device), "mgda").cpu().numpy()
        g = j @ j.T
        assert w.min() >= -1e-10 and abs(w.sum() - 1) <= 1e-9
        assert w @ g @ w - (g @ w).min() <= 1e-8 * scale**2
        return
    expected = oracle(method, j, device)
    if expected is None:
        return
    if method in ("upgrad", "dualproj"):  # BVLS stops at its own tolerance
        assert np.linalg.norm(ref - expected) <= 1e-5 * max(np.linalg.norm(expected), 1e-4 * scale) + 1e-300
        return
    if method == "config":
        lam = _scaled_spectrum(j)
        if ((lam > 1e-24) & (lam <= 1e-10)).any():
            return  # a scaled eigenvalue near float64's own cut: lstsq's rcond and the cut may differ
    assert np.linalg.norm(ref - expected) <= 1e-8 * max(np.linalg.norm(expected), 1e-6 * scale) + 1e-300, (
        f"{method}: float64 answer off its oracle by {np.linalg.norm(ref - expected):.3e}")


# --- how precisely J64 determines the answer at a precision --------------------------------------


def _scaled_spectrum(j: np.ndarray) -> np.ndarray:
    """The eigenvalues of S G S (S = diag 1/‖g_i‖, zero rows left out) as the squared singular values
    of the unit rows: exact null directions come out near 1e-32, not at G's rounding of 1e-16, so a
    tiny genuine eigenvalue (nearly colinear rows: 1e-14) is told from them."""
    norms = np.linalg.norm(j, axis=1)
    units = j[norms > 0] / norms[norms > 0, None]
    sigma = np.linalg.svd(units, compute_uv=False)
    return np.concatenate([sigma**2, np.zeros(max(len(units) - len(sigma), 0))])


def _cancellation(method, j: np.ndarray, ref: torch.Tensor) -> float:
    """Σ_i |w_i| ‖g_i‖ / max(‖d‖, 1e-5 max‖g_i‖): how much the rounding of each gradient (u ‖g_i‖)
    is amplified in d = Σ w_i g_i by cancellation. The weights are the method's own where they are
    unique, else (an optimisation on a singular G) the least-norm weights that give d."""
    norms = np.linalg.norm(j, axis=1)
    d = ref.double().cpu().numpy()
    if method == "trimmed_mean":  # the mean of the middle values, in float64
        trim = options_for(method, len(j))["trim"]
        middle = np.sort(j, 0)[trim: len(j) - trim]
        return float(np.linalg.norm(np.abs(middle).mean(0))) / max(np.linalg.norm(d), 1e-5 * norms.max(), 1e-300)
    if method == "db_mtl":  # d = Σ α_i B_i, every term of norm max_j ‖B_j‖, B = (1 − β) g/L at the first call
        losses = np.linspace(0.5, 2.0, len(j))
        size = len(j) * (1 - 0.9) * float((norms / losses).max())
        return size / max(np.linalg.norm(d), 1e-5 * norms.max(), 1e-300)
    if not isinstance(method, str) or not gradagg.is_weighting(method):
        return 1.0
    if method in ("nash_mtl", "fairgrad"):  # weights that diverge along null directions: the least-norm ones
        w = np.linalg.lstsq(j.T, d, rcond=None)[0]
    else:
        k = len(j)
        state = init_for(method, k) if method in STATEFUL or method in CROSS else None
        extra = {"cross": (torch.tensor(j), torch.tensor(j))} if method in CROSS else {}
        w = gradagg.weights(torch.tensor(j), method, state=state, generator=torch.Generator().manual_seed(0),
                            **losses_for(method, k), **extra, **options_for(method, k)).numpy()
    # Most methods also form a preference-weighted sum Σ p_i g_i (CAGrad's g0, UPGrad's Jᵀp, the
    # pseudo-inverses' right-hand sides), whose own cancellation their weights need not show.
    size = max(float(np.abs(w) @ norms), float(norms.sum()) / len(j))
    return size / max(np.linalg.norm(d), 1e-5 * norms.max(), 1e-300)


def _allowed(method, j: np.ndarray, jx: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The error (by ``precision.error``) allowed for the answer on J64 rounded to jx.dtype, or None
    where that precision cannot settle the answer.

    The base is the precision test's bound; methods that read G beyond its diagonal add the error that
    the rounding u plus the floor δ of G cause through the conditioning of S G S on its range
    (√K / λ_r), and the hull methods through the distance h of 0 to the hull (1 / h²)."""
    dtype = jx.dtype
    k = len(j)
    if method == "sdmgrad":
        # 20 projected steps of size lr = 10 on Â: each can multiply a perturbation by 1 + 10‖Â‖, and
        # at the defaults the iterates hop between faces (METHODS.md C17), so no precision bounds it.
        event("form only: sdmgrad's iteration amplifies rounding without bound")
        return None
    u, delta = UNIT[dtype], gradagg.gramian_noise(jx)
    cut = 2 * np.sqrt(k) * delta
    ratio = _cancellation(method, j, ref)
    allowed = BOUND[dtype] + 4 * u * ratio
    name = method if isinstance(method, str) else "chain"
    if name not in SPECTRAL and name != "chain":
        return allowed
    norms = np.linalg.norm(j, axis=1)
    alive = norms > 0
    if alive.sum() == 0:
        return allowed
    lam = _scaled_spectrum(j)
    if ((lam > 1e-24) & (lam <= 10 * cut)).any():
        event("ambiguous: a scaled eigenvalue between float64's rounding and the floor")
        return None
    first = (method[0] if isinstance(method[0], str) else method[0][0]) if name == "chain" else name
    if name == "chain" and first in HULL and (lam <= 1e-24).any():
        # On a singular G these weights are not unique (only Jᵀw is): a chain's next step sees the
        # rows w_i g_i, which then depend on a choice that no precision is bound to make alike.
        event("form only: a chain's first weights are not unique on a singular G")
        return None
    genuine = lam[lam > 10 * cut]
    # The range of G is known to an angle of about (u + δ) √K / λ_r; the weights' components along
    # it reach d in proportion to their size (the ratio above).
    allowed += 10 * (u + delta) * np.sqrt(k) / genuine.min() * ratio
    if name in HULL or name == "chain":
        # Which tasks take part in a vanishing nonnegative combination decides these methods (and
        # whether 0 is in the hull): where rounding at this precision changes that set (0 on the
        # hull's boundary, e.g. an opposite pair whose cone a perturbation opens to a half plane
        # containing another gradient), no precision settles the answer.
        rng = np.random.default_rng(0)
        degenerate = degenerate_tasks(j)
        for _ in range(2):
            perturbed = j * (1 + max(u, delta) * rng.uniform(-1, 1, j.shape))
            if (degenerate_tasks(perturbed) != degenerate).any():
                event("ambiguous: rounding changes which tasks a vanishing combination needs")
                return None
        mgda = gradagg.aggregate(torch.tensor(j), "mgda").numpy()
        h = np.linalg.norm(mgda) / norms.max()
        if 1e-9 < h <= np.sqrt(10 * cut):
            event("ambiguous: 0 within the floor's reach of the gradients' hull")
            return None
        if h > 1e-9:
            allowed += 10 * (u + delta) / h**2
    if name == "chain":
        rows = pcgrad_rows(j) if method[0] in ("pcgrad", "gradvac") else None
        if rows is not None:
            rho = np.linalg.norm(rows, axis=1) ** 2 / (norms.sum() ** 2)
            if ((rho > 1e-13) & (rho <= 10 * cut)).any():
                event("ambiguous: a row the transform cancelled down to the floor")
                return None
    if name == "imtl_g":
        # Σw = 1 divides by Σ G⁺√diag G, known to about cut / λ_r of Σ|G⁺√diag G|: where the sum is
        # that small (1 / Σ|w|), gradagg calls it zero (w = 0) at one precision and not at another.
        total = float(gradagg.weights(torch.tensor(j), "imtl_g").abs().sum())
        if total > 0 and 1 / total <= 10 * cut / genuine.min():
            event("ambiguous: IMTL-G's normalising sum within the floor of zero")
            return None
        allowed += 16 * (u + delta) * total
    return allowed


def _check_low_precision(method, out: torch.Tensor, ref: torch.Tensor, j: np.ndarray, jx: torch.Tensor) -> None:
    dtype = jx.dtype
    k = len(j)
    norms = np.linalg.norm(j, axis=1)
    if method == "krum":
        opts = options_for("krum", k)
        w = gradagg.weights(jx, "krum", **opts).cpu().numpy()
        chosen = np.flatnonzero(w > 0)
        noise = gradagg.gramian_noise(jx)
        assert krum_admissible(chosen, j, opts["f"], opts["m"], 32 * (UNIT[dtype] + noise)), (
            f"Krum chose rows {chosen}, not among the lowest scores {krum_scores(j, opts['f'])}")
        event(f"compared with its oracle ({dtype})")
        return
    if method == "graddrop":
        if jx.device.type != "cpu":
            return  # off the CPU torch draws U, which no oracle reproduces
        chosen, other, ambiguous = graddrop_oracle(j, 0, 16 * max(UNIT[dtype], UNIT[torch.float32]))
        got = out.double().cpu().numpy()
        tol = 8 * UNIT[dtype] * np.abs(j).sum(0) + 1e-300
        ok = (np.abs(got - chosen) <= tol) | (ambiguous & (np.abs(got - other) <= tol))
        assert ok.all(), f"GradDrop disagrees with its oracle at coordinates {np.flatnonzero(~ok)[:10]}"
        event(f"compared with its oracle ({dtype})")
        return
    if method == ("upgrad", "graddrop"):
        event("form only: GradDrop of the projected rows")
        return
    allowed = _allowed(method, j, jx, ref)
    if allowed is None:
        return
    if method in ("nash_mtl", "fairgrad") and len(j) > 1 and degenerate_tasks(j).any():
        diff = float((out.double().cpu() - ref.double().cpu()).norm())
        assert diff <= max(allowed * max(float(ref.double().norm()), 1e-5 * norms.max()),
                           DEGENERATE_ABS[dtype] * np.sqrt(k)), f"degenerate {method}: ‖Δd‖ = {diff:.3e}"
        return
    err = error(out.cpu(), ref.cpu(), j)
    event(f"compared with float64 ({dtype})")
    assert err <= allowed, f"{method} in {dtype}: error {err:.3e} > allowed {allowed:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS + CHAINS, ids=str)
@given(data=st.data())
def test_answers_of_the_documented_form_agree_with_float64_and_oracles(device, method, data):
    jac, j64, k, dtype = data.draw(jacobians(device))
    if "trimmed_mean" in str(method) and k < 3:
        return
    out = run(method, jac, k, device)
    if out is None:
        return  # the method needs more tasks (krum)
    leaves_in = [jac] if isinstance(jac, torch.Tensor) else torch.utils._pytree.tree_leaves(jac)
    leaves_out = [out] if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)
    for result, source in zip(leaves_out, leaves_in):
        assert result.shape == source.shape[1:] and result.dtype == dtype and result.device == source.device
    flat = _flat(out)
    ref = _flat(run(method, torch.tensor(j64, device=device), k, device))
    if dtype == torch.float16:  # finite wherever the float32 answer on the same input fits (|x| ≤ 65504)
        wide = _flat(run(method, torch.utils._pytree.tree_map(lambda t: t.float(), jac), k, device))
        representable = bool((wide.abs() < 6e4).all()) and bool((ref.abs() < 6e4).all())
    else:
        representable = True
    assert bool(torch.isfinite(flat).all()) or not representable, f"non-finite output for finite input: {flat}"
    assert bool(torch.isfinite(ref).all()), "non-finite float64 answer for finite input"
    if isinstance(method, str):
        _check_oracle(method, ref.cpu().numpy(), j64, device)
    if dtype != torch.float64 and representable:
        _check_low_precision(method, flat, ref, j64, torch.tensor(j64, device=device).to(dtype))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_algorithms(method):
    j = torch.tensor(np.random.default_rng(0).standard_normal((4, 30)), dtype=torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        first = run(method, j, 4, "cpu")
        second = run(method, j, 4, "cpu")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
