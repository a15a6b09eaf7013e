"""`halo bench peer`'s pure parts (no peers, no network): the parsers of distributed-llama's
and llama-bench's output, on output captured from the real programs, the interleaved plan,
the medians and the tables."""

from __future__ import annotations

import json

import pytest

from halollm.bench import peer_report as rep
from halollm.errors import HaloError

# `dllama inference --steps 8 --prompt Hello --workers 127.0.0.1:9991` (distributed-llama
# 8d624a7, the m1024 test model converted to q40), from "Network is initialized" on
DLLAMA_2_NODES = """\
⭕ Network is initialized
🧠 CPU: avx2 avx512f
💿 Loading weights...
💿 Weights loaded
🚁 Network is in non-blocking mode
Hello
🔷️ Eval   36 ms Sync   58 ms | Sent   152 kB Recv   520 kB | (4 tokens)
🔶 Pred   23 ms Sync    0 ms | Sent    38 kB Recv   130 kB |  unborn
🔶 Pred   21 ms Sync    0 ms | Sent    38 kB Recv   130 kB |  unborn
🔶 Pred   18 ms Sync    5 ms | Sent    38 kB Recv   130 kB |  unborn
🔶 Pred   17 ms Sync    0 ms | Sent    38 kB Recv   130 kB |  Asia

Evaluation
   nBatches: 32
    nTokens: 4
   tokens/s: 42.29 (23.65 ms/tok)
Prediction
    nTokens: 4
   tokens/s: 45.92 (21.78 ms/tok)
⭕ Network is closed
"""

# the same model alone, a 24-character prompt (23 evaluated tokens), --steps 24
DLLAMA_ALONE = """\
The capital of France is
🔷️ Eval  657 ms Sync    0 ms | Sent     0 kB Recv     0 kB | (23 tokens)
🔶 Pred   86 ms Sync    0 ms | Sent     0 kB Recv     0 kB |  bases

Evaluation
   nBatches: 32
    nTokens: 23
   tokens/s: 34.99 (28.58 ms/tok)
Prediction
    nTokens: 1
   tokens/s: 11.53 (86.71 ms/tok)
"""

# `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -p 0 -n 16 -t 1 -r 1 -o json` (the
# llama.cpp vendored by llama-cpp-python 0.3.35), fields trimmed
LLAMA_BENCH_JSON = """\
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_type": "llama 256M Q4_1",
    "n_threads": 1,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 0,
    "avg_ns": 201670019,
    "stddev_ns": 0,
    "avg_ts": 79.337524,
    "stddev_ts": 0.000000,
    "samples_ns": [ 201670019 ],
    "samples_ts": [ 79.3375 ]
  }
]
"""


def test_dllama_summary_is_the_mean_and_lines_give_the_median():
    d = rep.parse_dllama(DLLAMA_2_NODES)
    assert d["ms_per_token"] == 21.78 and d["tokens_per_s"] == 45.92
    assert d["pred_tokens"] == 4 and d["eval_tokens"] == 4
    assert d["per_token_ms"] == [23, 21, 23, 17]  # Pred + Sync, not the Eval line
    assert d["median_ms_per_token"] == 22
    alone = rep.parse_dllama(DLLAMA_ALONE)
    assert (alone["ms_per_token"], alone["pred_tokens"], alone["eval_tokens"]) == \
        (86.71, 1, 23)


def test_dllama_without_summary_is_an_error():
    died = DLLAMA_2_NODES.split("Evaluation")[0]
    with pytest.raises(HaloError, match="no 'Prediction"):
        rep.parse_dllama(died)


def test_llama_bench_json():
    (t,) = rep.parse_llama_bench("ggml noise on stdout\n" + LLAMA_BENCH_JSON)
    assert t["threads"] == 1 and t["n_gen"] == 16
    assert t["ms_per_token"] == pytest.approx(1e3 / 79.337524)
    assert t["model_type"] == "llama 256M Q4_1"


def test_llama_bench_skips_prompt_tests_and_refuses_non_json():
    tests = json.loads(LLAMA_BENCH_JSON)
    pp = {**tests[0], "n_prompt": 512, "n_gen": 0, "avg_ts": 1000.0}
    only_pp = json.dumps([pp])
    with pytest.raises(HaloError, match="no text-generation"):
        rep.parse_llama_bench(only_pp)
    assert len(rep.parse_llama_bench(json.dumps([pp, tests[0]]))) == 1
    with pytest.raises(HaloError, match="-o json"):
        rep.parse_llama_bench("| model | size | test | t/s |")


def test_plan_interleaves_dllama_first_and_one_node_once():
    runs = rep.plan([1, 2, 4], ["0", "mixed"], ["strict", "halo"], repeats=2)
    first = [(r.nodes, r.loss, r.system) for r in runs if r.repeat == 1]
    assert first == [(1, "-", "dllama"), (1, "-", "halo-generate"),
                     (2, "0", "dllama"), (2, "0", "strict"), (2, "0", "halo"),
                     (2, "mixed", "dllama"), (2, "mixed", "strict"), (2, "mixed", "halo"),
                     (4, "0", "dllama"), (4, "0", "strict"), (4, "0", "halo"),
                     (4, "mixed", "dllama"), (4, "mixed", "strict"), (4, "mixed", "halo")]
    assert [r.repeat for r in runs] == [1] * 14 + [2] * 14  # whole repeats, in turn


def test_lossy_links():
    assert [rep.lossy_workers(w, "mixed") for w in (1, 3, 7)] == [1, 1, 3]
    assert rep.lossy_workers(7, "0.05") == 7 and rep.lossy_workers(7, "0") == 0
    assert rep.loss_rate("mixed") == 0.05 and rep.loss_rate("0.1") == 0.1


def _res(nodes, loss, system, ms=None, error=None):
    r = {"nodes": nodes, "loss": loss, "system": system}
    if error:
        r["error"] = error
    else:
        r["ms_per_token"] = ms
    return r


def test_medians_over_repeats_keep_failures():
    results = [_res(2, "0", "dllama", 30.0), _res(2, "0", "strict", 50.0),
               _res(2, "0", "dllama", 10.0), _res(2, "0", "strict", error="timed out"),
               _res(2, "0", "dllama", 20.0), _res(2, "0", "strict", 70.0)]
    rows = rep.medians(results)
    assert [(r["system"], r["ms_per_token"], r["runs"], r["of"]) for r in rows] == \
        [("dllama", 20.0, 3, 3), ("strict", 60.0, 2, 3)]
    assert rows[1]["error"] == "timed out" and "error" not in rows[0]


def test_dllama_table():
    results = [_res(1, "-", "dllama", 24.0), _res(1, "-", "halo-generate", 30.0),
               _res(2, "0.05", "dllama", 100.0), _res(2, "0.05", "strict", 200.0),
               _res(2, "0.05", "halo", 40.0), _res(2, "0.05", "halo", error="x"),
               _res(2, "0.05", "halo", 60.0)]
    lines = rep.dllama_table(rep.medians(results), ["strict", "halo"])
    assert lines[0] == "| nodes | loss | dllama | HALO strict | HALO halo | dllama / best HALO |"
    assert lines[2] == "| 1 | - | 24.0 | 30.0 | – | 0.80x |"
    assert lines[3] == "| 2 | 0.05 | 100.0 | 200.0 | 50.0 (2/3) | 2.00x |"


def test_dllama_table_failed_peer():
    lines = rep.dllama_table(rep.medians([_res(2, "0", "dllama", error="no worker"),
                                          _res(2, "0", "strict", 50.0)]), ["strict"])
    assert lines[2] == "| 2 | 0 | failed | 50.0 | – |"


def test_llamacpp_table():
    results = [{"threads": t, "system": s, "ms_per_token": ms} for t, s, ms in
               [(1, "llama.cpp", 12.0), (1, "halo-generate", 24.0),
                (2, "llama.cpp", 8.0), (2, "halo-generate", 20.0)]]
    lines = rep.llamacpp_table(rep.medians(results, by=("threads", "system")))
    assert lines[2:] == ["| 1 | 12.0 | 24.0 | 2.00x |", "| 2 | 8.0 | 20.0 | 2.50x |"]
