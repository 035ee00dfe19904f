"""Writes a corpus of torch.save files for ckptio's interop tests.

    corpus.py OUTDIR SEED

Every file goes into OUTDIR, plus OUTDIR/manifest.json:

    {"torch": VERSION, "seed": SEED, "files": [{
        "file": name relative to OUTDIR,
        "weights_only": the mode "json" was loaded with,
        "torch_weights_only_ok": whether torch.load(weights_only=True) accepts the file,
        "torch_weights_only_error": its message when it does not,
        "subtrees": null, or the top-level keys "json"/"groups"/"flags" cover,
        "json": canonical JSON (canon.py) of torch.load(file, weights_only=...),
        "groups": [[key path, storage group], ...],
        "flags": [[key path, is_parameter, requires_grad], ...],
        "kinds": [[key path, dict / OrderedDict / list / tuple], ...]}, ...]}
"""

import collections
import glob
import io
import json
import os
import random
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from canon import canon, flags, kinds, pick, sharing_groups  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")

# Every dtype torch 2.13 saves. The first twelve are written with _rebuild_tensor_v2 and a typed
# storage class; the rest with _rebuild_tensor_v3 and an UntypedStorage.
DTYPES = [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "complex128",
    "uint16", "uint32", "uint64", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz",
    "float8_e4m3fnuz", "float8_e8m0fnu",
]
# Also saved by torch 2.13 (less common): kept in a file of their own.
EXOTIC_DTYPES = ["complex32", "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"]


class Corpus:
    def __init__(self, outdir, seed):
        self.outdir = outdir
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.entries = []

    # ---- random data ----------------------------------------------------------------------

    def shape(self):
        r = self.rng.random()
        if r < 0.15:
            return []
        if r < 0.3:
            return self.rng.choice([[0], [3, 0], [0, 2, 4], [1, 0]])
        return [self.rng.randint(1, 6) for _ in range(self.rng.randint(1, 4))]

    def tensor(self, dtype, shape):
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        n = 1
        for d in shape:
            n *= d
        if dt == torch.bool:
            return torch.randint(0, 2, (n,), generator=self.gen, dtype=torch.uint8).bool().reshape(shape)
        if dt.is_floating_point and dt.itemsize >= 2 and self.rng.random() < 0.6:
            # ordinary values with a few specials
            t = torch.randn(n, generator=self.gen, dtype=torch.float64)
            if n >= 4:
                t[0], t[1], t[2], t[3] = float("nan"), float("inf"), float("-inf"), -0.0
            return t.to(dt).reshape(shape)
        # any bit pattern
        raw = torch.randint(0, 256, (n * dt.itemsize,), generator=self.gen, dtype=torch.uint8)
        return raw.view(dt).reshape(shape)

    # ---- files ----------------------------------------------------------------------------

    def add(self, name, obj, *, save=None, subtrees=None, **save_kw):
        path = os.path.join(self.outdir, name)
        if save is None:
            torch.save(obj, path, **save_kw)
        else:
            save(path)
        self.record(name, subtrees)

    def record(self, name, subtrees=None):
        path = os.path.join(self.outdir, name)
        try:
            loaded = torch.load(path, weights_only=True)
            wo_ok, wo_err = True, None
        except Exception as e:  # torch refuses: ckptio must refuse as well
            msg = str(e)
            if len(msg) > 700:
                msg = msg[:200] + " [...] " + msg[-500:]
            wo_ok, wo_err = False, f"{type(e).__name__}: {msg}"
        if not wo_ok:
            loaded = torch.load(path, weights_only=False)
        tree = pick(loaded, subtrees)
        self.entries.append({
            "file": name,
            "weights_only": wo_ok,
            "torch_weights_only_ok": wo_ok,
            "torch_weights_only_error": wo_err,
            "subtrees": subtrees,
            "json": canon(tree),
            "groups": sharing_groups(tree),
            "flags": flags(tree),
            "kinds": kinds(tree),
        })

    def write_manifest(self, seed):
        with open(os.path.join(self.outdir, "manifest.json"), "w") as f:
            json.dump({"torch": torch.__version__, "seed": seed, "files": self.entries}, f)


def dtypes_files(c):
    # one file with every dtype in several shapes (0-dim and empty included)
    d = {}
    for name in DTYPES:
        d[name] = {
            "scalar": c.tensor(name, []),
            "empty": c.tensor(name, [0]),
            "empty2": c.tensor(name, [2, 0, 3]),
            "rand": [c.tensor(name, c.shape()) for _ in range(2)],
        }
    c.add("dtypes.pt", d)
    # one file per dtype: a base tensor and views of it
    for name in DTYPES:
        base = c.tensor(name, [4, 6])
        views = {
            "base": base,
            "t": base.t(),
            "rows": base[1:3],
            "narrow": base.narrow(1, 2, 3),
            "step": base[:, ::2],
            "elem": base[2, 3],
        }
        order = list(views.items())
        c.rng.shuffle(order)
        c.add(f"views_{name}.pt", collections.OrderedDict(order))
    d = {name: c.tensor(name, c.shape()) for name in EXOTIC_DTYPES}
    d["views"] = [c.tensor("float4_e2m1fn_x2", [3, 4]).t(), c.tensor("complex32", [5, 2])[1:, 1]]
    c.add("exotic_dtypes.pt", d)


def views_file(c):
    base = c.tensor("float32", [5, 8])
    big = c.tensor("int64", [100])
    cplx = c.tensor("complex128", [3, 4])
    u16 = c.tensor("uint16", [6, 5])
    tree = {
        # the slice alone: torch saves the whole storage
        "slice_only": big[10:20],
        "tail_of_other": c.tensor("float64", [10])[7:],
        "a": {"base": base, "t": base.t(), "narrow": base.narrow(0, 1, 3), "cols": base[:, 2:5]},
        "b": [base[::2, 1::3], base.reshape(8, 5), base.view(40)[3:33].view(5, 6)],
        "expand": c.tensor("float32", [3, 1]).expand(3, 4),
        "empty_view": base[2:2],
        "empty_view_end": base.view(-1)[40:],
        "cplx": (cplx.t(), cplx[1:, ::2], cplx),
        "u16": {"t": u16.t(), "row": u16[4], "base": u16},
        "permute": c.tensor("bfloat16", [2, 3, 4]).permute(2, 0, 1),
    }
    # one untyped storage viewed as two different _rebuild_tensor_v3 dtypes (torch.save allows
    # this for dtypes without a typed storage class)
    raw = c.tensor("uint8", [12])
    tree["v3_mixed"] = [raw.view(torch.float8_e4m3fn), raw.view(torch.float8_e5m2)[2:],
                        raw.view(torch.float8_e8m0fnu).view(3, 4).t()]
    c.add("views.pt", tree)
    # the same storage reached through several containers, first seen deep inside
    shared = c.tensor("float16", [16])
    c.add("shared.pt", {
        "deep": {"x": [(shared[4:8],)]},
        "again": shared,
        "other": c.tensor("float16", [16]),
        "last": shared.view(4, 4).t(),
    })
    # a tensor at the root
    c.add("root_tensor.pt", c.tensor("float32", [3, 3]).t())


def nested_file(c):
    tree = {
        "none": None,
        "bools": [True, False],
        "ints": [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63)],
        "floats": [0.0, -0.0, 1.5, 1e-300, -3.25e100, float("nan"), float("inf"), float("-inf"),
                   c.rng.random()],
        "str": ["", "plain", "ünïcödé ✓ 🚀", "with\nnewline", "x" * 300],
        # (b"" pickles as builtins.bytes(), which weights_only refuses: see empty_bytes.pt)
        "bytes": [b"\x00\x01\xff", bytes(range(256)), b"x"],
        "bytearray": [bytearray(b"ab\x00\xff"), bytearray(range(256))],
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "tuples": [(1,), (1, 2), (1, 2, 3), (1, 2, 3, 4, 5)],
        "int_keys": {0: c.tensor("float32", [2]), 7: "seven", -3: None},
        "mixed_keys": {"s": 1, 2: "two", None: "none", True: "true", (1, "a"): "tuple", 1.5: "float"},
        "nested": [[[{"deep": [c.tensor("int32", [2, 2])]}]]],
        "size": torch.Size([2, 3, 0]),
        "many": list(range(2500)),
        "big_dict": {f"k{i}": i for i in range(1200)},
        "requires_grad": torch.randn(3, 2, generator=c.gen).requires_grad_(),
    }
    deep = 0
    for i in range(60):
        deep = [deep, {"level": i}]
    tree["deep"] = deep
    c.add("nested.pt", tree)
    # torch's weights-only unpickler refuses this file (GLOBAL builtins.bytes)
    c.add("empty_bytes.pt", {"empty": b"", "t": c.tensor("int8", [3])})
    c.add("ordered.pt", collections.OrderedDict([("z", 1), ("a", c.tensor("float64", [2])),
                                                 ("m", collections.OrderedDict([("x", 2)]))]))


def parameters_file(c):
    p = torch.nn.Parameter(c.tensor("float32", [3, 4]))
    q = torch.nn.Parameter(c.tensor("bfloat16", [2]), requires_grad=False)
    r = torch.nn.Parameter(c.tensor("int64", [5]), requires_grad=False)
    s = torch.nn.Parameter(c.tensor("float64", []))
    u = torch.nn.Parameter(c.tensor("uint16", [2, 3]), requires_grad=False)
    c.add("parameters.pt", {"p": p, "q": q, "r": r, "scalar": s, "u16": u,
                            "view_of_p": p.detach().t(), "list": [p, q]})
    # a Parameter with extra attributes is saved with _rebuild_parameter_with_state
    w = torch.nn.Parameter(c.tensor("float32", [2, 2]))
    w.custom_attr = 3
    c.add("parameter_state.pt", {"w": w})


def training_files(c):
    torch.manual_seed(c.rng.randrange(2**31))
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 2),
    )
    model.register_buffer("counter", torch.tensor(7, dtype=torch.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        x = torch.randn(5, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    c.add("model_state_dict.pt", model.state_dict())
    c.add("optimizer_state_dict.pt", opt.state_dict())
    c.add("training.ckpt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3,
                            "lr": 1e-3, "rng": torch.get_rng_state()})
    # parameters themselves (Parameters, requires_grad=True) as they are in memory
    c.add("named_parameters.pt", dict(model.named_parameters()))


def format_files(c):
    tree = {"w": c.tensor("float32", [3, 2]), "u": c.tensor("uint32", [2]), "b": b"bytes",
            "k": {1: [None, 2.5]}}
    tree["v"] = tree["w"].t()
    # what protocols 4 and 5 encode differently: short and long strings and bytes, bytearray
    # (BYTEARRAY8 in 5), memoized tuples, big ints
    tree.update({"short": "s", "long": "y" * 300, "big_bytes": bytes(range(256)) * 2,
                 "ba": bytearray(b"ab\x00"), "ints": [-(2**40), 2**63 - 1, 65536],
                 "tup": ((1, 2), (1, 2)), "f": 0.1})
    for proto in (4, 5):
        c.add(f"protocol{proto}.pt", tree, pickle_protocol=proto)

    def to_buffer(path):
        buf = io.BytesIO()
        torch.save(tree, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())

    c.add("from_buffer.pt", None, save=to_buffer)
    c.add("noextension", tree)
    # more than 65535 records: the zip needs ZIP64 end-of-directory records
    c.add("many_storages.pt", {f"t{i}": torch.tensor([i], dtype=torch.int32) for i in range(65600)})
    c.add("many.dots.in.name.pth", tree)


def lightning_files(c):
    import argparse

    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, hidden=8, lr=0.01, cfg=None):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # run 0: plain hyper-parameters (the checkpoint loads with weights_only=True);
    # run 1: an argparse.Namespace among them, which weights_only refuses: compared with
    # weights_only=False on the tensors' subtrees (ckptio keeps the Namespace as an inert object)
    for run, cfg in enumerate([None, argparse.Namespace(depth=2, name="tiny")]):
        L.seed_everything(c.rng.randrange(2**31), verbose=False)
        x = torch.randn(32, 3)
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        root = os.path.join(c.outdir, f"lightning{run}")
        trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, enable_progress_bar=False,
                            logger=False, enable_model_summary=False, default_root_dir=root)
        trainer.fit(Tiny(hidden=4 + 4 * run, cfg=cfg), loader)
        found = glob.glob(os.path.join(root, "**", "*.ckpt"), recursive=True)
        if len(found) != 1:
            raise SystemExit(f"expected one Lightning checkpoint under {root}, found {found}")
        name = os.path.relpath(found[0], c.outdir)
        try:
            torch.load(found[0], weights_only=True)
            subtrees = None
        except Exception:
            subtrees = ["state_dict", "optimizer_states"]
        if (subtrees is None) != (cfg is None):
            raise SystemExit(f"{name}: torch.load(weights_only=True) did not behave as expected")
        c.record(name, subtrees)


def main():
    outdir, seed = sys.argv[1], int(sys.argv[2])
    os.makedirs(outdir, exist_ok=True)
    c = Corpus(outdir, seed)
    dtypes_files(c)
    views_file(c)
    nested_file(c)
    parameters_file(c)
    training_files(c)
    format_files(c)
    lightning_files(c)
    c.write_manifest(seed)
    print(f"corpus: {len(c.entries)} files in {outdir} (seed {seed})", file=sys.stderr)


if __name__ == "__main__":
    main()
