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
_u8p, _f32 = ctypes.POINTER(ctypes.c_uint8), ctypes.c_float
# Exported functions and their argument types, per source file.
_SIGNATURES = {
    "pair_merge": {
        "spark3r_pair_merge_f32": (_f32p, _i64, _i64p, _i64, _i64p, _i64, _i64, _f32p, _i64, _i64, _i64p),
    },
    "block_attention": {
        "spark3r_block_attention_f32": (_f32p, _f32p, _f32p, _i64, _i64, _i64, _u8p, _f32p, _f32p, _i64, _i64, _i64,
                                        _i64, _i64p, _i64, _f32p, _f32p, _i64p, _u8p, _f32p, _i64, _i64, _i64, _i64,
                                        _f32),
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


# Largest head size block_attention.c handles (its DMAX); its tiles also need a multiple of 8.
BLOCK_ATTENTION_MAX_DIM = 256


def block_attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`block_attention` can run on ``q, k, v [B, H, N, d]``: CPU, fp32, head size
    a multiple of 8 up to 256, no autograd, and the kernel builds."""
    d = q.shape[-1]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)) and d % 8 == 0
            and d <= BLOCK_ATTENTION_MAX_DIM and not grad and load("block_attention") is not None)


def _optional(t: Optional[torch.Tensor], kind):
    return None if t is None else _ptr(t, kind)


def block_attention(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, selected: torch.Tensor, first: int,
                    out: torch.Tensor, scale: float, key_valid: Optional[torch.Tensor] = None,
                    always: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                    extra: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                    query_tokens: Optional[torch.Tensor] = None, query_valid: Optional[torch.Tensor] = None) -> None:
    """Run ``spark3r_block_attention_f32`` (see block_attention.c) on query blocks ``first ..
    first + c - 1`` of every head, writing their rows of ``out``.

    ``qb, kb, vb [G, nb, bt, d]`` contiguous block-major queries/keys/values (G = B*H),
    ``selected [G, c, top]`` int64 rows of ``kb`` each query block attends to, ``out [B, H, N,
    d]`` (any strides, last one 1). Optional: ``key_valid [nb, bt]`` bool (False: padding slot,
    no key), ``always`` (keys, values) ``[G, A, d]`` contiguous attended by every block,
    ``extra`` (out ``[G, c, d]``, lse ``[G, c]``) fp32 one more partial result per block merged
    by its log-sum-exp, ``query_tokens [nb, bt]`` int64 output token of each query slot (default:
    block-major order) and ``query_valid [nb, bt]`` bool (False: slot not written)."""
    lib = load("block_attention")
    g_count, nb, bt, d = kb.shape
    b, h = out.shape[0], out.shape[1]
    count, top = selected.shape[1], selected.shape[2]
    assert qb.shape == kb.shape == vb.shape and all(t.is_contiguous() for t in (qb, kb, vb, selected))
    assert g_count == b * h and out.stride(-1) == 1 and d <= BLOCK_ATTENTION_MAX_DIM and d % 8 == 0
    flags = [None if t is None else t.to(torch.uint8).contiguous() for t in (key_valid, query_valid)]
    ak, av = always if always is not None else (None, None)
    eo, el = extra if extra is not None else (None, None)
    for t in (ak, av, eo, el):
        assert t is None or (t.is_contiguous() and t.dtype == torch.float32)
    tokens = None if query_tokens is None else query_tokens.contiguous()
    lib.spark3r_block_attention_f32(
        _ptr(qb, _f32p), _ptr(kb, _f32p), _ptr(vb, _f32p), nb, bt, d, _optional(flags[0], _u8p),
        _optional(ak, _f32p), _optional(av, _f32p), 0 if ak is None else ak.shape[1], g_count, first, count,
        _ptr(selected, _i64p), top, _optional(eo, _f32p), _optional(el, _f32p), _optional(tokens, _i64p),
        _optional(flags[1], _u8p), _ptr(out, _f32p), h, out.stride(0), out.stride(1), out.stride(2), scale)
