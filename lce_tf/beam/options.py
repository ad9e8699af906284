"""Beam flags of the runners lce-tf runs its Beam jobs on, and the dask scheduler address check.

Pure Python (imports neither Beam nor dask), so that validating a configuration
(`pipeline.config.PipelineConfig`) or parsing `lce-tf centers` flags stays cheap. The runners:

- "direct": the local DirectRunner's engine (the FnApiRunner) with worker processes
  (`direct_beam_args`);
- "dask": a dask.distributed scheduler, through `lce_tf.beam.dask_runner.DaskRunner`, named by its
  import path because Beam's DaskRunner has no registered short name (`dask_beam_args`;
  docs/scale-out.md, "Beam on Dask").
"""

from __future__ import annotations

import re
from typing import Any

# Where a Beam job runs: "direct" (locally, the DirectRunner) or "dask" (a dask.distributed scheduler).
BEAM_RUNNERS = ("direct", "dask")
# The --runner of "dask": the import path of lce_tf.beam.dask_runner.DaskRunner (= dask_runner.RUNNER,
# checked in tests/test_beam_dask.py; this module does not import it, which would import Beam).
DASK_RUNNER = "lce_tf.beam.dask_runner.DaskRunner"
_DASK_ADDRESS_RE = re.compile(r"(?:tcp|tls)://(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def check_dask_address(address: Any, field: str = "beam_dask_address") -> str:
    """A dask scheduler address tcp://HOST:PORT or tls://HOST:PORT (1 <= PORT <= 65535).

    Args:
      address: the address to check.
      field: the setting or flag it came from, named in the error (e.g. "--dask-address").

    Returns:
      The address, unchanged.

    Raises:
      ValueError: one line naming `field`, when the address is not of that form.
    """
    match = _DASK_ADDRESS_RE.fullmatch(address) if isinstance(address, str) else None
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{field}: {address!r} must be a dask scheduler address tcp://HOST:PORT (or tls://HOST:PORT)")
    return address


def direct_beam_args(workers: int) -> list[str]:
    """Beam flags of the local DirectRunner's engine (the FnApiRunner) with `workers` worker processes; one
    worker runs in the calling process (`in_memory`: no process to start, TensorFlow already imported)."""
    if int(workers) == 1:
        return ["--runner=FnApiRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={int(workers)}"]


def dask_beam_args(address: str) -> list[str]:
    """Beam flags that run a pipeline on the dask scheduler at `address` (lce_tf.beam.dask_runner).

    Raises:
      ValueError: `address` is not a scheduler address (`check_dask_address`).
    """
    return [f"--runner={DASK_RUNNER}", f"--dask_client_address={check_dask_address(address)}"]
