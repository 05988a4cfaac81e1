"""C source of the fused CPU selective scan, compiled on first use by `kernels.cpu.build`.

Kept as a Python string so that it ships with the package like any module. One (batch, d) row is
one independent recurrence: rows are spread over OpenMP threads, the state of a row (n floats)
stays in cache, and the loop over n is vectorised (expf through glibc's libmvec under -ffast-math).
Nothing of size (batch, d, L, n) is ever allocated: the forward keeps the state entering each chunk,
the backward recomputes one chunk of states at a time from it and runs the adjoint recurrence.

Layouts (fp32, contiguous): u, delta, z, out, du, ddelta, dz (batch, d, L); A (d, n); D, delta_bias
(d,); B and C either fixed (d, n) or input-dependent (batch, groups, L, n); chunk_states
(batch, d, n_chunks, n); last_state, dlast (batch, d, n).
"""

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float softplus_f(float x) { return x > 20.f ? x : logf(1.f + expf(x)); }
static inline float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

typedef struct {
    int64_t batch, dim, L, n, groups, chunk, n_chunks;
    const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;
    int B_fixed, C_fixed, softplus;
} scan_args;

/* Pointer to the (L, n) block of B or C read by row (b, d), and its step stride (0 when fixed). */
static inline const float *bc_row(const float *X, int fixed, const scan_args *a, int64_t b, int64_t d,
                                  int64_t *step) {
    if (fixed) { *step = 0; return X + d * a->n; }
    int64_t g = d / (a->dim / a->groups);
    *step = a->n;
    return X + (b * a->groups + g) * a->L * a->n;
}

/* delta after bias and softplus for len steps, and softplus' = sigmoid(raw) when wanted. Separate
   loops over t so that the transcendental functions vectorise instead of sitting in the recurrence. */
static void prepare_delta(const scan_args *a, const float *restrict raw, float bias, int64_t len,
                          float *restrict dt, float *restrict dsoftplus) {
    if (!a->softplus) {
        for (int64_t i = 0; i < len; ++i) dt[i] = raw[i] + bias;
        if (dsoftplus) for (int64_t i = 0; i < len; ++i) dsoftplus[i] = 1.f;
        return;
    }
    for (int64_t i = 0; i < len; ++i) dt[i] = softplus_f(raw[i] + bias);
    if (dsoftplus) for (int64_t i = 0; i < len; ++i) dsoftplus[i] = sigmoid_f(raw[i] + bias);
}

/* h <- exp(dt A) h + dt u B for one step; returns C . h. If a_out, also keeps exp(dt A). */
static inline float scan_step(int64_t n, float dt, float ut, const float *restrict Ad, const float *restrict Bt,
                              const float *restrict Ct, const float *restrict h_in, float *restrict h_out,
                              float *restrict a_out) {
    const float dtu = dt * ut;
    float y = 0.f;
    for (int64_t k = 0; k < n; ++k) {
        const float ak = expf(dt * Ad[k]);
        if (a_out) a_out[k] = ak;
        h_out[k] = ak * h_in[k] + dtu * Bt[k];
        y += Ct[k] * h_out[k];
    }
    return y;
}

void scan_fwd(const scan_args *a, float *restrict out, float *restrict chunk_states,
              float *restrict last_state, int n_threads) {
    const int64_t n = a->n, L = a->L;
    #pragma omp parallel num_threads(n_threads)
    {
        float *restrict h = (float *)calloc(n, sizeof(float));
        float *restrict h_next = (float *)calloc(n, sizeof(float));
        float *restrict dts = (float *)malloc(L * sizeof(float));
        #pragma omp for schedule(dynamic, 8)
        for (int64_t row = 0; row < a->batch * a->dim; ++row) {
            const int64_t b = row / a->dim, d = row % a->dim;
            const float *restrict Ad = a->A + d * n;
            int64_t sB, sC;
            const float *restrict Bp = bc_row(a->B, a->B_fixed, a, b, d, &sB);
            const float *restrict Cp = bc_row(a->C, a->C_fixed, a, b, d, &sC);
            const float *restrict u = a->u + row * L;
            const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
            float *restrict o = out + row * L;
            prepare_delta(a, a->delta + row * L, bias, L, dts, NULL);
            memset(h, 0, n * sizeof(float));
            for (int64_t t = 0; t < L; ++t) {
                if (t % a->chunk == 0) memcpy(chunk_states + (row * a->n_chunks + t / a->chunk) * n, h, n * sizeof(float));
                o[t] = scan_step(n, dts[t], u[t], Ad, Bp + t * sB, Cp + t * sC, h, h_next, NULL);
                float *tmp = h; h = h_next; h_next = tmp;
            }
            for (int64_t t = 0; t < L; ++t) o[t] += Dd * u[t];
            if (a->z) {
                const float *restrict z = a->z + row * L;
                for (int64_t t = 0; t < L; ++t) o[t] *= z[t] * sigmoid_f(z[t]);
            }
            memcpy(last_state + row * n, h, n * sizeof(float));
        }
        free(h); free(h_next); free(dts);
    }
}

/* One step of the adjoint recurrence for one row; restrict-qualified parameters let it vectorise. */
static inline void adjoint_step(int64_t n, float dy, float dt, float ut, const float *restrict Ad,
                                const float *restrict Bt, const float *restrict Ct, const float *restrict hp,
                                const float *restrict hn, const float *restrict at, float *restrict dh,
                                float *restrict dAd, float *restrict dBt, float *restrict dCt,
                                float *ddt_out, float *dx_out) {
    float ddt = 0.f, dx_sum = 0.f;
    const float dtu = dt * ut;
    for (int64_t k = 0; k < n; ++k) {
        const float g = dh[k] + Ct[k] * dy;     /* d loss / d h_t */
        const float gdA = g * hp[k] * at[k];    /* d loss / d (delta_t A) */
        dCt[k] += dy * hn[k];
        dBt[k] += g * dtu;
        dAd[k] += gdA * dt;
        ddt += gdA * Ad[k];
        dx_sum += g * Bt[k];
        dh[k] = g * at[k];
    }
    *ddt_out = ddt + dx_sum * ut;
    *dx_out = dx_sum;
}

/* Gradients. dA_rows, dD_rows, dbias_rows: per-row partials (batch, d, n) / (batch, d), summed over
   batch by the caller. dB, dC: (batch, d, n) per-row partials when fixed, else (batch, groups, L, n)
   totals (summed over the channels of a group through per-thread buffers). */
void scan_bwd(const scan_args *a, const float *restrict chunk_states, const float *restrict dout,
              const float *restrict dlast, float *restrict du, float *restrict ddelta, float *restrict dz,
              float *restrict dA_rows, float *restrict dB, float *restrict dC, float *restrict dD_rows,
              float *restrict dbias_rows, int n_threads) {
    const int64_t n = a->n, L = a->L, T = a->chunk;
    const int64_t var_size = a->batch * a->groups * L * n;
    #pragma omp parallel num_threads(n_threads)
    {
        float *restrict hs = (float *)malloc((T + 1) * n * sizeof(float));  /* h_{t0-1} .. h_{t0+T-1} */
        float *restrict as = (float *)malloc(T * n * sizeof(float));        /* exp(delta_t A) */
        float *restrict ys = (float *)malloc(T * sizeof(float));            /* C_t h_t */
        float *restrict dys = (float *)malloc(T * sizeof(float));           /* d loss / d (C_t h_t) */
        float *restrict dts = (float *)malloc(T * sizeof(float));
        float *restrict dsp = (float *)malloc(T * sizeof(float));           /* softplus' */
        float *restrict dxs = (float *)malloc(T * sizeof(float));           /* sum_n dh B */
        float *restrict dh = (float *)malloc(n * sizeof(float));
        float *restrict dB_mine = a->B_fixed ? NULL : (float *)calloc(var_size, sizeof(float));
        float *restrict dC_mine = a->C_fixed ? NULL : (float *)calloc(var_size, sizeof(float));
        #pragma omp for schedule(dynamic, 8)
        for (int64_t row = 0; row < a->batch * a->dim; ++row) {
            const int64_t b = row / a->dim, d = row % a->dim;
            const float *restrict Ad = a->A + d * n;
            int64_t sB, sC;
            const float *restrict Bp = bc_row(a->B, a->B_fixed, a, b, d, &sB);
            const float *restrict Cp = bc_row(a->C, a->C_fixed, a, b, d, &sC);
            /* where this row's dB/dC go: its own (n,) partial when fixed, the thread's buffer else */
            float *restrict dBp = a->B_fixed ? dB + row * n : dB_mine + (Bp - a->B);
            float *restrict dCp = a->C_fixed ? dC + row * n : dC_mine + (Cp - a->C);
            float *restrict dAd = dA_rows + row * n;
            const float *restrict u = a->u + row * L, *restrict go = dout + row * L;
            const float *restrict z = a->z ? a->z + row * L : NULL;
            const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
            float dD = 0.f, dbias = 0.f;
            memset(dAd, 0, n * sizeof(float));
            if (a->B_fixed) memset(dBp, 0, n * sizeof(float));
            if (a->C_fixed) memset(dCp, 0, n * sizeof(float));
            if (dlast) memcpy(dh, dlast + row * n, n * sizeof(float));
            else memset(dh, 0, n * sizeof(float));
            for (int64_t c = a->n_chunks - 1; c >= 0; --c) {
                const int64_t t0 = c * T, len = (L - t0) < T ? (L - t0) : T;
                const float *restrict uc = u + t0, *restrict goc = go + t0;
                prepare_delta(a, a->delta + row * L + t0, bias, len, dts, dsp);
                /* recompute this chunk's states from its checkpoint */
                memcpy(hs, chunk_states + (row * a->n_chunks + c) * n, n * sizeof(float));
                for (int64_t i = 0; i < len; ++i)
                    ys[i] = scan_step(n, dts[i], uc[i], Ad, Bp + (t0 + i) * sB, Cp + (t0 + i) * sC,
                                      hs + i * n, hs + (i + 1) * n, as + i * n);
                /* output gradient through the z gate and the D skip */
                if (z) {
                    const float *restrict zc = z + t0;
                    float *restrict dzc = dz + row * L + t0;
                    for (int64_t i = 0; i < len; ++i) {
                        const float s = sigmoid_f(zc[i]);
                        dzc[i] = goc[i] * (ys[i] + Dd * uc[i]) * s * (1.f + zc[i] * (1.f - s));
                        dys[i] = goc[i] * zc[i] * s;
                    }
                } else {
                    for (int64_t i = 0; i < len; ++i) dys[i] = goc[i];
                }
                /* adjoint recurrence: dh_{t-1} = a_t dh_t + C_{t-1} dy_{t-1} */
                float *restrict ddc = ddelta + row * L + t0;
                for (int64_t i = len - 1; i >= 0; --i) {
                    const int64_t t = t0 + i;
                    adjoint_step(n, dys[i], dts[i], uc[i], Ad, Bp + t * sB, Cp + t * sC, hs + i * n,
                                 hs + (i + 1) * n, as + i * n, dh, dAd, dBp + t * sB, dCp + t * sC, ddc + i, dxs + i);
                }
                float *restrict duc = du + row * L + t0;
                for (int64_t i = 0; i < len; ++i) {
                    duc[i] = dxs[i] * dts[i] + dys[i] * Dd;
                    ddc[i] *= dsp[i];
                    dD += dys[i] * uc[i];
                    dbias += ddc[i];
                }
            }
            dD_rows[row] = dD;
            dbias_rows[row] = dbias;
        }
        if (dB_mine) {
            #pragma omp critical
            for (int64_t i = 0; i < var_size; ++i) dB[i] += dB_mine[i];
        }
        if (dC_mine) {
            #pragma omp critical
            for (int64_t i = 0; i < var_size; ++i) dC[i] += dC_mine[i];
        }
        free(hs); free(as); free(ys); free(dys); free(dts); free(dsp); free(dxs); free(dh);
        free(dB_mine); free(dC_mine);
    }
}
"""
