"""Fitting ``L(n) = eps + beta n^(-alpha)`` to a loss series, as ADO's authors do (arXiv 2410.11820).

The fit works in log space, ``log L_hat = logaddexp(log beta - alpha log n, log eps)``, and
minimises ``sum_t huber(log L_hat(n_t) - log L_t)`` (delta 1e-3) plus the soft bounds of the
authors' code, from each of their 512 starting points; the lowest objective wins. Each start
runs its own L-BFGS (history 10, Armijo backtracking by quadratic interpolation, at most 200 iterations,
stop at a gradient below 1e-5 or a relative decrease below 2.2e-9, scipy's L-BFGS-B
defaults), all starts at once as batched tensor operations: a few hundred milliseconds
instead of seconds for one start after another.
"""

from __future__ import annotations

import torch

#: Huber threshold of the fit's residuals (in log loss).
HUBER_DELTA = 1e-3
#: The authors' starting points: log beta in -2..5, log eps in -2..1.5 (step 0.5), alpha in 0..0.7.
START_GRID = torch.cartesian_prod(
    torch.arange(-2.0, 6.0, 1.0, dtype=torch.float64),
    torch.arange(-2.0, 2.0, 0.5, dtype=torch.float64),
    torch.arange(0.0, 0.8, 0.1, dtype=torch.float64),
)


def savgol_smooth(values: torch.Tensor, window: int, order: int = 3) -> torch.Tensor:
    """Savitzky-Golay smoothing (scipy's ``savgol_filter``, ``mode='interp'``).

    Each value is replaced by a least-squares polynomial of degree ``order`` over the
    ``window`` values centred on it; at each end the polynomial of the first (last) window
    gives the first (last) ``window // 2`` values. The window is cut to the series' length
    (and made odd); a window of ``order`` values or fewer leaves the series as it is.
    """
    values = values.double()
    w = min(window, len(values))
    w -= 1 - w % 2
    if w <= order:
        return values.clone()
    h = w // 2
    offsets = torch.arange(-h, h + 1, dtype=torch.float64)
    basis = offsets[:, None] ** torch.arange(order + 1, dtype=torch.float64)  # (w, order + 1)
    # least squares through the pseudo-inverse (an SVD): torch's lstsq can differ in the last bits
    # from one call to the next, and a resumed run must compute what an uninterrupted one did
    solve = torch.linalg.pinv(basis)  # polynomial coefficients from the window's values
    out = values.clone()
    out[h : len(values) - h] = values.unfold(0, w, 1) @ solve[0]  # the fitted value at offset 0
    out[:h] = basis[:h] @ (solve @ values[:w])
    out[len(values) - h :] = basis[-h:] @ (solve @ values[-w:])
    return out


def objective(
    theta: torch.Tensor, log_n: torch.Tensor, log_loss: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' fit objective of each row ``(log beta, log eps, alpha)`` of ``theta`` and its gradient;
    row i fits the points ``(log_n[i], log_loss[i])`` whose ``weight`` is 1 (0: padding)."""
    a, e, alpha = theta.unbind(dim=-1)
    z = a[:, None] - alpha[:, None] * log_n - e[:, None]  # log(beta n^-alpha / eps)
    r = e[:, None] + torch.nn.functional.softplus(z) - log_loss  # log L_hat - log L
    small = r.abs() <= HUBER_DELTA
    value = (weight * torch.where(small, 0.5 * r * r, HUBER_DELTA * (r.abs() - 0.5 * HUBER_DELTA))).sum(dim=-1)
    slope = weight * torch.where(small, r, HUBER_DELTA * torch.sign(r))
    w_u = torch.sigmoid(z)  # d log L_hat / d log beta; 1 - w_u: d / d log eps
    w_e = 1.0 - w_u
    grad = torch.stack(
        [(slope * w_u).sum(-1), (slope * w_e).sum(-1), -(slope * w_u * log_n).sum(-1)],
        dim=-1,
    )
    # soft bounds: alpha <= 0.8, alpha >= 0 (-min(alpha, 0.001)), log beta <= 6.5, log eps >= 0.5
    value = value + (alpha - 0.8).clamp_min(0) - alpha.clamp_max(0.001) + (a - 6.5).clamp_min(0)
    value = value + (0.5 - e).clamp_min(0)
    one = torch.ones_like(a)
    grad = grad + torch.stack(
        [
            torch.where(a > 6.5, one, 0.0),
            torch.where(e < 0.5, -one, 0.0),
            torch.where(alpha > 0.8, one, 0.0) - torch.where(alpha < 0.001, one, 0.0),
        ],
        dim=-1,
    )
    return value, grad


def _direction(g: torch.Tensor, s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L-BFGS two-loop recursion per row; ``s, y`` are (G, m, 3) pairs, oldest first."""
    sy = (s * y).sum(-1)
    rho = torch.where(valid, 1.0 / torch.where(valid, sy, 1.0), 0.0)
    q = g.clone()
    alphas = []
    for i in reversed(range(s.shape[1])):
        alpha_i = rho[:, i] * (s[:, i] * q).sum(-1)
        q = q - alpha_i[:, None] * y[:, i]
        alphas.append(alpha_i)
    yy = (y * y).sum(-1)
    gamma = torch.ones(len(g), dtype=g.dtype)
    for i in range(s.shape[1]):  # the most recent valid pair scales the initial Hessian
        gamma = torch.where(valid[:, i], sy[:, i] / torch.where(valid[:, i], yy[:, i], 1.0), gamma)
    r = gamma[:, None] * q
    for i, alpha_i in zip(range(s.shape[1]), reversed(alphas), strict=True):
        beta_i = rho[:, i] * (y[:, i] * r).sum(-1)
        r = r + (alpha_i - beta_i)[:, None] * s[:, i]
    return -r


def minimize_batched(
    log_n: torch.Tensor,
    log_loss: torch.Tensor,
    weight: torch.Tensor,
    starts: torch.Tensor,
    max_iter: int = 200,
    history: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS from every row of ``starts`` on the points of the same row of ``log_n``,
    ``log_loss``, ``weight``; the end point and objective of each."""
    x = starts.clone()
    f, g = objective(x, log_n, log_loss, weight)
    size = len(x)
    s = torch.zeros(size, history, 3, dtype=x.dtype)
    y = torch.zeros_like(s)
    valid = torch.zeros(size, history, dtype=torch.bool)
    active = g.abs().amax(-1) > 1e-5
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d = _direction(g, s, y, valid)
        slope = (g * d).sum(-1)
        uphill = slope >= 0
        d = torch.where(uphill[:, None], -g, d)
        valid = valid & ~uphill[:, None]
        slope = (g * d).sum(-1)
        first = ~valid.any(-1)  # no curvature pair yet: a first step of at most unit length
        t = torch.where(first, torch.clamp(1.0 / d.norm(dim=-1).clamp_min(1e-300), max=1.0), 1.0)
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        pending = active.clone()
        for _trial in range(20):
            idx = pending.nonzero().flatten()
            if len(idx) == 0:
                break
            ti = t[idx]
            trial = x[idx] + ti[:, None] * d[idx]
            f_trial, g_trial = objective(trial, log_n[idx], log_loss[idx], weight[idx])
            ok = f_trial <= f[idx] + 1e-4 * ti * slope[idx]
            done = idx[ok]
            x_new[done], f_new[done], g_new[done] = trial[ok], f_trial[ok], g_trial[ok]
            pending[done] = False
            # backtrack to the minimum of the quadratic through f(0), f'(0) and f(t), within [t/10, t/2]
            excess = (f_trial - f[idx] - slope[idx] * ti).clamp_min(1e-300)
            shrunk = (-slope[idx] * ti * ti / (2 * excess)).clamp(0.1 * ti, 0.5 * ti)
            t[idx[~ok]] = shrunk[~ok]
        stuck = pending  # no acceptable step: at a (numerical) minimum
        moved = active & ~stuck
        step, change = x_new - x, g_new - g
        curvature = (step * change).sum(-1) > 1e-10
        s, y, valid = s.roll(-1, dims=1), y.roll(-1, dims=1), valid.roll(-1, dims=1)
        s[:, -1], y[:, -1], valid[:, -1] = step, change, moved & curvature
        decrease = (f - f_new) <= 2.220446049250313e-09 * torch.maximum(
            torch.maximum(f.abs(), f_new.abs()), f.new_ones(1)
        )
        x, f, g = x_new, f_new, g_new
        active = moved & ~decrease & (g.abs().amax(-1) > 1e-5)
    return x, f


def fit_power_laws(n: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The best fit of ``L(n) = eps + beta n^(-alpha)`` to each row's points ``(n, loss)`` where
    ``keep``; rows ``(log beta, log eps, alpha)``. All rows and starts run as one batch."""
    keep = keep & (n > 0) & (loss > 0)
    log_n = torch.where(keep, torch.log(n.double().clamp_min(1e-300)), 0.0)
    log_loss = torch.where(keep, torch.log(loss.double().clamp_min(1e-300)), 0.0)
    rows, starts = len(n), len(START_GRID)
    x, f = minimize_batched(
        log_n.repeat_interleave(starts, dim=0),
        log_loss.repeat_interleave(starts, dim=0),
        keep.double().repeat_interleave(starts, dim=0),
        START_GRID.repeat(rows, 1),
    )
    f = torch.where(torch.isfinite(f), f, torch.inf).view(rows, starts)
    best = torch.argmin(f, dim=1)
    return x.view(rows, starts, 3)[torch.arange(rows), best]


def fit_power_law(n: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``(log beta, log eps, alpha)`` of the best fit of ``L(n) = eps + beta n^(-alpha)`` to the points ``(n, loss)``."""
    return fit_power_laws(n[None], loss[None], torch.ones(1, len(n), dtype=torch.bool))[0]
