"""Fused CPU kernels for the PEER expert mix and the row-sparse table optimizers.

Plain C, compiled once with the system C compiler (about a second) into a per-user cache and
called through ctypes on the tensors' memory; no torch headers, so it builds fast and against
any torch version. Every kernel has a pure-PyTorch twin in kernels.py / sparse_optim.py that is
used when no compiler is present, for other devices, and in the tests as the reference.

Why: the PyTorch ops each make a full pass (and a fresh, page-faulting allocation) per step.
Here the selections are grouped by table row once (a counting pass over the ids, no sort), and
forward and backward each walk the unique rows in ascending order: each selected row of U and V
is read once per pass however many tokens chose it, and the backward writes dx, dgates and both
row-sparse table gradients in that same pass. The optimizers update touched rows in place
without (rows, D) temporaries. Product-key selection is one pass per score row.

Work is split over threads by the caller (Python threads; ctypes releases the GIL), so no
second OpenMP runtime is loaded beside torch's.

Shape legend: T = tokens, S = selections per token, D = dim, N = table rows, M = T * S,
R = unique rows selected.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PF 8 /* rows ahead: scattered table rows are latency-bound without prefetch */

static inline void prefetch_row(const void* p, int64_t bytes) {
    const char* c = (const char*)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

static inline void prefetch_row_w(const void* p, int64_t bytes) {
    const char* c = (const char*)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
}

#define GELU_F(s, ERF) (0.5 * (s) * (1.0 + ERF((s) * 0.70710678118654752440)))

#define DEFINE_KERNELS(T_, SFX, ERF, SQRT, EXP)                                                 \
static inline T_ act_##SFX(T_ s, int gelu) { /* ReLU keeps NaN, as torch's does */              \
    return gelu ? (T_)GELU_F(s, ERF) : (s > 0 || s != s ? s : (T_)0);                         \
}                                                                                             \
/* Ordering key for top-k: NaN ranks above every number (as +inf, like torch.topk), so a row  \
   holding NaN still yields k distinct, valid indices, and a NaN score is selected: it reaches \
   the gates and the output instead of being hidden. */                                       \
static inline T_ rank_key_##SFX(T_ x) { return x == x ? x : (T_)INFINITY; }                  \
static inline T_ dact_##SFX(T_ s, int gelu) {                                                 \
    if (!gelu) return s > 0 ? (T_)1 : (T_)0;                                                  \
    return (T_)(0.5 * (1.0 + ERF(s * 0.70710678118654752440))                                 \
                + s * EXP(-0.5 * s * s) * 0.39894228040143267794);                            \
}                                                                                             \
static inline T_ dot_##SFX(const T_* a, const T_* b, int64_t d) {                             \
    T_ acc = 0;                                                                               \
    _Pragma("omp simd reduction(+:acc)")                                                      \
    for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];                                       \
    return acc;                                                                               \
}                                                                                             \
static inline void axpy_##SFX(T_* y, T_ a, const T_* x, int64_t d) {                          \
    _Pragma("omp simd")                                                                       \
    for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];                                         \
}                                                                                             \
/* Row-major forward over unique rows [r0, r1) (sorted ascending, so U and V stream in order,    \
   each row read once however many tokens chose it): pre[i] = u[row] . x[t];                   \
   y[t] += g[i] * act(pre[i]) * v[row] into this thread's own y (T, D). */                     \
void rows_fwd_##SFX(int64_t r0, int64_t r1, int64_t S, int64_t D, const int64_t* rows,        \
                    const int64_t* offsets, const int64_t* order, const T_* x, const T_* g,   \
                    const T_* u, const T_* v, int gelu, T_* pre, T_* y) {                     \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        const T_* ur = u + rows[r] * D;                                                       \
        const T_* vr = v + rows[r] * D;                                                       \
        if (r + PF < r1) {                                                                    \
            prefetch_row(u + rows[r + PF] * D, D * (int64_t)sizeof(T_));                      \
            prefetch_row(v + rows[r + PF] * D, D * (int64_t)sizeof(T_));                      \
        }                                                                                     \
        for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {                               \
            int64_t i = order[k], t = i / S;                                                  \
            T_ p = dot_##SFX(ur, x + t * D, D);                                               \
            pre[i] = p;                                                                       \
            axpy_##SFX(y + t * D, g[i] * act_##SFX(p, gelu), vr, D);                          \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* Row-major backward: per unique row, dw = v . dy[t], dgates, dx[t] += ds * u (this thread's \
   own dx), and the row's table gradients du[r] = sum ds * x[t], dv[r] = sum g a dy[t]. */    \
void rows_bwd_##SFX(int64_t r0, int64_t r1, int64_t S, int64_t D, const int64_t* rows,        \
                    const int64_t* offsets, const int64_t* order, const T_* x, const T_* dy,  \
                    const T_* g, const T_* pre, const T_* u, const T_* v, int gelu, T_* dg,   \
                    T_* du, T_* dv, T_* dx) {                                                 \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        const T_* ur = u + rows[r] * D;                                                       \
        const T_* vr = v + rows[r] * D;                                                       \
        if (r + PF < r1) {                                                                    \
            prefetch_row(u + rows[r + PF] * D, D * (int64_t)sizeof(T_));                      \
            prefetch_row(v + rows[r + PF] * D, D * (int64_t)sizeof(T_));                      \
        }                                                                                     \
        T_* dur = du + r * D;                                                                 \
        T_* dvr = dv + r * D;                                                                 \
        memset(dur, 0, sizeof(T_) * D);                                                       \
        memset(dvr, 0, sizeof(T_) * D);                                                       \
        for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {                               \
            int64_t i = order[k], t = i / S;                                                  \
            T_ dw = dot_##SFX(vr, dy + t * D, D);                                             \
            T_ a = act_##SFX(pre[i], gelu);                                                   \
            T_ ds = dw * g[i] * dact_##SFX(pre[i], gelu);                                     \
            dg[i] = dw * a;                                                                   \
            axpy_##SFX(dx + t * D, ds, ur, D);                                                \
            axpy_##SFX(dur, ds, x + t * D, D);                                                \
            axpy_##SFX(dvr, g[i] * a, dy + t * D, D);                                         \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* lazy Adam on rows[r0..r1): moments and params of touched rows only, in place */            \
void adam_rows_##SFX(int64_t r0, int64_t r1, int64_t D, const int64_t* rows, const T_* grad,  \
                     T_* p, T_* m, T_* v, double lr, double b1, double b2, double eps,        \
                     double bc1, double bc2) {                                                \
    const T_ step = (T_)(lr / bc1), ib2 = (T_)(1.0 / bc2);                                    \
    const T_ c1 = (T_)(1.0 - b1), c2 = (T_)(1.0 - b2), tb1 = (T_)b1, tb2 = (T_)b2;           \
    const T_ te = (T_)eps;                                                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        int64_t o = rows[r] * D;                                                              \
        const T_* gr = grad + r * D;                                                          \
        if (r + PF < r1) {                                                                    \
            int64_t f = rows[r + PF] * D;                                                     \
            prefetch_row_w(p + f, D * sizeof(T_));                                            \
            prefetch_row_w(m + f, D * sizeof(T_));                                            \
            prefetch_row_w(v + f, D * sizeof(T_));                                            \
        }                                                                                     \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < D; ++j) {                                                     \
            T_ gj = gr[j];                                                                    \
            T_ mj = m[o + j] * tb1 + c1 * gj;                                                 \
            T_ vj = v[o + j] * tb2 + c2 * gj * gj;                                            \
            m[o + j] = mj;                                                                    \
            v[o + j] = vj;                                                                    \
            p[o + j] -= step * mj / (SQRT(vj * ib2) + te);                                    \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* top-k (sorted, descending) of a[lo..hi) merged into val/idx (m of k filled); ties keep   \
   the lower index */                                                                         \
static inline int64_t topk_scan_##SFX(const T_* a, int64_t lo, int64_t hi, int64_t k,         \
                                      int64_t m, T_* val, int64_t* idx) {                     \
    for (int64_t i = lo; i < hi; ++i) {                                                       \
        T_ x = rank_key_##SFX(a[i]);                                                          \
        if (m == k && !(x > val[k - 1])) continue;                                            \
        int64_t j = m < k ? m++ : k - 1;                                                      \
        while (j > 0 && x > val[j - 1]) { val[j] = val[j - 1]; idx[j] = idx[j - 1]; --j; }    \
        val[j] = x; idx[j] = i;                                                               \
    }                                                                                         \
    return m;                                                                                 \
}                                                                                             \
/* top-k of a length-n row. An insertion scan over the whole row mispredicts about once per  \
   insertion, so first bound the answer: split the row into k groups, whose k maxima are k    \
   distinct elements, so tau = the least group maximum is <= the k-th largest. Only elements  \
   >= tau (about 3k for random scores) go through the insertion scan, found branch-free.      \
   Ties keep the lower index first, as in the plain scan. */                                  \
static inline void topk_row_##SFX(const T_* a, int64_t n, int64_t k, T_* val, int64_t* idx) { \
    if (n < 4 * k || n > 4096) { topk_scan_##SFX(a, 0, n, k, 0, val, idx); return; }         \
    int64_t g = n / k;                                                                        \
    T_ tau = 0;                                                                               \
    for (int64_t q = 0; q < k; ++q) {                                                         \
        int64_t lo = q * g, hi = q == k - 1 ? n : lo + g;                                     \
        T_ mx = rank_key_##SFX(a[lo]);                                                        \
        _Pragma("omp simd reduction(max:mx)")                                                 \
        for (int64_t i = lo; i < hi; ++i) {                                                   \
            T_ x = rank_key_##SFX(a[i]);                                                      \
            mx = x > mx ? x : mx;                                                             \
        }                                                                                     \
        tau = q == 0 || mx < tau ? mx : tau;                                                  \
    }                                                                                         \
    int64_t ci[n], c = 0, m = 0;                                                              \
    for (int64_t i = 0; i < n; ++i) { ci[c] = i; c += rank_key_##SFX(a[i]) >= tau; }          \
    for (int64_t j = 0; j < c; ++j) m = topk_scan_##SFX(a, ci[j], ci[j] + 1, k, m, val, idx); \
}                                                                                             \
/* Product-key selection for rows (h, t), h*T + t in [r0, r1): scores (2H, T, n) -> the      \
   exact top-k pairs among candidate pairs (pi, pj) of the two sorted top-k lists;           \
   sel1, sel2 (H, T, k) sub-key ids. */                                                       \
void pk_select_##SFX(int64_t r0, int64_t r1, int64_t T, int64_t n, int64_t k,                 \
                     int64_t P, const T_* scores, const int64_t* pi, const int64_t* pj,       \
                     int64_t* sel1, int64_t* sel2) {                                          \
    T_ v1[k], v2[k], cv[k];                                                                   \
    int64_t i1[k], i2[k], ci[k];                                                              \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        int64_t h = r / T, t = r % T;                                                         \
        topk_row_##SFX(scores + ((2 * h) * T + t) * n, n, k, v1, i1);                         \
        topk_row_##SFX(scores + ((2 * h + 1) * T + t) * n, n, k, v2, i2);                     \
        T_ cand[P];                                                                           \
        for (int64_t c = 0; c < P; ++c) cand[c] = v1[pi[c]] + v2[pj[c]];                      \
        topk_row_##SFX(cand, P, k, cv, ci);                                                   \
        for (int64_t j = 0; j < k; ++j) {                                                     \
            sel1[r * k + j] = i1[pi[ci[j]]];                                                  \
            sel2[r * k + j] = i2[pj[ci[j]]];                                                  \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* Sub-key gradient for channels c in [c0, c1): dkeys[c, sel[c,t,j]] += g[c,t,j] * q[c,t];   \
   dkeys (C, n, Qh) zeroed by the caller; q (C, T, Qh) */                                     \
void key_grad_##SFX(int64_t c0, int64_t c1, int64_t T, int64_t n, int64_t k, int64_t Q,       \
                    const int64_t* sel, const T_* g, const T_* q, T_* dkeys) {                \
    for (int64_t c = c0; c < c1; ++c)                                                         \
        for (int64_t t = 0; t < T; ++t)                                                       \
            for (int64_t j = 0; j < k; ++j) {                                                 \
                int64_t i = (c * T + t) * k + j;                                              \
                axpy_##SFX(dkeys + (c * n + sel[i]) * Q, g[i], q + (c * T + t) * Q, Q);       \
            }                                                                                 \
}                                                                                             \
/* row-wise Adagrad: acc[row] += mean(g^2); p[row] -= lr * g / (sqrt(acc[row]) + eps) */      \
void adagrad_rows_##SFX(int64_t r0, int64_t r1, int64_t D, const int64_t* rows,               \
                        const T_* grad, T_* p, T_* acc, double lr, double eps) {              \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        int64_t e = rows[r];                                                                  \
        const T_* gr = grad + r * D;                                                          \
        if (r + PF < r1) prefetch_row_w(p + rows[r + PF] * D, D * sizeof(T_));               \
        T_ a = acc[e] + dot_##SFX(gr, gr, D) / (T_)D;                                         \
        acc[e] = a;                                                                           \
        axpy_##SFX(p + e * D, (T_)(-lr) / (SQRT(a) + (T_)eps), gr, D);                        \
    }                                                                                         \
}

DEFINE_KERNELS(float, f32, erff, sqrtf, expf)
DEFINE_KERNELS(double, f64, erf, sqrt, exp)

/* bf16 optimizer state beside fp32 tables: a bf16 value is the upper 16 bits of an fp32 one.
   Rows are upcast, updated in fp32 and written back rounded to nearest, ties to even (as
   torch's .to(torch.bfloat16)); NaN stays NaN (quiet bit set, not rounded into infinity). */
static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* lazy Adam, fp32 p and grad, bf16 m and v; same arithmetic as adam_rows_f32 */
void adam_rows_bf16(int64_t r0, int64_t r1, int64_t D, const int64_t* rows, const float* grad,
                    float* p, uint16_t* m, uint16_t* v, double lr, double b1, double b2,
                    double eps, double bc1, double bc2) {
    const float step = (float)(lr / bc1), ib2 = (float)(1.0 / bc2);
    const float c1 = (float)(1.0 - b1), c2 = (float)(1.0 - b2), tb1 = (float)b1, tb2 = (float)b2;
    const float te = (float)eps;
    for (int64_t r = r0; r < r1; ++r) {
        int64_t o = rows[r] * D;
        const float* gr = grad + r * D;
        if (r + PF < r1) {
            int64_t f = rows[r + PF] * D;
            prefetch_row_w(p + f, D * sizeof(float));
            prefetch_row_w(m + f, D * sizeof(uint16_t));
            prefetch_row_w(v + f, D * sizeof(uint16_t));
        }
        _Pragma("omp simd")
        for (int64_t j = 0; j < D; ++j) {
            float gj = gr[j];
            float mj = bf16_f32(m[o + j]) * tb1 + c1 * gj;
            float vj = bf16_f32(v[o + j]) * tb2 + c2 * gj * gj;
            m[o + j] = f32_bf16(mj);
            v[o + j] = f32_bf16(vj);
            p[o + j] -= step * mj / (sqrtf(vj * ib2) + te);
        }
    }
}

/* row-wise Adagrad, fp32 p and grad, bf16 acc (N,) */
void adagrad_rows_bf16(int64_t r0, int64_t r1, int64_t D, const int64_t* rows,
                       const float* grad, float* p, uint16_t* acc, double lr, double eps) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t e = rows[r];
        const float* gr = grad + r * D;
        if (r + PF < r1) prefetch_row_w(p + rows[r + PF] * D, D * sizeof(float));
        float a = bf16_f32(acc[e]) + dot_f32(gr, gr, D) / (float)D;
        acc[e] = f32_bf16(a);
        axpy_f32(p + e * D, (float)(-lr) / (sqrtf(a) + (float)eps), gr, D);
    }
}

/* Fault a fresh buffer in from one thread, one write per page: huge-page faults taken by
   several threads at once measured 8x slower here than from one. */
void touch_pages(char* p, int64_t nbytes, int64_t page) {
    for (int64_t o = 0; o < nbytes; o += page) p[o] = 0;
}

/* Counting sort of M ids in [0, N): count (N, zeroed by the caller) is left holding each
   row's start offset. Writes rows (R), offsets (R+1) and order (M: selections by row, stable);
   returns R, or -1 (nothing written but counts) when an id is out of range. */
int64_t group_rows(int64_t M, int64_t N, const int64_t* ids, int64_t* count, int64_t* rows,
                   int64_t* offsets, int64_t* order) {
    /* ids are checked here, before any table row is touched: -1 if one lies outside [0, N) */
    for (int64_t i = 0; i < M; ++i) {
        if ((uint64_t)ids[i] >= (uint64_t)N) return -1;
        count[ids[i]]++;
    }
    int64_t R = 0, pos = 0;
    for (int64_t e = 0; e < N; ++e) {
        int64_t c = count[e];
        if (c) { rows[R] = e; offsets[R] = pos; ++R; }
        count[e] = pos;
        pos += c;
    }
    offsets[R] = pos;
    for (int64_t i = 0; i < M; ++i) order[count[ids[i]]++] = i;
    return R;
}
"""

_I64, _F64 = ctypes.c_int64, ctypes.c_double
_P = ctypes.c_void_p
_SIGNATURES = {
    "adam_rows": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _F64, _F64, _F64, _F64, _F64, _F64],
    "adagrad_rows": [_I64, _I64, _I64, _P, _P, _P, _P, _F64, _F64],
    "rows_fwd": [_I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P],
    "rows_bwd": [_I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P,
                 _P, _P, _P],
    "pk_select": [_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P],
    "key_grad": [_I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled: bool | None = None  # None: use when it builds; False: never; True: must build
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cache_dir() -> Path:
    root = os.environ.get("PEER_DIST_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peer_dist")
    return Path(root)


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
    key = hashlib.sha256(f"{_SOURCE}{flags}{platform.machine()}{cc}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"peer_kernels_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            for fl in (flags, [f for f in flags if f != "-march=native"]):
                done = subprocess.run([cc, *fl, str(src), "-o", str(out), "-lm"],
                                      capture_output=True, text=True)
                if done.returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders agree
                    break
            else:
                return None
    lib = ctypes.CDLL(str(target))
    for name, args in _SIGNATURES.items():
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes, fn.restype = args, None
    for name in ("adam_rows", "adagrad_rows"):  # fp32 tables, bf16 optimizer state
        fn = getattr(lib, f"{name}_bf16")
        fn.argtypes, fn.restype = _SIGNATURES[name], None
    lib.group_rows.argtypes = [_I64, _I64, _P, _P, _P, _P, _P]
    lib.group_rows.restype = _I64
    lib.touch_pages.argtypes = [_P, _I64, _I64]
    lib.touch_pages.restype = None
    return lib


def use_fused_cpu(enabled: bool | None) -> None:
    """Force the fused CPU kernels on (True: error if they cannot be built), off (False), or
    back to the default (None: on when a C compiler is present)."""
    global _enabled
    _enabled = enabled


def library() -> ctypes.CDLL | None:
    global _lib, _tried
    if _enabled is False:
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except OSError:
                _lib = None
    if _lib is None and _enabled:
        raise RuntimeError("fused CPU kernels were requested but could not be built: "
                           "is a C compiler (cc/gcc) on PATH?")
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can take these tensors (CPU, fp32/fp64, one dtype)."""
    float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return (len(float_dtypes) == 1 and float_dtypes <= {torch.float32, torch.float64}
            and all(t.device.type == "cpu" for t in tensors) and library() is not None)


def usable_bf16_state(p: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> bool:
    """True when the fused optimizer kernels can update fp32 p with grad and bf16 state."""
    return (p.dtype == grad.dtype == torch.float32
            and all(t.dtype == torch.bfloat16 for t in state)
            and all(t.device.type == "cpu" for t in (p, grad, *state)) and library() is not None)


_MADV_HUGEPAGE = 14
_HUGE_MIN_BYTES = 4 << 20
_libc: ctypes.CDLL | None | bool = None


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.empty, but a large buffer is marked for transparent huge pages and faulted in from
    one thread: the gradient rows are fresh memory every step, and faulting them in 2 MiB pages
    instead of 4 KiB ones measured 2.4x faster here (the contents stay undefined, as with
    torch.empty). Plain torch.empty where madvise is unavailable."""
    global _libc
    out = torch.empty(*shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes < _HUGE_MIN_BYTES or _libc is False:
        return out
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
            return out
    start = (out.data_ptr() + 4095) & ~4095
    stop = (out.data_ptr() + nbytes) & ~4095
    _libc.madvise(start, stop - start, _MADV_HUGEPAGE)  # advice only: failure is harmless
    lib = library()
    if lib is not None:
        lib.touch_pages(out.data_ptr(), nbytes, 4096)
    return out


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Large scratch and gradient buffers, handed out again once nobody else holds them.

    Fresh memory costs a page fault per page on first touch (the gradient rows alone are
    2 * R * D * 4 bytes per layer and step): a buffer whose storage is referenced only by this
    pool (the previous step's grads were freed) is reused instead. Reuse is decided by the
    storage reference count, so a buffer still held anywhere (a .grad kept for accumulation,
    a user's reference) is never handed out twice.
    """

    def __init__(self, max_buffers: int = 16, headroom: float = 1.02, min_bytes: int = 1 << 20):
        self.max_buffers, self.headroom, self.min_bytes = max_buffers, headroom, min_bytes
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (flat buffer, refs when idle)
        self._lock = threading.Lock()
        try:
            _storage_refs(torch.empty(1))
            self.enabled = True
        except (AttributeError, RuntimeError):  # private API gone: allocate every time
            self.enabled = False

    def take(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if not self.enabled or nbytes < self.min_bytes:
            return empty(*shape, dtype=dtype)
        with self._lock:  # the idle check and the hand-out (a new view) must be one step
            for buf, idle in self._bufs:
                if buf.dtype == dtype and buf.numel() >= numel and _storage_refs(buf) == idle:
                    return buf[:numel].view(shape)
            # idle buffers too small for this request would only add to the peak: let them go
            self._bufs = [(b, idle) for b, idle in self._bufs
                          if b.dtype != dtype or b.numel() >= numel or _storage_refs(b) != idle]
            buf = empty(int(numel * self.headroom), dtype=dtype)
            self._bufs.append((buf, _storage_refs(buf)))
            if len(self._bufs) > self.max_buffers:  # drop the oldest idle one
                for i, (b, idle) in enumerate(self._bufs):
                    if _storage_refs(b) == idle:
                        del self._bufs[i]
                        break
            return buf[:numel].view(shape)

    def clear(self) -> None:
        """Let the idle buffers go (memory held between steps returns to the system)."""
        with self._lock:
            self._bufs.clear()


pool = BufferPool()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _parallel(fn, total: int, *args, grain: int = 16) -> None:
    """fn(lo, hi, *args) over [0, total) split into torch.get_num_threads() ranges of at
    least `grain` items."""
    nt = max(1, min(torch.get_num_threads(), total // grain))
    if nt == 1:
        fn(0, total, *args)
        return
    bounds = [total * i // nt for i in range(nt + 1)]
    _run_all(fn, [(bounds[i], bounds[i + 1], *args) for i in range(nt)])


def _parallel_partials(fn, total: int, out: torch.Tensor, *args, grain: int = 64) -> torch.Tensor:
    """Like _parallel, but each range accumulates into its own zeroed copy of `out` (passed
    as fn's last argument); returns their sum. For scattered adds without atomics."""
    nt = max(1, min(torch.get_num_threads(), total // grain))
    if nt == 1:
        out.zero_()
        fn(0, total, *args, _ptr(out))
        return out
    parts = torch.zeros(nt, *out.shape, dtype=out.dtype)
    bounds = [total * i // nt for i in range(nt + 1)]
    calls = [(bounds[i], bounds[i + 1], *args, _ptr(parts[i])) for i in range(nt)]
    _run_all(fn, calls)
    return torch.sum(parts, dim=0, out=out)


def _run_all(fn, calls: list[tuple]) -> None:
    global _pool, _pool_size
    if _pool is None or _pool_size < len(calls):
        _pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="peer_kernel")
        _pool_size = len(calls)
    for f in [_pool.submit(fn, *c) for c in calls]:
        f.result()


def group_rows(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (M,) in [0, n) -> rows (R,) sorted unique, offsets (R+1,), order (M,)."""
    m = ids.numel()
    count = pool.take(n, dtype=torch.int64).zero_()
    rows = torch.empty(m, dtype=torch.int64)
    offsets = torch.empty(m + 1, dtype=torch.int64)
    order = torch.empty(m, dtype=torch.int64)
    r = library().group_rows(m, n, _ptr(ids), _ptr(count), _ptr(rows), _ptr(offsets),
                             _ptr(order))
    if r < 0:
        raise IndexError(f"expert ids must lie in [0, {n}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]")
    return rows[:r], offsets[:r + 1], order


def check_rows(rows: torch.Tensor, n: int, what: str) -> None:
    """IndexError unless every row index lies in [0, n): checked before a kernel touches one."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"{what} must lie in [0, {n}), got [{int(rows.min())}, "
                         f"{int(rows.max())}]")


class Groups:
    """Selections grouped by table row (counting sort): rows (R,) ascending, offsets (R+1,),
    order (M,) selection indices by row. Built once in forward, reused in backward."""

    def __init__(self, ids: torch.Tensor, n: int):
        self.rows, self.offsets, self.order = group_rows(ids.reshape(-1), n)


def rows_forward(groups: Groups, x, ids, gates, u, v, gelu: bool):
    """Row-major forward: -> y (T, D), pre-activations (T, S)."""
    t, s = ids.shape
    pre = torch.empty(t, s, dtype=x.dtype)
    y = torch.empty(t, x.shape[1], dtype=x.dtype)
    fn = getattr(library(), f"rows_fwd_{_sfx(x)}")
    y = _parallel_partials(fn, groups.rows.numel(), y, s, x.shape[1], _ptr(groups.rows),
                           _ptr(groups.offsets), _ptr(groups.order), _ptr(x), _ptr(gates),
                           _ptr(u), _ptr(v), int(gelu), _ptr(pre))
    return y, pre


def rows_backward(groups: Groups, x, dy, ids, gates, pre, u, v, gelu: bool):
    """Row-major backward: -> dx (T, D), dgates (T, S), du (R, D), dv (R, D)."""
    t, s = ids.shape
    d, r = x.shape[1], groups.rows.numel()
    dg = torch.empty(t, s, dtype=x.dtype)
    du, dv = pool.take(r, d, dtype=x.dtype), pool.take(r, d, dtype=x.dtype)
    dx = torch.empty(t, d, dtype=x.dtype)
    fn = getattr(library(), f"rows_bwd_{_sfx(x)}")
    dx = _parallel_partials(fn, r, dx, s, d, _ptr(groups.rows), _ptr(groups.offsets),
                            _ptr(groups.order), _ptr(x), _ptr(dy), _ptr(gates), _ptr(pre),
                            _ptr(u), _ptr(v), int(gelu), _ptr(dg), _ptr(du), _ptr(dv))
    return dx, dg, du, dv


def _sfx(t: torch.Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _state_sfx(p: torch.Tensor, state: torch.Tensor) -> str:
    """Kernel suffix for optimizer tables: bf16 for bf16 state (fp32 p), else p's dtype."""
    return "bf16" if state.dtype == torch.bfloat16 else _sfx(p)


def _check_row_update(p, rows, grad, *state) -> None:
    """Shapes and row ids of an in-place row update, checked before the kernel runs."""
    if grad.shape != (rows.numel(), p.shape[1]) or any(s.shape[0] != p.shape[0] for s in state):
        raise ValueError(f"row update: grad {tuple(grad.shape)} for {rows.numel()} rows of a "
                         f"{tuple(p.shape)} table; allowed is grad (rows, {p.shape[1]})")
    check_rows(rows, p.shape[0], "gradient rows")


def adam_rows(p, m, v, rows, grad, lr: float, b1: float, b2: float, eps: float, bc1: float,
              bc2: float) -> None:
    """Lazy Adam in place on p, m, v (N, D) for unique rows (R,) with grad (R, D); m and v
    have p's dtype, or are bf16 beside fp32 p."""
    _check_row_update(p, rows, grad, m, v)
    fn = getattr(library(), f"adam_rows_{_state_sfx(p, m)}")
    _parallel(fn, rows.numel(), p.shape[1], _ptr(rows), _ptr(grad), _ptr(p), _ptr(m), _ptr(v),
              lr, b1, b2, eps, bc1, bc2)


def adagrad_rows(p, acc, rows, grad, lr: float, eps: float) -> None:
    """Row-wise Adagrad in place on p (N, D), acc (N,) for unique rows (R,), grad (R, D);
    acc has p's dtype, or is bf16 beside fp32 p."""
    _check_row_update(p, rows, grad, acc)
    fn = getattr(library(), f"adagrad_rows_{_state_sfx(p, acc)}")
    _parallel(fn, rows.numel(), p.shape[1], _ptr(rows), _ptr(grad), _ptr(p), _ptr(acc), lr, eps)


def pk_select(scores: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (2H, T, n) contiguous -> sub-key ids sel1, sel2 (H, T, k) of the exact top-k
    among the candidate pairs (pi[c], pj[c]) of each head's two sorted top-k lists."""
    c, t, n = scores.shape
    h = c // 2
    sel1 = torch.empty(h, t, k, dtype=torch.int64)
    sel2 = torch.empty(h, t, k, dtype=torch.int64)
    fn = getattr(library(), f"pk_select_{_sfx(scores)}")
    _parallel(fn, h * t, t, n, k, pi.numel(), _ptr(scores), _ptr(pi), _ptr(pj), _ptr(sel1),
              _ptr(sel2))
    return sel1, sel2


def key_grad(sel: torch.Tensor, grad: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """sel (C, T, K), grad (C, T, K), q (C, T, Qh) contiguous -> dkeys (C, n, Qh)."""
    c, t, k = sel.shape
    check_rows(sel, n, "sub-key ids")
    dkeys = torch.zeros(c, n, q.shape[-1], dtype=q.dtype)
    fn = getattr(library(), f"key_grad_{_sfx(q)}")
    _parallel(fn, c, t, n, k, q.shape[-1], _ptr(sel), _ptr(grad), _ptr(q), _ptr(dkeys),
              grain=1)
    return dkeys
