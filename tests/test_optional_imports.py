"""The core works without the optional integrations, and says how to get them when asked."""

from __future__ import annotations

import subprocess

from _subproc import run_python

BLOCK = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in {blocked!r}:\n"
    "            raise ImportError(f'{{name}} is blocked for this test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run(code: str, blocked: tuple) -> subprocess.CompletedProcess:
    script = BLOCK.format(blocked=set(blocked)) + code
    return run_python(script, timeout=120)


def test_core_saves_without_torch_xla_and_never_imports_it(tmp_path):
    out = run(
        "import torch, asyncckpt\n"
        "io = asyncckpt.AsyncCheckpointIO()\n"
        f"io.save_checkpoint({{'w': torch.ones(3)}}, {str(tmp_path / 'a.ckpt')!r})\n"
        "io.teardown()\n"
        "assert 'torch_xla' not in sys.modules\n"
        "print('ok')\n",
        ("torch_xla",),
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_xla_checkpoint_io_without_torch_xla_says_how_to_install_it():
    out = run(
        "import asyncckpt\n"
        "try:\n"
        "    asyncckpt.XLACheckpointIO()\n"
        "except ImportError as err:\n"
        "    print(err)\n",
        ("torch_xla",),
    )
    assert "torch_xla is not installed" in out.stdout and "pip install" in out.stdout, out.stderr


def test_async_api_is_optional(tmp_path):
    out = run(
        "import torch, asyncckpt\n"
        "io = asyncckpt.AsyncCheckpointIO()\n"
        f"io.save_checkpoint({{'w': torch.ones(3)}}, {str(tmp_path / 'a.ckpt')!r})\n"
        "io.teardown()\n"
        "print('ok')\n",
        ("anyio", "aiofiles", "trio"),
    )
    assert out.stdout.strip() == "ok", out.stderr
