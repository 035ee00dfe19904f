"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys

from conftest import REPO


def _examples():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_readme_has_a_lightning_and_a_plain_pytorch_example():
    examples = _examples()
    assert len(examples) == 2
    assert "plugins=[ckptio.AsyncCheckpointIO()]" in examples[0]
    assert "ckptio.AsyncSaver()" in examples[1]


def test_each_readme_example_runs(tmp_path):
    for i, code in enumerate(_examples()):
        cwd = tmp_path / f"example{i}"
        cwd.mkdir()
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"README example {i} failed:\n{r.stderr[-3000:]}"
        lines = r.stdout.strip().splitlines()
        if i == 0:
            assert lines[-1] == "16"
            assert sorted(os.listdir(cwd / "ckpt"))[-1] == "last.ckpt"
        else:
            nbytes, rest = lines[-1].split(" ", 1)
            assert rest == "bytes durable"
            # weight and bias, and AdamW's two moments of each: 3 copies of the parameters
            assert int(nbytes) >= 3 * (512 * 512 + 512) * 4
            assert sorted(os.listdir(cwd / "runs")) == [f"step-{s}.pt" for s in (100, 25, 50, 75)]
