"""Token-importance prior and token reduction (fstqcodec.tokens)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fstqcodec  # noqa: E402
import fstqcodec.torch  # noqa: E402
from fstqcodec import tokens  # noqa: E402

VOCAB, POSITIONS = 50, 16
CLS, SEP, PAD = 1, 2, 0


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=POSITIONS, num_labels=3,
                                     pad_token_id=PAD)
    return transformers.BertForSequenceClassification(config).eval()


def good_prior():
    rng = np.random.default_rng(0)
    return {tokens.VOCAB_KEY: rng.normal(size=VOCAB).astype(np.float32),
            tokens.POSITION_KEY: rng.normal(size=POSITIONS).astype(np.float32)}


def batch():
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, 15, 16, 17, SEP], [CLS, 20, 21, 22, SEP, PAD, PAD, PAD, PAD, PAD]])
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("key, value, message", [
    (tokens.VOCAB_KEY, np.zeros(VOCAB + 1, np.float32), "shape \\(51,\\), but the model's vocabulary has 50"),
    (tokens.VOCAB_KEY, np.zeros((VOCAB, 2), np.float32), "shape \\(50, 2\\)"),
    (tokens.VOCAB_KEY, np.full(VOCAB, np.nan, np.float32), "'token_prior.vocab' has 50 non-finite"),
    (tokens.POSITION_KEY, np.zeros(3, np.float32), "position embeddings has 16"),
])
def test_a_prior_that_does_not_fit_is_refused_naming_the_problem(key, value, message):
    prior = good_prior()
    prior[key] = value
    with pytest.raises(ValueError, match=message):
        tokens.PrunedClassifier(tiny_classifier(), prior, keep_ratio=0.5, use="both")


def test_an_infinite_value_and_a_missing_key_are_refused():
    prior = good_prior()
    prior[tokens.VOCAB_KEY][7] = np.inf
    with pytest.raises(ValueError, match="1 non-finite"):
        tokens.check_prior(prior, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="has no 'token_prior.vocab'"):
        tokens.check_prior({tokens.POSITION_KEY: np.zeros(POSITIONS, np.float32)}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="exactly one of keep_ratio and speedup"):
        tokens.PrunedClassifier(tiny_classifier(), good_prior())
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        tokens.PrunedClassifier(tiny_classifier(), good_prior(), keep_ratio=1.5)


def test_selection_keeps_special_tokens_the_best_tokens_and_their_order():
    ids, mask = batch()
    scores = torch.zeros(ids.shape)
    scores[0, [8, 3, 5]] = torch.tensor([3.0, 2.0, 1.0])  # tokens 17, 12, 14 are the best three
    kept = tokens.select_tokens(ids, mask, scores, 0.5, special_ids=[CLS, SEP, PAD])
    assert kept["input_ids"][0].tolist() == [CLS, 12, 14, 17, SEP]  # ceil(0.5 * 10) = 5, in order
    assert kept["position_ids"][0].tolist() == [0, 3, 5, 8, 9]
    # The short row keeps ceil(0.5 * 5) = 3 tokens, CLS and SEP among them, then padding.
    assert kept["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert kept["input_ids"][1, 0] == CLS and kept["input_ids"][1, 2] == SEP


def test_pruned_classifier_at_keep_one_equals_the_model_and_shortens_inputs_below():
    model, ids_mask = tiny_classifier(), batch()
    with torch.inference_mode():
        reference = model(input_ids=ids_mask[0], attention_mask=ids_mask[1]).logits
    full = tokens.PrunedClassifier(model, good_prior(), keep_ratio=1.0, special_ids=[CLS, SEP])
    torch.testing.assert_close(full(*ids_mask), reference)
    lengths = []
    handle = model.bert.embeddings.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    tokens.PrunedClassifier(model, good_prior(), keep_ratio=0.3, special_ids=[CLS, SEP])(*ids_mask)
    handle.remove()
    assert lengths == [3]


def test_accumulator_ranks_high_fisher_ids_first_and_leaves_unseen_ids_neutral():
    ids, mask = batch()
    accumulator = tokens.TokenPriorAccumulator(VOCAB, POSITIONS)
    scores = torch.ones(ids.shape) * mask
    scores[ids == 12] = 50.0
    scores[ids == 21] = 0.01
    for _ in range(5):
        accumulator.observe(ids, mask, scores)
    prior = accumulator.prior()
    vocab = prior[tokens.VOCAB_KEY]
    assert vocab.shape == (VOCAB,) and prior[tokens.POSITION_KEY].shape == (POSITIONS,)
    assert vocab[12] > vocab[10] > vocab[21]
    assert vocab[40] == 0.0  # never seen
    # Scaling a sequence's Fisher (a larger loss) does not change its relative contribution.
    scaled = tokens.TokenPriorAccumulator(VOCAB, POSITIONS)
    for _ in range(5):
        scaled.observe(ids, mask, scores * 1000)
    np.testing.assert_allclose(scaled.prior()[tokens.VOCAB_KEY], vocab, rtol=1e-5)
    with pytest.raises(ValueError, match="finite and non-negative"):
        accumulator.observe(ids, mask, scores * float("nan"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        accumulator.observe(ids + VOCAB, mask, scores)


def test_prior_from_token_fisher_travels_through_the_codec():
    model = tiny_classifier()
    ids, mask = batch()
    accumulator = tokens.TokenPriorAccumulator(VOCAB, POSITIONS)
    accumulator.observe(ids, mask, fstqcodec.torch.token_fisher(model, {
        "input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}))
    prior = accumulator.prior()
    assert set(prior[tokens.VOCAB_KEY][ids[mask.bool()]].tolist()) != {0.0}  # the Fisher moved it
    decoded = fstqcodec.decode(fstqcodec.encode(prior))  # lossless here; the benchmark sends 4 bits/param
    np.testing.assert_array_equal(decoded[tokens.VOCAB_KEY], prior[tokens.VOCAB_KEY])
    tokens.check_prior(decoded, vocab_size=VOCAB, max_positions=POSITIONS, use="both")
    tokens.PrunedClassifier(model, decoded, keep_ratio=0.5)(ids, mask)


def test_attention_scores_are_a_distribution_over_real_tokens():
    ids, mask = batch()
    scores = tokens.first_layer_attention_scores(tiny_classifier(), ids, mask)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2))
    assert (scores[1, 5:] == 0).all()


def test_keep_ratio_for_speedup_inverts_the_flops_model():
    config = tiny_classifier().config
    assert tokens.keep_ratio_for_speedup(config, 1.0, length=16) == pytest.approx(1.0)
    half = tokens.keep_ratio_for_speedup(config, 2.0, length=16)
    assert 0.5 < half < 0.6  # attention is quadratic: halving the tokens more than halves the work
    with pytest.raises(ValueError, match="speedup must be >= 1"):
        tokens.keep_ratio_for_speedup(config, 0.5, length=16)


def test_reduce_batch_keeps_labels_and_trains_on_fewer_tokens():
    model, (ids, mask) = tiny_classifier(), batch()
    reduced = tokens.reduce_batch({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])},
                                  tokens.prior_scores(good_prior(), ids), 0.4, special_ids=[CLS, SEP])
    assert reduced["labels"].tolist() == [0, 1] and reduced["input_ids"].shape == (2, 4)
    model(**reduced).loss.backward()  # position_ids are accepted by the model in training too
    typed = tokens.reduce_batch({"input_ids": ids, "token_type_ids": (ids >= 20).long()},
                                torch.zeros(ids.shape), 1.0)
    torch.testing.assert_close(typed["token_type_ids"], (ids >= 20).long() * mask)


def test_server_averages_client_priors_sent_through_the_codec():
    first, second = good_prior(), good_prior()
    second[tokens.VOCAB_KEY] = second[tokens.VOCAB_KEY] + 2.0
    received = [fstqcodec.decode(fstqcodec.encode(p)) for p in (first, second)]
    averaged = tokens.average_priors(received, weights=[1, 3])
    np.testing.assert_allclose(averaged[tokens.VOCAB_KEY], first[tokens.VOCAB_KEY] + 1.5, rtol=1e-6)
    tokens.check_prior(averaged, vocab_size=VOCAB, max_positions=POSITIONS, use="both")
    short = {tokens.VOCAB_KEY: np.zeros(3, np.float32), tokens.POSITION_KEY: first[tokens.POSITION_KEY]}
    with pytest.raises(ValueError, match="prior 1: 'token_prior.vocab' has shape \\(3,\\)"):
        tokens.average_priors([first, short])
    with pytest.raises(ValueError, match="one positive finite weight per prior"):
        tokens.average_priors([first, second], weights=[1, 0])


def test_recorder_builds_the_prior_from_training_backward_passes_only():
    model, (ids, mask) = tiny_classifier(), batch()
    labels = torch.tensor([0, 1])
    with tokens.TokenPriorRecorder(model) as recorder:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # evaluation: not recorded
        with pytest.raises(RuntimeError, match="no token Fisher observed"):
            recorder.prior()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        reduced = tokens.reduce_batch({"input_ids": ids, "attention_mask": mask, "labels": labels},
                                      torch.zeros(ids.shape), 0.5, special_ids=[CLS, SEP])
        model(**reduced).loss.backward()  # a reduced batch records at its original positions
    prior = recorder.prior()
    seen = sorted(set(ids[mask.bool()].tolist()) - set(reduced["input_ids"][reduced["attention_mask"].bool()].tolist()))
    assert recorder.accumulator.sequences == 4
    assert np.all(prior[tokens.VOCAB_KEY][seen] != 0.0)
    assert np.all(prior[tokens.VOCAB_KEY][30:] == 0.0)
    assert recorder.accumulator.position_counts[9] == 2  # SEP of row 0 counted at position 9 twice
