"""Worker: re-initialising megatron's parallel_state (as every training stage does) releases the previous
layout's process groups: the process's gloo threads do not grow with the number of re-initialisations.
Prints 'RESULT {"rank", "threads": [count after each init]}'."""

import json
import sys
import threading


def main() -> None:
    import torch

    from megastack.dist import init_distributed, init_model_parallel, release_model_parallel

    init_distributed()
    counts = []
    for tp, pp in [(1, 1), (2, 1), (1, 2), (1, 1), (2, 1), (1, 1)]:
        init_model_parallel(tp, pp)
        torch.distributed.barrier()
        counts.append(threading.active_count() + len(_native_threads()))
    release_model_parallel()
    print("RESULT " + json.dumps({"rank": torch.distributed.get_rank(), "threads": counts}), flush=True)
    torch.distributed.destroy_process_group()


def _native_threads() -> list[str]:
    """Threads the C++ side started (gloo's), by name, from /proc (Linux)."""
    from pathlib import Path

    tasks = Path("/proc/self/task")
    return [p.joinpath("comm").read_text().strip() for p in tasks.iterdir()] if tasks.is_dir() else []


if __name__ == "__main__":
    main()
    sys.exit(0)
