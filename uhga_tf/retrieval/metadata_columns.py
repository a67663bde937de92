"""Metadata columns of a HammingIndex, kept as JSON until someone reads them.

An index of a million photos carries a million source paths. Decoding them
on load and encoding them again on save cost more than the rest of an
`index add` of 10,000 codes (about 0.4 s of 1.2 s for a 1M-item IVF index).
A column loaded from a file therefore stays the JSON array it was stored as.
It is decoded on its first read. An append splices the new values' JSON onto
the stored bytes, and a save writes them back unchanged.

The stored metadata is still one JSON object of columns (``{"source": [...],
"label": [...]}``), readable by any JSON parser and by indexes written
before this module. ``layout`` records where each column's array lies in it.
"""

import json


class MetadataColumn:
    """One column: a list of JSON-ready values, or their JSON array bytes."""

    __slots__ = ("_encoded", "_values", "count")

    def __init__(self, values=None, encoded=None, count=None):
        self._values = values
        self._encoded = encoded
        self.count = len(values) if values is not None else int(count)

    @classmethod
    def of_nones(cls, count):
        return cls(values=[None] * count)

    def values(self, name="metadata"):
        """The decoded list (decoded once; later calls return the same list).

        Raises:
            ValueError: bytes that are not a JSON array of `count` values.
        """
        if self._values is None:
            try:
                values = json.loads(self._encoded.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"corrupt metadata column {name!r}: {e}") \
                    from e
            if not isinstance(values, list) or len(values) != self.count:
                raise ValueError(
                    f"corrupt metadata column {name!r}: expected a list of "
                    f"{self.count} values")
            self._values = values
        return self._values

    def extend(self, values):
        """Append JSON-ready values; a still-encoded column stays encoded."""
        if not values:
            return
        if self._values is not None:
            self._values.extend(values)
            self._encoded = None
        elif self.count == 0:
            self._encoded = json.dumps(values).encode("utf-8")
        else:
            # "[a, b]" + "[c]" -> "[a, b, c]": still one JSON array.
            tail = json.dumps(values).encode("utf-8")
            self._encoded = self._encoded[:-1] + b", " + tail[1:]
        self.count += len(values)

    def keep(self, positions):
        """Only the values at `positions`, in that order."""
        values = self.values()
        self._values = [values[i] for i in positions]
        self._encoded = None
        self.count = len(self._values)

    def encoded(self):
        """The column as JSON array bytes."""
        if self._encoded is None:
            self._encoded = json.dumps(self._values).encode("utf-8")
        return self._encoded


def encode_columns(columns):
    """(one JSON object of the columns as bytes, layout) where layout is
    [[name, start, end], ...]: column `name`'s array is bytes[start:end]."""
    parts, layout, offset = [b"{"], [], 1
    for i, (name, column) in enumerate(columns.items()):
        key = (", " if i else "") + json.dumps(name) + ": "
        key = key.encode("utf-8")
        body = column.encoded()
        parts += [key, body]
        start = offset + len(key)
        offset = start + len(body)
        layout.append([name, start, offset])
    parts.append(b"}")
    return b"".join(parts), layout


def decode_columns(blob, layout, count, path):
    """{name: MetadataColumn} of a stored blob; still encoded when `layout`
    (from the file's header) says where each column lies.

    The layout is checked against the blob (the header is not covered by
    the payload checksum), so a corrupt one is one ValueError naming `path`,
    never a wrong column.
    """
    if layout is None:  # indexes written before the layout was stored
        try:
            stored = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has corrupt metadata: {e}") from e
        if not isinstance(stored, dict) or any(
                not isinstance(v, list) or len(v) != count
                for v in stored.values()):
            raise ValueError(f"{path} is corrupt: metadata length != {count}")
        return {name: MetadataColumn(values=values)
                for name, values in stored.items()}
    columns = {}
    try:
        for name, start, end in layout:
            columns[str(name)] = MetadataColumn(
                encoded=bytes(blob[start:end]), count=count)
        rebuilt, _ = encode_columns(columns)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has a corrupt metadata layout: {e}") from e
    if rebuilt != blob or any(
            not (c.encoded()[:1] == b"[" and c.encoded()[-1:] == b"]")
            for c in columns.values()):
        raise ValueError(f"{path} has a corrupt metadata layout")
    return columns
