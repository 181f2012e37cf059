"""The expert: a Ray Serve deployment, autoscaled on ongoing requests, answering the
policy's sub-questions. Requests are batched per replica (`serve.batch`) and run on the
same Engine interface as the rollout policy.

``python -m eapo_ray.expert scale --run-dir runs/<run> --min A --max B`` changes the replica
bounds of a running run's expert (Serve redeploys it; training goes on, queries that miss
the switch read "unavailable")."""
from __future__ import annotations

import asyncio

import torch
from ray import serve

from eapo_ray.algo.protocol import ExpertReply
from eapo_ray.config import ExpertConfig
from eapo_ray.data import render_prompt
from eapo_ray.rollout.factory import make_engine


class Expert:
    def __init__(self, model_path: str, cfg: ExpertConfig, answer_logprobs: bool = True):
        """`answer_logprobs`: compute the answer tokens' log-probs under the expert (a teacher-forced
        forward per batch of queries: 36-42% of the tiny expert's CPU per call, measured with
        `python benchmarks/components.py --parts expert`). Only the LUFFY-style channel reads them,
        so the launcher turns them off otherwise (the replies' text and token ids are the same)."""
        torch.set_num_threads(cfg.torch_threads)
        self.cfg, self.answer_logprobs = cfg, answer_logprobs
        self.engine = make_engine(cfg.engine, model_path, cfg.vllm)
        self.tok = self.engine.tokenizer
        self._batched.set_max_batch_size(cfg.max_batch_size)

    def answer_now(self, queries: list[str]) -> list[str]:
        """The replies as the policy reads them (plain text; evaluation and make_tiny use this)."""
        return [r.text for r in self.answer_full(queries)]

    def answer_full(self, queries: list[str]) -> list[ExpertReply]:
        """The replies with the span of the expert's own answer in each (the echoed query and
        the template around it are not the expert's) and the answer's token log-probs under the
        expert (the LUFFY-style channel's behaviour probabilities, algo.losses.luffy_loss)."""
        prompts = [self.tok(render_prompt(self.cfg.template, q))["input_ids"] for q in queries]
        gens = self.engine.generate(prompts, [self.cfg.max_new_tokens] * len(prompts), self.cfg.temperature, [])
        logps = self._answer_logprobs(prompts, gens) if self.answer_logprobs else [None] * len(gens)
        out = []
        for q, g, lp in zip(queries, gens, logps):
            answer = self.tok.decode(g.tokens, skip_special_tokens=True).strip()
            pieces = [self.tok.decode([t], skip_special_tokens=True) for t in g.tokens]
            # the tokens that make up the stripped answer: drop special/whitespace-only ones at either end
            keep = [i for i, p in enumerate(pieces) if p.strip()]
            lo, hi = (keep[0], keep[-1] + 1) if keep else (0, 0)
            texts = pieces[lo:hi]
            lps = lp[lo:hi] if lp is not None else None
            if self.cfg.reverse_answer:  # the model writes the answer's characters last-first (tiny_mul experts)
                answer, texts, lps = answer[::-1], texts[::-1], (lps[::-1] if lps is not None else None)
            if "".join(texts).strip() != answer or lps is None:  # tokens do not add up to the answer: no log-probs
                texts, lps = None, None
            # the template split once at its (validated) {answer}: a query that itself contains
            # "{answer}" is copied as is, and the span marks the expert's answer exactly
            before, _, after = self.cfg.reply_template.partition("{answer}")
            head = before.replace("{query}", q)
            text = head + answer + after.replace("{query}", q)
            out.append(ExpertReply(text, len(head), len(head) + len(answer), texts, lps))
        return out

    def _answer_logprobs(self, prompts, gens) -> list:
        """Log-probs of each generated token under the expert at T=1 (the model's own
        distribution, not the greedy decode's point mass), teacher-forced in one forward pass;
        None per reply when the engine has no in-process model (vLLM: sampled log-probs at
        the expert's temperature, or None when greedy)."""
        model = getattr(self.engine, "model", None)
        if model is None or not hasattr(model, "forward"):
            return [g.logprobs if self.cfg.temperature > 0 else None for g in gens]
        seqs = [p + g.tokens for p, g in zip(prompts, gens)]
        n = max(len(x) for x in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], attn[i, :len(x)] = torch.tensor(x), 1
        dev = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids.to(dev)[:, 1:, None]).squeeze(-1).cpu()
        return [lp[i, len(p) - 1: len(p) - 1 + len(g.tokens)].tolist() for i, (p, g) in enumerate(zip(prompts, gens))]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, queries: list[str]) -> list[ExpertReply]:
        return await asyncio.to_thread(self.answer_full, queries)

    async def __call__(self, query: str) -> ExpertReply:
        answer = await self._batched(query)
        if self.cfg.added_latency_s > 0:  # benchmarks only: a slower (remote, bigger) expert, as pure latency
            await asyncio.sleep(self.cfg.added_latency_s)
        return answer


def replica_options(cfg: ExpertConfig) -> dict:
    """Ray resources of one replica. A vLLM expert with tensor parallelism gets a placement
    group (one CPU bundle for the replica, one GPU bundle per shard), as Ray Serve LLM does;
    `node_resource` pins replicas to nodes that advertise it (the expert's own node group)."""
    actor = {"num_cpus": cfg.num_cpus}
    if cfg.node_resource:
        actor["resources"] = {cfg.node_resource: 0.001}
    tp = cfg.vllm.tensor_parallel_size if cfg.engine == "vllm" else 1
    if tp > 1:
        node = {cfg.node_resource: 0.001} if cfg.node_resource else {}
        return {"ray_actor_options": actor,
                "placement_group_bundles": [{"CPU": cfg.num_cpus, **node}] + [{"GPU": 1.0, **node}] * tp,
                "placement_group_strategy": "STRICT_PACK"}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    return {"ray_actor_options": actor}


def expert_app(model_path: str, cfg: ExpertConfig, name: str = "expert", answer_logprobs: bool = True):
    """The bound Serve application; autoscaling_config comes from the run config (expert.min_replicas,
    max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s, look_back_period_s).
    `answer_logprobs`: see Expert (a run needs them when algo.expert_token_channel is "luffy")."""
    dep = serve.deployment(
        Expert, name=name, max_ongoing_requests=cfg.max_batch_size * 2, **replica_options(cfg),
        # a replica being stopped (teardown, downscaling) checks every 0.25 s, not Serve's 2 s, for
        # requests still running: a run's teardown measured 3.0 s -> 1.0 s for the delete
        graceful_shutdown_wait_loop_s=0.25,
        autoscaling_config={
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
        },
    )
    return dep.bind(model_path, cfg, answer_logprobs)


def run_expert_app(cfg, model_path: str, name: str = "expert"):
    """`expert_app` for a run (RunConfig `cfg`): the answers' log-probs only when the run trains on
    them (algo.expert_token_channel "luffy")."""
    return expert_app(model_path, cfg.expert, name, answer_logprobs=cfg.algo.expert_token_channel == "luffy")


def scale(run_dir: str, min_replicas: int, max_replicas: int, address: str | None = None,
          timeout_s: float = 300.0) -> dict:
    """Redeploy run `run_dir`'s expert app with new autoscaling bounds, on the cluster the run
    recorded (`<run_dir>/ray_address`), and wait until it is RUNNING. Returns the app's
    replica counts by state."""
    import json
    import os
    import time
    from pathlib import Path

    import ray

    from eapo_ray.config import ConfigError, RunConfig, from_dict, validate

    rd = Path(run_dir).resolve()
    if not (rd / "config.json").exists():
        raise ConfigError(f"{rd} is not a run directory (no config.json)")
    cfg = from_dict(RunConfig, json.loads((rd / "config.json").read_text()))
    cfg.expert.min_replicas, cfg.expert.max_replicas = min_replicas, max_replicas
    validate(cfg)
    run_name = cfg.run_name or rd.name
    addr = address or os.environ.get("RAY_ADDRESS") or (
        (rd / "ray_address").read_text().strip() if (rd / "ray_address").exists() else None)
    if not addr:
        raise ConfigError(f"no Ray address: pass --address (or set RAY_ADDRESS); {rd}/ray_address is missing")
    # Ray 2.60 clusters use token auth: run with RAY_AUTH_MODE=token (token in ~/.ray/auth_token);
    # Ray reads it when imported, so it cannot be set from here
    ray.init(address=addr, logging_level="WARNING")
    try:
        app = f"{run_name}-expert"
        if app not in serve.status().applications:
            raise ConfigError(f"no Serve app {app!r} on the cluster at {addr}")
        from eapo_ray.models import resolve_model

        serve.run(run_expert_app(cfg, resolve_model(cfg.model.expert)), name=app, route_prefix=None,
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        t0 = time.time()
        while True:
            st = serve.status().applications[app]
            dep = st.deployments["expert"]
            if str(st.status).endswith("RUNNING") or time.time() - t0 > timeout_s:
                return {str(k).split(".")[-1]: v for k, v in dep.replica_states.items()}
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    import argparse
    import sys

    from eapo_ray.config import ConfigError

    ap = argparse.ArgumentParser(prog="python -m eapo_ray.expert")
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scale", help="change the replica bounds of a running run's expert")
    sc.add_argument("--run-dir", required=True, help="the run directory (runs/<run>)")
    sc.add_argument("--min", type=int, required=True, dest="min_replicas")
    sc.add_argument("--max", type=int, required=True, dest="max_replicas")
    sc.add_argument("--address", default=None, help="Ray address (default: the run's recorded one)")
    args = ap.parse_args(argv)
    try:
        states = scale(args.run_dir, args.min_replicas, args.max_replicas, args.address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"expert replicas {args.min_replicas}-{args.max_replicas}: {states}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
