"""Re-export: the reward lives in eapo_ray.algo.reward (pure, Ray-free); this path keeps working."""
from eapo_ray.algo.reward import *  # noqa: F401,F403
from eapo_ray.algo.reward import __all__  # noqa: F401
