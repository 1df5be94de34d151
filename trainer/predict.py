"""``trainer predict``: the building mask of one tile, and optionally its building polygons (SPEC: Commands).

Input: a 256x256 image file (``--image``), or the tile holding ``--lon/--lat`` at ``--zoom``, fetched from the
configured imagery provider (``harvester.providers.fetch_tile_once``, same settings as ``harvester run``). Other
image sizes are refused rather than resized: the network learnt the ground resolution of a zoom level, and a resized
image would show buildings at a scale it never saw.

Output: the mask as an 8-bit PNG, 0 = background and 255 = building (viewable as is); with ``--overlay``, the input
tile with the predicted buildings tinted and outlined in cyan (:func:`harvester.overlay.draw_mask`). With
``--geojson``, the buildings as a GeoJSON FeatureCollection in EPSG:4326, one polygon per building: the mask split
into buildings by :func:`trainer.instances.separate_buildings` (along the model's border output when it has one,
so touching buildings come apart; the object metric of ``evaluate`` counts buildings with the same function), each
building's outline traced by ``rasterio.features.shapes`` on its label, simplified with a half-pixel tolerance, then
mapped from tile pixels to Web Mercator (EPSG:3857, the tile's pixel grid of :mod:`harvester.tiles`) and to
longitude/latitude.
``--tta`` averages the prediction over the 8 symmetries of the square. That needs the tile: known with
``--lon/--lat/--zoom``, given with ``--tile Z/X/Y`` for ``--image``; without it ``--geojson`` is refused.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import shapely
from PIL import Image, UnidentifiedImageError
from rasterio import features
from rasterio.transform import Affine
from shapely.geometry import mapping, shape

from harvester import tiles
from harvester.overlay import draw_mask, save_png
from harvester.tiles import MAX_LATITUDE_DEG, Tile

from .config import OBJECT_MIN_AREA, TILE_SIZE
from .errors import ConfigError, DataError, TrainerError
from .evaluate import restore_params, saved_train_config
from .instances import separate_buildings
from .model import split_logits
from .steps import make_mesh, predict_logits

log = logging.getLogger(__name__)

SIMPLIFY_TOLERANCE_PX = 0.5
MAX_ZOOM = 22


def read_image(data: bytes, source: str) -> np.ndarray:
    """Decode an image (any format Pillow reads) to RGB uint8 [256, 256, 3]; other sizes are refused."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (TILE_SIZE, TILE_SIZE):
                raise DataError(
                    f"{source} is {image.size[0]}x{image.size[1]} pixels; the model predicts 256x256 slippy-map "
                    "tiles (it learnt their ground resolution, so images are not resized): crop or export one tile"
                )
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{source} is not a readable image: {exc}") from exc


def parse_tile(text: str) -> Tile:
    """``"17/65432/43210"`` (zoom/x/y, y from the north) -> a tile; malformed or out of range -> ConfigError."""
    try:
        z, x, y = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--tile: expected Z/X/Y such as 17/66400/45100, got {text!r}") from None
    if not 0 <= z <= MAX_ZOOM or not (0 <= x < 2**z and 0 <= y < 2**z):
        raise ConfigError(f"--tile: {text!r} is not a tile (zoom 0..{MAX_ZOOM}, 0 <= x, y < 2**zoom)")
    return Tile(x, y, z)


def tile_at(lon: float, lat: float, zoom: int) -> Tile:
    if not (-180 <= lon <= 180 and -MAX_LATITUDE_DEG <= lat <= MAX_LATITUDE_DEG):
        raise ConfigError(f"--lon/--lat: ({lon}, {lat}) is outside the Web Mercator world")
    if not 0 <= zoom <= MAX_ZOOM:
        raise ConfigError(f"--zoom: expected 0..{MAX_ZOOM}, got {zoom}")
    return tiles.tile_at(lon, lat, zoom)


def fetch_tile(lon: float, lat: float, zoom: int) -> tuple[bytes, Tile]:
    """The imagery tile holding (lon, lat) at ``zoom``, from the provider configured for the harvester."""
    from harvester.config import load_settings  # lazily: predict from a file needs no harvester settings
    from harvester.errors import ConfigError as HarvesterConfigError
    from harvester.errors import HarvesterError
    from harvester.providers import fetch_tile_once

    tile = tile_at(lon, lat, zoom)
    try:
        settings = load_settings()
    except HarvesterConfigError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        data, _format = asyncio.run(fetch_tile_once(settings, tile.z, tile.x, tile.y))
    except HarvesterError as exc:
        raise TrainerError(f"cannot fetch tile {tile.z}/{tile.x}/{tile.y} from {settings.tile_provider}: {exc}") from exc
    return data, tile


class Predictor:
    """The U-Net of a work directory (best checkpoint, else latest), on one device."""

    def __init__(self, workdir: Path, database_url: str = "postgresql://unused", *, tta: bool = False):
        config = saved_train_config(Path(workdir), database_url)
        mesh = make_mesh(devices=jax.local_devices()[:1])
        graphdef, params = restore_params(Path(workdir), config, mesh)

        @jax.jit
        def predicted(images):
            building, border = split_logits(predict_logits(params, images, graphdef=graphdef, tta_enabled=tta))
            return building > 0, (border > 0) if border is not None else jnp.zeros_like(building, bool)

        self._predicted = predicted
        self.borders = config.borders

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 [256, 256, 3] -> (building mask bool [256, 256], border bool [256, 256] or None when the model
        has no border output)."""
        mask, border = (np.asarray(a[0]) for a in self._predicted(image[None]))
        return mask, border if self.borders else None


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_to_lonlat(coords: np.ndarray, tile: Tile, size: int = TILE_SIZE) -> np.ndarray:
    """Tile pixel coordinates [N, 2] (x right, y down, edges at 0 and ``size``) -> lon/lat degrees [N, 2]."""
    left, top, pixel_m = tiles.pixel_grid(tile, size)  # metres, EPSG:3857
    lon, lat = tiles.from_mercator(left + coords[:, 0] * pixel_m, top - coords[:, 1] * pixel_m)
    return np.stack([lon, lat], axis=1)


def mask_to_geojson(mask: np.ndarray, tile: Tile, border: np.ndarray | None = None, min_area: int = 0) -> dict:
    """Building polygons of a tile's mask as a GeoJSON FeatureCollection in EPSG:4326: one feature per building of
    :func:`~trainer.instances.separate_buildings` (split along ``border`` when given; buildings of fewer than
    ``min_area`` pixels left out)."""
    labels, _count = separate_buildings(mask, border, min_area)
    feats = []
    for geometry, _value in features.shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.identity()):
        polygon = shape(geometry).simplify(SIMPLIFY_TOLERANCE_PX, preserve_topology=True)
        if polygon.is_empty:
            continue
        pixels = int(round(shape(geometry).area))  # pixel-aligned outline: its area is its pixel count
        lonlat = shapely.transform(polygon, lambda c: pixels_to_lonlat(c, tile))
        feats.append({"type": "Feature", "geometry": mapping(lonlat), "properties": {"pixels": pixels}})
    return {"type": "FeatureCollection", "features": feats,
            "properties": {"tile": f"{tile.z}/{tile.x}/{tile.y}"}}


def predict(workdir: Path | str, out: Path | str, *, image: Path | str | None = None, tile: str | None = None,
            lon: float | None = None, lat: float | None = None, zoom: int | None = None,
            geojson: Path | str | None = None, overlay: Path | str | None = None, tta: bool = False,
            min_area: int = OBJECT_MIN_AREA) -> dict:
    """Write the mask PNG (and the GeoJSON, and the input tile with the predicted buildings outlined);
    return ``{"building_pixels", "buildings"?, "tile"?}``."""
    if (image is None) == (lon is None or lat is None or zoom is None):
        raise ConfigError("--image / --lon --lat --zoom: give either an image or all three of --lon, --lat, --zoom")
    known_tile = parse_tile(tile) if tile is not None else None
    if image is not None:
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--image: cannot read {path}: {exc.strerror}") from None
        pixels = read_image(data, str(path))
    else:
        data, fetched = fetch_tile(lon, lat, zoom)
        if known_tile is not None and known_tile != fetched:
            raise ConfigError(f"--tile: {tile} is not the tile of --lon/--lat/--zoom ({fetched.z}/{fetched.x}/{fetched.y})")
        known_tile = fetched
        pixels = read_image(data, f"tile {fetched.z}/{fetched.x}/{fetched.y}")
    if geojson is not None and known_tile is None:
        raise ConfigError("--geojson: the tile of --image is unknown; give it with --tile Z/X/Y "
                          "(or predict from --lon --lat --zoom)")
    mask, border = Predictor(Path(workdir), tta=tta)(pixels)
    Path(out).write_bytes(mask_png(mask))
    if overlay is not None:
        try:
            save_png(draw_mask(pixels, mask), overlay)
        except OSError as exc:
            raise ConfigError(f"--overlay: cannot write {overlay}: {exc.strerror or exc}") from None
    summary: dict = {"building_pixels": int(mask.sum())}
    if known_tile is not None:
        summary["tile"] = f"{known_tile.z}/{known_tile.x}/{known_tile.y}"
    if geojson is not None:
        collection = mask_to_geojson(mask, known_tile, border, min_area)
        Path(geojson).write_text(json.dumps(collection))
        summary["buildings"] = len(collection["features"])
    return summary
