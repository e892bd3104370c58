"""The help formatter of every ``dynamo-ext`` parser (and ``python -m dynamo_ext.workers``): argparse's
``ArgumentDefaultsHelpFormatter`` (each option's help ends with its default) without the noise of defaults
that say nothing (``None``, ``False`` of a flag, an empty list), nor after a help text that already speaks of
its default, and keeping the line breaks of the description."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        h = action.help or ""
        d = action.default
        if "%(default)" in h or "default" in h.lower() or d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, tuple, str))
                                                                                   and not d):
            return h
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{h} (default: %(default)s)"
        return h


__all__ = ["HelpFormatter"]
