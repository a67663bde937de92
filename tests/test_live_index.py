"""The search page follows its index on disk without failing a query.

A tiny exported model encodes 8 seeded images into an index; the page polls
it every 50 ms. Two client threads query without pause while the index is
updated five times (`add_items`, `remove_items`, a damaged file, a rebuild
as ivf): every answer must be 200, and the page must end up serving the
last index.
"""

import os
import shutil
import threading
import time

import numpy as np
import pytest

import http_fixtures
import model_fixtures
from uhga_tf import retrieval
from uhga_tf.retrieval import hamming_index
from uhga_tf.retrieval import live_index
from uhga_tf.retrieval import web

CODE_LENGTH = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    model_dir = model_fixtures.export_tiny(root / "models", CODE_LENGTH)
    _, encoded = model_fixtures.sample_images([(36, 36)] * 8)
    for i, data in enumerate(encoded):
        ext = "jpg" if i % 2 else "png"
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / f"img{i}.{ext}").write_bytes(data)
    retrieval.build_index(model_dir, str(root / "index"),
                          images_dir=str(root / "images"), progress=False)
    return root, model_dir, encoded


def test_page_answers_through_updates(workspace, tmp_path):
    root, model_dir, encoded = workspace
    index_dir = tmp_path / "index"
    shutil.copytree(root / "index", index_dir)
    service = web.SearchService(
        str(index_dir), model_dir=model_dir,
        config=web.WebConfig(port=0, top_k=4, index_poll_s=0.05),
    )
    server = web.SearchWebServer(service)
    port = server.start()
    failures, answers, stop = [], [0], threading.Event()

    def client(body):
        while not stop.is_set():
            if body is None:
                status, reply = http_fixtures.http_call(
                    port, "GET", "/api/search?id=1&top_k=4", timeout=30)
            else:
                status, reply = http_fixtures.http_call(
                    port, "POST", "/api/search", body, timeout=30)
            answers[0] += 1
            if status != 200:
                failures.append((status, reply))

    threads = [threading.Thread(target=client, args=(b,))
               for b in (None, encoded[3])]
    for thread in threads:
        thread.start()
    try:
        index = service.index
        retrieval.add_items(index_dir, index.packed_codes[:3],
                            [{"source": "copy"}] * 3)
        assert http_fixtures.wait_for(lambda: len(service.index) == 11)
        status, reply = http_fixtures.http_call(port, "GET",
                                                "/api/search?id=10")
        assert status == 200 and reply["query"]["id"] == 10
        retrieval.remove_items(index_dir, [8, 9, 10])
        assert http_fixtures.wait_for(lambda: len(service.index) == 8)
        # A damaged file is skipped; the last good index keeps serving.
        path = index_dir / hamming_index.FILE_NAME
        good = path.read_bytes()
        with open(str(path) + ".tmp", "wb") as f:
            f.write(good[:-5])
        os.replace(str(path) + ".tmp", path)
        time.sleep(0.3)
        assert len(service.index) == 8
        rebuilt = hamming_index.HammingIndex.load(root / "index")
        rebuilt.use_inverted_lists(nlist=2, nprobe=2)
        rebuilt.save(index_dir)
        assert http_fixtures.wait_for(lambda: service.index.kind == "ivf")
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop()
    assert failures == []
    assert answers[0] > 10


def test_live_index_check(tmp_path):
    index = hamming_index.HammingIndex(CODE_LENGTH)
    codes = np.packbits(np.eye(CODE_LENGTH, dtype=np.uint8)[:5], axis=1)
    index.add(codes, [5, 3, 9, 1, 7])
    index.save(tmp_path / "index")
    live = live_index.LiveIndex(tmp_path / "index", poll_s=0)
    snapshot = live.current()
    assert [snapshot.position(i) for i in (1, 3, 5, 7, 9, 2)] == [
        3, 1, 0, 4, 2, None]
    assert live.check() is False  # unchanged
    index.remove([3])
    index.save(tmp_path / "index")
    assert live.check() is True and live.reloads == 1
    assert snapshot.position(3) == 1  # an old snapshot stays whole
    assert live.current().position(3) is None
    with pytest.raises(ValueError, match="poll_s must be >= 0"):
        live_index.LiveIndex(tmp_path / "index", poll_s=-1)
