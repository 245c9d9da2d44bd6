"""The command line every saldo script shares: bad usage is one line that names the mistake, exit 64.

argparse, left to itself, reports a misspelt flag by what comes after it: in
`client.py --adress 127.0.0.1:1 deposit alice 1`, `--adress` is set aside as unknown and its value
is taken for the command, so the error reads "invalid choice: '127.0.0.1:1'". `UsageParser` looks
at the command line again whenever argparse refuses it: when a flag there is one the script does
not know, that flag is the error ("unknown flag --adress (did you mean --address?)").

Bad usage exits EXIT_USAGE (64, BSD's EX_USAGE) from every script: argparse's own 2 would read, to
a script that runs client.py, as "outcome unknown".
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys

EXIT_USAGE = 64

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # an amount such as -5 is a value, not a flag


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings]


def _takes_the_rest(parser: argparse.ArgumentParser) -> bool:
    """Whether the parser hands everything after it to another program (client.py worker)."""
    return any(action.nargs == argparse.REMAINDER for action in parser._actions)


def unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first flag in `argv` that the parser (or the command it names) does not take, as the
    sentence to print: with the closest known flag when one is close, and where a flag goes when it
    belongs on the other side of the command; None when every flag is in its place."""
    current, outer = parser, []  # outer: (command name, the flags of the parsers around it)
    commands = _subcommands(current)
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
            if token in commands:  # from here on, the flags are the command's
                outer.append((token, _flags(current)))
                current = commands[token]
                if _takes_the_rest(current):
                    return None
                commands = _subcommands(current)
            continue
        flag = token.split("=", 1)[0]
        if _known(flag, _flags(current)):
            continue
        for command, flags in outer:
            if _known(flag, flags):
                return f"{flag} goes before the command {command}"
        later = [name for name, sub in commands.items() if _known(flag, _flags(sub))]
        if later:
            return f"{flag} goes after the command ({', '.join(dict.fromkeys(later))})"
        candidates = _flags(current) + [option for _command, flags in outer for option in flags]
        close = difflib.get_close_matches(flag, candidates, n=1, cutoff=0.6)
        if not close:
            return f"unknown flag {flag}"
        where = next((f", before {command}" for command, flags in outer if close[0] in flags
                      and close[0] not in _flags(current)), "")
        return f"unknown flag {flag} (did you mean {close[0]}{where}?)"
    return None


def _known(flag: str, flags: list[str]) -> bool:
    # argparse takes an unambiguous prefix of a long flag (--dur for --duration).
    return flag in flags or (flag.startswith("--") and any(option.startswith(flag) for option in flags))


class UsageParser(argparse.ArgumentParser):
    """argparse that names an unknown flag and exits EXIT_USAGE on bad usage (see the module
    docstring). Its subcommands' parsers are UsageParsers too (argparse builds them of its class)."""

    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.fail(unknown_flag(self, self._argv) or message)

    def fail(self, message: str):
        """Bad usage found before every flag is declared (a script's --mode picks its flags):
        `message` as it is, with no look for unknown flags."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
