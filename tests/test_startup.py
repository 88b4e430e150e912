"""Start-up work of the CLI's path (issue 20: first token <= 4 s after a warm start):
loading the bundled model, building its serving engine and streaming one prompt
compiles only the engine's own device functions, and a second prompt compiles and
traces nothing. Counted, not timed: every extra XLA program costs 10-80 ms at start-up
(a compile, or a persistent-cache read plus its trace and lowering)."""

import collections

import jax
import pytest

import ftjax
from ftjax.model import Linear
from ftjax.specs import ParamSpec

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# What one streamed prompt needs: the state fill, admit, prefill, one decode width, and
# the token window read back after each step.
ENGINE_PROGRAMS = {"jit(_empty_state)", "jit(_admit_dev)", "jit(_prefill_dev)",
                   "jit(_decode_dev)", "jit(_window_dev)"}


@pytest.fixture
def compiles():
    """Counter of XLA programs compiled (or read from the persistent cache) meanwhile,
    by name; in-memory caches cleared first, so earlier tests hide nothing."""
    jax.clear_caches()
    seen = collections.Counter()

    def listen(event, duration, **kw):
        if event == COMPILE_EVENT:
            seen[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_first_stream_compiles_only_the_engine_functions(compiles, monkeypatch):
    # The CLI's own layer loop on CPU (the test suite otherwise forces "scan").
    monkeypatch.setenv("FTJAX_LAYER_LOOP", "auto")
    model = ftjax.load(ftjax.demo_model_path())
    assert model.layer_loop == "unrolled"
    # Loading casts and splits the weights on the host: no program per weight shape.
    assert sum(compiles.values()) == 0, dict(compiles)
    sampling = ftjax.SamplingParams(temperature=0.7, top_k=50, top_p=0.95,
                                    repetition_penalty=1.2, seed=0)
    first = list(model.stream(["def fibonacci(n):"], max_new_tokens=8, sampling=sampling))
    assert len(first) == 8
    assert set(compiles) == ENGINE_PROGRAMS and max(compiles.values()) == 1, dict(compiles)
    engine = model.serving_engine()
    traces = dict(engine.trace_counts)
    compiles.clear()
    second = list(model.stream(["class Stack:"], max_new_tokens=8, sampling=sampling))
    assert len(second) == 8
    assert not compiles and dict(engine.trace_counts) == traces, (dict(compiles), traces)


def test_a_weight_of_the_wrong_shape_is_still_refused():
    # `ftjax.model.weight` checks shapes itself (not through flax's param): a kernel of
    # the wrong shape must still fail with flax's error naming the param and both shapes.
    layer = Linear("bi,io->bo", {"kernel": ParamSpec((4, 3), ("embed", "ffn"))}, jax.numpy.float32)
    x = jax.numpy.ones((2, 4))
    assert layer.apply({"params": {"kernel": jax.numpy.ones((4, 3))}}, x).shape == (2, 3)
    with pytest.raises(Exception, match=r"kernel.*shape \(4, 3\).*shape \(5, 3\)") as e:
        layer.apply({"params": {"kernel": jax.numpy.ones((5, 3))}}, x)
    assert "ScopeParamShapeError" in type(e.value).__name__
