"""megastack: grow small LLMs into large ones directly on Megatron sharded checkpoints."""

import warnings

__version__ = "0.1.0"

# Import-time notices from megatron-core and torch that say nothing actionable to a megastack user
# (no Apex/TE on CPU, deprecations inside code megastack does not own).
for _message in (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
    r".*CUDA_DEVICE_MAX_CONNECTIONS",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed._reduce_scatter_base` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)
