"""Text generation: sampling, stop strings, streaming decode and the `lm2 generate` command.

    Generator(model, tokenizer, recipe, device).generate(prompt, SamplingParams(...), on_text=print)
"""

from lm2cli.generation.generator import GenerationResult, Generator
from lm2cli.generation.sampling import SamplingParams

__all__ = ["Generator", "GenerationResult", "SamplingParams", "generate_command"]


def generate_command(*args, **kwargs):
    # Imported lazily: the command pulls in the checkpoint loader, which the library use does not need.
    from lm2cli.generation.command import generate_command as command

    return command(*args, **kwargs)
