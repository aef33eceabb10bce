"""The data report: what was used and what was left out, as JSON and as the console table."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from training.prepare import Prepared
from training.split import SPLITS

QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


def data_report(prepared: Prepared, unlabelled: list[str], orphans: list[str], layout: str,
                source: str) -> dict[str, Any]:
    """What was used and what was left out, as plain JSON-able values."""
    manifest = prepared.manifest
    positive_fraction = manifest.loc[manifest["label"] == 1, "mask_fraction"]
    counts = {}
    for split in (*SPLITS, "total"):
        rows = manifest if split == "total" else manifest[manifest["split"] == split]
        counts[split] = {"positive": int((rows["label"] == 1).sum()),
                         "negative": int((rows["label"] == 0).sum()), "images": len(rows)}
    return {
        "source": source,
        "layout": layout,
        "selection": {"rule": prepared.selection.rule, "notes": list(prepared.selection.notes),
                      **{k: v for k, v in asdict(prepared.selection).items() if k not in ("rule", "notes")}},
        "counts": counts,
        "unlabelled": {"count": len(unlabelled), "examples": list(unlabelled[:5])},
        "orphans": {"count": len(orphans), "examples": list(orphans[:5])},
        "duplicates_removed": {"count": len(prepared.duplicates),
                               "pairs": prepared.duplicates.head(20).to_dict("records")},
        "mask_fraction_positive_quantiles": {f"{q:.0%}": float(positive_fraction.quantile(q))
                                             for q in QUANTILES},
    }


def format_report(report: dict[str, Any]) -> str:
    """The data report as a readable text table."""
    lines = [f"data report ({report['source']}, {report['layout']} layout)",
             f"  {'split':<6} {'positive':>9} {'negative':>9} {'images':>8}"]
    for split, row in report["counts"].items():
        lines.append(f"  {split:<6} {row['positive']:>9} {row['negative']:>9} {row['images']:>8}")
    for key, what in (("unlabelled", "unlabelled images (excluded)"),
                      ("orphans", "label rows without an image"),
                      ("duplicates_removed", "pixel duplicates removed")):
        lines.append(f"  {what}: {report[key]['count']}")
    quantiles = report["mask_fraction_positive_quantiles"]
    lines.append("  mask fraction of positives: " + ", ".join(f"{q} {v:.4f}" for q, v in quantiles.items()))
    lines.append(f"  selection: {report['selection']['rule']}")
    lines.extend(f"  note: {note}" for note in report["selection"]["notes"])
    return "\n".join(lines)
