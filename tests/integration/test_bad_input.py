"""Bad input and security of ``harvester run`` (issue 4, "Bad input and security"), through the real command line.

- Every malformed setting, given as its environment variable and as its flag: exit code 2, exactly one line on
  stderr naming that variable or flag, nothing written to the database.
- Quotes and SQL fragments through every text setting that reaches the database or a query: refused with exit 2 or
  harvested safely, and the schema intact afterwards.
- A canary Google key, with faults injected on the Google server: it appears in no output, no column of any table
  and not in the process' command line or title.
- Decompression bombs and oversized tiles: refused, the job fails with a clear error, nothing stored, memory bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import os
import re
import resource
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from tests.databases import TempDatabase, fetch
from tests.fakes.servers import FakeUpstreams
from tests.fakes.threaded import AppThread
from tests.fakes.world import World

from .harvest_checks import check_database

DEAD = "127.0.0.1:9"  # nothing listens there: a setting wrongly accepted fails fast instead of reaching the internet
PARIS_BOX = "bbox:2.30,48.84,2.37,48.88"
TABLES = ("sample_points", "areas", "buildings", "jobs", "samples")
MEMORY_LIMIT = 4 << 30  # address space of every harvester started here: an unbounded allocation fails, not the host


def start(args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """``harvester <args>`` with its address space capped (set right after the start: ``preexec_fn`` is unsafe
    while the fakes' threads run, and the harvester allocates nothing large while it imports)."""
    proc = subprocess.Popen([sys.executable, "-m", "harvester", *args], env=env, stdin=subprocess.DEVNULL, **popen)
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except ProcessLookupError:
        pass  # already gone (a refused setting exits at once)
    return proc


def wait_with_peak_rss(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for ``proc``; return the peak resident set (KiB) of the program it runs, its ``VmHWM`` read every 20 ms.
    Not ``wait4``'s ``ru_maxrss``: Linux folds the parent's memory at spawn into the child's (a pytest process
    that has loaded JAX makes any child look 900 MiB large). A peak is a high-water mark, so a poll after it sees it."""
    peak, deadline = 0, time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"harvester still running after {timeout:g} s")
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                peak = max([peak] + [int(line.split()[1]) for line in status if line.startswith("VmHWM:")])
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    return peak


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("HARVESTER_") and k not in ("DATABASE_URL", "GOOGLE_MAPS_API_KEY")}


def harvester(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    proc = start(list(args), env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\n[test] killed after {timeout} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def row_counts(url: str) -> dict[str, int]:
    return {t: fetch(url, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


# -- malformed settings --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One malformed setting. ``value`` is the text of the setting, or with ``file=True`` the contents of a file
    whose path is the setting. ``names`` overrides the name the error must give (cross-setting checks)."""

    env: str
    flag: str
    value: str | bytes
    file: bool = False  # the setting is the path of a file holding the value
    flag_file: bool = False  # only the flag is a file's path (the key: the variable holds it, the flag names a file)
    extra: dict = field(default_factory=dict)  # other settings of the case (None: unset)
    names: tuple[str, str] | None = None  # (when given as env, when given as flag)
    note: str = ""

    def id(self) -> str:
        shown = self.value if isinstance(self.value, str) else self.value.decode("latin-1")
        shown = re.sub(r"[^\w.,:;/{}+-]", "_", shown)[:24] or "empty"
        return f"{self.env.removeprefix('HARVESTER_')}={shown}{self.note}"


def _bad(env: str, flag: str, *values: str, **kw) -> list[Bad]:
    return [Bad(env, flag, v, **kw) for v in values]


BAD_SETTINGS: list[Bad] = [
    *_bad("HARVESTER_ZOOMS", "--zooms", "17;18", "", "0", "17,17"),
    *_bad("HARVESTER_REGION", "--region", "dep:99", "mars", "dep:20", "bbox:2,48,3", "bbox:2.4,48,2.3,49",
          "bbox:2,48,3,nan", "bbox:200,48,201,49"),
    *_bad("HARVESTER_SAMPLES", "--samples", "-5"),
    *_bad("HARVESTER_SEED", "--seed", "1.5"),
    *_bad("HARVESTER_TILE_PROVIDER", "--tile-provider", "bing"),
    *_bad("HARVESTER_IGN_URL", "--ign-url", "ftp://x/wmts", "data.geopf.fr/wmts", "http://[::1",
          "http://exa mple.com/wmts"),
    *_bad("HARVESTER_GOOGLE_URL", "--google-url", "file:///etc/passwd"),
    *_bad("HARVESTER_OVERPASS_URL", "--overpass-url", "not a url"),
    *_bad("HARVESTER_TILE_URL", "--tile-url", "http://h/{z}/{x}.png"),
    *_bad("HARVESTER_TILE_RATE", "--tile-rate", "0", "nan"),
    *_bad("HARVESTER_OVERPASS_RATE", "--overpass-rate", "-0.5"),
    *_bad("HARVESTER_TILE_CONCURRENCY", "--tile-concurrency", "0", "1.5"),
    *_bad("HARVESTER_OVERPASS_CONCURRENCY", "--overpass-concurrency", "0"),
    *_bad("HARVESTER_MAX_ATTEMPTS", "--max-attempts", "0"),
    *_bad("HARVESTER_REQUEST_TIMEOUT", "--request-timeout", "1"),
    *_bad("HARVESTER_BACKOFF_BASE", "--backoff-base", "-1"),
    *_bad("HARVESTER_LEASE_SECONDS", "--lease-seconds", "0"),
    *_bad("HARVESTER_USER_AGENT", "--user-agent", "tilesmith\r\nX-Injected: 1"),
    # A points CSV with junk lines (the setting is the file's path).
    *_bad("HARVESTER_POINTS", "--points", "lon,lat\n2.35,48.86\nabc,def\n", "2.35,48.86,7\n", "lon,lat\n200,48.86\n",
          "lon,lat\n", "2.35,48.86\n'; DROP TABLE jobs; --,1\n", file=True),
    Bad("HARVESTER_POINTS", "--points", b"\xff\xfe\x00\x01\x80garbage", file=True, note="-binary"),
    *_bad("HARVESTER_POINTS", "--points", "/nonexistent/points.csv"),
    Bad("HARVESTER_POPULATION_RASTER", "--population-raster", "not a GeoTIFF\n", file=True),
    # The key: the flag names a file holding it.
    Bad("GOOGLE_MAPS_API_KEY", "--google-api-key-file", "AIza has space", flag_file=True,
        extra={"HARVESTER_TILE_PROVIDER": "google"}),
    # Settings that need another one.
    Bad("HARVESTER_TILE_PROVIDER", "--tile-provider", "google", extra={"GOOGLE_MAPS_API_KEY": None},
        names=("GOOGLE_MAPS_API_KEY", "GOOGLE_MAPS_API_KEY"), note="-without-key"),
    Bad("HARVESTER_TILE_PROVIDER", "--tile-provider", "xyz", extra={"HARVESTER_TILE_URL": None},
        names=("HARVESTER_TILE_URL", "HARVESTER_TILE_URL"), note="-without-template"),
    # IGN's orthophotos stop at zoom 19: deeper zooms stop the run at start instead of queueing jobs that fail.
    Bad("HARVESTER_ZOOMS", "--zooms", "18,20", extra={"HARVESTER_TILE_PROVIDER": "ign"}, note="-ign-above-19"),
    # The database URL is validated at start, like every other setting (not a traceback from the driver).
    *_bad("DATABASE_URL", "--database-url", "notaurl", "postgresql://u@127.0.0.1:notaport/x"),
    # Values in range for the parser but not for the program: a lease PostgreSQL cannot represent, more tile
    # requests in flight than a process can hold database connections for (pointed at a dead database: if accepted,
    # it must not flood a real server with connections).
    Bad("HARVESTER_LEASE_SECONDS", "--lease-seconds", "1e300", note="-huge"),
    Bad("HARVESTER_TILE_CONCURRENCY", "--tile-concurrency", "100000", note="-huge",
        extra={"DATABASE_URL": f"postgresql://postgres@{DEAD}/tiles"}),
]


@dataclass
class Outcome:
    seed: int
    args: list[str]
    result: subprocess.CompletedProcess
    seconds: float
    sampler_key: str | None = None  # the points file's key, when the case gives one


@pytest.fixture(scope="module")
def bad_settings_database(template_database):
    """One migrated database shared by every malformed-setting run (cloning one per run would cost more than the
    runs); each run gets its own HARVESTER_SEED, so rows written by a run that should have been refused are traced
    back to it."""
    with TempDatabase(template=template_database) as url:
        yield url


def _valid_environ(url: str, seed: int) -> dict[str, str]:
    """Valid settings around the bad one: a tiny harvest whose upstreams are all dead, so a wrongly accepted setting
    ends within seconds (every attempt refused, one attempt each) instead of reaching the internet."""
    return {**clean_environ(), "DATABASE_URL": url, "HARVESTER_REGION": PARIS_BOX, "HARVESTER_SAMPLES": "2",
            "HARVESTER_ZOOMS": "17", "HARVESTER_SEED": str(seed), "HARVESTER_TILE_PROVIDER": "xyz",
            "HARVESTER_TILE_URL": f"http://{DEAD}/{{z}}/{{x}}/{{y}}.png", "HARVESTER_IGN_URL": f"http://{DEAD}/wmts",
            "HARVESTER_GOOGLE_URL": f"http://{DEAD}", "HARVESTER_OVERPASS_URL": f"http://{DEAD}/api/interpreter",
            "HARVESTER_MAX_ATTEMPTS": "1", "HARVESTER_REQUEST_TIMEOUT": "2", "HARVESTER_BACKOFF_BASE": "0.05",
            "GOOGLE_MAPS_API_KEY": "AIzaValidTestKey"}


def _cases() -> list[tuple[Bad, str]]:
    """Every bad value as its environment variable; the first bad value of each setting (and every case with a
    special rule) as its flag too: the flag and the variable share one parser, only the name in the error differs."""
    cases, flagged = [], set()
    for bad in BAD_SETTINGS:
        cases.append((bad, "env"))
        if bad.env not in flagged or bad.note or bad.extra:
            flagged.add(bad.env)
            cases.append((bad, "flag"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def bad_setting_outcomes(bad_settings_database, tmp_path_factory) -> dict[int, Outcome]:
    """Every case run once, four at a time."""
    files = tmp_path_factory.mktemp("bad-settings")

    def run(index: int, bad: Bad, how: str) -> tuple[int, Outcome]:
        seed = 1000 + index
        env = _valid_environ(bad_settings_database, seed)
        for name, value in bad.extra.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        value, sampler_key = bad.value, None
        if bad.file or (bad.flag_file and how == "flag"):
            path = files / f"case{index}.txt"
            path.write_bytes(value if isinstance(value, bytes) else value.encode())
            value = str(path)
            sampler_key = f"points:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        args = ["run"]
        if how == "env":
            env[bad.env] = value
        else:
            args.append(f"{bad.flag}={value}")
        start = time.monotonic()
        result = harvester(*args, env=env, timeout=60)
        return index, Outcome(seed, args, result, time.monotonic() - start, sampler_key)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, i, bad, how) for i, (bad, how) in enumerate(CASES)]
        outcomes = dict(f.result() for f in futures)
    slow = sorted(((o.seconds, f"{CASES[i][0].id()}-{CASES[i][1]}") for i, o in outcomes.items()), reverse=True)
    print(f"\n{len(CASES)} runs; slowest: " + ", ".join(f"{name} {s:.1f} s" for s, name in slow[:5]))
    return outcomes


def _names_it(line: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line) is not None


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{bad.id()}-{how}" for bad, how in CASES])
def test_malformed_setting_stops_with_one_line_naming_it(bad_setting_outcomes, bad_settings_database, index):
    bad, how = CASES[index]
    outcome = bad_setting_outcomes[index]
    result = outcome.result
    name = (bad.names or (bad.env, bad.flag))[0 if how == "env" else 1]
    shown = f"args {outcome.args}, exit {result.returncode}, stderr:\n{result.stderr[-2500:]}"
    assert result.returncode == 2, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr; {shown}"
    assert _names_it(lines[0], name), f"the line does not name {name}: {lines[0]!r}"
    assert "Traceback" not in result.stderr and result.stdout == ""
    written = fetch(bad_settings_database, "SELECT count(*) AS n FROM sample_points"
                    " WHERE sampler_key LIKE $1 OR sampler_key = $2", f"%|seed={outcome.seed}",
                    outcome.sampler_key or "")
    assert written[0]["n"] == 0, "the run wrote sample points before refusing"


def test_unknown_flag_is_refused_with_one_line(migrated_database_url):
    env = _valid_environ(migrated_database_url, 1)
    result = harvester("run", "--tile-size=512", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tile-size=512" in lines[0], result.stderr
    assert sum(row_counts(migrated_database_url).values()) == 0


def test_refused_settings_wrote_nothing(bad_setting_outcomes, bad_settings_database):
    counts = row_counts(bad_settings_database)
    if any(counts.values()):
        keys = [r["sampler_key"] for r in fetch(bad_settings_database,
                                                "SELECT DISTINCT sampler_key FROM sample_points")]
        seeds = {o.seed: f"{CASES[i][0].id()}-{CASES[i][1]}" for i, o in bad_setting_outcomes.items()}
        culprits = [seeds.get(int(k.rpartition("=")[2]), k) if "|seed=" in k else k for k in keys]
        pytest.fail(f"rows written by runs that should have been refused: {counts}; runs: {culprits}")


# -- SQL fragments through every text setting ----------------------------------------------------------------------

SQL_FRAGMENTS = "'; DROP TABLE jobs; -- $1 \\ \" ); DELETE FROM samples; /* ü 中 😀 */"


def schema(url: str) -> list[tuple]:
    rows = fetch(url, "SELECT table_name, column_name, data_type FROM information_schema.columns"
                      " WHERE table_schema = 'public' ORDER BY 1, 2")
    return [tuple(r) for r in rows] + [tuple(r) for r in fetch(url, "SELECT version FROM schema_migrations")]


def _injection_cases() -> list[tuple[str, dict[str, str], str, tuple[str, str, str] | None]]:
    """(id, settings, what the run must do, (server, field, value) a fake must have received when it harvests).

    ``harvest``: runs and stores samples; ``refuse``: exit 2; ``refuse-or-harvest``: either, cleanly."""
    user_agent = f"tilesmith-test/1 (+mailto:o'brien@example.org) {SQL_FRAGMENTS}"
    key = "AIza';DROP/**/TABLE/**/jobs;--$1\\%27&key=x#ü"
    return [
        ("user-agent", {"HARVESTER_USER_AGENT": user_agent}, "refuse-or-harvest", ("xyz", "user_agent", user_agent)),
        ("tile-url-query", {"HARVESTER_TILE_URL": "{xyz}?q=';DROP/**/TABLE/**/jobs;--&p=$1&b=\\&u=%C3%BC"},
         "harvest", ("xyz", "q", "';DROP/**/TABLE/**/jobs;--")),
        ("ign-url-query", {"HARVESTER_TILE_PROVIDER": "ign",
                           "HARVESTER_IGN_URL": "{ign}?x=');DELETE/**/FROM/**/jobs;--"},
         "harvest", ("ign", "x", "');DELETE/**/FROM/**/jobs;--")),
        ("overpass-url-query", {"HARVESTER_OVERPASS_URL": "{overpass}?q='||pg_sleep(10)||'"}, "harvest",
         ("overpass", "q", "'||pg_sleep(10)||'")),
        # A raw space is not allowed in a URL (RFC 3986): refusing it is as good as percent-encoding it.
        ("url-with-spaces", {"HARVESTER_TILE_URL": "{xyz}?q='; DROP TABLE jobs; --"}, "refuse-or-harvest", None),
        ("google-key", {"HARVESTER_TILE_PROVIDER": "google", "GOOGLE_MAPS_API_KEY": key}, "harvest",
         ("google", "key", key)),
        ("database-url-options", {"DATABASE_URL": "{db}?application_name=x%27%3B%20DROP%20TABLE%20jobs%3B%20--"},
         "harvest", None),
        ("region", {"HARVESTER_REGION": "dep:75'; DROP TABLE jobs; --"}, "refuse", None),
        ("region-bbox", {"HARVESTER_REGION": "bbox:2.30,48.84,2.37,48.88); DROP TABLE jobs; --"}, "refuse", None),
        ("points-comment", {"HARVESTER_POINTS": "# '; DROP TABLE jobs; -- $1 \\ ü\n2.35,48.86\n2.31,48.85\n"},
         "harvest", None),
        ("points-path", {"HARVESTER_POINTS": "2.35,48.86\n", "_points_name": "p'; DROP TABLE jobs; --$1.csv"},
         "harvest", None),
    ]


INJECTION_CASES = _injection_cases()


@pytest.mark.parametrize("case, settings, expect, received", INJECTION_CASES, ids=[c[0] for c in INJECTION_CASES])
def test_sql_fragments_in_text_settings_are_harmless(migrated_database_url, tmp_path, case, settings, expect,
                                                      received):
    url, world = migrated_database_url, World(seed=31)
    before = schema(url)
    with FakeUpstreams(world, overrides={"google": {"api_key": settings.get("GOOGLE_MAPS_API_KEY", "test-key")}}) as up:
        fill = {"xyz": up.xyz_url, "ign": up.ign_url, "overpass": up.overpass_url, "db": url}
        env = {**clean_environ(), **up.env(), "DATABASE_URL": url, "HARVESTER_REGION": PARIS_BOX,
               "HARVESTER_SAMPLES": "3", "HARVESTER_ZOOMS": "17", "HARVESTER_TILE_PROVIDER": "xyz",
               "HARVESTER_TILE_RATE": "200", "HARVESTER_OVERPASS_RATE": "200", "HARVESTER_BACKOFF_BASE": "0.05",
               "HARVESTER_REQUEST_TIMEOUT": "5"}
        for name, value in settings.items():
            if name == "_points_name":
                continue
            if name == "HARVESTER_POINTS":
                path = tmp_path / settings.get("_points_name", "points.csv")
                path.write_text(value)
                value = str(path)
            for placeholder, real in fill.items():
                value = value.replace("{" + placeholder + "}", real)
            env[name] = value
        result = harvester("run", env=env)
        requests = {kind: up.requests(kind) for kind in ("xyz", "ign", "google", "overpass")}
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    refused = result.returncode == 2
    if expect == "refuse":
        assert refused, result.stderr[-2000:]
    if refused and expect != "harvest":
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert sum(row_counts(url).values()) == 0
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        states = asyncio.run(check_database(url, world))
        assert states.get("done", 0) >= 1, states
        if received is not None:  # the odd value really went out, verbatim
            server, name, value = received
            got = {r.user_agent if name == "user_agent" else r.params.get(name) for r in requests[server]}
            assert value in got, (value, got)
    assert schema(url) == before


# -- the Google key never shows ------------------------------------------------------------------------------------

CANARY = "AIzaCANARY0123456789"
GOOGLE_FAULTS = {"forbidden": 0.08, "session_expired": 0.08, "server_error": 0.06, "reset": 0.05, "truncated": 0.05,
                 "html_200": 0.04, "corrupt_image": 0.04, "rate_limited": 0.04, "bad_gateway": 0.04}


def _text_columns_holding(url: str, needles: list[str]) -> list[str]:
    """``table.column`` of every column (of every table of the public schema, any type cast to text) holding a
    needle; bytea columns are searched both as bytes and as their hex text."""
    hits = []
    columns = fetch(url, "SELECT c.table_name, c.column_name FROM information_schema.columns c"
                         " JOIN information_schema.tables t USING (table_schema, table_name)"
                         " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'")
    for row in columns:
        table, column = row["table_name"], row["column_name"]
        for needle in needles:
            hex_needle = needle.encode().hex()
            found = fetch(url, f'SELECT count(*) AS n FROM "{table}" WHERE strpos("{column}"::text, $1) > 0'
                               f' OR strpos("{column}"::text, $2) > 0', needle, hex_needle)
            if found[0]["n"]:
                hits.append(f"{table}.{column}")
    return hits


def _watch_process(proc: subprocess.Popen, seen: list[bytes], stop: threading.Event) -> None:
    """Collect the command line and title(s) of a running process until it ends."""
    while not stop.is_set() and proc.poll() is None:
        for name in (f"/proc/{proc.pid}/cmdline", f"/proc/{proc.pid}/comm"):
            try:
                seen.append(Path(name).read_bytes())
            except OSError:
                pass
        try:
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                seen.append((task / "comm").read_bytes())
        except OSError:
            pass
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["env", "key-file"])
def test_google_key_appears_nowhere(migrated_database_url, tmp_path, how):
    """A canary key (from the environment, or from the file the flag names) through a harvest whose Google server
    answers 403s, expired sessions, 5xx, resets, truncated and corrupt bodies, and expires every session mid-run:
    the key is in no output (run at DEBUG, status, --help), no column of any table, no command line or title."""
    url, world = migrated_database_url, World(seed=32)
    with FakeUpstreams(world, seed=5, faults={"google": GOOGLE_FAULTS},
                       overrides={"google": {"api_key": CANARY, "latency_s": 0.02}}) as up:
        env = {**clean_environ(), **up.env(), "DATABASE_URL": url, "HARVESTER_REGION": PARIS_BOX,
               "HARVESTER_SAMPLES": "15", "HARVESTER_ZOOMS": "17,18", "HARVESTER_TILE_PROVIDER": "google",
               "HARVESTER_TILE_RATE": "200", "HARVESTER_OVERPASS_RATE": "200", "HARVESTER_BACKOFF_BASE": "0.02",
               "HARVESTER_MAX_ATTEMPTS": "2", "HARVESTER_REQUEST_TIMEOUT": "3", "PYTHONUNBUFFERED": "1"}
        args = ["--log-level", "DEBUG", "run"]
        if how == "env":
            env["GOOGLE_MAPS_API_KEY"] = CANARY
        else:
            env.pop("GOOGLE_MAPS_API_KEY")
            key_file = tmp_path / "google.key"
            key_file.write_text(CANARY + "\n")
            args.append(f"--google-api-key-file={key_file}")
        assert up.google_key == CANARY
        out, err = tmp_path / "run.out", tmp_path / "run.err"
        seen: list[bytes] = []
        stop = threading.Event()
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = start(args, env, stdout=stdout, stderr=stderr)
            watcher = threading.Thread(target=_watch_process, args=(proc, seen, stop))
            watcher.start()
            try:
                time.sleep(1.5)
                up.expire_google_sessions()  # every session issued so far expires mid-run
                code = proc.wait(120)
            finally:
                stop.set()
                watcher.join()
                if proc.poll() is None:
                    proc.kill()
        run_output = out.read_text() + err.read_text()
        assert code == 0, run_output[-3000:]
        google = up.requests("google")
        assert any(r.fault for r in google), "no fault was injected"
        assert any(r.params.get("key") == CANARY for r in google)  # the key was really used
    status_env = {**env, "GOOGLE_MAPS_API_KEY": CANARY}
    outputs = {"run": run_output}
    for command in (["status"], ["status", "--json"], ["run", "--help"], ["--help"]):
        result = harvester(*command, env=status_env)
        outputs[" ".join(command)] = result.stdout + result.stderr
    for name, text in outputs.items():
        assert CANARY not in text, f"the key appears in the output of harvester {name}"
        assert "CANARY" not in text, f"part of the key appears in the output of harvester {name}"
    assert seen and not [s for s in seen if CANARY.encode() in s], "the key appears in the process command line"
    assert _text_columns_holding(url, [CANARY, "CANARY0123"]) == []
    states = asyncio.run(check_database(url, world, max_attempts=2))
    assert states.get("failed", 0) > 0, states  # errors were stored in jobs.last_error, and searched above
    assert "HTTP 403" in run_output or "HTTP 401" in run_output  # the errors were logged, without the key


class TileServer(AppThread):
    """A tiny XYZ tile server in a thread; ``handler(request)`` answers every request."""

    def __init__(self, handler):
        self.handler = handler
        self.requests: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._answer)
        super().__init__(app, name="hostile-tiles")

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        return await self.handler(request)


def test_google_key_not_echoed_from_an_upstream_error_page(migrated_database_url):
    """Some upstreams (CDNs, proxies, API gateways) echo the request URL in their error pages; the harvester stores
    and logs an excerpt of error bodies, so it must redact the key from them."""
    url, world = migrated_database_url, World(seed=33)

    async def google_like(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/createSession":
            return web.json_response({"session": "s" * 20, "expiry": str(int(time.time()) + 3600),
                                      "tileWidth": 256, "tileHeight": 256, "imageFormat": "jpeg"})
        return web.Response(status=500, text=f"Internal error while serving GET {request.path_qs}",
                            content_type="text/plain")

    with TileServer(google_like) as google, FakeUpstreams(world) as up:
        env = {**clean_environ(), **up.env(), "DATABASE_URL": url, "HARVESTER_REGION": PARIS_BOX,
               "HARVESTER_SAMPLES": "2", "HARVESTER_ZOOMS": "17", "HARVESTER_TILE_PROVIDER": "google",
               "HARVESTER_GOOGLE_URL": f"http://127.0.0.1:{google.port}", "GOOGLE_MAPS_API_KEY": CANARY,
               "HARVESTER_TILE_RATE": "200", "HARVESTER_OVERPASS_RATE": "200", "HARVESTER_BACKOFF_BASE": "0.02",
               "HARVESTER_MAX_ATTEMPTS": "2"}
        result = harvester("run", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HTTP 500" in result.stderr
    leaks = _text_columns_holding(url, [CANARY]) + (["log"] if CANARY in result.stdout + result.stderr else [])
    assert leaks == [], f"the key echoed by the upstream reached: {leaks}"


# -- decompression bombs and oversized tiles -----------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` zero pixels: a few kB that decode to width*height."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header claims ``width`` x ``height``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 60)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


OVERSIZE = 6 * 1024 * 1024  # above the 4 MiB tile cap


@pytest.fixture(scope="module")
def hostile_tiles() -> dict[str, tuple[bytes | None, str]]:
    """kind -> (body, a word the job's error must hold). None: streamed without Content-Length."""
    return {
        "png-bomb": (_png(30_000, 30_000), "decompression"),  # 900 Mpx, 110 MB as 1-bit, 2.7 GB as RGB
        "png-too-large": (_png(5_000, 5_000), "5000x5000"),  # past MAX_IMAGE_PIXELS, below Pillow's hard error
        "jpeg-bomb-header": (_jpeg_claiming(65_000, 65_000), "decompression"),
        "oversized-declared": (b"\xff\xd8\xff\xe0" + b"\0" * OVERSIZE, "cap"),
        "oversized-chunked": (None, "cap"),
    }


def test_decompression_bombs_and_oversized_tiles_are_refused(migrated_database_url, tmp_path, hostile_tiles):
    url, world = migrated_database_url, World(seed=34)
    kinds = list(hostile_tiles)
    assigned: dict[str, str] = {}

    async def hostile(request: web.Request) -> web.StreamResponse:
        tile = request.path.rsplit(".", 1)[0]
        kind = assigned.setdefault(tile, kinds[len(assigned) % len(kinds)])
        body = hostile_tiles[kind][0]
        if body is not None:
            return web.Response(body=body, content_type="image/png")
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        chunk = b"\xff\xd8\xff\xe0" + b"\0" * 65532
        for _ in range(OVERSIZE // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    points = tmp_path / "points.csv"
    points.write_text("".join(f"{2.30 + 0.007 * i:.4f},{48.84 + 0.004 * i:.4f}\n" for i in range(10)))
    with TileServer(hostile) as tiles, FakeUpstreams(world) as up:
        env = {**clean_environ(), **up.env(), "DATABASE_URL": url, "HARVESTER_POINTS": str(points),
               "HARVESTER_ZOOMS": "17", "HARVESTER_TILE_PROVIDER": "xyz",
               "HARVESTER_TILE_URL": f"http://127.0.0.1:{tiles.port}/xyz/{{z}}/{{x}}/{{y}}.png",
               "HARVESTER_TILE_RATE": "200", "HARVESTER_OVERPASS_RATE": "200", "HARVESTER_BACKOFF_BASE": "0.02",
               "HARVESTER_MAX_ATTEMPTS": "2", "HARVESTER_REQUEST_TIMEOUT": "30"}
        out, err = tmp_path / "run.out", tmp_path / "run.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = start(["run"], env, stdout=stdout, stderr=stderr)
            peak_kib = wait_with_peak_rss(proc, timeout=120)
    log = err.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert len(set(assigned.values())) == len(kinds), assigned
    assert 0 < peak_kib < 700 * 1024, f"peak RSS {peak_kib // 1024} MiB: a bomb was decoded"
    states = asyncio.run(check_database(url, max_attempts=2))
    assert states == {"failed": 10}, states
    assert row_counts(url)["samples"] == 0
    jobs = fetch(url, "SELECT zoom, tile_x, tile_y, attempts, last_error FROM jobs")
    for job in jobs:
        kind = assigned[f"/xyz/{job['zoom']}/{job['tile_x']}/{job['tile_y']}"]
        expected = hostile_tiles[kind][1]
        assert expected in job["last_error"].lower(), (kind, job["last_error"])
        assert len(job["last_error"]) < 600 and "\x00" not in job["last_error"]
    print(f"\nhostile tiles refused, peak RSS of the harvester {peak_kib // 1024} MiB: "
          + "; ".join(sorted({f"{assigned[f'/xyz/{j[0]}/{j[1]}/{j[2]}']}: {j['last_error'][:90]}" for j in jobs})))
