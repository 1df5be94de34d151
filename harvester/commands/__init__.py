"""One module per ``harvester`` command. Each has ``HELP``, ``add_arguments(parser)`` and ``async main(args,
settings) -> int`` (the exit status); :mod:`harvester.cli` builds the parser and dispatches over them."""

from . import export, import_osm, migrate, preview, rebuild_instances, run, status

#: Command name -> module, in the order ``--help`` lists them.
COMMANDS = {"migrate": migrate, "run": run, "status": status, "export": export, "import-osm": import_osm,
            "preview": preview, "rebuild-instances": rebuild_instances}
