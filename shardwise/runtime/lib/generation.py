"""Greedy generation over two compiled steps: a prefill of the prompt window, then one decode step per token.

``greedy(prefill, decode, input_ids, attention_mask, ...)`` is the loop a generated program runs (and what a
person would write around a model with a static KV cache):

* the prompts are **left padded** into a window of ``prompt_len`` tokens (each row's real tokens, wherever
  the caller's mask puts them, moved to the right end), and the batch is filled up to ``max_batch`` rows
  with a one-token filler prompt whose tokens are dropped;
* ``prefill(ids, positions, mask, cache_position)`` writes the window's keys and values into cache slots
  ``0 .. prompt_len - 1`` and returns the last position's logits; each decode step feeds the token just
  chosen at slot ``prompt_len + t``;
* the next token is the argmax of the logits (greedy, as ``generate(do_sample=False)``); a row that emitted
  an end-of-sequence token continues with ``pad_token_id`` (the first end token when there is none), and the loop
  stops early when every row has finished;
* the attention mask over the ``max_seq`` cache slots is the prompt window's mask followed by ones (the
  step's causal mask hides slots not written yet); positions count each row's real tokens only.

Returns the new tokens ``[rows, steps]`` and the seconds each step took (``prefill_s``, and ``decode_s`` per
decode step): each rank times the step's call from a barrier (the ranks start it together) to its return,
and the slowest rank's time of each step is taken once generation is over (one all-reduce of every step's
time), so that no barrier after a step counts in its time (a barrier costs as much as a small collective:
a serving loop runs none).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["greedy", "left_padded"]


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int, width: int):
    """(ids, mask, lengths): the prompts moved to the right end of a ``rows x width`` window (rows after the
    caller's are one-token filler prompts)."""
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    lengths = torch.ones(rows, dtype=torch.long)
    for r in range(input_ids.shape[0]):
        real = input_ids[r][attention_mask[r].bool()]
        n = real.shape[0]
        ids[r, width - n :] = real
        mask[r, width - n :] = 1
        lengths[r] = n
    mask[input_ids.shape[0] :, -1] = 1
    return ids, mask, lengths


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _timed(step: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The step's output and this rank's seconds from a barrier to the step's return."""
    if _distributed():
        dist.barrier()
    t0 = time.perf_counter()
    out = step(*args)
    return out, time.perf_counter() - t0


def _slowest(seconds: list[float]) -> list[float]:
    """Each step's time on the slowest rank (every rank calls this once, with as many steps)."""
    if not _distributed() or not seconds:
        return seconds
    times = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.tolist()


@torch.no_grad()
def greedy(
    prefill: Callable[..., torch.Tensor], decode: Callable[..., torch.Tensor], input_ids: torch.Tensor,
    attention_mask: torch.Tensor, *, max_new_tokens: int, max_batch: int, prompt_len: int, max_seq: int,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None, pad_token_id: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, object]]:  # fmt: skip
    """Greedy generation (see the module docstring): (new tokens ``[rows, steps]``, step timings).
    ``eos_token_id``: one end-of-sequence token or several (a row that emits any of them is finished)."""
    rows = input_ids.shape[0]
    ends = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    eos_token_id = torch.tensor(ends, dtype=torch.long, device=device) if ends else None
    if pad_token_id is None and ends:
        pad_token_id = ends[0]  # as transformers' generate does without a pad token
    ids, window_mask, lengths = left_padded(input_ids.cpu(), attention_mask.cpu(), max_batch, prompt_len)
    mask = torch.cat([window_mask, torch.ones((max_batch, max_seq - prompt_len), dtype=torch.long)], dim=1)
    positions = (window_mask.cumsum(-1) - 1).masked_fill(window_mask == 0, 1)
    mask, ids, positions, lengths = (t.to(device) for t in (mask, ids, positions, lengths))
    logits, prefill_s = _timed(prefill, ids, positions, mask, torch.arange(prompt_len, device=device))
    decode_s: list[float] = []
    done = torch.zeros(max_batch, dtype=torch.bool, device=device)
    done[rows:] = True
    tokens = []
    for t in range(max_new_tokens):
        token = logits.float().argmax(-1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            done = done | torch.isin(token, eos_token_id)
        tokens.append(token)
        if t == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        position = (lengths + t)[:, None]
        slot = torch.tensor([prompt_len + t], device=device)
        logits, seconds = _timed(decode, token[:, None], position, mask, slot)
        decode_s.append(seconds)
    prefill_s, *decode_s = _slowest([prefill_s, *decode_s])
    return torch.stack(tokens, dim=1)[:rows].cpu(), {"prefill_s": prefill_s, "decode_s": decode_s}
