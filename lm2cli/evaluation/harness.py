"""An lm-evaluation-harness model class over an lm2 checkpoint (extra "harness": pip install "lm2[harness]").

From Python:

    import lm_eval
    from lm2cli.evaluation.harness import Lm2LM

    lm = Lm2LM(path="runs/small")                     # a run, a checkpoint or a recipe file
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    # importing this module also registers the name "lm2":
    #   lm_eval.simple_evaluate(model="lm2", model_args="path=runs/small,batch_size=8", tasks=[...])

From the command line: `lm2 eval RUN --set 'eval.harness_tasks=["lambada_openai"]'` (with
`eval.harness_include` for a directory of your own task YAML files).

Every request goes through the model state in segment-aligned chunks (lm2cli/evaluation/decode.py), so
windowed and memory models take contexts of any length. Requests sharing a context are prefilled once.
`generate_until` decodes greedily (lm2 eval is deterministic; sampling settings of a task are ignored).
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError('lm2cli.evaluation.harness needs lm-evaluation-harness: pip install "lm2[harness]" '
                      '(or pip install lm-eval)') from e

import torch

from lm2cli.errors import Lm2Error
from lm2cli.evaluation.decode import StateRunner
from lm2cli.evaluation.multiple_choice import encode_pair
from lm2cli.evaluation.perplexity import PositionLoss, score_sequences

DEFAULT_MAX_GEN_TOKS = 256


@register_model("lm2")
class Lm2LM(LM):
    """lm-evaluation-harness `LM` for an lm2 model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, path: str | None = None, model=None, tokenizer=None, recipe=None, device: str = "auto",
                 batch_size: int | str = 16, max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
                 verify_checksums: bool | str = True, dtype: str = "auto"):
        super().__init__()
        from lm2cli.evaluation.models import autocast_dtype, resolve_device

        dev = resolve_device(str(device))
        amp = autocast_dtype(dev, dtype)  # an unknown dtype fails here, before a checkpoint is loaded
        if model is None:
            if path is None:
                raise Lm2Error("Lm2LM needs a checkpoint (path=...) or a loaded model, tokenizer and recipe")
            from lm2cli.checkpoint import load_for_inference, resolve_target

            # lm_eval passes --model_args values as strings: "verify_checksums=False" must mean False
            verify = str(verify_checksums).lower() not in ("false", "0", "no")
            model, tokenizer, recipe = load_for_inference(resolve_target(path).checkpoint, device=dev,
                                                          verify_checksums=verify)
        self.model, self.tokenizer, self.recipe = model.eval(), tokenizer, recipe
        self.runner = StateRunner(model, recipe.memory.segment_len, dev, int(batch_size), amp)
        self.max_gen_toks = int(max_gen_toks)
        full_attention = recipe.attention.window == 0 and recipe.model.arch != "rmt"
        self.max_length = recipe.model.max_seq_len if full_attention else None  # None: any length

    # ---------------------------------------------------------------------------------- loglikelihood

    def _fit(self, context: list[int], room: int) -> list[int]:
        """The context a full-attention model can take with `room` more tokens after it: its last tokens, as
        the harness's Hugging Face model truncates."""
        if self.max_length is None or len(context) + room <= self.max_length:
            return context
        return context[-max(1, self.max_length - room):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts: list[list[int]] = []
        continuations: list[list[list[int]]] = []
        index: dict[tuple[int, ...], int] = {}
        where = []
        for request in requests:
            context, continuation = request.args
            ctx_ids, cont_ids = encode_pair(self.tokenizer, context, continuation)
            ctx_ids = self._fit(ctx_ids, len(cont_ids))
            i = index.setdefault(tuple(ctx_ids), len(contexts))
            if i == len(contexts):  # a new context: prefilled once for all its continuations
                contexts.append(ctx_ids)
                continuations.append([])
            where.append((i, len(continuations[i])))
            continuations[i].append(cont_ids)
        scores = self.runner.continuation_scores(contexts, continuations)
        return [scores[i][j] for i, j in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [self._rolling(request.args[0]) for request in requests]

    def _rolling(self, text: str) -> float:
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
        if len(ids) < 2:
            return 0.0
        if self.max_length is None or len(ids) <= self.max_length:  # one pass through the state
            rows = torch.tensor([ids], dtype=torch.long)
            byte_lengths = torch.zeros(self.tokenizer.vocab_size, dtype=torch.long)
            with torch.inference_mode():
                scores = score_sequences(self.runner, rows, byte_lengths, PositionLoss([0, len(ids)]))
            return -scores.loss_sum
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=ids[1:], prefix_token=ids[0], max_seq_len=self.max_length, context_len=1)]
        scores = self.runner.continuation_scores([list(c) for c, _ in pairs], [[list(p)] for _, p in pairs])
        return sum(s[0][0] for s in scores)

    # -------------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for n, request in enumerate(requests):
            _, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks))), []).append(n)
        for (until, max_new), members in groups.items():
            prompts = [[self.tokenizer.bos_id] + self.tokenizer.encode(requests[n].args[0]) for n in members]
            prompts = [self._fit(p, max_new) for p in prompts]
            for n, ids in zip(members, self.runner.greedy(prompts, max_new, self.tokenizer.eos_id), strict=True):
                out[n] = cut_at_stop(self.tokenizer.decode(ids), until)
        return out


def cut_at_stop(text: str, stops) -> str:
    """`text` before the earliest stop string."""
    cut = len(text)
    for s in stops:
        if s and (i := text.find(s)) >= 0:
            cut = min(cut, i)
    return text[:cut]


def metric_rows(name: str, results: dict) -> list[dict]:
    """The harness's {"task": {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}} as flat rows."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"model": name, "task": task, "metric": metric if filt == "none" else f"{metric} ({filt})",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def task_manager(tasks: list[str], include: str):
    """A TaskManager that finds `tasks`: only the include directory when it has them all (indexing the
    harness's thousands of built-in tasks takes a while), else the built-in tasks too."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise Lm2Error(f"eval.harness_tasks: unknown lm-evaluation-harness task(s) {', '.join(unknown)}"
                       + ("" if include else "; set eval.harness_include to a directory of your own task files"))
    return manager


def run_harness(lm: Lm2LM, name: str, cfg, manager) -> list[dict]:
    import lm_eval

    from lm2cli.data.corpus import _quiet_datasets

    _quiet_datasets()  # no retry chatter from the hub client: a failure is reported as one line
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.harness_tasks), task_manager=manager,
                                      num_fewshot=None if cfg.harness_fewshot < 0 else cfg.harness_fewshot,
                                      limit=cfg.harness_limit or None, log_samples=False, bootstrap_iters=1000)
    except Lm2Error:
        raise
    except Exception as e:  # a dataset that cannot be fetched offline, a malformed task file, ...
        raise Lm2Error(f"lm-evaluation-harness failed on {', '.join(cfg.harness_tasks)}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return metric_rows(name, out["results"])
