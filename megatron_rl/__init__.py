"""megatron-rl: RL post-training (GRPO/DAPO/GDPO) for Mixture-of-Experts LMs on Megatron-Core."""

import os as _os

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning, so a run
# beside other work slows in proportion to the cores it loses (spinning threads burn the time
# slices a busy neighbour leaves; `benchmarks/threads.py`). A value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
