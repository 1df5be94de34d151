-- 0003: building footprints from an OSM extract (`harvester import-osm`, HARVESTER_LABELS=extract).

-- One row per completed import; the active extract is the latest row. Written in the transaction that swaps its
-- footprints in, so a row exists exactly when its footprints are the ones in osm_buildings.
CREATE TABLE osm_extracts (
    extract_id            bigserial PRIMARY KEY,
    file_name             text NOT NULL,
    replication_timestamp timestamptz,        -- from the PBF header (osmosis_replication_timestamp), when present
    replication_sequence  bigint,             -- from the PBF header (osmosis_replication_sequence_number)
    kept                  bigint NOT NULL,    -- footprints stored
    dropped               bigint NOT NULL,    -- OSM objects tagged building that could not be made into footprints
    dropped_by_reason     jsonb NOT NULL DEFAULT '{}',
    repaired              bigint NOT NULL DEFAULT 0,  -- footprints kept after shapely.make_valid
    started_at            timestamptz NOT NULL,
    imported_at           timestamptz NOT NULL DEFAULT now()
);

-- The footprints of the active extract. An import builds a new table of this shape and swaps it in by renaming,
-- in one transaction (see harvester/labels/extract.py): a reader sees the old footprints or the new, never half.
CREATE TABLE osm_buildings (
    osm_type text NOT NULL CHECK (osm_type IN ('way', 'relation')),
    osm_id   bigint NOT NULL,
    geom     geometry(MultiPolygon, 4326) NOT NULL,
    tags     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX osm_buildings_geom_idx ON osm_buildings USING gist (geom);

-- Where an area's footprints came from: the HARVESTER_LABELS source that stored them.
ALTER TABLE buildings ADD COLUMN source text NOT NULL DEFAULT 'overpass' CHECK (source IN ('overpass', 'extract'));
