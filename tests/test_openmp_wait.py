"""The engine makes torch's OpenMP threads wait passively (engine/config.py): set before torch
loads libgomp, honoured by it (a worker thread sleeps after each parallel region instead of
spinning ~5 ms), and never over the user's own setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # five fresh interpreters importing torch (~2 s each when quiet)

ROOT = Path(__file__).resolve().parent.parent

# Runs REGIONS small two-thread parallel ops 200 us apart and prints how many times the OpenMP
# worker went to sleep (its voluntary context switches): passive waiting sleeps after every
# region, libgomp's default spin (~5 ms) outlasts every gap.
REGIONS = 60
PROBE = f"""
import glob, os, time
import torch
torch.set_num_threads(2)
x = torch.randn(1 << 16); y = torch.empty_like(x)
torch.mul(x, 2.0, out=y)  # starts the worker
def sleeps():
    total = 0
    for d in glob.glob("/proc/self/task/*"):
        if int(d.rsplit("/", 1)[1]) != os.getpid():
            total += int(open(d + "/status").read().split("voluntary_ctxt_switches:")[1].split()[0])
    return total
before = sleeps()
for _ in range({REGIONS}):
    end = time.perf_counter() + 200e-6
    while time.perf_counter() < end:
        pass
    torch.mul(x, 2.0, out=y)
print(os.environ.get("OMP_WAIT_POLICY"), sleeps() - before)
"""


def run(imports: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {imports}\n{PROBE}"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


def test_importing_the_engine_first_makes_openmp_workers_sleep_between_regions():
    policy, sleeps = run("import engine")
    assert policy == "PASSIVE"
    assert sleeps >= 0.8 * REGIONS, sleeps


def test_torch_imported_first_keeps_libgomps_spinning_default():
    # The contrast that shows the probe measures the policy: the spin outlasts each 200 us gap.
    policy, sleeps = run("import torch, engine")
    assert policy == "None"
    assert sleeps < 0.5 * REGIONS, sleeps


def test_the_users_own_setting_wins():
    policy, sleeps = run("import engine", OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE"
    assert sleeps < 0.5 * REGIONS, sleeps
    assert run("import engine", GOMP_SPINCOUNT="1000")[0] == "None"
