"""Fault injection for the kill-during-write test: run a module (``python -m``) with its N-th ``torch.save``
stopped half-way through the file.

    python tests/stall_save.py N MARKER monai.bundle run pretrain --config_file ...

The N-th save writes the first half of its bytes to the real target, writes the target's name to MARKER
and sleeps, so that the test can SIGKILL the process while a checkpoint is being written.
"""

import io
import runpy
import sys
import time
from pathlib import Path

import torch

stall_at, marker, module = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.argv = [module] + sys.argv[4:]
real_save = torch.save
calls = 0


def stalling_save(obj, f, *args, **kwargs):
    global calls
    calls += 1
    if calls != stall_at:
        return real_save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    real_save(obj, data, *args, **kwargs)
    with open(f, "wb") if isinstance(f, (str, Path)) else f as out:  # a path or an open file
        out.write(data.getvalue()[: len(data.getvalue()) // 2])
        out.flush()
        marker.write_text(str(getattr(out, "name", f)))
        time.sleep(600)


torch.save = stalling_save
runpy.run_module(module, run_name="__main__", alter_sys=True)
