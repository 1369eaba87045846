"""dcp_metadata's mirrors of torch.distributed.checkpoint's metadata classes, against the real ones: what
megastack writes loads as DCP's own classes with DCP's reader, what DCP writes reads into the mirrors with
the same fields, and a torch_dist conversion and growth never import torch.distributed.checkpoint."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as real
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megastack.ckpt import dcp_metadata as mirror
from megastack.ckpt.safe_load import read_dcp_metadata, write_dcp_metadata
from megastack.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def build(m, storage_info) -> object:
    """The same metadata from either set of classes (``m``: the module holding them)."""
    weight = m.TensorStorageMetadata(
        properties=m.TensorProperties(dtype=torch.bfloat16),
        size=torch.Size([4, 6]),
        chunks=[
            m.ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 6])),
            m.ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([2, 6])),
        ],
    )
    image = m.TensorStorageMetadata(
        properties=m.TensorProperties(dtype=torch.float32, memory_format=torch.channels_last, requires_grad=True),
        size=torch.Size([1, 2, 2, 2]),
        chunks=[m.ChunkStorageMetadata(offsets=torch.Size([0, 0, 0, 0]), sizes=torch.Size([1, 2, 2, 2]))],
    )
    storage = {
        m.MetadataIndex("w", [0, 0]): storage_info("__0_0.distcp", 0, 100),
        m.MetadataIndex("w", [2, 0], index=1): storage_info("__1_0.distcp", 0, 100),
        m.MetadataIndex("img", [0, 0, 0, 0]): storage_info("__0_0.distcp", 100, 80),
        m.MetadataIndex("extra"): storage_info("__0_0.distcp", 180, 7),
    }
    return m.Metadata(
        state_dict_metadata={"w": weight, "img": image, "extra": m.BytesStorageMetadata()},
        storage_data=storage,
        storage_meta=m.StorageMeta(checkpoint_id="somewhere", modules=["a"]),
        version="1.0.0",
    )


def plain(obj: object) -> tuple:
    """Class names and field values, recursively (both sets of classes are dataclasses)."""
    return (type(obj).__name__.lstrip("_"), dataclasses.astuple(obj))


def test_megastack_written_metadata_is_dcps(tmp_path):
    write_dcp_metadata(build(mirror, mirror.StorageInfo), tmp_path / ".metadata")
    expected = build(real, _StorageInfo)
    storage = expected.storage_data
    with open(tmp_path / ".metadata", "rb") as f:
        loaded = pickle.load(f)  # what DCP's FileSystemReader does
    assert type(loaded) is real.Metadata and loaded == expected
    assert type(loaded.state_dict_metadata["img"].properties) is real.TensorProperties
    assert loaded.state_dict_metadata["img"].properties.memory_format == torch.channels_last
    assert all(type(k) is real.MetadataIndex and type(v) is _StorageInfo for k, v in loaded.storage_data.items())
    via_reader = dcp.FileSystemReader(str(tmp_path)).read_metadata()  # sets storage_meta.load_id
    assert (via_reader.state_dict_metadata, via_reader.storage_data) == (expected.state_dict_metadata, storage)


def test_mirrors_match_dcps_fields_and_version():
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

    assert mirror.CURRENT_DCP_VERSION == CURRENT_DCP_VERSION
    for (module, name), cls in mirror.MIRRORS.items():
        theirs = getattr(sys.modules[module], name)
        if dataclasses.is_dataclass(theirs):
            assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in dataclasses.fields(theirs)], name
        else:
            assert [m.name for m in cls] == [m.name for m in theirs], name


def test_dcp_written_metadata_reads_into_the_mirrors(tmp_path):
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(build(real, _StorageInfo), f)
    got = read_dcp_metadata(tmp_path)
    assert type(got) is mirror.Metadata
    assert plain(got) == plain(build(mirror, mirror.StorageInfo)) == plain(build(real, _StorageInfo))
    assert got.storage_data[mirror.MetadataIndex("w", (2, 0))].relative_path == "__1_0.distcp"  # index ignored
    assert got.state_dict_metadata["img"].properties.memory_format == torch.channels_last


def test_dcp_save_reads_into_the_mirrors(tmp_path):
    """A checkpoint DCP itself saved (one process, no process group)."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 7}
    dcp.save(state, checkpoint_id=str(tmp_path))
    got = read_dcp_metadata(tmp_path)
    w = got.state_dict_metadata["w"]
    assert type(w) is mirror.TensorStorageMetadata and tuple(w.size) == (3, 4)
    assert w.properties.dtype == torch.float32 and [tuple(c.sizes) for c in w.chunks] == [(3, 4)]
    assert type(got.state_dict_metadata["step"]) is mirror.BytesStorageMetadata
    info = got.storage_data[mirror.MetadataIndex("w", (0, 0))]
    assert type(info) is mirror.StorageInfo and (tmp_path / info.relative_path).stat().st_size >= info.length


def test_only_dcp_classes_are_admitted(tmp_path):
    metadata = build(real, _StorageInfo)
    metadata.planner_data = subprocess.Popen  # what a malicious file would name
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(UserError, match="subprocess.Popen' is not allowed"):
        read_dcp_metadata(tmp_path)
    metadata.planner_data = dcp.FileSystemReader  # a DCP class, but not metadata
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(UserError, match="FileSystemReader' is not allowed"):
        read_dcp_metadata(tmp_path)


def test_megatron_lm_metadata_reads_with_its_saveplan():
    """Megatron-LM's own checkpoint (tests/fixtures/megatron_lm): megatron-core caches DCP planner objects
    in it, read as inert stand-ins."""
    got = read_dcp_metadata(REPO / "tests/fixtures/megatron_lm/torch_dist/iter_0000002")
    assert type(got) is mirror.Metadata and got.state_dict_metadata
    assert all(type(k) is mirror.MetadataIndex for k in got.storage_data)


def test_torch_dist_commands_do_not_import_dcp(tmp_path):
    """Write a torch_dist checkpoint, grow it, convert it to HF and back, in one fresh process."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from ckpt_factory import reference, small_config, write_checkpoint
from megastack.cli import main
tmp = {str(tmp_path)!r}
write_checkpoint(reference(small_config()), tmp + "/src")
assert main(["grow", tmp + "/src", tmp + "/grown", "--factor", "2"]) in (0, None)
assert main(["convert", tmp + "/grown", tmp + "/hf", "--to", "hf"]) in (0, None)
assert main(["convert", tmp + "/hf", tmp + "/back", "--to", "torch_dist"]) in (0, None)
loaded = sorted(m for m in sys.modules if m.startswith(("torch.distributed.checkpoint", "sympy")))
print("LOADED", loaded)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout[-2000:]
