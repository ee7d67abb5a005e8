"""Run ``s2v_fast.cli.main`` and keep what ``S2VPipeline.generate`` returned (tests only).

    python tests/cli_capture.py OUT_DIR generate --model tiny ...
    torchrun --nproc-per-node 2 tests/cli_capture.py OUT_DIR generate ... --ulysses-degree 2

Each process saves ``OUT_DIR/result_rank{RANK}.pt``: the frames ([3, N, H, W] float32 in
[-1, 1], as written to the MP4 before uint8 conversion), the seed, the DiT precision and the
offload mode. The CLI itself runs unchanged.
"""
import os
import sys

import torch


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
