"""Triton kernels of the selective scan, forward and backward.

Designed like the Mamba authors' fused kernel: one program owns (one batch row, BLOCK_D channels),
keeps their (BLOCK_D, N) state in registers and walks the sequence in chunks of CHUNK steps. Inside a
chunk the linear recurrence h_t = a_t h_{t-1} + x_t is a parallel associative scan over
(BLOCK_D, CHUNK, N) tiles; the state is carried from chunk to chunk. The (batch, d, L, n) states
never reach memory: the forward stores only the state entering each chunk, and the backward
recomputes a chunk's states from it, then runs the adjoint recurrence dh_t = a_{t+1} dh_{t+1} +
C_t dy_t, chunk by chunk from the end. That recurrence runs backwards in time, but as a forward scan
over the chunk's steps taken last to first: Triton's compiled reverse associative scans compose a
non-commutative combine in the wrong order on GPUs (triton#4362, #8412) while the interpreter gets them
right, so no kernel here uses one. Offsets into (batch, ...) tensors are int64 (program id 0 is
widened first): batch * d * L passes 2^31 at real shapes. All arithmetic is fp32 whatever the input
dtype. Work on tensors of any device that Triton drives (CUDA, or CPU under TRITON_INTERPRET=1).

Document resets (HAS_SEQ_IDX, a compile-time flag: without it the kernels compile as if seq_idx did not
exist): a step where seq_idx changes has decay a_t = 0, one multiplier per step, so the forward scan drops the
carried state there, the adjoint recurrence stops there (a_{t+1} = 0 in it), and delta gets no gradient
through that decay (h_t - x_t = 0 exactly, the scan's combine giving 0 * x_prev + x_t).
"""
import triton
import triton.language as tl


@triton.jit
def _compose(a_prev, x_prev, a_next, x_next):
    """Compose two affine maps h -> a h + x: first (a_prev, x_prev), then (a_next, x_next)."""
    return a_prev * a_next, a_next * x_prev + x_next


@triton.jit
def _store_bc_grad(ptr, value, slot, L, n, offs_t, offs_n, mask, DETERMINISTIC: tl.constexpr):
    """Write (DETERMINISTIC) or add atomically one chunk's (CHUNK, N) gradient of B or C at row `slot`
    of (slots, L, n)."""
    offs = (slot * L + offs_t[:, None]) * n + offs_n[None, :]
    if DETERMINISTIC:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.atomic_add(ptr + offs, value, mask=mask)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_bc(ptr, pid_b, group, offs_d, offs_t, offs_n, d_mask, t_mask, n_mask, s_0, s_1, s_n, s_l,
             FIXED: tl.constexpr):
    """B or C for one chunk as fp32: (BLOCK_D, 1, N) when fixed (d, n) [strides s_0 = d, s_n], else
    (1, CHUNK, N) from (batch, groups, n, L) [strides s_0, s_1, s_n, s_l]."""
    if FIXED:
        v = tl.load(ptr + offs_d[:, None] * s_0 + offs_n[None, :] * s_n,
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        return v.to(tl.float32)[:, None, :]
    else:
        v = tl.load(ptr + pid_b * s_0 + group * s_1 + offs_t[:, None] * s_l + offs_n[None, :] * s_n,
                    mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        return v.to(tl.float32)[None, :, :]


@triton.jit
def _keep(seq_ptr, pid_b, offs_t, L):
    """(CHUNK,) fp32 multiplier of the decay at steps offs_t of row pid_b of seq_idx (batch, L) int32: 0 where
    a document starts, else 1 (1 at t = 0 and past L, where nothing is carried or the state stays)."""
    inside = (offs_t > 0) & (offs_t < L)
    here = tl.load(seq_ptr + pid_b * L + offs_t, mask=inside, other=0)
    before = tl.load(seq_ptr + pid_b * L + offs_t - 1, mask=inside, other=0)
    return tl.where(here == before, 1.0, 0.0)


@triton.jit
def _load_delta(delta_ptr, bias, row, offs_t, t_mask, L, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta (BLOCK_D, CHUNK) fp32 after bias and softplus, and zero past L (so a = 1, x = 0 there)."""
    mask = t_mask[None, :] & (row[:, None] >= 0)
    raw = tl.load(delta_ptr + row[:, None] * L + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
    out_ptr, chunk_states_ptr, last_state_ptr,
    dim, L, n, n_chunks, dims_per_group,
    sB_0, sB_1, sB_n, sB_l, sC_0, sC_1, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, N: tl.constexpr,
):
    """u, delta, z, out: (batch, d, L) contiguous; A (d, n) contiguous; seq_idx (batch, L) int32 contiguous
    (read with HAS_SEQ_IDX); chunk_states (batch, d, n_chunks, n) and last_state (batch, d, n) fp32. Grid
    (batch, d / BLOCK_D); the BLOCK_D channels of a program share one group of B/C."""
    pid_b = tl.program_id(0).to(tl.int64)  # every (batch, ...) offset below is int64 through it
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N)
    d_mask = offs_d < dim
    n_mask = offs_n < n
    group = (pid_d * BLOCK_D) // dims_per_group
    row = pid_b * dim + offs_d  # (BLOCK_D,) index of the (batch, d) row
    row = tl.where(d_mask, row, -1)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * n + offs_n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else None
    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    for c in range(0, n_chunks):
        offs_t = c * CHUNK + tl.arange(0, CHUNK)
        t_mask = offs_t < L
        tl.store(chunk_states_ptr + ((row[:, None] * n_chunks + c) * n + offs_n[None, :]), h, mask=dn_mask)
        dt, _ = _load_delta(delta_ptr, bias, row, offs_t, t_mask, L, HAS_BIAS, SOFTPLUS)
        io_mask = d_mask[:, None] & t_mask[None, :]
        io_offs = row[:, None] * L + offs_t[None, :]
        u = tl.load(u_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        B = _load_bc(B_ptr, pid_b, group, offs_d, offs_t, offs_n, d_mask, t_mask, n_mask, sB_0, sB_1, sB_n, sB_l, B_FIXED)
        C = _load_bc(C_ptr, pid_b, group, offs_d, offs_t, offs_n, d_mask, t_mask, n_mask, sC_0, sC_1, sC_n, sC_l, C_FIXED)
        a = tl.exp(dt[:, :, None] * A[:, None, :])  # (BLOCK_D, CHUNK, N)
        if HAS_SEQ_IDX:
            a = a * _keep(seq_ptr, pid_b, offs_t, L)[None, :, None]
        x = (dt * u)[:, :, None] * B
        a_cum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_compose)
        hs = hs + a_cum * h[:, None, :]  # states of this chunk, given the carried one
        y = tl.sum(hs * C, axis=2)  # (BLOCK_D, CHUNK)
        if HAS_D:
            y = y + D[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + io_offs, y.to(out_ptr.dtype.element_ty), mask=io_mask)
        # positions past L keep the state unchanged (a = 1, x = 0), so the last column is h_{end}
        h = tl.sum(tl.where(tl.arange(0, CHUNK)[None, :, None] == CHUNK - 1, hs, 0.0), axis=1)
    tl.store(last_state_ptr + row[:, None] * n + offs_n[None, :], h, mask=dn_mask)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
    chunk_states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_rows_ptr, dB_ptr, dC_ptr, dD_rows_ptr, dbias_rows_ptr,
    dim, L, n, n_chunks, dims_per_group,
    sB_0, sB_1, sB_n, sB_l, sC_0, sC_1, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_DLAST: tl.constexpr, DETERMINISTIC: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, N: tl.constexpr,
):
    """Gradients, same grid and layouts as the forward. du, ddelta, dz (batch, d, L) fp32;
    dA_rows (batch, d, n), dD_rows and dbias_rows (batch, d): per-row partials the caller sums over
    batch. dB/dC: per-row partials (batch, d, n) when fixed, else fp32 (batch, groups, L, n) accumulated
    atomically over the programs of a group, or, DETERMINISTIC, (batch, d / BLOCK_D, L, n): a row per
    program, stored for the caller to sum in a fixed order."""
    pid_b = tl.program_id(0).to(tl.int64)  # every (batch, ...) offset below is int64 through it
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N)
    d_mask = offs_d < dim
    n_mask = offs_n < n
    group = (pid_d * BLOCK_D) // dims_per_group
    row = tl.where(d_mask, pid_b * dim + offs_d, -1)
    if DETERMINISTIC:  # the row of dB/dC partials this program writes (no other program touches it)
        slot = pid_b * tl.num_programs(1) + pid_d
    else:  # the group's row, shared by its programs
        slot = pid_b * (dim // dims_per_group) + group
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * n + offs_n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else None
    if HAS_DLAST:
        dh_carry = tl.load(dlast_ptr + row[:, None] * n + offs_n[None, :], mask=dn_mask, other=0.0)
    else:
        dh_carry = tl.zeros((BLOCK_D, N), dtype=tl.float32)  # d loss / d h at the first step of the next chunk
    dA = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dB_fixed = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dC_fixed = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, n_chunks):
        c = n_chunks - 1 - k
        offs_t = c * CHUNK + tl.arange(0, CHUNK)
        t_mask = offs_t < L
        io_mask = d_mask[:, None] & t_mask[None, :]
        io_offs = row[:, None] * L + offs_t[None, :]
        # recompute the chunk's states from its checkpoint, as in the forward
        h0 = tl.load(chunk_states_ptr + ((row[:, None] * n_chunks + c) * n + offs_n[None, :]), mask=dn_mask, other=0.0)
        dt, dt_raw = _load_delta(delta_ptr, bias, row, offs_t, t_mask, L, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        B = _load_bc(B_ptr, pid_b, group, offs_d, offs_t, offs_n, d_mask, t_mask, n_mask, sB_0, sB_1, sB_n, sB_l, B_FIXED)
        C = _load_bc(C_ptr, pid_b, group, offs_d, offs_t, offs_n, d_mask, t_mask, n_mask, sC_0, sC_1, sC_n, sC_l, C_FIXED)
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        if HAS_SEQ_IDX:
            a = a * _keep(seq_ptr, pid_b, offs_t, L)[None, :, None]
        x = (dt * u)[:, :, None] * B
        a_cum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_compose)
        hs = hs + a_cum * h0[:, None, :]
        # output gradient through the z gate and the D skip
        dy = tl.load(dout_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + io_offs, mask=io_mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            y = tl.sum(hs * C, axis=2)
            if HAS_D:
                y = y + D[:, None] * u
            tl.store(dz_ptr + io_offs, dy * y * sig * (1.0 + zv * (1.0 - sig)), mask=io_mask)
            dy = dy * zv * sig
        du = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        if HAS_D:
            dD += tl.sum(dy * u, axis=1)
            du = dy * D[:, None]
        # adjoint states dh_t = C_t dy_t + a_{t+1} dh_{t+1}: a forward scan over the steps taken last to
        # first (offs_r, the reverse of offs_t), flipped back to time order after; see the module docstring
        offs_r = c * CHUNK + CHUNK - 1 - tl.arange(0, CHUNK)
        dt_next, _ = _load_delta(delta_ptr, bias, row, offs_r + 1, (offs_r + 1) < L, L, HAS_BIAS, SOFTPLUS)
        a_next = tl.exp(dt_next[:, :, None] * A[:, None, :])
        if HAS_SEQ_IDX:  # a document starting at t + 1 cuts dh_t off from it
            a_next = a_next * _keep(seq_ptr, pid_b, offs_r + 1, L)[None, :, None]
        C_r = _load_bc(C_ptr, pid_b, group, offs_d, offs_r, offs_n, d_mask, offs_r < L, n_mask,
                       sC_0, sC_1, sC_n, sC_l, C_FIXED)
        a_cum_r, dhs_r = tl.associative_scan((a_next, C_r * tl.flip(dy, 1)[:, :, None]), axis=1,
                                             combine_fn=_compose)
        dhs_r = dhs_r + a_cum_r * dh_carry[:, None, :]
        dh_carry = tl.sum(tl.where(tl.arange(0, CHUNK)[None, :, None] == CHUNK - 1, dhs_r, 0.0), axis=1)  # at offs_t[0]
        dhs = tl.flip(dhs_r, 1)
        # a_t h_{t-1} = h_t - x_t: the gradient of delta_t * A without a shifted copy of the states
        d_dA = dhs * (hs - x)
        dx = dhs * B
        ddt = tl.sum(d_dA * A[:, None, :], axis=2) + tl.sum(dx, axis=2) * u
        du += tl.sum(dx, axis=2) * dt
        dA += tl.sum(d_dA * dt[:, :, None], axis=1)
        dBt = dhs * (dt * u)[:, :, None]
        dCt = hs * dy[:, :, None]
        bc_mask = t_mask[:, None] & n_mask[None, :]
        if B_FIXED:
            dB_fixed += tl.sum(dBt, axis=1)
        else:
            _store_bc_grad(dB_ptr, tl.sum(dBt, axis=0), slot, L, n, offs_t, offs_n, bc_mask, DETERMINISTIC)
        if C_FIXED:
            dC_fixed += tl.sum(dCt, axis=1)
        else:
            _store_bc_grad(dC_ptr, tl.sum(dCt, axis=0), slot, L, n, offs_t, offs_n, bc_mask, DETERMINISTIC)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(io_mask, ddt, 0.0)
        dbias += tl.sum(ddt, axis=1)
        tl.store(ddelta_ptr + io_offs, ddt, mask=io_mask)
        tl.store(du_ptr + io_offs, du, mask=io_mask)
    tl.store(dA_rows_ptr + row[:, None] * n + offs_n[None, :], dA, mask=dn_mask)
    if B_FIXED:
        tl.store(dB_ptr + row[:, None] * n + offs_n[None, :], dB_fixed, mask=dn_mask)
    if C_FIXED:
        tl.store(dC_ptr + row[:, None] * n + offs_n[None, :], dC_fixed, mask=dn_mask)
    tl.store(dD_rows_ptr + row, dD, mask=d_mask)
    tl.store(dbias_rows_ptr + row, dbias, mask=d_mask)
