"""The policy's action language: think freely, consult the expert, or answer.

In one turn the policy writes free text followed by either consult blocks
(``<consult>q1</consult>``; several queries also split on ``query_sep`` inside a
block) or one answer block (``<answer>...</answer>``). Replies come back as one
``<expert>...</expert>`` block per query, in order. Parsing never raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ProtocolConfig", "Action", "ExpertReply", "parse_action", "render_replies", "reply_text"]


@dataclass
class ProtocolConfig:
    consult_open: str = "<consult>"
    consult_close: str = "</consult>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    expert_open: str = "<expert>"
    expert_close: str = "</expert>"
    max_parallel: int = 3
    query_sep: str = "\n"
    unavailable: str = "unavailable"

    def __post_init__(self):
        if self.max_parallel < 1:
            raise ValueError(f"protocol.max_parallel must be >= 1, got {self.max_parallel}")
        tags = [self.consult_open, self.consult_close, self.answer_open, self.answer_close,
                self.expert_open, self.expert_close]
        if any(not t for t in tags) or len(set(tags)) != len(tags):
            raise ValueError(f"protocol tags must be non-empty and distinct, got {tags}")


@dataclass
class ExpertReply:
    """One expert reply with what the learner needs to train on the expert's own tokens.

    `text` is what the policy sees inside <expert>...</expert> (expert.reply_template, e.g.
    `47*3=141`); text[answer_start:answer_end] is the part the expert generated (`141`), the
    rest (the echoed query, the template's `=`) is not the expert's action. `token_texts` /
    `token_logprobs`: the expert's answer split into its tokens, each with its log-prob under
    the expert (softmax at T=1, teacher-forced on the generated answer), in the answer's reading
    order; None where the engine cannot give them. An expert may also return a plain str: then
    the whole reply counts as its answer and it has no log-probs."""
    text: str
    answer_start: int = 0
    answer_end: int = -1  # -1: len(text)
    token_texts: list[str] | None = None
    token_logprobs: list[float] | None = None

    @property
    def span(self) -> tuple[int, int]:
        return self.answer_start, len(self.text) if self.answer_end < 0 else self.answer_end


def reply_text(r: "str | ExpertReply | None") -> str | None:
    return r.text if isinstance(r, ExpertReply) else r


@dataclass
class Action:
    kind: str  # "consult" | "answer" | "invalid"
    queries: list[str] = field(default_factory=list)
    answer: str | None = None
    truncated: bool = False
    reason: str = ""


def _block(text: str, start: int, open_tag: str, close_tag: str, forbidden: list[str]):
    """Content of the block whose open tag is at `start`, and the index after its close tag;
    None when unclosed or when another tag is nested inside."""
    body_start = start + len(open_tag)
    end = text.find(close_tag, body_start)
    if end < 0:
        return None
    body = text[body_start:end]
    if any(tag in body for tag in forbidden):
        return None
    return body, end + len(close_tag)


def parse_action(text: str, cfg: ProtocolConfig | None = None) -> Action:
    cfg = cfg or ProtocolConfig()
    c_at, a_at = text.find(cfg.consult_open), text.find(cfg.answer_open)
    all_tags = [cfg.consult_open, cfg.consult_close, cfg.answer_open, cfg.answer_close,
                cfg.expert_open, cfg.expert_close]
    if c_at < 0 and a_at < 0:
        return Action("invalid", reason="no consult or answer tag")
    if a_at >= 0 and (c_at < 0 or a_at < c_at):
        got = _block(text, a_at, cfg.answer_open, cfg.answer_close, all_tags)
        if got is None:
            return Action("invalid", reason="unclosed or nested answer tag")
        return Action("answer", answer=got[0].strip())

    queries, pos = [], c_at
    while pos >= 0:
        got = _block(text, pos, cfg.consult_open, cfg.consult_close, all_tags)
        if got is None:
            return Action("invalid", reason="unclosed or nested consult tag")
        body, after = got
        queries += [q.strip() for q in body.split(cfg.query_sep)] if cfg.query_sep else [body.strip()]
        nxt, ans = text.find(cfg.consult_open, after), text.find(cfg.answer_open, after)
        pos = nxt if nxt >= 0 and (ans < 0 or nxt < ans) else -1
    queries = [q for q in queries if q]
    if not queries:
        return Action("invalid", reason="empty consult")
    return Action("consult", queries=queries[: cfg.max_parallel], truncated=len(queries) > cfg.max_parallel)


def render_replies(replies: list, cfg: ProtocolConfig | None = None) -> str:
    """One expert block per query, in order (str or ExpertReply); None (a rejected or failed
    query) renders as the configured "unavailable" text."""
    cfg = cfg or ProtocolConfig()
    return "".join(
        f"{cfg.expert_open}{cfg.unavailable if r is None else reply_text(r)}{cfg.expert_close}" for r in replies
    )
