"""`halo serve`: a real server process, spoken to with the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

API_KEY = "test-serve-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*args: str):
    """A real `halo serve` process on a free port; yields its base URL once /health answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "halollm.cli.main", "serve", "--port",
                             str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # a shared machine
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not come up")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server():
    with serving("--api-key", API_KEY, "--model-id", "smol") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def _metric(server: str, name: str) -> float:
    text = httpx.get(server + "/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values)


def test_chat_completion_and_streaming_agree(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 16 or full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = client.chat.completions.create(model="default", messages=messages, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_completions_stop_and_seed(client):
    r = client.completions.create(model="smol", prompt="One, two, three, four,",
                                  max_tokens=12, temperature=0, stop=[" seven"])
    assert " seven" not in r.choices[0].text and r.choices[0].text
    a = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                  temperature=0.9, seed=7)
    b = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8,
                                  temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_models_health_and_metrics(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "smol"
    client.completions.create(model="smol", prompt="Hello", max_tokens=4, temperature=0)
    assert _metric(server, "halo_generated_tokens_total") >= 4
    assert _metric(server, "halo_token_latency_seconds_count") >= 3
    text = httpx.get(server + "/metrics").text
    assert "halo_tokens_per_second" in text and "halo_queue_waiting" in text


def test_concurrent_requests_are_both_answered(client):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.completions.create(model="smol", prompt="The capital of France is",
                                      max_tokens=12, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {0, 1} and results[0] == results[1] and results[0]


def test_disconnect_cancels_generation(client, server):
    before = _metric(server, "halo_requests_cancelled")
    tokens_before = _metric(server, "halo_generated_tokens_total")
    body = {"model": "smol", "prompt": "Write a very long story.", "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and _metric(server, "halo_requests_cancelled") <= before:
        time.sleep(0.3)
    assert _metric(server, "halo_requests_cancelled") == before + 1
    # the server is free again: a short request is answered promptly
    t0 = time.time()
    client.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)
    assert time.time() - t0 < 30
    # the cancelled one did not run to 2000 tokens (it is not counted as finished at all)
    assert _metric(server, "halo_generated_tokens_total") - tokens_before < 100


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt="Hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="word " * 9000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    auth = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    for payload in (b"{not json", json.dumps({"model": "smol", "prompt": "Hi",
                                              "temperature": "hot"}).encode(),
                    json.dumps({"model": "smol"}).encode(),
                    json.dumps({"model": "smol", "messages": "hello"}).encode()):
        for route in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(server + route, content=payload, headers=auth, timeout=30)
            assert r.status_code == 400, (route, payload, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
    bad_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "halollm.cli.main", "serve", "--port",
                            str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr


def test_cluster_request_survives_a_lost_worker():
    """halo serve over two workers; one is killed while a streamed request is generating:
    the coordinator takes its groups over and the request completes."""
    from halollm.runtime.local import LocalWorkers

    key = "serve-cluster-key"
    with LocalWorkers(2, key, threads=1) as lw:
        workers = ",".join(f"{h}:{p}" for h, p in lw.addresses)
        with serving("--workers", workers, "--key", key, "--predictor", "none") as base:
            health = httpx.get(base + "/health").json()
            assert health["workers"] == {"alive": 2, "total": 2} and health["status"] == "ok"
            body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 60,
                    "temperature": 0, "stream": True}
            pieces, finish = [], None
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[5:])
                    assert "error" not in data, data
                    choice = data["choices"][0]
                    pieces.append(choice["text"])
                    finish = choice["finish_reason"] or finish
                    if len(pieces) == 5:
                        lw.kill(0)
            assert finish in ("length", "stop") and len(pieces) > 5
            health = httpx.get(base + "/health").json()
            assert health["workers"]["alive"] == 1 and health["status"] == "degraded"
            assert 'halo_worker_alive{worker="' in httpx.get(base + "/metrics").text
