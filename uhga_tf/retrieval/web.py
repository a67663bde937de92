"""The search page: a small web app over a `HammingIndex`.

`SearchService` encodes an uploaded image (SavedModel or a gRPC server) and
ranks the index; `SearchWebServer` serves, on loopback by default:

- `GET /`: the page (`static/search.html`: no build step, no CDN);
- `POST /api/search?top_k=K` with the image file as the body, and
  `GET /api/search?id=ID&top_k=K` (search from an indexed item): JSON
  `{"query": {...}, "results": [{"rank", "id", "distance", "label",
  "source", "image"}, ...]}`, ties broken by index order as everywhere;
- `GET /image/ID`: a PNG thumbnail of an indexed item.

The index is live (`live_index.LiveIndex`): a new file written by `index
build`, `add` or `remove` is picked up within `index_poll_s` seconds; each
request runs on the index it started with.

Uploads are bounded in bytes (checked from Content-Length before reading)
and in pixels (read from the image header before decoding). Errors are
`{"error": "..."}` with 400, 404, 411 or 413.
"""

import dataclasses
import importlib.resources
import io
import json
import os
import threading
import urllib.parse

from absl import logging
import numpy as np
from PIL import Image, UnidentifiedImageError

from uhga_tf.data import image_header
from uhga_tf.retrieval import live_index
from uhga_tf.retrieval import pipeline
from uhga_tf.retrieval import result_grid
from uhga_tf.saved_model import wire_names
from uhga_tf.serving import http_server
from uhga_tf.serving import rest

THUMBNAIL_SIZE = 256
MAX_TOP_K = 100


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """Settings of the search page.

    Attributes:
        host: interface to bind; loopback unless asked otherwise.
        port: TCP port; 0 picks a free one.
        top_k: results per search unless the request asks for another
            number in [1, MAX_TOP_K].
        max_upload_bytes: largest accepted upload.
        max_pixels: largest accepted width * height of an upload.
        index_poll_s: seconds between checks for a changed index file; 0
            serves the index loaded at start for ever.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    top_k: int = 12
    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 16_000_000
    index_poll_s: float = 1.0

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"port must be in [0, 65535]; received port={self.port}"
            )
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(
                f"top_k must be in [1, {MAX_TOP_K}]; received "
                f"top_k={self.top_k}"
            )
        for name in ("max_upload_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be >= 1; received "
                    f"{name}={getattr(self, name)}"
                )


class SearchError(Exception):
    """A refused search request, with its HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class SearchService:
    """Encode queries and rank a `HammingIndex`; JSON-ready answers.

    Args:
        index_dir: directory written by `uhga_tf.index build`.
        model_dir: SavedModel encoding the queries, or None with `server`.
        server: "HOST:PORT" of a gRPC server encoding the queries.
        model_name: model name on `server`.
        config: a `WebConfig` (upload bounds, default top_k).
    """

    def __init__(
        self,
        index_dir,
        model_dir=None,
        server=None,
        model_name=wire_names.DEFAULT_MODEL_NAME,
        config=None,
    ):
        if (model_dir is None) == (server is None):
            raise ValueError(
                "give exactly one of model_dir and server; received "
                f"model_dir={model_dir!r}, server={server!r}"
            )
        self.config = config or WebConfig()
        self._live = live_index.LiveIndex(index_dir, self.config.index_poll_s)
        # Thumbnails show the user's own indexed files, under the limit
        # their indexing had (the loader's default); `max_pixels` bounds
        # what others upload.
        self._tiles = pipeline._TileLoader(self.index.info)
        self._tiles_lock = threading.Lock()
        if server is not None:
            self._encode = _server_encoder(server, model_name)
        else:
            self._encode = _model_encoder(model_dir, self.index.code_length)

    @property
    def index(self):
        """The index now live (a request keeps the one it started with)."""
        return self._live.current().index

    def _top_k(self, top_k, index):
        if top_k is None:
            return self.config.top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise SearchError(
                400, f"top_k must be in [1, {MAX_TOP_K}]; received {top_k}"
            )
        return min(top_k, len(index))

    def check_upload(self, data):
        """Refuse anything the decode guard or the decoders refuse.

        `image_header.check_decodable` runs first, so PIL and TensorFlow
        only ever see images whose every frame fits `max_pixels`.
        """
        if len(data) > self.config.max_upload_bytes:
            raise SearchError(
                413,
                f"upload of {len(data)} bytes is over max_upload_bytes="
                f"{self.config.max_upload_bytes}",
            )
        try:
            image_header.check_decodable(
                data, self.config.max_pixels, "upload", "max_pixels"
            )
        except image_header.ImageRefused as e:
            too_large = isinstance(e, image_header.ImageTooLarge)
            raise SearchError(413 if too_large else 400, str(e)) from e
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError,
                Image.DecompressionBombError) as e:
            raise SearchError(400, f"upload is not an image: {e}") from e

    def search_upload(self, data, top_k=None):
        """Rank the index for an uploaded encoded image."""
        self.check_upload(data)
        packed = self._encode([data])
        # One snapshot for the check and the search: a reload in between
        # must not pair these codes with another index.
        index = self.index
        if packed.shape[1] * 8 != index.code_length:
            raise SearchError(
                500,
                f"the model emits {packed.shape[1] * 8}-bit codes; the index "
                f"holds {index.code_length}-bit codes (rebuild the "
                "index with this model, or serve the model that built it)",
            )
        return self._answer(index, packed, {"id": None},
                            self._top_k(top_k, index))

    def search_item(self, item_id, top_k=None):
        """Rank the index for the code of an indexed item."""
        snapshot = self._live.current()
        position = snapshot.position(item_id)
        if position is None:
            raise SearchError(404, f"no item with id {item_id} in the index")
        index = snapshot.index
        packed = index.packed_codes_at([position])
        query = self._item(index, item_id)
        query["image"] = f"/image/{item_id}"
        return self._answer(index, packed, query, self._top_k(top_k, index))

    def _item(self, index, item_id):
        (metadata,) = index.get_metadata(np.array([item_id]))
        label = None
        class_names = index.info.get("class_names")
        if class_names and metadata.get("label") is not None:
            names = [
                class_names[i]
                for i in sorted(pipeline._as_set(metadata["label"]))
            ]
            label = ", ".join(names)
        source = metadata.get("source")
        return {
            "id": int(item_id),
            "label": label,
            "source": os.path.basename(source) if source else None,
        }

    def _answer(self, index, packed, query, top_k):
        ids, distances = index.search(packed, top_k)
        results = []
        for rank, (item_id, distance) in enumerate(
            zip(ids[0], distances[0]), start=1
        ):
            if item_id < 0:
                continue
            item = self._item(index, int(item_id))
            item.update(
                rank=rank,
                distance=int(distance),
                image=f"/image/{int(item_id)}",
            )
            results.append(item)
        return {
            "query": query,
            "code_length": index.code_length,
            "results": results,
        }

    def thumbnail(self, item_id):
        """Return PNG bytes of an indexed item, at most THUMBNAIL_SIZE."""
        snapshot = self._live.current()
        if snapshot.position(item_id) is None:
            raise SearchError(404, f"no item with id {item_id} in the index")
        (metadata,) = snapshot.index.get_metadata(np.array([item_id]))
        try:
            with self._tiles_lock:
                image = self._tiles(metadata.get("source"))
            image = result_grid.shown_upright(image).convert("RGB")
        except (OSError, ValueError, TypeError,
                Image.DecompressionBombError) as e:
            raise SearchError(
                404, f"image of item {item_id} cannot be read: {e}"
            ) from e
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def _server_encoder(server, model_name):
    """encode(blobs) -> packed codes via gRPC; refusals become SearchError."""
    import grpc

    from uhga_tf.serving import grpc_client

    def encode(blobs):
        try:
            _, packed = grpc_client.encode_images(
                server, blobs, model_name=model_name, timeout=30.0
            )
        except grpc.RpcError as e:
            raise SearchError(
                rest.http_status(e.code()),
                f"the model server at {server} answered "
                f"{e.code().name}: {e.details()}",
            ) from e
        return np.asarray(packed, np.uint8)

    return encode


def _model_encoder(model_dir, code_length):
    """encode(blobs) -> packed codes via a SavedModel; checks code_length."""
    import tensorflow as tf

    from uhga_tf import io_utils

    encoder = pipeline.SavedModelEncoder(model_dir)
    if encoder.code_length not in (None, code_length):
        raise ValueError(
            f"the model {model_dir} emits {encoder.code_length}-bit codes; "
            f"the index holds {code_length}-bit codes: expected the model "
            "that built the index"
        )

    def encode(blobs):
        try:
            return encoder.encode_image_bytes(blobs)[1]
        except tf.errors.InvalidArgumentError as e:
            raise SearchError(
                400,
                f"upload cannot be decoded: {io_utils.tf_error_line(e)}",
            ) from e

    return encode


def _page():
    return (
        importlib.resources.files("uhga_tf.retrieval")
        .joinpath("static/search.html")
        .read_bytes()
    )


class _Handler(http_server.BoundedHandler):
    server_version = "uhga_tf-search"
    service = None  # SearchService, set by SearchWebServer

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        logging.vlog(1, "search page %s", format % args)

    def _send(self, status, body, content_type="application/json"):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _query(self):
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        values = {}
        for name in ("top_k", "id"):
            if name in params:
                try:
                    values[name] = int(params[name][0])
                except ValueError as e:
                    raise SearchError(
                        400, f"{name} must be an integer; received "
                        f"{params[name][0]!r}",
                    ) from e
        return url.path, values

    def _run(self, fn):
        try:
            fn()
        except SearchError as e:
            logging.warning("search page %d: %s", e.status, e.message)
            self._send(e.status, {"error": e.message})
        except Exception as e:  # noqa: BLE001 - every request is answered
            logging.exception("search page %s %s failed", self.command,
                              self.path)
            self.close_connection = True
            try:
                self._send(500, {
                    "error": f"internal error: {type(e).__name__}: {e}"
                })
            except OSError:
                pass  # the client is gone

    def do_GET(self):  # noqa: N802 - stdlib name
        self.mark_busy()

        def answer():
            path, params = self._query()
            if path in ("/", "/index.html"):
                self._send(200, _page(), "text/html; charset=utf-8")
            elif path == "/api/search":
                if "id" not in params:
                    raise SearchError(400, "GET /api/search needs ?id=")
                self._send(
                    200,
                    self.service.search_item(params["id"], params.get("top_k")),
                )
            elif path.startswith("/image/"):
                try:
                    item_id = int(path[len("/image/") :])
                except ValueError as e:
                    raise SearchError(404, f"no image at {path}") from e
                self._send(200, self.service.thumbnail(item_id), "image/png")
            else:
                raise SearchError(404, f"no page at {path}")

        self._run(answer)

    def do_POST(self):  # noqa: N802 - stdlib name
        def answer():
            path, params = self._query()
            limit = self.service.config.max_upload_bytes
            try:
                length = http_server.body_length(
                    self.headers, limit, "upload (max_upload_bytes)"
                )
            except http_server.FramingError as e:
                self.close_connection = True
                raise SearchError(e.status, e.message) from e
            data = self.read_body(length)
            if path != "/api/search":
                raise SearchError(404, f"no endpoint at {path}")
            self._send(
                200, self.service.search_upload(data, params.get("top_k"))
            )

        self._run(answer)


class SearchWebServer:
    """Serve the search page and its JSON API in a background thread."""

    def __init__(self, service):
        self.service = service
        self._handler = type("Handler", (_Handler,), {"service": service})
        self._httpd = None
        self._thread = None
        self.port = None

    def start(self):
        """Bind and serve; return the bound port."""
        config = self.service.config
        self._httpd, self._thread = http_server.serve_in_background(
            config.host, config.port, self._handler, "uhga-search-page"
        )
        self.port = self._httpd.server_address[1]
        self.service._live.start()
        logging.info(
            "Search page for %d items on http://%s:%d/",
            len(self.service.index),
            config.host,
            self.port,
        )
        return self.port

    def stop(self):
        self.service._live.stop()
        if self._httpd is not None:
            http_server.stop_background(self._httpd, self._thread)
            self._httpd = None
