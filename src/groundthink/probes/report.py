"""Write the probe results: probes.json, one PNG per figure, and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from ..atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from .plots import FIGURES, render_figures  # noqa: E402
from .suite import format_summary  # noqa: E402

SIGNIFICANT_DIGITS = 6
MAX_HEATMAP_TOKENS = 4000
"""Tokens shown in the coloured text of the report (all of them are in probes.json)."""

SECTIONS = (
    ("write_strength", "Write strength",
     "beta_t = sigmoid(W_b x_t + b): the fraction of the memory's prediction for key k_t that token t replaces "
     "by its value. Which tokens are written hard, and which are skipped?"),
    ("forget_horizon", "Forget horizon",
     "alpha_t = exp(g_t) scales the whole memory at each token; the half-life -ln 2 / g_t is the number of "
     "tokens after which an untouched memory keeps half of itself. Goldfish heads forget within the SWA window; "
     "saturated heads keep everything beyond the training context while barely writing."),
    ("transition_spectrum", "Transition spectrum",
     "A_t = alpha_t (I - beta_t k_t k_t^T) has eigenvalues alpha_t (K - 1 times) and alpha_t (1 - beta_t), so "
     "ln|det A_t| = K g_t + ln(1 - beta_t). Over a span, exp(sum ln|det| / K) is the geometric-mean factor by "
     "which a stored direction survives; explicit [K, K] products check the closed form."),
    ("state_content", "State content",
     "Norm, effective rank exp(H(sigma / sum sigma)) and von Neumann entropy of each GDN layer's memory at every "
     "block start, and the mean |cos| between keys written with high beta (interference), relative to random keys."),
    ("memory_readers", "SWA reading the memory",
     "Focus ratio 1 - H(w) / ln K of the slot attention w (0 uniform, 1 one-hot) and the gate's weight of the "
     "global path, per memory block. Block 0 reads an empty memory and is left out of the head means."),
    ("needle", "Needle",
     "A needle (query + answer) is inserted into the text and the query repeated at the end. The read SNR is "
     "||S^T k|| / (||S||_F / sqrt K) for the needle's key k in the state at the query (about 1 for a memory that "
     "stores nothing special along k); the control run has no needle. The needle effect "
     "||h - h_control|| / ||h_control|| at the query end is 0 when nothing of the needle reaches the query."),
    ("gradients", "Gradient health",
     "L2 norm of the gradient of the next-token loss per component (grouped as parameter_counts()) on one batch."),
)


def to_jsonable(value):
    """Convert numpy arrays and scalars to lists and floats (6 significant digits); NaN and inf become None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "-" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    if value is None:
        return "-"
    return str(value)


def coloured_tokens(tokens: list[str], beta: np.ndarray) -> str:
    """Tokens as HTML spans with a background colour from their mean beta (viridis, 0 to 1)."""
    cmap = colormaps["viridis"]
    spans = []
    for text, b in zip(tokens[:MAX_HEATMAP_TOKENS], beta[:MAX_HEATMAP_TOKENS]):
        r, g, bl, _ = cmap(float(b))
        light = 0.299 * r + 0.587 * g + 0.114 * bl > 0.5
        style = (f"background:rgb({int(255 * r)},{int(255 * g)},{int(255 * bl)});"
                 f"color:{'#000' if light else '#fff'}")
        escaped = html.escape(text).replace("\n", "\u21b5<br>")
        spans.append(f'<span style="{style}" title="beta {float(b):.3f}">{escaped}</span>')
    return '<div class="tokens">' + "".join(spans) + "</div>"


def probe_tables(name: str, result: dict) -> str:
    """HTML tables of the headline numbers of one probe."""
    if name == "write_strength":
        rows = [[repr(e.get("text", e["id"])), e["id"], e["count"], e["mean_beta"]] for e in result["highest"]]
        low = [[repr(e.get("text", e["id"])), e["id"], e["count"], e["mean_beta"]] for e in result["lowest"]]
        return ("<h3>Highest mean beta</h3>" + _table(rows, ["token", "id", "count", "mean beta"])
                + "<h3>Lowest mean beta</h3>" + _table(low, ["token", "id", "count", "mean beta"])
                + f"<p>Spearman(ln count, mean beta) over {result['n_types_ranked']} token types seen at least "
                  f"{result['min_count']} times: {_cell(result['frequency_spearman'])}. "
                  f"Spearman(surprisal, beta) over positions: {_cell(result['surprisal_spearman'])}.</p>")
    if name == "forget_horizon":
        rows = [[h["layer"], h["head"], h["median_half_life"], h["mean_beta"], h["flag"]] for h in result["heads"]]
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in result["notes"])
        return _table(rows, ["layer", "head", "median half-life", "mean beta", "flag"]) + notes
    if name == "transition_spectrum":
        rows = []
        for s, span in result["spans"].items():
            for i, layer in enumerate(result["layers"]):
                rows.append([s, layer] + [f"{v:.3g}" for v in span["survival"][i]])
        H = result["log_det_mean"].shape[1]
        return ("<h3>Per-direction survival exp(ln|det| / K) over a span</h3>"
                + _table(rows, ["span", "layer"] + [f"h{h}" for h in range(H)])
                + f"<p>Explicit-product check, max relative error of ln|det|: {result['max_check_error']:.2g}.</p>")
    if name == "state_content":
        rows = []
        for record in result["gdn"]:
            for h, inter in enumerate(record["interference"]):
                rows.append([record["layer"], h, record["final"]["norm"][h], record["final"]["effective_rank"][h],
                             record["final"]["entropy"][h], inter["n_keys"], inter["mean_abs_cos"], inter["ratio"]])
        return _table(rows, ["layer", "head", "final norm", "effective rank", "entropy (nats)",
                             "stored keys", "mean |cos|", "ratio to random"])
    if name == "memory_readers":
        rows = [[r["layer"], h, r["focus"][h], r["entropy"][h], r["gate"][h]]
                for r in result["per_layer"] for h in range(len(r["focus"]))]
        return _table(rows, ["layer", "head", "focus ratio", "slot entropy (nats)", "gate"])
    if name == "needle":
        p = result["positions"]
        text = (f"<p>Query {html.escape(repr(result.get('query_text', '')))}, answer "
                f"{html.escape(repr(result.get('answer_text', '')))}; needle at tokens {p['needle'][0]}..{p['needle'][1]}, "
                f"query at {p['query'][0]}, {p['distance']} tokens later. Answer ln p: "
                f"{result['answer_log_prob']:.3f} with the needle, {result['answer_log_prob_control']:.3f} without.</p>")
        rows = [[r["layer"], r["type"], r["cos_needle"], r["baseline_mean"], r["z"], r["fraction_below"],
                 r["effect"]] for r in result["hidden"]]
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in result["notes"])
        baseline = result["hidden"][0]["baseline"]
        return text + notes + _table(rows, ["layer", "type", "cos(query end, needle)",
                                            f"mean cos to others ({baseline})", "z", "fraction of others below",
                                            "needle effect"])
    if name == "gradients":
        rows = [[n, r["n_params"], r["grad_norm"], r["param_norm"], r["ratio"], r["max_abs"], r["n_nonfinite"]]
                for n, r in result["components"].items()]
        return _table(rows, ["component", "parameters", "grad norm", "param norm", "ratio", "max |grad|",
                             "non-finite"])
    return ""


STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
pre { background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; }
.tokens { font-family: monospace; font-size: 0.85em; line-height: 1.5; max-height: 30em; overflow-y: scroll;
          border: 1px solid #ccc; padding: 0.5em; }
.skipped { color: #a00; }
img { max-width: 100%; }
"""


def render_html(results: dict, images: dict[str, bytes]) -> str:
    """Render the report page with every image embedded as base64 PNG."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>GroundThink memory probes</title>",
             f"<style>{STYLE}</style></head><body><h1>GroundThink memory probes</h1>",
             f"<pre>{html.escape(format_summary(results))}</pre>"]
    stems: dict[str, list[str]] = {}
    for stem, probe, _ in FIGURES:
        stems.setdefault(probe, []).append(stem)
    for name, title, explanation in SECTIONS:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(explanation)}</p>")
        if name in results["skipped"]:
            parts.append(f"<p class='skipped'>Skipped: {html.escape(results['skipped'][name])}</p>")
            continue
        result = results["probes"][name]
        if name == "write_strength" and "tokens" in results:
            parts.append("<h3>Text coloured by mean beta over GDN layers and heads (viridis: dark 0, yellow 1)</h3>")
            parts.append(coloured_tokens(results["tokens"], np.asarray(result["token_mean"])))
        for stem in stems.get(name, []):
            encoded = base64.b64encode(images[stem]).decode("ascii")
            parts.append(f"<img alt='{stem}' src='data:image/png;base64,{encoded}'>")
        parts.append(probe_tables(name, result))
        flags = result.get("flags", [])
        if flags:
            parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in flags) + "</ul>")
    parts.append("<h2>Settings and timing</h2><pre>"
                 + html.escape(json.dumps(to_jsonable(results["meta"]), indent=1)) + "</pre></body></html>")
    return "".join(parts)


def write_report(results: dict, out_dir) -> dict[str, Path]:
    """Write probes.json, <figure>.png and report.html into out_dir (created if missing), each atomically.

    Returns the path of every file written, keyed by 'json', 'html' and the figure stems.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = render_figures(results)
    paths: dict[str, Path] = {}
    for stem, png in images.items():
        paths[stem] = out / f"{stem}.png"
        atomic_write_bytes(paths[stem], png)
    paths["json"] = out / "probes.json"
    atomic_write_text(paths["json"], json.dumps(to_jsonable(results), allow_nan=False) + "\n")
    paths["html"] = out / "report.html"
    atomic_write_text(paths["html"], render_html(results, images))
    return paths
