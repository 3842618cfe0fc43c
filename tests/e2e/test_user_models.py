"""Models as users write them (issue 16): in-place and out= ops, tensor constants made in forward(), size
arithmetic, sizes read from tensor values, custom ops of every kind and control flow (torch.cond,
torch.while_loop) compile for cpu:2 and run equal to eager PyTorch, by default and with tp=2 pinned; custom
ops and a branch also train equal to eager (3 SGD steps). One pool of two gloo processes serves the module."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import user_ops
from torch import nn

import shardwise
from shardwise.testing.eager import assert_training_equal, eager_training

pytestmark = pytest.mark.multiproc

PLANS = {"default": None, "tp2": {"tp": 2}}
SGD = functools.partial(torch.optim.SGD, lr=0.1)


class InPlace(nn.Module):
    """In-place ops on an intermediate and on a view of it, an out= op, a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h.mul_(0.5)
        h[:, :4].add_(1.0)
        torch.relu_(h)
        steps = torch.empty(h.size(-1))
        torch.cumsum(torch.full((h.size(-1),), 0.1), 0, out=steps)  # out= on a tensor without gradients
        return self.down(h * steps) * torch.tensor(2.0) + torch.tensor([1.0, -1.0] * 8)


class SizeArithmetic(nn.Module):
    """Python arithmetic and comparisons on a dynamic batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        h = self.lin(x).reshape(b * 2, 8)
        k = torch.sym_ite(b >= 4, b // 2, b * 3)
        return h * k + torch.sym_max(b - 3, 2)


class ValueDependentSizes(nn.Module):
    """Rows routed by a value computed from the data (``count.item()``): sizes known only at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.first = nn.Linear(16, 8)
        self.second = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        order = h[:, 0].argsort()
        k = (h[:, 0] > 0).sum().item()
        torch._check_is_size(k)
        torch._check(k <= h.size(0))
        low, high = h[order].split([h.size(0) - k, k])
        return torch.cat([self.first(low), self.second(high)])[order.argsort()]


class CustomOps(nn.Module):
    """One custom op of each kind (tests/e2e/user_ops.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = user_ops.softsign2(self.a(x))
        h = user_ops.cia_square_plus(h)
        h = user_ops.grad_clip(h)
        return self.b(user_ops.first_positive_rows(h))


class ControlFlow(nn.Module):
    """torch.cond on a value of the data and a torch.while_loop: higher-order ops, run whole."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = torch.cond(h.sum() > 0, lambda a: a.cos() * 2, lambda a: a.sin() + 1, (h,))
        step = torch.zeros((), dtype=torch.long)
        _, h = torch._higher_order_ops.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, a * 0.5 + 1), (step, h))
        return self.out(h)


class Branch(nn.Module):
    """torch.cond alone (while_loop has no backward in eager PyTorch either)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.out(torch.cond(h.sum() > 0, lambda a: a.cos() * 2, lambda a: a.sin() + 1, (h,)))


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def _x(rows: int = 8) -> torch.Tensor:
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows))


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("cls", [InPlace, ValueDependentSizes, CustomOps], ids=lambda c: c.__name__)
def test_inference_equals_eager(pool, cls, plan):
    model = _build(cls)
    x = _x()
    with shardwise.compile(model, "cpu:2", example_inputs=(x,), constraints=PLANS[plan], workers=pool) as cm:
        assert cm.plan.world_size == 2
        out = cm.run(x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_size_arithmetic_is_evaluated_for_each_batch(pool):
    """Planned on a batch of 8 with a dynamic batch: the generated code computes the sizes of other batches."""
    from torch.export import Dim

    model = _build(SizeArithmetic)
    batch = Dim("batch", min=2, max=16)
    with shardwise.compile(
        model, "cpu:2", example_inputs=(_x(8),), dynamic_shapes=({0: batch},), constraints={"dp": 1, "tp": 2},
        workers=pool,
    ) as cm:  # fmt: skip
        assert any(n.op == "scalar_op" for n in cm.graph.nodes)
        for rows in (8, 6, 3):
            with torch.no_grad():
                ref = model(_x(rows))
            torch.testing.assert_close(cm.run(_x(rows)), ref, rtol=1e-5, atol=1e-6)


def test_value_dependent_sizes_run_whole_and_serve_other_data(pool):
    """The split whose sizes come from the data runs whole (a split worked out on the example's sizes would
    not hold), so inputs routing other numbers of rows give eager's result too."""
    model = _build(ValueDependentSizes)
    with shardwise.compile(model, "cpu:2", example_inputs=(_x(8),), constraints={"dp": 2}, workers=pool) as cm:
        whole = {n.name for n in cm.graph.nodes if n.whole}
        assert any(cm.graph.node(n).op == "aten.split_with_sizes.default" for n in whole)
        assert whole <= set(cm.plan.replicated_ops)
        for seed in range(3):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 + seed))
            with torch.no_grad():
                ref = model(x)
            torch.testing.assert_close(cm.run(x), ref, rtol=1e-5, atol=1e-6)


def test_custom_ops_decomposed_or_run_whole(pool, tmp_path):
    """For inference, ops whose implementation traces to ATen (and the CompositeImplicitAutograd one) are
    decomposed; the op that reads a tensor value into Python runs whole, is listed by the plan, and the
    program imports the module that registers it."""
    model = _build(CustomOps)
    with shardwise.compile(model, "cpu:2", example_inputs=(_x(),), workers=pool) as cm:
        kept = {n.name: n.op for n in cm.graph.nodes if n.op.startswith("swuser.")}
        assert list(kept.values()) == ["swuser.first_positive_rows.default"]
        assert set(kept) <= set(cm.plan.replicated_ops)
        program = (cm.save(tmp_path / "pkg", weights=False) / "program.py").read_text()
    assert "\nimport user_ops  # registers custom ops" in program


@pytest.mark.parametrize("plan", list(PLANS))
def test_custom_ops_train_equal_to_eager(pool, plan):
    """Three SGD steps. In training an op's own autograd formula is kept (grad_clip's backward is not the one
    its forward implies): the ops that have one run whole; the CompositeImplicitAutograd op is decomposed."""
    model = _build(CustomOps)
    reference = copy.deepcopy(model)
    x = _x()

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    with shardwise.compile(
        model, "cpu:2", example_inputs=(x,), mode="train", loss_fn=loss_fn, optimizer=SGD,
        constraints=PLANS[plan], workers=pool,
    ) as cm:  # fmt: skip
        kept = [n.op for n in cm.graph.nodes if n.op.startswith("swuser.")]
        assert kept == ["swuser.softsign2.default", "swuser.grad_clip.default", "swuser.first_positive_rows.default"]
        losses = [cm.train_step(x) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, (x,), loss_fn, SGD))


@pytest.mark.parametrize("plan", list(PLANS))
def test_control_flow_runs_whole_and_takes_either_branch(pool, plan):
    model = _build(ControlFlow)
    x = _x()
    with shardwise.compile(model, "cpu:2", example_inputs=(x,), constraints=PLANS[plan], workers=pool) as cm:
        hops = {n.name: n.op for n in cm.graph.nodes if n.op.startswith("higher_order.")}
        assert sorted(hops.values()) == ["higher_order.cond", "higher_order.while_loop"]
        assert set(hops) <= set(cm.plan.replicated_ops)
        taken = set()
        for scale in (1.0, -3.0, 5.0, -0.5):
            with torch.no_grad():
                taken.add(bool(model.lin(x * scale).sum() > 0))
                ref = model(x * scale)
            torch.testing.assert_close(cm.run(x * scale), ref, rtol=1e-5, atol=1e-6)
    assert taken == {True, False}


def test_a_branch_trains_equal_to_eager(pool):
    model = _build(Branch)
    reference = copy.deepcopy(model)
    x = _x()

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    with shardwise.compile(
        model, "cpu:2", example_inputs=(x,), mode="train", loss_fn=loss_fn, optimizer=SGD, workers=pool
    ) as cm:
        assert any(n.op == "higher_order.cond" for n in cm.graph.nodes)
        losses = [cm.train_step(x) for _ in range(3)]
        state = cm.state_dict()
    assert_training_equal(losses, state, *eager_training(reference, (x,), loss_fn, SGD))
