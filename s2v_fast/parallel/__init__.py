"""Multi-GPU inference as transforms of the plain model (see docs/multi_gpu.md).

    state = init_distributed(ParallelConfig(ulysses_degree=4, cfg_parallel_size=2))
    dit = load_dit_sharded(path, state.tp_rank, tp, ...) or load_dit(path, ...)
    pdit = parallelize(dit, state)                  # TP + sequence parallel DiT, same step API
    denoiser = make_denoiser(pdit, state, ...)      # CFG parallel when cfg_parallel_size == 2
    vae = VAEPatchParallel(vae, state.vae_group)    # tiles of encode / decode over ranks
"""
from .cfg import ParallelCFGDenoiser, make_denoiser
from .config import (ParallelConfig, ParallelState, add_parallel_args, build_state,
                     destroy_distributed, init_distributed)
from .runner import ParallelDiT, parallelize
from .sequence import (ShardConditions, ShardPlan, attention_with_lse, make_shard_plan,
                       merge_attention, ring_attention)
from .tensor_parallel import DistributedRMSNorm, apply_tensor_parallel, load_dit_sharded
from .vae_patch import VAEPatchParallel, assign_tiles

__all__ = ["ParallelConfig", "ParallelState", "add_parallel_args", "build_state",
           "init_distributed", "destroy_distributed", "parallelize", "ParallelDiT",
           "ParallelCFGDenoiser", "make_denoiser", "ShardConditions", "ShardPlan",
           "make_shard_plan", "attention_with_lse", "merge_attention", "ring_attention",
           "DistributedRMSNorm", "apply_tensor_parallel", "load_dit_sharded",
           "VAEPatchParallel", "assign_tiles"]
