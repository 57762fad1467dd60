import pytest
import torch

from tests.cases import CASE_SPECS, case_ids, make_case


@pytest.fixture(params=CASE_SPECS, ids=case_ids())
def case(request):
    """Every model/loss/data combination of the case matrix, built fresh (float64)."""
    return make_case(*request.param)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def pytest_configure(config):
    # Tests use small tensors: one intra-op thread avoids oversubscription on busy 2-core
    # machines (measured 100x slowdowns of tiny ops with 2 threads under load).
    torch.set_num_threads(1)
