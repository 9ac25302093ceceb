"""fopro-kd ClientApp: unpack a Message, call the library's LocalTrainer, pack the reply.

One hospital per node. The node finds its data from its node config (``data-root``,
``site-id``, or ``partition-id``/``num-partitions`` in simulation; see
:mod:`fopro_kd.federation.sites`), trains the student it receives with FoPro-KD (FPG + EKD + optional
AKD) using :class:`~fopro_kd.training.trainer.LocalTrainer`, and replies with

* ``"arrays"``: the student's ``state_dict`` only (the teacher and the prompt stay here);
* ``"metrics"``: plain ints/floats with the **same keys at every site** (Flower rejects
  inconsistent replies): ``num-examples`` (local training images, the FedAvg weight),
  ``examples-seen``, ``num-steps``, ``train-seconds``, ``site-id``, ``train-loss`` and the
  configured loss terms (``loss-cls``, ``loss-rep``, ...), plus what the strategy needs:
  ``robust-factor`` (FedMAS) and ``class-counts`` (when class counts are shared).

With ``privacy.mode: local`` (docs/privacy.md §4) the reply carries only what the DP
guarantee covers: the DP-SGD-trained student, ``num-examples`` = the total of the class
counts released by the Gaussian mechanism (1 with ``privacy.statistics: withheld``: uniform
weights), ``num-steps``, ``train-seconds``, ``site-id``, the noised ``class-counts`` /
``robust-factor`` when the strategy needs them (``robust-factor`` 0.0 = withheld, the server
falls back to FedAvg weights) and the ``dp-*`` accounting metrics; no losses, no
``examples-seen``. A site whose next round would exceed ``privacy.target_epsilon`` declines
with a *budget-decline reply* (:func:`decline_reply`) instead of training. In any DP mode the
evaluate handler refuses (federated evaluation is disabled: per-class test counts are outside
the guarantee).

State that must survive between rounds (optimizer, prompt, probe, RNG, class counts) is
kept in a private per-site directory (:mod:`client.state`) and never leaves the node. Under
local DP the privacy spent is kept apart, in the site's append-only privacy ledger at the
state root (:mod:`fopro_kd.privacy.ledger`, docs/privacy.md §2.4): it is opened fail-closed
before anything is built, it replaces the DP history of whatever state was loaded, a round
number that does not increase over its last charged round is refused (error reply naming the
round), and every round is charged to it on disk before the reply is built.

Two ways to get the configuration:

* :func:`make_client_app` closes over a :class:`~fopro_kd.config.Config` (simulation, tests);
* the module-level ``app`` (``flwr run`` / deployment) reads ``config-file`` and
  ``overrides`` from the run config.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fopro_kd.models.weights import default_offline_hub

default_offline_hub()  # before the Hub can be used: hospitals have no Hub access (its docstring)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.model_cache import reusable_module  # noqa: E402
from client.strategy_hooks import RoundInputs, client_hook  # noqa: E402
from client.state import (  # noqa: E402
    ClientState,
    ClientStateStore,
    check_state_key,
    default_state_root,
    site_has_state,
)
from fopro_kd.compression import encode_for_transfer, restore_torch_dtypes  # noqa: E402
from fopro_kd.config import Config  # noqa: E402
from fopro_kd.federation.errors import redact_error_reason  # noqa: E402
from fopro_kd.federation.evaluation import build_global_student, class_correct_counts  # noqa: E402
from fopro_kd.federation.sites import (  # noqa: E402
    SiteData,
    SiteDataError,
    SiteSpec,
    config_from_run_config,
    load_site_data,
    site_spec_from_node_config,
)
from fopro_kd.federation.strategies import needs_class_counts  # noqa: E402
from fopro_kd.federation.wire import (  # noqa: E402
    CLASS_COUNTS_KEY,
    CORRECT_COUNTS_KEY,
    DECLINE_RECORD_KEY,
    DP_BUDGET_MARKER,
    DP_DECLINE_KEY,
    POLICY_FILE_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    PROMPT_ARRAYS_KEY,
    REPLY_SITE_ID_KEY,
    ROBUST_FACTOR_KEY,
    SCORED_ROUND_KEY,
    SITE_ID_KEY,
    STATE_DIR_KEY,
    TOTAL_COUNTS_KEY,
    InstructionError,
    TrainInstruction,
    site_name,
)
from fopro_kd.prompt_objectives import objective_metric_key  # noqa: E402
from fopro_kd.privacy.accounting import PrivacyBudgetExhausted, make_accountant  # noqa: E402
from fopro_kd.privacy.ledger import (  # noqa: E402
    PrivacyLedger,
    PrivacyLedgerStore,
    events_since,
    fresh_start_requested,
)
from fopro_kd.privacy.statistics import statistics_event  # noqa: E402
from fopro_kd.round_schedule import persists_round  # noqa: E402
from fopro_kd.run_plan import local_schedule, resolve_run_plan  # noqa: E402
from fopro_kd.seeding import select_device, site_seed  # noqa: E402
from fopro_kd.site_policy import SitePolicyError, SitePolicyViolation, check_site_policy, load_site_policy  # noqa: E402
from fopro_kd.training.components import (  # noqa: E402
    build_configured_prompt,
    build_federated_student,
    shared_teacher,
)
from fopro_kd.training.results import EpochResult  # noqa: E402
from fopro_kd.training.trainer import LocalTrainer  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "SiteSkipped",
    "app",
    "decline_reply",
    "dp_statistics_events",
    "handle_evaluate",
    "handle_train",
    "make_client_app",
    "shares_class_counts",
]

CONTEXT_STATE_KEY = "fopro-kd-client"

FaultInjector = Callable[[str, Message, Context, Callable[[], Message]], Message]
"""TEST-ONLY hook type: ``injector(kind, msg, context, handler) -> reply`` (see :func:`make_client_app`)."""


class SiteSkipped(RuntimeError):
    """This site cannot take part in the round (e.g. an empty partition); the reason is logged and sent as an error."""


# --------------------------------------------------------------------------- config-derived choices


def shares_class_counts(cfg: Config) -> bool:
    """``federation.share_class_counts``, where None means "only if the strategy needs them"."""
    if cfg.federation.share_class_counts is not None:
        return bool(cfg.federation.share_class_counts)
    return needs_class_counts(cfg.federation.strategy)


def loss_metric_keys(cfg: Config) -> list[str]:
    """Loss terms every site reports (same list everywhere; absent terms are sent as 0.0)."""
    keys: list[str] = []  # the total is sent as "train-loss"
    plan = resolve_run_plan(cfg)
    if plan.uses_teacher:
        keys += ["loss_cls", "loss_aux", "loss_rep"]
    keys += list(client_hook(cfg.federation.strategy).loss_terms)  # e.g. FedProx's loss_prox
    if plan.akd_mode != "off":
        keys += [objective_metric_key(plan.akd_mode), "prompt_reg"]
    return keys


def _configure_threads(cfg: Config) -> None:
    threads = cfg.federation.client_num_threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------- helpers


def _checked_spec(context: Context, cfg: Config, kind: str) -> SiteSpec:
    """The node's site, after its site policy (node config ``policy-file``) allowed the instruction.

    The policy is read and checked before any image is read: a run that breaks it gets an
    error reply naming the rule (:class:`~fopro_kd.site_policy.SitePolicyViolation`), and an
    unreadable policy file refuses every instruction (fail closed).
    """
    spec = site_spec_from_node_config(context.node_config, context.node_id)
    try:
        _check_policy(context, cfg, spec, kind)
    except (SitePolicyError, SitePolicyViolation) as exc:
        raise SiteSkipped(f"{spec.node}: {exc}") from exc
    return spec


def _check_policy(context: Context, cfg: Config, spec: SiteSpec, kind: str) -> None:
    """Raise when the node's site policy (if it names one) forbids answering a ``kind`` instruction of this run."""
    policy_file = context.node_config.get(POLICY_FILE_KEY)
    if policy_file not in (None, ""):
        check_site_policy(cfg, load_site_policy(str(policy_file)), kind=kind,
                          shares_class_counts=shares_class_counts(cfg), data_root=spec.data_root)


def _state_root(context: Context, state_root: Path | None) -> Path:
    """The node's private state root: the app's ``state_root``, node config ``state-dir``, or the user cache."""
    return state_root or Path(str(context.node_config.get(STATE_DIR_KEY) or default_state_root()))


def _state_store(
    context: Context, spec: SiteSpec, state_root: Path | None, state_key: str | None = None,
    memory_state: bool = False, live_root: Path | None = None,
) -> ClientStateStore:
    """The site's state store; ``state_key`` (sent by the server, stable across a resume) names the run folder.

    Without a key (an older server, unit tests) the Flower run id is used, which changes when a
    run is resumed. A key that is not a plain folder name is refused (:func:`check_state_key`).
    ``memory_state`` (simulation): the state is also kept in ``context.state``, or in a file under
    ``live_root`` named by a token there (client/state.py).
    """
    key = f"run-{context.run_id}" if state_key is None else check_state_key(str(state_key), spec.node)
    return ClientStateStore(_state_root(context, state_root), key, spec.site_id,
                            memory=context.state if memory_state else None,
                            live_root=live_root if memory_state else None)


def _open_ledger(context: Context, spec: SiteSpec, root: Path) -> tuple[PrivacyLedgerStore, PrivacyLedger]:
    """The site's privacy ledger (``privacy.mode: local``), opened fail-closed (docs/privacy.md §2.4).

    It lives at the state root, not under the server-chosen state key, so neither a replayed
    round, ``server-round = 1`` nor a new ``state-key`` reaches a fresh accountant. A missing
    ledger on a site with client state here, or an unreadable one, raises
    :class:`PrivacyLedgerError` (the error reply) unless node config
    ``privacy-ledger-fresh-start`` is true.
    """
    store = PrivacyLedgerStore(root, spec.site_id)
    ledger = store.open(trained_before=site_has_state(root, spec.site_id),
                        fresh_start=fresh_start_requested(context.node_config))
    return store, ledger


def _use_ledger(trainer: LocalTrainer, ledger: PrivacyLedger, run_key: str) -> None:
    """Make the ledger the trainer's accountant: its history and this federation's released class counts.

    Whatever DP state came with the (possibly older, possibly fresh) client state is replaced,
    so the budget check, the noise plan and ``dp-epsilon`` all see every release ever charged.
    """
    dp = trainer.dp
    dp.load_state_dict({"history": ledger.history(), "mechanism": dp.mechanism,
                        "class_counts": ledger.class_counts(run_key)})


def _global_state(msg: Message, spec: SiteSpec) -> dict[str, torch.Tensor]:
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise ValueError(f"{spec.node}: the instruction carries no ArrayRecord 'arrays' (the global student)")
    return arrays.to_torch_state_dict()


def _load_student(student: torch.nn.Module, state: dict[str, torch.Tensor], spec: SiteSpec, transfer_dtype: str) -> None:
    """Load the received global student, restoring float16 / bfloat16 transfer to the model's dtypes."""
    state = restore_torch_dtypes(state, student.state_dict(), transfer_dtype)
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{spec.node}: the global model does not fit this site's student ({exc}); check that every node "
            "runs the same config (student.arch, teacher.arch, data.num_classes)"
        ) from exc


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def dp_statistics_events(cfg: Config) -> list[tuple[float, float, int]]:
    """Statistics releases of one round besides DP-SGD (the strategy's hook: FedMAS' prior and state when noised)."""
    return [statistics_event(cfg)] * client_hook(cfg.federation.strategy).statistics_releases(cfg)


def _dp_train_metrics(
    cfg: Config, spec: SiteSpec, trainer: LocalTrainer, result: EpochResult, train_seconds: float,
    strategy_metrics: dict[str, Any],
) -> MetricRecord:
    """``privacy.mode: local``: only values covered by the DP guarantee (or public), see the module docstring."""
    dp = trainer.dp
    counts = dp.shared_class_counts()  # released once by the Gaussian mechanism (accounted); None when withheld
    num_examples = 1 if counts is None else max(1, int(round(float(np.sum(counts)))))
    metrics: dict[str, Any] = {
        NUM_EXAMPLES_KEY: num_examples,
        "num-steps": int(result.num_steps),
        "train-seconds": float(train_seconds),
        REPLY_SITE_ID_KEY: int(spec.site_id),
    }
    metrics.update(strategy_metrics)  # the hook's values: released statistics only (FedMAS: noised or 0.0)
    if shares_class_counts(cfg) and counts is not None:
        metrics[CLASS_COUNTS_KEY] = [max(0, int(round(c))) for c in counts]  # post-processing of the release
    metrics.update(dp.metrics())  # after every release of the round: epsilon spent so far
    return MetricRecord(metrics)


def _train_metrics(
    cfg: Config, spec: SiteSpec, data: SiteData, result: EpochResult, train_seconds: float,
    strategy_metrics: dict[str, Any],
) -> MetricRecord:
    metrics: dict[str, Any] = {
        NUM_EXAMPLES_KEY: int(len(data.train)),
        "examples-seen": int(result.num_examples),
        "num-steps": int(result.num_steps),
        "train-seconds": float(train_seconds),
        REPLY_SITE_ID_KEY: int(spec.site_id),
        "train-loss": float(result.losses.get("loss", 0.0)),
    }
    for key in loss_metric_keys(cfg):
        metrics[key.replace("_", "-")] = float(result.losses.get(key, 0.0))
    metrics.update(strategy_metrics)
    if shares_class_counts(cfg):
        metrics[CLASS_COUNTS_KEY] = [int(c) for c in data.class_counts()]
    return MetricRecord(metrics)


def decline_reply(msg: Message, spec: SiteSpec, context: Context, trainer: LocalTrainer, reason: str) -> Message:
    """The reply of a site out of privacy budget: no model, its ε so far, and the reason (logged by the server).

    Metrics ``site-id``, ``dp-budget-exhausted`` = 1 and ``trainer.dp.metrics()``; the reason in
    ``ConfigRecord "decline"``. :class:`server.rounds.RoundGuard` takes such replies out of the
    round before the strategy sees them (neither a failure nor a rejection).
    """
    text = f"{spec.node}: {DP_BUDGET_MARKER}: {reason}"
    logger.warning("%s", text)
    metrics = MetricRecord({REPLY_SITE_ID_KEY: int(spec.site_id), DP_DECLINE_KEY: 1, **trainer.dp.metrics()})
    content = RecordDict({"metrics": metrics, DECLINE_RECORD_KEY: ConfigRecord({"reason": text})})
    return Message(content=content, reply_to=msg)


def _free_dp_buffers(trainer: LocalTrainer) -> None:
    """Drop Opacus' per-sample gradients (B × #params floats) and the trainer's reference cycles now.

    After the last DP-SGD step every student parameter still holds ``grad_sample`` /
    ``summed_grad`` and the DP optimizers hold the parameters; without dropping them and an
    explicit collection a simulation actor that serves several sites keeps gigabytes alive
    (a Ray actor reached 7.7 GB on configs/sim-demo-dp.yaml and was killed for memory).
    """
    for module in (trainer.student, trainer.prompt, trainer.probe):
        if module is None:
            continue
        for param in module.parameters():
            param.grad = None
            for name in ("grad_sample", "summed_grad"):
                if getattr(param, name, None) is not None:
                    setattr(param, name, None)
    trainer.dp.optimizer = trainer.dp.prompt_optimizer = None
    gc.collect()


def _remember_in_context(context: Context, state: ClientState, digest: str | None) -> None:
    """A summary of what the site remembers; ``state-sha256`` is empty for a round kept only in memory."""
    context.state[CONTEXT_STATE_KEY] = ConfigRecord({
        "site-id": int(state.site_id),
        "rounds-trained": int(state.rounds_trained),
        "last-round": int(state.last_round),
        "state-sha256": digest or "",
    })


# --------------------------------------------------------------------------- handlers


def _use_federated_prompt(msg: Message, instruction: TrainInstruction, cfg: Config, trainer: LocalTrainer) -> bool:
    """``prompt.scope: federated``: load the server's prompt over the site's own and follow the server's
    exploration flag (fopro_kd/federated_prompt.py); returns whether this round explores."""
    if cfg.prompt.scope != "federated" or trainer.prompt is None:
        return False
    exploring = instruction.prompt_explore
    trainer.explore_override = exploring
    shared = msg.content.array_records.get(PROMPT_ARRAYS_KEY)
    if shared is not None:
        trainer.prompt.load_state_dict({k: v.float() for k, v in shared.to_torch_state_dict().items()})
    return exploring


def handle_train(
    msg: Message, context: Context, cfg: Config, state_root: Path | None = None, memory_state: bool = False,
    live_root: Path | None = None,
) -> Message:
    """Local FoPro-KD training on the received global student; reply with its weights and metrics.

    ``memory_state`` (simulation only): keep the site's state in ``context.state`` (or, with
    ``live_root``, in a shared-memory file it names) and write it to disk only in the rounds of
    :func:`fopro_kd.round_schedule.persists_round`.
    """
    _configure_threads(cfg)
    spec = _checked_spec(context, cfg, "train")
    # the teacher before the data: a missing or mismatched teacher file fails before any image is decoded
    torch.manual_seed(int(cfg.seed))  # a random test teacher ('teacher.source: none') is then the same everywhere
    teacher = shared_teacher(cfg)
    data = load_site_data(cfg, spec)
    if len(data.train) == 0:
        reason = f"{spec.node}: skipped: its partition has no training images"
        logger.warning(reason)
        raise SiteSkipped(reason)
    present = int((data.class_counts() > 0).sum())
    if present == 1:
        logger.warning("%s: only one class in its training data (%s); training anyway", spec.node,
                       data.class_names[int(np.argmax(data.class_counts()))])
    try:  # the server's values, typed once here (fopro_kd/federation/wire.py)
        instruction = TrainInstruction.from_config(msg.content.config_records.get("config", ConfigRecord()))
    except InstructionError as exc:
        raise InstructionError(f"{spec.node}: refused the round: {exc}") from exc
    server_round = instruction.server_round
    device = select_device(cfg.device)
    num_classes = data.train.num_classes
    student = reusable_module(  # built once per process; the global arrays (every key) are loaded next
        cfg, num_classes, "train",
        lambda: build_federated_student(cfg, num_classes, None if teacher is None else teacher.feature_dim,
                                        load_weights=False))
    # seeded after the student, which may or may not have been built here: the same prompt / probe init either way
    torch.manual_seed(site_seed(cfg.seed, spec.site_id))
    prompt = build_configured_prompt(cfg, teacher)
    _load_student(student, _global_state(msg, spec), spec, cfg.federation.transfer_dtype)
    scores = _score_received(student, instruction, cfg, spec, data, device, context)  # before training changes it
    hook = client_hook(cfg.federation.strategy)  # the strategy's site side (client/strategy_hooks.py)

    state_key = instruction.state_key
    root = _state_root(context, state_root)
    store = _state_store(context, spec, root, None if state_key is None else str(state_key), memory_state, live_root)
    persist = not memory_state or persists_round(cfg, server_round)
    ledger_store = ledger = None
    if resolve_run_plan(cfg).local_dp:  # before anything is built: a site that cannot account does not train
        ledger_store, ledger = _open_ledger(context, spec, root)
    state = store.load(before_round=server_round if server_round > 0 else None)
    trainer = LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), device)
    if state.trainer is not None:
        trainer.load_state_dict(state.trainer)
    exploring_shared_prompt = _use_federated_prompt(msg, instruction, cfg, trainer)

    dp = trainer.dp  # privacy.mode local: DP-SGD state; its accountant is the ledger's, never the state's
    epochs, max_steps = local_schedule(cfg, len(data.train))
    charged: list[tuple[float, float, int]] = []
    if dp is not None:
        assert ledger is not None and ledger_store is not None
        _use_ledger(trainer, ledger, store.run_key)
        charged = ledger.history()
        reason = dp.check_budget(len(data.train), epochs, max_steps, extra_events=dp_statistics_events(cfg))
        if reason is not None:  # whatever the round number: nothing spent, nothing saved
            return decline_reply(msg, spec, context, trainer, reason)
        ledger.check_round(store.run_key, server_round)  # a replayed / reset round: error reply naming it

    def charge() -> None:
        """Write this round's releases to the ledger (fsync'ed) before anything of it leaves the site."""
        nonlocal ledger
        spent = events_since(charged, dp.accountant.history)
        ledger = ledger_store.charge(store.run_key, server_round, spent, class_counts=dp.released_counts,
                                     delta=dp.delta, mechanism=dp.mechanism)
        dp.accountant = make_accountant(dp.mechanism, {"history": ledger.history(), "mechanism": dp.mechanism})

    inputs = RoundInputs(cfg=cfg, instruction=instruction, student=student, teacher=teacher, prompt=prompt,
                         data=data, device=device, dp=dp, node=spec.node, server_round=server_round)
    try:
        extra = hook.before_train(inputs)  # e.g. FedProx's anchor, FedMAS's prior (a DP release when noised)
        start = time.perf_counter()
        result = trainer.train(
            data.train, epochs=epochs, max_steps=max_steps, total_epochs=cfg.federation.num_rounds * epochs, **extra,
        )
        train_seconds = time.perf_counter() - start
        if dp is not None:
            dp.shared_class_counts()  # a first class-count release not made in training (no class prior) is charged too
    except PrivacyBudgetExhausted as exc:
        # the pre-check makes this unreachable; if a release still does not fit, charge what was spent, then decline
        if dp is None:
            raise
        charge()
        state.trainer = trainer.state_dict()
        state.last_round = server_round
        _remember_in_context(context, state, store.save(state))
        return decline_reply(msg, spec, context, trainer, str(exc))
    except Exception:
        if dp is not None:  # nothing leaves the site, but whatever was drawn stays charged
            try:
                charge()
            except Exception:  # the original failure is the reply; the ledger's own error is logged
                logger.exception("%s round %d: could not charge the releases of a failed round", spec.node,
                                 server_round)
        raise
    if dp is not None:
        charge()  # before the metrics (dp-epsilon from the ledger) and before the reply is built
        if dp.target_epsilon is not None and dp.epsilon() > dp.target_epsilon * (1 + 1e-9):
            # only when another federation of this hospital charged the same ledger meanwhile: withhold the result
            state.trainer = trainer.state_dict()
            state.last_round = server_round
            _remember_in_context(context, state, store.save(state))
            return decline_reply(msg, spec, context, trainer, (
                f"privacy budget exhausted: after charging round {server_round} the ledger holds epsilon "
                f"{dp.epsilon():.4f} > target {dp.target_epsilon:g} (another federation of this hospital spent "
                "meanwhile); the round's result is withheld"))
    strategy_metrics = hook.reply_metrics(inputs, result)
    rho = strategy_metrics.get(ROBUST_FACTOR_KEY)
    metrics = (_train_metrics(cfg, spec, data, result, train_seconds, strategy_metrics) if dp is None
               else _dp_train_metrics(cfg, spec, trainer, result, train_seconds, strategy_metrics))
    state.trainer = trainer.state_dict()  # in DP mode: the accountant history of every release so far
    state.class_counts = data.class_counts()
    state.rounds_trained += 1
    state.last_round = server_round
    digest = store.save(state, persist=persist)
    _remember_in_context(context, state, digest)
    logger.info("%s round %d: %d images, loss %.4f, %.1f s%s%s", spec.node, server_round, result.num_examples,
                result.losses.get("loss", float("nan")), train_seconds,
                "" if rho is None else f", robust factor {rho:.4f}",
                "" if dp is None else f", epsilon {metrics['dp-epsilon']:.4f} (delta {dp.delta:g})")
    metrics.update(scores)
    content = RecordDict({
        "arrays": ArrayRecord(encode_for_transfer(_cpu_state(student), cfg.federation.transfer_dtype)),
        "metrics": metrics,
    })
    if exploring_shared_prompt and prompt is not None:  # prompt.scope federated: the server averages it
        content[PROMPT_ARRAYS_KEY] = ArrayRecord(_cpu_state(prompt))
    if dp is not None:
        _free_dp_buffers(trainer)
    return Message(content=content, reply_to=msg)


def _local_test_counts(student: torch.nn.Module, data: SiteData, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Per-class correct / total of ``student`` on the site's local test split (what federated evaluation sends).

    The global random-number state is restored afterwards, so that scoring inside a train call
    (``federation.evaluate_in_train``) leaves the round's training exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        correct, total = class_correct_counts(student.to(device), data.local_test, cfg, device)
    return {CORRECT_COUNTS_KEY: correct, TOTAL_COUNTS_KEY: total}


def _score_received(
    student: torch.nn.Module, instruction: TrainInstruction, cfg: Config, spec: SiteSpec, data: SiteData,
    device: torch.device, context: Context,
) -> dict[str, Any]:
    """``federation.evaluate_in_train``: the received global model's local test counts, for the train reply.

    Only when the server asked (``score-round``), never in DP mode (the counts are computed from
    private test images without noise) and never against the site's policy (``federated_evaluation:
    false``): the rules of :func:`handle_evaluate`, which would refuse an evaluate instruction;
    here the site still trains and only the counts stay home.
    """
    if instruction.score_round is None:
        return {}
    refusal = None
    if resolve_run_plan(cfg).any_dp:
        refusal = f"privacy.mode {cfg.privacy.mode!r}: they are outside the DP guarantee"
    else:
        try:
            _check_policy(context, cfg, spec, "evaluate")
        except (SitePolicyError, SitePolicyViolation) as exc:
            refusal = str(exc)
    if refusal is not None:
        logger.warning("%s round %d: the server asked for evaluation counts of round %d; not sent (%s)", spec.node,
                       instruction.server_round, instruction.score_round, refusal)
        return {}
    return {**_local_test_counts(student, data, cfg, device), SCORED_ROUND_KEY: int(instruction.score_round)}


def handle_evaluate(msg: Message, context: Context, cfg: Config) -> Message:
    """Score the global student on this site's local test split: per-class correct / total counts.

    Refused in DP mode (``privacy.mode`` not ``off``): the counts are computed from private test
    images without noise, so they are outside the guarantee; the server disables federated
    evaluation then, and a site asked anyway (a misconfigured server) replies with an error.
    """
    _configure_threads(cfg)
    if resolve_run_plan(cfg).any_dp:
        raise SiteSkipped(
            f"privacy.mode is {cfg.privacy.mode!r}: this site does not send evaluation counts (per-class correct/total "
            "on its local test split are outside the DP guarantee); federated evaluation is disabled in DP mode"
        )
    spec = _checked_spec(context, cfg, "evaluate")
    data = load_site_data(cfg, spec)
    device = select_device(cfg.device)
    num_classes = data.train.num_classes
    student = reusable_module(cfg, num_classes, "evaluate",
                              lambda: build_global_student(cfg, num_classes, load_weights=False))
    _load_student(student, _global_state(msg, spec), spec, cfg.federation.transfer_dtype)
    counts = _local_test_counts(student, data, cfg, device)
    correct, total = counts[CORRECT_COUNTS_KEY], counts[TOTAL_COUNTS_KEY]
    n = int(sum(total))
    recalls = [c / t for c, t in zip(correct, total) if t > 0]
    metrics = MetricRecord({
        NUM_EXAMPLES_KEY: n,
        REPLY_SITE_ID_KEY: int(spec.site_id),
        **counts,
        "accuracy": float(sum(correct) / n) if n else 0.0,
        "balanced-accuracy": float(np.mean(recalls)) if recalls else 0.0,
    })
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# --------------------------------------------------------------------------- apps


def _with_node_context(fn: Callable[[], Message], context: Context) -> Message:
    """Run a handler; re-raise failures with the node and site in the message (it becomes the error reply).

    The full error (traceback, local paths) is logged here, on the site; what is raised, and so
    sent to the server, is passed through :func:`fopro_kd.federation.errors.redact_error_reason`: no
    traceback, every absolute path replaced by ``<path>`` (issue 14).
    """
    try:
        return fn()
    except (SiteSkipped, SiteDataError) as exc:
        redacted = redact_error_reason(str(exc))
        if redacted != str(exc):
            logger.error("node %s: %s", context.node_id, exc)  # the unredacted message stays on the site
            exc.args = (redacted,)
        raise
    except Exception as exc:
        where = f"node {context.node_id}"
        pid = context.node_config.get(PARTITION_ID_KEY, context.node_config.get(SITE_ID_KEY))
        if pid is not None:
            where += f" ({site_name(int(pid))})"
        logger.exception("%s: client handler failed", where)
        raise RuntimeError(redact_error_reason(f"{where}: {type(exc).__name__}: {exc}")) from exc


def make_client_app(
    cfg: Config | None = None,
    state_root: str | Path | None = None,
    fault_injector: FaultInjector | None = None,
    memory_state: bool = False,
    live_root: str | Path | None = None,
) -> ClientApp:
    """A ClientApp bound to ``cfg`` (or reading the run config when None).

    Parameters
    ----------
    cfg : Config, optional
        The full run configuration; None reads ``config-file`` / ``overrides`` from the run config.
    state_root : path, optional
        Private folder for per-site state; None uses node config ``state-dir`` or the user cache.
    fault_injector : callable, optional
        **TEST-ONLY hook** (``tests/test_faults.py``): called as
        ``fault_injector(kind, msg, context, handler)`` with ``kind`` ``"train"`` or
        ``"evaluate"`` and ``handler()`` running the real handler; whatever it returns (or
        raises) is the node's reply. No config key, run-config key or node-config key sets it:
        the deployed ``app`` below never has one, so production code has no fault switches.
    memory_state : bool
        Simulation only (``simulations/simulate.py``): sites keep their state in the engine's
        ``context.state`` and persist it every ``federation.state_persist_every`` rounds. The
        deployed ``app`` persists every round.
    live_root : path, optional
        With ``memory_state``: the simulation's shared-memory folder (:func:`client.state.new_live_root`,
        ``federation.state_memory: node``); each site's state is a file there and ``context.state``
        holds only its token. None keeps the serialised state in ``context.state``.
    """
    app = ClientApp()
    root = Path(state_root) if state_root is not None else None
    live = Path(live_root) if live_root is not None else None

    def resolve(context: Context) -> Config:
        return cfg if cfg is not None else config_from_run_config(context.run_config)

    def run(kind: str, msg: Message, context: Context, handler: Callable[[], Message]) -> Message:
        if fault_injector is None:
            return _with_node_context(handler, context)
        return _with_node_context(lambda: fault_injector(kind, msg, context, handler), context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run("train", msg, context, lambda: handle_train(msg, context, resolve(context), root, memory_state, live))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run("evaluate", msg, context, lambda: handle_evaluate(msg, context, resolve(context)))

    return app


app = make_client_app()
"""The ClientApp of ``flwr run`` / deployment (``[tool.flwr.app.components] clientapp``)."""
