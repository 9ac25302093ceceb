"""``bench simulation`` and ``bench scaling``: federation round times, overhead share, peak memory.

Each simulation runs as ``fopro-kd simulate`` in a child process (so Ray starts and stops
with it, and its memory is its own), while this process polls ``/proc`` for the child's
whole process tree (the Ray driver, raylet, GCS and the ClientApp actors): the peak of the
summed RSS and of the summed PSS (shared pages split between the processes that map them,
so Ray's shared object store is not counted once per process). The child also reports
``getrusage`` ``ru_maxrss`` of itself and of its reaped children (the largest single process).

Round figures come from the run directory the simulation writes: ``metrics.json``
(``round_seconds``, ``outside_training_share``) and ``history.csv`` (per-round client
``train-seconds`` sum / max, server evaluation seconds, bytes per site). Round 1 carries the
one-off start-up of the client actors (imports, data, teacher) and is the warm-up: the
steady-state figure is the median over the later rounds.

``simulation`` also times, in this process, what a client does per round besides training
(model building, state file save/load, weight (de)serialisation, local evaluation), to show
where the overhead goes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from client.state import LIVE_STATE_ENV, new_live_root, remove_live_root
from simulations.bench_common import REPO_ROOT, format_table, target
from simulations.tiny_federation import tiny_federation_values

logger = logging.getLogger("fopro_kd.bench")

# The tiny federation for --quick (the tests): test_resnet models, 32 px, 2 local steps.
QUICK_CONFIG: dict[str, Any] = tiny_federation_values(federation={"partition": {"kind": "iid", "min_per_site": 1}})

_CHILD = r"""
import json, resource, sys
from simulations.cli import main
rc = main(sys.argv[2:])
ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"rc": rc, "ru_maxrss_self_kb": ru_self, "ru_maxrss_children_kb": ru_children}, handle)
sys.exit(rc)
"""


# --------------------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name may contain spaces: the fields after the last ')' are fixed
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(pid: int) -> list[int]:
    children = _children_map()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) when it is gone or unreadable."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss = pss = int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def _folder_kb(folder: Path | None) -> int:
    """Bytes (kB) of the files under ``folder``: the sites' kept states in shared memory, which no PSS counts."""
    if folder is None:
        return 0
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # replaced or removed while walking
            pass
    return total // 1024


class TreeMemoryPoller:
    """Poll a process tree's summed RSS / PSS every ``interval`` seconds in a thread; keep the peaks.

    ``shared_folder``: a shared-memory folder of the run (``federation.state_memory: node``); its
    files are memory too, so ``peak_memory_kb`` is the peak of tree PSS + their size.
    """

    def __init__(self, pid: int, interval: float = 0.5, shared_folder: Path | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.shared_folder = shared_folder
        self.peak_rss_kb = self.peak_pss_kb = self.peak_single_rss_kb = self.max_processes = 0
        self.peak_root_rss_kb = self.peak_shared_kb = self.peak_memory_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            mems = [_mem_kb(p) for p in pids]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(m[0] for m in mems))
            pss, shared = sum(m[1] for m in mems), _folder_kb(self.shared_folder)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_shared_kb = max(self.peak_shared_kb, shared)
            self.peak_memory_kb = max(self.peak_memory_kb, pss + shared)
            self.peak_single_rss_kb = max([self.peak_single_rss_kb] + [m[0] for m in mems])
            self.peak_root_rss_kb = max(self.peak_root_rss_kb, mems[0][0] if mems else 0)
            self.max_processes = max(self.max_processes, len(pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- one simulation


def run_simulation_process(config: Path, overrides: list[str], out_dir: Path, timeout_s: float,
                           attempts: int = 2) -> dict[str, Any]:
    """Run ``fopro-kd simulate`` in a child process; return wall time, memory peaks, exit status, log tail.

    A failed run is retried once from scratch (Ray start-up can fail transiently on a machine
    shared with other Ray sessions); ``attempts`` and the first failure's log tail are reported.
    """
    failures: list[list[str]] = []
    for _ in range(max(1, attempts)):
        shutil.rmtree(out_dir, ignore_errors=True)
        result = _run_simulation_once(config, overrides, out_dir, timeout_s)
        if result["rc"] == 0:
            break
        failures.append(result["log_tail"])
        logger.warning("simulation into %s failed (exit %s); log %s", out_dir, result["rc"], result["log"])
    result["attempts"] = len(failures) + (1 if result["rc"] == 0 else 0)
    result["failed_attempt_log_tails"] = failures
    return result


def _run_simulation_once(config: Path, overrides: list[str], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    rusage_file = out_dir.parent / f"{out_dir.name}.rusage.json"
    args = ["simulate", "--config", str(config), "--out", str(out_dir)]
    for item in overrides:
        args += ["--set", item]
    env = dict(os.environ)
    if os.environ.get("FOPRO_BENCH_OMP_SET") == "1":
        env.pop("OMP_WAIT_POLICY", None)  # measure the simulation as users run it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    shared = new_live_root()  # the child's kept states (federation.state_memory: node) go here, and are measured
    env[LIVE_STATE_ENV] = str(shared)
    log_file = out_dir.parent / f"{out_dir.name}.log"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with open(log_file, "w") as log, subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(rusage_file), *args], cwd=REPO_ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        ) as proc:
            with TreeMemoryPoller(proc.pid, shared_folder=shared) as poller:
                try:
                    rc = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                    rc = rc if rc else -9
    finally:
        remove_live_root(shared)
    wall = time.perf_counter() - started
    usage = json.loads(rusage_file.read_text()) if rusage_file.is_file() else {}
    tail = log_file.read_text(errors="replace").splitlines()[-25:] if log_file.is_file() else []
    return {
        "rc": rc, "wall_s": wall, "log": str(log_file),
        "peak_tree_rss_mb": poller.peak_rss_kb / 1024, "peak_tree_pss_mb": poller.peak_pss_kb / 1024,
        "peak_shared_state_mb": poller.peak_shared_kb / 1024, "peak_memory_mb": poller.peak_memory_kb / 1024,
        "peak_single_process_rss_mb": poller.peak_single_rss_kb / 1024, "max_processes": poller.max_processes,
        "memory_samples": poller.samples,
        "peak_driver_rss_mb": poller.peak_root_rss_kb / 1024,
        # ru_maxrss of the driver itself is not reported: Linux carries the parent's RSS high-water
        # mark into a forked child (here the bench process), which makes it meaningless. The same
        # caveat applies to this one (the Ray processes forked by the driver inherit its mark); the
        # /proc figures above are the ones to read.
        "ru_maxrss_children_mb": usage.get("ru_maxrss_children_kb", 0) / 1024,
        "log_tail": tail if rc != 0 else [],
    }


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_run(out_dir: Path) -> dict[str, Any]:
    """Per-round figures from a finished run directory (metrics.json + history.csv)."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    with open(out_dir / "history.csv") as handle:
        history = [r for r in csv.DictReader(handle) if r.get("round") not in (None, "", "0")]
    rounds = []
    for row in history:
        bytes_up = [int(float(v)) for k, v in row.items() if k.startswith("bytes/") and v not in ("", None)]
        rounds.append({
            "round": int(row["round"]),
            "round_s": _float(row.get("round_seconds")),
            "outside_training_share": _float(row.get("outside_training_share")),
            "client_train_s_sum": _float(row.get("client_train_seconds_sum")),
            "client_train_s_max": _float(row.get("client_train_seconds_max")),
            "server_eval_s": _float(row.get("server_eval_seconds")),
            "clients": len(bytes_up),
            "bytes_up_per_client": statistics.median(bytes_up) if bytes_up else None,
            "test_balanced_accuracy": _float(row.get("test_balanced_accuracy")),
        })
    steady = [r for r in rounds if r["round"] >= 2] or rounds
    med = (lambda key: statistics.median([r[key] for r in steady if r[key] is not None])
           if any(r[key] is not None for r in steady) else None)
    return {
        "rounds": rounds,
        "steady_rounds": [r["round"] for r in steady],
        "round_s_median": med("round_s"),
        "outside_training_share_median": med("outside_training_share"),
        "client_train_s_sum_median": med("client_train_s_sum"),
        "server_eval_s_median": med("server_eval_s"),
        "bytes_up_per_client": med("bytes_up_per_client"),
        "first_round_s": rounds[0]["round_s"] if rounds else None,
        "final_balanced_accuracy": metrics.get("balanced_accuracy"),
        "best_round": metrics.get("best_round"),
        "federation_wall_s": metrics.get("wall_seconds"),
    }


def _prepare(opts: dict[str, Any], name: str) -> tuple[Path, Path, bool]:
    """(config file, work dir, temporary?) — quick mode writes the tiny config into the work dir."""
    if opts.get("work_dir"):
        work = Path(opts["work_dir"]).expanduser().resolve() / name
        work.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        work = Path(tempfile.mkdtemp(prefix=f"fopro-bench-{name}-"))
        temporary = True
    if opts["quick"]:
        import yaml

        config = work / "quick-sim.yaml"
        config.write_text(yaml.safe_dump(QUICK_CONFIG))
    else:
        config = Path(opts.get("config") or REPO_ROOT / "configs" / "sim-demo.yaml")
        if not config.is_absolute():
            config = (REPO_ROOT / config).resolve()
    return config, work, temporary


def _check_federation() -> str | None:
    try:
        import flwr  # noqa: F401

        import client.client_app  # noqa: F401
        import server.server_app  # noqa: F401
        import simulations.simulate  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not runnable yet"
        return f"the federation is not importable ({type(exc).__name__}: {exc})"
    return None


def _drop_client_state(out_dir: Path) -> None:
    """Client state files are ~90 MB per site for the demo; keep the disk clean once measured."""
    shutil.rmtree(out_dir / "client_state", ignore_errors=True)


# --------------------------------------------------------------------------- client overhead breakdown


def client_overhead_breakdown(config: Path, overrides: list[str], repeats: int = 3) -> dict[str, Any]:
    """Median seconds of the per-round client work besides ``LocalTrainer.train`` (in this process, site 0).

    Mirrors :func:`client.client_app.handle_train` / ``handle_evaluate`` step by step with the
    same library calls; the numbers say where a round's time outside training goes.
    """
    import io
    import statistics as st

    import torch
    from flwr.app import ArrayRecord

    from flwr.app import RecordDict

    from fopro_kd.federation.sites import SiteSpec, load_site_data
    from client.state import ClientState, ClientStateStore, state_memory_mode
    from fopro_kd.config import load_config
    from fopro_kd.training.components import build_models, shared_teacher
    from fopro_kd.training.trainer import LocalTrainer
    from fopro_kd.federation.evaluation import build_global_student, class_correct_counts

    cfg = load_config(config, overrides)
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.federation.client_num_threads)
    try:
        spec = SiteSpec(site_id=0, partition_id=0, num_partitions=cfg.federation.num_clients)
        t0 = time.perf_counter()
        data = load_site_data(cfg, spec)
        first_data_s = time.perf_counter() - t0
        teacher = shared_teacher(cfg)
        timings: dict[str, list[float]] = {}

        def timed(name: str, fn):
            t = time.perf_counter()
            out = fn()
            timings.setdefault(name, []).append(time.perf_counter() - t)
            return out

        tmp = Path(tempfile.mkdtemp(prefix="fopro-bench-state-"))
        live_root = new_live_root()
        try:
            store = ClientStateStore(tmp, "run", 0)
            memory_store = ClientStateStore(tmp, "run-memory", 0, memory=RecordDict())
            node_store = ClientStateStore(tmp, "run-node", 0, memory=RecordDict(), live_root=live_root)
            state_mb = 0.0
            for _ in range(repeats + 1):
                student, prompt = timed("build_models", lambda: build_models(cfg, data.train.num_classes, teacher))
                global_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                record = timed("arrays_to_record", lambda: ArrayRecord(global_state))
                timed("record_to_state_dict", lambda: record.to_torch_state_dict())
                timed("load_state_dict", lambda: student.load_state_dict(global_state))
                state = timed("state_load", store.load)
                trainer = timed("trainer_init", lambda: LocalTrainer(cfg, student, teacher, prompt,
                                                                      data.class_counts(), device))
                if state.trainer is not None:
                    timed("trainer_load_state", lambda: trainer.load_state_dict(state.trainer))
                timed("train_1_step", lambda: trainer.train(data.train, epochs=1, max_steps=1))
                new = ClientState(0, trainer.state_dict(), data.class_counts(), state.rounds_trained + 1, 1)
                timed("state_save", lambda: store.save(new))
                state_mb = store.path.stat().st_size / 2**20
                # the simulation path since issue 16: the state kept in the node's context.state
                timed("state_save_memory", lambda: memory_store.save(new, persist=False))
                timed("state_load_memory", lambda: memory_store.load())
                # federation.state_memory: node: a shared-memory file, only its token in context.state
                timed("state_save_node", lambda: node_store.save(new, persist=False))
                timed("state_load_node", lambda: node_store.load())
                timed("reply_record", lambda: ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()}))
                # evaluate handler
                glob = timed("eval_build_student", lambda: build_global_student(cfg, data.train.num_classes))
                timed("eval_local_test", lambda: class_correct_counts(glob, data.local_test, cfg, device))
            buffer = io.BytesIO()
            torch.save(global_state, buffer)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            remove_live_root(live_root)
        medians = {k: st.median(v[1:] if len(v) > 1 else v) for k, v in timings.items()}
        kept = {"context": ("state_save_memory", "state_load_memory"), "node": ("state_save_node", "state_load_node")}
        per_round = sum(v for k, v in medians.items()
                        if k != "train_1_step" and not any(k in keys for keys in kept.values()))
        # now: no model building (cached per actor), state kept in memory (federation.state_memory), the file
        # written every state_persist_every rounds; Ray's transfer of context.state is not in this in-process figure
        every = max(1, cfg.federation.state_persist_every)
        now = (per_round - medians["build_models"] - medians["eval_build_student"] - medians["state_save"]
               - medians["state_load"] + sum(medians[k] for k in kept[state_memory_mode(cfg)])
               + medians["state_save"] / every)
        return {
            "site": 0, "train_images": len(data.train), "local_test_images": len(data.local_test),
            "first_site_data_s": first_data_s, "client_state_file_mb": state_mb,
            "model_mb": len(buffer.getvalue()) / 2**20,
            "median_s": medians, "overhead_per_client_round_s": per_round,
            "overhead_per_client_round_now_s": now,
        }
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- suites


PREVIOUS_BEHAVIOUR = [
    "federation.evaluate_every=1", "federation.test_every_round=true", "federation.state_persist_every=1",
    "federation.reuse_client_models=false", "federation.evaluate_in_train=false", "federation.state_memory=context",
]
"""The simulation as it ran before issue 16: state file and server checkpoint every round, models rebuilt for every
message, server (val + test) and federated evaluation (its own phase) every round."""
PREVIOUS_SIM_DEMO_SHAPE = [
    "federation.num_clients=5", "federation.min_available_clients=5", "federation.local_steps=null",
    "federation.local_epochs=2",
]
"""configs/sim-demo.yaml before issue 16: 5 hospitals of unequal size, 2 local epochs each, on 2 actor slots."""


def _one_simulation(config: Path, overrides: list[str], out_dir: Path, quick: bool) -> tuple[dict, dict]:
    shutil.rmtree(out_dir, ignore_errors=True)
    proc = run_simulation_process(config, overrides, out_dir, timeout_s=600 if quick else 1800)
    if proc["rc"] != 0:
        raise RuntimeError(f"the simulation failed (exit {proc['rc']}); log {proc['log']}:\n"
                           + "\n".join(proc["log_tail"]))
    run = read_run(out_dir)
    _drop_client_state(out_dir)
    return proc, run


def run_simulation_suite(opts: dict[str, Any]) -> dict[str, Any]:
    """sim-demo as shipped, and (unless quick) the previous behaviour in the same run: the baseline of the ratio."""
    problem = _check_federation()
    if problem:
        print(f"simulation suite skipped: {problem}")
        return {"skipped": problem, "targets": [target("simulation overhead share of round wall time", None,
                                                       0.15, "<=")]}
    config, work, temporary = _prepare(opts, "simulation")
    # round 1 = warm-up (actor start-up); the steady state is the median of the later rounds, which include the
    # evaluated / persisted ones in their real proportion; more with --set federation.num_rounds=N
    rounds = 2 if opts["quick"] else 6
    overrides = [f"federation.num_rounds={rounds}", *opts.get("overrides", [])]  # a user --set wins (last)
    out_dir = work / "run"
    baseline = None
    try:
        if not opts["quick"]:  # previous behaviour first, so both see the same machine minutes apart
            shape = PREVIOUS_SIM_DEMO_SHAPE if config.name == "sim-demo.yaml" else []
            changed = opts.get("baseline_overrides")  # --baseline-set: one setting against the shipped config
            base_overrides = ([f"federation.num_rounds={rounds}", *shape, *PREVIOUS_BEHAVIOUR, *opts.get("overrides", [])]
                              if changed is None else [*overrides, *changed])
            base_proc, base_run = _one_simulation(config, base_overrides, work / "previous", quick=False)
            baseline = {"overrides": base_overrides, "process": base_proc, **base_run}
        proc, run = _one_simulation(config, overrides, out_dir, opts["quick"])
        breakdown = client_overhead_breakdown(config, overrides, repeats=2 if opts["quick"] else 3)
    except BaseException:
        if temporary and not opts.get("keep_runs"):
            shutil.rmtree(work, ignore_errors=True)
        raise
    startup = proc["wall_s"] - sum(r["round_s"] or 0.0 for r in run["rounds"])
    result = {
        "what": (f"`fopro-kd simulate --config {config.name}` with {' '.join(overrides)} in a child process; rounds "
                 f"from its run directory; steady state = median of rounds {run['steady_rounds']} (round 1 = warm-up); "
                 "outside-training share = 1 - (sum of client train-seconds / parallel slots) / round wall time, "
                 "as the server computes it"),
        "config": str(config), "overrides": overrides, "process": proc, **run,
        "startup_and_shutdown_s": startup, "client_overhead": breakdown,
        "kept_run_dir": str(out_dir), "previous_behaviour": baseline,
    }
    result["targets"] = [target("simulation overhead share of round wall time (steady rounds)",
                                run["outside_training_share_median"], 0.15, "<=")]
    if baseline is not None and baseline["round_s_median"] and run["round_s_median"]:
        result["previous_vs_now"] = {
            "outside_training_share": [baseline["outside_training_share_median"], run["outside_training_share_median"]],
            "round_s": [baseline["round_s_median"], run["round_s_median"]],
            "client_train_s_sum": [baseline["client_train_s_sum_median"], run["client_train_s_sum_median"]],
            "process_wall_s": [baseline["process"]["wall_s"], proc["wall_s"]],
            "peak_tree_pss_mb": [baseline["process"]["peak_tree_pss_mb"], proc["peak_tree_pss_mb"]],
            "peak_memory_mb": [baseline["process"]["peak_memory_mb"], proc["peak_memory_mb"]],
        }
    # the run directory is kept for `comm` (the global model); it is removed by bench.main afterwards
    result["_cleanup"] = str(work) if temporary and not opts.get("keep_runs") else None
    return result


def run_scaling(opts: dict[str, Any]) -> dict[str, Any]:
    problem = _check_federation()
    if problem:
        print(f"scaling suite skipped: {problem}")
        return {"skipped": problem, "targets": [target("peak memory 64 vs 4 hospitals", None, 2.0, "<", "x")]}
    config, work, temporary = _prepare(opts, "scaling")
    # 4 and 64 (the target); --hospitals 4 16 64 adds the middle of the curve (+65 s on 2 cores)
    counts = opts.get("hospitals") or ([2, 4] if opts["quick"] else [4, 64])
    rows = []
    try:
        for n in counts:
            overrides = [
                f"federation.num_clients={n}", f"federation.min_available_clients={n}",
                "federation.partition.kind=iid", "federation.partition.min_per_site=1",
                f"federation.num_rounds={2}",
                # memory per hospital as in deployment: no state kept in the driver (docs/performance.md, issue 16)
                "federation.state_persist_every=1", "federation.local_steps=null",
                *([] if opts["quick"] else ["federation.local_epochs=1"]),
                *opts.get("overrides", []),
            ]
            out_dir = work / f"hospitals-{n}"
            shutil.rmtree(out_dir, ignore_errors=True)
            proc = run_simulation_process(config, overrides, out_dir, timeout_s=600 if opts["quick"] else 1500)
            if proc["rc"] != 0:
                raise RuntimeError(f"the simulation with {n} hospitals failed (exit {proc['rc']}); log "
                                   f"{proc['log']}:\n" + "\n".join(proc["log_tail"]))
            run = read_run(out_dir)
            _drop_client_state(out_dir)
            rows.append({
                "hospitals": n, "round_s_median": run["round_s_median"], "first_round_s": run["first_round_s"],
                "outside_training_share": run["outside_training_share_median"],
                "client_train_s_sum": run["client_train_s_sum_median"], "wall_s": proc["wall_s"],
                "peak_tree_pss_mb": proc["peak_tree_pss_mb"], "peak_tree_rss_mb": proc["peak_tree_rss_mb"],
                "peak_memory_mb": proc["peak_memory_mb"], "peak_shared_state_mb": proc["peak_shared_state_mb"],
                "peak_single_process_rss_mb": proc["peak_single_process_rss_mb"],
                "ru_maxrss_children_mb": proc["ru_maxrss_children_mb"], "peak_driver_rss_mb": proc["peak_driver_rss_mb"],
                "max_processes": proc["max_processes"], "overrides": overrides,
            })
            logger.info("scaling %d hospitals: %.1f s/round, peak PSS %.0f MB", n, run["round_s_median"] or -1,
                        proc["peak_tree_pss_mb"])
    finally:
        if temporary and not opts.get("keep_runs"):
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = rows[0], rows[-1]
    ratio_pss = hi["peak_memory_mb"] / lo["peak_memory_mb"] if lo["peak_memory_mb"] else None
    ratio_rss = hi["peak_tree_rss_mb"] / lo["peak_tree_rss_mb"] if lo["peak_tree_rss_mb"] else None
    for r in rows:
        r["memory_vs_first"] = r["peak_memory_mb"] / lo["peak_memory_mb"] if lo["peak_memory_mb"] else None
        r["round_s_vs_first"] = (r["round_s_median"] / lo["round_s_median"]
                                 if lo["round_s_median"] and r["round_s_median"] else None)
    return {
        "what": (f"the same data ({config.name}, iid split) over {counts} virtual hospitals, 2 rounds each in a child "
                 "process; round time = round 2; memory = peak of the summed PSS (and RSS) of the simulation's whole "
                 "process tree, polled every 0.5 s from /proc"),
        "config": str(config), "rows": rows,
        "targets": [
            target(f"peak memory (tree PSS + kept states) {hi['hospitals']} vs {lo['hospitals']} hospitals", ratio_pss,
                   2.0, "<", "x"),
            target(f"peak memory (tree RSS) {hi['hospitals']} vs {lo['hospitals']} hospitals", ratio_rss, 2.0, "<", "x",
                   note="RSS counts shared pages once per process"),
        ],
    }


def render_simulation(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return result["skipped"]
    rounds = format_table(result["rounds"], ["round", "round_s", "outside_training_share", "client_train_s_sum",
                                             "client_train_s_max", "server_eval_s", "clients", "bytes_up_per_client",
                                             "test_balanced_accuracy"])
    proc = result["process"]
    over = result["client_overhead"]
    lines = [
        result["what"], "", rounds, "",
        f"steady state: {result['round_s_median']:.1f} s/round, outside client training "
        f"{100 * (result['outside_training_share_median'] or 0):.1f}% ; process wall {proc['wall_s']:.1f} s "
        f"(start-up + shut-down {result['startup_and_shutdown_s']:.1f} s), peak memory {proc['peak_memory_mb']:.0f} MB "
        f"(tree PSS {proc['peak_tree_pss_mb']:.0f} MB + kept states in shared memory up to "
        f"{proc['peak_shared_state_mb']:.0f} MB)",
        "",
        f"per-client, per-round work besides training (site 0, in-process medians; state file "
        f"{over['client_state_file_mb']:.1f} MB, model {over['model_mb']:.1f} MB):",
        format_table([{"piece": k, "seconds": v} for k, v in over["median_s"].items()]),
        f"sum outside training per client call pair: {over['overhead_per_client_round_s']:.2f} s with the state file "
        f"and model building of every round (before issue 16), {over['overhead_per_client_round_now_s']:.2f} s with the "
        "state in memory, the file every state_persist_every rounds and the models reused",
    ]
    pair = result.get("previous_vs_now")
    if pair:
        lines += ["", "previous behaviour (" + " ".join(result["previous_behaviour"]["overrides"]) + ") vs now:",
                  format_table([{"figure": k, "previous": v[0], "now": v[1],
                                 "now / previous": (v[1] / v[0]) if v[0] else None} for k, v in pair.items()])]
    return "\n".join(lines)


def render_scaling(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return result["skipped"]
    return result["what"] + "\n\n" + format_table(result["rows"], [
        "hospitals", "round_s_median", "round_s_vs_first", "first_round_s", "outside_training_share", "wall_s",
        "peak_memory_mb", "memory_vs_first", "peak_tree_pss_mb", "peak_shared_state_mb", "peak_tree_rss_mb",
        "peak_driver_rss_mb", "peak_single_process_rss_mb", "max_processes"])
