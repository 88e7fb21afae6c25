"""posttrain: LLM post-training and alignment methods as Hugging Face TRL trainers.

The repository's top-level folders are mapped into this one namespace by setuptools
``package-dir`` (see ``pyproject.toml``), so nothing generic lands in site-packages:

    trainers/  -> posttrain.trainers   one module per method (+ classic/ auxiliary trainers)
    recipes/   -> posttrain.recipes    YAML recipes, recipe parsing, model loading, the train entry point
    evals/     -> posttrain.evals      the eval harness
    data/      -> posttrain.data       dataset loading, formatting and built-in generators

This package itself owns the namespace, the command line (``posttrain`` / ``python -m posttrain``)
and the error types that the command line turns into a one-line message.

``difflib`` is imported inside ``did_you_mean``, which only an error calls: ``posttrain --help`` imports this module.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in what the user gave (recipe, override, dataset): printed as one line, exit code 2."""


class RecipeError(UserError):
    """A mistake in a recipe or its command-line overrides; the message names the file (or command line) and key."""


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, or ``""``: the hint every
    unknown-name error carries."""
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class TrainingError(Exception):
    """A run that stopped on purpose mid-training (e.g. a non-finite loss): one line, exit code 1."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C (SIGINT): one line saying where it stopped and how to continue, exit code 130."""
