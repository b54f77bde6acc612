"""The L1 threat model's geometry for the PGD core: sparse steepest ascent and the exact projection.

The L1 ball's steepest-ascent direction puts the whole step on the single coordinate with the largest
gradient, which makes PGD crawl one pixel at a time; a dense (L-inf style) direction wastes most of the
budget. SLIDE (Tramer & Boneh, "Adversarial Training and Robustness for Multiple Perturbations",
NeurIPS 2019, https://arxiv.org/abs/1904.13000) takes the middle road: the sign of the gradient on the
coordinates whose |gradient| is in the top (1 - q) fraction, scaled to unit L1 norm. As in APGD-L1
(Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021,
https://arxiv.org/abs/2103.01208), coordinates already at the edge of [0, 1] in the direction the
gradient pushes take no share of the step: the box would cut that share off.

The projection is exact: the closest point, in Euclidean distance, of {d : ||d||_1 <= eps,
0 <= x + d <= 1}. Both sets are separable around 0 (lo = -x <= 0 <= 1 - x = hi), so the solution
soft-thresholds and clips each coordinate, d_i = sign(z_i) * clamp(|z_i| - lam, 0, u_i) with u_i the
room towards z_i's sign, for the smallest lam >= 0 that meets the radius. ||d(lam)||_1 is piecewise
linear in lam with breakpoints |z_i| and |z_i| - u_i; one sort of the 2n breakpoints per example and
two cumulative sums give it at every breakpoint, and lam is read off the segment that crosses eps
(the sort-based search of Duchi et al. 2008, extended to the box as in APGD-L1's projection).
Everything is batched: no loop over examples.
"""

from __future__ import annotations

import math

import torch

# SLIDE's sparsity: a step moves the coordinates whose |gradient| is in the top 1 % (q = 0.99).
L1_QUANTILE = 0.99


def l1_size(delta: torch.Tensor) -> torch.Tensor:
    """Per-example L1 norm of a batch of perturbations, summed in float64 (a float32 sum of thousands of
    terms drifts by more than the tolerance a ball check allows)."""
    return delta.flatten(1).double().abs().sum(1)


def l1_direction(grad: torch.Tensor, x_cur: torch.Tensor, quantile: float = L1_QUANTILE,
                 min_count: int = 1) -> torch.Tensor:  # fmt: skip
    """Unit-L1 ascent direction: sign(grad) on the top (1 - quantile) fraction (at least `min_count`) of the
    coordinates that can still move (by |grad|), zero elsewhere, divided by the number it moves.

    `x_cur` is the current iterate: a coordinate at 0 (or 1) whose gradient points below 0 (above 1)
    cannot move, so it neither takes part in the quantile nor receives a share of the step.
    """
    g = grad.flatten(1)
    cur = x_cur.flatten(1)
    movable = ((g > 0) & (cur < 1)) | ((g < 0) & (cur > 0))
    strength = torch.where(movable, g.abs(), torch.zeros_like(g))
    k = min(max(1, min_count, math.ceil((1 - quantile) * g.shape[1])), g.shape[1])
    threshold = strength.topk(k, dim=1).values[:, -1:]  # the k-th largest per example
    chosen = (strength >= threshold) & (strength > 0)  # ties at the threshold all move, equally
    direction = g.sign() * chosen
    return (direction / direction.abs().sum(1, keepdim=True).clamp_min(1)).view_as(grad)


def project_l1_box(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact Euclidean projection of the perturbation `z` onto {||d||_1 <= r, 0 <= x + d <= 1}, solved
    in float64 and returned in z's dtype.

    r = eps - n * finfo(dtype).eps (at least eps / 2) for n pixels per example: storing x + d in x's dtype
    moves each changed pixel by less than that unit, so the stored example lies in the eps-ball however it
    rounds (an allowance of about 4e-4 for a 32 x 32 x 3 float32 image at eps 12).
    """
    shape, dtype = z.shape, z.dtype
    if eps == 0:
        return torch.zeros_like(z)
    n = z[0].numel()
    z64 = z.detach().flatten(1).double()
    x64 = x.detach().flatten(1).double()
    magnitude = z64.abs()
    room = torch.where(z64 > 0, 1 - x64, x64).clamp_min(0)  # how far coordinate i can go in z_i's direction
    rounding = min(n * torch.finfo(dtype).eps, eps / 2)
    radius = eps - rounding
    # size(lam) = sum_i clamp(|z_i| - lam, 0, u_i) = sum_i max(|z_i| - lam, 0) - max(|z_i| - u_i - lam, 0):
    # a weighted sum of hinges over 2n breakpoints t_j with weights +1 (at |z_i|) and -1 (at |z_i| - u_i).
    breaks = torch.cat([magnitude, magnitude - room], 1)
    weights = torch.cat([torch.ones_like(magnitude), -torch.ones_like(magnitude)], 1)
    t, order = breaks.sort(1, descending=True)
    w = weights.gather(1, order)
    w_cum = w.cumsum(1)
    wt_cum = (w * t).cumsum(1)
    size_at = wt_cum - t * w_cum  # size(t_j), non-decreasing in j as lam = t_j decreases
    # First breakpoint (lam decreasing) at which the size reaches the radius; lam* lies in [t_j, t_{j-1}],
    # where size(lam) = wt_cum[j-1] - lam * w_cum[j-1] is linear.
    j = (size_at < radius).sum(1, keepdim=True).clamp(1, 2 * n - 1)
    w_seg = w_cum.gather(1, j - 1)
    lam = (wt_cum.gather(1, j - 1) - radius) / w_seg.clamp_min(1)
    lam = torch.minimum(torch.maximum(lam, t.gather(1, j)), t.gather(1, j - 1))
    # Inside the ball after clipping to the box: no shrinking (lam = 0).
    inside = magnitude.clamp(max=room).sum(1, keepdim=True) <= radius
    lam = torch.where(inside, torch.zeros_like(lam), lam.clamp_min(0))
    d = z64.sign() * torch.minimum((magnitude - lam).clamp_min(0), room)
    return d.to(dtype).view(shape)


def l1_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, step_size: float) -> torch.Tensor:
    """One PGD step in the L1 threat model: `step_size` along `l1_direction`, then `project_l1_box`.

    The step is spread over at least 2 * step_size coordinates: a pixel can move at most 1 (0.5 on average
    to the box's edge), so fewer would see most of a large step (FGSM's, of size eps) cut off by the box.
    """
    direction = l1_direction(grad, x + delta, min_count=math.ceil(2 * step_size))
    return project_l1_box(delta + step_size * direction, x, eps)


def l1_random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None,
                    normal_std: float | None = None) -> torch.Tensor:  # fmt: skip
    """A random start inside the L1 ball and the box: uniform in the ball (`normal_std` None), or
    `normal_std` * N(0, I) (TRADES' start), then projected."""
    if normal_std is not None:
        delta = normal_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    else:
        delta = random_l1(x.shape, eps, x.device, x.dtype, generator, uniform_radius=True)
    return project_l1_box(delta, x, eps)


def random_l1(shape: torch.Size | tuple[int, ...], eps: float, device: torch.device | str, dtype: torch.dtype,
              generator: torch.Generator | None, *, uniform_radius: bool = False) -> torch.Tensor:  # fmt: skip
    """Random perturbations of L1 norm eps (or, with `uniform_radius`, uniform in the L1 ball).

    Exponential magnitudes normalised to sum 1 are uniform on the simplex; random signs make that the L1
    sphere. The ball's volume grows as r^n, so a uniform radius is eps * U^(1/n).
    """
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    signs = torch.randint(0, 2, shape, device=device, generator=generator).to(dtype) * 2 - 1
    sphere = signs * e / e.flatten(1).sum(1).view(-1, *[1] * (len(shape) - 1))
    radius = torch.full((shape[0],), float(eps), device=device, dtype=dtype)
    if uniform_radius:
        n = math.prod(shape[1:])
        radius = radius * torch.rand(shape[0], device=device, dtype=dtype, generator=generator).pow(1.0 / n)
    return sphere * radius.view(-1, *[1] * (len(shape) - 1))
