"""Wire names of the exported SavedModel: signatures, inputs, outputs, files.

The one place they are spelled; the server, clients, retrieval and
benchmarks import them from here. No TensorFlow import, so a client or a
command-line flag default can name them without loading TensorFlow.
"""

SIGNATURE_IMAGE_BYTES = "serving_default"
SIGNATURE_IMAGES = "encode_images"
SIGNATURE_FEATURES = "encode_features"
INPUT_IMAGE_BYTES = "image_bytes"
INPUT_IMAGES = "images"
INPUT_FEATURES = "features"
SIGNATURE_INPUTS = {
    SIGNATURE_IMAGE_BYTES: INPUT_IMAGE_BYTES,
    SIGNATURE_IMAGES: INPUT_IMAGES,
    SIGNATURE_FEATURES: INPUT_FEATURES,
}
OUTPUT_CODES = "codes"
OUTPUT_PACKED_CODES = "packed_codes"
OUTPUT_KEYS = (OUTPUT_CODES, OUTPUT_PACKED_CODES)
DEFAULT_MODEL_NAME = "uhga"
METADATA_FILENAME = "uhga_tf.json"
WARMUP_FILENAME = "tf_serving_warmup_requests"
ASSETS_EXTRA = "assets.extra"
