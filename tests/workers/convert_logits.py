"""Worker: converted checkpoints run in megatron-core under TP2PP2 (4 ranks), logits printed for the test.

argv[1] is a JSON file: {"tokens": [[...]], "cases": [{"label": ..., "torch_dist": DIR, "legacy": DIR}]}.
For each case: the torch_dist checkpoint is loaded with megatron's own dist_checkpointing (strict), the
legacy one through megastack's LegacyReader; the last stage's TP rank 0 prints one
'RESULT {"label", "source", "logits"}' line per load. The test compares with transformers' logits.
"""

import json
import sys

import torch


def main() -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megastack.ckpt.detect import open_checkpoint
    from megastack.config import ParallelConfig
    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model
    from megastack.model.forward import forward_logits
    from megastack.model.weights import load_logical

    spec = json.loads(open(sys.argv[1]).read())
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    init_distributed()
    init_model_parallel(2, 2)
    parallel = ParallelConfig(tensor=2, pipeline=2)

    def report(label: str, source: str, model) -> None:
        logits = forward_logits(model, tokens, micro_batch_size=1)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            print("RESULT " + json.dumps({"label": label, "source": source, "logits": logits.tolist()}), flush=True)
        torch.distributed.barrier()

    for case in spec["cases"]:
        reader = open_checkpoint(case["torch_dist"])
        model = build_model(reader.cfg, parallel)
        # As Megatron-LM's load_checkpoint does: the model under "model", common.pt's keys beside it.
        loaded = dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, str(reader.path), strict=StrictHandling.RAISE_ALL
        )
        assert isinstance(loaded["iteration"], int) and loaded["args"].num_layers == reader.cfg.num_layers
        model.load_state_dict(loaded["model"], strict=True)
        report(case["label"], "torch_dist", model)

        legacy = open_checkpoint(case["legacy"])
        model = build_model(legacy.cfg, parallel)
        load_logical(model, legacy.cfg, legacy.read)
        report(case["label"], "legacy", model)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing starts spawn-context helpers that re-import this module
    main()
    sys.exit(0)
