"""Print the README table of the audio-events ablation from the committed results.json.

    python results/audio-events/table.py            # markdown on stdout

One row per (option group, encoding): seeds and mean [95 % interval] per split, as `cope report`
computed them; nothing is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def cell(stats: dict) -> str:
    """mean [low, high], or the mean alone with one seed."""
    if stats.get("ci_low") is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def main() -> None:
    results = json.loads((HERE / "results.json").read_text())
    groups = results["groups"]
    # In-distribution splits first (val, test), then the OOD ones, each in the report's order.
    splits = sorted(
        groups[0]["splits"], key=lambda name: (groups[0]["splits"][name]["ood"], name != "val")
    )
    header = [
        "options",
        "pe",
        "seeds",
        *(f"{s} (OOD)" if groups[0]["splits"][s]["ood"] else s for s in splits),
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for group in groups:
        options = ", ".join(f"{k}={v}" for k, v in group["settings"].items()) or "defaults"
        for pe in group["pes"]:
            row = group["splits"][splits[0]]["by_pe"].get(pe)
            if row is None:
                continue
            cells = [cell(group["splits"][s]["by_pe"][pe]) for s in splits]
            print("| " + " | ".join([options, pe, str(row["n"]), *cells]) + " |")


if __name__ == "__main__":
    main()
