"""The expert as any OpenAI-compatible HTTP endpoint (a vLLM or SGLang server, a Ray Serve LLM
app, a hosted API): `expert.engine: openai`. The Serve deployment (eapo_ray/expert.py) stays the
policy's front door; each of its replicas holds one `OpenAIExpert`, an async client of the
`openai` library with what callers of remote judges and teachers need:

- a concurrency limit per replica (`expert.max_concurrency`);
- a connect timeout and a per-attempt total timeout sized from max_tokens
  (`http_timeout_s + http_s_per_token * max_new_tokens`), never past the query's deadline;
- a deadline per query: `query_deadline_s(expert.timeout_s)`, a little inside the rollout
  actor's own wait, so the replica gives up before the policy does;
- retries only on connection errors and timeouts, 429 and 5xx, with full-jitter exponential
  backoff (a Retry-After header is honoured when it fits), inside the deadline; none on other 4xx;
- an optional cache of identical queries at temperature 0 (identical queries in flight share one
  request).

A query that still fails raises `ExpertUnavailable` (its reason counted in `stats` and in the
`eapo_expert_endpoint_failures` metric); the rollout actor reads it as "unavailable".
The retry, backoff and timeout rules are pure functions (tested without a network).
The API key is read from the environment variable named by `expert.api_key_env`, in the
replica's process; it is never stored in the config, a log or summary.json."""
from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CACHE_SIZE = 4096  # identical temperature-0 queries remembered per replica (least recently used dropped)


class ExpertUnavailable(RuntimeError):
    """A query the endpoint did not answer within its deadline and retries; `reason` is short
    ("timeout", "connection", "http_429", "http_500", "http_400", "deadline", ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"expert endpoint unavailable ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class RetryPolicy:
    connect_timeout_s: float = 3.0
    base_timeout_s: float = 5.0  # per attempt, plus per_token_s for each token asked for
    per_token_s: float = 0.05
    max_retries: int = 4
    backoff_base_s: float = 0.25
    backoff_max_s: float = 4.0
    min_attempt_s: float = 0.05  # no attempt is started with less time than this left

    @classmethod
    def from_config(cls, cfg) -> "RetryPolicy":
        return cls(connect_timeout_s=cfg.http_connect_timeout_s, base_timeout_s=cfg.http_timeout_s,
                   per_token_s=cfg.http_s_per_token, max_retries=cfg.http_max_retries,
                   backoff_base_s=cfg.http_backoff_s, backoff_max_s=cfg.http_backoff_max_s)


def query_deadline_s(timeout_s: float) -> float:
    """The replica's deadline for one query: inside the rollout actor's wait (`expert.timeout_s`) by
    a margin for Serve's queue and transport (20%, at most 1 s), so the replica stops first."""
    return timeout_s - min(1.0, 0.2 * timeout_s)


def attempt_timeout_s(p: RetryPolicy, max_tokens: int, remaining_s: float) -> float:
    """One attempt's total timeout: sized from the tokens asked for, cut to the time left."""
    return max(0.0, min(p.base_timeout_s + p.per_token_s * max_tokens, remaining_s))


def is_retryable(status: int | None) -> bool:
    """None: no HTTP status (connection refused or reset, a timeout): retry. 429 and 5xx: retry.
    Any other status (400, 401, 404, 422, ...): the same request would fail again."""
    return status is None or status == 429 or 500 <= status <= 599


def backoff_s(p: RetryPolicy, retry: int, rng: random.Random, retry_after_s: float | None = None) -> float:
    """Wait before retry number `retry` (0-based): full jitter, uniform in [0, min(cap, base * 2^retry)];
    at least the server's Retry-After when it gave one."""
    wait = rng.uniform(0.0, min(p.backoff_max_s, p.backoff_base_s * (2 ** retry)))
    return max(wait, retry_after_s) if retry_after_s is not None else wait


def next_wait(p: RetryPolicy, retry: int, status: int | None, remaining_s: float, rng: random.Random,
              retry_after_s: float | None = None) -> float | None:
    """The wait before the next attempt, or None to give up: not retryable, retries used up, or the
    wait would leave less than `min_attempt_s` of the deadline for the attempt."""
    if not is_retryable(status) or retry >= p.max_retries:
        return None
    wait = backoff_s(p, retry, rng, retry_after_s)
    return wait if remaining_s - wait >= p.min_attempt_s else None


def parse_retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing here
        return None


def api_key(env_name: str) -> str:
    """The key from the environment variable `env_name` ("" -> no key: local servers take any)."""
    if not env_name:
        return "EMPTY"
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"expert.api_key_env names the environment variable {env_name!r}, which is not set in "
                         f"the expert replica's environment (pid {os.getpid()}): export it where the run starts "
                         "(a local cluster inherits it) or set it on the expert's nodes")
    return key


@dataclass
class Answer:
    """One endpoint reply: the generated text, and its tokens' texts and log-probs when asked for."""
    text: str
    token_texts: list[str] | None = None
    token_logprobs: list[float] | None = None


@dataclass
class EndpointStats:
    requests: int = 0  # HTTP attempts made
    retries: int = 0
    cache_hits: int = 0
    failures: dict = field(default_factory=dict)  # reason -> queries given up


class OpenAIExpert:
    """An async client of one OpenAI-compatible endpoint (`expert.base_url`, `expert.model`,
    `expert.api`: "completions" sends the rendered prompt, "chat" sends it as one user message)."""

    def __init__(self, cfg, logprobs: bool = False, seed: int | None = None,
                 on_failure=None):
        import openai  # noqa: F401 -- imported now (seconds), not inside the first query's deadline

        self.cfg, self.logprobs = cfg, logprobs
        self.policy = RetryPolicy.from_config(cfg)
        self.key = api_key(cfg.api_key_env)
        self.rng = random.Random(seed)
        self.stats = EndpointStats()
        self.on_failure = on_failure  # called with the reason of each query given up (metrics)
        self.cache_on = cfg.cache and cfg.temperature == 0
        self._cache: OrderedDict = OrderedDict()  # prompt -> Answer or an in-flight Future
        self._client = self._loop = self._sem = None

    def _bind(self):
        """The client and the concurrency limit belong to the running event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai

            self._loop = loop
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
            self._client = openai.AsyncOpenAI(
                base_url=self.cfg.base_url, api_key=self.key, max_retries=0,  # retries are ours (deadline-bound)
                timeout=openai.Timeout(self.policy.base_timeout_s, connect=self.policy.connect_timeout_s))
        return self._client

    async def answer(self, prompt: str, deadline: float | None = None) -> Answer:
        """The endpoint's reply to `prompt` by `deadline` (time.monotonic(); default: now +
        query_deadline_s(expert.timeout_s)); raises ExpertUnavailable."""
        deadline = deadline if deadline is not None else time.monotonic() + query_deadline_s(self.cfg.timeout_s)
        if not self.cache_on:
            return await self._query(prompt, deadline)
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            self.stats.cache_hits += 1
            if isinstance(hit, Answer):
                return hit
            try:
                return await asyncio.wait_for(asyncio.shield(hit), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self._fail("deadline")
                raise ExpertUnavailable("deadline", "waited on an identical query in flight") from None
        fut = asyncio.get_running_loop().create_future()
        self._cache[prompt] = fut
        try:
            ans = await self._query(prompt, deadline)
        except BaseException as e:
            self._cache.pop(prompt, None)
            if not fut.done():
                fut.set_exception(e if isinstance(e, ExpertUnavailable) else ExpertUnavailable("cancelled"))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        self._cache[prompt] = ans
        fut.set_result(ans)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return ans

    def _fail(self, reason: str) -> None:
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        if self.on_failure is not None:
            self.on_failure(reason)

    async def _query(self, prompt: str, deadline: float) -> Answer:
        import openai

        client, retry = self._bind(), 0
        while True:
            left = deadline - time.monotonic()
            timeout = attempt_timeout_s(self.policy, self.cfg.max_new_tokens, left)
            if timeout < self.policy.min_attempt_s:
                self._fail("deadline")
                raise ExpertUnavailable("deadline", f"no time left for attempt {retry + 1}")
            status, retry_after, reason = None, None, "connection"
            try:  # a slot within the deadline (all max_concurrency slots may be busy), then the attempt's own time
                await asyncio.wait_for(self._sem.acquire(), max(0.0, left - self.policy.min_attempt_s))
            except asyncio.TimeoutError:
                self._fail("deadline")
                raise ExpertUnavailable("deadline", "no free connection slot before the query's deadline") from None
            try:
                timeout = attempt_timeout_s(self.policy, self.cfg.max_new_tokens, deadline - time.monotonic())
                if timeout < self.policy.min_attempt_s:
                    self._fail("deadline")
                    raise ExpertUnavailable("deadline", f"no time left for attempt {retry + 1}")
                self.stats.requests += 1
                return await asyncio.wait_for(self._send(client, prompt, timeout), timeout + 0.5)
            except openai.APIStatusError as e:
                status, reason = e.status_code, f"http_{e.status_code}"
                retry_after = parse_retry_after(e.response.headers.get("retry-after"))
            except (openai.APITimeoutError, asyncio.TimeoutError):
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection"
            except (openai.APIError, ValueError, TypeError, AttributeError, IndexError) as e:  # a malformed reply
                self._fail("bad_reply")
                raise ExpertUnavailable("bad_reply", f"{type(e).__name__}: {e}") from None
            finally:
                self._sem.release()
            wait = next_wait(self.policy, retry, status, deadline - time.monotonic(), self.rng, retry_after)
            if wait is None:
                self._fail(reason)
                raise ExpertUnavailable(reason, f"after {retry + 1} attempt(s)")
            self.stats.retries += 1
            retry += 1
            await asyncio.sleep(wait)

    async def _send(self, client, prompt: str, timeout: float) -> Answer:
        import openai

        c = self.cfg
        t = openai.Timeout(timeout, connect=min(self.policy.connect_timeout_s, timeout))
        if c.api == "chat":
            r = await client.chat.completions.create(
                model=c.model, messages=[{"role": "user", "content": prompt}], max_tokens=c.max_new_tokens,
                temperature=c.temperature, timeout=t, **({"logprobs": True} if self.logprobs else {}))
            choice = r.choices[0]
            lp = choice.logprobs.content if self.logprobs and choice.logprobs and choice.logprobs.content else None
            return Answer(choice.message.content or "", [x.token for x in lp] if lp else None,
                          [x.logprob for x in lp] if lp else None)
        r = await client.completions.create(model=c.model, prompt=prompt, max_tokens=c.max_new_tokens,
                                            temperature=c.temperature, timeout=t,
                                            **({"logprobs": 1} if self.logprobs else {}))
        choice = r.choices[0]
        lp = choice.logprobs if self.logprobs and choice.logprobs and choice.logprobs.tokens else None
        return Answer(choice.text or "", list(lp.tokens) if lp else None,
                      [float(x) for x in lp.token_logprobs] if lp else None)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
