"""Datasets: embedded digits, teacher-student, and a clear error for data not on disk."""

import pytest
import torch

from curvkit.datasets import available_datasets, check_dataset_spec, load_dataset


def test_digits_is_embedded_and_seeded():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_outputs == 10 and a.task == "classification"
    assert a.num_train + len(a.y_test) == 1797
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert set(a.y_train.tolist()) == set(range(10))
    assert isinstance(a.loss_fn(), torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_teacher_student(kind):
    ds = load_dataset(f"teacher-student-{kind}", seed=2, num_samples=200, dim=6)
    assert ds.input_shape == (6,) and ds.num_train == 150
    again = load_dataset(f"teacher-student-{kind}", seed=2, num_samples=200, dim=6)
    assert torch.equal(ds.y_train, again.y_train)
    if kind == "regression":
        assert ds.y_train.shape == (150, 1) and isinstance(ds.loss_fn(), torch.nn.MSELoss)
        assert ds.to(torch.float64).y_train.dtype == torch.float64
    else:
        assert ds.y_train.dtype == torch.int64 and len(set(ds.y_train.tolist())) > 1


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_torchvision_data_never_downloads(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset(name, root=str(tmp_path))
    assert not any(tmp_path.iterdir()), "nothing may be written or downloaded"


def test_unknown_dataset_and_option():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        check_dataset_spec("imagenet", {})
    with pytest.raises(ValueError, match="no option"):
        load_dataset("digits", num_samples=3)
    assert "digits" in available_datasets()
