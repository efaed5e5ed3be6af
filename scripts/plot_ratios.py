#!/usr/bin/env python3
"""What each Token Merging ratio buys, as one PNG: UNet step time, end-to-end latency and speed-up vs ratio 0, by
ratio, one line per resolution. For a person without Grafana.

    .venv/bin/python scripts/plot_ratios.py --prometheus http://127.0.0.1:9090 [--window 5m] [--job tomeserve]
                                            --out ratios.png [--write-csv ratios.csv]
    .venv/bin/python scripts/plot_ratios.py --csv ratios.csv --out ratios.png

It needs matplotlib, which .venv has (scripts/bootstrap.sh makes it); another python says so and exits 2.

--prometheus reads a live Prometheus that scrapes tomeserve (the same expressions as the recording rules in
deploy/prometheus/rules/tomeserve-recording.yml, evaluated now over --window). --csv reads a table with columns
tome_ratio, resolution, step_seconds and optionally latency_seconds (what --write-csv writes, or any benchmark
exported that way). Speed-up = step time at ratio 0 / step time at the ratio, at the same resolution.
"""
import argparse
import csv
import json
import sys
import urllib.parse
import urllib.request
from collections import defaultdict


def query(base, expr):
    """Instant vector of `expr`: a list of (labels, value)."""
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]


def mean_expr(metric, window, job, extra=""):
    sel = f'job=~"{job}"{extra}'
    return (f"sum by (tome_ratio, resolution) (rate({metric}_sum{{{sel}}}[{window}])) / "
            f"sum by (tome_ratio, resolution) (rate({metric}_count{{{sel}}}[{window}]))")


def from_prometheus(base, window, job):
    """Rows {tome_ratio, resolution, step_seconds, latency_seconds} from a live Prometheus."""
    rows = defaultdict(dict)
    for column, expr in (
            ("step_seconds", mean_expr("tomeserve_unet_step_seconds", window, job)),
            ("latency_seconds", mean_expr("tomeserve_request_latency_seconds", window, job, ', code="OK"'))):
        for labels, value in query(base, expr):
            if value == value:  # drop NaN (no traffic in the window)
                rows[(labels["tome_ratio"], labels["resolution"])][column] = value
    return [dict(tome_ratio=r, resolution=res, **v) for (r, res), v in sorted(rows.items())]


def from_csv(path):
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row = {"tome_ratio": r["tome_ratio"], "resolution": r["resolution"]}
            for col in ("step_seconds", "latency_seconds"):
                if r.get(col):
                    row[col] = float(r[col])
            rows.append(row)
    return rows


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["tome_ratio", "resolution", "step_seconds", "latency_seconds"])
        w.writeheader()
        w.writerows(rows)


def series(rows, column):
    """{resolution: sorted [(ratio, value)]} for rows that have `column`."""
    out = defaultdict(list)
    for r in rows:
        if column in r:
            out[r["resolution"]].append((float(r["tome_ratio"]), r[column]))
    return {res: sorted(points) for res, points in sorted(out.items(), key=lambda kv: size_order(kv[0]))}


def size_order(label):
    """Sort key: pixels of "512x512", "<=512x512" or ">1024x1024" (a bucket above its bound), then the label."""
    digits = label.lstrip("<=>")
    try:
        w, h = (int(x) for x in digits.split("x"))
    except ValueError:
        return (float("inf"), label)
    return (w * h + (1 if label.startswith(">") else 0), label)


def speedups(rows):
    step = series(rows, "step_seconds")
    out = {}
    for res, points in step.items():
        base = dict(points).get(0.0)
        if base:
            out[res] = [(ratio, base / value) for ratio, value in points if value > 0]
    return out


def legend_title(data):
    """Prometheus rows carry the metrics' size buckets ("<=512x512"), a CSV may carry true sizes ("512x512"):
    the legend says which it shows."""
    buckets = any(res.startswith(("<=", ">")) or res == "unknown" for res in data)
    return "resolution bucket (pixels up to)" if buckets else "size"


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("UNet step time (s)", series(rows, "step_seconds")),
              ("mean end-to-end latency (s)", series(rows, "latency_seconds")),
              ("speed-up vs ratio 0 (x)", speedups(rows))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (panel_title, data) in zip(axes, panels):
        for res, points in data.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=res)
        ax.set_title(panel_title)
        ax.set_xlabel("ToMe ratio")
        ax.grid(True, alpha=0.3)
        if data:
            ax.legend(title=legend_title(data))
        else:
            ax.text(0.5, 0.5, "no data in the source", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    src.add_argument("--csv", help="CSV with tome_ratio, resolution, step_seconds[, latency_seconds]")
    ap.add_argument("--window", default="5m", help="rate window for --prometheus (default 5m)")
    ap.add_argument("--job", default="tomeserve.*", help="job label regex for --prometheus")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--write-csv", help="also write the rows as CSV")
    ap.add_argument("--title", default="tomeserve: what each Token Merging ratio buys", help="the figure's title")
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401  (checked first: a missing one should not cost a Prometheus query)
    except ImportError:
        print(f"plot_ratios.py: {sys.executable} has no matplotlib; run it with the repository's venv: "
              ".venv/bin/python scripts/plot_ratios.py ... (scripts/bootstrap.sh makes .venv)", file=sys.stderr)
        return 2
    try:
        rows = from_prometheus(args.prometheus, args.window, args.job) if args.prometheus else from_csv(args.csv)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        print(f"plot_ratios.py: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("plot_ratios.py: no data (no tomeserve traffic in the window?)", file=sys.stderr)
        return 2
    if args.write_csv:
        write_csv(rows, args.write_csv)
    plot(rows, args.out, args.title)
    print(f"{len(rows)} (ratio, resolution) rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
