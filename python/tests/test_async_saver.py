"""ckptio.AsyncSaver: futures, snapshots at the call, ordering, and every error once."""

import concurrent.futures
import os

import pytest
import torch

import ckptio


def test_a_save_returns_a_future_that_resolves_when_durable(tmp_path):
    called = []
    with ckptio.AsyncSaver() as saver:
        futs = [saver.save({"w": torch.full((1000,), float(i))}, tmp_path / f"{i}.pt") for i in range(4)]
        futs[0].add_done_callback(called.append)
        done, pending = concurrent.futures.wait(futs, timeout=60)
        assert not pending and len(done) == 4
        assert all(f.staged() for f in futs)
        report = futs[3].result()
        assert isinstance(report, ckptio.SaveReport)
        assert report.bytes == 4000 and report.durable and not report.skipped
        assert report.path == os.fspath(tmp_path / "3.pt")
        assert list(concurrent.futures.as_completed(futs, timeout=5))
    assert called == [futs[0]]
    for i in range(4):
        assert torch.equal(torch.load(tmp_path / f"{i}.pt")["w"], torch.full((1000,), float(i)))


def test_the_checkpoint_holds_the_state_at_the_call(tmp_path):
    w = torch.zeros(16 << 20, dtype=torch.float32)  # 64 MiB: the write takes a while
    with ckptio.AsyncSaver() as saver:
        fut = saver.save({"w": w}, tmp_path / "m.pt")
        w.add_(1.0)  # changed right after save returned, while the write runs
        fut.result()
    assert torch.count_nonzero(torch.load(tmp_path / "m.pt")["w"]) == 0


def test_remove_and_load_run_after_the_pending_saves_of_their_path(tmp_path):
    p = tmp_path / "m.pt"
    with ckptio.AsyncSaver() as saver:
        saver.save({"v": torch.ones(1 << 20)}, p)
        assert torch.equal(saver.load(p)["v"], torch.ones(1 << 20))
        saver.save({"v": torch.zeros(1 << 20)}, p)
        saver.remove(p).result()
        assert not p.exists()


def test_a_failed_save_fails_its_future_and_is_not_raised_again(tmp_path):
    (tmp_path / "file").write_text("x")
    with ckptio.AsyncSaver() as saver:
        fut = saver.save({"v": torch.ones(3)}, tmp_path / "file" / "m.pt")
        assert isinstance(fut.exception(timeout=60), OSError)
        saver.save({"v": torch.ones(3)}, tmp_path / "ok.pt").result()
        saver.flush()


def test_an_error_nobody_took_is_raised_by_the_next_call_once(tmp_path):
    (tmp_path / "file").write_text("x")
    saver = ckptio.AsyncSaver()
    fut = saver.save({"v": torch.ones(3)}, tmp_path / "file" / "m.pt")
    concurrent.futures.wait([fut], timeout=60)  # done, but nobody looked at it
    with pytest.raises(OSError, match="m.pt"):
        saver.save({"v": torch.ones(3)}, tmp_path / "a.pt")
    saver.save({"v": torch.ones(3)}, tmp_path / "b.pt")
    saver.close()
    assert (tmp_path / "b.pt").exists() and not (tmp_path / "a.pt").exists()


def test_close_raises_the_errors_nobody_took(tmp_path):
    (tmp_path / "file").write_text("x")
    saver = ckptio.AsyncSaver()
    saver.save({"v": torch.ones(3)}, tmp_path / "file" / "m.pt")
    with pytest.raises(OSError):
        saver.close()


def test_bad_options_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="backpressure"):
        ckptio.AsyncSaver(backpressure="drop")
    with pytest.raises(ValueError, match="writers"):
        ckptio.AsyncSaver(writers=0)
    with ckptio.AsyncSaver() as saver:
        with pytest.raises(ValueError, match="local paths"):
            saver.save({}, "s3://bucket/m.pt")


def test_skip_backpressure_never_loses_a_save_silently(tmp_path):
    state = {"w": torch.randn(8 << 20)}  # 32 MiB
    with ckptio.AsyncSaver(backpressure="skip", capacity=1) as saver:
        futs = [saver.save(state, tmp_path / f"{i}.pt") for i in range(6)]
        reports = [f.result() for f in futs]
    for i, r in enumerate(reports):
        assert r.skipped != (tmp_path / f"{i}.pt").exists()
    assert saver.status()["skips"] == sum(r.skipped for r in reports)


def test_write_protected_saves_hold_the_state_at_the_call(tmp_path):
    from ckptio import _ckptio

    why = _ckptio.write_protect_unavailable()
    if why is not None:
        pytest.skip(f"[userfaultfd] {why}")
    w = torch.zeros(16 << 20)  # 64 MiB: protected, not copied, on the calling thread
    plugin = ckptio.AsyncCheckpointIO(write_protect=True)
    for i in range(3):
        plugin.save_checkpoint({"w": w, "i": i}, tmp_path / f"{i}.ckpt")
        w.add_(1.0)  # writes pages the background copier may not have copied yet
    plugin.teardown()
    # All but the unaligned edges of each save went through write protection.
    assert plugin.status()["write_protected"] >= 0.99 * 3 * w.numel() * 4
    for i in range(3):
        got = torch.load(tmp_path / f"{i}.ckpt", weights_only=True)
        assert got["i"] == i and torch.equal(got["w"], torch.full_like(w, float(i))), i


def test_a_long_run_keeps_no_finished_futures(tmp_path):
    with ckptio.AsyncSaver() as saver:
        for i in range(50):
            saver.save({"i": i}, tmp_path / f"{i % 2}.pt")
        saver.flush()
        saver.save({"i": -1}, tmp_path / "last.pt")
        assert len(saver._futures) <= 2


def test_reserve_allocates_the_staging_memory_before_the_first_save(tmp_path):
    state = {"w": torch.randn(4 << 20), "b": torch.ones(10)}
    with ckptio.AsyncSaver() as saver:
        assert saver.reserve(state) >= 16 << 20
        allocations = saver.status()["pool_allocations"]
        for i in range(3):
            saver.save(state, tmp_path / f"{i}.pt").result()  # one save in flight at a time
        assert saver.status()["pool_allocations"] == allocations
    plugin = ckptio.AsyncCheckpointIO()
    assert plugin.reserve(state, saves=2) >= 2 * (16 << 20)
    plugin.teardown()
