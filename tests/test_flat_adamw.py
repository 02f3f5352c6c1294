"""FlatAdamW (pocketlm/train/flat_adamw.py) against torch.optim.AdamW(fused=True) with clip_grad_norm_, the
reference it replaces at the end of a batch-thread step."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pocketlm.train.flat_adamw import FlatAdamW


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.99), eps=1e-8, fused=True)
    return model, optimizer


def slice_gradients(model, seed: int) -> list[list[torch.Tensor]]:
    """Two slices' gradients, large enough that clipping to norm 1 acts."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) * 3 for p in model.parameters()] for _ in range(2)]


@pytest.mark.parametrize("max_norm", [1.0, 1e9], ids=["clipped", "unclipped"])
def test_flat_steps_match_fused_adamw(max_norm):
    """The same kernel on the same numbers, to rounding: the kernel's vector and scalar paths round
    differently and fall on other elements in one buffer, and a clipping scale is a divisor here."""
    reference, ref_opt = model_and_optimizer()
    model, optimizer = model_and_optimizer()
    params = list(model.parameters())
    flat = FlatAdamW(optimizer, params)
    for step in range(4):
        per_slice = slice_gradients(model, step)
        for p, g0, g1 in zip(reference.parameters(), *per_slice):
            p.grad = g0 + g1
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        ref_opt.param_groups[0]["lr"] = ref_opt.param_groups[1]["lr"] = 1e-2 / (step + 1)
        ref_opt.step()

        flat.gather(per_slice, accumulate=False)
        norm = flat.clip(max_norm)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        flat.step()
        assert ref_norm > 1.0 and torch.allclose(norm, ref_norm, rtol=1e-6)
        for p, r in zip(params, reference.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    # the optimizer's own state is the flat buffers' views, as a checkpoint reads it
    for p, r in zip(params, reference.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][name], ref_opt.state[r][name], rtol=1e-4, atol=1e-8)
        assert p.grad.untyped_storage().data_ptr() == flat.grads.untyped_storage().data_ptr()
    flat.release()
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params) and all(p.grad is None for p in params)


def test_gather_accumulates_in_order_and_zeroes_unused():
    model, optimizer = model_and_optimizer()
    params = list(model.parameters())
    flat = FlatAdamW(optimizer, params)
    a, b = slice_gradients(model, 1)
    flat.gather([a, b], accumulate=False)
    flat.gather([a], accumulate=True)  # a second micro-batch
    for p, x, y in zip(params, a, b):
        assert torch.equal(p.grad, (x + y) + x)
    flat.gather([[None, *a[1:]], b], accumulate=False)  # the first parameter unused by one slice
    assert torch.equal(params[0].grad, b[0])
    flat.gather([[None, *a[1:]]], accumulate=False)  # unused by every slice: zero
    assert torch.equal(params[0].grad, torch.zeros_like(b[0]))


def test_resumed_state_is_carried_into_the_buffers():
    model, optimizer = model_and_optimizer()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # state as a loaded checkpoint leaves it: per-parameter tensors
    saved = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    weights = [p.detach().clone() for p in model.parameters()]
    FlatAdamW(optimizer, list(model.parameters()))
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
        for k, v in saved[id(p)].items():
            assert torch.equal(optimizer.state[p][k], v)


def test_applies_only_to_plain_fused_adamw_over_the_trainable_parameters():
    model, optimizer = model_and_optimizer()
    params = list(model.parameters())
    assert FlatAdamW.applies(optimizer, params)
    assert not FlatAdamW.applies(optimizer, params[:-1])
    assert not FlatAdamW.applies(torch.optim.AdamW(params, foreach=True), params)
    assert not FlatAdamW.applies(torch.optim.AdamW(params, fused=True, amsgrad=True), params)
    assert not FlatAdamW.applies(torch.optim.SGD(params, lr=0.1), params)


def test_unequal_step_counts_are_refused():
    model, optimizer = model_and_optimizer()
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    optimizer.step()  # only one parameter stepped
    with pytest.raises(ValueError, match="step counts differ"):
        FlatAdamW(optimizer, list(model.parameters()))


def test_threads_sharing_the_end_of_the_step_match_one_thread_exactly():
    """Two threads each summing, clipping and stepping their share (end_of_step) give the same bits as one
    thread doing it all (gather, clip, step): the same operations on the same numbers."""
    (one, one_opt), (two, two_opt) = model_and_optimizer(), model_and_optimizer()
    serial = FlatAdamW(one_opt, list(one.parameters()), parts=2)
    shared = FlatAdamW(two_opt, list(two.parameters()), parts=2)
    assert shared._parts[0][0] and shared._parts[1][0]  # both threads have work
    pool = ThreadPoolExecutor(2)
    for step in range(3):
        per_slice = slice_gradients(one, step)
        serial.gather(per_slice, accumulate=False)
        serial.gather(per_slice[:1], accumulate=True)  # a second micro-batch
        serial_norm = serial.clip(1.0)
        serial.step()
        first_micro = list(per_slice)
        second_micro = [per_slice[0], [None] * len(per_slice[0])]  # the second slice used no parameter
        list(pool.map(lambda i: shared.end_of_step(i, first_micro, False, False, 1.0), [0, 1]))
        norms = list(pool.map(lambda i: shared.end_of_step(i, second_micro, True, True, 1.0), [0, 1]))
        assert torch.equal(norms[0], serial_norm) and torch.equal(norms[1], serial_norm)
        for p, q in zip(one.parameters(), two.parameters()):
            assert torch.equal(p, q)
    assert torch.equal(serial.step_counts, shared.step_counts) and float(shared.step_counts[0]) == 3


def test_a_failing_thread_releases_the_others():
    model, optimizer = model_and_optimizer()
    flat = FlatAdamW(optimizer, list(model.parameters()), parts=2)
    pool = ThreadPoolExecutor(1)
    waiting = pool.submit(flat.end_of_step, 1, [None, None], False, True, 1.0)
    flat.abort()  # what the loop does when thread 0 fails before its gradients are in
    with pytest.raises(threading.BrokenBarrierError):
        waiting.result(timeout=10)


def test_flat_gradients_sum_as_per_parameter_ones():
    """A slice's gradients may come as one flat tensor in the buffers' order (joint_graph.py): summed and
    accumulated as the same gradients handed over per parameter."""
    model, optimizer = model_and_optimizer()
    params = list(model.parameters())
    flat = FlatAdamW(optimizer, params, parts=2)
    first, second = slice_gradients(model, 0), slice_gradients(model, 1)
    as_flat = [torch.cat([grads[i].reshape(-1) for i in flat.order]) for grads in first]
    flat.gather(first, accumulate=False)
    flat.gather(second, accumulate=True)
    expected = flat.grads.clone()
    flat.gather(as_flat, accumulate=False)
    flat.gather(second, accumulate=True)
    assert torch.equal(flat.grads, expected)
