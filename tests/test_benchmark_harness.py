"""The benchmarks' profiler and peak probes (``benchmarks.harness``): they read TensorFlow's
profiler output, whose format belongs to TensorFlow, so a change there shows here."""

import tensorflow as tf

from benchmarks import harness


def test_profile_sums_op_time_by_name_scope_and_separates_python_from_the_graph():
    a = tf.random.normal([300, 300], seed=0)

    @tf.function
    def step():
        with tf.name_scope("features"):
            x = a @ a
        with tf.name_scope("reverse_pass"):
            y = tf.while_loop(lambda i, y: i < 20, lambda i, y: (i + 1, tf.tanh(y @ a)), (0, x))[1]
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = tf.reduce_sum(tf.sin(x @ x))
        return y, tape.gradient(z, x)

    step()
    profile = harness.profile(lambda: [t.numpy() for t in step()], 3,
                              [("backward", "gradient_tape/"), ("features", "features/"), ("loop", "reverse_pass/")])
    assert profile.op_ms["loop"] > 0 and profile.op_ms["features"] > 0 and profile.op_ms["backward"] > 0
    # the loop's 20 products take far longer than the single product of the features
    assert profile.op_ms["loop"] > 5 * profile.op_ms["features"]
    assert 0 < profile.graph_ms <= profile.wall_ms
    assert abs(sum(profile.shares().values()) - 1) < 1e-9
    assert "Python and dispatch" in profile.describe()
    assert harness.XLA_CODE not in profile.op_ms  # nothing compiled by XLA here


def test_profile_books_xla_compiled_functions_as_one_category():
    a = tf.random.normal([200, 200], seed=0)
    fused = tf.function(lambda x: tf.reduce_sum(tf.tanh(x * 2.0 + 1.0) * x), jit_compile=True)

    @tf.function
    def step():
        with tf.name_scope("features"):
            x = a @ a
        return [fused(x + float(i)) for i in range(20)]

    step()
    profile = harness.profile(lambda: [t.numpy() for t in step()], 3, [("features", "features/")])
    assert profile.op_ms[harness.XLA_CODE] > 0 and profile.op_ms["features"] > 0
    # its internals (the executor, its threads' kernels) are not counted a second time as "other"
    assert profile.op_ms.get("other", 0.0) < profile.op_ms[harness.XLA_CODE]


def test_peak_is_a_plausible_rate():
    gflops = harness.peak_gflops(size=256, calls=3)
    assert 0.1 < gflops < 1e5  # GFLOP/s of any CPU or GPU of today
