"""Command lines from config dataclasses: every field becomes `--name=value` (bools: `--flag` or `--flag=0`).

The comment after each field in a script's Config is the documentation; `--help` lists the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def parse_config(cls, argv=None, description: str | None = None):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default
        kind = type(default)
        if kind is bool:
            ap.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default)
        elif default is None:
            ap.add_argument(f"--{f.name}", type=str, default=None)
        else:
            ap.add_argument(f"--{f.name}", type=kind, default=default)
    return cls(**vars(ap.parse_args(argv)))
