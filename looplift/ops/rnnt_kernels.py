"""The RNN-T lattice in torch: the full-sum loss with its gradient, and the Viterbi alignment.

The lattice of an entry has the nodes (t, u), 0 <= t < T, 0 <= u <= U: at (t, u)
the joint emits blank and moves to (t + 1, u), or emits label u (the (u+1)-th)
and moves to (t, u + 1); the path ends with the blank at (T - 1, U). The dynamic
programs run along the anti-diagonals n = t + u: every node of a diagonal
depends only on the previous one, so a diagonal is one vectorized step over the
batch and the label positions, T + U steps in all. The lattice is stored skewed,
``D[:, n, u] = alpha[:, n - u, u]``, so that both predecessors of a diagonal are
the previous diagonal, at u and at u - 1.

Memory: from the joint's `(N, T, U + 1, V)` scores only the blank's and the
labels' log-probs (N x T x U sized) are taken; the log-softmax is fused (its
log-sum-exp taken in chunks of frames). The gradient is the one tensor of the
scores' size the loss allocates.
"""

from __future__ import annotations

import torch

__all__ = ["rnnt_loss_raw", "rnnt_align_raw"]

NEG = float("-inf")


def _node_log_probs(scores: torch.Tensor, labels: torch.Tensor, blank: int, logits: bool):
    """(blank log-probs (N, T, U1), label log-probs (N, T, U1; -inf at u = U1 - 1), the log-sum-exp or None)."""
    n, t, u1, _ = scores.shape
    lse = None
    if logits:   # (in chunks of frames: the temporary of the log-sum-exp stays small)
        lse = scores.new_empty(n, t, u1)
        step = max(1, t // 32)
        for t0 in range(0, t, step):
            lse[:, t0:t0 + step] = scores[:, t0:t0 + step].logsumexp(-1)
    blank_lp = scores[..., blank]
    index = labels[:, None, :, None].expand(n, t, u1 - 1, 1)
    label_lp = scores[:, :, :u1 - 1].gather(-1, index).squeeze(-1)
    label_lp = torch.cat([label_lp, label_lp.new_full((n, t, 1), NEG)], 2)
    if lse is not None:
        blank_lp, label_lp = blank_lp - lse, label_lp - lse
    return blank_lp, label_lp, lse


class _Skew:
    """Index maps between the lattice (N, T, U1) and its anti-diagonals (N, T + U1 - 1, U1)."""

    def __init__(self, t_len: torch.Tensor, u_len: torch.Tensor, t: int, u1: int):
        device = t_len.device
        n_diag = t + u1 - 1
        diag = torch.arange(n_diag, device=device)[:, None]
        u = torch.arange(u1, device=device)[None, :]
        self.t_of = diag - u                                              # (D, U1)
        self.inside = (self.t_of >= 0) & (self.t_of < t)                  # a node of the padded lattice
        self.t_index = self.t_of.clamp(0, t - 1)
        self.u_index = u.expand(n_diag, u1)
        # a node of the entry's own lattice (t < T, u <= U), and its final node (T - 1, U)
        tt, uu = self.t_of[None], u[None]
        self.valid = self.inside[None] & (tt < t_len[:, None, None]) & (uu <= u_len[:, None, None])
        self.final = (tt == t_len[:, None, None] - 1) & (uu == u_len[:, None, None])
        self.n_diag = n_diag

    def skew(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, U1) -> (N, D, U1), -inf off the entry's lattice."""
        return torch.where(self.valid, x[:, self.t_index, self.u_index], x.new_tensor(NEG))

    def unskew(self, d: torch.Tensor, t: int) -> torch.Tensor:
        """(N, D, U1) -> (N, T, U1) (each node is on exactly one diagonal)."""
        out = d.new_zeros(d.shape[0], t, d.shape[2])
        rows, cols = self.t_of[self.inside], self.u_index[self.inside]
        out[:, rows, cols] = d[:, self.inside]
        return out


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """x[..., u - 1] at u, -inf at u = 0."""
    return torch.cat([x.new_full(x.shape[:-1] + (1,), NEG), x[..., :-1]], -1)


def _alphas(blank: torch.Tensor, label: torch.Tensor, skew: _Skew, combine) -> torch.Tensor:
    """Forward scores over the diagonals: alpha(t, u) = combine(alpha(t-1, u) + blank(t-1, u),
    alpha(t, u-1) + label(t, u-1)); alpha(0, 0) = 0. `combine` is logaddexp (sum) or maximum (Viterbi)."""
    n, n_diag, u1 = blank.shape
    alpha = blank.new_full((n, n_diag, u1), NEG)
    alpha[:, 0, 0] = 0.0
    for d in range(1, n_diag):
        prev = alpha[:, d - 1]
        alpha[:, d] = combine(prev + blank[:, d - 1], _shift_right(prev + label[:, d - 1]))
    return torch.where(skew.valid, alpha, alpha.new_tensor(NEG))


def _betas(blank: torch.Tensor, label: torch.Tensor, skew: _Skew) -> torch.Tensor:
    """Backward scores: beta(t, u) = logaddexp(blank(t, u) + beta(t+1, u), label(t, u) + beta(t, u+1)), with
    beta(T-1, U) = blank(T-1, U) (the final blank)."""
    n, n_diag, u1 = blank.shape
    beta = blank.new_full((n, n_diag, u1), NEG)
    beta[:, n_diag - 1] = torch.where(skew.final[:, n_diag - 1], blank[:, n_diag - 1], beta.new_tensor(NEG))
    pad = blank.new_full((n, 1), NEG)
    for d in range(n_diag - 2, -1, -1):
        nxt = beta[:, d + 1]
        step = torch.logaddexp(blank[:, d] + nxt, label[:, d] + torch.cat([nxt[:, 1:], pad], 1))
        beta[:, d] = torch.where(skew.final[:, d], blank[:, d], step)
    return torch.where(skew.valid, beta, beta.new_tensor(NEG))


class _RnntLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, labels, t_len, u_len, blank, logits):
        n, t, u1, _ = scores.shape
        with torch.no_grad():
            blank_lp, label_lp, lse = _node_log_probs(scores, labels, blank, logits)
            skew = _Skew(t_len, u_len, t, u1)
            # (the lattice in float64: its sums over hundreds of steps lose no precision; it is N x T x U small)
            b, lab = skew.skew(blank_lp.double()), skew.skew(label_lp.double())
            alpha = _alphas(b, lab, skew, torch.logaddexp)
            beta = _betas(b, lab, skew)
            log_z = beta[:, 0, 0]
            z = log_z[:, None, None]
            nxt = torch.cat([beta[:, 1:], beta.new_full((n, 1, u1), NEG)], 1)   # beta(t+1, u) on diagonal d+1
            g_blank = torch.exp(alpha + b + torch.where(skew.final, torch.zeros_like(nxt), nxt) - z)
            g_label = torch.exp(alpha + lab + torch.cat([nxt[:, :, 1:], nxt.new_full((n, nxt.shape[1], 1), NEG)],
                                                        2) - z)
            g_blank = torch.nan_to_num(g_blank, nan=0.0)
            g_label = torch.nan_to_num(g_label, nan=0.0)
        ctx.save_for_backward(scores, labels, lse if lse is not None else scores.new_empty(0),
                              skew.unskew(g_blank, t).to(scores.dtype), skew.unskew(g_label, t).to(scores.dtype))
        ctx.blank, ctx.logits = blank, logits
        return (-log_z).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        scores, labels, lse, g_blank, g_label = ctx.saved_tensors
        n, t, u1, _ = scores.shape
        scale_b = -g_blank * grad_out[:, None, None]
        scale_l = -g_label * grad_out[:, None, None]
        if ctx.logits:   # d log_softmax: the one-hot minus the softmax, the softmax made in the gradient's place
            grad = torch.sub(scores, lse[..., None], out=torch.empty_like(scores))
            grad.exp_().mul_(-(scale_b + scale_l)[..., None])
        else:
            grad = torch.zeros_like(scores)
        grad[..., ctx.blank] += scale_b
        index = labels[:, None, :, None].expand(n, t, u1 - 1, 1)
        grad[:, :, :u1 - 1].scatter_add_(-1, index, scale_l[:, :, :u1 - 1, None])
        return grad, None, None, None, None, None


def rnnt_loss_raw(scores: torch.Tensor, labels: torch.Tensor, t_len: torch.Tensor, u_len: torch.Tensor, *,
                  blank: int, logits: bool = True) -> torch.Tensor:
    """The RNN-T loss (negative log-likelihood) per entry of `scores` (N, T, U + 1, V) (logits, or log-probs
    with ``logits=False``) for `labels` (N, U), with the entries' frames `t_len` and labels `u_len` (N,)."""
    return _RnntLoss.apply(scores, labels.long(), t_len, u_len, blank, logits)


def rnnt_align_raw(scores: torch.Tensor, labels: torch.Tensor, t_len: torch.Tensor, u_len: torch.Tensor, *,
                   blank: int, logits: bool = True) -> torch.Tensor:
    """The best path of each entry's lattice as symbols per alignment step (N, T + U): the labels and blanks
    in order (T blanks, the last symbol a blank), padded with blanks past the entry's T + U steps."""
    n, t, u1, _ = scores.shape
    with torch.no_grad():
        blank_lp, label_lp, _ = _node_log_probs(scores, labels.long(), blank, logits)
        skew = _Skew(t_len, u_len, t, u1)
        b, lab = skew.skew(blank_lp.double()), skew.skew(label_lp.double())
        alpha = _alphas(b, lab, skew, torch.maximum)
        rows = torch.arange(n, device=scores.device)
        # walk back from the final node: at (t, u), the predecessor was (t - 1, u) by a blank or (t, u - 1)
        # by label u - 1, whichever path scores higher (ties: the blank)
        steps = t + u1 - 1
        out = torch.full((n, steps), blank, dtype=torch.long, device=scores.device)
        tt, uu = t_len - 1, u_len.clone()
        k = tt + uu                       # the alignment step of the final blank (T + U - 1)
        for _ in range(steps):
            live = (tt > 0) | (uu > 0)
            if not bool(live.any()):
                break
            d = (tt + uu).clamp(min=1)
            by_blank = alpha[rows, d - 1, uu] + b[rows, d - 1, uu]
            by_label = alpha[rows, d - 1, (uu - 1).clamp(min=0)] + lab[rows, d - 1, (uu - 1).clamp(min=0)]
            label_step = live & (uu > 0) & ((by_label > by_blank) | (tt == 0))
            k = k - live.long()
            symbol = torch.where(label_step, labels.long()[rows, (uu - 1).clamp(min=0)],
                                 torch.full_like(uu, blank))
            out[rows[live], k[live]] = symbol[live]
            uu = torch.where(label_step, uu - 1, uu)
            tt = torch.where(live & ~label_step, tt - 1, tt)
    return out
