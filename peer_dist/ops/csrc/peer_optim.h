/* The row-sparse table optimizers for one (parameter, state) type pair, included once per
   pair by peer_kernels.c with T_ (the parameter and arithmetic type), S_ (the state's storage
   type), LD(x) / ST(x) (state -> T_, T_ -> state), SQRT, SFX (the name suffix) and PSFX (the
   suffix of T_'s dot and axpy) defined, and undefines them all (ERF and EXP too) at its end,
   ready for the next type. No include guard: it is meant to be included more than once. */

#define PFN(name) CAT(name, PSFX)

/* lazy Adam on rows[r0..r1): moments and params of touched rows only, in place */
void FN(adam_rows)(int64_t r0, int64_t r1, int64_t D, const int64_t* rows, const T_* grad,
                   T_* p, S_* m, S_* v, double lr, double b1, double b2, double eps,
                   double bc1, double bc2, const double* row_bc) {
    /* bias corrections bc1, bc2 for every row, or per row (row_bc[2r], row_bc[2r + 1]) */
    const T_ c1 = (T_)(1.0 - b1), c2 = (T_)(1.0 - b2), tb1 = (T_)b1, tb2 = (T_)b2;
    const T_ te = (T_)eps;
    for (int64_t r = r0; r < r1; ++r) {
        const T_ step = (T_)(lr / (row_bc ? row_bc[2 * r] : bc1));
        const T_ ib2 = (T_)(1.0 / (row_bc ? row_bc[2 * r + 1] : bc2));
        int64_t o = rows[r] * D;
        const T_* gr = grad + r * D;
        if (r + PF < r1) {
            int64_t f = rows[r + PF] * D;
            prefetch_row_w(p + f, D * sizeof(T_));
            prefetch_row_w(m + f, D * sizeof(S_));
            prefetch_row_w(v + f, D * sizeof(S_));
        }
        _Pragma("omp simd")
        for (int64_t j = 0; j < D; ++j) {
            T_ gj = gr[j];
            T_ mj = LD(m[o + j]) * tb1 + c1 * gj;
            T_ vj = LD(v[o + j]) * tb2 + c2 * gj * gj;
            m[o + j] = ST(mj);
            v[o + j] = ST(vj);
            p[o + j] -= step * mj / (SQRT(vj * ib2) + te);
        }
    }
}

/* row-wise Adagrad: acc[row] += mean(g^2); p[row] -= lr * g / (sqrt(acc[row]) + eps) */
void FN(adagrad_rows)(int64_t r0, int64_t r1, int64_t D, const int64_t* rows,
                      const T_* grad, T_* p, S_* acc, double lr, double eps) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t e = rows[r];
        const T_* gr = grad + r * D;
        if (r + PF < r1) prefetch_row_w(p + rows[r + PF] * D, D * sizeof(T_));
        T_ a = LD(acc[e]) + PFN(dot)(gr, gr, D) / (T_)D;
        acc[e] = ST(a);
        PFN(axpy)(p + e * D, (T_)(-lr) / (SQRT(a) + (T_)eps), gr, D);
    }
}

#undef PFN
#undef T_
#undef S_
#undef SFX
#undef PSFX
#undef ERF
#undef SQRT
#undef EXP
#undef LD
#undef ST
