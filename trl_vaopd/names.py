"""Suggestions for mistyped names (methods, counterfactual views, tiny model families)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`" Did you mean 'va_opd'?"` for the closest of `choices` to a mistyped `name`, or `""` when none is close."""
    if not isinstance(name, str):
        return ""
    # Case and the -/_ spelling of the command line are the commonest slips: compare without them first
    matches = difflib.get_close_matches(name.lower().replace("-", "_"), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""
