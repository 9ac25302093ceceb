"""Reply validation: names, shapes, dtypes, finiteness, metric ranges and the update-norm bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from server.validation import reason_check, update_norm, validate_reply


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


REFERENCE = record(w=np.zeros((2, 3), np.float32), steps=np.array(0, np.int64))
GOOD_METRICS = MetricRecord({"num-examples": 4, "train-loss": 0.3, "train-accuracy": 0.5, "count-seen": 4})


def good_arrays(**changes: np.ndarray) -> ArrayRecord:
    arrays = {"w": np.ones((2, 3), np.float32), "steps": np.array(5, np.int64)}
    arrays.update(changes)
    return record(**arrays)


def test_valid_reply_returns_none():
    assert validate_reply(good_arrays(), GOOD_METRICS, REFERENCE) is None


@pytest.mark.parametrize(
    ("arrays", "check", "fragment"),
    [
        (record(w=np.ones((2, 3), np.float32)), "names", "missing ['steps']"),
        (good_arrays(extra=np.zeros(1, np.float32)), "names", "unexpected ['extra']"),
        (good_arrays(w=np.ones((3, 2), np.float32)), "shape", "'w'"),
        (good_arrays(w=np.ones((2, 3), np.float16)), "dtype", "float16"),
        (good_arrays(steps=np.array(5.0, np.float64)), "dtype", "int64"),
        (good_arrays(w=np.array([[0, np.nan, 0], [0, 0, np.inf]], np.float32)), "finite", "2 non-finite"),
    ],
)
def test_invalid_arrays_name_the_check(arrays, check, fragment):
    reason = validate_reply(arrays, GOOD_METRICS, REFERENCE)
    assert reason is not None and reason_check(reason) == check
    assert fragment in reason


@pytest.mark.parametrize(
    ("metrics", "fragment"),
    [
        ({"train-loss": 1.0}, "'num-examples' is missing"),
        ({"num-examples": -1}, ">= 0"),
        ({"num-examples": 2.0}, "must be an int"),
        ({"num-examples": 2, "train-loss": float("nan")}, "not finite"),
        ({"num-examples": 2, "per-class": [1.0, float("inf")]}, "not finite"),
        ({"num-examples": 2, "val-accuracy": 1.5}, "[0, 1]"),
        ({"num-examples": 2, "flip-prob": -0.1}, "[0, 1]"),
        ({"num-examples": 2, "count-seen": -3}, "count"),
        ({"num-examples": 2, "class-counts": [3, -1]}, "count"),
    ],
)
def test_invalid_metrics_are_rejected(metrics, fragment):
    reason = validate_reply(good_arrays(), MetricRecord(metrics), REFERENCE)
    assert reason is not None and reason_check(reason) == "metrics"
    assert fragment in reason


def test_zero_examples_and_list_metrics_in_range_are_valid():
    metrics = MetricRecord({"num-examples": 0, "class-accuracy": [0.0, 1.0], "class-counts": [0, 3]})
    assert validate_reply(good_arrays(), metrics, REFERENCE) is None


def test_update_norm_over_floating_arrays_only():
    # w: six entries of 1 -> sqrt(6); the int64 step counter (0 -> 5) is ignored
    assert update_norm(good_arrays(), REFERENCE) == pytest.approx(math.sqrt(6))
    assert update_norm(REFERENCE, REFERENCE) == 0.0


def test_max_update_norm_bound():
    assert validate_reply(good_arrays(), GOOD_METRICS, REFERENCE, max_update_norm=2.5) is None
    reason = validate_reply(good_arrays(), GOOD_METRICS, REFERENCE, max_update_norm=2.0)
    assert reason is not None and reason_check(reason) == "update-norm"


def test_update_norm_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        update_norm(good_arrays(w=np.ones(6, np.float32)), REFERENCE)


# --------------------------------------------------------------------------- robust aggregation pieces (issue 14)


def _reply(site: int, n: int, node: int):
    from flwr.app import Message, RecordDict

    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "site-id": site})}), reply_to=sent)


@pytest.fixture()
def _identity():
    from federation_helpers import fake_task_identity

    with fake_task_identity(run_id=31):
        yield


def test_robust_combine_ignores_one_outlier_per_coordinate():
    from server.strategies.robust import robust_combine

    stacked = np.array([[1.0, -2.0], [1.2, -2.2], [1e6, 5e5]])
    assert robust_combine(stacked, "median").tolist() == [1.2, -2.0]
    five = np.array([[0.0], [1.0], [2.0], [1e9], [-1e9]])
    assert robust_combine(five, "trimmed_mean", 0.2).tolist() == [1.0]  # floor(0.2 * 5) = 1 dropped at each end
    assert robust_combine(five, "trimmed_mean", 0.0)[0] == pytest.approx(0.6)  # nothing trimmed: the plain mean
    with pytest.raises(ValueError, match="unknown robust rule"):
        robust_combine(five, "krum")


def test_cosine_of_a_sign_flipped_update_is_minus_one():
    from server.strategies.robust import cosine

    update = {"w": np.array([1.0, -2.0, 3.0])}
    assert cosine({"w": -update["w"]}, update) == pytest.approx(-1.0)
    assert cosine({"w": 2 * update["w"]}, update) == pytest.approx(1.0)
    assert cosine({"w": np.zeros(3)}, update) == 0.0


def test_global_norm_leaves_integer_buffers_out_and_aggregate_problem_finds_nan():
    from server.rounds import aggregate_problem, global_norm

    arrays = record(w=np.array([3.0, 4.0], np.float32), steps=np.array(10**6, np.int64))
    assert global_norm(arrays) == pytest.approx(5.0)
    assert aggregate_problem(arrays) is None
    bad = record(w=np.array([3.0, np.inf], np.float32))
    assert "non-finite" in aggregate_problem(bad) and "'w'" in aggregate_problem(bad)


def test_relative_norm_bound_follows_the_global_model_and_an_absolute_bound_wins():
    from server.history import RoundRecorder
    from server.rounds import RoundGuard

    class Stub:
        max_update_norm = None

    guard, stub = RoundGuard(RoundRecorder(), update_norm_factor=0.5), Stub()
    guard.set_norm_bound(stub, 1, record(w=np.array([3.0, 4.0], np.float32)))
    assert stub.max_update_norm == pytest.approx(2.5) and guard.norm_bounds == {1: pytest.approx(2.5)}
    fixed = RoundGuard(RoundRecorder(), update_norm_factor=0.5, max_update_norm=7.0)
    fixed.set_norm_bound(stub, 1, record(w=np.array([3.0, 4.0], np.float32)))
    assert stub.max_update_norm == 7.0


def test_num_examples_cap_peer_ratio_growth_and_absolute(_identity):
    from server.history import RoundRecorder
    from server.rounds import RoundGuard

    guard = RoundGuard(RoundRecorder(), num_examples_growth=2.0, num_examples_peer_ratio=100.0, max_num_examples=10**6)
    honest = [_reply(0, 300, 10), _reply(1, 20, 11)]
    assert guard.num_examples_reasons(honest) == {}  # 15x apart: a quantity skew, not an attack
    reasons = guard.num_examples_reasons([*honest, _reply(2, 10**5, 12)])
    assert list(reasons) == [2] and "num_examples_peer_ratio" in reasons[2] and "site-2" in reasons[2]
    assert "max_num_examples" in guard.num_examples_reasons([*honest, _reply(2, 10**7, 12)])[2]
    guard.first_num_examples["site-1"] = 20
    assert guard.num_examples_reasons([_reply(1, 40, 11)]) == {}
    assert "first accepted value 20" in guard.num_examples_reasons([_reply(1, 41, 11)])[0]
    state = guard.state_dict()
    again = RoundGuard(RoundRecorder())
    again.load_state_dict(state)
    assert again.first_num_examples == {"site-1": 20}, "the cap survives a resume"


def test_bounded_wait_grid_raises_after_the_bound_and_resets_when_nodes_return():
    from server.rounds import BoundedWaitGrid, NodesUnavailable

    class Nodes:
        ids = [1, 2]

        def get_node_ids(self):
            return list(self.ids)

    now = [0.0]
    inner = Nodes()
    grid = BoundedWaitGrid(inner, min_nodes=2, wait_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert grid.get_node_ids() == [1, 2]
    inner.ids = [1]
    for t in (10.0, 12.0, 15.0):  # short since t=10: still within the bound at t=15
        now[0] = t
        assert grid.get_node_ids() == [1]
    inner.ids = [1, 2]
    now[0] = 16.0
    assert grid.get_node_ids() == [1, 2], "a node back in time resets the wait"
    inner.ids = [1]
    now[0] = 20.0
    grid.get_node_ids()
    now[0] = 25.5
    with pytest.raises(NodesUnavailable, match=r"only 1 node\(s\) connected for 6 s.*node_wait_s=5") as info:
        grid.get_node_ids()
    assert (info.value.connected, info.value.required) == (1, 2)


def test_redact_error_reason_drops_tracebacks_and_paths():
    from fopro_kd.federation.errors import redact_error_reason

    ray_like = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
                "Message: node 1002 (site-2): FileNotFoundError: /data/hospital-b/ham10000/ISIC_0024306.jpg\n"
                "Traceback (most recent call last):\n  File \"/opt/fopro/client/client_app.py\", line 12, in train\n"
                "    raise FileNotFoundError(path)\nFileNotFoundError: /data/hospital-b/x.jpg'>")
    out = redact_error_reason(ray_like)
    assert "Traceback" not in out and "/data" not in out and "/opt" not in out and 'File "' not in out
    assert "node 1002 (site-2): FileNotFoundError: <path>" in out
    assert len(redact_error_reason("x" * 5000)) == 400
    assert redact_error_reason(r"C:\Users\lab\weights.pth missing") == "<path> missing"


def test_redact_error_reason_keeps_the_message_of_a_ray_wrapped_error():
    """The reason Flower's simulation engine builds from a RayTaskError (captured from Ray 2.55): the site's
    message comes last, after the actor header, banners and caret lines; it must survive redaction."""
    from fopro_kd.federation.errors import redact_error_reason

    ray_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::A.run()\x1b[39m (pid=12699, "
                  "ip=192.0.2.2, actor_id=2968171ea3528a6c8627c62401000000, repr=<__main__.A object at 0x7f31>)\n\n"
                  "The above exception was the direct cause of the following exception:\n\n\x1b[36mray::A.run()"
                  "\x1b[39m (pid=12699, ip=192.0.2.2, actor_id=2968171ea3528a6c8627c62401000000, repr=<__main__.A "
                  "object at 0x7f31>)\n           ^^^^^^^^^^^^^^^^^^^^\n  File \"/srv/fopro/client_app.py\", line 10, "
                  "in run\nflwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
                  "Message: node 5443 (site-4): RuntimeError: injected crash at site-4 in round 1'>")
    out = redact_error_reason(ray_reason)
    assert out.endswith("node 5443 (site-4): RuntimeError: injected crash at site-4 in round 1'>")
    assert "192.0.2.2" not in out and "/srv" not in out and "\x1b" not in out and "^^^" not in out
    assert "The above exception" not in out
    assert redact_error_reason("x" * 4000 + " the end").endswith("the end")
