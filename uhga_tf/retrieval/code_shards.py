"""Code shards: the output of `encode_collection`, the input of `index`.

A codes directory holds

- `listing.jsonl`: one `{"id", "source", "label"}` line per image, ids being
  positions in the sorted file list (the ids `index build --images` gives);
- `codes-SSSSS-of-NNNNN.jsonl`: `{"id", "source", "label", "packed_codes"}`
  lines, `packed_codes` as hex in `np.packbits` order (`codes.pack_codes`);
- `dead_letter-SSSSS-of-NNNNN.jsonl`: `{"id", "source", "reason"}` for each
  image that could not be read or decoded;
- `manifest.json`: code_length, counts, the shard names and the model.

JSON lines keep the shards readable by any tool and writable by any Beam
runner's text sink; no Beam import is needed to read them.
"""

import glob
import json
import os

import numpy as np

from uhga_tf import codes as codes_lib
from uhga_tf import io_utils

MANIFEST = "manifest.json"
LISTING = "listing.jsonl"
CODES_PREFIX = "codes"
DEAD_LETTER_PREFIX = "dead_letter"
SUFFIX = ".jsonl"
FORMAT = "uhga_tf.code_shards"


def code_record(item, packed_codes):
    """One codes line: the listing item plus its packed codes as hex."""
    record = dict(item)
    record["packed_codes"] = bytes(packed_codes).hex()
    return json.dumps(record, sort_keys=True)


def dead_letter_record(item, reason):
    """One dead-letter line: the item's id and source and why it failed."""
    return json.dumps(
        {"id": item["id"], "source": item["source"], "reason": reason},
        sort_keys=True,
    )


def shard_paths(codes_dir, prefix):
    """Sorted shard files of `prefix` ("codes" or "dead_letter")."""
    return sorted(glob.glob(os.path.join(
        os.fspath(codes_dir), f"{prefix}-*-of-*{SUFFIX}"
    )))


def read_lines(paths):
    """Parse every JSON line of `paths`."""
    records = []
    for path in paths:
        with open(path) as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def write_manifest(codes_dir, manifest):
    io_utils.write_json_atomic(
        os.path.join(os.fspath(codes_dir), MANIFEST), manifest
    )


def read_code_shards(codes_dir):
    """Read a codes directory; items sorted by id.

    Returns:
        (packed_codes uint8 [n, code_length / 8], ids int64 [n], metadata
        {"source": [...], "label": [...]} (label only when known),
        manifest dict).

    Raises:
        FileNotFoundError: if there is no manifest (an unfinished run).
        ValueError: if the shards disagree with the manifest.
    """
    codes_dir = os.fspath(codes_dir)
    path = os.path.join(codes_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {MANIFEST} in {codes_dir}: not a finished encode_collection "
            "output"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format={manifest.get('format')!r}; expected "
            f"{FORMAT!r}"
        )
    code_length = codes_lib.check_code_length(manifest["code_length"])
    records = read_lines(
        os.path.join(codes_dir, name) for name in manifest["code_shards"]
    )
    if len(records) != manifest["count"]:
        raise ValueError(
            f"{codes_dir} shards hold {len(records)} codes; the manifest "
            f"says count={manifest['count']}"
        )
    records.sort(key=lambda r: r["id"])
    ids = np.asarray([r["id"] for r in records], np.int64)
    packed = np.frombuffer(
        bytes.fromhex("".join(r["packed_codes"] for r in records)), np.uint8
    ).reshape(len(records), code_length // 8)
    metadata = {"source": [r["source"] for r in records]}
    if any(r.get("label") is not None for r in records):
        metadata["label"] = [r.get("label") for r in records]
    return packed, ids, metadata, manifest
