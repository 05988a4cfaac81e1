"""C source of the fused CPU selective scan, compiled on first use by `ssmforge.kernels.cpu.build`.

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

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* h <- exp(dt A) h + dt u B for one step; returns C . h. If a_out, also keeps exp(dt A). */
ALWAYS_INLINE float scan_step_n(int64_t n, float dt, float ut, const float *restrict Ad, const float *restrict Bt,
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

/* n = 16 (Mamba's d_state) as a compile-time constant: the loop unrolls into whole vectors. */
ALWAYS_INLINE float scan_step(int64_t n, float dt, float ut, const float *restrict Ad, const float *restrict Bt,
                              const float *restrict Ct, const float *restrict h_in, float *restrict h_out,
                              float *restrict a_out) {
    if (n == 16) return scan_step_n(16, dt, ut, Ad, Bt, Ct, h_in, h_out, a_out);
    return scan_step_n(n, dt, ut, Ad, Bt, Ct, h_in, h_out, a_out);
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
ALWAYS_INLINE void adjoint_step_n(int64_t n, float dy, float dt, float ut, const float *restrict Ad,
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

ALWAYS_INLINE void adjoint_step(int64_t n, float dy, float dt, float ut, const float *restrict Ad,
                                const float *restrict Bt, const float *restrict Ct, const float *restrict hp,
                                const float *restrict hn, const float *restrict at, float *restrict dh,
                                float *restrict dAd, float *restrict dBt, float *restrict dCt,
                                float *ddt_out, float *dx_out) {
    if (n == 16) adjoint_step_n(16, dy, dt, ut, Ad, Bt, Ct, hp, hn, at, dh, dAd, dBt, dCt, ddt_out, dx_out);
    else adjoint_step_n(n, dy, dt, ut, Ad, Bt, Ct, hp, hn, at, dh, dAd, dBt, dCt, ddt_out, dx_out);
}

/* Per-thread scratch of the backward: one chunk of recomputed states and per-step values. */
typedef struct {
    float *hs;   /* (T + 1, n): h_{t0-1} .. h_{t0+T-1} */
    float *as;   /* (T, n): exp(delta_t A) */
    float *ys, *dys, *dts, *dsp, *dxs;  /* (T,): C_t h_t, its gradient, delta, softplus', sum_n dh B */
} bwd_scratch;

/* Backward through chunk c of one row: accumulates into the row's dA, dB, dC, dD, dbias and
   carries dh (n,), the gradient of the state entering the following chunk, to this chunk's start. */
static void bwd_chunk(const scan_args *a, int64_t row, int64_t c, const float *restrict chunk_states,
                      const float *restrict dout, float *restrict du, float *restrict ddelta, float *restrict dz,
                      float *restrict dAd, float *restrict dBp, float *restrict dCp, float *restrict dh,
                      float *dD, float *dbias, const bwd_scratch *w) {
    const int64_t n = a->n, L = a->L, T = a->chunk, b = row / a->dim, d = row % a->dim;
    const int64_t t0 = c * T, len = (L - t0) < T ? (L - t0) : T;
    const float *restrict Ad = a->A + d * n;
    int64_t sB, sC;
    const float *restrict Bp = bc_row(a->B, a->B_fixed, a, b, d, &sB);
    const float *restrict Cp = bc_row(a->C, a->C_fixed, a, b, d, &sC);
    const float *restrict uc = a->u + row * L + t0, *restrict goc = dout + row * L + t0;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
    float *restrict hs = w->hs, *restrict as = w->as, *restrict ys = w->ys, *restrict dys = w->dys;
    float *restrict dts = w->dts, *restrict dsp = w->dsp, *restrict dxs = w->dxs;
    prepare_delta(a, a->delta + row * L + t0, bias, len, dts, dsp);
    /* recompute this chunk's states from its checkpoint */
    memcpy(hs, chunk_states + (row * a->n_chunks + c) * n, n * sizeof(float));
    for (int64_t i = 0; i < len; ++i)
        ys[i] = scan_step(n, dts[i], uc[i], Ad, Bp + (t0 + i) * sB, Cp + (t0 + i) * sC, hs + i * n,
                          hs + (i + 1) * n, as + i * n);
    /* output gradient through the z gate and the D skip */
    if (a->z) {
        const float *restrict zc = a->z + row * L + t0;
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
        adjoint_step(n, dys[i], dts[i], uc[i], Ad, Bp + t * sB, Cp + t * sC, hs + i * n, hs + (i + 1) * n,
                     as + i * n, dh, dAd, dBp + t * sB, dCp + t * sC, ddc + i, dxs + i);
    }
    float *restrict duc = du + row * L + t0;
    float dD_acc = 0.f, dbias_acc = 0.f;
    for (int64_t i = 0; i < len; ++i) {
        duc[i] = dxs[i] * dts[i] + dys[i] * Dd;
        ddc[i] *= dsp[i];
        dD_acc += dys[i] * uc[i];
        dbias_acc += ddc[i];
    }
    *dD += dD_acc;
    *dbias += dbias_acc;
}

#define ROWS_PER_BLOCK 16

/* Gradients. dA_rows, dD_rows, dbias_rows: per-row partials (batch, d, n) / (batch, d), summed over
   batch by the caller. dB, dC: (batch, d, n) per-row partials when fixed, else (batch, groups, L, n)
   totals, summed over the channels of a group through per-thread buffers. A thread takes a block of
   rows of one batch and walks it chunk by chunk from the end, so that the (L, n) gradient buffer of
   B/C is swept once per block, one cache-sized chunk at a time, not once per row. */
void scan_bwd(const scan_args *a, const float *restrict chunk_states, const float *restrict dout,
              const float *restrict dlast, float *restrict du, float *restrict ddelta, float *restrict dz,
              float *restrict dA_rows, float *restrict dB, float *restrict dC, float *restrict dD_rows,
              float *restrict dbias_rows, int n_threads) {
    const int64_t n = a->n, L = a->L, T = a->chunk, R = ROWS_PER_BLOCK;
    const int64_t var_size = a->batch * a->groups * L * n;
    const int64_t blocks_per_batch = (a->dim + R - 1) / R;
    #pragma omp parallel num_threads(n_threads)
    {
        bwd_scratch w = {
            .hs = malloc((T + 1) * n * sizeof(float)), .as = malloc(T * n * sizeof(float)),
            .ys = malloc(T * sizeof(float)), .dys = malloc(T * sizeof(float)), .dts = malloc(T * sizeof(float)),
            .dsp = malloc(T * sizeof(float)), .dxs = malloc(T * sizeof(float)),
        };
        float *restrict dh = (float *)malloc(R * n * sizeof(float));
        float dD[ROWS_PER_BLOCK], dbias[ROWS_PER_BLOCK];
        float *restrict dB_mine = a->B_fixed ? NULL : (float *)calloc(var_size, sizeof(float));
        float *restrict dC_mine = a->C_fixed ? NULL : (float *)calloc(var_size, sizeof(float));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t block = 0; block < a->batch * blocks_per_batch; ++block) {
            const int64_t b = block / blocks_per_batch, d0 = (block % blocks_per_batch) * R;
            const int64_t rows = (a->dim - d0) < R ? (a->dim - d0) : R, row0 = b * a->dim + d0;
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t row = row0 + r;
                memset(dA_rows + row * n, 0, n * sizeof(float));
                if (a->B_fixed) memset(dB + row * n, 0, n * sizeof(float));
                if (a->C_fixed) memset(dC + row * n, 0, n * sizeof(float));
                if (dlast) memcpy(dh + r * n, dlast + row * n, n * sizeof(float));
                else memset(dh + r * n, 0, n * sizeof(float));
                dD[r] = dbias[r] = 0.f;
            }
            for (int64_t c = a->n_chunks - 1; c >= 0; --c) {
                for (int64_t r = 0; r < rows; ++r) {
                    const int64_t row = row0 + r, d = d0 + r;
                    int64_t unused;
                    /* where this row's dB/dC go: its own (n,) partial when fixed, the thread's buffer else */
                    float *dBp = a->B_fixed ? dB + row * n : dB_mine + (bc_row(a->B, 0, a, b, d, &unused) - a->B);
                    float *dCp = a->C_fixed ? dC + row * n : dC_mine + (bc_row(a->C, 0, a, b, d, &unused) - a->C);
                    bwd_chunk(a, row, c, chunk_states, dout, du, ddelta, dz, dA_rows + row * n, dBp, dCp,
                              dh + r * n, dD + r, dbias + r, &w);
                }
            }
            for (int64_t r = 0; r < rows; ++r) {
                dD_rows[row0 + r] = dD[r];
                dbias_rows[row0 + r] = dbias[r];
            }
        }
        if (dB_mine) {
            #pragma omp critical
            for (int64_t i = 0; i < var_size; ++i) dB[i] += dB_mine[i];
        }
        if (dC_mine) {
            #pragma omp critical
            for (int64_t i = 0; i < var_size; ++i) dC[i] += dC_mine[i];
        }
        free(w.hs); free(w.as); free(w.ys); free(w.dys); free(w.dts); free(w.dsp); free(w.dxs); free(dh);
        free(dB_mine); free(dC_mine);
    }
}
"""
