"""Triton kernels of `qkov.workers.pass_kernels` (imported only where Triton is: module-level
jit functions, as Triton resolves the helpers they call by global name)."""
import triton
import triton.language as tl

@triton.jit
def round_bf16(x):
    # float32 -> nearest bfloat16 (ties to even) -> float32, as torch's .to(torch.bfloat16)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def pass1(t_ptr, n_cols, row0, n_rows, acc_ptr, acc_kind_stride, fisher_ptr, fisher_stride, cw_ptr,
          n_streams, bad_ptr, out_ptr, out_head_stride, out_row0, P, ROUND: tl.constexpr, HAS_ACC: tl.constexpr,
          HAS_FISHER: tl.constexpr, STORE: tl.constexpr, BLOCK: tl.constexpr):
    # rows row0.. of t (B, n_cols = H·P): task sums (ROUND: of t rounded to bf16), the Fisher's
    # weighted Σ t² per stream, a non-finite flag, and (STORE 1: float32, 2: bf16) each row
    # written into a shard buffer (H, n, P) at sample out_row0 + row
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = col < n_cols
    sq = tl.zeros((BLOCK,), tl.float32)
    s0 = tl.zeros((BLOCK,), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int32)
    if STORE > 0:
        dst = out_ptr + (col // P) * out_head_stride + (col % P)
    for r in range(n_rows):
        x = tl.load(t_ptr + (row0 + r) * n_cols + col, mask=m, other=0.0)
        bad = tl.maximum(bad, (x != x).to(tl.int32) | (tl.abs(x) == float("inf")).to(tl.int32))
        sq += x * x
        if STORE == 1:
            tl.store(dst + (out_row0 + row0 + r) * P, x, mask=m)
        if STORE == 2:  # (a bf16 value stored exactly: the rounding is round_bf16's)
            tl.store(dst + (out_row0 + row0 + r) * P, round_bf16(x).to(tl.bfloat16), mask=m)
        if ROUND:
            x = round_bf16(x)
        s0 += x
        s1 += tl.abs(x)
        s2 += x * x
    tl.atomic_max(bad_ptr, tl.max(bad, 0))  # a flag: max is order-free
    _flush(acc_ptr, acc_kind_stride, fisher_ptr, fisher_stride, cw_ptr, n_streams, col, m, s0, s1, s2, sq,
           HAS_ACC, HAS_FISHER)


@triton.jit
def _flush(acc_ptr, acc_kind_stride, fisher_ptr, fisher_stride, cw_ptr, n_streams, at, m, s0, s1, s2, sq,
           HAS_ACC: tl.constexpr, HAS_FISHER: tl.constexpr):
    # pass 1's sums at offsets `at` added to the task sums (three kinds) and the Fisher's float64 streams
    if HAS_ACC:
        a0 = acc_ptr + at
        tl.store(a0, tl.load(a0, mask=m) + s0, mask=m)
        tl.store(a0 + acc_kind_stride, tl.load(a0 + acc_kind_stride, mask=m) + s1, mask=m)
        tl.store(a0 + 2 * acc_kind_stride, tl.load(a0 + 2 * acc_kind_stride, mask=m) + s2, mask=m)
    if HAS_FISHER:
        sq64 = sq.to(tl.float64)
        for k in range(n_streams):
            c = tl.load(cw_ptr + k)
            if c != 0.0:
                f = fisher_ptr + k * fisher_stride + at
                tl.store(f, tl.load(f, mask=m) + c * sq64, mask=m)


@triton.jit
def pass2(t_ptr, inv_ptr, sums_ptr, out_ptr, P, n_rows, n_tasks, n_blocks, n_heads, s_kind, s_task,
          ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # program (block j, head h, rows ROWS·g..): rows b of t (B, H, P), inv (H, P), sums (3, tasks,
    # H, P) -> out (B, H, n_blocks, 3 + 3·tasks) partial sums of each sample's scalars
    j = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    p = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < P
    hp = h * P + p
    w = tl.load(inv_ptr + hp, mask=m, other=0.0)
    n_parts = 3 + 3 * n_tasks
    b_end = tl.minimum(tl.program_id(2) * ROWS + ROWS, n_rows)
    for b in range(tl.program_id(2) * ROWS, b_end):
        x = tl.load(t_ptr + b * n_heads * P + hp, mask=m, other=0.0)
        if ROUND:
            x = round_bf16(x)
        _scalars(out_ptr + ((b * n_heads + h) * n_blocks + j) * n_parts, x, w, sums_ptr, hp, m, s_kind, s_task, n_tasks)


@triton.jit
def _scalars(o, x, w, sums_ptr, at, m, s_kind, s_task, n_tasks):
    # one sample's 3 + 3·tasks scalar partials at o: Σg², Σu, Σu|g| (u = g²w), then per task
    # ⟨g w, Σg⟩, ⟨u, Σ|g|⟩, ⟨|g| w, Σg²⟩ of x and w = inv (any shape) with the task sums at `at`
    a = tl.abs(x)
    g2 = x * x
    u = g2 * w
    tl.store(o, tl.sum(g2))
    tl.store(o + 1, tl.sum(u))
    tl.store(o + 2, tl.sum(u * a))
    xw = x * w
    aw = a * w
    for k in range(n_tasks):
        sk = sums_ptr + k * s_task + at
        s0 = tl.load(sk, mask=m, other=0.0)
        s1 = tl.load(sk + s_kind, mask=m, other=0.0)
        s2 = tl.load(sk + 2 * s_kind, mask=m, other=0.0)
        tl.store(o + 3 + 3 * k, tl.sum(xw * s0))
        tl.store(o + 4 + 3 * k, tl.sum(u * s1))
        tl.store(o + 5 + 3 * k, tl.sum(aw * s2))


@triton.jit
def sketch(t_ptr, inv_ptr, order_ptr, signs_ptr, out_ptr, out_part_stride, P, n_rows, n_heads, nnz, n_progs, scale,
           ROUND: tl.constexpr, DO_U: tl.constexpr, DO_V: tl.constexpr, DO_W: tl.constexpr, DIM: tl.constexpr,
           CHUNK: tl.constexpr, N_SUB: tl.constexpr, ROWS: tl.constexpr):
    # program (j, h, g): positions q of one head's count sketch in N_SUB chunks of CHUNK (a
    # multiple of DIM, so q's bucket is its offset mod DIM) for rows ROWS·g..; the entry at q is
    # t[b, h, order[r, h, q]]. The projection's order, signs and √inv are read once per chunk
    # for all the rows, each row's entries gathered once for every operand asked: u = (g·√inv)²,
    # v = |g|, w = g·√inv -> out (parts in that order, B, H, n_progs, DIM) partial bucket sums
    j = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rm = rows < n_rows
    acc_u = tl.zeros((ROWS, DIM), tl.float32)
    acc_v = tl.zeros((ROWS, DIM), tl.float32)
    acc_w = tl.zeros((ROWS, DIM), tl.float32)
    for c in range(N_SUB):
        q = (j.to(tl.int64) * N_SUB + c) * CHUNK + tl.arange(0, CHUNK)
        m = q < P
        for r in range(nnz):
            rq = (r * n_heads + h) * P + q
            idx = tl.load(order_ptr + rq, mask=m, other=0).to(tl.int64)
            sg = (tl.load(signs_ptr + rq, mask=m, other=0).to(tl.float32) * scale)[None, :]
            m2 = rm[:, None] & m[None, :]
            x = tl.load(t_ptr + (rows[:, None] * n_heads + h) * P + idx[None, :], mask=m2, other=0.0)
            if ROUND:
                x = round_bf16(x)
            if DO_V:
                acc_v += tl.sum(tl.reshape(tl.abs(x) * sg, (ROWS, CHUNK // DIM, DIM)), 1)
            if DO_U or DO_W:
                y = x * tl.sqrt(tl.load(inv_ptr + h * P + idx, mask=m, other=0.0))[None, :]
                if DO_U:
                    acc_u += tl.sum(tl.reshape(y * y * sg, (ROWS, CHUNK // DIM, DIM)), 1)
                if DO_W:
                    acc_w += tl.sum(tl.reshape(y * sg, (ROWS, CHUNK // DIM, DIM)), 1)
    o = out_ptr + ((rows[:, None] * n_heads + h) * n_progs + j) * DIM + tl.arange(0, DIM)[None, :]
    om = rm[:, None]
    k = 0
    if DO_U:
        tl.store(o, acc_u, mask=om)
        k += 1
    if DO_V:
        tl.store(o + k * out_part_stride, acc_v, mask=om)
        k += 1
    if DO_W:
        tl.store(o + k * out_part_stride, acc_w, mask=om)


# ---- the passes fused with the per-sample gradients' formation (`pass_kernels.fused_*`) ----
# One program holds a (BM, BN) tile of one head's slice, entries (r, c) at p = r·C + c, which is
# weight entry (o, i) = (base // IN + r, base % IN + c), base = first + h·head_stride (every
# layout whose head rows are segments of weight rows: Llama's Q/K/V rows, O's columns). Each
# sample's tile g_b = Σ_t go[b, t, o]ᵀ x[b, t, i] is formed in registers by tl.dot and reduced
# there: no per-sample gradient is written to device memory.

@triton.jit
def _grad_tile(x_ptr, go_ptr, b, T, IN, OUT, o_idx, i_idx, mo, mi, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, UPCAST: tl.constexpr):
    # (BM, BN) float32: Σ_t go[b, t, o_idx]ᵀ x[b, t, i_idx] (go (B, T, OUT), x (B, T, IN) contiguous)
    acc = tl.zeros((BM, BN), tl.float32)
    row = tl.cast(b, tl.int64) * T
    for t0 in range(0, T, BK):
        t = t0 + tl.arange(0, BK)
        mt = t < T
        tt = (row + t)[:, None]
        g = tl.load(go_ptr + tt * OUT + o_idx[None, :], mask=mt[:, None] & mo[None, :], other=0.0)
        xx = tl.load(x_ptr + tt * IN + i_idx[None, :], mask=mt[:, None] & mi[None, :], other=0.0)
        if UPCAST:  # float32 operands (float32 models; bf16 under Triton's interpreter, whose bf16 dot is wrong)
            acc = tl.dot(tl.trans(g.to(tl.float32)), xx.to(tl.float32), acc, input_precision="ieee")
        else:  # bf16/fp16 operands on tensor cores, float32 accumulation (as torch.bmm(out_dtype=float32))
            acc = tl.dot(tl.trans(g), xx, acc)
    return acc


@triton.jit
def _tile_coords(pid, h, R, C, IN, first, head_stride, n_ct, BM: tl.constexpr, BN: tl.constexpr):
    rt = pid // n_ct
    ct = pid % n_ct
    r = rt * BM + tl.arange(0, BM)
    c = ct * BN + tl.arange(0, BN)
    base = first + h * head_stride
    return rt, ct, r, c, r < R, c < C, base // IN + r, base % IN + c


@triton.jit
def fused_pass1(x_ptr, go_ptr, T, IN, OUT, R, C, first, head_stride, n_ct, row0, n_rows, acc_ptr, acc_kind_stride,
                fisher_ptr, fisher_stride, cw_ptr, n_streams, bad_ptr, ROUND: tl.constexpr, HAS_ACC: tl.constexpr,
                HAS_FISHER: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # `pass1` for rows row0.. of one batch, each row's slice tile formed here: task sums (ROUND:
    # of the bf16-rounded values), the Fisher's weighted Σ g² per stream, a non-finite flag
    h = tl.program_id(1).to(tl.int64)
    rt, ct, r, c, mr, mc, o_idx, i_idx = _tile_coords(tl.program_id(0), h, R, C, IN, first, head_stride, n_ct, BM, BN)
    m = mr[:, None] & mc[None, :]
    at = h * R * C + r.to(tl.int64)[:, None] * C + c[None, :]
    sq = tl.zeros((BM, BN), tl.float32)
    s0 = tl.zeros((BM, BN), tl.float32)
    s1 = tl.zeros((BM, BN), tl.float32)
    s2 = tl.zeros((BM, BN), tl.float32)
    bad = tl.zeros((BM, BN), tl.int32)
    for j in range(n_rows):
        x = _grad_tile(x_ptr, go_ptr, row0 + j, T, IN, OUT, o_idx, i_idx, mr, mc, BM, BN, BK, UPCAST)
        bad = tl.maximum(bad, (x != x).to(tl.int32) | (tl.abs(x) == float("inf")).to(tl.int32))
        sq += x * x
        if ROUND:
            x = round_bf16(x)
        s0 += x
        s1 += tl.abs(x)
        s2 += x * x
    tl.atomic_max(bad_ptr, tl.max(bad))
    _flush(acc_ptr, acc_kind_stride, fisher_ptr, fisher_stride, cw_ptr, n_streams, at, m, s0, s1, s2, sq,
           HAS_ACC, HAS_FISHER)


@triton.jit
def fused_pass2(x_ptr, go_ptr, T, IN, OUT, R, C, first, head_stride, n_ct, n_rows, n_heads, inv_ptr, sums_ptr, s_kind,
                s_task, n_tasks, out_ptr, n_tiles, order_ptr, signs_ptr, sk_ptr, sk_part_stride, nnz, scale,
                ROUND: tl.constexpr, SKETCH: tl.constexpr, UPCAST: tl.constexpr, DIM: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    # `pass2` (+ `sketch` of u, v where SKETCH) of every row of one batch, each row's tile formed
    # here -> out (B, H, n_tiles, 3 + 3·tasks) partial scalars, sk (2, B, H, n_tiles, DIM)
    # partial bucket sums. SKETCH needs whole runs of DIM in a tile: its BM·BN entries, in row
    # order, are BM·BN/DIM runs (BN a multiple of DIM, or C = BN and BM·BN a multiple of DIM)
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rt, ct, r, c, mr, mc, o_idx, i_idx = _tile_coords(pid, h, R, C, IN, first, head_stride, n_ct, BM, BN)
    m = mr[:, None] & mc[None, :]
    P = R * C
    at = h * P + r.to(tl.int64)[:, None] * C + c[None, :]
    w = tl.load(inv_ptr + at, mask=m, other=0.0)
    n_parts = 3 + 3 * n_tasks
    NR: tl.constexpr = BM * BN // DIM
    if SKETCH:
        root = tl.reshape(tl.sqrt(w), (NR, DIM))
        f0 = tl.arange(0, NR) * DIM  # each run's first entry, as a flat offset in the tile
        p0 = (rt * BM + f0 // BN).to(tl.int64) * C + ct * BN + f0 % BN
        q = p0[:, None] + tl.arange(0, DIM)[None, :]
        mq = q < P  # (a tile past the last row; the last run where P is not a multiple of DIM)
    for b in range(n_rows):
        x = _grad_tile(x_ptr, go_ptr, b, T, IN, OUT, o_idx, i_idx, mr, mc, BM, BN, BK, UPCAST)
        if ROUND:
            x = round_bf16(x)
        _scalars(out_ptr + ((b * n_heads + h) * n_tiles + pid) * n_parts, x, w, sums_ptr, at, m, s_kind, s_task, n_tasks)
        if SKETCH:  # each run's entries gathered into bucket order (the run-local permutation), signed, summed over runs
            y = tl.reshape(x, (NR, DIM)) * root
            yy = y * y
            av = tl.reshape(tl.abs(x), (NR, DIM))
            acc_u = tl.zeros((DIM,), tl.float32)
            acc_v = tl.zeros((DIM,), tl.float32)
            for rr in range(nnz):
                pq = (rr * n_heads + h) * P + q
                idx = tl.where(mq, tl.load(order_ptr + pq, mask=mq, other=0) - p0[:, None], 0)
                sg = tl.load(signs_ptr + pq, mask=mq, other=0).to(tl.float32) * scale
                acc_u += tl.sum(tl.gather(yy, idx.to(tl.int32), 1) * sg, 0)
                acc_v += tl.sum(tl.gather(av, idx.to(tl.int32), 1) * sg, 0)
            so = sk_ptr + ((b * n_heads + h) * n_tiles + pid) * DIM + tl.arange(0, DIM)
            tl.store(so, acc_u)
            tl.store(so + sk_part_stride, acc_v)
