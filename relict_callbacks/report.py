"""The audit report: ``summary.json``, ``results.csv`` and a self-contained ``report.html`` for a ReplicaReport.

The HTML page puts the verdict first, then per-level rates, thresholds and the dataset-level test, histograms
of synthetic vs null similarity, a gallery of the most similar synthetic/training pairs, the flagged samples
and the inputs. Pictures are embedded as base64 PNG, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .atomic import atomic_csv, atomic_write
from .gallery import MEASURE, GalleryRow, figure_to_png_bytes, gallery_figure, histogram_figure
from .scoring import ReplicaReport

FLAGGED_ROWS = 200  # flagged samples listed in the HTML page (all of them are in results.csv)


@dataclass
class BadImage:
    """A synthetic image that could not be scored (unreadable, constant, NaN, wrong shape) and why."""

    id: str
    error: str


@dataclass
class Verdict:
    """``status``: ``"fail"`` / ``"pass"`` against a ``fail_above`` rate, else ``"flagged"`` / ``"clean"``;
    ``headline``: one sentence saying so."""

    status: str
    headline: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def verdict(report: ReplicaReport, fail_above: float | None = None, not_scored: int = 0) -> Verdict:
    """The verdict on a report: does its replica rate exceed ``fail_above`` (or, without one, is anything flagged)?
    ``not_scored`` synthetic images that could not be scored are named in the headline.

    >>> from relict_callbacks.scoring import SampleRecord
    >>> report = ReplicaReport([SampleRecord(0, "a", True, {}), SampleRecord(1, "b", False, {})], {}, "any",
    ...                        0.01, "holdout", {}, {})
    >>> verdict(report, fail_above=0.1).headline
    'FAIL: 1 of 2 synthetic images (50.0%) flagged as replicas of training images, above the limit of 10.0%'
    """
    flagged, total = sum(r.is_replica for r in report.records), len(report.records)
    found = f"{flagged} of {total} synthetic images ({report.replica_rate:.1%}) flagged as replicas of training images"
    if not_scored:
        found += f" ({not_scored} more could not be scored)"
    if fail_above is not None:
        failed = report.replica_rate > fail_above
        relation = "above" if failed else "within"
        return Verdict("fail" if failed else "pass",
                       f"{'FAIL' if failed else 'PASS'}: {found}, {relation} the limit of {fail_above:.1%}")
    if flagged:
        return Verdict("flagged", f"REPLICAS FLAGGED: {found}")
    return Verdict("clean", f"NO REPLICAS FLAGGED: {found}")


def summary_dict(report: ReplicaReport, result: Verdict, inputs: dict, bad: list[BadImage] = ()) -> dict:
    """What ``summary.json`` holds: verdict, rates, thresholds, nulls, tests, the images not scored and inputs
    (records are in the CSV). Rates are over the scored images (``counts["synthetic"]``)."""
    body = report.to_dict()
    body.pop("records")
    counts = {"synthetic": len(report.records), "flagged": sum(r.is_replica for r in report.records),
              "not_scored": len(bad)}
    return {"verdict": result.status, "headline": result.headline, "counts": counts, **body,
            "not_scored": [asdict(b) for b in bad], "inputs": inputs, "relict_version": __version__}


def write_csv(path, report: ReplicaReport, bad: list[BadImage]) -> None:
    """``report.csv_rows()`` plus an ``error`` column: empty for scored images, the problem for each bad image (a
    row with only its id and error); written once, atomically."""
    rows = report.csv_rows()
    header = next(rows)
    blank = [""] * (len(header) - 2)
    atomic_csv(path, itertools.chain([header + ["error"]], (row + [""] for row in rows),
                                     (["", b.id, *blank, b.error] for b in bad)))


def write_report(out, report: ReplicaReport, result: Verdict, inputs: dict, gallery: list[GalleryRow],
                 bad: list[BadImage] = ()) -> None:
    """Write ``summary.json``, ``results.csv`` and ``report.html`` into the folder ``out`` (each atomically);
    ``bad`` synthetic images get a row with their error in the CSV and are listed in both others."""
    out = Path(out)
    with atomic_write(out / "summary.json") as file:
        json.dump(summary_dict(report, result, inputs, bad), file, indent=1)
    write_csv(out / "results.csv", report, bad)
    with atomic_write(out / "report.html", encoding="utf-8") as file:
        file.write(render_html(report, result, inputs, gallery, bad))


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_to_png_bytes(fig)).decode()


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _level_rows(report: ReplicaReport) -> list[list]:
    calibration = report.calibration
    rows = []
    for name, rate in report.level_rates.items():
        sims, null, test = report.similarities(name), report.nulls[name], report.tests[name]
        cutoff = calibration.p_cutoffs[name]
        how = (f"given; p &le; {cutoff:.3g}" if name in calibration.given else
               f"p &le; {cutoff:.3g}" + (" <b class='flag'>under-resolved</b>" if name in calibration.under_resolved
                                         else ""))
        closer = "closer than unseen patients" if test.p < 0.05 else "not closer than unseen patients"
        rows.append([f"<b>{name}</b> ({MEASURE.get(name, 'similarity')})", f"{report.thresholds[name]:.4f} ({how})",
                     f"{int(round(rate * len(sims)))} ({rate:.1%})", f"{sims.mean():.4f} / {sims.max():.4f}",
                     f"{null.mean():.4f} / {null.max():.4f} (n={len(null)})",
                     f"z = {test.z:+.2f}, p = {test.p:.2g}: {closer}"])
    return rows


def _flagged_rows(report: ReplicaReport) -> list[list]:
    rows = []
    for record in [r for r in report.records if r.is_replica][:FLAGGED_ROWS]:
        matches = [f"{name}: {m.similarity:.4f} (p = {m.p_value:.2g}) &rarr; {html.escape(m.nearest_id)} "
                   f"under <code>{html.escape(m.transform)}</code>" + (" <b class='flag'>&#9873;</b>" if m.is_replica else "")
                   for name, m in record.levels.items()]
        rows.append([html.escape(record.id), f"{record.p_value:.2g}", "<br>".join(matches)])
    return rows


def _not_scored(bad: list[BadImage]) -> list[str]:
    """The HTML section listing the synthetic images that could not be scored (none: no section)."""
    if not bad:
        return []
    return [f"<h2>Not scored ({len(bad)})</h2>",
            "<p class='note'>These synthetic images could not be scored: they are in none of the rates below and "
            "were not checked for replicas. Fix them and audit again (<code>--strict</code> makes them an "
            "error).</p>",
            _table(["synthetic file", "problem"], [[html.escape(b.id), html.escape(b.error)] for b in bad])]


def _plain(value) -> str:
    """A JSON-like value as short readable text.

    >>> _plain({"grid": 64, "spacing": None}), _plain(["voxel", "segmentation"])
    ('grid 64, spacing —', 'voxel, segmentation')
    """
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_plain, value))
    return str(value)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:0 24px 48px;color:#1d1d1f;line-height:1.45}
.verdict{margin:24px 0;padding:18px 22px;border-radius:8px;color:#fff}
.verdict h1{margin:0 0 6px;font-size:1.5em}.verdict p{margin:0}
.fail,.flagged{background:#c62828}.pass,.clean{background:#2e7d32}
.shortfall{margin-top:8px;padding:6px 10px;background:#fff3cd;color:#5c4400;border-radius:4px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{border:1px solid #ddd;padding:5px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.9em}.flag{color:#c62828}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;font-size:.9em}dt{font-weight:600}
dd{margin:0;word-break:break-all}footer{margin-top:40px;color:#777;font-size:.8em}
"""


def render_html(report: ReplicaReport, result: Verdict, inputs: dict, gallery: list[GalleryRow],
                bad: list[BadImage] = ()) -> str:
    """The report as one self-contained HTML page (figures embedded as base64 PNG)."""
    levels = list(report.thresholds)
    flagged = sum(r.is_replica for r in report.records)
    rule = {"any": "any level", "all": "all levels", "majority": "a majority of levels"}[report.rule]
    null_text = ("unseen patients (holdout) to their nearest training image" if report.null_source == "holdout"
                 else "training images to their nearest other training image (leave-one-out)")
    calibration = report.calibration
    shortfall = calibration.shortfall()
    parts = [
        f"<header class='verdict {result.status}'><h1>{html.escape(result.headline)}</h1>"
        f"<p>Each level gives a synthetic image a p-value: the fraction of unseen patients at least as similar to "
        f"their nearest training image. An image is flagged when {rule} ({', '.join(levels)}) have p &le; "
        f"{calibration.level_cutoff:.3g} (alpha = {report.alpha} corrected for {len(levels)} level(s)), so at most "
        f"{calibration.false_positive_bound:.3g} of unseen patients are flagged overall, on average over the draw of "
        f"the null{html.escape(calibration.spread())}.</p>"
        + (f"<p class='shortfall'>&#9888; {html.escape(shortfall)}</p>" if shortfall else "") + "</header>",
        *_not_scored(bad),
        "<h2>Per level</h2>",
        _table(["level", "threshold", "flagged", "synthetic: mean / max", "null: mean / max",
                "dataset-level test"], _level_rows(report)),
        f"<p class='note'>Null: similarity of {null_text}. Dataset-level test: one-sided Wilcoxon rank-sum test "
        "of &ldquo;synthetic images sit closer to the training set than unseen patients do&rdquo; (z &gt; 0: closer; "
        "a small p with no flagged image points at memorization spread over many samples).</p>",
        "<h2>Similarity to the nearest training image</h2>",
        f"<img alt='histograms' src='{_png(histogram_figure({n: report.similarities(n) for n in levels}, report.nulls, report.thresholds))}'>",
        "<p class='note'>Orange: each synthetic image's similarity to its nearest training image; blue: the null. "
        "Red line: the threshold; synthetic images to its right are flagged at that level.</p>",
    ]
    if gallery:
        parts += [f"<h2>Most similar pairs ({len(gallery)})</h2>",
                  f"<img alt='gallery' src='{_png(gallery_figure(gallery))}'>",
                  "<p class='note'>Flagged samples first, then by similarity. Each row: the synthetic image, its nearest "
                  "training image (moved by the transform the voxel level matched, given in brackets; the segmentation "
                  "level compares masks under the same transform) and the absolute "
                  "difference of the two z-scored images. 3D volumes: middle axial, coronal and sagittal slices and "
                  "an axial maximum-intensity projection; radiological orientation (patient's right on the left, "
                  "anterior/superior up). Red frame: flagged.</p>"]
    parts.append(f"<h2>Flagged samples ({flagged})</h2>")
    if flagged:
        parts.append(_table(["synthetic file", "p-value", "per level: similarity (p-value) → nearest training file "
                             "under the transform that matched (⚑: level flags)"], _flagged_rows(report)))
        if flagged > FLAGGED_ROWS:
            parts.append(f"<p class='note'>First {FLAGGED_ROWS} shown; all are in results.csv.</p>")
    else:
        parts.append("<p>None.</p>")
    facts = {"synthetic_images": len(report.records), "not_scored": len(bad), **inputs}
    parts += ["<h2>Inputs</h2><dl>",
              "".join(f"<dt>{html.escape(k.replace('_', ' '))}</dt><dd>{html.escape(_plain(v))}</dd>"
                      for k, v in facts.items()),
              "</dl>",
              f"<footer>relict-callbacks {__version__} &middot; RELICT replica detection (arXiv 2502.17360) &middot; "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} &middot; per-sample results: results.csv</footer>"]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>RELICT audit: {html.escape(result.headline)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
