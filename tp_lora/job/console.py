"""How the commands (``tp-lora ...``, ``python -m tp_lora.run``) meet the terminal: options every command has
(``--log-level``, ``--debug``), logging setup, aligned tables, and how a command ends.

Exit status, one convention for every command:

* ``0``: done.
* ``2``: usage: the command was given something it cannot use, and nothing ran: a bad option or value
  (argparse), a bad run config or model preset, an illegal TP/EP layout, an unusable adapter
  (:data:`USAGE_ERRORS`).
* ``1``: runtime: the command started and failed (activation, I/O, verification, a peer rank that went
  away, a broken output pipe, or a bug).
* ``128 + N``: stopped by signal N (SIGTERM from torchrun when another rank failed, Ctrl-C: 130).

A failure prints ONE line on stderr (``[rank R] PROG: error: ...`` under torchrun); ``--debug`` (or
``TP_LORA_DEBUG=1``) adds the traceback. Under torchrun the same line goes to torchrun's error file, so
torchrun's failure summary shows it instead of "To enable traceback see ...".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Sequence

from ..errors import AdapterError, ConfigError, LayoutError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

#: Errors about what the user passed in (exit status 2); every other failure is a runtime failure (1).
USAGE_ERRORS: tuple[type[BaseException], ...] = (ConfigError, LayoutError, AdapterError)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    """argparse type of ``--log-level``: a level name, any case."""
    v = value.strip().upper()
    if v not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; choose from {', '.join(LOG_LEVELS)}"
                                         " (any case)")
    return v


def common_options() -> argparse.ArgumentParser:
    """A parent parser: the options every command takes (so they work before or after the positionals)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--log-level", type=log_level, default=os.environ.get("TP_LORA_LOG", "WARNING"),
                   metavar="LEVEL", help=f"library log level: {', '.join(LOG_LEVELS)} (default WARNING, or "
                                         "$TP_LORA_LOG)")
    g.add_argument("--debug", action="store_true", default=_env_flag("TP_LORA_DEBUG"),
                   help="print the traceback of a failure (default: one line; or TP_LORA_DEBUG=1)")
    return p


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def rank_prefix() -> str:
    """``'[rank 3] '`` under torchrun (RANK set), else ``''``."""
    return f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""


def setup_logging(level: str) -> None:
    """Rank-prefixed log lines on stderr (the library logs, never prints)."""
    logging.basicConfig(level=level, format=f"{rank_prefix()}%(asctime)s %(levelname)s %(name)s: %(message)s")


def exit_code(e: BaseException) -> int:
    """The exit status a failure ends the command with (see the module docstring)."""
    if isinstance(e, USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return EXIT_RUNTIME


def error_line(prog: str, e: BaseException) -> str:
    """One line: ``[rank R] PROG: error: message``. Our errors speak for themselves; others add their type."""
    from ..errors import TPLoRAError

    msg = " ".join(str(e).split())
    if not msg:
        msg = type(e).__name__  # e.g. KeyboardInterrupt
    elif not isinstance(e, (TPLoRAError, Terminated)):
        msg = f"{type(e).__name__}: {msg}"
    return f"{rank_prefix()}{prog}: error: {msg}"


class Terminated(BaseException):
    """SIGTERM turned into an exception, so ``finally`` blocks run (temp files removed, process group
    destroyed) when torchrun stops this rank because another one failed."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} (another rank failed, or the job was "
                         "cancelled)")
        self.signum = signum


def raise_terminated(signum: int, _frame: object) -> None:
    """The SIGTERM handler of every command: the signal becomes :class:`Terminated` in the main thread."""
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (then the previous handler is back). Signal
    handlers can only be set from the main thread: elsewhere (an engine calling us from a thread of its
    own) the block runs with the handler it had."""
    catch = hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if catch else None
    try:
        yield
    finally:
        if catch:
            signal.signal(signal.SIGTERM, previous)


def run_command(prog: str, fn: Callable[[], int], *, debug: bool) -> int:
    """Run ``fn`` and turn any failure into one line on stderr and an exit status (the module docstring)."""
    try:
        with sigterm_raises():
            return fn()
    except BrokenPipeError:
        # the reader went away (`tp-lora plan ... | head`): stop quietly; Python would complain at exit
        # when it flushes stdout again, so point stdout at /dev/null first.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_RUNTIME
    except (Exception, KeyboardInterrupt, Terminated) as e:  # noqa: BLE001 - the command's last word
        return report_failure(prog, e, debug=debug)


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``TP_LORA_DEBUG`` set: for a failure before argparse has run."""
    return "--debug" in argv or _env_flag("TP_LORA_DEBUG")


def report_failure(prog: str, e: BaseException, *, debug: bool) -> int:
    """Print the failure's one line (and the traceback if ``debug``); return the command's exit status."""
    _report(prog, e, debug)
    return 128 + e.signum if isinstance(e, Terminated) else exit_code(e)


def _report(prog: str, e: BaseException, debug: bool) -> None:
    line = error_line(prog, e)
    if debug:
        traceback.print_exc(file=sys.stderr)
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass
    _torchelastic_error_file(line, traceback.format_exc() if debug else line)


def _torchelastic_error_file(line: str, shown: str) -> None:
    """torchrun reads TORCHELASTIC_ERROR_FILE (its ErrorHandler's format) and shows ``shown`` as the root
    cause in its failure summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": shown,
                                                       "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  ",
                 left: int = 0, footer: Sequence[Sequence[str]] = ()) -> list[str]:
    """Aligned columns: the first ``left`` columns left-justified, the others right-justified, a rule under
    the header (and above ``footer`` rows, e.g. totals)."""
    allrows = [list(header), *map(list, rows), *map(list, footer)]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cells = [v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))]
        return (indent + "  ".join(cells)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(r) for r in rows)]
    if footer:
        out += [rule, *(line(r) for r in footer)]
    return out
