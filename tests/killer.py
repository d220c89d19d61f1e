"""`dlrun`, with a power cut in the middle of its Nth checkpoint write (tests only).

Run as `python tests/killer.py <dlrun args>` with DLRUN_KILL_AT_SAVE=N: the Nth `torch.save`
writes half of its bytes, flushes them to disk and the process SIGKILLs itself, as the kernel's
OOM killer or a preempting scheduler would. Nothing in dlrun itself knows about this.
"""

import io
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
KILL_AT = int(os.environ.get("DLRUN_KILL_AT_SAVE", "0"))
_real_save = torch.save
_count = 0


def _torn_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
    global _count
    _count += 1
    if _count != KILL_AT:
        _real_save(obj, f, *args, **kwargs)
        return
    buffer = io.BytesIO()
    _real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if hasattr(f, "write"):
        f.write(data)
        f.flush()
    else:
        Path(f).write_bytes(data)
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = _torn_save

if __name__ == "__main__":
    from dlrun.cli import main

    sys.argv = ["dlrun", *sys.argv[1:]]
    main()
