"""C source of the fused CPU selective scan, compiled on first use by `ssmforge.kernels.cpu.build`.

Kept as a Python string so that it ships with the package like any module. The recurrence of every
(batch, channel) row is independent; the kernel runs LANES = 16 channels of one batch element side by
side, one channel per vector lane (GCC's vector extension, lowered to whatever vectors the machine
has), so a state component is one vector and nothing needs a sum across lanes: the output y_t, the
z gate and every per-channel gradient are lane-wise. Blocks of channels are spread over OpenMP
threads. The (batch, d, L) tensors may have any strides: Mamba's u, delta and z arrive as
channels-last views of its projections, and the outputs are written channels-last for the
projections that follow, so no transposed copy is made on either side. Nothing of size
(batch, d, L, n) is ever allocated: the forward keeps the state entering each chunk of steps, the
backward recomputes one chunk of states at a time from it and runs the adjoint recurrence over it.

Layouts (fp32): u, delta, z, out, dout, du, ddelta, dz (batch, d, L) with the strides in their
`tensor3`; A (d, n); D, delta_bias (d,); B and C either fixed (d, n) or input-dependent
(batch, groups, L, n) contiguous; chunk_states (batch, d, n_chunks, n); last_state, dlast (batch, d, n).
seq_idx (batch, L) int32 contiguous, or NULL: where it changes, the state carried into the step is dropped.
"""

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define LANES 16  /* channels per block: one AVX-512 vector of floats, two AVX2 ones */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* LANES floats (one per channel of a block) and as many int32; may_alias: tiles are filled as floats. */
typedef float vf __attribute__((vector_size(LANES * sizeof(float)), may_alias));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t)), may_alias));

ALWAYS_INLINE vf splat(float x) { return (vf){0} + x; }
ALWAYS_INLINE vf select(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

static inline float softplus_f(float x) { return x > 20.f ? x : logf(1.f + expf(x)); }
/* 1 / (1 + exp(-x)) with the exponent capped at 88, so that expf never overflows: -ffast-math assumes finite
   values, and there 1 / (1 + inf) came out NaN, not 0, for x below -88.72. The conv's SiLU, Mamba's z gate and
   the softplus derivative then turned a finite input into a NaN output. Below the cap the result is 6e-39
   instead of a smaller subnormal: an absolute error under 1e-38. */
static inline float sigmoid_f(float x) { return 1.f / (1.f + expf(fminf(-x, 88.f))); }

/* exp of every lane, for the decays exp(delta A): inlined, so that the state loop keeps its vectors
   in registers (a call into libmvec would spill them). Cody-Waite reduction and Cephes' degree-7
   polynomial (kept in this order: the build turns off re-association), within 2 ulp of expf. Above
   88 it returns exp(88); below -87 it returns 0 where expf returns a subnormal (< 1.2e-38), so
   that the states never turn subnormal (slow on x86). */
ALWAYS_INLINE vf exp_vf(vf x) {
    const vf hi = splat(88.f);
    const vf xc = select(x > hi, hi, x);  /* below -87 the result is masked to 0 at the end */
    /* round(xc / ln 2): adding 1.5 * 2^23 leaves the integer in the low mantissa bits */
    const vf shifter = splat(12582912.f);
    const vf t = xc * 1.44269504088896341f + shifter;
    const vi k = (vi)t - (vi)shifter;
    const vf kf = __builtin_convertvector(k, vf);
    vf r = xc - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + r + 1.f;
    const vf scale = (vf)((k + 127) << 23);
    return (vf)((vi)(p * scale) & (x >= -87.f));
}

/* A (batch, d, L) fp32 tensor: its data and its strides in elements. */
typedef struct { float *p; int64_t sb, sd, sl; } tensor3;

typedef struct {
    int64_t batch, dim, L, n, groups, chunk, n_chunks;
    tensor3 u, delta, z;  /* z.p NULL without the gate */
    const float *A, *B, *C, *D, *delta_bias;
    const int32_t *seq_idx;  /* (batch, L) contiguous document index; NULL: one document per row */
    int B_fixed, C_fixed, softplus;
} scan_args;

/* One block: LANES channels of batch element b, all in group g of B/C. Lanes past `active` are padding:
   zero inputs, states and output gradients (with copies of the last channel's constants), so they add
   nothing to the lane sums of dB/dC, and they are never written back. */
typedef struct {
    int64_t b, g, d0;
    int active;
} block;

static int64_t blocks_per_group(const scan_args *a) { return (a->dim / a->groups + LANES - 1) / LANES; }

static block block_at(const scan_args *a, int64_t item) {
    const int64_t per_group = a->dim / a->groups, blocks = blocks_per_group(a);
    const int64_t bg = item / blocks, j = item % blocks;
    block k = {bg / a->groups, bg % a->groups, 0, 0};
    k.d0 = k.g * per_group + j * LANES;
    k.active = (int)((per_group - j * LANES) < LANES ? (per_group - j * LANES) : LANES);
    return k;
}

/* Steps t0 .. t0+len-1 of block k's channels in x, as dst[i] (lanes past `active` read 0). */
static void load_tile(const tensor3 *x, const block *k, int64_t t0, int64_t len, vf *restrict dst) {
    const float *base = x->p + k->b * x->sb + k->d0 * x->sd + t0 * x->sl;
    if (x->sd == 1 && k->active == LANES) {
        for (int64_t i = 0; i < len; ++i) memcpy(dst + i, base + i * x->sl, sizeof(vf));
        return;
    }
    float *out = (float *)dst;
    if (k->active < LANES) memset(out, 0, len * sizeof(vf));
    for (int l = 0; l < k->active; ++l)
        for (int64_t i = 0; i < len; ++i) out[i * LANES + l] = base[l * x->sd + i * x->sl];
}

static void store_tile(const tensor3 *x, const block *k, int64_t t0, int64_t len, const vf *restrict src) {
    float *base = x->p + k->b * x->sb + k->d0 * x->sd + t0 * x->sl;
    if (x->sd == 1 && k->active == LANES) {
        for (int64_t i = 0; i < len; ++i) memcpy(base + i * x->sl, src + i, sizeof(vf));
        return;
    }
    const float *in = (const float *)src;
    for (int l = 0; l < k->active; ++l)
        for (int64_t i = 0; i < len; ++i) base[l * x->sd + i * x->sl] = in[i * LANES + l];
}

/* The cache lines of the tiles of the next visit, requested one per step while the current one computes.
   A tile is as many lines as steps: channels-last, one line per step, each in another page, which the
   hardware prefetchers do not follow; (batch, d, L) contiguous, a few lines of each channel's row. Without
   this the scan waits on memory at every row, and asking for a whole tile at once would stall on the
   outstanding-miss limit instead. */
#define MAX_PREFETCHED 8
#define FLOATS_PER_LINE 16
typedef struct {
    const float *tile[MAX_PREFETCHED];
    int64_t step_stride[MAX_PREFETCHED], lane_stride[MAX_PREFETCHED];
    int write[MAX_PREFETCHED];
    int count;
    int64_t len;
} prefetch_plan;

static void plan_tile(prefetch_plan *plan, const tensor3 *x, const block *k, int64_t t0, int write) {
    if (!x->p || (x->sd != 1 && x->sl != 1) || plan->count == MAX_PREFETCHED) return;
    plan->tile[plan->count] = x->p + k->b * x->sb + k->d0 * x->sd + t0 * x->sl;
    plan->step_stride[plan->count] = x->sl;
    plan->lane_stride[plan->count] = x->sd;
    plan->write[plan->count++] = write;
}

/* Line i of tile r: step i of a channels-last tile; else line i % per_lane of lane i / per_lane. */
ALWAYS_INLINE const float *tile_line(const prefetch_plan *plan, int r, int64_t i) {
    if (plan->lane_stride[r] == 1) return plan->tile[r] + i * plan->step_stride[r];
    const int64_t per_lane = (plan->len + FLOATS_PER_LINE - 1) / FLOATS_PER_LINE;
    return plan->tile[r] + (i / per_lane) * plan->lane_stride[r] + (i % per_lane) * FLOATS_PER_LINE;
}

ALWAYS_INLINE void prefetch_line(const prefetch_plan *plan, int64_t i) {
    if (i >= plan->len) return;
    for (int r = 0; r < plan->count; ++r) {
        if (plan->write[r]) __builtin_prefetch(tile_line(plan, r, i), 1);
        else __builtin_prefetch(tile_line(plan, r, i), 0);
    }
}

/* Per-thread scratch: one chunk of T steps as tiles [step] and [step][state] of vectors, and the block's
   per-channel constants as [state] vectors (lanes past `active` repeat the last channel). */
typedef struct {
    vf *us, *dts, *dsp, *zs, *gout, *ys, *dys, *dxs, *ddts;  /* (T,) */
    vf *hs, *as;                                             /* (T + 1, n), (T, n) */
    vf *A, *Bf, *Cf;                                         /* (n,) */
    vf D, bias;
} scratch;

static scratch scratch_alloc(int64_t T, int64_t n) {
    scratch s;
    vf **tiles[] = {&s.us, &s.dts, &s.dsp, &s.zs, &s.gout, &s.ys, &s.dys, &s.dxs, &s.ddts};
    for (int i = 0; i < 9; ++i) *tiles[i] = aligned_alloc(sizeof(vf), T * sizeof(vf));
    s.hs = aligned_alloc(sizeof(vf), (T + 1) * n * sizeof(vf));
    s.as = aligned_alloc(sizeof(vf), T * n * sizeof(vf));
    vf **states[] = {&s.A, &s.Bf, &s.Cf};
    for (int i = 0; i < 3; ++i) *states[i] = aligned_alloc(sizeof(vf), n * sizeof(vf));
    return s;
}

static void scratch_free(scratch *s) {
    vf *all[] = {s->us, s->dts, s->dsp, s->zs, s->gout, s->ys, s->dys, s->dxs, s->ddts, s->hs, s->as,
                 s->A, s->Bf, s->Cf};
    for (int i = 0; i < 14; ++i) free(all[i]);
}

/* Block k's channel constants into the scratch: A, fixed B/C (as [state] vectors), D, delta_bias. */
static void load_constants(const scan_args *a, const block *k, scratch *s) {
    const int64_t n = a->n;
    float *A = (float *)s->A, *Bf = (float *)s->Bf, *Cf = (float *)s->Cf, *D = (float *)&s->D;
    float *bias = (float *)&s->bias;
    for (int l = 0; l < LANES; ++l) {
        const int64_t d = k->d0 + (l < k->active ? l : k->active - 1);
        for (int64_t j = 0; j < n; ++j) {
            A[j * LANES + l] = a->A[d * n + j];
            if (a->B_fixed) Bf[j * LANES + l] = a->B[d * n + j];
            if (a->C_fixed) Cf[j * LANES + l] = a->C[d * n + j];
        }
        D[l] = a->D ? a->D[d] : 0.f;
        bias[l] = a->delta_bias ? a->delta_bias[d] : 0.f;
    }
}

/* States of block k between its [state] vectors h and the rows (b, d0 + lane) of a (batch, d, ...) tensor
   whose rows hold n floats every `row_stride` (chunk_states: one chunk's state; last_state, dlast). */
static void store_state(const scan_args *a, const block *k, const vf *h, float *dst, int64_t row_stride) {
    const float *hf = (const float *)h;
    for (int l = 0; l < k->active; ++l)
        for (int64_t j = 0; j < a->n; ++j) dst[(k->b * a->dim + k->d0 + l) * row_stride + j] = hf[j * LANES + l];
}

/* The inverse; zeros in the padding lanes, and everywhere when src is NULL. */
static void load_state(const scan_args *a, const block *k, const float *src, int64_t row_stride, vf *h) {
    float *hf = (float *)h;
    for (int l = 0; l < LANES; ++l) {
        const float *row = src && l < k->active ? src + (k->b * a->dim + k->d0 + l) * row_stride : NULL;
        for (int64_t j = 0; j < a->n; ++j) hf[j * LANES + l] = row ? row[j] : 0.f;
    }
}

/* dt <- delta after bias and softplus for len steps, and softplus' = sigmoid(raw) into dsoftplus when
   given. Lane loops over floats: the compiler vectorises expf and logf through libmvec. */
static void prepare_delta(const scan_args *a, const scratch *s, int64_t len, vf *restrict dt, vf *restrict dsoftplus) {
    for (int64_t i = 0; i < len; ++i) dt[i] += s->bias;
    float *restrict x = (float *)dt, *restrict ds = (float *)dsoftplus;
    if (!a->softplus) {
        if (ds) for (int64_t i = 0; i < len; ++i) dsoftplus[i] = splat(1.f);
        return;
    }
    if (ds) for (int64_t e = 0; e < len * LANES; ++e) ds[e] = sigmoid_f(x[e]);
    for (int64_t e = 0; e < len * LANES; ++e) x[e] = softplus_f(x[e]);
}

/* The (L, n) rows of input-dependent B or C that block k reads (NULL when fixed: then the block's
   [state] vectors in the scratch apply). Taken into locals once per chunk: the vector stores of the
   loops may alias anything, so fields read inside them would be loaded again at every state. */
ALWAYS_INLINE const float *bc_rows(const scan_args *a, const float *X, int fixed, const block *k) {
    return fixed ? NULL : X + (k->b * a->groups + k->g) * a->L * a->n;
}

/* B or C of state j at the step whose (n,) row is X_t: the fixed vector, or the row's value in every lane. */
ALWAYS_INLINE vf bc_at(const float *X_t, const vf *fixed_vals, int fixed, int64_t j) {
    return fixed ? fixed_vals[j] : splat(X_t[j]);
}

/* Whether step t of a row whose document index is `seq` (L,) starts a new document: its decay is 0. */
ALWAYS_INLINE int starts_document(const int32_t *seq, int64_t t) { return t > 0 && seq[t] != seq[t - 1]; }

/* The first step i in from .. len-1 of the chunk at t0 that starts a document; len when none (or no seq). */
static int64_t next_document(const int32_t *seq, int64_t t0, int64_t from, int64_t len) {
    if (seq)
        for (int64_t i = from; i < len; ++i)
            if (starts_document(seq, t0 + i)) return i;
    return len;
}

/* Steps 0 .. len-1 of the recurrence from h (n,), which it advances: h <- exp(dt A) h + dt u B,
   ys[i] = C . h. With `keep`, also stores every state (hs[i + 1]) and decay (as[i]). With seq_idx the
   steps run in runs between document starts, the loop over one run as without it: at a start the state is
   zeroed before the step (so h = dt u B there) and its stored decay is 0, which stops the backward's adjoint
   recurrence and gives delta no gradient through that decay. */
ALWAYS_INLINE void scan_steps(const scan_args *a, const int64_t n, const int B_fixed, const int C_fixed,
                              const int keep, const block *k, const scratch *s, int64_t t0, int64_t len,
                              const prefetch_plan *next, vf *restrict h) {
    vf *restrict hs = s->hs, *restrict as = s->as, *restrict ys = s->ys;
    const vf *restrict A = s->A, *restrict Bf = s->Bf, *restrict Cf = s->Cf;
    const vf *restrict dts = s->dts, *restrict us = s->us;
    const float *B = bc_rows(a, a->B, B_fixed, k), *C = bc_rows(a, a->C, C_fixed, k);
    const int32_t *seq = a->seq_idx ? a->seq_idx + k->b * a->L : NULL;
    for (int64_t i0 = 0, stop; i0 < len; i0 = stop) {  /* one run: a single one without seq_idx */
        const int reset = seq && starts_document(seq, t0 + i0);
        if (reset)
            for (int64_t j = 0; j < n; ++j) h[j] = splat(0.f);
        stop = next_document(seq, t0, i0 + 1, len);
        for (int64_t i = i0; i < stop; ++i) {
            prefetch_line(next, i);
            const float *B_t = B_fixed ? NULL : B + (t0 + i) * n, *C_t = C_fixed ? NULL : C + (t0 + i) * n;
            const vf dt = dts[i], dtu = dt * us[i];
            vf y = splat(0.f);
            #pragma GCC unroll 16
            for (int64_t j = 0; j < n; ++j) {
                const vf decay = exp_vf(dt * A[j]);
                const vf hj = decay * h[j] + dtu * bc_at(B_t, Bf, B_fixed, j);
                y += bc_at(C_t, Cf, C_fixed, j) * hj;
                h[j] = hj;
                if (keep) { as[i * n + j] = decay; hs[(i + 1) * n + j] = hj; }
            }
            ys[i] = y;
        }
        if (keep && reset)
            for (int64_t j = 0; j < n; ++j) as[i0 * n + j] = splat(0.f);
    }
}

/* The rows of the tiles that the visit after (item, c) reads and writes, to be requested during this one.
   A thread visits the next block of its segment in the same chunk, else the segment's first block in the
   chunk `step` away (+1 forward, -1 backward). */
static prefetch_plan plan_next(const scan_args *a, int64_t first, int64_t last, int64_t item, int64_t c, int step,
                               const tensor3 *const *reads, int n_reads, const tensor3 *const *writes, int n_writes) {
    const int64_t next_item = item + 1 < last ? item + 1 : first, next_c = item + 1 < last ? c : c + step;
    prefetch_plan plan = {.len = 0};
    if (next_c < 0 || next_c >= a->n_chunks) return plan;
    const block k = block_at(a, next_item);
    const int64_t t0 = next_c * a->chunk;
    plan.len = (a->L - t0) < a->chunk ? (a->L - t0) : a->chunk;
    for (int r = 0; r < n_reads; ++r) plan_tile(&plan, reads[r], &k, t0, 0);
    for (int r = 0; r < n_writes; ++r) plan_tile(&plan, writes[r], &k, t0, 1);
    return plan;
}

/* The thread's share of the (batch, group, block) items: a contiguous range, so that its blocks of one
   sequence sit side by side in every row of the channels-last tensors. */
static void thread_share(const scan_args *a, int64_t *lo, int64_t *hi) {
    const int64_t items = a->batch * a->groups * blocks_per_group(a);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = items * t / nt;
    *hi = items * (t + 1) / nt;
}

/* Forward of the items first .. last-1 (blocks of one sequence and group), chunk by chunk across the
   blocks: a chunk's rows of every tensor are read and written for all the blocks in turn while they are
   in cache and in the TLB, and each block's state waits in `carry` (blocks, n) for its next chunk. */
ALWAYS_INLINE void fwd_segment(const scan_args *a, const int64_t n, const int B_fixed, const int C_fixed,
                               int64_t first, int64_t last, scratch *s, vf *restrict carry, const tensor3 *out,
                               float *restrict chunk_states, float *restrict last_state) {
    const int64_t T = a->chunk;
    const tensor3 *reads[] = {&a->u, &a->delta, &a->z}, *writes[] = {out};
    memset(carry, 0, (last - first) * n * sizeof(vf));
    for (int64_t c = 0; c < a->n_chunks; ++c) {
        const int64_t t0 = c * T, len = (a->L - t0) < T ? (a->L - t0) : T;
        for (int64_t item = first; item < last; ++item) {
            const block k = block_at(a, item);
            const prefetch_plan next = plan_next(a, first, last, item, c, 1, reads, 3, writes, 1);
            vf h[n];  /* a local: with n a constant it can live in registers across the steps */
            memcpy(h, carry + (item - first) * n, sizeof h);
            load_constants(a, &k, s);
            store_state(a, &k, h, chunk_states + c * n, a->n_chunks * n);
            load_tile(&a->u, &k, t0, len, s->us);
            load_tile(&a->delta, &k, t0, len, s->dts);
            prepare_delta(a, s, len, s->dts, NULL);
            scan_steps(a, n, B_fixed, C_fixed, 0, &k, s, t0, len, &next, h);
            for (int64_t i = 0; i < len; ++i) s->ys[i] += s->D * s->us[i];
            if (a->z.p) {
                load_tile(&a->z, &k, t0, len, s->zs);
                float *restrict y = (float *)s->ys, *restrict z = (float *)s->zs;
                for (int64_t e = 0; e < len * LANES; ++e) y[e] *= z[e] * sigmoid_f(z[e]);
            }
            store_tile(out, &k, t0, len, s->ys);
            memcpy(carry + (item - first) * n, h, sizeof h);
            if (c == a->n_chunks - 1) store_state(a, &k, h, last_state, n);
        }
    }
}

/* The (B_fixed, C_fixed) variants, and n = 16 (Mamba's d_state) as a compile-time constant so that
   the state loops unroll. */
#define SCAN_DISPATCH(a, fn, ...) do {                                                         \
        const int64_t n_ = (a)->n;                                                             \
        if (n_ == 16) {                                                                        \
            if ((a)->B_fixed) { if ((a)->C_fixed) fn(a, 16, 1, 1, __VA_ARGS__); else fn(a, 16, 1, 0, __VA_ARGS__); } \
            else { if ((a)->C_fixed) fn(a, 16, 0, 1, __VA_ARGS__); else fn(a, 16, 0, 0, __VA_ARGS__); }              \
        } else {                                                                               \
            if ((a)->B_fixed) { if ((a)->C_fixed) fn(a, n_, 1, 1, __VA_ARGS__); else fn(a, n_, 1, 0, __VA_ARGS__); } \
            else { if ((a)->C_fixed) fn(a, n_, 0, 1, __VA_ARGS__); else fn(a, n_, 0, 0, __VA_ARGS__); }              \
        }                                                                                      \
    } while (0)

void scan_fwd(const scan_args *a, const tensor3 *out, float *restrict chunk_states, float *restrict last_state,
              int n_threads) {
    const int64_t blocks = blocks_per_group(a);
    #pragma omp parallel num_threads(n_threads)
    {
        scratch s = scratch_alloc(a->chunk, a->n);
        vf *carry = aligned_alloc(sizeof(vf), blocks * a->n * sizeof(vf));
        int64_t lo, hi;
        thread_share(a, &lo, &hi);
        for (int64_t first = lo; first < hi;) {  /* one (batch, group) segment at a time */
            const int64_t last = hi < (first / blocks + 1) * blocks ? hi : (first / blocks + 1) * blocks;
            SCAN_DISPATCH(a, fwd_segment, first, last, &s, carry, out, chunk_states, last_state);
            first = last;
        }
        free(carry);
        scratch_free(&s);
    }
}

/* What a block carries from chunk to chunk in the backward: the adjoint state, and its sums over time. */
typedef struct {
    vf *dh, *dA, *dBf, *dCf;  /* (n,) each; dBf, dCf: per-lane dB/dC when B/C are fixed */
    vf *dD, *dbias;           /* one vector each */
} block_grads;

static block_grads grads_slot(vf *carry, int64_t slot, int64_t n) {
    vf *base = carry + slot * (4 * n + 2);
    return (block_grads){base, base + n, base + 2 * n, base + 3 * n, base + 4 * n, base + 4 * n + 1};
}

/* Backward through chunk c of block k: lane-wise gradients (du, ddelta, dz) are written for the block's
   channels, the block's carried sums are updated in g, and input-dependent dB/dC, summed over the
   channels of a group, are accumulated per lane into the thread's acc_B/acc_C (chunk, n) vectors. */
ALWAYS_INLINE void bwd_chunk(const scan_args *a, const int64_t n, const int B_fixed, const int C_fixed,
                             const block *k, int64_t c, scratch *s, const block_grads *gr, vf *restrict acc_B,
                             vf *restrict acc_C, const prefetch_plan *next, const float *restrict chunk_states,
                             const tensor3 *dout, const tensor3 *dz, const tensor3 *du, const tensor3 *ddelta) {
    const int64_t T = a->chunk, t0 = c * T, len = (a->L - t0) < T ? (a->L - t0) : T;
    vf dh[n], dA[n];  /* locals: with n a constant they can live in registers across the steps */
    memcpy(dh, gr->dh, sizeof dh);
    memcpy(dA, gr->dA, sizeof dA);
    vf *restrict dBf = gr->dBf, *restrict dCf = gr->dCf;
    vf *restrict ddts = s->ddts, *restrict dxs = s->dxs;
    const vf *restrict A = s->A, *restrict Bf = s->Bf, *restrict Cf = s->Cf;
    const vf *restrict hs = s->hs, *restrict as = s->as;
    const vf *restrict dts = s->dts, *restrict us = s->us, *restrict dys = s->dys, *restrict dsp = s->dsp;
    const float *B = bc_rows(a, a->B, B_fixed, k), *C = bc_rows(a, a->C, C_fixed, k);
    load_tile(&a->u, k, t0, len, s->us);
    load_tile(&a->delta, k, t0, len, s->dts);
    load_tile(dout, k, t0, len, s->gout);
    prepare_delta(a, s, len, s->dts, s->dsp);
    /* recompute this chunk's states from its checkpoint */
    vf h[n];
    load_state(a, k, chunk_states + c * n, a->n_chunks * n, h);
    memcpy(s->hs, h, sizeof h);
    scan_steps(a, n, B_fixed, C_fixed, 1, k, s, t0, len, next, h);
    /* output gradient through the z gate and the D skip */
    if (a->z.p) {
        load_tile(&a->z, k, t0, len, s->zs);
        for (int64_t i = 0; i < len; ++i) s->ys[i] += s->D * s->us[i];  /* the gate's input */
        float *restrict g = (float *)s->gout, *restrict dy = (float *)s->dys;
        const float *restrict y = (const float *)s->ys, *restrict z = (const float *)s->zs;
        for (int64_t e = 0; e < len * LANES; ++e) {
            const float sg = sigmoid_f(z[e]);
            dy[e] = g[e] * z[e] * sg;
            g[e] *= y[e] * sg * (1.f + z[e] * (1.f - sg));  /* dz */
        }
        store_tile(dz, k, t0, len, s->gout);
    } else {
        memcpy(s->dys, s->gout, len * sizeof(vf));
    }
    /* adjoint recurrence: dh_{t-1} = a_t (dh_t + C_t dy_t); a_t = 0 at a document start (scan_steps) */
    const vf D = s->D;
    vf dD = *gr->dD, dbias = *gr->dbias;
    for (int64_t i = len - 1; i >= 0; --i) {
        const int64_t t = t0 + i;
        const float *B_t = B_fixed ? NULL : B + t * n, *C_t = C_fixed ? NULL : C + t * n;
        vf *restrict dB_t = B_fixed ? dBf : acc_B + i * n, *restrict dC_t = C_fixed ? dCf : acc_C + i * n;
        const vf dt = dts[i], u = us[i], dy = dys[i], dtu = dt * u;
        vf ddt = splat(0.f), dx = splat(0.f);
        #pragma GCC unroll 16
        for (int64_t j = 0; j < n; ++j) {
            const vf decay = as[i * n + j];
            const vf g = dh[j] + bc_at(C_t, Cf, C_fixed, j) * dy;  /* dloss/dh_t */
            const vf gdA = g * hs[i * n + j] * decay;              /* dloss/d(dt A) */
            dC_t[j] += dy * hs[(i + 1) * n + j];
            dB_t[j] += g * dtu;
            dA[j] += gdA * dt;
            ddt += gdA * A[j];
            dx += g * bc_at(B_t, Bf, B_fixed, j);
            dh[j] = g * decay;
        }
        const vf ddelta_i = (ddt + dx * u) * dsp[i];
        ddts[i] = ddelta_i;
        dxs[i] = dx * dt + dy * D;  /* du */
        dD += dy * u;
        dbias += ddelta_i;
    }
    *gr->dD = dD;
    *gr->dbias = dbias;
    memcpy(gr->dh, dh, sizeof dh);
    memcpy(gr->dA, dA, sizeof dA);
    store_tile(du, k, t0, len, s->dxs);
    store_tile(ddelta, k, t0, len, s->ddts);
}

/* acc (size,) vectors summed over lanes and added to dst (size,), under a lock: threads share dst. */
static void add_lane_sums(const vf *restrict acc, int64_t size, float *restrict dst) {
    #pragma omp critical
    for (int64_t e = 0; e < size; ++e) {
        float total = 0.f;
        for (int l = 0; l < LANES; ++l) total += acc[e][l];
        dst[e] += total;
    }
}

/* Backward of the items first .. last-1 (blocks of one sequence and group), chunk by chunk from the end
   across the blocks, as the forward: the lane accumulators of dB/dC then cover one chunk (in cache), and
   are summed into dB/dC when every block of the segment has been through it. */
ALWAYS_INLINE void bwd_segment(const scan_args *a, const int64_t n, const int B_fixed, const int C_fixed,
                               int64_t first, int64_t last, scratch *s, vf *restrict carry, vf *restrict acc_B,
                               vf *restrict acc_C, const float *restrict chunk_states, const tensor3 *dout,
                               const float *restrict dlast, const tensor3 *du, const tensor3 *ddelta,
                               const tensor3 *dz, float *restrict dA_rows, float *restrict dB, float *restrict dC,
                               float *restrict dD_rows, float *restrict dbias_rows) {
    const int64_t T = a->chunk, dim = a->dim, bg = first / blocks_per_group(a);
    const tensor3 *reads[] = {&a->u, &a->delta, &a->z, dout}, *writes[] = {du, ddelta, dz};
    for (int64_t item = first; item < last; ++item) {
        const block k = block_at(a, item);
        const block_grads gr = grads_slot(carry, item - first, n);
        load_state(a, &k, dlast, n, gr.dh);
        memset(gr.dA, 0, (3 * n + 2) * sizeof(vf));  /* dA, dBf, dCf, dD, dbias */
    }
    for (int64_t c = a->n_chunks - 1; c >= 0; --c) {
        const int64_t len = (a->L - c * T) < T ? (a->L - c * T) : T;
        if (!B_fixed) memset(acc_B, 0, len * n * sizeof(vf));
        if (!C_fixed) memset(acc_C, 0, len * n * sizeof(vf));
        for (int64_t item = first; item < last; ++item) {
            const block k = block_at(a, item);
            const block_grads gr = grads_slot(carry, item - first, n);
            const prefetch_plan next = plan_next(a, first, last, item, c, -1, reads, 4, writes, 3);
            load_constants(a, &k, s);
            bwd_chunk(a, n, B_fixed, C_fixed, &k, c, s, &gr, acc_B, acc_C, &next, chunk_states, dout, dz, du, ddelta);
        }
        if (!B_fixed) add_lane_sums(acc_B, len * n, dB + (bg * a->L + c * T) * n);
        if (!C_fixed) add_lane_sums(acc_C, len * n, dC + (bg * a->L + c * T) * n);
    }
    for (int64_t item = first; item < last; ++item) {
        const block k = block_at(a, item);
        const block_grads gr = grads_slot(carry, item - first, n);
        store_state(a, &k, gr.dA, dA_rows, n);
        if (B_fixed) store_state(a, &k, gr.dBf, dB, n);
        if (C_fixed) store_state(a, &k, gr.dCf, dC, n);
        for (int l = 0; l < k.active; ++l) {
            dD_rows[k.b * dim + k.d0 + l] = (*gr.dD)[l];
            dbias_rows[k.b * dim + k.d0 + l] = (*gr.dbias)[l];
        }
    }
}

/* Gradients. dA_rows, dD_rows, dbias_rows: per-row partials (batch, d, n) / (batch, d), summed over
   batch by the caller, as are dB, dC (batch, d, n) when fixed; else dB, dC are the (batch, groups, L, n)
   totals (zeroed by the caller). */
void scan_bwd(const scan_args *a, const float *restrict chunk_states, const tensor3 *dout,
              const float *restrict dlast, const tensor3 *du, const tensor3 *ddelta, const tensor3 *dz,
              float *restrict dA_rows, float *restrict dB, float *restrict dC, float *restrict dD_rows,
              float *restrict dbias_rows, int n_threads) {
    const int64_t blocks = blocks_per_group(a), n = a->n;
    #pragma omp parallel num_threads(n_threads)
    {
        scratch s = scratch_alloc(a->chunk, n);
        vf *carry = aligned_alloc(sizeof(vf), blocks * (4 * n + 2) * sizeof(vf));
        vf *acc_B = aligned_alloc(sizeof(vf), a->chunk * n * sizeof(vf));
        vf *acc_C = aligned_alloc(sizeof(vf), a->chunk * n * sizeof(vf));
        int64_t lo, hi;
        thread_share(a, &lo, &hi);
        for (int64_t first = lo; first < hi;) {  /* one (batch, group) segment at a time */
            const int64_t last = hi < (first / blocks + 1) * blocks ? hi : (first / blocks + 1) * blocks;
            SCAN_DISPATCH(a, bwd_segment, first, last, &s, carry, acc_B, acc_C, chunk_states, dout, dlast, du,
                          ddelta, dz, dA_rows, dB, dC, dD_rows, dbias_rows);
            first = last;
        }
        free(acc_B); free(acc_C); free(carry);
        scratch_free(&s);
    }
}
"""
