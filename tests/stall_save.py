"""Fault injection for the kill tests: run a module (``python -m``) with its N-th ``torch.save`` stopped.

    python tests/stall_save.py N MARKER monai.bundle run pretrain --config_file ...
    python tests/stall_save.py N:before MARKER monai.bundle run ...

The N-th save writes the first half of its bytes to the real target (``N:before``: nothing), writes the
target's name to MARKER and sleeps, so that the test can SIGKILL the process at a known point however fast
the machine trains: mid-write, or between two complete checkpoints.
"""

import io
import runpy
import sys
import time
from pathlib import Path

import torch

stall_spec, marker, module = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
stall_at, before = int(stall_spec.split(":")[0]), stall_spec.endswith(":before")
sys.argv = [module] + sys.argv[4:]
real_save = torch.save
calls = 0


def stalling_save(obj, f, *args, **kwargs):
    global calls
    calls += 1
    if calls != stall_at:
        return real_save(obj, f, *args, **kwargs)
    if before:
        marker.write_text(str(f))
        time.sleep(600)
    data = io.BytesIO()
    real_save(obj, data, *args, **kwargs)
    with open(f, "wb") if isinstance(f, (str, Path)) else f as out:  # a path or an open file
        out.write(data.getvalue()[: len(data.getvalue()) // 2])
        out.flush()
        marker.write_text(str(getattr(out, "name", f)))
        time.sleep(600)


torch.save = stalling_save
runpy.run_module(module, run_name="__main__", alter_sys=True)
