"""The web page's status report (serve/status.py), from a coordinator report as
`Coordinator.sync_json` gives it (pure, fast): devices and their states, totals, events
stamped once, per-step latencies lined up with the coordinator's per-token waits."""

from __future__ import annotations

from types import SimpleNamespace

from halollm.serve.status import Status


def _sync(alive: bool, takeovers: list[dict]) -> dict:
    worker = {"address": "10.0.0.2:7000", "alive": alive, "groups": 0 if takeovers else 40,
              "profile": {"speed_neurons_per_ms": 900.0, "memory_bytes": 1 << 30,
                          "miss_rate": 0.05, "delay_ms": 1.2, "rounds": 100, "missed": 5},
              "reported": {"repaired_positions": 3, "rounds": 100}}
    other = {**worker, "address": "10.0.0.3:7000", "alive": True, "groups": 40}
    return {"mode": "relaxed", "wire": "fp16", "rounds": 100, "expected": 200,
            "received": 190, "late": 2, "lost": 10, "loss_rate": 0.05, "critical_waits": 1,
            "fallbacks": 1, "recomputed": 0, "repairs_served": 3, "deadline_ms": 2.0,
            "waited_ms_per_token": 0.5, "takeovers": takeovers, "rejoins": [],
            "workers": [worker, other],
            "placement": {"policy": "halo", "groups_per_device": [400, 0 if takeovers else 40,
                                                                  40],
                          "replans": [{"position": 0, "reason": "initial",
                                       "groups_per_device": [400, 40, 40]}]},
            "per_token": [{"pos": i, "waited_ms": i / 10} for i in range(5)]}


def test_status_reports_devices_events_and_latency():
    report = {"sync": _sync(True, [])}
    engine = SimpleNamespace(busy=False, waiting=0, max_queue=16, finished=1, cancelled=0,
                             steps=5)
    status = Status(engine, "m", lambda: report["sync"],  # type: ignore[arg-type]
                    lambda: {"speed_neurons_per_ms": 0.0, "memory_bytes": 2 << 30})
    status.on_step(40.0, 12, 1)  # a prefill, then four decoded tokens
    for ms in (10.0, 11.0, 12.0, 13.0):
        status.on_step(ms, 1, 1)
    s = status._build()
    assert [d["state"] for d in s["devices"]] == ["alive", "alive", "alive"]
    coordinator, w = s["devices"][0], s["devices"][1]
    assert coordinator["groups"] == 400 and coordinator["speed"] is None
    assert coordinator["memory_bytes"] == 2 << 30
    assert w["link"] == {"miss_rate": 0.05, "round_trip_ms": 1.2, "rounds": 100, "missed": 5}
    assert w["speed"] == 900.0 and w["repairs"] == 3
    assert s["cluster"]["policy"] == "halo" and s["cluster"]["replans"] == 0
    assert [r["waited_ms"] for r in s["latency"]] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert round(s["speed"]["tokens_per_s"]) == round(4000 / 46)
    first = s["events"]
    assert [e["kind"] for e in first] == ["replan"] and "initial plan" in first[0]["text"]

    report["sync"] = _sync(False, [{"worker": "10.0.0.2:7000", "reason": "no heartbeat",
                                    "position": 9, "groups": 40, "ms": 120.0}])
    s = status._build()
    assert [d["state"] for d in s["devices"]] == ["alive", "taken over", "alive"]
    assert [e["kind"] for e in s["events"]] == ["replan", "takeover"]
    assert s["events"][0]["t"] == first[0]["t"]  # stamped when first seen, not again
    assert "took over its 40 groups" in s["events"][1]["text"]
    assert s["cluster"]["takeovers"] == 1


def test_single_device_status_has_no_cluster():
    engine = SimpleNamespace(busy=True, waiting=2, max_queue=16, finished=0, cancelled=0,
                             steps=0)
    s = Status(engine, "m", None)._build()  # type: ignore[arg-type]
    assert s["cluster"] is None and s["events"] == [] and s["latency"] == []
    assert [d["role"] for d in s["devices"]] == ["single"]
    assert s["engine"]["queue"] == 2 and s["speed"]["tokens_per_s"] is None
