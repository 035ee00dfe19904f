"""Reference runs of torch.optim for ckptio's optimizers.

optim_ref.py OUT SEED          writes OUT: per config, initial params, 100 steps of gradients,
                               params and state_dict after step 50 and after step 100.
optim_ref.py --continue REF RUST_STATE OUT
                               loads RUST_STATE (params + optimizer state_dict after 50 steps,
                               written by ckptio) into torch.optim, runs steps 51..100 with
                               REF's gradients, writes the max abs difference to REF's final
                               params per config as JSON to OUT.
"""
import copy
import json
import sys

import torch

CONFIGS = {
    "sgd": ("SGD", dict(lr=0.05)),
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "adam": ("Adam", dict(lr=1e-2)),
    "adam_wd": ("Adam", dict(lr=1e-2, weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    "adam_amsgrad": ("Adam", dict(lr=1e-2, amsgrad=True)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.05)),
    "adamw_amsgrad": ("AdamW", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
}
STEPS = 100
MID = 50


def make(name, params):
    cls, kw = CONFIGS[name]
    return getattr(torch.optim, cls)(params, **kw)


def run(out, seed):
    g = torch.Generator().manual_seed(seed)
    doc = {}
    for name in CONFIGS:
        init = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g)]
        grads = [[torch.randn(5, 3, generator=g), torch.randn(3, generator=g)] for _ in range(STEPS)]
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(name, params)
        entry = {"init": init, "grads": grads}
        for s in range(STEPS):
            for p, gr in zip(params, grads[s]):
                p.grad = gr.clone()
            opt.step()
            if s + 1 == MID:
                entry["mid_params"] = [p.detach().clone() for p in params]
                # state_dict() returns the live state tensors: copy them before later steps.
                entry["mid_state"] = copy.deepcopy(opt.state_dict())
        entry["final"] = [p.detach().clone() for p in params]
        entry["final_state"] = opt.state_dict()
        doc[name] = entry
    torch.save(doc, out)


def cont(ref_path, rust_path, out):
    ref = torch.load(ref_path, weights_only=True)
    rust = torch.load(rust_path, weights_only=True)
    diffs = {}
    for name, entry in ref.items():
        params = [torch.nn.Parameter(t.clone()) for t in rust[name]["params"]]
        opt = make(name, params)
        opt.load_state_dict(rust[name]["state"])
        for s in range(MID, STEPS):
            for p, gr in zip(params, entry["grads"][s]):
                p.grad = gr.clone()
            opt.step()
        diffs[name] = max(float((p.detach() - f).abs().max()) for p, f in zip(params, entry["final"]))
    with open(out, "w") as f:
        json.dump(diffs, f)


if __name__ == "__main__":
    if sys.argv[1] == "--continue":
        cont(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        run(sys.argv[1], int(sys.argv[2]))
