-- Named queries of the job queue, loaded once by harvester/queue.py. Each starts with "-- name: NAME".

-- name: insert_points
INSERT INTO sample_points (sampler_key, idx, lon, lat, geom)
SELECT $1, t.idx, t.lon, t.lat, ST_SetSRID(ST_MakePoint(t.lon, t.lat), 4326)
FROM unnest($2::integer[], $3::float8[], $4::float8[]) AS t(idx, lon, lat)
ON CONFLICT (sampler_key, idx) DO NOTHING;

-- name: select_points
SELECT point_id, idx, lon, lat FROM sample_points WHERE sampler_key = $1 AND idx < $2 ORDER BY idx;

-- name: insert_areas
INSERT INTO areas (zoom, tile_x, tile_y, bounds)
SELECT t.zoom, t.x, t.y, ST_MakeEnvelope(t.w, t.s, t.e, t.n, 4326)
FROM unnest($1::integer[], $2::integer[], $3::integer[], $4::float8[], $5::float8[], $6::float8[], $7::float8[])
     AS t(zoom, x, y, w, s, e, n)
ON CONFLICT (zoom, tile_x, tile_y) DO NOTHING;

-- name: select_areas
SELECT a.area_id, a.zoom, a.tile_x, a.tile_y
FROM areas a JOIN unnest($1::integer[], $2::integer[], $3::integer[]) AS t(zoom, x, y)
  ON a.zoom = t.zoom AND a.tile_x = t.x AND a.tile_y = t.y;

-- name: insert_jobs
INSERT INTO jobs (provider, zoom, tile_x, tile_y, point_id, area_id)
SELECT $1, t.zoom, t.x, t.y, t.point_id, t.area_id
FROM unnest($2::integer[], $3::integer[], $4::integer[], $5::bigint[], $6::bigint[]) AS t(zoom, x, y, point_id, area_id)
ON CONFLICT (provider, zoom, tile_x, tile_y) DO NOTHING;

-- name: claim_area
-- Claims every due pending job of one area (one Overpass answer serves them all). The area row lock, taken with
-- SKIP LOCKED, keeps two workers off the same area; the job rows are re-checked after it (READ COMMITTED).
WITH candidate AS (
    SELECT a.area_id, a.zoom, a.tile_x, a.tile_y, a.fetched_at
    FROM areas a
    WHERE a.area_id IN (
        SELECT j.area_id FROM jobs j
        WHERE j.state = 'pending' AND j.not_before <= now()
        ORDER BY j.area_id LIMIT 64)
    ORDER BY a.area_id
    LIMIT 1
    FOR UPDATE OF a SKIP LOCKED
)
UPDATE jobs j
SET state = 'in_progress', attempts = j.attempts + 1, worker = $1,
    lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
FROM candidate c, sample_points p
WHERE j.area_id = c.area_id AND j.state = 'pending' AND j.not_before <= now() AND p.point_id = j.point_id
RETURNING j.job_id, j.provider, j.zoom, j.tile_x, j.tile_y, j.attempts, p.lon, p.lat,
          c.area_id, c.zoom AS area_zoom, c.tile_x AS area_x, c.tile_y AS area_y, c.fetched_at IS NOT NULL AS fetched;

-- name: heartbeat
UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
WHERE job_id = ANY($1::bigint[]) AND worker = $2 AND state = 'in_progress';

-- name: requeue_expired
-- Jobs of a worker that died: back to the queue, or failed when their attempts are spent.
UPDATE jobs
SET state = (CASE WHEN attempts >= $1 THEN 'failed' ELSE 'pending' END)::job_state,
    last_error = 'lease expired: the worker holding it stopped (crash or kill) before finishing',
    worker = NULL, lease_expires_at = NULL, updated_at = now()
WHERE state = 'in_progress' AND lease_expires_at < now();

-- name: fail_attempt
-- One statement for all the jobs given (an area's, when its Overpass query failed): one now(), so they come due
-- together and the next claim takes them all, with one query.
UPDATE jobs
SET state = (CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END)::job_state,
    last_error = $4, not_before = now() + make_interval(secs => $5),
    worker = NULL, lease_expires_at = NULL, updated_at = now()
WHERE job_id = ANY($1::bigint[]) AND worker = $2 AND state = 'in_progress';

-- name: skip_job
UPDATE jobs SET state = 'skipped', last_error = $3, worker = NULL, lease_expires_at = NULL, updated_at = now()
WHERE job_id = $1 AND worker = $2 AND state = 'in_progress';

-- name: release_jobs
-- Jobs given back on shutdown before their attempt finished: that attempt does not count.
UPDATE jobs SET state = 'pending', attempts = greatest(attempts - 1, 0), worker = NULL, lease_expires_at = NULL,
    updated_at = now()
WHERE job_id = ANY($1::bigint[]) AND worker = $2 AND state = 'in_progress';

-- name: counts
SELECT state::text AS state, zoom, count(*)::bigint AS n FROM jobs GROUP BY state, zoom;

-- name: open_jobs
SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'in_progress') AS in_progress,
       extract(epoch FROM min(not_before) FILTER (WHERE state = 'pending') - now()) AS next_due_s,
       extract(epoch FROM min(lease_expires_at) FILTER (WHERE state = 'in_progress') - now()) AS next_lease_s
FROM jobs WHERE state IN ('pending', 'in_progress');
