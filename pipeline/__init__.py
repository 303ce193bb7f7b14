"""gradbench: see, measure and fix vanishing and exploding gradients in deep MLPs and recurrent
nets on MNIST."""

import os

# CPU threads (libgomp, torch's OpenMP) spin up to 300,000 iterations waiting for the next parallel
# region before they sleep. On a CPU that other processes share, the spinning threads take the
# cores from the thread that has work, and a step of many small kernels slows several times
# (recurrent.yaml at 60 steps beside a 2-thread matmul: 279 and 283 s at libgomp's default, 50 s
# at 20,000). Idle, the quick grid took 101 s at 20,000 against 95 and 99 s (noise). Measured in
# docs/performance.md. Set here, before torch loads, unless the user set it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

__version__ = "0.1.0"
