"""fstqcodec.torch: tensor round trips, the Fisher accumulator and the per-token Fisher proxy."""

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fstqcodec  # noqa: E402
import fstqcodec.torch as ft  # noqa: E402


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(7, 19, generator=generator),
        "w16": torch.randn(130, generator=generator).to(torch.float16),
        "wbf16": torch.randn(3, 64, generator=generator).to(torch.bfloat16),
    }


def test_lossless_round_trip_keeps_values_and_dtypes():
    tensors = _tensors()
    decoded = ft.decode(ft.encode(tensors))
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype, name
        assert decoded[name].shape == tensor.shape, name
        assert torch.equal(decoded[name], tensor), name


def test_decode_dtype_override_and_device():
    decoded = ft.decode(ft.encode(_tensors()), device="cpu", dtype=torch.float32)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in decoded.values())


def test_budgeted_encode_accepts_torch_fisher():
    tensors = {"w": torch.randn(64, 64)}
    fisher = {"w": torch.rand(64, 64)}
    message = ft.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=2))
    assert len(message) <= 64 * 64 * 2 // 8
    assert ft.decode(message)["w"].shape == (64, 64)


def test_decode_parses_once_and_returns_declared_bfloat16(monkeypatch):
    tensors = _tensors()
    message = ft.encode(tensors, meta={"round": 2})
    assert fstqcodec.open(message).dtypes == {"w32": "float32", "w16": "float16", "wbf16": "bfloat16"}
    calls = []
    real_read_container = fstqcodec.decoder.read_container

    def counting(*args, **kwargs):
        calls.append(1)
        return real_read_container(*args, **kwargs)

    monkeypatch.setattr(fstqcodec.decoder, "read_container", counting)
    decoded = ft.decode(message)
    assert len(calls) == 1, "the message must be parsed once"
    assert decoded["wbf16"].dtype == torch.bfloat16 and torch.equal(decoded["wbf16"], tensors["wbf16"])


def test_encode_takes_one_config_or_keyword_options():
    tensors = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(1))}
    fisher = {"w": torch.rand(64, 64, generator=torch.Generator().manual_seed(2))}
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=1), fisher_power=0.5, seed=3)
    by_config = ft.encode(tensors, fisher=fisher, config=config)
    assert by_config == ft.encode(tensors, fisher=fisher, **config.encode_kwargs())
    assert by_config == fstqcodec.encode({"w": tensors["w"].numpy()}, fisher={"w": fisher["w"].numpy()}, config=config)
    assert by_config != ft.encode(tensors, fisher=fisher, config=config.replace(fisher_power=1.0))
    with pytest.raises(TypeError, match="not both"):
        ft.encode(tensors, config=config, bits=4)
    with pytest.raises(TypeError):
        ft.encode(tensors, config={"bits": 4})


def test_encode_rejects_integer_tensors_and_non_mappings():
    with pytest.raises(TypeError):
        ft.encode({"ids": torch.arange(5)})
    with pytest.raises(TypeError):
        ft.encode([torch.zeros(3)])


def _tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # frozen parameters must be ignored
    return model


def test_fisher_accumulator_matches_direct_computation():
    model = _tiny_mlp()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    accumulator = ft.FisherAccumulator(model)
    generator = torch.Generator().manual_seed(1)
    expected = {name: torch.zeros_like(p) for name, p in trainable.items()}
    steps = 4
    for _ in range(steps):
        x = torch.randn(6, 4, generator=generator)
        y = torch.randint(0, 3, (6,), generator=generator)
        loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        # The direct computation, at the same parameter values, not seen by the accumulator.
        with accumulator.paused():
            grads = torch.autograd.grad(loss_fn(), list(trainable.values()))
        for name, grad in zip(trainable, grads):
            expected[name] += grad**2 / steps
        # The training step the accumulator observes.
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad()
    fisher = accumulator.fisher()
    assert set(fisher) == set(trainable) and "0.bias" not in fisher
    assert accumulator.steps == steps
    for name in trainable:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-8)
    accumulator.remove()


def test_fisher_accumulator_sees_each_micro_batch_under_gradient_accumulation():
    model = _tiny_mlp()
    accumulator = ft.FisherAccumulator(model)
    x = torch.randn(8, 4)
    y = torch.randint(0, 3, (8,))
    first, second = slice(0, 4), slice(4, 8)
    weight = model[2].weight
    grads = []
    for part in (first, second):
        with accumulator.paused():
            grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[part]), y[part]), weight)[0])
        torch.nn.functional.cross_entropy(model(x[part]), y[part]).backward()  # .grad accumulates
    expected = (grads[0] ** 2 + grads[1] ** 2) / 2  # mean of per-micro-batch squares, not (sum)**2
    torch.testing.assert_close(accumulator.fisher()["2.weight"], expected)


def test_fisher_accumulator_reset_decay_and_errors():
    model = _tiny_mlp()
    with ft.FisherAccumulator(model, decay=0.5) as accumulator:
        with pytest.raises(RuntimeError):
            accumulator.fisher()
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
        assert accumulator.steps == 3
        assert all(torch.all(v >= 0) for v in accumulator.fisher().values())
        accumulator.reset()
        assert accumulator.steps == 0
    # after __exit__ the hooks are gone: backward passes are no longer recorded
    model(torch.randn(2, 4)).sum().backward()
    assert accumulator.steps == 0
    with pytest.raises(ValueError):
        ft.FisherAccumulator(model, decay=1.0)
    with pytest.raises(TypeError):
        ft.FisherAccumulator(object())


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _direct_token_fisher(model, batch):
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    (grad,) = torch.autograd.grad(loss, embeddings)
    return grad.pow(2).sum(-1) * batch["attention_mask"]


def _token_batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 60, (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 2])}


def test_token_fisher_matches_gradient_wrt_input_embeddings():
    model = _tiny_bert()
    batch = _token_batch()
    scores = ft.token_fisher(model, batch)
    assert scores.shape == (2, 7)
    assert torch.all(scores[1, 5:] == 0) and torch.all(scores[0] > 0)
    torch.testing.assert_close(scores, _direct_token_fisher(model, batch))
    assert all(p.grad is None for p in model.parameters())  # parameters' .grad untouched


def test_token_fisher_recorder_uses_the_training_backward():
    model = _tiny_bert()
    batch = _token_batch()
    expected = _direct_token_fisher(model, batch)
    with ft.TokenFisherRecorder(model.get_input_embeddings()) as recorder:
        model(**batch).loss.backward()
    torch.testing.assert_close(recorder.last * batch["attention_mask"], expected)
