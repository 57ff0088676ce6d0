"""The README's Python program runs as written, and its ranks exit cleanly.

The program is taken from README.md (the first ```python block under "## Using it"), written to a
file and run: in one process, and as torchrun would start it at world size 4 (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set for four plain `python` processes; gloo on CPU).
It ends with the plain torch pattern, `dist.destroy_process_group()`, so the repeated world-4
runs are also the teardown check: every rank exits 0, and none prints "terminate called" (the
abort of a gloo worker thread meeting the interpreter's finalization).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpmoe.distributed.groups import free_port
from support import ROOT

README = Path(ROOT) / "README.md"
RUN_TIMEOUT_S = 240  # four ranks importing torch on a loaded 2-core machine, then a few tiny blocks


def readme_program() -> str:
    text = README.read_text()
    section = text[text.index("## Using it"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no ```python block under '## Using it'"
    return match.group(1)


@pytest.fixture
def program(tmp_path) -> Path:
    path = tmp_path / "moe_example.py"
    path.write_text(readme_program())
    return path


def _env(**extra) -> dict:
    env = {name: value for name, value in os.environ.items()
           if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_readme_program_runs_in_one_process(program):
    done = subprocess.run([sys.executable, str(program)], env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_world(program: Path, world_size: int):
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(program)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(world_size)]
    results = []
    try:
        for rank in ranks:
            _, stderr = rank.communicate(timeout=RUN_TIMEOUT_S)
            results.append((rank.returncode, stderr))
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    return results


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_program_at_world_4_exits_cleanly_ten_times(program):
    failures = []
    for attempt in range(10):
        for rank, (returncode, stderr) in enumerate(_run_world(program, 4)):
            if returncode != 0 or "terminate called" in stderr:
                failures.append(f"run {attempt}, rank {rank}: exit {returncode}\n{stderr[-2000:]}")
    assert not failures, "\n".join(failures)
