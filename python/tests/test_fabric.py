"""Fabric's save and load with ckptio's plugins."""

import pytest
import torch

import ckptio

L = pytest.importorskip("lightning")


@pytest.mark.parametrize("plugin", [ckptio.AsyncCheckpointIO, ckptio.TorchCheckpointIO])
def test_fabric_save_and_load_restore_objects_and_return_the_remainder(tmp_path, plugin):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin()])
    fabric.launch()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = fabric.setup(model, opt)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    fabric.save(tmp_path / "s.ckpt", {"model": model, "optimizer": opt, "step": 7, "extra": torch.arange(4)})

    model2 = torch.nn.Linear(5, 3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2, opt2 = fabric.setup(model2, opt2)
    remainder = fabric.load(tmp_path / "s.ckpt", {"model": model2, "optimizer": opt2})
    assert remainder["step"] == 7 and torch.equal(remainder["extra"], torch.arange(4))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["momentum_buffer"], s2[k]["momentum_buffer"]) for k in s1)
    fabric.strategy.checkpoint_io.teardown()
