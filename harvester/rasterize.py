"""Building masks: footprints burnt onto a tile's pixel grid, and the mask's PNG encoding. No I/O here.

Mask rule (SPEC.md): a pixel is building when its centre lies inside a building footprint (holes excluded), on the
tile's Web Mercator (EPSG:3857) pixel grid. The footprints are projected with :func:`harvester.tiles.to_mercator`, put
on the pixel grid by GDAL's inverse geotransform, and filled by GDAL's scan-line rule for polygons with ``all_touched``
off (``GDALdllImageFilledPolygon`` in GDAL's ``alg/llrasterize.cpp``, what ``rasterio.features.rasterize`` and
``gdal_rasterize`` run): along the line through each row of pixel centres, the crossings of a polygon's edges (all its
rings together, an edge counted when ``low end <= line < high end``) are rounded to pixel boundaries, sorted and
paired, and the pixels between each pair are burnt; even-odd pairing keeps holes empty
(https://gdal.org/en/stable/programs/gdal_rasterize.html, ``-at`` off). A mask is the union of its polygons' fills.

That rule is reimplemented here in vectorized numpy, operation for operation (the same double arithmetic, the same
rounding, GDAL's special case for a horizontal edge lying exactly on a line of centres, its clockwise ring order), so
the masks are those GDAL burns, pixel for pixel, at a third to a fifth of the cost: through rasterio a tile took
0.7-2 ms on a busy 2-core machine, mostly spent turning shapely geometries into GeoJSON (``__geo_interface__``), then
into OGR geometries, around a GDAL call on an in-memory dataset; here 0.25-0.4 ms. Testing each footprint's pixel
centres with ``shapely.contains_xy`` instead costs 0.8-4 ms, and differs from GDAL on ties (``python -m
bench.bench_cores`` measures all three). The unit tests check the equality against rasterio itself, on real footprints
and on shapes built to put vertices and edges exactly on pixel centres and lines, and every pixel against
``shapely.contains_xy``. Crossings are rounded to C ``int`` in GDAL; they stay far from its limits up to zoom 22.

Footprints must be valid polygons (as :func:`harvester.labels.osm.parse_buildings` returns them): on a self-intersecting
ring the even-odd scan line and the OGC "inside" disagree.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
import shapely

from .tiles import Tile, lonlat_bounds, pixel_grid, to_mercator

#: How the mask PNGs are compressed: scan lines unfiltered (PNG filter type 0), deflated with zlib's run-length strategy
#: (Z_RLE: only matches at distance 1, the runs a mask is made of). Measured on the 147 Kampala masks and 340 Helsinki
#: z17/z18 masks (mean size; encode time, busy 2-core machine): this writer 0.98 / 0.94 kB, 0.15 ms; Pillow level 1
#: 1.37 / 1.30 kB, 0.45 ms; Pillow level 6 (before) 0.98 / 0.92 kB, 0.84 ms; Pillow level 9 0.74 / 0.69 kB, 2.6-3.2
#: ms; Pillow with Z_RLE 0.82 / 0.77 kB, 0.39 ms (its per-row adaptive filtering costs more than the deflate). As
#: small as level 6 for a sixth of the time: the encode is in every sample's budget, a few hundred bytes are not.
PNG_ZLIB_STRATEGY = zlib.Z_RLE
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_POLYGON, _MULTIPOLYGON, _COLLECTION = 3, 6, 7  # shapely.get_type_id


def rasterize(footprints: Sequence[shapely.Geometry], tile: Tile, size: int = 256) -> np.ndarray:
    """The (size, size) uint8 mask of ``tile``: 1 where a pixel centre is inside a footprint (lon/lat degrees), else 0.

    Row 0 is the tile's north edge, column 0 its west edge. Lines, points and empty or missing geometries burn
    nothing. Footprints that miss the tile cost little: their bounding boxes drop them before any other work.
    """
    pixels = _pixel_rings(footprints, tile, size)
    if pixels is None:
        return np.zeros((size, size), dtype=np.uint8)
    return _paint(*_spans(*pixels[:4], size)[:2], size)


def rasterize_instances(footprints: Sequence[shapely.Geometry], tile: Tile, size: int = 256) -> np.ndarray:
    """The (size, size) uint16 instance map of ``tile`` (SPEC: ``instances``): 0 for background, ``k`` where a pixel
    centre is inside ``footprints[k - 1]``, by the same fill as :func:`rasterize`, so it is nonzero exactly where the
    mask is. A pixel inside several footprints holds the smallest ``k``."""
    if len(footprints) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(footprints)} footprints do not fit a 16-bit instance map")
    instances = np.zeros(size * size, dtype=np.uint16)
    pixels = _pixel_rings(footprints, tile, size)
    if pixels is None:
        return instances.reshape(size, size)
    column, row, ring_sizes, ring_polygon, polygon_footprint = pixels
    span_start, span_end, span_polygon = _spans(column, row, ring_sizes, ring_polygon, size)
    keep = span_start < span_end
    span_start, lengths = span_start[keep], (span_end - span_start)[keep]
    span_label = polygon_footprint[span_polygon[keep]] + 1
    order = np.argsort(span_start, kind="stable")
    span_start, lengths, span_label = span_start[order], lengths[order], span_label[order]
    label = np.repeat(span_label, lengths)
    pixel = np.repeat(span_start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    ends = span_start + lengths
    if span_start.size > 1 and (span_start[1:] < np.maximum.accumulate(ends)[:-1]).any():
        # Footprints overlap (rare: OSM buildings share walls, not floors): per pixel, the smallest label.
        order = np.lexsort((label, pixel))
        pixel, label = pixel[order], label[order]
        first = np.ones(pixel.size, dtype=bool)
        first[1:] = pixel[1:] != pixel[:-1]
        pixel, label = pixel[first], label[first]
    instances[pixel] = label
    return instances.reshape(size, size)


def _pixel_rings(footprints: Sequence[shapely.Geometry], tile: Tile, size: int):
    """The rings of the footprints near the tile on its pixel grid: ``(column, row, ring_sizes, ring_polygon,
    polygon_footprint)`` as :func:`fill_polygons` takes them, plus the footprint index of each polygon; None when no
    polygon is near."""
    geometries = np.asarray(footprints, dtype=object).reshape(-1)
    if geometries.size == 0:
        return None
    # A cheap first cut on the bounding boxes in degrees (NaN for None and empty geometries: dropped), with a margin
    # that dwarfs the difference between straight edges in degrees and in metres. It only saves work: a polygon
    # off the tile crosses no line of centres inside it.
    west, south, east, north = lonlat_bounds(tile)
    pad_x, pad_y = (east - west) / 100, (north - south) / 100
    box = shapely.bounds(geometries)
    near = np.flatnonzero((box[:, 0] <= east + pad_x) & (box[:, 2] >= west - pad_x)
                          & (box[:, 1] <= north + pad_y) & (box[:, 3] >= south - pad_y))
    polygons, polygon_footprint = _polygons(geometries[near])
    if polygons.size == 0:
        return None
    if shapely.get_num_interior_rings(polygons).any():
        rings, ring_polygon = shapely.get_rings(polygons, return_index=True)  # exterior, then holes, per polygon
    else:  # most buildings: get_rings costs 5x more
        rings, ring_polygon = shapely.get_exterior_ring(polygons), np.arange(polygons.size)
    lonlat = shapely.get_coordinates(rings)
    if not np.isfinite(lonlat).all():
        raise ValueError("a footprint has a NaN or infinite coordinate: footprints must be valid polygons")
    x, y = to_mercator(lonlat[:, 0], lonlat[:, 1])  # as shapely.transform(..., interleaved=False) calls it
    # GDAL's inverse (GDALInvGeoTransform, no rotation) of the geotransform (pixel_m, 0, left, 0, -pixel_m, top) of
    # tiles.pixel_transform, and its application (GDALGenImgProjTransform), term for term.
    left, top, pixel_m = pixel_grid(tile, size)
    column = -left / pixel_m + x * (1.0 / pixel_m)
    row = -top / -pixel_m + y * (1.0 / -pixel_m)
    return column, row, shapely.get_num_coordinates(rings), ring_polygon, near[polygon_footprint]


def _polygons(geometries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The polygons of polygonal geometries and of collections, multipolygons split into their parts, and the index
    in ``geometries`` of each one's geometry.

    GDAL burns the parts of a multipolygon one by one (in its default "replace" mode), like separate polygons. Lines
    and points are dropped: GDAL would burn every pixel they touch, which no footprint rule wants.
    """
    types = shapely.get_type_id(geometries)
    single = np.flatnonzero(types == _POLYGON)
    polygons, owner = geometries[single], single
    nested = np.flatnonzero((types == _MULTIPOLYGON) | (types == _COLLECTION))
    if nested.size:
        parts, part_owner = shapely.get_parts(geometries[nested], return_index=True)
        keep = np.isin(shapely.get_type_id(parts), (_POLYGON, _MULTIPOLYGON))
        parts, sub_owner = shapely.get_parts(parts[keep], return_index=True)  # a multipolygon inside a collection
        part_owner = nested[part_owner[keep][sub_owner]]
        is_polygon = shapely.get_type_id(parts) == _POLYGON
        polygons = np.concatenate([polygons, parts[is_polygon]])
        owner = np.concatenate([owner, part_owner[is_polygon]])
    return polygons, owner


def fill_polygons(column: np.ndarray, row: np.ndarray, ring_sizes: np.ndarray, ring_polygon: np.ndarray,
                  size: int) -> np.ndarray:
    """GDAL's pixel-centre fill of polygons given in pixel coordinates; the (size, size) uint8 union of the fills.
    See :func:`_spans`."""
    return _paint(*_spans(column, row, ring_sizes, ring_polygon, size)[:2], size)


def _spans(column: np.ndarray, row: np.ndarray, ring_sizes: np.ndarray, ring_polygon: np.ndarray,
           size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GDAL's pixel-centre fill of polygons given in pixel coordinates, as half-open spans of flat pixel indices
    ``(start, end, polygon)``: the pixels ``start..end-1`` (row * size + column) are inside polygon ``polygon``.

    ``column`` and ``row`` (float64, (column, row) = (0, 0) at the tile's north-west corner, rows growing southwards)
    hold the closed rings one after the other, ``ring_sizes`` points each; ``ring_polygon`` numbers each ring's
    polygon. Every step mirrors ``GDALdllImageFilledPolygon`` (see the module docstring), vectorized over all edges and
    rows at once.
    """
    line_bits, column_bits = (size - 1).bit_length(), size.bit_length()  # lines 0..size-1, columns 0..size
    ring_end = np.cumsum(ring_sizes)
    is_start = np.ones(column.size, dtype=bool)  # the edges: from each point to the next one of its ring
    is_start[ring_end - 1] = False
    start = np.flatnonzero(is_start)
    y1, y2 = row[start], row[start + 1]
    low, high = np.minimum(y1, y2), np.maximum(y1, y2)
    # Lines of centres y + 0.5 with low <= y + 0.5 < high: from ceil(low - 0.5) to ceil(high - 0.5), exclusive (the
    # subtraction is exact from 0.25 up, and below that the first row is 0 either way); cutting to the tile's rows
    # drops no crossing inside it.
    first_row = np.maximum(np.ceil(low - 0.5), 0).astype(np.intp)
    row_count = np.minimum(np.ceil(high - 0.5), size).astype(np.intp) - first_row
    crossing = np.flatnonzero(row_count > 0)
    row_count = row_count[crossing]
    edge = start[crossing]
    x1, x2 = column[edge], column[edge + 1]
    rising = y1[crossing] < y2[crossing]
    x_low, x_high = np.where(rising, x1, x2), np.where(rising, x2, x1)  # the ends GDAL orders by y
    ends = np.cumsum(row_count)
    lines = np.arange(ends[-1] if ends.size else 0) + np.repeat(first_row[crossing] - (ends - row_count), row_count)
    low, x_low = np.repeat(low[crossing], row_count), np.repeat(x_low, row_count)
    at = (lines + 0.5 - low) * (np.repeat(x_high, row_count) - x_low) / (np.repeat(high[crossing], row_count) - low) \
        + x_low  # GDAL's expression, in its order of operations
    # Rounded to a pixel boundary as GDAL does (floor(x + 0.5)); cutting to 0..size burns the same pixels as GDAL's
    # test-and-clamp of each span to the tile.
    at = np.minimum(np.maximum(np.floor(at + 0.5), 0), size).astype(np.intp)
    # Sort by (polygon, line, crossing) packed in one integer, then pair: each (polygon, line) holds an even count of
    # crossings. The two crossings of a pair differ only in their column bits.
    polygon = np.repeat(np.repeat(ring_polygon, ring_sizes - 1)[crossing], row_count)
    keys = np.sort((((polygon << line_bits) | lines) << column_bits) | at)
    opening, closing = keys[0::2], keys[1::2]
    span_start = ((opening >> column_bits) & ((1 << line_bits) - 1)) * size + (opening & ((1 << column_bits) - 1))
    span_end = span_start + (closing - opening)  # flat pixel indices, row * size + column
    span_polygon = opening >> (line_bits + column_bits)
    horizontal = start[y1 == y2]
    if horizontal.size:
        line = np.floor(row[horizontal])
        on_line = (row[horizontal] - line == 0.5) & (line >= 0) & (line < size)
        if on_line.any():
            more_start, more_end, more_ring = _horizontal_spans(column, row, ring_sizes, horizontal[on_line], size)
            span_start, span_end = np.append(span_start, more_start), np.append(span_end, more_end)
            span_polygon = np.append(span_polygon, ring_polygon[more_ring])
    return span_start, span_end, span_polygon


def _horizontal_spans(column: np.ndarray, row: np.ndarray, ring_sizes: np.ndarray, edge_start: np.ndarray,
                      size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GDAL's special case: a horizontal edge lying exactly on a line of centres is burnt when it is a "bottom" edge.

    GDAL walks every ring clockwise on the map (it reverses the others, ``GDALCollectRingsFromGeometry``) and burns a
    horizontal edge that lies on a line of centres when it runs westwards, between its rounded ends. Rare (it takes
    two vertices exactly on a centre's row), so done only when it happens. A ring's orientation is the sign of its
    area (the same as OGR's lowest-vertex test on a valid ring).
    """
    ring_end = np.cumsum(ring_sizes)
    ring_start = ring_end - ring_sizes
    x = column - np.repeat(column[ring_start], ring_sizes)  # from each ring's first point: less cancellation
    y = row - np.repeat(row[ring_start], ring_sizes)
    # Shoelace sums; a term across two rings adds 0 (x = y = 0 at a ring's first point). In pixel space, rows
    # growing southwards, a positive sum is a clockwise ring on the map.
    area = np.add.reduceat(x[:-1] * y[1:] - x[1:] * y[:-1], ring_start)
    ring = np.searchsorted(ring_end, edge_start, side="right")
    clockwise = area[ring] > 0
    x1, x2 = column[edge_start], column[edge_start + 1]
    westwards = np.where(clockwise, x1 > x2, x2 > x1)  # in GDAL's order: it reversed the anticlockwise rings
    x1, x2, line = x1[westwards], x2[westwards], np.floor(row[edge_start[westwards]]).astype(np.intp)
    ring = ring[westwards]
    left = np.minimum(np.maximum(np.floor(np.minimum(x1, x2) + 0.5), 0), size).astype(np.intp)
    right = np.minimum(np.maximum(np.floor(np.maximum(x1, x2) + 0.5), 0), size).astype(np.intp)
    return line * size + left, line * size + right, ring


def _paint(span_start: np.ndarray, span_end: np.ndarray, size: int) -> np.ndarray:
    """The (size, size) uint8 mask of the union of half-open spans of flat pixel indices.

    Overlapping and touching spans are merged (sorted starts and ends: a span opens a run unless an earlier one still
    covers it), then the row-major mask is one ``np.repeat`` of alternating 0 and 1 over the run lengths: no
    per-pixel temporaries.
    """
    keep = span_start < span_end
    starts, ends = np.sort(span_start[keep]), np.sort(span_end[keep])
    if starts.size == 0:
        return np.zeros((size, size), dtype=np.uint8)
    opens = np.ones(starts.size, dtype=bool)
    opens[1:] = ends[:-1] < starts[1:]
    opening = np.flatnonzero(opens)
    bounds = np.empty(2 * opening.size + 2, dtype=np.intp)
    bounds[0], bounds[-1] = 0, size * size
    bounds[1:-1:2] = starts[opening]
    closes = np.empty(starts.size, dtype=bool)  # a run closes at the end before the next opening, or the last end
    closes[:-1], closes[-1] = opens[1:], True
    bounds[2:-1:2] = ends[closes]
    values = (np.arange(bounds.size - 1) & 1).astype(np.uint8)
    return np.repeat(values, np.diff(bounds)).reshape(size, size)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """An 8-bit, one-channel (greyscale) PNG of a 2-D mask; nonzero pixels are written as 1.

    Written directly (PNG specification, W3C 2003 / ISO 15948, sections 5 and 11.2.2: the signature, then chunks of
    length, type, data and the CRC-32 of type and data; IHDR with bit depth 8, colour type 0; one IDAT holding the
    zlib stream of the scan lines, each led by its filter type byte; IEND). See PNG_ZLIB_STRATEGY.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask is 2-D and not empty, got shape {mask.shape}")
    height, width = mask.shape
    scanlines = np.zeros((height, width + 1), dtype=np.uint8)  # column 0: filter type 0, "None"
    np.not_equal(mask, 0, out=scanlines[:, 1:].view(np.bool_))
    return _grey_png(scanlines, width, height, 8)


def encode_instances_png(instances: np.ndarray) -> bytes:
    """A 16-bit, one-channel (greyscale) PNG of an instance map (SPEC: ``instances``): the mask's writer with bit
    depth 16, samples big-endian (PNG section 7.1), each scan line through the "Sub" filter (type 1: every byte minus
    the byte one sample, 2 bytes, to its left, section 9.2), which turns a run of one id into a run of zeros for
    Z_RLE. Measured: 0.2 ms and ~0.6 kB for a typical map, against 0.8 ms and 5.8 kB unfiltered."""
    instances = np.asarray(instances)
    if instances.ndim != 2 or instances.size == 0 or instances.dtype != np.uint16:
        raise ValueError(f"an instance map is a 2-D uint16 array, got {instances.dtype} {instances.shape}")
    height, width = instances.shape
    raw = instances.astype(">u2").view(np.uint8).reshape(height, 2 * width)
    scanlines = np.empty((height, 2 * width + 1), dtype=np.uint8)
    scanlines[:, 0] = 1  # filter type 1, "Sub"
    scanlines[:, 1:3] = raw[:, :2]
    np.subtract(raw[:, 2:], raw[:, :-2], out=scanlines[:, 3:])  # modulo 256, as the filter is defined
    return _grey_png(scanlines, width, height, 16)


def _grey_png(scanlines: np.ndarray, width: int, height: int, bit_depth: int) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, PNG_ZLIB_STRATEGY)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # grey, deflate, no interlace
    return b"".join([_PNG_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", deflate.compress(scanlines) + deflate.flush()), _chunk(b"IEND", b"")])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
