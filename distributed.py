"""distributed.py: NorMuon for FSDP2-sharded and replicated parameters, on any number of ranks.

    from torch.distributed.fsdp import fully_shard
    from normuon import param_groups
    from distributed import DistributedNorMuon
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = DistributedNorMuon(param_groups(model), lr=1e-3, weight_decay=0.1)

The same constructor, param-group keys and algorithms as `normuon.NorMuon`, plus
`process_group` (default: the default group; it must hold the ranks of the parameters' mesh)
and `compile` (default: on for CUDA). The math is normuon.py's; this file only moves rows
between ranks. Parameters it cannot step are refused at construction, naming them: other
placements than the two below, a mesh other than the process group, a sharded weight stored
(in, out) (layout="in_out").

Which rank holds what:
- Every rank holds its rows of each FSDP2 parameter (DTensor, Shard(0): a contiguous block of
  whole rows, ceil(m/W) per rank, the last ranks fewer or none), the gradient rows, and the
  optimizer state of those rows: momentum rows, the second moment of those rows (neurons), and
  AdamW moments. Optimizer memory per rank falls as 1/W.
- Each hidden matrix has one owner rank, chosen so that Newton-Schulz FLOPs are balanced. For
  one step the owner also holds the whole matrix's momentum direction U and its orthogonalized O.

A step (the paper's Algorithm 2), in the step numbers of normuon.py's docstring:
- steps 1-2 (momentum, U) on local rows                          (no communication)
- step 3 (O): gather, each rank sending its rows of U to the owner  (bf16; one all-to-all per
  shape); the owner orthogonalizes its same-shape matrices as one batch; scatter, the owner
  sending each rank its rows of O                                (bf16; one all-to-all per shape)
  A parameter split in row blocks (a grouped conv's groups, `split_sizes`) is gathered whole,
  and its owner orthogonalizes each block on its own: a shard boundary may cut a block.
- steps 4-5 (second moment, row normalization) on local rows: a rank holds whole rows, so
  no communication
- step 6 needs whole-matrix norms: one all-reduce of every matrix's squared Frobenius norms
  (normuon.neuron_step gives each rank's share), so that the step size, and so the result,
  equals the single-device optimizer's for any world size
- step 7 (decay and update) on local rows.
Gathers are all issued at once, asynchronously; each shape's scatter is issued as soon as its
orthogonalization is done, so communication overlaps computation.
Replicated parameters (plain tensors under DDP) skip the gather: owners orthogonalize, and one
all-gather per shape shares the results.

Before any of this, one all-reduce of a (ranks, matrices) table of 0/1 says which rank has a
gradient for which matrix. If the ranks disagree (a rank-local skip, a bug in user code), the
exchanges above would abort (gloo) or hang (NCCL); instead every rank raises the same error,
naming the parameter, before anything is updated.

HSDP (multi-node FSDP2: a 2-D mesh, replicate x shard, placements (Replicate(), Shard(0))):
a replica group's shard ranks split the rows, and every replica group holds the same rows.
Each replica group runs the algorithm above among its own ranks (the "row group"), owners
included, and all groups compute the same result. The alternative, owners over the whole
mesh, would cut each rank's Newton-Schulz work by the number of groups R, but every O would
then have to reach all R groups: 2 bytes per element to each other node. For GPT-2 124M on
R nodes of 8 GPUs (bench/distributed_step.py prints this), per rank and step: 190 GFLOP and
no inter-node bytes here, against 95 GFLOP and 10.6 MB at R = 2 (24 GFLOP and 18.6 MB at
R = 8). At the 400 TFLOP/s that Newton-Schulz reached on one H100 (bench/RESULTS.md), the
saving is 0.24 ms at R = 2; 10.6 MB over a 200-400 Gb/s link takes 0.2-0.4 ms, on the link
that FSDP's own gradient reduction across nodes also needs. So the work stays in the group.

At one rank per row group (one process, or HSDP with one rank per replica) every row is
local: the step is normuon.NorMuon's, on the local tensors, with no exchange.
"""
import dataclasses
import math
import itertools

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from normuon import (NorMuon, apply_update, group_view, learning_rate, matrix_sq_norms,
                     matrix_view, nesterov_direction, neuron_blocks, neuron_step,
                     orthogonalize, orthogonalizer_dtype, orthogonalizer_flops, param_labels,
                     split_blocks, update_scale)


# ----------------------------------------------------------------------------- the plan

def param_flops(group: dict, shape) -> int:
    """Orthogonalizer FLOPs of all of a parameter's matrices: each block of each expert."""
    view = group_view(group, shape)
    experts = view.matrices // group["blocks"]
    return experts * sum(orthogonalizer_flops(group["orthogonalizer"], size, view.inputs,
                                              group["ns_steps"])
                         for size in neuron_blocks(group, shape))


def runs_of(sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(first, end, size) of each run of consecutive equal block sizes: the blocks that one
    batched call can handle together."""
    runs, first = [], 0
    for end in range(1, len(sizes) + 1):
        if end == len(sizes) or sizes[end] != sizes[first]:
            runs.append((first, end, sizes[first]))
            first = end
    return runs


def assign_owners(costs: list[int], world: int) -> list[int]:
    """Owner rank of each parameter, from its orthogonalizer FLOPs: largest first, each to the
    least-loaded rank (greedy LPT, which balances better than the paper's round-robin over
    sorted sizes)."""
    load, owners = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


def shard_rows(m: int, world: int) -> list[int]:
    """Rows of an (m, ...) tensor on each rank under FSDP2's Shard(0) (torch.chunk's split)."""
    chunk = -(-m // world)
    return [max(0, min(chunk, m - r * chunk)) for r in range(world)]


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


LAYOUTS = ((Shard(0),), (Replicate(), Shard(0)))   # FSDP2 on a 1-D mesh; HSDP on a 2-D one


def steps_locally(p: Tensor, group: dict) -> bool:
    """Whether a rank steps its part of `p` alone: stacked experts, whose dim 0 FSDP2 shards
    into whole experts (or that are replicated), and replicated (in, out) weights. Everything
    else ("out_in": rows are neurons) goes through its owner."""
    return group["layout"].startswith("experts_") or (
        group["layout"] == "in_out" and not isinstance(p, DTensor))


def check_layout(p: DTensor, label: str, mesh, ranks: list[int]):
    """Refuse a parameter this optimizer cannot step, naming it; returns its mesh (which every
    sharded parameter must share)."""
    if tuple(p.placements) not in LAYOUTS:
        raise ValueError(
            f"DistributedNorMuon: {label} has placements {p.placements}; supported are FSDP2's "
            f"row sharding (Shard(0),) on a 1-D mesh, HSDP's (Replicate(), Shard(0)) on a 2-D "
            f"mesh, and replicated plain tensors (DDP)")
    mesh_ranks = sorted(p.device_mesh.mesh.flatten().tolist())
    if mesh_ranks != sorted(ranks):
        raise ValueError(
            f"DistributedNorMuon: {label} lives on a device mesh of ranks {mesh_ranks}, but the "
            f"optimizer's process group has ranks {sorted(ranks)}; pass process_group= the "
            f"group of the parameters' mesh (for a 1-D mesh, mesh.get_group())")
    if mesh is not None and p.device_mesh != mesh:
        raise ValueError(
            f"DistributedNorMuon: {label} lives on device mesh {p.device_mesh}, other "
            f"parameters on {mesh}; all sharded parameters must share one mesh")
    return p.device_mesh


@dataclasses.dataclass
class Matrix:
    """One hidden matrix in this step: its local rows and where the rest are."""
    param: Tensor
    group: dict
    state: dict
    blocks: tuple[int, ...]    # rows of each of its matrices, in order (normuon.neuron_blocks)
    m: int                     # rows (neurons of all its matrices) and inputs of its (m, n) form
    n: int
    owner: int
    rows: list[int] | None     # rows per rank when sharded; None when replicated
    U: Tensor                  # (local rows, n) momentum direction
    O: Tensor | None = None    # (local rows, n) orthogonalized, in the wire dtype, once it arrives


# ----------------------------------------------------------------------------- the optimizer

class DistributedNorMuon(NorMuon):
    """NorMuon whose orthogonalization is spread over ranks by matrix owner (see the module
    docstring). A drop-in for normuon.NorMuon on FSDP2 or DDP models."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, *,
                 process_group=None, compile: bool | None = None, **kwargs):
        super().__init__(params, lr, weight_decay, **kwargs)
        # None stands for the default group: holding the default group object itself would keep
        # it alive past destroy_process_group(), to be torn down at interpreter exit (gloo aborts)
        self.process_group = process_group
        self.compile = torch.cuda.is_available() if compile is None else compile
        # lr and weight decay stay outside the compiled functions: changing them never recompiles
        self._orthogonalize = torch.compile(orthogonalize) if self.compile else orthogonalize
        self._neuron_step = torch.compile(neuron_step) if self.compile else neuron_step
        self.last_step_stats: dict = {}
        self._plan()

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "DistributedNorMuon cannot be copied or pickled: it is bound to a process group and "
            "to which rank owns each matrix. Save its state with torch.distributed.checkpoint "
            "(get_optimizer_state_dict) and build a new DistributedNorMuon for the new model.")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "world"):    # after construction: re-plan owners, create the state
            self._plan()

    def _plan(self) -> None:
        """Check every parameter's layout, find the ranks that split rows (the row group), give
        every matrix an owner there, and create all state now, so that a checkpoint is complete
        at once."""
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        self.mesh, matrices, exchanged = None, [], []
        for group in self.param_groups:
            for p, label in zip(group["params"], param_labels(group)):
                if isinstance(p, DTensor):
                    self.mesh = check_layout(p, label, self.mesh, ranks)
                if group["algorithm"] == "adamw":
                    self.adamw_state(p)
                    continue
                if isinstance(p, DTensor) and group["layout"] == "in_out":
                    raise ValueError(
                        f"DistributedNorMuon: {label} is sharded and in a group with layout="
                        f"'in_out' (a weight stored (in, out), like Hugging Face's Conv1D): "
                        f"FSDP2 shards its dim 0, its inputs, while a rank must hold whole "
                        f"neurons; use nn.Linear layers, replicate it, or use normuon.NorMuon")
                self.matrix_state(p, group_view(group, p.shape))
                matrices.append(p)
                if not steps_locally(p, group):
                    exchanged.append((p, param_flops(group, p.shape)))
        self.replicas = self.mesh.size(0) if self.hsdp else 1
        self.rank = dist.get_rank(self.row_group)
        self.world = dist.get_world_size(self.row_group)
        self.device = matrices[0].device if matrices else torch.device("cpu")
        owners = assign_owners([cost for _, cost in exchanged], self.world)
        self.owner = {p: owner for (p, _), owner in zip(exchanged, owners)}

    @property
    def hsdp(self) -> bool:
        return self.mesh is not None and self.mesh.ndim == 2

    @property
    def row_group(self):
        """The ranks that split each matrix's rows, among which matrices have owners: the
        process group, or on an HSDP mesh the shard ranks of this rank's replica group."""
        return self.mesh.get_group(1) if self.hsdp else self.process_group

    def ns_flops_per_rank(self) -> list[int]:
        """Orthogonalizer FLOPs of each rank per step: its owned parameters, and its share of
        those stepped locally (a sharded experts tensor's local experts)."""
        flops = [0] * self.world
        for group in self.param_groups:
            for p in group["params"] if group["algorithm"] != "adamw" else []:
                cost = param_flops(group, p.shape)
                if p in self.owner:
                    flops[self.owner[p]] += cost
                else:
                    share = (shard_rows(p.shape[0], self.world) if isinstance(p, DTensor)
                             else [p.shape[0]] * self.world)
                    for r in range(self.world):
                        flops[r] += cost * share[r] // p.shape[0]
        return flops

    def _matrix_steps(self, matrix_groups: list[tuple[dict, list[Tensor]]]) -> None:
        """Every group's matrices together: one all-to-all per shape, one all-reduce.
        (AdamW parameters take normuon.py's path: its elementwise ops act on each rank's
        rows of a DTensor.)"""
        self.last_step_stats = {"bytes_sent": 0, "bytes_received": 0}
        self._agree_on_gradients()
        for group, params in matrix_groups:   # every row here, or whole matrices (experts)
            self._step_matrices(group, [
                block for p in params if self.world == 1 or p not in self.owner
                for block in split_blocks(group, local(p), local(p.grad), {
                    key: local(value) for key, value in self.matrix_state(p, None).items()})])
        if self.world == 1:
            return
        matrices = [self._momentum(p, group, self.matrix_state(p, None))
                    for group, params in matrix_groups for p in params if p in self.owner]
        self._orthogonalize_by_owner(matrices)
        self._normalize_and_apply(matrices)

    def _agree_on_gradients(self) -> None:
        """One small all-reduce over the process group: which ranks have a gradient for which
        matrix. If they differ, the collectives below would abort or hang, so every rank
        raises the same error instead, before anything is updated."""
        entries = [(p, label) for group in self.param_groups if group["algorithm"] != "adamw"
                   for p, label in zip(group["params"], param_labels(group))]
        ranks = dist.get_world_size(self.process_group)
        if ranks == 1 or not entries:
            return
        has_grad = torch.zeros(ranks, len(entries), dtype=torch.int32, device=self.device)
        has_grad[dist.get_rank(self.process_group)] = torch.tensor(
            [p.grad is not None for p, _ in entries], dtype=torch.int32)
        dist.all_reduce(has_grad, group=self.process_group)   # (ranks, matrices) of 0/1
        has_grad = has_grad.cpu()
        counts = has_grad.sum(dim=0)
        disagree = [i for i in range(len(entries)) if 0 < counts[i] < ranks]
        if disagree:
            i = disagree[0]
            have = [r for r in range(ranks) if has_grad[r, i]]
            lack = [r for r in range(ranks) if not has_grad[r, i]]
            more = f" (and {len(disagree) - 1} more matrices)" if len(disagree) > 1 else ""
            raise RuntimeError(
                f"DistributedNorMuon: ranks disagree on which matrices have a gradient: "
                f"{entries[i][1]} has one on ranks {have} and none on ranks {lack}{more}. "
                f"Every rank must produce gradients for the same matrices (a rank-dependent "
                f"branch, or a layer unused on some ranks?). No parameter was updated.")

    def _momentum(self, p: Tensor, group: dict, state: dict) -> Matrix:
        m, n = p.shape[0], math.prod(p.shape[1:])          # the global (out, in*k...) form
        U = nesterov_direction(local(state["momentum_buffer"]), local(p.grad),
                               group["momentum"], group["nesterov"])
        rows = shard_rows(m, self.world) if isinstance(p, DTensor) else None
        if rows is not None and U.shape[0] != rows[self.rank]:
            raise RuntimeError(
                f"DistributedNorMuon: rank {self.rank} holds {U.shape[0]} rows of a parameter "
                f"of shape {tuple(p.shape)}; expected FSDP2's even split {rows}")
        return Matrix(p, group, state, neuron_blocks(group, p.shape), m, n, self.owner[p], rows,
                      U.reshape(-1, n))

    # -- step 3: gather to owners, orthogonalize, scatter back

    def _orthogonalize_by_owner(self, matrices: list[Matrix]) -> None:
        buckets: dict[tuple, list[Matrix]] = {}   # same shape and orthogonalizer: one batch
        for x in matrices:
            key = (x.m, x.n, x.blocks, x.rows is None, x.group["orthogonalizer"],
                   x.group["ns_steps"], x.U.dtype, x.U.device)
            buckets.setdefault(key, []).append(x)
        gathers = [self._start_gather(bucket) for bucket in buckets.values()]
        finishes = []
        for bucket, (work, unpack) in zip(buckets.values(), gathers):
            if work is not None:
                work.wait()
            mine = [x for x in bucket if x.owner == self.rank]
            O = None
            if mine:
                O = self._orthogonalize_blocks(unpack(), bucket[0])   # (k, m, n)
            finishes.append(self._start_scatter(bucket, O))
        for work, finish in finishes:
            if work is not None:
                work.wait()
            finish()

    def _orthogonalize_blocks(self, whole: Tensor, x: Matrix) -> Tensor:
        """whole (k, m, n), k same-shape matrices split alike in row blocks (x.blocks): every
        block orthogonalized on its own, same-size blocks as one batch; returns (k, m, n)."""
        k, n, pieces = whole.shape[0], whole.shape[-1], []
        start = 0
        for first, end, size in runs_of(x.blocks):
            rows = whole[:, start:start + (end - first) * size]       # (k, blocks * size, n)
            O = self._orthogonalize(rows.reshape(-1, size, n), x.group["orthogonalizer"],
                                    x.group["ns_steps"])              # (k * blocks, size, n)
            pieces.append(O.view(k, -1, n))
            start += (end - first) * size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _wire_dtype(self, x: Matrix) -> torch.dtype:
        """What U and O travel in: what the orthogonalizer reads (bf16 for the polynomial ones,
        lossless since they round U to bf16 first and O comes out of bf16)."""
        return orthogonalizer_dtype(x.group["orthogonalizer"], x.U.dtype)

    def _all_to_all(self, send_chunks: list[list[Tensor]], receive_sizes: list[int],
                    dtype: torch.dtype, device: torch.device):
        """Send send_chunks[r] (flattened, concatenated) to rank r; receive receive_sizes[r]
        elements from rank r. Returns (work, received pieces per rank)."""
        send_sizes = [sum(c.numel() for c in chunks) for chunks in send_chunks]
        empty = torch.empty(0, dtype=dtype, device=device)
        send = torch.cat([c.reshape(-1) for chunks in send_chunks for c in chunks] + [empty])
        received = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
        self._count(send_sizes, receive_sizes, empty.element_size())
        work = dist.all_to_all_single(received, send, receive_sizes, send_sizes,
                                      group=self.row_group, async_op=True)
        return work, list(received.split(receive_sizes))

    def _count(self, sent: list[int], received: list[int], element_size: int) -> None:
        """Add what goes to and comes from other ranks (elements per rank) to the stats."""
        others = [r for r in range(self.world) if r != self.rank]
        self.last_step_stats["bytes_sent"] += element_size * sum(sent[r] for r in others)
        self.last_step_stats["bytes_received"] += element_size * sum(received[r] for r in others)

    def _start_gather(self, bucket: list[Matrix]):
        """Start moving U to the owners; returns (work, unpack) where unpack() gives the
        owner's (k, m, n) batch of whole matrices."""
        mine = [x for x in bucket if x.owner == self.rank]
        if bucket[0].rows is None:                        # replicated: U is already whole
            return None, lambda: torch.stack([x.U for x in mine])
        wire = self._wire_dtype(bucket[0])
        send = [[x.U.to(wire) for x in bucket if x.owner == r] for r in range(self.world)]
        receive = [sum(x.rows[r] * x.n for x in mine) for r in range(self.world)]
        work, pieces = self._all_to_all(send, receive, wire, bucket[0].U.device)

        def unpack() -> Tensor:
            # pieces[r] holds rank r's rows of each matrix I own, in bucket order
            by_rank = [piece.split([x.rows[r] * x.n for x in mine])
                       for r, piece in enumerate(pieces)]
            whole = [torch.cat([by_rank[r][j] for r in range(self.world)]).view(x.m, x.n)
                     for j, x in enumerate(mine)]
            return torch.stack(whole)   # (k, m, n), in the wire dtype the orthogonalizer reads
        return work, unpack

    def _start_scatter(self, bucket: list[Matrix], O: Tensor | None):
        """Start sending each rank its rows of O (or, replicated, every rank all of it);
        returns (work, finish) where finish() stores x.O on every matrix of the bucket."""
        wire = self._wire_dtype(bucket[0])
        mine = [x for x in bucket if x.owner == self.rank]
        O_wire = O.to(wire) if O is not None else bucket[0].U.new_empty(0, dtype=wire)
        if bucket[0].rows is None:
            return self._start_share(bucket, O_wire)
        starts = [0, *itertools.accumulate(bucket[0].rows)]
        send = [[O_wire[j, starts[r]:starts[r + 1]] for j in range(len(mine))]
                for r in range(self.world)]
        receive = [sum(x.rows[self.rank] * x.n for x in bucket if x.owner == r)
                   for r in range(self.world)]
        work, pieces = self._all_to_all(send, receive, wire, O_wire.device)

        def finish() -> None:
            for r, piece in enumerate(pieces):
                owned = [x for x in bucket if x.owner == r]
                for x, rows in zip(owned, piece.split([x.rows[self.rank] * x.n for x in owned])):
                    x.O = rows.view(-1, x.n)
        return work, finish

    def _start_share(self, bucket: list[Matrix], O_wire: Tensor):
        """Replicated matrices: all-gather every owner's results (padded to equal length)."""
        per_rank = [sum(x.m * x.n for x in bucket if x.owner == r) for r in range(self.world)]
        longest = max(per_rank)
        send = torch.cat([O_wire.reshape(-1), O_wire.new_zeros(longest - O_wire.numel())])
        received = send.new_empty(self.world * longest)
        self._count([longest] * self.world, [longest] * self.world, send.element_size())
        work = dist.all_gather_single(received, send, group=self.row_group, async_op=True)

        def finish() -> None:
            for r, piece in enumerate(received.split(longest)):
                owned = [x for x in bucket if x.owner == r]
                for x, whole in zip(owned, piece[:per_rank[r]].split([x.m * x.n for x in owned])):
                    x.O = whole.view(x.m, x.n)
        return work, finish

    # -- steps 4-7: normalize rows locally, one all-reduce of norms, update

    def _normalize_and_apply(self, matrices: list[Matrix]) -> None:
        if not matrices:
            return
        rows_of, block_sums = [], []
        for x in matrices:
            g = x.group
            row_scale, row_sq = self._neuron_step(x.O, local(x.state["second_moment"]),
                                                  algorithm=g["algorithm"], beta2=g["beta2"],
                                                  eps=g["eps"])                 # (rows,) each
            # the block (matrix of the view) of each local row: a shard may cut a block, so
            # each block's share is summed over the local rows that it holds
            first = sum(x.rows[:self.rank]) if x.rows is not None else 0
            rows, starts = x.O.shape[0], [0, *itertools.accumulate(x.blocks)]
            sums = row_sq.new_zeros(len(x.blocks), 2)
            for b in range(len(x.blocks)):
                low, high = max(starts[b] - first, 0), min(starts[b + 1] - first, rows)
                if low < high:
                    sums[b] = matrix_sq_norms(row_scale[low:high], row_sq[low:high])
            block_sums.append(sums)
            if len(set(x.blocks)) == 1:
                block_of_row = torch.arange(first, first + rows,
                                            device=row_sq.device) // x.blocks[0]
            else:
                block_of_row = torch.repeat_interleave(
                    torch.arange(len(x.blocks)), torch.tensor(x.blocks))[first:first + rows]
            rows_of.append((row_scale, block_of_row.to(row_sq.device)))
        sq_norms = torch.cat(block_sums)                # (all blocks, 2): this rank's rows
        sharded = torch.tensor([x.rows is not None for x in matrices for _ in x.blocks],
                               device=sq_norms.device).unsqueeze(-1)
        total = torch.where(sharded, sq_norms, torch.zeros_like(sq_norms))
        dist.all_reduce(total, group=self.row_group)  # sum of the sharded matrices' rows
        sq_norms = torch.where(sharded, total, sq_norms)
        if self.world > 1:   # the all-reduce's payload, counted once each way
            payload = sq_norms.numel() * sq_norms.element_size()
            self.last_step_stats["bytes_sent"] += payload
            self.last_step_stats["bytes_received"] += payload
        for x, (row_scale, block), sq in zip(matrices, rows_of,
                                             sq_norms.split([len(x.blocks) for x in matrices])):
            g = x.group
            scale = torch.cat([update_scale(sq[first:end, 0], sq[first:end, 1], size, x.n,
                                            g["adjust_lr"])
                               for first, end, size in runs_of(x.blocks)])      # (blocks,)
            row_step = row_scale * (-learning_rate(g) * scale)[block]            # (rows,)
            param = local(x.param)
            apply_update(param, x.O[None], row_step[None], matrix_view(param.shape),
                         lr=learning_rate(g), weight_decay=g["weight_decay"],
                         cautious=g["cautious_weight_decay"])
