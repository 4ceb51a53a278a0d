"""Composition of per-task transforms, the old module's configuration records, gradient normalisers,
and the old module's remaining defects."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg
from gradagg._methods import cagrad as cagrad_module
from gradagg._methods.pcgrad import pcgrad_matrix

from asserts import DEVICES, assert_close_direction, npy
from strategies import cases


def pcgrad_rows_two_tasks(jn):
    g1, g2 = jn
    dot = g1 @ g2
    if dot >= 0:
        return jn.copy()
    return np.stack([g1 - dot / (g2 @ g2) * g2, g2 - dot / (g1 @ g1) * g1])


def same_direction(jn, w, w_ref):
    """Jᵀw = Jᵀw_ref (MGDA's weights are not unique when 0 is in the hull; its direction is)."""
    assert_close_direction(jn.T @ w, jn.T @ w_ref, 1e-7, floor=1e-8 * (np.abs(w) * np.linalg.norm(jn, axis=1)).sum())


# --- chains --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(2, 10))
def test_pcgrad_then_nsgd_transforms_rows_then_sums(device, seed, d):
    """("pcgrad", "nsgd"): NSGD weights the surgically altered rows g_i', whose norms it reads."""
    jn = np.random.default_rng(seed).standard_normal((2, d))
    rows = pcgrad_rows_two_tasks(jn)
    n = np.linalg.norm(rows, axis=1)
    expected = (rows / n[:, None]).sum(0) * n.mean()  # nsgd at its update_at call: m = mean(n)
    state = gradagg.init(("pcgrad", "nsgd"), 2)
    chain = ("pcgrad", ("nsgd", {"update_at": 0}))
    got = npy(gradagg.aggregate(torch.tensor(jn, device=device), chain, state=state))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert int(state.step) == 1


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=6, kinds=("random", "norm_spread")))
def test_chain_of_row_scalings_multiplies_weights(device, case):
    """A weighting in a chain scales rows: (constant a, mgda) gives a ⊙ mgda(diag(a) G diag(a))."""
    j = case.tensor(device)
    a = np.random.default_rng(case.seed).uniform(0.5, 2.0, case.k)
    w = npy(gradagg.weights(j, [("constant", {"weights": a.tolist()}), "mgda"]))
    inner = npy(gradagg.weights(j * torch.tensor(a, device=device).unsqueeze(1), "mgda"))
    same_direction(npy(j), w, a * inner)
    np.testing.assert_allclose(npy(gradagg.weights(j, ["mgda"])), npy(gradagg.weights(j, "mgda")), rtol=1e-12)


def test_chains_of_fixed_weightings():
    """Fixed weightings in a chain scale the rows in turn: (sum, mean) is the mean, (constant c,
    mean) weights c_i / K. Such a chain forms G although none of its steps reads it."""
    j = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gradagg.weights(j, ("sum", "mean")), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(gradagg.aggregate(j, ("sum", "mean")), j.mean(0))
    w = gradagg.weights(j, [("constant", {"weights": [1.0, 2.0, 3.0]}), "mean"])
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 3)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_ending_in_graddrop(device):
    jn = np.random.default_rng(3).standard_normal((2, 6))
    rows = pcgrad_rows_two_tasks(jn)
    got = gradagg.aggregate(torch.tensor(jn, device=device), ("pcgrad", ("graddrop", {"leakage": 1.0})))
    np.testing.assert_allclose(npy(got), rows.sum(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only be the last method"):
        gradagg.aggregate(torch.tensor(jn), ("graddrop", "pcgrad"))
    with pytest.raises(ValueError, match="coordinate by coordinate"):
        gradagg.weights(torch.tensor(jn), ("pcgrad", "graddrop"))


def test_chain_with_two_stateful_methods_takes_a_tuple_of_states():
    j = torch.randn(3, 5, dtype=torch.float64)
    states = gradagg.init(("gradvac", "pcgrad", "nsgd"), 3)
    assert isinstance(states, tuple) and [s.method for s in states] == ["gradvac", "nsgd"]
    gradagg.aggregate(j, ("gradvac", "pcgrad", "nsgd"), state=states)
    assert int(states[0].step) == 1 and int(states[1].step) == 1
    with pytest.raises(ValueError, match="sequence of 2 states in that order"):
        gradagg.aggregate(j, ("gradvac", "nsgd"), state=states[0])
    with pytest.raises(ValueError, match="made for 'gradvac', not 'nsgd'"):
        gradagg.aggregate(j, ("gradvac", "nsgd"), state=(states[0], states[0]))
    with pytest.raises(ValueError, match="ambiguous for a chain"):
        gradagg.aggregate(j, ("pcgrad", "mgda"), c=1.0)
    with pytest.raises(TypeError, match="chain's elements"):
        gradagg.aggregate(j, ("pcgrad", 3))


# --- the old configuration -----------------------------------------------------------------------


def test_from_config_defaults_and_mapping():
    assert gradagg.from_config([], 3) == gradagg.Config("identity", None)
    cfg = gradagg.from_config([{"name": "pcgrad"}, {"name": "nsgd"}], 3)
    assert cfg.method == (("pcgrad", {}), ("nsgd", {"update_at": 1})) and cfg.state.method == "nsgd"
    assert gradagg.from_config([{"name": "cagrad"}], 3).method == (("cagrad", {"c": 10.0}),)
    assert gradagg.from_config([{"name": "cagrad", "alpha": 0.4}], 3).method == (("cagrad", {"c": 0.4}),)
    gn = gradagg.from_config([{"name": "gradnorm"}], 3)
    assert gn.method == (("gradnorm", {"update_at": 1, "alpha": 1.0}),)
    assert gradagg.from_config([{"name": "graddrop"}], 2).method == (("graddrop", {"leakage": [0.2, 0.2]}),)
    with pytest.raises(ValueError, match="unknown method 'pcgard'"):
        gradagg.from_config([{"name": "pcgard"}], 3)
    with pytest.raises(ValueError, match="only be the last record"):
        gradagg.from_config([{"name": "graddrop"}, {"name": "mgda"}], 3)


def test_from_config_runs_like_the_old_module():
    """An empty list is the plain sum; a config runs through aggregate with its own state."""
    j = torch.randn(3, 8, dtype=torch.float64)
    empty = gradagg.from_config([], 3)
    torch.testing.assert_close(gradagg.aggregate(j, empty.method, state=empty.state), j.sum(0))
    cfg = gradagg.from_config([{"name": "pcgrad"}, {"name": "nsgd", "update_at": 0}], 3)
    gradagg.aggregate(j, cfg.method, state=cfg.state, generator=torch.Generator().manual_seed(0))
    # NSGD, second in the chain, recorded the norms of the rows PCGrad handed it.
    surgery = pcgrad_matrix(j @ j.T, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cfg.state.ref, (surgery @ j).norm(dim=1))
    assert int(cfg.state.step) == 1
    with pytest.raises(ValueError, match="unknown option 'speed'"):
        gradagg.aggregate(j, gradagg.from_config([{"name": "nsgd", "speed": 1}], 3).method,
                          state=gradagg.init("nsgd", 3))


# --- gradient normalisers ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["l2", "loss", "loss+", "none"])
@given(case=cases(max_k=6, kinds=("random", "norm_spread")))
def test_grad_normalizer_divides_rows_first(device, kind, case):
    j = case.tensor(device)
    losses = torch.tensor(np.random.default_rng(case.seed).uniform(0.5, 2.0, case.k), device=device)
    norms = j.norm(dim=1)
    divisor = {"l2": norms, "loss": losses, "loss+": losses * norms, "none": torch.ones_like(norms)}[kind]
    divisor = torch.where(divisor > 0, divisor, 1.0)
    w = gradagg.weights(j, "mgda", grad_normalizer=kind, losses=losses)
    expected = gradagg.weights(j / divisor.unsqueeze(1), "mgda") / divisor
    same_direction(npy(j), npy(w), npy(expected))


def test_grad_normalizer_errors():
    j = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"grad_normalizer='loss' needs the task losses"):
        gradagg.aggregate(j, "mgda", grad_normalizer="loss")
    with pytest.raises(ValueError, match="grad_normalizer must be one of"):
        gradagg.aggregate(j, "mgda", grad_normalizer="max")
    with pytest.raises(ValueError, match="finite and positive"):
        gradagg.aggregate(j, "mgda", grad_normalizer="loss", losses=torch.tensor([1.0, 0.0, 1.0]))


# --- defect e ------------------------------------------------------------------------------------


def test_cagrad_reports_an_unconverged_search(monkeypatch):
    """Defect e: the old CAGrad ran scipy on the CPU with no convergence check. Ours runs on the
    device (and compiles), and an exhausted budget is an error, never a silent answer."""
    monkeypatch.setattr(cagrad_module, "MAX_OUTER", 1)
    j = torch.tensor([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.9, 1.0]], dtype=torch.float64)
    with pytest.raises(gradagg.SolverError, match="CAGrad"):
        gradagg.aggregate(j, "cagrad", c=0.5)
