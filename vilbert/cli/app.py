"""The `vilbert` typer app.

Each module in this package (other than `app` and `console`) is one command group and defines
`register(app)`, which adds its commands; `app` discovers them, so adding a command group is adding
a module. Commands parse options and call one library function; a `VilbertError` becomes one red
line on stderr and its exit code (2 for usage mistakes, 1 for data and runtime failures); `-v`
shows the traceback as well.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer
import typer.core

import vilbert
from vilbert.cli.console import print_error, setup_logging
from vilbert.errors import VilbertError

__all__ = ["app", "cli_command", "main"]

app = typer.Typer(
    name="vilbert",
    help="Pretrain ViLBERT on Conceptual Captions and fine-tune it on Hateful Memes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vilbert {vilbert.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["verbose"] = verbose
    setup_logging(verbose=verbose, quiet=quiet)


def _register_command_groups() -> None:
    package = importlib.import_module("vilbert.cli")
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name in ("app", "console") or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vilbert.cli.{module_info.name}")
        module.register(app)


_register_command_groups()


def cli_command() -> typer.core.TyperGroup:
    """The command tree behind `vilbert`, its help free of type noise: no `<bool>` after a flag, and
    arguments shown by their names (`SOURCES...`) rather than as `{sources}...`."""
    command = typer.main.get_command(app)
    _tidy_help(command)
    return command


def _tidy_help(command: typer.core.TyperCommand | typer.core.TyperGroup) -> None:
    help_option = command.get_help_option(typer.Context(command))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "option" and getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.get_usage_pieces = _usage_piece(param)
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _usage_piece(argument: typer.core.TyperArgument):
    name = argument.metavar.strip("[]") + ("..." if argument.nargs != 1 else "")
    piece = name if argument.required else f"[{name}]"
    return lambda ctx: [piece]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `vilbert` console script."""
    try:
        cli_command().main(args=argv, prog_name="vilbert", standalone_mode=True)
    except VilbertError as err:
        if _state["verbose"]:
            import traceback

            traceback.print_exc()
        print_error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
