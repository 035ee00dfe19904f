"""ckptio.save and ckptio.load against torch.save and torch.load, over the interop corpus."""

import os
import pickle
import zipfile

import pytest
import torch

import ckptio
from ckptio._pickling import pickle_checkpoint
from conftest import assert_same, sharing


def _expected(path, entry):
    return torch.load(path, weights_only=entry["torch_weights_only_ok"])


def test_ckptio_load_reads_every_corpus_file_as_torch_load_does(corpus):
    root, files = corpus
    assert len(files) >= 20
    for entry in files:
        path = os.path.join(root, entry["file"])
        wo = entry["torch_weights_only_ok"]
        expected = _expected(path, entry)
        for mmap in (False, True):
            got = ckptio.load(path, weights_only=wo, mmap=mmap)
            assert_same(got, expected, entry["file"])
            assert sharing(got) == sharing(expected), entry["file"]


def test_files_torch_refuses_with_weights_only_ckptio_refuses_too(corpus):
    root, files = corpus
    refused = [e for e in files if not e["torch_weights_only_ok"]]
    assert refused, "the corpus has files weights_only refuses"
    for entry in refused:
        path = os.path.join(root, entry["file"])
        with pytest.raises(pickle.UnpicklingError, match="weights-only load refused"):
            ckptio.load(path)


def test_torch_load_reads_every_file_ckptio_saves(corpus, tmp_path):
    root, files = corpus
    for i, entry in enumerate(files):
        obj = _expected(os.path.join(root, entry["file"]), entry)
        out = tmp_path / f"f{i}.pt"
        ckptio.save(obj, out)
        for mmap in (False, True):
            back = torch.load(out, weights_only=entry["torch_weights_only_ok"], mmap=mmap)
            assert_same(back, obj, entry["file"])
            assert sharing(back) == sharing(obj), entry["file"]
        assert_same(ckptio.load(out, weights_only=entry["torch_weights_only_ok"]), obj)


def test_the_pickle_is_byte_identical_to_torch_save(corpus, tmp_path):
    root, files = corpus
    for i, entry in enumerate(files):
        obj = _expected(os.path.join(root, entry["file"]), entry)
        ref = tmp_path / f"ref{i}.pt"
        torch.save(obj, ref)
        with zipfile.ZipFile(ref) as z:
            torch_pickle = z.read(f"ref{i}/data.pkl")
        assert pickle_checkpoint(obj)[0] == torch_pickle, entry["file"]


def test_a_file_saved_by_ckptio_has_torch_saves_records_in_its_order(tmp_path):
    obj = {"w": torch.randn(3, 3), "b": torch.zeros(2, dtype=torch.bfloat16), "n": 3}
    torch.save(obj, tmp_path / "t.pt")
    ckptio.save(obj, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as t, zipfile.ZipFile(tmp_path / "c.pt") as c:
        strip = lambda names: [n.split("/", 1)[1] for n in names]  # noqa: E731
        assert strip(c.namelist()) == strip(t.namelist())
        raw = (tmp_path / "c.pt").read_bytes()
        for info in c.infolist():
            if "/data/" in info.filename:
                local = raw[info.header_offset : info.header_offset + 30]
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_loaded_tensors_are_writable_views_of_one_read(tmp_path):
    w = torch.arange(1000, dtype=torch.float32)
    ckptio.save({"a": w, "b": w[10:20], "c": torch.ones(4)}, tmp_path / "m.pt")
    got = ckptio.load(tmp_path / "m.pt")
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    got["b"].add_(1)  # writable, and shared as saved
    assert got["a"][10] == 11
    got["c"].mul_(3)
    assert torch.equal(got["c"], torch.full((4,), 3.0))


def test_map_location_and_file_objects_behave_as_in_torch(tmp_path):
    p = tmp_path / "m.pt"
    ckptio.save({"w": torch.ones(2)}, p)
    got = ckptio.load(p, map_location=lambda storage, loc: storage)
    assert torch.equal(got["w"], torch.ones(2))
    got = ckptio.load(p, map_location="cpu")
    assert got["w"].device.type == "cpu"
    import io

    buf = io.BytesIO()
    ckptio.save({"x": torch.zeros(3)}, buf)
    buf.seek(0)
    assert torch.equal(ckptio.load(buf)["x"], torch.zeros(3))


def test_a_non_durable_save_is_still_whole_and_atomic(tmp_path):
    p = tmp_path / "sub" / "m.pt"
    ckptio.save({"w": torch.ones(5)}, p, durable=False)
    assert torch.equal(torch.load(p)["w"], torch.ones(5))
    assert [f.name for f in p.parent.iterdir()] == ["m.pt"]
