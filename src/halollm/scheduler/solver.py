"""Placement as a pure function, solved as a mixed-integer program (scipy's HiGHS `milp`).

Variables: x[g, d] = 1 if group g runs on device d; t[l] = the time layer half l takes (the
slowest device's compute for its groups there). Minimise sum_l t[l] subject to

* every group on exactly one device;
* t[l] >= sum_g cost[g] * x[g, d] / speed[d] for every device d and layer half l;
* memory: sum_g cost[g] * x[g, d] <= memory[d];
* critical groups only on reliable devices (loss <= `reliable_loss`; device 0, the
  coordinator, is always reliable);
* expected significance lost per token, sum_g,d significance[g] * loss[d] * x[g, d], at most
  `max_lost_share` of the total.

Costs are in units (neurons, or KV heads weighted to neuron-equivalents by the caller); speed
in units per millisecond; memory in units.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from halollm.errors import HaloError


@dataclass(frozen=True)
class GroupSpec:
    half: int  # which layer half (a sync round) the group belongs to
    cost: float  # units of work and memory
    significance: float = 0.0  # expected significance (calibrated mean)
    critical: bool = False  # must sit on a reliable device


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    speed: float = 1.0  # units per millisecond
    memory: float = float("inf")  # units
    loss: float = 0.0  # packet loss rate of its link (each way)


@dataclass
class Solution:
    owner: list[int]  # device index per group
    objective_ms: float  # sum over layer halves of the slowest device's time
    solve_ms: float


def solve(groups: Sequence[GroupSpec], devices: Sequence[DeviceSpec],
          reliable_loss: float = 0.0, max_lost_share: float = 1.0,
          time_limit_s: float = 10.0) -> Solution:
    """The placement minimising the summed per-round makespan under the constraints above;
    HaloError if none exists (with the reason that is easiest to check)."""
    G, D = len(groups), len(devices)
    if D == 0 or G == 0:
        raise HaloError("nothing to place" if G == 0 else "no device to place groups on")
    _check_feasible(groups, devices, reliable_loss)
    halves = sorted({g.half for g in groups})
    hidx = {h: i for i, h in enumerate(halves)}
    H = len(halves)
    n = G * D + H  # x (row-major by group) then t

    def xi(g: int, d: int) -> int:
        return g * D + d

    c = np.zeros(n)
    c[G * D:] = 1.0
    lower, upper = np.zeros(n), np.ones(n)
    upper[G * D:] = np.inf
    for g, spec in enumerate(groups):
        for d, dev in enumerate(devices):
            if spec.critical and d != 0 and dev.loss > reliable_loss:
                upper[xi(g, d)] = 0.0
    rows: list[tuple[dict[int, float], float, float]] = []
    for g in range(G):  # each group exactly once
        rows.append(({xi(g, d): 1.0 for d in range(D)}, 1.0, 1.0))
    for h in halves:  # makespan per layer half
        members = [g for g, s in enumerate(groups) if s.half == h]
        for d, dev in enumerate(devices):
            coef = {xi(g, d): groups[g].cost / dev.speed for g in members}
            coef[G * D + hidx[h]] = -1.0
            rows.append((coef, -np.inf, 0.0))
    for d, dev in enumerate(devices):  # memory
        if np.isfinite(dev.memory):
            rows.append(({xi(g, d): s.cost for g, s in enumerate(groups)}, -np.inf,
                         dev.memory))
    total_sig = sum(s.significance for s in groups)
    if max_lost_share < 1.0 and total_sig > 0:
        coef = {xi(g, d): s.significance * dev.loss for g, s in enumerate(groups)
                for d, dev in enumerate(devices) if dev.loss > 0}
        if coef:
            rows.append((coef, -np.inf, max_lost_share * total_sig))
    A = lil_matrix((len(rows), n))
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    for r, (coef, a, b) in enumerate(rows):
        for j, v in coef.items():
            A[r, j] = v
        lo[r], hi[r] = a, b
    integrality = np.zeros(n)
    integrality[: G * D] = 1
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), bounds=Bounds(lower, upper),
               integrality=integrality, options={"time_limit": time_limit_s})
    solve_ms = 1e3 * (time.perf_counter() - t0)
    if res.x is None:
        raise HaloError(f"no placement satisfies the constraints ({res.message.strip()}); "
                        "relax the memory budgets, the reliability requirement or the "
                        "expected-loss bound")
    x = res.x[: G * D].reshape(G, D)
    return Solution(owner=[int(np.argmax(row)) for row in x], objective_ms=float(res.fun),
                    solve_ms=solve_ms)


def _check_feasible(groups: Sequence[GroupSpec], devices: Sequence[DeviceSpec],
                    reliable_loss: float) -> None:
    """The infeasibilities a user can fix, named before the solver runs."""
    total = sum(g.cost for g in groups)
    memory = sum(d.memory for d in devices)
    if memory < total:
        raise HaloError(f"the devices' memory ({memory:g} units) cannot hold the model's "
                        f"groups ({total:g} units)")
    reliable = [d for i, d in enumerate(devices) if i == 0 or d.loss <= reliable_loss]
    critical = sum(g.cost for g in groups if g.critical)
    room = sum(d.memory for d in reliable)
    if critical > room:
        raise HaloError(f"the critical groups ({critical:g} units) do not fit on the reliable "
                        f"devices ({room:g} units of memory)")
    for d in devices:
        if d.speed <= 0:
            raise HaloError(f"device {d.name}: speed must be positive")


def equal_split(groups: Sequence[GroupSpec], n_devices: int) -> list[int]:
    """distributed-llama style: every layer half's groups dealt out equally (round-robin) over
    all devices, the coordinator included, whatever their speed or link."""
    owner, turn = [], {}
    for g in groups:
        k = turn.get(g.half, 0)
        owner.append(k % n_devices)
        turn[g.half] = k + 1
    return owner


def memory_split(groups: Sequence[GroupSpec], devices: Sequence[DeviceSpec]) -> list[int]:
    """exo / llama.cpp style: each device gets work in proportion to its memory (devices
    without a declared budget count as the largest declared one)."""
    finite = [d.memory for d in devices if np.isfinite(d.memory)]
    cap = max(finite) if finite else 1.0
    weights = np.array([d.memory if np.isfinite(d.memory) else cap for d in devices], float)
    share = weights / weights.sum()
    owner: list[int] = []
    for h in sorted({g.half for g in groups}):
        members = [i for i, g in enumerate(groups) if g.half == h]
        given = np.zeros(len(devices))
        for _ in members:
            d = int(np.argmin((given + 1) / share))  # the most under-served device
            owner.append(d)
            given[d] += 1
    order = [i for h in sorted({g.half for g in groups})
             for i, g in enumerate(groups) if g.half == h]
    out = [0] * len(groups)
    for pos, i in enumerate(order):
        out[i] = owner[pos]
    return out
