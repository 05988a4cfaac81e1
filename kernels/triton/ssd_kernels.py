"""Triton kernels of the chunked SSD (Mamba-2), forward and backward.

Notation, per (batch b, chunk c, head h of group g): steps l, s of the chunk; a = cumsum(dt * A) within
the chunk (a_end its last value); h0 the state entering the chunk; dS the gradient of the state
leaving it. The forward is three kernels, as in the paper's algorithm:
  chunk_state   S = sum_s exp(a_end - a_s) dt_s x_s B_s^T          (the state a chunk builds alone)
  state_passing h0[c+1] = exp(a_end[c]) h0[c] + S[c]                (sequential over chunks)
  chunk_scan    y_l = sum_{s<=l} (C_l.B_s) exp(a_l - a_s) dt_s x_s + exp(a_l) h0 C_l
The backward reuses the first two (the adjoint of state passing is the same recurrence run backwards,
fed by U = sum_l exp(a_l) dy_l C_l^T) and adds two kernels: one per block of steps s (what flows back
to x_s, dt_s, B_s) and one per block of outputs l (what flows back to C_l). The gradient with respect
to a is returned per step; the launcher turns it into gradients of dt and A with a reverse cumsum.

Layouts (all contiguous): x, y, dy, dx (batch, L, nheads, headdim); B, C, dB, dC (batch, L, ngroups,
dstate); per-step chunk quantities dt, a, ddt, da (batch, nheads, n_chunks, CHUNK) fp32, zero-padded
past L (dt = 0 there, so padded steps change nothing); states (batch, n_chunks, nheads, headdim,
dstate) fp32. dB and dC add up over the heads of a group atomically, or in deterministic mode are
stored per head, (batch, L, nheads, dstate), for the launcher to sum. The two backward kernels take dstate
in slices of BLOCK_N over their grid's axis 2 (whole 64x128 tiles spill registers); what sums over dstate
(dx, ddt, da) they write per slice, into (batch, n_slices, ...) partials that the launcher sums. All
arithmetic is fp32.

Document resets (HAS_SEQ_IDX; without it the kernels compile as if it did not exist): doc (batch, n_chunks,
CHUNK) int32 numbers the documents 0, 1, 2, ... along each row (padded steps in the last one), so two steps
lie in one document with no reset between them exactly when their numbers are equal. Then a source s reaches
an output l only in l's document (its decay is 0 otherwise), a chunk's own state S holds only the steps of
its last document, h0 reaches only the steps before the chunk's first reset (those numbered like the step
before the chunk; h0 of the first chunk is the initial state, document 0), and state passing drops the
carried state at a chunk with a reset: h0[c+1] = keep[c] exp(a_end[c]) h0[c] + S[c]. Each masked weight is
an exponent of -inf, so its gradient is 0 too.
"""
import triton
import triton.language as tl


@triton.jit
def _load_steps(ptr, b, t, L, width, stride_head, head, w0, BLOCK_W: tl.constexpr):
    """Rows t (BLOCK,), columns w0.. (BLOCK_W) of a (batch, L, heads, width) tensor for one head, as fp32."""
    offs_w = w0 + tl.arange(0, BLOCK_W)
    offs = ((b * L + t[:, None]) * stride_head + head) * width + offs_w[None, :]
    return tl.load(ptr + offs, mask=(t[:, None] < L) & (offs_w[None, :] < width), other=0.0).to(tl.float32)


@triton.jit
def _store_steps(ptr, value, b, t, L, width, stride_head, head, w0, BLOCK_W: tl.constexpr, ATOMIC: tl.constexpr):
    offs_w = w0 + tl.arange(0, BLOCK_W)
    offs = ((b * L + t[:, None]) * stride_head + head) * width + offs_w[None, :]
    mask = (t[:, None] < L) & (offs_w[None, :] < width)
    if ATOMIC:  # several heads share a group of B/C
        tl.atomic_add(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _state_offsets(b, c, head, n_chunks, nheads, headdim, dstate, n0, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets and mask of columns n0.. (BLOCK_N) of one (headdim, dstate) state in a (batch, n_chunks,
    nheads, headdim, dstate) tensor."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs = (((b * n_chunks + c) * nheads + head) * headdim + offs_p[:, None]) * dstate + offs_n[None, :]
    return offs, (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)


@triton.jit
def _decay(a_l, a_s, offs_l, offs_s):
    """exp(a_l - a_s) where l >= s, else 0 (BLOCK_L, BLOCK_S); never exponentiates a positive number."""
    return tl.exp(tl.where(offs_l[:, None] >= offs_s[None, :], a_l[:, None] - a_s[None, :], float("-inf")))


@triton.jit
def _decay_in_document(a_l, a_s, offs_l, offs_s, doc_l, doc_s):
    """`_decay`, and 0 between steps of different documents (BLOCK_L, BLOCK_S)."""
    keep = (offs_l[:, None] >= offs_s[None, :]) & (doc_l[:, None] == doc_s[None, :])
    return tl.exp(tl.where(keep, a_l[:, None] - a_s[None, :], float("-inf")))


@triton.jit
def _documents_around(doc_ptr, b, c, n_chunks, CHUNK: tl.constexpr):
    """(where chunk c of row b starts in doc, the document of the step before it (document 0 before the
    first chunk: the initial state's), the document of its last step)."""
    start = (b * n_chunks + c) * CHUNK
    before = tl.load(doc_ptr + tl.maximum(start - 1, b * n_chunks * CHUNK))
    return start, before, tl.load(doc_ptr + start + CHUNK - 1)


@triton.jit
def _chunk_program(nheads, ngroups, n_chunks, CHUNK: tl.constexpr):
    """This program's (batch b, chunk c, head, B/C group, row) for a grid (batch * n_chunks, nheads, ...);
    row is where (b, head, c) starts in the (batch, nheads, n_chunks, CHUNK) dt and a tensors."""
    b = (tl.program_id(0) // n_chunks).to(tl.int64)
    c = tl.program_id(0) % n_chunks
    head = tl.program_id(1)
    return b, c, head, head // (nheads // ngroups), ((b * nheads + head) * n_chunks + c) * CHUNK


@triton.jit
def _slice_program(b, c, head, nheads, n_chunks, dstate, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """For the backward's grid axis 2, (CHUNK / BLOCK) step blocks for each slice of BLOCK_N columns of
    dstate: (step block, first column n0, part, prow). Sums over dstate are written per slice, into
    (batch, n_slices, ...) partials: part is the (b, slice) index and prow the row of dt or a there."""
    blocks = CHUNK // BLOCK
    n_slice = tl.program_id(2) // blocks
    part = b * tl.cdiv(dstate, BLOCK_N) + n_slice
    return tl.program_id(2) % blocks, n_slice * BLOCK_N, part, ((part * nheads + head) * n_chunks + c) * CHUNK


@triton.jit
def chunk_state_kernel(
    X_ptr, Y_ptr, dt_ptr, a_ptr, doc_ptr, out_ptr,
    L, nheads, headdim, dstate, ngroups, n_chunks,
    FROM_START: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b, c, h] = sum_s X_s^T w_s Y_s over the steps of chunk c, with w_s = exp(a_end - a_s) dt_s
    (forward: X = x, Y = B) or, FROM_START, w_s = exp(a_s) (backward: X = dy, Y = C). HAS_SEQ_IDX: only
    the steps of the chunk's last document (forward) or those before its first reset (FROM_START).
    Grid (batch * n_chunks, nheads)."""
    b, c, head, group, row = _chunk_program(nheads, ngroups, n_chunks, CHUNK)
    a_end = tl.load(a_ptr + row + CHUNK - 1)
    if HAS_SEQ_IDX:
        doc_row, doc_before, doc_end = _documents_around(doc_ptr, b, c, n_chunks, CHUNK)
        if FROM_START:
            doc_kept = doc_before
        else:
            doc_kept = doc_end
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, CHUNK, BLOCK_K):
        offs_s = k + tl.arange(0, BLOCK_K)
        t = c * CHUNK + offs_s
        xs = _load_steps(X_ptr, b, t, L, headdim, nheads, head, 0, BLOCK_P)
        ys = _load_steps(Y_ptr, b, t, L, dstate, ngroups, group, 0, BLOCK_N)
        a_s = tl.load(a_ptr + row + offs_s)
        if FROM_START:
            exponent = a_s
        else:
            exponent = a_end - a_s
        if HAS_SEQ_IDX:
            exponent = tl.where(tl.load(doc_ptr + doc_row + offs_s) == doc_kept, exponent, float("-inf"))
        w = tl.exp(exponent)
        if not FROM_START:
            w = w * tl.load(dt_ptr + row + offs_s)
        acc += tl.dot(tl.trans(xs), ys * w[:, None], input_precision=PRECISION)
    offs, mask = _state_offsets(b, c, head, n_chunks, nheads, headdim, dstate, 0, BLOCK_P, BLOCK_N)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def state_passing_kernel(
    inputs_ptr, a_ptr, doc_ptr, start_ptr, carried_ptr, last_ptr,
    nheads, n_chunks, size,
    HAS_START: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """h <- start (or 0); for each chunk c in order (REVERSE: last to first): carried[c] = h, then
    h <- exp(a_end[c]) h + inputs[c]; last = h. Forward: inputs are the chunk states and carried[c] the
    state entering chunk c. Backward (REVERSE, start = d final state): inputs are U and carried[c] the
    gradient of the state leaving chunk c; last is the gradient of the initial state. HAS_SEQ_IDX: a chunk
    with a reset decays h by 0 (both ways: the adjoint of dropping the state is dropping its gradient).
    States flattened to `size` = headdim * dstate. Grid (batch, nheads, cdiv(size, BLOCK))."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    if HAS_START:
        h = tl.load(start_ptr + (b * nheads + head) * size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - k
        else:
            c = k
        state = ((b * n_chunks + c) * nheads + head) * size + offs
        tl.store(carried_ptr + state, h, mask=mask)
        a_end = tl.load(a_ptr + ((b * nheads + head) * n_chunks + c) * CHUNK + CHUNK - 1)
        if HAS_SEQ_IDX:
            _, doc_before, doc_end = _documents_around(doc_ptr, b, c, n_chunks, CHUNK)
            a_end = tl.where(doc_end == doc_before, a_end, float("-inf"))
        h = tl.exp(a_end) * h + tl.load(inputs_ptr + state, mask=mask, other=0.0)
    tl.store(last_ptr + (b * nheads + head) * size + offs, h, mask=mask)


@triton.jit
def chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, a_ptr, doc_ptr, entering_ptr, y_ptr,
    L, nheads, headdim, dstate, ngroups, n_chunks,
    HAS_SEQ_IDX: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """y (fp32, without D) for BLOCK_M steps of one chunk and head. Grid (batch * n_chunks, nheads,
    CHUNK / BLOCK_M)."""
    b, c, head, group, row = _chunk_program(nheads, ngroups, n_chunks, CHUNK)
    pid_m = tl.program_id(2)
    offs_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_l = c * CHUNK + offs_l
    C_l = _load_steps(C_ptr, b, t_l, L, dstate, ngroups, group, 0, BLOCK_N)
    a_l = tl.load(a_ptr + row + offs_l)
    offs, mask = _state_offsets(b, c, head, n_chunks, nheads, headdim, dstate, 0, BLOCK_P, BLOCK_N)
    h0 = tl.load(entering_ptr + offs, mask=mask, other=0.0)
    if HAS_SEQ_IDX:
        doc_row, doc_before, _ = _documents_around(doc_ptr, b, c, n_chunks, CHUNK)
        doc_l = tl.load(doc_ptr + doc_row + offs_l)
        from_start = tl.exp(tl.where(doc_l == doc_before, a_l, float("-inf")))
    else:
        from_start = tl.exp(a_l)
    acc = tl.dot(C_l, tl.trans(h0), input_precision=PRECISION) * from_start[:, None]
    for k in range(0, (pid_m + 1) * BLOCK_M, BLOCK_M):  # causal: source blocks up to the diagonal
        offs_s = k + tl.arange(0, BLOCK_M)
        t_s = c * CHUNK + offs_s
        B_s = _load_steps(B_ptr, b, t_s, L, dstate, ngroups, group, 0, BLOCK_N)
        x_s = _load_steps(x_ptr, b, t_s, L, headdim, nheads, head, 0, BLOCK_P)
        dt_s = tl.load(dt_ptr + row + offs_s)
        a_s = tl.load(a_ptr + row + offs_s)
        if HAS_SEQ_IDX:
            decay = _decay_in_document(a_l, a_s, offs_l, offs_s, doc_l, tl.load(doc_ptr + doc_row + offs_s))
        else:
            decay = _decay(a_l, a_s, offs_l, offs_s)
        w = tl.dot(C_l, tl.trans(B_s), input_precision=PRECISION) * decay * dt_s[None, :]
        acc += tl.dot(w, x_s, input_precision=PRECISION)
    _store_steps(y_ptr, acc, b, t_l, L, headdim, nheads, head, 0, BLOCK_P, False)


@triton.jit
def chunk_scan_bwd_sources_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, a_ptr, doc_ptr, dy_ptr, dleaving_ptr,
    dx_ptr, ddt_ptr, dB_ptr, da_ptr, da_end_ptr,
    L, nheads, headdim, dstate, ngroups, n_chunks,
    HAS_SEQ_IDX: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Gradients at BLOCK source steps s of one chunk and head, from the outputs l >= s and from the
    leaving state's gradient dS: dx, ddt (through dt as a factor only), dB (accumulated over the heads of
    a group, or, DETERMINISTIC, stored per head into (batch, L, nheads, dstate)), da_s (the terms where
    a_s enters with a minus sign) and da_end_s (the term of a_end). For BLOCK_N columns of dstate: dB's
    slice, and dx, ddt, da, da_end as partials per slice (sums over dstate), in (batch, n_slices, ...).
    Grid (batch * n_chunks, nheads, CHUNK / BLOCK * n_slices)."""
    b, c, head, group, row = _chunk_program(nheads, ngroups, n_chunks, CHUNK)
    pid_s, n0, part, prow = _slice_program(b, c, head, nheads, n_chunks, dstate, CHUNK, BLOCK, BLOCK_N)
    offs_s = pid_s * BLOCK + tl.arange(0, BLOCK)
    t_s = c * CHUNK + offs_s
    x_s = _load_steps(x_ptr, b, t_s, L, headdim, nheads, head, 0, BLOCK_P)
    B_s = _load_steps(B_ptr, b, t_s, L, dstate, ngroups, group, n0, BLOCK_N)
    dt_s = tl.load(dt_ptr + row + offs_s)
    a_s = tl.load(a_ptr + row + offs_s)
    if HAS_SEQ_IDX:
        doc_row, _, doc_end = _documents_around(doc_ptr, b, c, n_chunks, CHUNK)
        doc_s = tl.load(doc_ptr + doc_row + offs_s)
    g = tl.zeros((BLOCK, BLOCK_P), dtype=tl.float32)  # d y / d (dt_s x_s), summed over outputs
    dB = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    m_cols = tl.zeros((BLOCK,), dtype=tl.float32)  # sum_l of the score terms, for da_s
    for k in range(pid_s * BLOCK, CHUNK, BLOCK):
        offs_l = k + tl.arange(0, BLOCK)
        t_l = c * CHUNK + offs_l
        C_l = _load_steps(C_ptr, b, t_l, L, dstate, ngroups, group, n0, BLOCK_N)
        dy_l = _load_steps(dy_ptr, b, t_l, L, headdim, nheads, head, 0, BLOCK_P)
        if HAS_SEQ_IDX:
            decay = _decay_in_document(tl.load(a_ptr + row + offs_l), a_s, offs_l, offs_s,
                                       tl.load(doc_ptr + doc_row + offs_l), doc_s)  # (l, s)
        else:
            decay = _decay(tl.load(a_ptr + row + offs_l), a_s, offs_l, offs_s)  # (l, s)
        w = tl.dot(C_l, tl.trans(B_s), input_precision=PRECISION) * decay
        xdy = tl.dot(dy_l, tl.trans(x_s), input_precision=PRECISION)
        g += tl.dot(tl.trans(w), dy_l, input_precision=PRECISION)
        dB += tl.dot(tl.trans(decay * xdy), C_l, input_precision=PRECISION)
        m_cols += tl.sum(w * xdy, axis=0)
    offs, mask = _state_offsets(b, c, head, n_chunks, nheads, headdim, dstate, n0, BLOCK_P, BLOCK_N)
    dS = tl.load(dleaving_ptr + offs, mask=mask, other=0.0)
    if HAS_SEQ_IDX:  # only the chunk's last document reaches its end
        to_end = tl.exp(tl.where(doc_s == doc_end, tl.load(a_ptr + row + CHUNK - 1) - a_s, float("-inf")))
    else:
        to_end = tl.exp(tl.load(a_ptr + row + CHUNK - 1) - a_s)
    g += to_end[:, None] * tl.dot(B_s, tl.trans(dS), input_precision=PRECISION)
    x_dS = tl.dot(x_s, dS, input_precision=PRECISION)  # (s, BLOCK_N)
    dB = dt_s[:, None] * (dB + to_end[:, None] * x_dS)
    end_term = to_end * dt_s * tl.sum(B_s * x_dS, axis=1)
    _store_steps(dx_ptr, g * dt_s[:, None], part, t_s, L, headdim, nheads, head, 0, BLOCK_P, False)
    if DETERMINISTIC:  # a row per head, which the caller sums over the group's heads in a fixed order
        _store_steps(dB_ptr, dB, b, t_s, L, dstate, nheads, head, n0, BLOCK_N, False)
    else:
        _store_steps(dB_ptr, dB, b, t_s, L, dstate, ngroups, group, n0, BLOCK_N, True)
    tl.store(ddt_ptr + prow + offs_s, tl.sum(x_s * g, axis=1))
    tl.store(da_ptr + prow + offs_s, -dt_s * m_cols - end_term)
    tl.store(da_end_ptr + prow + offs_s, end_term)


@triton.jit
def chunk_scan_bwd_outputs_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, a_ptr, doc_ptr, dy_ptr, entering_ptr,
    dC_ptr, da_ptr,
    L, nheads, headdim, dstate, ngroups, n_chunks,
    HAS_SEQ_IDX: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Gradients at BLOCK output steps l of one chunk and head: dC (accumulated over the heads of a
    group, or stored per head as dB above) and da_l (the terms where a_l enters with a plus sign), from
    the sources s <= l and the entering state h0. For BLOCK_N columns of dstate: dC's slice and da's
    partial, in (batch, n_slices, ...). Grid (batch * n_chunks, nheads, CHUNK / BLOCK * n_slices)."""
    b, c, head, group, row = _chunk_program(nheads, ngroups, n_chunks, CHUNK)
    pid_l, n0, part, prow = _slice_program(b, c, head, nheads, n_chunks, dstate, CHUNK, BLOCK, BLOCK_N)
    offs_l = pid_l * BLOCK + tl.arange(0, BLOCK)
    t_l = c * CHUNK + offs_l
    C_l = _load_steps(C_ptr, b, t_l, L, dstate, ngroups, group, n0, BLOCK_N)
    dy_l = _load_steps(dy_ptr, b, t_l, L, headdim, nheads, head, 0, BLOCK_P)
    a_l = tl.load(a_ptr + row + offs_l)
    if HAS_SEQ_IDX:
        doc_row, doc_before, _ = _documents_around(doc_ptr, b, c, n_chunks, CHUNK)
        doc_l = tl.load(doc_ptr + doc_row + offs_l)
    dC = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    m_rows = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, (pid_l + 1) * BLOCK, BLOCK):
        offs_s = k + tl.arange(0, BLOCK)
        t_s = c * CHUNK + offs_s
        B_s = _load_steps(B_ptr, b, t_s, L, dstate, ngroups, group, n0, BLOCK_N)
        x_s = _load_steps(x_ptr, b, t_s, L, headdim, nheads, head, 0, BLOCK_P)
        dt_s = tl.load(dt_ptr + row + offs_s)
        if HAS_SEQ_IDX:
            decay = _decay_in_document(a_l, tl.load(a_ptr + row + offs_s), offs_l, offs_s, doc_l,
                                       tl.load(doc_ptr + doc_row + offs_s))
        else:
            decay = _decay(a_l, tl.load(a_ptr + row + offs_s), offs_l, offs_s)
        v = decay * tl.dot(dy_l, tl.trans(x_s), input_precision=PRECISION) * dt_s[None, :]
        dC += tl.dot(v, B_s, input_precision=PRECISION)
        m_rows += tl.sum(v * tl.dot(C_l, tl.trans(B_s), input_precision=PRECISION), axis=1)
    offs, mask = _state_offsets(b, c, head, n_chunks, nheads, headdim, dstate, n0, BLOCK_P, BLOCK_N)
    h0 = tl.load(entering_ptr + offs, mask=mask, other=0.0)
    dy_h0 = tl.dot(dy_l, h0, input_precision=PRECISION)  # (l, BLOCK_N)
    if HAS_SEQ_IDX:  # h0 reaches the steps before the chunk's first reset
        from_start = tl.exp(tl.where(doc_l == doc_before, a_l, float("-inf")))
    else:
        from_start = tl.exp(a_l)
    dC += from_start[:, None] * dy_h0
    if DETERMINISTIC:
        _store_steps(dC_ptr, dC, b, t_l, L, dstate, nheads, head, n0, BLOCK_N, False)
    else:
        _store_steps(dC_ptr, dC, b, t_l, L, dstate, ngroups, group, n0, BLOCK_N, True)
    tl.store(da_ptr + prow + offs_l, m_rows + from_start * tl.sum(C_l * dy_h0, axis=1))
