-- 0006: tile images stored out of line without compression (STORAGE EXTERNAL). JPEG, PNG and WebP tiles are already
-- compressed: PostgreSQL's default (EXTENDED) ran pglz over every ~100 kB body only to find it incompressible and
-- keep the original, about 1 ms of the server's CPU per sample (1.41 against 0.43 ms per insert of the kampala-oam
-- PNGs, same table size). Applies to rows written from now on; stored rows stay as they are (both read the same).
ALTER TABLE samples ALTER COLUMN image SET STORAGE EXTERNAL;
