"""Command lines from config dataclasses: every field becomes `--name=value` (bools: `--flag` or `--flag=0`).

The comment after each field in a script's Config is the documentation; `--help` lists the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
from pathlib import Path


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def finite_float(s: str) -> float:
    """argparse type for a float flag: nan and inf are refused (no flag of nanoalign means anything by them, and an
    inf learning rate would train a NaN model to the end and save it)."""
    value = float(s)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return value


SEED_MAX = 2**32 - 1  # numpy's range; the per-epoch seeds derived from it (seed * 100_003 + epoch ...) stay int64


def seed_int(s: str) -> int:
    """argparse type for --seed: an integer in [0, 2**32 - 1] (a larger one overflows torch's int64 seeds)."""
    value = int(s)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {SEED_MAX}], got {s!r}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type, a bad choice) raise InputError, which
    run() prints as one line naming the flag, instead of printing the whole usage. A flag must be spelt whole:
    argparse's default takes any unambiguous prefix (`--temp=0.7` for `--temperature`), which a later flag
    starting the same way would silently change the meaning of."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(message)


def field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source -> {name: comment}."""
    source = inspect.getsource(cls)
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M)}


def parse_config(cls, argv=None, description: str | None = None):
    ap = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
        elif f.name == "seed":
            ap.add_argument(f"--{f.name}", type=seed_int, default=default, help=doc)
        else:
            ap.add_argument(f"--{f.name}", type=finite_float if kind is float else kind, default=default, help=doc)
    return cls(**vars(ap.parse_args(argv)))


def json_reason(e) -> str:
    """A json.JSONDecodeError's message for a one-line error: some of json's end in "at", meant to be followed by
    the position, which our messages give their own way ("Invalid control character at" -> "... character")."""
    return e.msg.removesuffix(" at")


class InputError(ValueError):
    """A problem with what the user gave (a flag, a file, a checkpoint), reported as one line naming it."""


def check_choice(cfg, name: str, allowed) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise InputError(f"--{name}={value}: choose one of {', '.join(map(str, allowed))}")


def check_finite(cfg, name: str) -> None:
    """A number flag set in code (a Config built by hand) is NaN or inf: the command line refuses those already."""
    value = getattr(cfg, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"--{name}={value}: must be a finite number")


def check_range(cfg, name: str, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """value within [low, high] ('(' / ')' when open); the error names the flag and the allowed range."""
    check_finite(cfg, name)
    value = getattr(cfg, name)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise InputError(f"--{name}={value}: must be in {interval}")


def check_learning_rates(cfg, *names: str) -> None:
    """Learning rates in (0, 1]: AdamW moves each weight by about the learning rate a step, so a larger one is a
    typo (1e-5 written 1e5); it would train to garbage, or past float32's range, and still save a checkpoint."""
    for name in names:
        check_range(cfg, name, 0.0, 1.0, low_open=True)


def check_device(cfg) -> None:
    """--device: cpu, or cuda (cuda:N, N one of this machine's GPUs)."""
    import torch  # here, so that parsing flags does not need torch

    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda"
                                                                and not torch.cuda.is_available()):
        raise InputError(f"--device={cfg.device}: choose cpu, or cuda on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device={cfg.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_output(path, flag: str, directory: bool) -> None:
    """An output path flag, checked before any work: a file where a directory is written (the path or one of its
    parents), or a directory where a file is written, would otherwise fail only at the save, after the work."""
    if not str(path).strip():  # Path("") is ".": the run would be written into the working directory
        raise InputError(f"--{flag}=: an empty path; give the {'directory' if directory else 'file'} to write")
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        raise InputError(f"--{flag}={path}: is a {'file' if directory else 'directory'}; a "
                         f"{'directory' if directory else 'file'} is written there")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"--{flag}={path}: {parent} is a file, not a directory")


def check_positive(cfg, *names: str) -> None:
    for name in names:
        check_finite(cfg, name)
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name}={getattr(cfg, name)}: must be positive")


def check_non_negative(cfg, *names: str) -> None:
    for name in names:
        check_finite(cfg, name)
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name}={getattr(cfg, name)}: must be >= 0")


def run(main, argv=None) -> None:
    """Entry point of a script: a bad input (a flag, a data file, a checkpoint: ValueError, KeyError, or an
    OSError such as a missing file or a directory where a file belongs, all of which name the culprit) or a
    stopped run (FloatingPointError) prints one line and exits non-zero, without a traceback.
    NANOALIGN_DEBUG=1 shows the traceback.

    Whatever main leaves in reference cycles is collected before the process exits. Under torchrun that matters:
    FSDP2's modules, their sharded parameters and the device meshes they hold sit in reference cycles, which Python
    otherwise frees only while the interpreter shuts down, and there gloo now and then aborted a run that had
    finished (SIGABRT, "terminate called without an active exception", after the script's last line). Measured
    with a small two-rank CPU script (shard a model, train three steps, dist.close): 14 of 480 runs aborted at
    exit without this collection, 0 of 250 with it."""
    import gc
    import os
    import sys

    code = 0
    try:
        main(argv if argv is not None else sys.argv[1:])
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        if os.environ.get("NANOALIGN_DEBUG") == "1":
            raise
        # a string, not the exception: its traceback would keep main's frames alive through the collection below
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # KeyError's str() adds quotes
        print(f"error: {message}", file=sys.stderr, flush=True)
        code = 1 if isinstance(e, FloatingPointError) else 2
    gc.collect()  # here, main's frames (and the exception's traceback) are gone: their cycles can be collected
    if code:
        sys.exit(code)
