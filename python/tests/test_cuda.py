"""CUDA tensors through the plugin's pinned buffers (skipped, and recorded, without a GPU)."""

import pytest
import torch

import ckptio

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="[cuda] CUDA is not available on this machine")


@needs_cuda
def test_cuda_tensors_are_snapshotted_through_pinned_buffers_at_the_call(tmp_path):
    w = torch.randn(8 << 20, device="cuda")  # 32 MiB
    before = w.cpu()
    io = ckptio.AsyncCheckpointIO()
    io.save_checkpoint({"w": w, "cpu": torch.ones(3)}, tmp_path / "c.ckpt")
    w.add_(1.0)  # queued on the stream right after the save returned
    io.save_checkpoint({"w": w, "cpu": torch.ones(3)}, tmp_path / "d.ckpt")  # the pinned buffer is reused
    io.teardown()
    first = torch.load(tmp_path / "c.ckpt", weights_only=True, map_location="cpu")
    assert torch.equal(first["w"], before)
    second = ckptio.load(tmp_path / "d.ckpt", map_location="cuda:0")
    assert second["w"].device.type == "cuda" and torch.equal(second["w"], w)
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["w"].device.type == "cuda"


@needs_cuda
def test_the_synchronous_save_copies_device_tensors_like_torch_save(tmp_path):
    x = torch.arange(10, device="cuda")
    ckptio.save({"x": x}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["x"], x)
