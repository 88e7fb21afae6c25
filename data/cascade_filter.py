"""Deep Ignorance cascade filter: a data stage that removes the documents on a target topic before training.

Paper: K. O'Brien, S. Casper, Q. Anthony, T. Korbak, R. Kirk, X. Davies, I. Mishra, G. Irving, Y. Gal, S. Biderman,
"Deep Ignorance: Filtering Pretraining Data Builds Tamper-Resistant Safeguards into Open-Weight LLMs",
arXiv 2508.06601 (2025). Official code: ``filter.py`` and ``download_filtered_dataset.py`` of the deep-ignorance
repository (the fork FabienRoger/deep-ignorance holds them; EleutherAI/deep-ignorance holds the analysis code).

The official pipeline (``filter.py``), which this module follows:

* Stages run in order, and each judges **only the documents the previous stage flagged** (``apply_filter``: a
  document whose previous-stage column is false gets ``False`` and the stage's default metadata, unjudged).
  Each stage writes the columns ``<filter_id>`` (bool) and ``<filter_id>_metadata``; ``combined_filter`` is a copy
  of the last stage's column.
* ``word_filter`` (BlocklistFilter): keywords with ``pos_ratio > block_words_threshold`` (0.4) and ``is_relevant``;
  a document is flagged when ``block_words_occuring_threshold`` (2) *distinct* keywords occur in it
  (case-insensitive substring match, stopping at the threshold). Metadata: ``{"keywords": "k1, k2"}``.
* ``bert_filter`` (BERTFilter): a fine-tuned ModernBERT-large; the document is cut into ``context_length`` (8192)
  token chunks, and it is flagged when any chunk's positive score is > ``bert_threshold`` (0.5); on an error it is
  flagged (fail closed). Metadata: highest, lowest and mean chunk score.
* ``lm_filter`` (LMFilter, optional): an LLM judge; the answer is the first digit after the last ``[`` of the
  completion, flagged when it is 1; on an error, flagged. Metadata: judgment, completion, error.
* The **strong filter** is the blocklist alone (every escalated document is removed); the **weak filter** is
  blocklist + classifier (only documents the classifier also flags are removed).
* Each stage and the combined decision get a classification report against the ``is_filter_target`` labels
  (``log_classification_report``: scikit-learn's report, filtered documents and their percentage, tn/fp/fn/tp, FPR).
* ``download_filtered_dataset.py --replace-with-retained-docs`` keeps the size of the corpus by adding the
  escalated-but-approved documents (flagged by ``word_filter``, not by ``bert_filter``) again.

What is a reconstruction here (the paper's classifier and keyword list are not available offline):

* The classifier is TF-IDF + logistic regression (scikit-learn) trained on a labelled set the recipe names, a
  stand-in for ModernBERT-large; a chunk is ``context_length`` whitespace-separated words, not tokenizer tokens.
  Its column keeps the official id ``bert_filter`` so the official scripts read the output unchanged.
* The keyword list: the official one was generated and curated by the authors (``pos_ratio`` measured on labelled
  data, ``is_relevant`` judged); ``mine_blocklist`` mines one from the labelled set instead: every word of four
  letters or more found in at least ``min_docs`` positive documents, with its measured ``pos_ratio``, all marked
  relevant. A curated CSV in the official format (``keyword,pos_ratio[,is_relevant]``) can be given instead.
* Replacement: the official script appends *every* approved escalation once (the output size then varies). Here
  exactly as many approved escalations as there are filtered documents are drawn (seeded, without replacement), so
  |D_out| = |D_in| whenever enough approved documents exist; otherwise all of them are added and the report gives
  the shortfall.
* The LLM judge is a Python callable ``text -> completion`` (it owns its prompt and its endpoint) rather than an
  OpenAI-compatible client; its completion is parsed as the official code does.

scikit-learn and matplotlib are imported inside the functions that use them (start-up time of ``posttrain``);
``data.loading`` imports this module inside ``load_task_datasets``, only for a recipe with ``data_filter`` keys.
"""

from __future__ import annotations

import csv
import importlib
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from datasets import Dataset

from posttrain import RecipeError, UserError
from posttrain.atomic import write_json_atomic
from posttrain.key_groups import pop_key_group
from posttrain.plots import pyplot

from .args import DataError
from .loading import _first, _quiet_datasets, _where, load_source

TEXT_COLUMNS = ("text", "prompt", "completion", "chosen", "rejected", "messages", "question", "answer")
MODES = ("strong", "weak")


# --------------------------------------------------------------------------------------------------------- config


@dataclass
class CascadeFilterConfig:
    """The recipe keys of the filter. Defaults are the official ``filter.py`` defaults where it has one."""

    data_filter: str = field(
        default="weak",
        metadata={
            "help": "strong: blocklist only, every escalated document is removed; weak: blocklist + classifier (+ the "
            "judge when data_filter_judge is set), only documents every stage flags are removed."
        },
    )
    data_filter_labelled: Optional[str] = field(
        default=None,
        metadata={
            "help": "Labelled documents (builtin:<name>, a local .jsonl/.json/.csv/.parquet file or a hub id) with a "
            "text column and data_filter_label_column: the classifier is trained on them, and the blocklist is mined "
            "from them unless data_filter_blocklist is given. Needed by the weak filter. A builtin generator makes "
            "num_samples rows with data_seed, as for `dataset`."
        },
    )
    data_filter_labelled_split: str = field(
        default="train", metadata={"help": "Split of data_filter_labelled (builtin:topic_corpus: 'labelled')."}
    )
    data_filter_label_column: str = field(
        default="is_filter_target",
        metadata={
            "help": "Bool column marking target documents, in the labelled set and, when present, in the filtered data "
            "(then the report gives precision, recall and FPR per stage)."
        },
    )
    data_filter_blocklist: Optional[str] = field(
        default=None,
        metadata={
            "help": "A keyword CSV in the official format (columns keyword, pos_ratio, optional is_relevant); unset: "
            "mined from data_filter_labelled."
        },
    )
    data_filter_pos_ratio: float = field(
        default=0.4,
        metadata={
            "help": "Keep a keyword when its pos_ratio (share of the documents containing it that are targets) is "
            "above this (official block_words_threshold)."
        },
    )
    data_filter_min_hits: int = field(
        default=2,
        metadata={
            "help": "Escalate a document holding this many distinct keywords (official block_words_occuring_threshold)."
        },
    )
    data_filter_min_docs: int = field(
        default=5,
        metadata={"help": "Blocklist mining: a candidate keyword occurs in at least this many target documents."},
    )
    data_filter_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Classifier: flag a document when a chunk's positive probability is above this (bert_threshold)."
        },
    )
    data_filter_context_length: int = field(
        default=8192,
        metadata={"help": "Classifier: chunk length in words; every chunk is scored (official: 8192 tokens)."},
    )
    data_filter_judge: Optional[str] = field(
        default=None,
        metadata={
            "help": "Optional LLM-judge stage, weak filter only: 'package.module:function', a callable text -> "
            "completion; flagged when the first digit after the completion's last '[' is 1, or on an error."
        },
    )
    data_filter_keep_size: bool = field(
        default=True,
        metadata={
            "help": "Replace the filtered documents by escalated-but-approved ones (drawn without replacement), so the "
            "data keeps its size whenever enough approved documents exist."
        },
    )
    data_filter_text_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column the stages read; unset: the text of text, prompt, completion, chosen, rejected, messages, "
            "question and answer, joined (message lists: their contents)."
        },
    )
    data_filter_seed: int = field(default=0, metadata={"help": "Seed of the classifier and of the replacement draw."})

    def __post_init__(self):
        if self.data_filter not in MODES:
            raise ValueError(f"data_filter must be strong or weak, got {self.data_filter!r}")
        if not 0 <= self.data_filter_pos_ratio < 1:
            raise ValueError(f"data_filter_pos_ratio must be in [0, 1), got {self.data_filter_pos_ratio}")
        if not 0 <= self.data_filter_threshold < 1:
            raise ValueError(f"data_filter_threshold must be in [0, 1), got {self.data_filter_threshold}")
        for name in ("data_filter_min_hits", "data_filter_min_docs", "data_filter_context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data_filter == "weak" and not self.data_filter_labelled:
            raise ValueError(
                "data_filter: weak trains a classifier, so data_filter_labelled must name a labelled set "
                "(e.g. builtin:topic_corpus with data_filter_labelled_split: labelled)"
            )
        if self.data_filter == "strong" and not (self.data_filter_labelled or self.data_filter_blocklist):
            raise ValueError(
                "data_filter: strong needs a keyword list: set data_filter_blocklist (a CSV) or "
                "data_filter_labelled (to mine one)"
            )
        if self.data_filter == "strong" and self.data_filter_judge:
            raise ValueError(
                "data_filter_judge is a stage of the weak filter (the strong filter is the blocklist "
                "alone); set data_filter: weak or remove data_filter_judge"
            )
        if self.data_filter_blocklist is not None:
            if not os.path.isfile(os.path.expanduser(self.data_filter_blocklist)):
                raise ValueError(
                    f"data_filter_blocklist: file not found: {self.data_filter_blocklist}; give a CSV "
                    "with columns keyword, pos_ratio (and optionally is_relevant)"
                )
        if self.data_filter_judge is not None:
            self.judge_callable()  # an import error or a non-callable is a recipe error, before any model loads

    def judge_callable(self) -> Optional[Callable[[str], str]]:
        if not self.data_filter_judge:
            return None
        module, _, attr = self.data_filter_judge.partition(":")
        if not module or not attr:
            raise ValueError(f"data_filter_judge must be 'package.module:function', got {self.data_filter_judge!r}")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"data_filter_judge {self.data_filter_judge!r} cannot be imported ({err}); check "
                "the module path (it must be importable from the working directory)"
            ) from None
        if not callable(fn):
            raise ValueError(f"data_filter_judge {self.data_filter_judge!r} is not callable")
        return fn


def filter_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(CascadeFilterConfig))


# ------------------------------------------------------------------------------------------------------ pure math


def blocklist_hits(text: str, keywords: list[str], min_hits: int) -> list[str]:
    """The distinct keywords found in ``text`` (case-insensitive substring match), in list order, stopping as
    soon as ``min_hits`` are found (official ``BlocklistFilter.should_filter``). Escalate iff ``len == min_hits``."""
    lowered, found = text.lower(), []
    for word in keywords:
        if word.lower() in lowered:
            found.append(word)
            if len(found) == min_hits:
                break
    return found


def select_keywords(rows: list[dict], pos_ratio_threshold: float) -> list[str]:
    """The keywords of a list of ``{keyword, pos_ratio, is_relevant?}`` rows that pass: pos_ratio above the
    threshold and relevant (official ``__read_blocklist``); sorted, since the official set order is arbitrary."""
    keep = {
        str(r["keyword"]) for r in rows if float(r["pos_ratio"]) > pos_ratio_threshold and r.get("is_relevant", True)
    }
    return sorted(keep)


def mine_blocklist(texts: list[str], labels: list[bool], min_docs: int) -> list[dict]:
    """Candidate keywords from labelled documents: each lower-case word of 4+ letters found in at least ``min_docs``
    positive documents, with ``pos_ratio`` = (positive documents containing it) / (documents containing it), the
    quantity the official keyword list is thresholded on. All are marked ``is_relevant`` (nobody curated them)."""
    docs_with: dict[str, int] = {}
    pos_with: dict[str, int] = {}
    for text, label in zip(texts, labels):
        for word in set(re.findall(r"[a-z]{4,}", text.lower())):
            docs_with[word] = docs_with.get(word, 0) + 1
            if label:
                pos_with[word] = pos_with.get(word, 0) + 1
    return [
        {"keyword": w, "pos_ratio": pos_with[w] / docs_with[w], "count": docs_with[w], "is_relevant": True}
        for w in sorted(pos_with)
        if pos_with[w] >= min_docs
    ]


def chunk_words(text: str, context_length: int) -> list[str]:
    """``text`` cut into pieces of ``context_length`` words (at least one piece, possibly empty)."""
    words = text.split()
    return [" ".join(words[i : i + context_length]) for i in range(0, len(words), context_length)] or [""]


def parse_judgment(completion: str) -> bool:
    """The official LMFilter parse: the first digit after the last '['; True (filter) when it is 1. Raises
    ``ValueError`` when there is no digit (the stage then filters: fail closed)."""
    match = re.search(r"\d", completion.split("[")[-1])
    if match is None:
        raise ValueError(f"no digit after the last '[' in {completion[:80]!r}")
    return int(match.group()) == 1


def classification_report(y_true: Optional[list[bool]], y_pred: list[bool]) -> dict[str, Any]:
    """The official per-stage report: filtered documents and their share; with labels also accuracy, precision,
    recall, F1 of the positive class, the confusion matrix (tn, fp, fn, tp) and FPR (scikit-learn's metrics)."""
    n = len(y_pred)
    report: dict[str, Any] = {
        "documents": n,
        "filtered_documents": int(sum(y_pred)),
        "percent_filtered": 100.0 * sum(y_pred) / n if n else 0.0,
    }
    if y_true is None:
        return report
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[False, True]).ravel())
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=[True], zero_division=0)
    report.update(
        accuracy=(tp + tn) / n if n else 0.0,
        precision=float(precision[0]),
        recall=float(recall[0]),
        f1=float(f1[0]),
        fpr=fp / (fp + tn) if fp + tn else 0.0,
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )
    return report


def replacement_rows(filtered: list[int], approved: list[int], seed: int) -> list[int]:
    """Rows to add in place of the ``filtered`` ones: ``len(filtered)`` of the ``approved`` escalations drawn
    without replacement (all of them, in order, when there are fewer)."""
    if len(approved) <= len(filtered):
        return list(approved)
    return sorted(random.Random(seed).sample(approved, len(filtered)))


# --------------------------------------------------------------------------------------------------------- stages


class BlocklistStage:
    filter_id = "word_filter"
    default_metadata = {"keywords": ""}

    def __init__(self, keywords: list[str], min_hits: int = 2):
        self.keywords, self.min_hits = list(keywords), min_hits
        self.calls = 0

    def judge(self, texts: list[str]) -> list[tuple[bool, dict]]:
        self.calls += len(texts)
        out = []
        for text in texts:
            hits = blocklist_hits(text, self.keywords, self.min_hits)
            out.append((len(hits) == self.min_hits, {"keywords": ", ".join(hits)}))
        return out


class ClassifierStage:
    """TF-IDF + logistic regression (the stand-in for the official fine-tuned ModernBERT-large)."""

    filter_id = "bert_filter"
    # the official metadata, plus "error" (the official stage prints its errors; here they stay in the row)
    default_metadata = {"highest_score": 0.0, "lowest_score": 0.0, "mean_score": 0.0, "error": ""}

    def __init__(self, model, threshold: float = 0.5, context_length: int = 8192):
        self.model, self.threshold, self.context_length = model, threshold, context_length
        self.calls = 0  # documents scored: the cascade property says this equals the escalated count

    @classmethod
    def train(cls, texts: list[str], labels: list[bool], seed: int = 0, **kwargs) -> "ClassifierStage":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        model = make_pipeline(
            TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
            LogisticRegression(C=10.0, max_iter=1000, random_state=seed),
        )
        model.fit(texts, [bool(y) for y in labels])
        return cls(model, **kwargs)

    def judge(self, texts: list[str]) -> list[tuple[bool, dict]]:
        self.calls += len(texts)
        chunks = [chunk_words(t, self.context_length) for t in texts]
        flat = [c for doc in chunks for c in doc]
        try:
            positive = list(self.model.classes_).index(True)
            scores = self.model.predict_proba(flat)[:, positive].tolist() if flat else []
        except Exception as err:  # noqa: BLE001 - the official stage fails closed on any error
            return [(True, dict(self.default_metadata, error=str(err)[:200])) for _ in texts]
        out, start = [], 0
        for doc in chunks:
            s = scores[start : start + len(doc)]
            start += len(doc)
            out.append(
                (
                    any(v > self.threshold for v in s),
                    {"highest_score": max(s), "lowest_score": min(s), "mean_score": sum(s) / len(s), "error": ""},
                )
            )
        return out


class JudgeStage:
    filter_id = "lm_filter"
    default_metadata = {"judgment": False, "completion": "", "error": ""}

    def __init__(self, judge: Callable[[str], str]):
        self.fn = judge
        self.calls = 0

    def judge(self, texts: list[str]) -> list[tuple[bool, dict]]:
        out = []
        for text in texts:
            self.calls += 1
            try:
                completion = str(self.fn(text))
                verdict = parse_judgment(completion)
                out.append((verdict, {"judgment": verdict, "completion": completion, "error": ""}))
            except Exception as err:  # noqa: BLE001 - fail closed, as the official LMFilter
                out.append((True, {"judgment": True, "completion": "", "error": f"{type(err).__name__}: {err}"[:200]}))
        return out


# ------------------------------------------------------------------------------------------------------- cascade


def document_text(row: dict, text_column: Optional[str] = None) -> str:
    """The text the stages read from one row: ``text_column``, or every text column present, joined by newlines
    (a message list gives its contents)."""

    def flat(value) -> str:
        if isinstance(value, list):
            return "\n".join(flat(m.get("content", "") if isinstance(m, dict) else m) for m in value)
        return "" if value is None else str(value)

    columns = [text_column] if text_column else [c for c in TEXT_COLUMNS if c in row]
    return "\n".join(flat(row[c]) for c in columns)


@dataclass
class FilterOutput:
    annotated: Dataset  # every input row with the <filter_id> / <filter_id>_metadata columns and combined_filter
    dataset: Dataset  # kept rows, then the replacement rows; the input's columns
    report: dict


class CascadeFilter:
    """``stages`` in cascade order (blocklist first). ``mode`` strong: the decision is the first stage's column
    (the later stages are not run); weak: the last stage's. ``keep_size``: add approved escalations back."""

    def __init__(
        self,
        stages: list,
        mode: str = "weak",
        keep_size: bool = True,
        seed: int = 0,
        text_column: Optional[str] = None,
        label_column: str = "is_filter_target",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be strong or weak, got {mode!r}")
        self.stages = stages[:1] if mode == "strong" else list(stages)
        self.mode, self.keep_size, self.seed = mode, keep_size, seed
        self.text_column, self.label_column = text_column, label_column

    def apply(self, dataset: Dataset, where: str = "dataset") -> FilterOutput:
        columns = list(dataset.column_names)
        if self.text_column and self.text_column not in columns:
            raise DataError(
                f"{where}: data_filter_text_column {self.text_column!r} is not a column (columns: "
                f"{columns}); set it to one of them"
            )
        if not self.text_column and not set(TEXT_COLUMNS) & set(columns):
            raise DataError(f"{where}: no text column for the filter among {columns}; set data_filter_text_column")
        taken = [c for s in self.stages for c in (s.filter_id, f"{s.filter_id}_metadata")] + ["combined_filter"]
        if set(taken) & set(columns):
            raise DataError(
                f"{where} already has filter columns {sorted(set(taken) & set(columns))} (the output of an "
                "earlier filter?); filter the original rows, or remove those columns"
            )
        texts = [
            document_text(row, self.text_column)
            for row in dataset.select_columns(
                [self.text_column] if self.text_column else [c for c in TEXT_COLUMNS if c in columns]
            )
        ]
        flagged = [True] * len(texts)  # the first stage judges every document
        # the official results carry an ``id`` per document (filter.py adds 0, 1, ... when the data has none)
        annotated = dataset if "id" in columns else dataset.add_column("id", list(range(len(texts))))
        report: dict[str, Any] = {"mode": self.mode, "documents": len(texts), "stages": {}}
        labels = [bool(v) for v in dataset[self.label_column]] if self.label_column in columns else None
        for stage in self.stages:
            escalated = [i for i, f in enumerate(flagged) if f]
            verdicts = stage.judge([texts[i] for i in escalated]) if escalated else []
            decision = [False] * len(texts)
            metadata = [dict(stage.default_metadata) for _ in texts]
            for i, (verdict, meta) in zip(escalated, verdicts):
                decision[i], metadata[i] = bool(verdict), {**stage.default_metadata, **meta}
            annotated = annotated.add_column(stage.filter_id, decision)
            annotated = annotated.add_column(f"{stage.filter_id}_metadata", metadata)
            report["stages"][stage.filter_id] = {"judged": len(escalated), **classification_report(labels, decision)}
            flagged = decision
        annotated = annotated.add_column("combined_filter", flagged)
        report["stages"]["combined_filter"] = {"judged": len(texts), **classification_report(labels, flagged)}
        filtered = [i for i, f in enumerate(flagged) if f]
        escalated_first = annotated[self.stages[0].filter_id]
        approved = [i for i, (e, f) in enumerate(zip(escalated_first, flagged)) if e and not f]
        added = replacement_rows(filtered, approved, self.seed) if self.keep_size else []
        kept = [i for i, f in enumerate(flagged) if not f]
        report.update(
            decision_filter="combined_filter",
            filtered=len(filtered),
            approved_escalations=len(approved),
            replaced=len(added),
            shortfall=len(filtered) - len(added) if self.keep_size else None,
            output_documents=len(kept) + len(added),
            keep_size=self.keep_size,
            labels=labels is not None,
        )
        output = dataset.select(kept + added)
        return FilterOutput(annotated, output, report)


# ------------------------------------------------------------------------------------------------- from a recipe


def _load(spec: str, split: str, data_args, what: str) -> Dataset:
    try:
        return load_source(
            spec,
            split=split,
            num_samples=data_args.num_samples,
            seed=data_args.data_seed,
            max_row_bytes=data_args.max_row_bytes,
        )
    except DataError as err:
        raise DataError(f"{what}: {err}") from None


def read_blocklist_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(
            f"data_filter_blocklist: file not found: {path}; give a CSV with columns keyword, pos_ratio "
            "(and optionally is_relevant)"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"keyword", "pos_ratio"} <= set(rows[0]):
        raise DataError(
            f"data_filter_blocklist {path}: needs a header with columns keyword and pos_ratio "
            f"(got {list(rows[0]) if rows else 'no rows'})"
        )
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            ratio = float(row["pos_ratio"])
        except ValueError:
            raise DataError(
                f"data_filter_blocklist {path} line {line}: pos_ratio {row['pos_ratio']!r} is not a number"
            ) from None
        relevant = str(row.get("is_relevant", "true")).strip().lower() not in ("false", "0", "no", "")
        out.append({"keyword": row["keyword"], "pos_ratio": ratio, "is_relevant": relevant})
    return out


def build_cascade(cfg: CascadeFilterConfig, data_args) -> CascadeFilter:
    """The stages a recipe's ``data_filter*`` keys describe: blocklist (read or mined), classifier trained on the
    labelled set (weak), judge (weak, when set)."""
    labelled = texts = labels = None
    if cfg.data_filter_labelled:
        what = f"data_filter_labelled '{cfg.data_filter_labelled}' split '{cfg.data_filter_labelled_split}'"
        labelled = _load(cfg.data_filter_labelled, cfg.data_filter_labelled_split, data_args, what)
        if cfg.data_filter_label_column not in labelled.column_names:
            raise DataError(
                f"{what} has no label column '{cfg.data_filter_label_column}' (columns: "
                f"{labelled.column_names}); set data_filter_label_column"
            )
        texts = [document_text(r, cfg.data_filter_text_column) for r in labelled]
        labels = [bool(v) for v in labelled[cfg.data_filter_label_column]]
        if len(set(labels)) < 2:
            raise DataError(
                f"{what}: the labels are all {labels[0] if labels else 'missing'}; the classifier "
                "needs target and non-target documents"
            )
    rows = (
        read_blocklist_csv(cfg.data_filter_blocklist)
        if cfg.data_filter_blocklist
        else mine_blocklist(texts, labels, cfg.data_filter_min_docs)
    )
    keywords = select_keywords(rows, cfg.data_filter_pos_ratio)
    if not keywords:
        raise DataError(
            f"data_filter: no keyword has pos_ratio > {cfg.data_filter_pos_ratio} (from "
            f"{cfg.data_filter_blocklist or 'the labelled set'}); lower data_filter_pos_ratio or "
            "data_filter_min_docs, or give more labelled documents"
        )
    stages: list = [BlocklistStage(keywords, cfg.data_filter_min_hits)]
    if cfg.data_filter == "weak":
        stages.append(
            ClassifierStage.train(
                texts,
                labels,
                seed=cfg.data_filter_seed,
                threshold=cfg.data_filter_threshold,
                context_length=cfg.data_filter_context_length,
            )
        )
        judge = cfg.judge_callable()
        if judge is not None:
            stages.append(JudgeStage(judge))
    return CascadeFilter(
        stages,
        cfg.data_filter,
        cfg.data_filter_keep_size,
        cfg.data_filter_seed,
        cfg.data_filter_text_column,
        cfg.data_filter_label_column,
    )


def summary_line(report: dict) -> str:
    stage = report["stages"]["combined_filter"]
    line = (
        f"data_filter {report['mode']}: {report['documents']} documents, {report['filtered']} filtered "
        f"({stage['percent_filtered']:.2f}%), {report['replaced']} replaced, {report['output_documents']} kept"
    )
    if report["labels"]:
        line += f"; recall {stage['recall']:.3f}, FPR {stage['fpr']:.4f}"
    return line


def report_table(report: dict) -> str:
    """The per-stage report as a Markdown table."""
    head = "| stage | judged | filtered | % filtered | accuracy | precision | recall | F1 | FPR | tn | fp | fn | tp |"
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for name, s in report["stages"].items():
        metrics = (
            [f"{s[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1", "fpr")]
            + [str(s[k]) for k in ("tn", "fp", "fn", "tp")]
            if report["labels"]
            else ["-"] * 9
        )
        lines.append(
            f"| {name} | {s['judged']} | {s['filtered_documents']} | {s['percent_filtered']:.2f} | "
            + " | ".join(metrics)
            + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- recipe wiring


def parse_filter_keys(
    values: dict[str, Any], sources: dict[str, str], source: str, method: str, task: str, coerce
) -> Optional[CascadeFilterConfig]:
    """Pop the ``data_filter*`` keys from ``values`` and return a ``CascadeFilterConfig`` (None when there are none).

    Called by ``recipes.config.build_recipe``; every mistake is one ``RecipeError`` naming where the key was set.
    Only the keys are checked here (nothing is loaded); the labelled set and the keyword file are read with the
    data, which ``build_trainer`` loads before the model.
    """
    refusal = None
    if task in ("aux", "unlearn"):
        why = "has no training data" if task == "aux" else "trains on its forget set on purpose"
        refusal = f"data_filter keys ({{keys}}) filter a training set, but method '{method}' {why}; remove them"
    kwargs = pop_key_group(
        values,
        sources,
        source,
        names=filter_keys(),
        config_cls=CascadeFilterConfig,
        switch="data_filter",
        switch_fix="add `data_filter: weak` (or strong), or remove the data_filter_* keys",
        refusal=refusal,
        coerce=coerce,
        prefix="data_filter",
        group="data filter",
    )
    if kwargs is None:
        return None
    try:
        return CascadeFilterConfig(**kwargs)
    except ValueError as err:
        named = sorted({sources.get(k, source) for k in kwargs if re.search(rf"\b{k}\b", str(err))}) or [
            sources.get("data_filter", source)
        ]
        raise RecipeError(f"{' and '.join(named)}: invalid data filter settings: {err}") from None


def filter_training_set(
    cfg: CascadeFilterConfig, data_args, dataset: Dataset, where: str, report_dir: Optional[str] = None
) -> Dataset:
    """The recipe path (``load_task_datasets``): filter the training rows before they are formatted, print one
    summary line and, with ``report_dir``, write ``data_filter_report.json`` there. Returns the rows to train on."""
    result = build_cascade(cfg, data_args).apply(dataset, where)
    if len(result.dataset) == 0:
        raise DataError(
            f"{where}: data_filter {cfg.data_filter} removed every row ({result.report['filtered']} of "
            f"{len(dataset)}); check the keyword list and data_filter_threshold"
        )
    line = summary_line(result.report)
    if report_dir is not None:
        path = os.path.join(report_dir, "data_filter_report.json")
        write_json_atomic(path, {"settings": _settings(cfg), **result.report})
        line += f" (report: {path})"
    print(f"posttrain: {line}")
    return result.dataset


def _settings(cfg: CascadeFilterConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def plot_report(report: dict, path) -> None:
    """Per stage: % filtered and, with labels, precision, recall and FPR (as %), one group of bars each."""
    plt = pyplot()

    stages = list(report["stages"])
    metrics = ["percent_filtered"] + (["precision", "recall", "fpr"] if report["labels"] else [])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(stages), 3.2))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        scale = 1.0 if metric == "percent_filtered" else 100.0
        values = [report["stages"][s][metric] * scale for s in stages]
        ax.bar([i + j * width for i in range(len(stages))], values, width, label=metric.replace("_", " "))
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(stages))], stages)
    ax.set_ylabel("%")
    ax.set_title(f"cascade filter ({report['mode']}): {report['documents']} documents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filter_to_folder(recipe, output: Optional[str] = None, overwrite: bool = False) -> str:
    """``posttrain filter RECIPE``: filter the recipe's training rows and write, atomically, a folder with
    ``filtered.jsonl`` (the rows to train on: usable as ``dataset:``), ``judgments.jsonl`` (every input row with the
    official filter columns), ``report.json``, ``report.md`` and ``report.png``. An existing folder is replaced only
    with ``overwrite``. Returns the folder."""
    cfg, args = recipe.data_filter, recipe.data_args
    if cfg is None:
        raise UserError(
            f"{recipe.source}: no data_filter key; add `data_filter: weak` (or strong) and its "
            "data_filter_* settings (see recipes/cascade_filter/)"
        )
    target = Path(output or f"{recipe.config.output_dir}-filtered").expanduser()

    def refuse_existing():
        if target.exists() and not overwrite:
            raise UserError(
                f"output folder {target} exists; pass --overwrite to replace it, or choose another --output"
            )
        if target.exists() and not target.is_dir():
            raise UserError(f"output {target} is a file, not a folder; choose another --output")

    refuse_existing()
    if not args.dataset:
        raise UserError(f"{recipe.source}: no dataset to filter; set `dataset:`")
    train = _first(
        load_source(
            args.dataset,
            config=args.dataset_config,
            split=args.dataset_split,
            num_samples=args.num_samples,
            seed=args.data_seed,
            difficulty=args.difficulty,
            max_row_bytes=args.max_row_bytes,
        ),
        args.max_samples,
    )
    result = build_cascade(cfg, args).apply(train, _where(args.dataset, args.dataset_split))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _quiet_datasets():  # no progress bars: the command prints one line
            result.dataset.to_json(tmp / "filtered.jsonl", lines=True, force_ascii=False)
            result.annotated.to_json(tmp / "judgments.jsonl", lines=True, force_ascii=False)
        write_json_atomic(
            tmp / "report.json",
            {"recipe": recipe.source, "dataset": args.dataset, "settings": _settings(cfg), **result.report},
        )
        (tmp / "report.md").write_text(f"# {summary_line(result.report)}\n\n{report_table(result.report)}\n")
        plot_report(result.report, tmp / "report.png")
        refuse_existing()  # again: another run may have made it meanwhile
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"posttrain: {summary_line(result.report)}; wrote {target}")
    return str(target)
