r"""Drift detection on the residuals of the overrides' predictions (the closed loop's alarm).

Input, per domain and in trade order: the raw residual ``r_t = return_r_t - predicted_edge_t``
of every trade an override priced.  While the override's predictions are as good as they
were, ``r_t`` is stationary; a drift is a change in its **mean** (the realized edge moved
away from the predicted one).  :class:`ResidualDriftMonitor` raises a :class:`DriftAlarm`
when that happens, keeps its state between batches, and is cheap enough to see every trade
of every domain.  The measured figures (false-alarm rate, delays, River side by side) come
from ``meta_pipeline.lab.drift_bench``; none is hard-coded here.

1. Standardization (the monitor's own, frozen per epoch)
-------------------------------------------------------
After a start and after every alarm the monitor **warms up** on ``N = warmup`` trades
``w_1..w_N`` (no alarm can fire during a warm-up) and estimates once::

    med = median(w),   mad = 1.4826 * median(|w - med|)          (robust fences)
    w~_i = clip(w_i, med - c*mad, med + c*mad)                   (c = winsor_mads; skipped if mad = 0)
    m = mean(w~),      s = max(sd(w~, ddof=1), min_scale)        (frozen until the next alarm)

every later residual enters the detectors as ``z_t = clip((r_t - m) / s, -clip, +clip)``.

*Why the mean and SD of a winsorized warm-up, not median/MAD.*  Both detectors below
test the *mean* of ``z`` and their false-alarm rate is set by its *variance*.  Median/MAD
estimate other quantities: on Student-t(5) residuals scaled to unit variance ``1.4826 MAD
= 0.83 SD``, which would inflate ``var(z)`` by 44 % and cut the expected run length by a
large factor; on skewed residuals ``median != mean`` leaves a permanent offset in ``z``
(a false alarm sooner or later).  Median/MAD only place the winsorizing fences, so one
wild trade in the warm-up cannot inflate ``s`` and blunt the monitor for a whole epoch
(with ``c = 5`` 999 in 1000 Gaussian warm-ups of 1000 are untouched; a t(5) one loses
~2 % of its SD on average, which the t(5) figures of the bench include).  The clip ``|z| <= 4`` bounds what a single heavy-tailed trade can add to a
cumulative statistic (Huber-type robust monitoring); it costs nothing measurable for
shifts <= 1 SD.

2. Detectors (River's, on ``z``)
--------------------------------
Two of River's detectors, each for the shift size it is good at; an alarm of either is
an alarm of the monitor.

* ``adwin`` -- ``river.drift.ADWIN(delta=0.01, clock=32)``, **small and unknown-size
  shifts**.  ADWIN keeps the window ``W`` of all values since its start (bucket-compressed)
  and, every ``clock`` values, tests every split ``W = W0 . W1`` at bucket boundaries::

      cut  if  |mean(W0) - mean(W1)| > eps,
      eps = sqrt(2 (1/n0' + 1/n1') var(W) ln(2 ln|W| / delta)) + 2/3 (1/n0' + 1/n1') ln(2 ln|W| / delta)

  (``n' = n - min_window_length + 1``).  Its reference is the *old part of its own
  window*, which the shift cannot contaminate.
* ``ph_large`` -- ``river.drift.PageHinkley(delta=0.5, threshold=12, alpha=1, mode="both")``,
  **large shifts**.  With ``alpha = 1`` River's Page-Hinkley is Page's two-sided CUSUM on
  the deviations from the running mean ``zbar_t`` of all values since its start::

      U_t = sum_{i<=t} (z_i - zbar_i - delta),  alarm "up"   when U_t - min_{s<=t} U_s > threshold
      L_t = sum_{i<=t} (z_i - zbar_i + delta),  alarm "down" when max_{s<=t} L_s - L_t > threshold

  (``U_t - min U`` is the recursion ``S_t = max(0, S_{t-1} + x_t - delta)``).  A CUSUM with
  reference ``k = delta`` is the optimal detector of a step ``2k`` (Lorden, Moustakides);
  Siegmund's ``ARL(mu) ~ (exp(-2 D b) + 2 D b - 1) / (2 D^2)``, ``D = mu - k``,
  ``b = threshold + 1.166``, per side, gave the starting point (``k = 0.5, h = 12``: ~10^6
  trades per false alarm per side for a CUSUM with a known mean, ~24 trades for 1 SD);
  the margin pays for what that formula ignores -- the running-mean reference, the
  warm-up's estimation error, t(5) tails, and the ADWIN beside it -- and simulation
  checked the final value (the bench reports the figures).

*Why not Page-Hinkley for the small shifts too.*  Its reference ``zbar_t`` includes the
post-change values, so it chases the shift: a step ``d`` seen ``T`` values after the
detector started looks like ``d T / (T + n)`` after ``n`` more values, and once that falls
under ``delta`` the CUSUM drifts down and never alarms.  A fast (1 SD) detection is over
before that matters; a 0.3 SD step with the ``delta = 0.15`` a small-shift CUSUM needs is
lost for good whenever it is not caught within ~T trades (measured while choosing: 58 of
400 runs never alarmed when the step began right at the end of a 500-trade warm-up; the
bench's "design check" rows run that alternative at the default warm-up).  River's own
newer ``CUSUM`` freezes its reference for this reason, but it is not in the River
versions this project pins.  *Why not ADWIN alone.*  At the false-alarm rate needed here
it takes ~40-50 trades for a 1 SD step (it is tuned by a union bound over all splits,
not for one shift size, and tests only every ``clock`` values) -- hence the CUSUM beside it.

*Warm-up replay.*  When a warm-up ends, its standardized values are **replayed** into the
fresh detectors with testing disabled (``min_instances`` / ``grace_period`` raised by
``N``): ADWIN then starts with ``N`` baseline values in its window, so a change right
after the warm-up is still compared against ``N`` old values (while choosing, the mean
delay of a 0.3 SD step placed there was ~370-400 trades with ``warmup = 500`` and ~250-270
with 1000; the bench reports it as "step right at the end of the warm-up"), and
Page-Hinkley's running mean starts at the warm-up's own mean.  After an alarm
**everything re-warms** -- detectors are discarded and the next ``N`` trades estimate a
new ``m, s`` (an alarm means the old ones are stale).

With ``standardize=False`` (:meth:`DriftConfig.passthrough`) raw values go straight into
the River detectors (no warm-up, no clip), and a fired detector is replaced by a fresh one,
which is exactly River's own reset-on-next-update: the bench uses it to reproduce River's
documented indices.

3. Alarms
---------
:class:`DriftAlarm` ``index`` is the position in the array passed to this ``update`` call
and ``n_seen`` the monitor's total count including that value; ``direction`` is ``"up"``
(residuals grew: outcomes better than predicted) or ``"down"``.  ``statistic`` is the
detector's own statistic: Page-Hinkley's ``U_t - min U`` (resp. ``max L - L_t``), ADWIN's
``|mean(W0) - mean(W1)|`` between the part it dropped and the part it kept.
``change_index`` (an index into this call's array; negative = an earlier call) and
``shift`` (signed, in ``z`` units = residual SDs when standardizing) are CUSUM estimates:
the change began one after the last time ``C_t = sum_i (+-z_i - k)`` was at its minimum
(the classical CUSUM change-point estimate), and ``shift = +-((C_t - min C) / (t - argmin
C) + k)`` is the mean over the changed segment.  For Page-Hinkley ``C`` is its own ``U``
(resp. ``-L``) with ``k = delta``; for ADWIN -- whose kept window reaches well back before
the change, so its own split would date it hundreds of trades early -- two estimation-only
CUSUMs on the same ``z`` with ``k = change_point_k`` (0.15) are kept, and the one on
ADWIN's side is read (in passthrough mode, where raw units give the CUSUM no meaningful
reference, ADWIN's own estimate is reported: the start of the window it kept, and
``shift = statistic`` signed).  The Page-Hinkley estimates read River's detector internals
(``_sum_increase`` ...); on a River version without them they are ``None`` / ``nan`` and
detection is unaffected.

4. Persistence
--------------
:meth:`ResidualDriftMonitor.to_state` returns JSON text: the config, counters, the warm-up
buffer (floats round-trip exactly through JSON), ``m, s``, the change-point bookkeeping
and the River detectors as base64 of a pickle (River 0.26's ADWIN is a Rust object that
pickles its whole bucket structure; Page-Hinkley its sums and running mean).
:meth:`ResidualDriftMonitor.from_state` unpickles through an allow-list (the River
detector classes and the one bound-method lookup Page-Hinkley needs), so a tampered state
in the store cannot run code.  One call or many batches with save/restore in between give
identical alarms (tested); all sums the monitor keeps itself are sequential, so batching
does not even change their rounding.

5. Speed
--------
Standardization is vectorized per batch; River's detectors are updated value by value in
a Python loop (River's Page-Hinkley ``update`` is pure Python, ADWIN's is Rust).  The
default monitor ran at ~0.6-1 M values/s on one core of the development machine (the
bench prints the figure of the machine it runs on): a domain's 10^6-trade history in 1-2 s,
a day's batch in milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from river import drift as river_drift

__all__ = [
    "DEFAULT_DETECTORS",
    "FACTOR_DRIFT_CONFIG",
    "STATE_VERSION",
    "DetectorSpec",
    "DriftAlarm",
    "DriftConfig",
    "ResidualDriftMonitor",
]

STATE_VERSION = 2  # 2: ADWIN bookkeeping and the change-point CUSUMs joined the state
_MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): MAD -> SD for Gaussian data
_KINDS = ("page_hinkley", "adwin")
_PARAM_TYPES = (bool, int, float, str)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, init=False)
class DetectorSpec:
    """One River detector: ``kind`` ("adwin" | "page_hinkley") and its constructor kwargs.

    ``params`` go unchanged to ``river.drift.ADWIN`` / ``river.drift.PageHinkley`` (pass a
    mapping; it is stored as a sorted tuple of pairs so the spec stays hashable).  When the
    monitor standardizes, the warm-up is replayed into the detector first and
    ``min_instances`` (Page-Hinkley) / ``grace_period`` (ADWIN) are raised by its length,
    so they count *monitored* values; unset, they take River's defaults.
    """

    name: str
    kind: str
    params: tuple[tuple[str, Any], ...]

    def __init__(self, name: str, kind: str, params: Mapping[str, Any] | tuple = ()) -> None:
        object.__setattr__(self, "name", str(name))
        object.__setattr__(self, "kind", str(kind))
        object.__setattr__(self, "params", tuple(sorted(dict(params).items())))
        if self.kind not in _KINDS:
            raise ValueError(f"unknown detector kind {self.kind!r}; known: {_KINDS}")
        if not self.name:
            raise ValueError("a detector needs a name")
        for key, value in self.params:
            if not isinstance(value, _PARAM_TYPES):
                raise ValueError(f"detector {self.name}: parameter {key}={value!r} is not a plain scalar")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def build(self, replay: int = 0) -> Any:
        """A fresh River detector; ``replay`` values of history will be fed to it untested first."""
        kw = self.kwargs
        if self.kind == "page_hinkley":
            if replay:
                kw["min_instances"] = int(kw.get("min_instances", 30)) + replay
            return river_drift.PageHinkley(**kw)
        if replay:
            kw["grace_period"] = int(kw.get("grace_period", 10)) + replay
        return river_drift.ADWIN(**kw)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DetectorSpec:
        return cls(d["name"], d["kind"], d.get("params", {}))


#: ADWIN for small / unknown-size shifts, a Page-Hinkley CUSUM (alpha = 1) for large ones.
DEFAULT_DETECTORS: tuple[DetectorSpec, ...] = (
    DetectorSpec("adwin", "adwin", {"delta": 0.01, "clock": 32}),
    DetectorSpec(
        "ph_large", "page_hinkley",
        {"delta": 0.5, "threshold": 12.0, "alpha": 1.0, "mode": "both", "min_instances": 1},
    ),
)


@dataclass(frozen=True)
class DriftConfig:
    """Every tuning constant of :class:`ResidualDriftMonitor` (defaults: the measured choice).

    * ``warmup`` (1000): trades that estimate location and scale after a start and after
      every alarm (no alarm can fire during them); they are also replayed into the fresh
      detectors as baseline.  Mean error of the warm-up ~0.03 SD, SD error ~2 %.
    * ``winsor_mads`` (5.0): warm-up values are clipped at ``median +- winsor_mads *
      1.4826 * MAD`` before taking mean and SD.
    * ``clip`` (4.0): standardized residuals are clipped to ``[-clip, clip]``.
    * ``min_scale`` (1e-12): floor of the scale (a constant warm-up does not divide by 0).
    * ``detectors`` (:data:`DEFAULT_DETECTORS`): ``adwin`` = ADWIN(delta 0.01, clock 32)
      and ``ph_large`` = PageHinkley(delta 0.5, threshold 12, alpha 1, both sides, testing
      from the first monitored value).
    * ``standardize`` (True): False = raw values into the River detectors, no warm-up and
      no clip (:meth:`passthrough`; for comparisons with River itself).
    * ``change_point_k`` (0.15): reference of the two one-sided CUSUMs that only *estimate*
      where an ADWIN-detected change began and how large it is (half the smallest shift of
      interest, 0.3 SD); they never raise alarms.
    """

    warmup: int = 1000
    winsor_mads: float = 5.0
    clip: float = 4.0
    min_scale: float = 1e-12
    detectors: tuple[DetectorSpec, ...] = DEFAULT_DETECTORS
    standardize: bool = True
    change_point_k: float = 0.15

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("DriftConfig needs at least one detector")
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique: {names}")
        if self.standardize and int(self.warmup) < 2:
            raise ValueError("warmup must be >= 2 when standardizing (an SD needs two values)")
        if not (self.clip > 0 and self.winsor_mads > 0 and self.min_scale > 0):
            raise ValueError("clip, winsor_mads and min_scale must be > 0")
        if not self.change_point_k >= 0:
            raise ValueError("change_point_k must be >= 0")

    @classmethod
    def passthrough(cls, *detectors: DetectorSpec) -> DriftConfig:
        """Raw values straight into the given River detectors (no warm-up, no standardization)."""
        return cls(warmup=0, detectors=tuple(detectors), standardize=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["detectors"] = [s.to_json() for s in self.detectors]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DriftConfig:
        d = dict(d)
        d["detectors"] = tuple(DetectorSpec.from_json(s) for s in d["detectors"])
        return cls(**d)


#: The per-factor monitors of ``override_feedback``: one stream per latent factor, the residuals
#: of the trades that factor's override priced. A broken lesson shifts its factor's stream by
#: about twice its edge (in residual SDs: 0.7-1.5 for the edges this pipeline learns) while it
#: moves the whole domain's stream only by its share of the trades, so the factor streams catch
#: breaks of rare lessons the whole-stream monitor misses. Large shifts only: Page-Hinkley
#: (k = 0.5) with a shorter warm-up (factors see fewer trades) and a higher threshold, so that
#: the factor streams together stay inside the false-alarm budget (each trade feeds ~1 factor
#: stream; measured by ``lab.drift_bench``: ERT per stream ~800k Gaussian / ~360k t(5) trades at
#: threshold 14, mean delay ~29 trades at 1 SD, ~85 at 0.7 SD with some misses — the
#: whole-stream monitor beside it covers small shifts).
FACTOR_DRIFT_CONFIG = DriftConfig(
    warmup=200,
    detectors=(DetectorSpec("ph_factor", "page_hinkley",
                            {"delta": 0.5, "threshold": 14.0, "alpha": 1.0, "mode": "both", "min_instances": 1}),),
)


@dataclass(frozen=True)
class DriftAlarm:
    """One alarm (module docstring, section 3, for the meaning of each field)."""

    index: int                # position in the array given to this update() call
    detector: str             # DetectorSpec.name that fired
    statistic: float          # the detector's statistic at the alarm; nan if unknown
    change_index: int | None  # estimated first changed value, index into this call's array
    n_seen: int               # values seen by the monitor so far, including this one
    direction: str = ""       # "up" | "down"; "" if unknown
    shift: float = math.nan   # signed estimated shift (z units = residual SDs when standardizing)


# --------------------------------------------------------------------------- state pickling
def _safe_getattr(obj: Any, name: str) -> Any:
    # Page-Hinkley pickles its bound test method as getattr(self, "_test_<mode>").
    if isinstance(obj, river_drift.PageHinkley) and name in ("_test_increase", "_test_decrease", "_test_both"):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"attribute {name!r} is not allowed in a drift state")


_ALLOWED: dict[tuple[str, str], Any] = {}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    if not _ALLOWED:
        from river import stats as river_stats

        classes = [river_drift.PageHinkley, river_drift.ADWIN, river_stats.Mean,
                   type(river_drift.ADWIN()._helper)]  # the Rust AdaptiveWindowing
        for cls in classes:
            _ALLOWED[(cls.__module__, cls.__name__)] = cls
        _ALLOWED[("builtins", "getattr")] = _safe_getattr
    return _ALLOWED


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a drift state") from None


def _dumps(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj, protocol=4)).decode("ascii")


def _loads(text: str) -> Any:
    return _RestrictedUnpickler(io.BytesIO(base64.b64decode(text.encode("ascii"), validate=True))).load()


# --------------------------------------------------------------------------- monitor
_ADWIN, _PH, _PH_UNTRACKED = 0, 1, 2


class _Track:
    """Bookkeeping of one detector (global indices; sums kept sequentially)."""

    __slots__ = ("arg_down", "arg_up", "fed_n", "fed_sum")

    def __init__(self, arg_up: int = -1, arg_down: int = -1, fed_sum: float = 0.0, fed_n: int = 0) -> None:
        self.arg_up = arg_up      # PH: last index where U reached its minimum
        self.arg_down = arg_down  # PH: last index where L reached its maximum
        self.fed_sum = fed_sum    # ADWIN: sum of every value fed since the detector started
        self.fed_n = fed_n        # ADWIN: how many

    def to_json(self) -> list[float | int]:
        return [self.arg_up, self.arg_down, self.fed_sum, self.fed_n]


class ResidualDriftMonitor:
    """Streaming drift monitor of one residual stream (one domain); see the module docstring.

    ``update(residuals)`` takes the next values in trade order and returns the alarms they
    raised.  ``n_seen`` counts every value ever given, ``n_alarms`` the alarm events (one
    value on which two detectors fire is one event, two :class:`DriftAlarm`);
    ``location``/``scale`` are the frozen warm-up estimates (``None`` while warming up).
    """

    def __init__(self, config: DriftConfig = DriftConfig()) -> None:
        self.config = config
        self.n_seen = 0
        self.n_alarms = 0
        self.location: float | None = None
        self.scale: float | None = None
        self.epoch_start = 0            # global index of the first value of the current epoch
        self._buffer: list[float] = []  # warm-up values collected so far
        self._detectors: list[Any] = []
        self._tracks: list[_Track] = []
        self._est: list[list[float]] = []  # change-point CUSUMs: [C, min C, argmin index] up, down
        if not config.standardize:
            self._start_monitoring([])

    # ------------------------------------------------------------------ public
    @property
    def warming(self) -> bool:
        """True while a warm-up is collecting values (no alarm possible)."""
        return not self._detectors

    def update(self, residuals: np.ndarray) -> list[DriftAlarm]:
        """Feed the next residuals (in trade order); the alarms they raised, in order."""
        x = np.asarray(residuals, dtype=float).ravel()
        if x.size and not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x))[0])
            raise ValueError(f"residuals must be finite (position {bad} is {x[bad]!r})")
        base = self.n_seen  # global index of x[0]
        alarms: list[DriftAlarm] = []
        i, n = 0, x.size
        while i < n:
            if self.warming:
                take = x[i : i + self.config.warmup - len(self._buffer)]
                self._buffer.extend(take.tolist())
                i += take.size
                self.n_seen += take.size
                if len(self._buffer) >= self.config.warmup:
                    self._start_monitoring(self._buffer)
                continue
            z = self._standardize(x[i:])
            fired = self._feed(z, base)
            if fired is None:
                self.n_seen += z.size
                break
            j, new = fired
            alarms.extend(new)
            self.n_seen += j + 1
            i += j + 1
            self._rewarm()
        return alarms

    def warmup_estimates(self, values: np.ndarray) -> tuple[float, float]:
        """(location, scale) the warm-up rule gives for ``values``: winsorized mean and SD."""
        cfg = self.config
        w = np.asarray(values, dtype=float)
        med = float(np.median(w))
        mad = _MAD_TO_SD * float(np.median(np.abs(w - med)))
        if mad > 0:
            w = np.clip(w, med - cfg.winsor_mads * mad, med + cfg.winsor_mads * mad)
        return float(w.mean()), max(float(w.std(ddof=1)), cfg.min_scale)

    def to_state(self) -> str:
        """JSON text of the whole monitor (section 4 of the module docstring)."""
        return json.dumps(
            {
                "version": STATE_VERSION,
                "config": self.config.to_json(),
                "n_seen": self.n_seen,
                "n_alarms": self.n_alarms,
                "epoch_start": self.epoch_start,
                "location": self.location,
                "scale": self.scale,
                "buffer": self._buffer,
                "tracks": [t.to_json() for t in self._tracks],
                "estimator": self._est,
                "detectors": _dumps(self._detectors) if self._detectors else None,
            },
            allow_nan=False,
        )

    @classmethod
    def from_state(cls, text: str) -> ResidualDriftMonitor:
        """The monitor :meth:`to_state` saved (its config included), ready to continue the stream."""
        d = json.loads(text)
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"drift state version {d.get('version')!r}, expected {STATE_VERSION}")
        mon = cls.__new__(cls)
        mon.config = DriftConfig.from_json(d["config"])
        mon.n_seen = int(d["n_seen"])
        mon.n_alarms = int(d["n_alarms"])
        mon.epoch_start = int(d["epoch_start"])
        mon.location = None if d["location"] is None else float(d["location"])
        mon.scale = None if d["scale"] is None else float(d["scale"])
        mon._buffer = [float(v) for v in d["buffer"]]
        mon._detectors = _loads(d["detectors"]) if d["detectors"] else []
        mon._tracks = [_Track(int(a), int(b), float(s), int(n)) for a, b, s, n in d["tracks"]]
        mon._est = [[float(c), float(m), int(a)] for c, m, a in d["estimator"]]
        expected = len(mon.config.detectors) if mon._detectors else 0
        n_est = 2 if expected and mon.config.standardize else 0
        if len(mon._detectors) != expected or len(mon._tracks) != expected or len(mon._est) != n_est:
            raise ValueError("drift state: detectors do not match the config")
        for spec, det in zip(mon.config.detectors, mon._detectors):
            want = river_drift.ADWIN if spec.kind == "adwin" else river_drift.PageHinkley
            if not isinstance(det, want):
                raise ValueError(f"drift state: detector {spec.name} is a {type(det).__name__}")
        return mon

    def __repr__(self) -> str:
        if self.warming:
            phase = f"warming {len(self._buffer)}/{self.config.warmup}"
        elif self.config.standardize:
            phase = f"monitoring (m={self.location:.6g}, s={self.scale:.6g})"
        else:
            phase = "monitoring raw values"
        return f"ResidualDriftMonitor(n_seen={self.n_seen}, alarms={self.n_alarms}, {phase})"

    # ------------------------------------------------------------------ internals
    def _kinds(self) -> list[int]:
        out = []
        for spec, det in zip(self.config.detectors, self._detectors):
            if spec.kind == "adwin":
                out.append(_ADWIN)
            else:
                out.append(_PH if hasattr(det, "_sum_increase") and hasattr(det, "_min_increase") else _PH_UNTRACKED)
        return out

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        if not self.config.standardize:
            return x
        return np.clip((x - self.location) / self.scale, -self.config.clip, self.config.clip)

    def _rewarm(self) -> None:
        self.n_alarms += 1
        self.epoch_start = self.n_seen
        self._detectors, self._tracks, self._est = [], [], []
        self.location = self.scale = None
        self._buffer = []
        if not self.config.standardize:
            self._start_monitoring([])

    def _start_monitoring(self, warm: list[float]) -> None:
        replay = len(warm)
        if self.config.standardize:
            self.location, self.scale = self.warmup_estimates(np.asarray(warm))
        self._detectors = [spec.build(replay) for spec in self.config.detectors]
        self._tracks = [_Track() for _ in self.config.detectors]
        start = self.n_seen - replay  # global index of the first value this epoch's detectors see
        self._est = [[0.0, 0.0, start - 1], [0.0, 0.0, start - 1]] if self.config.standardize else []
        self._buffer = []
        if replay:
            z = self._standardize(np.asarray(warm, dtype=float))
            self._run(z, start, stop_on_alarm=False)

    def _run(self, z: np.ndarray, t0: int, *, stop_on_alarm: bool = True) -> int | None:
        """Feed z (global index of z[0] = t0) to every detector; position of the first alarm."""
        dets, tracks, kinds = self._detectors, self._tracks, self._kinds()
        items = list(zip(dets, kinds, tracks))
        zl = z.tolist()
        hit_at: int | None = None
        if len(items) == 1 and kinds[0] != _PH:
            det = dets[0]
            for j, v in enumerate(zl):
                det.update(v)
                if det.drift_detected and stop_on_alarm:
                    hit_at = j
                    break
        else:
            for j, v in enumerate(zl):
                hit = False
                for det, kind, tr in items:
                    det.update(v)
                    if kind == _PH:
                        if det._sum_increase <= det._min_increase:
                            tr.arg_up = t0 + j
                        if det._sum_decrease >= det._max_decrease:
                            tr.arg_down = t0 + j
                    if det.drift_detected:
                        hit = True
                if hit and stop_on_alarm:
                    hit_at = j
                    break
        used = len(zl) if hit_at is None else hit_at + 1
        if _ADWIN in kinds and used:
            if self.config.standardize:  # the estimator's reference 0 only means something for z
                self._advance_estimator(z[:used], t0)
            for kind, tr in zip(kinds, tracks):
                if kind == _ADWIN:
                    # sequential accumulation: the same float however the stream was batched
                    tr.fed_sum = float(np.add.accumulate(np.concatenate(([tr.fed_sum], z[:used])))[-1])
                    tr.fed_n += used
        return hit_at

    def _advance_estimator(self, z: np.ndarray, t0: int) -> None:
        """Two one-sided CUSUMs (reference change_point_k) whose last minimum dates a change.

        ``C_t = sum (+-z_i - k)``; the change began one after the last ``argmin C``.  Sums are
        sequential from the carried value, so batching does not change a single bit.
        """
        k = self.config.change_point_k
        for side, sign in ((0, 1.0), (1, -1.0)):
            c0, m0, a0 = self._est[side]
            c = np.add.accumulate(np.concatenate(([c0], sign * z - k)))[1:]
            m = np.minimum.accumulate(np.concatenate(([m0], c)))
            new_min = np.flatnonzero(c <= m[:-1])
            a = t0 + int(new_min[-1]) if new_min.size else int(a0)
            self._est[side] = [float(c[-1]), float(m[-1]), a]

    def _feed(self, z: np.ndarray, base: int) -> tuple[int, list[DriftAlarm]] | None:
        hit_at = self._run(z, self.n_seen)
        if hit_at is None:
            return None
        return hit_at, self._alarms(self.n_seen + hit_at, base)

    def _alarms(self, t: int, base: int) -> list[DriftAlarm]:
        """Alarms of the detectors that fired on global index t (base = global index of x[0])."""
        out = []
        for spec, det, kind, tr in zip(self.config.detectors, self._detectors, self._kinds(), self._tracks):
            if not det.drift_detected:
                continue
            stat, change, direction, shift = math.nan, None, "", math.nan
            if kind == _PH:
                up = det._sum_increase - det._min_increase
                down = det._max_decrease - det._sum_decrease
                sign, stat, arg = (1.0, up, tr.arg_up) if up >= down else (-1.0, down, tr.arg_down)
                direction = "up" if sign > 0 else "down"
                if arg >= 0:
                    change = arg + 1 - base
                    shift = sign * (stat / max(t - arg, 1) + float(det.delta))
            elif kind == _ADWIN:
                width = int(det.width)
                dropped = tr.fed_n - width
                change = t - width + 1 - base  # fallback: the window ADWIN kept
                if dropped > 0 and width > 0:
                    adwin_shift = float(det.total) / width - (tr.fed_sum - float(det.total)) / dropped
                    stat, shift = abs(adwin_shift), adwin_shift
                    direction = "up" if adwin_shift > 0 else "down"
                    c, m, a = self._est[0 if adwin_shift > 0 else 1] if self._est else (0.0, 0.0, t)
                    if a < t and c > m:
                        change = int(a) + 1 - base
                        shift = math.copysign((c - m) / (t - a) + self.config.change_point_k, adwin_shift)
            out.append(DriftAlarm(index=t - base, detector=spec.name, statistic=float(stat),
                                  change_index=change, n_seen=t + 1, direction=direction, shift=float(shift)))
        return out
