"""`python -m eapo_ray.expert scale`: change a running run's expert replica bounds, as an
operator expects.

- Only the autoscaling bounds change; the replicas that serve keep serving (no model reload).
  Serve restarts a replica when its code version, actor options or placement change
  (ray/serve/_private/version.py: DeploymentVersion.requires_actor_restart), and a Python
  `serve.run` draws a fresh code version every time (client.deploy_applications:
  `version=deployment._version or get_random_string()`). So the app is NOT rebuilt: its
  deployment as Serve holds it (replica config, code version, deployment config) is read from
  Serve's controller and sent back with only autoscaling_config's min/max changed, the same code
  version and the same replica config: an in-place update (autoscaling_config is a
  NeedsActorReconfigure option: replicas are reconfigured, not restarted).
- The app is found from the Ray address (`--address` or RAY_ADDRESS) and the run's name
  (`--run-name`; the app is <run>-expert); no run directory is needed (`--run-dir` still works:
  its config.json names the run, its ray_address the cluster).
- It waits until the deployment runs a replica count inside the new bounds and is HEALTHY, and
  exits 1 when that does not happen in `--timeout` seconds (the bounds stay set: Serve keeps trying).
- The bounds it set survive a resume: they are recorded on the cluster (Ray's GCS key-value
  store, namespace "eapo", key expert_bounds/<run>) and in the run directory
  (<run>/expert_bounds.json) when this machine has it; the driver copies the cluster's record
  into the run directory at each checkpoint, and a resumed run starts its expert with the newest
  record (printed) instead of its config's bounds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

KV_NAMESPACE = "eapo"
RECORD_FILE = "expert_bounds.json"
DEPLOYMENT = "expert"


def kv_key(run_name: str) -> bytes:
    return f"expert_bounds/{run_name}".encode()


# ---- the record of the bounds set (survives a resume) ----

def write_record(run_name: str, min_replicas: int, max_replicas: int, run_dir: Path | None = None) -> dict:
    """On the cluster (needs a Ray connection) and in `run_dir` when given and present here."""
    from ray.experimental import internal_kv

    rec = {"min_replicas": min_replicas, "max_replicas": max_replicas, "set_at": time.time()}
    internal_kv._internal_kv_put(kv_key(run_name), json.dumps(rec).encode(), overwrite=True, namespace=KV_NAMESPACE)
    if run_dir is not None and Path(run_dir).is_dir():
        _write_file(Path(run_dir) / RECORD_FILE, rec)
    return rec


def _write_file(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    tmp.replace(path)


def _kv_record(run_name: str) -> dict | None:
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(kv_key(run_name), namespace=KV_NAMESPACE)
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 -- no record on this cluster
        return None


def _file_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def newest_record(run_name: str, run_dir: Path) -> dict | None:
    recs = [r for r in (_kv_record(run_name), _file_record(run_dir)) if r]
    return max(recs, key=lambda r: r.get("set_at", 0.0)) if recs else None


def mirror_record(run_name: str, run_dir: Path) -> None:
    """Driver, at a checkpoint: the cluster's record (set by `scale` from anywhere) into the run directory."""
    kv = _kv_record(run_name)
    if kv and kv != _file_record(run_dir):
        _write_file(Path(run_dir) / RECORD_FILE, kv)


def start_bounds(cfg, run_name: str, run_dir: Path) -> None:
    """Driver, before the expert app is deployed: a resumed run takes the newest bounds `scale` set
    (cfg.expert changed in place, and printed); a new run clears a stale record of its name."""
    if not cfg.resume:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(kv_key(run_name), namespace=KV_NAMESPACE)
        return
    rec = newest_record(run_name, run_dir)
    if not rec:
        return
    e = cfg.expert
    old = (e.min_replicas, e.max_replicas)
    e.min_replicas, e.max_replicas = int(rec["min_replicas"]), int(rec["max_replicas"])
    print(f"[eapo] expert replicas {e.min_replicas}-{e.max_replicas}, as `python -m eapo_ray.expert scale` set them "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rec.get('set_at', 0)))} (the config says "
          f"{old[0]}-{old[1]}; delete {Path(run_dir) / RECORD_FILE} to go back to it)", flush=True)


# ---- the in-place update ----

def _controller():
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def set_bounds(app: str, min_replicas: int, max_replicas: int) -> tuple[int, int]:
    """Redeploy `app`'s expert deployment as Serve holds it, with only the autoscaling bounds
    changed (same code version and replica config: no replica restarts). Returns the old bounds."""
    import ray
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.generated.serve_pb2 import ApplicationArgs, DeploymentArgs, DeploymentRoute

    ctl = _controller()
    info = DeploymentRoute.FromString(ray.get(ctl.get_deployment_info.remote(DEPLOYMENT, app), timeout=60)).deployment_info
    dc = DeploymentConfig.from_proto(info.deployment_config)
    if dc.autoscaling_config is None:
        raise ValueError(f"the deployment {DEPLOYMENT!r} of app {app!r} is not autoscaled")
    old = (dc.autoscaling_config.min_replicas, dc.autoscaling_config.max_replicas)
    dc.autoscaling_config.min_replicas, dc.autoscaling_config.max_replicas = min_replicas, max_replicas
    dc.version = info.version  # the same code version: an in-place (lightweight) update
    args = DeploymentArgs(deployment_name=DEPLOYMENT, deployment_config=dc.to_proto_bytes(),
                          replica_config=info.replica_config.SerializeToString(),
                          deployer_job_id=ray.get_runtime_context().get_job_id(), ingress=True)
    app_args = ApplicationArgs(external_scaler_enabled=ray.get(ctl.get_external_scaler_enabled.remote(app), timeout=60))
    ray.get(ctl.deploy_applications.remote({app: [args.SerializeToString()]}, {app: app_args.SerializeToString()}),
            timeout=60)
    return old


def replicas(app: str) -> dict:
    """Replica id -> state of `app`'s expert deployment (Serve's own instance details)."""
    import ray

    details = ray.get(_controller().get_serve_instance_details.remote(), timeout=60)
    dep = details["applications"][app]["deployments"][DEPLOYMENT]
    return {r["replica_id"]: str(r["state"]).split(".")[-1] for r in dep["replicas"]}


def wait_bounds(app: str, min_replicas: int, max_replicas: int, timeout_s: float) -> tuple[bool, dict]:
    """Until the deployment is HEALTHY with a RUNNING replica count inside the bounds (True), or
    `timeout_s` passes (False). Returns the replica states by count."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        dep = serve.status().applications[app].deployments[DEPLOYMENT]
        states = {str(k).split(".")[-1]: v for k, v in dep.replica_states.items()}
        running = states.get("RUNNING", 0)
        ok = str(dep.status).endswith("HEALTHY") and min_replicas <= running <= max_replicas and len(states) == 1
        if ok or time.monotonic() > deadline:
            return ok, states
        time.sleep(0.5)


def scale(run_name: str, min_replicas: int, max_replicas: int, address: str, run_dir: Path | None = None,
          timeout_s: float = 300.0) -> tuple[bool, dict, tuple[int, int]]:
    import ray
    from ray import serve

    from eapo_ray.config import ConfigError

    if not 1 <= min_replicas <= max_replicas:
        raise ConfigError(f"--min {min_replicas} --max {max_replicas}: must satisfy 1 <= min <= max")
    # Ray 2.60 clusters use token auth: run with RAY_AUTH_MODE=token (token in ~/.ray/auth_token);
    # Ray reads it when imported, so it cannot be set from here
    ray.init(address=address, logging_level="WARNING", namespace="eapo-expert-scale")
    try:
        app = f"{run_name}-expert"
        if app not in serve.status().applications:
            raise ConfigError(f"no Serve app {app!r} on the cluster at {address} "
                              f"(apps: {sorted(serve.status().applications)})")
        old = set_bounds(app, min_replicas, max_replicas)
        write_record(run_name, min_replicas, max_replicas, run_dir)
        ok, states = wait_bounds(app, min_replicas, max_replicas, timeout_s)
        return ok, states, old
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    import argparse

    from eapo_ray.config import ConfigError

    ap = argparse.ArgumentParser(prog="python -m eapo_ray.expert")
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scale", help="change the replica bounds of a running run's expert (no replica restarts)")
    sc.add_argument("--run-name", default=None, help="the run's name (its Serve app is <run-name>-expert)")
    sc.add_argument("--run-dir", default=None, help="or the run directory: its config names the run and the cluster")
    sc.add_argument("--min", type=int, required=True, dest="min_replicas")
    sc.add_argument("--max", type=int, required=True, dest="max_replicas")
    sc.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else the run dir's record)")
    sc.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the new bounds (exit 1 past it)")
    args = ap.parse_args(argv)
    try:
        rd = Path(args.run_dir).resolve() if args.run_dir else None
        if rd is not None and not (rd / "config.json").exists():
            raise ConfigError(f"{rd} is not a run directory (no config.json)")
        run_name = args.run_name or (json.loads((rd / "config.json").read_text()).get("run_name") or rd.name if rd else None)
        if not run_name:
            raise ConfigError("name the run: --run-name NAME (or --run-dir DIR)")
        addr = args.address or os.environ.get("RAY_ADDRESS") or (
            (rd / "ray_address").read_text().strip() if rd and (rd / "ray_address").exists() else None)
        if not addr:
            raise ConfigError("no Ray address: pass --address (or set RAY_ADDRESS, or --run-dir of a run that recorded it)")
        ok, states, old = scale(run_name, args.min_replicas, args.max_replicas, addr, rd, args.timeout)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ok:
        print(f"error: expert replicas of {run_name!r} not within {args.min_replicas}-{args.max_replicas} after "
              f"{args.timeout:g} s: {states} (the bounds stay set; Serve keeps trying)", file=sys.stderr)
        return 1
    print(f"expert replicas {old[0]}-{old[1]} -> {args.min_replicas}-{args.max_replicas}: {states}")
    return 0
