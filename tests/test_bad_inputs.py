"""Bad inputs across config, data, checkpoints and messages: one clear error or a logged rejection each.

Every case asserts that the message names the file / field / node at fault, and where a
valid artefact exists next to the bad one (a good checkpoint, an honest reply, the run's
history) that it is still intact afterwards. docs/reliability.md lists the same cases.
No Ray here: every case runs in well under a second except the two client handler cases.
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from fopro_kd.federation.sites import SiteDataError, load_site_data, site_spec_from_node_config
from client.state import ClientState, ClientStateStore
from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fopro_kd.config import Config, ConfigError, TeacherConfig, config_from_dict, load_config
from fopro_kd.data import build_splits
from fopro_kd.data.loaders import load_medmnist_npz, read_split_file
from fopro_kd.models import TeacherLoadError, build_teacher
from fopro_kd.run_dir import RunDir
from server.checkpoints import ResumeError, ServerCheckpointStore, check_fresh_run_dir, config_hash
from server.history import RoundRecorder
from server.rounds import RoundGuard
from server.server_app import check_federation_config, load_resume_checkpoint, run_dirs_from_run_config
from server.strategies import build_strategy

REPO = Path(__file__).resolve().parents[1]


def tiny(**federation: Any) -> Config:
    return config_from_dict({
        "seed": 0, "device": "cpu",
        "data": {"kind": "synthetic", "image_size": 32, "num_classes": 4, "max_per_class": 40, "imbalance_factor": 4},
        "split": {"val_per_class": 4, "test_per_class": 4},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
        "train": {"method": "fopro-kd", "batch_size": 8, "eval_batch_size": 64},
        "federation": {"num_clients": 3, "num_rounds": 2, "local_steps": 2, "min_available_clients": 2, **federation},
    })


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 13, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


# =========================================================================== config


def _yaml(tmp_path: Path, values: Any, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"train": {"learning_rate": 0.1}}, r"unknown config key 'train\.learning_rate'"),           # 1
        ({"train": {"lr": -0.001}}, r"'train\.lr' must be > 0"),                                      # 2
        ({"data": {"imbalance_factor": 0.5}}, r"'data\.imbalance_factor' is an imbalance factor"),   # 3
        ({"train": {"batch_size": "eight"}}, r"train\.batch_size"),                                   # 4
        ({"federation": {"strategy": "fedsgd"}}, r"federation\.strategy"),                           # 5
        ({"federation": {"max_failed_rounds": 0}}, r"'federation\.max_failed_rounds' must be an integer >= 1"),  # 6
        ({"federation": {"min_valid_replies": 5, "num_clients": 3, "min_available_clients": 2}},
         r"'federation\.min_valid_replies' \(5\) exceeds"),                                          # 7
        ({"federation": {"max_update_norm": -1.0}}, r"'federation\.max_update_norm' must be a finite number > 0"),  # 8
        ({"federation": {"round_timeout_s": 0}}, r"'federation\.round_timeout_s' must be > 0"),     # 9
        ([1, 2, 3], r"top level must be a mapping"),                                                  # 10
    ],
)
def test_bad_config_values_name_the_file_and_field(tmp_path: Path, values: Any, pattern: str) -> None:
    path = _yaml(tmp_path, values)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_file_missing_or_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):           # 11
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):                   # 12
        load_config(broken)
    with pytest.raises(ConfigError, match=r"must look like 'section\.key=value'"):             # 13
        load_config(None, ["train.lr"])


def test_impossible_federation_settings_fail_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"fedmas.*'train\.method' is 'bsm'"):               # 14
        check_federation_config(config_from_dict({**tiny().to_dict(), "train": {"method": "bsm"},
                                                  "federation": {**tiny().to_dict()["federation"],
                                                                 "strategy": "fedmas"}}))


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_run_config_paths_must_be_absolute_and_consistent(tmp_path: Path) -> None:
    cfg = tiny()
    with pytest.raises(ConfigError, match=r"'out-dir' must be an absolute path"):             # 15
        run_dirs_from_run_config(cfg, _context({"out-dir": "runs/x"}))
    with pytest.raises(ConfigError, match=r"'resume-dir' must be an absolute path"):          # 16
        run_dirs_from_run_config(cfg, _context({"resume-dir": "../runs/x"}))
    with pytest.raises(ConfigError, match=r"'resume-dir' .* continues that run directory"):   # 17
        run_dirs_from_run_config(cfg, _context({"resume-dir": str(tmp_path / "a"), "out-dir": str(tmp_path / "b")}))
    assert run_dirs_from_run_config(cfg, _context({"resume-dir": str(tmp_path / "a")})) == ((tmp_path / "a").resolve(),
                                                                                              True)


def test_paths_escaping_the_run_directory_are_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for bad in ("../outside.json", "/etc/passwd", "plots/../../x.png"):                        # 18
        with pytest.raises(ValueError, match="refusing to write outside the run directory"):
            run.resolve(bad)
    with pytest.raises(ValueError, match="refusing to write outside the run directory"):
        run.write_json("../escape.json", {})
    assert not (tmp_path / "escape.json").exists()


# =========================================================================== data


def _data_cfg(tmp_path: Path, **data: Any) -> Config:
    return config_from_dict({"data": {"image_size": 16, "cache_dir": str(tmp_path / "cache"), **data},
                             "split": {"val_per_class": 1, "test_per_class": 1}})


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def test_data_root_missing_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root = .*path not found"):           # 19
        build_splits(_data_cfg(tmp_path, kind="imagefolder", root=str(tmp_path / "missing")))
    spec = site_spec_from_node_config({"site-id": 4, "data-root": str(tmp_path / "gone")}, node_id=77)
    with pytest.raises(SiteDataError, match=r"node 77 \(site-4\): data root .*gone.* does not exist"):  # 20
        load_site_data(tiny(), spec)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for c in ("a", "b"):
        for k in range(4):
            _image(root / c / f"{c}{k}.png", (10 + 60 * k, 30, 30))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"could not be decoded.*broken\.png"):              # 21
        build_splits(_data_cfg(tmp_path, kind="imagefolder", root=str(root)))


def _ham(tmp_path: Path, header: list[str], rows: list[list[str]]) -> Path:
    root = tmp_path / "ham"
    for row in rows:
        _image(root / "images" / f"{row[1]}.jpg")
    with open(root / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return root


def test_label_not_in_class_list_names_csv_and_line(tmp_path: Path) -> None:
    root = _ham(tmp_path, ["lesion_id", "image_id", "dx"], [["L1", "ISIC_1", "nv"], ["L2", "ISIC_2", "melanomaX"]])
    with pytest.raises(ValueError, match=r"HAM10000_metadata\.csv, line 3: dx='melanomaX' is not a HAM10000 class"):  # 22
        build_splits(_data_cfg(tmp_path, kind="ham10000", root=str(root)))


def test_csv_with_missing_column_names_it(tmp_path: Path) -> None:
    root = _ham(tmp_path, ["lesion_id", "image_id"], [["L1", "ISIC_1"]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['dx'\]"):                    # 23
        build_splits(_data_cfg(tmp_path, kind="ham10000", root=str(root)))


def test_split_file_with_unknown_split_name(tmp_path: Path) -> None:
    path = tmp_path / "split.csv"
    path.write_text("image_id,split\nISIC_1,train\nISIC_2,holdout\n")
    with pytest.raises(ValueError, match=r"split\.csv, line 3: split='holdout' is not one of"):  # 24
        read_split_file(path)


def test_npz_missing_key_names_it(tmp_path: Path) -> None:
    path = tmp_path / "derma.npz"
    np.savez(path, train_images=np.zeros((2, 8, 8, 3), np.uint8), train_labels=np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match=r"derma\.npz: missing array 'val_images'"):         # 25
        load_medmnist_npz(path, 16)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, train_images=np.array([{"x": 1}], dtype=object), train_labels=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):                                     # 26
        load_medmnist_npz(path, 16)


def test_node_config_out_of_range_and_too_many_sites(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match=r"node 5: 'partition-id'=3 is outside \[0, 3\)"):  # 27
        site_spec_from_node_config({"partition-id": 3, "num-partitions": 3}, node_id=5)
    with pytest.raises(SiteDataError, match=r"node 6: node config 'site-id' must be an integer"):  # 28
        site_spec_from_node_config({"site-id": "north"}, node_id=6)


def test_teacher_file_for_another_architecture(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"efficientnet\.pth.*does not look like a timm 'test_resnet' checkpoint"):  # 29
        build_teacher(TeacherConfig(arch="test_resnet", source="file", file=str(path)))


class Payload:
    """Any class: unpickling it would run code chosen by whoever wrote the file."""


def test_teacher_file_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model_object.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(TeacherLoadError, match=r"cannot read weights file .*weights_only=True"):  # 30
        build_teacher(TeacherConfig(arch="test_resnet", source="file", file=str(path)))


# =========================================================================== checkpoints


def _fake_server_checkpoint(store: ServerCheckpointStore, server_round: int, cfg: Config, **extra: Any) -> Path:
    payload = {
        "round": server_round, "num_rounds": cfg.federation.num_rounds, "config_hash": config_hash(cfg),
        "state_key": "run-test", "arrays": {"w": torch.full((2,), float(server_round))}, "history": [],
        "recorder": {"rounds": {}, "node_sites": {}}, "best": {"round": -1, "val_balanced_accuracy": -1.0,
                                                             "test_metrics": {}, "arrays": None},
        "rng": {}, **extra,
    }
    return store.save(payload)


def test_truncated_and_edited_checkpoints_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"format": "x", "w": torch.ones(3)})
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is corrupted or truncated"):       # 31
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):                      # 32
        load_checkpoint(path)


def test_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "x", "payload": Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    (tmp_path / "evil.pt.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest() + "  evil.pt\n")
    with pytest.raises(CheckpointError, match=r"evil\.pt cannot be read safely \(weights_only=True\)"):  # 33
        load_checkpoint(path)


def test_checkpoint_from_another_run_is_refused_naming_both(tmp_path: Path) -> None:
    mine, other = tiny(), tiny(num_rounds=4)
    store = ServerCheckpointStore(RunDir(tmp_path))
    _fake_server_checkpoint(store, 1, other)
    with pytest.raises(ResumeError, match="belongs to another run") as info:                  # 34
        load_resume_checkpoint(mine, tmp_path, "my config")
    message = str(info.value)
    assert config_hash(other)[:16] in message and config_hash(mine)[:16] in message and "my config" in message


def test_resume_dir_without_checkpoint_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match=r"no server checkpoint in .*checkpoints"):         # 35
        load_resume_checkpoint(tiny(), tmp_path)
    with pytest.raises(ResumeError, match=r"cannot resume .*missing: no such run directory"):  # 36
        load_resume_checkpoint(tiny(), tmp_path / "missing")


def test_unusable_checkpoints_fall_back_or_fail_clearly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny()
    store = ServerCheckpointStore(RunDir(tmp_path))
    _fake_server_checkpoint(store, 1, cfg)
    newest = _fake_server_checkpoint(store, 2, cfg)
    newest.with_name(newest.name + ".sha256").unlink()  # the write died before the checksum              # 37
    with caplog.at_level(logging.WARNING):
        payload, path = store.load_latest(config_hash(cfg))
    assert payload["round"] == 1 and path.name == "server-round-0001.pt"
    assert any("has no checksum file" in r.getMessage() for r in caplog.records)
    nan = ServerCheckpointStore(RunDir(tmp_path / "nan"))
    _fake_server_checkpoint(nan, 1, cfg, arrays={"w": torch.tensor([float("nan"), 1.0])})
    with pytest.raises(ResumeError, match=r"no usable checkpoint .*global model arrays \['w'\] are not finite"):  # 38
        nan.load_latest(config_hash(cfg))


def test_failed_checkpoint_write_keeps_the_good_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny()
    store = ServerCheckpointStore(RunDir(tmp_path))
    good = _fake_server_checkpoint(store, 1, cfg)
    _fake_server_checkpoint(store, 2, cfg)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):                                       # 39
        _fake_server_checkpoint(store, 3, cfg)
    monkeypatch.undo()
    assert [r for r, _ in store.checkpoints()] == [2, 1], "the old checkpoints must survive a failed write"
    assert load_checkpoint(good)["round"] == 1
    assert store.load_latest(config_hash(cfg))[0]["round"] == 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")], "no temporary files left"


def test_fresh_run_into_a_run_directory_is_refused(tmp_path: Path) -> None:
    _fake_server_checkpoint(ServerCheckpointStore(RunDir(tmp_path)), 3, tiny())
    with pytest.raises(ResumeError, match=r"newest: round 3.*--resume"):                     # 40
        check_fresh_run_dir(tmp_path)


def test_corrupted_client_state_falls_back_to_the_previous_round(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    store = ClientStateStore(tmp_path, "run-x", 2)
    store.save(ClientState(2, trainer={"epochs_done": 1}, rounds_trained=1, last_round=1))
    store.save(ClientState(2, trainer={"epochs_done": 2}, rounds_trained=2, last_round=2))
    store.path.write_bytes(store.path.read_bytes()[:50])                                       # 41
    with caplog.at_level(logging.WARNING):
        state = ClientStateStore(tmp_path, "run-x", 2).load(before_round=3)
    assert state.last_round == 1, "the previous round's state is used"
    assert any("ignoring unreadable client state" in r.getMessage() for r in caplog.records)


def test_client_state_key_cannot_escape_the_state_root(tmp_path: Path) -> None:
    for key in ("../../etc", "a/b", "..", "", "x" * 200):                                      # 42
        with pytest.raises(ValueError, match="refusing state key"):
            ClientStateStore(tmp_path / "root", key, 0)
    assert not (tmp_path / "etc").exists()


# =========================================================================== messages


class NodesGrid(Grid):
    """Only what ``configure_train`` needs: the node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def set_run(self, run: Any) -> None:  # pragma: no cover
        pass

    @property
    def run(self) -> Any:  # pragma: no cover
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError  # pragma: no cover


GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(5, np.int64)}


def _reply(instruction: Message, arrays: dict[str, np.ndarray] | None = None, **metrics: Any) -> Message:
    arrays = GLOBAL if arrays is None else arrays
    record = {"num-examples": 10, "site-id": int(instruction.metadata.dst_node_id) - 100, **metrics}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(record)}), reply_to=instruction)


def _round(make_bad: Any) -> tuple[Any, RoundRecorder]:
    """One round with an honest node (100) and a node (101) whose reply ``make_bad(instruction)`` builds."""
    recorder = RoundRecorder()
    strategy = recorder.instrument(build_strategy(tiny().federation, min_valid_replies=1))
    RoundGuard(recorder).instrument(strategy)
    instructions = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                                 ConfigRecord(), NodesGrid([100, 101])))
    by_node = {int(m.metadata.dst_node_id): m for m in instructions}
    honest = {"w": np.full((2, 3), 0.5, np.float32), "b": np.ones(3, np.float32), "n": np.array(7, np.int64)}
    replies = [_reply(by_node[100], honest), make_bad(by_node[101])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, "the honest reply must still be aggregated"
    for key, value in honest.items():
        np.testing.assert_array_equal(arrays[key].numpy(), value)
    return arrays, recorder


def _undecodable(instruction: Message) -> Message:
    reply = _reply(instruction)
    reply.content["arrays"]["w"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"garbage")
    return reply


@pytest.mark.parametrize(
    ("make_bad", "check", "words"),
    [
        (lambda m: _reply(m, {**GLOBAL, "extra": np.zeros(1, np.float32)}), "names", "unexpected ['extra']"),  # 43
        (lambda m: _reply(m, {**GLOBAL, "w": GLOBAL["w"].astype(np.float16)}), "dtype", "float16"),          # 44
        (lambda m: _reply(m, {**GLOBAL, "b": np.zeros(4, np.float32)}), "shape", "'b' has shape (4,)"),       # 45
        (lambda m: _reply(m, {**GLOBAL, "w": np.full((2, 3), np.inf, np.float32)}), "finite", "non-finite"),  # 46
        (lambda m: _reply(m, **{"train-loss": float("nan")}), "metrics", "'train-loss' is not finite"),      # 47
        (lambda m: _reply(m, **{"num-examples": -3}), "metrics", "must be >= 0"),                           # 48
        (lambda m: Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=m),
         "records", "expected one ArrayRecord"),                                                         # 49
        (_undecodable, "records", "cannot be decoded"),                                                  # 50
    ],
)
def test_bad_replies_are_rejected_and_logged_by_check(make_bad: Any, check: str, words: str) -> None:
    _, recorder = _round(make_bad)
    rejections = recorder.rounds[1].rejections
    assert [(r["node_id"], r["check"]) for r in rejections] == [(101, check)]
    assert words in rejections[0]["reason"]
    assert recorder.rounds[1].weights == {100: 1.0}


def test_update_norm_bound_rejects_an_exploding_update() -> None:
    recorder = RoundRecorder()
    strategy = recorder.instrument(build_strategy(tiny().federation, max_update_norm=1.0))
    instructions = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                                 ConfigRecord(), NodesGrid([100, 101])))
    big = {**GLOBAL, "w": np.full((2, 3), 100.0, np.float32)}
    strategy.aggregate_train(1, [_reply(instructions[0]), _reply(instructions[1], big)])             # 51
    assert [r["check"] for r in recorder.rounds[1].rejections] == ["update-norm"]


def test_evaluate_reply_with_bad_counts_is_ignored_and_logged() -> None:
    recorder = RoundRecorder()
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=100, message_type="evaluate")
    bad = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "site-id": 0,
                                                      "correct-counts": [5, 0], "total-counts": [1, 2]})}),
                  reply_to=instruction)
    recorder.on_evaluate_replies(1, [bad])                                                            # 52
    assert recorder.rounds[1].site_eval == {}
    assert "more correct predictions than samples" in recorder.rounds[1].eval_errors[100]


def _train_instruction(arrays: ArrayRecord | None, node: int, **config: Any) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1, **config})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=node, message_type="train")


def test_client_refuses_bad_instructions_naming_the_node(tmp_path: Path) -> None:
    from client.client_app import make_client_app
    from fopro_kd.federation.evaluation import build_global_student

    cfg = tiny()
    app = make_client_app(cfg, state_root=tmp_path / "state")
    ctx = Context(run_id=3, node_id=100, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match=r"node 100 \(site-0\).*no ArrayRecord 'arrays'"):       # 53
            app(_train_instruction(None, 100), ctx)
        student = build_global_student(cfg, 4, seed=0)
        arrays = ArrayRecord({k: v for k, v in student.state_dict().items()})
        with pytest.raises(RuntimeError, match=r"node 100 \(site-0\).*refusing state key '\.\./\.\./outside'"):  # 54
            app(_train_instruction(arrays, 100, **{"state-key": "../../outside"}), ctx)
        with pytest.raises(RuntimeError, match=r"node 100 \(site-0\).*'proximal-mu' must be a finite number"):
            app(_train_instruction(arrays, 100, **{"proximal-mu": "abc"}), ctx)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()


# =========================================================================== security (source greps)


SOURCE_DIRS = ("fopro_kd", "client", "server", "simulations", "deploy", "tests")


@functools.lru_cache(maxsize=1)
def _all_calls() -> tuple[tuple[Path, ast.Call], ...]:
    """Every ``<something>.<attr>(...)`` call in the source tree (parsed once)."""
    found = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [(path, node) for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    return tuple(found)


def _calls(attr: str) -> list[tuple[Path, ast.Call]]:
    return [(path, node) for path, node in _all_calls() if node.func.attr == attr]


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_every_torch_load_uses_weights_only() -> None:
    offenders = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in _calls("load")
                 if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"
                 and _keyword(c, "weights_only") is not True]
    offenders += [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in _calls("load_state_dict")
                  if isinstance(c.func, ast.Attribute) and c.args and _keyword(c, "weights_only") is False]
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_no_unpickling_of_data() -> None:
    numpy_loads = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in _calls("load")
                   if isinstance(c.func.value, ast.Name) and c.func.value.id in ("np", "numpy")
                   and _keyword(c, "allow_pickle") is not False]
    assert numpy_loads == [], f"np.load without allow_pickle=False: {numpy_loads}"
    pickles = [f"{p.relative_to(REPO)}:{c.lineno}" for attr in ("load", "loads") for p, c in _calls(attr)
               if isinstance(c.func.value, ast.Name) and c.func.value.id in ("pickle", "cloudpickle", "dill", "joblib")]
    assert pickles == [], f"pickle loads: {pickles}"
    yaml_loads = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in _calls("load")
                  if isinstance(c.func.value, ast.Name) and c.func.value.id == "yaml"]
    assert yaml_loads == [], f"yaml.load (use yaml.safe_load): {yaml_loads}"


# =========================================================================== early, clean errors (issue 14)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"metrics": {"few_shot_threshold": 500}}, r"'metrics\.few_shot_threshold' \(500\) must be <= "
                                                   r"'metrics\.many_shot_threshold' \(100\)"),               # 55
        ({"metrics": {"tail_classes": 0}}, r"'metrics\.tail_classes' must be >= 1"),                         # 56
        ({"federation": {"update_norm_factor": -1}}, r"'federation\.update_norm_factor' must be a finite"),  # 57
        ({"federation": {"trim_fraction": 0.5}}, r"'federation\.trim_fraction' must be in \[0, 0\.5\)"),     # 58
        ({"federation": {"node_wait_s": 0}}, r"'federation\.node_wait_s' must be a finite number > 0"),      # 59
        ({"federation": {"max_num_examples": 0}}, r"'federation\.max_num_examples' must be an integer >= 1"),  # 60
        ({"federation": {"num_examples_growth": 0.5}}, r"'federation\.num_examples_growth' must be"),       # 61
    ],
)
def test_bad_robustness_and_metric_values_fail_at_load(tmp_path: Path, values: Any, pattern: str) -> None:
    path = _yaml(tmp_path, values)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def _cli_config(tmp_path: Path, **sections: Any) -> Path:
    values = tiny().to_dict()
    for name, extra in sections.items():
        values[name] = {**values[name], **extra}
    return _yaml(tmp_path, values, "cli.yaml")


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the training and evaluation entry points: a start-up check must fire before any of them."""
    import fopro_kd.training.single_site as single_site

    calls: list[str] = []
    finished = {"balanced_accuracy": 0.5, "few_shot": None, "tail": None, "tail_classes": []}
    monkeypatch.setattr(single_site, "train_single_site", lambda *a, **k: calls.append("train") or finished)
    monkeypatch.setattr(single_site, "evaluate_checkpoint", lambda *a, **k: calls.append("evaluate") or {})
    return calls


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from simulations.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fopro-kd: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_teacher_file_missing_fails_at_start_up_before_data(tmp_path: Path, no_training: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cli_config(tmp_path, teacher={"source": "file", "file": str(tmp_path / "gone.pth")})
    err = _cli_error(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)           # 62
    assert "teacher.file: weights file not found" in err and "gone.pth" in err
    assert no_training == [], "the check must come before the data is decoded"


def test_teacher_file_of_another_architecture_fails_at_start_up(tmp_path: Path, no_training: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    path = tmp_path / "efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    cfg = _cli_config(tmp_path, teacher={"source": "file", "file": str(path)})
    err = _cli_error(["simulate", "--config", str(cfg), "--out", str(tmp_path / "sim")], capsys)         # 63
    assert "does not look like a timm 'test_resnet' checkpoint" in err and "teacher.file" in err
    assert not (tmp_path / "sim").exists()


def test_teacher_model_kwargs_of_another_architecture_is_one_clear_error(tmp_path: Path, no_training: list[str],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fopro_kd.models.teacher import check_teacher_startup

    with pytest.raises(TeacherLoadError, match=r"'teacher\.model_kwargs' \{'pad_type': 'same'\} is not accepted "
                                               r"by timm 'resnet50'.*pad_type"):                            # 64
        check_teacher_startup(TeacherConfig(arch="resnet50", source="hub", model_kwargs={"pad_type": "same"}))
    cfg = _cli_config(tmp_path, teacher={"model_kwargs": {"pad_type": "same"}})
    err = _cli_error(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert "teacher.model_kwargs" in err and no_training == []
    with pytest.raises(TeacherLoadError, match=r"teacher\.model_kwargs"):  # and when the teacher is built
        build_teacher(TeacherConfig(arch="test_resnet", source="none", model_kwargs={"pad_type": "same"}))


def test_train_out_onto_a_finished_run_needs_overwrite(tmp_path: Path, no_training: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"balanced_accuracy": 0.5}')
    cfg = _cli_config(tmp_path)
    err = _cli_error(["train", "--config", str(cfg), "--out", str(out)], capsys)                        # 65
    assert "already holds a finished run (metrics.json)" in err and "--overwrite" in err
    assert no_training == [] and (out / "metrics.json").read_text() == '{"balanced_accuracy": 0.5}'
    from fopro_kd.cli import main

    assert main(["train", "--config", str(cfg), "--out", str(out), "--overwrite"]) == 0
    assert no_training == ["train"]


def test_checkpoint_without_a_valid_checksum_is_refused_unless_no_verify(tmp_path: Path, no_training: list[str],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"format": "fopro-kd-student/1", "w": torch.zeros(3)})
    path.with_name("best.pt.sha256").unlink()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cfg = _cli_config(tmp_path)
    err = _cli_error(["evaluate", "--config", str(cfg), "--checkpoint", str(path)], capsys)             # 66
    assert "has no checksum (best.pt.sha256 is missing)" in err and "--no-verify" in err
    assert no_training == []
    from fopro_kd.cli import main

    try:  # --no-verify goes on to the (stubbed) evaluation; printing its empty summary is not the point here
        main(["evaluate", "--config", str(cfg), "--checkpoint", str(path), "--no-verify"])
    except (KeyError, TypeError):
        pass
    assert no_training == ["evaluate"]
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"format": "fopro-kd-student/1"})
    good.with_name("good.pt.sha256").write_text("0" * 64 + "  good.pt\n")
    from fopro_kd.checkpoint import verify_checkpoint

    with pytest.raises(CheckpointError, match=r"good\.pt is corrupted or truncated"):                  # 67
        verify_checkpoint(good)


def test_error_replies_carry_no_traceback_or_local_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.client_app import _with_node_context

    context = Context(run_id=1, node_id=1002, node_config={"partition-id": 2}, state=RecordDict(), run_config={})

    def failing() -> Message:
        raise FileNotFoundError(f"[Errno 2] No such file: '{tmp_path}/hospital/ham10000/ISIC_0024306.jpg'")

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError) as info:                          # 68
        _with_node_context(failing, context)
    sent = str(info.value)
    assert sent == "node 1002 (site-2): FileNotFoundError: [Errno 2] No such file: '<path>'"
    assert str(tmp_path) in caplog.text, "the full error stays in the site's own log"

    def site_data_error() -> Message:
        raise SiteDataError(f"node 1002 (site-2): data root {tmp_path}/gone does not exist")

    with pytest.raises(SiteDataError, match=r"data root <path> does not exist"):
        _with_node_context(site_data_error, context)
