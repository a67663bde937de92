"""Format and pixel size of an encoded image, read from its header only.

`tf.io.decode_image` reads JPEG, PNG, GIF and BMP. Their headers state the
image size, so a decompression bomb (a small file of a huge image) can be
refused before any pixel is decoded.
"""

import struct

# Leading bytes of the formats tf.io.decode_image reads.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
FORMATS = ("JPEG", "PNG", "GIF", "BMP")
# JPEG start-of-frame markers (all but DHT C4, JPG C8 and DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
        0xCE, 0xCF}


def image_format(encoded):
    """Return "JPEG", "PNG", "GIF" or "BMP", or None for anything else."""
    encoded = bytes(encoded[:8])
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


def gif_frames(data):
    """Count the image descriptors of a GIF (all are decoded), or None."""
    n = len(data)
    if n < 13:
        return None
    i = 13
    if data[10] & 0x80:  # global colour table
        i += 3 * (2 ** ((data[10] & 0x07) + 1))
    frames = 0

    def skip_sub_blocks(i):
        while i < n:
            size = data[i]
            i += 1 + size
            if size == 0:
                return i
        return None

    while i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            i = skip_sub_blocks(i + 2)
        elif block == 0x2C:  # image descriptor
            frames += 1
            if i + 10 > n:
                break
            flags = data[i + 9]
            i += 10
            if flags & 0x80:  # local colour table
                i += 3 * (2 ** ((flags & 0x07) + 1))
            i = skip_sub_blocks(i + 1)  # after the LZW minimum code size
        else:
            break
        if i is None:
            break
    return frames


def image_size(encoded):
    """Return (format, width, height) from the header.

    Width and height are None when the header is cut short or malformed
    (the decoder then reports the problem); format is None when the bytes
    are not a JPEG, PNG, GIF or BMP image.
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
    if size is None:
        return kind, None, None
    return kind, int(size[0]), int(size[1])


def decoded_pixels(encoded):
    """Return (format, width, height, pixels the decoder will produce).

    For a GIF every frame is decoded, so pixels count all frames; the
    numbers are None where the header does not tell.
    """
    data = bytes(encoded)
    kind, width, height = image_size(data)
    if width is None:
        return kind, None, None, None
    pixels = width * height
    if kind == "GIF":
        pixels *= max(1, gif_frames(data) or 1)
    return kind, width, height, pixels
