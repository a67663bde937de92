"""Encode an image collection into code shards with an Apache Beam pipeline.

listing.jsonl -> read -> reshuffle -> batches -> encode (one SavedModel per
worker) -> codes shards + dead-letter shards; the driver writes the listing
before and the manifest after the run. The same pipeline runs on the
DirectRunner (local processes) or on Flink, Spark or Dataflow: only the
pipeline options change. Images are read through Beam's `FileSystems`, so
`gs://`/`s3://` paths work where the runner has those file systems.

Encoding goes through `pipeline.encode_blobs` with `SavedModelEncoder`: the
same signature, decode guard and bytes path as `index build --images`, so the
codes agree bit for bit. Needs the `beam` extra (`pip install -e ".[beam]"`).
"""

import dataclasses
import json
import os
import time

import apache_beam as beam
from absl import logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from uhga_tf.data import image_header
from uhga_tf.retrieval import code_shards
from uhga_tf.retrieval import pipeline

DEAD_LETTER = "dead_letter"


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """What to encode, with what, and where the shards go.

    Attributes:
        model_dir: SavedModel version directory (models/uhga/N).
        images: an image folder (read recursively, as `index build`) or a
            glob understood by Beam's FileSystems.
        out_dir: codes directory; must not already hold shards.
        batch_size: images per SavedModel call.
        beam_args: Beam pipeline options, e.g. ["--runner=DirectRunner",
            "--direct_num_workers=2"].
        threads_per_worker: TensorFlow intra-op threads of each worker; 0
            leaves TensorFlow's default (all cores). Local worker processes
            sharing a machine should split its cores instead of each taking
            all of them.
        max_image_pixels: the decode guard's limit, as `index build
            --max_image_pixels`; larger images become dead letters.
    """

    model_dir: str
    images: str
    out_dir: str
    batch_size: int = 64
    beam_args: tuple = ()
    threads_per_worker: int = 0
    max_image_pixels: int = image_header.COLLECTION_MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(
                f"batch_size must be >= 1; received "
                f"batch_size={self.batch_size}"
            )


class EncodeBatchDoFn(beam.DoFn):
    """Encode batches of listing items; bad ones go to the dead letters.

    The SavedModel is loaded once per worker in `setup`, not per element.
    """

    def __init__(self, model_dir, threads=0,
                 max_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS):
        self._model_dir = model_dir
        self._threads = threads
        self._max_pixels = max_pixels
        self._encoder = None
        self._encoded = beam.metrics.Metrics.counter("uhga_tf", "encoded")
        self._dead = beam.metrics.Metrics.counter("uhga_tf", "dead_letters")

    def setup(self):
        if self._threads:
            import tensorflow as tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(
                    self._threads)
                tf.config.threading.set_inter_op_parallelism_threads(
                    self._threads)
            except RuntimeError as e:  # TF already running in this process
                logging.warning("Cannot set TF threads to %d: %s",
                                self._threads, e)
        self._encoder = pipeline.SavedModelEncoder(self._model_dir)

    def process(self, batch):
        blobs, readable, dead = [], [], []
        for item in batch:
            try:
                with FileSystems.open(item["source"]) as f:
                    blobs.append(f.read())
                readable.append(item)
            except OSError as e:
                dead.append((item, f"cannot read: {e}"))
        if blobs:
            packed, reasons = pipeline.encode_blobs(
                self._encoder, blobs, [item["source"] for item in readable],
                self._max_pixels)
            for item, row, reason in zip(readable, packed, reasons):
                if reason is None:
                    self._encoded.inc()
                    yield code_shards.code_record(item, row)
                else:
                    dead.append((item, reason))
        for item, reason in dead:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER, code_shards.dead_letter_record(item, reason)
            )


def list_collection(images):
    """(sources, class_names, labels) of a folder or a glob, sorted."""
    if os.path.isdir(images):
        return pipeline.find_images(images)
    (result,) = FileSystems.match([images])
    matched = [m.path for m in result.metadata_list]
    sources = sorted(
        p for p in matched if p.lower().endswith(image_header.EXTENSIONS))
    unread = image_header.unread_photos(matched)
    if unread:
        logging.warning("%s: %s", images,
                        image_header.unread_photos_note(unread))
    if not sources:
        raise ValueError(f"no images match {images!r}")
    return sources, None, None


def build_pipeline(root, config, listing_path):
    """Add the encode transforms to `root` (a beam.Pipeline)."""
    out = os.path.abspath(config.out_dir)
    results = (
        root
        | "ReadListing" >> beam.io.ReadFromText(listing_path)
        | "Parse" >> beam.Map(json.loads)
        # Spread the listing over workers before the expensive step.
        | "Reshuffle" >> beam.Reshuffle()
        | "Batch" >> beam.BatchElements(
            min_batch_size=config.batch_size,
            max_batch_size=config.batch_size,
        )
        | "Encode" >> beam.ParDo(EncodeBatchDoFn(
            config.model_dir, config.threads_per_worker,
            config.max_image_pixels))
        .with_outputs(DEAD_LETTER, main="codes")
    )
    for name, prefix in (
        ("codes", code_shards.CODES_PREFIX),
        (DEAD_LETTER, code_shards.DEAD_LETTER_PREFIX),
    ):
        _ = results[name] | f"Write_{name}" >> beam.io.WriteToText(
            os.path.join(out, prefix), file_name_suffix=code_shards.SUFFIX
        )


def encode_collection(config):
    """Run the pipeline to completion and write the manifest.

    Returns:
        the manifest dict (count, dead_letter_count, shard names, ...).
    """
    out = os.path.abspath(config.out_dir)
    for prefix in (code_shards.CODES_PREFIX, code_shards.DEAD_LETTER_PREFIX):
        if code_shards.shard_paths(out, prefix):
            raise ValueError(
                f"out_dir {out} already holds {prefix} shards; give an "
                "empty or new directory"
            )
    sources, class_names, labels = list_collection(config.images)
    os.makedirs(out, exist_ok=True)
    listing_path = os.path.join(out, code_shards.LISTING)
    lines = [
        json.dumps({"id": i, "source": source,
                    "label": None if labels is None else labels[i]})
        for i, source in enumerate(sources)
    ]
    with open(listing_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    metadata = pipeline.read_model_metadata(config.model_dir)
    options = PipelineOptions(list(config.beam_args))
    start = time.perf_counter()
    with beam.Pipeline(options=options) as root:
        build_pipeline(root, config, listing_path)
    wall_s = time.perf_counter() - start
    code_paths = code_shards.shard_paths(out, code_shards.CODES_PREFIX)
    dead_paths = code_shards.shard_paths(out, code_shards.DEAD_LETTER_PREFIX)
    dead = code_shards.read_lines(dead_paths)
    manifest = {
        "format": code_shards.FORMAT,
        "code_length": metadata.get("code_length"),
        "bit_order": "packbits-msb-first",
        "model": os.path.abspath(config.model_dir),
        "images": config.images,
        "class_names": class_names,
        "listed": len(sources),
        "count": len(sources) - len(dead),
        "dead_letter_count": len(dead),
        "code_shards": [os.path.basename(p) for p in code_paths],
        "dead_letter_shards": [os.path.basename(p) for p in dead_paths],
        "beam_args": list(config.beam_args),
        "wall_s": round(wall_s, 3),
    }
    if manifest["count"] == 0:
        raise ValueError(
            f"no image could be encoded; see the dead letters in {out}"
        )
    if manifest["code_length"] is None:
        first = code_shards.read_lines(code_paths)[0]
        manifest["code_length"] = 4 * len(first["packed_codes"])
    code_shards.write_manifest(out, manifest)
    logging.info("Encoded %d images (%d dead letters) in %.1f s to %s",
                 manifest["count"], len(dead), wall_s, out)
    return manifest
