"""The Beam encode pipeline on a tiny folder, against in-process encoding.

Ten seeded images (PNG and JPEG, two sizes) in two class folders plus two
bad files: bytes that are no image, and a PNG cut after its header (the
header guard passes it, the decoder refuses it). The DirectRunner output
must equal `index build` codes bit for bit, and the dead letters must be
exactly the two bad files, each with its reason.
"""

import os

import numpy as np
import pytest

import model_fixtures
from uhga_tf import retrieval
from uhga_tf.retrieval import code_shards

beam = pytest.importorskip(
    "apache_beam", reason="the beam extra is not installed: "
    'pip install -e ".[beam]"'
)
from uhga_tf import encode_collection
from uhga_tf.retrieval import beam_encode

CODE_LENGTH = 32


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    model_dir = model_fixtures.export_tiny(root / "models", CODE_LENGTH)
    _, encoded = model_fixtures.sample_images([(40, 36), (28, 30)] * 5)
    for i, data in enumerate(encoded):
        folder = root / "images" / ("a" if i < 5 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if i % 2 else "png"
        (folder / f"img{i:02d}.{ext}").write_bytes(data)
    (root / "images" / "a" / "bad_text.png").write_bytes(b"not an image")
    (root / "images" / "b" / "bad_cut.png").write_bytes(encoded[0][:40])
    return root, model_dir


def test_direct_runner_matches_in_process(collection, tmp_path):
    root, model_dir = collection
    config = beam_encode.CollectionConfig(
        model_dir=model_dir,
        images=str(root / "images"),
        out_dir=str(tmp_path / "codes"),
        batch_size=4,
        beam_args=encode_collection.beam_args("DirectRunner", 1, ""),
    )
    manifest = beam_encode.encode_collection(config)
    assert (manifest["listed"], manifest["count"],
            manifest["dead_letter_count"]) == (12, 10, 2)
    packed, ids, metadata, _ = code_shards.read_code_shards(tmp_path / "codes")

    index = retrieval.build_index(
        model_dir, str(tmp_path / "index"), images_dir=str(root / "images"),
        batch_size=4, progress=False, skip_corrupt=True,
    )
    np.testing.assert_array_equal(ids, index.ids)
    np.testing.assert_array_equal(packed, index.packed_codes)
    expected = index.get_metadata(index.ids)
    assert metadata["source"] == [m["source"] for m in expected]
    assert metadata["label"] == [m["label"] for m in expected]

    dead = code_shards.read_lines(code_shards.shard_paths(
        tmp_path / "codes", code_shards.DEAD_LETTER_PREFIX))
    reasons = {os.path.basename(d["source"]): d["reason"] for d in dead}
    assert sorted(reasons) == ["bad_cut.png", "bad_text.png"]
    assert "not a JPEG, PNG, GIF, BMP or WebP" in reasons["bad_text.png"]
    assert reasons["bad_text.png"].startswith(str(root))  # names the file
    assert reasons["bad_cut.png"]  # the decoder's own message

    # index build --from_codes gives the same index.
    from_codes = retrieval.build_index_from_codes(
        tmp_path / "codes", tmp_path / "index2"
    )
    np.testing.assert_array_equal(from_codes.packed_codes,
                                  index.packed_codes)
    assert from_codes.info["class_names"] == ["a", "b"]


def test_refuses_a_used_out_dir(collection, tmp_path):
    root, model_dir = collection
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / "codes-00000-of-00001.jsonl").write_text("")
    config = beam_encode.CollectionConfig(
        model_dir=model_dir, images=str(root / "images"),
        out_dir=str(tmp_path / "codes"),
    )
    with pytest.raises(ValueError, match="already holds codes shards"):
        beam_encode.encode_collection(config)


@pytest.mark.slow
def test_two_worker_processes_match_in_process(collection, tmp_path):
    """The default local set-up: 2 worker processes, 1 TF thread each."""
    root, model_dir = collection
    config = beam_encode.CollectionConfig(
        model_dir=model_dir,
        images=str(root / "images"),
        out_dir=str(tmp_path / "codes"),
        batch_size=3,
        beam_args=encode_collection.beam_args("DirectRunner", 2, ""),
        threads_per_worker=encode_collection.threads_per_worker(
            "DirectRunner", 2, None),
    )
    manifest = beam_encode.encode_collection(config)
    assert (manifest["count"], manifest["dead_letter_count"]) == (10, 2)
    packed, ids, _, _ = code_shards.read_code_shards(tmp_path / "codes")
    index = retrieval.build_index(
        model_dir, str(tmp_path / "index"), images_dir=str(root / "images"),
        progress=False, skip_corrupt=True,
    )
    np.testing.assert_array_equal(ids, index.ids)
    np.testing.assert_array_equal(packed, index.packed_codes)
