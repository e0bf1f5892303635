"""Read an offline W&B run file (``run-*.wandb``) back: a LevelDB-style log of ``Record`` protobufs.

The file is a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
"""

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def read_records(path, timeout: float = 60.0) -> list:
    """The run's records, once its ``exit`` record is in the file (``wandb.finish()`` can return before the W&B
    service has written it out; under load that takes seconds), or whatever is there after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    records = _parse(path)
    while not (records and records[-1].WhichOneof("record_type") == "exit") and time.monotonic() < deadline:
        time.sleep(0.5)
        records = _parse(path)
    return records


def _parse(path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER:
            pos += space
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # still being written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:  # zero padding up to the end of the block
            pos += space - HEADER - length
            continue
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"corrupt chunk in {path}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def history(records) -> list[dict]:
    """Each ``run.log`` call as a dict of its values (JSON decoded)."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
