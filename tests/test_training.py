"""Tests for flawmap.training: learning, seeding, exact resumption, refusal, selection, hooks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from flawmap.errors import FlawmapError
from flawmap.training import Checkpoint, History, cache_batches, train

DEFAULTS = {"epochs": 4, "batch_size": 8, "learning_rate": 1e-2}
"""32 samples in batches of 8: 4 batches per epoch."""


def regression_data(seed: int = 0) -> list[torch.Tensor]:
    """Inputs (32, 4) and targets (32, 1) of a noiseless linear map."""
    inputs = torch.randn(32, 4, generator=torch.Generator().manual_seed(seed))
    return [inputs, inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])]


def new_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def mse_of(network: nn.Module):
    """The regression loss of ``network`` on a batch (inputs, targets)."""

    def loss(batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        inputs, targets = batch
        return (network(inputs) - targets).pow(2).mean()

    return loss


def fit(network: nn.Module | None = None, data: list[torch.Tensor] | None = None, **settings) -> tuple[nn.Module, History]:
    """Train a (new) network on the regression with small defaults."""
    network = new_network() if network is None else network
    data = regression_data() if data is None else data
    history = train(network, data, mse_of(network), **{**DEFAULTS, **settings})
    return network, history


def assert_same_weights(first: nn.Module, second: nn.Module) -> None:
    for (name, tensor), other in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(tensor, other), name


def test_a_tiny_regression_learns_and_ends_in_eval_mode():
    network, history = fit(epochs=30)
    assert len(history.losses) == 30 and history.selected_epoch == 29
    assert history.losses[-1] < history.losses[0] / 10
    assert not network.training


def test_the_same_seed_gives_identical_weights():
    first, first_history = fit(seed=3)
    second, second_history = fit(seed=3)
    assert first_history.losses == second_history.losses
    assert_same_weights(first, second)
    other, _ = fit(seed=4)  # another batch order
    assert not torch.equal(other[0].weight, first[0].weight)


def test_weight_decay_and_the_optimizer_are_used():
    plain, _ = fit()
    decayed, _ = fit(weight_decay=1.0)
    sgd, _ = fit(optimizer_class=torch.optim.SGD)
    assert decayed[0].weight.norm() < plain[0].weight.norm()
    assert not torch.equal(sgd[0].weight, plain[0].weight)


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, straight_history = fit(epochs=4)
    checkpoint = Checkpoint(tmp_path, {"stage": 1})
    fit(epochs=2, checkpoint=checkpoint)  # "interrupted" after epoch 2
    resumed, history = fit(new_network(seed=9), epochs=4, checkpoint=checkpoint)  # its own weights are replaced
    assert history.losses == straight_history.losses
    assert_same_weights(resumed, straight)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # network, optimizer, generator of the last epoch only


def test_an_interruption_inside_an_epoch_loses_only_that_epoch(tmp_path):
    checkpoint = Checkpoint(tmp_path, {})
    batches = itertools.count(1)

    def interrupt_in_third_epoch(batch, generator):
        if next(batches) == 10:
            raise KeyboardInterrupt
        return batch

    network = new_network()
    with pytest.raises(KeyboardInterrupt):
        fit(network, checkpoint=checkpoint, augment=interrupt_in_third_epoch)
    assert not network.training
    resumed, history = fit(checkpoint=checkpoint)
    straight, _ = fit()
    assert len(history.losses) == 4
    assert_same_weights(resumed, straight)


def test_a_checkpoint_of_other_settings_or_data_is_refused(tmp_path):
    checkpoint = Checkpoint(tmp_path, {"hidden_dim": 8})
    fit(epochs=2, checkpoint=checkpoint)
    refused = f"^{tmp_path / 'training.json'}: checkpoint written for other settings or training data"
    for mismatch in (
        {"checkpoint": Checkpoint(tmp_path, {"hidden_dim": 16})},
        {"checkpoint": checkpoint, "learning_rate": 0.5},
        {"checkpoint": checkpoint, "seed": 1},
        {"checkpoint": checkpoint, "data": regression_data(seed=1)},
    ):
        with pytest.raises(FlawmapError, match=refused):
            fit(**mismatch)
    with pytest.raises(FlawmapError, match="already trained 2 epochs, more than epochs=1"):
        fit(epochs=1, checkpoint=checkpoint)
    fit(epochs=3, checkpoint=checkpoint)  # more epochs: accepted


@pytest.mark.parametrize("selection", ["train_loss", "validation_loss"])
def test_best_selection_keeps_the_weights_of_the_lowest_loss_epoch(selection):
    scripted = [300.0, 100.0, 200.0, 150.0, 500.0]  # lowest after the second epoch
    network = new_network()
    if selection == "train_loss":
        # A constant per epoch moves the epoch's mean loss, not the gradients: same path as "last".
        batches, mse = itertools.count(), mse_of(network)

        def loss(batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
            return mse(batch, generator) + scripted[next(batches) // 4]

        history = train(network, regression_data(), loss, **{**DEFAULTS, "epochs": 5}, selection=selection)
    else:
        epochs = itertools.count()
        _, history = fit(network, epochs=5, selection=selection, validation_loss=lambda: scripted[next(epochs)])
        assert history.validation_losses == scripted
    assert len(history.losses) == 5 and history.selected_epoch == 1
    after_two_epochs, _ = fit(epochs=2)
    assert_same_weights(network, after_two_epochs)


def test_best_selection_resumes_with_the_best_weights(tmp_path):
    validation = iter([1.0, 2.0, 3.0, 4.0])
    settings = {"selection": "validation_loss", "validation_loss": lambda: next(validation), "checkpoint": Checkpoint(tmp_path, {})}
    fit(epochs=2, **settings)
    network, history = fit(epochs=4, **settings)
    assert history.validation_losses == [1.0, 2.0, 3.0, 4.0] and history.selected_epoch == 0
    after_one_epoch, _ = fit(epochs=1)
    assert_same_weights(network, after_one_epoch)


def test_the_augmentation_hook_gets_each_batch_and_the_generator():
    seen = []

    def augment(batch, generator):
        seen.append((batch[0].shape[0], generator))
        return [batch[0] + 0.01 * torch.randn(batch[0].shape, generator=generator), batch[1]]

    _, first = fit(epochs=2, batch_size=12, augment=augment)
    assert [size for size, _ in seen] == [12, 12, 8] * 2  # 32 samples per epoch
    assert all(isinstance(generator, torch.Generator) for _, generator in seen)
    assert len({id(generator) for _, generator in seen}) == 1
    _, second = fit(epochs=2, batch_size=12, augment=augment)
    assert second.losses == first.losses  # the noise is seeded too


def test_continuing_training_starts_from_the_current_weights():
    network, first = fit(epochs=10)
    _, continued = fit(network, epochs=2)
    assert continued.losses[0] < first.losses[0] / 2


def test_validation_loss_goes_with_its_selection():
    with pytest.raises(ValueError, match="validation_loss"):
        fit(selection="validation_loss")
    with pytest.raises(ValueError, match="validation_loss"):
        fit(validation_loss=lambda: 0.0)
    with pytest.raises(ValueError, match="selection"):
        fit(selection="best")


def test_cache_batches_concatenates_each_position_as_float16_on_the_cpu():
    batches = [[torch.ones(2, 3), torch.zeros(2, 1, 4)], [torch.full((1, 3), 2.0), torch.ones(1, 1, 4)]]
    first, second = cache_batches(iter(batches))
    assert first.dtype == second.dtype == torch.float16 and first.device.type == "cpu"
    assert first.tolist() == [[1.0] * 3, [1.0] * 3, [2.0] * 3] and second.shape == (3, 1, 4)
    with pytest.raises(FlawmapError, match="no valid training image"):
        cache_batches(iter([]))
