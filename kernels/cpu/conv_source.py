"""C source of the fused CPU causal depthwise conv1d (+ SiLU), compiled with the scan by
`ssmforge.kernels.cpu.build`.

Channels-last: x is read as (batch, L, d) with unit channel stride and any batch/step strides, so
the x half of Mamba's in_proj output is used in place; the loops run over channels and vectorise.
The output is (batch, L, d) contiguous, the layout x_proj reads. Backward recomputes the
pre-activation (four multiply-adds per element) instead of saving it.

Layouts (fp32): w (width, d); bias (d,); out, dout, gpre, dx (batch, L, d) contiguous; dw (width, d).
"""

CONV_SOURCE = r"""
typedef struct {
    int64_t batch, L, dim, width;
    int64_t x_sb, x_sl;          /* strides of x in elements: batch, step (channels: 1) */
    const float *x, *w, *bias;
    int silu;
} conv_args;

/* Pre-activation at (b, t) for every channel into acc (dim,). */
static inline void conv_pre(const conv_args *a, int64_t b, int64_t t, float *restrict acc) {
    const int64_t dim = a->dim, W = a->width;
    if (a->bias) memcpy(acc, a->bias, dim * sizeof(float));
    else memset(acc, 0, dim * sizeof(float));
    for (int64_t k = 0; k < W; ++k) {
        const int64_t s = t - W + 1 + k;
        if (s < 0) continue;
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
        if (a->silu) for (int64_t c = 0; c < dim; ++c) o[c] = o[c] / (1.f + expf(-o[c]));
    }
}

/* gpre: scratch (batch, L, dim) for the gradient of the pre-activation. dbias may be NULL. */
void conv_bwd(const conv_args *a, const float *restrict dout, float *restrict gpre, float *restrict dx,
              float *restrict dw, float *restrict dbias, int n_threads) {
    const int64_t dim = a->dim, W = a->width, L = a->L, rows = a->batch * a->L;
    memset(dw, 0, W * dim * sizeof(float));
    if (dbias) memset(dbias, 0, dim * sizeof(float));
    #pragma omp parallel num_threads(n_threads)
    {
        float *restrict acc = (float *)malloc(dim * sizeof(float));
        float *restrict dw_mine = (float *)calloc(W * dim, sizeof(float));
        float *restrict db_mine = (float *)calloc(dim, sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < rows; ++bt) {
            const int64_t b = bt / L, t = bt % L;
            const float *restrict g = dout + bt * dim;
            float *restrict gp = gpre + bt * dim;
            if (a->silu) {
                conv_pre(a, b, t, acc);
                for (int64_t c = 0; c < dim; ++c) {
                    const float s = 1.f / (1.f + expf(-acc[c]));
                    gp[c] = g[c] * s * (1.f + acc[c] * (1.f - s));
                }
            } else {
                memcpy(gp, g, dim * sizeof(float));
            }
            for (int64_t c = 0; c < dim; ++c) db_mine[c] += gp[c];
            for (int64_t k = 0; k < W; ++k) {
                const int64_t s = t - W + 1 + k;
                if (s < 0) continue;
                const float *restrict xs = a->x + b * a->x_sb + s * a->x_sl;
                float *restrict dwk = dw_mine + k * dim;
                for (int64_t c = 0; c < dim; ++c) dwk[c] += gp[c] * xs[c];
            }
        }
        /* implicit barrier: every gpre row is written before dx reads its neighbours */
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < rows; ++bt) {
            const int64_t t = bt % L;
            float *restrict o = dx + bt * dim;
            memset(o, 0, dim * sizeof(float));
            for (int64_t k = 0; k < W; ++k) {
                const int64_t s = t + W - 1 - k;  /* the output step that read x_t through tap k */
                if (s >= L) continue;
                const float *restrict gs = gpre + (bt - t + s) * dim;
                const float *restrict wk = a->w + k * dim;
                for (int64_t c = 0; c < dim; ++c) o[c] += wk[c] * gs[c];
            }
        }
        #pragma omp critical
        {
            for (int64_t i = 0; i < W * dim; ++i) dw[i] += dw_mine[i];
            if (dbias) for (int64_t c = 0; c < dim; ++c) dbias[c] += db_mine[c];
        }
        free(acc); free(dw_mine); free(db_mine);
    }
}
"""
