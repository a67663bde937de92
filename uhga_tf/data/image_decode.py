"""Decode an encoded image upright, the way its camera meant it to be seen,
and resize images to the backbone's input (`resize_square`).

Phones and cameras store a JPEG's pixels as the sensor read them and say
how to turn them in the EXIF Orientation tag (0x0112): a portrait photo is
usually stored lying on its side with orientation 6 or 8. Viewers and
browsers apply the tag; `tf.io.decode_image` does not. A backbone trained on
upright ImageNet photos then sees a sideways cat, so the same scene shot in
portrait and in landscape would get far-apart codes.

`decode_upright` is the one decoder from bytes to pixels: feature
extraction, the CIFAR-10 loader and the exported SavedModel's
`encode_image_bytes` signature all call it, so a model serves exactly what
it was trained on (and `result_grid.shown_upright` shows pictures the same
way). The tag is read with TensorFlow's own string and gather
ops, so the exported graph still runs on stock TF-Serving.

Only JPEG's EXIF (an APP1 segment starting "Exif\\0\\0") is read; PNG, GIF
and BMP, and JPEGs without the tag or with a malformed one, are left as
stored (orientation 1). The parser never raises: every read is bounded and
a byte past the end reads as zero.
"""

import tensorflow as tf

ORIENTATION_TAG = 0x0112
# Names this decoding and resizing in feature cache keys.
DECODE = "exif_upright+antialiased_shrink"
# The Exif APP1 segment comes first after the start of image (EXIF 2.3), or
# after a JFIF APP0, ICC or XMP segment; the tag is looked for in the first
# MAX_APP_SEGMENTS segments only, and only in IFD0's first MAX_IFD_ENTRIES
# entries (a camera writes 10 to 30).
MAX_APP_SEGMENTS = 6
MAX_IFD_ENTRIES = 64
# A JPEG segment, so the TIFF data inside the Exif one, is at most 64 KiB.
SEGMENT_BYTES = 64 * 1024
_EXIF_NAME = (0x45, 0x78, 0x69, 0x66, 0x00, 0x00)  # "Exif\0\0"
_EXIF_SEP = bytes(_EXIF_NAME).decode("latin-1")
# The start of image and MAX_APP_SEGMENTS whole segments.
_WALK_BYTES = 2 + MAX_APP_SEGMENTS * (SEGMENT_BYTES + 2)
_INTEL, _MOTOROLA = 0x49, 0x4D  # "II" little-endian, "MM" big-endian


def _read(encoded, size, at, n):
    """int64 [n]: the `n` bytes of `encoded` from `at`, zeros past its end
    (so every read below is safe on any input)."""
    at = tf.clip_by_value(tf.cast(at, tf.int64), 0, size)
    raw = tf.io.decode_raw(
        tf.strings.substr(encoded, at, tf.constant(n, tf.int64)), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.pad(raw, [[0, n - tf.shape(raw, out_type=tf.int64)[0]]])


def exif_orientation(encoded):
    """The EXIF orientation (1 ... 8) of one encoded image; 1 when absent.

    Args:
        encoded: string scalar tensor, the file's bytes.

    Returns:
        int32 scalar: 1 (as stored), 2 (mirrored), 3 (upside down),
        4 (mirrored upside down), 5 to 8 (turned a quarter, 5 and 7 also
        mirrored), as in the EXIF 2.3 standard.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    return tf.cond(_names_exif(encoded),
                   lambda: _walk_to_orientation(encoded),
                   lambda: tf.constant(1, tf.int32))


def _names_exif(encoded):
    """Whether "Exif\\0\\0" occurs where the walk could find it. Most images
    hold no Exif segment, and this one split (a byte search, unlike TF's
    regexes, which read UTF-8) lets them skip the walk."""
    return tf.greater(tf.size(tf.strings.split(
        tf.strings.substr(encoded, 0, _WALK_BYTES), sep=_EXIF_SEP)), 1)


def _walk_to_orientation(encoded):
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    is_jpeg = tf.reduce_all(tf.equal(_read(encoded, size, 0, 2), [0xFF, 0xD8]))
    # Walk the leading APPn segments (markers FFE0 ... FFEF) by their
    # lengths; a segment of another kind ends the walk.
    at = tf.constant(2, tf.int64)
    tiff = tf.constant(-1, tf.int64)
    for _ in range(MAX_APP_SEGMENTS):
        head = _read(encoded, size, at, 10)
        is_app = tf.logical_and(tf.equal(head[0], 0xFF),
                                tf.equal(head[1] // 16, 0xE))
        is_exif = tf.logical_and(
            tf.equal(head[1], 0xE1),
            tf.reduce_all(tf.equal(head[4:], _EXIF_NAME)))
        tiff = tf.where(tf.logical_and(tf.less(tiff, 0),
                                       tf.logical_and(is_app, is_exif)),
                        at + 10, tiff)
        at = tf.where(is_app, at + 2 + 256 * head[2] + head[3], at)
    return tf.cond(
        tf.logical_and(is_jpeg, tf.greater_equal(tiff, 0)),
        lambda: _ifd0_orientation(encoded, size, tiff),
        lambda: tf.constant(1, tf.int32))


def _ifd0_orientation(encoded, size, tiff):
    """The orientation tag of the TIFF data at `tiff`; 1 if unreadable."""
    data = _read(encoded, size, tiff, SEGMENT_BYTES + 16)
    available = tf.minimum(size - tiff, SEGMENT_BYTES)

    def byte(i):
        return tf.gather(data, tf.clip_by_value(
            tf.cast(i, tf.int64), 0, SEGMENT_BYTES + 15))

    little = tf.logical_and(tf.equal(byte(0), _INTEL),
                            tf.equal(byte(1), _INTEL))
    big = tf.logical_and(tf.equal(byte(0), _MOTOROLA),
                         tf.equal(byte(1), _MOTOROLA))

    def unsigned(at, width):
        """Unsigned `width`-byte integer at `at` in the TIFF byte order."""
        parts = [byte(at + k) for k in range(width)]
        value_little = sum(p * 256 ** k for k, p in enumerate(parts))
        value_big = sum(p * 256 ** (width - 1 - k)
                        for k, p in enumerate(parts))
        return tf.where(little, value_little, value_big)

    ifd = unsigned(4, 4)
    number = tf.range(MAX_IFD_ENTRIES, dtype=tf.int64)
    entries = ifd + 2 + 12 * number
    is_tag = tf.logical_and(
        tf.less(number, unsigned(ifd, 2)),
        tf.equal(unsigned(entries, 2), ORIENTATION_TAG))
    entry = tf.gather(entries, tf.argmax(tf.cast(is_tag, tf.int32),
                                         output_type=tf.int64))
    value = unsigned(entry + 8, 2)
    valid = tf.reduce_all([
        tf.logical_or(little, big), tf.reduce_any(is_tag),
        tf.less_equal(entry + 10, available),
        tf.greater_equal(value, 1), tf.less_equal(value, 8)])
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def orient(image, orientation):
    """Turn `image` [h, w, c] stored with EXIF `orientation` upright.

    Orientations 5 to 8 swap height and width.
    """
    # Slices and one transpose: tf.image.rot90's shape assertion inside a
    # loop (the serving graph's map_fn) makes TF log a warning per load.
    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,                                # 1: as stored
        lambda: image[:, ::-1],                       # 2: mirrored
        lambda: image[::-1, ::-1],                    # 3: upside down
        lambda: image[::-1],                          # 4: flipped
        lambda: transpose(image),                     # 5: transposed
        lambda: transpose(image)[:, ::-1],            # 6: turn clockwise
        lambda: transpose(image)[::-1, ::-1],         # 7: transverse
        lambda: transpose(image)[::-1],               # 8: turn anticlockwise
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def resize_square(images, image_size):
    """Resize [n, h, w, 3] images to float32 [n, S, S, 3], S = `image_size`:
    bilinear, with an antialiasing filter when either side shrinks.

    Plain bilinear sampling reads about 4 of the 37 x 37 source pixels
    behind each output pixel when a 6000-pixel photo becomes 160, so the
    backbone sees the photo's noise and fine texture aliased. Growing
    images (CIFAR-10's 32 px and Fashion-MNIST's 28 px at the backbone's
    size) keep plain bilinear, bit for bit as before the filter.
    """
    images = tf.cast(images, tf.float32)
    size = [image_size, image_size]
    shrinks = tf.reduce_any(tf.greater(tf.shape(images)[1:3], image_size))
    return tf.cond(
        shrinks,
        lambda: tf.image.resize(images, size, "bilinear", antialias=True),
        lambda: tf.image.resize(images, size, "bilinear", antialias=False))


def decode_upright(encoded):
    """Decode one JPEG, PNG, GIF (first frame), BMP or still WebP to uint8
    [h, w, 3] RGB (alpha dropped), turned upright by a JPEG's EXIF
    orientation."""
    encoded = tf.convert_to_tensor(encoded, tf.string)
    is_webp = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, 4), "RIFF"),
        tf.equal(tf.strings.substr(encoded, 8, 4), "WEBP"))
    # TensorFlow's WebP decoder gives only the file's own channels (3, or 4
    # with alpha), so alpha is dropped here, as the PNG decoder drops it.
    image = tf.cond(
        is_webp,
        lambda: tf.io.decode_image(
            encoded, expand_animations=False, dtype=tf.uint8)[..., :3],
        lambda: tf.io.decode_image(
            encoded, channels=3, expand_animations=False, dtype=tf.uint8))
    image = tf.ensure_shape(image, [None, None, 3])
    # The common image without Exif takes one branch and no `switch_case`.
    return tf.cond(
        _names_exif(encoded),
        lambda: orient(image, _walk_to_orientation(encoded)),
        lambda: tf.ensure_shape(image, [None, None, 3]))
