"""Batched greedy decoding and continuation scoring through the model state, with results that do not depend on
the batch.

Every prompt is prefilled through the model state in chunks of whole memory segments, exactly as
`lm2 generate` does (lm2cli.generation.generator), so any length works with an attention window or memory.
Batching must not change a single number, and padding would: the model keeps one position counter for the
whole batch, so a left-padded row would see its tokens at other positions and write padding into its memory
bank at other segment boundaries. So rows are never padded while they build their state:

    sort the prompts by length and take them `batch_size` at a time;
    feed the group's common prefix together (every row is still reading its own real tokens), chunk by chunk;
    when the shortest rows end, split them off with their state (`select_rows`) and go on with the rest;
    decode each set of equal-length rows together, token by token, until every row has stopped.

Right padding is harmless only where nothing reads the state afterwards: continuation scoring pads the
continuations of one context on the right, because a causal model's logits at a position never depend on
later tokens.

`select_rows` relies on the model contract that every tensor in a state has the batch as its first dimension
(docs/internals.md); ints (positions, segment fill) are shared by the rows, which is why they must match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from lm2cli.generation.generator import last_logits, prefill_chunk_len


def select_rows(state, rows: list[int]):
    """The state of the batch rows `rows` (in that order; repeats allowed) of a batched model state."""
    index: dict[torch.device, Tensor] = {}

    def pick(x):
        if isinstance(x, Tensor):
            if x.dim() == 0:
                return x
            if x.stride(0) == 0:  # one row broadcast over the batch (an initial memory bank): stay broadcast
                return x[:1].expand(len(rows), *x.shape[1:])
            if x.device not in index:
                index[x.device] = torch.tensor(rows, dtype=torch.long, device=x.device)
            return x.index_select(0, index[x.device])
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: pick(getattr(x, f.name)) for f in dataclasses.fields(x)
                                             if f.init})
        if isinstance(x, (tuple, list)):
            return type(x)(pick(v) for v in x)
        return x

    return pick(state)


@dataclass
class Prefilled:
    """Rows of one group whose prompts have the same length, after their prefill."""

    rows: list[int]  # indices into the prompt list
    logits: Tensor  # (b, V) float32: the next-token logits after each prompt
    state: object  # the model state of these b rows


class StateRunner:
    """Runs a model through its state in segment-aligned chunks; greedy decoding and continuation scoring."""

    def __init__(self, model, segment_len: int, device: torch.device | str, batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.device = torch.device(device)
        self.segment_len = segment_len
        self.chunk_len = prefill_chunk_len(segment_len)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype

    def chunk_for(self, rows: int) -> int:
        """Tokens per forward call for `rows` rows: `chunk_len`, or less when the model would split a call that
        long itself. An lm2 model runs a no-grad call over more than NO_GRAD_CHUNK_TOKENS (rows x tokens) in
        pieces and concatenates their logits, which cost 7 % of a 16-row prefill (profiled, 1k prompts); calling
        it with pieces of that size gives the same logits (the model's own boundaries) without the copy. Whole
        segments, so chunk boundaries stay where one-at-a-time prefill puts them."""
        budget = getattr(self.model, "NO_GRAD_CHUNK_TOKENS", None)  # test models have none: they never split
        if budget is None:
            return self.chunk_len
        return min(self.chunk_len, max(self.segment_len, budget // rows // self.segment_len * self.segment_len))

    def forward(self, ids: Tensor, state, last_only: bool = False):
        """(logits (b, t, V), state); `last_only`: (b, 1, V), the last position's, the only one computed."""
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        with ctx:
            if last_only:
                logits, state = last_logits(self.model, ids, state)
                return logits[:, None], state
            return self.model(ids, state)

    # ------------------------------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> Iterator[Prefilled]:
        """Prefill every prompt (each non-empty), yielding sets of equal-length rows as they finish."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            yield from self._prefill_group(prompts, order[start:start + self.batch_size])

    def _prefill_group(self, prompts: list[list[int]], active: list[int]) -> Iterator[Prefilled]:
        state = self.model.init_state(len(active), device=self.device)
        pos = 0
        chunk = self.chunk_for(len(active))
        while active:
            end = len(prompts[active[0]])  # the shortest remaining prompt
            ids = torch.tensor([prompts[i][pos:end] for i in active], dtype=torch.long, device=self.device)
            logits, offset = None, pos
            while pos < end:  # chunk boundaries at multiples of whole segments, as `lm2 generate` prefills
                stop = min(end, (pos // chunk + 1) * chunk)
                logits, state = self.forward(ids[:, pos - offset:stop - offset], state, last_only=True)
                pos = stop
            last = logits[:, -1].float()
            n_done = sum(1 for i in active if len(prompts[i]) == end)
            done, active = active[:n_done], active[n_done:]
            if not active:
                yield Prefilled(done, last, state)
                return
            yield Prefilled(done, last[:n_done], select_rows(state, list(range(n_done))))
            state = select_rows(state, list(range(n_done, n_done + len(active))))

    # ------------------------------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
               on_done=None) -> list[list[int]]:
        """Greedy continuation of each prompt until EOS (not included) or max_new_tokens tokens.

        `on_done(rows)` is called with the prompt indices of each finished set, for progress reporting.
        """
        out: list[list[int]] = [[] for _ in prompts]
        for group in self.prefill(prompts):
            for row, tokens in zip(group.rows, self._decode(group, max_new_tokens, eos_id), strict=True):
                out[row] = tokens
            if on_done is not None:
                on_done(group.rows)
        return out

    def _decode(self, group: Prefilled, max_new_tokens: int, eos_id: int) -> list[list[int]]:
        logits, state = group.logits, group.state
        new: list[list[int]] = [[] for _ in group.rows]
        finished = [False] * len(group.rows)
        for step in range(max_new_tokens):
            tokens = logits.argmax(dim=-1)
            for i, token in enumerate(tokens.tolist()):
                if not finished[i]:
                    if token == eos_id:
                        finished[i] = True
                    else:
                        new[i].append(token)
            if all(finished) or step + 1 == max_new_tokens:
                break
            # finished rows go on decoding with the others: their tokens are ignored and cannot reach the
            # other rows, and keeping the batch whole avoids copying states
            step_logits, state = self.forward(tokens[:, None], state)
            logits = step_logits[:, -1].float()
        return new

    # ------------------------------------------------------------------------------- continuation scores

    @torch.inference_mode()
    def continuation_scores(self, contexts: list[list[int]], continuations: list[list[list[int]]],
                            on_done=None) -> list[list[tuple[float, bool]]]:
        """(log-probability, greedy?) of each continuation of each context (contexts non-empty).

        A continuation is greedy when every one of its tokens is the argmax given the tokens before it.
        `on_done(rows)` is called with the context indices of each finished set.
        """
        out: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        for group in self.prefill(contexts):
            first = torch.log_softmax(group.logits, dim=-1)  # (b, V): the first continuation token
            pairs = [(j, cont) for j, row in enumerate(group.rows) for cont in continuations[row]]
            rest = self._continue(group.state, pairs) if any(len(c) > 1 for _, c in pairs) else None
            scored = []
            for n, (j, cont) in enumerate(pairs):
                if not cont:
                    scored.append((0.0, True))
                    continue
                logprob = float(first[j, cont[0]])
                greedy = int(first[j].argmax()) == cont[0]
                if len(cont) > 1:
                    lp, am = rest
                    targets = torch.tensor(cont[1:], device=lp.device)
                    steps = lp[n, :len(cont) - 1]
                    logprob += float(steps.gather(1, targets[:, None]).sum())
                    greedy = greedy and bool((am[n, :len(cont) - 1] == targets).all())
                scored.append((logprob, greedy))
            it = iter(scored)
            for row in group.rows:
                out[row] = [next(it) for _ in continuations[row]]
            if on_done is not None:
                on_done(group.rows)
        return out

    def _continue(self, state, pairs: list[tuple[int, list[int]]]) -> tuple[Tensor, Tensor]:
        """Log-softmax and argmax at every position of each continuation but its last token, all continuations
        of the group in one right-padded batch through copies of their context's state."""
        width = max(len(c) for _, c in pairs) - 1
        ids = torch.zeros(len(pairs), max(1, width), dtype=torch.long, device=self.device)
        for n, (_, cont) in enumerate(pairs):
            if len(cont) > 1:
                ids[n, :len(cont) - 1] = torch.tensor(cont[:-1], device=self.device)
        logits, _ = self.forward(ids, select_rows(state, [j for j, _ in pairs]))
        logits = logits.float()
        return torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1)
