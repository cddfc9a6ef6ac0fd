"""The `cxrlab` command line. Thin: parse, load config, call one stage function, print its result.

Each command group lives in its own module with a ``register(app)`` function.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from cxrlab.errors import CxrlabError

app = typer.Typer(
    name="cxrlab",
    help="Chest X-ray classification from a folder of images to a trained, evaluated, explained, served model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


_registered = False


def _register_all() -> None:
    """Add every command group once (main() may be called many times in one process, e.g. by tests)."""
    global _registered
    if _registered:
        return
    from cxrlab.cli import data, evaluate, explain, serve, sources, sweep, train

    for mod in (data, train, evaluate, explain, sweep, serve, sources):
        mod.register(app)
    _registered = True


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Known errors print one clear message and exit 2."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # torchmetrics imports matplotlib, which writes a font cache under ~/.cache and ~/.config: keep it in tmp so
    # a run writes nothing outside its run directory and the temp dir.
    import getpass
    import tempfile

    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), f"cxrlab-matplotlib-{getpass.getuser()}"))
    _register_all()
    try:
        # without standalone mode click returns typer.Exit(code)'s code instead of raising SystemExit
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool) and rc:
            return rc
    except CxrlabError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        return 2
    except FileNotFoundError as e:
        err_console.print(f"[bold red]error:[/] file not found: {e.filename or e}")
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except SystemExit as e:  # typer/click exits (--help, usage errors) pass through with their code
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # click usage errors
        import click

        try:  # typer >= 0.2x raises its vendored click's exceptions, which are not click's classes
            from typer._click import exceptions as vendored
        except ImportError:
            vendored = click.exceptions
        if isinstance(e, (click.exceptions.ClickException, vendored.ClickException)):
            e.show()
            return e.exit_code
        if isinstance(e, (click.exceptions.Abort, vendored.Abort)):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())
