"""NorMuon: Muon's orthogonalized momentum, with every output neuron normalized by its own
running second moment (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable",
arXiv 2510.05491). One file that depends on nothing but torch: copy it into your project.

    from normuon import NorMuon, param_groups
    opt = NorMuon(param_groups(model), lr=4e-3, weight_decay=0.1)   # 2-4x AdamW's lr

    python normuon.py            # 30-second CPU demo: Muon's unequal neuron updates vs NorMuon's

For one hidden weight W (m, n) with gradient G — a >2-D weight is viewed as
(shape[0], prod(shape[1:])) so that a neuron is an output channel — each step does, in the
numbered steps that the code's comments (here and in distributed.py) refer to:

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
    adjust_lr     "match_rms_adamw": lr_hat = 0.2*lr*sqrt(m*n)/|O^|_F (the paper's rule).
                  "original": O^ rescaled to |O|_F, then lr_hat = lr*sqrt(max(1, m/n)) (Muon's).
    betas         AdamW's (b1, b2) in adamw groups ((0.9, 0.95)).
    neuron_axis   the dim of the weight that indexes output neurons (0). nn.Linear and convs
                  store (out, in, ...): 0. A weight stored (in, out, ...) — Hugging Face's
                  Conv1D, nn.ConvTranspose — needs 1: it is stepped as its (out, in*...) matrix,
                  so that output neurons are what steps 4-5 normalize and the "original" shape
                  factor sees (out, in). param_groups sets it for those layers.

State (momentum_buffer, second_moment, exp_avg, exp_avg_sq) is float32 for bf16/fp16/fp32
parameters, float64 for float64 ones, and stays so through state_dict()/load_state_dict().
A NaN or inf in a gradient makes that parameter non-finite and no other, as in torch.optim,
with every orthogonalizer; a matrix with a zero-size dim steps as nothing.
Same-shape matrices are orthogonalized as one batch: on a GPU the whole bucket (fewer kernel
launches); on a CPU a batch no bigger than the step's largest matrix, so that a step's extra
memory is about 7 bytes per element of that one matrix (torch.optim.Muon's: about 9).
"""
import copy
import math
import re
import warnings

import torch
from torch import Tensor, nn

ALGORITHMS = ("normuon", "muon", "adamw")
ORTHOGONALIZERS = ("newton_schulz", "polar_express", "svd")
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


# ----------------------------------------------------------------------------- orthogonalizers

def _odd_polynomial_iteration(U: Tensor, coefficients, input_scale: float) -> Tensor:
    """X <- a*X + (b*A + c*A^2) X with A = X X^T, in bf16, on U (..., m, n) / (scale*|U|_F).

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
    # are far slower on a CPU)
    X = torch.mul(X, power, out=X.new_empty(X.shape))
    batch_shape, X = X.shape[:-2], X.reshape(-1, *X.shape[-2:])       # (B, m, n)
    r = min(X.shape[-2:])
    A = X.new_empty(X.shape[0], r, r)                                 # (B, r, r)
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


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` iterations on an (m, n) matrix: with r = min, c = max,
    X X^T (2 r^2 c), A A (2 r^3) and B X (2 r^2 c) per iteration."""
    r, c = min(m, n), max(m, n)
    return steps * (4 * r * r * c + 2 * r ** 3)


def newton_schulz(U: Tensor, steps: int = 5) -> Tensor:
    """Muon's quintic Newton-Schulz iteration on a batch (..., m, n)."""
    return _odd_polynomial_iteration(U, [NEWTON_SCHULZ_COEFFICIENTS] * steps, 1.0)


def polar_express(U: Tensor, steps: int = 5) -> Tensor:
    """Polar Express on a batch (..., m, n); singular values end near 1."""
    coefficients = [POLAR_EXPRESS_COEFFICIENTS[min(i, 4)] for i in range(steps)]
    return _odd_polynomial_iteration(U, coefficients, 1.02)


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
    if orthogonalizer == "newton_schulz":
        return newton_schulz(U, steps)
    if orthogonalizer == "polar_express":
        return polar_express(U, steps)
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
    """Steps 4-5 on O (..., m, n): returns (row_scale, sq_norms), where
    O^ = O * row_scale[..., None] and sq_norms (..., 2) = (|O^|_F^2, |O|_F^2), the squared norms
    that step 6 divides by.

    For "normuon", v = second_moment (..., m) is updated in place (no bias correction) and
    row_scale = 1/(sqrt(v) + eps); for "muon", row_scale = 1. O is only read, and O^ is never
    formed: apply_update folds row_scale into its one pass over W. (Forming O^ took a float32
    copy of O, the size of the step's largest temporary, and two more passes over it.)

    Each row is normalized on its own, so rows of O may be split across ranks; the norms are
    then each rank's share, and their sum over ranks is the whole matrix's (step 6 needs it).
    """
    row_sq = torch.linalg.vector_norm(O, dim=-1, dtype=second_moment.dtype).square()  # (..., m)
    if algorithm == "normuon":
        second_moment.lerp_(row_sq / O.size(-1), 1 - beta2)   # step 4: v_i <- EMA of mean(O_i^2)
        row_scale = 1 / (second_moment.sqrt() + eps)          # step 5
    else:
        row_scale = torch.ones_like(row_sq)
    sq_norms = torch.stack([(row_sq * row_scale.square()).sum(-1), row_sq.sum(-1)], dim=-1)
    return row_scale, sq_norms


def update_scale(O_hat_sq_norm: Tensor, O_sq_norm: Tensor, m: int, n: int,
                 adjust_lr: str) -> Tensor:
    """Step 6: lr_hat/lr, the factor that multiplies O^ (and, in "original" mode, rescales it),
    from the whole matrix's squared norms."""
    O_hat_norm = O_hat_sq_norm.sqrt().clamp_min(NORM_FLOOR)
    if adjust_lr == "match_rms_adamw":
        return (0.2 * math.sqrt(m * n)) / O_hat_norm       # every update has RMS 0.2*lr
    if adjust_lr == "original":
        return O_sq_norm.sqrt() / O_hat_norm * math.sqrt(max(1.0, m / n))
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; choose one of {ADJUST_LR}")


def apply_update(param: Tensor, O: Tensor, row_scale: Tensor, sq_norms: Tensor, m: int, n: int,
                 *, lr: float | Tensor, weight_decay: float, adjust_lr: str,
                 neuron_axis: int = 0) -> None:
    """Steps 6-7 for one matrix: W <- W - lr*wd*W - lr_hat*O^ with O^ = O * row_scale[:, None]
    (neuron_step's), where sq_norms (2,) are the whole matrix's (|O^|^2, |O|^2) and param,
    O (neurons, n) and row_scale (neurons,) hold the same neurons (all, or a shard's)."""
    scale = update_scale(sq_norms[0], sq_norms[1], m, n, adjust_lr)
    row_step = row_scale * (-lr * scale)                 # (neurons,): -lr_hat / (sqrt(v_i) + eps)
    param.mul_(1 - lr * weight_decay)
    param.addcmul_(from_neuron_rows(O, param.shape, neuron_axis),   # one pass, reading O as is
                   row_step.view([-1 if d == neuron_axis else 1 for d in range(param.ndim)]))


def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                 *, lr: float | Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
    """One AdamW step in place (the math of torch.optim.AdamW); step counts from 1."""
    beta1, beta2 = betas
    grad = grad.to(exp_avg.dtype)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denominator = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.mul_(1 - lr * weight_decay)
    param.sub_((exp_avg / denominator).mul_(lr / bias_correction1))


def as_matrix_shape(shape: torch.Size, neuron_axis: int = 0) -> tuple[int, int]:
    """(m, n) = (neurons, inputs per neuron) of a weight whose output neurons lie along
    `neuron_axis`: (out, in, kh, kw) -> (out, in*kh*kw); a Conv1D's (in, out), axis 1 -> (out, in).
    """
    return shape[neuron_axis], math.prod(shape[:neuron_axis]) * math.prod(shape[neuron_axis + 1:])


def to_neuron_rows(X: Tensor, neuron_axis: int) -> Tensor:
    """X (any layout) as its (m, n) matrix with one neuron per row: a view for axis 0."""
    m, n = as_matrix_shape(X.shape, neuron_axis)
    return X.movedim(neuron_axis, 0).reshape(m, n)


def from_neuron_rows(O: Tensor, shape: torch.Size, neuron_axis: int) -> Tensor:
    """The inverse of to_neuron_rows: O (m, n) laid out as a tensor of `shape`."""
    moved = (shape[neuron_axis], *shape[:neuron_axis], *shape[neuron_axis + 1:])
    return O.view(moved).movedim(0, neuron_axis)


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
                 betas: tuple[float, float] = (0.9, 0.95), neuron_axis: int = 0):
        defaults = dict(lr=lr, weight_decay=weight_decay, algorithm=algorithm,
                        momentum=momentum, beta2=beta2, eps=eps, nesterov=nesterov,
                        ns_steps=ns_steps, orthogonalizer=orthogonalizer, adjust_lr=adjust_lr,
                        betas=betas, neuron_axis=neuron_axis)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            check_param_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def matrix_state(self, param: Tensor, neuron_axis: int = 0) -> dict:
        state = self.state[param]
        if not state:
            dtype = state_dtype(param)
            momentum = torch.zeros_like(param, dtype=dtype,
                                        memory_format=torch.contiguous_format)
            state["momentum_buffer"] = momentum
            # (m,) zeros, one per neuron, laid out like them: a row-sharded parameter gets a
            # sharded v
            other_dims = tuple(d for d in range(param.ndim) if d != neuron_axis)
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
                         weight_decay=group["weight_decay"])

    def _matrix_steps(self, matrix_groups: list[tuple[dict, list[Tensor]]]) -> None:
        for group, params in matrix_groups:
            self._step_matrices(group, [(p, p.grad, self.matrix_state(p, group["neuron_axis"]))
                                        for p in params])

    def _step_matrices(self, group: dict, matrices: list[tuple[Tensor, Tensor, dict]]) -> None:
        """Steps 1-7 for (param, grad, state) triples of plain tensors, batched by shape."""
        matrices = [x for x in matrices if x[0].numel() > 0]   # (0, n), (m, 0): no update
        if not matrices:
            return
        buckets: dict[tuple, list] = {}  # same-shape matrices orthogonalize as a batch
        for x in matrices:
            buckets.setdefault((x[0].shape, x[0].device, state_dtype(x[0])), []).append(x)
        axis = group["neuron_axis"]
        # (max without default=: that keyword is a graph break under torch.compile)
        largest = max(working_set(*as_matrix_shape(x[0].shape, axis)) for x in matrices)
        for (shape, device, dtype), bucket in buckets.items():
            size = batch_size(working_set(*as_matrix_shape(shape, axis)), largest, device)
            for start in range(0, len(bucket), size):
                self._matrix_batch_step(group, bucket[start:start + size], dtype)

    def _matrix_batch_step(self, group: dict, batch: list[tuple[Tensor, Tensor, dict]],
                           dtype: torch.dtype) -> None:
        """Steps 1-7 for same-shape (param, grad, state) triples. (A method of its own so that
        its temporaries are freed before the next batch starts.)"""
        axis = group["neuron_axis"]
        params, grads, states = zip(*batch)
        m, n = as_matrix_shape(params[0].shape, axis)
        U_dtype = orthogonalizer_dtype(group["orthogonalizer"], dtype)
        # steps 1-2, in the dtype the orthogonalizer reads. (A stack, not U[i] = ... into an
        # empty batch: torch.compile turned that loop into chained scatters, which took a
        # quarter of a compiled step on an H100)
        directions = [to_neuron_rows(nesterov_direction(state["momentum_buffer"], grad,
                                                        group["momentum"], group["nesterov"]
                                                        ).to(U_dtype), axis)
                      for grad, state in zip(grads, states)]
        U = torch.stack(directions) if len(directions) > 1 else directions[0][None]  # (k, m, n)
        O = orthogonalize(U, group["orthogonalizer"], group["ns_steps"])  # step 3, U's dtype
        second_moments = torch.stack([state["second_moment"] for state in states])  # (k, m)
        row_scales, sq_norms = neuron_step(O, second_moments, algorithm=group["algorithm"],
                                           beta2=group["beta2"], eps=group["eps"])  # steps 4-5
        for i, (p, state) in enumerate(zip(params, states)):                  # steps 6-7
            state["second_moment"].copy_(second_moments[i])
            apply_update(p, O[i], row_scales[i], sq_norms[i], m, n, lr=learning_rate(group),
                         weight_decay=group["weight_decay"], adjust_lr=group["adjust_lr"],
                         neuron_axis=axis)

    def __setstate__(self, state: dict) -> None:
        """Groups saved before an option existed get its default (torch.optim's habit)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim casts loaded state to each parameter's dtype, which would round our
        float32 state of a bf16 parameter to bf16; put the saved tensors back as saved."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)


def working_set(m: int, n: int) -> int:
    """Elements the orthogonalizer holds per (m, n) matrix: X and the r x r A and B."""
    return m * n + 2 * min(m, n) ** 2


def batch_size(matrix_working_set: int, largest: int, device: torch.device) -> int:
    """How many same-shape matrices to orthogonalize as one batch. On a GPU a batch saves
    kernel launches, so the whole bucket; on a CPU batching saves nothing and its temporaries
    grow with it, so a batch's working set stays within that of the step's largest matrix,
    and the step's peak memory is that of one large matrix."""
    return 1 << 30 if device.type == "cuda" else max(1, largest // matrix_working_set)


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


def check_param_group(group: dict, index: int) -> None:
    """Raise a ValueError that names the bad option of param group `index` and the fix."""
    where = f"NorMuon param group {index}"

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {message}")

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
    axis = group["neuron_axis"]
    require(isinstance(axis, int) and axis >= 0,
            f"neuron_axis must be an integer >= 0 (the dim of the output neurons), got {axis!r}")
    for p, label in zip(group["params"], param_labels(group)):
        require(not p.is_complex(), f"{label} is complex ({p.dtype}); NorMuon supports "
                f"real floating-point parameters only")
        require(algorithm == "adamw" or p.ndim >= 2,
                f"algorithm={algorithm!r} orthogonalizes matrices, but {label} has fewer "
                f"than 2 dims; put gains, biases and scalars in a group with "
                f"algorithm='adamw' (normuon.param_groups does this)")
        require(algorithm == "adamw" or axis < p.ndim,
                f"neuron_axis={axis} but {label} has no such dim; the output neurons must "
                f"lie along one of its dims (0 for nn.Linear's (out, in))")


# ----------------------------------------------------------------------------- param groups

# The output layer's conventional names, looked for among the model's children only: deeper
# in, the same names are hidden layers (BERT's attention.output.dense, a block's mlp.fc).
HEAD_NAMES = ("lm_head", "head", "heads", "output", "classifier", "score", "qa_outputs", "fc",
              "fc_out")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)                     # weights (out, in, k...)
# weights (in, out, k...)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def neuron_axis_of(module: nn.Module, name: str) -> int | None:
    """If `module`'s own parameter `name` is the weight of a linear or convolution layer (a
    hidden matrix, unless it is the head), the axis of its output neurons; else None."""
    if isinstance(module, (nn.Linear, *CONVOLUTIONS)):
        return 0 if name == "weight" else None
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        return 1 if name == "weight" else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 1 if name == "weight" else None   # Hugging Face's GPT-2-family linear, (in, out)
    if isinstance(module, nn.MultiheadAttention):
        return 0 if name in ATTENTION_PROJECTIONS else None     # its out_proj is an nn.Linear
    if isinstance(module, nn.RNNBase):
        return 0 if name.startswith("weight_") else None        # weight_ih_l0, weight_hh_l0, ...
    return None


def find_head(model: nn.Module) -> list[nn.Module]:
    """The model's output layer: what its own accessor returns (Hugging Face's
    get_output_embeddings(), timm's get_classifier()), else its children with a conventional
    head name. Empty when neither finds a layer with parameters."""
    for accessor in ("get_output_embeddings", "get_classifier"):
        method = getattr(model, accessor, None)
        try:
            head = method() if callable(method) else None
        except NotImplementedError:
            head = None
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [head]
    return [child for name, child in model.named_children()
            if name in HEAD_NAMES and any(True for _ in child.parameters())]


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that the model exempts from weight decay itself: what any of its modules
    lists in no_weight_decay() (timm's convention), and parameters flagged _no_weight_decay
    (Mamba's)."""
    names = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{name}" if prefix else name for name in listed())
    return names


def param_groups(model: nn.Module, head=None, algorithm: str = "normuon",
                 **adamw_options) -> list[dict]:
    """Split a model's trainable parameters into the groups NorMuon wants.

    Hidden matrices -> `algorithm` ("normuon"): the weights of nn.Linear, nn.Conv*d and
    nn.ConvTranspose*d, Hugging Face's Conv1D (recognised by name, without importing
    transformers), and the projections of nn.MultiheadAttention and RNNs. Weights stored
    (in, out) — Conv1D, ConvTranspose — get a group of their own with neuron_axis=1, so that
    their output neurons are the ones normalized.
    Everything else -> "adamw": embeddings, the head, free parameters (ViT's cls token and
    position embeddings, Mamba's A_log, bias tables), gains, biases and scalars. Gains, biases,
    scalars and what the model lists in no_weight_decay() form an adamw group with
    weight_decay=0; the others keep the usual decay.

    The head is `head` — a module, a parameter, a (module or parameter) name, a list of these,
    or () for a model without one — or by default what find_head() finds; if it finds none, a
    warning says so. Shape alone cannot decide: embeddings and the head are matrices too.
    `adamw_options` (lr=..., weight_decay=..., betas=...) go into the adamw groups only.
    Parameters keep their names; describe_param_groups() prints where each went.
    """
    modules = dict(model.named_modules())
    if head is None:
        heads = find_head(model)
        if not heads:
            warnings.warn(
                f"param_groups: found no output head in {type(model).__name__} (no "
                f"get_output_embeddings()/get_classifier(), no child named one of {HEAD_NAMES}),"
                f" so every linear layer is treated as hidden; pass head=<module or name> if the "
                f"model has an output layer, or head=() if it has none", stacklevel=2)
    else:
        heads = head if isinstance(head, (list, tuple)) else [head]
    adamw_ids = set()
    for item in heads:
        if isinstance(item, str) and item not in modules:
            item = model.get_parameter(item)   # raises, naming it, if it is neither
        elif isinstance(item, str):
            item = modules[item]
        adamw_ids.update(map(id, item.parameters() if isinstance(item, nn.Module) else [item]))
    axes = {}   # id -> neuron axis, for hidden matrices
    for module in modules.values():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):   # also when tied to a Linear
            adamw_ids.update(map(id, module.parameters()))
        for name, p in module.named_parameters(recurse=False):
            axis = neuron_axis_of(module, name)
            if axis is not None and p.ndim >= 2:
                axes.setdefault(id(p), axis)
    exempt = no_decay_names(model)

    matrices, decay, no_decay = {}, [], []
    for name, p in model.named_parameters():   # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if id(p) in axes and id(p) not in adamw_ids:
            matrices.setdefault(axes[id(p)], []).append((name, p))
        elif p.ndim < 2 or name in exempt:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    groups = [{"params": params, "algorithm": algorithm, "neuron_axis": axis}
              for axis, params in sorted(matrices.items())]
    groups.append({"params": decay, "algorithm": "adamw", **adamw_options})
    groups.append({"params": no_decay, "algorithm": "adamw", **adamw_options, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def describe_param_groups(groups: list[dict]) -> str:
    """One line per group — its algorithm and settings, how many tensors and elements, and
    their names with layer indices folded (h.*.attn.c_attn.weight) — to check at a glance that
    a model is routed as expected: print(describe_param_groups(param_groups(model))). Takes
    param_groups()'s output or an optimizer's param_groups."""
    lines = []
    for index, group in enumerate(groups):
        entries = list(group["params"])
        if entries and isinstance(entries[0], tuple):      # (name, parameter) pairs
            names, params = [e[0] for e in entries], [e[1] for e in entries]
        else:
            params = entries
            names = group.get("param_names") or [f"<{tuple(p.shape)}>" for p in params]
        settings = [group.get("algorithm", "normuon")]
        if group.get("neuron_axis", 0) != 0:
            settings.append(f"neurons on dim {group['neuron_axis']}")
        if "weight_decay" in group:
            settings.append(f"weight_decay={group['weight_decay']}")
        folded = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names))
        shown = ", ".join(folded[:8]) + (f", ... ({len(folded) - 8} more)" if len(folded) > 8
                                          else "")
        elements = sum(p.numel() for p in params)
        lines.append(f"group {index} ({', '.join(settings)}): {len(params)} tensors, "
                     f"{elements:,} elements: {shown}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- demo

def _row_norm_spread(update: Tensor) -> tuple[float, float]:
    """Coefficient of variation and max/min of the row norms of a weight update."""
    norms = update.norm(dim=1)
    return (norms.std() / norms.mean()).item(), (norms.max() / norms.min()).item()


def demo(steps: int = 300, seed: int = 0) -> None:
    """Train one small MLP twice, with Muon and with NorMuon, and show the paper's observation:
    Muon's orthogonalized updates give some neurons far larger steps than others."""
    torch.manual_seed(seed)
    n_in, n_hidden, n_classes, n_samples = 32, 256, 10, 32768
    feature_scale = torch.logspace(-1.5, 0.5, n_in)    # unequal inputs -> unequal neurons
    X = torch.randn(n_samples, n_in) * feature_scale
    teacher = nn.Sequential(nn.Linear(n_in, 64), nn.Tanh(), nn.Linear(64, n_classes))
    with torch.no_grad():
        y = teacher(X / feature_scale).argmax(dim=1)
    X_val, y_val, X, y = X[:1024], y[:1024], X[1024:], y[1024:]
    init = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden),
                         nn.ReLU(), nn.Linear(n_hidden, n_classes))

    print(f"{n_in}->{n_hidden}->{n_hidden}->{n_classes} MLP, {steps} steps, batch 256, "
          f"lr 1e-2 (AdamW scale), first-layer update row norms averaged over steps")
    results = {}
    for algorithm in ("muon", "normuon"):
        torch.manual_seed(seed + 1)
        model = copy.deepcopy(init)
        opt = NorMuon(param_groups(model, head=model[4], algorithm=algorithm), lr=1e-2,
                      weight_decay=0.01)
        first_layer = model[0].weight                 # (256, 32): a tall matrix
        cv_sum = ratio_sum = 0.0
        for _ in range(steps):
            batch = torch.randint(0, len(X), (256,))
            loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            before = first_layer.detach().clone()
            opt.step()
            cv, ratio = _row_norm_spread(first_layer.detach() - before)
            cv_sum, ratio_sum = cv_sum + cv, ratio_sum + ratio
        with torch.no_grad():
            val_loss = nn.functional.cross_entropy(model(X_val), y_val).item()
        results[algorithm] = (cv_sum / steps, ratio_sum / steps, loss.item(), val_loss)

    print(f"{'':28s}{'Muon':>10s}{'NorMuon':>10s}")
    labels = ("row-norm coeff. of variation", "row-norm max/min", "final train loss",
              "val loss")
    for i, label in enumerate(labels):
        print(f"{label:28s}{results['muon'][i]:10.3f}{results['normuon'][i]:10.3f}")
    print("Muon gives every singular direction the same step, not every neuron: rows of a tall\n"
          "matrix's update differ several-fold. NorMuon divides each row by its running RMS.")


if __name__ == "__main__":
    demo()
