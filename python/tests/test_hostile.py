"""Hostile and broken files: ckptio.load refuses what torch.load(weights_only=True) refuses,
with a typed error naming the file, and runs no code from it."""

import os
import pickle
import zipfile

import pytest
import torch

import ckptio


class _RunsCode:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _both_refuse(path, ckptio_error, match=None):
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(ckptio_error, match=match):
        ckptio.load(path)


def test_a_global_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _RunsCode(str(marker))}, p)
    _both_refuse(p, pickle.UnpicklingError, match="evil.pt: weights-only load refused")
    assert not marker.exists()
    # The same file saved by ckptio (same pickle) is refused the same way.
    ckptio.save({"x": _RunsCode(str(marker))}, tmp_path / "evil2.pt")
    _both_refuse(tmp_path / "evil2.pt", pickle.UnpicklingError)
    assert not marker.exists()


def test_a_truncated_file_is_refused(tmp_path):
    p = tmp_path / "t.pt"
    ckptio.save({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        p.write_bytes(data[:cut])
        _both_refuse(p, ckptio.CheckpointFormatError, match="t.pt")


def test_a_flipped_bit_in_a_storage_fails_its_crc_unless_checks_are_off(tmp_path):
    p = tmp_path / "c.pt"
    w = torch.arange(100_000, dtype=torch.float32)
    ckptio.save({"w": w}, p)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(ckptio.CheckpointFormatError, match="c/data/0 fails its CRC-32"):
        ckptio.load(p)
    loaded = ckptio.load(p, verify_crc=False)
    assert not torch.equal(loaded["w"], w)


def _rewrite(src, dst, change):
    """Copies the archive at ``src`` to ``dst`` with ``change(name, data)`` applied to each record."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_a_storage_record_shorter_than_its_tensor_is_refused(tmp_path):
    src = tmp_path / "ok.pt"
    ckptio.save({"w": torch.randn(64)}, src)
    bad = tmp_path / "short.pt"
    _rewrite(src, bad, lambda name, data: data[:100] if name == "data/0" else data)
    _both_refuse(bad, ckptio.CheckpointFormatError, match="holds 100 bytes")


def test_an_archive_without_its_pickle_or_with_a_bad_pickle_is_refused(tmp_path):
    src = tmp_path / "ok.pt"
    ckptio.save({"w": torch.randn(4)}, src)
    _rewrite(src, tmp_path / "nopkl.pt", lambda name, data: None if name == "data.pkl" else data)
    _both_refuse(tmp_path / "nopkl.pt", ckptio.CheckpointFormatError, match="no ok/data.pkl record")
    _rewrite(src, tmp_path / "garbage.pt", lambda name, data: b"\x80\x02garbage" if name == "data.pkl" else data)
    with pytest.raises(Exception):
        torch.load(tmp_path / "garbage.pt", weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        ckptio.load(tmp_path / "garbage.pt")


def test_something_that_is_not_a_zip_is_refused(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"not a checkpoint at all, just some text" * 10)
    _both_refuse(p, ckptio.CheckpointFormatError, match="not a zip archive")
    with pytest.raises(FileNotFoundError):
        ckptio.load(tmp_path / "absent.pt")
    os.mkdir(tmp_path / "d.pt")
    with pytest.raises(OSError):
        ckptio.load(tmp_path / "d.pt")


def test_a_save_that_cannot_be_written_raises_oserror_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "keep.pt"
    ckptio.save({"v": torch.ones(3)}, p)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        ckptio.save({"v": torch.zeros(3)}, tmp_path / "file" / "m.pt")
    assert "file" in str(e.value)
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                ckptio.save({"v": torch.zeros(3)}, p)
    finally:
        os.chmod(tmp_path, 0o700)
    assert torch.equal(torch.load(p)["v"], torch.ones(3))
