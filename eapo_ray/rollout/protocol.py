"""Re-export: the action language lives in eapo_ray.algo.protocol (pure, Ray-free); this path keeps working."""
from eapo_ray.algo.protocol import *  # noqa: F401,F403
from eapo_ray.algo.protocol import __all__  # noqa: F401
