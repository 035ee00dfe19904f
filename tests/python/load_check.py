"""Loads files with torch.load and reports what it got, for ckptio's interop tests.

    load_check.py [--out OUT.json] FILE...        each file with weights_only=True
    load_check.py --jobs JOBS.json [--out OUT.json]

JOBS.json: [{"file": PATH, "weights_only": bool, "subtrees": null or [top-level keys]}, ...]

Writes (to OUT.json, or stdout) {"torch": VERSION, "results": [{
    "file", "weights_only", "subtrees",
    "ok": loaded without error, "error": the message otherwise,
    "json": canonical JSON (canon.py), "groups": storage-sharing groups,
    "flags": [[key path, is nn.Parameter, requires_grad], ...],
    "kinds": [[key path, dict / OrderedDict / list / tuple], ...] for every container,
    "mmap": {"ok", "error", "json", "groups"} for torch.load(mmap=True) with the same options,
    "torch_weights_only_ok": whether weights_only=True loads it (checked when the job asks for
    weights_only=False)}, ...]}
"""

import argparse
import json
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from canon import canon, flags, kinds, pick, sharing_groups  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def describe(path, weights_only, subtrees, mmap):
    out = {}
    try:
        tree = pick(torch.load(path, weights_only=weights_only, mmap=mmap), subtrees)
        out["json"] = canon(tree)
        out["groups"] = sharing_groups(tree)
        if not mmap:
            out["flags"] = flags(tree)
            out["kinds"] = kinds(tree)
        out["ok"] = True
        out["error"] = None
    except Exception as e:
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    return out


def check(job):
    path, wo, subtrees = job["file"], job.get("weights_only", True), job.get("subtrees")
    res = {"file": path, "weights_only": wo, "subtrees": subtrees}
    res.update(describe(path, wo, subtrees, mmap=False))
    res["mmap"] = describe(path, wo, subtrees, mmap=True)
    if wo:
        res["torch_weights_only_ok"] = res["ok"]
    else:
        try:
            torch.load(path, weights_only=True)
            res["torch_weights_only_ok"] = True
        except Exception:
            res["torch_weights_only_ok"] = False
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs")
    ap.add_argument("--out")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    jobs = [{"file": f, "weights_only": True, "subtrees": None} for f in args.files]
    if args.jobs:
        with open(args.jobs) as f:
            jobs += json.load(f)
    doc = {"torch": torch.__version__, "results": [check(j) for j in jobs]}
    text = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
