"""Format and pixel size of an encoded image, read from its header only.

`tf.io.decode_image` reads JPEG, PNG, GIF, BMP and WebP. Their headers state the
image size, so a decompression bomb (a small file of a huge image) can be
refused before any pixel is decoded: `check_decodable` is that guard, the
one every path from bytes to pixels calls.
"""

import os
import struct

# 4096 x 4096: ~50 MB of decoded RGB per image. The limit of what others
# send (the server, the search page's uploads).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# 8192 x 8192 (64 Mi pixels, ~200 MB of decoded RGB): the limit of a user's
# own files (training on a folder, index build, Beam encoding, a search
# query, thumbnails), so 24 MP camera and 48 / 50 MP phone photos are read.
COLLECTION_MAX_IMAGE_PIXELS = 8192 * 8192
# 64 Mi pixels per request (~200 MB decoded RGB): the server's default, and
# what an export's warm-up images must fit.
DEFAULT_MAX_REQUEST_PIXELS = 64 * 1024 * 1024

# Leading bytes of the formats tf.io.decode_image reads.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# One phrase for messages that name them.
FORMAT_NAMES = "JPEG, PNG, GIF, BMP or WebP"
# File name extensions of FORMATS (lower case), for finding images on disk.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Photo formats that no TensorFlow decoder reads (lower case), named when a
# folder holds them so that a skipped library is never a silent one.
UNREAD_PHOTO_EXTENSIONS = (".heic", ".heif", ".avif", ".tif", ".tiff",
                           ".dng", ".cr2", ".nef", ".arw")
CONVERT_HINT = ("convert them to JPEG first (e.g. `heif-convert`, "
                 "`magick mogrify -format jpg`), keeping the EXIF orientation")
# VP8X flags: the file is an animation (a sequence of frames).
_WEBP_ANIMATION = 0x02
# JPEG start-of-frame markers (all but DHT C4, JPG C8 and DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
        0xCE, 0xCF}


class ImageRefused(ValueError):
    """Bytes the decode guard will not hand to a decoder."""


class ImageTooLarge(ImageRefused):
    """An image that decodes to more pixels than the limit allows."""


def unread_photos(names):
    """{extension: count} of the file names that are photos in a format
    no TensorFlow decoder reads (`UNREAD_PHOTO_EXTENSIONS`)."""
    counts = {}
    for name in names:
        extension = os.path.splitext(name)[1].lower()
        if extension in UNREAD_PHOTO_EXTENSIONS:
            counts[extension] = counts.get(extension, 0) + 1
    return counts


def unread_photos_note(counts):
    """What a user is told about `unread_photos` counts (a listing that
    skipped them): how many of each and what to do; "" for none."""
    if not counts:
        return ""
    listed = ", ".join(f"{n} {e}" for e, n in sorted(counts.items()))
    return (f"skipped {listed}: photos that TensorFlow cannot decode; "
            + CONVERT_HINT)


def image_format(encoded):
    """Return "JPEG", "PNG", "GIF", "BMP" or "WEBP", or None otherwise."""
    encoded = bytes(encoded[:12])
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if encoded.startswith(magic):
            return name
    return None


def _jpeg_size(data):
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD9:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(data):
    """(width, height) from a WebP's first chunk: lossy "VP8 ", lossless
    "VP8L" or extended "VP8X" (its canvas); None if cut short."""
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a" and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return None


def webp_animated(data):
    """Whether a WebP says it is an animation (TensorFlow decodes only
    still WebP images to 3 channels)."""
    return data[12:16] == b"VP8X" and len(data) > 20 and bool(
        data[20] & _WEBP_ANIMATION)


def _skip_sub_blocks(data, i):
    """Index after a GIF sub-block chain starting at `i`, or None."""
    n = len(data)
    while i < n:
        size = data[i]
        i += 1 + size
        if size == 0:
            return i if i <= n else None
    return None


def gif_frames(data):
    """Return the (width, height) of every GIF image descriptor, or None.

    giflib (under tf.io.decode_image) reads every frame into memory, at the
    frame's own size, before TensorFlow keeps the first; a GIF whose blocks
    do not run cleanly to the trailer is None (giflib refuses it too, but
    only after allocating what it read).
    """
    n = len(data)
    if n < 13:
        return None
    i = 13
    if data[10] & 0x80:  # global colour table
        i += 3 * (2 ** ((data[10] & 0x07) + 1))
    frames = []
    while i is not None and i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            return frames
        if block == 0x21:  # extension: label, then sub-blocks
            i = _skip_sub_blocks(data, i + 2)
        elif block == 0x2C and i + 10 <= n:  # image descriptor
            frames.append(struct.unpack("<HH", data[i + 5:i + 9]))
            flags = data[i + 9]
            i += 10
            if flags & 0x80:  # local colour table
                i += 3 * (2 ** ((flags & 0x07) + 1))
            i = _skip_sub_blocks(data, i + 1)  # after the LZW code size
        else:
            return None
    return None


def image_size(encoded):
    """Return (format, width, height) from the header.

    Width and height are None when the header is cut short or malformed
    (the decoder then reports the problem); format is None when the bytes
    are not a JPEG, PNG, GIF, BMP or WebP image.
    """
    data = bytes(encoded)
    kind = image_format(data)
    size = None
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        size = struct.unpack(">II", data[16:24])
    elif kind == "GIF" and len(data) >= 10:
        size = struct.unpack("<HH", data[6:10])
    elif kind == "BMP" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        size = abs(width), abs(height)
    elif kind == "JPEG":
        size = _jpeg_size(data)
    elif kind == "WEBP":
        size = _webp_size(data)
    if size is None:
        return kind, None, None
    return kind, int(size[0]), int(size[1])


def decoded_pixels(encoded):
    """Return (format, width, height, pixels the decoder will produce).

    For a GIF every frame is decoded: each counts at the larger of the
    canvas and its own rectangle. The numbers are None where the header
    does not tell (a malformed JPEG marker run, a GIF that does not end
    in its trailer, a header cut short, a zero side).
    """
    data = bytes(encoded)
    kind, width, height = image_size(data)
    if not width or not height:
        return kind, None, None, None
    pixels = width * height
    if kind == "GIF":
        frames = gif_frames(data)
        if not frames:
            return kind, None, None, None
        pixels = sum(max(pixels, w * h) for w, h in frames)
    return kind, width, height, pixels


def check_decodable(encoded, max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                    where="image", limit_name="max_image_pixels"):
    """The decode guard: may these bytes be handed to an image decoder?

    Every path that turns bytes into pixels (serving, the search page and
    its thumbnails, the index builder, the search CLI, folder datasets)
    calls this first, so the limit holds whatever the decoder would do:
    the image must be a JPEG, PNG, GIF, BMP or still WebP whose header
    states its size
    (bytes that cannot be sized are refused, since decoders skip junk that
    a header reader cannot), and all the pixels it decodes to, every GIF
    frame included, must be at most `max_pixels`.

    Returns:
        The number of pixels the decoder will produce.

    Raises:
        ImageRefused: a one-line reason naming `where`; `ImageTooLarge`
            (a subclass) names the limit as `limit_name`.
    """
    kind, width, height, pixels = decoded_pixels(encoded)
    if kind is None:
        raise ImageRefused(
            f"{where} is not a {FORMAT_NAMES} image (first bytes "
            f"{bytes(encoded[:8])!r})"
        )
    if kind == "WEBP" and webp_animated(bytes(encoded[:32])):
        raise ImageRefused(
            f"{where} is an animated WebP, which the decoder does not read; "
            "send one frame as a still image")
    if pixels is None:
        raise ImageRefused(
            f"{where} is not a well-formed {kind}: its size cannot be read "
            "from its header (malformed or cut short)"
        )
    if pixels > max_pixels:
        frames = len(gif_frames(bytes(encoded))) if kind == "GIF" else 1
        what = f" of {frames} frames" if frames > 1 else ""
        raise ImageTooLarge(
            f"{where} is a {width}x{height}{what} {kind} ({pixels} pixels "
            f"to decode), over {limit_name}={max_pixels}"
        )
    return pixels
