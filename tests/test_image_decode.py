"""uhga_tf.data.image_decode: photos are decoded upright by their EXIF tag."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from uhga_tf.data import image_decode
from uhga_tf.data import image_folder
from uhga_tf.data import feature_cache
from uhga_tf.data import image_header
from uhga_tf.retrieval import pipeline
from uhga_tf.retrieval import result_grid

# What each EXIF orientation asks a viewer to do to the stored pixels,
# written with numpy from the EXIF 2.3 table (row 0 / column 0 sides).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=-1)[::-1],
    8: lambda a: np.rot90(a, k=1),
}
# PIL's inverse of each: stores an upright image the way a camera would.
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_image(height=48, width=80, seed=0):
    """Blocks of flat colour (JPEG keeps them), no symmetry."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    for i in range(0, height, 16):
        for j in range(0, width, 16):
            image[i:i + 16, j:j + 16] = rng.integers(0, 256, 3)
    return image


def camera_jpeg(upright, orientation, endian="<", tags=None):
    """JPEG bytes of `upright` as a camera stores it with `orientation`."""
    image = Image.fromarray(upright)
    if orientation in STORED:
        image = image.transpose(STORED[orientation])
    exif = Image.Exif()
    exif.endian = endian
    exif[0x010F] = "camera"  # Make: the tag is not IFD0's only entry
    for tag, value in (tags or {image_decode.ORIENTATION_TAG: orientation}
                       ).items():
        exif[tag] = value
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def stored_pixels(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False
                              ).numpy()


def without_jfif(data):
    """The JPEG with its JFIF APP0 segment removed, so the Exif segment
    comes first, as cameras write it."""
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"
    return data[:2] + data[4 + int.from_bytes(data[4:6], "big"):]


@pytest.mark.parametrize("endian,layout", [
    ("<", "jfif"), (">", "jfif"), ("<", "camera"), (">", "camera")])
def test_every_orientation_decodes_upright(endian, layout):
    upright = upright_image()
    for orientation in range(1, 9):
        data = camera_jpeg(upright, orientation, endian)
        if layout == "camera":
            data = without_jfif(data)
            assert data[2:4] == b"\xff\xe1"
        assert image_decode.exif_orientation(data).numpy() == orientation
        decoded = image_decode.decode_upright(data).numpy()
        # Exactly the stored pixels, turned as the EXIF table says ...
        np.testing.assert_array_equal(
            decoded, UPRIGHT[orientation](stored_pixels(data)))
        # ... which is what PIL shows, and the upright image up to JPEG.
        shown = np.asarray(ImageOps.exif_transpose(
            Image.open(io.BytesIO(data))).convert("RGB"))
        assert np.abs(decoded.astype(int) - shown).max() <= 2
        assert decoded.shape == upright.shape
        assert np.abs(decoded.astype(int) - upright).mean() < 4.0


def test_images_without_an_orientation_decode_as_stored():
    upright = upright_image()
    png = io.BytesIO()
    Image.fromarray(upright).save(png, "PNG")
    plain = io.BytesIO()
    Image.fromarray(upright).save(plain, "JPEG")
    cases = {
        "png": png.getvalue(),
        "jpeg without exif": plain.getvalue(),
        "exif without the tag": camera_jpeg(upright, 1, tags={0x0131: "x"}),
        "orientation 9 (undefined)": camera_jpeg(upright, 9),
        "orientation 0": camera_jpeg(upright, 0),
    }
    for name, data in cases.items():
        assert image_decode.exif_orientation(data).numpy() == 1, name
        np.testing.assert_array_equal(
            image_decode.decode_upright(data).numpy(), stored_pixels(data),
            err_msg=name)
    for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00"):
        assert image_decode.exif_orientation(data).numpy() == 1


def test_damaged_exif_never_fails_the_parser():
    """Seeded byte damage anywhere in the Exif segment: an orientation
    from 1 to 8 every time, never an error (a server reads these)."""
    data = bytearray(camera_jpeg(upright_image(), 6, endian=">"))
    start = data.index(b"Exif\x00\x00")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        damaged = bytearray(data)
        # From the segment's length field to past the orientation entry.
        for at in rng.integers(start - 2, start + 80, rng.integers(1, 6)):
            damaged[at] = rng.integers(0, 256)
        cut = bytes(damaged[:rng.integers(start, len(damaged) + 1)])
        for blob in (bytes(damaged), cut):
            orientation = int(image_decode.exif_orientation(blob).numpy())
            assert 1 <= orientation <= 8
            seen.add(orientation)
    assert seen >= {1, 6}


def test_a_folder_of_photos_is_read_upright(tmp_path):
    upright = upright_image(48, 80)
    (tmp_path / "a.jpg").write_bytes(camera_jpeg(upright, 1))
    (tmp_path / "b.jpg").write_bytes(camera_jpeg(upright, 6))
    (tmp_path / "c.jpg").write_bytes(camera_jpeg(upright, 8))
    dataset = image_folder.load_folder(str(tmp_path))
    # Sizes are the upright ones, (height, width), so the native size of
    # these three is one size.
    np.testing.assert_array_equal(dataset.image_sizes, [[48, 80]] * 3)
    (native,) = dataset.to_tf_dataset(np.arange(3), None, 3)
    (resized,) = dataset.to_tf_dataset(np.arange(3), 40, 3)
    for batch in (native.numpy(), resized.numpy()):
        for turned in batch[1:]:
            assert np.abs(turned - batch[0]).mean() < 4.0
    # Features of files are cached under the upright decoding's key only.
    key = feature_cache.feature_cache_key(
        dataset, np.arange(3), "tiny_cnn", image_size=32)
    assert key["decode"] == image_decode.DECODE


def test_result_grids_show_photos_upright():
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:16] = (255, 0, 0)  # red above blue
    upright[16:] = (0, 0, 255)
    tagged = Image.open(io.BytesIO(camera_jpeg(upright, 6)))
    grid = np.asarray(result_grid.render_result_grid(
        [[result_grid.Tile(tagged, "q")]], tile_size=32))
    red = np.argwhere((grid[..., 0] > 200) & (grid[..., 2] < 60))
    blue = np.argwhere((grid[..., 2] > 200) & (grid[..., 0] < 60))
    assert len(red) > 200 and len(blue) > 200
    assert red[:, 0].mean() < blue[:, 0].mean()
    # Only a JPEG's tag is applied, as by the decoder: a WebP carrying one
    # is shown as stored, as it was coded.
    exif = Image.Exif()
    exif[image_decode.ORIENTATION_TAG] = 6
    out = io.BytesIO()
    Image.fromarray(upright).save(out, "WEBP", lossless=True,
                                  exif=exif.tobytes())
    webp = Image.open(io.BytesIO(out.getvalue()))
    assert image_decode.exif_orientation(out.getvalue()).numpy() == 1
    np.testing.assert_array_equal(
        np.asarray(result_grid.shown_upright(webp).convert("RGB")), upright)


def test_webp_sizes_are_read_from_each_kind_of_header(tmp_path):
    """Lossy (VP8), lossless (VP8L) and extended (VP8X: alpha, EXIF)
    WebP files: the decode guard reads the size TensorFlow decodes, and a
    folder of them loads."""
    rgb = upright_image(48, 80)
    rgba = np.concatenate([rgb, np.full((48, 80, 1), 128, np.uint8)], 2)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    kinds = {
        "lossy": (rgb, {"quality": 80}, b"VP8 "),
        "lossless": (rgb, {"lossless": True}, b"VP8L"),
        "alpha": (rgba, {"quality": 80}, b"VP8X"),
        "exif": (rgb, {"quality": 80, "exif": exif.tobytes()}, b"VP8X"),
    }
    for name, (pixels, options, chunk) in kinds.items():
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "WEBP", **options)
        data = out.getvalue()
        assert data[12:16] == chunk, name
        assert image_header.image_size(data) == ("WEBP", 80, 48), name
        assert image_header.check_decodable(data) == 80 * 48
        assert image_decode.decode_upright(data).shape == (48, 80, 3)
        (tmp_path / f"{name}.webp").write_bytes(data)
    dataset = image_folder.load_folder(str(tmp_path))
    assert len(dataset.paths) == 4
    np.testing.assert_array_equal(dataset.image_sizes, [[48, 80]] * 4)
    # A size beyond the limit is refused from the header alone.
    with pytest.raises(image_header.ImageTooLarge):
        image_header.check_decodable(data, max_pixels=80 * 48 - 1)
    # The guard reads a VP8X file's canvas; one that understates its frame
    # (a 10 x 10 canvas over the 80 x 48 frame) is refused by the decoder,
    # so the canvas bounds what is decoded.
    lying = bytearray(data)
    lying[24:27] = lying[27:30] = (9).to_bytes(3, "little")
    assert image_header.check_decodable(bytes(lying)) == 100
    with pytest.raises(tf.errors.InvalidArgumentError):
        image_decode.decode_upright(bytes(lying))


def test_a_folder_names_the_photos_it_cannot_read(tmp_path, caplog):
    upright = upright_image()
    for i in range(3):
        (tmp_path / f"IMG_{i}.jpg").write_bytes(camera_jpeg(upright, 1))
    for i in range(2):
        (tmp_path / f"IMG_{i}.HEIC").write_bytes(b"not decodable here")
    (tmp_path / "IMG_0.xmp").write_text("sidecar")
    dataset = image_folder.load_folder(str(tmp_path))
    assert len(dataset.paths) == 3
    # The index builder's listing says the same, and so does Beam's for a
    # glob.
    paths, _, _ = pipeline.find_images(str(tmp_path))
    assert len(paths) == 3
    from uhga_tf.retrieval import beam_encode

    sources, _, _ = beam_encode.list_collection(str(tmp_path / "IMG_*"))
    assert len(sources) == 3
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
    assert sum("skipped 2 .heic: photos that TensorFlow cannot decode; "
               "convert them to JPEG" in m for m in warned) == 3, warned
    # In a class folder the same file is an error that says the same.
    labelled = tmp_path / "labelled"
    (labelled / "cats").mkdir(parents=True)
    (labelled / "cats" / "a.jpg").write_bytes(camera_jpeg(upright, 1))
    (labelled / "cats" / "b.heic").write_bytes(b"x")
    (labelled / "dogs").mkdir()
    (labelled / "dogs" / "c.jpg").write_bytes(camera_jpeg(upright, 1))
    with pytest.raises(ValueError, match="cannot decode .heic photos: "
                       "convert them to JPEG"):
        image_folder.load_folder(str(labelled))


def test_camera_photos_are_read_and_bigger_ones_refused_by_name(tmp_path):
    """A 24 MP camera photo (6000 x 4000, over the 4096 x 4096 that bounds
    what others send) is read from a user's own folder; one over 8192 x
    8192 is refused as too large, not as corrupt."""
    small = upright_image(40, 60)
    Image.fromarray(small).resize((6000, 4000)).save(
        tmp_path / "DSC_0001.jpg", quality=80)
    for i in range(3):
        Image.fromarray(small).save(tmp_path / f"IMG_{i}.jpg")
    dataset = image_folder.load_folder(str(tmp_path))
    assert sorted(map(tuple, dataset.image_sizes)) == (
        [(40, 60)] * 3 + [(4000, 6000)])
    # An 8200 x 8200 image, cheap to write because it is one colour.
    Image.new("RGB", (8200, 8200), (9, 9, 9)).save(
        tmp_path / "DSC_0002.jpg", quality=50)
    with pytest.raises(ValueError, match="image too large .*DSC_0002.jpg: "
                       "image is a 8200x8200 JPEG"):
        image_folder.load_folder(str(tmp_path))
    kept = image_folder.load_folder(str(tmp_path), skip_corrupt=True)
    assert len(kept.paths) == 4


class _CountingEncoder:
    """Records the number of images in each encode call."""

    code_length = 8

    def __init__(self):
        self.calls = []

    def encode_image_bytes(self, blobs):
        self.calls.append(len(blobs))
        return None, np.full((len(blobs), 1), len(self.calls), np.uint8)


def test_encode_calls_hold_at_most_the_pixel_budget():
    """index build and Beam split a batch of big photos into calls of at
    most `max_call_pixels` decoded pixels (a refused image takes none)."""
    blobs = []
    for width in (100, 100, 300, 100, 100):
        out = io.BytesIO()
        Image.new("RGB", (width, 100)).save(out, "PNG")
        blobs.append(out.getvalue())
    blobs.insert(2, b"not an image")
    encoder = _CountingEncoder()
    packed, reasons = pipeline.encode_blobs(
        encoder, blobs, max_call_pixels=30_000)
    # 10k + 10k | (refused) | 30k | 10k + 10k
    assert encoder.calls == [2, 1, 2]
    assert [r is None for r in reasons] == [True, True, False, True, True,
                                            True]
    assert packed[:, 0].tolist() == [1, 1, 0, 2, 3, 3]


def test_resize_filters_only_what_shrinks():
    """Growing (CIFAR-10's 32 px to 160) is plain bilinear, bit for bit;
    the same size is the image itself; shrinking a noisy photo averages
    its noise where plain bilinear sampling kept it."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_array_equal(
        image_decode.resize_square(small, 160).numpy(),
        tf.image.resize(tf.cast(small, tf.float32), [160, 160],
                        "bilinear", antialias=False).numpy())
    same = rng.integers(0, 256, (1, 40, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        image_decode.resize_square(same, 40).numpy(), same)
    # Grey 128 plus noise of std 20 at 1,280 px, shrunk to 160 (8 x 8
    # source pixels per output pixel).
    noisy = 128 + rng.normal(0, 20, (1, 1280, 1280, 3)).astype(np.float32)
    shrunk = image_decode.resize_square(noisy, 160).numpy()
    plain = tf.image.resize(noisy, [160, 160], "bilinear",
                            antialias=False).numpy()
    assert plain.std() > 9.0  # bilinear reads 4 of the 64 pixels
    assert shrunk.std() < 3.5  # the filter averages all of them
    assert abs(float(shrunk.mean()) - 128) < 0.2
    # One side shrinking is enough to filter.
    wide = 128 + rng.normal(0, 20, (1, 40, 1280, 3)).astype(np.float32)
    assert image_decode.resize_square(wide, 160).numpy().std() < 9.0


def test_feature_cache_keys_name_the_decoding_where_it_matters():
    class Arrays:
        name, source = "toy", "arrays"

        def __init__(self, side):
            self.images = np.zeros((3, side, side, 3), np.uint8)

    grows = feature_cache.feature_cache_key(
        Arrays(32), np.arange(3), "tiny_cnn", image_size=160)
    shrinks = feature_cache.feature_cache_key(
        Arrays(256), np.arange(3), "tiny_cnn", image_size=160)
    assert "decode" not in grows  # CIFAR-10's stored features stay valid
    assert shrinks["decode"] == image_decode.DECODE
