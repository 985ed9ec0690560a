"""The probability profile of a classified series beside its coronal reformat (the paper's Fig. 7).

Used by ``dicomnode classify --plot`` and the node's status page; matplotlib (Agg) is imported on use.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"neck": "tab:purple", "lungs": "tab:blue", "liver": "tab:red", "pelvis": "tab:green", "legs": "tab:orange"}


def plot_profile(result, path: Path) -> Path:
    """Write the probability profile beside the coronal reformat of ``result`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(result.slices)
    z = np.array([s.z_mm if s.z_mm is not None else -float(s.position) for s in result.slices], dtype=float)
    fig, (ax_img, ax_p) = plt.subplots(1, 2, figsize=(10, 7), sharey=True, gridspec_kw={"width_ratios": [1, 1.2]})
    if result.coronal is not None and n:
        ax_img.imshow(result.coronal, cmap="gray", vmin=-1000, vmax=600, aspect="auto",
                      extent=[0, result.coronal.shape[1], z[-1], z[0]] if n > 1 else None)
    ax_img.set_title("coronal reformat (W1600/L-200)")
    ax_img.set_xticks([])
    ax_img.set_ylabel("z (mm)" if result.slices and result.slices[0].z_mm is not None else "slice")
    for cls, colour in COLOURS.items():
        p = [s.probabilities.get(cls, 0.0) for s in result.slices]
        ax_p.plot(p, z, color=colour, label=cls, lw=1.5)
    for g in result.regions:
        colour = COLOURS.get(g.region, "grey")
        ax_p.axhspan(z[g.first_position], z[g.last_position], color=colour, alpha=0.12)
        ax_p.text(0.98, (z[g.first_position] + z[g.last_position]) / 2, g.region, color=colour, va="center", ha="right",
                  fontsize=9, transform=ax_p.get_yaxis_transform())
    ax_p.set_xlim(0, 1)
    ax_p.set_xlabel("probability")
    ax_p.set_title("ConvNet probabilities along z")
    ax_p.legend(loc="lower right", fontsize=8)
    if n > 1 and z[0] < z[-1]:
        ax_p.invert_yaxis()
    fig.suptitle(f"series ...{result.series_instance_uid[-24:]}  ({n} slices, model {result.model_version})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
