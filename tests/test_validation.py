"""Bad input to curvature operators gets a clear error naming the problem and the fix."""

import pytest
import torch
from torch import nn

import curvkit as ck


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.randn(5, 2)
    return model, nn.MSELoss(), (X, y)


def test_params_that_do_not_require_grad(setup):
    model, loss, data = setup
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        ck.HessianOperator(model, loss, data, params=[model[0].weight])
    H = ck.HessianOperator(model, loss, data)  # default: only those that require grad
    assert H.shape[0] == sum(p.numel() for p in model.parameters()) - 12
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ck.HessianOperator(model, loss, data)


def test_foreign_parameter(setup):
    model, loss, data = setup
    with pytest.raises(ValueError, match="not a parameter of the model"):
        ck.HessianOperator(model, loss, data, params=[torch.zeros(2, requires_grad=True)])


def test_shape_mismatch_of_probe(setup):
    H = ck.HessianOperator(*setup)
    with pytest.raises(ValueError, match="shape mismatch"):
        H @ torch.zeros(H.shape[0] + 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        H @ [torch.zeros(1)]


def test_nan_loss(setup):
    model, loss, (X, y) = setup
    X = X.clone()
    X[0, 0] = float("nan")
    H = ck.HessianOperator(model, loss, (X, y), check_deterministic=False)
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        H @ torch.ones(H.shape[0])


def test_inf_in_product(setup):
    model, loss, data = setup
    H = ck.HessianOperator(model, loss, data)
    with pytest.raises(FloatingPointError, match="product is not finite"):
        H @ torch.full((H.shape[0],), float("inf"))
    assert "single" not in H.backend_choices  # an inf probe decides nothing
    assert torch.isfinite(H.row_sum()).all()
    assert "single" in H.backend_choices


def test_empty_and_one_shot_data(setup):
    model, loss, data = setup
    with pytest.raises(ValueError, match="data is empty"):
        ck.HessianOperator(model, loss, [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        ck.HessianOperator(model, loss, (b for b in [data]))
    with pytest.raises(ValueError, match=r"\(X, y\) pair"):
        ck.HessianOperator(model, loss, [(data[0],)])


def test_dropout_in_train_mode_is_detected(setup):
    _, loss, data = setup
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    with pytest.raises(RuntimeError, match=r"dropout.*model\.eval\(\).*check_deterministic=False"):
        ck.HessianOperator(model, loss, data)
    rng = torch.get_rng_state()
    H = ck.HessianOperator(model, loss, data, check_deterministic=False)
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    H = ck.HessianOperator(model, loss, data)
    assert torch.isfinite(H.row_sum()).all()


def test_loss_without_reduction(setup):
    model, _, data = setup

    def loss(out, y):
        return ((out - y) ** 2).mean()

    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        ck.HessianOperator(model, loss, data)
    H = ck.HessianOperator(model, loss, data, reduction="mean")
    torch.testing.assert_close(H.row_sum(), ck.HessianOperator(model, nn.MSELoss(), data).row_sum())
    with pytest.raises(ValueError, match="not supported"):
        ck.HessianOperator(model, nn.MSELoss(reduction="none"), data)


def test_unknown_backend(setup):
    with pytest.raises(ValueError, match="unknown backend"):
        ck.HessianOperator(*setup, backend="magic")


def test_a_reduction_that_contradicts_the_loss_is_refused(setup):
    model, loss, data = setup
    with pytest.raises(ValueError, match="reduction='sum' contradicts loss_fn.reduction='mean'"):
        ck.HessianOperator(model, loss, data, reduction="sum")
    agreeing = ck.HessianOperator(model, loss, data, reduction="mean")
    torch.testing.assert_close(agreeing.row_sum(), ck.HessianOperator(model, loss, data).row_sum())


def test_one_batch_with_tuple_inputs_and_missing_targets(setup):
    _, loss, (X, y) = setup

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, inputs):
            a, b = inputs
            return self.lin(a) + torch.tanh(self.lin(b))

    torch.manual_seed(0)
    model = TwoInputs()
    one = ck.HessianOperator(model, loss, ((X, 2 * X), y))
    wrapped = ck.HessianOperator(model, loss, [((X, 2 * X), y)])
    assert len(one.batches) == 1
    torch.testing.assert_close(one.to_dense(), wrapped.to_dense())
    with pytest.raises(ValueError, match="targets y are None"):
        ck.HessianOperator(model, loss, (X, None))


@pytest.mark.parametrize("container", ["dict", "nested"])
def test_determinism_check_on_structured_outputs(setup, container):
    _, _, (X, y) = setup

    class Structured(nn.Module):
        def __init__(self, dropout: float):
            super().__init__()
            self.lin, self.drop = nn.Linear(3, 2), nn.Dropout(dropout)

        def forward(self, x):
            out = self.drop(self.lin(x))
            return {"logits": out, "name": "head"} if container == "dict" else ((out,), [out])

    def loss(out, target):
        pred = out["logits"] if container == "dict" else out[0][0]
        return ((pred - target) ** 2).mean()

    H = ck.HessianOperator(Structured(0.0), loss, (X, y), reduction="mean")
    assert torch.isfinite(H.row_sum()).all()
    with pytest.raises(RuntimeError, match="changed between two identical forward passes"):
        ck.HessianOperator(Structured(0.5), loss, (X, y), reduction="mean")


def test_building_over_a_shuffling_loader_leaves_the_global_rng(setup):
    from torch.utils.data import DataLoader, TensorDataset

    model, loss, (X, y) = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=2, shuffle=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    H = ck.HessianOperator(model, loss, loader)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    H @ torch.ones(H.shape[0])
    assert torch.equal(torch.rand(3), expected)


def test_kl_divergence_with_batchmean_is_a_mean_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(-1))
    model = model.double()
    X = torch.randn(12, 4, dtype=torch.float64)
    T = torch.softmax(torch.randn(12, 3, dtype=torch.float64), -1)
    loss = nn.KLDivLoss(reduction="batchmean")
    whole = ck.HessianOperator(model, loss, (X, T)).to_dense()
    for reduction in (None, "mean"):
        split = ck.HessianOperator(model, loss, [(X[:5], T[:5]), (X[5:], T[5:])],
                                   reduction=reduction)  # fmt: skip
        torch.testing.assert_close(split.to_dense(), whole)
    with pytest.raises(ValueError, match="contradicts"):
        ck.HessianOperator(model, loss, (X, T), reduction="sum")


def test_counted_targets_are_read_back_once_per_batch(monkeypatch):
    """Weights by counted targets need a host sync per batch; a list of batches passes the
    same tensors every product, so each is read back once, not once per product."""
    import curvkit.data as data_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(9, 3), torch.randint(0, 3, (9,))
    y[:2] = -100
    batches = [(X[:3], y[:3]), (X[3:6], y[3:6]), (X[6:], y[6:])]
    calls = [0]
    counted = data_module.counted_targets

    def spy(loss_fn, t):
        calls[0] += 1
        return counted(loss_fn, t)

    monkeypatch.setattr(data_module, "counted_targets", spy)
    H = ck.HessianOperator(model, nn.CrossEntropyLoss(), batches, backend="double-backward")
    built = calls[0]
    for _ in range(3):
        H @ torch.ones(H.shape[0])
    assert calls[0] - built == len(batches)
