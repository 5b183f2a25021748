"""The training loop of ``probopt compare``: it learns, it is deterministic, estimators plug in."""

import math

import pytest
import torch

import probopt.optim
from probopt.experiments import load_dataset
from probopt.experiments.optimizers import (
    OPTIMIZERS,
    available_optimizers,
    default_lr,
    is_available,
    make_optimizer,
)
from probopt.experiments.training import compare, estimator_names, make_estimator, train
from probopt.sampling.gradient_estimator import UniformEstimator

HAS_VSGD = hasattr(probopt.optim, "VSGD")
HAS_GQ = hasattr(probopt.optim, "GradQueue")


@pytest.fixture(scope="module")
def iris():
    return load_dataset("iris")


def test_loss_decreases_on_an_easy_problem(iris):
    run = train(iris, "sgdm", network="logreg", epochs=5, batch_size=16, seed=0)
    # iris with a linear softmax: 5 epochs of momentum SGD take the loss from ~ln 3 to well below
    # half of it and classify most flowers; the margins are wide so the test is not seed-fragile
    assert run.train_loss[-1] < 0.5 * run.train_loss[0]
    assert run.final_test_accuracy >= 0.8
    assert not run.diverged


def test_per_epoch_lists_have_the_documented_lengths(iris):
    run = train(iris, "adamw", network="mlp", network_kwargs={"hidden": (8,)}, epochs=3,
                batch_size=32)  # fmt: skip
    assert len(run.train_loss) == len(run.test_loss) == len(run.test_accuracy) == 4
    assert len(run.batch_loss) == len(run.epoch_time) == 3
    assert all(t >= 0 for t in run.epoch_time)
    assert run.lr == default_lr("adamw")
    assert run.best_test_accuracy == max(run.test_accuracy[1:])


def test_runs_are_deterministic_given_the_seed_and_leave_the_global_rng_alone(iris):
    state = torch.random.get_rng_state()
    a = train(iris, "sgdm", network="mlp", epochs=2, batch_size=16, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = train(iris, "sgdm", network="mlp", epochs=2, batch_size=16, seed=3)
    c = train(iris, "sgdm", network="mlp", epochs=2, batch_size=16, seed=4)
    assert a.train_loss == b.train_loss and a.test_accuracy == b.test_accuracy
    assert a.train_loss[1:] != c.train_loss[1:]


class CountingEstimator(UniformEstimator):
    """Uniform sampling that counts the calls the loop makes and the examples it sees."""

    name = "counting"

    def setup(self, model, x, y):
        super().setup(model, x, y)
        self.calls = {"setup": 1, "backward": 0, "after_step": 0}
        self.seen = torch.zeros(x.shape[0], dtype=torch.long)

    def backward(self, model, loss_fn, x, y, index):
        self.calls["backward"] += 1
        self.seen[index] += 1
        losses = loss_fn(model(x), y)
        assert losses.shape == (x.shape[0],)  # per-example losses (reduction="none")
        return super().backward(model, loss_fn, x, y, index)

    def after_step(self, model):
        self.calls["after_step"] += 1


def test_the_loop_goes_through_the_gradient_estimator(iris):
    est = CountingEstimator()
    run = train(iris, "sgdm", network="logreg", epochs=2, batch_size=32, estimator=est)
    steps = 2 * (iris.x_train.shape[0] // 32)
    assert est.calls == {"setup": 1, "backward": steps, "after_step": steps}
    assert run.estimator == "counting"
    assert int(est.seen.sum()) == steps * 32 and int(est.seen.max()) <= 2  # drop_last, no repeats


def test_estimators_by_name():
    assert isinstance(make_estimator("uniform"), UniformEstimator)
    assert estimator_names()[0] == "uniform"
    with pytest.raises(ValueError, match="unknown estimator 'nope'; choose from uniform"):
        make_estimator("nope")


class PoisonedEstimator(UniformEstimator):
    """Uniform, except that from step ``at`` on every gradient is NaN."""

    def __init__(self, at):
        self.at, self.steps = at, 0

    def backward(self, model, loss_fn, x, y, index):
        loss = super().backward(model, loss_fn, x, y, index)
        self.steps += 1
        if self.steps >= self.at:
            for p in model.parameters():
                p.grad.fill_(math.nan)
        return loss


def test_divergence_stops_the_run_and_pads_with_nan(iris):
    steps_per_epoch = iris.x_train.shape[0] // 8
    est = PoisonedEstimator(at=steps_per_epoch + 1)  # the first step of epoch 2
    run = train(iris, "sgdm", network="logreg", epochs=4, batch_size=8, estimator=est)
    assert run.diverged and est.steps == 2 * steps_per_epoch  # stopped after epoch 2
    assert math.isfinite(run.train_loss[1]) and math.isnan(run.train_loss[2])
    assert len(run.train_loss) == 5 and math.isnan(run.train_loss[-1])
    assert len(run.epoch_time) == 4 and math.isnan(run.epoch_time[-1])


def test_compare_pairs_optimizers_and_seeds(iris):
    runs = compare(iris, ["sgdm", "adam"], seeds=[0, 5], lrs={"adam": 0.01}, network="logreg",
                   epochs=1)  # fmt: skip
    assert [(r.optimizer, r.seed, r.lr) for r in runs] == [
        ("sgdm", 0, 0.05), ("sgdm", 5, 0.05), ("adam", 0, 0.01), ("adam", 5, 0.01)
    ]  # fmt: skip
    assert runs[0].train_loss[0] == runs[2].train_loss[0]  # same seed, same initial network


def test_bad_epochs_raise():
    with pytest.raises(ValueError, match="epochs must be an integer >= 0, got -1"):
        train("iris", "sgdm", epochs=-1)
    with pytest.raises(ValueError, match="schedule must be one of constant, step, cosine"):
        train("iris", "sgdm", epochs=1, schedule="linear")


@pytest.mark.parametrize("name", ["sgdm", "vsgd", "gq-sgdm"])
@pytest.mark.parametrize("schedule, mid, end", [
    ("constant", 1.0, 1.0), ("step", 0.5, 0.25), ("cosine", 0.5, 0.0),
])  # fmt: skip
def test_schedules_set_the_documented_learning_rate(iris, name, schedule, mid, end):
    """iris, batch 30: 4 iterations per epoch, 6 epochs = 24 iterations. The rate seen by the
    optimizer (for Grad Queue: its inner optimizer) after 3 epochs (12 iterations) and at the
    end: constant; halved after each third (8, 16 iterations); cosine to 0 (half at mid-run)."""
    if not is_available(name):
        pytest.skip(f"{name} is not available")
    seen = {}

    def grab(model, opt, est):
        seen["opt"] = opt

    def at(run, epoch):
        if epoch in (3, 6):
            seen[epoch] = seen["opt"].param_groups[0]["lr"]

    run = train(iris, name, network="logreg", epochs=6, batch_size=30, lr=0.1,
                schedule=schedule, on_start=grab, callback=at)  # fmt: skip
    assert iris.x_train.shape[0] // 30 == 4 and run.schedule == schedule
    assert seen[3] == pytest.approx(0.1 * mid, abs=1e-12)
    assert seen[6] == pytest.approx(0.1 * end, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# the optimizer registry


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_available_optimizer_builds_with_its_default_lr(name):
    if not is_available(name):
        pytest.skip(f"{name} needs probopt.optim.{', '.join(OPTIMIZERS[name].requires)}, "
                    "which is not in this probopt yet")  # fmt: skip
    w = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer(name, [w])
    assert opt.param_groups[0]["lr"] == default_lr(name)
    assert make_optimizer(name, [w], lr=0.123).param_groups[0]["lr"] == 0.123


def test_registry_settings_and_errors():
    w = torch.nn.Parameter(torch.ones(3))
    assert make_optimizer("sgdm", [w]).defaults["momentum"] == 0.9
    assert make_optimizer("sgdm", [w], momentum=0.5).defaults["momentum"] == 0.5
    assert make_optimizer("adamw", [w]).defaults["weight_decay"] == 0.01
    assert {"sgdm", "adam", "adamw"} <= set(available_optimizers())
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose from sgdm"):
        make_optimizer("sgd", [w])


@pytest.mark.skipif(not HAS_VSGD, reason="probopt.optim.VSGD is not in this probopt yet")
def test_vsgd_trains_through_the_registry(iris):
    assert isinstance(make_optimizer("vsgd", [torch.nn.Parameter(torch.ones(2))]),
                      probopt.optim.VSGD)  # fmt: skip
    run = train(iris, "vsgd", network="logreg", epochs=5, batch_size=16)
    assert run.train_loss[-1] < 0.7 * run.train_loss[0]


@pytest.mark.skipif(not HAS_GQ, reason="probopt.optim.GradQueue is not in this probopt yet")
def test_grad_queue_entries_wrap_their_inner_optimizer(iris):
    opt = make_optimizer("gq-sgdm", [torch.nn.Parameter(torch.ones(2))])
    assert isinstance(opt, probopt.optim.GradQueue)
    run = train(iris, "gq-adamw", network="logreg", epochs=3, batch_size=16, lr=0.05)
    assert run.train_loss[-1] < run.train_loss[0]
