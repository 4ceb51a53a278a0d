"""Fuzzing: every method against hard Jacobians in every dtype and layout.

For finite input every call must return a finite result of the documented shape, dtype and device,
and raise nothing. ``make test`` runs a modest number of examples; ``make fuzz`` many more.
"""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import gradagg

from asserts import DEVICES, STATEFUL, options_for
from strategies import KINDS, Case

METHODS = sorted(gradagg.methods())
CHAINS = [("pcgrad", "nsgd"), ("gradvac", "mgda"), (("cagrad", {"c": 1.0}), ("trimmed_mean", {"trim": 1})),
          ("upgrad", "graddrop")]
# float16 only holds magnitudes in about [6e-5, 6e4]; the wider types take the whole range.
SCALES = {torch.float16: (-2, 2), torch.bfloat16: (-20, 20), torch.float32: (-20, 20), torch.float64: (-30, 30)}


@st.composite
def jacobians(draw, device):
    dtype = draw(st.sampled_from(list(SCALES)))
    lo, hi = SCALES[dtype]
    kinds = [k for k in KINDS if not (dtype == torch.float16 and k == "norm_spread")]  # 1e±6 leaves float16
    case = Case(draw(st.sampled_from(kinds)), draw(st.integers(1, 16)), draw(st.integers(1, 48)),
                10.0 ** draw(st.integers(lo, hi)), draw(st.integers(0, 2**32 - 1)))
    base = torch.tensor(case.numpy(), device=device).to(dtype)
    assume(bool(torch.isfinite(base).all()))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded", "tree"]))
    if layout == "transposed":
        jac = base.T.contiguous().T  # non-contiguous rows
    elif layout == "expanded":
        jac = base[:1].expand(case.k, case.d)  # stride 0 over K
    elif layout == "tree":
        cut = draw(st.integers(0, case.d))
        jac = {"a": base[:, :cut], "b": [base[:, cut:].reshape(case.k, -1, 1)]}
    else:
        jac = base
    note(f"{case}, {dtype}, {layout}")
    return jac, case.k, dtype


def run(method, jac, k, device):
    stateful = method in STATEFUL or not isinstance(method, str)
    opts = options_for(method, k) if isinstance(method, str) else {}
    if opts is None:
        return None
    state = None
    if stateful and (not isinstance(method, str) or gradagg.methods()[method].stateful):
        try:
            state = gradagg.init(method, k)
        except ValueError:  # a chain without stateful members
            state = None
    losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    return gradagg.aggregate(jac, method, state=state, losses=losses if method == "gradnorm_loss" else None,
                             generator=gen, **opts)


def leaves(tree):
    return tree if isinstance(tree, torch.Tensor) else [tree["a"], tree["b"][0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS + CHAINS, ids=str)
@given(data=st.data())
def test_finite_input_gives_finite_output_of_the_documented_form(device, method, data):
    jac, k, dtype = data.draw(jacobians(device))
    if isinstance(method, tuple) and "trimmed_mean" in str(method) and k < 3:
        return
    out = run(method, jac, k, device)
    if out is None:
        return  # the method needs more tasks (krum)
    if dtype == torch.float16:  # finite wherever the float32 answer fits in float16 (|x| ≤ 65504)
        wide = run(method, jac.float() if isinstance(jac, torch.Tensor) else
                   {"a": jac["a"].float(), "b": [jac["b"][0].float()]}, k, device)
        representable = all(bool((w.abs() < 6e4).all()) for w in leaves(wide))
    else:
        representable = True
    for result, source in zip(leaves(out), leaves(jac)):
        assert result.shape == source.shape[1:] and result.dtype == dtype and result.device == source.device
        assert torch.isfinite(result).all() or not representable, f"non-finite output for finite input: {result}"


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
