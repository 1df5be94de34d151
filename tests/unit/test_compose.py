"""docker-compose.yml: valid for Debian's docker-compose, and each service runs a real CLI command."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harvester.cli import build_parser
from harvester.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid():
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (scripts/test.sh installs it)")
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_services_run_real_commands_in_order():
    services = _compose()["services"]
    assert set(services) == {"db", "migrate", "harvester", "import-osm"}
    for name in ("migrate", "harvester"):
        command = services[name]["command"]
        assert command[0] == "harvester"
        build_parser().parse_args(command[1:])  # exits 2 on an unknown subcommand or flag
    assert services["migrate"]["command"] == ["harvester", "migrate"]
    assert services["harvester"]["command"] == ["harvester", "run"]
    assert services["harvester"]["restart"] == "on-failure"  # exits 0 when done: `docker compose up` ends with it
    assert services["harvester"]["depends_on"] == {
        "db": {"condition": "service_healthy"}, "migrate": {"condition": "service_completed_successfully"}}
    assert "healthcheck" in services["db"] and services["db"]["volumes"]


def test_every_setting_passes_through_with_the_spec_default():
    env = _compose()["services"]["harvester"]["environment"]
    for setting in SETTINGS:
        if setting.env in ("HARVESTER_BACKOFF_BASE", "HARVESTER_LEASE_SECONDS"):
            continue  # tuning knobs of our own, not in SPEC: their built-in defaults apply
        assert setting.env in env, setting.env
        if setting.env == "DATABASE_URL":
            continue  # inside compose the database is the `db` service, not localhost
        expected = f"${{{setting.env}:-{setting.default or ''}}}"
        assert env[setting.env] == expected, setting.env


def test_import_osm_is_a_one_shot_service_under_a_profile(tmp_path):
    service = _compose()["services"]["import-osm"]
    assert service["profiles"] == ["import"] and service["restart"] == "no"
    assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "./input:/input:ro" in service["volumes"]
    shell, flag, script = service["command"]
    assert (shell, flag) == ("sh", "-c") and "exec harvester import-osm" in script
    build_parser().parse_args(["import-osm", "/input/france-latest.osm.pbf"])
    # The script as the container's shell runs it (compose turns $$ into $), on an ./input with 0, 2 and 1 extracts.
    script = script.replace("$$", "$").replace("/input/", f"{tmp_path}/").replace("exec harvester", "exec echo")
    run = lambda: subprocess.run(["sh", "-c", script], capture_output=True, text=True)  # noqa: E731
    result = run()
    assert result.returncode == 2 and "exactly one .osm.pbf" in result.stderr
    (tmp_path / "a.osm.pbf").write_bytes(b"x")
    (tmp_path / "b.osm.pbf").write_bytes(b"x")
    assert run().returncode == 2
    (tmp_path / "b.osm.pbf").unlink()
    result = run()
    assert result.returncode == 0 and result.stdout.split() == ["import-osm", str(tmp_path / "a.osm.pbf")]
