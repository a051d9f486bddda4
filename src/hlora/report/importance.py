"""Importance norms ‖Ω_l‖ per module: layer weights, the heatmap, and `hlora inspect`.

Works on a {module path: norm} dict (a record's `layer_norms`, or `Importance.layer_norms()`), so
this module needs no torch.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from ..files import write_text
from .figures import new_figure, save_png

__all__ = [
    "DEFAULT_LAYER_SCALE",
    "layer_weights",
    "entropy",
    "importance_matrix",
    "importance_heatmap",
    "importance_summary",
    "inspect_importance",
]

# Layer weights reported by `inspect`: the reference code's scale, and the scale-free alternative.
DEFAULT_LAYER_SCALE = 1e-8
_BLOCK_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
_MODULE_TYPE_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "query_key_value", "c_attn", "c_proj", "c_fc", "dense", "fc1", "fc2",
)  # fmt: skip


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))  # shifted: the norms times a scale can be large
    return e / e.sum()


def layer_weights(layer_norms: dict[str, float], layer_scale: float | str = DEFAULT_LAYER_SCALE) -> dict[str, float]:
    """w = softmax_l(‖Ω_l‖ · layer_scale) as in docs/design.md section 4.1; "auto" = 1/mean_l ‖Ω_l‖."""
    names = list(layer_norms)
    norms = np.array([layer_norms[n] for n in names], dtype=float)
    if layer_scale == "auto":
        mean = float(norms.mean()) if norms.size else 0.0
        scale = 1.0 / mean if mean > 0 else 0.0
    else:
        scale = float(layer_scale)
    w = _softmax(norms * scale) if norms.size else norms
    return dict(zip(names, w.tolist()))


def entropy(weights: Iterable[float]) -> float:
    """Shannon entropy in nats (0·log 0 = 0)."""
    w = np.asarray(list(weights), dtype=float)
    w = w[w > 0]
    return float(-(w * np.log(w)).sum())


def _split_module(path: str) -> tuple[int | None, str]:
    """(block index, module suffix after the block) of a PEFT module path; (None, path) if no block."""
    m = None
    for m in _BLOCK_RE.finditer(path):  # the last block index: nested models name the outer one first
        pass
    if m is None:
        return None, path
    return int(m.group(1)), path[m.end():]


def _type_key(suffix: str) -> tuple:
    last = suffix.rsplit(".", 1)[-1]
    i = _MODULE_TYPE_ORDER.index(last) if last in _MODULE_TYPE_ORDER else len(_MODULE_TYPE_ORDER)
    return (i, suffix)


def importance_matrix(layer_norms: dict[str, float]) -> dict:
    """Arrange per-module norms as rows = module type, columns = transformer block.

    Returns {"rows": labels, "row_keys": suffixes, "blocks": [block indices], "values": 2-D array
    (nan where a module is absent), "unplaced": [paths with no `.layers.N.` / `.h.N.` part]}.
    A row label is the module's last name (q_proj) when that is unique, else its path after the
    block (self_attn.c_proj vs mlp.c_proj).
    """
    placed: dict[tuple[str, int], float] = {}
    unplaced = []
    for path, v in layer_norms.items():
        block, suffix = _split_module(path)
        if block is None:
            unplaced.append(path)
        else:
            placed[(suffix, block)] = float(v)
    row_keys = sorted({s for s, _ in placed}, key=_type_key)
    blocks = sorted({b for _, b in placed})
    values = np.full((len(row_keys), len(blocks)), np.nan)
    for (s, b), v in placed.items():
        values[row_keys.index(s), blocks.index(b)] = v
    lasts = [s.rsplit(".", 1)[-1] for s in row_keys]
    rows = lasts if len(set(lasts)) == len(lasts) else list(row_keys)
    return {"rows": rows, "row_keys": row_keys, "blocks": blocks, "values": values, "unplaced": unplaced}


def _annotate_cells(ax, logv: np.ndarray) -> None:
    """Write each cell's value when the grid is small enough to read them."""
    nr, nc = logv.shape
    if nc > 16 or nr > 10 or not np.isfinite(logv).any():
        return
    mid = (np.nanmin(logv) + np.nanmax(logv)) / 2
    for i in range(nr):
        for j in range(nc):
            if np.isfinite(logv[i, j]):
                ax.text(j, i, f"{logv[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if logv[i, j] > mid else "white")  # fmt: skip


def importance_heatmap(layer_norms: dict[str, float], out_png: str | Path,
                       title: str = "Importance per module") -> Path:  # fmt: skip
    """Heatmap of log10 ‖Ω_l‖ (rows = module type, columns = block index), as the paper's Figure 7.

    Raises ValueError when no module path has a block index."""
    import matplotlib

    mat = importance_matrix(layer_norms)
    if not mat["blocks"]:
        raise ValueError(
            "no module path has a block index (.layers.N. / .h.N. / .blocks.N.); nothing to place in a heatmap"
        )
    vals = mat["values"]
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(vals > 0, np.log10(np.where(vals > 0, vals, 1.0)), np.nan)
    nr, nc = logv.shape
    fig = new_figure(min(max(3.0 + 0.38 * nc, 6.0), 20.0), 1.9 + 0.55 * nr)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(logv), aspect="auto", cmap=cmap, interpolation="nearest")
    step = 1 if nc <= 32 else int(math.ceil(nc / 32))
    ax.set_xticks(range(0, nc, step), [str(b) for b in mat["blocks"]][::step])
    ax.set_yticks(range(nr), mat["rows"])
    ax.set_xlabel("transformer block")
    ax.set_ylabel("module")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, pad=0.01).set_label(r"$\log_{10}\,\Vert\Omega_l\Vert_F$")
    _annotate_cells(ax, logv)
    return save_png(fig, out_png)


def _weights_lines(layer_norms: dict[str, float]) -> list[str]:
    """Layer weights at the reference code's scale and at "auto", with their entropy."""
    n = len(layer_norms)
    uniform_h = math.log(n)
    norms = np.array(list(layer_norms.values()), dtype=float)
    lines = []
    for scale in (DEFAULT_LAYER_SCALE, "auto"):
        w = layer_weights(layer_norms, scale)
        arr = np.array(list(w.values()))
        h = entropy(arr)
        if scale == "auto":
            mean = norms.mean()
            desc = f"layer_scale=auto (1/mean ‖Ω_l‖ = {1 / mean:.4g})" if mean > 0 else "layer_scale=auto (mean 0)"
        else:
            desc = f"layer_scale={scale:g}"
        share = h / uniform_h if n > 1 else 1.0
        lines.append(f"  {desc}: max w {arr.max():.4g}, min w {arr.min():.4g} (uniform {1 / n:.4g}); "
                     f"entropy {h:.4f} nats of {uniform_h:.4f} ({share:.3f} of uniform)")
        top = sorted(w.items(), key=lambda kv: -kv[1])[:3]
        lines.append("    top: " + ", ".join(f"{k.removeprefix('base_model.model.')} {v:.4g}" for k, v in top))
    return lines


def importance_summary(layer_norms: dict[str, float]) -> str:
    """Text: per module type min/median/max of ‖Ω_l‖, and the softmax layer weights at
    layer_scale=1e-8 (reference code) and "auto" with their entropy."""
    if not layer_norms:
        return "Importance: no modules.\n"
    mat = importance_matrix(layer_norms)
    by_type: dict[str, list[float]] = defaultdict(list)
    labels = dict(zip(mat["row_keys"], mat["rows"]))
    for path, v in layer_norms.items():
        block, suffix = _split_module(path)
        by_type[labels[suffix] if block is not None else path.rsplit(".", 1)[-1]].append(float(v))
    lines = [
        f"Importance norms ‖Ω_l‖_F: {len(layer_norms)} modules, {len(mat['blocks'])} blocks, "
        f"module types: {', '.join(sorted(by_type, key=_type_key))}",
        "",
        f"{'module type':<22} {'n':>4} {'min':>11} {'median':>11} {'max':>11}",
    ]
    for typ in sorted(by_type, key=_type_key):
        v = np.array(by_type[typ])
        lines.append(f"{typ:<22} {v.size:>4} {v.min():>11.4g} {np.median(v):>11.4g} {v.max():>11.4g}")
    lines += ["", "Layer weights w = softmax_l(‖Ω_l‖_F · layer_scale) over the modules:"]
    lines += _weights_lines(layer_norms)
    if mat["unplaced"]:
        lines += ["", f"{len(mat['unplaced'])} modules have no block index and are not in the heatmap: "
                  + ", ".join(mat["unplaced"][:5]) + (" ..." if len(mat["unplaced"]) > 5 else "")]  # fmt: skip
    return "\n".join(lines) + "\n"


def inspect_importance(
    layer_norms: dict[str, float], out_dir: str | Path, title: str = r"$\log_{10}\,\Vert\Omega_l\Vert_F$ per module"
) -> str:
    """Write `importance_heatmap.png` and `importance_summary.txt` into out_dir; return the summary."""
    out_dir = Path(out_dir)
    text = importance_summary(layer_norms)
    try:
        importance_heatmap(layer_norms, out_dir / "importance_heatmap.png", title)
    except ValueError as e:
        text += f"\nHeatmap skipped: {e}\n"
    write_text(out_dir / "importance_summary.txt", text)
    return text
