"""Paper reproductions: for a spec with `reproduces: <paper>`, a report section that sets the
paper's numbers or findings beside the measured ones. One function per paper of config.PAPERS."""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import theory
from ..norms import NORMS
from .figure import Figure, encode

# Glorot & Bengio 2010, Table 1, MNIST column: test error (%) after training; "N" (normalized
# init) is xavier_uniform, the plain rows used U(+-1/sqrt(fan_in)), PyTorch's default.
GLOROT_TABLE1_MNIST = {
    ("softsign", "default"): 1.64,
    ("softsign", "xavier_uniform"): 1.72,
    ("tanh", "default"): 1.76,
    ("tanh", "xavier_uniform"): 1.64,
    ("sigmoid", "default"): 2.21,
}
CONVERGED_ACC = 0.5  # a run "converges" if its final test accuracy is above this (chance is 0.10)


@dataclass
class Section:
    paper: str
    finding: str
    columns: list[str]
    rows: list[list[object]]
    figures: list[Figure] = field(default_factory=list)
    note: str = ""


def _outcomes(group: pd.DataFrame) -> str:
    """A group of runs' diagnoses, counted: '2 healthy, 1 vanishing'."""
    return ", ".join(f"{n} {d}" for d, n in group.diagnosis.value_counts().items())


def _mean_sd(values: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def glorot2010(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    rows = []
    for (activation, init), group in runs.groupby(["activation", "init"]):
        paper = GLOROT_TABLE1_MNIST.get((activation, init))
        rows.append([activation, "normalized (xavier_uniform)" if init == "xavier_uniform" else "standard (default)",
                     "n/a" if paper is None else f"{paper:.2f}", _mean_sd(1 - group.test_acc, 100), len(group)])
    return Section(
        "Glorot & Bengio 2010",
        "With 5 hidden layers of 1000 units, sigmoid trains worst; the normalized init helps tanh; "
        "softsign is robust to the init. Back-propagated gradients shrink towards the input with the "
        "standard init and stay level with the normalized one (see the gradient-flow figure).",
        ["activation", "init", "paper: test error %", "measured: test error %", "runs"],
        rows,
        note="Paper numbers: their Table 1, MNIST column (the paper did not report sigmoid with the normalized init).",
    )


def _steps_to_loss(layers: pd.DataFrame, run_id: str, threshold: float = 0.5, window: int = 20) -> float:
    """First step at which the training loss, averaged over `window` steps, falls below `threshold`."""
    loss = layers[(layers.run_id == run_id) & (layers.layer == 0)].sort_values("step").set_index("step").loss
    smooth = loss.rolling(window, min_periods=window).mean()
    below = smooth[smooth < threshold]
    return float(below.index[0]) if len(below) else float("nan")


def he2015(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    paper = {(22, "xavier_normal"): "converges (later)", (22, "he_normal"): "converges (sooner)",
             (30, "xavier_normal"): "stalls", (30, "he_normal"): "converges"}
    rows = []
    for (depth, init), group in runs.groupby(["depth", "init"]):
        steps = pd.Series([_steps_to_loss(layers, r) for r in group.run_id])
        rows.append([depth, init, paper.get((depth, init), "n/a"), f"{int(steps.notna().sum())} of {len(group)}",
                     _mean_sd(steps, digits=0), _mean_sd(group.test_acc, digits=3)])
    return Section(
        "He et al. 2015",
        "ReLU nets: with Xavier init the error signal halves in variance at every layer "
        "(chi_1 = 1/2), with He init it is preserved (chi_1 = 1). At depth 22 both train, He's sooner; "
        "at depth 30 Xavier stalls.",
        ["depth", "init", "paper", "measured: runs that converged", "steps to converge", "final test accuracy"],
        rows,
        note="Converged: the training loss, averaged over 20 steps, fell below 0.5 within the budget. Paper: "
             "their Figures 2 and 3 (ImageNet, convolutional nets); here MLPs of the same depths on MNIST.",
    )


def pascanu2013(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    return _clipping_section(
        runs, layers, "Clipping the global gradient norm keeps an exploding model trainable; any threshold from about "
        "half to ten times the average gradient norm works.")


def pascanu2013_rnn(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    return _clipping_section(
        runs, layers, "In a recurrent net whose gradients explode through time, clipping the global gradient norm "
        "lets it train where it fails unclipped; too small a threshold slows training (the paper's Section 3.2).")


def le2015(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    rows = []
    for (arch, activation, recurrent_init), group in runs.groupby(["arch", "activation", "recurrent_init"]):
        net = arch.upper() if arch != "rnn" else (
            "IRNN (ReLU, identity W)" if recurrent_init == "identity" else f"RNN ({activation})")
        paper = "trains" if arch == "lstm" or recurrent_init == "identity" else "does not train"
        outcomes = _outcomes(group)
        rows.append([net, group.sequence.iloc[0], paper, _mean_sd(group.test_acc, digits=3), outcomes, len(group)])
    return Section(
        "Le, Jaitly & Hinton 2015",
        "On MNIST read pixel by pixel, an RNN of ReLUs with an identity recurrent init (IRNN) trains about "
        "as well as an LSTM, where an RNN of tanh units does not: its gradient vanishes through time.",
        ["net", "sequence", "paper", "test accuracy", "diagnosis", "runs"],
        rows,
        note="The paper's finding is on pixels (784 steps); a reduced budget reads rows (28 steps), where "
             "the tanh RNN's gradient has far fewer steps to vanish through.",
    )


def _clipping_section(runs: pd.DataFrame, layers: pd.DataFrame, finding: str) -> Section:
    """Pascanu et al.'s comparison: each norm-clipping threshold (and none), as a multiple of the
    mean unclipped gradient norm, with how often it clipped and the test accuracy it reached."""
    unclipped = layers[(layers["clip"] == "none") & (layers.layer == 0)]
    mean_norm = float(unclipped.global_norm_pre_clip.replace([np.inf, -np.inf], np.nan).mean())
    rows = []
    for (clip, threshold), group in runs.groupby(["clip", "clip_threshold"]):
        per_step = layers[layers.run_id.isin(group.run_id) & (layers.layer == 0)]
        label = "none" if clip == "none" else f"{threshold:g}"
        ratio = "" if clip == "none" else f"{threshold / mean_norm:.2f}"
        outcomes = _outcomes(group)
        rows.append([label, ratio, f"{per_step.clip_active.mean():.2f}", _mean_sd(group.test_acc, digits=3), outcomes])
    rows.sort(key=lambda r: (r[0] != "none", float(r[0]) if r[0] != "none" else 0.0))
    return Section(
        "Pascanu et al. 2013",
        finding,
        ["norm clip threshold", "x mean unclipped norm", "fraction of steps clipped", "test accuracy", "diagnosis"],
        rows,
        note=f"Mean unclipped global gradient norm, measured over the unclipped runs: {mean_norm:.3g}.",
    )


def schoenholz2017(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    runs = runs.assign(sigma_w2=(runs.init_gain**2).round(3))
    sigma_b2 = float(runs.bias_std.iloc[0] ** 2)
    table = runs.pivot_table(index="depth", columns="sigma_w2", values="test_acc")
    grid = np.linspace(runs.sigma_w2.min(), runs.sigma_w2.max(), 25)
    activation = runs.activation.iloc[0]
    xi_c = [theory.correlation_depth(activation, theory.fixed_point(activation, s, sigma_b2), s, sigma_b2) for s in grid]
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    sns.heatmap(table, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "test accuracy"})
    ax.invert_yaxis()
    # heatmap cells sit at integer positions: map sigma_w^2 and depth onto them by interpolation
    xs = np.interp(grid, table.columns.to_numpy(dtype=float), np.arange(len(table.columns)) + 0.5)
    ys = np.interp(6 * np.array(xi_c), table.index.to_numpy(dtype=float), np.arange(len(table.index)) + 0.5,
                   left=np.nan, right=len(table.index))
    ax.plot(xs, ys, "w--", lw=2, label="6 xi_c (theory)")
    ax.legend(loc="upper right")
    ax.set(xlabel="sigma_w^2", ylabel="depth", title=f"{activation}, sigma_b^2 = {sigma_b2:.2f}")
    figure = encode(fig, "schoenholz", "Trainability against depth and sigma_w^2")
    rows = []
    for s in table.columns:
        xi = theory.correlation_depth(activation, theory.fixed_point(activation, s, sigma_b2), s, sigma_b2)
        trained = table[s][table[s] > CONVERGED_ACC]
        rows.append([f"{s:g}", f"{6 * xi:.0f}", int(trained.index.max()) if len(trained) else "none"])
    return Section(
        "Schoenholz et al. 2017",
        "Signals propagate over a depth scale xi_c that diverges at the order-to-chaos boundary "
        "(sigma_w^2 ~ 1.76 for tanh with sigma_b^2 = 0.05); networks deeper than about 6 xi_c do not train.",
        ["sigma_w^2", "paper's bound: 6 xi_c (theory)", "measured: deepest depth that trained"],
        rows,
        [figure],
        note=f"Trained: final test accuracy above {CONVERGED_ACC}. Reduced budget; see the spec's header.",
    )


YANG_RELU_FACTOR = np.pi / (np.pi - 1)  # Yang et al. 2019: E||dL/dz||^2 per layer, ReLU + BatchNorm, large batch


def yang2019(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    rows = []
    for (activation, norm, depth), group in runs.groupby(["activation", "norm", "depth"]):
        measured, predicted = group.slope_measured.dropna(), group.slope_pred.dropna()
        if norm == "batch":
            paper = f"{YANG_RELU_FACTOR:.3f} (pi/(pi-1))" if activation == "relu" else "> 1 (explodes)"
        else:
            paper = "1 (critical init)" if activation == "relu" else "n/a"
        rows.append([activation, NORMS[norm].label or "none", depth, paper,
                     f"{np.exp(2 * predicted.mean()):.3f}" if len(predicted) else "n/a",
                     f"{np.exp(2 * measured.mean()):.3f}" if len(measured) else "n/a",
                     _mean_sd(measured, digits=3), _mean_sd(predicted, digits=3), len(group)])
    data = runs.assign(norm=[NORMS[norm].label or "none" for norm in runs["norm"]])
    fig, axes = plt.subplots(1, data.activation.nunique(), figsize=(5.2 * data.activation.nunique(), 3.6),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, (activation, group) in zip(axes[0], data.groupby("activation")):
        sns.lineplot(data=group, x="depth", y="slope_measured", hue="norm", marker="o", errorbar=("pi", 100),
                     ax=ax, hue_order=["none", NORMS["batch"].label])
        predicted = group.groupby(["norm", "depth"]).slope_pred.mean().reset_index()
        for norm, line in predicted.groupby("norm"):
            ax.plot(line.depth, line.slope_pred, color="black", linestyle=(0, (1.5, 1.5)), marker="x",
                    label=f"theory, {norm}")
        if activation == "relu":  # the paper's closed form is ReLU's
            ax.axhline(0.5 * np.log(YANG_RELU_FACTOR), color="#d1495b", linewidth=0.8, linestyle="--",
                       label="paper: ReLU + BN, ln(pi/(pi-1))/2")
        ax.set(title=activation, ylabel="slope of ln||dL/dz|| per layer", xlabel="depth")
        ax.legend(fontsize=7)
    figure = encode(fig, "yang2019", "Gradient explosion under BatchNorm, measured against theory")
    return Section(
        "Yang et al. 2019",
        "BatchNorm makes gradients explode at initialization: for ReLU, E||dL/dz||^2 grows by pi/(pi-1) = "
        "1.47 per layer towards the input in the large-batch limit, whatever the init, where the plain net "
        "with He init keeps it level (factor 1). Smaller batches explode faster.",
        ["activation", "norm", "depth", "paper: factor per layer", "theory: factor", "measured: factor",
         "measured slope", "predicted slope", "runs"],
        rows,
        [figure],
        note="Factor: exp(2 x slope), the growth of E||dL/dz||^2 per layer towards the input, from the mean "
             "slope over seeds. The theory is the large-batch limit; at batch 256 Monte Carlo puts the finite-batch "
             "excess under 1% per layer (docs/theory.md, where the assumptions fail).",
    )


def _families(runs: pd.DataFrame) -> pd.Series:
    labels = runs.remedy if "remedy" in runs else pd.Series("", index=runs.index)
    return labels.replace("", "plain")


def _depth_table(runs: pd.DataFrame, paper: dict[str, str]) -> tuple[list[list[object]], str, Figure]:
    """Per family and depth: accuracy, how many runs trained, their outcomes; the depth at which
    each family stops training (the first depth where not every run trained); and accuracy
    against depth as a figure."""
    runs = runs.assign(family=_families(runs))
    rows, stops = [], {}
    for (family, depth), group in runs.groupby(["family", "depth"]):  # depths in increasing order
        trained = int((group.test_acc > CONVERGED_ACC).sum())
        outcomes = _outcomes(group)
        rows.append([family, depth, paper.get(family, "n/a"), f"{trained} of {len(group)}",
                     _mean_sd(group.test_acc, digits=3), outcomes])
        if trained < len(group):
            stops.setdefault(family, depth)
    summary = "; ".join(f"{family}: {f'depth {stops[family]}' if family in stops else 'trains at every depth'}"
                        for family in sorted(runs.family.unique()))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    sns.lineplot(data=runs, x="depth", y="test_acc", hue="family", marker="o", errorbar=("pi", 100), ax=ax)
    ax.axhline(CONVERGED_ACC, color="black", linewidth=0.8, linestyle=":", label=f"trained: above {CONVERGED_ACC}")
    ax.axhline(0.1, color="#d1495b", linewidth=0.8, linestyle="--", label="chance")
    ax.set(xscale="log", ylim=(0, 1), xlabel="depth (log scale)", ylabel="final test accuracy")
    ax.set_xticks(sorted(runs.depth.unique()), labels=[str(d) for d in sorted(runs.depth.unique())])
    ax.legend(fontsize=7, loc="lower left")
    figure = encode(fig, "depth", "Final test accuracy against depth, per family")
    return rows, summary, figure


def _depth_section(runs: pd.DataFrame, paper: str, finding: str, says: dict[str, str], source: str) -> Section:
    """A section of families trained at growing depth (he2016, de2020): where each stops training."""
    rows, summary, figure = _depth_table(runs, says)
    return Section(
        paper, finding,
        ["family", "depth", "paper", "measured: runs that trained", "final test accuracy", "diagnosis"],
        rows,
        [figure],
        note=f"Where each family stops training (the first depth at which a run ends at or below accuracy "
             f"{CONVERGED_ACC}): {summary}. Paper: {source}",
    )


def he2016(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    return _depth_section(
        runs, "He et al. 2016",
        "Deeper plain networks train worse, BatchNorm notwithstanding (the degradation problem); with "
        "identity shortcuts the same networks keep training as depth grows.",
        {"BatchNorm": "degrades with depth", "BatchNorm + residual 1": "keeps training"},
        "their Figures 1 and 4 (CIFAR-10 and ImageNet, convolutional nets); here MLPs on MNIST at a fixed step budget.",
    )


def de2020(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    return _depth_section(
        runs, "De & Smith 2020",
        "Without normalization a deep residual network explodes (each block adds its variance to the "
        "stream); BatchNorm trains it by shrinking each residual branch relative to the skip, and SkipInit, a "
        "learnable scalar on each branch that starts at 0, trains it as well without any normalization.",
        {"residual 1": "explodes with depth", "BatchNorm + residual 1": "trains", "SkipInit": "trains, without normalization"},
        "their Table 1 and Figure 2 (Wide-ResNets on CIFAR-10, ResNet-50 on ImageNet); here MLPs on MNIST.",
    )


def pennington2017(runs: pd.DataFrame, layers: pd.DataFrame) -> Section:
    rows = []
    for (init, depth), group in runs.groupby(["init", "depth"]):
        rows.append(["orthogonal" if init == "orthogonal" else "Gaussian", depth,
                     "near 1 at every depth" if init == "orthogonal" else "spreads with depth",
                     _mean_sd(group.jac_mean_sq_pred, digits=3), _mean_sd(group.jac_mean_sq, digits=3),
                     _mean_sd(group.jac_log10_sd, digits=2), _mean_sd(np.log10(group.jac_sv_max / group.jac_sv_min)),
                     _mean_sd(group.test_acc, 100, 1), len(group)])
    data = runs.assign(weights=np.where(runs["init"] == "orthogonal", "orthogonal", "Gaussian"),
                       test_error=100 * (1 - runs.test_acc))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    order = ["orthogonal", "Gaussian"]
    sns.lineplot(data=data, x="depth", y="jac_log10_sd", hue="weights", hue_order=order, marker="o",
                 errorbar=("pi", 100), ax=axes[0])
    axes[0].set(xscale="log", title="spread of J's singular values at init",
                ylabel="sd of log10 singular value", xlabel="depth")
    sns.lineplot(data=data, x="depth", y="test_error", hue="weights", hue_order=order, marker="o",
                 errorbar=("pi", 100), ax=axes[1])
    axes[1].set(xscale="log", title="after training", ylabel="test error %", xlabel="depth")
    for ax in axes:
        ax.set_xticks(sorted(data.depth.unique()), labels=[str(d) for d in sorted(data.depth.unique())])
        ax.minorticks_off()
    figure = encode(fig, "pennington2017", "Dynamical isometry: orthogonal against Gaussian weights at the same chi")
    return Section(
        "Pennington, Schoenholz & Ganguli 2017",
        "At the edge of chaos orthogonal and Gaussian weights give the input-output Jacobian the same mean "
        "squared singular value, but orthogonal weights keep its whole spectrum near 1 (dynamical isometry) "
        "while Gaussian weights spread it over orders of magnitude as depth grows; the isometric nets learn "
        "faster.",
        ["weights", "depth", "paper: spectrum", "theory: mean sv^2", "measured: mean sv^2",
         "measured: sd of log10 sv", "measured: log10(max/min)", "test accuracy %", "runs"],
        rows,
        [figure],
        note="Theory: the product over layers of chi_l = sigma_w^2 E[phi'(z_l)^2] at the q-map's lengths "
             "(pipeline/theory.py); the paper's spectra are from free probability (their Figure 2); here width 256 "
             "and one epoch of MNIST instead of CIFAR-10.",
    )


SECTIONS = {"glorot2010": glorot2010, "he2015": he2015, "pascanu2013": pascanu2013,
            "pascanu2013_rnn": pascanu2013_rnn, "le2015": le2015, "schoenholz2017": schoenholz2017,
            "yang2019": yang2019, "he2016": he2016, "de2020": de2020, "pennington2017": pennington2017}


def section(paper: str | None, runs: pd.DataFrame, layers: pd.DataFrame) -> Section | None:
    if paper is None or runs.empty or layers.empty:
        return None
    return SECTIONS[paper](runs, layers)
