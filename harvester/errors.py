"""The harvester's exceptions: one base, specific subclasses, messages that say how to fix the cause."""


class HarvesterError(Exception):
    """Base of every error the harvester raises on purpose."""


class ConfigError(HarvesterError):
    """A setting is missing, unknown or malformed. The message names the variable."""


class InputFileError(ConfigError):
    """An input file (an OSM extract) is missing, unreadable or not of its format: one line, exit status 2."""


class UpstreamError(HarvesterError):
    """An upstream request failed (network, HTTP status, bad body). Counted as one failed attempt.

    ``retry_after`` is the delay the upstream asked for (seconds), when it said one.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TileUnavailable(HarvesterError):
    """The provider has no usable imagery here (404, blank or uniform tile): the job is skipped, not retried."""


class BadTile(UpstreamError):
    """The provider answered, but the body is not a valid tile image (corrupt, wrong type, wrong size)."""


class OverpassError(UpstreamError):
    """Overpass answered with an error, a runtime-error remark, or JSON we cannot use."""
