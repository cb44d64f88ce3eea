"""One CMA-ES generation as a pure function of tensors: told solutions in, next search state out.

This is the server side of FedBPT: a global CMA-ES that is told solutions it never asked for
(the clients' results, repaired first by ``repair_injected`` as pycma repairs injected solutions)
and whose whole state must be checkpointed as tensors (no pickle). It
follows Hansen's tutorial ("The CMA Evolution Strategy: A Tutorial", 2016) with every told
solution a parent (μ = λ, as FedBPT's ``CMA_mu = popsize``), positive recombination weights
w_i ∝ ln(λ + 1/2) − ln i, c_m = 1, cumulative step-size adaptation, and rank-one plus rank-μ
covariance updates; the same constants pycma uses for this configuration. All arithmetic is in
float64, so a state restored from its tensors continues bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STATE_NAMES = ("mean", "sigma", "cov", "path_sigma", "path_cov", "generation")


@dataclass(frozen=True)
class CMAState:
    """A CMA-ES search distribution N(mean, σ² C) with its evolution paths and generation count."""

    mean: torch.Tensor
    sigma: float
    cov: torch.Tensor
    path_sigma: torch.Tensor
    path_cov: torch.Tensor
    generation: int

    @classmethod
    def initial(cls, mean: torch.Tensor, sigma: float) -> CMAState:
        """A fresh state at ``mean`` with step ``sigma``, C = I and zero paths."""
        if mean.dim() != 1 or mean.numel() < 1:
            raise ValueError(f"a CMA-ES mean is a non-empty vector, got shape {tuple(mean.shape)}")
        _check_sigma(sigma)
        d = mean.numel()
        zeros = torch.zeros(d, dtype=torch.float64)
        return cls(
            mean.detach().to("cpu", torch.float64).clone(),
            float(sigma),
            torch.eye(d, dtype=torch.float64),
            zeros,
            zeros.clone(),
            0,
        )

    def with_sigma(self, sigma: float) -> CMAState:
        """The same state with another step size (FedBPT sets it from the clients' before each tell)."""
        _check_sigma(sigma)
        return CMAState(self.mean, float(sigma), self.cov, self.path_sigma, self.path_cov, self.generation)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The state as float64 tensors named by ``STATE_NAMES`` (scalars as shape [1])."""
        return {
            "mean": self.mean.clone(),
            "sigma": torch.tensor([self.sigma], dtype=torch.float64),
            "cov": self.cov.clone(),
            "path_sigma": self.path_sigma.clone(),
            "path_cov": self.path_cov.clone(),
            "generation": torch.tensor([float(self.generation)], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CMAState:
        """Rebuild a state from ``to_tensors``' output, checking names, shapes and values."""
        if set(tensors) != set(STATE_NAMES):
            raise ValueError(f"a CMA-ES state has tensors {list(STATE_NAMES)}, got {sorted(tensors)}")
        t = {name: tensors[name].detach().to("cpu", torch.float64) for name in STATE_NAMES}
        d = t["mean"].numel()
        expected = {
            "mean": (d,),
            "sigma": (1,),
            "cov": (d, d),
            "path_sigma": (d,),
            "path_cov": (d,),
            "generation": (1,),
        }
        for name, shape in expected.items():
            if tuple(t[name].shape) != shape:
                raise ValueError(f"CMA-ES state {name!r} has shape {tuple(t[name].shape)}, expected {shape}")
            if not bool(torch.isfinite(t[name]).all()):
                raise ValueError(f"CMA-ES state {name!r} holds non-finite values")
        generation = float(t["generation"][0])
        if generation < 0 or generation != int(generation):
            raise ValueError(f"CMA-ES state 'generation' must be a non-negative integer, got {generation}")
        if not torch.equal(t["cov"], t["cov"].T):
            raise ValueError("CMA-ES state 'cov' is not symmetric")
        state = cls(
            t["mean"].clone(),
            float(t["sigma"][0]),
            t["cov"].clone(),
            t["path_sigma"].clone(),
            t["path_cov"].clone(),
            int(generation),
        )
        _check_sigma(state.sigma)
        return state


def recombination_weights(count: int) -> torch.Tensor:
    """Positive weights w_i ∝ ln(count + 1/2) − ln i for ranks i = 1..count, summing to 1."""
    if count < 1:
        raise ValueError(f"recombination needs at least one solution, got {count}")
    ranks = torch.arange(1, count + 1, dtype=torch.float64)
    raw = math.log(count + 0.5) - torch.log(ranks)
    return raw / raw.sum()


def cma_tell(state: CMAState, solutions: torch.Tensor, losses: torch.Tensor) -> CMAState:
    """One generation of CMA-ES from ``solutions`` [λ, d] and their ``losses`` [λ] (lower is better).

    Every solution is a parent (μ = λ), ranked by loss (ties by order); the new mean is the
    weighted recombination m' = m + σ Σ w_i y_i with y_i = (x_{i:λ} − m)/σ. Then, with
    μ_eff = 1/Σw², c_σ = (μ_eff + 2)/(d + μ_eff + 5), d_σ = 1 + 2·max(0, √((μ_eff − 1)/(d + 1)) − 1) + c_σ,
    c_c = (4 + μ_eff/d)/(d + 4 + 2μ_eff/d), c_1 = 2/((d + 1.3)² + μ_eff),
    c_μ = min(1 − c_1, 2(μ_eff − 2 + 1/μ_eff)/((d + 2)² + μ_eff)) and E‖N(0, I)‖ ≈ √d(1 − 1/(4d) + 1/(21d²)):

    - p_σ ← (1 − c_σ) p_σ + √(c_σ(2 − c_σ)μ_eff) C^{-1/2} y_w
    - p_c ← (1 − c_c) p_c + h_σ √(c_c(2 − c_c)μ_eff) y_w, with h_σ the tutorial's stall indicator
    - C ← (1 + c_1 δ(h_σ) − c_1 − c_μ) C + c_1 p_c p_cᵀ + c_μ Σ w_i y_i y_iᵀ
    - σ ← σ · exp((c_σ/d_σ)(‖p_σ‖/E‖N(0, I)‖ − 1))
    """
    d = state.mean.numel()
    x = solutions.detach().to("cpu", torch.float64)
    f = losses.detach().to("cpu", torch.float64).reshape(-1)
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"solutions must have shape [count, {d}], got {tuple(x.shape)}")
    if f.numel() != x.shape[0]:
        raise ValueError(f"{x.shape[0]} solutions but {f.numel()} losses")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(f).all())):
        raise ValueError("solutions and losses must be finite")
    weights = recombination_weights(x.shape[0])
    mu_eff = 1.0 / float((weights**2).sum())
    order = torch.argsort(f, stable=True)
    steps = (x[order] - state.mean) / state.sigma
    step_w = weights @ steps

    c_sigma = (mu_eff + 2) / (d + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (d + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / d) / (d + 4 + 2 * mu_eff / d)
    c_1 = 2 / ((d + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((d + 2) ** 2 + mu_eff))
    chi_d = math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d**2))

    eigenvalues, basis = torch.linalg.eigh(state.cov)
    inv_sqrt = basis @ torch.diag(eigenvalues.clamp(min=1e-300).rsqrt()) @ basis.T
    path_sigma = (1 - c_sigma) * state.path_sigma + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * (
        inv_sqrt @ step_w
    )
    generation = state.generation + 1
    norm = float(path_sigma.norm())
    stalled = norm / math.sqrt(1 - (1 - c_sigma) ** (2 * generation)) >= (1.4 + 2 / (d + 1)) * chi_d
    h_sigma = 0.0 if stalled else 1.0
    path_cov = (1 - c_c) * state.path_cov + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * step_w
    rank_mu = (steps * weights[:, None]).T @ steps
    delta = (1 - h_sigma) * c_c * (2 - c_c)
    cov = (1 + c_1 * delta - c_1 - c_mu) * state.cov + c_1 * torch.outer(path_cov, path_cov) + c_mu * rank_mu
    cov = (cov + cov.T) / 2
    sigma = state.sigma * math.exp((c_sigma / d_sigma) * (norm / chi_d - 1))
    return CMAState(state.mean + state.sigma * step_w, sigma, cov, path_sigma, path_cov, generation)


def repair_length(dim: int) -> float:
    """pycma's bound on an injected solution's Mahalanobis distance from the mean, in σ units:
    √d + 2d/(d + 2) (``CMAEvolutionStrategy.repair_genotype``)."""
    return math.sqrt(dim) + 2 * dim / (dim + 2)


def repair_injected(state: CMAState, solutions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solutions [λ, d] the search did not sample, repaired as pycma repairs them before a tell:
    each x whose Mahalanobis distance ‖C^{-1/2}(x − m)‖/σ from the mean exceeds
    ``repair_length(d)`` is moved towards m to exactly that distance; others are unchanged.

    Returns the repaired solutions (float64) and each one's shrink factor (1 where unchanged).
    The distance is computed without overflow for any finite input.
    """
    d = state.mean.numel()
    x = solutions.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"solutions must have shape [count, {d}], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("solutions must be finite")
    eigenvalues, basis = torch.linalg.eigh(state.cov)
    steps = x - state.mean
    whitened = ((steps @ basis) * eigenvalues.clamp(min=1e-300).rsqrt()) / state.sigma
    largest = whitened.abs().amax(1, keepdim=True).clamp(min=1e-300)  # scale first: no overflow
    distance = largest.squeeze(1) * (whitened / largest).norm(dim=1)
    factor = torch.clamp(distance / repair_length(d), min=1.0)
    return state.mean + steps / factor[:, None], factor


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"a CMA-ES step size must be a positive number, got {sigma}")
