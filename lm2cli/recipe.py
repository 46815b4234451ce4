"""Typed recipe schema: the single source of truth for every recipe key, its type, default, range and help.

A recipe is a TOML file with one table per section (`[model]`, `[memory]`, ...). Loading it is strict:
unknown keys, wrong types and out-of-range values are all reported (with "did you mean" hints), together,
each as one line. Overrides (`--set train.lr=3e-4`) go through the same checks. The README's recipe
reference and `--print-recipe` are generated from the dataclasses below, so they cannot drift apart.
Relative paths inside a recipe are resolved against the current working directory, like any CLI tool.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from lm2cli.errors import RecipeError

BABI_TASKS = [f"qa{i}" for i in range(1, 11)]
BABILONG_LENGTHS = ["0k", "256", "512", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k"]
EVAL_KINDS = ["babilong", "perplexity", "multiple-choice", "harness"]
PROMPT_PARTS = ["instruction", "examples", "post_prompt"]


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        gt: float | None = None, items: list | None = None, allow_inf: bool = False) -> Any:
    """A schema field: default, help text and valid range (min/max inclusive, gt exclusive).

    `items` restricts the elements of a list field to a fixed vocabulary. Floats must be finite unless
    `allow_inf` (e.g. grad_clip, where inf means "only log the norm").
    """
    meta = {"help": help, "min": min, "max": max, "gt": gt, "items": items, "allow_inf": allow_inf}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The Llama-style backbone and which architecture to build on it."""

    arch: Literal["lm2", "vanilla", "rmt"] = opt(
        "lm2", "lm2: decoder + gated memory bank; vanilla: memory off; rmt: recurrent memory tokens")
    vocab_size: int = opt(0, "Vocabulary size; 0 = take it from the tokenizer", min=0)
    d_model: int = opt(256, "Hidden width d", min=8)
    n_layers: int = opt(4, "Number of decoder blocks", min=1)
    n_heads: int = opt(4, "Attention heads (must divide d_model)", min=1)
    n_kv_heads: int = opt(0, "Key/value heads for grouped-query attention; 0 = n_heads", min=0)
    ffn_hidden: int = opt(0, "SwiGLU hidden width; 0 = Llama rule (8/3·d rounded up to ffn_multiple_of)", min=0)
    ffn_multiple_of: int = opt(64, "Rounding for the automatic SwiGLU width", min=1)
    rope_theta: float = opt(10000.0, "RoPE base frequency", gt=0)
    norm_eps: float = opt(1e-5, "RMSNorm epsilon", gt=0)
    tie_embeddings: bool = opt(True, "Share the input embedding and output projection weights")
    init_std: float = opt(
        0.0, "Standard deviation of the normal weight initialisation; 0 = 1/√d_model (0.088 at d_model 128)", min=0)
    max_seq_len: int = opt(
        4096, "Longest context a full-attention model (attention.window = 0) accepts; no limit with a window",
        min=1)


@dataclass
class MemoryConfig:
    """The LM2 memory bank (arch = lm2) or RMT memory tokens (arch = rmt)."""

    slots: int = opt(16, "Memory slots N (lm2) or memory tokens m (rmt)", min=1)
    slot_dim: int = opt(0, "Slot width d_m (lm2); 0 = d_model", min=0)
    heads: int = opt(4, "Heads of the memory cross-attention (must divide d_model)", min=1)
    layers: str | int | list[int] = opt(
        "all", 'Blocks with memory: "all", an integer K (the first K blocks) or a list of block indices')
    segment_len: int = opt(128, "Segment length S: memory is read every token and written every S tokens", min=1)
    bptt: int = opt(0, "Backpropagate through the last N segments only; 0 = through all", min=0)
    init: Literal["identity", "learned"] = opt(
        "identity", "identity: slot r starts as e_r; learned: the initial bank is a trained parameter")
    carry: bool = opt(False, "Carry the memory (detached) from one training batch to the next, as the paper's code")
    # -4: the gate starts at 0.018, so the untrained memory does not add noise to a backbone that does not need it
    # yet (at 0 its read after the first write is as loud as the embeddings); it opens when the read helps.
    out_gate_bias: float = opt(-4.0, "Initial output-gate bias; negative starts the memory path nearly closed")
    forget_gate_bias: float = opt(1.0, "Initial forget-gate bias; positive remembers by default")
    # Without it the 16 slots of every qa1 LM2 are copies of one vector, from init on (equal rows have equal keys,
    # so they get equal writes and gradients). With it block 0's slots stay apart after training, blocks 1-3 still
    # collapse, and accuracy did not move consistently (docs/results.md): an option for research, off by default.
    slot_keys: bool = opt(
        False, "Add a learned per-slot vector to every slot's key, so slots stay distinguishable after writes")
    # attend: with slots alike every write overwrites the whole bank, and the qa1 LM2s answered the story's last
    # place (docs/results.md); compete lets a write address some slots and leave the others. Measured on qa1 at
    # 1k (one seed): the slots stay apart, but they all still write the fact's place, and accuracy did not move.
    # delta addresses the write by the tokens instead (an associative matrix): the first memory here to bind
    # names to places beyond the window (qa1, 3 seeds: 59-95 % flat from 1k to 16k; docs/results.md, fifth pass).
    write: Literal["attend", "compete", "delta"] = opt(
        "attend", "Write: attend = each slot takes a softmax over the segment's tokens (the paper); compete = each "
                  "token's weight is split over the slots it reads from, and a slot moves as much as it was chosen "
                  "(slots no token chose keep their content); delta = no slots: an associative matrix per head, "
                  "each token writes a value under its own key by the delta rule and reads with its query "
                  "(memory.slots, slot_dim, slot_keys, update and the gate biases but out_gate_bias do not apply)")
    # Every token of a trained qa1 LM2-delta wrote with β 0.3-0.9, haystack as much as facts (docs/results.md): the
    # matrix fills with haystack. A negative offset makes writing the exception the model has to learn.
    write_strength_bias: float = opt(
        0.0, "delta: offset added to every token's write-strength logit, β = σ(x W_β + b); negative writes sparsely "
             "from the start (-3: β ≈ 0.05), 0 = the plain delta rule")
    # The block-1 bank bound only from bases whose block-1 input at the place word already held the person; a key
    # window of 8 reaches the person 4-5 tokens back, a value window lets the person's own token hold the place.
    # Measured on qa1 (docs/results.md, eleventh pass): neither made the binding learnable; research options.
    key_window: int = opt(
        1, "delta: each token's key and read query mix its own and the K - 1 tokens before it in the segment "
           "(learned per-channel weights, as DeltaNet's short convolution); 1 = the token alone", min=1)
    value_window: int = opt(
        1, "delta: the value written under each token's key mixes its own and the V - 1 tokens after it in the "
           "segment (the bank is written when the segment is complete, so this stays causal); 1 = the token alone",
        min=1)
    update: Literal["sum", "normalized"] = opt(
        "sum", "Bank update: sum = g_in*tanh(U) + g_f*M (the spec; its entries can grow with every segment), "
               "normalized = the same divided by g_in + g_f (a weighted mean: entries stay within [-1, 1])")


@dataclass
class AttentionConfig:
    """Self-attention of every block."""

    window: int = opt(0, "Sliding window W (tokens attended, itself included); 0 = full causal attention", min=0)


@dataclass
class TokenizerConfig:
    """The SentencePiece tokenizer trained by `lm2 tokenize` (or reused)."""

    path: str = opt("", "Reuse this existing SentencePiece .model file instead of training one")
    type: Literal["bpe", "unigram"] = opt("bpe", "SentencePiece model type")
    vocab_size: int = opt(4096, "Vocabulary size to train", min=16, max=1_000_000)
    byte_fallback: bool = opt(True, "Encode unknown characters as bytes instead of <unk>")
    character_coverage: float = opt(0.9995, "Share of characters the vocabulary must cover", gt=0, max=1)
    sample_sentences: int = opt(1_000_000, "Lines from the start of the corpus the tokenizer is trained on", min=1)
    answer_token: str = opt("<ans>", "Reserved separator between a question and its answer (fine-tuning)")
    extra_symbols: list[str] = opt([], "More user-defined symbols reserved in the vocabulary")


@dataclass
class DataConfig:
    """The pretraining corpus and where its tokenizer and token shards are written."""

    source: Literal["builtin", "files", "hub"] = opt(
        "builtin", "builtin: generated bAbI-world stories and filler prose (no download); files; hub")
    dir: str = opt("data/small", "Directory for the tokenizer, train.bin, val.bin and meta.json")
    files: list[str] = opt([], "Files, directories or globs of .txt, .jsonl, .json or .parquet (source = files)")
    text_field: str = opt("text", "Field holding the text in .jsonl, .json and .parquet records")
    text_unit: Literal["file", "paragraph", "line"] = opt(
        "file", "What one document of a .txt file is: the whole file, a blank-line paragraph, or a line")
    hub_name: str = opt("", "Hugging Face dataset name (source = hub)")
    hub_config: str = opt("", "Hugging Face dataset configuration")
    hub_split: str = opt("train", "Hugging Face dataset split")
    hub_revision: str = opt("", "Hugging Face dataset revision (commit or tag) to pin; empty = latest")
    hub_streaming: bool = opt(False, "Stream the hub dataset instead of downloading it whole")
    hub_max_docs: int = opt(0, "Stop after this many hub documents; 0 = all", min=0)
    builtin_tasks: list[str] = opt(BABI_TASKS, "bAbI tasks the built-in story generator draws from",
                                   items=BABI_TASKS)
    builtin_stories: int = opt(20000, "Stories the built-in generator writes", min=1)
    builtin_filler: bool = opt(True, "Mix templated narrative filler prose into the built-in corpus")
    builtin_repeat: float = opt(0.0, "Share of built-in documents followed by a verbatim copy (copying pays: "
                                     "grows the induction heads retrieval tasks need)", min=0, max=1)
    val_fraction: float = opt(0.02, "Share of documents held out for validation", gt=0, max=0.5)
    seed: int = opt(1234, "Seed of the built-in generator and the train/val split")
    workers: int = opt(0, "Encoding processes; 0 = one per CPU core", min=0)
    on_decode_error: Literal["fail", "skip"] = opt(
        "fail", "Undecodable bytes in a text file: fail (naming file and offset) or skip and count them")


@dataclass
class BabilongConfig:
    """BABILong-style evaluation and fine-tuning sets (bAbI facts hidden in haystack text)."""

    dir: str = opt("data/babilong", "Output directory, in the hub layout qaN/<length>.json")
    split: Literal["train", "test"] = opt("test", "test: test stories and held-out books; train: the train side")
    tasks: list[str] = opt(BABI_TASKS, "bAbI tasks to build", items=BABI_TASKS)
    lengths: list[str] = opt(["0k", "1k", "2k", "4k"], "Context lengths, in tokens of our tokenizer",
                             items=BABILONG_LENGTHS)
    samples: int = opt(100, "Samples per task and length", min=1)
    facts: str = opt("synthetic", 'Where stories come from: "synthetic" (built-in generator) or a bAbI v1.2 directory')
    haystack: str = opt("builtin", 'Haystack text: "builtin" filler, text files/globs, or a hub dataset name')
    haystack_field: str = opt("text", "Field holding the text of a hub haystack dataset")
    margin: int = opt(300, "Tokens kept free for the prompt: context budget = length - margin (fine-tuning "
                           "sets: 20)", min=0)
    fact_window: list[float] = opt([0.0, 1.0], "Facts are placed between these fractions of the haystack "
                                               "sentences, e.g. [0.0, 0.25] for fact-position studies")
    max_sentence_tokens: int = opt(0, "Skip haystack sentences longer than this many tokens; 0 = keep all",
                                   min=0)
    haystack_skip_names: bool = opt(False, "Skip haystack sentences that name a bAbI person (Mary, John, ...): "
                                           "a novel's own Mary is a distractor no bAbI story has; BABILong's "
                                           "PG19 haystack keeps them")
    seed: int = opt(1234, "Seed of story choice, haystack sampling and fact placement")


@dataclass
class TrainConfig:
    """The one training loop shared by `lm2 pretrain` and `lm2 finetune`."""

    steps: int = opt(1000, "Optimizer steps (per curriculum stage when fine-tuning)", min=1)
    batch_size: int = opt(8, "Sequences per micro-batch (per process)", min=1)
    seq_len: int = opt(512, "Tokens per training sequence; should span several memory segments", min=2)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step", min=1)
    lr: float = opt(1e-3, "Peak learning rate", gt=0)
    min_lr: float = opt(1e-4, "Floor of the cosine decay", min=0)
    warmup_steps: int = opt(100, "Linear warm-up steps", min=0)
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrix weights only", min=0)
    beta1: float = opt(0.9, "AdamW beta1", min=0, max=1)
    beta2: float = opt(0.95, "AdamW beta2", min=0, max=1)
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value; inf = only log it", gt=0, allow_inf=True)
    memory_lr_mult: float = opt(1.0, "Learning-rate multiplier for memory parameters", gt=0)
    seed: int = opt(1234, "Seed of initialisation, data order and sampling")
    deterministic: bool = opt(False, "Use deterministic algorithms (slower on GPU)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu")
    dtype: Literal["auto", "fp32", "bf16"] = opt("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = opt(False, "Compile the model with torch.compile")
    activation_checkpointing: bool = opt(False, "Recompute block activations in the backward pass to save memory")
    eval_every: int = opt(100, "Validate every N steps; 0 = only at the end", min=0)
    eval_batches: int = opt(20, "Validation batches per evaluation (of batch_size rows per process)", min=1)
    save_every: int = opt(100, "Save a checkpoint every N steps; 0 = only at the end", min=0)
    keep_last: int = opt(3, "Checkpoints kept besides the best one", min=1)
    log_every: int = opt(10, "Log metrics every N steps", min=1)
    distributed: Literal["ddp", "fsdp"] = opt(
        "ddp", "Strategy under torchrun: ddp, or fsdp for models too big for one GPU")


@dataclass
class FinetuneConfig:
    """What `lm2 finetune` starts from and trains on (the loop itself is `[train]`)."""

    init_from: str = opt("", "An lm2 checkpoint or run directory, or a Hugging Face Llama directory")
    init_checkpoint: Literal["best", "latest"] = opt(
        "best", "Which checkpoint of a run directory init_from takes: best (lowest validation loss) or latest")
    format: Literal["babilong", "jsonl"] = opt(
        "babilong", "babilong: rows {input, question, target}; jsonl: rows {prompt, response}")
    data: str = opt("data/babilong-train", "BABILong directory (hub layout) or .jsonl file")
    val_data: str = opt("", "Validation data in the same format; empty = hold out part of `data`")
    # Replay: the long stages of the qa1 pilots forgot the 0k task they started from (95 -> 57 %) unless some 0k
    # rows stayed among the training rows (docs/results.md, sixth and seventh passes).
    replay_data: str = opt("", "More training rows in the same format, added to `data`'s in every stage (e.g. 0k "
                               "rows kept while training on long rows); never used for validation")
    tasks: list[str] = opt(["qa1"], "bAbI tasks to fine-tune on (format = babilong)", items=BABI_TASKS)
    stages: list[int] = opt([1], "Curriculum: memory segments per sample in each stage, e.g. [1, 2, 4]")
    facts_start: int = opt(0, "Fact-count curriculum (babilong rows): train first on rows of at most this many "
                              "facts, one more each time the training exact match reaches facts_step_em; 0 = off",
                           min=0)
    facts_step_em: float = opt(0.9, "Training exact match over the last facts_window steps that allows one more "
                                    "fact per row", gt=0, max=1)
    facts_window: int = opt(100, "Steps whose training exact match decides a step-up of the fact curriculum", min=1)


@dataclass
class EvalConfig:
    """`lm2 eval`: the BABILong task x length grid, perplexity against position, multiple choice, lm-eval tasks."""

    run: list[str] = opt(["babilong", "perplexity"], "What to evaluate; setting mc_data or harness_tasks adds "
                         "multiple-choice or harness", items=EVAL_KINDS)
    data: str = opt("data/babilong", "BABILong directory (hub layout) or hub dataset name")
    tasks: list[str] = opt(["qa1", "qa2", "qa3", "qa4", "qa5"], "Tasks to evaluate", items=BABI_TASKS)
    lengths: list[str] = opt(["0k", "1k", "2k", "4k"], "Lengths to evaluate", items=BABILONG_LENGTHS)
    samples: int = opt(100, "Samples per task and length (the first ones of each file)", min=1)
    mode: Literal["finetune-em", "prompt-compat", "prompt-strict"] = opt(
        "finetune-em", "Scoring: exact match after fine-tuning, or the BABILong label-set metric (upstream's "
        "quirks kept, or fixed)")
    prompt_parts: list[str] = opt(["instruction", "examples", "post_prompt"],
                                  "Parts of the BABILong-style prompt (prompt modes)", items=PROMPT_PARTS)
    max_new_tokens: int = opt(0, "Tokens generated per answer; 0 = 10 for finetune-em, 20 for prompt modes", min=0)
    retrieval: Literal["", "bm25"] = opt(
        "", 'bm25: also evaluate each model on only the retrieval_k context sentences that best match the '
        'question (its own row; extra "retrieval")')
    retrieval_k: int = opt(5, "Context sentences kept by the retrieval baseline", min=1)
    no_carry: bool = opt(False, "Also evaluate each model with a memory (lm2, rmt) on the BABILong grid with "
                                "nothing carried across segments: every segment reads the initial memory (its own "
                                "row \"<model>+no-carry\"; a control of what the memory carries)")
    batch_size: int = opt(16, "Samples decoded (or sequences scored) together; results do not depend on it", min=1)
    ppl_data: list[str] = opt([], "Text files, directories or globs for perplexity; empty = the recipe's "
                                  "validation shards (data.dir/val.bin)")
    ppl_seq_len: int = opt(2048, "Tokens per scored sequence, fed segment by segment through the model state",
                           min=2)
    ppl_tokens: int = opt(65536, "Tokens scored at most (whole sequences)", min=1)
    mc_data: str = opt("", "Multiple choice (MMLU layout): a .csv/.jsonl/.parquet file, a directory, or a hub "
                           "name such as cais/mmlu; setting it adds multiple-choice to run")
    mc_shots: int = opt(0, "Solved examples from the dev split before each question (MMLU uses 5)", min=0)
    mc_subjects: list[str] = opt([], "Subjects to evaluate; empty = all")
    mc_samples: int = opt(0, "Questions per subject at most; 0 = all", min=0)
    harness_tasks: list[str] = opt([], "lm-evaluation-harness tasks (extra \"harness\"); setting it adds harness "
                                       "to run")
    harness_include: str = opt("", "Directory of extra lm-evaluation-harness task YAML files")
    harness_fewshot: int = opt(-1, "Few-shot examples for harness tasks; -1 = each task's default", min=-1)
    harness_limit: int = opt(0, "Documents per harness task at most; 0 = all", min=0)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu")
    dtype: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "auto = bf16 autocast on CUDA, fp32 on CPU; fp32 on CUDA keeps a GPU evaluation comparable "
                "with a CPU one")
    threads: int = opt(0, "CPU threads; 0 = 1 for models under 100M parameters (as lm2 generate), else torch's "
                          "default", min=0)
    name: str = opt("", "Name of the results directory <run>/eval/<name>; empty = a timestamp (--out overrides)")


@dataclass
class GenerateConfig:
    """Sampling defaults of `lm2 generate` (each has a command-line flag too)."""

    max_new_tokens: int = opt(200, "Tokens to generate at most", min=1)
    min_new_tokens: int = opt(0, "End-of-sequence is suppressed until this many tokens are generated", min=0)
    temperature: float = opt(0.8, "Softmax temperature; 0 = greedy", min=0)
    top_k: int = opt(0, "Sample among the k most likely tokens; 0 = off", min=0)
    top_p: float = opt(1.0, "Nucleus sampling: smallest set with this probability mass; 1 = off", gt=0, max=1)
    repetition_penalty: float = opt(1.0, "Penalty for tokens already seen (>1 discourages repeats); 1 = off", gt=0)
    repetition_window: int = opt(0, "Only the last N tokens count for the repetition penalty; 0 = all", min=0)
    stop: list[str] = opt([], "Stop when the generated text contains one of these strings")
    seed: int = opt(1234, "Sampling seed: the same seed gives the same text")
    compile: bool = opt(False, "Decode with the static-shape step compiled by torch.compile (--compile): "
                               "same tokens, a one-time compilation first")


@dataclass
class OutputConfig:
    """Where a run writes checkpoints, metrics and its resolved recipe."""

    dir: str = opt("runs/small", "Run directory (overridden by --out)")
    tensorboard: bool = opt(True, "Also write TensorBoard logs when tensorboard is installed")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    babilong: BabilongConfig = field(default_factory=BabilongConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_toml(self) -> str:
        return dump_toml(self)

    def memory_layer_indices(self) -> list[int]:
        """Indices of the blocks that carry LM2 memory (empty unless arch = lm2)."""
        if self.model.arch != "lm2":
            return []
        layers, n = self.memory.layers, self.model.n_layers
        if layers == "all":
            return list(range(n))
        if isinstance(layers, int):
            return list(range(layers))
        return sorted(set(layers))


# ------------------------------------------------------------------------------------------- schema walk


def sections() -> dict[str, type]:
    """Section name -> dataclass, in file order."""
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


def section_fields(section_cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Key -> (type, field) of one section."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in sections().items() for k in section_fields(cls)]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return {int: "integer", float: "float", bool: "boolean", str: "string"}.get(tp, str(tp))


# ------------------------------------------------------------------------------------------- validation


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to schema type `tp` or raise _Mismatch. Only lossless conversions."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        item_tp = typing.get_args(tp)[0]
        return [_coerce(v, item_tp) for v in value]
    if origin is not None and type(None) not in typing.get_args(tp):  # a union: first member that fits
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not user input


def _range_problem(value: Any, meta: dict) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                return problem
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if meta.get("items") is not None and v not in meta["items"]:
                return f"must be among {', '.join(meta['items'])}"
            continue
        if isinstance(v, float) and math.isnan(v):
            return "must be a number, not nan"
        if isinstance(v, float) and math.isinf(v) and not meta.get("allow_inf"):
            return "must be a finite number"
        if meta.get("min") is not None and v < meta["min"]:
            return f"must be >= {meta['min']}"
        if meta.get("max") is not None and v > meta["max"]:
            return f"must be <= {meta['max']}"
        if meta.get("gt") is not None and v <= meta["gt"]:
            return f"must be > {meta['gt']}"
    return None


def text_problem(text: str) -> str | None:
    """Why `text` cannot be used as a path, prompt or setting (None if it can): a NUL character, or bytes that
    are not UTF-8 (Python keeps undecodable command-line bytes as lone surrogates, which cannot be written)."""
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid UTF-8 text (an undecodable byte at character {e.start})"
    return None


# Names other toolkits use for our keys, so "learning_rate" or "n_embd" still gets a useful hint.
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "max_steps": "steps", "max_iters": "steps", "iters": "steps",
    "micro_batch_size": "batch_size", "block_size": "seq_len", "max_seq_length": "seq_len",
    "context_length": "seq_len", "n_embd": "d_model", "dim": "d_model", "hidden_size": "d_model",
    "n_layer": "n_layers", "num_layers": "n_layers", "n_head": "n_heads", "num_heads": "n_heads",
    "n_query_groups": "n_kv_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
    "warmup": "warmup_steps", "warmup_iters": "warmup_steps", "clip": "grad_clip", "max_norm": "grad_clip",
    "gradient_accumulation_steps": "grad_accum", "num_slots": "slots", "mem_slots": "slots",
    "segment_length": "segment_len", "segment_size": "segment_len", "sliding_window": "window",
}


def check_value(value: Any, tp: Any, meta: dict) -> tuple[Any, str | None]:
    """(value converted to schema type `tp`, None), or (value, what is wrong) such as "expected float" or
    "must be >= 1". Shared by recipes, `--set` and other command-line values checked against the schema."""
    try:
        coerced = _coerce(value, tp)
    except _Mismatch:
        return value, f"expected {type_name(tp)}"
    return coerced, _range_problem(coerced, meta)


def _suggest(name: str, candidates: list[str]) -> str:
    prefix, _, last = name.rpartition(".")
    expanded = {c: c for c in candidates}
    for alias, target in ALIASES.items():
        for c in candidates:  # an alias counts only where its target exists among the candidates
            if c == target or c.endswith("." + target):
                expanded.setdefault(f"{c.rpartition('.')[0]}.{alias}" if "." in c else alias, c)
    close = difflib.get_close_matches(name, list(expanded), n=1, cutoff=0.6)
    if not close and prefix:
        close = difflib.get_close_matches(last, list(expanded), n=1, cutoff=0.6)
    return f" (did you mean '{expanded[close[0]]}'?)" if close else ""


def _fmt(value: Any) -> str:
    return toml_value(value) if _is_toml_value(value) else repr(value)


def _cross_checks(r: Recipe) -> list[str]:
    """Constraints that involve several keys; each names the keys and what would be valid."""
    p = []
    m = r.model
    if m.d_model % m.n_heads:
        p.append(f"model.n_heads = {m.n_heads} must divide model.d_model = {m.d_model}")
    elif (m.d_model // m.n_heads) % 2:
        p.append(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        p.append(f"model.n_kv_heads = {kv} must divide model.n_heads = {m.n_heads}")
    if m.arch == "lm2":
        if m.d_model % r.memory.heads:
            p.append(f"memory.heads = {r.memory.heads} must divide model.d_model = {m.d_model}")
        slot_dim = r.memory.slot_dim or m.d_model
        if slot_dim % r.memory.heads:
            p.append(f"memory.heads = {r.memory.heads} must divide memory.slot_dim = {slot_dim}")
        for key in ("key_window", "value_window"):
            size = getattr(r.memory, key)
            if size > 1 and r.memory.write != "delta":
                p.append(f'memory.{key} = {size} applies to memory.write = "delta" only (it is '
                         f'"{r.memory.write}"); set {key} = 1 or write = "delta"')
            elif size > r.memory.segment_len:
                p.append(f"memory.{key} = {size} must not exceed memory.segment_len = {r.memory.segment_len} "
                         f"(the window stays within a segment)")
        layers = r.memory.layers
        if isinstance(layers, str) and layers != "all":
            p.append(f'memory.layers = "{layers}": expected "all", an integer or a list of block indices')
        elif isinstance(layers, int) and not 1 <= layers <= m.n_layers:
            p.append(f"memory.layers = {layers}: must be between 1 and model.n_layers = {m.n_layers}")
        elif isinstance(layers, list):
            bad = [i for i in layers if not 0 <= i < m.n_layers]
            if bad or not layers:
                p.append(f"memory.layers = {_fmt(layers)}: indices must be in 0..{m.n_layers - 1} (non-empty)")
    if r.train.min_lr > r.train.lr:
        p.append(f"train.min_lr = {r.train.min_lr} must not exceed train.lr = {r.train.lr}")
    w = r.babilong.fact_window
    if len(w) != 2 or not 0.0 <= w[0] <= w[1] <= 1.0:
        p.append(f"babilong.fact_window = {_fmt(w)}: expected [start, end] with 0 <= start <= end <= 1")
    if r.tokenizer.answer_token in r.tokenizer.extra_symbols:
        p.append(f"tokenizer.extra_symbols repeats tokenizer.answer_token '{r.tokenizer.answer_token}'")
    if any(s < 1 for s in r.finetune.stages) or not r.finetune.stages:
        p.append(f"finetune.stages = {_fmt(r.finetune.stages)}: expected a non-empty list of positive integers")
    if r.finetune.facts_start and r.finetune.format != "babilong":
        p.append(f"finetune.facts_start = {r.finetune.facts_start}: the fact curriculum needs format = \"babilong\" "
                 f"rows (they list their facts); set facts_start = 0 for jsonl")
    elif r.finetune.facts_start and len(r.finetune.stages) > 1:
        p.append(f"finetune.facts_start = {r.finetune.facts_start} needs a single stage, finetune.stages = "
                 f"{_fmt(r.finetune.stages)} has {len(r.finetune.stages)}: learn the facts first (one stage), then "
                 f"start a staged run from it with finetune.init_from")
    return p


def _apply(recipe_dict: dict[str, Any], where: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    """Check a nested {section: {key: value}} mapping; return the coerced values that passed."""
    secs = sections()
    out: dict[str, dict[str, Any]] = {}
    for sec_name, table in recipe_dict.items():
        if sec_name not in secs:
            hint = _suggest(sec_name, list(secs))
            if not isinstance(table, dict):  # a top-level key like `lr = 1`: suggest the dotted key
                hint = hint or _suggest(sec_name, [k.split(".")[1] for k in all_keys()])
                dotted = [k for k in all_keys() if k.split(".")[1] == sec_name]
                hint = f" (did you mean '{dotted[0]}'?)" if dotted else hint
                problems.append(f"{where}: unknown top-level key '{sec_name}'{hint}; keys live in sections "
                                f"such as [train]")
            elif len(table) == 1 and _suggest(f"{sec_name}.{next(iter(table))}", all_keys()):
                dotted = f"{sec_name}.{next(iter(table))}"
                problems.append(f"{where}: unknown key '{dotted}'{_suggest(dotted, all_keys())}")
            else:
                problems.append(f"{where}: unknown section [{sec_name}]{hint}; valid sections: {', '.join(secs)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: '{sec_name}' must be a table ([{sec_name}]), got {_fmt(table)}")
            continue
        fields = section_fields(secs[sec_name])
        for key, value in table.items():
            dotted = f"{sec_name}.{key}"
            if key not in fields:
                hint = _suggest(key, list(fields)) or _suggest(dotted, all_keys())
                if not hint:
                    elsewhere = [k for k in all_keys() if k.endswith("." + key)]
                    hint = f" (did you mean '{elsewhere[0]}'?)" if elsewhere else ""
                problems.append(f"{where}: unknown key '{dotted}'{hint}")
                continue
            tp, f = fields[key]
            coerced, bad = check_value(value, tp, f.metadata)
            if bad:
                problems.append(f"{where}: {dotted} = {_fmt(value)}: {bad}")
                continue
            out.setdefault(sec_name, {})[key] = coerced
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is a TOML literal or else a bare string."""
    if "=" not in text:
        raise RecipeError([f"--set {text}: expected section.key=value, e.g. --set train.lr=3e-4"])
    dotted, raw = (s.strip() for s in text.split("=", 1))
    if dotted.count(".") != 1 or not all(dotted.split(".")):
        close = _suggest(dotted, all_keys())
        raise RecipeError([f"--set {text}: '{dotted}' is not a section.key name{close}"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `model.arch=rmt`
    section, key = dotted.split(".")
    return section, key, value


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read, check and resolve a recipe. Raises RecipeError listing every problem found.

    `path=None` starts from the built-in defaults; `overrides` are `section.key=value` strings.
    """
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            reason = "is a directory, not a recipe file" if path.is_dir() else "not found"
            raise RecipeError([f"recipe file {reason}: {path}"])
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise RecipeError([f"{where}: not UTF-8 text (byte offset {e.start}); a recipe is a TOML file"]) from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError([f"{where}: invalid TOML: {e}"]) from None
        values = _apply(data, where, problems)
    return _build(values, overrides, problems, str(path) if path is not None else "recipe")


def recipe_from_toml(text: str, where: str = "recipe") -> Recipe:
    """Parse a resolved recipe stored as text (e.g. inside a checkpoint) with the same checks."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError([f"{where}: invalid TOML: {e}"]) from None
    problems: list[str] = []
    return _build(_apply(data, where, problems), None, problems, where)


def apply_overrides(recipe: Recipe, overrides: list[str] | None, where: str = "--set") -> Recipe:
    """`recipe` with `section.key=value` overrides applied, checked exactly as `load_recipe` checks `--set`
    (types, ranges, unknown keys with "did you mean", then the cross-key checks on the result). This is how
    `--set` reaches a recipe stored in a checkpoint."""
    values = {sec: {key: _copy(getattr(getattr(recipe, sec), key)) for key in section_fields(cls)}
              for sec, cls in sections().items()}
    return _build(values, overrides, [], where)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value  # the new recipe shares no list with the old


def _build(values: dict[str, dict[str, Any]], overrides: list[str] | None, problems: list[str],
           where: str) -> Recipe:
    """The one way a Recipe is made: checked `values` plus `overrides`, then the cross-key checks. Raises
    RecipeError with every problem (those already in `problems` first)."""
    for text in overrides or []:
        try:
            section, key, value = parse_override(text)
        except RecipeError as e:
            problems.extend(e.problems)
            continue
        for sec, kv in _apply({section: {key: value}}, "--set", problems).items():
            values.setdefault(sec, {}).update(kv)
    if problems:
        raise RecipeError(problems)
    recipe = Recipe(**{sec: cls(**values.get(sec, {})) for sec, cls in sections().items()})
    problems = [f"{where}: {p}" for p in _cross_checks(recipe)]
    if problems:
        raise RecipeError(problems)
    return recipe


# --------------------------------------------------------------------------------------------- output


def _is_toml_value(v: Any) -> bool:
    if isinstance(v, list):
        return all(_is_toml_value(x) for x in v)
    return isinstance(v, (bool, int, float, str))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        escaped = "".join(c if c.isprintable() or c in "\\" else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML, each key preceded by its help text."""
    from lm2cli.version import __version__

    lines = [f"# Resolved lm2 recipe (lm2 {__version__}). Every key is shown with its effective value."]
    for sec_name, cls in sections().items():
        section = getattr(recipe, sec_name)
        lines += ["", f"[{sec_name}]"]
        for key, (_tp, f) in section_fields(cls).items():
            lines.append(f"{key} = {toml_value(getattr(section, key))}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The recipe reference (kept in the README; a test checks it matches this schema)."""
    out = []
    for sec_name, cls in sections().items():
        out += [f"**`[{sec_name}]`** — {cls.__doc__.strip()}", "",
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, (tp, f) in section_fields(cls).items():
            rng = []
            meta = f.metadata
            if meta.get("min") is not None:
                rng.append(f"≥ {meta['min']}")
            if meta.get("gt") is not None:
                rng.append(f"> {meta['gt']}")
            if meta.get("max") is not None:
                rng.append(f"≤ {meta['max']}")
            extra = f" ({', '.join(rng)})" if rng else ""
            tname = type_name(tp).replace("|", "\\|")
            default = toml_value(default_of(f)).replace("|", "\\|")
            out.append(f"| `{key}` | {tname}{extra} | `{default}` | {meta['help'].replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # `python -m lm2cli.recipe` prints the README reference
    print(reference_markdown(), end="")
