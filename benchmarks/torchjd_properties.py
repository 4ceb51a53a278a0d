"""TorchJD's own aggregator tests, run with TorchJD's aggregator classes answered by gradagg.

    python -m benchmarks.torchjd_properties --torchjd-src PATH [--report FILE] [--json FILE]
        [--categories property,values,behaviour] [--dtype float32] [--strict-options] [--no-reference]

PATH is a checkout of TorchJD's repository (https://github.com/SimplexLab/TorchJD); nothing of it
is copied here. Its aggregation tests (PATH/tests/unit/aggregation) are run by pytest in a child
process, with TorchJD's own conftest, matrix samplers and property checks (structure,
non-conflicting, permutation invariance, linearity under scaling, strong stationarity,
non-differentiability, pinned output values). Before any test module is imported, the aggregator
classes of ``torchjd.aggregation`` (UPGrad, DualProj, MGDA, ...) are replaced by thin adapters,
defined below, that take the same constructor arguments, map them onto gradagg's options and
answer ``aggregator(matrix)`` ([m, n] -> [n], in the matrix's dtype) with ``gradagg.aggregate``.
TorchJD's weighting classes and its internals are left alone, so tests that only exercise those
(e.g. ``test_weighting_output``) are not run in the gradagg pass.

Options that gradagg does not have are not emulated: an adapter built with one marks its tests
skipped, with the reason. The settings of TorchJD's iterative solvers (MGDA's epsilon/max_iters,
FairGrad's max_iters, CAGrad's norm_eps, NashMTL's optim_niter, UPGrad's/DualProj's projector,
GradVac's eps) do not change the method's definition, only how closely TorchJD approaches its
solution; gradagg solves exactly, so by default they are accepted and recorded as ignored, and
with ``--strict-options`` their non-default values are skipped as well.

A second child process runs the same TorchJD tests unmodified (TorchJD's own classes), as a
control: they should pass there. The summary, every failure (test id, property, matrix, size of
the violation) and every skip go to the report (Markdown) and to the JSON file.

Test categories (by test function name): ``property`` (the six property checks), ``values``
(``test_aggregator_output`` and GradVac's aggregator/weighting agreement), ``behaviour`` (other
tests of an aggregator's results: IMTLG on zeros, FairGrad with alpha = 0, NashMTL's reset, ...),
``checks`` (ValueError on bad options or shapes: TorchJD checks options in the constructor, the
adapters only when called) and ``api`` (repr/str, property setters: TorchJD's Python API, not
gradagg's). The default runs property, values and behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import gradagg

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = Path("tests") / "unit" / "aggregation"

# TorchJD test file -> the aggregator it tests (test_values.py tests several: read from its parameters).
FILE_OF = {
    "UPGrad": "test_upgrad.py", "DualProj": "test_dualproj.py", "MGDA": "test_mgda.py", "IMTLG": "test_imtl_g.py",
    "ConFIG": "test_config.py", "AlignedMTL": "test_aligned_mtl.py", "CAGrad": "test_cagrad.py",
    "PCGrad": "test_pcgrad.py", "NashMTL": "test_nash_mtl.py", "FairGrad": "test_fairgrad.py",
    "Krum": "test_krum.py", "TrimmedMean": "test_trimmed_mean.py", "GradDrop": "test_graddrop.py",
    "Mean": "test_mean.py", "Sum": "test_sum.py", "Constant": "test_constant.py", "Random": "test_random.py",
    "GradVac": "test_gradvac.py",
}
AGGREGATOR_OF_FILE = {f: a for a, f in FILE_OF.items()}
VALUES_FILE = "test_values.py"

PROPERTY_OF = {
    "test_expected_structure": "structure",
    "test_non_conflicting": "non-conflicting",
    "test_permutation_invariant": "permutation-invariance",
    "test_linear_under_scaling": "linearity-under-scaling",
    "test_strongly_stationary": "strong-stationarity",
    "test_non_differentiable": "non-differentiability",
    "test_aggregator_output": "reference-values",
    "test_aggregator_and_weighting_agree": "reference-values",
}
# Tests that use none of the substituted classes (only TorchJD's weightings): nothing to learn about gradagg.
TORCHJD_ONLY = {"test_weighting_output", "test_mgda_satisfies_kkt_conditions", "test_equivalence_upgrad_sum_two_rows"}
CATEGORIES = ("property", "values", "behaviour", "checks", "api")
DEFAULT_CATEGORIES = ("property", "values", "behaviour")
AGGREGATOR_PARAMS = ("aggregator", "A")
MATRIX_PARAMS = ("matrix", "J")


def category_of(function: str) -> str:
    if function in TORCHJD_ONLY or function.startswith("test_weighting_"):
        return "torchjd-only"
    prop = PROPERTY_OF.get(function)
    if prop == "reference-values":
        return "values"
    if prop is not None:
        return "property"
    if function == "test_representations" or "_setter_" in function or "_getter_" in function \
            or function == "test_setters_update_values":
        return "api"
    if function.endswith("_check") or function == "test_invalid_scale_mode":
        return "checks"
    return "behaviour"


# ---------------------------------------------------------------------------------------------------------------
# The adapters (built in the child process, after torchjd is imported).

CALLS: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (matrix, output) of every adapter call in a test


def _vector_str(v: torch.Tensor) -> str:
    return ", ".join(f"{x:.2f}".rstrip("0") for x in v.reshape(-1).tolist())


def build_adapters(strict_options: bool) -> dict[str, type]:
    """Classes with the constructors of TorchJD's aggregators, answered by gradagg."""
    import torchjd.aggregation as tja

    graddrop_identity = inspect.signature(tja.GradDrop.__init__).parameters["f"].default

    class GradaggAdapter(tja.Aggregator):
        """matrix [m, n] -> gradagg.aggregate(matrix, method, **options) [n]."""

        method: ClassVar[str] = ""
        stateful: ClassVar[bool] = False

        def __init__(self) -> None:
            super().__init__()
            self.options: dict[str, Any] = {}
            self.unsupported: list[str] = []  # options gradagg does not have: the tests are skipped
            self.ignored: list[str] = []  # non-default solver settings, accepted as gradagg solves exactly
            self.label = type(self).__name__
            self._state: Any = None
            self._state_k: int | None = None

        def _solver_setting(self, name: str, value: Any, default: Any) -> None:
            if value is default or (not isinstance(value, torch.Tensor) and value == default):
                return
            note = f"{type(self).__name__}({name}={value!r}): TorchJD solver setting, gradagg solves exactly"
            (self.unsupported if strict_options else self.ignored).append(note)

        def _state_for(self, k: int) -> Any:
            if not self.stateful or k < 1:  # (K = 0: left to gradagg.aggregate to refuse)
                return None
            if self._state is None or self._state_k != k:
                self._state, self._state_k = gradagg.init(self.method, k), k
            return self._state

        def reset(self) -> None:
            self._state, self._state_k = None, None

        def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
            if self.unsupported:
                pytest.skip("; ".join(self.unsupported))
            CALLS.append((matrix.detach().clone(), None))
            out = gradagg.aggregate(matrix, self.method, state=self._state_for(matrix.shape[0]), **self.options)
            CALLS[-1] = (CALLS[-1][0], out.detach().clone())
            return out

        def __repr__(self) -> str:
            options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            return f"{type(self).__name__}<gradagg {self.method}>({options})"

        def __str__(self) -> str:
            return self.label

    def pref_label(name: str, pref: torch.Tensor | None) -> str:
        return name if pref is None else f"{name}([{_vector_str(pref)}])"

    class UPGrad(GradaggAdapter):
        method = "upgrad"

        def __init__(self, pref_vector: torch.Tensor | None = None, projector: Any = None) -> None:
            super().__init__()
            self.options["pref"] = pref_vector
            self._solver_setting("projector", projector, None)
            self.label = pref_label(type(self).__name__, pref_vector)

    class DualProj(UPGrad):
        method = "dualproj"

    class MGDA(GradaggAdapter):
        method = "mgda"

        def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
            super().__init__()
            self._solver_setting("epsilon", epsilon, 0.001)
            self._solver_setting("max_iters", max_iters, 100)

    class IMTLG(GradaggAdapter):
        method = "imtl_g"

    class ConFIG(GradaggAdapter):
        method = "config"

        def __init__(self, pref_vector: torch.Tensor | None = None) -> None:
            super().__init__()
            if pref_vector is not None:
                self.unsupported.append("ConFIG(pref_vector=...): gradagg's config has no preference vector")
            self.label = pref_label("ConFIG", pref_vector)

    class AlignedMTL(GradaggAdapter):
        method = "aligned_mtl"

        def __init__(self, pref_vector: torch.Tensor | None = None, scale_mode: str = "min") -> None:
            super().__init__()
            self.options.update(pref=pref_vector, scale_mode=scale_mode)
            self.label = pref_label("AlignedMTL", pref_vector)

    class CAGrad(GradaggAdapter):
        method = "cagrad"

        def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
            super().__init__()
            self.options.update(c=c, rescale=0)  # TorchJD returns g0 + r Jᵀw/‖Jᵀw‖, unrescaled
            self._solver_setting("norm_eps", norm_eps, 0.0001)
            self.label = "CAGrad" + str(c).removesuffix(".0")

    class PCGrad(GradaggAdapter):
        method = "pcgrad"

    class NashMTL(GradaggAdapter):
        method = "nash_mtl"
        stateful = True

        def __init__(self, n_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1,
                     optim_niter: int = 20) -> None:
            super().__init__()
            self.n_tasks = n_tasks
            # TorchJD: max_norm = 0 disables the clipping; gradagg: max_norm=None does.
            self.options.update(update_every=update_weights_every, max_norm=max_norm if max_norm > 0 else None)
            self._solver_setting("optim_niter", optim_niter, 20)

        def _state_for(self, k: int) -> Any:
            if self._state is None:
                self._state, self._state_k = gradagg.init(self.method, self.n_tasks), self.n_tasks
            return self._state

    class FairGrad(GradaggAdapter):
        method = "fairgrad"

        def __init__(self, alpha: float, max_iters: int | None = None) -> None:
            super().__init__()
            if alpha > 0:
                self.options["alpha"] = alpha
            else:
                self.unsupported.append(f"FairGrad(alpha={alpha!r}): gradagg's fairgrad needs alpha > 0")
            self._solver_setting("max_iters", max_iters, None)
            self.label = f"{alpha}-FairGrad"

    class Krum(GradaggAdapter):
        method = "krum"

        def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
            super().__init__()
            self.options.update(f=n_byzantine, m=n_selected)
            self.label = f"Krum{n_byzantine}-{n_selected}"

    class TrimmedMean(GradaggAdapter):
        method = "trimmed_mean"

        def __init__(self, trim_number: int) -> None:
            super().__init__()
            self.options["trim"] = trim_number
            self.label = f"TM{trim_number}"

    class GradDrop(GradaggAdapter):
        method = "graddrop"

        def __init__(self, f: Any = graddrop_identity, leak: torch.Tensor | None = None) -> None:
            super().__init__()
            if f is not graddrop_identity:
                self.unsupported.append("GradDrop(f=...): gradagg's graddrop has no purity transform")
            self.options["leakage"] = leak
            self.label = "GradDrop" if leak is None else f"GradDrop([{_vector_str(leak)}])"

    class Mean(GradaggAdapter):
        method = "mean"

    class Sum(GradaggAdapter):
        method = "sum"

    class Constant(GradaggAdapter):
        method = "constant"

        def __init__(self, weights: torch.Tensor) -> None:
            super().__init__()
            self.options["weights"] = weights
            self.label = f"Constant([{_vector_str(weights)}])" if weights.dim() == 1 else "Constant"

    class Random(GradaggAdapter):
        method = "random"

    class GradVac(GradaggAdapter):
        method = "gradvac"
        stateful = True

        def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
            super().__init__()
            self.options["decay"] = beta  # the EMA rate of the target cosines
            self._solver_setting("eps", eps, 1e-8)

    adapters = {cls.__name__: cls for cls in (UPGrad, DualProj, MGDA, IMTLG, ConFIG, AlignedMTL, CAGrad, PCGrad,
                                              NashMTL, FairGrad, Krum, TrimmedMean, GradDrop, Mean, Sum,
                                              Constant, Random, GradVac)}
    available = set(gradagg.methods())
    return {name: cls for name, cls in adapters.items() if cls.method in available and hasattr(tja, name)}


# ---------------------------------------------------------------------------------------------------------------
# The pytest plugin of the child process.

def _install_torchvision_stub() -> bool:
    """TorchJD's tests/conftest.py imports its model zoo, which imports torchvision; the aggregation
    tests never build those models. Without torchvision, a stub lets the conftest load."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")

        def _missing(name: str) -> Any:
            raise AttributeError(f"torchvision is a stub here (torchvision.{name})")

        stub.models = types.SimpleNamespace()  # type: ignore[attr-defined]
        stub.__getattr__ = _missing  # type: ignore[method-assign]
        sys.modules["torchvision"] = stub
        return True
    return False


def _scalar(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return math.nan


def _close_diffs(message: str) -> dict[str, float]:
    """Greatest absolute/relative differences (and allowed values) from torch.testing.assert_close's message."""
    out = {}
    for kind in ("absolute", "relative"):
        m = re.search(rf"(?:Greatest )?{kind} difference: (\S+)(?: at index \([^)]*\))? \(up to (\S+) allowed\)",
                      message, re.IGNORECASE)
        if m:
            out[kind] = _scalar(m.group(1))
            out[f"{kind}_allowed"] = _scalar(m.group(2))
    return out


def _violation(prop: str, exc: BaseException, calls: list) -> tuple[str, dict[str, float]]:
    """A one-line description and the numbers of how far a failing test is from passing."""
    message = str(exc)
    first = message.strip().splitlines()[0] if message.strip() else ""
    if not isinstance(exc, AssertionError):
        return f"raised {type(exc).__name__}: {first[:300]}", {}
    done = [(m, o) for m, o in calls if o is not None]
    nums: dict[str, float] = {}
    if prop == "non-conflicting" and done:
        j, d = (t.double() for t in done[0])
        c = j @ d
        norms = j.norm(dim=1) * d.norm()
        cos = torch.where(norms > 0, c / torch.where(norms > 0, norms, 1.0), 0.0)
        nums = {"min_gi_dot_d": c.min().item(), "min_cosine": cos.min().item(),
                "negative_part_fraction": (c.clamp(max=0).norm() / c.norm()).item() if c.norm() > 0 else 0.0,
                "n_conflicting_rows": float((c < 0).sum().item())}
        text = (f"min_i g_i·d = {nums['min_gi_dot_d']:.3g} (min cosine {nums['min_cosine']:.3g}), "
                f"{int(nums['n_conflicting_rows'])} row(s) with g_i·d < 0; "
                f"‖(Jd)⁻‖/‖Jd‖ = {nums['negative_part_fraction']:.3g}")
    elif prop == "strong-stationarity":
        m = re.search(r"assert (\S+) > (\S+)", message)
        norm = done[0][1].double().norm().item() if done else (_scalar(m.group(1)) if m else math.nan)
        nums = {"norm": norm, "threshold": _scalar(m.group(2)) if m else math.nan}
        text = f"‖A(J)‖ = {norm:.3g} ≤ threshold {nums['threshold']:.3g} on a non-strongly-stationary J"
    elif prop == "structure" and done:
        j, d = done[0]
        nums = {"non_finite": float((~torch.isfinite(d)).sum().item())}
        text = f"output shape {list(d.shape)} for J {list(j.shape)}, {int(nums['non_finite'])} non-finite entries"
    elif prop == "non-differentiability":
        text = "the output requires grad (gradagg is differentiable in J with the weights held constant)"
    else:
        nums = _close_diffs(message)
        if "absolute" in nums:
            text = (f"greatest abs diff {nums['absolute']:.3g} (allowed {nums['absolute_allowed']:.3g}), "
                    f"greatest rel diff {nums.get('relative', math.nan):.3g} "
                    f"(allowed {nums.get('relative_allowed', math.nan):.3g})")
        else:
            text = first[:300]
        if prop == "permutation-invariance" and len(done) >= 2:
            ref = done[0][1].double()
            worst = max((o.double() - ref).norm().item() for _, o in done[1:])
            nums["relative_to_norm"] = worst / ref.norm().item() if ref.norm() > 0 else math.inf
            nums["norm"] = ref.norm().item()
            text += f"; ‖A(J)‖ = {nums['norm']:.3g}, max ‖A(PJ) − A(J)‖/‖A(J)‖ = {nums['relative_to_norm']:.3g}"
    return text, nums


class Plugin:
    def __init__(self, mode: str, categories: set[str], strict_options: bool) -> None:
        self.mode = mode
        self.categories = categories
        self.records: dict[str, dict[str, Any]] = {}
        self.collection_errors: list[str] = []
        self.adapters: dict[str, type] = {}
        self.stubbed_torchvision = _install_torchvision_stub()
        self._matrix_labels: dict[int, str] | None = None
        if mode == "gradagg":
            import torchjd.aggregation as tja

            self.adapters = build_adapters(strict_options)
            for name, cls in self.adapters.items():
                self._watch(getattr(tja, name))
                setattr(tja, name, cls)  # the test modules import them from here, at collection
        self.original_calls: Counter = Counter()  # nodeid -> calls of a replaced TorchJD class (should be none)
        self._current = ""

    def _watch(self, original: type) -> None:
        """Counts the calls of a replaced TorchJD class, were a test to reach it by another path."""
        forward = original.forward

        def watched(agg: Any, matrix: torch.Tensor, /) -> torch.Tensor:
            self.original_calls[self._current or "?"] += 1
            return forward(agg, matrix)

        original.forward = watched

    def pytest_configure(self, config: Any) -> None:
        # Rewritten asserts in TorchJD's property checks give the compared values in the message.
        pytest.register_assert_rewrite("unit.aggregation._asserts")

    def _labels(self) -> dict[int, str]:
        if self._matrix_labels is not None:
            return self._matrix_labels
        labels: dict[int, str] = {}
        inputs = sys.modules.get("unit.aggregation._inputs")
        if inputs is not None:
            def add(name: str, dims_name: str, kind: str) -> None:
                for t, dims in zip(getattr(inputs, name, []), getattr(inputs, dims_name, [])):
                    m, n, r = dims
                    labels[id(t)] = f"zeros({m}x{n})" if kind == "zeros" else f"{kind}({m}x{n} r{r})"

            add("matrices", "_normal_dims", "Normal")
            add("zero_matrices", "_zero_dims", "zeros")
            add("strong_matrices", "_stationarity_dims", "Strong")
            add("strictly_weak_matrices", "_stationarity_dims", "StrictlyWeak")
            add("non_weak_matrices", "_stationarity_dims", "NonWeak")
            add("nash_mtl_matrices", "_nashmtl_dims", "Normal")
            base = getattr(inputs, "matrices", [])
            for i, t in enumerate(getattr(inputs, "scaled_matrices", [])):
                if base:
                    scale = getattr(inputs, "_scales", [math.nan] * (i // len(base) + 1))[i // len(base)]
                    labels[id(t)] = f"{scale:g} × {labels.get(id(base[i % len(base)]), 'matrix')}"
        self._matrix_labels = labels
        return labels

    @staticmethod
    def _label(labels: dict[int, str], matrix: torch.Tensor | None, item: Any) -> str:
        if matrix is None:
            return ""
        if id(matrix) in labels:
            return labels[id(matrix)]
        names = [k for k, v in vars(getattr(item, "module", None) or types.SimpleNamespace()).items() if v is matrix]
        return names[0] if names else ""

    def _aggregator_of(self, item: Any) -> Any:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for name in AGGREGATOR_PARAMS:
            if name in params:
                return params[name]
        return None

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list) -> None:
        keep, drop = [], []
        labels = self._labels()
        for item in items:
            function = getattr(item, "originalname", item.name.split("[")[0])
            file = Path(str(item.fspath)).name
            agg = self._aggregator_of(item)
            params = getattr(getattr(item, "callspec", None), "params", {})
            matrix = next((params[n] for n in MATRIX_PARAMS if isinstance(params.get(n), torch.Tensor)), None)
            cls_name = type(agg).__name__ if agg is not None else AGGREGATOR_OF_FILE.get(file, "")
            category = category_of(function)
            rec = {
                "nodeid": item.nodeid, "file": file, "function": function, "category": category,
                "property": PROPERTY_OF.get(function) or f"{category}: {function.removeprefix('test_')}",
                "aggregator": cls_name,
                "aggregator_str": str(agg) if agg is not None else cls_name,
                "matrix_shape": list(matrix.shape) if matrix is not None else None,
                "matrix": self._label(labels, matrix, item),
                "outcome": None, "detail": "", "numbers": {}, "ignored_settings": [],
            }
            if self.mode == "gradagg":
                reason = None
                if rec["category"] == "torchjd-only":
                    reason = "uses only TorchJD's weighting classes, which are not substituted"
                elif rec["category"] not in self.categories:
                    reason = f"category {rec['category']!r} not selected"
                elif agg is not None and not hasattr(agg, "method"):
                    reason = f"{cls_name} is not substituted (gradagg has no such method)"
                elif agg is None and file != VALUES_FILE and AGGREGATOR_OF_FILE.get(file) not in self.adapters:
                    reason = f"{cls_name or file} is not substituted (gradagg has no such method)"
                if reason is not None:
                    rec.update(outcome="deselected", detail=reason)
                    drop.append(item)
                    self.records[item.nodeid] = rec
                    continue
                if agg is not None and getattr(agg, "unsupported", None):
                    item.add_marker(pytest.mark.skip(reason="; ".join(agg.unsupported)))
                if agg is not None:
                    rec["ignored_settings"] = list(getattr(agg, "ignored", []))
                    rec["random"] = gradagg.methods()[agg.method].random
            self.records[item.nodeid] = rec
            keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            lines = str(report.longrepr).strip().splitlines()
            self.collection_errors.append(f"{report.nodeid}: {lines[-1] if lines else ''}"[:400])

    def pytest_runtest_setup(self, item: Any) -> None:
        CALLS.clear()
        self._current = item.nodeid

    def _set(self, nodeid: str, outcome: str, detail: str = "", numbers: dict | None = None) -> None:
        rec = self.records.setdefault(nodeid, {"nodeid": nodeid})
        rank = {None: 0, "passed": 1, "skipped": 2, "xfailed": 2, "xpassed": 3, "failed": 4, "error": 5}
        if rank.get(outcome, 0) >= rank.get(rec.get("outcome"), 0):
            rec["outcome"], rec["detail"] = outcome, detail
            if numbers is not None:
                rec["numbers"] = numbers

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        report = yield
        rec = self.records.get(item.nodeid, {})
        if call.when == "call" and report.failed and call.excinfo is not None:
            text, nums = _violation(rec.get("property", ""), call.excinfo.value, list(CALLS))
            if rec.get("matrix_shape") is None and CALLS:
                rec["matrix_shape"] = list(CALLS[0][0].shape)
            self._set(item.nodeid, "failed", text, nums)
        elif call.when == "call" and hasattr(report, "wasxfail"):
            self._set(item.nodeid, "xfailed" if report.skipped else "xpassed", str(report.wasxfail))
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self._set(item.nodeid, "skipped", reason.removeprefix("Skipped: "))
        elif report.failed:  # setup or teardown
            self._set(item.nodeid, "error", f"{call.when}: {call.excinfo.exconly()[:300] if call.excinfo else ''}")
        elif call.when == "call":
            self._set(item.nodeid, "passed")
        return report


def run_child(args: argparse.Namespace) -> int:
    src = Path(args.torchjd_src).resolve()
    test_dir = src / TEST_DIR
    categories = set(args.categories.split(","))
    plugin = Plugin(args.child, categories, args.strict_options)
    if args.child == "gradagg":
        files = [test_dir / FILE_OF[name] for name in plugin.adapters if (test_dir / FILE_OF[name]).exists()]
        files.append(test_dir / VALUES_FILE)
        targets = [str(f) for f in files]
    else:
        targets = [str(test_dir)]
    pytest_args = [*targets, f"--rootdir={src}", "-c", str(src / "pyproject.toml"), "-p", "no:cacheprovider",
                   "-q", "--no-header", "-rN", "--tb=no", "--continue-on-collection-errors", *args.pytest_args]
    code = pytest.main(pytest_args, plugins=[plugin])
    Path(args.child_out).write_text(json.dumps({
        "mode": args.child, "exit_code": int(code), "records": list(plugin.records.values()),
        "collection_errors": plugin.collection_errors, "original_calls": dict(plugin.original_calls),
        "adapters": {name: cls.method for name, cls in plugin.adapters.items()},
        "torchjd_version": importlib.metadata.version("torchjd"), "torchvision_stub": plugin.stubbed_torchvision,
        "pytest_args": pytest_args,
    }, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs the children, writes the report.

def _spawn(mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.torchjd_properties", "--torchjd-src", str(args.torchjd_src),
           "--categories", args.categories, "--child", mode, "--child-out", str(out)]
    if args.strict_options:
        cmd.append("--strict-options")
    if args.pytest_args:
        cmd += ["--", *args.pytest_args]
    env = dict(os.environ, PYTEST_TORCH_DTYPE=args.dtype, PYTEST_TORCH_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if not out.exists():
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {mode} run produced no results (exit code {proc.returncode})")
    data = json.loads(out.read_text())
    data["stdout_tail"] = proc.stdout[-3000:]
    return data


def _counts(records: list[dict], key: str) -> dict[str, Counter]:
    table: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        table[r[key]][r["outcome"]] += 1
    return table


def _ran(c: Counter) -> int:
    return c["passed"] + c["failed"] + c["error"] + c["xfailed"] + c["xpassed"]


def _table(title: str, table: dict[str, Counter], order: list[str] | None = None) -> list[str]:
    lines = [f"| {title} | ran | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|---:|"]
    total: Counter = Counter()
    for name in order or sorted(table):
        if name not in table:
            continue
        c = table[name]
        total += c
        lines.append(f"| {name} | {_ran(c)} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    lines.append(f"| **total** | {_ran(total)} | {total['passed']} | {total['failed']} | {total['error']} | "
                 f"{total['skipped']} |")
    return lines


def _git(*cmd: str) -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    return "?"


def _tree_state() -> str:
    """HEAD, and the files of gradagg/ that differ from it with a hash of their contents (the library may be
    edited between runs; the hash tells two runs of the same uncommitted tree apart from others)."""
    head = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=all", "--", "gradagg")
    changed = [line.split(maxsplit=1)[1] for line in status.splitlines() if len(line.split(maxsplit=1)) == 2]
    if head == "?" or not changed:
        return f"HEAD {head}" + ("" if head == "?" else ", no uncommitted changes in gradagg/")
    digest = hashlib.sha256(_git("diff", "HEAD", "--", "gradagg").encode())
    for name in sorted(changed):
        with contextlib.suppress(OSError):
            digest.update((REPO / name).read_bytes())
    return (f"HEAD {head} plus uncommitted changes in {len(changed)} file(s) of gradagg/ "
            f"({', '.join(sorted(changed))}; sha256 {digest.hexdigest()[:12]})")


def _torchjd_commit(src: Path) -> str:
    with contextlib.suppress(Exception):
        return (src / ".torchjd_commit").read_text().strip()
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                              check=True).stdout.strip()
    return "unknown"


def write_report(args: argparse.Namespace, ours: dict, ref: dict | None) -> str:
    src = Path(args.torchjd_src).resolve()
    run = [r for r in ours["records"] if r["outcome"] not in (None, "deselected")]
    dropped = [r for r in ours["records"] if r["outcome"] == "deselected"]
    prop_order = list(dict.fromkeys(PROPERTY_OF.values()))
    props = sorted({r["property"] for r in run}, key=lambda p: (prop_order.index(p) if p in prop_order else 99, p))
    aggs = [a for a in FILE_OF if any(r["aggregator"] == a for r in run)]
    lines = [
        "# TorchJD's aggregator tests with gradagg behind TorchJD's classes", "",
        f"- command: `python -m benchmarks.torchjd_properties --torchjd-src {args.torchjd_src}"
        f"{' --strict-options' if args.strict_options else ''}"
        f"{'' if args.categories == ','.join(DEFAULT_CATEGORIES) else ' --categories ' + args.categories}`",
        f"- TorchJD tests: `{src / TEST_DIR}` (commit {_torchjd_commit(src)}); installed torchjd "
        f"{ours['torchjd_version']}",
        f"- gradagg {gradagg.__version__} at {REPO}: {_tree_state()}",
        f"- torch {torch.__version__}; TorchJD's test dtype {args.dtype}, device cpu",
        f"- categories run: {args.categories}; solver settings: "
        f"{'non-default values skipped (--strict-options)' if args.strict_options else 'accepted and ignored'}",
    ]
    if ours.get("torchvision_stub"):
        lines.append("- torchvision is not installed: a stub module stood in for it (TorchJD's conftest imports it "
                     "for its model zoo; no aggregation test uses it)")
    calls = ours.get("original_calls", {})
    lines.append(f"- calls of TorchJD's replaced aggregator classes in the gradagg pass: {sum(calls.values())}"
                 + "".join(f"\n  - `{k}`: {n}" for k, n in sorted(calls.items())))
    if ours.get("collection_errors"):
        lines += ["- **collection errors** (these test modules did not run):",
                  *[f"  - `{e}`" for e in ours["collection_errors"]]]
    lines += ["", "## Per aggregator", "", *_table("aggregator", _counts(run, "aggregator"), aggs),
              "", "## Per property", "", *_table("property", _counts(run, "property"), props), ""]
    # aggregator x property failures
    grid: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in run:
        grid[r["aggregator"], r["property"] if r["property"] in prop_order else "other behaviour"][r["outcome"]] += 1
    props = [p for p in [*prop_order, "other behaviour"] if any(k[1] == p for k in grid)]
    lines += ["## Failed / ran, per aggregator and property", "",
              "| aggregator | " + " | ".join(props) + " |", "|---|" + "---:|" * len(props)]
    for a in aggs:
        cells = []
        for p in props:
            c = grid.get((a, p))
            cells.append("" if c is None else (f"**{c['failed'] + c['error']}**/{_ran(c)}"
                                               if c["failed"] + c["error"] else f"0/{_ran(c)}")
                         + (f" ({c['skipped']} skipped)" if c and c["skipped"] else ""))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    failures = [r for r in run if r["outcome"] in ("failed", "error", "xpassed")]
    lines += ["", f"## Failures ({len(failures)})", ""]
    if failures:
        lines += ["| test id | property | matrix | violation |", "|---|---|---|---|"]
        for r in sorted(failures, key=lambda r: (aggs.index(r["aggregator"]) if r["aggregator"] in aggs else 99,
                                                 r["nodeid"])):
            shape = "" if r["matrix_shape"] is None else "×".join(map(str, r["matrix_shape"]))
            matrix = f"{r['matrix']} [{shape}]" if r["matrix"] else (f"[{shape}]" if shape else "")
            note = (" (random method: the expected value depends on how the seeded RNG stream is drawn, which "
                    "gradagg does differently)" if r["property"] == "reference-values" and r.get("random") else "")
            lines.append(f"| `{r['nodeid'].replace('|', '/')}` | {r['property']} | {matrix} | "
                         f"{r['detail'].replace('|', '/')}{note} |")
    skipped = [r for r in run if r["outcome"] == "skipped"]
    lines += ["", f"## Skipped ({len(skipped)})", ""]
    by_reason = Counter((r["aggregator"], r["detail"]) for r in skipped)
    lines += [f"- {n} × {agg}: {reason}" for (agg, reason), n in sorted(by_reason.items())] or ["none"]
    ignored = Counter(s for r in run for s in r.get("ignored_settings", []))
    lines += ["", "## Solver settings accepted and ignored", ""]
    lines += [f"- {n} test(s): {s}" for s, n in sorted(ignored.items())] or ["none"]
    lines += ["", f"## Not run in the gradagg pass ({len(dropped)} deselected)", ""]
    lines += [f"- {n} × {reason}" for reason, n in sorted(Counter(r["detail"] for r in dropped).items())]
    if ref is not None:
        rrun = [r for r in ref["records"] if r["outcome"] not in (None, "deselected")]
        total = Counter(r["outcome"] for r in rrun)
        ids = {r["nodeid"] for r in run}
        same = Counter(r["outcome"] for r in rrun if r["nodeid"] in ids)
        missing = len(ids - {r["nodeid"] for r in rrun})
        bad = [r for r in rrun if r["outcome"] in ("failed", "error", "xpassed")]
        lines += ["", "## Control: the same TorchJD tests with TorchJD's own classes", "",
                  f"- whole `{TEST_DIR}` directory: {sum(total.values())} tests, " +
                  ", ".join(f"{n} {k}" for k, n in sorted(total.items())) + f" (pytest exit code {ref['exit_code']})",
                  f"- the tests of the gradagg pass, by test id: {sum(same.values())} found, " +
                  ", ".join(f"{n} {k}" for k, n in sorted(same.items())) +
                  (f"; {missing} gradagg test id(s) have no TorchJD twin (ids are built from str(aggregator))"
                   if missing else "")]
        lines += [f"  - {r['outcome']}: `{r['nodeid']}`: {r['detail']}" for r in bad]
        lines += [f"- collection error (module not run): `{e}`" for e in ref.get("collection_errors", [])]
    return "\n".join(lines) + "\n"


def summary(ours: dict, ref: dict | None) -> str:
    run = [r for r in ours["records"] if r["outcome"] not in (None, "deselected")]
    c = Counter(r["outcome"] for r in run)
    text = (f"gradagg behind TorchJD's classes: {_ran(c)} ran, {c['passed']} passed, {c['failed']} failed, "
            f"{c['error']} errors, {c['skipped']} skipped")
    for r in run:
        if r["outcome"] in ("failed", "error", "xpassed"):
            text += f"\n  {r['outcome'].upper()} {r['nodeid']} [{r['property']}] {r['matrix']} {r['detail']}"
    if ref is not None:
        rc = Counter(r["outcome"] for r in ref["records"] if r["outcome"] not in (None, "deselected"))
        text += "\nTorchJD's own classes (whole aggregation test dir): " + ", ".join(
            f"{n} {k}" for k, n in sorted(rc.items()))
        text += "".join(f"\n  collection error: {e}" for e in ref.get("collection_errors", []))
    text += "".join(f"\n  collection error (gradagg pass): {e}" for e in ours.get("collection_errors", []))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchjd-src", required=True, help="checkout of TorchJD's repository (with tests/)")
    parser.add_argument("--report", default=None, help="Markdown report to write")
    parser.add_argument("--json", default=None, help="JSON file for every test's record")
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES),
                        help=f"comma-separated, from {', '.join(CATEGORIES)} (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="TorchJD's test dtype (PYTEST_TORCH_DTYPE)")
    parser.add_argument("--strict-options", action="store_true",
                        help="skip, rather than ignore, non-default settings of TorchJD's iterative solvers")
    parser.add_argument("--no-reference", action="store_true", help="skip the control run with TorchJD's classes")
    parser.add_argument("--child", choices=("gradagg", "torchjd"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    unknown = set(args.categories.split(",")) - set(CATEGORIES)
    if unknown:
        parser.error(f"unknown categories {sorted(unknown)}; choose from {CATEGORIES}")
    if not (Path(args.torchjd_src) / TEST_DIR).is_dir():
        parser.error(f"{Path(args.torchjd_src) / TEST_DIR} not found: --torchjd-src must be a TorchJD checkout")
    if args.child:
        return run_child(args)
    with tempfile.TemporaryDirectory() as tmp:
        ours = _spawn("gradagg", args, Path(tmp) / "gradagg.json")
        ref = None if args.no_reference else _spawn("torchjd", args, Path(tmp) / "torchjd.json")
    report = write_report(args, ours, ref)
    if args.report:
        Path(args.report).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"gradagg": ours, "torchjd": ref}, indent=1, default=str))
    print(summary(ours, ref))
    if args.report:
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
