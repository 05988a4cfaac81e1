"""C source of the CPU linear scan x_t = a_t x_{t-1} + b_t from a zero state (the LRU's recurrence,
kernels.ssm_kernels.linear_scan), compiled with the other C kernels by `ssmforge.kernels.cpu.build`.

Complex numbers travel as interleaved (re, im) pairs. Each (batch row, block of LINEAR_SCAN_BLOCK states) walks
the sequence once, its states held in a local array; blocks are spread over OpenMP threads and the loop over a
block's states vectorises. So the forward reads a and b once and writes x once, where PyTorch's doubling scan
makes ceil(log2 L) passes over (batch, L, N) tensors. The backward walks the same blocks from the last position
to the first: G_t = gx_t + conj(a_{t+1}) G_{t+1}, grad b_t = G_t, grad a_t = G_t conj(x_{t-1}) (PyTorch's
complex gradient convention), from the forward's x.

Layouts: b, x, gx, da, db (batch, L, N) contiguous; a read through its row and position strides (in complex
elements, states adjacent): 0 for one row serving the whole batch, 0 for one value expanded over time (the
LRU's lambda), which is then read in place. Generated for float and double (complex64 and complex128).
"""

_TEMPLATE = r"""
void linear_scan_fwd_REAL(const linear_scan_args *g, const REAL *a, const REAL *b, REAL *x, int n_threads) {
    const int64_t L = g->L, N = g->N, blocks = (N + LINEAR_SCAN_BLOCK - 1) / LINEAR_SCAN_BLOCK;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < g->batch; ++r)
        for (int64_t k = 0; k < blocks; ++k) {
            const int64_t n0 = k * LINEAR_SCAN_BLOCK, m = N - n0 < LINEAR_SCAN_BLOCK ? N - n0 : LINEAR_SCAN_BLOCK;
            REAL hr[LINEAR_SCAN_BLOCK] = {0}, hi[LINEAR_SCAN_BLOCK] = {0};
            for (int64_t t = 0; t < L; ++t) {
                const REAL *at = a + 2 * (r * g->a_sb + t * g->a_sl + n0);
                const int64_t own = 2 * ((r * L + t) * N + n0);
                for (int64_t j = 0; j < m; ++j) {
                    const REAL ar = at[2 * j], ai = at[2 * j + 1], pr = hr[j], pi = hi[j];
                    hr[j] = ar * pr - ai * pi + b[own + 2 * j];
                    hi[j] = ar * pi + ai * pr + b[own + 2 * j + 1];
                    x[own + 2 * j] = hr[j];
                    x[own + 2 * j + 1] = hi[j];
                }
            }
        }
}

void linear_scan_bwd_REAL(const linear_scan_args *g, const REAL *a, const REAL *x, const REAL *gx, REAL *da,
                          REAL *db, int n_threads) {
    const int64_t L = g->L, N = g->N, blocks = (N + LINEAR_SCAN_BLOCK - 1) / LINEAR_SCAN_BLOCK;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(n_threads)
    for (int64_t r = 0; r < g->batch; ++r)
        for (int64_t k = 0; k < blocks; ++k) {
            const int64_t n0 = k * LINEAR_SCAN_BLOCK, m = N - n0 < LINEAR_SCAN_BLOCK ? N - n0 : LINEAR_SCAN_BLOCK;
            REAL Gr[LINEAR_SCAN_BLOCK] = {0}, Gi[LINEAR_SCAN_BLOCK] = {0};
            for (int64_t t = L - 1; t >= 0; --t) {
                const int64_t own = 2 * ((r * L + t) * N + n0);
                if (t + 1 < L) {  /* G_{t+1} carried back through conj(a_{t+1}) */
                    const REAL *an = a + 2 * (r * g->a_sb + (t + 1) * g->a_sl + n0);
                    for (int64_t j = 0; j < m; ++j) {
                        const REAL ar = an[2 * j], ai = an[2 * j + 1], gr = Gr[j], gi = Gi[j];
                        Gr[j] = ar * gr + ai * gi;
                        Gi[j] = ar * gi - ai * gr;
                    }
                }
                for (int64_t j = 0; j < m; ++j) {
                    Gr[j] += gx[own + 2 * j];
                    Gi[j] += gx[own + 2 * j + 1];
                    db[own + 2 * j] = Gr[j];
                    db[own + 2 * j + 1] = Gi[j];
                    /* x_{t-1}; the state before the first position is zero */
                    const REAL xr = t > 0 ? x[own - 2 * N + 2 * j] : 0, xi = t > 0 ? x[own - 2 * N + 2 * j + 1] : 0;
                    da[own + 2 * j] = Gr[j] * xr + Gi[j] * xi;
                    da[own + 2 * j + 1] = Gi[j] * xr - Gr[j] * xi;
                }
            }
        }
}
"""

LINEAR_SCAN_SOURCE = r"""
#define LINEAR_SCAN_BLOCK 64  /* states per block: a block's carried states stay in L1 */

typedef struct {
    int64_t batch, L, N;
    int64_t a_sb, a_sl;  /* a's strides in complex elements: row, position (its states are adjacent) */
} linear_scan_args;
""" + "".join(_TEMPLATE.replace("REAL", real) for real in ("float", "double"))
