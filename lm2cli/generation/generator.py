"""The generation loop: prefill the prompt through the model state, then decode token by token.

    prompt --encode--> [BOS, ...] --prefill, one chunk of whole memory segments at a time--> state, logits
    loop: logits --sampling--> token --detokenize--> text --stop strings--> emitted text
          token --model(token, state)--> logits       (KV cache within the window, memory written every S)

The model contract (docs/internals.md) is that feeding a sequence in chunks through the returned state gives
the logits of one full forward pass. Prefill chunks are whole multiples of the memory segment length S, so
every memory write happens exactly where a full forward would do it and no chunk straddles two segments
needlessly. With a finite attention window each chunk attends to at most W cached tokens, so prefill time
and memory grow linearly with the prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lm2cli.errors import Lm2Error
from lm2cli.generation.detokenize import IncrementalDecoder
from lm2cli.generation.sampling import SamplingParams, choose_next, make_rng, process_logits
from lm2cli.generation.stopping import StopMatcher

# Prefill this many tokens per forward call (rounded down to whole segments, at least one segment): large
# enough to amortise per-call overhead, small enough that activations stay bounded on long prompts and that a
# windowed chunk does not compute many masked-out scores (it attends over W - 1 + chunk keys). Measured on
# the small recipe (CPU time, 512- and 4K-token prompts): 256 was fastest, 3-10% ahead of 512 and 20-35%
# ahead of 64 and of 1024.
PREFILL_CHUNK_TOKENS = 256


@dataclass
class GenerationResult:
    text: str                 # the generated text, cut before a stop string; the prompt is not included
    prompt_tokens: int        # prompt length in tokens, BOS included
    new_tokens: int           # tokens sampled (EOS and the token completing a stop string included)
    token_ids: list[int]
    stop_reason: str          # "eos", "stop" (a stop string matched) or "length" (max_new_tokens reached)
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def summary(self) -> dict:
        """The `--json` object for this prompt."""
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "stop_reason": self.stop_reason,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 1),
        }


def prefill_chunk_len(segment_len: int, target: int = PREFILL_CHUNK_TOKENS) -> int:
    return segment_len * max(1, target // segment_len)


def last_logits(model, ids: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """(the next-token logits (b, V) after `ids` (b, t), the new state): the model computes the LM head at the
    last position only (`logits_at`, part of the model contract): a prefill reads no other, and the head over a
    whole chunk cost 13 % of a batched 1k prefill at d 128."""
    at = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    at[:, -1] = True
    return model(ids, state, logits_at=at)


class Generator:
    """Continue prompts with a loaded model and tokenizer. One prompt at a time: padding a batch of prompts
    to a common length would shift positions and write padding into the memory.

    `compile=True` decodes with the static-shape step (lm2cli.model.static) compiled by torch.compile: the
    same tokens as the eager path, after a one-time compilation in `warm_up` (CUDA graphs on a GPU).
    """

    def __init__(self, model, tokenizer, recipe, device: torch.device | str | None = None, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.chunk_len = prefill_chunk_len(recipe.memory.segment_len)
        # bf16 autocast on GPU as in training; exact fp32 on CPU.
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.static = None
        self.warm = False
        if compile and recipe.memory.key_window > 1 and recipe.model.arch == "lm2":
            raise Lm2Error(f"--compile: the checkpoint's memory.key_window = {recipe.memory.key_window} has no "
                           f"static-shape decode step yet; generate without --compile (the eager decoder)")
        if compile:
            from lm2cli.model.static import StaticDecoder, compile_options

            self.static = StaticDecoder(model, batch_size=1, compile=True, **compile_options(self.device))

    # ------------------------------------------------------------------------------------------ checks

    def encode_prompt(self, prompt: str, where: str = "prompt") -> list[int]:
        """BOS + prompt tokens (training documents start with BOS). Empty or all-blank prompts are refused."""
        ids = self.tokenizer.encode(prompt) if prompt.strip() else []
        if not ids:
            kind = "empty" if not prompt else "empty (only whitespace)"
            raise Lm2Error(f"{where}: the prompt is {kind}; give some text to continue")
        return [self.tokenizer.bos_id, *ids]

    def check_length(self, prompt_tokens: int, params: SamplingParams, where: str = "prompt") -> None:
        """A full-attention model is refused past model.max_seq_len, the longest context it supports (its
        attention and KV cache grow with the whole sequence). With a window, or with RMT (attention never
        spans more than one segment, positions restart in each), there is no such limit."""
        if self.recipe.attention.window > 0 or self.recipe.model.arch == "rmt":
            return
        limit = self.recipe.model.max_seq_len
        if prompt_tokens + params.max_new_tokens > limit:
            raise Lm2Error(
                f"{where}: {prompt_tokens} prompt tokens + max_new_tokens {params.max_new_tokens} = "
                f"{prompt_tokens + params.max_new_tokens} exceeds model.max_seq_len = {limit} of this "
                f"full-attention model (attention.window = 0); shorten the prompt or lower --max-new-tokens")

    # ---------------------------------------------------------------------------------------- the loop

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, ids: torch.Tensor, state):
        with self._autocast():
            return self.model(ids, state)

    def _forward_last(self, ids: torch.Tensor, state):
        with self._autocast():
            return last_logits(self.model, ids, state)

    def _decoding(self):
        if self.static is None or not self.warm:
            return contextlib.nullcontext()
        return self.static.warmed_up()

    def _decode(self, token: torch.Tensor, state):
        """Logits (1, V) after one more token, and the state (the static decoder keeps its own)."""
        if self.static is None:
            logits, state = self._forward(token, state)
            return logits[:, -1].float(), state
        with self._autocast():
            return self.static.decode(token).float(), state

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Throwaway decoding: the first calls pay for lazy initialisation (kernels, allocator) and, with
        `compile`, for compiling the step and the segment boundary, which would otherwise show up in the
        first prompt's tokens/s (or halfway through it)."""
        bos = self.tokenizer.bos_id
        _, state = self.prefill([bos] * 2)
        steps = 1
        if self.static is not None:
            self.static.load(state)
            steps = self.recipe.memory.segment_len + 1  # through one memory write / RMT segment boundary
            if self.recipe.attention.window == 0 and self.recipe.model.arch != "rmt":
                steps = min(steps, self.recipe.model.max_seq_len - 3)
        token = torch.tensor([[bos]], device=self.device)
        for _ in range(steps):
            _, state = self._decode(token, state)
        self.warm = True

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]):
        """Run the prompt through a fresh state in chunks of whole segments; return (last logits, state)."""
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        state = self.model.init_state(1, device=self.device)
        logits = None
        for start in range(0, ids.size(1), self.chunk_len):
            logits, state = self._forward_last(ids[:, start:start + self.chunk_len], state)
        return logits.float(), state

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Continue `prompt` (text, or ids that already start with BOS). `on_text` receives each piece of
        text as soon as it is final; the pieces concatenate to `result.text`."""
        prompt_ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_length(len(prompt_ids), params)
        eos = self.tokenizer.eos_id
        rng = None if params.greedy else make_rng(params.seed, self.device)
        detok = IncrementalDecoder(self.tokenizer.decode, context=prompt_ids)
        stopper = StopMatcher(params.stop)
        # Every token so far, for the repetition penalty; preallocated so each step is a slice, not a cat.
        context = torch.empty(1, len(prompt_ids) + params.max_new_tokens, dtype=torch.long, device=self.device)
        context[0, :len(prompt_ids)] = torch.tensor(prompt_ids, device=self.device)
        n_context = len(prompt_ids)
        pieces: list[str] = []

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)

        t0 = self._now()
        logits, state = self.prefill(prompt_ids)
        if self.static is not None:
            self.static.load(state)
        t1 = self._now()
        new_ids: list[int] = []
        stop_reason = "length"
        with self._decoding():  # compiled: after warm_up, skip Dynamo's guard checks
            for step in range(params.max_new_tokens):
                if step < params.min_new_tokens:
                    logits[:, eos] = float("-inf")
                scores = process_logits(logits, context[:, :n_context], params)
                token = int(choose_next(scores, params, rng)[0])
                new_ids.append(token)
                context[0, n_context] = token
                n_context += 1
                if token == eos:
                    stop_reason = "eos"
                    break
                emit(stopper.feed(detok.push(token)))
                if stopper.stopped:
                    stop_reason = "stop"
                    break
                if step + 1 < params.max_new_tokens:  # the last token needs no forward pass
                    logits, state = self._decode(context[:, n_context - 1:n_context], state)
        if stop_reason != "stop":
            emit(stopper.feed(detok.flush()))  # e.g. an unfinished multi-byte character
            if stopper.stopped:
                stop_reason = "stop"
            emit(stopper.flush())
        t2 = self._now()
        return GenerationResult(text="".join(pieces), prompt_tokens=len(prompt_ids), new_tokens=len(new_ids),
                                token_ids=new_ids, stop_reason=stop_reason, prefill_seconds=t1 - t0,
                                decode_seconds=t2 - t1)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
