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

import math
from dataclasses import dataclass

import numpy as np

from .activations import ACTIVATIONS
from .config import RunConfig

_GAUSS_LEGENDRE = {n: np.polynomial.legendre.leggauss(n) for n in (4, 8)}


def _panels(q: float, n: int = 160, order: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a composite Gauss-Legendre rule on x in [-12 sd, 12 sd]: panels grow
    geometrically away from 0, so both a narrow Gaussian (q -> 0) and a narrow feature of phi
    (tanh' at large q) are resolved, and 0 (ReLU's kink) is a panel edge."""
    sd = math.sqrt(q)
    edges = np.geomspace(1e-4 * min(sd, 1.0), 12 * max(sd, 1.0), n)
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


def fixed_point(activation: str, sigma_w2: float, sigma_b2: float, q0: float = 1.0, iters: int = 2000) -> float:
    """q* of the length map, by iteration from q0. ReLU with He init has every q as a fixed point
    (q0 is kept); below that gain q* -> 0 (stops under 1e-12); above it, rectifiers have no fixed
    point: the iteration stops at Q_MAX, where their chi no longer depends on q."""
    q = q0
    for _ in range(iters):
        nxt = length_map(activation, q, sigma_w2, sigma_b2)
        if abs(nxt - q) <= 1e-12 * max(1.0, q) or nxt < 1e-12 or nxt > Q_MAX:
            return min(nxt, Q_MAX)
        q = nxt
    return q


def correlation_map(activation: str, c: float, q: float, sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """(next correlation, chi_c): how the correlation c between two inputs' pre-activations (both of
    variance q) propagates, with u1 = x1 and u2 = c x1 + sqrt(1 - c^2) x2, x1, x2 ~ N(0, q)."""
    phi, dphi = ACTIVATIONS[activation].phi, ACTIVATIONS[activation].dphi
    x, w = _panels(q, n=24, order=4)  # 2-D: a coarser rule keeps it to ~1 ms
    density = w * np.exp(-x * x / (2 * q)) / math.sqrt(2 * math.pi * q)
    x1, x2 = np.meshgrid(x, x, indexing="ij")
    weight = np.outer(density, density)
    u2 = c * x1 + math.sqrt(max(1 - c * c, 0.0)) * x2
    c_next = (sigma_w2 * np.sum(weight * phi(x1) * phi(u2)) + sigma_b2) / q
    return float(c_next), float(sigma_w2 * np.sum(weight * dphi(x1) * dphi(u2)))


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
    chi1: float  # at the fixed point q* of the hidden layers
    q_star: float
    slope: float  # ln(chi1) / 2: d ln||dL/dh|| per layer towards the input, at the fixed point
    xi: float  # gradient depth scale -1/ln(chi1) (inf at criticality)
    layer_slopes: tuple[float, ...]  # finite depth: ln(chi_l)/2 for each hidden->hidden step
    finite_slope: float  # their mean: what a line fit over the hidden layers should find


def predict(config: RunConfig, input_sq_mean: float = 1.0, in_features: int = 784) -> Prediction:
    """Mean-field prediction for a config; `input_sq_mean` is E[x^2] of the inputs (1 for
    normalized MNIST), from which the finite-depth variances q_l are propagated layer by layer."""
    w = config.width
    sw2, sb2 = sigma_w2_of(config, w, w), sigma_b2_of(config, w)
    q = sigma_w2_of(config, in_features, w) * input_sq_mean + sigma_b2_of(config, in_features)
    q_star = fixed_point(config.activation, sw2, sb2, q0=q)
    chi1 = chi(config.activation, q_star, sw2)
    # finite depth: hidden layer l's variance q_l, and the factor chi_l between layer l+1's error and layer l's
    slopes = []
    for _ in range(config.depth - 2):
        slopes.append(0.5 * math.log(chi(config.activation, q, sw2)))
        q = min(length_map(config.activation, q, sw2, sb2), Q_MAX)
    return Prediction(
        chi1=chi1,
        q_star=q_star,
        slope=0.5 * math.log(chi1),
        xi=_depth_scale(chi1),
        layer_slopes=tuple(slopes),
        finite_slope=float(np.mean(slopes)) if slopes else math.nan,
    )


def correlation_depth(activation: str, q_star: float, sigma_w2: float, sigma_b2: float) -> float:
    """xi_c: iterate the correlation map from c = 0.5 to its fixed point c*, then -1/ln(chi_c(c*)).
    Where q* -> 0 the network is in the ordered phase (c* = 1) and chi_c = chi_1."""
    if q_star < 1e-12:
        return _depth_scale(chi(activation, q_star, sigma_w2))
    c = 0.5
    for _ in range(200):
        nxt, _ = correlation_map(activation, c, q_star, sigma_w2, sigma_b2)
        nxt = min(nxt, 1.0)
        if abs(nxt - c) < 1e-10:
            break
        c = nxt
    _, chi_c = correlation_map(activation, c, q_star, sigma_w2, sigma_b2)
    return _depth_scale(chi_c)


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
    layers = np.arange(len(hidden))
    return float(-np.polyfit(layers, np.log(hidden), 1)[0])
