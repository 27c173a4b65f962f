"""Where the real tokens of a padded batch are, for the fast path on CPU (`Decoder(fast_path=True)`).

Everything that works token by token (embedding, norms, linears, MLP, RoPE) runs on the real tokens' rows
`[n_real, d]` only; attention needs sequences, so each attention call lays the rows out as padded sequences
again and takes them back out. Two ways:

- **keeping positions** (packed batches): one `[B, T]` grid as the batch came, and the batch's attention mask
  (documents, padding) applies;
- **regrouped** (unpacked batches, left or right padding): each sequence's tokens are contiguous and in order
  among the rows, so the sequences can be re-laid right-padded, and sorted by length into a few groups of
  similar length, each padded only to its own longest (`plan_groups`). A plain causal mask then hides the
  padding. Attention's cost grows with the square of the padded length: one long answer no longer makes every
  row of its batch pay for its length.

Padding rows never reach a real query (the masks hide them), so real tokens' values are those of the padded
computation; padding comes out as zero rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# What one more attention group costs (its gathers, matmuls and softmax, forward and backward), in query-key pairs
# of one sequence: ~1.1 ms a group and layer against ~6.5e-5 ms a pair (all heads) on SmolLM2-135M, 2 CPU
# threads (one layer's attention timed on TriviaQA batches). `plan_groups` splits a batch only where that pays.
GROUP_OVERHEAD_PAIRS = 17000
MAX_GROUPS = 4


@dataclass
class AttentionGroup:
    """Sequences attended together: `src` the indices of their tokens among the layout's rows (None: all rows,
    in order), `dst` where those tokens go in the group's `[batch * length]` grid."""

    src: Tensor | None
    dst: Tensor
    batch: int
    length: int

    def pad(self, rows: Tensor) -> Tensor:
        """The group's tokens from `rows [n_real, ...]` -> `[batch, length, ...]`, zeros at the padding."""
        picked = rows if self.src is None else rows.index_select(0, self.src)
        grid = rows.new_zeros(self.batch * self.length, *rows.shape[1:])
        return grid.index_copy(0, self.dst, picked).view(self.batch, self.length, *rows.shape[1:])

    def unpad(self, x: Tensor) -> Tensor:
        """`[batch, length, ...]` -> the group's tokens' rows, in `src` order."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.dst)


def plan_groups(lengths: list[int]) -> list[list[int]]:
    """Sequences (indices into `lengths`) grouped by length so that the attention pairs of the groups, each padded
    to its longest, plus `GROUP_OVERHEAD_PAIRS` a group, are fewest: longest first, at most `MAX_GROUPS` groups
    of neighbours in that order (dynamic programming over the split points)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n, inf = len(order), float("inf")

    def cost(start: int, stop: int) -> int:  # sequences order[start:stop]; the first is the group's longest
        return (stop - start) * lengths[order[start]] ** 2 + GROUP_OVERHEAD_PAIRS

    # best[g][i]: (the least cost of order[i:] in at most g groups, where the first of those groups ends)
    best = [[(0 if i == n else inf, n) for i in range(n + 1)]]
    for g in range(1, MAX_GROUPS + 1):
        best.append([min((cost(i, j) + best[g - 1][j][0], j) for j in range(i + 1, n + 1)) for i in range(n)]
                    + [(0, n)])
    groups, i, g = [], 0, MAX_GROUPS
    while i < n:
        j = best[g][i][1]
        groups.append(order[i:j])
        i, g = j, g - 1
    return groups


class TokenLayout:
    """The real tokens of a padded batch: `keep`, their flat indices in `[B * T]` (row by row), and how attention
    lays them out (module docstring): `groups` and, when regrouped, `order` (the rows' places in the
    concatenated groups' output). A batch with no padding gets no layout (None from the constructors).

    Training batches reach the model without their attention mask when they are right-padded and unpacked
    (`data.batching.to_device`: the causal mask already hides padding), so the layout is also read from their
    `position_ids` (`of_right_padding`): collation numbers each row's real tokens 0..n-1 and sets the padding
    after them to 0."""

    def __init__(self, keep: Tensor, batch: int, length: int, regroup: bool):
        self.keep, self.batch, self.length = keep, batch, length
        self.grid = AttentionGroup(None, keep, batch, length)  # the batch's own [B, T] layout
        self.keeps_positions = not regroup
        self.order: Tensor | None = None
        self.groups = self._regrouped() if regroup else [self.grid]

    @staticmethod
    def of(attention_mask: Tensor | None, regroup: bool = True) -> TokenLayout | None:
        """The layout of a training/evaluation batch, or None when every position is real (or none is given).
        `regroup=False` for packed batches (their documents' mask needs the positions kept)."""
        if attention_mask is None:
            return None
        keep = attention_mask.reshape(-1).nonzero().squeeze(1)
        if keep.numel() == attention_mask.numel():
            return None
        return TokenLayout(keep, *attention_mask.shape, regroup=regroup)

    @staticmethod
    def of_right_padding(position_ids: Tensor) -> TokenLayout | None:
        """The layout of a right-padded batch as collation numbers it: each row's positions are 0..n-1 and then
        0 for the padding. Any other numbering (an offset, restarts within a row) gets None: every position is
        then computed, as if real."""
        columns = torch.arange(position_ids.shape[1], device=position_ids.device)
        real = position_ids == columns
        lengths = real.sum(1, keepdim=True)
        if lengths.min() < 1 or not torch.equal(real, columns < lengths) or bool(position_ids[~real].any()):
            return None
        if int(lengths.sum()) == position_ids.numel():
            return None
        return TokenLayout(real.reshape(-1).nonzero().squeeze(1), *position_ids.shape, regroup=True)

    def _regrouped(self) -> list[AttentionGroup]:
        lengths = torch.bincount(self.keep // self.length, minlength=self.batch).tolist()
        starts = [0, *itertools.accumulate(lengths[:-1])]  # each sequence's first row among the real rows
        plan = [[i for i in members if lengths[i] > 0] for members in plan_groups(lengths)]
        plan = [members for members in plan if members]
        if len(plan) == 1:  # one group: the sequences in their own order, the rows as they are
            plan = [sorted(plan[0])]
        groups, sources = [], []
        for members in plan:
            longest = max(lengths[i] for i in members)
            src = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in members])
            dst = torch.cat([torch.arange(lengths[i]) + slot * longest for slot, i in enumerate(members)])
            sources.append(src)
            groups.append(AttentionGroup(src.to(self.keep.device), dst.to(self.keep.device), len(members), longest))
        if len(groups) == 1:
            groups[0].src = None
        else:
            self.order = torch.cat(sources).argsort().to(self.keep.device)
        return groups

    def unpad(self, x: Tensor) -> Tensor:
        """`[B, T, ...]` -> the real tokens' rows `[n_real, ...]`."""
        return self.grid.unpad(x)

    def pad(self, rows: Tensor) -> Tensor:
        """`[n_real, ...]` -> `[B, T, ...]`, zeros at the padding positions."""
        return self.grid.pad(rows)

    def attend(self, rows: Tensor, attention: Callable[[Tensor], Tensor]) -> Tensor:
        """`attention` (`[B, T, width] -> [B, T, out]`, causal, with the batch's mask when `keeps_positions`) run
        over the rows' sequences, group by group; returns the output rows `[n_real, out]` in the rows' order."""
        outputs = [group.unpad(attention(group.pad(rows))) for group in self.groups]
        if self.order is None:
            return outputs[0]
        return torch.cat(outputs).index_select(0, self.order)
