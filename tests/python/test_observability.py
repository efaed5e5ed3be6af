"""Observability proven against real tools on 127.0.0.1: the real server (tiny model, CPU) scraped every second by a
real Prometheus (Debian's `prometheus`, started here with a temporary data dir and the repository's recording and
alert rules), under load at three ToMe ratios, two resolution buckets, injected OOMs, an SLO-controlled call and a
rejected call. Then every PromQL expression of every Grafana panel (variables substituted) and every recording
and alert rule is evaluated through Prometheus' HTTP API: each returns data, and the by-ratio panels return one
series per ratio used. promtool checks the configs, the rules and the live /metrics text; label values, bucket
layout and names are checked against the conventions in server/metrics.h; scripts/plot_ratios.py renders a PNG
from the live Prometheus and from CSV."""
import concurrent.futures as futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import REPO, binary
from tomeserve_server import free_port, proto, running_server

pb, pb_grpc = proto()

RATIOS = ["0.00", "0.30", "0.50"]
SIZES = [256, 320]  # resolution buckets <=256x256 and <=512x512
# Metrics that carry the bounded `model` label (server/metrics.h).
MODEL_LABELLED = ("tomeserve_request_latency_seconds", "tomeserve_requests_total", "tomeserve_phase_seconds",
                  "tomeserve_unet_step_seconds", "tomeserve_step_marginal_seconds", "tomeserve_images_total",
                  "tomeserve_tome_tokens_total", "tomeserve_oom_total", "tomeserve_slo_decisions_total",
                  "tomeserve_slo_requests_total", "tomeserve_text_cache_lookups_total")
DASHBOARD = REPO / "deploy" / "grafana" / "tomeserve-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "rules"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (scripts/bootstrap.sh installs Debian's prometheus package)")
    return path


def http_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def promql(base, expr):
    try:
        body = http_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:  # 400: the expression does not parse or evaluate
        raise AssertionError(f"{expr}: {e.read().decode()}") from None
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def substitute(expr):
    """Grafana's variables as the dashboard's defaults ("All") would send them. The rate window covers the whole
    test: the load's first calls (the smallest size) can end more than 2 minutes before the queries on a slow run,
    and a rate over a window without increments is 0/0 = NaN (seen once: the 256x256 ratio-0.30 step time)."""
    return (expr.replace("$__rate_interval", "15m").replace('"$job"', '"tomeserve"')
            .replace('"$ratio"', '".*"').replace('"$resolution"', '".*"').replace('"$instance"', '".*"')
            .replace('"$model"', '".*"'))


def alert_signal(expr):
    """`(signal) OP threshold` -> signal (the alert convention in tomeserve-alerts.yml)."""
    m = re.fullmatch(r"\s*\((.*)\)\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*", expr, re.S)
    assert m, f"alert expression not of the form (signal) OP threshold: {expr}"
    return m.group(1)


def rules(kind):
    """[(name, expr)] of the recording ('record') or alert ('alert') rules."""
    import yaml  # PyYAML comes with the reference stack (transformers)

    out = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [(r[kind], r["expr"]) for r in group["rules"] if kind in r]
    return out


def start_prometheus(metrics_port, workdir):
    prom = need("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [{"job_name": "tomeserve", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    log = open(workdir / "prometheus.log", "w")
    process = subprocess.Popen(
        [prom, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            return process, base
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("prometheus did not become ready")


def drive_load(stub):
    """Calls at every (ratio, size), in waves of 4 concurrent single-image calls so that UNet calls of more than 3
    images hit the injected OOM; one call with a latency target and a ratio range; one rejected call."""
    def call(ratio, side, seed):
        return stub.Generate(pb.GenerateRequest(prompt=f"load {seed}", width=side, height=side, seed=seed,
                                                num_inference_steps=3, scheduler=pb.SCHEDULER_DDIM,
                                                tome=pb.TokenMerging(ratio=float(ratio))), timeout=300)
    seed = 0
    with futures.ThreadPoolExecutor(4) as pool:
        for side in SIZES:
            for ratio in RATIOS:
                # One call first and a pause of two scrape intervals: every (ratio, size) series is scraped at a
                # lower count before the wave raises it, so rates over it are defined however fast the wave runs
                # (a wave that starts and ends between two scrapes gives a series with no increase: rate 0/0).
                call(ratio, side, 10_000 + seed)
                time.sleep(2.5)
                calls = [pool.submit(call, ratio, side, seed + i) for i in range(4)]
                seed += 4
                for c in calls:
                    assert len(c.result().images) == 1
    # One call of 4 images: always more than --inject-oom-above-batch 3, so an OOM and evictions happen.
    for side in SIZES:
        many = stub.Generate(pb.GenerateRequest(prompt="four", width=side, height=side, num_images=4,
                                                num_inference_steps=3, tome=pb.TokenMerging(ratio=0.5)), timeout=300)
        assert len(many.images) == 4
    slo = stub.Generate(pb.GenerateRequest(prompt="slo", width=256, height=256, num_inference_steps=3,
                                           tome=pb.TokenMerging(ratio=0.0, max_ratio=0.5),
                                           latency_target_seconds=120), timeout=300)
    assert slo.HasField("slo")
    with pytest.raises(grpc.RpcError) as bad:
        stub.Generate(pb.GenerateRequest(prompt="bad", width=100), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def live(tiny_model):
    """(server, prometheus base URL, metrics text) after the load, scraped and rules evaluated."""
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-batch-size", "4", "--enable-fault-injection",
            "--inject-oom-above-batch", "3"]
    workdir = Path(tempfile.mkdtemp(prefix="tomeserve_prom_"))
    with running_server(args, metrics=True) as server:
        prometheus, base = start_prometheus(server.metrics_port, workdir)
        try:
            drive_load(pb_grpc.ImageGeneratorStub(server.channel))
            # A few scrapes and rule evaluations after the last call.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if promql(base, "tomeserve:tome_speedup_vs_ratio0:5m") and promql(base, 'up{job="tomeserve"} == 1'):
                    break
                time.sleep(0.5)
            time.sleep(3)
            text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            yield server, base, text, workdir
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            shutil.rmtree(workdir, ignore_errors=True)


def test_every_dashboard_panel_returns_data_and_a_series_per_ratio(live):
    _, base, _, _ = live
    dashboard = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"datasource", "job", "instance", "model", "ratio", "resolution"} <= set(names)
    panels = dashboard["panels"]
    assert len(panels) >= 10
    # The first row is the overview: four stat panels; worker health and build info are separate panels.
    assert panels[0]["type"] == "row"
    first_row = [p["title"] for p in panels[1:5] if p["type"] == "stat" and p["gridPos"]["y"] == panels[1]["gridPos"]["y"]]
    assert first_row == ["p95 latency", "Images per second", "OOM per 100 images", "ToMe speed-up (best ratio in use)"]
    titles = [p["title"] for p in panels]
    assert "Worker health" in titles and "Build info" in titles
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        if panel["type"] == "timeseries":
            assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "none", panel["title"]
        for target in panel["targets"]:
            # Every selector filters by the job and instance variables; model-labelled metrics by model too.
            for metric, selector in re.findall(r"(tomeserve_\w+)\{([^}]*)\}", target["expr"]):
                assert 'instance=~"$instance"' in selector, (panel["title"], metric)
                if metric.startswith(MODEL_LABELLED):
                    assert 'model=~"$model"' in selector, (panel["title"], metric)
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            result = promql(base, expr)
            assert result, f"{panel['title']}: no data for {expr}"
            legend = target.get("legendFormat", "")
            if "{{tome_ratio}}" in legend and "slo_decisions" not in expr:
                got = {s["metric"].get("tome_ratio") for s in result}
                # Ratio 0 merges nothing, so it has no merged-token counts.
                want = set(RATIOS) - ({"0.00"} if "tome_tokens" in expr else set())
                assert want <= got, f"{panel['title']}: series for ratios {got}, want {want}"
                values = [float(s["value"][1]) for s in result if s["metric"].get("tome_ratio") in want]
                assert all(math.isfinite(v) for v in values), f"{panel['title']}: {result}"


def test_every_recording_and_alert_rule_returns_data(live):
    _, base, _, _ = live
    recorded = rules("record")
    assert len(recorded) >= 6
    for name, expr in recorded:
        assert promql(base, expr), f"recording rule {name}: no data"
        assert promql(base, name), f"recording rule {name}: not recorded"
    # The speed-up rule is the ratio-0 marginal step cost over each ratio's, per model and resolution: recomputed
    # here from the raw gauges (which stopped changing with the load), for every ratio used and both sizes.
    for resolution in ("<=256x256", "<=512x512"):
        speedup = {s["metric"]["tome_ratio"]: float(s["value"][1]) for s in promql(
            base, f'tomeserve:tome_speedup_vs_ratio0:5m{{model="tiny", resolution="{resolution}"}}')}
        marginal = {s["metric"]["tome_ratio"]: float(s["value"][1]) for s in promql(
            base, f'max_over_time(tomeserve_step_marginal_seconds{{model="tiny", resolution="{resolution}"}}[5m])')}
        assert set(RATIOS) <= set(speedup) == set(marginal), (resolution, speedup, marginal)
        for ratio, value in speedup.items():
            assert value == pytest.approx(marginal["0.00"] / marginal[ratio], rel=1e-9), (resolution, ratio)
    alerts = rules("alert")
    assert {"TomeserveTargetDown", "TomeserveWorkerUnhealthy", "TomeserveHighOomRate", "TomeserveHighErrorRatio",
            "TomeserveQueueSaturated", "TomeserveLatencyP95High"} <= {n for n, _ in alerts}
    for name, expr in alerts:
        assert promql(base, alert_signal(expr)), f"alert {name}: its signal has no data"
    # The injected OOMs are counted per ratio and resolution, and evictions happened.
    assert promql(base, "sum(tomeserve_oom_total) > 0")
    assert promql(base, "tomeserve_oom_evictions_total > 0")


def test_promtool_accepts_configs_rules_and_live_metrics(live):
    _, _, text, _ = live
    promtool = need("promtool")
    # Debian's promtool is built without Kubernetes discovery, so only the single-host config is checked by it;
    # the Kubernetes one must at least load the same rule files.
    subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR, check=True)
    subprocess.run([promtool, "check", "rules", *map(str, sorted(RULES.glob("*.yml")))], check=True)
    import yaml

    k8s = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yml").read_text())
    assert k8s["rule_files"] == yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["rule_files"]
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_label_values_buckets_and_names_follow_the_conventions(live):
    _, _, text, _ = live
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert all(n.startswith("tomeserve_") for n in types)
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        assert not re.search(r"_(milliseconds|ms|kilobytes|megabytes)\b", name), name
    for name in ("tomeserve_unet_step_seconds", "tomeserve_request_latency_seconds", "tomeserve_images_total",
                 "tomeserve_device_memory_bytes", "tomeserve_build_info", "tomeserve_running_samples",
                 "tomeserve_inflight_requests", "tomeserve_worker_healthy", "tomeserve_tome_tokens_total",
                 "tomeserve_queue_capacity", "tomeserve_slo_requests_total"):
        assert name in types, name
    grid = {f"{k * 0.05:.2f}" for k in range(21)}
    resolutions = {"<=256x256", "<=512x512", "<=768x768", "<=1024x1024", ">1024x1024", "unknown"}
    for labels in re.findall(r"\{([^}]*)\}", text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if "tome_ratio" in pairs:
            assert pairs["tome_ratio"] in grid, labels
        if "resolution" in pairs:
            assert pairs["resolution"] in resolutions, labels
        if "model" in pairs:  # the served model's name, or "unknown" before a call's model is resolved
            assert pairs["model"] in {"tiny", "unknown"}, labels
    for name in MODEL_LABELLED:
        lines = [l for l in text.splitlines() if l.startswith(name) and "{" in l]
        assert lines and all('model="' in l for l in lines), name
    # The rejected call (bad width) has no resolved model.
    assert re.search(r'^tomeserve_requests_total\{code="INVALID_ARGUMENT",model="unknown"\} 1$', text, re.M), text
    assert set(re.findall(r'tomeserve_request_latency_seconds_count\{[^}]*resolution="([^"]+)"', text)) >= {
        "<=256x256", "<=512x512", "unknown"}
    # Step-time and latency buckets grow by at most 1.25x, so ratios 25% apart never share a bucket.
    for hist in ("tomeserve_unet_step_seconds", "tomeserve_request_latency_seconds"):
        first = re.search(rf'^{hist}_bucket\{{([^}}]*)\}}', text, re.M).group(1)
        series = re.sub(r',?le="[^"]*"', "", first)
        bounds = [float(le) for le in re.findall(rf'^{hist}_bucket\{{{re.escape(series)},?le="([^"+]+)"\}}', text, re.M)
                  if le != "+Inf"]
        assert len(bounds) > 30, bounds
        assert all(b / a <= 1.25 * 1.01 for a, b in zip(bounds, bounds[1:])), bounds
    info = re.search(r"^tomeserve_build_info\{([^}]*)\} 1$", text, re.M).group(1)
    assert re.search(r'torch="2\.', info) and 'devices="cpu"' in info and "git_commit=" in info, info


def test_plot_script_renders_ratios_from_prometheus_and_csv(live):
    _, base, _, workdir = live
    png, csv_path = workdir / "ratios.png", workdir / "ratios.csv"
    python = sys.executable
    script = str(REPO / "scripts" / "plot_ratios.py")
    subprocess.run([python, script, "--prometheus", base, "--window", "2m", "--out", str(png), "--write-csv",
                    str(csv_path)], check=True)
    assert Image.open(png).size[0] > 500
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "tome_ratio,resolution,step_seconds,latency_seconds" and len(rows) >= 1 + len(RATIOS) * 2
    again = workdir / "from_csv.png"
    subprocess.run([python, script, "--csv", str(csv_path), "--out", str(again)], check=True)
    assert Image.open(again).size == Image.open(png).size
    if os.environ.get("TOMESERVE_PLOT_OUT"):  # to refresh the README's picture from a real run
        shutil.copy(png, os.environ["TOMESERVE_PLOT_OUT"])


def test_plot_legend_names_true_sizes_from_csv_and_buckets_from_prometheus(tmp_path):
    """docs/tome_ratios.png is drawn from docs/tome_ratios.csv (true sizes); Prometheus rows are size buckets, and
    the legend says which of the two it shows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_ratios", REPO / "scripts" / "plot_ratios.py")
    plot_ratios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_ratios)
    assert plot_ratios.legend_title({"<=512x512": [], ">1024x1024": []}).startswith("resolution bucket")
    rows = plot_ratios.from_csv(REPO / "docs" / "tome_ratios.csv")
    sizes = plot_ratios.series(rows, "step_seconds")
    assert set(sizes) == {"512x512", "768x768", "1024x1024"} and plot_ratios.legend_title(sizes) == "size"
    out = tmp_path / "ratios.png"
    subprocess.run([sys.executable, str(REPO / "scripts" / "plot_ratios.py"), "--csv",
                    str(REPO / "docs" / "tome_ratios.csv"), "--out", str(out)], check=True)
    assert Image.open(out).size == Image.open(REPO / "docs" / "tome_ratios.png").size
