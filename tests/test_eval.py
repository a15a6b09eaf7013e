"""`halo eval ppl|zeroshot|agree`: the numbers are the standard ones, the scorers pick certain
answers, interrupted runs keep their partial result, bad inputs give one clear line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from halollm.cli.main import main
from halollm.eval import data, zeroshot
from halollm.eval.agree import AgreementTally, accuracy, compare_teacher_forced
from halollm.eval.ppl import PerplexityTally, perplexity, sliding_windows
from halollm.generate import LocalDecoder, teacher_forced
from tests.conftest import SHARED_DATA, TEXT_200, one_clear_line, run_halo

WIKI = SHARED_DATA / "wikitext-2" / "wiki.test.raw"


def halo_eval(*args: str, timeout: float = 300):
    """`halo eval …` as a real subprocess, on one torch thread (the machine is shared)."""
    return run_halo("eval", *args, "--threads", "1", timeout=timeout)


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- sliding windows (pure) ---------------------------------------------------------------

@pytest.mark.parametrize("n,context,stride", [(300, 128, 128), (300, 128, 64), (300, 128, 1),
                                              (129, 128, 100), (5, 128, 64), (2, 2, 1),
                                              (1000, 64, 48)])
def test_windows_score_each_token_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert scored == sorted(set(scored))  # each at most once, in order
    assert all(w.end - w.begin <= context and w.first_scored > w.begin for w in windows)
    assert windows[-1].end == n
    if stride < context:  # every token but the very first has a window that scores it
        assert scored == list(range(1, n))
    else:  # disjoint windows: a window's first token has no context and is not scored
        assert scored == [t for t in range(n) if t % context]


# -- (a) perplexity equals a plain transformers loop --------------------------------------

def _transformers_ppl(reference, ids: list[int], context: int, stride: int) -> float:
    """The loop of Hugging Face's "Perplexity of fixed-length models", counting the NLL of
    exactly the scored tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = reference(x, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [128, 64])
def test_ppl_equals_transformers(reference, reference_tokenizer, stride):
    # the correctness check against the reference must not skip: the data ships beside the
    # project (or set HALO_DATA), as for the predictor tests
    assert WIKI.is_file(), f"no WikiText-2 at {WIKI} (set HALO_DATA to ../shared/data)"
    proc = halo_eval("ppl", "--text", str(WIKI), "--limit-tokens", "300",
                    "--context", "128", "--stride", str(stride), "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # the first 20k characters hold the first 300 tokens of the whole file
    ids = reference_tokenizer(WIKI.read_text(encoding="utf-8")[:20000]).input_ids[:300]
    ref = _transformers_ppl(reference, ids, 128, stride)
    assert out["tokens"] == (297 if stride == 128 else 299)
    assert out["partial"] is False and out["bos"] is False
    assert abs(out["ppl"] - ref) / ref < 1e-3, (out["ppl"], ref)
    assert out["nll"] == pytest.approx(math.log(out["ppl"]), abs=1e-4)


def test_teacher_forced_ppl_equals_one_pass(model_fp32):
    """The cluster's way of scoring (one token at a time) gives the same number on fp32."""
    ids = model_fp32.tokenizer.encode(TEXT_200)[:48]
    windows = sliding_windows(len(ids), 24, 16)
    tf = LocalDecoder(model_fp32.transformer)
    one = perplexity(lambda s: model_fp32.transformer.forward(s, 0), ids, windows)
    forced = perplexity(lambda s: teacher_forced(tf, s), ids, windows)
    assert one.tokens == forced.tokens == 47
    assert forced.ppl == pytest.approx(one.ppl, rel=1e-4)


# -- (b) zero-shot: certain answers -------------------------------------------------------

CERTAIN_PIQA = [  # (goal, right, gibberish)
    ("How does the famous opening of A Tale of Two Cities go?",
     "It was the best of times, it was the worst of times.",
     "Glorp the zibble of snark, it wump the frobble of plinth."),
    ("What comes after one, two, three?", "four, five, six.", "teapot, lantern, sideways."),
    ("What is the capital of France?", "Paris is the capital of France.",
     "Zorblat qwix the vunder of grembly."),
]
CERTAIN_LAMBADA = [
    "One, two, three, four, five, six, seven, eight, nine, ten",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome. The capital of France is Paris",
]


def test_zeroshot_picks_certain_answers(tmp_path):
    piqa, labels = [], []
    for i, (goal, right, wrong) in enumerate(CERTAIN_PIQA):
        sols = (right, wrong) if i % 2 == 0 else (wrong, right)  # the answer on both sides
        piqa.append({"goal": goal, "sol1": sols[0], "sol2": sols[1]})
        labels.append(str(i % 2))
    piqa_path = _jsonl(tmp_path / "valid.jsonl", piqa)
    (tmp_path / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    lambada_path = _jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in CERTAIN_LAMBADA])
    arc_path = _jsonl(tmp_path / "arc.jsonl", [  # llm-foundry's form, the answer last
        {"query": f"Question: {g}", "choices": [w, w[::-1], r], "gold": 2}
        for g, r, w in CERTAIN_PIQA])
    proc = halo_eval("zeroshot", "--task", "piqa", "--data", piqa_path,
                    "--task", "lambada", "--data", lambada_path, "--task", "arc_easy",
                    "--data", arc_path, "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads(proc.stdout)["tasks"]
    assert tasks["piqa"]["items"] == 3 and tasks["piqa"]["acc"] == 1.0
    assert tasks["piqa"]["acc_norm"] == 1.0
    assert tasks["arc_easy"]["acc"] == 1.0 and tasks["arc_easy"]["acc_norm"] == 1.0
    assert tasks["lambada"]["items"] == 2 and tasks["lambada"]["acc"] == 1.0
    assert 1.0 < tasks["lambada"]["ppl"] < 3.0


def test_encode_pair_is_the_harness_split(model_fp32):
    enc = model_fp32.tokenizer.encode
    ctx, cont = zeroshot.encode_pair(enc, "Question: Why?\nAnswer:", " Because it rains.")
    assert ctx == enc("Question: Why?\nAnswer:")
    assert ctx + cont == enc("Question: Why?\nAnswer: Because it rains.")
    # trailing context whitespace moves to the continuation
    assert zeroshot.encode_pair(enc, "The sky is ", "blue") == zeroshot.encode_pair(
        enc, "The sky is", " blue")
    assert zeroshot.encode_pair(enc, "", "Hello", prefix_id=7) == ([7], enc("Hello"))


def test_readers_build_the_harness_prompts(tmp_path):
    p = _jsonl(tmp_path / "hf_piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b",
                                             "label": 1}])
    assert data.piqa(p) == [zeroshot.MultipleChoice("Question: g\nAnswer:", ("a", "b"), 1)]
    p = _jsonl(tmp_path / "lam.jsonl", [{"text": "a b\nc d"}])
    assert data.lambada(p) == [zeroshot.Cloze("a b\nc", " d")]
    hf = {"question": "q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
          "answerKey": "C"}
    ai2 = {"question": {"stem": "q?", "choices": [{"text": "x", "label": "1"},
                                                  {"text": "y", "label": "2"}]},
           "answerKey": "2"}
    foundry = {"query": "Question: q?", "choices": ["x", "y"], "gold": 0}
    got = data.arc(_jsonl(tmp_path / "arc.jsonl", [hf, ai2, foundry]), limit=None)
    assert [(i.context, i.choices, i.gold) for i in got] == [
        ("Question: q?\nAnswer:", ("x", "y", "z"), 2), ("Question: q?\nAnswer:", ("x", "y"), 1),
        ("Question: q?\nAnswer:", ("x", "y"), 0)]
    assert len(data.arc(_jsonl(tmp_path / "arc2.jsonl", [foundry] * 5), limit=2)) == 2


# -- (c) interrupted evaluations keep a partial result ------------------------------------

def test_sigint_reports_partial_ppl(tmp_path):
    text = tmp_path / "long.txt"
    text.write_text((TEXT_200 + "\n\n") * 300)  # ~60k tokens: minutes to score
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(  # -X faulthandler: a hang is dumped (SIGABRT) instead of lost
        [sys.executable, "-X", "faulthandler", "-m", "halollm.cli.main", "eval", "ppl",
         "--text", str(text),
         "--context", "64", "--stride", "64", "--dtype", "fp32", "--threads", "1",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test run started in the background (`cmd &`) ignores SIGINT, and an ignored signal
        # stays ignored across exec: give the child Ctrl-C back, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the stage line: the model is loaded, scoring
            line = proc.stderr.readline()
            seen.append(line)
            if not line or "perplexity (" in line:
                break
        assert "perplexity (" in seen[-1], f"no stage line; stderr: {''.join(seen)[-2000:]}"
        time.sleep(4)  # a 64-token window takes ~0.3 s
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # every thread's stack, to see where it hangs
            _, stderr = proc.communicate(timeout=30)
            raise AssertionError(f"no exit 120 s after SIGINT; stacks:\n{stderr[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout[-500:], stderr[-2000:])
    assert "Traceback" not in stderr
    result = json.loads(out.read_text())
    assert result["partial"] is True
    assert 0 < result["tokens"] < 59000 and result["ppl"] > 1
    assert "interrupted: partial result" in stdout and "perplexity" in stdout


class _Interrupt:
    """A LogitsFn that behaves like Ctrl-C on its `after`+1-th call."""

    def __init__(self, model, after: int) -> None:
        self.model, self.after, self.calls = model, after, 0

    def __call__(self, ids):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.model.transformer.forward(ids, 0)


def test_partial_tallies_survive_interruption(model_fp32):
    ids = model_fp32.tokenizer.encode(TEXT_200)
    tally = PerplexityTally()
    with pytest.raises(KeyboardInterrupt):
        perplexity(_Interrupt(model_fp32, 2), ids, sliding_windows(len(ids), 32, 32), tally)
    assert tally.windows == 2 and tally.tokens == 62 and math.isfinite(tally.ppl)

    items = [zeroshot.MultipleChoice("Question: q\nAnswer:", ("a", "b"), 0)] * 3
    score = zeroshot.scorer(_Interrupt(model_fp32, 3), model_fp32.tokenizer.encode, 8192)
    zt = zeroshot.TaskTally("piqa", "choice", len(items))
    with pytest.raises(KeyboardInterrupt):
        zeroshot.evaluate(items, score, zt)  # 2 calls per item: interrupted in the second
    assert zt.to_json()["items"] == 1 and zt.to_json()["partial"] is True


# -- (d) agreement --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_agree_single_device(tmp_path, dtype):
    text = tmp_path / "text.txt"
    text.write_text(TEXT_200)
    out = tmp_path / "agree.json"
    proc = halo_eval("agree", "--text", str(text), "--tokens", "64", "--dtype", dtype,
                    "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["tokens"] == 64 and result["partial"] is False
    if dtype == "fp32":
        assert result["agreement"] == 1.0 and result["kl"] < 1e-6
    else:
        assert result["agreement"] >= 0.95 and 0 < result["kl"] < 0.05


def test_agreement_helpers(model_fp32):
    ids = model_fp32.tokenizer.encode(TEXT_200)[:24]
    ref = model_fp32.transformer.forward(ids, 0)
    noisy = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    agree, kl = accuracy(noisy, ref)
    tally = AgreementTally()
    for i in range(len(ids)):
        tally.add(noisy[i], ref[i])
    assert tally.to_json()["agreement"] == round(agree, 4)
    assert tally.kl == pytest.approx(kl, rel=1e-5) and kl > 0
    same = compare_teacher_forced(LocalDecoder(model_fp32.transformer), ids,
                                  teacher_forced(LocalDecoder(model_fp32.transformer), ids))
    assert same.agreed == len(ids) and same.kl == 0.0


@pytest.mark.slow
def test_cluster_evals_strict_are_lossless(tmp_path):
    """On a local strict cluster (exact by construction) agreement is total and teacher-forced
    perplexity equals this device's."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT_200)
    proc = halo_eval("agree", "--text", str(text), "--tokens", "24", "--dtype", "fp32",
                    "--local", "2", "--sync", "strict", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["device"] == "cluster" and out["agreement"] == 1.0 and out["kl"] < 1e-4
    args = ["ppl", "--text", str(text), "--limit-tokens", "40", "--context", "20",
            "--dtype", "fp32", "--json"]
    cluster = halo_eval(*args, "--local", "2", "--sync", "strict")
    single = halo_eval(*args)
    assert cluster.returncode == 0 and single.returncode == 0, cluster.stderr + single.stderr
    c, s = json.loads(cluster.stdout), json.loads(single.stdout)
    assert c["scoring"] == "teacher-forced" and c["tokens"] == s["tokens"] == 39
    assert c["ppl"] == pytest.approx(s["ppl"], rel=1e-3)
    assert c["sync"]["expected"] > 0


# -- (e) bad inputs -----------------------------------------------------------------------

def test_bad_inputs_give_one_line(tmp_path, capsys):
    good = tmp_path / "t.txt"
    good.write_text(TEXT_200)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine words"}\n{"text": "broken\n')
    no_labels = _jsonl(tmp_path / "nolabels.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    cases = [
        (["ppl", "--text", str(tmp_path / "missing.txt")], "no such file"),
        (["ppl", "--text", str(good), "--context", "1"], "--context"),
        (["ppl", "--text", str(good), "--context", "64", "--stride", "65"], "--stride"),
        (["ppl", "--text", str(good), "--limit-tokens", "0"], "--limit-tokens"),
        (["zeroshot", "--task", "lambada", "--data", str(bad_jsonl)], "bad.jsonl:2"),
        (["zeroshot", "--task", "lambada", "--data", str(good), "--limit", "0"], "--limit"),
        (["zeroshot", "--task", "piqa", "--data", no_labels], "labels"),
        (["zeroshot", "--task", "piqa", "--task", "lambada", "--data", no_labels], "--data"),
        (["agree", "--text", str(good), "--tokens", "-3"], "--tokens"),
        (["agree", "--text", str(good), "--out", str(tmp_path)], "is a directory"),
    ]
    for i, (args, words) in enumerate(cases):
        if i < 2:  # the real command line
            proc = halo_eval(*args, timeout=60)
        else:  # the same entry point in-process (fast)
            code = main(["eval", *args])
            proc = SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
        line = one_clear_line(proc)
        assert words in line, (args, line)


def test_eval_json_fields_and_out(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT_200)
    out = tmp_path / "sub" / "ppl.json"
    proc = halo_eval("ppl", "--text", str(text), "--context", "64", "--dtype", "fp32",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("perplexity ")
    result = json.loads(out.read_text())
    assert result["stride"] == 32 and result["context"] == 64
    assert result["tokens"] == result["text_tokens"] - 1
    for key in ("ppl", "nll", "tokens", "windows", "dtype", "device", "seconds", "partial"):
        assert key in result
    assert os.path.getsize(out) > 0
