"""Training engine: megatron-core GPTModel under DeepSpeed ZeRO, megatron indexed data, exact resume.

Read top to bottom: ``config`` (what a stage is), ``data`` (tokenizer + indexed datasets), ``engine``
(DeepSpeed around megatron, one optimizer step through megatron's schedules), ``checkpointing``
(torch_dist weights + DeepSpeed state, atomic), ``flops`` (6ND + attention, MFU), ``loop`` (the loop).
The public entry for other stages is ``megastack.train.loop.train(config) -> StageSummary``.
"""
