"""Everything pure, in one folder: no Ray, no actors, no I/O beyond the grader's process pool.

schedules  acceptance-rate decay and the turn budget      protocol  the action language (parse/render)
advantages group-normalised advantages                    reward    math-verify correctness + format reward
losses     off-policy-corrected GRPO-family loss          batching  episodes -> shaped, filtered, collated batches
logprobs   per-token log-probs (whole and vocab-chunked)
"""
