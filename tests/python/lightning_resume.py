"""A real Lightning Trainer checkpoint, and what training from it does next.

lightning_resume.py OUTDIR SEED: fits a tiny LightningModule with Adam for 3 steps, then
(a) saves the Trainer checkpoint as OUTDIR/model.ckpt, (b) continues from that checkpoint in
plain PyTorch for 5 more steps on fixed batches, and writes OUTDIR/expected.pt with the batches
and the resulting parameters (in model.parameters() order) for the Rust side to compare.
"""
import os
import sys

import torch
import lightning as L


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main(out, seed):
    torch.manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out, accelerator="cpu")
    model = Tiny()
    trainer.fit(model, loader)
    ckpt = os.path.join(out, "model.ckpt")
    trainer.save_checkpoint(ckpt)

    # Continue from the file, as a plain PyTorch loop would.
    state = torch.load(ckpt, weights_only=True)
    m = Tiny()
    m.load_state_dict(state["state_dict"])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    opt.load_state_dict(state["optimizer_states"][0])
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(5)]
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(m.layer(x), y).backward()
        opt.step()
    torch.save({"batches": [list(b) for b in batches],
                "final": [p.detach().clone() for p in m.parameters()]},
               os.path.join(out, "expected.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
