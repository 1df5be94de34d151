-- Named queries of the storage module, loaded once by harvester/store.py. Each starts with "-- name: NAME".

-- name: store_sample
-- The sample and its job's new state in one statement: nothing is written unless this worker still holds the job.
WITH job AS (
    UPDATE jobs SET state = 'done', last_error = NULL, worker = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE job_id = $1 AND worker = $2 AND state = 'in_progress'
    RETURNING job_id
)
INSERT INTO samples (sample_id, footprint, split, image, image_format, mask, building_pixels, building_count,
                     instances)
SELECT job.job_id, ST_MakeEnvelope($3, $4, $5, $6, 4326), $7, $8, $9, $10, $11, $12, $13 FROM job
RETURNING sample_id;

-- name: store_buildings
-- Store the area's footprints and mark it fetched: one statement, so one transaction and one round trip. An area
-- is fetched only while fetched_at is NULL, and footprints exist only once it is set, so nothing is there to replace.
WITH added AS (
    INSERT INTO buildings (area_id, osm_type, osm_id, geom, tags, source)
    SELECT $1, t.osm_type, t.osm_id, ST_Multi(ST_GeomFromWKB(t.wkb, 4326)), t.tags::jsonb, $7
    FROM unnest($2::text[], $3::bigint[], $4::bytea[], $5::text[]) AS t(osm_type, osm_id, wkb, tags)
    ON CONFLICT (area_id, osm_type, osm_id) DO NOTHING
)
UPDATE areas SET fetched_at = now(), building_count = cardinality($3::bigint[]), dropped_count = $6
WHERE area_id = $1;

-- name: select_buildings
SELECT osm_type, osm_id, ST_AsBinary(geom) AS wkb FROM buildings WHERE area_id = $1 ORDER BY osm_type, osm_id;

-- name: samples_without_instances
-- Harvested samples without an instance map (stored before migration 0005), in sample_id order after $1. Samples of
-- external data sets (their points' sampler_key starts with 'external:') have no footprints: never rebuilt.
SELECT s.sample_id, j.zoom, j.tile_x, j.tile_y, j.area_id, s.mask
FROM samples s
JOIN jobs j ON j.job_id = s.sample_id
JOIN sample_points p ON p.point_id = j.point_id
WHERE s.instances IS NULL AND s.sample_id > $1 AND p.sampler_key NOT LIKE 'external:%'
ORDER BY s.sample_id
LIMIT $2;

-- name: set_instances
UPDATE samples s SET instances = t.png
FROM unnest($1::bigint[], $2::bytea[]) AS t(sample_id, png)
WHERE s.sample_id = t.sample_id AND s.instances IS NULL;
