import importlib
import os

import pytest
import torch

# the suite is sized for a 2-core CI machine; more threads than cores only adds contention
torch.set_num_threads(min(2, os.cpu_count() or 1))


def reference(module: str):
    """Import a reference implementation a test compares against (transformers, trl, ...).

    Missing, the test is skipped with the reason, except under NANOALIGN_REQUIRE_REFERENCE=1 (set by .ci/run),
    where a missing reference fails the test: a comparison must never vanish silently from CI."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("NANOALIGN_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference implementation {module!r} is required (NANOALIGN_REQUIRE_REFERENCE=1): {e}")
        pytest.skip(f"reference implementation {module!r} not installed ({e})")
