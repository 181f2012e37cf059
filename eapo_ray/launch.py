"""Run EAPO: ``python -m eapo_ray.launch [--config FILE] [key=value ...]``.

With no arguments it runs the embedded default (the defaults in eapo_ray/config.py: bundled
tiny models, local Ray, CPU); a --config file is a delta on it. Under ``ray job submit`` (RAY_ADDRESS set) it joins that
cluster. Parts, named in the Ray dashboard: the expert Serve app
(<run>-expert), rollout actors (<run>-rollout-i), the buffer (<run>-buffer), the
learners (<run>-learner-r) and the evaluator (<run>-evaluator).
"""
from __future__ import annotations

import argparse
import sys

from eapo_ray.config import ConfigError, load_config, to_dict
from eapo_ray.driver.run import EvaluationFailed, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m eapo_ray.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m eapo_ray.launch steps=10 rollout.num_actors=2\n"
               "  python -m eapo_ray.launch --config configs/paper/rl.yaml seed=1 learner.num_learners=2\n"
               "  python -m eapo_ray.launch --config configs/smollm2_cpu.yaml --print-config")
    ap.add_argument("--config", default=None,
                    help="YAML delta on the embedded default (keys it names; `base: other.yaml` chains files)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--plan", action="store_true",
                    help="print each role's GPU memory need against gpu_memory_gb and exit: 0 when all fit, "
                         "1 naming the key to change (eapo_ray/plan.py)")
    ap.add_argument("--verbose", action="store_true",
                    help="also print Serve access logs and Ray/transformers INFO lines (config key: verbose)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (e.g. learner.lr=1e-4)")
    args = ap.parse_args(argv)
    from eapo_ray.accounting import AccountingError
    from eapo_ray.data import DataError
    from eapo_ray.driver.recovery import LearnerFailed
    from eapo_ray.driver.system import ExpertStartError, StartupError
    from eapo_ray.learner.group import PlacementError
    from eapo_ray.plan import PlanError, main_plan
    from eapo_ray.rollout.fleet import FleetError
    from eapo_ray.storage import fetch_resume
    from eapo_ray.weight_sync import WeightSyncError

    try:
        overrides = fetch_resume(args.config, args.overrides)  # resume=<URI>: the run downloaded, resumed locally
        cfg = load_config(args.config, overrides + (["verbose=true"] if args.verbose else []))
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.plan:
            return main_plan(cfg)
        run(cfg)
    except (ConfigError, DataError) as e:  # a bad key or value, a bad data file (file:line): before anything starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FleetError, AccountingError, LearnerFailed, PlacementError, EvaluationFailed, ExpertStartError, StartupError,
            PlanError, WeightSyncError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
