"""Model zoo: every model by name builds, runs, is deterministic and leaves the global RNG alone."""

import pytest
import torch

import curvkit as ck
from curvkit.zoo import available_models, build_model, check_model_spec, model_knobs

IMAGE = (1, 8, 8)
SPECS = [
    ("mlp", {"depth": 3, "width": 7, "activation": "tanh"}),
    ("mlp", {"depth": 0}),
    ("cnn", {"depth": 2, "channels": 3}),
    ("resnet", {"width": 2, "norm": "batch"}),
    ("resnet", {"width": 2, "norm": "none", "blocks_per_stage": 2}),
    ("transformer", {"d_model": 8, "heads": 2, "depth": 1}),
]


@pytest.mark.parametrize("name,knobs", SPECS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPECS)])
def test_builds_runs_and_is_deterministic(name, knobs):
    state = torch.get_rng_state()
    a = build_model(name, IMAGE, 10, seed=3, **knobs)
    assert torch.equal(torch.get_rng_state(), state), "building must not touch the global RNG"
    b = build_model(name, IMAGE, 10, seed=3, **knobs)
    c = build_model(name, IMAGE, 10, seed=4, **knobs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    out = a.eval()(torch.randn(5, *IMAGE))
    assert out.shape == (5, 10)


def test_transformer_on_vectors_and_hessian_product():
    model = build_model("transformer", (12,), 3, seed=0, d_model=8, heads=2, depth=1)
    X, y = torch.randn(6, 12), torch.randint(0, 3, (6,))
    assert model(X).shape == (6, 3)
    H = ck.HessianOperator(model.double(), torch.nn.CrossEntropyLoss(), (X.double(), y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert torch.isfinite(H @ v).all()


def test_float64_dtype():
    model = build_model("cnn", IMAGE, 10, seed=0, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*available models"):
        check_model_spec("vgg", {})
    with pytest.raises(ValueError, match="no knob"):
        build_model("mlp", IMAGE, 10, widht=3)
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("mlp", IMAGE, 10, activation="swish")
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn", (16,), 3)
    assert set(available_models()) == {"mlp", "cnn", "resnet", "transformer"}
    assert model_knobs("mlp") == {"depth": 2, "width": 32, "activation": "relu"}
