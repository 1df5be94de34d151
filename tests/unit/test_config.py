"""Settings: defaults per SPEC, flags win over the environment, one clear error naming the variable."""

import pytest

from harvester.config import DEFAULT_USER_AGENT, load_settings, parse_zooms
from harvester.errors import ConfigError


def test_defaults_follow_the_spec():
    s = load_settings({})
    assert s.database_url == "postgresql://postgres@localhost:5432/tiles"
    assert (s.samples, s.zooms, s.seed, str(s.region)) == (1000, (17, 18), 0, "france")
    assert (s.tile_provider, s.ign_url) == ("ign", "https://data.geopf.fr/wmts")
    assert s.google_url == "https://tile.googleapis.com"
    assert s.overpass_url == "https://overpass-api.de/api/interpreter"
    assert (s.tile_rate, s.tile_concurrency, s.overpass_rate, s.overpass_concurrency) == (10, 8, 1, 1)
    assert (s.max_attempts, s.request_timeout) == (5, 60)
    assert s.user_agent == DEFAULT_USER_AGENT and "tilesmith/" in s.user_agent and "(+http" in s.user_agent
    assert s.points is None and s.population_raster is None and s.google_maps_api_key is None
    assert s.overpass_query_timeout < s.request_timeout


def test_flag_wins_over_environment():
    s = load_settings({"HARVESTER_ZOOMS": "16"}, {"--zooms": "18,17,19"})
    assert s.zooms == (17, 18, 19)


@pytest.mark.parametrize("env, name", [
    ({"HARVESTER_ZOOMS": "17,abc"}, "HARVESTER_ZOOMS"),
    ({"HARVESTER_ZOOMS": "17,,18"}, "HARVESTER_ZOOMS"),
    ({"HARVESTER_ZOOMS": "17,17"}, "HARVESTER_ZOOMS"),
    ({"HARVESTER_ZOOMS": "40"}, "HARVESTER_ZOOMS"),
    ({"HARVESTER_SAMPLES": "-1"}, "HARVESTER_SAMPLES"),
    ({"HARVESTER_SAMPLES": "1e3"}, "HARVESTER_SAMPLES"),
    ({"HARVESTER_TILE_RATE": "0"}, "HARVESTER_TILE_RATE"),
    ({"HARVESTER_TILE_RATE": "nan"}, "HARVESTER_TILE_RATE"),
    ({"HARVESTER_OVERPASS_RATE": "fast"}, "HARVESTER_OVERPASS_RATE"),
    ({"HARVESTER_TILE_CONCURRENCY": "0"}, "HARVESTER_TILE_CONCURRENCY"),
    ({"HARVESTER_TILE_PROVIDER": "bing"}, "HARVESTER_TILE_PROVIDER"),
    ({"HARVESTER_IGN_URL": "ftp://x"}, "HARVESTER_IGN_URL"),
    ({"HARVESTER_OVERPASS_URL": "not a url"}, "HARVESTER_OVERPASS_URL"),
    ({"HARVESTER_OVERPASS_URL": "http://host:99999/x"}, "HARVESTER_OVERPASS_URL"),
    ({"HARVESTER_TILE_PROVIDER": "xyz"}, "HARVESTER_TILE_URL"),
    ({"HARVESTER_TILE_PROVIDER": "xyz", "HARVESTER_TILE_URL": "http://h/{z}/{x}.png"}, "HARVESTER_TILE_URL"),
    ({"HARVESTER_TILE_PROVIDER": "google"}, "GOOGLE_MAPS_API_KEY"),
    ({"HARVESTER_REQUEST_TIMEOUT": "1"}, "HARVESTER_REQUEST_TIMEOUT"),
    ({"HARVESTER_MAX_ATTEMPTS": "0"}, "HARVESTER_MAX_ATTEMPTS"),
    ({"HARVESTER_POINTS": "/nonexistent.csv"}, "HARVESTER_POINTS"),
    ({"HARVESTER_REGION": "mars"}, "HARVESTER_REGION"),
    ({"HARVESTER_USER_AGENT": " "}, "HARVESTER_USER_AGENT"),
])
def test_malformed_values_name_the_variable(env, name):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert str(err.value).startswith(name + ":")


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--zooms:"):
        load_settings({}, {"--zooms": "x"})


def test_empty_optional_variables_mean_unset():
    s = load_settings({"HARVESTER_POINTS": "", "GOOGLE_MAPS_API_KEY": "", "HARVESTER_TILE_URL": ""})
    assert s.points is None and s.google_maps_api_key is None and s.tile_url is None


def test_key_is_kept_out_of_repr_and_public_values(tmp_path):
    key = "AIzaCANARY-123456789"
    s = load_settings({"HARVESTER_TILE_PROVIDER": "google", "GOOGLE_MAPS_API_KEY": key,
                       "DATABASE_URL": "postgresql://u:hunter2@db/tiles"})
    assert key not in repr(s) and key not in str(s.public())
    assert "hunter2" not in str(s.public())
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    s = load_settings({"HARVESTER_TILE_PROVIDER": "google"}, {"--google-api-key-file": str(key_file)})
    assert s.google_maps_api_key == key


def test_parse_zooms_sorts():
    assert parse_zooms(" 19, 17 ,18") == (17, 18, 19)
