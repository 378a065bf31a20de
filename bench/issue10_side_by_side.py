"""Side by side: two asyncckpt trees, interleaved in one run, fresh processes each round.

Usage: python bench/issue10_side_by_side.py NEW_ROOT OLD_ROOT [--configs thread process lazy]
       [--workload big many] [--rounds 3]
(each ROOT a folder holding asyncckpt/). With no options: the thread writer on 256 MB of
float32, 3 rounds, as issue 10's comparison ran.

Per round, per configuration, per tree: one fresh process makes 6 saves to one path (the first,
which faults in the staging memory, reported apart) and reports each call's blocking time and
the time from call to durable (the call plus ``flush()``). Old and new alternate within each
round, so both see the same machine. Ratios new/old are of medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CODE = r'''
import sys, time, json, shutil, tempfile, torch
torch.set_num_threads(1)
from asyncckpt import AsyncCheckpointIO
writer, staging, workload = sys.argv[1:4]
if workload == "many":  # 20,000 tensors of 1 KB, as a checkpoint of many small tensors
    ckpt = {"t%d" % i: torch.randn(256) for i in range(20000)}
else:  # 256 MB in four tensors
    ckpt = {"w%d" % i: torch.randn(16 << 20) for i in range(4)}
folder = tempfile.mkdtemp()
io = AsyncCheckpointIO(max_pending=2, writer=writer, staging=staging)
blocking, durable = [], []
for i in range(6):
    io.flush()
    t = time.perf_counter()
    io.save_checkpoint(ckpt, folder + "/a.ckpt")
    blocking.append(time.perf_counter() - t)
    io.flush()
    durable.append(time.perf_counter() - t)
io.teardown()
shutil.rmtree(folder)  # each round leaves nothing behind (on tmpfs, that is memory)
print(json.dumps({"blocking": blocking, "durable": durable}))
'''

CONFIGS = {"thread": ("thread", "eager"), "process": ("process", "eager"), "lazy": ("thread", "lazy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new_root")
    parser.add_argument("old_root")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["thread"])
    parser.add_argument("--workload", nargs="+", choices=["big", "many"], default=["big"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = [(c, w) for w in args.workload for c in args.configs]
    res = {(c, w, tree): {"first": [], "blocking": [], "durable": []} for c, w in runs for tree in ("new", "old")}
    for _round in range(args.rounds):
        for config, workload in runs:
            for tree, root in (("new", args.new_root), ("old", args.old_root)):
                out = subprocess.run(
                    [sys.executable, "-c", CODE, *CONFIGS[config], workload],
                    env=dict(os.environ, PYTHONPATH=os.path.abspath(root)),
                    cwd=tempfile.gettempdir(),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times = json.loads(out.stdout.strip().splitlines()[-1])
                r = res[(config, workload, tree)]
                r["first"].append(times["blocking"][0])
                r["blocking"] += times["blocking"][1:]
                r["durable"] += times["durable"][1:]
    med = {key: {k: 1000 * statistics.median(v) for k, v in r.items()} for key, r in res.items()}
    print("| config | workload | first call ms new / old | warm call ms new / old | new/old | "
          "call to durable ms new / old | new/old |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for config, workload in runs:
        new, old = med[(config, workload, "new")], med[(config, workload, "old")]
        print(
            f"| {config} | {workload} | {new['first']:.1f} / {old['first']:.1f} "
            f"| {new['blocking']:.1f} / {old['blocking']:.1f} | {new['blocking'] / old['blocking']:.2f} "
            f"| {new['durable']:.1f} / {old['durable']:.1f} | {new['durable'] / old['durable']:.2f} |"
        )


if __name__ == "__main__":
    main()
