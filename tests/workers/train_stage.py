"""Worker: run megastack's trainer in-process for each TrainConfig of a job file, one after another.

``python train_stage.py JOB.json`` on N ranks. JOB holds {"runs": [{"config": {...TrainConfig fields...},
"stop_at": int or null}, ...]}. Each run re-initialises megatron's parallel_state and builds its own
DeepSpeed engine inside the one process group, as the chained-run stage will. Rank 0 prints one
'RESULT {json}' line per run with the StageSummary.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    import torch

    from megastack.config import from_dict
    from megastack.dist import init_distributed
    from megastack.errors import UserError
    from megastack.train.config import TrainConfig
    from megastack.train.loop import train

    job = json.loads(Path(sys.argv[1]).read_text())
    init_distributed()
    for run in job["runs"]:
        config = from_dict(TrainConfig, run["config"], where="job")
        try:
            summary = train(config, verbose=run.get("verbose", False), stop_at=run.get("stop_at"))
        except UserError as exc:
            if torch.distributed.get_rank() == 0:
                print("RESULT " + json.dumps({"name": run.get("name"), "error": str(exc)}), flush=True)
            continue
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps({"name": run.get("name"), **asdict(summary)}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
