"""The retry, backoff and timeout rules of the HTTP expert client (eapo_ray/expert_http.py) as pure
functions, and the config checks of expert.engine: openai. No network."""
import random

import pytest

from eapo_ray.config import ConfigError, load_config
from eapo_ray.expert_http import (
    RetryPolicy,
    attempt_timeout_s,
    backoff_s,
    is_retryable,
    next_wait,
    parse_retry_after,
    query_deadline_s,
)


def test_only_connection_errors_429_and_5xx_are_retried():
    assert is_retryable(None) and is_retryable(429) and is_retryable(500) and is_retryable(503) and is_retryable(599)
    assert not any(is_retryable(s) for s in (400, 401, 403, 404, 408, 409, 422, 200))


def test_backoff_is_full_jitter_doubling_to_its_cap_and_honours_retry_after():
    p = RetryPolicy(backoff_base_s=0.25, backoff_max_s=2.0)
    rng = random.Random(0)
    for retry, cap in [(0, 0.25), (1, 0.5), (2, 1.0), (3, 2.0), (6, 2.0)]:
        waits = [backoff_s(p, retry, rng) for _ in range(400)]
        assert 0 <= min(waits) and max(waits) <= cap and max(waits) > 0.8 * cap  # spread over [0, cap]
    assert backoff_s(p, 0, rng, retry_after_s=3.0) == 3.0
    assert parse_retry_after("1.5") == 1.5 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


def test_next_wait_gives_up_when_not_retryable_out_of_retries_or_past_the_deadline():
    p = RetryPolicy(max_retries=2, backoff_base_s=0.1, backoff_max_s=0.1, min_attempt_s=0.05)
    rng = random.Random(1)
    assert next_wait(p, 0, 404, 10.0, rng) is None
    assert next_wait(p, 0, 429, 10.0, rng) is not None and next_wait(p, 1, None, 10.0, rng) is not None
    assert next_wait(p, 2, 500, 10.0, rng) is None  # retries used up
    assert next_wait(p, 0, 500, 0.04, rng) is None  # no time left for another attempt
    assert next_wait(p, 0, 429, 1.0, rng, retry_after_s=5.0) is None  # the server asks for more than is left


def test_attempt_timeout_is_sized_from_max_tokens_and_cut_to_the_deadline():
    p = RetryPolicy(base_timeout_s=2.0, per_token_s=0.1)
    assert attempt_timeout_s(p, 10, 100.0) == pytest.approx(3.0)
    assert attempt_timeout_s(p, 1000, 100.0) == pytest.approx(100.0)
    assert attempt_timeout_s(p, 1000, 7.5) == 7.5 and attempt_timeout_s(p, 10, -1.0) == 0.0
    assert query_deadline_s(10.0) == 9.0 and query_deadline_s(2.0) == pytest.approx(1.6)


def test_openai_expert_keys_are_checked_naming_the_key():
    ok = ["expert.engine=openai", "expert.base_url=http://127.0.0.1:8000/v1", "expert.model=m"]
    cfg = load_config(None, ok + ["expert.api_key_env=MY_KEY", "expert.api=chat"])
    assert cfg.expert.engine == "openai" and cfg.expert.api == "chat"
    for bad, key in [(["expert.base_url=127.0.0.1:8000"], "expert.base_url"), (["expert.model="], "expert.model"),
                     (["expert.api_key_env=sk-abc123"], "expert.api_key_env"),
                     (["expert.max_concurrency=0"], "expert.max_concurrency"),
                     (["expert.http_backoff_s=9"], "expert.http_backoff_s")]:
        with pytest.raises(ConfigError, match=f"'{key}'") as e:
            load_config(None, ok + bad)
        assert "sk-abc123" not in str(e.value)  # a key pasted by mistake is not echoed
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(None, ["rollout.engine=openai"])  # only the expert can be an endpoint
