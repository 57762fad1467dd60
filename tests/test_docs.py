"""The documentation's Python examples run as written, and print what their comments say.

Every ```python block of the README and of docs/*.md runs, in order, in one namespace per
file. Blocks that are fragments (``H = ck.HessianOperator(model, loss_fn, data)``) get a
small model, loss and batch from ``STANDARD`` first; ``BEFORE`` adds what a given block
assumes beyond that. A line whose comment shows a tensor (``expr  # tensor([14., -32.])``)
is checked against it.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

STANDARD = """
import torch
from torch import nn
import curvkit as ck
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
loss_fn = nn.CrossEntropyLoss()
X, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
data = (X, y)
params = list(model.parameters())
D = sum(p.numel() for p in params)
v, V = torch.randn(D), torch.randn(D, 4)
t1, t2 = (torch.randn_like(p) for p in params)
f = loss_fn(model(X), y)
g = torch.Generator().manual_seed(0)
"""

# (file, block index) -> code run before that block (after STANDARD where index 0)
BEFORE = {
    ("README.md", 1): STANDARD,  # block 0 built a model of its own for hessian_row_sum
    ("docs/tutorial_row_sum.md", 3): "loader = [(X[:2], y[:2]), (X[2:], y[2:])]\n"
    "v = torch.randn(20)",
    ("docs/ggn.md", 2): "H = ck.HessianOperator(model, loss_fn, data)",
    ("docs/user_guide.md", 2): "v = [torch.randn_like(p) for p in params]",
}

BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SHOWN = re.compile(r"^(?P<expr>[^#]*?\S)\s+#\s*(?P<shown>\(?tensor\(.*?\)\)?)\s*$")


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def _with_checks(block: str) -> str:
    """``expr  # tensor(...)`` lines become a comparison of ``expr`` with what is shown."""
    lines = []
    for line in block.splitlines():
        m = SHOWN.match(line)
        if m:
            line = f"__check({m['expr']}, {m['shown']!r})"
        lines.append(line)
    return "\n".join(lines)


def _check(value, shown: str) -> None:
    expected = eval(shown, {"tensor": torch.tensor})
    if isinstance(expected, tuple):
        assert isinstance(value, tuple) and len(value) == len(expected), (value, shown)
        pairs = list(zip(value, expected))
    else:
        pairs = [(value, expected)]
    for got, want in pairs:
        torch.testing.assert_close(got.detach(), want.to(got.dtype), rtol=1e-5, atol=1e-5)


def test_the_checks_can_fail():
    ns = {"__check": _check, "torch": torch}
    exec(_with_checks("torch.tensor([1.0, 2.0])  # tensor([1., 2.])"), ns)
    with pytest.raises(AssertionError):
        exec(_with_checks("torch.tensor([1.0, 2.5])  # tensor([1., 2.])"), ns)
    with pytest.raises(AssertionError):
        exec(_with_checks("(torch.tensor(1.0),)  # (tensor(1.), tensor(0.))"), ns)


def test_every_document_with_examples_is_covered():
    with_examples = {str(p.relative_to(ROOT)) for p in DOCS if _blocks(p)}
    assert {f for f, _ in BEFORE} <= with_examples
    assert "README.md" in with_examples


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path: Path):
    blocks = _blocks(path)
    if not blocks:
        pytest.skip("no Python examples")
    name = str(path.relative_to(ROOT))
    ns: dict = {"__name__": "docs_example", "__check": _check}
    exec(STANDARD, ns)
    for i, block in enumerate(blocks):
        if (name, i) in BEFORE:
            exec(BEFORE[name, i], ns)
        exec(compile(_with_checks(block), f"{name} example {i}", "exec"), ns)
