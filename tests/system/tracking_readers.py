"""Read back what the trackers stored, offline: a W&B offline run's .wandb file (LevelDB-log
framed protobuf records, the format wandb's own internal datastore writes) and an MLflow store."""
import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (`run-<id>.wandb`), in order."""
    from wandb.proto import wandb_internal_pb2

    buf = run_file.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", buf[:HEADER])
    assert ident == b":W&B", ident
    rows, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(buf):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + HEADER])
        pos += HEADER
        if kind == 0:
            break
        parts += buf[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def mlflow_metrics(tracking_uri: str, run_name: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of the MLflow run named `run_name` (the only one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == run_name]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    out: dict[int, dict[str, float]] = {}
    for key in runs[0].data.metrics:
        for m in client.get_metric_history(runs[0].info.run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out
