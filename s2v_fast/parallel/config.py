"""Parallel configuration, validation and the process-group mesh (torch.distributed).

Degrees (CLI flags ``--ulysses-degree``, ``--ring-degree``, ``--tensor-parallel-size``,
``--cfg-parallel-size``, ``--vae-patch-parallel-size``):

* DiT mesh: ``cfg x ring x ulysses x tp`` must equal the world size (tp fastest-varying, so a TP
  group is a run of consecutive ranks, i.e. one NVLink island). Sequence parallel (SP) is the
  ``ring x ulysses`` sub-mesh: the token sequence is sharded over its ``sp = ring * ulysses``
  ranks in sp-rank order ``ring_rank * ulysses + ulysses_rank``.
* VAE patch parallel: groups of ``vae`` consecutive ranks (``vae`` divides the world size); each
  group decodes/encodes the clip's spatial tiles together, so every rank ends with the whole clip.

Rank layout: ``rank = ((cfg_rank * ring + ring_rank) * ulysses + ulysses_rank) * tp + tp_rank``.
Everything is validated by :meth:`ParallelConfig.validate` *before* weights are loaded.
"""
from __future__ import annotations

import datetime
import itertools
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..errors import InputError

# NVLink SHARP multicast (NVLS) and symmetric-memory multicast are off on the lent machines.
DEFAULT_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHARD_POLICIES = ("frame", "even")


@dataclass(frozen=True)
class ParallelConfig:
    ulysses_degree: int = 1
    ring_degree: int = 1
    tensor_parallel_size: int = 1
    cfg_parallel_size: int = 1
    vae_patch_parallel_size: int = 1
    # "frame": shard boundaries inside the noisy tokens snap to latent-frame boundaries when that
    # moves them by at most 25% of a shard (audio injection then runs on whole local frames);
    # "even": equal shards (+-1 token).
    shard_policy: str = "frame"

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def dit_world_size(self) -> int:
        return self.cfg_parallel_size * self.sp_degree * self.tensor_parallel_size

    @property
    def enabled(self) -> bool:
        return self.dit_world_size > 1 or self.vae_patch_parallel_size > 1

    def describe(self) -> str:
        return (f"cfg {self.cfg_parallel_size} x ring {self.ring_degree} x ulysses "
                f"{self.ulysses_degree} x tp {self.tensor_parallel_size} (vae patch "
                f"{self.vae_patch_parallel_size})")

    @classmethod
    def from_args(cls, args) -> "ParallelConfig":
        return cls(ulysses_degree=getattr(args, "ulysses_degree", 1) or 1,
                   ring_degree=getattr(args, "ring_degree", 1) or 1,
                   tensor_parallel_size=getattr(args, "tensor_parallel_size", 1) or 1,
                   cfg_parallel_size=getattr(args, "cfg_parallel_size", 1) or 1,
                   vae_patch_parallel_size=getattr(args, "vae_patch_parallel_size", 1) or 1,
                   shard_policy=getattr(args, "sp_shard_policy", "frame") or "frame")

    def validate(self, world_size: Optional[int] = None, num_heads: Optional[int] = None,
                 ffn_dim: Optional[int] = None, dim: Optional[int] = None,
                 guidance_scale: Optional[float] = None) -> "ParallelConfig":
        """Raise :class:`InputError` (one line: problem + fix) for an impossible layout.

        ``world_size`` defaults to ``$WORLD_SIZE`` (torchrun) or 1. Pass the DiT config values
        (``num_heads``, ``ffn_dim``, ``dim``) to check head / width divisibility.
        """
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        names = dict(ulysses_degree="--ulysses-degree", ring_degree="--ring-degree",
                     tensor_parallel_size="--tensor-parallel-size",
                     cfg_parallel_size="--cfg-parallel-size",
                     vae_patch_parallel_size="--vae-patch-parallel-size")
        for k, flag in names.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{flag}={v!r} must be a positive integer")
        if self.cfg_parallel_size not in (1, 2):
            raise InputError(f"--cfg-parallel-size={self.cfg_parallel_size}: use 1 or 2 "
                             "(one rank per CFG branch)")
        if self.shard_policy not in SHARD_POLICIES:
            raise InputError(f"sequence shard policy {self.shard_policy!r}: use one of "
                             f"{SHARD_POLICIES}")
        if self.dit_world_size != world_size:
            hint = ("launch with `torchrun --nproc-per-node "
                    f"{self.dit_world_size} ...`" if self.dit_world_size > 1 else
                    "set --ulysses-degree / --ring-degree / --tensor-parallel-size / "
                    "--cfg-parallel-size so that their product is the number of processes")
            raise InputError(
                f"parallel degrees {self.describe()}: cfg*ring*ulysses*tp = {self.dit_world_size} "
                f"but the world size is {world_size}; {hint}")
        if world_size % self.vae_patch_parallel_size:
            raise InputError(f"--vae-patch-parallel-size={self.vae_patch_parallel_size} must "
                             f"divide the world size {world_size}")
        if num_heads is not None:
            tp, u = self.tensor_parallel_size, self.ulysses_degree
            if num_heads % tp:
                raise InputError(f"--tensor-parallel-size={tp} must divide the {num_heads} "
                                 "attention heads (14B: 1, 2, 4, 8)")
            if (num_heads // tp) % u:
                raise InputError(
                    f"--ulysses-degree={u} must divide the {num_heads // tp} attention heads per "
                    f"tensor-parallel rank ({num_heads} heads / tp {tp}); use --ring-degree for "
                    "the rest of the sequence-parallel degree")
        if ffn_dim is not None and ffn_dim % self.tensor_parallel_size:
            raise InputError(f"--tensor-parallel-size={self.tensor_parallel_size} must divide the "
                             f"FFN width {ffn_dim} (14B: 1, 2, 4, 8)")
        if dim is not None and dim % self.tensor_parallel_size:
            raise InputError(f"--tensor-parallel-size={self.tensor_parallel_size} must divide "
                             f"the model width {dim}")
        if guidance_scale is not None and self.cfg_parallel_size == 2 and guidance_scale <= 1:
            raise InputError(f"--cfg-parallel-size 2 needs classifier-free guidance "
                             f"(guidance scale {guidance_scale} <= 1 runs one branch); use "
                             "--cfg-parallel-size 1")
        return self


def add_parallel_args(parser) -> None:
    """Add the multi-GPU flags to an argparse parser (generate / profile)."""
    g = parser.add_argument_group("multi-GPU (launch with torchrun; see docs/multi_gpu.md)")
    g.add_argument("--ulysses-degree", type=int, default=1,
                   help="Ulysses sequence parallel degree (divides the attention heads)")
    g.add_argument("--ring-degree", type=int, default=1,
                   help="ring-attention sequence parallel degree")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="tensor parallel degree (divides the 40 heads and the FFN width)")
    g.add_argument("--cfg-parallel-size", type=int, default=1, choices=(1, 2),
                   help="2: the two CFG branches run on different ranks")
    g.add_argument("--vae-patch-parallel-size", type=int, default=1,
                   help="ranks that share the VAE tiles of a clip (divides the world size)")
    g.add_argument("--sp-shard-policy", choices=SHARD_POLICIES, default="frame",
                   help="sequence shards at latent-frame boundaries (frame) or equal (even)")


# ----------------------------------------------------------------------------- mesh
@dataclass
class ParallelState:
    """This rank's coordinates and process groups (``None`` for a group of size 1)."""

    config: ParallelConfig
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cfg_rank: int = 0
    ring_rank: int = 0
    ulysses_rank: int = 0
    tp_rank: int = 0
    vae_rank: int = 0
    cfg_group: Optional[dist.ProcessGroup] = None
    ring_group: Optional[dist.ProcessGroup] = None
    ulysses_group: Optional[dist.ProcessGroup] = None
    sp_group: Optional[dist.ProcessGroup] = None
    tp_group: Optional[dist.ProcessGroup] = None
    vae_group: Optional[dist.ProcessGroup] = None
    ring_ranks: List[int] = field(default_factory=list)  # global ranks of my ring, by ring_rank
    groups: Dict[str, dict] = field(default_factory=dict)  # name -> {ranks tuple: group}

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.config.ulysses_degree + self.ulysses_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes outputs and prints progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def mesh_rank(c: int, r: int, u: int, t: int, cfg: ParallelConfig) -> int:
    return ((c * cfg.ring_degree + r) * cfg.ulysses_degree + u) * cfg.tensor_parallel_size + t


def mesh_coords(rank: int, cfg: ParallelConfig):
    t = rank % cfg.tensor_parallel_size
    rank //= cfg.tensor_parallel_size
    u = rank % cfg.ulysses_degree
    rank //= cfg.ulysses_degree
    r = rank % cfg.ring_degree
    return rank // cfg.ring_degree, r, u, t


def _mesh_groups(cfg: ParallelConfig) -> Dict[str, List[tuple]]:
    """Every group (as sorted global-rank tuples) of every mesh axis, in a fixed order."""
    C, R, U, T = (cfg.cfg_parallel_size, cfg.ring_degree, cfg.ulysses_degree,
                  cfg.tensor_parallel_size)
    coords = list(itertools.product(range(C), range(R), range(U), range(T)))
    axes = {"cfg": (0,), "ring": (1,), "ulysses": (2,), "tp": (3,), "sp": (1, 2)}
    out = {}
    for name, varying in axes.items():
        groups = {}
        for co in coords:
            key = tuple(v for i, v in enumerate(co) if i not in varying)
            groups.setdefault(key, []).append(mesh_rank(*co, cfg))
        out[name] = [tuple(g) for g in groups.values()]
    world = C * R * U * T
    V = cfg.vae_patch_parallel_size
    out["vae"] = [tuple(range(k, k + V)) for k in range(0, world, V)]
    return out


def build_state(config: ParallelConfig, device=None) -> ParallelState:
    """Create the process groups of ``config`` on an initialised default group.

    Every rank must call this (``new_group`` is collective) with the same config; calling it
    again (another config) creates new groups.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config.validate(world)
    st = ParallelState(config=config, rank=rank, world_size=world,
                       device=torch.device(device) if device is not None else _default_device())
    st.cfg_rank, st.ring_rank, st.ulysses_rank, st.tp_rank = mesh_coords(rank, config)
    st.vae_rank = rank % config.vae_patch_parallel_size
    for name, groups in _mesh_groups(config).items():
        mine = None
        for ranks in groups:
            # new_group is collective over the whole world: every rank creates every group
            g = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            st.groups.setdefault(name, {})[ranks] = g
            if rank in ranks:
                mine = (ranks, g)
        setattr(st, f"{name}_group", mine[1])
        if name == "ring":
            st.ring_ranks = list(mine[0])
    return st


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(config: ParallelConfig, *, backend: Optional[str] = None,
                     init_method: Optional[str] = None, rank: Optional[int] = None,
                     world_size: Optional[int] = None,
                     timeout_s: Optional[float] = None) -> ParallelState:
    """Initialise torch.distributed from the torchrun environment and build the mesh.

    Without torchrun (no ``WORLD_SIZE``) and all degrees 1 this returns a single-rank state and
    starts nothing. Backend: NCCL on CUDA, gloo on CPU. Sets NCCL_NVLS_ENABLE=0 and
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 unless already set.
    """
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(ws)
    if ws == 1 and not dist.is_initialized():
        return ParallelState(config=config, device=_default_device())
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank if rank is not None else 0))
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
        if use_cuda:
            kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
        if init_method is not None:
            kw.update(init_method=init_method, rank=rank, world_size=world_size)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), **kw)
    return build_state(config)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
