"""The replay channel: an episode's accepted expert replies rewritten as the policy's own steps.

After an accepted reply (``...<consult>47*3</consult>`` then ``<expert>47*3=141</expert>``) the
policy's next turn goes on from the reply (``141+5=146;``): it never writes the step ``47*3=141;``
that it must write alone at evaluation. The *replay view* of such a sample is the response in the
evaluation format: each consult turn's text up to its ``<consult>`` tag, then for each answered
query the step written by `algo.replay_step_template` (default ``{query}={answer};``, ``answer``
being the expert's own answer span), then the next turn's text, and so on to the final turn. The
expert's answer tokens in that view are what the channel trains (a loss in the learner).

Rule for a consult turn with a query the expert did not answer (rejected by the acceptance coin,
or failed): the view stops before that turn's consult (the policy would have had to compute that
step itself; nothing after it is in the view). A sample whose view holds no answer has no view.
Pure: no Ray, no tokenizer (`encode_view` takes the encode function).
"""
from __future__ import annotations

from dataclasses import dataclass

from eapo_ray.algo.protocol import ExpertReply, ProtocolConfig


@dataclass(frozen=True)
class TurnRecord:
    """One policy turn of an episode: its text and, for a consult turn that got replies, the
    queries, the replies (None: rejected or failed) and whether each was accepted."""
    text: str
    queries: tuple[str, ...] = ()
    replies: tuple = ()  # str | ExpertReply | None per query


def reply_answer(reply) -> str | None:
    """The expert's own answer in a reply: an ExpertReply's answer span, a plain str whole."""
    if reply is None:
        return None
    if isinstance(reply, ExpertReply):
        a, b = reply.span
        return reply.text[a:b]
    return str(reply)


def replay_pieces(turns: list[TurnRecord], proto: ProtocolConfig, step_template: str) -> list[tuple[str, bool]] | None:
    """The replay view as text pieces (text, is_expert_answer), in order; None when the view
    holds no expert answer. `step_template` must contain '{answer}' (and may contain '{query}')."""
    before, sep, after = step_template.partition("{answer}")
    if not sep:
        raise ValueError(f"algo.replay_step_template must contain '{{answer}}', got {step_template!r}")
    pieces: list[tuple[str, bool]] = []
    answers = 0
    for t in turns:
        if not t.queries:  # an answer, an invalid or the final turn: the policy's own text, whole
            pieces.append((t.text, False))
            continue
        got = [reply_answer(r) for r in t.replies]
        if len(got) != len(t.queries) or any(a is None for a in got):
            break  # a query the policy would have had to answer itself: the view stops here
        at = t.text.find(proto.consult_open)
        pieces.append((t.text[:at] if at >= 0 else t.text, False))
        for q, a in zip(t.queries, got):
            pieces += [(before.format(query=q), False), (a, True), (after.format(query=q), False)]
            answers += 1
    if not answers:
        return None
    return [(text, is_answer) for text, is_answer in pieces if text]


def encode_view(encode, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the view and the mask of the expert-answer tokens: each piece encoded on its
    own (`encode(text) -> ids`), so an answer's tokens are exactly its own (a BPE merge across a
    piece boundary is not made; on the bundled char-level tokenizer this equals encoding the
    whole text)."""
    ids, mask = [], []
    for text, is_answer in pieces:
        t = encode(text)
        ids += t
        mask += [int(is_answer)] * len(t)
    return ids, mask


def own_step_sites(text: str, pattern: str) -> list[tuple[int, int, str]]:
    """The policy's own steps that the matched-dose control gives expert answers to
    (algo.expert_token_channel own_steps): every match of `pattern` (algo.own_step_pattern, a regex
    with two groups: the step's query and the policy's own answer) in the response text, as
    (answer start, answer end, query)."""
    import re

    return [(m.start(2), m.end(2), m.group(1)) for m in re.finditer(pattern, text)]


def own_step_pieces(text: str, sites: list[tuple[int, int, str]], answers: list) -> list[tuple[str, bool]] | None:
    """The control's view: the policy's own response with the answers of the chosen `sites`
    replaced by the expert's (`answers`, one reply per site, None: no answer); it ends after the
    last answered site (nothing after it is trained). None when no site was answered."""
    pieces, at, last = [], 0, None
    for (a, b, _), reply in zip(sites, answers):
        ans = reply_answer(reply)
        if ans is None:
            continue
        pieces += [(text[at:a], False), (ans, True)]
        at, last = b, len(pieces)
    if last is None:
        return None
    return [(t, m) for t, m in pieces[:last] if t]
