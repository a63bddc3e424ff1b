"""Sequence parallelism for the DiT: the video tokens of one forward split over the ranks of a process group.

Every rank embeds the whole latent, keeps its slice of the tokens (`TokenShard.split`), runs all blocks on that slice
and gathers the head's output (`TokenShard.gather`). Inside a block only three things need other ranks' tokens:
- the full self-attention: Ulysses (`TokenShard.attention`): one all-to-all trades the token slice of every head for
  all tokens of a slice of the heads, a local kernel (SDPA, FA4, fp8) attends, a second all-to-all trades back;
- the two-speaker routing map: its keys are the first latent frame's tokens (`TokenShard.leading_tokens`), and its
  per-speaker min/max normalisation runs over all tokens of the sequence (`TokenShard.row_bounds`);
- nothing else: the text/image and audio cross-attentions, the FFN and the norms act token by token (the audio
  cross-attention is told where its slice starts, to pick each token's latent frame).

Tokens are cut into `degree` equal chunks; the sequence is zero-padded at its end to a multiple of `degree`. Padding
never reaches a result: attention drops it after the exchange, the routing statistics skip it, the gather cuts it.
So a split forward equals the unsplit one up to float rounding, whatever the token count.

Collectives inside the blocks are torch's functional collectives, which `torch.compile(fullgraph=True)` traces and
which run on NCCL and on gloo (CPU tests).

The all-to-alls are our own rather than xfuser's (the reference's route): docs/design.md says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceParallel:
    """The ranks that share one sequence: a process group, its size and this process's rank in it."""

    group: dist.ProcessGroup
    degree: int
    rank: int

    @classmethod
    def over(cls, group: dist.ProcessGroup) -> "SequenceParallel":
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def shard(self, num_tokens: int, frame_tokens: int) -> "TokenShard":
        """This rank's slice of a sequence of `num_tokens` tokens with `frame_tokens` per latent frame."""
        return TokenShard(self.group, self.degree, self.rank, num_tokens, frame_tokens)


@dataclass(frozen=True)
class TokenShard:
    """This rank's chunk `[start, start + chunk)` of one forward's (padded) token sequence."""

    group: dist.ProcessGroup
    degree: int
    rank: int
    num_tokens: int  # before padding
    frame_tokens: int  # tokens per latent frame

    @property
    def chunk(self) -> int:
        return math.ceil(self.num_tokens / self.degree)

    @property
    def start(self) -> int:
        return self.rank * self.chunk

    @property
    def valid(self) -> int:
        """Rows of this chunk that are real tokens (the rest is padding)."""
        return max(0, min(self.chunk, self.num_tokens - self.start))

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of a full-sequence tensor (tokens along `dim`), zero rows past the sequence's end."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens along dim {dim}, got shape {tuple(x.shape)}")
        x = _pad_dim(x, dim, 0, self.chunk * self.degree - self.num_tokens)
        return x.narrow(dim, self.start, self.chunk)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence from every rank's chunk (tokens along `dim`), padding removed; the same on all ranks."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.num_tokens)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: AttentionKernel) -> torch.Tensor:
        """Full self-attention over the whole sequence (Ulysses): q, k, v `[1, chunk, heads, head_dim]` of this
        rank's tokens -> `[1, chunk, heads, head_dim]`. `kernel` attends all tokens of `heads / degree` heads."""
        heads, degree = q.shape[2], self.degree
        if heads % degree:
            raise ValueError(f"Ulysses attention needs the {heads} heads to divide over {degree} ranks")
        # [destination rank, q/k/v, token, head of that rank, head_dim], then one exchange for all three.
        qkv = torch.stack([q[0], k[0], v[0]]).unflatten(2, (degree, heads // degree)).permute(2, 0, 1, 3, 4)
        qkv = funcol.all_to_all_single(qkv.flatten(0, 1).contiguous(), None, None, self.group)
        # Received from each source rank its chunk of tokens: concatenated in rank order they are the sequence.
        qkv = qkv.unflatten(0, (degree, 3)).transpose(0, 1).flatten(1, 2)[:, : self.num_tokens]
        out = kernel(qkv[0:1], qkv[1:2], qkv[2:3])
        out = _pad_dim(out[0], 0, 0, self.chunk * degree - self.num_tokens).unflatten(0, (degree, self.chunk))
        out = funcol.all_to_all_single(out.contiguous(), None, None, self.group)
        # Received from each rank this chunk's tokens for that rank's heads: put the heads back in order.
        return out.transpose(0, 1).flatten(1, 2)[None]

    def leading_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The first `count` tokens of the whole sequence `[1, count, ...]`, from this rank's chunk `x`
        `[1, chunk, ...]` and the others'. Each rank contributes its rows, zeros elsewhere, summed (exact)."""
        if count > self.num_tokens:
            raise ValueError(f"asked for the first {count} tokens of a {self.num_tokens}-token sequence")
        first, stop = min(self.start, count), min(self.start + self.chunk, count)
        rows = _pad_dim(x[:, : stop - first], 1, first, count - stop)
        return funcol.all_reduce(rows.contiguous(), "sum", self.group)

    def row_bounds(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (min, max) of `rows` `[n, chunk]` over the whole sequence, padding excluded: two `[n]` tensors."""
        mine = rows[:, : self.valid]
        if self.valid:
            low, high = mine.amin(dim=1), mine.amax(dim=1)
        else:  # a rank holding only padding
            low = high = rows.new_full(rows.shape[:1], float("inf"))
            high = -high
        # One reduction for both: the max is minus the min of the negatives (exact).
        both = funcol.all_reduce(torch.cat([low, -high]).contiguous(), "min", self.group)
        return both[: rows.shape[0]], -both[rows.shape[0] :]


def _pad_dim(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Zero rows before and after along `dim` (no copy when there are none)."""
    if before == 0 and after == 0:
        return x
    dim = dim % x.ndim
    return F.pad(x, [0, 0] * (x.ndim - 1 - dim) + [before, after])
