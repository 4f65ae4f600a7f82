"""``fstq prune`` (fstqcodec.prune_cli): reports, and one-line errors with exit status 2."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fstqcodec  # noqa: E402
from fstqcodec import prune_cli, tokens  # noqa: E402
from fstqcodec.sim.models import resolve_model_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A small random BERT with the real tokenizer's vocabulary and BBC's five labels."""
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=512,
                                     num_labels=5)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, config


def write_prior(path, vocab_size, positions=512, *, poison=None):
    prior = {tokens.VOCAB_KEY: np.linspace(-1, 1, vocab_size, dtype=np.float32),
             tokens.POSITION_KEY: np.zeros(positions, np.float32)}
    if poison is not None:
        prior[tokens.VOCAB_KEY][3] = poison
        np.savez(path, **prior)  # the codec itself refuses non-finite values
    else:
        path.write_bytes(fstqcodec.encode(prior))
    return str(path)


def test_prune_reports_accuracy_and_speed(tiny_model_dir, tmp_path, capsys):
    directory, config = tiny_model_dir
    prior = write_prior(tmp_path / "prior.fstq", config.vocab_size)
    status = prune_cli.main(["--model", str(directory), "--prior", prior, "--keep-ratio", "0.5",
                             "--limit", "8", "--max-length", "64", "--json"])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 8
    assert 0.45 < report["tokens_kept"] < 0.6
    assert report["seconds_pruned"] > 0 and report["speedup"] > 0
    assert 0.0 <= report["accuracy_pruned"] <= 1.0


@pytest.mark.parametrize("arguments, message", [
    (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1], got 0.0"),
    (["--speedup", "0.5"], "--speedup must be >= 1"),
    (["--keep-ratio", "0.5", "--prior", "/nonexistent/prior.fstq"], "no such file"),
])
def test_bad_arguments_get_one_line_and_status_2(tiny_model_dir, tmp_path, capsys, arguments, message):
    directory, config = tiny_model_dir
    prior = write_prior(tmp_path / "prior.fstq", config.vocab_size)
    status = prune_cli.main(["--model", str(directory), "--prior", prior, *arguments])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and error.startswith("fstq prune: ") and message in error


@pytest.mark.parametrize("kind, message", [
    ("shape", "'token_prior.vocab' has shape (100,), but the model's vocabulary has 30522"),
    ("nan", "'token_prior.vocab' has 1 non-finite value"),
    ("garbage", "not a valid fstq message"),
])
def test_a_prior_that_does_not_fit_the_model_is_refused(tiny_model_dir, tmp_path, capsys, kind, message):
    directory, config = tiny_model_dir
    if kind == "shape":
        prior = write_prior(tmp_path / "prior.fstq", 100)
    elif kind == "nan":
        prior = write_prior(tmp_path / "prior.npz", config.vocab_size, poison=np.nan)
    else:
        (tmp_path / "prior.fstq").write_bytes(b"not a message")
        prior = str(tmp_path / "prior.fstq")
    status = prune_cli.main(["--model", str(directory), "--prior", prior, "--keep-ratio", "0.5", "--limit", "4"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and message in error
