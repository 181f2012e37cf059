"""The learner group: N Ray actors, one torch.distributed group (gloo on CPU, NCCL on
GPU), each a DeepSpeed engine around the policy. They train data-parallel on shards of
the batches pulled from the buffer, then rank 0 publishes the full weights once to the
object store with a version number.

One module per part: `forward` (the log-prob forward, PolicyLogProbs), `actor` (one rank: the
Learner actor), `checkpoints` (its checkpoint tags, pruned), `stats` (a step's DeepSpeed config,
batch fetch and loss statistics) and `group` (the group, its placement and the fan-out)."""
