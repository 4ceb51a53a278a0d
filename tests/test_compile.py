"""Every stateless method compiles with fullgraph=True and matches eager."""

import pytest
import torch

import gradagg

from asserts import DEVICES, RANDOM, STATELESS, options_for


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Inductor draws random numbers its own way, so the random methods are compared where their
# randomness cannot show: PCGrad with K = 2 (one possible order), GradDrop with full leakage.
# Krum with one neighbour ties the two rows of every mutual nearest pair: two neighbours (f = 0).
DETERMINISTIC_SETUPS = {"pcgrad": (2, {}), "graddrop": (4, {"leakage": 1.0}), "krum": (4, {"f": 0})}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in STATELESS if m != "random"])
def test_compiled_matches_eager(device, method):
    k, extra = DETERMINISTIC_SETUPS.get(method, (4, {}))
    opts = {**options_for(method, k), **extra}
    torch.manual_seed(0)
    tree = {"a": torch.randn(k, 3, 5, device=device), "b": torch.randn(k, 7, device=device)}
    tree["b"][1] = -tree["b"][0]  # some conflict, so the solvers have work to do
    compiled = torch.compile(lambda j: gradagg.aggregate(j, method=method, **opts), fullgraph=True)
    got = compiled(tree)
    expected = gradagg.aggregate(tree, method=method, **opts)
    for key in tree:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    tree2 = {key: value * 2 for key, value in tree.items()}  # a second call reuses the graph
    torch.testing.assert_close(compiled(tree2)["b"], gradagg.aggregate(tree2, method=method, **opts)["b"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(RANDOM))
def test_compiled_random_methods_keep_their_invariants(device, method):
    k = 4
    j = torch.randn(k, 6, device=device, dtype=torch.float64)
    compiled = torch.compile(lambda x: gradagg.aggregate(x, method=method), fullgraph=True)
    d = compiled(j)
    if method == "random":  # d = Jᵀw with w on the simplex
        w = torch.linalg.lstsq(j.T.cpu(), d.cpu().unsqueeze(1)).solution.squeeze(1)
        assert bool((w > 0).all()) and abs(float(w.sum()) - 1) < 1e-9
    elif method == "graddrop":  # each coordinate keeps the positive or the negative part
        pos, neg = j.clamp_min(0).sum(0), j.clamp_max(0).sum(0)
        assert bool((torch.isclose(d, pos) | torch.isclose(d, neg)).all())
    else:  # PCGrad: d = Σ g_i' with each g_i' no longer conflicting with the g_j it was projected on
        assert torch.isfinite(d).all() and float(d.norm()) > 0


@pytest.mark.parametrize("method", ["upgrad", "mean", "krum", "trimmed_mean", "fairgrad", "cagrad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compiled_non_finite_input_is_never_a_finite_answer(method, bad):
    """Under torch.compile there is no eager check: non-finite input must still show in the output."""
    compiled = torch.compile(lambda j: gradagg.aggregate(j, method=method, **options_for(method, 5)), fullgraph=True)
    j = torch.randn(5, 4)
    j[1, 1] = bad
    assert not torch.isfinite(compiled(j)).all()


def test_eager_calls_in_between_cause_no_recompilation():
    """The eager fast paths keep caches (validated plans, fixed weights); a compiled step must not
    guard on them."""
    j = torch.randn(3, 5)
    compiled = torch.compile(lambda x: gradagg.aggregate(x, "mgda") + gradagg.aggregate(x, "mean"), fullgraph=True)
    compiled(j)
    gradagg.aggregate(j, "upgrad")
    gradagg.aggregate(torch.randn(4, 6), "mean")
    gradagg.aggregate({"a": torch.randn(3, 2), "b": torch.randn(3, 4)}, "mgda")
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(j * 2), gradagg.aggregate(j * 2, "mgda") + gradagg.aggregate(j * 2, "mean"))


def test_krum_compiles_at_k_32():
    """Inductor's CPU code generation failed on Krum's tie quantisation at K = 32 (torch 2.13)."""
    j = torch.randn(32, 50)
    compiled = torch.compile(lambda x: gradagg.aggregate(x, "krum", f=1), fullgraph=True)
    torch.testing.assert_close(compiled(j), gradagg.aggregate(j, "krum", f=1))
