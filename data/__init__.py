"""Dataset loading and formatting per task type, and built-in generators.

The train code calls ``load_task_datasets(task, data_args)`` once, before any model loads; it returns
``{"train", "eval"?}`` (or ``{"forget", "retain"}`` for unlearning) already checked and in TRL's column
layout, or raises ``DataError`` with one line naming the dataset, split, row and column.

    args.py        DataArguments (the recipe's data keys) and DataError
    generators.py  GENERATORS: builtin:arithmetic, builtin:preference_pairs, builtin:fictitious_facts,
                   builtin:fictitious_authors, builtin:review_prompts, builtin:topic_corpus
    files.py       checks of a local text file's bytes before it is parsed: UTF-8, line length
    loading.py     DATA_TASKS, load_source (one split of one source), load_task_datasets (the entry point)
    cascade_filter.py  the Deep Ignorance cascade filter (``data_filter:`` recipe keys, ``posttrain filter``)
    beo.py             BEO unlearnable examples (centroid shift, PGA); ``protect_dataset``; method ``beo``
    private_gsd.py     Private-GSD synthetic data under zCDP; ``synthesize_dataset``; method ``private_gsd``
    privacy_accounting.py  zCDP accounting: Gaussian and exponential mechanisms, composition, (eps, delta)
"""

from .args import DataArguments, DataError
from .generators import GENERATORS
from .loading import DATA_TASKS, load_source, load_task_datasets

__all__ = ["DataArguments", "DataError", "GENERATORS", "DATA_TASKS", "load_source", "load_task_datasets"]
