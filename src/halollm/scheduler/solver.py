"""Placement as a pure function, solved as a mixed-integer program (scipy's HiGHS `milp`).

The groups of one layer half (a synchronisation round) are near-equal in cost, so the program
decides *how many* of them each device takes; which ones follows by an exchange argument: the
most significant (critical first) go to the most reliable devices, the least significant to
the lossiest links, which minimises the expected significance lost for those counts.

Variables, per layer half h and device d: n[h, d] groups (integer), u[h, d] = 1 if d takes
part in round h, t[h] = the round's time (its slowest device). Minimise sum_h t[h] (plus a
tie-break of at most a microsecond: fewer groups behind lossy links) subject to

* sum_d n[h, d] = groups in h, n[h, d] <= (groups in h) * u[h, d];
* t[h] >= n[h, d] * cost[h] / speed[d] + latency[d] * u[h, d] (latency: what taking part in
  a round costs besides compute -- the round trip and, for a lossy link, the expected wait
  for the deadline; for the coordinator, device 0, the fixed cost of computing any share);
* t[h] >= n[h, 0] * cost[h] / speed[0] + hub[0] * sum_{d > 0} u[h, d] + hub_round[0] *
  w[h]: the coordinator sends to, receives from and sums every worker taking part, one
  after the other (hub: its measured ms per worker and round; hub_round: what a round with
  any worker costs it besides, w[h] >= u[h, d] binary; on a slow or CPU-capped coordinator
  these, not compute, bound how many workers pay off);
* memory: sum_h n[h, d] * cost[h] <= memory[d] + e[d], where e[d] = 0 unless the device
  can stream groups from its model file (load_speed > 0: issue 7's loader), in which case
  the e[d] units beyond its budget are read again every token, and the token takes
  T >= sum_h t[h] + e[d] / load_speed[d] (loading counted as not overlapping compute: on
  small devices the loader shares the cores); the objective is then T;
* the critical groups of h fit on reliable devices (loss <= `reliable_loss`; the coordinator
  is always reliable);
* expected significance lost: the worst unreliable link's loss times the significance of
  the groups behind unreliable links (the least significant ones) is at most
  `max_lost_share` of h's total (a convex piecewise-linear bound, exact for one lossy
  device, conservative for several; the small losses of reliable links are not counted).

Costs are in units (neurons, or KV heads weighted to neuron-equivalents by the caller); speed
in units per millisecond; memory in units. Without memory budgets the halves are independent
and halves with the same shape share one solution (a model's 30 MLP halves are one small
program); with budgets one program covers all halves, and halves of one size share their
counts (every layer split alike: a restriction that keeps the program small enough to solve
between two tokens).
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
    loss: float = 0.0  # probability that its contribution to a round goes missing
    latency: float = 0.0  # ms a round costs when this device takes part, besides compute
    load_speed: float = 0.0  # units per ms it can stream beyond its memory (0: it cannot)
    hub_ms: float = 0.0  # the coordinator's (device 0's) own ms per worker in a round
    hub_round_ms: float = 0.0  # ... and per round with any worker, besides

    @property
    def streams(self) -> bool:
        return self.load_speed > 0 and bool(np.isfinite(self.memory))


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
    if not devices or not groups:
        raise HaloError("nothing to place" if not groups else "no device to place groups on")
    _check_feasible(groups, devices, reliable_loss)
    t0 = time.perf_counter()
    halves = [_Half.of(h, [i for i, g in enumerate(groups) if g.half == h], groups,
                       max_lost_share) for h in sorted({g.half for g in groups})]
    counts: dict[int, list[int]] = {}
    objective = 0.0
    if all(not np.isfinite(d.memory) for d in devices):
        # independent halves: one small program per distinct shape
        classes: dict[tuple, list[_Half]] = {}
        for half in halves:
            classes.setdefault(half.shape, []).append(half)
        for members in classes.values():
            n, ms = _solve_counts([members[:1]], devices, reliable_loss, time_limit_s)
            for half in members:
                counts[half.half] = n[0]
            objective += ms * len(members)
    else:
        # memory couples the halves: one program, the halves of one size sharing their
        # counts (the same split in every layer), each half's own loss bound kept
        by_size: dict[tuple, list[_Half]] = {}
        for half in halves:
            by_size.setdefault((len(half.members), half.cost, half.mean_cost), []).append(half)
        groups_of = list(by_size.values())
        n, objective = _solve_counts(groups_of, devices, reliable_loss, time_limit_s)
        for k, members in enumerate(groups_of):
            for half in members:
                counts[half.half] = n[k]
    owner = [0] * len(groups)
    by_reliability = sorted(range(len(devices)), key=lambda d: (d != 0, devices[d].loss, d))
    for half in halves:
        order = iter(half.members_by_significance(groups))
        for d in by_reliability:
            for _ in range(counts[half.half][d]):
                owner[next(order)] = d
    return Solution(owner=owner, objective_ms=objective,
                    solve_ms=1e3 * (time.perf_counter() - t0))


@dataclass(frozen=True)
class _Half:
    half: int
    members: tuple[int, ...]
    cost: float  # the largest group cost (memory is never under-counted)
    mean_cost: float
    critical: int
    tail: tuple[float, ...]  # significance sorted ascending, if the loss bound applies
    bound: float  # max significance lost (share x total)

    @staticmethod
    def of(h: int, members: list[int], groups: Sequence[GroupSpec], share: float) -> _Half:
        sig = sorted(groups[i].significance for i in members)
        costs = [groups[i].cost for i in members]
        active = share < 1.0 and sum(sig) > 0
        return _Half(h, tuple(members), max(costs), sum(costs) / len(costs),
                     sum(1 for i in members if groups[i].critical),
                     tuple(sig) if active else (), share * sum(sig))

    @property
    def shape(self) -> tuple:
        return (len(self.members), self.cost, self.mean_cost, self.critical, self.tail,
                round(self.bound, 12))

    def members_by_significance(self, groups: Sequence[GroupSpec]) -> list[int]:
        return sorted(self.members, key=lambda i: (not groups[i].critical,
                                                   -groups[i].significance, i))


Row = tuple[dict[int, float], float, float]  # (coefficients by variable, lower, upper)


@dataclass(frozen=True)
class _Vars:
    """The count program's variables: n[h, d], u[h, d], w[h], t[h], then (when some device
    streams) e[k] per streaming device and T."""

    H: int
    D: int
    n_streaming: int

    @property
    def count(self) -> int:
        return 2 * self.H * self.D + 2 * self.H + (self.n_streaming + 1 if self.n_streaming
                                                   else 0)

    def n(self, h: int, d: int) -> int:
        return h * self.D + d

    def u(self, h: int, d: int) -> int:
        return self.H * self.D + h * self.D + d

    def w(self, h: int) -> int:
        return 2 * self.H * self.D + h

    def t(self, h: int) -> int:
        return 2 * self.H * self.D + self.H + h

    def e(self, k: int) -> int:
        return 2 * self.H * self.D + 2 * self.H + k

    @property
    def big_t(self) -> int:
        return self.count - 1


def _solve_counts(classes: Sequence[Sequence[_Half]], devices: Sequence[DeviceSpec],
                  reliable_loss: float, time_limit_s: float) -> tuple[list[list[int]], float]:
    """Groups per device for each class of halves of one size, which share their counts
    (the program in the module docstring; the objective counts every half of a class)."""
    H, D = len(classes), len(devices)
    streaming = [d for d in range(D) if devices[d].streams]
    v = _Vars(H, D, len(streaming))
    c = np.zeros(v.count)
    lower, upper = np.zeros(v.count), np.ones(v.count)
    rows = _round_rows(classes, devices, reliable_loss, v, c, upper, bool(streaming))
    rows += _memory_rows(classes, devices, streaming, v)
    if streaming:
        rows += _streaming_rows(classes, devices, streaming, v, c, upper)
    x = _milp(c, rows, lower, upper, v.t(0), time_limit_s)  # t, e, T are continuous
    n = np.rint(x[: H * D]).astype(int).reshape(H, D)
    if streaming:
        return n.tolist(), float(x[v.big_t])
    t = x[v.t(0):v.t(0) + H]
    return n.tolist(), float(sum(t[h] * len(members) for h, members in enumerate(classes)))


def _round_rows(classes: Sequence[Sequence[_Half]], devices: Sequence[DeviceSpec],
                reliable_loss: float, v: _Vars, c: np.ndarray, upper: np.ndarray,
                streaming: bool) -> list[Row]:
    """Per class of halves: the counts' bounds and objective terms (set in c and upper),
    the groups all placed, each device's time in the round, critical groups on reliable
    devices and the bound on the significance behind lossy links."""
    reliable = [d for d in range(len(devices)) if d == 0 or devices[d].loss <= reliable_loss]
    lossy = [d for d in range(len(devices)) if d not in reliable]
    worst = max((devices[d].loss for d in lossy), default=0.0)
    rows: list[Row] = []
    for h, members in enumerate(classes):
        first = members[0]
        G, weight = len(first.members), len(members)
        c[v.t(h)] = 0.0 if streaming else weight
        upper[v.t(h)] = np.inf
        for d, dev in enumerate(devices):
            upper[v.n(h, d)] = G
            c[v.n(h, d)] = 1e-3 * weight * dev.loss / G  # tie-break: fewer behind lossy links
            rows.append(({v.n(h, d): 1.0, v.u(h, d): -float(G)}, -np.inf, 0.0))
            coef = {v.n(h, d): first.mean_cost / dev.speed, v.u(h, d): dev.latency,
                    v.t(h): -1.0}
            if d == 0:
                coef.update({v.u(h, k): dev.hub_ms for k in range(1, len(devices))})
                coef[v.w(h)] = dev.hub_round_ms
            else:
                rows.append(({v.u(h, d): 1.0, v.w(h): -1.0}, -np.inf, 0.0))
            rows.append((coef, -np.inf, 0.0))
        rows.append(({v.n(h, d): 1.0 for d in range(len(devices))}, G, G))
        critical = max(half.critical for half in members)
        if critical:
            rows.append(({v.n(h, d): 1.0 for d in reliable}, critical, np.inf))
        for half in members:
            if half.tail and lossy:
                # groups behind lossy links: the m least significant; worst * tailsum(m) <=
                # bound, tailsum convex and piecewise linear: one constraint per piece
                acc = 0.0
                for k, slope in enumerate(half.tail):
                    coef = {v.n(h, d): worst * slope for d in lossy}
                    rows.append((coef, -np.inf, half.bound - worst * (acc - slope * k)))
                    acc += slope
    return rows


def _memory_rows(classes: Sequence[Sequence[_Half]], devices: Sequence[DeviceSpec],
                 streaming: list[int], v: _Vars) -> list[Row]:
    """What each device with a budget holds fits it, beyond it the e[k] it streams."""
    rows: list[Row] = []
    for d, dev in enumerate(devices):
        if np.isfinite(dev.memory):
            coef = {v.n(h, d): members[0].cost * len(members)
                    for h, members in enumerate(classes)}
            if d in streaming:
                coef[v.e(streaming.index(d))] = -1.0
            rows.append((coef, -np.inf, dev.memory))
    return rows


def _streaming_rows(classes: Sequence[Sequence[_Half]], devices: Sequence[DeviceSpec],
                    streaming: list[int], v: _Vars, c: np.ndarray, upper: np.ndarray
                    ) -> list[Row]:
    """T (the objective, set in c) is at least the compute, plus each device's streaming."""
    compute = {v.t(h): float(len(members)) for h, members in enumerate(classes)}
    c[v.big_t], upper[v.big_t] = 1.0, np.inf
    rows: list[Row] = [({**compute, v.big_t: -1.0}, -np.inf, 0.0)]
    for k, d in enumerate(streaming):
        upper[v.e(k)] = np.inf
        rows.append(({**compute, v.e(k): 1.0 / devices[d].load_speed, v.big_t: -1.0},
                     -np.inf, 0.0))
    return rows


def _milp(c: np.ndarray, rows: list[Row], lower: np.ndarray, upper: np.ndarray,
          n_integers: int, time_limit_s: float) -> np.ndarray:
    """The solution of the program (the first `n_integers` variables integer)."""
    A = lil_matrix((len(rows), len(c)))
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    for r, (coef, a, b) in enumerate(rows):
        for j, value in coef.items():
            A[r, j] = value
        lo[r], hi[r] = a, b
    integrality = np.ones(len(c))
    integrality[n_integers:] = 0
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), bounds=Bounds(lower, upper),
               integrality=integrality, options={"time_limit": time_limit_s})
    if res.x is None:
        raise HaloError(f"no placement satisfies the constraints ({res.message.strip()}); "
                        "relax the memory budgets, the reliability requirement or the "
                        "expected-loss bound")
    return res.x


def makespan(groups: Sequence[GroupSpec], devices: Sequence[DeviceSpec],
             owner: Sequence[int]) -> float:
    """The objective of a given placement (sum over rounds of the slowest device's compute
    plus latency -- the coordinator's plus its hub work per worker taking part --, plus the
    longest streaming of weights beyond a memory budget): how the
    scheduler compares the current plan with a new one."""
    load: dict[tuple[int, int], float] = {}
    held = [0.0] * len(devices)
    for g, d in zip(groups, owner, strict=True):
        load[(g.half, d)] = load.get((g.half, d), 0.0) + g.cost / devices[d].speed
        held[d] += g.cost
    per_half: dict[int, float] = {}
    workers: dict[int, int] = {}  # per half: the workers taking part
    for (h, d), ms in load.items():
        per_half[h] = max(per_half.get(h, 0.0), ms + devices[d].latency)
        workers[h] = workers.get(h, 0) + (d != 0)
    for h, n in workers.items():  # the coordinator's own time: compute and its hub work
        hub = devices[0].hub_ms * n + (devices[0].hub_round_ms if n else 0.0)
        own = load[(h, 0)] + devices[0].latency if (h, 0) in load else 0.0
        per_half[h] = max(per_half[h], own + hub)
    streaming = max((max(0.0, held[d] - dev.memory) / dev.load_speed
                     for d, dev in enumerate(devices) if dev.streams), default=0.0)
    return sum(per_half.values()) + streaming


def _check_feasible(groups: Sequence[GroupSpec], devices: Sequence[DeviceSpec],
                    reliable_loss: float) -> None:
    """The infeasibilities a user can fix, named before the solver runs."""
    total = sum(g.cost for g in groups)
    memory = sum(np.inf if d.streams else d.memory for d in devices)
    if memory < total:
        raise HaloError(f"the devices' memory ({memory:g} units) cannot hold the model's "
                        f"groups ({total:g} units)")
    reliable = [d for i, d in enumerate(devices) if i == 0 or d.loss <= reliable_loss]
    critical = sum(g.cost for g in groups if g.critical)
    room = sum(np.inf if d.streams else d.memory for d in reliable)
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
