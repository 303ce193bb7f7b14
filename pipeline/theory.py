"""Mean-field predictions of how the back-propagated gradient grows or shrinks per layer.

For a wide network with i.i.d. weights of variance sigma_w^2 / fan_in and biases of variance
sigma_b^2 (Poole et al. 2016, Schoenholz et al. 2017), a pre-activation's variance follows the
length map
    q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) z)^2] + sigma_b^2,   z ~ N(0, 1),
and the squared norm of the error signal dL/dh shrinks or grows by
    chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2]
per layer. At the fixed point q* this is chi_1: the log gradient norm changes by ln(chi_1)/2 per
layer towards the input (< 0 vanishing, > 0 exploding), with depth scale xi = -1/ln(chi_1).
Expectations are composite Gauss-Legendre quadratures against the Gaussian density (numpy), which
stay accurate from q -> 0 to q in the thousands (where tanh' is a spike a plain Gauss-Hermite rule
misses) and are exact at ReLU's kink.

"slope" below is always d ln||dL/dh|| per layer, moving from the output towards the input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .activations import ACTIVATIONS
from .config import SEQUENCE_SHAPES, RunConfig

_GAUSS_LEGENDRE = {n: np.polynomial.legendre.leggauss(n) for n in (4, 8)}


@functools.lru_cache(maxsize=4)
def _unit(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n)


def _panels(q: float, n: int = 160, order: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a composite Gauss-Legendre rule on x in [-12 sd, 12 sd]: panels grow
    geometrically away from 0, so both a narrow Gaussian (q -> 0) and a narrow feature of phi
    (tanh' at large q) are resolved, and 0 (ReLU's kink) is a panel edge."""
    sd = math.sqrt(q)
    lo, hi = 1e-4 * min(sd, 1.0), 12 * max(sd, 1.0)
    edges = lo * (hi / lo) ** _unit(n)  # np.geomspace(lo, hi, n), without its checks (~40% of a prediction)
    edges = np.concatenate([-edges[::-1], [0.0], edges])
    a, b = edges[:-1], edges[1:]
    nodes, weights = _GAUSS_LEGENDRE[order]
    x = (a + b) / 2 + np.outer(nodes, (b - a) / 2)
    w = np.outer(weights, (b - a) / 2)
    return x.ravel(), w.ravel()


def gaussian_mean(f, q: float) -> float:
    """E[f(x)] for x ~ N(0, q): a quadrature in x against the Gaussian density."""
    if q <= 0:
        return float(f(np.zeros(1))[0])
    x, w = _panels(q)
    density = np.exp(-x * x / (2 * q)) / math.sqrt(2 * math.pi * q)
    return float(np.sum(w * density * f(x)))


def length_map(activation: str, q: float, sigma_w2: float, sigma_b2: float) -> float:
    phi = ACTIVATIONS[activation].phi
    return sigma_w2 * gaussian_mean(lambda x: phi(x) ** 2, q) + sigma_b2


def chi(activation: str, q: float, sigma_w2: float) -> float:
    """Factor by which E||dL/dh||^2 grows per layer towards the input, at pre-activation variance q."""
    dphi = ACTIVATIONS[activation].dphi
    return sigma_w2 * gaussian_mean(lambda x: dphi(x) ** 2, q)


Q_MAX = 1e12  # beyond this the length map has no fixed point: q grows without bound
Q_OVERFLOW = 1e250  # the forward maps follow q this far (a float's squares stay finite)


def _iterate(step: Callable[[float], float], x: float, iters: int, done: Callable[[float, float], bool],
             valid: Callable[[float], bool]) -> float:
    """x <- step(x) until done(x, step(x)), accelerated (Steffensen): each pair of steps proposes
    Aitken's extrapolation, tried only while the steps shrink, it lies ahead of them and is valid (a
    growing sequence, or a jump past an unstable fixed point, keeps the plain steps). The maps here
    are increasing, so plain steps never cross a fixed point: a step from the extrapolation that
    still moves the same way continues from there; one that moves back means it jumped past the
    fixed point the steps were heading for, which then lies between the last step and it, and is
    found there by regula falsi (_bracketed). The answer is a step that satisfied done, or the last
    value after about `iters` steps. Plain iteration crept (700 to 2,000 steps near chi = 1, a fifth
    of a second per prediction); taking every jump, tanh's c-map at sigma_w^2 = 2 went from side to
    side of c* = 0 for all of its 200 steps and softsign's ended at -0.85, which is no fixed point."""
    taken = 0
    while taken < iters:
        x1 = step(x)
        if done(x, x1):
            return x1
        x2 = step(x1)
        taken += 2
        if done(x1, x2):
            return x2
        bend = x2 - 2 * x1 + x
        aitken = x - (x1 - x) ** 2 / bend if bend != 0 else math.nan
        ahead = (aitken - x2) * (x2 - x1) > 0 and abs(x2 - x1) < abs(x1 - x)
        x = x2
        if ahead and valid(aitken):  # nan is neither ahead nor valid
            x3 = step(aitken)
            taken += 1
            if done(aitken, x3):
                return x3
            if (x3 - aitken) * (x2 - x1) > 0:
                x = x3
                continue
            x22 = step(x2)
            taken += 1
            if done(x2, x22):
                return x22
            if (x22 - x2) * (x3 - aitken) < 0:  # a bracket (always, for an increasing map)
                return _bracketed(step, (x2, x22 - x2), (aitken, x3 - aitken), done, iters - taken)
            x = x22
    return x


def _bracketed(step: Callable[[float], float], a: tuple[float, float], b: tuple[float, float],
               done: Callable[[float, float], bool], iters: int) -> float:
    """The fixed point of `step` between a and b, each (x, step(x) - x), the two with opposite signs,
    by regula falsi with the Illinois rule (superlinear; plain regula falsi stalls at one end)."""
    (xa, ga), (xb, gb) = a, b
    nxt = xb + gb
    for _ in range(max(iters, 1)):
        if gb == ga:
            break
        x = xb - gb * (xb - xa) / (gb - ga)
        nxt = step(x)
        if done(x, nxt):
            return nxt
        g = nxt - x
        if g * gb > 0:
            ga /= 2
        else:
            xa, ga = xb, gb
        xb, gb = x, g
    return nxt


def fixed_point(activation: str, sigma_w2: float, sigma_b2: float, q0: float = 1.0, iters: int = 2000) -> float:
    """q* of the length map, by (accelerated) iteration from q0. ReLU with He init has every q as a
    fixed point (q0 is kept); below that gain q* -> 0 (stops under 1e-12); above it, rectifiers have
    no fixed point: the iteration stops at Q_MAX, where their chi no longer depends on q."""
    q = _iterate(lambda q: length_map(activation, q, sigma_w2, sigma_b2), q0, iters,
                 done=lambda q, nxt: abs(nxt - q) <= 1e-12 * max(1.0, q) or nxt < 1e-12 or nxt > Q_MAX,
                 valid=lambda q: 1e-12 < q < Q_MAX)
    return min(q, Q_MAX)


def _pair_mean(f, q: float, c: float) -> float:
    """E[f(u1) f(u2)] for u1, u2 ~ N(0, q) with correlation c: u1 = x1, u2 = c x1 + sqrt(1 - c^2) x2,
    x1, x2 ~ N(0, q), on a 2-D quadrature (a coarser rule than gaussian_mean's keeps it to ~1 ms)."""
    if q <= 0:
        return float(f(np.zeros(1))[0] ** 2)
    x, w = _panels(q, n=24, order=4)
    density = w * np.exp(-x * x / (2 * q)) / math.sqrt(2 * math.pi * q)
    c = min(max(c, -1.0), 1.0)
    u2 = c * x[:, None] + math.sqrt(max(1 - c * c, 0.0)) * x[None, :]  # (x1 nodes, x2 nodes)
    return float((density * f(x)) @ f(u2) @ density)


def correlation_map(activation: str, c: float, q: float, sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """(next correlation, chi_c): how the correlation c between two inputs' pre-activations (both of
    variance q, at the fixed point) propagates, and the slope of that map."""
    act = ACTIVATIONS[activation]
    c_next = (sigma_w2 * _pair_mean(act.phi, q, c) + sigma_b2) / q
    return float(c_next), sigma_w2 * _pair_mean(act.dphi, q, c)


def sigma_w2_of(config: RunConfig, fan_in: int, fan_out: int) -> float:
    """sigma_w^2 = fan_in x Var[W] of a layer initialized per config (see model.INITS)."""
    if config.init == "default":
        return 1 / 3
    if config.init == "normal":
        return fan_in * config.init_std**2
    unit_gain = {
        "xavier_uniform": 2 * fan_in / (fan_in + fan_out),
        "xavier_normal": 2 * fan_in / (fan_in + fan_out),
        "he_uniform": 2.0,
        "he_normal": 2.0,
        "lecun_normal": 1.0,
        "orthogonal": fan_in / max(fan_in, fan_out),
    }[config.init]
    return unit_gain * config.init_gain**2


def sigma_b2_of(config: RunConfig, fan_in: int) -> float:
    """Bias variance: PyTorch's default U(+-1/sqrt(fan_in)) has 1/(3 fan_in); the others bias_std^2."""
    return 1 / (3 * fan_in) if config.init == "default" else config.bias_std**2


@dataclass(frozen=True)
class Prediction:
    chi1: float  # per-layer factor of E||dL/dz||^2 at the fixed point (NaN where there is none: residual nets)
    q_star: float  # variance of what phi receives at the fixed point (1 under a normalization layer)
    slope: float  # ln(chi1) / 2: d ln||dL/dz|| per layer towards the input, at the fixed point
    xi: float  # gradient depth scale -1/ln(chi1) (inf at criticality)
    log_norms: tuple[float, ...]  # finite depth: predicted ln||dL/dz_l|| of each hidden layer, the last one 0
    finite_slope: float  # the line fit of log_norms, as theory.measured_slope fits the measured ones
    # log_norms and finite_slope are NaN where no prediction is made (SkipInit; see _mean_field_holds)


@dataclass(frozen=True)
class _Moments:
    """What a hidden layer's phi does to u ~ N(0, q): E[phi], E[phi^2], E[phi'^2]."""

    mean: float
    sq: float
    dsq: float

    @classmethod
    def of(cls, activation: str, q: float) -> _Moments:
        act = ACTIVATIONS[activation]
        return cls(gaussian_mean(act.phi, q), gaussian_mean(lambda x: act.phi(x) ** 2, q),
                   gaussian_mean(lambda x: act.dphi(x) ** 2, q))


def predict(config: RunConfig, input_sq_mean: float = 1.0, input_var_mean: float | None = None,
            in_features: int = 784) -> Prediction:
    """Mean-field prediction of how ||dL/dz|| changes across the hidden layers of a config at
    initialization (z: the output of each Linear layer).

    The inputs enter through E[x^2] (`input_sq_mean`, 1 for normalized MNIST) and, for BatchNorm,
    the mean over pixels of each pixel's variance across examples (`input_var_mean`, default
    `input_sq_mean`). Per hidden layer l the forward pass propagates the stream h_l (the layer's
    input: x, phi(u) or, in a residual net, the running sum) by its second moment p, its mean m and
    its variance across the batch v; z_l = W_l h_l + b_l has variance q = sigma_w^2 p + sigma_b^2
    (and sigma_w^2 v across the batch). phi receives u = norm(z): z itself, or a unit Gaussian after
    BatchNorm (divided by the batch std of z) or LayerNorm (divided by the std over units, ~sqrt(q)).
    Backwards, with g_l = E(dL/dh_l)^2 per unit and D_l = E(dL/dz_l)^2:
        D_l = alpha^2 E[phi'(u)^2] g_{l+1} / s_l,      g_l = [g_{l+1} if residual] + sigma_w^2 D_l,
    where s_l is the variance the normalization divides by (1 without one). A plain net gives D_l = chi_l D_{l+1}, the classic
    chi = sigma_w^2 E[phi'(z)^2]; BatchNorm at large batch gives E[phi'(u)^2] / Var[phi(u)] per layer,
    pi/(pi - 1) for ReLU (Yang et al. 2019); a residual stream grows, so its gradient factor
    1 + alpha^2 sigma_w^2 E[phi'^2] / s tends to 1 with depth (Yang and Schoenholz 2017). SkipInit
    (alpha = 0 at init) sends no gradient into its blocks: no prediction (NaN), as nothing to fit.

    These are the wide-layer, large-batch limits. At finite batch BatchNorm explodes faster than
    predicted: Monte Carlo (depth 12, width 512, float64) measured a per-layer factor of E(dL/dz)^2
    above the prediction by 21% (ReLU) and 17% (tanh) at batch 8, 3% at 32, 1% at 128, under 0.5% at
    512 (tests/test_theory.py checks batch 256).
    """
    act, hidden, width = config.activation, config.depth - 1, config.width
    sw2, sb2 = sigma_w2_of(config, width, width), sigma_b2_of(config, width)
    sw2_in, sb2_in = sigma_w2_of(config, in_features, width), sigma_b2_of(config, in_features)
    residual = config.residual != "none"
    alpha = 0.0 if config.residual == "skipinit" else config.residual_scale
    p, m, v = input_sq_mean, 0.0, input_var_mean if input_var_mean is not None else input_sq_mean
    layers = []  # per hidden layer: (alpha^2 E[phi'^2] / s, sigma_w^2 of the layer)
    unit = _Moments.of(act, 1.0) if config.norm != "none" else None
    for layer in range(hidden):
        w2, b2 = (sw2_in, sb2_in) if layer == 0 else (sw2, sb2)
        q = min(w2 * p + b2, Q_MAX)
        if config.norm == "batch":
            moments, divisor = unit, w2 * v
        elif config.norm == "layer":
            moments, divisor = unit, q
        else:
            moments, divisor = _Moments.of(act, q), 1.0
        a = alpha if residual and layer > 0 else 1.0
        layers.append((a * a * moments.dsq / divisor, w2))
        batch_var = moments.sq - moments.mean**2  # of phi(u) across the batch (BatchNorm: u ~ N(0, 1))
        if residual and layer > 0:
            p, m, v = p + 2 * a * m * moments.mean + a * a * moments.sq, m + a * moments.mean, v + a * a * batch_var
        else:
            p, m, v = moments.sq, moments.mean, batch_var
    # backwards from the last hidden layer (its g from the classifier is the unit of measure)
    log_d, g = [0.0] * hidden, 1.0
    for layer in range(hidden - 1, -1, -1):
        factor, w2 = layers[layer]
        d = factor * g
        log_d[layer] = math.log(d) if d > 0 else -math.inf
        g = (g if residual and layer > 0 else 0.0) + w2 * d
    log_norms = tuple(0.5 * (x - log_d[-1]) for x in log_d)
    if not _mean_field_holds(config):
        log_norms = tuple(math.nan for _ in log_norms)
    finite = _fit_slope(np.array(log_norms)) if len(log_norms) >= 3 and np.all(np.isfinite(log_norms)) else math.nan
    chi1, q_star = _fixed_point_factor(config, sw2, sb2)
    return Prediction(
        chi1=chi1,
        q_star=q_star,
        slope=0.5 * math.log(chi1) if chi1 > 0 else math.nan,
        xi=_depth_scale(chi1) if chi1 > 0 else math.nan,
        log_norms=log_norms,
        finite_slope=finite,
    )


RESIDUAL_MEAN_MAX_DEPTH = 12


def _mean_field_holds(config: RunConfig) -> bool:
    """Where the prediction is made. A residual stream without normalization, summing an activation
    of non-zero mean (ReLU and all but tanh and softsign), is not zero-mean: it carries a growing
    common component that the mean-field factors miss. Monte Carlo (width 512, float64) measured the
    ReLU stream's slope 2% above the prediction at depth 10, 13% at depth 20 and 29% to 55% at 30;
    with BatchNorm or LayerNorm in the block, or tanh, within 2% at every depth tried. So such
    streams are predicted up to depth 12 only."""
    if config.residual == "none" or config.norm != "none" or config.depth <= RESIDUAL_MEAN_MAX_DEPTH:
        return True
    return abs(_Moments.of(config.activation, 1.0).mean) < 1e-9


def _fixed_point_factor(config: RunConfig, sw2: float, sb2: float) -> tuple[float, float]:
    """(chi_1, q*): the per-layer factor of E(dL/dz)^2 deep in the net and the variance phi receives
    there. A residual stream keeps growing: no fixed point (NaN, NaN)."""
    act = config.activation
    if config.residual != "none":
        return math.nan, math.nan
    if config.norm == "none":
        q_star = fixed_point(act, sw2, sb2)
        return chi(act, q_star, sw2), q_star
    unit = _Moments.of(act, 1.0)
    if config.norm == "batch":  # Yang et al. 2019, large batch: pi / (pi - 1) for ReLU
        return unit.dsq / (unit.sq - unit.mean**2), 1.0
    return sw2 * unit.dsq / (sw2 * unit.sq + sb2), 1.0


def _fit_slope(log_norms: np.ndarray) -> float:
    """Least-squares slope of ln||dL/dz_l|| over the hidden layers, per layer towards the input."""
    return float(-np.polyfit(np.arange(len(log_norms)), log_norms, 1)[0])


@dataclass(frozen=True)
class ForwardMaps:
    """The q-map and c-map from the measured input (Poole et al. 2016, Schoenholz et al. 2017)."""

    q: np.ndarray  # predicted mean squared pre-activation of each hidden layer's z
    c: np.ndarray  # predicted mean correlation between two examples' z, per hidden layer
    c_star: float  # the c-map's fixed point at q*
    xi_c: float  # the correlation depth scale at c*


def forward_maps(config: RunConfig, input_sq: float, input_cross: float, in_features: int = 784) -> ForwardMaps | None:
    """How the length q and the correlation c of the pre-activations z = W h + b propagate from
    the input, layer by layer: z_0's q and c from the input's mean square x.x/n and cross product
    (monitor.square_and_cross: the mean square times the mean cosine of two examples), then
        q_{l+1} = sigma_w^2 E[phi(u)^2] + sigma_b^2,    c_{l+1} = (sigma_w^2 E[phi(u_a) phi(u_b)] + sigma_b^2) / q_{l+1}
    with (u_a, u_b) Gaussian of variance q_l and correlation c_l. For plain nets only (None with a
    normalization layer or residual blocks: their forward maps are not modelled here)."""
    if config.norm != "none" or config.residual != "none":
        return None
    act, width = config.activation, config.width
    sw2_in, sb2_in = sigma_w2_of(config, in_features, width), sigma_b2_of(config, in_features)
    sw2, sb2 = sigma_w2_of(config, width, width), sigma_b2_of(config, width)
    q = sw2_in * input_sq + sb2_in
    c = (sw2_in * input_cross + sb2_in) / q if q > 0 else 1.0
    qs, cs = [], []
    for _ in range(config.depth - 1):
        qs.append(q)
        cs.append(c)
        if not q < Q_OVERFLOW:  # beyond what the quadrature (and a float) can follow: no prediction
            q, c = math.nan, math.nan
            continue
        # not capped at Q_MAX: an exploding net's q really grows by its factor at every layer
        q_next = length_map(act, q, sw2, sb2)
        c = min((sw2 * _pair_mean(ACTIVATIONS[act].phi, q, c) + sb2) / q_next, 1.0) if q_next > 0 else 1.0
        q = q_next
    last = next(v for v in reversed(qs) if math.isfinite(v))
    q_star = fixed_point(act, sw2, sb2, q0=min(last, Q_MAX))
    c_star = correlation_fixed_point(act, q_star, sw2, sb2)
    return ForwardMaps(np.array(qs), np.array(cs), c_star, correlation_depth(act, q_star, sw2, sb2, c_star))


def jacobian_mean_sq(config: RunConfig, q: np.ndarray) -> float:
    """The mean squared singular value of J = dz_{H-1}/dz_0 at init (Pennington et al. 2017):
    tr(J J^T) / width = the product over hidden layers l = 0 .. H-2 of chi_l = sigma_w^2 E[phi'(z_l)^2]
    with z_l ~ N(0, q_l), the forward q-map's lengths (plain nets: where forward_maps exists). The
    mean is all the theory gives here: orthogonal and Gaussian weights share it, not the spread."""
    sw2 = sigma_w2_of(config, config.width, config.width)
    return float(np.prod([chi(config.activation, float(q_l), sw2) for q_l in q[:-1]]))


def measured_correlation_depth(c: np.ndarray, c_star: float) -> float:
    """xi_c from the decay of |c_l - c*| over the hidden layers: -1 / slope of ln|c_l - c*| (NaN
    where it does not decay, or with fewer than 3 layers still away from c*)."""
    gap = np.abs(np.asarray(c, dtype=float) - c_star)
    keep = np.isfinite(gap) & (gap > 1e-6)
    if keep.sum() < 3:
        return math.nan
    slope = np.polyfit(np.flatnonzero(keep), np.log(gap[keep]), 1)[0]
    return float(-1 / slope) if slope < 0 else math.nan


def correlation_fixed_point(activation: str, q_star: float, sigma_w2: float, sigma_b2: float) -> float:
    """c*: the correlation map iterated from c = 0.5 at q*. Where q* -> 0 the network is in the
    ordered phase: c* = 1."""
    if q_star < 1e-12:
        return 1.0
    phi = ACTIVATIONS[activation].phi
    # the map alone (not its slope, which correlation_map also integrates)
    return _iterate(lambda c: min((sigma_w2 * _pair_mean(phi, q_star, c) + sigma_b2) / q_star, 1.0), 0.5, 200,
                    done=lambda c, nxt: abs(nxt - c) < 1e-10, valid=lambda c: -1.0 <= c <= 1.0)


def correlation_depth(activation: str, q_star: float, sigma_w2: float, sigma_b2: float,
                      c_star: float | None = None) -> float:
    """xi_c = -1/ln(chi_c(c*)) (c* computed unless given). Where q* -> 0 (ordered, c* = 1) chi_c = chi_1."""
    if q_star < 1e-12:
        return _depth_scale(chi(activation, q_star, sigma_w2))
    c = correlation_fixed_point(activation, q_star, sigma_w2, sigma_b2) if c_star is None else c_star
    return _depth_scale(correlation_map(activation, c, q_star, sigma_w2, sigma_b2)[1])


def _depth_scale(factor: float) -> float:
    if factor <= 0:
        return 0.0
    log = math.log(factor)
    return math.inf if abs(log) < 1e-9 else abs(1 / log)


def measured_slope(backprop_norms: np.ndarray) -> float:
    """Least-squares slope of ln||dL/dh_l|| over the hidden layers (all but the output layer),
    per layer towards the input. NaN with fewer than 3 hidden layers or non-positive norms."""
    hidden = np.asarray(backprop_norms, dtype=float)[:-1]
    if len(hidden) < 3 or not np.all(hidden > 0) or not np.all(np.isfinite(hidden)):
        return math.nan
    return _fit_slope(np.log(hidden))


# -- through time: a vanilla RNN (recurrent.py, arch rnn) -------------------------------------------

@dataclass(frozen=True)
class TimePrediction:
    log_norms: np.ndarray  # predicted ln||dL/dh_t|| for t = 0..T-1, the last one 0
    slope: float  # the line fit of log_norms over every t, per step towards t = 0 (> 0: exploding)
    chi: float  # chi at the length map's fixed point with the mean input term (NaN where none)

    def slope_at(self, times: np.ndarray) -> float:
        """The line fit of log_norms at the time points a monitor keeps (monitor_time.time_points),
        as measured_time_slope fits the measured norms there: compare this, not `slope`."""
        times = np.asarray(times, dtype=np.int64)
        return _time_slope(times, self.log_norms[times])


def predict_time(config: RunConfig, input_sq_by_time: np.ndarray) -> TimePrediction:
    """Mean-field prediction of ||dL/dh_t|| through the T steps of a vanilla RNN at initialization
    (Chen, Pennington and Schoenholz 2018: the MLP's chi, weights shared over time, gradients taken
    independent of the forward weights). With p_t = `input_sq_by_time`, the inputs' mean square at
    step t (length T),
        q_0 = sigma_u^2 p_0 + sigma_b^2,   q_t = sigma_w^2 E[phi(sqrt(q_t-1) z)^2] + sigma_u^2 p_t + sigma_b^2,
        ln||dL/dh_t-1|| = ln||dL/dh_t|| + ln(chi_t) / 2,   chi_t = sigma_w^2 E[phi'(sqrt(q_t) z)^2],
    sigma_w^2 = H Var[W] (times recurrent_gain^2), sigma_u^2 = d Var[U], sigma_b^2 = Var[b_ih] +
    Var[b_hh]; init default draws all four U(+-1/sqrt(H)): Var 1/(3H), whatever the fan-in.
    Each example has its own q_t: where p_t varies across examples (MNIST's rows), pass their
    profiles (N, T) rather than the mean: each is predicted (~7 ms a profile for rows, ~150 ms for
    pixels), and log_norms is what the norm over the batch sees, 0.5 ln mean_n exp(2 ln||dL/dh_t||_n).
    On MNIST rows (tanh, he_normal, width 1024) the mean profile predicted a slope of -0.305, the 256
    examples' profiles -0.240, Monte Carlo measured -0.236 over them. chi is at the mean p either way.
    ValueError where no prediction is made: gated cells, an identity W (not i.i.d.), an MLP.

    Past T ~ H steps a near-linear net (small q) departs from this: ||(W^T)^n v|| then grows with W's
    spectral radius, above sqrt(sigma_w^2) by O(sqrt(ln H / H)) (pixels, tanh, sigma_w^2 = 0.6, H =
    512, one net: measured slope -0.243 per step against -0.257)."""
    if config.arch in ("lstm", "gru"):
        raise ValueError("gated cells: no mean-field prediction here")
    if config.arch != "rnn":
        raise ValueError(f"arch {config.arch}: not a recurrent net (theory.predict is the MLP's)")
    if config.recurrent_init == "identity":
        raise ValueError("recurrent_init identity: W is not i.i.d., no mean-field prediction")
    (T, d), H, act = SEQUENCE_SHAPES[config.sequence], config.width, config.activation
    p = np.asarray(input_sq_by_time, dtype=float)
    if p.ndim not in (1, 2) or p.shape[-1] != T or p.size == 0:
        raise ValueError(f"input_sq_by_time has shape {p.shape}: expected ({T},) or (examples, {T})")
    rule = config if config.recurrent_init == "same" else dataclasses.replace(config, init=config.recurrent_init)
    su2 = d / (3 * H) if config.init == "default" else sigma_w2_of(config, d, H)
    sw2 = sigma_w2_of(rule, H, H) * config.recurrent_gain**2
    sb2 = sigma_b2_of(config, H) + sigma_b2_of(rule, H)  # b_ih and b_hh (default: 1/(3H) each)
    each = np.array([_time_log_norms(act, profile, sw2, su2, sb2) for profile in p.reshape(-1, T)])
    top = each.max(axis=0)  # the batch's norm: a log-mean-exp over examples, each with its last at 0
    with np.errstate(invalid="ignore"):
        log_norms = top + 0.5 * np.log(np.mean(np.exp(2 * (each - top)), axis=0))
    q_star = fixed_point(act, sw2, sb2 + su2 * float(p.mean()))
    return TimePrediction(log_norms, _time_slope(np.arange(T), log_norms),
                          chi(act, q_star, sw2) if q_star < Q_MAX else math.nan)


def _time_log_norms(act: str, p: np.ndarray, sw2: float, su2: float, sb2: float) -> np.ndarray:
    """ln||dL/dh_t|| - ln||dL/dh_T-1|| for one profile p_t of input mean squares."""
    q, chis = sb2 + su2 * p[0], np.empty(len(p))
    for t in range(len(p)):
        if t > 0:
            q = min(length_map(act, q, sw2, sb2 + su2 * p[t]), Q_MAX)
        chis[t] = chi(act, q, sw2)
    with np.errstate(divide="ignore"):
        steps = np.log(chis[1:]) / 2  # ln||dL/dh_t-1|| - ln||dL/dh_t||, t = 1..T-1
    return np.append(np.cumsum(steps[::-1])[::-1], 0.0)


def measured_time_slope(times: np.ndarray, grad_norms: np.ndarray) -> float:
    """Least-squares slope of ln||dL/dh_t|| over the time points `times`, any spacing (pixels keeps
    every 29th of 784 steps), per step towards t = 0 (> 0: exploding), over the finite positive
    norms; NaN with fewer than 2. TimePrediction.slope_at fits the prediction the same way."""
    norms = np.asarray(grad_norms, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _time_slope(np.asarray(times, dtype=float), np.where(norms > 0, np.log(norms), math.nan))


def _time_slope(times: np.ndarray, logs: np.ndarray) -> float:
    """-d(logs)/d(times) by least squares over the finite entries (NaN with fewer than 2 times)."""
    keep = np.isfinite(logs) & np.isfinite(times)
    t, y = times[keep].astype(float), logs[keep]
    spread = np.sum((t - t.mean()) ** 2) if len(t) >= 2 else 0.0
    return float(-np.sum((t - t.mean()) * (y - y.mean())) / spread) if spread > 0 else math.nan
