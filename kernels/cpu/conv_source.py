"""C source of the fused CPU causal depthwise conv1d (+ SiLU), compiled with the scan by
`ssmforge.kernels.cpu.build`.

Channels-last: x is read as (batch, L, d) with unit channel stride and any batch/step strides, so
the x half of Mamba's in_proj output is used in place; the loops run over channels and vectorise.
The output is (batch, L, d) contiguous, the layout x_proj reads. Backward recomputes the
pre-activation (four multiply-adds per element) instead of saving it, a tile of steps at a time. SiLU uses the
scan part's overflow-safe sigmoid_f (one translation unit).

Documents (seq_idx, see ssmforge.kernels.documents): tap k of step t reads x_s, s = t - (W - 1 - k), only
where seq_idx[b, s] == seq_idx[b, t]; the backward drops the same (t, s) pairs from dw and dx. The test is
one comparison per (step, tap), outside the channel loop, which stays branch-free and vectorised; with
seq_idx NULL the kernels do what they did before.

Layouts (fp32): w (width, d); bias (d,); out, dout, dx (batch, L, d) contiguous; dw (width, d);
seq_idx (batch, L) int32 contiguous or NULL.
"""

CONV_SOURCE = r"""
typedef struct {
    int64_t batch, L, dim, width;
    int64_t x_sb, x_sl;          /* strides of x in elements: batch, step (channels: 1) */
    const float *x, *w, *bias;
    int silu;
    const int32_t *seq_idx;      /* (batch, L) or NULL: one document per row */
} conv_args;

/* Whether step s (<= t) lies in step t's document. */
static inline int conv_same_doc(const conv_args *a, int64_t b, int64_t s, int64_t t) {
    return !a->seq_idx || a->seq_idx[b * a->L + s] == a->seq_idx[b * a->L + t];
}

/* Pre-activation at (b, t) for every channel into acc (dim,). */
static inline void conv_pre(const conv_args *a, int64_t b, int64_t t, float *restrict acc) {
    const int64_t dim = a->dim, W = a->width;
    if (a->bias) memcpy(acc, a->bias, dim * sizeof(float));
    else memset(acc, 0, dim * sizeof(float));
    for (int64_t k = 0; k < W; ++k) {
        const int64_t s = t - W + 1 + k;
        if (s < 0 || !conv_same_doc(a, b, s, t)) continue;
        const float *restrict xs = a->x + b * a->x_sb + s * a->x_sl;
        const float *restrict wk = a->w + k * dim;
        for (int64_t c = 0; c < dim; ++c) acc[c] += wk[c] * xs[c];
    }
}

void conv_fwd(const conv_args *a, float *restrict out, int n_threads) {
    const int64_t dim = a->dim;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t bt = 0; bt < a->batch * a->L; ++bt) {
        float *restrict o = out + bt * dim;
        conv_pre(a, bt / a->L, bt % a->L, o);
        if (a->silu) for (int64_t c = 0; c < dim; ++c) o[c] = o[c] * sigmoid_f(o[c]);
    }
}

#define CONV_TILE 64  /* steps per work item of the backward */

/* dx needs the pre-activation gradient of the W-1 steps after each step: a thread works on a tile of
   steps of one sequence and keeps the tile's gradient rows, plus the W-1 following ones (recomputed by
   the next tile too), in its scratch, so no (batch, L, dim) buffer is written and read back. dbias may
   be NULL. */
void conv_bwd(const conv_args *a, const float *restrict dout, float *restrict dx, float *restrict dw,
              float *restrict dbias, int n_threads) {
    const int64_t dim = a->dim, W = a->width, L = a->L;
    const int64_t tiles = (L + CONV_TILE - 1) / CONV_TILE;
    memset(dw, 0, W * dim * sizeof(float));
    if (dbias) memset(dbias, 0, dim * sizeof(float));
    #pragma omp parallel num_threads(n_threads)
    {
        float *restrict gp = (float *)malloc((CONV_TILE + W - 1) * dim * sizeof(float));
        float *restrict dw_mine = (float *)calloc(W * dim, sizeof(float));
        float *restrict db_mine = (float *)calloc(dim, sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < a->batch * tiles; ++item) {
            const int64_t b = item / tiles, t0 = (item % tiles) * CONV_TILE;
            const int64_t t1 = (t0 + CONV_TILE) < L ? (t0 + CONV_TILE) : L, t_end = (t1 + W - 1) < L ? (t1 + W - 1) : L;
            for (int64_t t = t0; t < t_end; ++t) {
                const float *restrict g = dout + (b * L + t) * dim;
                float *restrict gpt = gp + (t - t0) * dim;
                if (a->silu) {
                    conv_pre(a, b, t, gpt);
                    for (int64_t c = 0; c < dim; ++c) {
                        const float s = sigmoid_f(gpt[c]);
                        gpt[c] = g[c] * s * (1.f + gpt[c] * (1.f - s));
                    }
                } else {
                    memcpy(gpt, g, dim * sizeof(float));
                }
                if (t >= t1) continue;  /* a following tile's step: only for dx below */
                for (int64_t c = 0; c < dim; ++c) db_mine[c] += gpt[c];
                for (int64_t k = 0; k < W; ++k) {
                    const int64_t s = t - W + 1 + k;
                    if (s < 0 || !conv_same_doc(a, b, s, t)) continue;
                    const float *restrict xs = a->x + b * a->x_sb + s * a->x_sl;
                    float *restrict dwk = dw_mine + k * dim;
                    for (int64_t c = 0; c < dim; ++c) dwk[c] += gpt[c] * xs[c];
                }
            }
            for (int64_t t = t0; t < t1; ++t) {
                float *restrict o = dx + (b * L + t) * dim;
                memset(o, 0, dim * sizeof(float));
                for (int64_t k = 0; k < W; ++k) {
                    const int64_t s = t + W - 1 - k;  /* the output step that read x_t through tap k */
                    if (s >= L || !conv_same_doc(a, b, t, s)) continue;
                    const float *restrict gs = gp + (s - t0) * dim;
                    const float *restrict wk = a->w + k * dim;
                    for (int64_t c = 0; c < dim; ++c) o[c] += wk[c] * gs[c];
                }
            }
        }
        #pragma omp critical
        {
            for (int64_t i = 0; i < W * dim; ++i) dw[i] += dw_mine[i];
            if (dbias) for (int64_t c = 0; c < dim; ++c) dbias[c] += db_mine[c];
        }
        free(gp); free(dw_mine); free(db_mine);
    }
}
"""
