"""Worker: megatron-core logits under TP1PP1, TP2PP1, TP1PP2, TP2PP2 equal the reference model's.

Run as 4 ranks. For each layout and each embedding mode, every rank builds the same reference model,
loads its weights into megatron-core's GPTModel cut for this rank, and the last stage compares logits.
Prints one 'RESULT <json>' line per check on rank 0 of the last stage.
"""

import json
import sys

import torch


def main() -> None:
    from megatron.core import parallel_state as ps

    from megastack import layout
    from megastack.config import ModelConfig, ParallelConfig
    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model
    from megastack.model.forward import forward_logits
    from megastack.model.reference import ReferenceLlama
    from megastack.model.weights import load_logical

    init_distributed()
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2)]
    for tie in (False, True):
        cfg = ModelConfig(
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=96,
            vocab_size=256,
            seq_length=16,
            tie_embeddings=tie,
        )
        ref = ReferenceLlama(cfg).init_weights(seed=7)
        tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = ref(tokens)
        logical = layout.logical_from_hf(ref.state_dict(), cfg)
        for tp, pp in layouts:
            init_model_parallel(tp, pp)
            model = build_model(cfg, ParallelConfig(tensor=tp, pipeline=pp))
            load_logical(model, cfg, logical.__getitem__)
            logits = forward_logits(model, tokens, micro_batch_size=2)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                diff = (logits - expected).abs().max().item()
                print("RESULT " + json.dumps({"tp": tp, "pp": pp, "tied": tie, "max_abs_diff": diff}), flush=True)
            torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
