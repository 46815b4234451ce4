"""`lm2 inspect-memory`: what the memory holds and whether it holds the facts (docs/inspection.md).

    recording.py  TraceRecorder: head-reduced reads, writes, gates and bank changes from one pass
    rmt.py        RMT attention on its memory tokens, spelled out by a block pre-hook
    capture.py    the recorded pass (text, then --generate tokens) -> Inspection
    inputs.py     the inspected text: prompt, file or a BABILong row with its fact tokens
    analysis.py   slot rankings, top written tokens, gates per segment, fact attention ratio
    store.py      tensors.safetensors + index.json + summary.json + slots.jsonl, and load()
    figures.py    PNG heatmaps (the optional `plot` extra)
    command.py    the command: option checks, summary table
"""
