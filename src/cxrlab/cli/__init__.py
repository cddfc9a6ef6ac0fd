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
    help="Chest X-ray classification from a folder of images to a trained, evaluated, explained, served model. "
    "Add --debug (or set CXRLAB_DEBUG=1) to see the full traceback of an unexpected error.",
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
    from cxrlab.cli import data, evaluate, explain, mine, review, serve, sources, sweep, train

    for mod in (data, train, evaluate, explain, sweep, serve, sources, review, mine):
        mod.register(app)
    _registered = True


DEBUG_FLAG = "--debug"
DEBUG_ENV = "CXRLAB_DEBUG"


def _take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` (accepted anywhere before ``--``) from ``argv``; True when it was there."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if a != DEBUG_FLAG]
    return head + argv[cut:], len(head) != cut


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error(message: str) -> None:
    """``error: <message>`` on stderr as one line (no markup read from the message, no wrapping)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _unexpected(e: BaseException, debug: bool) -> int:
    """An error no stage turned into a ``CxrlabError``: one line (the full traceback only when debugging)."""
    import traceback

    if debug:
        traceback.print_exception(e, file=sys.stderr)
    import cxrlab

    # the innermost frame of cxrlab's own code: where to look (and what to quote in a report). The package's own
    # folder, not any path with "cxrlab" in it (a checkout named cxrlab holds tests and benchmarks too).
    package = os.path.dirname(os.path.abspath(cxrlab.__file__)) + os.sep
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if os.path.abspath(frame.filename).startswith(package):
            where = f" (in {os.path.basename(frame.filename)}:{frame.lineno}, {frame.name})"
            break
    hint = "" if debug else f"; rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the full traceback"
    _error(f"unexpected {type(e).__name__}: {_one_line(str(e)) or '(no message)'}{where}{hint}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Known errors print one clear message and exit 2; an unexpected error prints one
    line (the traceback too with ``--debug`` or ``CXRLAB_DEBUG=1``) and exits 1."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # torchmetrics imports matplotlib, which writes a font cache under ~/.cache and ~/.config: keep it in tmp so
    # a run writes nothing outside its run directory and the temp dir.
    import getpass
    import tempfile

    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), f"cxrlab-matplotlib-{getpass.getuser()}"))
    argv, debug = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    _register_all()
    import click
    import typer.exceptions

    try:  # typer >= 0.2x raises its vendored click's exceptions, which are not click's classes
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = click.exceptions
    click_errors = tuple({click.exceptions.ClickException, getattr(vendored, "ClickException", click.ClickException)})
    aborts = tuple({click.exceptions.Abort, getattr(vendored, "Abort", click.exceptions.Abort), typer.exceptions.Abort})
    try:
        # without standalone mode click returns typer.Exit(code)'s code instead of raising SystemExit
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool) and rc:
            return rc
    except CxrlabError as e:
        if debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        _error(str(e))
        return 2
    except FileNotFoundError as e:
        _error(f"file not found: {e.filename or e}")
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except SystemExit as e:  # typer/click exits (--help, usage errors) pass through with their code
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except click_errors as e:  # usage errors
        e.show()
        return e.exit_code
    except aborts:
        err_console.print("[yellow]aborted[/]")
        return 1
    except OSError as e:  # permissions, a full disk, a directory where a file was expected ...
        if debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        if e.filename is not None:
            where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
            _error(f"{e.strerror or type(e).__name__}: {where}")
        else:
            _error(f"{type(e).__name__}: {_one_line(str(e))}")
        return 2
    except Exception as e:
        return _unexpected(e, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())
