"""The run's metrics in the Ray dashboard: `ray.util.metrics` Counters, Gauges and Histograms,
every one tagged with the run name (`run`), exported by each node's metrics agent to
Prometheus (Ray prefixes the names with ``ray_``: ``eapo_buffer_size`` is scraped as
``ray_eapo_buffer_size``). `cluster/grafana_eapo.json` (made by `python -m eapo_ray.metrics
grafana`) charts them.

Callers use the thin helpers below (`rollout_batch`, `train_step`, `heldout`, `expert_query`);
each creates its metric objects once per process. Where they are recorded:
the driver (rollout, buffer, learner and held-out numbers, from the small stats records it
already receives) and the rollout actors (expert latency and queries in flight, as the policy
sees them). A metric is never allowed to break a run: failures are swallowed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
STEP_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
STALENESS = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5]  # integer versions: bucket k+0.5 counts staleness <= k

# name -> (kind, description, extra tag keys besides "run", histogram boundaries)
SPECS: dict[str, tuple[str, str, tuple[str, ...], list | None]] = {
    "eapo_expert_latency_s": ("histogram", "Expert query latency seen by a rollout actor (queue + answer), s", ("actor",), LATENCY_S),
    "eapo_expert_inflight_queries": ("gauge", "Expert queries in flight from a rollout actor (its queue at the expert)", ("actor",), None),
    "eapo_expert_endpoint_failures": ("counter", "Queries an OpenAI-compatible expert endpoint did not answer after retries, by reason (timeout, connection, http_429, http_500, deadline, ...)", ("reason",), None),
    "eapo_expert_unavailable": ("gauge", "Expert queries answered 'unavailable' (timeout, dead replica) so far", ("actor",), None),
    "eapo_rollout_tokens_per_s": ("gauge", "Response tokens generated per second by a rollout actor (last batch)", ("actor",), None),
    "eapo_rollout_episodes_per_s": ("gauge", "Episodes finished per second by a rollout actor (last batch)", ("actor",), None),
    "eapo_rollout_batches_total": ("counter", "Rollout batches returned to the driver", ("actor",), None),
    "eapo_rollout_failures": ("gauge", "Rollout calls that failed so far (actor died, restarting, error)", ("actor",), None),
    "eapo_weight_version": ("gauge", "Policy version a rollout actor generated its last batch with", ("actor",), None),
    "eapo_consult_rate": ("gauge", "Fraction of episodes that consulted the expert (last batch)", (), None),
    "eapo_acceptance_prob": ("gauge", "Scheduled probability of accepting an expert query", (), None),
    "eapo_reward": ("gauge", "Mean reward of the last rollout batch", (), None),
    "eapo_buffer_size": ("gauge", "Batches in the trajectory buffer", (), None),
    "eapo_staleness": ("histogram", "Policy versions between a trained batch and the learner", (), STALENESS),
    "eapo_dropped_stale_batches": ("gauge", "Batches dropped by the buffer as too stale so far", (), None),
    "eapo_lost_batches": ("gauge", "Batches the learner could not read (object lost) so far", (), None),
    "eapo_rolled_back_batches": ("gauge", "Batches trained on, then thrown away by a learner rebuild from an older checkpoint, so far", (), None),
    "eapo_dropped_discarded_batches": ("gauge", "Batches made by a policy a learner rebuild discarded, dropped so far", (), None),
    "eapo_learner_step_s": ("histogram", "Learner train step time, s", (), STEP_S),
    "eapo_learner_version": ("gauge", "Policy version of the learner (steps done)", (), None),
    "eapo_heldout_accuracy": ("gauge", "Held-out accuracy of the policy alone", (), None),
}

# Cumulative counts are gauges (Ray's Counter cannot add 0, so a healthy run would never show them).
_made: dict = {}
_rollout_failures: dict = {}  # (run, actor) -> failed rollout calls so far (driver)


def _metric(name: str):
    m = _made.get(name)
    if m is None:
        from ray.util import metrics as rm

        kind, desc, tags, bounds = SPECS[name]
        keys = ("run",) + tags
        m = (rm.Histogram(name, desc, boundaries=bounds, tag_keys=keys) if kind == "histogram" else
             rm.Gauge(name, desc, tag_keys=keys) if kind == "gauge" else rm.Counter(name, desc, tag_keys=keys))
        _made[name] = m
    return m


def record(name: str, value: float, run: str, **tags) -> None:
    """Set a gauge, observe a histogram or add to a counter; never raises."""
    try:
        kind = SPECS[name][0]
        m, t = _metric(name), {"run": run or "-", **{k: str(v) for k, v in tags.items()}}
        if kind == "gauge":
            m.set(float(value), tags=t)
        elif kind == "histogram":
            m.observe(float(value), tags=t)
        elif value > 0:
            m.inc(float(value), tags=t)
    except Exception as e:  # noqa: BLE001 -- metrics must not break training
        print(f"[eapo] metric {name} not recorded: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def rollout_batch(run: str, stats: dict) -> None:
    """A rollout batch came back (RolloutWorker.produce's stats)."""
    a, secs = stats["worker"], max(stats.get("gen_seconds", 0.0), 1e-9)
    record("eapo_rollout_batches_total", 1, run, actor=a)
    record("eapo_rollout_failures", _rollout_failures.get((run, a), 0), run, actor=a)
    record("eapo_rollout_tokens_per_s", stats["response_len"] * stats["samples"] / secs, run, actor=a)
    record("eapo_rollout_episodes_per_s", stats["samples"] / secs, run, actor=a)
    record("eapo_weight_version", stats.get("engine_version", stats["version"]), run, actor=a)
    record("eapo_consult_rate", stats["consult_rate"], run)
    record("eapo_acceptance_prob", stats["acceptance_prob"], run)
    record("eapo_reward", stats["reward"], run)


def rollout_failure(run: str, worker: int) -> None:
    _rollout_failures[(run, worker)] = _rollout_failures.get((run, worker), 0) + 1
    record("eapo_rollout_failures", _rollout_failures[(run, worker)], run, actor=worker)


def train_step(run: str, version: int, stats: dict, buffer_stats: dict, lost_batches: int,
               rolled_back_batches: int = 0, discarded_batches: int = 0) -> None:
    """One learner step done (LearnerGroup.train_step's stats, TrajectoryBuffer.stats(), and so
    far: the batches lost, rolled back, and dropped by the driver as made by a discarded policy;
    the buffer's own such drops are added from `buffer_stats`)."""
    record("eapo_learner_version", version, run)
    record("eapo_rolled_back_batches", rolled_back_batches, run)
    record("eapo_dropped_discarded_batches", discarded_batches + buffer_stats.get("dropped_discarded", 0), run)
    record("eapo_learner_step_s", stats.get("train_seconds", 0.0), run)
    record("eapo_staleness", stats.get("staleness", 0), run)
    record("eapo_lost_batches", lost_batches, run)
    record("eapo_dropped_stale_batches", buffer_stats["dropped_stale"], run)
    record("eapo_buffer_size", buffer_stats["size"], run)


def heldout(run: str, accuracy: float) -> None:
    record("eapo_heldout_accuracy", accuracy, run)


def expert_query(run: str, actor: int, seconds: float, unavailable_so_far: int) -> None:
    record("eapo_expert_latency_s", seconds, run, actor=actor)
    record("eapo_expert_unavailable", unavailable_so_far, run, actor=actor)


def expert_endpoint_failure(run: str, reason: str) -> None:
    """An expert replica gave up on a query to its HTTP endpoint (expert.engine: openai)."""
    record("eapo_expert_endpoint_failures", 1, run, reason=reason)


def expert_inflight(run: str, actor: int, n: int) -> None:
    record("eapo_expert_inflight_queries", n, run, actor=actor)


def prometheus_names() -> list[str]:
    """The names as Prometheus shows them (histograms: their _bucket/_sum/_count series)."""
    return [f"ray_{n}" for n in SPECS]


def grafana_dashboard() -> dict:
    """A Grafana dashboard over the Prometheus datasource Ray's own dashboards use, one panel
    per metric, with a `run` variable (Ray generates its dashboards from Python the same way)."""
    panels = []
    for i, (name, (kind, desc, tags, _)) in enumerate(SPECS.items()):
        sel = '{run=~"$run"}'
        by = ", ".join(("run",) + tags)
        legend = " ".join("{{%s}}" % k for k in ("run",) + tags)
        if kind == "histogram":
            targets = [{"expr": f"histogram_quantile({q}, sum(rate(ray_{name}_bucket{sel}[5m])) by (le, {by}))",
                        "legendFormat": f"p{int(q * 100)} {legend}"} for q in (0.5, 0.95)]
        elif kind == "counter":
            targets = [{"expr": f"sum(rate(ray_{name}{sel}[5m])) by ({by})", "legendFormat": legend}]
        else:
            targets = [{"expr": f"max(ray_{name}{sel}) by ({by})", "legendFormat": legend}]
        for j, t in enumerate(targets):
            t["refId"] = chr(ord("A") + j)
        panels.append({"id": i + 1, "type": "timeseries", "title": name.removeprefix("eapo_"), "description": desc,
                       "datasource": "${datasource}", "targets": targets,
                       "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}})
    return {
        "title": "EAPO run", "uid": "eapo-run", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["eapo", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "run", "type": "query", "datasource": "${datasource}", "label": "Run",
             "query": {"query": "label_values(ray_eapo_learner_version, run)", "refId": "run"},
             "definition": "label_values(ray_eapo_learner_version, run)", "includeAll": True, "multi": True,
             "allValue": ".*", "refresh": 2},
        ]},
        "panels": panels,
    }


DASHBOARD_PATH = Path(__file__).resolve().parent.parent / "cluster" / "grafana_eapo.json"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eapo_ray.metrics", description="Write the Grafana dashboard JSON.")
    ap.add_argument("command", choices=["grafana"])
    ap.add_argument("--out", default=str(DASHBOARD_PATH))
    args = ap.parse_args(argv)
    Path(args.out).write_text(json.dumps(grafana_dashboard(), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
