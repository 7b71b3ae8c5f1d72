"""tk.heal: distillation of a teacher's outputs into a student, on tiny models."""

import copy
import math

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.heal import cosine_loss
from tspline_kernels.testing import assert_close


def pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """A small MLP teacher whose first weight has rank 4 and a student: its copy with that layer
    replaced by a rank-4 low-rank layer with perturbed factors (so the teacher is reachable)."""
    teacher = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Dropout(dropout), nn.Linear(24, 6))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.randn(24, 4) @ torch.randn(4, 12) / 4)
    student = copy.deepcopy(teacher)
    student[0] = tk.LowRankLinear.from_linear(teacher[0], 4)
    with torch.no_grad():
        for p in student[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    return student, teacher


def batches(n: int, rows: int = 16) -> list[torch.Tensor]:
    return [torch.randn(rows, 12) for _ in range(n)]


def test_loss_decreases_and_teacher_untouched():
    student, teacher = pair(dropout=0.1)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    held = batches(2)
    report = tk.heal(student, teacher, batches(8), 100, 1e-2, held_out=held, progress=False)
    assert len(report.history) == 100 and report.steps == 100 and report.loss == "mse"
    assert report.held_out_after < 0.2 * report.held_out_before
    assert sum(report.history[-10:]) < 0.2 * sum(report.history[:10])
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert teacher.training and all(m.training for m in teacher.modules())  # modes restored
    assert student.training  # restored (a new module starts in train mode)
    with torch.no_grad():  # the reported held-out loss is the mean over batches of the recomputed loss
        expected = sum(nn.functional.mse_loss(student.eval()(x), teacher.eval()(x)).item() for x in held) / len(held)
    assert report.held_out_after == pytest.approx(expected, rel=1e-5)


def test_first_step_is_adam():
    """Adam's first step moves each weight by -lr * g / (|g| + eps) (bias-corrected moments)."""
    student, teacher = pair()
    x = batches(1)
    start = [p.detach().clone() for p in student.parameters()]
    loss = nn.functional.mse_loss(student(x[0]), teacher(x[0]).detach())
    grads = torch.autograd.grad(loss, list(student.parameters()))
    report = tk.heal(student, teacher, x, 1, 1e-3, max_grad_norm=None, progress=False)
    assert report.history == [pytest.approx(loss.item(), rel=1e-6)]
    for p, p0, g in zip(student.parameters(), start, grads):
        assert_close(p.detach(), p0 - 1e-3 * g / (g.abs() + 1e-8), name="Adam step")


def test_only_trainable_student_params_change_and_modes_during():
    student, teacher = pair(dropout=0.5)
    student[3].weight.requires_grad_(False)
    frozen = student[3].weight.detach().clone()
    trained = student[0].U.detach().clone()
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(("teacher", m.training, torch.is_grad_enabled())))
    student.register_forward_hook(lambda m, i, o: seen.append(("student", m.training, torch.is_grad_enabled())))
    student.train()
    tk.heal(student, teacher, batches(2), 3, 1e-2, progress=False)
    assert torch.equal(student[3].weight, frozen)
    assert not torch.equal(student[0].U, trained)
    assert ("teacher", False, False) in seen and ("student", False, True) in seen
    assert all(not (who == "teacher" and (training or grad)) for who, training, grad in seen)
    assert student.training  # restored
    seen.clear()
    tk.heal(student, teacher, batches(1), 1, 1e-2, train_mode=True, progress=False)
    assert ("student", True, True) in seen


def test_cycles_batches_and_computes_each_teacher_output_once():
    student, teacher = pair()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    report = tk.heal(student, teacher, iter(batches(3)), 10, 1e-3, progress=False)
    assert len(report.history) == 10 and len(calls) == 3


def test_dict_and_tuple_batches_forward_and_losses():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(3, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    teacher = Two()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.a.weight.add_(0.3 * torch.randn_like(student.a.weight))
    pairs = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(3)]
    tk.heal(student, teacher, [dict(x=x, y=y) for x, y in pairs], 20, 1e-2, loss="cosine", progress=False)
    report = tk.heal(student, teacher, pairs, 20, 1e-2, held_out=pairs, progress=False)
    assert report.held_out_after < report.held_out_before
    calls = []

    def l1(s, t):
        calls.append(s.shape)
        return (s - t).abs().mean()

    report = tk.heal(student, teacher, pairs, 2, 1e-3, forward=lambda m, b: m(*b)[:, :2], loss=l1, progress=False)
    assert calls == [torch.Size([8, 2])] * 2 and report.loss == "l1"


def test_cosine_loss_brute_force():
    s, t = torch.randn(7, 5), torch.randn(7, 5)
    expected = sum(1 - (s[i] @ t[i]) / (s[i].norm() * t[i].norm()) for i in range(7)) / 7
    assert cosine_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_restores_modes_on_error():
    student, teacher = pair()
    student.train()
    teacher.train()

    def forward(model, batch):
        if model is student:
            raise RuntimeError("boom")
        return model(batch)

    with pytest.raises(RuntimeError, match="boom"):
        tk.heal(student, teacher, batches(1), 2, 1e-3, forward=forward, progress=False)
    assert student.training and teacher.training


@pytest.mark.parametrize("clip", [1.0, None], ids=["clipped", "unclipped"])
def test_a_diverging_heal_raises_and_restores_the_student(clip):
    torch.manual_seed(0)
    student, teacher = pair()
    teacher.eval()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"healing diverged: .* at step \d+ of 20 \(lr 1e\+06 may be too high"):
        tk.heal(student, teacher, batches(4), 20, 1e6, max_grad_norm=clip, progress=False)
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert student.training and not teacher.training  # the modes are restored too

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr=math.nan), ValueError, "lr"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(loss="l1"), ValueError, "loss"),
    (dict(forward="model"), TypeError, "forward"),
    (dict(batches=[]), ValueError, "batches is empty"),
    (dict(batches=torch.randn(4, 12)), TypeError, "batches"),
    (dict(held_out=[]), ValueError, "held_out"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(train_mode=1), TypeError, "train_mode"),
    (dict(loss=lambda s, t: (s - t).abs()), ValueError, "scalar"),
], ids=lambda v: ",".join(f"{k}={x!r}" if isinstance(x, (int, float, str, list)) else f"{k}={type(x).__name__}"
                           for k, x in v.items()) if isinstance(v, dict) else "")  # the same in every xdist worker
def test_bad_arguments(kwargs, error, match):
    student, teacher = pair()
    args = dict(batches=batches(1), steps=2, lr=1e-3) | kwargs
    with pytest.raises(error, match=match):
        tk.heal(student, teacher, progress=False, **args)


def test_bad_models():
    student, teacher = pair()
    with pytest.raises(TypeError, match="student"):
        tk.heal(lambda x: x, teacher, batches(1), 1, 1e-3)
    with pytest.raises(TypeError, match="teacher"):
        tk.heal(student, "teacher", batches(1), 1, 1e-3)
    with pytest.raises(ValueError, match="same module"):
        tk.heal(teacher, teacher, batches(1), 1, 1e-3)
    with pytest.raises(ValueError, match="shares trainable parameters"):
        tk.heal(nn.Sequential(teacher), teacher, batches(1), 1, 1e-3)
    with pytest.raises(ValueError, match="requires_grad"):
        tk.heal(student.requires_grad_(False), teacher, batches(1), 1, 1e-3)
