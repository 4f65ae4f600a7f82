"""fstqcodec.peft: a real PeftModel's adapter through fstqcodec messages and back."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fstqcodec  # noqa: E402
import fstqcodec.peft as fp  # noqa: E402
import fstqcodec.torch as ft  # noqa: E402


def _peft_model(seed=0):
    """A small BERT classifier with LoRA on query/value and a trained head, built offline."""
    config = transformers.BertConfig(
        vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    base = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    return peft.get_peft_model(base, lora)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 80, (4, 9), generator=generator),
        "attention_mask": torch.ones(4, 9, dtype=torch.long),
        "labels": torch.randint(0, 3, (4,), generator=generator),
    }


def _train(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_adapter_state_is_peft_state_dict_including_head():
    model = _peft_model()
    state = fp.adapter_state(model)
    assert set(state) == set(peft.get_peft_model_state_dict(model))
    assert any("lora_A" in n for n in state) and any("classifier" in n for n in state)
    # a copy: training does not change it
    before = {n: t.clone() for n, t in state.items()}
    _train(model)
    assert all(torch.equal(state[n], before[n]) for n in state)


def test_adapter_round_trips_through_a_message_into_another_model():
    trained = _peft_model(seed=0)
    _train(trained)
    state = fp.adapter_state(trained)
    message = ft.encode(state)  # lossless
    receiver = _peft_model(seed=0)  # same frozen base, untrained adapter
    batch = _batch(9)
    trained.eval(), receiver.eval()
    with torch.no_grad():
        assert not torch.allclose(trained(**batch).logits, receiver(**batch).logits)
    fp.load_adapter_state(receiver, ft.decode(message))
    received = fp.adapter_state(receiver)
    assert set(received) == set(state)
    for name in state:
        assert torch.equal(received[name], state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(trained(**batch).logits, receiver(**batch).logits)


def test_load_adapter_state_refuses_partial_or_foreign_states():
    model = _peft_model()
    state = fp.adapter_state(model)
    partial = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        fp.load_adapter_state(model, partial)
    with pytest.raises(ValueError, match="unexpected"):
        fp.load_adapter_state(model, {**state, "not.a.tensor": torch.zeros(1)})
    with pytest.raises(TypeError):
        fp.adapter_state(torch.nn.Linear(2, 2))


def test_update_and_apply_update_reconstruct_the_local_adapter():
    model = _peft_model()
    global_state = fp.adapter_state(model)
    _train(model)
    local_state = fp.adapter_state(model)
    update = fp.adapter_update(global_state, local_state)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in update.values())
    assert any(np.abs(v).max() > 0 for v in update.values())
    server_model = _peft_model()  # holds the global adapter
    fp.apply_update(server_model, fstqcodec.decode(fstqcodec.encode(update)))
    for name, tensor in fp.adapter_state(server_model).items():
        torch.testing.assert_close(tensor, local_state[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        fp.apply_update(server_model, {"nope": np.zeros(1, np.float32)})


@pytest.fixture(scope="module")
def trained():
    """(global adapter, local adapter after a few steps, the Fisher of those steps)."""
    model = _peft_model()
    global_state = fp.adapter_state(model)
    accumulator = ft.FisherAccumulator(model)
    _train(model)
    return global_state, fp.adapter_state(model), fp.adapter_fisher(accumulator, model)


def test_fisher_keys_match_adapter_and_client_message_respects_budget(trained):
    global_state, local_state, fisher = trained
    assert set(fisher) == set(global_state)
    assert all(fisher[n].shape == tuple(global_state[n].shape) for n in fisher)
    assert all(np.all(f >= 0) for f in fisher.values()) and any(f.max() > 0 for f in fisher.values())
    parameters = sum(t.numel() for t in global_state.values())
    feedback = fstqcodec.ErrorFeedback()
    budget = fstqcodec.Budget(bits_per_param=4.0)  # a small model: the header needs ~300 bytes
    message = fp.client_message(global_state, local_state, fisher=fisher, budget=budget, error_feedback=feedback)
    assert len(message) <= parameters * 4 / 8
    decoded = fstqcodec.decode(message)
    update = fp.adapter_update(global_state, local_state)
    for name in update:  # error feedback keeps exactly what the message lost
        np.testing.assert_allclose(feedback.residual[name], update[name] - decoded[name], atol=1e-7)


def test_client_message_defaults_to_the_federated_fisher_power_and_takes_one_config(trained):
    global_state, local_state, fisher = trained
    update = fp.adapter_update(global_state, local_state)
    budget = fstqcodec.Budget(bits_per_param=4.0)  # a small model: the header needs ~300 bytes
    federated = fstqcodec.EncodeConfig(budget=budget, fisher_power=fstqcodec.FEDERATED_FISHER_POWER)
    by_options = fp.client_message(global_state, local_state, fisher=fisher, budget=budget)
    assert by_options == fstqcodec.encode(update, fisher=fisher, config=federated)
    assert by_options != fstqcodec.encode(update, fisher=fisher, budget=budget)  # encode keeps power 1
    assert fp.client_message(global_state, local_state, fisher=fisher, config=federated) == by_options
    pure = federated.replace(fisher_power=1.0)
    assert fp.client_message(global_state, local_state, fisher=fisher, config=pure) == fstqcodec.encode(
        update, fisher=fisher, config=pure
    )
    # Without options, the error feedback's own config applies.
    feedback = fstqcodec.ErrorFeedback(pure)
    assert fp.client_message(global_state, local_state, fisher=fisher, error_feedback=feedback) == fstqcodec.encode(
        update, fisher=fisher, config=pure
    )
    with pytest.raises(TypeError, match="not both"):
        fp.client_message(global_state, local_state, config=federated, budget=budget)


def test_fisher_callback_accumulates_during_trainer_training(tmp_path):
    model = _peft_model()

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            batch = _batch(i)
            return {k: v[0] for k, v in batch.items()}

    callback = fp.FisherCallback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tiny(), callbacks=[callback])
    trainer.train()
    fisher = callback.fisher()
    assert set(fisher) == set(fp.adapter_state(model))
    assert callback.accumulator.steps == 2
    assert any(f.max() > 0 for f in fisher.values())
