"""A real Lightning Trainer with ckptio.AsyncCheckpointIO."""

import os
import time

import pytest
import torch

import ckptio

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :2] * 0.5)
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _trainer(root, max_steps, plugins, callbacks=(), checkpointing=True, **limits):
    return L.Trainer(
        max_steps=max_steps, **limits, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        plugins=plugins, callbacks=list(callbacks), enable_checkpointing=checkpointing,
        deterministic=True,
    )


def _model(seed=1):
    L.seed_everything(seed, verbose=False)
    return Net()


def test_top_k_and_last_checkpoints_are_whole_and_match_lightnings_bookkeeping(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=2, monitor="train_loss",
                           save_last=True, every_n_train_steps=2)
    plugin = ckptio.AsyncCheckpointIO()
    _trainer(tmp_path, 24, [plugin], [ckpt]).fit(_model(), _loader())
    files = sorted(os.listdir(tmp_path / "ckpt"))
    expected = sorted([os.path.basename(p) for p in ckpt.best_k_models] + ["last.ckpt"])
    assert files == expected, (files, expected)
    for f in files:
        state = torch.load(tmp_path / "ckpt" / f, weights_only=True)
        assert set(state["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        assert state["global_step"] % 2 == 0
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 24
    status = plugin.status()
    assert status["saves"] >= 12 and status["errors"] == 0


def test_resuming_from_last_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole = _model()
    _trainer(tmp_path / "a", -1, [ckptio.AsyncCheckpointIO()], checkpointing=False, max_epochs=3).fit(
        whole, _loader()
    )

    # Interrupted after two epochs, then resumed from last.ckpt for the third.
    def ckpt():
        return ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_epochs=1)

    first = _model()
    _trainer(tmp_path / "b", -1, [ckptio.AsyncCheckpointIO()], [ckpt()], max_epochs=2).fit(first, _loader())
    last = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 24
    resumed = _model(seed=99)  # different initial weights: all must come from the checkpoint
    _trainer(tmp_path / "b", -1, [ckptio.AsyncCheckpointIO()], [ckpt()], max_epochs=3).fit(
        resumed, _loader(), ckpt_path="last"
    )
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.net[0].weight, resumed.net[0].weight)


class _SaveThenChange(Callback):
    """At one step, saves a checkpoint and at once changes every weight in place."""

    def __init__(self, path, step):
        self.path, self.step, self.before = path, step, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
            trainer.save_checkpoint(self.path)
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(1000.0)


def test_a_checkpoint_taken_right_before_the_model_changes_holds_the_old_values(tmp_path):
    cb = _SaveThenChange(tmp_path / "snap.ckpt", step=3)
    _trainer(tmp_path, 5, [ckptio.AsyncCheckpointIO()], [cb], checkpointing=False).fit(_model(), _loader())
    saved = torch.load(tmp_path / "snap.ckpt", weights_only=True)["state_dict"]
    for k, v in cb.before.items():
        assert torch.equal(saved[k], v), k


def test_the_synchronous_plugin_writes_the_same_checkpoints(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    model = _model()
    _trainer(tmp_path, 8, [ckptio.TorchCheckpointIO()], [ckpt]).fit(model, _loader())
    state = ckptio.load(tmp_path / "ckpt" / "last.ckpt")
    for k, v in model.state_dict().items():
        assert torch.equal(state["state_dict"][k], v), k


def test_a_background_error_is_raised_once_at_the_next_call(tmp_path):
    plugin = ckptio.AsyncCheckpointIO()
    (tmp_path / "file").write_text("x")
    plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / "file" / "a.ckpt")
    deadline = time.monotonic() + 60
    while plugin.status()["errors"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="a.ckpt"):
        plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / "b.ckpt")
    plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / "ok.ckpt")
    plugin.teardown()  # told once: not again here
    assert (tmp_path / "ok.ckpt").exists() and not (tmp_path / "b.ckpt").exists()
    (tmp_path / "file2").write_text("x")
    plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / "file2" / "c.ckpt")
    with pytest.raises(OSError, match="c.ckpt"):
        plugin.teardown()
    with pytest.raises(TypeError, match="storage_options"):
        plugin.save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"bucket": 1})


def test_the_synchronous_plugin_removes_files_and_directories_quietly(tmp_path):
    plugin = ckptio.TorchCheckpointIO()
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    for p in ("a.ckpt", "d", "absent.ckpt"):
        plugin.remove_checkpoint(tmp_path / p)
    assert list(tmp_path.iterdir()) == []
