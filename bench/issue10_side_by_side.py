"""Side by side: blocking time of save_checkpoint, two asyncckpt trees, interleaved in one run.

Usage: python bench/issue10_side_by_side.py NEW_ROOT OLD_ROOT (each a folder holding asyncckpt/).
Each round runs one fresh process per tree (256 MB of float32, 6 saves, the first unmeasured).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

CODE = r'''
import sys, time, json, tempfile, torch
torch.set_num_threads(1)
from asyncckpt import AsyncCheckpointIO
ckpt = {"w%d" % i: torch.randn(16 << 20) for i in range(4)}  # 256 MB
folder = tempfile.mkdtemp()
io = AsyncCheckpointIO(max_pending=2)
times = []
for i in range(6):
    io.flush()
    t = time.perf_counter()
    io.save_checkpoint(ckpt, folder + "/a.ckpt")
    times.append(time.perf_counter() - t)
io.teardown()
print(json.dumps(times[1:]))
'''
res = {"new": [], "old": []}
for _round in range(3):
    for name, root in (("new", sys.argv[1]), ("old", sys.argv[2])):
        out = subprocess.run([sys.executable, "-c", CODE], env=dict(os.environ, PYTHONPATH=root),
                             cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
        res[name] += json.loads(out.stdout.strip().splitlines()[-1])
for k, v in res.items():
    print(k, "median ms %.1f" % (1000 * statistics.median(v)), "min ms %.1f" % (1000 * min(v)), len(v))
print("ratio new/old (median) %.2f" % (statistics.median(res["new"]) / statistics.median(res["old"])))
