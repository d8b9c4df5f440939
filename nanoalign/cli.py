"""Command lines from config dataclasses: every field becomes `--name=value` (bools: `--flag` or `--flag=0`).

The comment after each field in a script's Config is the documentation; `--help` lists the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source -> {name: comment}."""
    source = inspect.getsource(cls)
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M)}


def parse_config(cls, argv=None, description: str | None = None):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default
        kind = type(default)
        # argparse formats help with %; a help text makes the formatter append the default
        doc = comments.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        if kind is bool:
            ap.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default, help=doc)
        elif default is None:
            ap.add_argument(f"--{f.name}", type=str, default=None, help=doc)
        else:
            ap.add_argument(f"--{f.name}", type=kind, default=default, help=doc)
    return cls(**vars(ap.parse_args(argv)))
