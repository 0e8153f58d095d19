"""The red-team run as one self-contained HTML page: every plot inline as SVG (matplotlib, Agg
backend, glyphs drawn as paths), no script, no external asset; a Content-Security-Policy in the
page forbids loading any. Every string from the run is escaped."""

from __future__ import annotations

import html
import io
import time
from collections.abc import Sequence
from typing import Any

from bastion.redteam_probe import RedTeamReport

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1b1f24; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.verdict { display: inline-block; padding: .25rem .8rem; border-radius: 4px; font-weight: 700; color: #fff; }
.pass { background: #1a7f37; } .fail { background: #cf222e; }
table { border-collapse: collapse; margin: .6rem 0; } td, th { padding: .2rem .8rem; text-align: left; }
th { background: #f6f8fa; } tr + tr td { border-top: 1px solid #eaeef2; }
figure { margin: .8rem 0; } figure svg { max-width: 100%; height: auto; }
.muted { color: #57606a; } code { background: #f6f8fa; padding: 0 .2rem; }
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CONTAINED = "#cf222e"


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # the XML prolog and DOCTYPE have no place inside HTML


def _plot(
    title: str,
    ylabel: str,
    series: list[tuple[str, list[tuple[int, float]]]],
    *,
    budget: int,
    contained_at: int | None,
    ylim: tuple[float, float] | None = None,
    lines: tuple[tuple[float, str], ...] = (),
) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3.4))
    try:
        for label, points in series:
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", markersize=4, label=label)
        for y, label in lines:
            axes.axhline(y, color="#57606a", linestyle=":", linewidth=1, label=label)
        if contained_at is not None:
            axes.axvline(contained_at, color=_CONTAINED, linestyle="--", linewidth=2)
            axes.annotate(
                f" contained: 403 key_quarantined\n at {contained_at} rows",
                xy=(contained_at, 1),
                xycoords=("data", "axes fraction"),
                va="top",
                color=_CONTAINED,
                fontsize=9,
            )
        axes.set_xlim(0, max(budget, contained_at or 0, *(p[0] for _, s in series for p in s)) * 1.02 or 1)
        if ylim is not None:
            axes.set_ylim(*ylim)
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("rows sent to /infer (queries)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if any(points for _, points in series) or lines:
            axes.legend(loc="lower right", fontsize=8)
        return _svg(figure)
    finally:
        plt.close(figure)


def _rows(pairs: Sequence[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _contained(at: int | None) -> str:
    return "never" if at is None else f"at {at} rows (403 key_quarantined)"


def render(report: RedTeamReport) -> str:
    """The page for `report`, as text (UTF-8 when written)."""
    limits = report.thresholds
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
        f"<title>Bastion red-team report: {e(report.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Red-team report: <code>{e(report.model)}</code></h1>",
        f"<p class='muted'>{e(report.url)} · {e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(report.started)))}"
        f" · {report.seconds:.1f} s · classes: {e(', '.join(report.classes))}</p>",
        f"<p id='verdict'><span class='verdict {'pass' if report.passed else 'fail'}'>"
        f"{'GATE PASSED' if report.passed else 'GATE FAILED'}</span></p>",
    ]
    if report.failures:
        parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in report.failures) + "</ul>")
    ex, ev, mi = report.extraction, report.evasion, report.membership
    summary = [
        ("extraction fidelity", _fmt(ex.fidelity) if ex else "not run"),
        ("extraction contained", _contained(ex.contained_at) if ex else "not run"),
        ("membership AUC", _fmt(mi.auc) if mi else "not run"),
        ("evasion success", _fmt(ev.success_rate, 2) if ev else "not run"),
        ("evasion contained", _contained(ev.contained_at) if ev else "not run"),
    ]
    parts.append(f"<table id='summary'>{_rows(summary)}</table>")
    if ex is not None:
        bound = limits.get("max_fidelity")
        lines: tuple[tuple[float, str], ...] = ((bound, f"max fidelity {bound:g}"),) if bound is not None else ()
        parts += [
            "<section id='extraction'><h2>Extraction</h2>",
            f"<p>A {e(ex.thief)} thief, refitted on every answer, measured by its agreement with the "
            "victim on the attacker's held-out rows.</p>",
            "<figure>"
            + _plot(
                "Thief fidelity against queries",
                "fidelity",
                [(f"{ex.thief} thief", ex.points)],
                budget=ex.budget,
                contained_at=ex.contained_at,
                ylim=(0, 1.02),
                lines=lines,
            )
            + "</figure>",
            "<table>"
            + _rows(
                [
                    ("budget (rows)", ex.budget),
                    ("rows sent", ex.queries),
                    ("rows answered", ex.answered),
                    ("rows refused (422)", ex.refused),
                    ("fidelity", _fmt(ex.fidelity)),
                    ("contained", _contained(ex.contained_at)),
                ]
            )
            + "</table></section>",
        ]
    if mi is not None:
        lines = ((0.5, "chance"),)
        if limits.get("max_auc") is not None:
            lines += ((limits["max_auc"], f"max AUC {limits['max_auc']:g}"),)
        final = mi.final or {}
        parts += [
            "<section id='membership'><h2>Membership inference</h2>",
            "<p>IBM ART's black-box attack (random forest) on the answers about known members and "
            "non-members, refitted as more are asked.</p>",
            "<figure>"
            + _plot(
                "Membership attack AUC against queries",
                "attack AUC",
                [("attack AUC", mi.points)],
                budget=mi.queries,
                contained_at=mi.contained_at,
                ylim=(0, 1.02),
                lines=lines,
            )
            + "</figure>",
            "<table>"
            + _rows(
                [("rows sent", mi.queries), ("AUC", _fmt(mi.auc)), ("contained", _contained(mi.contained_at))]
                + [(k.replace("_", " "), _fmt(v)) for k, v in final.items()]
            )
            + "</table></section>",
        ]
    if ev is not None:
        series = [(f"start row {i + 1}", s.points) for i, s in enumerate(ev.samples)]
        parts += [
            "<section id='evasion'><h2>Evasion probing</h2>",
            "<p>HopSkipJump (label only): a stream of near-duplicate rows walking along the decision "
            "boundary toward a start row. Distance: root mean square over the features, in standard "
            "deviations of the attacker's rows; success within epsilon.</p>",
            "<figure>"
            + _plot(
                "Distance of the closest adversarial row against queries",
                "distance (std)",
                series,
                budget=ev.budget,
                contained_at=ev.contained_at,
                ylim=(0, 1.1 * max([ev.epsilon, *(d for _, p in series for _, d in p)])),
                lines=((ev.epsilon, f"epsilon {ev.epsilon:g}"),),
            )
            + "</figure>",
            "<table>"
            + _rows(
                [
                    ("budget (rows)", ev.budget),
                    ("rows sent", ev.queries),
                    ("rows refused (422)", ev.refused),
                    ("start rows attempted", len(ev.samples)),
                    ("success rate", _fmt(ev.success_rate, 2)),
                    ("rows until first success", ev.queries_to_success or "never"),
                    ("contained", _contained(ev.contained_at)),
                ]
            )
            + "</table></section>",
        ]
    set_limits = {k: v for k, v in limits.items() if v not in (None, False)}
    parts.append(
        "<section id='thresholds'><h2>Gate</h2><table>"
        + (_rows(list(set_limits.items())) if set_limits else "<tr><td>no threshold set</td></tr>")
        + "</table></section></body></html>\n"
    )
    return "".join(parts)
