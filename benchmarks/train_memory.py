"""What a training step costs on a CPU: peak memory and time of steps of several sizes, against
the estimate `imgindex train` uses to choose its CPU defaults and refuse steps that do not fit
(imgindex.train.step_memory).

Each size runs in a fresh process (peak resident memory is per process): two steps of random
views through the real network, from scratch, with AdamW, as `imgindex train` runs them.

    python benchmarks/train_memory.py [--arch resnet50] [--sizes 16x4x96,8x4x160,8x4x224]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from imgindex.ann import available_memory
from imgindex.train import CPU_STEP, step_memory

PROBE = """
import json, resource, sys, time
import torch
from imgindex.weights import build_network
from imgindex.objective import train_step
from imgindex.train import TrainOptions, _training_mode

arch, images, views, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = TrainOptions(arch=arch, init="scratch", images_per_step=images,
                       views_per_image=views, crop_size=crop, freeze_bn=True)
network = build_network(arch)
_training_mode(network, True)
optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
generator = torch.Generator().manual_seed(0)
batch = torch.randint(0, 255, (images * views, 3, crop, crop), dtype=torch.uint8)
seconds = []
for _ in range(2):
    started = time.perf_counter()
    float(train_step(network, optimizer, batch, images, options, generator, False).detach())
    seconds.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "seconds": seconds[-1]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    default = f"{CPU_STEP['images_per_step']}x{CPU_STEP['views_per_image']}x"
    default += f"{CPU_STEP['crop_size']},8x4x96,8x4x160,8x4x224"
    parser.add_argument("--sizes", default=default, help="IMAGESxVIEWSxCROP,...")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"available memory {available_memory() / 1e9:.1f} GB; arch {args.arch}")  # fmt: skip
    print(f"{'step':<14}{'views':>7}{'measured GB':>13}{'estimate GB':>13}{'ratio':>7}"
          f"{'s/step':>8}{'views/s':>9}")  # fmt: skip
    for size in args.sizes.split(","):
        images, views, crop = (int(part) for part in size.split("x"))
        done = subprocess.run(
            [sys.executable, "-c", PROBE, args.arch, str(images), str(views), str(crop)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        estimate = step_memory(args.arch, images, views, crop)
        n = images * views
        print(
            f"{size:<14}{n:>7}{result['peak'] / 1e9:>13.2f}{estimate / 1e9:>13.2f}"
            f"{estimate / result['peak']:>7.2f}{result['seconds']:>8.1f}"
            f"{n / result['seconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
