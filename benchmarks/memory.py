"""Memory and time of one training step: the plain backward, the Jacobian, gradagg and TorchJD's autogram.

    python -m benchmarks.memory [--out DIR] [--repeats N] [--device cpu|cuda] [--models mtl,iwrm]
                                [--paths plain,jacobian,gradagg,torchjd] [--smoke]

Two seeded float32 models (see ``Case``):
- MTL: an MLP trunk Linear(256, 1024)-ReLU-Linear(1024, 1024)-ReLU-Linear(1024, 1024)-ReLU and K = 32
  heads Linear(1024, 16), batch 128, 2,887,168 parameters; task k's loss is the MSE of head k
  against random targets (losses [32]);
- IWRM: a small CNN on 32x32 RGB images, Conv2d(3, 32, 3, padding=1)-ReLU-MaxPool2-Conv2d(32, 64, 3,
  padding=1)-ReLU-MaxPool2-Flatten-Linear(4096, 128)-ReLU-Linear(128, 10) (no BatchNorm: no layer
  mixes the examples), batch 64, 545,098 parameters, one cross-entropy loss per example (losses [64]).

Paths, each one full training step (forward included) that ends with every parameter's ``.grad``
filled; zeroing the gradients (``.grad = None``) is outside the step:
- plain: ``losses.sum().backward()``, the floor;
- jacobian: the Jacobian with torch.func (the recipe in ``jacobian_step``), then
  ``gradagg.aggregate(jac, "upgrad")`` and ``gradagg.set_grad``;
- gradagg: ``gradagg.backward(losses, model, "upgrad"[, batch_dim=0])``: the Gramian without the
  Jacobian, the weights, one weighted backward pass;
- torchjd: TorchJD's autogram ``Engine(model, batch_dim=None | 0)``, built once outside the step,
  with ``UPGradWeighting``: ``losses.backward(UPGradWeighting()(engine.compute_gramian(losses)))``.

Every (model, path) runs in fresh processes (``--worker``), one for its time and one for its
memory, so that no path inherits another's allocator state or hooks. Each runs one warm-up step
(the allocator, the caches, torch.func's and the engine's first call), then:
- time: ``--repeats`` steps, each timed (CUDA: synchronized before and after); the table gives
  the median;
- memory: up to 3 steps; for each, the peak during the step minus what was in use just before
  it, and the table gives the largest. CPU: the resident set size, the peak being VmHWM of
  /proc/self/status after the kernel's high-water mark was reset by writing "5" to
  /proc/self/clear_refs (where that file is not writable: the process's lifetime peak from
  getrusage, which cannot be reset; the notes say so). glibc's malloc keeps freed blocks of up
  to 32 MiB resident in its heap (its mmap threshold grows with the blocks freed), so a step
  would reuse pages that the step before left resident and its peak would miss them (the same
  plain step then read between 4 and 22 MiB), and setting malloc otherwise in the middle of a
  process left the readings high and uneven: the memory process fixes malloc's mmap threshold at
  64 KiB (``mallopt``) before it builds the model and trims the heap (``malloc_trim``) before
  each step, so that the RSS follows the bytes in use (plain MTL: 11.7 MiB every time, the 11.0
  MiB of gradients and the activations). Its steps are not timed: that setting costs page faults
  (it made the per-example Jacobian 15 times slower). CUDA: ``max_memory_allocated`` during the
  step minus ``memory_allocated`` before it.
Memory is in MiB (2^20 bytes). The table's ratios are against the plain backward and against the
Jacobian path, for the extra memory and the median time; "cos" is the cosine between the path's
gradient and the Jacobian path's (both are UPGrad of the same Jacobian, so it should be ~1).
With ``--out DIR`` it writes memory.md and memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradagg

MODELS = ["mtl", "iwrm"]
PATHS = ["plain", "jacobian", "gradagg", "torchjd"]
MIB = 2**20


class Unavailable(Exception):
    """The path cannot run here (an API that does not exist yet, a package that is not installed)."""


# ----------------------------------------------------------------------------------------------
# Models


class MTLNet(nn.Module):
    """A shared MLP trunk and K linear heads; forward returns the heads' outputs stacked, [K, B, out]."""

    def __init__(self, d_in: int, width: int, k: int, d_out: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.stack([head(z) for head in self.heads])


def small_cnn(channels: tuple[int, int], hidden: int, image: int, classes: int) -> nn.Module:
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (image // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class Case:
    """A model, its batch and its losses function ``losses(output) -> [K]``."""

    def __init__(self, name: str, smoke: bool, device: torch.device):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        self.name = name
        if name == "mtl":
            d_in, width, k, d_out, batch = (32, 128, 4, 4, 16) if smoke else (256, 1024, 32, 16, 128)
            self.model = MTLNet(d_in, width, k, d_out)
            self.x = torch.randn(batch, d_in, generator=gen)
            self.target = torch.randn(k, batch, d_out, generator=gen)
            self.batch_dim = None
        elif name == "iwrm":
            channels, hidden, image, batch, classes = ((8, 16), 32, 16, 8, 10) if smoke else ((32, 64), 128, 32, 64, 10)
            self.model = small_cnn(channels, hidden, image, classes)
            self.x = torch.randn(batch, 3, image, image, generator=gen)
            self.target = torch.randint(0, classes, (batch,), generator=gen)
            self.batch_dim = 0
        else:
            raise ValueError(f"unknown model {name!r}; known: {MODELS}")
        self.model.to(device)
        self.x, self.target = self.x.to(device), self.target.to(device)
        self.k = len(self.losses(self.model(self.x)))
        self.params = sum(p.numel() for p in self.model.parameters())

    def losses(self, out: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = self.target if target is None else target
        if self.name == "mtl":
            return ((out - target) ** 2).mean(dim=(1, 2))  # the MSE of each head: [K]
        return F.cross_entropy(out, target, reduction="none")  # one loss per example: [B]


# ----------------------------------------------------------------------------------------------
# Paths: each returns step() -> None, one training step that leaves the gradients in .grad.


def plain_step(case: Case):
    def step():
        case.losses(case.model(case.x)).sum().backward()

    return step


def jacobian_step(case: Case, how: str = "auto"):
    """The Jacobian by torch.func, then UPGrad on it; ``how`` says which torch.func recipe.

    - "over_k": ``vmap(grad(loss_k), in_dims=(None, 0))`` over k = arange(K). The forward does not
      depend on k, so vmap runs it once and batches only the K backward passes.
    - "jacrev": ``torch.func.jacrev`` of the K losses: the same work.
    - "per_example" (IWRM only): the per-example gradients ``vmap(grad(loss_i), in_dims=(None, 0, 0))``
      over the examples, each a batch of one: the same Jacobian, since no layer mixes the
      examples, without K backward passes through the whole batch.
    - "auto", the default: the strongest baseline measured on a 2-core CPU. MTL: "jacrev" (as
      fast as "over_k", 0.4-0.5 s, with 370 MiB extra against 418 MiB). IWRM: "per_example"
      (0.1 s and 174 MiB extra, against 2.0 s and 1.9 GiB for "over_k", 1.7 s and 1.7 GiB for
      "jacrev").
    """
    from torch.func import functional_call, grad, jacrev, vmap

    model = case.model
    if how == "auto":
        how = "per_example" if case.name == "iwrm" else "jacrev"
    if how == "per_example":
        if case.name != "iwrm":
            raise ValueError("per-example gradients are the Jacobian only where each loss is one example's")

        def loss_i(p, xi, yi):
            return case.losses(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

        per_example = vmap(grad(loss_i), in_dims=(None, 0, 0))

        def jacobian(params):
            return per_example(params, case.x, case.target)
    elif how == "over_k":
        def loss_k(p, k):  # losses[k], written so that vmap can batch k
            return case.losses(functional_call(model, p, (case.x,))).index_select(0, k.reshape(1))[0]

        over_k = vmap(grad(loss_k), in_dims=(None, 0))
        ks = torch.arange(case.k, device=case.x.device)

        def jacobian(params):
            return over_k(params, ks)
    elif how == "jacrev":
        all_losses = jacrev(lambda p: case.losses(functional_call(model, p, (case.x,))))

        def jacobian(params):
            return all_losses(params)
    else:
        raise ValueError(f"unknown Jacobian recipe {how!r}")

    def step():
        params = {n: p.detach() for n, p in model.named_parameters()}
        gradagg.set_grad(model, gradagg.aggregate(jacobian(params), "upgrad"))

    return step


def gradagg_step(case: Case):
    options = {} if case.batch_dim is None else {"batch_dim": case.batch_dim}

    def step():
        gradagg.backward(case.losses(case.model(case.x)), case.model, "upgrad", **options)

    return step


def torchjd_step(case: Case):
    try:
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine
    except ImportError as exc:
        raise Unavailable(f"torchjd not importable ({exc})") from exc
    engine = Engine(case.model, batch_dim=case.batch_dim)  # hooks the modules once, as a user would
    weighting = UPGradWeighting()

    def step():
        losses = case.losses(case.model(case.x))
        losses.backward(weighting(engine.compute_gramian(losses)))

    return step


STEPS = {"plain": plain_step, "jacobian": jacobian_step, "gradagg": gradagg_step, "torchjd": torchjd_step}


# ----------------------------------------------------------------------------------------------
# Measurement (in the worker)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


class CPUMemory:
    """Peak RSS of a step minus the RSS before it."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        self.notes = []
        self.libc = _libc()
        try:
            self._reset_hwm()
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "getrusage lifetime peak (no reset: clear_refs unavailable)"
            self.notes.append("clear_refs unavailable: memory is the lifetime peak minus RSS, an underestimate")

    def prepare(self) -> None:
        """At the start of a memory process: every block of 64 KiB or more in a mapping of its own,
        unmapped when freed (a fixed threshold also stops glibc from raising it as blocks are
        freed), so that the RSS follows the bytes in use."""
        if self.libc is None:
            self.notes.append("no glibc malloc: freed memory may stay resident")
            return
        if not (self.libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024) and self.libc.mallopt(self.M_TRIM_THRESHOLD,
                                                                                           128 * 1024)):
            self.notes.append("mallopt failed: malloc may keep freed memory resident")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def before(self) -> int:
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        rss = self._status("VmRSS")
        if self.method.startswith("VmHWM"):
            self._reset_hwm()
        return rss

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return self._status("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CUDAMemory:
    method = "cuda max_memory_allocated"

    def __init__(self):
        self.notes: list[str] = []

    def prepare(self) -> None:
        pass

    def before(self) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).cpu()
                      for p in model.parameters()])


def measure(model_name: str, path: str, phase: str, repeats: int, device: torch.device, smoke: bool,
            grad_file: str | None = None, jacobian: str = "auto") -> dict:
    """One phase of a (model, path), in this process: "time" (``repeats`` timed steps; the gradient
    of the warm-up step goes to ``grad_file``) or "memory" (up to 3 steps, the largest extra)."""
    meter = None
    if phase == "memory":
        meter = CUDAMemory() if device.type == "cuda" else CPUMemory()
        meter.prepare()  # before the model is built: the allocator's setting applies to every block
    case = Case(model_name, smoke, device)
    row = {"model": model_name, "path": path, "K": case.k, "params": case.params, "device": device.type}

    def zero():
        for p in case.model.parameters():
            p.grad = None

    try:
        step = STEPS[path](case, jacobian) if path == "jacobian" else STEPS[path](case)
        step()  # warm-up: the allocator, the caches, torch.func's and the engine's first call
    except Unavailable as exc:
        row.update(status="n/a", reason=str(exc)[:200])
        return row
    if grad_file:
        torch.save(flat_grad(case.model), grad_file)
    zero()
    if meter is not None:
        extras = []
        for _ in range(max(1, min(repeats, 3))):
            base = meter.before()
            step()
            extras.append(meter.peak() - base)
            zero()
        row.update(status="ok", extras_bytes=extras, extra_bytes=max(extras), mem_method=meter.method,
                   notes=meter.notes)
        return row
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        zero()
    row.update(status="ok", times_s=times, median_s=statistics.median(times))
    return row


# ----------------------------------------------------------------------------------------------
# Parent: one process per (model, path), then the table.


def run_worker(model: str, path: str, phase: str, args, grad_file: str | None = None) -> dict:
    """Runs one phase of a (model, path) in a fresh interpreter; its last line of output is the row, as JSON."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", model, path, phase, "--repeats", str(args.repeats),
           "--device", args.device, "--jacobian", args.jacobian]
    cmd += (["--grad-file", grad_file] if grad_file else []) + (["--smoke"] if args.smoke else [])
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "path": path, "status": "error",
                "reason": f"{phase}: timed out after {args.timeout:g} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"model": model, "path": path, "status": "error",
                "reason": f"{phase}: rc={proc.returncode}: {tail[0]}"[:300]}
    return json.loads(lines[-1])


def run_pair(model: str, path: str, args, grad_file: str) -> dict:
    """The row of a (model, path): its time and its memory, each from a fresh process."""
    timed = run_worker(model, path, "time", args, grad_file)
    if timed["status"] != "ok":
        return timed
    memory = run_worker(model, path, "memory", args)
    if memory["status"] != "ok":
        return memory
    return {**timed, **memory}


def add_ratios(rows: list[dict], grads: dict) -> None:
    by = {(r["model"], r["path"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        for ref in ("plain", "jacobian"):
            other = by.get((r["model"], ref))
            if other and other["status"] == "ok":
                r[f"mem_vs_{ref}"] = r["extra_bytes"] / other["extra_bytes"] if other["extra_bytes"] > 0 else None
                r[f"time_vs_{ref}"] = r["median_s"] / other["median_s"]
        g, j = grads.get((r["model"], r["path"])), grads.get((r["model"], "jacobian"))
        if g is not None and j is not None and r["path"] != "plain":
            r["cos_vs_jacobian"] = float(F.cosine_similarity(g.double(), j.double(), dim=0))


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}M" if n >= 10**5 else str(n)


def table(rows: list[dict]) -> str:
    head = ("| model | path | K | params | extra MiB | time ms | extra ×plain | time ×plain | extra ×jacobian "
            "| time ×jacobian | cos vs jacobian |")
    lines = [head, "|" + "---|" * 11]
    ratio = lambda x: f"{x:.2f}" if x is not None else "–"  # noqa: E731
    for r in rows:
        k, params = r.get("K", "–"), _count(r.get("params"))
        if r["status"] != "ok":
            what = "n/a (not available)" if r["status"] == "n/a" else "error"
            lines.append(f"| {r['model']} | {r['path']} | {k} | {params} | {what} | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {r['model']} | {r['path']} | {k} | {params} | {r['extra_bytes'] / MIB:.1f} | "
            f"{r['median_s'] * 1e3:.1f} | {ratio(r.get('mem_vs_plain'))} | {ratio(r.get('time_vs_plain'))} | "
            f"{ratio(r.get('mem_vs_jacobian'))} | {ratio(r.get('time_vs_jacobian'))} | "
            f"{ratio(r.get('cos_vs_jacobian'))} |")
    return "\n".join(lines)


def describe_machine(device: str) -> str:
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"- {r['model']}/{r['path']}: {r['status']}: {r.get('reason', '')}")
    methods = sorted({r["mem_method"] for r in rows if "mem_method" in r})
    out.append(f"- memory: {', '.join(methods)}")
    out.extend(sorted({f"- {n}" for r in rows for n in r.get("notes", [])}))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--smoke", action="store_true", help="tiny models and 2 repeats, for a test")
    parser.add_argument("--jacobian", default="auto", choices=["auto", "over_k", "jacrev", "per_example"],
                        help="the torch.func recipe of the jacobian path (see jacobian_step)")
    parser.add_argument("--machine", help="a name for the machine, written before its description")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "PATH", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--grad-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    if args.worker:
        row = measure(*args.worker, args.repeats, torch.device(args.device), args.smoke, args.grad_file,
                      args.jacobian)
        print(json.dumps(row), flush=True)
        return [row]

    rows, grads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for path in args.paths.split(","):
                grad_file = str(Path(tmp) / f"{model}-{path}.pt")
                row = run_pair(model, path, args, grad_file)
                rows.append(row)
                if row["status"] == "ok" and os.path.exists(grad_file):
                    grads[(model, path)] = torch.load(grad_file)
                done = f"{row['median_s'] * 1e3:.1f} ms" if row["status"] == "ok" else row["status"]
                print(f"{model}/{path}: {done}", file=sys.stderr, flush=True)
    add_ratios(rows, grads)
    machine = (args.machine + ": " if args.machine else "") + describe_machine(args.device)
    for row in rows:
        row["machine"] = machine
    text = (f"{machine}; time: median of {args.repeats} steps after a warm-up; extra: peak memory of a step "
            f"minus memory in use before it, MiB = 2^20 bytes; each (model, path) in its own process.\n\n"
            f"{table(rows)}\n\n" + "\n".join(notes(rows)))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.md").write_text(text + "\n")
        (args.out / "memory.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
