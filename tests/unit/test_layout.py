"""The tree reads as the design: no import cycles (lazy imports inside functions count too),
the pure folder (eapo_ray/algo) imports no Ray and nothing outside itself, and the contract's
old import paths keep working."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "eapo_ray"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return mods


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for m, p in mods.items():
        deps = {owner(n) for n in _imports(p) if n.startswith("eapo_ray")} - {"", m}
        graph[m] = {d for d in deps if not m.startswith(d + ".")}  # a parent package's __init__ is not a cycle
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_pure_folder_imports_nothing_but_itself_torch_and_the_grader():
    allowed = {"torch", "numpy", "math_verify", "__future__"}  # numpy: algo.sampling (declared in pyproject)
    for p in (PKG / "algo").glob("*.py"):
        for name in _imports(p):
            top = name.split(".")[0]
            if top == "eapo_ray":
                assert name.startswith("eapo_ray.algo"), f"{p.name} imports {name}"
            else:
                assert top in allowed or top in sys.stdlib_module_names, f"{p.name} imports {name}"


def test_importing_the_pure_folder_and_the_contract_paths_loads_no_ray():
    code = ("import sys, eapo_ray.algo.schedules, eapo_ray.algo.advantages, eapo_ray.algo.losses, "
            "eapo_ray.algo.protocol, eapo_ray.algo.reward, eapo_ray.algo.batching, eapo_ray.algo.logprobs, "
            "eapo_ray.algo.sampling, "
            "eapo_ray.rollout.protocol, eapo_ray.reward\n"
            "from eapo_ray.reward import RewardConfig, score, extract_answer\n"
            "from eapo_ray.rollout.protocol import ProtocolConfig, parse_action, render_replies\n"
            "from eapo_ray.algo.schedules import AcceptanceConfig, acceptance_prob\n"
            "from eapo_ray.algo.losses import LossConfig\n"
            "from eapo_ray.algo.advantages import group_advantages\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_ruff_is_clean():
    """The lint the pre-commit hook runs (.pre-commit-config.yaml), with the config in pyproject.toml."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_import_from_the_package_names_something_that_exists():
    """Lazy imports inside functions are not run by other tests: a name moved to another module
    (e.g. HFEngine out of rollout/engine.py) must be caught here, not by a user."""
    import importlib

    missing = []
    for p in [*PKG.rglob("*.py"), *(ROOT / "experiments").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eapo_ray") and not node.level:
                if node.module.endswith("vllm_engine"):
                    continue  # needs vLLM at import; tests/system covers it
                mod = importlib.import_module(node.module)
                is_pkg = hasattr(mod, "__path__")
                missing += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if a.name != "*" and not hasattr(mod, a.name)
                            and not (is_pkg and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not missing, missing
