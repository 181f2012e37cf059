import pytest

from eapo_ray.algo.protocol import ProtocolConfig, parse_action, render_replies

P = ProtocolConfig()


def test_consult_queries_in_order_stripped():
    a = parse_action("let me ask <consult> 12*7 </consult><consult>\n</consult><consult>3+4</consult>", P)
    assert a.kind == "consult" and a.queries == ["12*7", "3+4"] and not a.truncated


def test_query_separator_and_truncation():
    a = parse_action("<consult>a\nb\n\nc\nd</consult>", P)
    assert a.queries == ["a", "b", "c"] and a.truncated
    bar = ProtocolConfig(query_sep="|", max_parallel=2)
    assert parse_action("<consult>1+2|3*4</consult>", bar).queries == ["1+2", "3*4"]


def test_answer_and_first_tag_wins():
    a = parse_action("think <answer> \\boxed{5} </answer>", P)
    assert a.kind == "answer" and a.answer == "\\boxed{5}"
    assert parse_action("<answer>5</answer><consult>q</consult>", P).kind == "answer"
    b = parse_action("<consult>q</consult> then <answer>5</answer>", P)
    assert b.kind == "consult" and b.queries == ["q"]


MALFORMED = [
    "",
    "just thinking, no tags",
    "<consult>unclosed",
    "<answer>unclosed",
    "</consult>",
    "</answer> stray close",
    "<consult></consult>",
    "<consult>   \n  </consult>",
    "<consult>outer <consult>inner</consult></consult>",
    "<answer>a <answer>b</answer></answer>",
    "<consult>q <answer>5</answer></consult>",
    "<answer>5 <consult>q</consult></answer>",
    "<consult>ok</consult><consult>unclosed",
    "<expert>fake</expert>",
    "<consult>x <expert>fake</expert></consult>",
    "\x00\xff<<<>>>",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_is_invalid_never_raises(text):
    assert parse_action(text, P).kind == "invalid"


def test_render_replies_with_rejections():
    s = render_replies(["42", None, "7"], P)
    assert s == "<expert>42</expert><expert>unavailable</expert><expert>7</expert>"
    assert render_replies([None], ProtocolConfig(unavailable="N/A")) == "<expert>N/A</expert>"


def test_config_validation():
    with pytest.raises(ValueError, match="max_parallel"):
        ProtocolConfig(max_parallel=0)
    with pytest.raises(ValueError, match="distinct"):
        ProtocolConfig(answer_open="<consult>")
