-- Named queries of the OSM extract (harvester/labels/extract.py). Each starts with "-- name: NAME".

-- name: lookup
-- One area's footprints: every building whose geometry meets the box, whole (never cut). Uses the GiST index.
SELECT osm_type, osm_id, ST_AsBinary(geom) AS wkb, tags::text AS tags
FROM osm_buildings
WHERE ST_Intersects(geom, ST_MakeEnvelope($1, $2, $3, $4, 4326));

-- name: active
SELECT extract_id, file_name, replication_timestamp, replication_sequence, kept, dropped, dropped_by_reason::text,
       repaired, started_at, imported_at
FROM osm_extracts ORDER BY extract_id DESC LIMIT 1;

-- name: lock
-- One import at a time per database (the lock ends with the import's transaction).
SELECT pg_advisory_xact_lock(7600115012);

-- name: create_next
CREATE TABLE osm_buildings_next (LIKE osm_buildings INCLUDING DEFAULTS INCLUDING CONSTRAINTS);

-- name: index_next
CREATE INDEX osm_buildings_next_geom_idx ON osm_buildings_next USING gist (geom);

-- name: analyze_next
ANALYZE osm_buildings_next;

-- name: swap
-- In the import's transaction: readers of the old table finish first (DROP waits for their locks); readers that
-- came meanwhile find the new table under the old name once the transaction commits.
DROP TABLE osm_buildings;
ALTER TABLE osm_buildings_next RENAME TO osm_buildings;
ALTER INDEX osm_buildings_next_geom_idx RENAME TO osm_buildings_geom_idx;

-- name: record
INSERT INTO osm_extracts (file_name, replication_timestamp, replication_sequence, kept, dropped, dropped_by_reason,
                          repaired, started_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
RETURNING extract_id;
