"""The examples run to completion."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_loop(monkeypatch, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "custom_loop.py")])
    try:
        runpy.run_path(str(EXAMPLES / "custom_loop.py"), run_name="__main__")  # raises on a non-zero exit
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    before, after = map(int, re.search(r"ranks: (\d+) -> (\d+)", out).groups())
    assert after < before, out
