FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# Wheels of rasterio, shapely, asyncpg and osmium (pyosmium) bundle GDAL, GEOS, libosmium and the protocol code: no
# system packages needed.
COPY pyproject.toml README.md ./
COPY harvester ./harvester
COPY trainer ./trainer
COPY migrations ./migrations
RUN pip install -e . && useradd --system --uid 10001 harvester
USER harvester
CMD ["harvester", "run"]
