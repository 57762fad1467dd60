"""Device follows the parameters. Runs only where CUDA is available (never in CI)."""

import pytest
import torch

import curvkit as ck
from tests.cases import dense_hessian, make_case, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "spec", [("mlp-tanh", "ce-mean", [3, 5]), ("transformer", "ce-seq-mean", [4])]
)
def test_products_on_cuda_match_cpu_oracle(spec):
    case = make_case(*spec)
    H_dense = dense_hessian(case)
    model = case.model.cuda()
    batches = [(X, y) for X, y in case.batches]  # left on the CPU: moved per batch
    H = ck.HessianOperator(model, case.loss_fn, batches if len(batches) > 1 else batches[0])
    assert H.device.type == "cuda"
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, device="cuda")
    rng = torch.cuda.get_rng_state()
    out = H @ V
    assert out.device.type == "cuda"
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert rel_err(out.cpu(), H_dense @ V.cpu()) < 1e-10
