"""Triton kernels for paged attention: the KV write, split-KV decode (flash-decoding) and varlen
prefill over the paged cache. The cache of a layer is (2, num_blocks, block_size, num_kv_heads,
head_dim), as for every backend, or an int8 cache (``attention/kv_quant.py``: codes of that shape
and a float16 scale per slot and KV head); a token at position p of a request lives in block
``block_table[p // block_size]`` at row ``p % block_size``.

The kernels run on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported), which is how CI tests them. Accumulation is float32; float32 inputs use IEEE dot
products (not TF32), so float32 results match the portable backend to ~1e-6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK_ROW: tl.constexpr):
    """One program per new token: its K and V rows (nkv * d) go to its cache slot; slot < 0 is skipped."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs = tl.arange(0, BLOCK_ROW)
    mask = (offs < ROW) & ((tl.zeros([BLOCK_ROW], tl.int64) + slot) >= 0)  # broadcast: the interpreter needs it
    slot = tl.maximum(slot, 0)  # never form an address from -1, even a masked one
    k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
    tl.store(key_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(value_cache_ptr + slot * ROW + offs, v, mask=mask)


@triton.jit
def _write_kv_int8_kernel(k_ptr, v_ptr, codes_ptr, scales_ptr, slot_ptr, stride_k, stride_v, side_codes, side_scales,
                          NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One program per new token: each head's K and V rows quantized to int8 with a float16 scale
    max|x| / 127 (as ``kv_quant.quantize_rows``), stored at the token's slot; slot < 0 is skipped.
    ``side_codes`` / ``side_scales``: the offset from the K half of the cache to the V half."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    valid = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0
    h_mask = (offs_h < NUM_KV_HEADS) & valid
    mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    slot = tl.maximum(slot, 0)  # never form an address from -1, even a masked one
    row = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    for side in range(2):
        src = k_ptr + token * stride_k if side == 0 else v_ptr + token * stride_v
        x = tl.load(src + row, mask=mask, other=0.0).to(tl.float32)  # (H, D)
        scale = tl.maximum(tl.max(tl.abs(x), 1) / 127.0, 6.103515625e-05).to(tl.float16)  # >= 2**-14
        codes = tl.floor(x / scale.to(tl.float32)[:, None] + 0.5)
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8)
        tl.store(codes_ptr + side * side_codes + slot * (NUM_KV_HEADS * HEAD_DIM) + row, codes, mask=mask)
        tl.store(scales_ptr + side * side_scales + slot * NUM_KV_HEADS + offs_h, scale, mask=h_mask)


@triton.jit
def _load_kv(cache_ptr, scale_ptr, scale_value, kv_offs, kv_mask, slot, n_mask, kv_head, dtype: tl.constexpr,
             NUM_KV_HEADS: tl.constexpr, KV_FORMAT: tl.constexpr):
    """A (N, D) tile of K or V in ``dtype``: as stored (KV_FORMAT 0), int8 codes times their
    float16 scale per (slot, KV head) (1), or float8 e4m3 bytes times one scale (2)."""
    x = tl.load(cache_ptr + kv_offs, mask=kv_mask, other=0)
    if KV_FORMAT == 1:
        row_scale = tl.load(scale_ptr + slot * NUM_KV_HEADS + kv_head, mask=n_mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * row_scale[:, None]).to(dtype)
    elif KV_FORMAT == 2:
        x = (x.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale_value).to(dtype)
    return x


@triton.jit
def _attend_tile(q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr, k_scale_value,
                 v_scale_value, block_table_ptr, pos, n_mask, visible, kv_head, scale, offs_d, d_mask,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr):
    """One online-softmax step: the rows of q (R, D) attend to the keys at positions ``pos`` (N,),
    read in place through the block table row at ``block_table_ptr``; ``visible`` (R, N) says which
    of them each row may see. Returns the updated running max, sum and output (R,), (R,), (R, D).
    KV_FORMAT: 0 the model's dtype; 1 int8 codes scaled by a float16 per (slot, KV head) from the scale
    arrays; 2 float8 e4m3 bytes scaled by k_scale_value / v_scale_value."""
    block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=n_mask, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = _load_kv(key_cache_ptr, k_scale_ptr, k_scale_value, kv_offs, kv_mask, slot, n_mask, kv_head, q.dtype,
                 NUM_KV_HEADS, KV_FORMAT)  # (N, D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (R, N)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(value_cache_ptr, v_scale_ptr, v_scale_value, kv_offs, kv_mask, slot, n_mask, kv_head, q.dtype,
                 NUM_KV_HEADS, KV_FORMAT)  # (N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(q_ptr, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr, k_scale_value, v_scale_value,
                         block_tables_ptr, seq_lens_ptr,
                         part_out_ptr, part_lse_ptr, scale, stride_q_tok, stride_q_head, stride_bt,
                         num_heads, num_splits, tokens_per_split,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr):
    """Program (request, kv head, split): the GROUP query heads that share a KV head attend over one
    slice of the context, with an online softmax; writes the slice's normalised output and its
    log-sum-exp, which ``_decode_reduce_kernel`` combines."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (G, D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        visible = n_mask[None, :]
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr,
                                     k_scale_value, v_scale_value, block_tables_ptr + seq * stride_bt, pos, n_mask,
                                     visible, kv_head, scale, offs_d, d_mask, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                     DOT_PRECISION, KV_FORMAT)

    has_keys = l_i > 0  # an empty split (past the end of a short context) contributes nothing
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part = (seq * num_heads + heads) * num_splits + split  # (G,) rows of (num_decodes, nh, num_splits)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_o_tok, stride_o_head, num_heads, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (request, head): the splits' outputs weighted by their share of the softmax mass."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    part = (seq * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))  # (S,)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a padded row (seq_len 0) has no keys: its output is 0
    weights = tl.exp(lse - top)
    weights = weights / tl.maximum(tl.sum(weights, 0), 1e-30)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)  # (S, D)
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_kernel(q_ptr, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr, k_scale_value, v_scale_value,
                    out_ptr, block_tables_ptr, query_start_ptr,
                    num_computed_ptr, scale, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr):
    """Program (query tile, prompt chunk, head): BLOCK_M new tokens of one chunk attend causally to
    the chunk's cached context and to the chunk itself (already written to the cache)."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    head = tl.program_id(2)
    query_start = tl.load(query_start_ptr + chunk)
    query_len = tl.load(query_start_ptr + chunk + 1) - query_start
    if tile * BLOCK_M < query_len:  # chunks shorter than the longest have idle tiles
        context = tl.load(num_computed_ptr + chunk)
        kv_head = head // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = offs_m < query_len
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + (query_start + offs_m)[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (M, D)
        query_pos = context + offs_m  # (M,) positions in the sequence
        kv_end = context + tl.minimum((tile + 1) * BLOCK_M, query_len)  # the tile's last query sees up to here

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < kv_end
            visible = (pos[None, :] <= query_pos[:, None]) & n_mask[None, :]  # position 0 is always visible
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr,
                                         k_scale_value, v_scale_value, block_tables_ptr + chunk * stride_bt, pos,
                                         n_mask, visible, kv_head, scale, offs_d, d_mask, NUM_KV_HEADS, HEAD_DIM,
                                         BLOCK_SIZE, DOT_PRECISION, KV_FORMAT)
        out = acc / l_i[:, None]
        tl.store(out_ptr + (query_start + offs_m)[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused for 16-bit inputs


def _block(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(n))


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v (T, nkv, d) -> kv_cache (2, num_blocks, block_size, nkv, d) at slot_mapping (T,); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0),
                                    ROW=row, BLOCK_ROW=triton.next_power_of_2(row))


def write_kv_int8(k: torch.Tensor, v: torch.Tensor, kv_cache, slot_mapping: torch.Tensor) -> None:
    """k, v (T, nkv, d) -> an Int8KVCache's codes and scales at slot_mapping (T,); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    codes, scales = kv_cache.codes, kv_cache.scales  # (2, blocks, bs, nkv, d) int8, (2, blocks, bs, nkv) fp16
    _write_kv_int8_kernel[(num_tokens,)](k, v, codes, scales, slot_mapping, k.stride(0), v.stride(0),
                                         codes[0].numel(), scales[0].numel(), NUM_KV_HEADS=num_kv_heads,
                                         HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
                                         BLOCK_D=triton.next_power_of_2(head_dim))


def _cache_parts(kv_cache) -> tuple:
    """(K, V, K scale array, V scale array, K scale, V scale, KV_FORMAT, block_size, num_kv_heads) of a
    float cache tensor (2, num_blocks, block_size, nkv, d), an Int8KVCache (codes and float16 scale
    arrays) or an Fp8KVCache (bytes and one scale each); unused entries are placeholders."""
    if isinstance(kv_cache, torch.Tensor):
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
        return kv_cache[0], kv_cache[1], kv_cache[0], kv_cache[1], 1.0, 1.0, 0, block_size, num_kv_heads
    _, _, block_size, num_kv_heads, _ = kv_cache.codes.shape
    keys, values = kv_cache.codes[0], kv_cache.codes[1]
    if isinstance(kv_cache.scales, tuple):  # fp8: one scale each
        return keys, values, keys, values, kv_cache.scales[0], kv_cache.scales[1], 2, block_size, num_kv_heads
    return keys, values, kv_cache.scales[0], kv_cache.scales[1], 1.0, 1.0, 1, block_size, num_kv_heads


def paged_decode(q: torch.Tensor, kv_cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 max_seq_len: int, scale: float, num_splits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (D, nh, d): one new token per request, attending over seq_lens (D,) tokens through
    block_tables (D, W); the context is cut into ``num_splits`` slices attended in parallel.
    A row with seq_len 0 (padding, as in a CUDA graph's fixed batch) attends to nothing and gets 0.
    Returns (D, nh, d), written into ``out`` if given."""
    num_decodes, num_heads, head_dim = q.shape
    keys, values, k_scales, v_scales, k_scale, v_scale, kv_format, block_size, num_kv_heads = _cache_parts(kv_cache)
    group = num_heads // num_kv_heads
    block_n = _MIN_DOT if max_seq_len <= _MIN_DOT else 32
    tokens_per_split = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, tokens_per_split)
    part_out = torch.empty(num_decodes, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=q.device)
    q = _rows_contiguous(q)
    _decode_split_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, keys, values, k_scales, v_scales, k_scale, v_scale, block_tables, seq_lens, part_out, part_lse, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), num_heads, num_splits, tokens_per_split, NUM_KV_HEADS=num_kv_heads,
        GROUP=group, BLOCK_G=_block(group), HEAD_DIM=head_dim, BLOCK_D=_block(head_dim), BLOCK_N=block_n,
        BLOCK_SIZE=block_size, DOT_PRECISION=_dot_precision(q.dtype), KV_FORMAT=kv_format)
    out = torch.empty_like(q) if out is None else out
    _decode_reduce_kernel[(num_decodes, num_heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1), num_heads, num_splits, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(num_splits))
    return out


def paged_prefill(q: torch.Tensor, kv_cache, out: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, num_computed_tokens: torch.Tensor, max_query_len: int,
                  scale: float) -> None:
    """Prompt chunks in one launch. q and out (T, nh, d) are the packed batch; chunk i's new tokens
    are rows query_start_loc[i]:query_start_loc[i + 1], after num_computed_tokens[i] cached ones,
    its blocks block_tables[i] (P, W). Its K/V must already be in the cache."""
    num_chunks = block_tables.shape[0]
    _, num_heads, head_dim = q.shape
    keys, values, k_scales, v_scales, k_scale, v_scale, kv_format, block_size, num_kv_heads = _cache_parts(kv_cache)
    block_m = 32 if max_query_len > _MIN_DOT else _MIN_DOT
    q = _rows_contiguous(q)
    grid = (triton.cdiv(max_query_len, block_m), num_chunks, num_heads)
    _prefill_kernel[grid](
        q, keys, values, k_scales, v_scales, k_scale, v_scale, out, block_tables, query_start_loc,
        num_computed_tokens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_block(head_dim), BLOCK_M=block_m, BLOCK_N=32,
        BLOCK_SIZE=block_size, DOT_PRECISION=_dot_precision(q.dtype), KV_FORMAT=kv_format)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """(T, heads, d) whose heads and d are packed (stride d and 1), as the kernels index them."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()
