"""The cluster manifests (cluster/) and the GPU configs (configs/gpu_*.yaml) agree with each other
and with eapo_ray's config schema. Fast: YAML parsing and config loading only, no Ray start."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eapo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
GPU_CONFIGS = ["configs/gpu_paper_7b_32b.yaml", "configs/gpu_node8_1p5b.yaml"]
LAUNCH = re.compile(r"python -m eapo_ray\.launch --config ([\w./-]+)")


def yaml_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(CLUSTER.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def kind_of(doc: dict) -> str:
    if doc.get("apiVersion", "").startswith("ray.io/"):
        return doc.get("kind", "?")
    if "available_node_types" in doc and "provider" in doc:
        return "launcher"
    if "pip" in doc:
        return "runtime_env"
    return "unknown"


def docs_of(kind: str) -> list[tuple[Path, dict]]:
    found = [(p, d) for p, d in yaml_docs() if kind_of(d) == kind]
    assert found, f"no {kind} manifest under cluster/"
    return found


def config_for(path: Path):
    """The run config a manifest is for: the one its launch command (entrypoint or comment) names."""
    paths = set(LAUNCH.findall(path.read_text()))
    assert len(paths) == 1, f"{path.name}: expected one `python -m eapo_ray.launch --config X`, found {paths}"
    return load_config(ROOT / paths.pop())


def parse_ray_resources(value: str) -> dict:
    """rayStartParams.resources as KubeRay documents it: '"{\\"name\\": 1}"' (a quoted, escaped JSON)."""
    s = value.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1]
    return json.loads(s.replace('\\"', '"'))


def gpus(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def ray_cluster_specs():
    for path, doc in docs_of("RayCluster"):
        yield path, doc["spec"]
    for path, doc in docs_of("RayJob"):
        yield path, doc["spec"]["rayClusterSpec"]


# ---- every launch command in cluster/ and docs/ names a config that exists and loads ----

def test_every_launch_command_names_a_loadable_config():
    texts = list(CLUSTER.rglob("*.y*ml")) + [CLUSTER / "README.md", ROOT / "docs" / "gpu.md"]
    seen = set()
    for path in texts:
        for cfg_path in LAUNCH.findall(path.read_text()):
            assert (ROOT / cfg_path).is_file(), f"{path.name} runs a config that does not exist: {cfg_path}"
            load_config(ROOT / cfg_path)
            seen.add(cfg_path)
    assert "configs/gpu_paper_7b_32b.yaml" in seen


def test_no_unknown_yaml_in_cluster():
    unknown = [p.name for p, d in yaml_docs() if kind_of(d) == "unknown"]
    assert not unknown, f"YAML under cluster/ that this test does not check: {unknown}"


# ---- KubeRay ----

def test_kuberay_api_version_and_kind():
    for path, doc in docs_of("RayCluster") + docs_of("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1", path.name
        assert doc["kind"] in ("RayCluster", "RayJob"), path.name
        assert doc["metadata"]["name"], path.name


def test_rayjob_entrypoint_runs_the_launcher():
    for path, doc in docs_of("RayJob"):
        m = re.fullmatch(r"python -m eapo_ray\.launch --config (\S+)( \S+=\S+)*", doc["spec"]["entrypoint"].strip())
        assert m, f"{path.name}: entrypoint {doc['spec']['entrypoint']!r}"
        cfg = load_config(ROOT / m.group(1))
        assert cfg.expert.node_resource, "the cluster manifests are for a config that pins the expert"
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env.get("working_dir"), "the entrypoint's config path is relative to the repository: needs working_dir"


def test_kuberay_expert_group_advertises_the_node_resource_and_scales():
    for path, spec in ray_cluster_specs():
        cfg = config_for(path)
        ec = cfg.expert
        assert spec["enableInTreeAutoscaling"] is True, path.name
        assert spec["rayVersion"].startswith("2.60"), path.name
        expert, others = [], []
        for g in spec["workerGroupSpecs"]:
            res = g.get("rayStartParams", {}).get("resources")
            (expert if res and ec.node_resource in parse_ray_resources(res) else others).append(g)
        assert len(expert) == 1, f"{path.name}: expected one worker group advertising '{ec.node_resource}'"
        g = expert[0]
        per_pod = gpus(g) // int(ec.num_gpus)
        assert per_pod >= 1, f"{path.name}: an expert pod must fit one {ec.num_gpus}-GPU replica"
        assert parse_ray_resources(g["rayStartParams"]["resources"])[ec.node_resource] >= per_pod
        assert g["minReplicas"] < g["maxReplicas"], f"{path.name}: the expert group must be able to scale"
        assert g["maxReplicas"] * per_pod >= ec.max_replicas, f"{path.name}: expert.max_replicas does not fit"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        train_gpus = sum(gpus(o) * o["maxReplicas"] for o in others)
        need = (cfg.learner.num_learners * cfg.learner.num_gpus + cfg.rollout.num_actors * cfg.rollout.num_gpus
                + cfg.eval.num_gpus)
        assert train_gpus >= need, f"{path.name}: {train_gpus} non-expert GPUs < {need} for learners + rollout"
        assert all(gpus(o) >= max(cfg.learner.num_gpus, cfg.rollout.num_gpus) for o in others)


def test_kuberay_gpu_groups_request_gpus_and_head_does_not():
    for path, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {}), path.name
        for g in spec["workerGroupSpecs"]:
            c = g["template"]["spec"]["containers"][0]
            assert gpus(g) >= 1, f"{path.name}: group {g['groupName']} has no nvidia.com/gpu limit"
            req = c["resources"].get("requests", {}).get("nvidia.com/gpu")
            assert req is None or int(req) == gpus(g), f"{path.name}: GPU requests != limits in {g['groupName']}"
            assert c["image"].startswith("rayproject/ray:2.60") and "gpu" in c["image"], c["image"]


def test_rayjob_cluster_matches_the_raycluster():
    (_, rc), (_, rj) = docs_of("RayCluster")[0], docs_of("RayJob")[0]
    assert rj["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


def test_runtime_env_covers_the_project_dependencies():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    name = lambda spec: re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    envs = [d for _, d in docs_of("runtime_env")]
    envs += [yaml.safe_load(d["spec"]["runtimeEnvYAML"]) for _, d in docs_of("RayJob")]
    for env in envs:
        have = {name(p) for p in env["pip"]}
        missing = {name(d) for d in deps} - have - {"torch"}  # torch comes with vllm
        assert not missing, f"runtime env lacks {missing}"
        assert any(re.fullmatch(r"vllm==0\.32\.\S*", p) for p in env["pip"]), "the vLLM engine is tested with 0.32"
    assert envs[0]["pip"] == envs[-1]["pip"], "runtime_env.yaml and rayjob.yaml install different packages"


# ---- Ray cluster launcher ----

def test_launcher_yaml_schema_and_node_types():
    for path, doc in docs_of("launcher"):
        schema_path = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
        if schema_path.exists():
            import jsonschema

            jsonschema.validate(doc, json.loads(schema_path.read_text()))
        cfg = config_for(path)
        ec = cfg.expert
        types = doc["available_node_types"]
        assert doc["head_node_type"] in types
        workers = {k: v for k, v in types.items() if k != doc["head_node_type"]}
        assert sum(v.get("max_workers", 0) for v in workers.values()) <= doc["max_workers"]
        expert = {k: v for k, v in workers.items() if ec.node_resource in v["resources"]}
        assert len(expert) == 1, f"one worker type must advertise '{ec.node_resource}'"
        assert ec.node_resource not in types[doc["head_node_type"]]["resources"]
        (et,) = expert.values()
        per_node = et["resources"]["GPU"] // int(ec.num_gpus)
        assert per_node >= 1 and et["resources"][ec.node_resource] >= per_node
        assert et["max_workers"] * per_node >= ec.max_replicas
        assert et.get("min_workers", 0) < et["max_workers"], "the expert nodes must be able to scale"
        train = [v for k, v in workers.items() if k not in expert]
        need = (cfg.learner.num_learners * cfg.learner.num_gpus + cfg.rollout.num_actors * cfg.rollout.num_gpus
                + cfg.eval.num_gpus)
        assert sum(v["resources"].get("GPU", 0) * v["max_workers"] for v in train) >= need
        assert "eapo_ray" in " ".join(doc["setup_commands"]) and "pip install" in " ".join(doc["setup_commands"])
        assert doc["docker"]["image"].startswith("rayproject/ray:2.60")


# ---- placement: every node resource a config names is advertised, with room for its role ----

def node_groups(path: Path, doc: dict, kind: str) -> tuple[dict, list[tuple[str, dict, int]]]:
    """(the head's resources, [(group name, Ray resources of one node incl. GPU, max nodes)])."""
    if kind == "launcher":
        types = doc["available_node_types"]
        head = types[doc["head_node_type"]]["resources"]
        return head, [(k, v["resources"], v.get("max_workers", 0)) for k, v in types.items()
                      if k != doc["head_node_type"]]
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    res = lambda g: parse_ray_resources(g["rayStartParams"]["resources"]) if g.get(  # noqa: E731
        "rayStartParams", {}).get("resources") else {}
    return res(spec["headGroupSpec"]), [(g["groupName"], {**res(g), "GPU": gpus(g)}, g["maxReplicas"])
                                        for g in spec["workerGroupSpecs"]]


def role_demands(cfg) -> dict:
    """{node resource: [(role, actors, units of it each, GPUs each)]} for the roles that name one."""
    lc, r, e, ex = cfg.learner, cfg.rollout, cfg.eval, cfg.expert
    out: dict = {}
    for role, res, n, units, g in [("learner", lc.node_resource, lc.num_learners, 1, lc.num_gpus),
                                   ("rollout", r.node_resource, r.num_actors, 1, r.num_gpus),
                                   ("eval", e.node_resource, 1 if e.enabled else 0, 1, e.num_gpus),
                                   ("expert", ex.node_resource, ex.max_replicas, 0.001, ex.num_gpus)]:
        if res:
            out.setdefault(res, []).append((role, n, units, g))
    return out


@pytest.mark.parametrize("kind", ["launcher", "RayCluster", "RayJob"])
def test_every_node_resource_a_config_names_is_advertised_with_room(kind):
    """Each learner/rollout/eval/expert.node_resource of the manifest's config is advertised by
    worker groups (never the head) whose units and GPUs hold every actor asking for it (at the
    expert's max_replicas); the learners' resource by no group that another role's also names
    (learners share their nodes with nothing); with learner.placement_strategy STRICT_PACK, one node
    holds all the learners."""
    for path, doc in docs_of(kind):
        cfg = config_for(path)
        head, groups = node_groups(path, doc, kind)
        demands = role_demands(cfg)
        assert {"learner", "rollout", "eval", "expert"} <= {d[0] for ds in demands.values() for d in ds}, \
            f"{path.name}: the multi-node config must pin every role to its nodes: {demands}"
        for res, users in demands.items():
            assert res not in head, f"{path.name}: the head advertises {res}"
            where = [(name, node, n) for name, node, n in groups if node.get(res, 0) > 0]
            assert where, f"{path.name}: no node group advertises {res} ({[u[0] for u in users]})"
            units = sum(node[res] * n for _, node, n in where)
            gpus_ = sum(node.get("GPU", 0) * n for _, node, n in where)
            assert units >= sum(k * u for _, k, u, _ in users), f"{path.name}: {res}: {units} units < {users}"
            assert gpus_ >= sum(k * g for _, k, _, g in users), f"{path.name}: {res}: {gpus_} GPUs < {users}"
        lres = cfg.learner.node_resource
        for name, node, _ in groups:
            others = [res for res in demands if res != lres and node.get(res, 0) > 0]
            assert not (node.get(lres, 0) > 0 and others), f"{path.name}: group {name} hosts learners and {others}"
        if cfg.learner.placement_strategy == "STRICT_PACK":
            n, g = cfg.learner.num_learners, cfg.learner.num_gpus
            assert any(node.get(lres, 0) >= n and node.get("GPU", 0) >= n * g for _, node, _ in groups), \
                f"{path.name}: STRICT_PACK needs one node with {n} x {lres} and {n * g} GPUs"


# ---- the GPU configs ----

@pytest.mark.parametrize("path", GPU_CONFIGS)
def test_gpu_config_loads_and_adds_up(path):
    cfg = load_config(ROOT / path)
    r, e, lc = cfg.rollout, cfg.expert, cfg.learner
    assert r.engine == e.engine == cfg.eval.engine == "vllm"
    assert r.weight_sync == "nccl" and lc.backend == "nccl" and lc.bf16
    assert lc.num_gpus == 1 and r.num_gpus >= 1
    assert e.num_gpus == e.vllm.tensor_parallel_size, "an expert replica gets one GPU per TP rank"
    assert r.num_gpus == r.vllm.tensor_parallel_size
    assert e.min_replicas < e.max_replicas, "the expert must be able to scale"
    assert r.vllm.max_model_len >= r.max_response_tokens + 1024, "room for the prompt"
    assert e.vllm.max_model_len >= e.max_new_tokens + 512
    assert r.max_new_tokens_per_turn <= r.max_response_tokens
    assert "{problem}" in cfg.data.template and "<answer>" in cfg.data.template and "<consult>" in cfg.data.template
    assert cfg.protocol.max_parallel == 3
    assert cfg.acceptance.kind == "inverse"


def test_paper_config_is_the_papers_setting():
    cfg = load_config(ROOT / GPU_CONFIGS[0])
    assert cfg.model.policy == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" and cfg.model.expert == "Qwen/QwQ-32B"
    assert cfg.learner.num_learners == 8 and cfg.learner.zero_stage == 3
    assert cfg.expert.vllm.tensor_parallel_size in (2, 4) and cfg.expert.node_resource
    assert cfg.rollout.group_size == 16


def test_single_node_config_fits_eight_gpus():
    cfg = load_config(ROOT / GPU_CONFIGS[1])
    total = (cfg.learner.num_learners * cfg.learner.num_gpus + cfg.rollout.num_actors * cfg.rollout.num_gpus
             + cfg.eval.num_gpus + cfg.expert.max_replicas * cfg.expert.num_gpus)
    assert total <= 8, f"{total} GPUs requested with the expert at max_replicas"
    assert cfg.model.policy == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def test_cluster_readme_links_exist():
    text = (CLUSTER / "README.md").read_text()
    for rel in re.findall(r"(?:cluster|configs|docs|benchmarks)/[\w./-]+\.(?:ya?ml|md|py)", text):
        assert (ROOT / rel).exists(), f"cluster/README.md names a missing file: {rel}"
    assert "docs/gpu.md" in text and "ray job submit" in text


# ---- cluster/prepare_data.py (DAPO-Math rows -> {problem, answer}) ----

def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_data_unwraps_and_dedups(tmp_path):
    prep = _load(CLUSTER / "prepare_data.py", "prepare_data")
    wrapped = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
               "What is $1+1$?\n\nRemember to put your answer on its own line after \"Answer:\".")
    row = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": wrapped}], "ability": "MATH",
           "reward_model": {"ground_truth": "2", "style": "rule-math"}, "extra_info": {"index": "a"}}
    assert prep.convert_row(row) == ({"problem": "What is $1+1$?", "answer": "2"}, True)
    assert prep.convert_row({"prompt": "x"}) == (None, False)
    src = tmp_path / "dapo.jsonl"
    other = {**row, "prompt": [{"role": "user", "content": "Plain problem"}], "reward_model": {"ground_truth": "7"}}
    src.write_text("\n".join(json.dumps(r) for r in (row, row, other)) + "\n")
    out = tmp_path / "out.jsonl"
    assert prep.main(["--src", str(src), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["problem"], r["answer"]) for r in rows] == [("What is $1+1$?", "2"), ("Plain problem", "7")]
    from eapo_ray.data import load_rows  # the configs' loader reads it

    assert [e.answer for e in load_rows(str(out))] == ["2", "7"]


# ---- benchmarks/gpu_check.py on a CPU machine ----

def test_gpu_check_help_and_no_cuda_message():
    script = ROOT / "benchmarks" / "gpu_check.py"
    assert subprocess.run([sys.executable, str(script), "--help"], capture_output=True).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "Nothing was measured" in p.stderr


def test_gpu_check_buckets_round_trip():
    import torch

    gc = _load(ROOT / "benchmarks" / "gpu_check.py", "gpu_check")
    sd = {"a": torch.randn(300, 10), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2000),
          "d": torch.arange(7), "e": torch.randn(100, 3)}
    buckets = gc.pack_buckets(sd, 4096)
    assert {b[1].dtype for b in buckets} == {torch.float32, torch.bfloat16, torch.int64}
    got = {}
    for dtype, flat, items in buckets:
        assert flat.dtype == dtype and flat.dim() == 1
        assert len(items) == 1 or flat.numel() * flat.element_size() <= 4096
        off = 0
        for name, shape in items:
            n = torch.Size(shape).numel()
            got[name] = flat[off:off + n].view(shape)
            off += n
        assert off == flat.numel()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
