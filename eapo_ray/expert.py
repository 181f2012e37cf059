"""The expert: a Ray Serve deployment, autoscaled on ongoing requests, answering the
policy's sub-questions. Requests are batched per replica (`serve.batch`) and run on the
same Engine interface as the rollout policy.

``python -m eapo_ray.expert scale --run-name <run> --address <ray> --min A --max B`` changes the
replica bounds of a running run's expert in place (eapo_ray/expert_scale.py: the same replicas
keep serving). With `expert.engine: openai` the replicas call an OpenAI-compatible server
(eapo_ray/expert_http.py) instead of loading model.expert."""
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
        self.remote = None
        if cfg.engine == "openai":  # an OpenAI-compatible server answers; nothing is loaded here
            from eapo_ray.expert_http import OpenAIExpert

            self.remote = OpenAIExpert(cfg, logprobs=answer_logprobs, on_failure=_endpoint_failure_metric())
            self.engine = self.tok = None
            return
        self.engine = make_engine(cfg.engine, model_path, cfg.vllm)
        self.tok = self.engine.tokenizer
        self._batched.set_max_batch_size(cfg.max_batch_size)

    def answer_now(self, queries: list[str]) -> list[str]:
        """The replies as the policy reads them (plain text; evaluation and make_tiny use this)."""
        return [r.text if r is not None else None for r in self.answer_full(queries)]

    def answer_full(self, queries: list[str]) -> list[ExpertReply]:
        """The replies with the span of the expert's own answer in each (the echoed query and
        the template around it are not the expert's) and the answer's token log-probs under the
        expert (the LUFFY-style channel's behaviour probabilities, algo.losses.luffy_loss)."""
        if self.remote is not None:  # evaluation / tools outside Serve: one event loop for the batch
            return asyncio.run(self._remote_many(queries))
        prompts = [self.tok(render_prompt(self.cfg.template, q))["input_ids"] for q in queries]
        gens = self.engine.generate(prompts, [self.cfg.max_new_tokens] * len(prompts), self.cfg.temperature, [])
        logps = self._answer_logprobs(prompts, gens) if self.answer_logprobs else [None] * len(gens)
        out = []
        for q, g, lp in zip(queries, gens, logps):
            answer = self.tok.decode(g.tokens, skip_special_tokens=True).strip()
            pieces = [self.tok.decode([t], skip_special_tokens=True) for t in g.tokens]
            out.append(make_reply(self.cfg, q, answer, pieces, lp))
        return out

    async def _remote_many(self, queries: list[str]) -> list[ExpertReply | None]:
        """None for a query the endpoint did not answer (the caller reads "unavailable")."""
        from eapo_ray.expert_http import ExpertUnavailable

        async def one(q):
            try:
                return await self._remote_one(q)
            except ExpertUnavailable:
                return None
        try:
            return list(await asyncio.gather(*[one(q) for q in queries]))
        finally:
            await self.remote.close()

    async def _remote_one(self, query: str) -> ExpertReply:
        a = await self.remote.answer(render_prompt(self.cfg.template, query))  # raises ExpertUnavailable
        return make_reply(self.cfg, query, a.text.strip(), a.token_texts, a.token_logprobs)

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
        # a remote server batches by itself (continuous batching): each query is its own request, at most
        # expert.max_concurrency in flight; one it cannot answer raises (the policy reads "unavailable")
        answer = await (self._remote_one(query) if self.remote is not None else self._batched(query))
        if self.cfg.added_latency_s > 0:  # benchmarks only: a slower (remote, bigger) expert, as pure latency
            await asyncio.sleep(self.cfg.added_latency_s)
        return answer


def make_reply(cfg: ExpertConfig, query: str, answer: str, pieces: list[str] | None, lp) -> ExpertReply:
    """The reply shown to the policy (expert.reply_template around the stripped `answer`), with the
    answer's tokens (`pieces`, their texts) and their log-probs `lp` when they add up to it."""
    texts = lps = None
    if pieces is not None:
        # the tokens that make up the stripped answer: drop special/whitespace-only ones at either end
        keep = [i for i, p in enumerate(pieces) if p.strip()]
        lo, hi = (keep[0], keep[-1] + 1) if keep else (0, 0)
        texts = pieces[lo:hi]
        lps = lp[lo:hi] if lp is not None else None
    if cfg.reverse_answer:  # the model writes the answer's characters last-first (tiny_mul experts)
        answer = answer[::-1]
        texts, lps = (texts[::-1] if texts is not None else None), (lps[::-1] if lps is not None else None)
    if texts is None or "".join(texts).strip() != answer or lps is None:  # tokens do not add up: no log-probs
        texts, lps = None, None
    # the template split once at its (validated) {answer}: a query that itself contains
    # "{answer}" is copied as is, and the span marks the expert's answer exactly
    before, _, after = cfg.reply_template.partition("{answer}")
    head = before.replace("{query}", query)
    text = head + answer + after.replace("{query}", query)
    return ExpertReply(text, len(head), len(head) + len(answer), texts, lps)


def _endpoint_failure_metric():
    """A callback counting a remote expert's failed queries by reason (eapo_expert_endpoint_failures),
    tagged with the run (the app is <run>-expert)."""
    try:
        app = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 -- outside Serve (evaluation, tools): no metric
        return None
    from eapo_ray import metrics

    run = app.removesuffix("-expert")
    return lambda reason: metrics.expert_endpoint_failure(run, reason)


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


def main(argv=None) -> int:
    """`python -m eapo_ray.expert scale ...` (eapo_ray/expert_scale.py)."""
    from eapo_ray.expert_scale import main as scale_main

    return scale_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
