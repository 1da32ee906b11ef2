"""Output and errors shared by the fault scripts: one line per action, or one JSON document.

Every script prints what it did as it does it (one line per action, to stdout), so a user
sees a half-applied fault if something fails midway. With ``--json`` nothing is printed
until the end, then a single JSON object: ``{"ok": true, "actions": [...], ...}`` or
``{"ok": false, "error": "...", "actions": [...]}`` - the actions done before the failure.

Exit codes (the same for every script):

* 0 - done;
* 1 - the operation failed (the message says why; the system may be half changed, and the
  actions printed say how far it got);
* 2 - bad usage or not supported (nothing was changed).

Not thread-safe; one Reporter per process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class ScriptError(Exception):
    """A failure to report to the user: message plus exit code (1 failed, 2 usage)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class UsageError(ScriptError):
    """Bad arguments or an unsupported request; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class Reporter:
    """Collects actions; prints each at once in text mode, everything at the end with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.actions: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def action(self, line: str, **fields: Any) -> None:
        """Record one action; `line` is the human-readable sentence, `fields` the JSON."""
        self.actions.append({"action": fields.pop("action", line.split()[0]), **fields})
        if not self.as_json:
            print(line, flush=True)

    def note(self, line: str) -> None:
        """A remark that is not an action (a warning, a hint): stderr in both modes."""
        print(f"note: {line}", file=sys.stderr, flush=True)

    def result(self, **fields: Any) -> None:
        """Top-level fields of the final JSON document (ignored in text mode)."""
        self.summary.update(fields)

    def finish(self, error: ScriptError | None) -> int:
        if self.as_json:
            doc: dict[str, Any] = {"ok": error is None, **self.summary, "actions": self.actions}
            if error is not None:
                doc["error"] = str(error)
            print(json.dumps(doc, indent=1, default=str), flush=True)
        return EXIT_OK if error is None else error.code


def run_main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    dispatch: Callable[[argparse.Namespace, Reporter], None],
) -> int:
    """Parse, run `dispatch`, report; returns the exit code. Errors never escape as tracebacks."""
    args = parser.parse_args(argv)
    out = Reporter(bool(getattr(args, "json", False)))
    error: ScriptError | None = None
    try:
        dispatch(args, out)
    except ScriptError as exc:
        error = exc
    except KeyboardInterrupt:
        error = ScriptError("interrupted")
    if error is not None:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return out.finish(error)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document at the end instead of lines"
    )


Command = Callable[[argparse.Namespace, "Reporter"], None]


def dispatcher(commands: dict[str, Command]) -> Command:
    """Run `args.command` from `commands`, reporting an OSError as a ScriptError."""

    def dispatch(args: argparse.Namespace, out: Reporter) -> None:
        try:
            commands[args.command](args, out)
        except OSError as exc:
            raise ScriptError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None

    return dispatch
