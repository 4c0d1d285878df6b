"""Context-parallel (CP) core attention for the causal GQA LLM, without TransformerEngine.

megatron-core 0.16.1 only has CP attention through TransformerEngine (its ``DotProductAttention``
asserts ``context_parallel_size == 1``). ``ContextParallelAttention`` fills the same ``core_attention``
slot of a ``SelfAttentionSubmodules`` spec, with the same constructor and forward signature, and runs
one of two algorithms over megatron's CP group:

* ``megatron_cp_algo`` (ring): K/V blocks travel around the CP ring with point-to-point send/recv;
  every step attends the local queries to the visiting block and merges the result with an online
  softmax (running log-sum-exp, fp32). The backward pass (a custom autograd.Function) recomputes each
  block; dQ accumulates locally, dK/dV accumulate in fp32 and travel with their block back to its
  owner. Blocks that the causal mask hides entirely are skipped; partly visible ones are cut to their
  visible rows and columns.
* ``ulysses_cp_algo`` (all-to-all): an all-to-all turns ``[s/cp, b, heads, d]`` into
  ``[s, b, heads/cp, d]``, attention runs on the whole sequence for a slice of the heads, and a second
  all-to-all brings the output back.

Layout contract (the caller's, as in Megatron-LM): the sequence is padded to a multiple of ``2 * cp``
(``pad_to_multiple``), cut into ``2 * cp`` chunks, and CP rank ``r`` holds chunks ``r`` and
``2cp - 1 - r`` (``zigzag_split``; the same as megatron's ``get_batch_on_this_cp_rank`` and RoPE's
``get_pos_emb_on_this_cp_rank``). Padding goes on the right and is excluded by the loss mask; the causal
mask is built from the global token positions (``zigzag_positions``), so right padding never leaks into
real tokens. No bias or dropout.

Packed micro-batches (several samples per row, InternVLModel's `sample_ids`): the attention mask is the integer
sample ids ``[b, S]`` of the full padded sequence (not split), passed as ``attention_mask``. A query then sees
the keys of its own sample up to itself: the ring builds the mask of each (query chunk, key chunk) block from
the ids at the block's global positions (a block row may see no key of a block; its partial result is empty and
the merge ignores it: every row sees itself in the rank's own block, step 0), and Ulysses the mask of the whole
sequence it holds for its heads. InternVLModel splits a pack sample by sample instead (``PackedLayout``: each
sample padded to a multiple of ``2 * cp`` and cut in zigzag, megatron's THD split) and passes
``PackedLayout.attention_mask`` [2, b, S] (ids and global positions of every rank's tokens, in rank order): the
ring then masks every block to same sample and key position <= query position, Ulysses its gathered sequence.

Communication works on gloo (CPU) and nccl unchanged. gloo pairs the messages between two ranks in
posting order (at cp = 2 the previous and the next rank are the same peer), so every rank posts its
sends and receives in the same program order, K/V and dK/dV messages carry different tags, and all
transfers of a step are posted together through ``batch_isend_irecv`` (a NCCL group, so no deadlock).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

RING_ALGO = "megatron_cp_algo"
ULYSSES_ALGO = "ulysses_cp_algo"
CP_ALGOS = (RING_ALGO, ULYSSES_ALGO)
# megatron's TransformerConfig.cp_comm_type names for the same two algorithms.
_COMM_TYPE_TO_ALGO = {"p2p": RING_ALGO, "a2a": ULYSSES_ALGO}
_TAG_KV, _TAG_DKV = 1, 2


# ---------------------------------------------------------------------------------------------------
# Pure helpers: padding and the zigzag (load-balanced) layout
# ---------------------------------------------------------------------------------------------------

def pad_to_multiple(length: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``length`` (e.g. 13, 4 -> 16)."""
    if multiple < 1 or length < 0:
        raise ValueError(f"pad_to_multiple: need length >= 0 and multiple >= 1, got {length}, {multiple}")
    return -(-length // multiple) * multiple


def _check_zigzag(seq_len: int, cp_size: int, cp_rank: int) -> int:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"zigzag: bad cp_rank {cp_rank} for cp_size {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"zigzag: sequence length {seq_len} is not a multiple of 2 * cp = "
                         f"{2 * cp_size}; pad it first (pad_to_multiple)")
    return seq_len // (2 * cp_size)


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.LongTensor:
    """Global positions (CPU LongTensor, length ``seq_len / cp``) of the tokens CP rank ``cp_rank``
    holds: chunk ``cp_rank`` then chunk ``2cp - 1 - cp_rank`` of ``2cp`` equal chunks."""
    chunk = _check_zigzag(seq_len, cp_size, cp_rank)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def zigzag_split(t: Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> Tensor:
    """This CP rank's part of ``t`` along ``seq_dim``: chunks ``cp_rank`` and ``2cp - 1 - cp_rank`` of
    ``2cp`` (megatron's ``get_batch_on_this_cp_rank`` layout). The length must be a multiple of 2cp."""
    seq_dim = seq_dim % t.dim()
    chunk = _check_zigzag(t.size(seq_dim), cp_size, cp_rank)
    if cp_size == 1:
        return t
    first = t.narrow(seq_dim, cp_rank * chunk, chunk)
    second = t.narrow(seq_dim, (2 * cp_size - 1 - cp_rank) * chunk, chunk)
    return torch.cat([first, second], dim=seq_dim)


# ---------------------------------------------------------------------------------------------------
# Packed micro-batches: every sample split in zigzag over the CP ranks (megatron's THD split)
# ---------------------------------------------------------------------------------------------------

class PackedLayout:
    """The CP layout of a packed micro-batch (`sample_ids` [b, s]: whole samples back to back, numbered 0, 1, ...,
    -1 on padding, last): every sample (each run of one id, the padding run too) is padded at its end to a multiple
    of ``2 * cp`` tokens and cut into ``2 * cp`` chunks, and CP rank ``r`` holds chunks ``r`` and ``2cp - 1 - r`` of
    every sample, as megatron splits THD sequences. Each rank then holds ``S / cp`` tokens (S: the padded length)
    and the same share of every sample's causal attention work.

    ``dest`` [b, s]: where each token of the unpadded pack goes in the padded one. ``sample_ids``, ``positions``,
    ``lengths`` [b, S]: each padded token's sample (a sample's pads carry its id), its position within the sample,
    and the sample's real token count. ``index`` [cp, b, S / cp]: the padded positions rank r holds, in its order.
    Built from ``sample_ids`` alone, so every rank of the CP group builds the same one."""

    def __init__(self, sample_ids: Tensor, cp: int, multiple: int = 1, length: Optional[int] = None):
        if cp < 1 or multiple < 1:
            raise ValueError(f"PackedLayout: need cp >= 1 and multiple >= 1, got {cp}, {multiple}")
        ids = sample_ids.long()
        b, s = ids.shape
        unit = 2 * cp
        rows = [torch.unique_consecutive(ids[j].cpu(), return_counts=True) for j in range(b)]
        natural = max(sum(pad_to_multiple(int(c), unit) for c in cnt.tolist()) for _, cnt in rows) if b else 0
        if length is None:
            length = pad_to_multiple(natural, unit * multiple)
        elif length < natural or length % unit:
            raise ValueError(f"PackedLayout: length {length} is below {natural} or not a multiple of {unit}")
        dest, out_ids, pos, lens, index = [], [], [], [], []
        for vals, cnts in rows:
            offset, d, i_, p_, l_, idx = 0, [], [], [], [], [[] for _ in range(cp)]
            runs = list(zip(vals.tolist(), cnts.tolist()))
            if not runs or runs[-1][0] != -1:
                runs.append((-1, 0))
            for k, (v, c) in enumerate(runs):
                if v == -1 and k != len(runs) - 1:
                    raise ValueError("PackedLayout: padding (-1) must be the last run of a row")
                n = length - offset if v == -1 else pad_to_multiple(c, unit)
                d.append(torch.arange(offset, offset + c))
                i_.append(torch.full((n,), v))
                p_.append(torch.arange(n))
                l_.append(torch.full((n,), c if v != -1 else n))
                chunk = n // unit
                for r in range(cp):
                    a, z = offset + r * chunk, offset + (unit - 1 - r) * chunk
                    idx[r] += [torch.arange(a, a + chunk), torch.arange(z, z + chunk)]
                offset += n
            dest.append(torch.cat(d))
            out_ids.append(torch.cat(i_))
            pos.append(torch.cat(p_))
            lens.append(torch.cat(l_))
            index.append(torch.stack([torch.cat(x) for x in idx]))
        dev = sample_ids.device
        self.cp, self.length = cp, length
        self.dest = torch.stack(dest).to(dev)
        self.sample_ids = torch.stack(out_ids).to(dev)
        self.positions = torch.stack(pos).to(dev)
        self.lengths = torch.stack(lens).to(dev)
        self.index = torch.stack(index, dim=1).to(dev)  # [cp, b, S / cp]

    def pad(self, t: Tensor, fill) -> Tensor:
        """[b, s] (the unpadded pack) -> [b, S]: every token at its padded position, ``fill`` on the pads."""
        out = t.new_full((t.shape[0], self.length), fill)
        return out.scatter_(1, self.dest.to(t.device), t)

    def local(self, t: Tensor, rank: int, seq_dim: int) -> Tensor:
        """Rank ``rank``'s part of ``t`` (padded length S along ``seq_dim``, the batch along the other of dims 0/1)."""
        seq_dim = seq_dim % t.dim()
        idx = self.index[rank].to(t.device)  # [b, S / cp]
        if seq_dim == 0:
            idx = idx.t()
        shape = idx.shape + (1,) * (t.dim() - 2)
        return t.gather(seq_dim, idx.reshape(shape).expand(*idx.shape, *t.shape[2:]))

    def attention_mask(self) -> Tensor:
        """What core attention takes as ``attention_mask``: [2, b, S] int64, the sample id and the padded position
        of every token in rank-concatenated order (rank 0's tokens, rank 1's, ...): rank j's tokens are columns
        ``j * S / cp`` to ``(j + 1) * S / cp``, and Ulysses' gathered sequence is that order."""
        order = self.index.permute(1, 0, 2).reshape(self.index.shape[1], -1)  # [b, S]
        return torch.stack([self.sample_ids.gather(1, order), order])


def _layout_mask(ids_q: Tensor, pos_q: Tensor, ids_k: Tensor, pos_k: Tensor) -> Tensor:
    """[b, 1, 1, nq, nk] bool: same sample and key position <= query position (ids/positions [b, n])."""
    m = (ids_q.unsqueeze(2) == ids_k.unsqueeze(1)) & (pos_k.unsqueeze(1) <= pos_q.unsqueeze(2))
    return m[:, None, None]


def _is_layout(sample_ids: Optional[Tensor]) -> bool:
    return sample_ids is not None and sample_ids.dim() == 3


# ---------------------------------------------------------------------------------------------------
# Block planning: which rows/columns of a (local queries x visiting keys) block the causal mask shows
# ---------------------------------------------------------------------------------------------------

Index = Union[slice, Tensor]


def _as_index(idx: Tensor) -> Index:
    """A slice when ``idx`` (sorted, unique) is contiguous, else the index tensor."""
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) + 1 == n:
        return slice(int(idx[0]), int(idx[0]) + n)
    return idx


@functools.lru_cache(maxsize=256)
def _block_plan(seq_len: int, cp_size: int, q_rank: int, kv_rank: int):
    """None when no query of ``q_rank`` may see any key of ``kv_rank`` (causal, global positions);
    else ``(rows, cols, needs_mask, q_pos, k_pos)``: the visible query rows and key columns (slices
    or CPU index tensors), whether the sub-block is only partly visible, and the positions of those
    rows/columns (CPU) for building that mask."""
    q_pos = zigzag_positions(seq_len, cp_size, q_rank)
    k_pos = zigzag_positions(seq_len, cp_size, kv_rank)
    rows = torch.nonzero(q_pos >= k_pos.min()).flatten()
    cols = torch.nonzero(k_pos <= q_pos.max()).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return None
    q_sel, k_sel = q_pos[rows], k_pos[cols]
    needs_mask = bool(q_sel.min() < k_sel.max())
    return _as_index(rows), _as_index(cols), needs_mask, q_sel, k_sel


def _take(x: Tensor, dim: int, idx: Index) -> Tensor:
    if isinstance(idx, slice):
        return x.narrow(dim, idx.start, idx.stop - idx.start)
    return x.index_select(dim, idx.to(x.device))


def _add_at(x: Tensor, dim: int, idx: Index, value: Tensor) -> None:
    if isinstance(idx, slice):
        x.narrow(dim, idx.start, idx.stop - idx.start).add_(value)
    else:
        x.index_add_(dim, idx.to(x.device), value)


def _put(x: Tensor, dim: int, idx: Index, value: Tensor) -> None:
    if isinstance(idx, slice):
        x.narrow(dim, idx.start, idx.stop - idx.start).copy_(value)
    else:
        x.index_copy_(dim, idx.to(x.device), value)


def _causal_mask(q_pos: Tensor, k_pos: Tensor, device) -> Tensor:
    """[nq, nk] bool, True where the query may attend to the key."""
    return q_pos.to(device).unsqueeze(1) >= k_pos.to(device).unsqueeze(0)


def _packed_mask(sample_ids: Tensor, q_pos: Tensor, k_pos: Tensor, causal: Optional[Tensor]) -> Tensor:
    """[b, 1, 1, nq, nk] bool: the query and the key in the same sample (and ``causal`` where given)."""
    ids = sample_ids
    same = ids[:, q_pos.to(ids.device)].unsqueeze(2) == ids[:, k_pos.to(ids.device)].unsqueeze(1)
    if causal is not None:
        same = same & causal
    return same[:, None, None]


# ---------------------------------------------------------------------------------------------------
# Blockwise attention math (fp32). Queries are kept as [b, ng, rep, s, d] so GQA needs no K/V repeat:
# query head h = g * rep + i uses K/V group g, as megatron's repeat_interleave does.
# ---------------------------------------------------------------------------------------------------

def _scores(q: Tensor, k: Tensor, scale: float, mask: Optional[Tensor]) -> Tensor:
    """q [b, ng, rep, nq, d], k [b, ng, nk, d] -> scaled (masked) scores [b, ng, rep, nq, nk]."""
    b, ng, rep, nq, d = q.shape
    s = torch.matmul(q.reshape(b, ng, rep * nq, d), k.transpose(-1, -2)).view(b, ng, rep, nq, -1)
    s = s * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _block_forward(q, k, v, scale, mask, empty_rows: bool = False):
    """Softmax-normalized block output [b, ng, rep, nq, d] and its log-sum-exp [b, ng, rep, nq].
    Every row must see at least one key (the planner guarantees it), unless ``empty_rows`` (packed samples): a
    row that sees no key gets output 0 and log-sum-exp -inf, which the merge ignores."""
    s = _scores(q, k, scale, mask)
    m = s.amax(dim=-1, keepdim=True)
    if empty_rows:
        m = m.masked_fill(torch.isinf(m), 0.0)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    b, ng, rep, nq, nk = p.shape
    o = torch.matmul(p.view(b, ng, rep * nq, nk), v).view(b, ng, rep, nq, -1)
    o = o / denom.clamp(min=torch.finfo(denom.dtype).tiny) if empty_rows else o / denom
    return o, (m + torch.log(denom)).squeeze(-1)


def _merge(out: Tensor, lse: Tensor, rows: Index, o_blk: Tensor, lse_blk: Tensor) -> None:
    """Online-softmax merge of a block result into the running (out, lse) at ``rows``."""
    o_old, l_old = _take(out, 3, rows), _take(lse, 3, rows)
    l_new = torch.logaddexp(l_old, lse_blk)
    merged = o_old * torch.exp(l_old - l_new).unsqueeze(-1) + o_blk * torch.exp(lse_blk - l_new).unsqueeze(-1)
    _put(out, 3, rows, merged)
    _put(lse, 3, rows, l_new)


def _block_backward(q, k, v, do, lse, delta, scale, mask):
    """Gradients of one block, recomputing its probabilities from the final log-sum-exp.
    q/do [b, ng, rep, nq, d], k/v [b, ng, nk, d], lse/delta [b, ng, rep, nq] -> dq, dk, dv."""
    p = torch.exp(_scores(q, k, scale, mask) - lse.unsqueeze(-1))  # masked entries: exp(-inf) = 0
    b, ng, rep, nq, nk = p.shape
    d = q.size(-1)
    p2, do2 = p.view(b, ng, rep * nq, nk), do.reshape(b, ng, rep * nq, d)
    dv = torch.matmul(p2.transpose(-1, -2), do2)                       # sums the rep query heads
    dp = torch.matmul(do2, v.transpose(-1, -2)).view(b, ng, rep, nq, nk)
    ds = (p * (dp - delta.unsqueeze(-1))).view(b, ng, rep * nq, nk)
    dq = torch.matmul(ds, k).view(b, ng, rep, nq, d) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.reshape(b, ng, rep * nq, d)) * scale
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------------

class _Ring:
    """Neighbours of this rank in the CP ring, as global ranks for torch.distributed p2p."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def shift(self, send: Tensor, tag: int):
        """Post: send ``send`` to the next rank, receive the same-shaped tensor from the previous
        one. Returns (received buffer, works). Every rank posts the same sequence of shifts, so at
        cp = 2 (prev == next) gloo's in-order matching pairs each send with its receive; the tag
        keeps K/V and dK/dV messages on separate channels as well."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works or ():
        work.wait()


def _exchange(send: Tensor, group) -> Tensor:
    """All-to-all of a contiguous ``[cp, ...]`` tensor: ``out[j]`` is rank j's ``send[my_rank]``.
    gloo (torch 2.13) and nccl both implement ``all_to_all_single``, so there is no fallback."""
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group)
    return out


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``x`` into cp pieces along ``scatter_dim``, send piece j to rank j, and concatenate the
    received pieces (in rank order) along ``gather_dim``."""
    cp = dist.get_world_size(group)
    if cp == 1:
        return x
    send = torch.stack(x.chunk(cp, dim=scatter_dim), dim=0).contiguous()
    return torch.cat(_exchange(send, group).unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


# ---------------------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------------------

def _to_heads(q: Tensor, ng: int) -> Tensor:
    """[s, b, np, d] -> fp32 [b, ng, rep, s, d]."""
    s, b, np_, d = q.shape
    return q.float().view(s, b, ng, np_ // ng, d).permute(1, 2, 3, 0, 4)


def _from_heads(x: Tensor) -> Tensor:
    """[b, ng, rep, s, d] -> [s, b, ng * rep, d]."""
    b, ng, rep, s, d = x.shape
    return x.permute(3, 0, 1, 2, 4).reshape(s, b, ng * rep, d)


def _ring_block(seq_len: int, ring: _Ring, step: int, sample_ids: Optional[Tensor], device):
    """(rows, cols, mask) of this rank's queries against the K/V block visiting at ``step`` (from rank
    ``rank - step``), or None when no query sees any of its keys. Unpacked or ``sample_ids`` [b, S] (the
    whole-sequence zigzag): the causal block plan. A ``PackedLayout.attention_mask`` [2, b, S] (every sample split
    in zigzag): the whole block, masked to same sample and key position <= query position."""
    kv_rank = (ring.rank - step) % ring.size
    if _is_layout(sample_ids):
        n = seq_len // ring.size
        qs, ks = slice(ring.rank * n, (ring.rank + 1) * n), slice(kv_rank * n, (kv_rank + 1) * n)
        mask = _layout_mask(sample_ids[0][:, qs], sample_ids[1][:, qs], sample_ids[0][:, ks], sample_ids[1][:, ks])
        if step and not bool(mask.any()):
            return None
        return slice(0, n), slice(0, n), mask
    plan = _block_plan(seq_len, ring.size, ring.rank, kv_rank)
    if plan is None:
        return None
    rows, cols, needs_mask, q_pos, k_pos = plan
    mask = _causal_mask(q_pos, k_pos, device) if needs_mask else None
    if sample_ids is not None:
        mask = _packed_mask(sample_ids, q_pos, k_pos, mask)
    return rows, cols, mask


class _RingAttention(torch.autograd.Function):
    """Causal ring attention over zigzag-laid-out sequences. q [s, b, np, d]; k, v [s, b, ng, d]."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group, sample_ids=None):
        ring = _Ring(group)
        s_local, ng = q.size(0), k.size(2)
        seq_len = s_local * ring.size
        qh = _to_heads(q, ng)
        # K and V travel as one buffer [2, b, ng, s, d] in their own dtype.
        kv = torch.stack([k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)]).contiguous()
        out = torch.zeros_like(qh)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ring.size):
            works = None
            if step + 1 < ring.size:
                next_kv, works = ring.shift(kv, _TAG_KV)
            block = _ring_block(seq_len, ring, step, sample_ids, q.device)
            if block is not None:
                rows, cols, mask = block
                kb, vb = (_take(kv[i], 2, cols).float() for i in (0, 1))
                o_blk, lse_blk = _block_forward(_take(qh, 3, rows), kb, vb, scale, mask,
                                                empty_rows=sample_ids is not None)
                _merge(out, lse, rows, o_blk, lse_blk)
            if works is not None:
                _wait(works)
                kv = next_kv
        result = _from_heads(out).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.scale, ctx.group, ctx.sample_ids = scale, group, sample_ids
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, ring = ctx.scale, _Ring(ctx.group)
        s_local, ng = q.size(0), k.size(2)
        seq_len = s_local * ring.size
        qh, doh = _to_heads(q, ng), _to_heads(grad_out, ng)
        delta = (doh * _to_heads(out, ng)).sum(dim=-1)  # rowsum(dO * O) [b, ng, rep, s]
        kv = torch.stack([k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)]).contiguous()
        dq = torch.zeros_like(qh)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(ring.size):
            kv_works = None
            if step + 1 < ring.size:  # the next block's K/V can travel while this one is computed
                next_kv, kv_works = ring.shift(kv, _TAG_KV)
            block = _ring_block(seq_len, ring, step, ctx.sample_ids, q.device)
            if block is not None:
                rows, cols, mask = block
                kb, vb = (_take(kv[i], 2, cols).float() for i in (0, 1))
                dq_b, dk_b, dv_b = _block_backward(
                    _take(qh, 3, rows), kb, vb, _take(doh, 3, rows), _take(lse, 3, rows),
                    _take(delta, 3, rows), scale, mask)
                _add_at(dq, 3, rows, dq_b)
                _add_at(dkv[0], 2, cols, dk_b)
                _add_at(dkv[1], 2, cols, dv_b)
            if ring.size > 1:
                # dK/dV follow their block; after the last step this returns them to their owner.
                dkv_recv, dkv_works = ring.shift(dkv, _TAG_DKV)
                _wait(kv_works)
                _wait(dkv_works)
                dkv = dkv_recv
                if kv_works is not None:
                    kv = next_kv
        dk = dkv[0].permute(2, 0, 1, 3).to(k.dtype)
        dv = dkv[1].permute(2, 0, 1, 3).to(v.dtype)
        return _from_heads(dq).to(q.dtype), dk, dv, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, group, softmax_scale: float,
                   sample_ids: Optional[Tensor] = None) -> Tensor:
    """Causal ring attention. query [s, b, np, d], key/value [s, b, ng, d] (zigzag-local parts of a
    sequence of length ``s * cp``) -> [s, b, np, d]. ``sample_ids`` [b, s * cp] (packed samples, the full
    sequence): attention stays inside each sample."""
    _check_gqa(query, key, value)
    _check_sample_ids(sample_ids, query, dist.get_world_size(group))
    return _RingAttention.apply(query, key, value, softmax_scale, group, sample_ids)


# ---------------------------------------------------------------------------------------------------
# Ulysses (all-to-all) attention
# ---------------------------------------------------------------------------------------------------

def _full_causal_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float,
                           sample_ids: Optional[Tensor] = None, per_row: bool = False) -> Tensor:
    """Differentiable attention of q [s, b, np, d] to k/v [s, b, ng, d], a query seeing the keys
    whose global position is <= its own (and, with ``sample_ids``, of its own sample); fp32 softmax.
    ``per_row``: ``positions`` and ``sample_ids`` are [b, s], the tokens' own (in the order of q's sequence).
    Returns [s, b, np, d] in q's dtype."""
    ng = k.size(2)
    qh = _to_heads(q, ng)
    kh, vh = (t.float().permute(1, 2, 0, 3) for t in (k, v))
    if per_row:
        mask = _layout_mask(sample_ids, positions, sample_ids, positions)
    else:
        mask = _causal_mask(positions, positions, q.device)
        if sample_ids is not None:
            mask = _packed_mask(sample_ids, positions, positions, mask)
    s = _scores(qh, kh, scale, mask)
    p = torch.softmax(s, dim=-1)
    b, ng, rep, nq, nk = p.shape
    o = torch.matmul(p.view(b, ng, rep * nq, nk), vh).view(b, ng, rep, nq, -1)
    return _from_heads(o).to(q.dtype)


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, group, softmax_scale: float,
                      sample_ids: Optional[Tensor] = None) -> Tensor:
    """Causal Ulysses attention. query [s, b, np, d], key/value [s, b, ng, d] (zigzag-local parts of
    a sequence of length ``s * cp``) -> [s, b, np, d]. np must be divisible by cp; ng too, or ng must
    divide cp (the K/V groups are then repeated up to cp)."""
    _check_gqa(query, key, value)
    cp = dist.get_world_size(group)
    _check_sample_ids(sample_ids, query, cp)
    np_, ng = query.size(2), key.size(2)
    if np_ % cp:
        raise ValueError(f"ulysses_cp_algo: {np_} query heads (per TP rank) are not divisible by cp={cp}")
    if ng % cp:
        if cp % ng:
            raise ValueError(f"ulysses_cp_algo: {ng} key/value groups (per TP rank) neither divide nor "
                             f"are divisible by cp={cp}")
        key = key.repeat_interleave(cp // ng, dim=2)
        value = value.repeat_interleave(cp // ng, dim=2)
    s_local = query.size(0)
    # [s/cp, b, h, d] -> [s, b, h/cp, d]; the sequence comes back as rank 0's chunks, rank 1's, ...
    q, k, v = (_AllToAll.apply(t, group, 2, 0) for t in (query, key, value))
    if _is_layout(sample_ids):  # every sample split in zigzag: ids and positions already in this order
        out = _full_causal_attention(q, k, v, sample_ids[1], softmax_scale, sample_ids[0], per_row=True)
    else:
        positions = torch.cat([zigzag_positions(s_local * cp, cp, j) for j in range(cp)])
        out = _full_causal_attention(q, k, v, positions, softmax_scale, sample_ids)
    return _AllToAll.apply(out, group, 0, 2)


def _check_sample_ids(sample_ids: Optional[Tensor], query: Tensor, cp: int) -> None:
    if _is_layout(sample_ids):
        if tuple(sample_ids.shape) != (2, query.size(1), query.size(0) * cp):
            raise ValueError(f"packed layout {tuple(sample_ids.shape)} does not cover the full sequence "
                             f"[2, b={query.size(1)}, s={query.size(0) * cp}]")
    elif sample_ids is not None and tuple(sample_ids.shape) != (query.size(1), query.size(0) * cp):
        raise ValueError(f"sample ids {tuple(sample_ids.shape)} do not cover the full sequence "
                         f"[b={query.size(1)}, s={query.size(0) * cp}]")


def _check_gqa(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dim() != 4 or key.shape != value.shape or key.dim() != 4:
        raise ValueError(f"expected query [s, b, np, d] and key/value [s, b, ng, d], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if (query.size(0), query.size(1), query.size(3)) != (key.size(0), key.size(1), key.size(3)):
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on s, b or d")
    if query.size(2) % key.size(2):
        raise ValueError(f"{query.size(2)} query heads are not a multiple of {key.size(2)} groups")


# ---------------------------------------------------------------------------------------------------
# The core_attention module
# ---------------------------------------------------------------------------------------------------

def resolve_cp_algo(config, cp_algo: Optional[str] = None, cp_comm_type: Optional[str] = None) -> str:
    """The CP algorithm: ``cp_algo`` if given, else ``config.context_parallel_algo`` (MindSpeed's
    name) if the config has one, else megatron's ``cp_comm_type`` ("p2p" = ring, "a2a" = Ulysses;
    the layer's value, then the config's), else the ring."""
    algo = cp_algo or getattr(config, "context_parallel_algo", None)
    if algo is None:
        comm = cp_comm_type if cp_comm_type is not None else getattr(config, "cp_comm_type", None)
        if isinstance(comm, (list, tuple)):
            raise ValueError("a per-layer cp_comm_type list reaches core attention as one value; "
                             "got the whole list")
        if comm is not None:
            if comm not in _COMM_TYPE_TO_ALGO:
                raise ValueError(f"cp_comm_type {comm!r} is not supported without TransformerEngine; "
                                 f"use one of {sorted(_COMM_TYPE_TO_ALGO)}")
            algo = _COMM_TYPE_TO_ALGO[comm]
    algo = algo or RING_ALGO
    if algo not in CP_ALGOS:
        raise ValueError(f"unknown context-parallel algorithm {algo!r}; known: {CP_ALGOS}")
    return algo


class ContextParallelAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron's SelfAttention with context parallelism (causal only).

    Same constructor and forward as megatron's ``DotProductAttention``; ``cp_algo`` (optional, e.g.
    through ``functools.partial`` in a spec) picks ``megatron_cp_algo`` (ring) or ``ulysses_cp_algo``,
    see ``resolve_cp_algo``. At cp = 1 both compute plain causal attention. The CP group is
    ``pg_collection.cp`` when given, else megatron's ``parallel_state`` CP group.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, cp_algo: Optional[str] = None):
        super().__init__(config=config)
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        assert dropout == 0, "ContextParallelAttention does not support attention dropout"
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("ContextParallelAttention: sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"ContextParallelAttention: softmax_type {config.softmax_type!r}")
        self.cp_algo = resolve_cp_algo(config, cp_algo, cp_comm_type)
        self.hidden_size_per_attention_head = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and the fp32 softmax
        # multiplies it back; with the softmax always in fp32 here the net scale is the same.
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels)) if softmax_scale is None else softmax_scale
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            from megatron.core import parallel_state
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        cp_size = dist.get_world_size(cp_group)
        if cp_size != config.context_parallel_size:
            raise ValueError(f"CP group has {cp_size} ranks but config.context_parallel_size is "
                             f"{config.context_parallel_size}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (this rank's zigzag part) -> [sq, b, np*hn]."""
        sample_ids = None
        if attention_mask is not None:
            if attention_mask.dtype.is_floating_point or attention_mask.dtype == torch.bool:
                raise ValueError("ContextParallelAttention takes no attention mask (a boolean one): it is causal over "
                                 "global positions (right padding is excluded by the loss mask); an integer "
                                 "attention_mask is the sample ids of packed sequences")
            sample_ids = attention_mask
        if attention_bias is not None:
            raise NotImplementedError("ContextParallelAttention: attention_bias")
        if packed_seq_params is not None:
            raise NotImplementedError("ContextParallelAttention: packed sequences")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"ContextParallelAttention is causal only, got {mask_type}")
        fn = ring_attention if self.cp_algo == RING_ALGO else ulysses_attention
        out = fn(query, key, value, self.cp_group, self.softmax_scale, sample_ids)
        return out.reshape(out.size(0), out.size(1), -1)
