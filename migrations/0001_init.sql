-- 0001: the harvester's schema. Applied once by `harvester migrate`, recorded in schema_migrations.
CREATE EXTENSION IF NOT EXISTS postgis;

-- Coordinates drawn by a sampler. sampler_key identifies (region, seed, population source) so that
-- re-running with the same settings finds its points again and a larger sample adds only new indices.
CREATE TABLE sample_points (
    point_id    bigserial PRIMARY KEY,
    sampler_key text NOT NULL,
    idx         integer NOT NULL,
    lon         double precision NOT NULL,
    lat         double precision NOT NULL,
    geom        geometry(Point, 4326) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sampler_key, idx)
);
CREATE INDEX sample_points_geom_idx ON sample_points USING gist (geom);

-- An Overpass area: the lowest-zoom tile of a coordinate. One Overpass query serves every job of the area,
-- because every higher-zoom tile holding the coordinate lies inside it.
CREATE TABLE areas (
    area_id        bigserial PRIMARY KEY,
    zoom           integer NOT NULL,
    tile_x         integer NOT NULL,
    tile_y         integer NOT NULL,
    bounds         geometry(Polygon, 4326) NOT NULL,
    fetched_at     timestamptz,            -- set when its buildings are stored; NULL = not fetched yet
    building_count integer,
    dropped_count  integer,                -- OSM objects that could not be made into footprints
    UNIQUE (zoom, tile_x, tile_y)
);
CREATE INDEX areas_bounds_idx ON areas USING gist (bounds);

-- OSM building footprints as fetched for an area (keyed per area, so a mask can always be rebuilt exactly
-- from the footprints it was made from, even if OSM changes between two fetches of neighbouring areas).
CREATE TABLE buildings (
    area_id  bigint NOT NULL REFERENCES areas ON DELETE CASCADE,
    osm_type text NOT NULL CHECK (osm_type IN ('way', 'relation')),
    osm_id   bigint NOT NULL,
    geom     geometry(MultiPolygon, 4326) NOT NULL,
    tags     jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (area_id, osm_type, osm_id)
);
CREATE INDEX buildings_geom_idx ON buildings USING gist (geom);

-- Job states and their transitions:
--   pending     -> in_progress (claimed by a worker, lease set)
--   in_progress -> done (sample stored) | skipped (no imagery) | pending (failed attempt, retry later;
--                  or lease expired) | failed (attempts = max_attempts)
--   done, skipped, failed are final.
CREATE TYPE job_state AS ENUM ('pending', 'in_progress', 'done', 'failed', 'skipped');

CREATE TABLE jobs (
    job_id           bigserial PRIMARY KEY,
    provider         text NOT NULL,
    zoom             integer NOT NULL,
    tile_x           integer NOT NULL,
    tile_y           integer NOT NULL,
    point_id         bigint NOT NULL REFERENCES sample_points,
    area_id          bigint NOT NULL REFERENCES areas,
    state            job_state NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    not_before       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    worker           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, zoom, tile_x, tile_y)
);
CREATE INDEX jobs_pending_idx ON jobs (area_id) WHERE state = 'pending';
CREATE INDEX jobs_in_progress_idx ON jobs (lease_expires_at) WHERE state = 'in_progress';
CREATE INDEX jobs_area_idx ON jobs (area_id);

-- One stored sample per done job, written in the same transaction that marks the job done.
CREATE TABLE samples (
    sample_id       bigint PRIMARY KEY REFERENCES jobs ON DELETE CASCADE,
    footprint       geometry(Polygon, 4326) NOT NULL,
    split           text NOT NULL CHECK (split IN ('train', 'val', 'test')),
    image           bytea NOT NULL,
    image_format    text NOT NULL CHECK (image_format IN ('jpeg', 'png', 'webp')),
    mask            bytea NOT NULL,
    building_pixels integer NOT NULL CHECK (building_pixels BETWEEN 0 AND 65536),
    building_count  integer NOT NULL CHECK (building_count >= 0),
    harvested_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX samples_footprint_idx ON samples USING gist (footprint);
CREATE INDEX samples_split_idx ON samples (split);

CREATE VIEW dataset AS
SELECT s.sample_id,
       j.provider,
       j.zoom,
       j.tile_x,
       j.tile_y,
       p.lon,
       p.lat,
       s.footprint,
       s.split,
       s.image,
       s.image_format,
       s.mask,
       s.building_pixels,
       s.building_count,
       s.harvested_at
FROM samples s
JOIN jobs j ON j.job_id = s.sample_id
JOIN sample_points p ON p.point_id = j.point_id
WHERE j.state = 'done';
