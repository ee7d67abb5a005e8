"""Single-process units of s2v_fast.parallel: config validation, shard plans, LSE attention and
merge, tensor-parallel plan coverage, tile assignment."""
import math

import pytest
import torch
import torch.nn.functional as F

from s2v_fast.config import DiTConfig
from s2v_fast.errors import InputError
from s2v_fast.models.vae_tiling import TileBox, tile_boxes
from s2v_fast.parallel import (ParallelConfig, apply_tensor_parallel, assign_tiles,
                               attention_with_lse, init_distributed, make_shard_plan,
                               merge_attention)
from s2v_fast.parallel.config import _mesh_groups, mesh_coords, mesh_rank
from s2v_fast.parallel.tensor_parallel import tp_kind


# ----------------------------------------------------------------------------- config
def test_validate_accepts_14b_layouts():
    c14 = DiTConfig()
    for pc, world in [(ParallelConfig(ulysses_degree=8), 8), (ParallelConfig(ring_degree=8), 8),
                      (ParallelConfig(tensor_parallel_size=8), 8),
                      (ParallelConfig(cfg_parallel_size=2, ulysses_degree=4), 8),
                      (ParallelConfig(ulysses_degree=4, ring_degree=2,
                                      vae_patch_parallel_size=8), 8),
                      (ParallelConfig(tensor_parallel_size=2, ulysses_degree=4), 8),
                      (ParallelConfig(ulysses_degree=5), 5), (ParallelConfig(), 1)]:
        pc.validate(world, num_heads=c14.num_heads, ffn_dim=c14.ffn_dim, dim=c14.dim,
                    guidance_scale=4.5)


@pytest.mark.parametrize("pc, world, msg", [
    (ParallelConfig(ulysses_degree=2), 4, "world size is 4"),
    (ParallelConfig(ulysses_degree=4), 2, "world size is 2"),
    (ParallelConfig(ulysses_degree=16), 16, "--ulysses-degree=16 must divide the 40"),
    (ParallelConfig(tensor_parallel_size=2, ulysses_degree=8), 16, "20 attention heads per"),
    (ParallelConfig(tensor_parallel_size=3), 3, "--tensor-parallel-size=3 must divide the 40"),
    (ParallelConfig(tensor_parallel_size=5), 5, "FFN width 13824"),
    (ParallelConfig(cfg_parallel_size=3), 3, "use 1 or 2"),
    (ParallelConfig(ulysses_degree=4, vae_patch_parallel_size=3), 4, "must divide the world"),
    (ParallelConfig(ring_degree=0), 1, "positive integer"),
    (ParallelConfig(shard_policy="odd"), 1, "shard policy"),
])
def test_validate_rejects_with_clear_message(pc, world, msg):
    c14 = DiTConfig()
    with pytest.raises(InputError, match=msg.replace("(", r"\(").replace("*", r"\*")):
        pc.validate(world, num_heads=c14.num_heads, ffn_dim=c14.ffn_dim, dim=c14.dim)


def test_cfg_parallel_needs_guidance():
    with pytest.raises(InputError, match="classifier-free guidance"):
        ParallelConfig(cfg_parallel_size=2).validate(2, guidance_scale=1.0)


def test_validate_reads_torchrun_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InputError, match="world size is 4"):
        ParallelConfig(ulysses_degree=2).validate()


def test_single_process_state_needs_no_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    st = init_distributed(ParallelConfig())
    assert st.world_size == 1 and st.is_main and st.tp_group is None and st.sp_group is None


def test_mesh_layout_tp_fastest():
    pc = ParallelConfig(cfg_parallel_size=2, ring_degree=2, ulysses_degree=2,
                        tensor_parallel_size=2)
    for rank in range(16):
        assert mesh_rank(*mesh_coords(rank, pc), pc) == rank
    g = _mesh_groups(pc)
    assert g["tp"][0] == (0, 1)
    assert g["ulysses"][0] == (0, 2)
    assert g["ring"][0] == (0, 4)
    assert g["cfg"][0] == (0, 8)
    assert g["sp"][0] == (0, 2, 4, 6)  # sp rank = ring_rank * ulysses + ulysses_rank
    pc = ParallelConfig(ulysses_degree=8, vae_patch_parallel_size=4)
    assert _mesh_groups(pc)["vae"] == [(0, 1, 2, 3), (4, 5, 6, 7)]


# ----------------------------------------------------------------------------- shard plan
def _check_plan(plan, L, parts):
    assert plan.bounds[0] == 0 and plan.bounds[-1] == L and len(plan.bounds) == parts + 1
    assert all(b >= a for a, b in zip(plan.bounds[:-1], plan.bounds[1:]))


@pytest.mark.parametrize("L, Lv, Nf, parts", [
    (32760, 29120, 1456, 8),  # 480p with motion
    (30576, 29120, 1456, 8),  # 480p clip 0 (motion dropped)
    (79200, 70400, 3520, 8),  # 720p
    (32760, 29120, 1456, 5), (32760, 29120, 1456, 4), (352, 192, 64, 2), (105, 70, 35, 4),
])
def test_shard_plan_frame_policy(L, Lv, Nf, parts):
    plan = make_shard_plan(L, Lv, Nf, parts, "frame")
    _check_plan(plan, L, parts)
    mean = L / parts
    for i in range(parts):
        a, b = plan.range(i)
        # boundaries move at most 25% of a shard (+ rounding), so shards stay balanced
        assert abs(a - round(i * L / parts)) <= 0.25 * mean + 1
    if Nf <= 0.5 * mean:  # frames small relative to shards: every shard is frame aligned
        assert all(plan.frame_aligned(i) for i in range(parts))


def test_shard_plan_14b_480p_8gpu_values():
    plan = make_shard_plan(32760, 29120, 1456, 8, "frame")
    assert all(b % 1456 == 0 for b in plan.bounds if b <= 29120)
    assert max(plan.lengths) <= 1.1 * 32760 / 8


def test_shard_plan_even_policy_uneven_length():
    plan = make_shard_plan(105, 70, 35, 4, "even")
    _check_plan(plan, 105, 4)
    assert plan.lengths == [26, 26, 27, 26] or max(plan.lengths) - min(plan.lengths) <= 1


# ----------------------------------------------------------------------------- LSE attention
def test_attention_with_lse_matches_sdpa_and_logsumexp():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 16, generator=g) for _ in range(3))
    o, lse = attention_with_lse(q, k, v)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2)).transpose(1, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(16)
    assert torch.allclose(o, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5)


def test_lse_merge_of_key_chunks_equals_full_attention():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 2, 8, generator=g) * 3  # large logits: exercises the stable merge
    k, v = torch.randn(1, 31, 2, 8, generator=g) * 3, torch.randn(1, 31, 2, 8, generator=g)
    full, full_lse = attention_with_lse(q, k, v)
    o = lse = None
    for a, b in [(0, 5), (5, 6), (6, 20), (20, 31)]:  # uneven chunks, merged in any order
        o, lse = merge_attention(o, lse, *attention_with_lse(q, k[:, a:b], v[:, a:b]))
    assert (o - full).abs().max() <= 1e-5 * full.abs().max()
    assert torch.allclose(lse, full_lse, atol=1e-5)
    empty_o, empty_lse = attention_with_lse(q, k[:, :0], v[:, :0])  # empty chunk: weight 0
    o2, _ = merge_attention(o, lse, empty_o, empty_lse)
    assert torch.equal(o2, o)


# ----------------------------------------------------------------------------- tensor parallel
def test_tp_plan_covers_the_14b_attention_and_ffn_weights():
    from s2v_fast.models.dit import S2VTransformer

    with torch.device("meta"):
        model = S2VTransformer(DiTConfig())
    kinds = {}
    for name, _ in model.named_parameters():
        kinds.setdefault(tp_kind(name), []).append(name)
    # per block: self+cross (q,k,v w+b, norm_q, norm_k) = 16 col + ffn.0 w+b = 18; 12 injectors x 8
    assert len(kinds["col"]) == 40 * 18 + 12 * 8
    assert len(kinds["row"]) == 40 * 3 + 12
    assert len(kinds["row_bias"]) == 40 * 3 + 12
    assert not any(".adain" in n or "injector_adain" in n for n in kinds["col"] + kinds["row"])

    apply_tensor_parallel(model, None, rank=3, size=8)  # meta: shapes only
    blk = model.blocks[0]
    assert blk.self_attn.q.weight.shape == (640, 5120)
    assert blk.self_attn.o.weight.shape == (5120, 640)
    assert blk.ffn[0].weight.shape == (1728, 5120) and blk.ffn[2].weight.shape == (5120, 1728)
    assert blk.self_attn.num_heads == 5 and blk.self_attn.norm_q.weight.shape == (640,)
    assert model.audio_injector.injector[0].k.weight.shape == (640, 5120)
    assert model.audio_injector.injector_adain_layers[0].linear.weight.shape == (10240, 5120)


# ----------------------------------------------------------------------------- VAE tiles
def test_assign_tiles_balanced_and_complete():
    boxes = tile_boxes(56, 104, 32, 32, 8, 8)  # 480p latent, default 256 px tiles
    for world in (1, 2, 3, 4, 8, 16):
        parts = assign_tiles(boxes, world)
        assert sorted(i for p in parts for i in p) == list(range(len(boxes)))
        area = [sum(boxes[i].height * boxes[i].width for i in p) for p in parts]
        biggest = max(b.height * b.width for b in boxes)
        assert max(area) - min(area) <= biggest
    assert assign_tiles([TileBox(0, 1, 0, 1)], 2) == [[0], []]
