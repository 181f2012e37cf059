"""The expert behind an OpenAI-compatible endpoint (expert.engine: openai; eapo_ray/expert_http.py),
against real HTTP servers: a small fault server this test starts (429s, 500s, 400s, a reply slower
than the deadline, the server killed mid-run), and vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) serving the bundled tiny expert, with a launch that
trains on its replies (LUFFY channel, with vLLM's log-probs) while the server is killed mid-run."""
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import Launch, free_port
from vllm_guard import needs_vllm

from eapo_ray.config import TINY_DIR, ExpertConfig
from eapo_ray.expert_http import ExpertUnavailable, OpenAIExpert

HERE = Path(__file__).resolve().parent
KEY = "eapo-test-key-5f1c"  # a fake key: it must reach the server and nothing the run writes


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    import urllib.request

    t0 = time.time()
    while True:
        assert proc.poll() is None, f"server exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 -- not up yet (or 401 without a key: up)
            import urllib.error
            if isinstance(sys.exc_info()[1], urllib.error.HTTPError):
                return
        assert time.time() - t0 < timeout, f"server not up in {timeout}s: {log.read_text()[-3000:] if log else ''}"
        time.sleep(0.3)


@pytest.fixture
def fault_server():
    port = free_port()
    p = subprocess.Popen([sys.executable, str(HERE / "openai_fault_server.py"), str(port)], stdout=subprocess.PIPE)
    try:
        _wait_http(f"http://127.0.0.1:{port}/hits", p, 30)
        yield port, p
    finally:
        p.kill()
        p.wait()


def _hits(port: int) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/hits", timeout=5).read())


def _client(port: int, model: str, **kw) -> OpenAIExpert:
    cfg = ExpertConfig(engine="openai", base_url=f"http://127.0.0.1:{port}/v1", model=model,
                       **{"timeout_s": 5.0, "http_backoff_s": 0.05, "http_backoff_max_s": 0.2, **kw})
    return OpenAIExpert(cfg, seed=0)


async def _ask(c: OpenAIExpert, prompts: list[str]) -> list:
    async def one(p):
        try:
            return (await c.answer(p)).text
        except ExpertUnavailable as e:
            return e
    try:
        return list(await asyncio.gather(*[one(p) for p in prompts]))
    finally:
        await c.close()


def test_429_is_retried_with_backoff_then_answered(fault_server):
    port, _ = fault_server
    c = _client(port, "429x2")
    assert asyncio.run(_ask(c, ["Q:12*7\nA:"])) == ["84"]
    assert _hits(port)["429x2"] == 3 and c.stats.retries == 2 and not c.stats.failures


def test_500_is_retried_until_the_retries_run_out_and_400_is_not_retried(fault_server):
    port, _ = fault_server
    c = _client(port, "500", http_max_retries=3)
    [r] = asyncio.run(_ask(c, ["Q:12*7\nA:"]))
    assert isinstance(r, ExpertUnavailable) and r.reason == "http_500" and _hits(port)["500"] == 4
    c = _client(port, "400")
    [r] = asyncio.run(_ask(c, ["Q:12*7\nA:"]))
    assert isinstance(r, ExpertUnavailable) and r.reason == "http_400" and _hits(port)["400"] == 1
    assert c.stats.failures == {"http_400": 1} and c.stats.retries == 0


def test_a_reply_slower_than_the_deadline_gives_up_at_the_deadline(fault_server):
    port, _ = fault_server
    c = _client(port, "slow", timeout_s=2.0)  # deadline 1.6 s (query_deadline_s); the server takes 30 s
    t0 = time.monotonic()
    rs = asyncio.run(_ask(c, ["Q:12*7\nA:"] * 3))
    took = time.monotonic() - t0
    assert all(isinstance(r, ExpertUnavailable) for r in rs) and 1.4 < took < 2.0, (rs, took)


def test_queries_queued_behind_the_concurrency_limit_still_end_at_their_deadline(fault_server):
    """max_concurrency=1 and three distinct slow queries: the two queued behind the first give up at
    their own deadline (1.6 s) instead of starting an attempt after it (before: each waited for the
    slot with no bound and then ran a whole attempt: ~3 x the deadline)."""
    port, _ = fault_server
    c = _client(port, "slow", timeout_s=2.0, max_concurrency=1, cache=False)
    t0 = time.monotonic()
    rs = asyncio.run(_ask(c, [f"Q:12*{k}\nA:" for k in (2, 3, 4)]))
    took = time.monotonic() - t0
    assert all(isinstance(r, ExpertUnavailable) for r in rs) and took < 2.5, (rs, took)


def test_identical_queries_at_temperature_0_are_asked_once(fault_server):
    port, _ = fault_server
    c = _client(port, "ok")
    assert asyncio.run(_ask(c, ["Q:12*7\nA:"] * 5 + ["Q:3+4\nA:"])) == ["84"] * 5 + ["7"]
    assert _hits(port)["ok"] == 2 and c.stats.cache_hits == 4
    c = _client(port, "ok", temperature=1.0)
    asyncio.run(_ask(c, ["Q:12*7\nA:"] * 3))
    assert _hits(port)["ok"] == 5


def test_the_server_killed_mid_run_reads_unavailable_and_the_key_is_sent(fault_server, monkeypatch):
    """200 queries against a server killed after the first answers: every query comes back (an
    answer or ExpertUnavailable, within its deadline), nothing else is raised."""
    port, proc = fault_server
    monkeypatch.setenv("EAPO_TEST_KEY", KEY)
    c = _client(port, "ok", api_key_env="EAPO_TEST_KEY", cache=False, timeout_s=3.0, max_concurrency=4)

    seen = {}

    async def run():
        def killer():
            while _hits(port).get("ok", 0) < 20:
                time.sleep(0.01)
            seen.update(_hits(port))
            proc.kill()
        k = asyncio.create_task(asyncio.to_thread(killer))
        out = await _ask(c, [f"Q:{i}+1\nA:" for i in range(200)])
        await k
        return out
    t0 = time.monotonic()
    rs = asyncio.run(run())
    took = time.monotonic() - t0
    bad = [r for r in rs if isinstance(r, ExpertUnavailable)]
    ok = {i: r for i, r in enumerate(rs) if isinstance(r, str)}
    assert len(ok) + len(bad) == 200 and len(ok) >= 20 and bad and took < 2 * 3.0, (len(ok), len(bad), took)
    assert {e.reason for e in bad} <= {"connection", "timeout", "deadline"}, {e.reason for e in bad}
    assert all(r == str(i + 1) for i, r in ok.items())
    assert seen["auth"] == f"Bearer {KEY}"  # the key from the variable expert.api_key_env names


@pytest.mark.slow
@needs_vllm
def test_a_launch_trains_on_a_vllm_servers_replies_and_survives_its_death(tmp_path):
    """vLLM's own OpenAI server serves the bundled tiny expert (with an API key); a launch with
    expert.engine: openai and the LUFFY channel (which trains on the expert's answer tokens with
    the server's log-probs) takes its first steps on the server's replies; the server is then
    killed, the run goes on with "unavailable" (counted in summary.json), and the key appears
    nowhere in the run directory or the console. The chat API is checked on the same server."""
    port = free_port()
    log = tmp_path / "vllm.out"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "EAPO_TEST_KEY": KEY}
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the tiny tokenizer has none
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY_DIR / "expert"),
             "--served-model-name", "tiny-expert", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
             "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
             "--chat-template", chat_template],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    run = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", server, 180, log)
        os.environ["EAPO_TEST_KEY"] = KEY
        try:
            chat = OpenAIExpert(ExpertConfig(engine="openai", base_url=f"http://127.0.0.1:{port}/v1",
                                             model="tiny-expert", api="chat", api_key_env="EAPO_TEST_KEY",
                                             timeout_s=120.0, http_timeout_s=60.0),  # a cold server on a busy CPU
                                logprobs=True)
            a = asyncio.run(_answer_and_close(chat, "Q:12*7\nA:"))
        finally:
            del os.environ["EAPO_TEST_KEY"]
        assert a.text.strip() == "84" and a.token_texts and len(a.token_logprobs) == len(a.token_texts), a
        run = Launch(tmp_path, "endpoint", "steps=6", "rollout.num_actors=1", "acceptance.kind=constant",
                     "acceptance.start=1.0", "algo.expert_token_channel=luffy", "expert.timeout_s=20",
                     "expert.engine=openai", f"expert.base_url=http://127.0.0.1:{port}/v1",
                     "expert.model=tiny-expert", "expert.api_key_env=EAPO_TEST_KEY", env={"EAPO_TEST_KEY": KEY})
        run.wait_for(r"^\[eapo\] step 2/6", timeout=300)
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
        rc = run.finish(timeout=300)
        assert rc == 0, run.log[-4000:]
        s = run.summary()
        rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        trained = [r.get("luffy_tokens", 0) for r in rows if r["step"] in (1, 2)]
        assert s["steps"] == 6 and all(t > 0 for t in trained), (trained, rows[:3])
        assert all(r["luffy_loss"] == r["luffy_loss"] for r in rows if "luffy_loss" in r)  # finite, not NaN
        assert s["accounting"]["expert_unavailable"] > 0 and s["accounting"]["closes"], s["accounting"]
        written = [p for p in run.run_dir.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
        assert not [p for p in written if KEY.encode() in p.read_bytes()] and KEY not in run.log
        assert '"api_key_env": "EAPO_TEST_KEY"' in (run.run_dir / "config.json").read_text()
        print(f"openai expert: luffy tokens per step before the kill {trained}, "
              f"unavailable after it {s['accounting']['expert_unavailable']}")
    finally:
        if run is not None:
            run.kill_all()
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()


async def _answer_and_close(c: OpenAIExpert, prompt: str):
    try:
        return await c.answer(prompt)
    finally:
        await c.close()
