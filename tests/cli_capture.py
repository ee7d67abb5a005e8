"""Run ``s2v_fast.cli.main`` and keep what ``S2VPipeline.generate`` returned (tests only).

    python tests/cli_capture.py OUT_DIR generate --model tiny ...
    torchrun --nproc-per-node 2 tests/cli_capture.py OUT_DIR generate ... --ulysses-degree 2

Each process saves ``OUT_DIR/result_rank{RANK}.pt``: the frames ([3, N, H, W] float32 in
[-1, 1], as written to the MP4 before uint8 conversion), the seed, the DiT precision and the
offload mode. The CLI itself runs unchanged. :func:`run` launches it from a test.
"""
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(out_dir, argv, nproc=1, env=None, drop_env=()):
    """Run the CLI (``nproc > 1``: under ``torch.distributed.run --standalone``, gloo on
    loopback) in a subprocess; returns (CompletedProcess, [result dict per rank])."""
    e = dict(os.environ, PYTHONPATH=REPO, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **(env or {}))
    for k in (*DIST_VARS, *drop_env):
        e.pop(k, None)
    launch = [sys.executable, __file__] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(nproc), __file__]
    r = subprocess.run([*launch, str(out_dir), *argv], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, [torch.load(os.path.join(out_dir, f"result_rank{i}.pt")) for i in range(nproc)]


def wrap_generate(real, out_dir):
    def generate(self, *args, **kwargs):
        kwargs["return_video"] = True
        out = real(self, *args, **kwargs)
        rank = os.environ.get("RANK", "0")
        torch.save(dict(video=out.video, seed=out.seed, precision=self.precision,
                        offload=self.offload_mode, output_path=out.output_path,
                        world=self.parallel.world_size if self.parallel is not None else 1),
                   os.path.join(out_dir, f"result_rank{rank}.pt"))
        return out
    return generate


def main() -> int:
    from s2v_fast import cli
    from s2v_fast.pipeline import S2VPipeline

    out_dir, argv = sys.argv[1], sys.argv[2:]
    S2VPipeline.generate = wrap_generate(S2VPipeline.generate, out_dir)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
