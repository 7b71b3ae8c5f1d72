"""``tspline demo``: dense vs spline MLPs on two offline tasks, one honest table.

* digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), an MLP
  64 -> 256 -> 256 -> 10; test accuracy.
* smooth: a synthetic regression whose teacher maps 256 -> 128 -> 32 with smooth weight
  matrices; only 600 training samples; test error relative to the target variance.

Each model trains with the same optimiser and budget; every hidden and output Linear is
replaced via ``replace_linear`` (the same surgery a training script would use).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from . import HierarchicalSplineLinear, SplineLinear, replace_linear
from ._layers import check_count

Factory = Callable[[nn.Linear], nn.Module] | None



def _grid32(lin: nn.Linear) -> tuple[int, int]:
    """Up to 32 control points per axis (at least 4, at most the layer's size)."""
    return max(4, min(32, lin.out_features)), max(4, min(32, lin.in_features))


MODELS: dict[str, Factory] = {
    "dense nn.Linear": None,
    "spline bspline 32x32": lambda lin: SplineLinear(lin.in_features, lin.out_features, grid=_grid32(lin)),
    "spline bicubic n=256": lambda lin: SplineLinear(lin.in_features, lin.out_features, basis="bicubic", n_control_points=256),
    "spline gaussian n=64": lambda lin: SplineLinear(lin.in_features, lin.out_features, basis="gaussian", n_control_points=64),
    "spline eisenstein n=64": lambda lin: SplineLinear(lin.in_features, lin.out_features, basis="eisenstein", n_control_points=64),
    "hierarchical 8x8+32x32": lambda lin: HierarchicalSplineLinear(lin.in_features, lin.out_features, fine_grid=_grid32(lin)),
}


def _require(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise SystemExit(f'the demo needs {name}: pip install "tspline-kernels[demo]"') from None


def digits_task(seed: int) -> dict:
    _require("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {
        "name": "digits (accuracy)", "train": (f(xtr), torch.tensor(ytr)), "test": (f(xte), torch.tensor(yte)),
        "widths": (64, 256, 256, 10), "loss": nn.functional.cross_entropy, "epochs": 40,
        "metric": lambda out, y: (out.argmax(1) == y).float().mean().item(), "higher_is_better": True,
    }


def smooth_task(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def smooth_weight(n_out: int, n_in: int) -> torch.Tensor:
        yo = torch.linspace(-1, 1, n_out)[:, None]
        xi = torch.linspace(-1, 1, n_in)[None, :]
        a = torch.rand(4, generator=g) * 2 + 1
        w = torch.sin(math.pi * a[0] * xi + a[1] * yo) + torch.cos(math.pi * a[2] * yo * xi + a[3])
        return w / math.sqrt(n_in)

    w1, w2 = smooth_weight(128, 256), smooth_weight(32, 128)
    teacher = lambda x: torch.tanh(x @ w1.T) @ w2.T  # noqa: E731
    x = torch.randn(2600, 256, generator=g)
    y = teacher(x) + 0.05 * torch.randn(2600, 32, generator=g)
    return {
        "name": "smooth (rel. error)", "train": (x[:600], y[:600]), "test": (x[600:], y[600:]),
        "widths": (256, 128, 32), "loss": nn.functional.mse_loss, "epochs": 150,
        "metric": lambda out, y: ((out - y).pow(2).mean() / y.var()).item(), "higher_is_better": False,
    }


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def train(task: dict, factory: Factory, epochs: int, seed: int, label: str) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = mlp(task["widths"])
    dense_params = sum(p.numel() for p in model.parameters())
    if factory is not None:
        replace_linear(model, factory)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xtr, ytr = task["train"]
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{task['name'].split()[0]:>7} | {label:<22}", leave=False)
    for _ in bar:
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = task["loss"](model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        metric = task["metric"](model(task["test"][0]), task["test"][1])
    return {"model": label, "params": params, "ratio": dense_params / params, "metric": metric, "seconds": seconds}


def main(epochs: int | None = None, seed: int = 0) -> list[dict]:
    """Train every model of ``MODELS`` on both tasks for ``epochs`` (>= 1; default: each task's
    own), print the table and return its rows."""
    if epochs is not None:
        check_count("epochs", epochs, 1)
    _require("tqdm")
    # The layers are at most 256 wide: intra-op threads gain little here, and on a busy machine
    # OpenMP threads waiting on each other made training 30-100x slower in our runs.
    torch.set_num_threads(1)
    results = []
    for task in (digits_task(seed), smooth_task(seed)):
        rows = [train(task, f, task["epochs"] if epochs is None else epochs, seed, label)
                for label, f in MODELS.items()]
        results.append((task, rows))
    print(f"\n{'task':<20} {'model':<24} {'params':>8} {'compression':>12} {'test metric':>12} {'train s':>8}")
    for task, rows in results:
        for r in rows:
            print(f"{task['name']:<20} {r['model']:<24} {r['params']:>8} {r['ratio']:>11.1f}x {r['metric']:>12.4f} {r['seconds']:>8.1f}")
    print()
    for task, rows in results:
        best = (max if task["higher_is_better"] else min)(rows, key=lambda r: r["metric"])
        dense = rows[0]
        print(f"{task['name']}: best is {best['model']} ({best['metric']:.4f}); dense gets {dense['metric']:.4f} "
              f"with {dense['params']} parameters.")
    return [dict(task=t["name"], **r) for t, rows in results for r in rows]
