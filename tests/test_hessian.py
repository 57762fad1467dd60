"""HessianOperator against the dense float64 oracle (double backward) and curvlinops."""

import copy

import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit as ck
from tests.cases import Case, dense_hessian, make_case, rel_err

TOL = 1e-10


def _probes(D, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g, dtype=torch.float64)


def test_products_match_dense_oracle(case):
    H_dense = dense_hessian(case)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0])
    assert H.shape == H_dense.shape and H.is_symmetric and not H.is_psd
    assert rel_err(H @ V, H_dense @ V) < TOL
    assert rel_err(H @ V[:, 0], H_dense @ V[:, 0]) < TOL
    assert rel_err(H.row_sum(), H_dense.sum(1)) < TOL


def test_parameter_subset_gives_the_block(case):
    sub = case.subset()
    H_block = dense_hessian(case, sub)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, params=sub)
    assert H.shape == H_block.shape
    assert rel_err(H.to_dense(), H_block) < TOL
    pieces = [torch.randn_like(p) for p in sub]
    out = H @ pieces
    assert [o.shape for o in out] == [p.shape for p in sub]
    flat = H_block @ torch.cat([p.reshape(-1) for p in pieces])
    assert rel_err(torch.cat([o.reshape(-1) for o in out]), flat) < TOL


def test_block_row_sums(case):
    H_dense = dense_hessian(case)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    start = 0
    for block, p in zip(H.block_row_sums(), case.params):
        n = p.numel()
        expected = H_dense[start : start + n, start : start + n].sum(1).reshape(p.shape)
        assert block.shape == p.shape
        # relative to the whole Hessian: a ReLU net's last blocks can be exactly zero
        assert (block - expected).norm() < TOL * H_dense.norm()
        start += n


def test_leaves_the_model_as_it_was(case):
    model = case.model
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    H @ _probes(H.shape[0], K=3)
    H.block_row_sums()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


FORWARD_EXACT = [
    ("mlp-tanh", "mse-sum", [3, 5, 2]),
    ("mlp-relu", "ce-mean", [3, 5, 2]),
    ("cnn", "ce-mean", [4, 2]),
    ("bn-eval", "ce-mean", [3, 5]),
    ("mlp-tanh", "bce", [4, 3]),
]


@pytest.mark.parametrize("spec", FORWARD_EXACT, ids=lambda s: f"{s[0]}/{s[1]}")
def test_against_curvlinops(spec):
    """curvlinops 3.0.1 on models without affine LayerNorm or train-mode BatchNorm."""
    curvlinops = pytest.importorskip("curvlinops")
    case = make_case(*spec)
    ours = ck.HessianOperator(case.model, case.loss_fn, case.data)
    theirs = curvlinops.HessianLinearOperator(case.model, case.loss_fn, case.params, case.batches)
    V = _probes(ours.shape[0], K=3)
    assert rel_err(ours @ V, theirs @ V) < 1e-10


def test_dataloader_with_uneven_batches():
    case = make_case("mlp-tanh", "mse-mean", [8])
    X, y = case.batches[0]
    loader = DataLoader(TensorDataset(X, y), batch_size=3)  # 3 + 3 + 2
    H = ck.HessianOperator(case.model, case.loss_fn, loader)
    assert H.batches.sizes == [3, 3, 2]
    assert rel_err(H.to_dense(), dense_hessian(case)) < TOL


def test_float32_follows_parameters():
    case = make_case("mlp-tanh", "ce-mean", [6])
    H64 = dense_hessian(case)
    model = case.model.float()
    X, y = case.batches[0]
    H = ck.HessianOperator(model, case.loss_fn, (X.float(), y))
    assert H.dtype == torch.float32
    out = H @ torch.ones(H.shape[0])
    assert out.dtype == torch.float32
    assert rel_err(out.double(), H64.sum(1)) < 1e-5
    # float64 data is cast to the model's dtype
    H2 = ck.HessianOperator(model, case.loss_fn, (X, y))
    assert rel_err(H2.row_sum(), out) < 1e-6


def test_to_scipy_eigsh_cg_onenormest():
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    H_dense = dense_hessian(case)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    evals = torch.linalg.eigvalsh(H_dense)
    top = sla.eigsh(H.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    assert abs(top[0] - evals[-1].item()) < 1e-8 * abs(evals[-1].item())
    lam = abs(evals[0].item()) + 1.0
    b = torch.arange(H.shape[0], dtype=torch.float64).numpy()
    x, info = sla.cg(H.shift(lam).to_scipy(), b, rtol=1e-12, atol=0)
    assert info == 0
    expected = torch.linalg.solve(
        H_dense + lam * torch.eye(H.shape[0], dtype=torch.float64), torch.as_tensor(b)
    )
    assert rel_err(torch.as_tensor(x), expected) < 1e-8
    est = sla.onenormest(H.to_scipy())
    true = H_dense.abs().sum(0).max().item()
    assert 0.3 * true <= est <= true * (1 + 1e-10)


def test_operator_algebra_on_curvature():
    case = make_case("mlp-relu", "ce-mean", [3, 5, 2])
    H_dense = dense_hessian(case)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    combo = 2 * H - H @ H + H.shift(-0.5)
    expected = 2 * H_dense - H_dense @ H_dense + H_dense - 0.5 * eye
    assert rel_err(combo.to_dense(), expected) < TOL


def test_train_mode_batchnorm_is_sum_of_per_batch_hessians():
    """Documented exception: train-mode BatchNorm couples samples within a batch."""
    case = make_case("bn-train", "mse-sum", [4, 3])
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    assert H.couples_samples

    def with_batches(batches):
        return Case("bn", case.model, case.loss_fn, batches, couples_samples=True)

    per_batch = sum(dense_hessian(with_batches([b])) for b in case.batches)
    assert rel_err(H.to_dense(), per_batch) < TOL
    X = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    concatenated = dense_hessian(with_batches([(X, y)]))
    assert rel_err(per_batch, concatenated) > 1e-3  # the two semantics really differ


def test_attention_through_fused_kernel_path():
    """SDPA's fused kernels have no double backward; the operator routes to the math kernel."""
    attn = nn.MultiheadAttention(4, 2, batch_first=True).double()
    model = nn.Sequential()
    model.forward = lambda x: attn(x, x, x, need_weights=False)[0].sum(-1)
    model.attn = attn
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)
    H = ck.HessianOperator(model, nn.MSELoss(), (X, y))
    out = H.row_sum()
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_k_probes_share_one_forward_pass_per_batch():
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        H = ck.HessianOperator(case.model, case.loss_fn, case.data)
        H @ _probes(H.shape[0], K=2)  # lets backend="auto" settle its choice first
        calls.clear()
        H @ _probes(H.shape[0], K=8)
    finally:
        handle.remove()
    assert len(calls) == len(case.batches)


def _counted_targets_data(ignore_index: int):
    """Class targets, three of them ignored (as padding is); the first batch below holds
    only ignored ones."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    y[[0, 1, 4]] = ignore_index
    return X, y


@pytest.mark.parametrize(
    "loss_fn",
    [
        torch.nn.CrossEntropyLoss(),
        torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)),
        torch.nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
    ],
    ids=["ignored targets", "class weights", "ignore_index=2, smoothing"],
)
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_mean_losses_weight_batches_by_the_targets_they_count(loss_fn, operator):
    """Several batches give the operator of the loss over all the data, also where the mean
    divides by weighted or unignored targets rather than by samples (one batch holds only
    ignored targets, and adds nothing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    X, y = _counted_targets_data(loss_fn.ignore_index)
    build = ck.HessianOperator if operator == "hessian" else ck.GGNOperator
    whole = build(model, loss_fn, (X, y)).to_dense()
    split = [(X[:2], y[:2]), (X[2:6], y[2:6]), (X[6:], y[6:])]
    assert rel_err(build(model, loss_fn, split).to_dense(), whole) < 1e-12
