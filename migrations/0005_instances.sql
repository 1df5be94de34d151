-- 0005: building instances beside the mask (SPEC: the `dataset` view's `instances`).
-- A 16-bit one-channel PNG: 0 background, k where the pixel centre lies in the tile's k-th footprint (its footprints
-- that intersect the tile, in (osm_type, osm_id) order), by the mask's own fill: nonzero exactly where `mask` is.
-- NULL where footprints are unknown (external data sets), and for samples harvested before this migration until
-- `harvester rebuild-instances` rebuilds them from their stored footprints.
ALTER TABLE samples ADD COLUMN instances bytea;

-- The same view with the new column last (CREATE OR REPLACE VIEW may only add columns at the end); its grants stay.
CREATE OR REPLACE VIEW dataset AS
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
       s.harvested_at,
       s.instances
FROM samples s
JOIN jobs j ON j.job_id = s.sample_id
JOIN sample_points p ON p.point_id = j.point_id
WHERE j.state = 'done';
