"""Where the training loop's time went (`Breakdown`): the driver's, the learners' and the rollout
actors' parts per step, and their idle fractions; in each metrics row and in summary.json."""
from __future__ import annotations


class Breakdown:
    """Where the training loop's time went, summed over steps: the driver's own clock per step
    (wait for data, feed, learner call, publish, evaluation, overhead), the learner's train_step
    parts and the rollout actors' produce parts; idle fractions of the learner and the actors."""
    DRIVER = ("wait_data_s", "feed_s", "train_call_s", "publish_s", "eval_s", "checkpoint_s", "driver_overhead_s",
              "step_s")
    LEARNER = ("train_seconds", "fetch_s", "prep_s", "old_logp_s", "forward_s", "backward_s", "optim_s")
    ROLLOUT = ("produce_s", "load_weights_s", "engine_s", "expert_wait_s", "expert_busy_s", "reward_s", "pack_s")

    def __init__(self, num_actors: int):
        self.num_actors = num_actors
        self.driver = dict.fromkeys(self.DRIVER, 0.0)
        self.learner = dict.fromkeys(self.LEARNER, 0.0)
        self.rollouts = dict.fromkeys(self.ROLLOUT, 0.0)
        self.steps = self.batches = 0
        self.last: dict = {}
        self.loop_seconds = self.final_eval_s = 0.0

    def rollout(self, st: dict) -> None:
        self.batches += 1
        for k in self.ROLLOUT:
            self.rollouts[k] += st.get(k, 0.0)

    def step(self, tm: dict, stats: dict, step_s: float) -> None:
        self.steps += 1
        over = step_s - sum(tm.values())
        self.last = {**tm, "driver_overhead_s": over, "step_s": step_s}
        for k, v in self.last.items():
            self.driver[k] += v
        for k in self.LEARNER:
            self.learner[k] += stats.get(k, 0.0)

    def after_row(self, key: str, seconds: float) -> None:
        """Time the driver spent for a step after its row was written (the evaluation wait and the
        save at a checkpoint): in the totals, as part `key` and in step_s, so the parts still sum
        to step_s (the step's own row does not show it)."""
        self.driver[key] += seconds
        self.driver["step_s"] += seconds

    def idle(self, elapsed: float) -> dict:
        """Idle fractions over the loop so far: the learner outside train_step, the actors outside
        produce (batches delivered so far; a batch still in flight counts as idle until it lands)."""
        from eapo_ray.timing import fraction

        return {"learner_idle_frac": 1.0 - fraction(self.learner["train_seconds"], elapsed),
                "rollout_idle_frac": 1.0 - fraction(self.rollouts["produce_s"], elapsed * self.num_actors)}

    def summary(self) -> dict:
        n, b = max(self.steps, 1), max(self.batches, 1)
        return {"steps": self.steps, "rollout_batches": self.batches, "loop_seconds": self.loop_seconds,
                "final_eval_seconds": self.final_eval_s,
                "driver_per_step": {k: v / n for k, v in self.driver.items()},
                "learner_per_step": {k: v / n for k, v in self.learner.items()},
                "rollout_per_batch": {k: v / b for k, v in self.rollouts.items()},
                **self.idle(self.loop_seconds)}
