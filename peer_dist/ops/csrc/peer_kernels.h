/* The PEER kernels for one floating type, included once per type by peer_kernels.c with
   T_ (the type), SFX (the name suffix: f32, f64) and ERF, SQRT, EXP (its math functions)
   defined; FN(name) gives name_SFX. No include guard: it is meant to be included twice. */

static inline T_ FN(act)(T_ s, int gelu) { /* ReLU keeps NaN, as torch's does */
    return gelu ? (T_)GELU_F(s, ERF) : (s > 0 || s != s ? s : (T_)0);
}
/* Ordering key for top-k: NaN ranks above every number (as +inf, like torch.topk), so a row
   holding NaN still yields k distinct, valid indices, and a NaN score is selected: it reaches
   the gates and the output instead of being hidden. */
static inline T_ FN(rank_key)(T_ x) { return x == x ? x : (T_)INFINITY; }
static inline T_ FN(dact)(T_ s, int gelu) {
    if (!gelu) return s > 0 ? (T_)1 : (T_)0;
    return (T_)(0.5 * (1.0 + ERF(s * 0.70710678118654752440))
                + s * EXP(-0.5 * s * s) * 0.39894228040143267794);
}
static inline T_ FN(dot)(const T_* a, const T_* b, int64_t d) {
    T_ acc = 0;
    _Pragma("omp simd reduction(+:acc)")
    for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];
    return acc;
}
static inline void FN(axpy)(T_* y, T_ a, const T_* x, int64_t d) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}
/* the U and V rows PF unique rows ahead of r, before r1 */
static inline void FN(prefetch_uv)(const T_* u, const T_* v, const int64_t* rows, int64_t r,
                                   int64_t r1, int64_t D) {
    if (r + PF < r1) {
        prefetch_row(u + rows[r + PF] * D, D * (int64_t)sizeof(T_));
        prefetch_row(v + rows[r + PF] * D, D * (int64_t)sizeof(T_));
    }
}
/* Row-major forward over unique rows [r0, r1) (sorted ascending, so U and V stream in order,
   each row read once however many tokens chose it): pre[i] = u[row] . x[t];
   y[t] += g[i] * act(pre[i]) * v[row] into this thread's own y (P, D). The k-th selection in
   row order is i = order[k], of token (or bag) t = bag[k]; every t lies in [0, P). */
void FN(rows_fwd)(int64_t r0, int64_t r1, int64_t D, const int64_t* rows,
                    const int64_t* offsets, const int64_t* order, const int64_t* bag,
                    const T_* x, const T_* g, const T_* u, const T_* v, int gelu, T_* pre,
                    T_* y) {
    for (int64_t r = r0; r < r1; ++r) {
        const T_* ur = u + rows[r] * D;
        const T_* vr = v + rows[r] * D;
        FN(prefetch_uv)(u, v, rows, r, r1, D);
        for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {
            int64_t i = order[k], t = bag[k];
            T_ p = FN(dot)(ur, x + t * D, D);
            pre[i] = p;
            FN(axpy)(y + t * D, g[i] * FN(act)(p, gelu), vr, D);
        }
    }
}
/* Row-major backward: per unique row, dw = v . dy[t], dgates, dx[t] += ds * u (this thread's
   own dx), and the row's table gradients du[r] = c sum ds * x[t], dv[r] = c sum g a dy[t]; t as
   in rows_fwd. c (table_scale) scales the table gradients only, at the cost of two products per
   selection (a sharded layer's 1/W: no pass over the rows afterwards). */
void FN(rows_bwd)(int64_t r0, int64_t r1, int64_t D, const int64_t* rows,
                    const int64_t* offsets, const int64_t* order, const int64_t* bag,
                    const T_* x, const T_* dy, const T_* g, const T_* pre, const T_* u,
                    const T_* v, int gelu, double table_scale, T_* dg, T_* du, T_* dv,
                    T_* dx) {
    const T_ c = (T_)table_scale;
    for (int64_t r = r0; r < r1; ++r) {
        const T_* ur = u + rows[r] * D;
        const T_* vr = v + rows[r] * D;
        FN(prefetch_uv)(u, v, rows, r, r1, D);
        T_* dur = du + r * D;
        T_* dvr = dv + r * D;
        memset(dur, 0, sizeof(T_) * D);
        memset(dvr, 0, sizeof(T_) * D);
        for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {
            int64_t i = order[k], t = bag[k];
            T_ dw = FN(dot)(vr, dy + t * D, D);
            T_ a = FN(act)(pre[i], gelu);
            T_ ds = dw * g[i] * FN(dact)(pre[i], gelu);
            dg[i] = dw * a;
            FN(axpy)(dx + t * D, ds, ur, D);
            FN(axpy)(dur, ds * c, x + t * D, D);
            FN(axpy)(dvr, g[i] * a * c, dy + t * D, D);
        }
    }
}
/* top-k (sorted, descending) of a[lo..hi) merged into val/idx (m of k filled); ties keep
   the lower index */
static inline int64_t FN(topk_scan)(const T_* a, int64_t lo, int64_t hi, int64_t k,
                                      int64_t m, T_* val, int64_t* idx) {
    for (int64_t i = lo; i < hi; ++i) {
        T_ x = FN(rank_key)(a[i]);
        if (m == k && !(x > val[k - 1])) continue;
        int64_t j = m < k ? m++ : k - 1;
        while (j > 0 && x > val[j - 1]) { val[j] = val[j - 1]; idx[j] = idx[j - 1]; --j; }
        val[j] = x; idx[j] = i;
    }
    return m;
}
/* top-k of a length-n row. An insertion scan over the whole row mispredicts about once per
   insertion, so first bound the answer: split the row into k groups, whose k maxima are k
   distinct elements, so tau = the least group maximum is <= the k-th largest. Only elements
   >= tau (about 3k for random scores) go through the insertion scan, found branch-free.
   Ties keep the lower index first, as in the plain scan. */
static inline void FN(topk_row)(const T_* a, int64_t n, int64_t k, T_* val, int64_t* idx) {
    if (n < 4 * k || n > 4096) { FN(topk_scan)(a, 0, n, k, 0, val, idx); return; }
    int64_t g = n / k;
    T_ tau = 0;
    for (int64_t q = 0; q < k; ++q) {
        int64_t lo = q * g, hi = q == k - 1 ? n : lo + g;
        T_ mx = FN(rank_key)(a[lo]);
        _Pragma("omp simd reduction(max:mx)")
        for (int64_t i = lo; i < hi; ++i) {
            T_ x = FN(rank_key)(a[i]);
            mx = x > mx ? x : mx;
        }
        tau = q == 0 || mx < tau ? mx : tau;
    }
    int64_t ci[n], c = 0, m = 0;
    for (int64_t i = 0; i < n; ++i) { ci[c] = i; c += FN(rank_key)(a[i]) >= tau; }
    for (int64_t j = 0; j < c; ++j) m = FN(topk_scan)(a, ci[j], ci[j] + 1, k, m, val, idx);
}
/* Product-key selection for rows (h, t), h*T + t in [r0, r1): scores (2H, T, n) -> the
   exact top-k pairs among candidate pairs (pi, pj) of the two sorted top-k lists;
   sel1, sel2 (H, T, k) sub-key ids. */
void FN(pk_select)(int64_t r0, int64_t r1, int64_t T, int64_t n, int64_t k,
                     int64_t P, const T_* scores, const int64_t* pi, const int64_t* pj,
                     int64_t* sel1, int64_t* sel2) {
    if (k < 1 || k > n || P < k) { /* no k distinct sub-keys: valid ids (0), never garbage */
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t j = 0; j < (k > 0 ? k : 0); ++j) sel1[r * k + j] = sel2[r * k + j] = 0;
        return;
    }
    T_ v1[k], v2[k], cv[k];
    int64_t i1[k], i2[k], ci[k];
    for (int64_t r = r0; r < r1; ++r) {
        int64_t h = r / T, t = r % T;
        FN(topk_row)(scores + ((2 * h) * T + t) * n, n, k, v1, i1);
        FN(topk_row)(scores + ((2 * h + 1) * T + t) * n, n, k, v2, i2);
        T_ cand[P];
        for (int64_t c = 0; c < P; ++c) cand[c] = v1[pi[c]] + v2[pj[c]];
        FN(topk_row)(cand, P, k, cv, ci);
        for (int64_t j = 0; j < k; ++j) {
            sel1[r * k + j] = i1[pi[ci[j]]];
            sel2[r * k + j] = i2[pj[ci[j]]];
        }
    }
}
/* Sub-key gradient for channels c in [c0, c1): dkeys[c, sel[c,t,j]] += g[c,t,j] * q[c,t];
   dkeys (C, n, Qh) zeroed by the caller; q (C, T, Qh) */
void FN(key_grad)(int64_t c0, int64_t c1, int64_t T, int64_t n, int64_t k, int64_t Q,
                    const int64_t* sel, const T_* g, const T_* q, T_* dkeys) {
    for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < k; ++j) {
                int64_t i = (c * T + t) * k + j;
                FN(axpy)(dkeys + (c * n + sel[i]) * Q, g[i], q + (c * T + t) * Q, Q);
            }
}
