"""Single-process tests of the context-parallel layout helpers and of the CP attention at cp = 1."""
import pytest
import torch

from mindspeed_mm.parallel.context_parallel import (
    _block_plan, pad_to_multiple, zigzag_positions, zigzag_split)


def test_pad_to_multiple():
    assert pad_to_multiple(13, 4) == 16
    assert pad_to_multiple(16, 4) == 16
    assert pad_to_multiple(0, 8) == 0
    assert pad_to_multiple(1, 1) == 1
    with pytest.raises(ValueError):
        pad_to_multiple(5, 0)


def test_zigzag_positions_known_layout():
    # 16 tokens, cp=2: four chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert zigzag_positions(8, 4, 3).tolist() == [3, 4]
    assert zigzag_positions(6, 1, 0).tolist() == list(range(6))
    assert zigzag_positions(16, 2, 0).dtype == torch.long
    with pytest.raises(ValueError, match="multiple of 2"):
        zigzag_positions(13, 2, 0)
    with pytest.raises(ValueError):
        zigzag_positions(16, 2, 2)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_split_matches_positions_and_partitions(cp):
    seq = 2 * cp * 3
    t = torch.arange(2 * seq * 5).view(2, seq, 5)  # seq on dim 1
    seen = []
    for r in range(cp):
        part = zigzag_split(t, cp, r, seq_dim=1)
        pos = zigzag_positions(seq, cp, r)
        assert torch.equal(part, t[:, pos])
        assert torch.equal(zigzag_split(t, cp, r, seq_dim=-2), part)
        seen += pos.tolist()
    assert sorted(seen) == list(range(seq))  # every token on exactly one rank


def test_zigzag_split_equals_megatron_get_batch_on_this_cp_rank_layout():
    # megatron's formula: view into 2cp chunks along seq, index_select [r, 2cp-1-r], flatten back.
    cp, seq = 4, 24
    t = torch.randn(3, seq, 2)
    for r in range(cp):
        v = t.view(3, 2 * cp, seq // (2 * cp), 2)
        ref = v.index_select(1, torch.tensor([r, 2 * cp - r - 1])).reshape(3, -1, 2)
        assert torch.equal(zigzag_split(t, cp, r, 1), ref)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_block_plan_covers_exactly_the_causal_pairs(cp):
    seq = 2 * cp * 2
    for qr in range(cp):
        for kr in range(cp):
            qp, kp = zigzag_positions(seq, cp, qr), zigzag_positions(seq, cp, kr)
            full = qp[:, None] >= kp[None, :]
            plan = _block_plan(seq, cp, qr, kr)
            if plan is None:
                assert not full.any()
                continue
            rows, cols, needs_mask, q_sel, k_sel = plan
            covered = torch.zeros_like(full)
            sub = q_sel[:, None] >= k_sel[None, :]
            covered[rows, cols] = sub  # slices select the visible block
            assert torch.equal(covered, full)
            assert needs_mask == (not bool(sub.all()))
            if qr != kr:  # zigzag: off-diagonal blocks are half visible and need no mask
                assert not needs_mask and sub.numel() == full.numel() // 2


def test_resolve_cp_algo():
    from types import SimpleNamespace

    from mindspeed_mm.parallel.context_parallel import RING_ALGO, ULYSSES_ALGO, resolve_cp_algo

    cfg = SimpleNamespace(cp_comm_type=None)
    assert resolve_cp_algo(cfg) == RING_ALGO
    assert resolve_cp_algo(cfg, cp_comm_type="a2a") == ULYSSES_ALGO
    assert resolve_cp_algo(SimpleNamespace(cp_comm_type="p2p")) == RING_ALGO
    assert resolve_cp_algo(SimpleNamespace(cp_comm_type="a2a")) == ULYSSES_ALGO
    assert resolve_cp_algo(SimpleNamespace(context_parallel_algo=ULYSSES_ALGO, cp_comm_type="p2p")) == ULYSSES_ALGO
    assert resolve_cp_algo(cfg, cp_algo=ULYSSES_ALGO, cp_comm_type="p2p") == ULYSSES_ALGO
    with pytest.raises(ValueError, match="not supported"):
        resolve_cp_algo(SimpleNamespace(cp_comm_type="all_gather"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_cp_algo(cfg, cp_algo="hybrid")


@pytest.mark.parametrize("algo", ["megatron_cp_algo", "ulysses_cp_algo"])
def test_cp1_module_is_causal_attention(megatron_single_rank, algo):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from mindspeed_mm.parallel.context_parallel import ContextParallelAttention
    from tests.helpers.attention import reference_causal_attention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8, attention_dropout=0.0, use_cpu_initialization=True)
    attn = ContextParallelAttention(config, 1, AttnMaskType.causal, "self", cp_algo=algo)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 2, 4, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(6, 2, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    out = attn(q, k, v, None)
    assert out.shape == (6, 2, 32)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference_causal_attention(*ref_in)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    w = torch.randn(ref.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip((q, k, v), ref_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no attention mask"):
        attn(q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="causal only"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    with pytest.raises(AssertionError, match="dropout"):
        ContextParallelAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.1)


# ---------------------------------------------------------------------------------------------------
# Packed micro-batches: PackedLayout splits every sample in zigzag over the CP ranks
# ---------------------------------------------------------------------------------------------------

def _pack_ids(lengths, pad=0):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]


def _attention_work(ids: torch.Tensor, held: torch.Tensor, real: torch.Tensor) -> int:
    """Sum over the held real query tokens of the real keys of their sample up to them (one row)."""
    pos = torch.zeros_like(ids)
    for v in ids.unique():
        if v >= 0:
            sel = (ids == v) & real
            pos[sel] = torch.arange(1, int(sel.sum()) + 1)
    return int(pos[held].sum())


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_layout_splits_every_sample_in_zigzag(cp):
    from mindspeed_mm.parallel.context_parallel import PackedLayout

    lengths = [13, 5, 30, 1, 9]
    ids = torch.cat([_pack_ids(lengths, pad=6), _pack_ids([40, 7], pad=17)])
    layout = PackedLayout(ids, cp)
    S, unit = layout.length, 2 * cp
    assert S % unit == 0 and layout.index.shape == (cp, 2, S // cp)  # every rank holds S / cp tokens
    for j in range(2):
        # the ranks' positions partition the padded row
        assert sorted(layout.index[:, j].flatten().tolist()) == list(range(S))
        # tokens keep their order and sample; each sample padded at its end to a multiple of 2cp, with its id
        row, dest = ids[j], layout.dest[j]
        assert torch.equal(layout.sample_ids[j, dest], row) and bool((dest[1:] > dest[:-1]).all())
        runs = torch.unique_consecutive(layout.sample_ids[j], return_counts=True)
        start = 0
        for v, n in zip(*(t.tolist() for t in runs)):
            assert n % unit == 0
            assert int((row == v).sum()) == int((layout.dest[j][row == v] < start + n).sum())
            c = n // unit
            for r in range(cp):  # chunks r and 2cp-1-r of every sample on rank r
                mine = set(range(start + r * c, start + (r + 1) * c)) | set(
                    range(start + (unit - 1 - r) * c, start + (unit - r) * c))
                held = set(layout.index[r, j].tolist())
                assert mine <= held
            start += n
        # a sample's pads follow its real tokens: positions restart per sample and count on over its pads
        assert layout.positions[j, dest].tolist() == [
            k for v, n in zip(*(t.tolist() for t in torch.unique_consecutive(row, return_counts=True)))
            for k in range(n)]
    mask = layout.attention_mask()
    assert mask.shape == (2, 2, S)
    for r in range(cp):
        cols = slice(r * (S // cp), (r + 1) * (S // cp))
        assert torch.equal(mask[1][:, cols], layout.index[r])
        assert torch.equal(mask[0][:, cols], layout.sample_ids.gather(1, layout.index[r]))
    t = torch.arange(ids.numel()).view(ids.shape)
    padded = layout.pad(t, -1)
    assert torch.equal(padded.gather(1, layout.dest), t) and int((padded == -1).sum()) == 2 * S - ids.numel()
    assert torch.equal(layout.local(padded, 1, 1), padded.gather(1, layout.index[1]))
    assert torch.equal(layout.local(padded.t().unsqueeze(-1).expand(-1, -1, 3), 1, 0)[..., 2].t(),
                       padded.gather(1, layout.index[1]))
    with pytest.raises(ValueError):
        PackedLayout(ids, cp, length=S - unit)


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_layout_balances_attention_work(cp):
    """On a pack of unequal samples the whole-pack zigzag gives the CP ranks very different attention work; the
    per-sample zigzag gives every rank the same tokens and (real tokens) work within a few %."""
    from mindspeed_mm.parallel.context_parallel import PackedLayout

    lengths = [3000, 700, 2500, 150, 1800]
    ids = _pack_ids(lengths)
    S0 = pad_to_multiple(ids.shape[1], 2 * cp)
    whole = torch.nn.functional.pad(ids, (0, S0 - ids.shape[1]), value=-1)[0]
    before = [_attention_work(whole, zigzag_positions(S0, cp, r), whole >= 0) for r in range(cp)]
    layout = PackedLayout(ids, cp)
    real = torch.zeros(layout.length, dtype=torch.bool)
    real[layout.dest[0]] = True
    after = [_attention_work(layout.sample_ids[0], layout.index[r, 0], real) for r in range(cp)]
    spread = lambda w: max(w) / (sum(w) / len(w)) - 1  # noqa: E731
    assert len({layout.index.shape[2]}) == 1 and layout.index.shape[2] * cp == layout.length
    assert spread(before) > 0.15, before
    assert spread(after) < 0.03, after
