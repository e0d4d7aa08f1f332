"""The ``passes`` section: what each pass took (seconds, peak RSS) and recorded,
``plot-pass-times``, and the engine's time per worker (``table-workers``)."""

from __future__ import annotations

from modec.report.data import Report
from modec.report.html import NUM, esc, figure, ncell, pct, short, table
from modec.report.svg import COLOR_TEXT, hbars


def render(report: Report) -> str:
    passes = report.get("passes") or []
    out = ["<h2>Passes</h2>"]
    if not passes:
        return out[0] + '<p class="not-run">no pass ran.</p>'
    total = sum(float(p.get("seconds", 0.0)) for p in passes)
    rows = []
    for p in passes:
        stats = p.get("stats") or {}
        st = ", ".join(f"{k}={short(stats[k], 40)}" for k in sorted(stats))
        rows.append(
            [
                f"<code>{esc(p.get('name', '?'))}</code>",
                ncell(float(p.get("seconds", 0.0)), 3),
                pct(float(p.get("seconds", 0.0)) / total) if total > 0 else "–",
                _rss(p.get("peak_rss_bytes")),
                "yes" if p.get("modified") else "no",
                esc(st),
            ]
        )
    peaks = [p["peak_rss_bytes"] for p in passes if isinstance(p.get("peak_rss_bytes"), int)]
    rows.append(["<b>total</b>", ncell(total, 3), "", _rss(max(peaks, default=None)), "", ""])
    head = ["pass", "seconds", "share", "peak RSS (GiB)", "modified graph", "statistics"]
    out.append(table(head, rows, id="table-passes"))
    bars = [
        (str(p.get("name", "?")), [("seconds", COLOR_TEXT, float(p.get("seconds", 0.0)))])
        for p in passes
    ]
    out.append(
        figure(
            "plot-pass-times",
            hbars("seconds per pass", bars, fmt=lambda v: f"{v:.2f} s"),
            "Wall-clock seconds per pass (the runner's timing instrument).",
        )
    )
    out.append(_workers(report, passes))
    texts = "".join(
        f"<tr><td><code>{esc(p.get('name', '?'))}</code></td><td><code>{esc(p.get('text', ''))}"
        "</code></td></tr>"
        for p in passes
    )
    out.append(
        f"<details><summary>pass text with options</summary><table>{texts}</table></details>"
    )
    return "".join(out)


def _rss(value: object) -> str:
    """A pass's peak resident set (``peak_rss_bytes``: the process's high-water mark during
    the pass, modec.instruments) in GiB; "–" where the platform gave none."""
    if not isinstance(value, int):
        return "–"
    return f"{NUM}{value / 2**30:.2f}"


def _workers(report: Report, passes: list[dict[str, object]]) -> str:
    """Where the fanned-out tasks ran (``engine``) and, per pass that ran tasks, each
    worker's tasks and busy seconds (``passes[].workers``, `modec.distributed.summarize`)."""
    engine = report.get("engine")
    if not isinstance(engine, dict):
        return ""
    nodes = engine.get("nodes") or []
    where = (
        f"Ray, {esc(engine.get('address', '?'))}, {len(nodes)} node(s), "
        f"{sum(int(n.get('cpus', 0)) for n in nodes)} CPUs"
        if engine.get("kind") == "ray"
        else "in this process"
    )
    head = (
        f"<p>Tasks ran {where}: {esc(engine.get('parallelism', '?'))} at once, "
        f"{esc(engine.get('threads_per_task', '?'))} thread(s) each.</p>"
    )
    rows = []
    for p in passes:
        w = p.get("workers")
        if not isinstance(w, dict) or not w.get("per_worker"):
            continue
        wall = sum(float(m.get("seconds", 0.0)) for m in w.get("maps", []))
        for pw in w["per_worker"]:
            busy = float(pw.get("seconds", 0.0))
            rows.append(
                [
                    f"<code>{esc(p.get('name', '?'))}</code>",
                    f"<code>{esc(pw.get('worker', '?'))}</code>",
                    ncell(int(pw.get("tasks", 0)), 0),
                    ncell(busy, 2),
                    ncell(wall, 2),
                    pct(busy / wall) if wall > 0 else "–",
                ]
            )
    if not rows:
        return head
    cols = ["pass", "worker", "tasks", "busy seconds", "tasks' wall seconds", "busy share"]
    return head + table(cols, rows, id="table-workers")
