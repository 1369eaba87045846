#!/usr/bin/env python
"""Convert a checkpoint between Hugging Face, torch_dist and legacy Megatron (same as `megastack convert`).

    python tools/convert_checkpoint.py SRC DST --to {hf,torch_dist,legacy} [--tp N --pp M] [--dtype D]

A thin entry over megastack.ckpt.convert; runs as one process or under torchrun/srun/mpirun.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megastack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
