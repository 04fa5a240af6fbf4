"""The ``dprp`` command line: inspect, compress, export, eval, report and demo.

``dprp_surgery.cli.app`` holds the typer app (it only wires commands and options; nothing heavy is
imported until a command runs); ``dprp_surgery.cli.commands`` implements the commands.
"""

from .app import app, main

__all__ = ["app", "main"]
