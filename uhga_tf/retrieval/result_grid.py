"""Render search results as a PNG grid: one row per query.

Each row shows the query tile, then its ranked result tiles. A tile is
captioned (distance, class) and may be framed: green when relevant to the
query's class, red when not, no frame when relevance is unknown.
"""

import dataclasses

from PIL import Image, ImageDraw, ImageFont, ImageOps

PAD = 6
CAPTION_HEIGHT = 28
FRAME_WIDTH = 4
RELEVANT_COLOR = (0, 160, 0)
IRRELEVANT_COLOR = (200, 0, 0)
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


@dataclasses.dataclass
class Tile:
    """One grid cell.

    Attributes:
        image: PIL image (any size and mode; scaled to fit the tile).
        caption: up to two lines of text under the image.
        relevant: True (green frame), False (red frame) or None (no frame).
    """

    image: Image.Image
    caption: str
    relevant: bool | None = None


def shown_upright(image):
    """A PIL image turned as `image_decode.decode_upright` turns its pixels
    (a JPEG by its EXIF orientation, anything else as stored), so what a
    user looks at is what was coded."""
    if image.format in ("JPEG", "MPO"):
        return ImageOps.exif_transpose(image)
    return image


def grid_size(n_rows, n_columns, tile_size):
    """Return the (width, height) in pixels of a grid of tiles."""
    width = n_columns * (tile_size + PAD) + PAD
    height = n_rows * (tile_size + CAPTION_HEIGHT + PAD) + PAD
    return width, height


def render_result_grid(rows, tile_size=128):
    """Draw rows of tiles (`list[list[Tile]]`, query first) into an image.

    Returns:
        PIL RGB image of size `grid_size(len(rows), max row length,
        tile_size)`.
    """
    if tile_size < 16:
        raise ValueError(
            f"tile_size must be >= 16; received tile_size={tile_size}"
        )
    n_columns = max((len(row) for row in rows), default=0)
    canvas = Image.new(
        "RGB", grid_size(len(rows), n_columns, tile_size), _BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = PAD + r * (tile_size + CAPTION_HEIGHT + PAD)
        for c, tile in enumerate(row):
            left = PAD + c * (tile_size + PAD)
            image = ImageOps.contain(
                shown_upright(tile.image).convert("RGB"),
                (tile_size, tile_size))
            canvas.paste(
                image,
                (
                    left + (tile_size - image.width) // 2,
                    top + (tile_size - image.height) // 2,
                ),
            )
            if tile.relevant is not None:
                color = RELEVANT_COLOR if tile.relevant else IRRELEVANT_COLOR
                draw.rectangle(
                    [left, top, left + tile_size - 1, top + tile_size - 1],
                    outline=color,
                    width=FRAME_WIDTH,
                )
            for line_no, line in enumerate(tile.caption.splitlines()[:2]):
                draw.text(
                    (left + 2, top + tile_size + 2 + 12 * line_no),
                    line,
                    fill=_TEXT,
                    font=font,
                )
    return canvas
