-- 0004: one politeness budget per upstream, shared by every `harvester run` on this database (harvester/limits.py).
-- Times are the database's clock (clock_timestamp()); no process clock is ever compared with them.

-- Rate: GCRA. `tat` (theoretical arrival time) is the earliest start the next request may book; each booking moves it
-- on by the booker's spacing (1.04 / rate s). A 429 moves it to the end of the pause, so every process waits.
CREATE TABLE upstream_budget (
    upstream     text PRIMARY KEY,          -- e.g. 'tiles:data.geopf.fr', 'overpass:overpass-api.de'
    tat          timestamptz NOT NULL DEFAULT '-infinity',
    -- set by a worker that found every slot held: until then, a freed slot is announced (NOTIFY) to the waiters
    wanted_until timestamptz NOT NULL DEFAULT '-infinity'
);

-- Concurrency: one row per request slot. A slot is held while expires_at is in the future (a lease, renewed by
-- nothing: it outlives the longest request), and freed at once when the request ends; the slot of a process killed
-- mid-request comes back when its lease expires.
CREATE TABLE upstream_slots (
    upstream   text NOT NULL,
    slot       integer NOT NULL CHECK (slot >= 0),
    holder     text,                        -- host:pid:token:n of the request holding it, NULL when free
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (upstream, slot)
);
