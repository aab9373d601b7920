"""NorMuon: Muon's orthogonalized momentum, with every output neuron normalized by its own
running second moment (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable",
arXiv 2510.05491). One file that depends on nothing but torch: copy it into your project.

    from normuon import NorMuon, param_groups
    opt = NorMuon(param_groups(model), lr=4e-3, weight_decay=0.1)   # 2-4x AdamW's lr

    python normuon.py [--plot]   # 1-minute CPU demo: Muon's unequal neuron updates, NorMuon's
                                 # equal ones, and whether the loss differs beyond seed noise

For one hidden weight matrix W (m, n) with gradient G — m output neurons, n inputs each; a
parameter is a batch of such matrices (`layout`, `blocks`: a conv kernel (out, in, k) is one
(out, in*k) matrix, stacked experts (E, out, in) are E) — each step does, in the numbered
steps that the code's comments (here and in distributed.py) refer to:

    1. M <- b1*M + (1-b1)*G                      momentum (EMA form)
    2. U <- b1*M + (1-b1)*G   (or M)             nesterov
    3. O <- orth(U)                              approximately the polar factor U (U^T U)^(-1/2)
    4. v <- b2*v + (1-b2)*mean_columns(O*O)      one second moment per neuron (row)
    5. O^ <- O / (sqrt(v) + eps)                 each row by its own RMS
    6. lr_hat from `adjust_lr` (below), using |O^|_F (and |O|_F): whole-matrix norms
    7. W <- W - lr*wd*W - lr_hat*O^

`algorithm="muon"` skips steps 4-5 (the baseline and the ablation);
`algorithm="adamw"` is plain AdamW, for the parameters that are not hidden matrices.
Embeddings, the output head, gains, biases and scalars belong there: use `param_groups`, and
`print(describe_param_groups(groups))` to see where each parameter went.

Options (each a keyword of NorMuon and overridable per param group):
    lr            learning rate: a float, or a 1-element tensor (then a compiled step does not
                  recompile when a scheduler changes it). With adjust_lr="match_rms_adamw"
                  every matrix update has RMS 0.2*lr, like AdamW's: keep AdamW's weight decay
                  and start at 2-4x the lr you would give AdamW (on this project's tiny GPT,
                  AdamW was best at 2e-3 and NorMuon at 8e-3; at 2e-3 it was barely better
                  than AdamW). With adjust_lr="original" use Muon's scale, about 0.02.
    weight_decay  decoupled: W <- W - lr*wd*W, with the base lr in both modes.
    algorithm     "normuon" (default), "muon" or "adamw".
    momentum      b1 of the momentum EMA (0.95).
    beta2         b2 of the neuron second moment (0.95): the paper's name. AdamW's two betas
                  are `betas`, below; they act on other moments, so they are kept apart.
    eps           added to the square root of a second moment before dividing (1e-8): sqrt(v)
                  of each neuron in normuon groups, Adam's per coordinate in adamw groups.
    nesterov      orthogonalize the Nesterov look-ahead rather than M (True).
    ns_steps      iterations of the orthogonalizer (5).
    orthogonalizer  "newton_schulz" (Muon's quintic, bf16), "polar_express" (Amsel et al.
                  2025, converges closer to 1) or "svd" (exact, float64: slow, for tests).
                  "gram_newton_schulz" / "gram_polar_express": the same polynomial on the
                  r x r Gram matrix, in float32 (gram_iterations), for matrices at least
                  GRAM_MIN_ASPECT times as long as wide; the plain one on the others.
    adjust_lr     "match_rms_adamw": lr_hat = 0.2*lr*sqrt(m*n)/|O^|_F (the paper's rule).
                  "original": O^ rescaled to |O|_F, then lr_hat = lr*sqrt(max(1, m/n)) (Muon's).
    betas         AdamW's (b1, b2) in adamw groups ((0.9, 0.95)).
    layout        how the weight is stored, so that it is stepped as a batch of (neurons,
                  inputs) matrices, each its own matrix in every step (its own polar factor,
                  neuron second moments, step-6 norms and shape factor):
                  "out_in" (default): nn.Linear and convs, (out, in, k...) -> (out, in*k...);
                  "in_out": Hugging Face's Conv1D, nn.ConvTranspose, (in, out, k...);
                  "experts_out_in" / "experts_in_out": stacked MoE experts (E, out, in) /
                  (E, in, out) -> E matrices. param_groups sets it for each layer.
    blocks        the neurons split into this many equal blocks, each its own matrix (1): a
                  grouped conv's groups. A depthwise conv would be C one-neuron matrices:
                  param_groups gives those to AdamW.
    split_sizes   neurons per block, summing to the neuron count, each block its own matrix
                  (None: one block): a fused projection, e.g. [D, D, D] for a (3D, D) qkv, so
                  that q, k and v are orthogonalized apart. A matrix group option;
                  param_groups(model, split_sizes={pattern: sizes}) sets it by name.
    cautious_weight_decay  decay only the coordinates that the update also moves toward zero:
                  W <- W - lr*wd*(W * mask) + update, mask = [update * W <= 0] (False). In
                  adamw groups too, with AdamW's update.

State (momentum_buffer, second_moment, exp_avg, exp_avg_sq) is float32 for bf16/fp16/fp32
parameters, float64 for float64 ones, and stays so through state_dict()/load_state_dict().
A NaN or inf in a gradient makes that parameter non-finite and no other, as in torch.optim,
with every orthogonalizer; a matrix with a zero-size dim steps as nothing.
Same-shape matrices are orthogonalized as one batch: on a GPU the whole bucket (fewer kernel
launches); on a CPU a batch no bigger than the step's largest matrix, so that a step's extra
memory is about 7 bytes per element of that one matrix (torch.optim.Muon's: about 9; with
the Gram form, whose X is float32, about 15).
"""
import fnmatch
import inspect
import math
import re
import statistics
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

ALGORITHMS = ("normuon", "muon", "adamw")
ORTHOGONALIZERS = ("newton_schulz", "polar_express", "gram_newton_schulz", "gram_polar_express",
                   "svd")
ADJUST_LR = ("match_rms_adamw", "original")

# Muon's quintic (the same as torch.optim.Muon): steep at zero, so 5 steps suffice, at the
# price of singular values that land in [0.5, 1.21] rather than at 1 (measured, for directions
# within two decades of the largest; weaker ones are pulled up less far).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932): one optimal triple per iteration; the
# last repeats for more than five steps. Paired with an input scaled by 1.02*|U|_F.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Floor for the norms we divide by: an all-zero gradient must give a zero update, not 0/0.
NORM_FLOOR = 1e-30
# The aspect ratio max/min(m, n) from which the Gram form (gram_iterations) is used: below it,
# the plain iteration is the faster (measured: bench/RESULTS.md).
GRAM_MIN_ASPECT = 2.0


# ----------------------------------------------------------------------------- orthogonalizers

def _odd_polynomial_iteration(U: Tensor, coefficients, input_scale: float,
                              gram: bool = False) -> Tensor:
    """X <- a*X + (b*A + c*A^2) X with A = X X^T, in bf16, on U (..., m, n) / (scale*|U|_F);
    with gram=True, on the Gram matrix in float32 (gram_iterations) where the shape gains by it.

    U is rounded to bf16 first, so a bf16 U (what a sharded optimizer sends to the matrix's
    owner, and what NorMuon builds: see orthogonalizer_dtype) gives exactly the same result.
    Returns O in U's dtype."""
    X = U.bfloat16()
    # X is scaled by the power of two that brings its largest entry into [0.5, 1). That is
    # exact, so the result is the same at any scale of U in bf16's normal range, and X X^T can
    # neither overflow (a float32 sum of squares does above 1.8e19) nor lose a tiny X to
    # underflow; |X|_F then needs no guard that a tiny X would vanish into. A zero X stays
    # zero; a NaN or inf gives NaN.
    entries = X.flatten(-2)                                            # (..., m*n)
    largest = torch.maximum(entries.amax(-1), -entries.amin(-1)).float()      # (...)
    exponent = torch.frexp(largest).exponent.clamp(-126, 126)
    power = torch.ldexp(torch.ones_like(largest), -exponent).bfloat16()[..., None, None]
    # (into a new, contiguous X: U must not be written, and batched matmuls on a strided X
    # are far slower on a CPU. The Gram form computes in float32: see gram_iterations)
    gram = gram and gram_form_gains(*X.shape[-2:])
    X = torch.mul(X, power, out=torch.empty(X.shape, device=X.device,
                                            dtype=torch.float32 if gram else X.dtype))
    batch_shape, X = X.shape[:-2], X.reshape(-1, *X.shape[-2:])       # (B, m, n)
    if gram:
        X = gram_iterations(X, coefficients, input_scale)
    else:
        A = X.new_empty(X.shape[0], *[min(X.shape[-2:])] * 2)         # (B, r, r)
        X = polynomial_iterations(X, coefficients, input_scale,
                                  (A, torch.empty_like(A), torch.empty_like(X)))
    return X.reshape(*batch_shape, *X.shape[-2:]).to(U.dtype)


def polynomial_iterations(X: Tensor, coefficients, input_scale: float,
                          buffers: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The matmuls: X <- a*X + (b*A + c*A@A) X, A = X X^T, starting from X / (input_scale *
    |X|_F), for X (B, m, n) with buffers (A, B, X') of shapes (B, r, r), (B, r, r), (B, m, n),
    r = min(m, n). Returns the final X, which is X or X' (the two swap every iteration).

    How, and why it is faster than the plain loop on a CPU:
    - X is normalized inside the first iteration, with no pass over it: |X|_F^2 is the trace
      of the first A, so with k = 1/(input_scale*|X|_F) that iteration scales A by k^2 and
      computes X <- k (aI + bA + cA@A) X. (Rounding that r x r matrix to bf16 rounds its
      first a, a row scaling error of the size of U's own rounding to bf16. Later iterations
      keep a*X in baddbmm, where it is exact: rounding a every iteration measurably moved the
      result away from the exact polynomial.)
    - A tall X (m > n) is iterated from the right, X <- a*X + X (b*A + c*A@A) with A = X^T X:
      the same polynomial (p(X X^T) X = X p(X^T X)), still on the small Gram matrix, with no
      transposed copy of X in and out (those copies cost about 2% of a CPU step).
    - Buffers are written in place: on a CPU fresh outputs of these sizes are new pages from
      the OS each time, and their page faults made X X^T a third slower.
    """
    A, B, X_next = buffers
    tall = X.size(-2) > X.size(-1)
    for i, (a, b, c) in enumerate(coefficients):
        torch.bmm(*((X.mT, X) if tall else (X, X.mT)), out=A)             # A = Gram matrix
        if i == 0:
            sq_norm = A.diagonal(dim1=-2, dim2=-1).float().sum(-1)       # (B,): |X|_F^2
            # (a nonzero X has |X|_F >= 0.5 here: the floor only keeps a zero X at zero)
            k = 1 / (input_scale * sq_norm.clamp_min(NORM_FLOOR).sqrt())
            A.mul_(k.square()[:, None, None])                             # A of k X
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)                    # B = b*A + c*A@A
        if i == 0:
            B.diagonal(dim1=-2, dim2=-1).add_(a)
            B.mul_(k[:, None, None])                                      # k (aI + B)
            torch.bmm(*((X, B) if tall else (B, X)), out=X_next)
        else:
            torch.baddbmm(X, *((X, B) if tall else (B, X)), beta=a, out=X_next)  # aX + BX|XB
        X, X_next = X_next, X
    return X


def gram_iterations(X: Tensor, coefficients, input_scale: float) -> Tensor:
    """The same polynomial as polynomial_iterations, evaluated on the r x r Gram matrix, for X
    (B, m, n) float32 (holding bf16 values). Returns the final X.

    Every iterate is Q X_0 (X_0 Q when tall) for an r x r Q: with R = X X^T and
    P = aI + bR + cR^2, X <- P X is Q <- P Q and R <- P R P. Only the first Gram matrix and
    the final Q X touch the long side, so a wide or tall X costs far fewer FLOPs
    (gram_iterations_flops). In exact arithmetic the result is the same. In bf16 it is not:
    rounding R to bf16 loses the directions more than about a decade below the largest (their
    share of R is under its rounding), and the product of the early, large P amplifies what is
    left (measured on spectra over 3 decades: 5x to over 10^6x further from the float64
    polynomial than a plain bf16 loop; restarts of Q at I got 0.4-3.2x, still short). So R, P
    and Q, and the two long-side products, are float32: 0.01-0.06x the plain loop's distance.
    """
    tall = X.size(-2) > X.size(-1)
    R = torch.bmm(*((X.mT, X) if tall else (X, X.mT)))                # (B, r, r)
    P, Q, T = torch.empty_like(R), torch.empty_like(R), torch.empty_like(R)
    sq_norm = R.diagonal(dim1=-2, dim2=-1).sum(-1)                     # (B,): |X|_F^2
    k = 1 / (input_scale * sq_norm.clamp_min(NORM_FLOOR).sqrt())       # (B,)
    R.mul_(k.square()[:, None, None])                                  # R of k X
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        torch.baddbmm(R, R, R, beta=b, alpha=c, out=P)                 # P = bR + cR@R
        P.diagonal(dim1=-2, dim2=-1).add_(a)                           #   + aI
        if i == 0:
            torch.mul(P, k[:, None, None], out=Q)                      # Q = k P: X_0 unscaled
        else:
            torch.bmm(*((Q, P) if tall else (P, Q)), out=T)            # Q <- P Q (Q P if tall)
            Q, T = T, Q
        if i < last:
            torch.bmm(P, R, out=T)
            torch.bmm(T, P, out=R)                                     # R <- P R P
    return torch.bmm(*((X, Q) if tall else (Q, X)))


def gram_form_gains(m: int, n: int) -> bool:
    """Whether the Gram form is the faster for an (m, n) matrix (measured; see GRAM_MIN_ASPECT)."""
    return max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def gram_iterations_flops(m: int, n: int, steps: int = 5) -> int:
    """Matmul FLOPs of gram_iterations: with r = min, c = max, X X^T and Q X (2 r^2 c each),
    and per iteration R@R, P Q (not in the first) and P R P (not in the last), 2 r^3 each."""
    r, c = min(m, n), max(m, n)
    return 2 * 2 * r * r * c + (steps + (steps - 1) + 2 * (steps - 1)) * 2 * r ** 3


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` iterations on an (m, n) matrix: with r = min, c = max,
    X X^T (2 r^2 c), A A (2 r^3) and B X (2 r^2 c) per iteration."""
    r, c = min(m, n), max(m, n)
    return steps * (4 * r * r * c + 2 * r ** 3)


def orthogonalizer_flops(orthogonalizer: str, m: int, n: int, steps: int = 5) -> int:
    """Matmul FLOPs of orthogonalizing an (m, n) matrix: the Gram form's where it is used,
    the plain iteration's otherwise (and for "svd", as a measure of its size)."""
    if orthogonalizer.startswith("gram_") and gram_form_gains(m, n):
        return gram_iterations_flops(m, n, steps)
    return newton_schulz_flops(m, n, steps)


def newton_schulz(U: Tensor, steps: int = 5, gram: bool = False) -> Tensor:
    """Muon's quintic Newton-Schulz iteration on a batch (..., m, n)."""
    return _odd_polynomial_iteration(U, [NEWTON_SCHULZ_COEFFICIENTS] * steps, 1.0, gram)


def polar_express(U: Tensor, steps: int = 5, gram: bool = False) -> Tensor:
    """Polar Express on a batch (..., m, n); singular values end near 1."""
    coefficients = [POLAR_EXPRESS_COEFFICIENTS[min(i, 4)] for i in range(steps)]
    return _odd_polynomial_iteration(U, coefficients, 1.02, gram)


def svd_polar(U: Tensor) -> Tensor:
    """The exact polar factor U sign(S) V^T in float64, on a batch (..., m, n).

    Singular values below max(m, n)*eps_fp32*s_max count as zero and their directions are
    dropped, as Newton-Schulz drops them; otherwise a rank-deficient U has no unique factor.
    A matrix with a NaN or inf gives all NaN.
    """
    finite = torch.isfinite(U).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    left, S, right_h = torch.linalg.svd(torch.where(finite, U.double(), 0.0),
                                        full_matrices=False)
    cutoff = max(U.shape[-2:]) * torch.finfo(torch.float32).eps * S[..., :1]  # S descends
    keep = (S > cutoff).double()
    polar = (left * keep.unsqueeze(-2)) @ right_h
    # a NaN/inf makes LAPACK raise mid-step; give NaN instead, as Newton-Schulz does
    return torch.where(finite, polar, math.nan).to(U.dtype)


def orthogonalize(U: Tensor, orthogonalizer: str = "newton_schulz", steps: int = 5) -> Tensor:
    """Approximate polar factor of each matrix of U (..., m, n), in U's dtype."""
    polynomial, gram = orthogonalizer.removeprefix("gram_"), orthogonalizer.startswith("gram_")
    if polynomial == "newton_schulz":
        return newton_schulz(U, steps, gram)
    if polynomial == "polar_express":
        return polar_express(U, steps, gram)
    if orthogonalizer == "svd":
        return svd_polar(U)
    raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; choose one of {ORTHOGONALIZERS}")


def orthogonalizer_dtype(orthogonalizer: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype U needs for `orthogonalizer`: the polynomial iterations round U to bf16 first,
    so a bf16 U gives the same O in half the memory (and half the bytes on the wire when
    sharded); the exact "svd" keeps `dtype`."""
    return dtype if orthogonalizer == "svd" else torch.bfloat16


# ----------------------------------------------------------------------------- update math

def nesterov_direction(momentum_buffer: Tensor, grad: Tensor, momentum: float,
                       nesterov: bool) -> Tensor:
    """Steps 1-2: update the momentum EMA in place; return what to orthogonalize.

    grad is read, never written (p.grad stays the gradient). Without nesterov the buffer itself
    is returned: callers must not modify it.
    """
    grad = grad.to(momentum_buffer.dtype)
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def neuron_step(O: Tensor, second_moment: Tensor, *, algorithm: str, beta2: float,
                eps: float) -> tuple[Tensor, Tensor]:
    """Steps 4-5 on O (..., m, n): returns (row_scale, row_sq), where O^ = O * row_scale[..., None]
    and row_sq (..., m) = |O_i|^2 of every row i (matrix_sq_norms turns them into the norms
    that step 6 divides by).

    For "normuon", v = second_moment (..., m) is updated in place (no bias correction) and
    row_scale = 1/(sqrt(v) + eps); for "muon", row_scale = 1. O is only read, and O^ is never
    formed: apply_update folds row_scale into its one pass over W. (Forming O^ took a float32
    copy of O, the size of the step's largest temporary, and two more passes over it.)

    Each row is normalized on its own, so rows of O may be split across ranks; a matrix's
    norms are then the sum of its rows' over all ranks (distributed.py does that).
    """
    row_sq = torch.linalg.vector_norm(O, dim=-1, dtype=second_moment.dtype).square()  # (..., m)
    if algorithm == "normuon":
        second_moment.lerp_(row_sq / O.size(-1), 1 - beta2)   # step 4: v_i <- EMA of mean(O_i^2)
        row_scale = 1 / (second_moment.sqrt() + eps)          # step 5
    else:
        row_scale = torch.ones_like(row_sq)
    return row_scale, row_sq


def matrix_sq_norms(row_scale: Tensor, row_sq: Tensor) -> Tensor:
    """(|O^|_F^2, |O|_F^2) (..., 2) of the rows given, (..., m), from neuron_step's output."""
    return torch.stack([(row_sq * row_scale.square()).sum(-1), row_sq.sum(-1)], dim=-1)


def update_scale(O_hat_sq_norm: Tensor, O_sq_norm: Tensor, m: int, n: int,
                 adjust_lr: str) -> Tensor:
    """Step 6: lr_hat/lr, the factor that multiplies O^ (and, in "original" mode, rescales it),
    from each matrix's squared norms (any batch shape)."""
    O_hat_norm = O_hat_sq_norm.sqrt().clamp_min(NORM_FLOOR)
    if adjust_lr == "match_rms_adamw":
        return (0.2 * math.sqrt(m * n)) / O_hat_norm       # every update has RMS 0.2*lr
    if adjust_lr == "original":
        return O_sq_norm.sqrt() / O_hat_norm * math.sqrt(max(1.0, m / n))
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; choose one of {ADJUST_LR}")


def row_steps(row_scale: Tensor, sq_norms: Tensor, m: int, n: int, *, lr: float | Tensor,
              adjust_lr: str) -> Tensor:
    """Step 6 for k (m, n) matrices: the signed step of every neuron, -lr_hat/(sqrt(v_i) + eps),
    (k, m), from neuron_step's row_scale (k, m) and each matrix's squared norms (k, 2)."""
    scale = update_scale(sq_norms[:, 0], sq_norms[:, 1], m, n, adjust_lr)       # (k,)
    return row_scale * (-lr * scale)[:, None]


def apply_update(param: Tensor, O: Tensor, row_step: Tensor, view: "MatrixView", *,
                 lr: float | Tensor, weight_decay: float, cautious: bool = False) -> None:
    """Step 7 on one parameter, the batch of matrices `view` describes: W <- W - lr*wd*W +
    row_step_i * O_i for every neuron i, with O (k, m, n) and row_step (k, m) (row_steps').
    With `cautious`, only where that update moves W toward zero too is W decayed."""
    W = param.view(view.split_shape)
    if cautious:   # the update is needed before W changes: one param-sized temporary
        update = from_matrices(O, view) * view.neuron_values(row_step)
        decay_where(W, update, lr * weight_decay)
        W.add_(update)
        return
    param.mul_(1 - lr * weight_decay)
    W.addcmul_(from_matrices(O, view), view.neuron_values(row_step))   # one pass, O as is


def decay_where(W: Tensor, update: Tensor, decay: float | Tensor) -> None:
    """Cautious weight decay: W <- W - decay*W where update and W have opposite signs (or either
    is 0), i.e. where W + update is a step toward zero; W elsewhere untouched."""
    W.sub_(torch.where(update * W <= 0, W, 0).mul_(decay))


def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                 *, lr: float | Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float, cautious: bool = False) -> None:
    """One AdamW step in place (the math of torch.optim.AdamW); step counts from 1. With
    `cautious`, decay only where the step moves W toward zero too (decay_where)."""
    beta1, beta2 = betas
    grad = grad.to(exp_avg.dtype)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denominator = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    step_taken = (exp_avg / denominator).mul_(lr / bias_correction1)   # W <- W - step_taken
    if cautious:
        decay_where(param, step_taken.neg(), lr * weight_decay)
    else:
        param.mul_(1 - lr * weight_decay)
    param.sub_(step_taken)


LAYOUTS = ("out_in", "in_out", "experts_out_in", "experts_in_out")


class MatrixView(NamedTuple):   # (a NamedTuple: torch.compile traces its creation)
    """A parameter as a batch of `matrices` (neurons, inputs) matrices (matrix_view's)."""
    split_shape: tuple[int, ...]   # the parameter's shape, its neuron dim split (blocks, neurons)
    order: tuple[int, ...]         # split_shape's dims as (expert, block, neuron, inputs...)
    inputs_at: tuple[int, ...]     # split_shape's input dims
    matrices: int
    neurons: int
    inputs: int
    moment_dims: tuple[int, ...]   # the parameter's dims that its second moment keeps

    def neuron_values(self, values: Tensor) -> Tensor:
        """values (matrices, neurons), one per neuron, shaped to broadcast over split_shape."""
        return values.reshape([1 if d in self.inputs_at else size
                               for d, size in enumerate(self.split_shape)])


def matrix_view(shape, layout: str = "out_in", blocks: int = 1) -> MatrixView:
    """How the matrix optimizer sees a parameter of `shape`: the one home of that rule.

    The output neurons lie on dim 0 ("out_in": nn.Linear, convs (out, in, k...)), on dim 1
    ("in_out": Conv1D, ConvTranspose (in, out, k...)), or after a leading expert dim
    ("experts_out_in" (E, out, in), "experts_in_out" (E, in, out)); every other dim holds
    inputs. The neurons split into `blocks` equal blocks (a grouped conv's groups). Each
    expert's each block is one matrix: (E*blocks, out/blocks, prod(input dims))."""
    experts, neuron_dim = int(layout.startswith("experts_")), neuron_axis(layout)
    if len(shape) < experts + 2:
        raise ValueError(f"layout {layout!r} needs at least {experts + 2} dims, got a "
                         f"parameter of shape {tuple(shape)}")
    if not (isinstance(blocks, int) and blocks >= 1 and shape[neuron_dim] % blocks == 0):
        raise ValueError(f"blocks={blocks!r} must be an integer >= 1 that divides the "
                         f"{shape[neuron_dim]} neurons of a parameter of shape {tuple(shape)}")
    split = (*shape[:neuron_dim], blocks, shape[neuron_dim] // blocks, *shape[neuron_dim + 1:])
    batch = (*range(experts), neuron_dim)                 # expert dim, block dim
    inputs = tuple(d for d in range(len(split)) if d not in batch and d != neuron_dim + 1)
    return MatrixView(split_shape=split, order=(*batch, neuron_dim + 1, *inputs),
                      inputs_at=inputs, matrices=math.prod([split[d] for d in batch]),
                      neurons=split[neuron_dim + 1], inputs=math.prod([split[d] for d in inputs]),
                      moment_dims=(*range(experts), neuron_dim))


def neuron_axis(layout: str) -> int:
    """The dim of a parameter stored in `layout` that holds its output neurons."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return int(layout.startswith("experts_")) + int(layout.endswith("in_out"))


def group_view(group: dict, shape) -> MatrixView:
    return matrix_view(shape, group["layout"], group["blocks"])


def neuron_blocks(group: dict, shape) -> tuple[int, ...]:
    """Neurons of each block along a parameter's neuron dim, each block its own matrix:
    `split_sizes`, or `blocks` equal blocks."""
    if group["split_sizes"] is not None:
        return tuple(group["split_sizes"])
    neurons = shape[neuron_axis(group["layout"])]
    return (neurons // group["blocks"],) * group["blocks"]


def split_blocks(group: dict, param: Tensor, grad: Tensor,
                 state: dict) -> list[tuple[Tensor, Tensor, dict]]:
    """A parameter whose group has `split_sizes` as one (param, grad, state) triple per block,
    views into the parameter and its state (so stepping each block steps the parameter); any
    other as itself. (Equal `blocks` need no split: matrix_view batches them.)"""
    if group["split_sizes"] is None:
        return [(param, grad, state)]
    sizes, dim = list(group["split_sizes"]), neuron_axis(group["layout"])
    moment_dim = int(group["layout"].startswith("experts_"))   # v is (out,) or (E, out)
    pieces = zip(param.split(sizes, dim), grad.split(sizes, dim),
                 state["momentum_buffer"].split(sizes, dim),
                 state["second_moment"].split(sizes, moment_dim))
    return [(p, g, {"momentum_buffer": m, "second_moment": v}) for p, g, m, v in pieces]


def to_matrices(X: Tensor, view: MatrixView) -> Tensor:
    """X (a parameter's layout) as its (matrices, neurons, inputs) batch: a view for "out_in"."""
    return (X.reshape(view.split_shape).permute(view.order)
            .reshape(view.matrices, view.neurons, view.inputs))


def from_matrices(O: Tensor, view: MatrixView) -> Tensor:
    """The inverse of to_matrices: O (matrices, neurons, inputs) as a view of split_shape."""
    permuted = [view.split_shape[d] for d in view.order]
    return O.reshape(permuted).permute([view.order.index(d) for d in range(len(view.order))])


def learning_rate(group: dict) -> float | Tensor:
    """The group's lr: a float, or a 1-element tensor as a 0-dim one (torch recommends a tensor
    lr for compiled steps: changing its value never recompiles; a 0-dim CPU tensor also
    combines with parameters on any device)."""
    lr = group["lr"]
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def state_dtype(param: Tensor) -> torch.dtype:
    """float32 for low-precision parameters, the parameter's own dtype when wider."""
    return torch.promote_types(param.dtype, torch.float32)


# ----------------------------------------------------------------------------- the optimizer

class NorMuon(torch.optim.Optimizer):
    """NorMuon, Muon and AdamW in one optimizer: each param group picks its `algorithm`.

    Hidden weight matrices (and conv kernels) go in "normuon" (or "muon") groups; embeddings,
    the output head, gains, biases and scalars in an "adamw" group. `param_groups(model)`
    builds the two groups. See the module docstring for the math and every option.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, *,
                 algorithm: str = "normuon", momentum: float = 0.95, beta2: float = 0.95,
                 eps: float = 1e-8, nesterov: bool = True, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", adjust_lr: str = "match_rms_adamw",
                 betas: tuple[float, float] = (0.9, 0.95), layout: str = "out_in",
                 blocks: int = 1, split_sizes: list[int] | None = None,
                 cautious_weight_decay: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, algorithm=algorithm,
                        momentum=momentum, beta2=beta2, eps=eps, nesterov=nesterov,
                        ns_steps=ns_steps, orthogonalizer=orthogonalizer, adjust_lr=adjust_lr,
                        betas=betas, layout=layout, blocks=blocks, split_sizes=split_sizes,
                        cautious_weight_decay=cautious_weight_decay)
        # torch.optim's habit: a bad keyword is named whatever `params` is; each group is
        # checked again as it is added
        check_options(defaults, "NorMuon")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            check_param_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def matrix_state(self, param: Tensor, view: MatrixView) -> dict:
        state = self.state[param]
        if not state:
            dtype = state_dtype(param)
            momentum = torch.zeros_like(param, dtype=dtype,
                                        memory_format=torch.contiguous_format)
            state["momentum_buffer"] = momentum
            # zeros, one per neuron of every matrix, on the parameter's own expert and neuron
            # dims ((out,), (E, out)): a parameter sharded on dim 0 gets a v sharded alike
            other_dims = tuple(d for d in range(param.ndim) if d not in view.moment_dims)
            state["second_moment"] = momentum.sum(dim=other_dims)
        return state

    def adamw_state(self, param: Tensor) -> dict:
        state = self.state[param]
        if not state:
            dtype = state_dtype(param)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(
                param, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrix_groups, adamw_groups = [], []
        for index, group in enumerate(self.param_groups):
            kind = adamw_groups if group["algorithm"] == "adamw" else matrix_groups
            kind.append((group, params_with_grad(group, index)))
        # matrices first: if they raise (a sharded optimizer's ranks disagree), nothing has
        # been updated yet
        self._matrix_steps(matrix_groups)
        for group, params in adamw_groups:
            self._adamw_step(group, params)
        return loss

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            state = self.adamw_state(p)
            state["step"] += 1
            adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                         lr=learning_rate(group), betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"],
                         cautious=group["cautious_weight_decay"])

    def _matrix_steps(self, matrix_groups: list[tuple[dict, list[Tensor]]]) -> None:
        for group, params in matrix_groups:
            self._step_matrices(group, [
                block for p in params for block in split_blocks(
                    group, p, p.grad, self.matrix_state(p, group_view(group, p.shape)))])

    def _step_matrices(self, group: dict, matrices: list[tuple[Tensor, Tensor, dict]]) -> None:
        """Steps 1-7 for (param, grad, state) triples of plain tensors, batched by shape."""
        matrices = [x for x in matrices if x[0].numel() > 0]   # (0, n), (m, 0): no update
        if not matrices:
            return
        buckets: dict[tuple, list] = {}  # same-shape matrices orthogonalize as a batch
        for x in matrices:
            buckets.setdefault((x[0].shape, x[0].device, state_dtype(x[0])), []).append(x)
        # (max without default=: that keyword is a graph break under torch.compile)
        largest = max(working_set(group_view(group, x[0].shape)) for x in matrices)
        for (shape, device, dtype), bucket in buckets.items():
            size = batch_size(working_set(group_view(group, shape)), largest, device)
            for start in range(0, len(bucket), size):
                self._matrix_batch_step(group, bucket[start:start + size], dtype)

    def _matrix_batch_step(self, group: dict, batch: list[tuple[Tensor, Tensor, dict]],
                           dtype: torch.dtype) -> None:
        """Steps 1-7 for same-shape (param, grad, state) triples. (A method of its own so that
        its temporaries are freed before the next batch starts.)"""
        params, grads, states = zip(*batch)
        view = group_view(group, params[0].shape)
        k, m, n = view.matrices, view.neurons, view.inputs
        U_dtype = orthogonalizer_dtype(group["orthogonalizer"], dtype)
        # steps 1-2, in the dtype the orthogonalizer reads. (A cat, not U[i] = ... into an
        # empty batch: torch.compile turned that loop into chained scatters, which took a
        # quarter of a compiled step on an H100)
        directions = [to_matrices(nesterov_direction(state["momentum_buffer"], grad,
                                                     group["momentum"], group["nesterov"]
                                                     ).to(U_dtype), view)
                      for grad, state in zip(grads, states)]                  # each (k, m, n)
        U = torch.cat(directions) if len(directions) > 1 else directions[0]  # (P*k, m, n)
        O = orthogonalize(U, group["orthogonalizer"], group["ns_steps"])  # step 3, U's dtype
        second_moments = torch.cat([state["second_moment"].view(k, m) for state in states])
        row_scales, row_sq = neuron_step(O, second_moments, algorithm=group["algorithm"],
                                         beta2=group["beta2"], eps=group["eps"])  # steps 4-5
        sq_norms = matrix_sq_norms(row_scales, row_sq)                        # (P*k, 2)
        for i, (p, state) in enumerate(zip(params, states)):                  # steps 6-7
            mine = slice(i * k, (i + 1) * k)
            state["second_moment"].view(k, m).copy_(second_moments[mine])
            row_step = row_steps(row_scales[mine], sq_norms[mine], m, n, lr=learning_rate(group),
                                 adjust_lr=group["adjust_lr"])
            apply_update(p, O[mine], row_step, view, lr=learning_rate(group),
                         weight_decay=group["weight_decay"],
                         cautious=group["cautious_weight_decay"])

    def __setstate__(self, state: dict) -> None:
        """Groups saved before an option existed get its default (torch.optim's habit).

        Only NorMuon's own options: torch's `__setstate__` adds `differentiable` to `defaults`,
        and copying that into the groups would make a state dict differ after a round trip."""
        super().__setstate__(state)
        options = option_defaults()
        for key, value in options.items():   # a pickle saved before an option existed
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            upgrade_saved_group(group)
            for key in options:
                group.setdefault(key, self.defaults[key])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim casts loaded state to each parameter's dtype, which would round our
        float32 state of a bf16 parameter to bf16; put the saved tensors back as saved.

        A group saved before one of NorMuon's options existed keeps the value that option has
        in this optimizer's group (torch.optim would give it the default: a state dict from
        before `split_sizes` would silently undo the split the model is built with)."""
        saved_groups = [upgrade_saved_group(dict(g)) for g in state_dict["param_groups"]]
        for current, saved in zip(self.param_groups, saved_groups):
            for key in option_defaults():
                if key not in saved and key in current:
                    saved[key] = current[key]
        state_dict = {**state_dict, "param_groups": saved_groups}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)


def upgrade_saved_group(group: dict) -> dict:
    """A saved param group in today's terms, in place: before `layout` there was neuron_axis
    (1 for a weight stored (in, out))."""
    if "neuron_axis" in group:
        group.setdefault("layout", ("out_in", "in_out")[group.pop("neuron_axis")])
    return group


def option_defaults() -> dict:
    """NorMuon's options and their defaults, as its constructor's signature states them."""
    signature = inspect.signature(NorMuon.__init__).parameters.values()
    return {arg.name: arg.default for arg in signature if arg.name not in ("self", "params")}


def working_set(view: MatrixView) -> int:
    """Elements the orthogonalizer holds for a parameter's matrices: X and the r x r A and B."""
    m, n = view.neurons, view.inputs
    return view.matrices * (m * n + 2 * min(m, n) ** 2)


def batch_size(param_working_set: int, largest: int, device: torch.device) -> int:
    """How many same-shape parameters to orthogonalize as one batch. On a GPU a batch saves
    kernel launches, so the whole bucket; on a CPU batching saves nothing and its temporaries
    grow with it, so a batch's working set stays within that of the step's largest parameter
    (one matrix, or all of an experts tensor's), and so does the step's peak memory."""
    return 1 << 30 if device.type == "cuda" else max(1, largest // param_working_set)


def params_with_grad(group: dict, index: int) -> list[Tensor]:
    """The group's parameters that have a gradient this step; the others are not touched."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError(
                f"NorMuon: param group {index} has a sparse gradient for a parameter of shape "
                f"{tuple(p.shape)}; NorMuon needs dense gradients (use "
                f"nn.Embedding(sparse=False) or torch.optim.SparseAdam for it)")
    return params


def param_labels(group: dict) -> list[str]:
    """How error messages name each parameter of a group: by name where the group has names
    (param_groups gives them), else by shape."""
    names = group.get("param_names") or [None] * len(group["params"])
    return [f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
            for p, name in zip(group["params"], names)]


def requirement(where: str):
    """require(ok, message): raise ValueError(f"{where}: {message}") unless ok."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {message}")
    return require


def check_options(group: dict, where: str) -> None:
    """Raise a ValueError, prefixed by `where`, that names the bad option of `group` (the
    constructor's keywords, or a param group) and the fix."""
    require = requirement(where)
    algorithm = group["algorithm"]
    require(algorithm in ALGORITHMS, f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    require(group["orthogonalizer"] in ORTHOGONALIZERS,
            f"unknown orthogonalizer {group['orthogonalizer']!r}; choose one of {ORTHOGONALIZERS}")
    require(group["adjust_lr"] in ADJUST_LR,
            f"unknown adjust_lr {group['adjust_lr']!r}; choose one of {ADJUST_LR}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        require(lr.numel() == 1, f"Tensor lr must be 1-element (like torch.tensor(1e-3)), got "
                f"shape {tuple(lr.shape)}")
    require(lr >= 0, f"lr must be >= 0, got {lr}")
    require(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    require(0 <= group["momentum"] < 1, f"momentum must be in [0, 1), got {group['momentum']}")
    require(0 <= group["beta2"] < 1, f"beta2 must be in [0, 1), got {group['beta2']}")
    require(group["eps"] > 0, f"eps must be > 0, got {group['eps']}")
    require(isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1,
            f"ns_steps must be an integer >= 1, got {group['ns_steps']!r}")
    betas = group["betas"]
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
            f"betas must be two numbers in [0, 1), got {betas}")
    require("neuron_axis" not in group, "neuron_axis is now layout: 'in_out' for a weight "
            "stored (in, out, ...) such as Hugging Face's Conv1D, 'out_in' (the default) else")
    require(group["layout"] in LAYOUTS, f"unknown layout {group['layout']!r}; choose one of "
            f"{LAYOUTS}")
    require(isinstance(group["cautious_weight_decay"], bool),
            f"cautious_weight_decay must be True or False, got {group['cautious_weight_decay']!r}")
    sizes = group["split_sizes"]
    if sizes is not None:
        require(isinstance(sizes, (list, tuple)) and len(sizes) >= 1 and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes),
            f"split_sizes must be a list of neuron counts >= 1 (e.g. [D, D, D] for a fused "
            f"(3D, D) qkv), or None for one block; got {sizes!r}")
        require(group["blocks"] == 1, f"split_sizes and blocks={group['blocks']} both split "
                f"the neurons; give one of them")


def check_param_group(group: dict, index: int) -> None:
    """Raise a ValueError that names the bad option or parameter of param group `index` and
    the fix."""
    where = f"NorMuon param group {index}"
    check_options(group, where)
    require = requirement(where)
    algorithm = group["algorithm"]
    for p, label in zip(group["params"], param_labels(group)):
        require(not p.is_complex(), f"{label} is complex ({p.dtype}); NorMuon supports "
                f"real floating-point parameters only")
        require(algorithm == "adamw" or p.ndim >= 2,
                f"algorithm={algorithm!r} orthogonalizes matrices, but {label} has fewer "
                f"than 2 dims; put gains, biases and scalars in a group with "
                f"algorithm='adamw' (normuon.param_groups does this)")
        if algorithm != "adamw" and p.ndim >= 2:
            try:
                group_view(group, p.shape)
            except ValueError as error:
                require(False, f"{label}: {error}")
            sizes = group["split_sizes"]
            if sizes is not None:
                neurons = p.shape[neuron_axis(group["layout"])]
                require(sum(sizes) == neurons,
                        f"{label} has {neurons} neurons (dim {neuron_axis(group['layout'])} of "
                        f"shape {tuple(p.shape)}, layout={group['layout']!r}), but split_sizes "
                        f"{list(sizes)} sum to {sum(sizes)}; give blocks that sum to {neurons}")


# ----------------------------------------------------------------------------- param groups

# The output layer's conventional names, looked for among the model's children only: deeper
# in, the same names are hidden layers (BERT's attention.output.dense, a block's mlp.fc).
HEAD_NAMES = ("lm_head", "head", "heads", "output", "classifier", "score", "qa_outputs", "fc",
              "fc_out")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)                     # weights (out, in/g, k...)
# weights (in, out/g, k...)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
# Experts modules that do not say how they store their weights (transformers' decorated ones
# carry `is_transposed`): Llama 4's bmm's x @ W with W (E, in, out); torchtitan's
# GroupedExperts stores (E, out, in).
EXPERT_LAYOUTS = {"Llama4TextExperts": "in_out", "GroupedExperts": "out_in"}
# Children that score experts, when the router is a plain layer beside an experts module
ROUTER_NAMES = ("gate", "router")


def is_experts(module: nn.Module) -> bool:
    """A module holding stacked expert weights: it counts its experts (`num_experts`, as
    transformers' and torchtitan's do) and owns a >= 3-D parameter with one slice per expert."""
    count = getattr(module, "num_experts", None)
    return isinstance(count, int) and any(
        p.ndim >= 3 and p.shape[0] == count for p in module.parameters(recurse=False))


def is_router(module: nn.Module, parent: nn.Module | None, name: str) -> bool:
    """The layer that scores experts: a module that counts experts but holds none (Mixtral's
    TopKRouter, Llama 4's Router, an nn.Linear subclass), or a child named gate/router of a
    module that has an experts child (torchtitan's, Qwen2-MoE-style gates)."""
    if isinstance(getattr(module, "num_experts", None), int):   # (an MoE block counts them too)
        return not any(is_experts(m) for m in module.modules())
    return (parent is not None and name.rsplit(".", 1)[-1] in ROUTER_NAMES
            and any(is_experts(child) for child in parent.children()))


def expert_layout(module: nn.Module, name: str, overrides: dict[str, str]) -> str:
    """'out_in' or 'in_out' for expert parameter `name` of experts `module`: an override whose
    fnmatch pattern matches the name, else what the module says (is_transposed), else the
    known table; a module that says nothing and is not known is taken as (E, out, in) with a
    warning naming the override."""
    for pattern, layout in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return layout
    if isinstance(getattr(module, "is_transposed", None), bool):
        return "in_out" if module.is_transposed else "out_in"
    if type(module).__name__ in EXPERT_LAYOUTS:
        return EXPERT_LAYOUTS[type(module).__name__]
    warnings.warn(
        f"param_groups: {type(module).__name__} ({name}) does not say whether its experts are "
        f"stored (E, out, in) or (E, in, out); taking (E, out, in). If it is (E, in, out), pass "
        f"expert_layouts={{{name!r}: 'in_out'}} (fnmatch patterns of parameter names)",
        stacklevel=3)
    return "out_in"


def weight_layout(module: nn.Module, name: str) -> tuple[str, int] | None:
    """If `module`'s own parameter `name` is the weight of a linear or convolution layer (a
    hidden matrix unless it is the head), its (layout, blocks) for matrix_view; else None.
    (Experts are found by is_experts, which needs the model's override.)"""
    if isinstance(module, (nn.Linear, *CONVOLUTIONS)):
        return ("out_in", getattr(module, "groups", 1)) if name == "weight" else None
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        # a grouped one's groups split its inputs (dim 0) and its neurons (dim 1) together:
        # no batch of neuron blocks, so matrix_view cannot express it (blocks=0 says so)
        return ("in_out", 1 if module.groups == 1 else 0) if name == "weight" else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return ("in_out", 1) if name == "weight" else None  # Hugging Face's GPT-2-family linear
    if isinstance(module, nn.MultiheadAttention):
        return ("out_in", 1) if name in ATTENTION_PROJECTIONS else None  # out_proj: nn.Linear
    if isinstance(module, nn.RNNBase):
        return ("out_in", 1) if name.startswith("weight_") else None  # weight_ih_l0, ...
    return None


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers (whose only child is
    `module`), so that its head is found and its names are its own."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def last_layer(head: nn.Module) -> nn.Module:
    """A head that is a container (torchvision's classifier = Sequential(Linear, ReLU, ...,
    Linear)) is its last module with parameters of its own: the layers before it are hidden."""
    with_params = [m for m in head.modules() if any(True for _ in m.parameters(recurse=False))]
    return with_params[-1] if with_params else head


def find_head(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The model's output layers: what its own accessor returns (Hugging Face's
    get_output_embeddings(), timm's get_classifier(), which may return several: a distilled
    model's (head, head_dist)), else its children with a conventional head name; each reduced
    to its last layer with parameters. Returns (heads, what was looked at, for a warning)."""
    looked = []
    for accessor in ("get_output_embeddings", "get_classifier"):
        method = getattr(model, accessor, None)
        if not callable(method):
            continue
        try:
            found = method()
        except NotImplementedError:
            found = None
        items = found if isinstance(found, (tuple, list)) else [found]
        heads = [last_layer(m) for m in items
                 if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
        if heads:
            return heads, looked
        looked.append(f"{accessor}() returned "
                      f"{' and '.join(type(m).__name__ for m in items)} (no parameters)")
    heads = [last_layer(child) for name, child in model.named_children()
             if name in HEAD_NAMES and any(True for _ in child.parameters())]
    return heads, looked + [f"no child named one of {HEAD_NAMES}"]


def no_decay_patterns(model: nn.Module) -> list[str]:
    """fnmatch patterns of the parameters that the model exempts from weight decay itself: what
    any of its modules lists in no_weight_decay() (timm's convention: names or patterns like
    'pos_embed.*', relative to that module), and parameters flagged _no_weight_decay (Mamba's)."""
    patterns = [name for name, p in model.named_parameters()
                if getattr(p, "_no_weight_decay", False)]
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            patterns.extend(f"{prefix}.{name}" if prefix else name for name in listed())
    return patterns


def is_gain_shaped(p: Tensor, experts: int | None) -> bool:
    """At most one dim larger than 1 (a gain, bias or scalar: (C,), (C, 1, 1), (1, 1, C)),
    not counting the expert dim of an experts module's per-expert biases (E, C)."""
    shape = p.shape[1:] if experts is not None and p.ndim >= 2 and p.shape[0] == experts \
        else p.shape
    return sum(size > 1 for size in shape) <= 1


def route(model: nn.Module, head=None, expert_layouts: dict[str, str] | None = None):
    """Where param_groups puts each trainable parameter: yields (name, parameter, kind, reason)
    with kind ("matrix", layout, blocks), "decay" or "no_decay". The rules, in order:
    what the model lists in no_weight_decay() -> no decay; the head, embeddings and routers ->
    AdamW (gain-shaped ones without decay); layer weights and experts -> a matrix group, unless
    one of their matrices has fewer than 2 neurons or inputs (depthwise convs, (1, n)
    weights) -> AdamW; other gain-shaped parameters -> no decay; the rest (free parameters:
    tokens, position embeddings, tables) -> AdamW."""
    model = unwrapped(model)
    modules = dict(model.named_modules())
    if head is None:
        heads, looked = find_head(model)
        if not heads:
            warnings.warn(
                f"param_groups: found no output head in {type(model).__name__} "
                f"({'; '.join(looked)}), so every linear layer is treated as hidden; pass "
                f"head=<module or name> if the model has an output layer, or head=() if it "
                f"has none", stacklevel=3)
    else:
        heads = head if isinstance(head, (list, tuple)) else [head]
    special = {}   # id -> reason, for the parameters that go to AdamW whatever their shape
    for item in heads:
        if isinstance(item, str) and item not in modules:
            item = model.get_parameter(item)   # raises, naming it, if it is neither
        elif isinstance(item, str):
            item = modules[item]
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            special[id(p)] = "head"
    layouts, experts_of = {}, {}   # id -> (layout, blocks), id -> its module's expert count
    for module_name, module in modules.items():
        parent = modules.get(module_name.rpartition(".")[0]) if module_name else None
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):   # also when tied to a Linear
            for p in module.parameters():
                special.setdefault(id(p), "embedding")
        elif is_router(module, parent, module_name):
            for p in module.parameters():
                special.setdefault(id(p), "router")
        experts = is_experts(module)
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if experts:
                experts_of[id(p)] = module.num_experts
                if p.ndim >= 3 and p.shape[0] == module.num_experts:
                    side = expert_layout(module, full, expert_layouts or {})
                    layouts.setdefault(id(p), (f"experts_{side}", 1))
            elif (layout := weight_layout(module, name)) is not None and p.ndim >= 2:
                layouts.setdefault(id(p), layout)
    exempt = no_decay_patterns(model)

    for name, p in model.named_parameters():   # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        gain = is_gain_shaped(p, experts_of.get(id(p)))
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exempt):
            yield name, p, "no_decay", "listed in no_weight_decay()"
        elif id(p) in special:
            yield name, p, "no_decay" if gain else "decay", special[id(p)]
        elif id(p) in layouts:
            layout, blocks = layouts[id(p)]
            if blocks == 0:
                yield name, p, "decay", "grouped transposed conv"
                continue
            view = matrix_view(p.shape, layout, blocks)
            if min(view.neurons, view.inputs) >= 2:
                yield name, p, ("matrix", layout, blocks), (
                    "experts" if layout.startswith("experts_") else "hidden")
            else:
                yield name, p, "decay", ("depthwise conv" if blocks > 1 and view.neurons == 1
                                         else "fewer than 2 neurons or inputs")
        else:
            yield name, p, "no_decay" if gain else "decay", (
                "gain, bias or scalar" if gain else "free parameter")


def param_groups(model: nn.Module, head=None, algorithm: str = "normuon",
                 expert_layouts: dict[str, str] | None = None,
                 split_sizes: dict[str, list[int]] | None = None,
                 **adamw_options) -> list[dict]:
    """Split a model's trainable parameters into the groups NorMuon wants (see `route` for the
    rules, the README for why).

    Hidden matrices -> `algorithm` ("normuon"): the weights of nn.Linear, nn.Conv*d and
    nn.ConvTranspose*d, Hugging Face's Conv1D (recognised by name, without importing
    transformers), the projections of nn.MultiheadAttention and RNNs, and MoE expert weights
    (E, out, in) or (E, in, out), each expert its own matrix. One group per (layout, blocks):
    a grouped conv steps group by group, a weight stored (in, out) as its transpose.
    Everything else -> "adamw": embeddings, the head(s), routers, free parameters (ViT's cls
    token and position embeddings, Mamba's A_log, bias tables), degenerate matrices (depthwise
    convs), gains, biases and scalars. Gain-shaped parameters and what the model lists in
    no_weight_decay() (fnmatch patterns) form an adamw group with weight_decay=0.

    The head is `head` — a module, a parameter, a (module or parameter) name, a list of these,
    or () for a model without one — or by default what find_head() finds; if it finds none, a
    warning says what it looked at. DDP / DataParallel wrappers are looked through (names are
    the wrapped model's). `expert_layouts` maps fnmatch patterns of expert parameter names to
    "out_in" / "in_out", for experts modules that do not say (a warning asks for it).
    `split_sizes` maps fnmatch patterns of hidden matrices' names to their neurons per block
    (a fused projection's q, k, v: see the README for nn.MultiheadAttention, GPT-2's c_attn
    and timm's qkv); the matching matrices get a group of their own with that `split_sizes`,
    and a pattern that matches no hidden matrix raises a ValueError.
    `adamw_options` (lr=..., weight_decay=..., betas=...) go into the adamw groups only.
    Parameters keep their names, and each group lists why each is there (`routing`):
    describe_param_groups() prints it.
    """
    matrices, decay, no_decay = {}, [], []
    split_sizes, unused = split_sizes or {}, set(split_sizes or ())
    for name, p, kind, reason in route(model, head, expert_layouts):
        target = {"decay": decay, "no_decay": no_decay}.get(kind)
        if target is None:
            sizes = next((tuple(s) for pattern, s in split_sizes.items()
                          if fnmatch.fnmatchcase(name, pattern)), None)
            unused -= {pattern for pattern in split_sizes if fnmatch.fnmatchcase(name, pattern)}
            target = matrices.setdefault((*kind[1:], sizes), [])
        target.append((name, p, reason))
    if unused:
        raise ValueError(f"param_groups: split_sizes patterns {sorted(unused)} match no hidden "
                         f"matrix of {type(unwrapped(model)).__name__}; print("
                         f"describe_param_groups(param_groups(model))) lists their names")
    groups = [{"params": params, "algorithm": algorithm, "layout": layout, "blocks": blocks,
               **({"split_sizes": list(sizes)} if sizes else {})}
              for (layout, blocks, sizes), params in sorted(
                  matrices.items(), key=lambda item: (item[0][:2], item[0][2] or ()))]
    groups.append({"params": decay, "algorithm": "adamw", **adamw_options})
    groups.append({"params": no_decay, "algorithm": "adamw", **adamw_options, "weight_decay": 0.0})
    for group in groups:
        group["routing"] = [reason for _, _, reason in group["params"]]
        group["params"] = [(name, p) for name, p, _ in group["params"]]
    return [g for g in groups if g["params"]]


def describe_param_groups(groups: list[dict]) -> str:
    """One line per group — its algorithm and settings, how many tensors and elements, and
    their names with layer indices folded (h.*.attn.c_attn.weight), under the reason each is
    there where it is not the group's plain kind (head, router, depthwise conv, listed in
    no_weight_decay(), ...) — to check at a glance that a model is routed as expected:
    print(describe_param_groups(param_groups(model))). Takes param_groups()'s output or an
    optimizer's param_groups."""
    lines = []
    for index, group in enumerate(groups):
        entries = list(group["params"])
        if entries and isinstance(entries[0], tuple):      # (name, parameter) pairs
            names, params = [e[0] for e in entries], [e[1] for e in entries]
        else:
            params = entries
            names = group.get("param_names") or [f"<{tuple(p.shape)}>" for p in params]
        settings = [group.get("algorithm", "normuon")]
        if group.get("layout", "out_in") != "out_in":
            settings.append({"in_out": "stored (in, out)",
                             "experts_out_in": "experts (E, out, in)",
                             "experts_in_out": "experts (E, in, out)"}[group["layout"]])
        if group.get("blocks", 1) != 1:
            settings.append(f"{group['blocks']} blocks")
        if group.get("split_sizes") is not None:
            settings.append(f"blocks of {list(group['split_sizes'])} neurons")
        if group.get("cautious_weight_decay"):
            settings.append("cautious weight decay")
        if "weight_decay" in group:
            settings.append(f"weight_decay={group['weight_decay']}")
        reasons = group.get("routing") or [""] * len(names)
        plain = {"hidden", "experts", "gain, bias or scalar", ""}
        by_reason: dict[str, list[str]] = {}
        for name, reason in zip(names, reasons):
            folded = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            by_reason.setdefault("" if reason in plain else reason, []).append(folded)
        parts = []
        for reason, folded in by_reason.items():
            folded = list(dict.fromkeys(folded))
            shown = ", ".join(folded[:8]) + (f", ... ({len(folded) - 8} more)"
                                              if len(folded) > 8 else "")
            parts.append(f"{reason}: {shown}" if reason else shown)
        elements = sum(p.numel() for p in params)
        lines.append(f"group {index} ({', '.join(settings)}): {len(params)} tensors, "
                     f"{elements:,} elements: {'; '.join(parts)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- demo
# python normuon.py: both halves of the paper's claim on a problem small enough for a class's
# laptops. The larger comparison (a GPT, 5 held-out seeds) is bench/compare_optimizers.py.

# Each optimizer's lr: the best of DEMO_LR_SWEEP on seed 0, which is never reported
# (`python normuon.py --sweep` chooses again). Measured on 2 CPU cores, 300 steps, 2026-12-02.
DEMO_LR_SWEEP = (5e-3, 1e-2, 2e-2, 4e-2)
DEMO_LRS = {"muon": 2e-2, "normuon": 2e-2}
DEMO_NAMES = {"muon": "Muon", "normuon": "NorMuon"}
# the MLP: inputs -> hidden -> hidden -> classes. Hidden 128, not 256: a bf16 256x256 matmul
# is ~100x slower than float32 on a CPU without bf16 units; 128 keeps the demo within a minute
DEMO_INPUTS, DEMO_HIDDEN, DEMO_CLASSES = 32, 128, 10
# two-sided 95% quantiles of Student's t by degrees of freedom; beyond 10, 10's (conservative)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of `values` and its 95% Student's t interval (low, high)."""
    n, mean = len(values), statistics.mean(values)
    if n < 2:
        return mean, -math.inf, math.inf
    half = T_975[min(n - 1, 10)] * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def demo_task(n_samples: int = 32768):
    """A fixed classification task (the same for every seed): labels from a random teacher MLP,
    inputs at scales from 0.03 to 3, so that the first layer's neurons see unequal gradients."""
    generator = torch.Generator().manual_seed(1000)
    feature_scale = torch.logspace(-1.5, 0.5, DEMO_INPUTS)
    X = torch.randn(n_samples, DEMO_INPUTS, generator=generator) * feature_scale   # (N, in)
    teacher = nn.Sequential(nn.Linear(DEMO_INPUTS, 64), nn.Tanh(), nn.Linear(64, DEMO_CLASSES))
    for w in teacher.parameters():
        nn.init.normal_(w, std=w.shape[-1] ** -0.5, generator=generator)
    with torch.no_grad():
        y = teacher(X / feature_scale).argmax(dim=1)                         # (N,)
    return X[1024:], y[1024:], X[:1024], y[:1024]                           # train, val


def demo_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DEMO_INPUTS, DEMO_HIDDEN), nn.ReLU(),
                         nn.Linear(DEMO_HIDDEN, DEMO_HIDDEN), nn.ReLU(),
                         nn.Linear(DEMO_HIDDEN, DEMO_CLASSES))


def demo_run(algorithm: str, lr: float, seed: int, steps: int, task) -> dict:
    """Train one model; the first layer's update row norms at every step, (steps, hidden)."""
    X, y, X_val, y_val = task
    model = demo_model(seed)
    opt = NorMuon(param_groups(model, head=model[4], algorithm=algorithm), lr=lr,
                  weight_decay=0.01)
    first_layer = model[0].weight                     # (hidden, n_in): a tall matrix
    batches = torch.Generator().manual_seed(seed)
    row_norms = []
    for _ in range(steps):
        batch = torch.randint(0, len(X), (256,), generator=batches)
        loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        before = first_layer.detach().clone()
        opt.step()
        row_norms.append((first_layer.detach() - before).norm(dim=1))
    with torch.no_grad():
        val_loss = nn.functional.cross_entropy(model(X_val), y_val).item()
    return {"val_loss": val_loss, "row_norms": torch.stack(row_norms)}


def row_norm_spread(row_norms: Tensor) -> tuple[float, float]:
    """Coefficient of variation and max/min of each step's row norms, averaged over steps."""
    cv = row_norms.std(dim=1) / row_norms.mean(dim=1)                         # (steps,)
    ratio = row_norms.amax(dim=1) / row_norms.amin(dim=1)                     # (steps,)
    return cv.mean().item(), ratio.mean().item()


def choose_demo_lrs(steps: int, task) -> dict[str, float]:
    lrs = {}
    for algorithm in DEMO_LRS:
        losses = {lr: demo_run(algorithm, lr, 0, steps, task)["val_loss"] for lr in DEMO_LR_SWEEP}
        print(f"seed 0, {algorithm} val loss by lr: "
              + ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in losses.items()))
        lrs[algorithm] = min(losses, key=losses.get)
    return lrs


def demo_verdict(low: float, high: float) -> str:
    """What the 95% interval (low, high) of NorMuon's minus Muon's val loss says."""
    if high < 0:
        return "NorMuon's val loss is lower, told apart from seed noise"
    if low > 0:
        return "NorMuon's val loss is HIGHER here, told apart from seed noise"
    return ("the val losses are NOT told apart from seed noise (the interval holds 0):\n"
            "   this problem does not show that evening out the rows trains better")


def plot_row_norms(runs: dict[str, dict], path: str) -> None:
    """The paper's Figure 1: the last step's per-neuron update norms, sorted, of both."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run in runs.items():
        norms = run["row_norms"][-1]
        ax.plot(norms.sort(descending=True).values / norms.mean(), label=DEMO_NAMES[name])
    ax.set(xlabel="neuron of the first layer (sorted)", ylabel="update row norm / mean",
           title="Per-neuron update norms at the last step (first seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def demo(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Muon's unequal neuron updates, NorMuon's "
                                     "equal ones, and whether that changes the loss here.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="reported seeds (seed 0 chooses the lrs)")
    parser.add_argument("--sweep", action="store_true", help="choose the lrs again on seed 0")
    parser.add_argument("--plot", metavar="PNG", nargs="?", const="neuron_norms_demo.png",
                        help="draw the per-neuron update norms (needs matplotlib)")
    args = parser.parse_args(argv)
    if 0 in args.seeds:
        parser.error("seed 0 chooses the learning rates: report other seeds")
    task = demo_task()
    lrs = choose_demo_lrs(args.steps, task) if args.sweep else DEMO_LRS
    print(f"{DEMO_INPUTS}->{DEMO_HIDDEN}->{DEMO_HIDDEN}->{DEMO_CLASSES} MLP, {args.steps} steps "
          f"of batch 256; lr (AdamW scale, chosen on seed 0) Muon {lrs['muon']:g}, "
          f"NorMuon {lrs['normuon']:g}; seeds {args.seeds}")
    runs = {name: [demo_run(name, lrs[name], seed, args.steps, task) for seed in args.seeds]
            for name in DEMO_NAMES}

    # per run: (row-norm CV, row-norm max/min, val loss)
    stats = {name: [(*row_norm_spread(run["row_norms"]), run["val_loss"]) for run in runs[name]]
             for name in runs}
    print(f"{'mean over seeds [min, max]':33s}" + "".join(f"{DEMO_NAMES[n]:>26s}" for n in runs))
    labels = ("first-layer update rows: CV", "first-layer update rows: max/min", "val loss")
    for index, label in enumerate(labels):
        cells = []
        for name in runs:
            values = [run_stats[index] for run_stats in stats[name]]
            cells.append(f"{statistics.mean(values):.4f} [{min(values):.4f}, {max(values):.4f}]")
        print(f"{label:33s}" + "".join(f"{cell:>26s}" for cell in cells))

    differences = [n["val_loss"] - m["val_loss"] for m, n in zip(runs["muon"], runs["normuon"])]
    mean, low, high = t_interval(differences)
    print(f"NorMuon - Muon val loss, paired by seed: "
          + ", ".join(f"{d:+.4f}" for d in differences)
          + f"; mean {mean:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]")
    print("1. Muon gives every singular direction the same step, not every neuron: the rows of a\n"
          "   tall matrix's update differ several-fold. NorMuon divides each row by its RMS.")
    print(f"2. {demo_verdict(low, high)}.\n   The GPT comparison on held-out seeds: "
          "bench/compare_optimizers.py (bench/RESULTS.md).")
    if args.plot:
        plot_row_norms({name: runs[name][0] for name in runs}, args.plot)


if __name__ == "__main__":
    demo()
