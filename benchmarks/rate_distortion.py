"""The rate-distortion plot: MSE against bits per weight for every format and VQ method.

  pip install -e '.[bench]'                       # matplotlib
  python benchmarks/rate_distortion.py --out=docs/rate_distortion.png

Measures every scalar preset and every ``VQ_METHODS`` recipe of
``jaxquant.eval.rate_distortion`` on its Gaussian sample (2**20 N(0, 1) samples, all overheads
in the bits), prints the markdown table, writes the rows as JSON next to the PNG, and plots
them with the Shannon bound D(R) = 2^(-2R) and the 0.15-bit band above it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from jaxquant.eval import rate_distortion as rd  # noqa: E402

_OUT = flags.DEFINE_string("out", "docs/rate_distortion.png", "Where to write the PNG.")
_METHODS = flags.DEFINE_list("methods", None, "Vector quantizer names (default: rd.VQ_METHODS).")


def _family(name: str) -> str:
    for prefix in ("kmeans", "e8p", "pvq", "trellis"):
        if name.startswith(prefix):
            return prefix
    return "scalar"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "benchmarks/rate_distortion.py needs matplotlib: pip install -e '.[bench]'"
        ) from None
    rows = rd.rate_distortion_rows() + rd.vq_rate_distortion_rows(_METHODS.value)
    print(rd.rate_distortion_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    styles = {
        "scalar": ("o", "tab:gray"),
        "kmeans": ("s", "tab:blue"),
        "e8p": ("D", "tab:red"),
        "pvq": ("^", "tab:green"),
        "trellis": ("*", "tab:purple"),
    }
    # Left: every format; right: 1.8 to 4.7 bits, where the vector quantizers are, labelled.
    for ax, (lo, hi), label in zip(axes, [(1.5, 9.5), (1.8, 4.7)], [False, True], strict=True):
        r = np.linspace(lo, hi, 200)
        ax.semilogy(r, 2 ** (-2 * r), "k-", lw=1.5, label="Shannon bound D(R) = 2^(-2R)")
        ax.semilogy(r, 2 ** (-2 * (r - 0.15)), "k:", lw=1, label="D(R - 0.15 bit)")
        for family, (marker, color) in styles.items():
            sel = [row for row in rows if _family(row["format"]) == family]
            sel = [row for row in sel if lo <= row["bits_per_weight"] <= hi]
            if not sel:
                continue
            ax.semilogy(
                [row["bits_per_weight"] for row in sel],
                [row["mse"] for row in sel],
                marker,
                color=color,
                ls="none",
                ms=9 if family == "trellis" else 6,
                label={"scalar": "scalar presets"}.get(family, family),
            )
            for i, row in enumerate(sel if label else []):
                ax.annotate(
                    row["format"],
                    (row["bits_per_weight"], row["mse"]),
                    fontsize=6,
                    color=color,
                    xytext=(5, -8 + 5 * (i % 4)),
                    textcoords="offset points",
                )
        ax.set_xlabel("bits per weight (every scale, codebook and sign counted)")
        ax.set_xlim(lo, hi)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MSE on N(0, 1) samples")
    axes[1].set_ylim(2e-3, 1.0)
    axes[0].legend(fontsize=8)
    fig.suptitle("jaxquant rate-distortion on 2^20 Gaussian samples")
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=120)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
