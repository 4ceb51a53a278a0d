"""The old hook-based module's configuration records, mapped onto ``aggregate`` calls.

The VAMBN / impartial-vaes "MOO" layer read a list of records such as
``[{"name": "pcgrad"}, {"name": "nsgd", "update_at": 1}]`` and applied them in order as per-task
transforms before summing. ``from_config`` turns that list into a chain with the same defaults.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._api import init
from ._registry import lookup


class Config(NamedTuple):
    """What ``aggregate`` needs: ``aggregate(jac, cfg.method, state=cfg.state)``."""

    method: Any
    state: Any


# The old module's defaults, and how its record keys map onto gradagg's options.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "nsgd": {"update_at": 1},
    "gradnorm": {"update_at": 1, "alpha": 1.0},
    "gradnorm_loss": {"update_at": 1, "alpha": 1.0},
    "cagrad": {"c": 10.0},
}
_RENAMED: dict[str, dict[str, str]] = {"cagrad": {"alpha": "c"}}


def _record_options(name: str, record: dict[str, Any], k: int) -> dict[str, Any]:
    given = {key: value for key, value in record.items() if key != "name"}
    given = {_RENAMED.get(name, {}).get(key, key): value for key, value in given.items()}
    options = {**_DEFAULTS.get(name, {}), **given}
    if name == "graddrop":
        options.setdefault("leakage", [0.2] * k)
    return options


def from_config(records: list[dict[str, Any]], num_tasks: int, *, device: torch.device | str | None = None
                ) -> Config:
    """Maps the old module's list of records onto a gradagg chain and its fresh state.

    Each record is ``{"name": ..., **options}``; "update_at" and "alpha" keep their meaning, except
    that CAGrad's "alpha" is its ``c``. Defaults follow the old module: nsgd ``update_at=1``;
    gradnorm ``update_at=1, alpha=1.0``; cagrad ``c=10``; graddrop leakage 0.2 for every task. An
    empty list is the identity (the plain sum). Unknown names or keys raise ValueError.
    """
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"records must be a list of dicts, got {type(records).__name__}")
    if not records:
        return Config("identity", None)
    chain = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "name" not in record:
            raise ValueError(f"record {i} must be a dict with a 'name', got {record!r}")
        method = lookup(record["name"])
        chain.append((method.name, _record_options(method.name, record, num_tasks)))
    if any(not lookup(name).is_weighting for name, _ in chain[:-1]):
        raise ValueError("graddrop and trimmed_mean act per coordinate and can only be the last record")
    spec = tuple(chain)
    stateful = any(lookup(name).stateful for name, _ in chain)
    return Config(spec, init(spec, num_tasks, device=device) if stateful else None)
