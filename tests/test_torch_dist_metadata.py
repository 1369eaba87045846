"""The ``.metadata`` of a checkpoint torch.distributed.checkpoint itself saved reads through megastack's
allowlisting unpickler (DCP records the checkpoint id as a ``pathlib.PosixPath``), and a file naming a
class outside DCP's metadata is refused, never executed."""

from __future__ import annotations

import pickle
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from megastack.ckpt.safe_load import read_dcp_metadata
from megastack.errors import UserError


def test_dcp_save_reads(tmp_path):
    """A checkpoint DCP saved (one process, no process group)."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 7}
    dcp.save(state, checkpoint_id=str(tmp_path))
    got = read_dcp_metadata(tmp_path)
    w = got.state_dict_metadata["w"]
    assert isinstance(w, TensorStorageMetadata) and tuple(w.size) == (3, 4)
    assert w.properties.dtype == torch.float32 and [tuple(c.sizes) for c in w.chunks] == [(3, 4)]
    assert isinstance(got.state_dict_metadata["step"], BytesStorageMetadata)
    info = got.storage_data[MetadataIndex("w", (0, 0))]
    assert (tmp_path / info.relative_path).stat().st_size >= info.offset + info.length


def test_a_class_outside_dcp_is_refused(tmp_path):
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path))
    metadata = pickle.loads((tmp_path / ".metadata").read_bytes())
    metadata.planner_data = subprocess.Popen  # what a malicious file would name
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match="subprocess.Popen' is not allowed"):
        read_dcp_metadata(tmp_path)
