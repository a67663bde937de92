"""Metadata columns stay JSON until read, and append without re-encoding."""

import json

import numpy as np
import pytest

from uhga_tf.retrieval import metadata_columns as columns_lib
from uhga_tf.retrieval.hamming_index import FILE_NAME
from uhga_tf.retrieval.hamming_index import HammingIndex


def test_encoded_column_appends_by_splicing_and_decodes_once():
    column = columns_lib.MetadataColumn(encoded=b'["a", null]', count=2)
    column.extend(["b", 3])
    column.extend([])
    assert column.encoded() == b'["a", null, "b", 3]'
    assert column._values is None  # nothing decoded by the append
    values = column.values()
    assert values == ["a", None, "b", 3] and column.values() is values
    column.keep([3, 0])
    assert column.count == 2 and column.encoded() == b'[3, "a"]'
    empty = columns_lib.MetadataColumn(encoded=b"[]", count=0)
    empty.extend([1])
    assert empty.encoded() == b"[1]" and empty.count == 1


def test_blob_is_one_json_object_and_layout_round_trips():
    columns = {"source": columns_lib.MetadataColumn(values=["x/1.jpg", "é"]),
               "label": columns_lib.MetadataColumn(values=[0, None])}
    blob, layout = columns_lib.encode_columns(columns)
    assert json.loads(blob) == {"source": ["x/1.jpg", "é"],
                                "label": [0, None]}
    for name, start, end in layout:
        assert json.loads(blob[start:end]) == columns[name].values()
    again = columns_lib.decode_columns(blob, layout, 2, "f")
    assert {n: c.values() for n, c in again.items()} == {
        "source": ["x/1.jpg", "é"], "label": [0, None]}
    old_style = columns_lib.decode_columns(blob, None, 2, "f")
    assert old_style["label"].values() == [0, None]
    with pytest.raises(ValueError, match="f has a corrupt metadata layout"):
        columns_lib.decode_columns(blob, [["source", 1, 5]], 2, "f")
    with pytest.raises(ValueError, match="f has a corrupt metadata layout"):
        columns_lib.decode_columns(blob, [["source", "a", None]], 2, "f")
    with pytest.raises(ValueError, match="metadata length != 3"):
        columns_lib.decode_columns(blob, None, 3, "f")


def test_index_add_to_a_loaded_index_keeps_every_value(tmp_path):
    index = HammingIndex(16)
    codes = np.where(np.random.default_rng(0).random((6, 16)) < 0.5, -1, 1)
    index.add(codes[:4], np.arange(4), metadata={"source": list("abcd")})
    index.save(tmp_path / "ix")
    loaded = HammingIndex.load(tmp_path / "ix")
    # A new column on append: None for the older items.
    loaded.add(codes[4:], [10, 11], metadata=[{"source": "e", "label": 1},
                                              {"source": "f"}])
    loaded.save(tmp_path / "ix")
    data = (tmp_path / "ix" / FILE_NAME).read_bytes()
    assert b'"source": ["a", "b", "c", "d", "e", "f"]' in data
    final = HammingIndex.load(tmp_path / "ix")
    assert final.get_metadata([11, 0, 10]) == [
        {"source": "f", "label": None}, {"source": "a", "label": None},
        {"source": "e", "label": 1}]
    final.remove([1, 10])
    assert [m["source"] for m in final.get_metadata(final.ids)] == [
        "a", "c", "d", "f"]
