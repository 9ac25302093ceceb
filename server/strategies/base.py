"""Common base of every fopro-kd strategy: validate replies, then take a weighted average.

A strategy variant overrides one hook, :meth:`ValidatedWeightedAvg.client_weights`, and
(when it sends knobs to the clients) :meth:`configure_train`. Everything else is shared:

1. error replies are dropped and logged with their node id;
2. every reply is checked against the global arrays sent this round
   (:func:`server.validation.validate_reply`); invalid ones are dropped with a logged
   reason naming the node and the failed check;
3. with fewer than ``min_valid_replies`` valid replies the round is skipped:
   ``aggregate_train`` returns ``(None, None)`` and Flower keeps the previous global model;
4. the hook's weights are guarded (non-finite or negative weights drop that reply, all-zero
   weights fall back to uniform) and normalised to sum to one;
5. the weighted average is taken in float64 per array and cast back to that array's dtype.

Aggregation rules for the model state (method.md §5 averages "parameters and
normalisation buffers"; §9 item 8 forbids averaging integer buffers):

* floating arrays, BatchNorm ``running_mean`` / ``running_var`` included, are averaged with
  the same weights as the parameters: θ = Σ_k α_k θ_k;
* integer (and boolean) arrays, e.g. BatchNorm ``num_batches_tracked``, are **not**
  averaged: the element-wise maximum over the valid clients is kept, in the original dtype.

Central DP hook (``privacy.mode: central``): when :attr:`ValidatedWeightedAvg.central_dp` is
set (:class:`server.strategies.central_dp.CentralDP`, DP-FedAvg with a fixed denominator,
docs/privacy.md §3):

* ``configure_train`` samples the clients by **Poisson sampling** (each node independently with
  probability q = ``fraction_train``, secret RNG), not Flower's fixed-size sample; a round may
  sample nobody;
* steps 3-5 are replaced: the weights are public (w_k = 1, the hook :meth:`client_weights` is
  not used), the clipped updates are summed and divided by the fixed W = q·N, and the noise is
  calibrated to that estimator's sensitivity. Every round releases a noised model (the noise
  alone when no valid reply came): ``min_valid_replies`` and the all-zero fallback do not apply;
* strategies with their own weight rule (FedMAS, class-balanced: weights from private
  statistics of several clients) are refused when ``central_dp`` is set (a ``ConfigError``
  naming the strategy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fopro_kd.compression import SUPPORTED_DTYPES, encode_for_transfer, restore_numpy_dtypes
from fopro_kd.config import ConfigError
from fopro_kd.federated_prompt import PROMPT_ARRAYS_KEY, PROMPT_EXPLORE_KEY, average_prompts, prompt_problem
from fopro_kd.federation.wire import SCORE_ROUND_KEY, SERVER_ROUND_KEY
from server.validation import NUM_EXAMPLES_KEY, reason_check, to_numpy_dict, validate_arrays, validate_metrics

__all__ = ["ValidatedWeightedAvg", "weighted_mean_metrics"]


def _node_id(msg: Message) -> int:
    return int(msg.metadata.src_node_id)


def _is_plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def weighted_mean_metrics(
    metrics: Sequence[MetricRecord],
    weights: np.ndarray,
    *,
    skip: Iterable[str] = (NUM_EXAMPLES_KEY,),
) -> MetricRecord:
    """Weighted mean of the scalar metrics common to all records (as plain floats).

    Keys missing from any record, list-valued metrics and non-finite values are skipped;
    ``weights`` need not be normalised (all-zero weights give the plain mean).
    """
    if not metrics:
        return MetricRecord()
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(metrics), 1.0 / len(metrics))
    skipped = set(skip)
    common = [k for k in metrics[0].keys() if k not in skipped and all(k in m for m in metrics)]
    out: dict[str, float] = {}
    for key in common:
        values = [m[key] for m in metrics]
        if not all(_is_plain_number(v) for v in values):
            continue
        arr = np.asarray(values, dtype=np.float64)
        if not np.isfinite(arr).all():
            continue
        out[key] = float(np.dot(w, arr))
    return MetricRecord(out)


class ValidatedWeightedAvg(FedAvg):
    """FedAvg with reply validation, guarded weights and dtype-preserving averaging.

    θ^{r+1} = Σ_k α_k θ_k^r with α_k = w_k / Σ_j w_j, where ``w_k`` comes from
    :meth:`client_weights` (default: ``num-examples``, i.e. FedAvg, McMahan et al. 2017).
    See the module docstring for the guards and for the integer-buffer rule.

    Parameters
    ----------
    min_valid_replies : int (default: 1)
        Fewest valid replies needed to aggregate; below it the previous model is kept.
    max_update_norm : float, optional
        Reject replies whose update ‖θ_k − θ^r‖₂ (floating arrays) exceeds this bound.
    transfer_dtype : str (default: ``"float32"``)
        dtype of the floating weights in the messages (``float16`` / ``bfloat16`` halve them);
        the strategy keeps float32 master weights: it compresses what it sends and restores
        each reply before validating and averaging it.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``train_metrics_aggr_fn``, ...).

    Attributes
    ----------
    last_weights : dict[int, float]
        Normalised weight α_k of each aggregated node in the last ``aggregate_train`` call
        (central DP: the coefficient w_k / W of the fixed-denominator estimator, not normalised).
    last_rejections : list[dict]
        Replies dropped in the last call: ``{"round", "node_id", "check", "reason"}`` with
        check ``error``, ``names``, ``shape``, ``dtype``, ``finite``, ``update-norm``,
        ``metrics``, ``records`` or ``weight``.
    """

    name: ClassVar[str] = "validated_weighted_avg"
    required_metrics: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES_KEY,)
    """Metric keys each client must send for this strategy's weights."""
    needs_class_counts: ClassVar[bool] = False
    """Whether clients must report ``"class-counts"`` (per-class training sample counts)."""
    needs_teacher_loss: ClassVar[bool] = False
    """Whether the weights need the teacher's representation loss (a method with a teacher: ekd / fopro-kd)."""
    reports_rule: ClassVar[bool] = False
    """Whether ``federation.fedmas_rule`` applies (reported in ``metrics.json``)."""

    def checkpoint_state(self, server_round: int, recorder: Any) -> dict[str, Any]:
        """What the server checkpoint records of this strategy after ``server_round`` (default: nothing)."""
        return {}

    def __init__(
        self,
        *,
        min_valid_replies: int = 1,
        max_update_norm: float | None = None,
        transfer_dtype: str = "float32",
        **fedavg_kwargs: Any,
    ) -> None:
        if isinstance(min_valid_replies, bool) or not isinstance(min_valid_replies, int) or min_valid_replies < 1:
            raise ValueError(f"min_valid_replies must be an int >= 1, got {min_valid_replies!r}")
        if max_update_norm is not None and not (max_update_norm > 0 and math.isfinite(max_update_norm)):
            raise ValueError(f"max_update_norm must be a finite number > 0 or None, got {max_update_norm!r}")
        self._user_train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = fedavg_kwargs.get(
            "train_metrics_aggr_fn"
        )
        self._user_evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = (
            fedavg_kwargs.get("evaluate_metrics_aggr_fn")
        )
        super().__init__(**fedavg_kwargs)
        self.min_valid_replies = min_valid_replies
        self.max_update_norm = max_update_norm
        if transfer_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"transfer_dtype must be one of {list(SUPPORTED_DTYPES)}, got {transfer_dtype!r}")
        self.transfer_dtype = transfer_dtype
        self.last_weights: dict[int, float] = {}
        self.last_rejections: list[dict[str, Any]] = []
        self._reference: ArrayRecord | None = None
        self._central_dp: Any = None
        self.prompt_explore_rounds: int | None = None  # prompt.scope federated: see enable_federated_prompt
        self.global_prompt: dict[str, np.ndarray] | None = None
        self.evaluate_schedule: Callable[[int], bool] | None = None
        """Rounds with a federated-evaluate phase (fopro_kd/round_schedule.py:federated_evaluate_phase); None: all."""
        self.score_schedule: Callable[[int], int | None] | None = None
        """The round whose model the sites score in a train call (``federation.evaluate_in_train``,
        fopro_kd/round_schedule.py:scored_in_train); None: never."""

    # ------------------------------------------------------------------ central DP

    @property
    def central_dp(self) -> Any:
        """``CentralDP`` (server/strategies/central_dp.py) in ``privacy.mode: central``, else None.

        Setting it refuses a strategy with its own weight rule (:meth:`client_weights`
        overridden): under central DP the weights are public and uniform, so such a strategy
        would silently stop being itself, and its own weights (FedMAS ρ_k / Σ ρ_j, class-balanced
        counts) normalise private statistics of several clients, which the noise does not cover.
        """
        return self._central_dp

    @central_dp.setter
    def central_dp(self, value: Any) -> None:
        if value is not None:
            if type(self).client_weights is not ValidatedWeightedAvg.client_weights:
                raise ConfigError(
                    f"'federation.strategy: {self.name}' cannot run with 'privacy.mode: central': its aggregation "
                    "weights are computed from private per-client statistics across clients, which DP-FedAvg's noise "
                    "does not cover; use 'fedavg' or 'fedprox' (uniform public weights, docs/privacy.md §3) or "
                    "'privacy.mode: local'"
                )
            log(INFO, "central DP: '%s' aggregates by DP-FedAvg with uniform public weights w_k = 1 and the fixed "
                "denominator W = q x N = %.4g (its num-examples weights are not used); Poisson client sampling q = %.4g",
                self.name, value.denominator, value.sample_rate)
            if self.min_valid_replies > 1:
                log(WARNING, "central DP: min_valid_replies=%d does not apply; every round releases a noised model",
                    self.min_valid_replies)
        self._central_dp = value

    # ------------------------------------------------------------------ config glue

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        """Constructor arguments taken from a ``FederationConfig`` (none for the base)."""
        return {}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> %s (validated weighted average):", type(self).__name__)
        log(INFO, "\t│\t├── min valid replies: %d", self.min_valid_replies)
        log(INFO, "\t│\t├── max update norm: %s", self.max_update_norm)
        log(INFO, "\t│\t└── transfer dtype: %s", self.transfer_dtype)
        super().summary()

    # ------------------------------------------------------------------ round setup

    def set_reference(self, arrays: ArrayRecord) -> None:
        """Set the global arrays that replies are validated against (done by ``configure_train``)."""
        self._reference = arrays

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent this round, then configure as FedAvg (central DP: Poisson sampling)."""
        self.set_reference(arrays)
        config = ConfigRecord(dict(config))  # this round's copy: the keys below differ from round to round
        if self.prompt_explore_rounds is not None:
            config[PROMPT_EXPLORE_KEY] = int(server_round <= self.prompt_explore_rounds)
        scored = None if self.score_schedule is None else self.score_schedule(server_round)
        if scored is not None:
            config[SCORE_ROUND_KEY] = int(scored)
        if self.central_dp is not None:
            return self._configure_train_poisson(server_round, self.encode_global(arrays), config, grid)
        messages = list(super().configure_train(server_round, self.encode_global(arrays), config, grid))
        if self.global_prompt is not None:
            for msg in messages:
                msg.content[PROMPT_ARRAYS_KEY] = ArrayRecord(
                    {k: Array(np.array(v, order="C")) for k, v in self.global_prompt.items()})
        return messages

    # ------------------------------------------------------------------ federated prompt
    def enable_federated_prompt(self, explore_rounds: int) -> None:
        """``prompt.scope: federated``: rounds 1..``explore_rounds`` explore; the sites' prompts are averaged."""
        self.prompt_explore_rounds = int(explore_rounds)

    def aggregate_prompts(self, server_round: int, valid: list[Message], alpha: np.ndarray) -> None:
        """Average the prompts of the valid replies with the students' weights (fopro_kd/federated_prompt.py).

        A reply whose prompt cannot be averaged (keys, shapes, non-finite values) is left out of
        the prompt average only (its student was validated separately); no prompt at all keeps
        the previous global prompt.
        """
        if self.prompt_explore_rounds is None:
            return
        prompts, weights = [], []
        for msg, a in zip(valid, alpha):
            record = msg.content.array_records.get(PROMPT_ARRAYS_KEY)
            if record is None:
                continue
            values = to_numpy_dict(record)
            problem = prompt_problem(values, self.global_prompt or (prompts[0] if prompts else None))
            if problem is not None:
                log(WARNING, "Round %s: prompt of node %s left out of the prompt average: %s", server_round,
                    _node_id(msg), problem)
                continue
            prompts.append(values)
            weights.append(float(a))
        if prompts and sum(weights) > 0:
            self.global_prompt = average_prompts(prompts, weights)
            log(INFO, "Round %s: averaged the prompts of %d site(s)", server_round, len(prompts))

    def _configure_train_poisson(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """FedAvg's ``configure_train`` with the sample drawn by ``central_dp.sample_clients`` (Poisson, rate q).

        The accountant's subsampled Gaussian assumes exactly this: each hospital is in the
        round independently with probability q, unknown to everyone else. Flower's fixed-size
        ``random.sample`` (and ``min_train_nodes``) would not match it. The wait for
        ``min_available_nodes`` connected nodes is kept (it depends on no hospital's data).
        """
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        node_ids = self.central_dp.sample_clients(all_nodes)
        log(INFO, "configure_train: central DP, Poisson sampling (q = %.4g) of %d node(s)",
            self.central_dp.sample_rate, len(all_nodes))
        config[SERVER_ROUND_KEY] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure as FedAvg, sending the global arrays in the transfer dtype; nothing in unscheduled rounds."""
        if self.evaluate_schedule is not None and not self.evaluate_schedule(server_round):
            return []
        return super().configure_evaluate(server_round, self.encode_global(arrays), config, grid)

    def encode_global(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays as they go on the wire (``transfer_dtype``); float32: unchanged."""
        if self.transfer_dtype == "float32":
            return arrays
        return ArrayRecord(encode_for_transfer(arrays.to_torch_state_dict(), self.transfer_dtype))

    def _decode(self, arrays: ArrayRecord, reference: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        values = to_numpy_dict(arrays)
        return values if reference is None else restore_numpy_dtypes(values, reference, self.transfer_dtype)

    # ------------------------------------------------------------------ weights hook

    def client_weights(self, server_round: int, metrics: list[MetricRecord]) -> np.ndarray:
        """Un-normalised aggregation weight of each valid reply (default: ``num-examples``).

        Subclasses override this one hook. The base class drops replies whose weight is
        non-finite or negative, falls back to uniform weights when all are zero, and
        normalises.
        """
        return np.asarray([float(m[NUM_EXAMPLES_KEY]) for m in metrics], dtype=np.float64)

    # ------------------------------------------------------------------ aggregation

    def _reject(self, server_round: int, node_id: int, reason: str, check: str | None = None) -> None:
        check = check or reason_check(reason)
        self.last_rejections.append({"round": int(server_round), "node_id": node_id, "check": check, "reason": reason})
        log(WARNING, "Round %s: rejected reply from node %s (%s): %s", server_round, node_id, check, reason)

    def _records(self, content: RecordDict) -> tuple[ArrayRecord | None, MetricRecord | None, str | None]:
        arrays = content.array_records.get(self.arrayrecord_key)
        if arrays is None and len(content.array_records) == 1:
            arrays = next(iter(content.array_records.values()))
        metrics = content.metric_records.get("metrics")
        if metrics is None and len(content.metric_records) == 1:
            metrics = next(iter(content.metric_records.values()))
        if arrays is None:
            return None, None, (
                f"records: expected one ArrayRecord (key {self.arrayrecord_key!r}), "
                f"got {sorted(content.array_records.keys())}"
            )
        if metrics is None:
            return None, None, (
                f"records: expected one MetricRecord (key 'metrics'), got {sorted(content.metric_records.keys())}"
            )
        return arrays, metrics, None

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and average the valid ones with :meth:`client_weights`."""
        self.last_weights = {}
        self.last_rejections = []
        replies = list(replies)

        # 1. error replies
        ok: list[Message] = []
        for msg in replies:
            if msg.has_error():
                self._reject(server_round, _node_id(msg), f"error: {msg.error.reason} (code {msg.error.code})")
            else:
                ok.append(msg)

        # 2. validation against the global arrays sent this round. Only the verdict is kept:
        #    each reply's NumPy copy is dropped before the next one is converted, so the
        #    server never holds more than one decoded reply (plus the accumulator) at a time.
        reference_np = to_numpy_dict(self._reference) if self._reference is not None else None
        norm_bound = self.max_update_norm
        valid: list[tuple[Message, MetricRecord]] = []
        for msg in ok:
            node = _node_id(msg)
            arrays, metric_record, reason = self._records(msg.content)
            if arrays is None or metric_record is None:
                self._reject(server_round, node, reason or "records: missing")
                continue
            values = self._decode(arrays, reference_np)
            if reference_np is None:
                log(
                    WARNING,
                    "Round %s: no global arrays recorded (configure_train was not called); validating "
                    "against the first reply (node %s), without the update-norm check",
                    server_round,
                    node,
                )
                reference_np, norm_bound = {k: v.copy() for k, v in values.items()}, None
            reason = validate_arrays(values, reference_np, max_update_norm=norm_bound) or validate_metrics(
                metric_record
            )
            del values
            if reason is not None and self.central_dp is not None and reason_check(reason) == "update-norm":
                # under central DP a client's update norm is outside the guarantee: not logged or written
                reason = f"update-norm: the update's L2 norm is above the bound {norm_bound:.6g} (value not recorded)"
            if reason is not None:
                self._reject(server_round, node, reason)
                continue
            valid.append((msg, metric_record))

        if self.central_dp is not None:
            return self._aggregate_central(server_round, valid, reference_np)

        # 3./4. guarded weights
        weights = self._guarded_weights(server_round, valid)
        valid = [item for item, w in zip(valid, weights) if not np.isnan(w)]
        if len(valid) < self.min_valid_replies:
            log(
                WARNING,
                "Round %s: %d valid replies (< min_valid_replies=%d; %d received, %d rejected); "
                "keeping the previous global model",
                server_round,
                len(valid),
                self.min_valid_replies,
                len(replies),
                len(self.last_rejections),
            )
            return None, None
        alpha = weights[~np.isnan(weights)]
        alpha = alpha / alpha.sum()
        self.last_weights = {_node_id(msg): float(a) for (msg, _), a in zip(valid, alpha)}
        self.aggregate_prompts(server_round, [msg for msg, _ in valid], alpha)

        # 5. dtype-preserving average, decoding the validated replies a second time, one at a time
        decoded = (self._decode(self._records(msg.content)[0], reference_np) for msg, _ in valid)
        aggregated = self._average(decoded, alpha)
        log(
            INFO,
            "Round %s: aggregated %d replies (%d rejected); weights %s",
            server_round,
            len(valid),
            len(self.last_rejections),
            {n: round(a, 4) for n, a in self.last_weights.items()},
        )
        return aggregated, self._train_metrics([msg for msg, _ in valid], [m for _, m in valid])

    def _aggregate_central(
        self, server_round: int, valid: list[tuple[Message, MetricRecord]], reference_np: dict[str, np.ndarray] | None
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Central DP: θ + (Σ w_k clip(Δ_k) + noise) / W over the valid replies, released whatever their number.

        A failed, missing or invalid reply contributes nothing (a zero update, within every
        client's sensitivity bound); the weights are public (``central_dp.client_weights``) and
        are never renormalised over the replies.
        """
        if self._reference is None or reference_np is None:
            raise RuntimeError("central DP needs the global arrays sent this round (configure_train was not called)")
        metrics = [m for _, m in valid]
        weights = self.central_dp.client_weights(metrics)
        node_ids = [_node_id(msg) for msg, _ in valid]
        decoded = (self._decode(self._records(msg.content)[0], reference_np) for msg, _ in valid)
        noisy = self.central_dp.aggregate(server_round, reference_np, decoded, weights, node_ids)
        aggregated = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in noisy.items()})
        self.last_weights = {node: float(w) / self.central_dp.denominator for node, w in zip(node_ids, weights)}
        log(INFO, "Round %s: central DP aggregate of %d valid repl%s (%d rejected), divided by the fixed W = %.4g",
            server_round, len(valid), "y" if len(valid) == 1 else "ies", len(self.last_rejections),
            self.central_dp.denominator)
        train_metrics = (self._train_metrics([msg for msg, _ in valid], metrics) if valid
                         else MetricRecord({NUM_EXAMPLES_KEY: 0}))
        return aggregated, train_metrics

    def _guarded_weights(self, server_round: int, valid: list[tuple[Message, MetricRecord]]) -> np.ndarray:
        """Hook weights with bad entries replaced by NaN (= dropped) and all-zero -> uniform."""
        if not valid:
            return np.zeros(0)
        metrics = [m for _, m in valid]
        node_ids = [_node_id(msg) for msg, _ in valid]
        raw = np.asarray(self.client_weights(server_round, metrics), dtype=np.float64).reshape(-1)
        if raw.shape != (len(metrics),):
            raise ValueError(
                f"{type(self).__name__}.client_weights returned {raw.shape[0]} weights for {len(metrics)} replies"
            )
        weights = raw.copy()
        for i, (node, w) in enumerate(zip(node_ids, raw)):
            if not math.isfinite(w) or w < 0:
                self._reject(server_round, node, f"weight: aggregation weight {w!r} is not a finite number >= 0")
                weights[i] = np.nan
        finite = ~np.isnan(weights)
        if finite.any() and weights[finite].sum() <= 0:
            log(WARNING, "Round %s: all aggregation weights are zero; using uniform weights", server_round)
            weights[finite] = 1.0
        return weights

    @staticmethod
    def _average(arrays_np: Iterable[Mapping[str, np.ndarray]], alpha: np.ndarray) -> ArrayRecord:
        """Per key: floating -> Σ α_k θ_k in float64, cast back; integer/bool -> element-wise max.

        Streams: ``arrays_np`` may be a generator, each reply is folded into the accumulator
        and released, so peak memory is one reply plus the float64 accumulator, not N replies.
        """
        acc: dict[str, np.ndarray] = {}
        dtypes: dict[str, np.dtype] = {}
        count = 0
        for values in arrays_np:  # not zip(): its cached result tuple would keep the previous reply alive
            if count >= len(alpha):
                raise ValueError(f"{len(alpha)} weights for more replies")
            a = alpha[count]
            count += 1
            for key, value in values.items():
                if key not in acc:  # the first reply fixes keys and dtypes (validated identical)
                    dtypes[key] = value.dtype
                    if np.issubdtype(value.dtype, np.inexact):
                        acc[key] = np.zeros(value.shape, dtype=np.result_type(value.dtype, np.float64))
                    else:
                        acc[key] = np.array(value, copy=True)
                        continue
                if np.issubdtype(dtypes[key], np.inexact):
                    acc[key] += a * value
                else:
                    np.maximum(acc[key], value, out=acc[key])
            del values, value  # release this reply before the generator decodes the next one
        if count != len(alpha):
            raise ValueError(f"{len(alpha)} weights for {count} replies")
        return ArrayRecord({key: Array(np.array(acc[key].astype(dtypes[key]), dtype=dtypes[key], order="C"))
                            for key in acc})  # keeps 0-d shapes

    def _train_metrics(self, msgs: list[Message], metrics: list[MetricRecord]) -> MetricRecord:
        """Sample-weighted mean of the common scalar train metrics, plus the total ``num-examples``.

        Metrics are weighted by ``num-examples`` (a mean over all training samples), not by
        the aggregation weights. A user ``train_metrics_aggr_fn`` replaces this.
        """
        if self._user_train_metrics_aggr_fn is not None:
            return self._user_train_metrics_aggr_fn([m.content for m in msgs], self.weighted_by_key)
        counts = np.asarray([float(m[NUM_EXAMPLES_KEY]) for m in metrics], dtype=np.float64)
        record = weighted_mean_metrics(metrics, counts)
        record[NUM_EXAMPLES_KEY] = int(counts.sum())
        return record

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Robust evaluate aggregation: skip error replies and replies with invalid metrics.

        Returns the ``num-examples``-weighted mean of the scalar metrics common to the
        remaining replies (plus the total ``num-examples``), or ``None`` when none remain.
        Unlike FedAvg this never raises on replies with different metric keys.
        """
        good: list[Message] = []
        metrics: list[MetricRecord] = []
        for msg in replies:
            node = _node_id(msg)
            if msg.has_error():
                log(WARNING, "Round %s: evaluate error from node %s: %s", server_round, node, msg.error.reason)
                continue
            record = msg.content.metric_records.get("metrics")
            if record is None and len(msg.content.metric_records) == 1:
                record = next(iter(msg.content.metric_records.values()))
            reason = "records: no MetricRecord" if record is None else validate_metrics(record)
            if reason is not None:
                log(WARNING, "Round %s: ignored evaluate reply from node %s: %s", server_round, node, reason)
                continue
            good.append(msg)
            metrics.append(record)  # type: ignore[arg-type]
        if not good:
            return None
        if self._user_evaluate_metrics_aggr_fn is not None:
            return self._user_evaluate_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        counts = np.asarray([float(m[NUM_EXAMPLES_KEY]) for m in metrics], dtype=np.float64)
        record = weighted_mean_metrics(metrics, counts)
        record[NUM_EXAMPLES_KEY] = int(counts.sum())
        return record
