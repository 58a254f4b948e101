"""Read the records of an offline W&B run file (`run-<id>.wandb`), for tests to check what
wandb really wrote. The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too small for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
        else:
            break
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(records: list[pb.Record]) -> list[dict]:
    """Each history record as a dict of key -> decoded JSON value."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in r.history.item
                }
            )
    return rows


def run_info(records: list[pb.Record]) -> pb.RunRecord:
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def config(records: list[pb.Record]) -> dict:
    """The run's config: key -> value, merged from the run record and config records."""
    out = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = (
            r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        )
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def exit_code(records: list[pb.Record]) -> int | None:
    codes = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None


def summary(records: list[pb.Record]) -> dict:
    """The run summary: key -> value, from the summary records (later ones win)."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
