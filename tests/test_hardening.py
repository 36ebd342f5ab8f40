"""A capture keeps to its own thread, its own model and its own `with` block, whatever happens:
other threads, copies of the model, interrupts at random moments, models it cannot observe."""

from __future__ import annotations

import copy
import io
import pickle
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as _prebound_kernel

import attnscope
from attnscope import intercept
from models import encoder, sequence
from reference import assert_weights_match, slow_path_weights

KERNELS = (
    "scaled_dot_product_attention",
    "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd",
)


def pristine_functions() -> tuple[Any, ...]:
    return (
        F.scaled_dot_product_attention,
        torch._native_multi_head_attention,
        torch._transformer_encoder_layer_fwd,
    )


ORIGINALS = pristine_functions()


def assert_pristine(model: nn.Module) -> None:
    assert pristine_functions() == ORIGINALS, "a kernel was left replaced"
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, f"{name!r} kept an instance forward"
        assert not intercept.is_observed(module)


def assert_own_model(clone: nn.Module) -> None:
    """Nothing of attnscope in a copy: at most an instance ``forward`` that is its class's own
    forward bound to the copy itself (what the copied wrapper stood for)."""
    for name, module in clone.named_modules():
        forward = module.__dict__.get("forward")
        if forward is not None:
            assert not isinstance(forward, intercept.ObservedForward), name
            assert forward.__self__ is module and forward.__func__ is type(module).forward
        assert not intercept.is_observed(module)


def in_threads(*jobs: Callable[[], Any]) -> list[Any]:
    """Run the jobs at the same time (a barrier lines them up), re-raising their errors."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int, job: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = job()
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


# -- threads -------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_capture_records_only_its_own_threads_calls(fast_path: bool) -> None:
    model = encoder().eval()
    mine, theirs = sequence(2, 5, seed=1), sequence(3, 7, seed=2)
    context = torch.no_grad if fast_path else torch.enable_grad
    with context():
        expected_theirs = model(theirs)
    calls_per_thread = 20

    def capturing() -> attnscope.AttentionMaps:
        with context(), attnscope.capture(model) as attn:
            for _ in range(calls_per_thread):
                model(mine)
        return attn

    def plain() -> list[torch.Tensor]:
        with context():
            return [model(theirs) for _ in range(calls_per_thread)]

    attn, outputs = in_threads(capturing, plain)
    assert [len(attn.calls(n)) for n in attn.names] == [calls_per_thread] * 2
    assert all(w.shape == (2, 4, 5, 5) for n in attn.names for w in attn.calls(n))
    for output in outputs:
        assert torch.equal(output, expected_theirs)
    reference = slow_path_weights(model, lambda m: m(mine))
    for name in attn.names:
        assert_weights_match(attn.calls(name)[-1], reference[name][0])
    assert_pristine(model)


def test_two_threads_capturing_one_model_at_once_each_get_their_own() -> None:
    model = encoder().eval()
    inputs = [sequence(1, 4, seed=3), sequence(2, 6, seed=4)]

    def capturing(x: torch.Tensor) -> Callable[[], attnscope.AttentionMaps]:
        def job() -> attnscope.AttentionMaps:
            with torch.no_grad(), attnscope.capture(model) as attn:
                for _ in range(10):
                    model(x)
            return attn

        return job

    results = in_threads(capturing(inputs[0]), capturing(inputs[1]))
    for attn, x in zip(results, inputs, strict=True):
        reference = slow_path_weights(model, lambda m, x=x: m(x))
        for name in attn.names:
            calls = attn.calls(name)
            assert len(calls) == 10
            for weights in calls:
                assert_weights_match(weights, reference[name][0])
    assert_pristine(model)


def test_hugging_face_plain_inference_on_another_thread_is_untouched() -> None:
    pytest.importorskip("transformers")
    from hf_models import build

    model = build("bert").model
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state

    def capturing() -> attnscope.AttentionMaps:
        with torch.no_grad(), attnscope.capture(model) as attn:
            for _ in range(10):
                model(input_ids=ids[:1])
        return attn

    def plain() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(input_ids=ids).last_hidden_state for _ in range(10)]

    attn, outputs = in_threads(capturing, plain)
    for output in outputs:
        assert torch.equal(output, expected)
    assert all(len(attn.calls(n)) == 10 for n in attn.names) and len(attn.names) == 2
    assert all(w.shape == (1, 4, 9, 9) for n in attn.names for w in attn.calls(n))
    assert_pristine(model)


# -- copies --------------------------------------------------------------------------------


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_a_deep_copy_made_inside_a_capture_is_an_independent_model() -> None:
    model = encoder().eval()
    x = sequence(2, 5)
    with torch.no_grad(), attnscope.capture(model) as attn:
        clone = copy.deepcopy(model)
        model(x)
    with torch.no_grad():  # train the original on: the clone must not follow
        for parameter in model.parameters():
            parameter.add_(0.5)
    reference = copy.deepcopy(clone)  # made outside any capture
    assert_own_model(clone)
    assert_pristine(model)
    assert torch.equal(_outputs(clone, x), _outputs(reference, x))
    assert not torch.equal(_outputs(clone, x), _outputs(model, x))
    with torch.no_grad(), attnscope.capture(clone) as again:  # the clone can be captured itself
        clone(x)
    assert_weights_match(again["layers.0.self_attn"], attn["layers.0.self_attn"], atol=1e-5)


def test_averaged_model_and_torch_save_inside_a_capture() -> None:
    from torch.optim.swa_utils import AveragedModel

    model = encoder().eval()
    x = sequence(2, 5)
    buffer = io.BytesIO()
    with torch.no_grad(), attnscope.capture(model):
        averaged = AveragedModel(model)
        torch.save(model, buffer)
        pickled = pickle.dumps(model)
        model(x)
    expected = _outputs(model, x)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    assert torch.equal(_outputs(averaged.module, x), expected)
    assert_own_model(averaged)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for restored in (loaded, pickle.loads(pickled)):
        assert torch.equal(_outputs(restored, x), expected)
        with torch.no_grad(), attnscope.capture(restored) as attn:
            restored(x)
        assert len(attn.names) == 2
        assert_own_model(restored)
    assert_pristine(model)


# -- interrupts ----------------------------------------------------------------------------


class _Interrupt:
    """A timer signal that raises KeyboardInterrupt after a random delay: Ctrl-C at a random
    moment of whatever runs, attnscope's own install and restore code included."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.handler = self._raise
        self.previous = signal.signal(signal.SIGALRM, self.handler)
        self.fired = 0

    armed = False

    def _raise(self, signum: int, frame: Any) -> None:
        if self.armed:  # one interrupt per arming: none can land in the test's own handling
            self.armed = False
            self.fired += 1
            raise KeyboardInterrupt

    def arm(self, longest: float) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.random.uniform(1e-6, longest))

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def close(self) -> None:
        self.disarm()
        signal.signal(signal.SIGALRM, self.previous)


def _interrupted_captures(
    model: nn.Module, run: Callable[[], Any], seed: int, interrupts: int = 200, seconds: float = 90
) -> tuple[int, int]:
    """Capture ``run`` over and over, each time interrupted at a random moment, until
    ``interrupts`` fired or ``seconds`` passed; after each, nothing of attnscope may remain.
    Returns (attempts, interrupts)."""
    start = time.perf_counter()
    durations = []
    for _ in range(5):  # the first calls are slow: the median of a few
        started = time.perf_counter()
        with torch.no_grad(), attnscope.capture(model):
            run()
        durations.append(time.perf_counter() - started)
    span = sorted(durations)[2]
    interrupt = _Interrupt(seed)
    attempts = 0
    # no_grad entered once, outside the interrupted part: torch's own context managers are not
    # interrupt-safe, and a grad mode left off would break every later test
    grad = torch.no_grad()
    grad.__enter__()
    try:
        while time.perf_counter() - start < seconds and interrupt.fired < interrupts:
            attempts += 1
            try:
                interrupt.arm(span)
                try:
                    with attnscope.capture(model, lazy=attempts % 3 == 0) as a:
                        run()
                    len(a)
                finally:
                    interrupt.disarm()
            except KeyboardInterrupt:
                where = traceback.format_exc()  # where it landed, for the message below
            else:
                where = "no interrupt"
            assert_pristine(model)
            assert signal.getsignal(signal.SIGALRM) == interrupt.handler, where
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, where
    finally:
        interrupt.close()
        grad.__exit__(None, None, None)
    return attempts, interrupt.fired


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_ctrl_c_at_any_moment_leaves_nothing_behind_torch_nn() -> None:
    model = nn.Transformer(32, 4, 1, 1, 64, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        expected = model(src, tgt, tgt_mask=mask)

    def run() -> Any:
        return model(src, tgt, tgt_mask=mask)

    attempts, fired = _interrupted_captures(model, run, seed=0)
    assert fired >= 100, (attempts, fired)
    with torch.no_grad():
        assert torch.equal(model(src, tgt, tgt_mask=mask), expected)
    with torch.no_grad(), attnscope.capture(model) as attn:  # and a capture still works
        run()
    assert len(attn.names) == 3


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_ctrl_c_at_any_moment_leaves_nothing_behind_hugging_face() -> None:
    pytest.importorskip("transformers")
    from hf_models import build

    model = build("gpt2").model
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state

    def run() -> Any:
        return model(input_ids=ids)

    attempts, fired = _interrupted_captures(model, run, seed=1)
    assert fired >= 100, (attempts, fired)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, expected)


def test_uninterruptible_delivers_a_held_interrupt_after_the_block() -> None:
    order: list[str] = []
    with pytest.raises(KeyboardInterrupt), intercept.uninterruptible():
        signal.raise_signal(signal.SIGINT)  # would raise here, at once
        order.append("block finished")
    assert order == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_captures_ended_out_of_order_put_the_real_handlers_back() -> None:
    model = encoder().eval()
    first, second = attnscope.capture(model), attnscope.capture(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_pristine(model)


# -- what a capture cannot observe, and using one twice -------------------------------------


def test_a_capture_entered_twice_says_so() -> None:
    model = encoder().eval()
    context = attnscope.capture(model)
    with torch.no_grad(), context:
        model(sequence(1, 3))
    with (
        pytest.raises(attnscope.AttnScopeError, match=r"entered already.*capture\(model\) again"),
        context,
    ):
        pass
    assert_pristine(model)


def _refused(model: nn.Module, says: str) -> None:
    with pytest.raises(attnscope.AttnScopeError, match=says), attnscope.capture(model):
        pytest.fail("the capture started")


def test_compiled_scripted_and_meta_models_are_refused_before_running() -> None:
    model = encoder().eval()
    compiled = torch.compile(model)
    _refused(compiled, r"torch.compile.*_orig_mod")
    in_place = encoder().eval()
    in_place.compile()
    _refused(in_place, r"torch.compile")
    _refused(torch.jit.script(nn.Sequential(nn.Linear(4, 4))), r"TorchScript")
    with torch.device("meta"):
        meta = encoder()
    _refused(meta, r"meta device.*to_empty")
    assert_pristine(model)
    # the uncompiled module, run inside the capture, is captured exactly
    x = sequence(2, 5)
    with torch.no_grad(), attnscope.capture(compiled._orig_mod) as attn:
        compiled._orig_mod(x)
    reference = slow_path_weights(model, lambda m: m(x))
    assert_weights_match(attn["layers.0.self_attn"], reference["layers.0.self_attn"][0])


# -- misses that would be silent -----------------------------------------------------------


class _Mixer(nn.Module):
    """Not named like attention, calling sdpa through a reference bound at import."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return _prebound_kernel(q, k, v).transpose(1, 2).reshape(1, -1, 8)


class _Deep(nn.Module):
    """Reaches sdpa through many plain function frames below its forward."""

    def __init__(self, depth: int, queries: int = 5, keys: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)
        self.depth, self.queries, self.keys = depth, queries, keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q = q[:, :, : self.queries]
        k, v = k[:, :, : self.keys], v[:, :, : self.keys]

        def down(level: int) -> torch.Tensor:
            if level == 0:
                return F.scaled_dot_product_attention(q, k, v)
            return down(level - 1)

        return down(self.depth)


def test_a_prebound_sdpa_is_named_in_a_warning() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "mixer": _Mixer()})
    warned = pytest.warns(UserWarning, match=r"mixer \(_Mixer\).*bound before the capture")
    with warned, attnscope.capture(model):
        pass
    assert_pristine(model)


def test_an_sdpa_call_far_below_its_module_is_still_attributed() -> None:
    torch.manual_seed(0)
    module, x = _Deep(depth=150), torch.randn(1, 5, 8)
    with torch.no_grad(), attnscope.capture(module) as attn:
        module(x)
        q, k, _ = module.proj(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)
    torch.testing.assert_close(attn[""], expected, atol=1e-6, rtol=0)


def test_a_non_square_call_without_cross_arguments_warns_with_the_module_name() -> None:
    model = nn.ModuleDict({"odd": _Deep(depth=0, queries=3, keys=5)})
    warned = pytest.warns(UserWarning, match=r"odd \(_Deep\).*3 queries over 5 keys")
    with warned, torch.no_grad(), attnscope.capture(model) as attn:
        model["odd"](torch.randn(1, 5, 8))
    assert attn["odd"].shape == (1, 2, 3, 5)


def test_a_compiled_model_run_inside_a_capture_of_its_original_is_refused() -> None:
    model = encoder().eval()
    compiled = torch.compile(model, backend="eager")  # Dynamo itself; no compiler needed
    x = sequence(2, 5)
    with torch.no_grad():
        expected = compiled(x)
        refused = pytest.raises(attnscope.AttnScopeError, match=r"under torch.compile.*_orig_mod")
        with refused, attnscope.capture(model):
            compiled(x)
        assert torch.equal(compiled(x), expected)
    assert_pristine(model)


# -- found by review ------------------------------------------------------------------------


def test_softmax_called_with_keywords_inside_a_capture_runs_as_it_would() -> None:
    class ByHandAttention(nn.Module):
        num_heads = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.view(-1, 2, 3, 2)
            return torch.softmax(input=q @ q.transpose(-1, -2), dim=-1) @ q

    model, x = nn.ModuleDict({"attention": ByHandAttention()}), torch.randn(2, 12)
    expected = model["attention"](x)
    with attnscope.capture(model) as attn:
        out = model["attention"](x)
        unrelated = torch.softmax(input=torch.tensor([0.0, 1.0]), dim=0)
    assert torch.equal(out, expected)
    torch.testing.assert_close(unrelated, torch.tensor([0.0, 1.0]).softmax(0))
    assert attn["attention"].shape == (2, 2, 3, 3)


def test_a_signal_whose_handler_returns_during_the_install_keeps_the_capture() -> None:
    from attnscope.adapters.sdpa import SdpaAdapter

    class Noisy(SdpaAdapter):  # a profiler's signal lands inside the install
        def install(self, *args: Any, **kwargs: Any) -> None:
            super().install(*args, **kwargs)
            signal.raise_signal(signal.SIGUSR1)

    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        module = _Deep(depth=0)
        with torch.no_grad(), attnscope.capture(module, adapters=[Noisy()]) as attn:
            module(torch.randn(1, 5, 8))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]
    assert len(attn.calls("")) >= 1
    assert_pristine(module)


def test_a_capture_ended_on_another_thread_leaves_signals_working() -> None:
    model = encoder().eval()
    context = attnscope.capture(model)
    context.__enter__()
    with torch.no_grad():
        model(sequence(1, 3))
    ended = threading.Thread(target=lambda: context.__exit__(None, None, None))
    ended.start()
    ended.join()
    assert_pristine(model)
    with pytest.raises(KeyboardInterrupt):  # the stand-in left passes Ctrl-C on
        signal.raise_signal(signal.SIGINT)
    with torch.no_grad(), attnscope.capture(model):  # and the next capture cleans it up
        model(sequence(1, 3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
