"""Flow-matching multistep samplers used by Wan2.2-S2V (spec §8.6).

Two solvers, both deterministic and stateful (one ``step`` call per timestep, in order):

* :class:`FlowUniPCScheduler` -- UniPC, order 2, B(h) = expm1 ("bh2"), data (x0) prediction,
  lower-order final step, final sigma 0. Default sampler of the reference pipeline.
* :class:`FlowDPMScheduler` -- DPM-Solver++ order 2 (midpoint), first and last steps first order.

Both reproduce the reference arithmetic operation by operation, including its dtype behaviour:
all schedule scalars are 0-dim float32 CPU tensors, so a bf16 sample stays bf16 through
``(sigma ratio) * x`` and the UniPC outputs are cast back to the sample dtype, while the UniPC
corrector coefficients (rho) are rounded to the sample dtype. With these rules the bf16 loops of
the golden fixtures are reproduced bit for bit.

Usage::

    sch = make_scheduler("unipc")
    sch.set_timesteps(40, shift=3.0)
    for t in sch.timesteps:
        v = model(x, t)
        x = sch.step(v, t, x)
"""
from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch

from .errors import InputError

__all__ = ["FlowUniPCScheduler", "FlowDPMScheduler", "make_scheduler", "SCHEDULER_NAMES"]


def _shift_sigmas(sigmas, shift):
    """sigma' = s*sigma / (1 + (s-1)*sigma); works on numpy arrays and tensors alike."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class _FlowMultistepBase:
    """Shared schedule construction / step-index bookkeeping."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if num_train_timesteps < 1:
            raise InputError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.solver_order = 2
        # Training sigmas: 1 - alpha, alpha = linspace(1, 1/T, T) reversed; stored in float32.
        alphas = np.linspace(1.0, 1.0 / self.num_train_timesteps, self.num_train_timesteps)[::-1].copy()
        train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
        train_sigmas = _shift_sigmas(train_sigmas, self.shift)
        self.sigma_max = train_sigmas[0].item()   # 0.9990000128746033 for T = 1000, shift 1
        self.sigma_min = train_sigmas[-1].item()  # 0.0
        self.sigmas: Optional[torch.Tensor] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._reset_state()

    # -- schedule -----------------------------------------------------------------------------
    def _finish_schedule(self, sigmas_f64: np.ndarray, device):
        """sigmas_f64: shifted float64 inference sigmas (length N). Appends final sigma 0."""
        timesteps = sigmas_f64 * self.num_train_timesteps
        sig = np.concatenate([sigmas_f64, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig)  # kept on CPU: 0-dim float32 scalars in the math
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_state()

    def _reset_state(self):
        self.model_outputs: List[Optional[torch.Tensor]] = [None] * self.solver_order
        self.lower_order_nums = 0
        self._step_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    def _init_step_index(self, timestep):
        # Same rule as the reference: index of `timestep` in the schedule; if it occurs more than
        # once (possible with many steps after int truncation), take the second occurrence.
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.detach().to("cpu").reshape(-1)[0].item()
        idx = (self.timesteps.cpu() == int(timestep)).nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(f"timestep {timestep} is not in the schedule {self.timesteps.tolist()}")
        self._step_index = int(idx[1 if len(idx) > 1 else 0].item())

    def _check_ready(self):
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_steps, shift=...) before step()")

    def _lambda(self, idx: int) -> torch.Tensor:
        """lambda = log(alpha) - log(sigma), alpha = 1 - sigma, in float32 (0-dim)."""
        sigma = self.sigmas[idx]
        return torch.log(1 - sigma) - torch.log(sigma)

    def __len__(self):
        return self.num_train_timesteps


class FlowUniPCScheduler(_FlowMultistepBase):
    """Flow-matching UniPC (order 2, bh2, predict-x0, lower_order_final, final sigma 0)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        super().__init__(num_train_timesteps, shift)
        self.last_sample: Optional[torch.Tensor] = None
        self.this_order = 0

    def _reset_state(self):
        super()._reset_state()
        self.last_sample = None
        self.this_order = 0

    def set_timesteps(self, num_steps: int, shift: Optional[float] = None,
                      device: Union[str, torch.device, None] = None):
        """sigma = linspace(sigma_max, sigma_min, N+1)[:N] (float64), shifted; t = int64(1000*sigma)."""
        num_steps = int(num_steps)
        if num_steps < 1:
            raise InputError(f"the number of sampling steps must be >= 1, got {num_steps}")
        shift = self.shift if shift is None else float(shift)
        sigmas = np.linspace(self.sigma_max, self.sigma_min, num_steps + 1).copy()[:-1]
        self._finish_schedule(_shift_sigmas(sigmas, shift), device)
        return self

    # -- UniC corrector -------------------------------------------------------------------------
    def _corrector(self, x0_t: torch.Tensor, last_sample: torch.Tensor, this_sample: torch.Tensor,
                   order: int) -> torch.Tensor:
        i = self._step_index
        m0 = self.model_outputs[-1]                 # x0 of the previous step
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = self._lambda(i - 1)
        h = self._lambda(i) - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)                       # bh2
        dtype = last_sample.dtype

        if order == 1:
            rho_last = torch.tensor(0.5, dtype=dtype)
            corr_res = 0
        elif order == 2:
            rk = (self._lambda(i - 2) - lambda_s0) / h
            d1 = (self.model_outputs[-2] - m0) / rk
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k * 1 / b_h
            h_phi_k = h_phi_k / hh - 1 / 2
            b2 = h_phi_k * 2 / b_h
            one = torch.ones_like(rk)
            mat = torch.stack([torch.stack([one, one]), torch.stack([rk, one])])
            rhos = torch.linalg.solve(mat, torch.stack([b1, b2])).to(dtype)
            rho_last = rhos[-1]
            corr_res = rhos[0].float() * d1
        else:  # pragma: no cover - solver_order is fixed to 2
            raise ValueError(f"unsupported corrector order {order}")

        x_base = (sigma_t / sigma_s0) * last_sample - (alpha_t * h_phi_1) * m0
        d1_t = x0_t - m0
        x_t = x_base - (alpha_t * b_h) * (corr_res + rho_last * d1_t)
        return x_t.to(dtype)

    # -- UniP predictor -------------------------------------------------------------------------
    def _predictor(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        i = self._step_index
        m0 = self.model_outputs[-1]                 # x0 of this step
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_s0 = self._lambda(i)
        h = self._lambda(i + 1) - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)

        x_base = (sigma_t / sigma_s0) * sample - (alpha_t * h_phi_1) * m0
        if order == 2:
            rk = (self._lambda(i - 1) - lambda_s0) / h
            d1 = (self.model_outputs[-2] - m0) / rk
            pred_res = 0.5 * d1                     # rho_p = 0.5 (exact in any float dtype)
            x_t = x_base - (alpha_t * b_h) * pred_res
        elif order == 1:
            x_t = x_base - (alpha_t * b_h) * 0
        else:  # pragma: no cover
            raise ValueError(f"unsupported predictor order {order}")
        return x_t.to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """One multistep UniPC update; returns the next sample (same dtype as ``sample``)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise RuntimeError("step() called more times than there are timesteps")

        x0 = sample - self.sigmas[i] * model_output
        if i > 0 and self.last_sample is not None:
            sample = self._corrector(x0, self.last_sample, sample, self.this_order)

        self.model_outputs = self.model_outputs[1:] + [x0]
        order = min(self.solver_order, self.num_inference_steps - i)   # lower_order_final
        self.this_order = min(order, self.lower_order_nums + 1)          # warm-up
        self.last_sample = sample
        prev_sample = self._predictor(sample, self.this_order)
        if self.lower_order_nums < self.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample


class FlowDPMScheduler(_FlowMultistepBase):
    """Flow-matching DPM-Solver++ (order 2, midpoint; first and last steps first order)."""

    def set_timesteps(self, num_steps: int, shift: Optional[float] = None,
                      device: Union[str, torch.device, None] = None):
        """sigma = shift-transformed linspace(1, 0, N+1)[:N] (so t_0 = 1000); final sigma 0."""
        num_steps = int(num_steps)
        if num_steps < 1:
            raise InputError(f"the number of sampling steps must be >= 1, got {num_steps}")
        shift = self.shift if shift is None else float(shift)
        sigmas = np.linspace(1, 0, num_steps + 1)[:num_steps]
        sigmas = _shift_sigmas(sigmas, shift)
        # The reference then passes these sigmas to a scheduler built with shift=1, which applies
        # 1*s/(1+0*s) once more (an exact identity in float64).
        sigmas = _shift_sigmas(np.asarray(sigmas), self.shift)
        self._finish_schedule(sigmas, device)
        return self

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """One DPM-Solver++ update; the sample is upcast to float32 and the result has the
        dtype of the data prediction (float32 for a float32 model output)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        n = self.num_inference_steps
        if i >= n:
            raise RuntimeError("step() called more times than there are timesteps")
        last_step = i == n - 1  # final sigma is 0 -> always first order at the end

        x0 = sample - self.sigmas[i] * model_output
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.to(torch.float32)

        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_t, lambda_s0 = self._lambda(i + 1), self._lambda(i)
        h = lambda_t - lambda_s0
        if self.lower_order_nums < 1 or last_step:
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            h_0 = lambda_s0 - self._lambda(i - 1)
            r0 = h_0 / h
            d1 = (1.0 / r0) * (m0 - m1)
            coef = alpha_t * (torch.exp(-h) - 1.0)
            x_t = (sigma_t / sigma_s0) * sample - coef * m0 - 0.5 * coef * d1
        if self.lower_order_nums < self.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return x_t.to(x0.dtype)


SCHEDULER_NAMES = ("unipc", "dpm++")
_ALIASES = {"unipc": "unipc", "dpm++": "dpm++", "dpmpp": "dpm++", "dpm": "dpm++"}


def make_scheduler(name: str, num_train_timesteps: int = 1000, shift: float = 1.0):
    """Build a fresh scheduler by CLI name ("unipc" or "dpm++")."""
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        raise InputError(f"unknown sampler '{name}'; use one of: unipc, dpm++")
    if key == "unipc":
        return FlowUniPCScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    return FlowDPMScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


# ----------------------------------------------------------------------------- few-step Euler
class FlowEulerSchedule:
    """diffusers ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`` after
    ``set_timesteps(n)``, as LiveAvatar's streaming mode uses it (spec liveavatar.md §3).

    The training sigmas are already shifted, so ``sigma_min`` = shift(1/T) and the inference
    sigmas are shifted again: for 4 steps and shift 3 the timesteps are
    [1000, 857.69, 602.15, 8.93] (not [1000, 750, 500, 250]). ``step`` is the plain Euler flow
    update ``x + (sigma_{i+1} - sigma_i) * v``: the product in v's dtype (the step size is a 0-dim
    fp32 tensor), the sum in fp32, the result cast to v's dtype, as in diffusers."""

    def __init__(self, num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000):
        if num_steps < 1:
            raise InputError(f"the number of sampling steps must be >= 1, got {num_steps}")
        T = int(num_train_timesteps)
        train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        train = _shift_sigmas(train, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        ts = np.linspace(sigma_max * T, sigma_min * T, num_steps)
        sig = _shift_sigmas(ts / T, shift)
        sig = torch.from_numpy(sig).to(torch.float32)
        self.timesteps = sig * T  # float32
        self.sigmas = torch.cat([sig, torch.zeros(1)])  # float32, final 0 appended
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def step(self, v: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        dt = (self.sigmas[i + 1] - self.sigmas[i]).to(v.device)
        return (sample.float() + dt * v).to(v.dtype)
