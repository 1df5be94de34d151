"""The trainer runs on GPU hosts that have JAX but none of the harvester's GIS stack (bench/gpu_report.py carries only
asyncpg, simplejpeg and the embedded PostgreSQL): its training, evaluation and benchmark paths must import without it."""

import subprocess
import sys

GIS_STACK = ("rasterio", "shapely", "pyproj", "osmium", "aiolimiter", "mercantile")


def test_trainer_imports_without_the_harvesters_gis_stack():
    blocked = ", ".join(repr(name) for name in GIS_STACK)
    code = (f"import sys; sys.modules.update(dict.fromkeys(({blocked},)));"  # None in sys.modules: ImportError
            "import trainer.cli, trainer.train, trainer.evaluate, trainer.benchmark, trainer.pipeline, trainer.instances")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
