"""Fused CPU kernels for the reduction ops, compiled on first use with the system C compiler.

Each kernel has an eager PyTorch twin in ``spark3r.accel`` that computes the same thing and is
used whenever the kernel cannot be: other devices or dtypes, autograd, no C compiler, or
``SPARK3R_NATIVE=0``. Tests check the two agree.

Build: ``cc -O3 -march=native -fopenmp -shared -fPIC`` into ``$SPARK3R_KERNEL_CACHE`` (default
``~/.cache/spark3r/kernels``), keyed by source, compiler, flags and CPU, written atomically so
concurrent processes are safe; ``CC`` selects the compiler. OpenMP resolves to the runtime torch
has already loaded, so the kernels follow ``torch.set_num_threads``. A failed build is logged once
and the eager path is used.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCES = Path(__file__).resolve().parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_lock = threading.Lock()
_libraries: dict[str, Optional[ctypes.CDLL]] = {}

_i64, _f32p, _i64p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
# Exported functions and their argument types, per source file.
_SIGNATURES = {
    "pair_merge": {
        "spark3r_pair_merge_f32": (_f32p, _i64, _i64p, _i64, _i64p, _i64, _i64, _f32p, _i64, _i64, _i64p),
    },
}


def enabled() -> bool:
    return os.environ.get("SPARK3R_NATIVE", "1") != "0"


def cache_dir() -> Path:
    if os.environ.get("SPARK3R_KERNEL_CACHE"):
        return Path(os.environ["SPARK3R_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spark3r" / "kernels"


def _cpu_id() -> str:
    # -march=native code must not be reused on another CPU sharing the cache (e.g. over NFS).
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((l for l in lines if l.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled library ``name`` (``native/<name>.c``), building it if needed; None if unavailable."""
    with _lock:
        if name not in _libraries:
            _libraries[name] = _build_and_load(name) if enabled() else None
        return _libraries[name]


def _build_and_load(name: str) -> Optional[ctypes.CDLL]:
    source = _SOURCES / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: spark3r uses the eager PyTorch path for %s", name)
        return None
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *_FLAGS, platform.machine(), _cpu_id()]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler, *_FLAGS, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                               timeout=120)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
        for func, argtypes in _SIGNATURES[name].items():
            getattr(lib, func).argtypes = argtypes
            getattr(lib, func).restype = None
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("building the %s kernel failed (%s); spark3r uses the eager PyTorch path", name, detail)
        return None


def _ptr(t: torch.Tensor, kind):
    return ctypes.cast(t.data_ptr(), kind)


def pair_merge_usable(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.stride(-1) == 1 and load("pair_merge") is not None


def pair_merge(rows: torch.Tensor, head_row: torch.Tensor, token_step: int, members: torch.Tensor,
               out: torch.Tensor, out_offset: int, best: torch.Tensor) -> None:
    """Run ``spark3r_pair_merge_f32`` (see pair_merge.c): ``rows [R, d]`` query rows,
    ``head_row [B*H]`` first row of each head, ``members [G, 4]`` token indices, ``out
    [B, H, Nq, d]`` contiguous, ``best [B, H, G]`` int64 (written)."""
    lib = load("pair_merge")
    d = rows.shape[1]
    heads, groups = head_row.numel(), members.shape[0]
    assert rows.stride() == (d, 1) and out.is_contiguous() and best.is_contiguous() and members.is_contiguous()
    head_row = head_row.contiguous()
    lib.spark3r_pair_merge_f32(_ptr(rows, _f32p), d, _ptr(head_row, _i64p), token_step, _ptr(members, _i64p),
                               groups, heads, _ptr(out, _f32p), out.shape[2], out_offset, _ptr(best, _i64p))
