"""Figures of the probe results (matplotlib, Agg backend), one function per figure.

Every function takes the result dict of one probe and returns a matplotlib Figure;
`render_figures` turns all that apply into PNG bytes.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

DPI = 90


def _head_label(layer: int, head: int) -> str:
    return f"L{layer} h{head}"


def beta_heatmap(write: dict):
    """Beta per (layer, head) row over the tokens of the text."""
    per_token = np.asarray(write["per_token"])                                     # [L, H, N]
    L, H, N = per_token.shape
    fig, ax = plt.subplots(figsize=(12, 0.35 * L * H + 1.6), dpi=DPI)
    image = ax.imshow(per_token.reshape(L * H, N), aspect="auto", interpolation="nearest",
                      cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(L * H), [_head_label(layer, h) for layer in write["layers"] for h in range(H)])
    ax.set_xlabel("token position")
    ax.set_title("write strength beta per GDN layer and head")
    fig.colorbar(image, ax=ax, label="beta", pad=0.01)
    fig.tight_layout()
    return fig


def beta_frequency(write: dict):
    """Mean beta of each token type against its count in the text (log scale)."""
    types = write["types"]
    counts, mean_beta = np.asarray(types["counts"]), np.asarray(types["mean_beta"])
    ranked = counts >= write["min_count"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=DPI)
    ax.scatter(counts[ranked], mean_beta[ranked], s=10, label=f"seen >= {write['min_count']} times")
    ax.scatter(counts[~ranked], mean_beta[~ranked], s=10, color="lightgrey", label="rarer")
    ax.set_xscale("log")
    ax.set_xlabel("token count in the text")
    ax.set_ylabel("mean beta")
    spearman = write["frequency_spearman"]
    ax.set_title("write strength against frequency" + ("" if spearman is None else f" (Spearman {spearman:.2f})"),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def half_life_histograms(horizon: dict):
    """Histogram of the half-life per GDN layer (rows) and head (columns), log-spaced bins."""
    edges = np.asarray(horizon["histogram"]["edges"])
    counts = np.asarray(horizon["histogram"]["counts"])                            # [L, H, bins]
    L, H, _ = counts.shape
    fig, axes = plt.subplots(L, H, figsize=(2.6 * H, 2.0 * L + 0.6), dpi=DPI, squeeze=False, sharex=True)
    for i, layer in enumerate(horizon["layers"]):
        for h in range(H):
            ax = axes[i, h]
            ax.stairs(counts[i, h], edges, fill=True, alpha=0.7)
            ax.set_xscale("log")
            if horizon["window"]:
                ax.axvline(horizon["window"], color="tab:red", linestyle="--", linewidth=1, label="window W")
            if horizon["train_context"]:
                ax.axvline(horizon["train_context"], color="tab:green", linestyle=":", linewidth=1,
                           label="training context")
            ax.set_title(_head_label(layer, h), fontsize=9)
            ax.tick_params(labelsize=7)
            if i == L - 1:
                ax.set_xlabel("half-life (tokens)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("memory half-life -ln 2 / g per token", fontsize=10)
    fig.tight_layout()
    return fig


def eigenvalue_histograms(spectrum: dict):
    """Eigenvalues of A_t per GDN layer (one line per head), and ln|det A_t| along the text."""
    edges = np.asarray(spectrum["eigenvalues"]["edges"])
    counts = np.asarray(spectrum["eigenvalues"]["counts"])                         # [L, H, bins]
    log_det = np.asarray(spectrum["log_det"])                                      # [L, H, N]
    L, H, _ = counts.shape
    fig, axes = plt.subplots(2, L, figsize=(4.2 * L, 5.2), dpi=DPI, squeeze=False)
    for i, layer in enumerate(spectrum["layers"]):
        ax = axes[0, i]
        for h in range(H):
            ax.stairs(counts[i, h] / counts[i, h].sum(), edges, label=f"h{h}")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue of A_t")
        ax.set_title(f"layer {layer}: eigenvalues (K = {spectrum['K']})", fontsize=10)
        ax.legend(fontsize=7)

        ax = axes[1, i]
        n = log_det.shape[-1]
        smooth = max(1, n // 200)
        kernel = np.ones(smooth) / smooth
        for h in range(H):
            ax.plot(np.convolve(log_det[i, h], kernel, mode="valid"), linewidth=0.8, label=f"h{h}")
        ax.set_xlabel("token position")
        ax.set_ylabel(f"ln|det A_t| (mean of {smooth})" if smooth > 1 else "ln|det A_t|")
    fig.tight_layout()
    return fig


def memory_reader_curves(readers: dict):
    """Focus ratio and gate per memory block for each SWA layer (one line per head)."""
    layers = readers["per_layer"]
    positions = np.asarray(readers["positions"])
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 5.0), dpi=DPI, squeeze=False, sharex=True)
    for j, record in enumerate(layers):
        focus, gate = np.asarray(record["focus_per_block"]), np.asarray(record["gate_per_block"])
        for h in range(focus.shape[1]):
            axes[0, j].plot(positions, focus[:, h], marker=".", linewidth=0.8, label=f"h{h}")
            axes[1, j].plot(positions, gate[:, h], marker=".", linewidth=0.8, label=f"h{h}")
        axes[0, j].axhline(readers["diffuse_focus"], color="grey", linestyle="--", linewidth=0.8)
        axes[0, j].set_title(f"layer {record['layer']}: focus ratio 1 - H / ln K", fontsize=10)
        axes[1, j].set_title(f"layer {record['layer']}: gate (weight of the memory path)", fontsize=10)
        axes[1, j].set_ylim(0, 1)
        axes[1, j].set_xlabel("block start (token)")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    return fig


def state_rank_curves(state: dict):
    """Effective rank and norm of each GDN layer's state at every block start (one line per head)."""
    records = state["gdn"]
    positions = np.asarray(state["positions"])
    fig, axes = plt.subplots(2, len(records), figsize=(4.2 * len(records), 5.0), dpi=DPI, squeeze=False, sharex=True)
    for j, record in enumerate(records):
        rank, size = np.asarray(record["over_time"]["effective_rank"]), np.asarray(record["over_time"]["norm"])
        for h in range(rank.shape[1]):
            axes[0, j].plot(positions, rank[:, h], linewidth=0.9, label=f"h{h}")
            axes[1, j].plot(positions, size[:, h], linewidth=0.9, label=f"h{h}")
        axes[0, j].set_ylim(0, state["max_rank"] * 1.05)
        axes[0, j].set_title(f"layer {record['layer']}: effective rank (max {state['max_rank']})", fontsize=10)
        axes[1, j].set_title(f"layer {record['layer']}: ||S||_F", fontsize=10)
        axes[1, j].set_xlabel("block start (token)")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    return fig


def needle_figure(needle: dict):
    """Read SNR of the needle key per GDN head, the hidden-state similarity and the needle's effect per layer."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), dpi=DPI)
    labels, snr, control = [], [], []
    for record in needle["gdn"]:
        for h, (a, b) in enumerate(zip(record["snr_strongest"], record["snr_strongest_control"])):
            labels.append(_head_label(record["layer"], h))
            snr.append(a)
            control.append(b)
    ax = axes[0]
    if labels:
        x = np.arange(len(labels))
        ax.bar(x - 0.2, snr, width=0.4, label="needle in text")
        ax.bar(x + 0.2, control, width=0.4, label="control (no needle)")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set_ylabel("||S^T k|| / (||S||_F / sqrt K)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no GDN layer", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("read SNR of the needle key at the query", fontsize=10)

    hidden = needle["hidden"]
    layers = [f"{r['layer']} {r['type']}" for r in hidden]
    ax = axes[1]
    ax.plot(layers, [r["cos_needle"] for r in hidden], marker="o", label="needle")
    mean = np.array([r["baseline_mean"] for r in hidden])
    std = np.array([r["baseline_std"] for r in hidden])
    ax.plot(layers, mean, color="grey", label=f"other positions ({hidden[0]['baseline']})")
    ax.fill_between(range(len(layers)), mean - std, mean + std, color="grey", alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_title("cos(hidden at query end, hidden at needle)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[2]
    ax.bar(layers, [r["effect"] for r in hidden])
    ax.set_xlabel("layer")
    ax.set_title("needle's effect ||h - h_control|| / ||h_control||", fontsize=10)
    fig.tight_layout()
    return fig


def gradient_figure(gradients: dict):
    """Gradient norm per component and per layer (mixer and FFN)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), dpi=DPI)
    names = list(gradients["components"])
    norms = [gradients["components"][n]["grad_norm"] for n in names]
    axes[0].bar(names, norms)
    axes[0].set_yscale("log")
    axes[0].set_title(f"gradient L2 norm per component (loss {gradients['loss']:.3f})", fontsize=10)
    layers = gradients["layers"]
    x = np.arange(len(layers))
    axes[1].bar(x - 0.2, [r["mixer_grad_norm"] for r in layers], width=0.4, label="mixer")
    axes[1].bar(x + 0.2, [r["ffn_grad_norm"] for r in layers], width=0.4, label="FFN")
    axes[1].set_xticks(x, [f"{r['layer']} {r['type']}" for r in layers], fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_title("gradient L2 norm per layer", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES = (
    ("beta_heatmap", "write_strength", beta_heatmap),
    ("beta_frequency", "write_strength", beta_frequency),
    ("half_life", "forget_horizon", half_life_histograms),
    ("eigenvalues", "transition_spectrum", eigenvalue_histograms),
    ("state_rank", "state_content", state_rank_curves),
    ("memory_readers", "memory_readers", memory_reader_curves),
    ("needle", "needle", needle_figure),
    ("gradients", "gradients", gradient_figure),
)
"""(file stem, probe, figure function) for every figure, in report order."""


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_figures(results: dict) -> dict[str, bytes]:
    """PNG bytes per file stem for every figure whose probe ran."""
    return {stem: figure_png(draw(results["probes"][probe]))
            for stem, probe, draw in FIGURES if probe in results["probes"]}
