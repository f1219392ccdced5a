"""Virtual environments for the peer tools the benchmarks compare against (ESPnet, warprnnt-numba, Phonetisaurus).

A peer tool is no dependency of looplift: each lives in a venv of its own, built on first use by
:func:`ensure_venv` (torch of this process's version unless ``torch=False``, then the tool), in ``$<ENV_VAR>`` or else
``~/.cache/looplift-bench/<name>`` (``$XDG_CACHE_HOME`` is honoured). A venv at ``$<ENV_VAR>`` that a
benchmark did not build is used as it is if its python passes the import check, and never deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch as _torch

__all__ = ["PeerUnavailable", "ensure_venv", "run_quiet"]


class PeerUnavailable(Exception):
    """Why a peer tool was not compared; reported in the benchmark's JSON line, the benchmark goes on."""


def venv_dir(env_var: str, name: str) -> Path:
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "looplift-bench" / name


def run_quiet(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def ensure_venv(label: str, env_var: str, name: str, installs: list[list[str]], check: str, *,
                torch: bool = True) -> Path:
    """The python of the peer's venv, built on first use: torch of this process's version (unless `torch` is
    False: for a peer that needs no torch), then each of `installs` (pip arguments), then the import `check`
    (python code)."""
    venv = venv_dir(env_var, name)
    py = venv / "bin" / "python"
    torch_req = "torch==" + _torch.__version__.split("+")[0] if torch else None
    spec = {"torch": torch_req, "installs": installs, "check": check}
    ready, building = venv / ".looplift-ready", venv / ".looplift-building"

    def is_ready() -> bool:
        try:
            return json.loads(ready.read_text()) == spec and py.exists()
        except (OSError, ValueError):
            return False

    if is_ready():
        return py
    if venv.exists() and any(venv.iterdir()) and not ready.exists() and not building.exists():
        # not built by a benchmark (e.g. $ENV_VAR names a venv of one's own): use it as it is, never delete it
        if run_quiet([str(py), "-c", check]).returncode == 0:
            return py
        raise PeerUnavailable(f"{venv} exists, was not built by this benchmark, and its python fails "
                              f"'{check}'; remove it or set {env_var} elsewhere")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)     # another run building it at the same time: wait for it
        except ImportError:
            pass
        if is_ready():
            return py
        print(f"[{label}] building a virtual environment at {venv} (once; a minute or two)", flush=True)
        if venv.exists():
            import shutil
            shutil.rmtree(venv)
        venv.mkdir()
        building.touch()
        steps = [("create the venv", [sys.executable, "-m", "venv", str(venv)]),
                 *([(f"pip install {torch_req}", [str(py), "-m", "pip", "install", torch_req])] if torch_req else []),
                 *((f"pip install {' '.join(args)}", [str(py), "-m", "pip", "install", *args]) for args in installs),
                 (check, [str(py), "-c", check])]
        for what, cmd in steps:
            print(f"[{label}]   {what} ...", end=" ", flush=True)
            start = time.perf_counter()
            done = run_quiet(cmd)
            if done.returncode != 0:
                print("failed", flush=True)
                tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
                raise PeerUnavailable(f"building the {label} venv at {venv} failed at '{what}' "
                                      f"(exit {done.returncode}): {tail}")
            print(f"done ({time.perf_counter() - start:.0f} s)", flush=True)
        ready.write_text(json.dumps(spec))
        building.unlink()
    return py
