"""Cold one-image query, whole process: imgsim's one-image script against `imgindex query` on torch,
on ONNX Runtime with the exported network cached, and on ONNX Runtime's first run (which exports
it). Each is a fresh process, timed from outside, the median of --runs after one warm-up run (the
warm-up puts the files in the page cache; "first run" clears only imgindex's network cache).

    python benchmarks/startup.py [--runs 5]

Prints the CPU's vector extensions with the table; ratios are against imgsim's time in this run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "data" / "pizza" / "image_0001.jpg"

# imgsim's README example, for one image: load the model, embed, print the vector's length.
IMGSIM = """
import sys, cv2, imgsim
vtr = imgsim.Vectorizer(device="cpu")
print(len(vtr.vectorize(cv2.imread(sys.argv[1]))))
"""


def cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def timed(command: list[str], env: dict[str, str], before=None) -> float:
    if before is not None:
        before()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-imgsim", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="imgindex-startup-"))
    cache = scratch / "cache"
    env = {**os.environ, "IMGINDEX_CACHE": str(cache)}
    index = scratch / "index"
    imgindex = [sys.executable, "-m", "imgindex"]
    subprocess.run(
        [*imgindex, "build", str(ROOT / "data"), "--index", str(index), "--runtime", "torch"],
        env=env, check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    query = [*imgindex, "query", str(IMAGE), "--index", str(index), "-k", "5"]
    rows = []
    if not args.skip_imgsim:
        rows.append(("imgsim 0.1.2, one-image script", [sys.executable, "-c", IMGSIM, str(IMAGE)],
                     None))  # fmt: skip
    rows += [
        ("imgindex query, torch", [*query, "--runtime", "torch"], None),
        ("imgindex query, onnx (network cached)", [*query, "--runtime", "onnx"], None),
        ("imgindex query, onnx first run (exports)", [*query, "--runtime", "onnx"],
         lambda: shutil.rmtree(cache, ignore_errors=True)),
        ("imgindex query -h", [*imgindex, "query", "-h"], None),
        ("imgindex info", [*imgindex, "info", "--index", str(index)], None),
    ]  # fmt: skip
    medians = {}
    for name, command, before in rows:
        timed(command, env, before)  # warm-up
        times = [timed(command, env, before) for _ in range(args.runs)]
        medians[name] = (statistics.median(times), min(times), max(times))
        print(f"  {name}: {medians[name][0]:.2f} s", file=sys.stderr)
    base = medians.get("imgsim 0.1.2, one-image script", (None,))[0]
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}; median of {args.runs} after a warm-up")
    print(f"{'command (whole process)':<46}{'median s':>10}{'min-max s':>14}{'vs imgsim':>11}")
    for name, (median, low, high) in medians.items():
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"{name:<46}{median:>10.2f}{f'{low:.2f}-{high:.2f}':>14}{ratio:>11}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
