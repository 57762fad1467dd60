"""Curvature-product benchmark: every way of computing H @ v, as ratios to one eager gradient.

For each model and batch size a fresh worker process measures, side by side on the same
batch: one eager gradient (``torch.autograd.grad``, the unit), a compiled gradient
(``--compile``), curvkit's ``HessianOperator`` (``backend="auto"``) for one product
(repeated products of one operator, which keeps its graph, and an isolated product of an
operator with ``cache_graph=False``), for ``K`` probes in one ``H @ V`` (per probe) and for
``K`` quadratic forms ``H.quadratic_form(V)``, curvkit's ``GGNOperator`` likewise, and the
peers' ways: plain double backward, ``torch.func`` ``jvp(grad)``,
curvlinops 3.0.1 ``HessianLinearOperator @ v`` and BackPACK ``hessian_vector_product``.
With ``--compile-product``, also curvkit's compiled product (``backend="compiled"``,
``torch.compile`` backend ``--compile-backend``) for one vector and for the largest ``K``;
its compilation happens in the warm-up and is recorded as ``compile_s``, not timed.

Timing: after warm-up, rounds run every method once in turn; each method's time is divided by
the gradient time *of the same round* and the median over rounds is reported (paired ratios
cancel slow drifts of a shared machine). CUDA is synchronised around every timed call. On
CPU the worker switches glibc into reusing freed memory before anything is timed (what
curvkit's first CPU pass does; ``curvkit/cpu_memory.py``), so the gradient, the peers and
curvkit run under one allocator mode (``cpu_reuse_freed_memory`` in the JSON).
Peak memory: on CUDA the allocator's peak above the memory held before the call; on CPU the
growth of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) with glibc told to return freed blocks to the OS (so the RSS
tracks live tensors). Memory is measured after timing, in the same worker, one call per
method. Every product is also compared with double backward (``max_rel_diff``).

Usage::

    python scripts/bench.py --quick                      # about a minute on 2 CPU cores
    python scripts/bench.py --out docs/benchmarks/cpu.json --md docs/benchmarks/cpu.md
    python scripts/bench.py --device cuda --full --compile --out docs/benchmarks/h100.json
    python scripts/bench.py --quick --check              # exit 1 if the issue-4 targets miss
    python scripts/bench.py --quick --threads 1 --baseline docs/benchmarks/cpu-quick.json
    python scripts/bench.py --quick --compile-product   # + compiled products (inductor)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------- models

# Sizes: "full" is the grid (for a GPU); "cpu" shrinks the two big models so the
# whole grid finishes in minutes on 2 CPU cores.
SIZES = {
    "full": {"resnet_width": 64, "tf_dim": 256, "tf_layers": 4, "tf_seq": 64},
    "cpu": {"resnet_width": 16, "tf_dim": 128, "tf_layers": 2, "tf_seq": 32},
    "tiny": {"resnet_width": 8, "tf_dim": 64, "tf_layers": 2, "tf_seq": 16},
}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, no max-pool, stages of width w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class PreNormBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        N, T, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(N, T, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Token and position embeddings, pre-norm causal attention blocks with GELU MLPs."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.Sequential(*[PreNormBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(h)))


class SequenceCrossEntropy(nn.Module):
    reduction = "mean"

    def forward(self, out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten())


VOCAB = 512


def make_problem(name: str, batch: int, sizes: str, device: str, seed: int = 0):
    """``(model, loss_fn, X, y, description)`` in float32 on ``device``."""
    torch.manual_seed(seed)
    s = SIZES[sizes]
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        X, y, loss = torch.randn(batch, 3072), torch.randint(0, 10, (batch,)), nn.CrossEntropyLoss()
        desc = "MLP 3072-1024-1024-10, ReLU"
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        loss, desc = nn.CrossEntropyLoss(), "CNN conv16-conv32-linear, 32x32x3"
    elif name == "resnet18":
        w = s["resnet_width"]
        model = CifarResNet18(width=w).eval()
        X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        loss, desc = nn.CrossEntropyLoss(), f"CIFAR ResNet-18 width {w}, BN eval, 32x32x3"
    elif name == "transformer":
        d, L, T = s["tf_dim"], s["tf_layers"], s["tf_seq"]
        model = Transformer(VOCAB, d, heads=4, layers=L, seq=T)
        X, y = torch.randint(0, VOCAB, (batch, T)), torch.randint(0, VOCAB, (batch, T))
        loss = SequenceCrossEntropy()
        desc = f"transformer {L} pre-norm blocks, d={d}, 4 heads, T={T}, vocab {VOCAB}, GELU"
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device), loss, X.to(device), y.to(device), desc


# ---------------------------------------------------------------------- methods
def build_methods(model, loss_fn, X, y, ks, compile_grad: bool, compile_backend: str | None = None):
    """name -> (callable returning a list of per-parameter products or grads, probes per call).

    ``compile_backend``: also time curvkit's compiled product with that torch.compile
    backend (``curvkit_compiled`` for one vector, ``curvkit_compiled_k{K}`` for the
    largest ``K``); ``None``: not.
    """
    import curvkit as ck
    from curvkit.autodiff import differentiable_attention
    from curvkit.estimators.trace import hutchinson_group_size

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    D = sum(p.numel() for p in params)
    g = torch.Generator(device="cpu").manual_seed(0)
    v_flat = torch.randn(D, generator=g).to(X.device)
    # column-major (D, K) blocks, the layout curvkit's estimators draw and its products
    # return; a row-major block costs one extra transposing copy (see docs/performance.md)
    V_flat = {k: torch.randn(k, D, generator=g).to(X.device).T for k in ks}
    v = [t.reshape(p.shape) for t, p in zip(v_flat.split([p.numel() for p in params]), params)]

    def grad():
        return torch.autograd.grad(loss_fn(model(X), y), params)

    methods = {"grad": (grad, 1)}
    if any(isinstance(m, PreNormBlock) for m in model.modules()):
        # every method is timed with attention's math kernel (fused kernels have no second
        # derivative); this is the gradient a user's training step runs, with whichever
        # fused kernel PyTorch picks: information, not the unit
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fused = [
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ]

        def grad_fused_attention():
            with sdpa_kernel(fused):
                return torch.autograd.grad(loss_fn(model(X), y), params)

        methods["grad_fused_attention"] = (grad_fused_attention, 1)
    if compile_grad:
        cmodel = torch.compile(model)

        def grad_compiled():
            return torch.autograd.grad(loss_fn(cmodel(X), y), params)

        methods["grad_compiled"] = (grad_compiled, 1)

    # H keeps the forward and first backward between products (a one-batch operator's
    # default): what repeated products (Lanczos, CG, block estimators) cost. H_cold builds
    # them afresh for every product: what one isolated product costs.
    H = ck.HessianOperator(model, loss_fn, (X, y), check_deterministic=False)
    H_cold = ck.HessianOperator(
        model, loss_fn, (X, y), check_deterministic=False, cache_graph=False
    )
    methods["curvkit"] = (lambda: H @ v_flat, 1)
    methods["curvkit_cold"] = (lambda: H_cold @ v_flat, 1)
    # the floor of curvkit's repeated product: autograd's second backward through a gradient
    # graph built once, its results left as they come; the gap to "curvkit" is curvkit's
    # bookkeeping (staleness check, writing into the result block, finiteness check)
    with differentiable_attention():
        kept = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    live = [i for i, gr in enumerate(kept) if gr.requires_grad]

    def second_backward_kept():
        return torch.autograd.grad(
            [kept[i] for i in live],
            params,
            [v[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )

    methods["second_backward_kept"] = (second_backward_kept, 1)
    for k in ks:
        methods[f"curvkit_k{k}"] = ((lambda k=k: H @ V_flat[k]), k)
        methods[f"curvkit_qf_k{k}"] = ((lambda k=k: H.quadratic_form(V_flat[k])), k)
        # what ck.trace(H, method="hutchinson") asks for: sums over groups of probes, which
        # Taylor mode collapses (group size as Hutchinson picks it by default)
        group = hutchinson_group_size(H, k, None)
        methods[f"curvkit_qf_grouped_k{k}"] = (
            (lambda k=k, group=group: H.quadratic_form(V_flat[k], group)),
            k,
        )
    H_compiled = None
    if compile_backend is not None:
        H_compiled = ck.HessianOperator(
            model,
            loss_fn,
            (X, y),
            check_deterministic=False,
            backend="compiled",
            compile_backend=compile_backend,
        )
        k_max = max(ks)
        methods["curvkit_compiled"] = (lambda: H_compiled @ v_flat, 1)
        methods[f"curvkit_compiled_k{k_max}"] = (lambda: H_compiled @ V_flat[k_max], k_max)

    def double_backward():
        gr = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
        return torch.autograd.grad(gr, params, v)

    methods["double_backward"] = (double_backward, 1)

    from torch.func import functional_call, jvp
    from torch.func import grad as func_grad

    primals = {n: p.detach() for n, p in zip(names, params)}
    tangents = dict(zip(names, v))

    def f(pdict):
        return loss_fn(functional_call(model, pdict, (X,)), y)

    def func_jvp_grad():
        return jvp(func_grad(f), (primals,), (tangents,))[1]

    methods["func_jvp_grad"] = (func_jvp_grad, 1)
    try:
        from curvlinops import HessianLinearOperator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Hc = HessianLinearOperator(
                model, loss_fn, params, [(X, y)], progressbar=False, check_deterministic=False
            )
        methods["curvlinops"] = (lambda: Hc @ v_flat, 1)
    except ImportError:
        pass
    try:
        from backpack.hessianfree.hvp import hessian_vector_product

        def backpack_hvp():
            return hessian_vector_product(loss_fn(model(X), y), params, v)

        methods["backpack"] = (backpack_hvp, 1)
    except ImportError:
        pass
    try:
        G = ck.GGNOperator(model, loss_fn, (X, y), check_deterministic=False)
        G_cold = ck.GGNOperator(
            model, loss_fn, (X, y), check_deterministic=False, cache_graph=False
        )
        methods["ggn"] = (lambda: G @ v_flat, 1)
        methods["ggn_cold"] = (lambda: G_cold @ v_flat, 1)
        for k in ks:
            methods[f"ggn_k{k}"] = ((lambda k=k: G @ V_flat[k]), k)
            # v^T G v: Taylor mode on the linearised model, or v^T (G v), by G's trial
            methods[f"ggn_qf_k{k}"] = ((lambda k=k: G.quadratic_form(V_flat[k])), k)
    except (AttributeError, ImportError, TypeError):
        G = None
    return methods, H, H_cold, G, differentiable_attention, V_flat, H_compiled


def _double_backward_of(model, loss_fn, X, y, v_flat: torch.Tensor) -> list[torch.Tensor]:
    """``H v`` by plain double backward (the reference every product is compared with)."""
    params = [p for p in model.parameters() if p.requires_grad]
    v = [t.reshape(p.shape) for t, p in zip(v_flat.split([p.numel() for p in params]), params)]
    gr = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    return list(torch.autograd.grad(gr, params, v))


def _flat(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1) if out.ndim <= 1 else out.detach()[:, 0]
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([o.detach().reshape(-1) for o in out])


# ---------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory(fn, device) -> float:
    """Bytes the call needs above what the process holds before it."""
    import gc

    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return float(peak)
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    out = fn()
    peak = _rss_kib("VmHWM") - before
    del out
    return float(peak * 1024)


def held_memory(fn, device) -> float:
    """Bytes still held after the call returned and its result was dropped."""
    import gc

    gc.collect()
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        del_out = fn()
        del del_out
        gc.collect()
        _sync(device)
        return float(torch.cuda.memory_allocated(device) - before)
    if _libc():
        _libc().malloc_trim(0)
    before = _rss_kib("VmRSS")
    del_out = fn()
    del del_out
    gc.collect()
    if _libc():
        _libc().malloc_trim(0)
    return float((_rss_kib("VmRSS") - before) * 1024)


def measure(spec: dict) -> dict:
    """One (model, batch) configuration; runs in its own worker process."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # the allocator mode curvkit's first CPU pass switches the process into, from the start,
    # so the gradient and every peer are timed under it too (curvkit/cpu_memory.py)
    from curvkit.cpu_memory import reuse_freed_memory
    from curvkit.live_memory import peak_allocated_bytes

    reused = reuse_freed_memory(device)
    model, loss_fn, X, y, desc = make_problem(spec["model"], spec["batch"], spec["sizes"], device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        methods, H, H_cold, G, differentiable_attention, V_flat, H_compiled = build_methods(
            model,
            loss_fn,
            X,
            y,
            spec["ks"],
            spec["compile"],
            spec.get("compile_backend") if spec.get("compile_product") else None,
        )
    out = {
        "model": spec["model"],
        "description": desc,
        "batch": spec["batch"],
        "cpu_reuse_freed_memory": reused,
        "num_params": sum(p.numel() for p in model.parameters()),
        "methods": {},
    }
    results = {}
    with warnings.catch_warnings(), differentiable_attention():
        warnings.simplefilter("ignore")
        # warm-up (compiles, curvkit's auto trial, allocator)
        for name, (fn, _) in list(methods.items()):
            try:
                compiled_before = 0.0 if H_compiled is None else H_compiled.compile_seconds
                t0 = time.perf_counter()
                for _ in range(spec["warmup"]):
                    results[name] = fn()
                _sync(device)
                out["methods"].setdefault(name, {})["warmup_s"] = time.perf_counter() - t0
                if name.startswith("curvkit_compiled"):
                    m = out["methods"][name]
                    # first calls of the compiled functions this method needed (tracing,
                    # compilation, one product): in the warm-up, not in the timings
                    m["compile_s"] = H_compiled.compile_seconds - compiled_before
                    m["backend"] = H_compiled.backend  # double-backward after a fallback
                    m["fallback_reason"] = H_compiled.backend_fallback_reason
            except Exception as err:  # a peer that cannot handle the model
                out["methods"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                del methods[name]
        ref = _flat(results["double_backward"])
        for k in spec["ks"]:
            qf = results.get(f"curvkit_qf_k{k}")
            if qf is not None and f"curvkit_k{k}" in results:
                V, HV = V_flat[k], results[f"curvkit_k{k}"]
                direct = (V * HV).sum(0)
                out["methods"][f"curvkit_qf_k{k}"]["rel_diff_vs_products"] = float(
                    (qf - direct).norm() / direct.norm()
                )
                grouped = results.get(f"curvkit_qf_grouped_k{k}")
                if grouped is not None:
                    total = direct.sum()
                    out["methods"][f"curvkit_qf_grouped_k{k}"]["rel_diff_vs_products"] = float(
                        (grouped.sum() - total).abs() / direct.abs().sum()
                    )
        k_max = max(spec["ks"])
        compiled_k, eager_k = (
            results.get(f"curvkit_compiled_k{k_max}"),
            results.get(f"curvkit_k{k_max}"),
        )
        if compiled_k is not None and eager_k is not None:  # the same K probes
            out["methods"][f"curvkit_compiled_k{k_max}"]["rel_diff_vs_curvkit_k"] = float(
                (compiled_k - eager_k).norm() / eager_k.norm()
            )
        for name, res in results.items():
            if name.startswith("grad") or name not in methods or "_qf_" in name:
                continue
            if name.startswith("ggn"):
                continue
            got = _flat(res)
            target = ref
            k = methods[name][1]
            if k > 1:  # column 0 of a K block: double backward on that block's first probe
                target = _flat(_double_backward_of(model, loss_fn, X, y, V_flat[k][:, 0]))
            out["methods"][name]["rel_diff_vs_double_backward"] = float(
                (got - target).norm() / target.norm()
            )
        for k in spec["ks"]:
            gq, gv = results.get(f"ggn_qf_k{k}"), results.get(f"ggn_k{k}")
            if gq is not None and gv is not None:
                direct = (V_flat[k] * gv).sum(0)
                out["methods"][f"ggn_qf_k{k}"]["rel_diff_vs_products"] = float(
                    (gq - direct).norm() / direct.norm()
                )
        if G is not None and "ggn" in results:
            for k in spec["ks"]:
                if f"ggn_k{k}" in results:  # column 0 against one product with that probe
                    gg = _flat(G @ V_flat[k][:, 0].contiguous())
                    out["methods"][f"ggn_k{k}"]["rel_diff_vs_ggn"] = float(
                        (_flat(results[f"ggn_k{k}"]) - gg).norm() / gg.norm()
                    )
        results.clear()
        # timing rounds: paired ratios to the gradient of the same round
        times = {n: [] for n in methods}
        budget_end = time.perf_counter() + spec["budget_s"]
        rounds = 0
        while rounds < spec["repeats"] and (
            rounds < spec["min_repeats"] or time.perf_counter() < budget_end
        ):
            for name, (fn, _) in methods.items():
                _sync(device)
                t0 = time.perf_counter()
                res = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                del res
            rounds += 1
        grad_times = times["grad"]
        for name, (_, k) in methods.items():
            ratios = [t / k / gt for t, gt in zip(times[name], grad_times)]
            m = out["methods"][name]
            m["probes"] = k
            m["median_s"] = statistics.median(times[name])
            m["ratio"] = statistics.median(ratios)  # per probe, to the eager gradient
            m["ratio_q25"], m["ratio_q75"] = _quartiles(ratios)
        if "grad_compiled" in methods:
            gc_t = times["grad_compiled"]
            for name, (_, k) in methods.items():
                rs = [t / k / c for t, c in zip(times[name], gc_t)]
                out["methods"][name]["ratio_to_compiled"] = statistics.median(rs)
        out["rounds"] = rounds
        # memory phase
        if device.type == "cpu" and _libc():
            # big blocks are mmap'd and unmapped on free, so the RSS follows live memory
            _libc().mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            _libc().mallopt(-1, 0)  # M_TRIM_THRESHOLD
        for name, (fn, _) in methods.items():
            fn()  # re-warm with the new allocator settings
            if name.startswith("curvkit"):
                # the kept graph is memory the product needs: measure a product that
                # builds it (and report what it holds between products separately)
                H.clear_cache()
            if name.startswith("ggn") and G is not None:
                G.clear_cache()
            out["methods"][name]["peak_bytes"] = peak_memory(fn, device)
            if name in LIVE_MEMORY_METHODS:
                # the tensors' own peak (the CPU analogue of CUDA's max_memory_allocated):
                # the resident set also holds kernel scratch space and allocator slack
                if name.startswith("curvkit"):
                    H.clear_cache()
                if name.startswith("ggn") and G is not None:
                    G.clear_cache()
                out["methods"][name]["live_peak_bytes"] = peak_allocated_bytes(fn)
        H.clear_cache()
        v_probe = V_flat[spec["ks"][0]][:, 0].contiguous()
        # two products: where "graphed" was chosen, the second captures its CUDA graph,
        # whose private memory pool is held as well (reserved, partly not allocated)
        held = held_memory(lambda: (H @ v_probe, H @ v_probe)[1], device)
        replay_bytes = float(H.replay.reserved_bytes) if H.replay is not None else 0.0
        out["methods"]["curvkit"]["kept_graph_bytes"] = held + replay_bytes
        out["methods"]["curvkit"]["replay_reserved_bytes"] = replay_bytes
        gmem = out["methods"]["grad"]["peak_bytes"]
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        glive = out["methods"]["grad"].get("live_peak_bytes")
        for name, (_, k) in methods.items():
            m = out["methods"][name]
            m["memory_ratio"] = m["peak_bytes"] / max(gmem, 1.0)
            if glive and "live_peak_bytes" in m:
                m["live_memory_ratio"] = m["live_peak_bytes"] / max(glive, 1.0)
            # the (D, K) result itself is K x the parameters' size: for a wide model and
            # K = 64 it dwarfs everything else; this ratio leaves the K - 1 extra columns out
            # (quadratic forms return K numbers: nothing to leave out)
            extra = 0 if "_qf_" in name else (k - 1) * param_bytes
            m["memory_ratio_working"] = max(m["peak_bytes"] - extra, 0.0) / max(gmem, 1.0)
    out["curvkit_backend"] = dict(H.backend_choices)
    out["curvkit_cold_backend"] = H_cold.backend_choices.get("single")
    out["curvkit_quadratic_form"] = H.quadratic_form_choice
    out["curvkit_quadratic_form_trial"] = {
        n: (round(t, 6) if isinstance(t, float) else t) for n, t in H.quadratic_form_trial.items()
    }
    out["curvkit_trials"] = {
        kind: {n: (round(t, 6) if isinstance(t, float) else t) for n, t in trial.items()}
        for kind, trial in H.backend_trials.items()
    }
    if G is not None:
        out["ggn_backend"] = getattr(G, "backend", None)
        out["ggn_backend_choices"] = dict(G.backend_choices)
        out["ggn_trials"] = {
            kind: {n: (round(t, 6) if isinstance(t, float) else t) for n, t in trial.items()}
            for kind, trial in G.backend_trials.items()
        }
        out["ggn_chunk_sizes"] = dict(G.chunk_sizes)
        out["ggn_quadratic_form"] = G.quadratic_form_choice
    return out


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


# ---------------------------------------------------------------------- grid and report
def grid(args) -> list[dict]:
    if args.quick:
        models, batches, ks = ["mlp", "cnn", "resnet18", "transformer"], [32], [8]
    else:
        models, batches = args.models.split(","), [int(b) for b in args.batch_sizes.split(",")]
        ks = [int(k) for k in args.ks.split(",")]
    skip = {tuple(item.split(":")) for item in (args.skip or "").split(",") if item}
    specs = []
    # batch-major, in the order given: with --deadline-s the first batch size is measured
    # for every model before the next one starts
    for b in batches:
        for m in models:
            if (m, str(b)) in skip:
                continue
            compiled_here = args.compile_batches is None or b in args.compile_batches
            specs.append(
                {
                    "model": m,
                    "batch": b,
                    "ks": ks,
                    "device": args.device,
                    "sizes": args.sizes,
                    "compile": args.compile and compiled_here,
                    "compile_product": args.compile_product and compiled_here,
                    "compile_backend": args.compile_backend,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "min_repeats": args.min_repeats,
                    "budget_s": args.budget_s,
                    "threads": args.threads,
                }
            )
    return specs


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    # the worker imports the curvkit of this checkout, installed or not
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}
    t0 = time.perf_counter()
    # its own process group: a timeout also ends what it started (inductor's compile workers)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return {
                **{k: spec[k] for k in ("model", "batch")},
                "error": f"timed out after {timeout:.0f} s",
                "note": f"timed out after {timeout:.0f} s",
            }
    if proc.returncode != 0:
        last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {
            **{k: spec[k] for k in ("model", "batch")},
            "error": stderr[-2000:],
            "note": f"exit status {proc.returncode}: {last[0][:200]}",
        }
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def _expected_seconds(spec: dict, rows: list[dict]) -> float:
    """A row's wall time, from the same model's finished rows scaled linearly up in the batch
    size (0 where none finished): a row that cannot finish before the deadline is not
    started, so its time goes to rows that can."""
    seen = [
        r["wall_s"] * max(1.0, spec["batch"] / r["batch"])
        for r in rows
        if r.get("model") == spec["model"] and "wall_s" in r
    ]
    return max(seen, default=0.0)


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


#: single products whose live-tensor peak is measured too (curvkit.live_memory)
LIVE_MEMORY_METHODS = ("grad", "curvkit", "curvkit_cold", "double_backward", "ggn", "ggn_cold")
PEERS = ["double_backward", "func_jvp_grad", "curvlinops", "backpack"]


def summarise(rows: list[dict], ks: list[int]) -> dict:
    ok = [r for r in rows if "methods" in r]

    def col(name, key="ratio"):
        return [r["methods"].get(name, {}).get(key) for r in ok]

    summary = {"geomean_ratio": {}, "geomean_memory_ratio": {}}
    names = sorted({n for r in ok for n in r["methods"]})
    for n in names:
        summary["geomean_ratio"][n] = geomean(col(n))
        summary["geomean_memory_ratio"][n] = geomean(col(n, "memory_ratio"))
        if any(v is not None for v in col(n, "live_memory_ratio")):
            summary.setdefault("geomean_live_memory_ratio", {})[n] = geomean(
                col(n, "live_memory_ratio")
            )
        summary.setdefault("geomean_memory_ratio_working", {})[n] = geomean(
            col(n, "memory_ratio_working")
        )
    # the peers redo forward and first backward for every product: compared with curvkit's
    # isolated product, which does too (the kept-graph product is reported beside it)
    for name, key in (
        ("curvkit_cold", "worst_curvkit_over_fastest_peer"),
        ("curvkit", "worst_kept_graph_product_over_fastest_peer"),
    ):
        worst = None
        for r in ok:
            M = r["methods"]
            peers = [M[p]["ratio"] for p in PEERS if "ratio" in M.get(p, {})]
            if peers and "ratio" in M.get(name, {}):
                rel = M[name]["ratio"] / min(peers)
                worst = rel if worst is None else max(worst, rel)
        summary[key] = worst
    # a method that failed on a measured row must not vanish from its geometric mean
    summary["rows"] = len(ok)
    summary["rows_with"] = {n: sum(1 for v in col(n) if v is not None) for n in names}
    summary["method_errors"] = {
        n: [
            f"{r['model']}:{r['batch']}: {r['methods'][n]['error'][:120]}"
            for r in ok
            if "error" in r["methods"].get(n, {})
        ]
        for n in names
    }
    summary["method_errors"] = {n: e for n, e in summary["method_errors"].items() if e}
    return summary


def check_targets(summary: dict, ks: list[int], margin: float) -> list[str]:
    """The issue-4 targets; returns the misses beyond ``margin`` (relative)."""
    g, m = summary["geomean_ratio"], summary["geomean_memory_ratio"]
    misses = []
    errors = summary.get("method_errors", {})
    rows, rows_with = summary.get("rows"), summary.get("rows_with", {})

    def want(label, value, target, name=None):
        """``name``: the method behind ``value``; one that failed on a measured row misses."""
        failed = errors.get(name, []) if name else []
        if failed:
            print(f"  MISS {label}: failed on {len(failed)} row(s), e.g. {failed[0]}")
            misses.append(label)
            return
        if value is None:
            return
        n = rows_with.get(name) if name else None
        cover = f", {n} of {rows} rows" if n is not None and rows and n < rows else ""
        status = "ok" if value <= target * (1 + margin) else "MISS"
        print(
            f"  {status:4s} {label}: {value:.2f} (target <= {target}, margin {margin:.0%}{cover})"
        )
        if status == "MISS":
            misses.append(label)

    print("issue-4 targets:")
    want("one HessianOperator product / eager gradient (geomean)", g.get("curvkit"), 2.0, "curvkit")
    want(
        "one isolated (cold) product / eager gradient (geomean)",
        g.get("curvkit_cold"),
        2.0,
        "curvkit_cold",
    )
    want(
        "one isolated (cold) product's peak memory / gradient's (geomean)",
        m.get("curvkit_cold"),
        2.0,
        "curvkit_cold",
    )
    live = summary.get("geomean_live_memory_ratio", {})
    for name, what in (
        ("curvkit_cold", "one isolated product"),
        ("ggn_cold", "one isolated GGN product"),
    ):
        if live.get(name) is not None:
            print(f"  info {what}, live tensors' peak / gradient's (geomean): {live[name]:.2f}")
    if m.get("ggn_cold") is not None:
        want(
            "one isolated GGN product's peak memory / gradient's (geomean)",
            m["ggn_cold"],
            2.0,
            "ggn_cold",
        )
    if g.get("curvkit") and g.get("second_backward_kept"):
        print(
            "  info one HessianOperator product / autograd's second backward through a kept "
            f"graph (geomean): {g['curvkit'] / g['second_backward_kept']:.2f}"
        )
    if m.get("curvkit") is not None:  # reported, not a target: it builds what it keeps
        print(
            f"  info first product of a graph-keeping operator, peak memory / gradient's "
            f"(geomean): {m['curvkit']:.2f}"
        )
    for k in ks:
        want(
            f"K={k} products, per probe / eager gradient (geomean)",
            g.get(f"curvkit_k{k}"),
            1.0,
            f"curvkit_k{k}",
        )
        want(
            f"K={k} products, peak memory beyond the (D, K) result / gradient's (geomean)",
            summary["geomean_memory_ratio_working"].get(f"curvkit_k{k}"),
            4.0,
            f"curvkit_k{k}",
        )
        want(
            f"K={k} quadratic forms, per probe / eager gradient",
            g.get(f"curvkit_qf_k{k}"),
            1.0,
            f"curvkit_qf_k{k}",
        )
        want(
            f"K={k} Hutchinson's grouped forms, per probe / eager gradient",
            g.get(f"curvkit_qf_grouped_k{k}"),
            1.0,
            f"curvkit_qf_grouped_k{k}",
        )
        # the K-probe memory target holds for every route to the K products
        working = summary["geomean_memory_ratio_working"]
        for name, what in (
            (f"curvkit_qf_k{k}", f"K={k} quadratic forms"),
            (f"curvkit_qf_grouped_k{k}", f"K={k} Hutchinson's grouped forms"),
        ):
            want(f"{what}, peak memory / gradient's (geomean)", working.get(name), 4.0, name)
        # the GGN's blocks and quadratic forms: a time and a memory target each, where run
        for name, timed, memory in (
            (
                f"ggn_k{k}",
                f"GGN K={k} per probe / eager gradient (geomean)",
                f"GGN K={k} products, peak memory beyond the (D, K) result / gradient's (geomean)",
            ),
            (
                f"ggn_qf_k{k}",
                f"GGN K={k} quadratic forms, per probe / eager gradient",
                f"GGN K={k} quadratic forms, peak memory / gradient's (geomean)",
            ),
        ):
            if g.get(name) is not None or name in errors:
                want(timed, g.get(name), 1.0, name)
                want(memory, working.get(name), 4.0, name)
    if g.get("ggn") is not None or "ggn" in errors:
        want("one GGN product / eager gradient (geomean)", g.get("ggn"), 2.0, "ggn")
        want("one isolated (cold) GGN product / eager gradient", g.get("ggn_cold"), 2.0, "ggn_cold")
    want(
        "one isolated product / fastest peer's (each redoes forward and first backward), worst row",
        summary["worst_curvkit_over_fastest_peer"],
        1.0,
        "curvkit_cold",
    )
    kept = summary.get("worst_kept_graph_product_over_fastest_peer")
    if kept is not None:
        print(
            f"  info a kept-graph product / fastest peer's isolated product, worst row: {kept:.2f}"
        )
    return misses


#: what two runs must share for their ratios to be compared or merged (the device string
#: names the CPU's thread count)
COMPARABLE = ("sizes", "ks")


def incomparable(a: dict, b: dict) -> str | None:
    """Why the reports ``a`` and ``b`` cannot be compared or merged, or ``None``."""
    if a.get("device") != b.get("device"):
        return f"device {a.get('device')!r} against {b.get('device')!r}"
    for key in COMPARABLE:
        x, y = a.get("config", {}).get(key), b.get("config", {}).get(key)
        if x != y:
            return f"{key} {x!r} against {y!r}"
    return None


def check_baseline(report: dict, baseline: dict, margin: float) -> list[str]:
    """Regressions: curvkit geomean ratios worse than the baseline's by more than ``margin``;
    a baseline of another device, thread count, model sizes or K is itself a miss."""
    misses = []
    summary = report["summary"]
    print(f"regression check against the baseline (margin {margin:.0%}):")
    why = incomparable(report, baseline)
    if why is not None:
        print(f"  MISS the baseline was measured differently: {why}; re-record it")
        return ["baseline not comparable"]
    for name, base in baseline["summary"]["geomean_ratio"].items():
        if not (name.startswith("curvkit") or name.startswith("ggn")) or base is None:
            continue
        now = summary["geomean_ratio"].get(name)
        if now is None:
            continue
        status = "ok" if now <= base * (1 + margin) else "MISS"
        print(f"  {status:4s} {name}: {now:.2f} (baseline {base:.2f})")
        if status == "MISS":
            misses.append(name)
    return misses


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    ks = report["config"]["ks"]
    rows = [r for r in report["rows"] if "methods" in r]
    has_c = any("grad_compiled" in r["methods"] for r in rows)
    k_max = max(ks)
    compiled_names = ["curvkit_compiled", f"curvkit_compiled_k{k_max}"]
    has_cp = any(compiled_names[0] in r["methods"] for r in rows)
    has_ggn = any("ggn" in r["methods"] for r in rows)
    lines = [
        f"Device: {report['device']}; torch {report['torch']}; float32; "
        f"sizes: {report['config']['sizes']}; medians of paired ratios over rounds "
        "(per probe for K columns). Generated by `scripts/bench.py`.",
        "",
    ]
    head = ["model", "batch", "grad ms", "grad MiB"]
    if has_c:
        head.append("compiled grad")
    head += ["curvkit 1", "curvkit 1 cold", *[f"curvkit K={k}" for k in ks]]
    has_kept = any("second_backward_kept" in r["methods"] for r in rows)
    if has_kept:
        head.append("kept 2nd bwd")
    if has_cp:
        head += ["compiled 1", f"compiled K={k_max}", "compile s"]
    head += [f"vᵀHv K={k}" for k in ks]
    head += [f"trace K={k}" for k in ks]
    head += ["double bwd", "jvp(grad)"]
    head += ["curvlinops", "BackPACK"]
    if has_ggn:
        head += ["GGN 1", "GGN 1 cold", *[f"GGN K={k}" for k in ks]]
        head += [f"vᵀGv K={k}" for k in ks]
    head += ["mem curvkit 1", "mem 1 cold", "live mem 1 cold"]
    head += [*[f"mem K={k}*" for k in ks], "kept graph MiB"]
    head += ["curvkit backend (1 / cold / K / vᵀHv)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        M = r["methods"]

        def cell(n, key="ratio", M=M):
            return _fmt(M.get(n, {}).get(key))

        g = M["grad"]
        cells = [r["model"], str(r["batch"]), f"{1e3 * g['median_s']:.1f}"]
        cells.append(f"{g['peak_bytes'] / 2**20:.0f}")
        if has_c:
            cells.append(cell("grad_compiled"))
        cells += [cell("curvkit"), cell("curvkit_cold"), *[cell(f"curvkit_k{k}") for k in ks]]
        if has_kept:
            cells.append(cell("second_backward_kept"))
        if has_cp:
            cells += [cell(n) for n in compiled_names]
            secs = [M[n]["compile_s"] for n in compiled_names if "compile_s" in M.get(n, {})]
            cells.append(_fmt(sum(secs), 1) if secs else "–")
        cells += [cell(f"curvkit_qf_k{k}") for k in ks]
        cells += [cell(f"curvkit_qf_grouped_k{k}") for k in ks]
        cells += [cell(p) for p in PEERS]
        if has_ggn:
            cells += [cell("ggn"), cell("ggn_cold"), *[cell(f"ggn_k{k}") for k in ks]]
            cells += [cell(f"ggn_qf_k{k}") for k in ks]
        cells += [cell("curvkit", "memory_ratio"), cell("curvkit_cold", "memory_ratio")]
        cells += [cell("curvkit_cold", "live_memory_ratio")]
        cells += [cell(f"curvkit_k{k}", "memory_ratio_working") for k in ks]
        kept = M.get("curvkit", {}).get("kept_graph_bytes")
        cells.append("–" if kept is None else f"{kept / 2**20:.0f}")
        b = r.get("curvkit_backend", {})
        qf_choice = r.get("curvkit_quadratic_form") or "?"
        cold = r.get("curvkit_cold_backend") or "?"
        cells.append(f"{b.get('single', '?')} / {cold} / {b.get('block', '?')} / {qf_choice}")
        lines.append("| " + " | ".join(cells) + " |")
    s = report["summary"]
    g = s["geomean_ratio"]
    lines += [
        "",
        "Time columns: ratio to one eager gradient on the same batch (per probe for K). "
        "curvkit 1 and K: repeated products of one operator, which keeps the forward and "
        "first backward between products (its default over one batch); curvkit 1 cold: "
        "an operator that rebuilds them for every product (one isolated product). "
        "kept 2nd bwd: autograd's second backward alone through a gradient graph built once "
        "(`torch.autograd.grad(g, params, v, retain_graph=True)`), the floor of curvkit 1; "
        "the gap is curvkit's bookkeeping per product. "
        "vᵀHv: `H.quadratic_form(V)`, the Hutchinson trace's need, without the (D, K) "
        "result (Taylor mode or vᵀ(Hv), whichever the operator's trial found faster); "
        "trace: the same forms summed over groups of probes, as `ck.trace(H, "
        'method="hutchinson")` asks for them (Taylor mode collapses each group; group size '
        "2 for K=16, 8 for K=64). Probe blocks are column-major, as curvkit's estimators "
        "draw them. "
        "mem curvkit 1: peak memory of the product that builds the graph the operator then "
        "keeps / the gradient's peak; mem 1 cold: of an isolated product (cache_graph=False, "
        "whose trial may pick the leaner reverse-over-forward); live mem: the peak of the "
        "tensors themselves (`curvkit.live_memory`, the analogue of CUDA's allocator "
        "statistics), where the resident set also counts kernel scratch space; "
        "*: without the K - 1 extra result columns (the (D, K) output alone is K x the "
        "parameters). kept graph: what the operator holds between products (after two "
        "products; where `graphed` was chosen, with the reserved memory of its CUDA graph, "
        "whose one result vector is then counted twice).",
        "",
        "Geometric means over the rows:",
        "",
        "| method | time ratio | memory ratio | memory ratio without the extra result columns |",
        "|---|---|---|---|",
    ]
    w = s.get("geomean_memory_ratio_working", {})
    for n in g:
        lines.append(
            f"| {n} | {_fmt(g[n])} | {_fmt(s['geomean_memory_ratio'].get(n))} | {_fmt(w.get(n))} |"
        )
    if has_cp:
        lines += [
            "",
            f"compiled 1 / K={k_max}: the compiled product (`HessianOperator(backend=compiled)`) "
            f"(torch.compile backend `{report['config'].get('compile_backend')}`), timed "
            "after the warm-up that compiled it; compile s: seconds its first calls took "
            "(tracing, compilation, one product; `compile_s` in the JSON). A compiled "
            "product that failed ran double backward instead (`backend` and "
            "`fallback_reason` in the JSON).",
        ]
    fused = [r for r in rows if "ratio" in r["methods"].get("grad_fused_attention", {})]
    if fused:
        each = ", ".join(
            f"{r['model']} batch {r['batch']}: {r['methods']['grad_fused_attention']['ratio']:.2f}"
            for r in fused
        )
        lines += [
            "",
            "Every method, the unit gradient included, runs attention through its math kernel "
            "(the fused kernels have no second derivative). A gradient through the fused "
            f"kernel PyTorch would pick, in units of that gradient: {each}.",
        ]
    failed = [r for r in report["rows"] if "methods" not in r]
    if report["config"].get("skipped"):
        lines += ["", f"Left out by `--skip`: {report['config']['skipped']}."]
    if failed:
        lines += ["", "Not measured (worker failed, timed out or was stopped):"]
        for r in failed:
            lines.append(f"- {r['model']} batch {r['batch']}: {r.get('note', 'see the JSON')}")
    if has_c and g.get("grad_compiled"):
        lines += [
            "",
            "Ratios to the compiled gradient: divide by the `grad_compiled` column of each row "
            "(also stored per method as `ratio_to_compiled` in the JSON).",
        ]
    return "\n".join(lines) + "\n"


def merge_reports(reports: list[dict]) -> dict:
    """One report of several runs on one device (``--merge``): they must share the device
    (and thread count), model sizes and K; other settings that differ (timing budget,
    compilation) are listed in the merged config, and each row names its run."""
    for other in reports[1:]:
        why = incomparable(reports[0], other)
        if why is not None:
            raise SystemExit(f"--merge: the runs differ ({why}); merge runs of one grid")
    rows: dict[tuple, dict] = {}
    for report in reports:
        for row in report["rows"]:
            key = (row["model"], row["batch"])
            if "methods" in row or key not in rows:
                rows[key] = {**row, "run": report["command"]}
    models = list(dict.fromkeys(r["model"] for rep in reports for r in rep["rows"]))
    merged = {
        **reports[0],
        "rows": sorted(rows.values(), key=lambda r: (models.index(r["model"]), r["batch"])),
    }
    merged["command"] = " && ".join(r["command"] for r in reports)
    merged["wall_s"] = sum(r["wall_s"] for r in reports)
    merged["merged_from"] = [r["command"] for r in reports]
    merged["config"] = {
        **reports[0]["config"],
        "batch_sizes": sorted({r["batch"] for r in rows.values()}),
    }
    for key in merged["config"]:
        values = [rep["config"].get(key) for rep in reports]
        if key != "batch_sizes" and any(v != values[0] for v in values):
            merged["config"][key] = values  # one per run, in --merge order
    merged["summary"] = summarise(merged["rows"], merged["config"]["ks"])
    return merged


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick", action="store_true", help="batch 32, K=8, few rounds, tiny sizes on CPU"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", choices=list(SIZES), default=None, help="default: full on GPU")
    p.add_argument("--models", default="mlp,cnn,resnet18,transformer")
    p.add_argument("--batch-sizes", default="32,128,512")
    p.add_argument("--ks", default="16,64")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="most timing rounds")
    p.add_argument("--min-repeats", type=int, default=5, help="fewest timing rounds")
    p.add_argument("--budget-s", type=float, default=60.0, help="timing budget per config")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--compile", action="store_true", help="also time a compiled gradient")
    p.add_argument(
        "--compile-product",
        action="store_true",
        help="also time curvkit's compiled product (backend='compiled') for one vector and\n"
        "the largest K (compilation in the warm-up, recorded as compile_s)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of --compile-product (default: inductor)",
    )
    p.add_argument(
        "--compile-batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=None,
        help="compile (--compile, --compile-product) only at these batch sizes (default: all)",
    )
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--md", help="markdown table to write")
    p.add_argument("--check", action="store_true", help="exit 1 if an issue-4 target misses")
    p.add_argument("--baseline", help="JSON of an earlier run; exit 1 on regressions")
    p.add_argument("--margin", type=float, default=0.10)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per config")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="seconds for the whole run: a config gets at most what is left, and none starts\n"
        "with under 10 s left (for a leased GPU)",
    )
    p.add_argument(
        "--skip",
        metavar="MODEL:BATCH,...",
        help="leave these rows out (e.g. resnet18:128, which takes >15 min on 2 CPU cores)",
    )
    p.add_argument("--render", metavar="JSON", help="only rewrite --md from an earlier JSON")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine runs on one device into --out/--md: a measured row of a later file\n"
        "replaces the earlier file's row of the same model and batch",
    )
    args = p.parse_args(argv)
    if args.merge:
        report = merge_reports([json.loads(Path(f).read_text()) for f in args.merge])
        md = markdown(report)
        print(md)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        if args.md:
            Path(args.md).write_text(md)
        if args.check:
            misses = check_targets(report["summary"], report["config"]["ks"], args.margin)
            return 1 if misses else 0
        return 0
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.render:
        md = markdown(json.loads(Path(args.render).read_text()))
        print(md)
        if args.md:
            Path(args.md).write_text(md)
        return 0
    if args.sizes is None:
        args.sizes = "full" if args.device.startswith("cuda") else "cpu"
    if args.quick:
        args.warmup, args.repeats, args.min_repeats, args.budget_s = 1, 7, 3, 5.0
        if args.device == "cpu" and args.sizes == "cpu":
            args.sizes = "tiny"
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = grid(args)
    rows = []
    t_all = time.perf_counter()
    models = [s["model"] for s in specs]

    device = device_name(args.device)

    def write_report() -> tuple[dict, str]:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        ordered = sorted(rows, key=lambda r: (models.index(r["model"]), r["batch"]))
        report = {
            "device": device,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "config": {
                **{k: v for k, v in specs[0].items() if k not in ("model", "batch")},
                "skipped": args.skip,
            },
            "command": " ".join(["python", "scripts/bench.py", *(argv or sys.argv[1:])]),
            "load_average_after": load,
            "wall_s": time.perf_counter() - t_all,
            "rows": ordered,
        }
        report["config"]["batch_sizes"] = sorted({r["batch"] for r in rows})
        report["summary"] = summarise(rows, specs[0]["ks"])
        md = markdown(report)
        # written after every row, so a run stopped at its limit keeps what it finished
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(md)
        return report, md

    for spec in specs:
        left = args.timeout
        if args.deadline_s is not None:
            left = min(left, args.deadline_s - (time.perf_counter() - t_all))
            need = max(10.0, _expected_seconds(spec, rows))
            if left < need:
                rows.append(
                    {
                        **{k: spec[k] for k in ("model", "batch")},
                        "error": "not started: --deadline-s reached",
                        "note": f"not started: {left:.0f} s left of the run's --deadline-s "
                        f"{args.deadline_s:.0f}, and the row is expected to take {need:.0f} s",
                    }
                )
                continue
        print(f"[bench] {spec['model']} batch {spec['batch']} ...", file=sys.stderr, flush=True)
        row = run_worker(spec, left)
        rows.append(row)
        if "methods" in row:
            M = row["methods"]
            short = {n: round(m["ratio"], 2) for n, m in M.items() if "ratio" in m}
            print(f"  {row['wall_s']:.0f}s {short}", file=sys.stderr, flush=True)
        else:
            print(f"  failed: {row['error'][-500:]}", file=sys.stderr, flush=True)
        write_report()
    report, md = write_report()
    print(md)
    ks = specs[0]["ks"]
    misses = []
    if args.check:
        misses += check_targets(report["summary"], ks, args.margin)
    if args.baseline:
        misses += check_baseline(report, json.loads(Path(args.baseline).read_text()), args.margin)
    if any("error" in r for r in rows):
        misses.append("a configuration failed")
    if misses and (args.check or args.baseline):
        print(f"FAILED: {misses}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
