"""Counterfactual token edits around a tracked position (pure tensor functions).

A sequence is a 1-d int tensor with BOS at position 0; ``t`` is the position whose activation
is measured (the query). Every edit inserts tokens at or before ``t`` and returns the edited
sequence, the new position of the tracked token and the positions of the inserted tokens.

Edits keep the length fixed, so an edited corpus row still fits the model's ``n_ctx``. The
``m`` extra tokens are dropped in this order:

1. tokens after the tracked position, from the right end: a causal model's activation at ``t``
   never reads them;
2. only when the tracked token would leave the window, the oldest body tokens, from the left
   (position 1 onwards).

BOS, the tracked token and the inserted tokens are never dropped, nor are ``protect``-ed
original positions before ``t`` (after ``t`` the right-end rule applies to every token). An edit
that cannot fit (more tokens to drop before ``t`` than droppable ones) is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

INSERTED = -1  # origin of an inserted token


@dataclass(frozen=True)
class Edit:
    """One edited sequence.

    ``tokens`` is ``[T]``, the same length as the input; ``t`` the new position of the tracked
    token; ``inserted`` the positions of the inserted tokens in ``tokens``; ``origin`` ``[T]``
    the original position of each token (``-1`` for inserted ones).
    """

    tokens: Tensor
    t: int
    inserted: list[int]
    origin: Tensor

    def position_of(self, original: int) -> int | None:
        """New position of an original position, or None when it was dropped."""
        hits = torch.nonzero(self.origin == original).flatten()
        return int(hits[0]) if len(hits) else None

    @property
    def dropped(self) -> list[int]:
        """Original positions that are no longer in the sequence."""
        kept = set(self.origin.tolist())
        return [i for i in range(self.tokens.shape[0]) if i not in kept]


@dataclass(frozen=True)
class BatchEdit:
    """Edited sequences ``tokens [B, T]``, tracked positions ``t [B]``, inserted positions
    ``inserted [B, m]`` (ascending) and origins ``origin [B, T]``."""

    tokens: Tensor
    t: Tensor
    inserted: Tensor
    origin: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def row(self, i: int) -> Edit:
        return Edit(
            tokens=self.tokens[i],
            t=int(self.t[i]),
            inserted=self.inserted[i].tolist(),
            origin=self.origin[i],
        )


def insert_tokens_batch(
    tokens: Tensor,
    t: Tensor,
    insert: Tensor,
    at: Tensor,
    protect: Tensor | None = None,
) -> BatchEdit:
    """Insert ``insert [B, m]`` (or ``[m]``, the same for every row) so that token ``i`` lands
    right before original position ``at[:, i]``; ``at`` is ``[B, m]`` with ``1 <= at <= t``.

    ``tokens`` is ``[B, T]``, ``t`` ``[B]``; ``protect`` ``[B, T]`` bool marks original positions
    before ``t`` that must not be dropped. Tokens inserted at the same position keep their order.
    """
    B, T = tokens.shape
    device = tokens.device
    t = torch.as_tensor(t, device=device).long().reshape(B)
    insert = torch.as_tensor(insert, device=device).to(tokens.dtype)
    if insert.dim() == 1:
        insert = insert.expand(B, -1)
    at = torch.as_tensor(at, device=device).long().reshape(B, -1)
    m = insert.shape[1]
    if at.shape[1] != m:
        raise ValueError(f"{m} tokens to insert but {at.shape[1]} positions")
    if ((t < 1) | (t >= T)).any():
        raise ValueError(f"tracked positions must lie in [1, {T - 1}]")
    if m and ((at < 1) | (at > t.unsqueeze(1))).any():
        raise ValueError("insertion positions must lie in [1, t]")
    order = torch.sort(at, dim=1, stable=True).indices
    at, insert = at.gather(1, order), insert.gather(1, order)

    # scatter originals and insertions into a [B, T + m] sequence
    j = torch.arange(T, device=device).expand(B, T)
    shift = (at.unsqueeze(1) <= j.unsqueeze(2)).sum(dim=2)  # [B, T] insertions before j
    orig_new = j + shift
    ins_new = at + torch.arange(m, device=device)
    N = T + m
    seq = tokens.new_zeros(B, N).scatter(1, orig_new, tokens).scatter(1, ins_new, insert)
    origin = (
        torch.full((B, N), INSERTED, dtype=torch.long, device=device)
        .scatter(1, orig_new, j)
        .scatter(1, ins_new, torch.full_like(ins_new, INSERTED))
    )

    keep = drop_mask(origin, t, m, protect)
    new_tokens = seq[keep].view(B, T)
    new_origin = origin[keep].view(B, T)
    new_t = torch.nonzero(new_origin == t.unsqueeze(1))[:, 1]
    inserted = torch.nonzero(new_origin == INSERTED)[:, 1].view(B, m)
    return BatchEdit(tokens=new_tokens, t=new_t, inserted=inserted, origin=new_origin)


def drop_mask(origin: Tensor, t: Tensor, m: int, protect: Tensor | None) -> Tensor:
    """``[B, T + m]`` bool: which tokens of the lengthened sequences stay (see module doc)."""
    B, N = origin.shape
    T = N - m
    j = torch.arange(N, device=origin.device).expand(B, N)
    right = torch.clamp(T - 1 - t, max=m)  # [B] tokens after t that can go
    left = m - right
    drop_right = j >= (N - right).unsqueeze(1)
    droppable = (origin > 0) & (origin < t.unsqueeze(1))
    if protect is not None:
        guarded = protect.to(origin.device).gather(1, origin.clamp(min=0))
        droppable &= ~guarded
    rank = droppable.long().cumsum(dim=1)
    if (rank[:, -1] < left).any():
        bad = int(torch.nonzero(rank[:, -1] < left)[0])
        raise ValueError(
            f"row {bad}: {int(left[bad])} tokens must go before the tracked position but only "
            f"{int(rank[bad, -1])} may be dropped"
        )
    drop_left = droppable & (rank <= left.unsqueeze(1))
    return ~(drop_right | drop_left)


def _one(edit: BatchEdit) -> Edit:
    return edit.row(0)


def _check_1d(tokens: Tensor) -> Tensor:
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-d token sequence, got shape {tuple(tokens.shape)}")
    return tokens.unsqueeze(0)


def _protect_row(protect: Sequence[int] | None, T: int, device: torch.device) -> Tensor | None:
    if not protect:
        return None
    mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    mask[0, list(protect)] = True
    return mask


def insert_before(
    tokens: Tensor,
    t: int,
    insert: Sequence[int],
    at: int | None = None,
    protect: Sequence[int] | None = None,
) -> Edit:
    """Insert ``insert`` right before original position ``at`` (``1 <= at <= t``; default
    ``t``, i.e. right before the tracked token). ``tokens`` is ``[T]``."""
    rows = _check_1d(tokens)
    pos = t if at is None else at
    ats = torch.full((1, len(insert)), pos, dtype=torch.long, device=tokens.device)
    ins = torch.tensor(list(insert), dtype=tokens.dtype, device=tokens.device)
    prot = _protect_row(protect, rows.shape[1], tokens.device)
    return _one(insert_tokens_batch(rows, torch.tensor([t]), ins, ats, prot))


def repeat_token(
    tokens: Tensor,
    t: int,
    token: int,
    n: int,
    positions: Sequence[int] | None = None,
    protect: Sequence[int] | None = None,
) -> Edit:
    """Place ``n`` copies of ``token`` before ``t``: copy ``i`` right before original position
    ``positions[i]`` (each in ``[1, t]``; default all right before ``t``; ``spread_positions``
    spaces them over the prefix). ``tokens`` is ``[T]``."""
    rows = _check_1d(tokens)
    pos = [t] * n if positions is None else list(positions)
    if len(pos) != n:
        raise ValueError(f"{n} copies but {len(pos)} positions")
    ats = torch.tensor([pos], dtype=torch.long, device=tokens.device)
    ins = torch.full((n,), token, dtype=tokens.dtype, device=tokens.device)
    prot = _protect_row(protect, rows.shape[1], tokens.device)
    return _one(insert_tokens_batch(rows, torch.tensor([t]), ins, ats, prot))


def insert_filler(tokens: Tensor, t: int, key_pos: int, filler: Sequence[int]) -> Edit:
    """Insert neutral ``filler`` right after the key at ``key_pos`` (``0 <= key_pos < t``),
    moving the key further from the query at ``t``. The key is never dropped; find its new
    position with ``edit.position_of(key_pos)``. ``tokens`` is ``[T]``."""
    if not 0 <= key_pos < t:
        raise ValueError(f"key position {key_pos} must lie in [0, {t - 1}]")
    return insert_before(tokens, t, filler, at=key_pos + 1, protect=[key_pos])


def spread_positions(t: Tensor, n: int) -> Tensor:
    """``[B, n]`` insertion points spaced evenly over each prefix ``[1, t]`` (``t`` ``[B]``):
    ``1 + floor(i (t - 1) / n)`` for copy ``i``."""
    t = torch.as_tensor(t).long().reshape(-1, 1)
    i = torch.arange(n, device=t.device)
    return 1 + (i * (t - 1)) // max(n, 1)


def insert_before_batch(
    tokens: Tensor,
    t: Tensor,
    insert: Sequence[int],
    at: Tensor | None = None,
    protect: Tensor | None = None,
) -> BatchEdit:
    """Batched ``insert_before``: ``tokens [B, T]``, ``t [B]``, ``at [B]`` (default ``t``),
    ``protect [B, T]`` bool."""
    t = torch.as_tensor(t, device=tokens.device).long()
    pos = t if at is None else torch.as_tensor(at, device=tokens.device).long()
    ats = pos.reshape(-1, 1).expand(-1, len(insert))
    ins = torch.tensor(list(insert), dtype=tokens.dtype, device=tokens.device)
    return insert_tokens_batch(tokens, t, ins, ats, protect)


def repeat_token_batch(
    tokens: Tensor,
    t: Tensor,
    token: int,
    n: int,
    positions: Tensor | None = None,
    protect: Tensor | None = None,
) -> BatchEdit:
    """Batched ``repeat_token``: ``tokens [B, T]``, ``t [B]``, ``positions [B, n]`` (default all
    right before ``t``), ``protect [B, T]`` bool."""
    t = torch.as_tensor(t, device=tokens.device).long()
    ats = t.reshape(-1, 1).expand(-1, n) if positions is None else positions
    ins = torch.full((n,), token, dtype=tokens.dtype, device=tokens.device)
    return insert_tokens_batch(tokens, t, ins, ats, protect)


def _tokenizer(tokenizer_or_model):
    if hasattr(tokenizer_or_model, "cfg") and hasattr(tokenizer_or_model, "tokenizer"):
        return tokenizer_or_model.tokenizer
    return tokenizer_or_model


def render(tokenizer_or_model, edit: Edit | Tensor, bos: bool = False, upto_t: bool = False) -> str:
    """The edited text with inserted tokens marked ``⟦twitter⟧``.

    Runs of untouched tokens are decoded together; pieces are joined with a space only when the
    tokenizer itself separates them that way. Ids are shown as numbers without a tokenizer.
    ``upto_t`` stops at the tracked token (what a causal model reads).
    """
    if isinstance(edit, Tensor):
        edit = Edit(edit, edit.shape[0] - 1, [], torch.arange(edit.shape[0]))
    tok = _tokenizer(tokenizer_or_model)
    ids = edit.tokens.tolist()
    end = edit.t + 1 if upto_t else len(ids)
    marked = set(edit.inserted)
    runs: list[tuple[list[int], bool]] = []
    for pos in range(0 if bos else 1, end):
        is_ins = pos in marked
        if runs and not is_ins and not runs[-1][1]:
            runs[-1][0].append(ids[pos])
        else:
            runs.append(([ids[pos]], is_ins))
    if tok is None:
        parts = [(" ".join(map(str, r)), ins) for r, ins in runs]
        return " ".join(f"⟦{p}⟧" if ins else p for p, ins in parts)
    out = ""
    prev: list[int] = []
    for run, ins in runs:
        text = tok.decode(run)
        piece = f"⟦{text}⟧" if ins else text
        if prev:
            joined = tok.decode(prev + run)
            sep = "" if joined == tok.decode(prev) + text else " "
            out += sep
        out += piece
        prev = run
    return out
