/* Fused CPU kernels of the PEER expert mix, product-key selection and the row-sparse table
   optimizers (see peer_dist/ops/cpu.py for what each does and why). Plain C, no torch headers:
   built once per machine by peer_dist/ops/build.py and called through ctypes.

   Shape legend: T = tokens, S = selections per token, D = dim, N = table rows, M = T * S,
   R = unique rows selected. */
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

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SFX)

#define T_ float
#define S_ float
#define SFX f32
#define PSFX f32
#define ERF erff
#define SQRT sqrtf
#define EXP expf
#define LD(x) (x)
#define ST(x) (x)
#include "peer_kernels.h"
#include "peer_optim.h"

#define T_ double
#define S_ double
#define SFX f64
#define PSFX f64
#define ERF erf
#define SQRT sqrt
#define EXP exp
#define LD(x) (x)
#define ST(x) (x)
#include "peer_kernels.h"
#include "peer_optim.h"

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

/* the optimizers on fp32 tables with bf16 state: the same arithmetic as the f32 ones, the
   state upcast on load and rounded on store */
#define T_ float
#define S_ uint16_t
#define SFX bf16
#define PSFX f32
#define SQRT sqrtf
#define LD(x) bf16_f32(x)
#define ST(x) f32_bf16(x)
#include "peer_optim.h"

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
