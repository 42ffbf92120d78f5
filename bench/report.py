#!/usr/bin/env python3
"""Turns bench/run's results (JSON lines) into BENCHMARKS.md and a chart."""

import argparse
import json
import re
import os
import platform
import subprocess


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        return ""


def parse_label(label):
    parts = label.split("|")
    out = {"server": parts[0]}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k] = v
        else:
            out[p] = True
    return out


def fmt(v, spec="{:.1f}"):
    if v is None:
        return "–"
    return spec.format(v)


def machine():
    cpu = sh("lscpu | sed -n 's/^Model name:[ ]*//p'") or platform.processor()
    mem = sh("free -g | awk '/Mem:/ {print $2\" GiB\"}'")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "rustc": sh("rustc --version"),
        "go": sh("go version"),
        "date": sh("date -u +%Y-%m-%dT%H:%MZ"),
        "commit": sh("git rev-parse --short HEAD"),
        "istio": sh("sed -n 's/^[[:space:]]*istio.io\\/istio //p' bench/peers/istiod-ca/go.mod | head -1"),
        "kubernetes": sh("sed -n 's/^K8S_VERSION=//p' tests/kube/apiserver.sh | head -1"),
    }


def smoke_method(a):
    """The smoke run's method: what it actually ran (bench/run --smoke), not the full run's."""
    def seconds(s):  # "0.5s" -> "0.5 s"
        m = re.fullmatch(r"([0-9.]+)\s*(ms|s|m)", s or "")
        return f"{m.group(1)} {m.group(2)}" if m else (s or "?")
    names = {"p256": "ECDSA P-256", "rsa": "RSA 2048"}
    cas = [names.get(c, c) for c in (a.cas or "p256").split()]
    wls = [names.get(w, w) for w in (a.workloads or "p256").split()]
    return [
        "- **Smoke run** (`bench/run --smoke`, run in CI): the full run's scenarios scaled down (a few seconds "
        "each, fewer stream counts and key types, smaller storms) to show that both servers answer every "
        "request of each without errors. Runs this short "
        "and this small measure start-up and warm-up as much as the servers: the numbers below are not "
        "comparable with BENCHMARKS.md (the full run, `bench/run`) and support no conclusions.",
        f"- Pool: {a.pool_size or '?'} distinct CSRs and service-account JWTs (ES256) per workload key, "
        f"cycled round robin; workload keys: {', '.join(wls)}.",
        f"- Closed loop: C connections × S streams send as fast as answers come; {seconds(a.warmup)} warm-up, "
        f"{seconds(a.duration)} measured. Latency from an HDR histogram. Open loop (half saturation): fixed rate, "
        "latency measured from each request's intended start. Every 50th answer is fully verified (chain to the "
        "root, SAN).",
        "- Server CPU = utime+stime from /proc over the measured window; peak RSS = VmHWM, reset at the window's start.",
        f"- CA keys: {', '.join(cas)} (`meshsign ca init`).",
        "- Commands: `bench/run --smoke` (everything below); the full comparison is `bench/run`.",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--chart")
    ap.add_argument("--smoke", action="store_true")
    # The smoke run's own parameters (bench/run passes them), for its method text.
    ap.add_argument("--pool-size")
    ap.add_argument("--warmup")
    ap.add_argument("--duration")
    ap.add_argument("--cas", help="CA keys run, space-separated: p256, rsa")
    ap.add_argument("--workloads", help="workload keys run, space-separated: p256, rsa")
    a = ap.parse_args()

    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    loads, storms, floors, kube = [], [], [], []
    for r in rows:
        kind = r.get("kind")
        if kind == "storm":
            storms.append(r)
        elif kind == "floor":
            floors.append(r)
        elif "kube" in parse_label(r["label"]):
            kube.append(r)
        else:
            loads.append(r)

    # index: (ca, wl, conc) -> server -> result
    steady = {}
    extra = {}
    for r in loads:
        lab = parse_label(r["label"])
        if "conc" in lab:
            steady.setdefault((lab["ca"], lab["wl"], int(lab["conc"])), {})[lab["server"]] = r
        else:
            key = "half-saturation" if "half-saturation" in lab else f"conns={lab.get('conns')}"
            extra.setdefault((lab["ca"], key), {})[lab["server"]] = r

    floor_by = {}
    for f in floors:
        ca = "p256" if f["ca_key"] == "ecdsa-p256" else "rsa"
        wl = "p256" if f["workload_key"] == "ecdsa-p256" else "rsa"
        floor_by[(ca, wl)] = f

    m = machine()
    L = []
    L.append("# meshsign benchmarks" + (" (smoke run: tiny, not for conclusions)" if a.smoke else ""))
    L.append("")
    L.append("Generated by `bench/run` (do not edit by hand). meshsign and **istiod's own CA** "
             "(Istio's `security/pkg/server/ca` gRPC server with `IstioCA` and Istio's JWT authenticator, "
             "built from `istio.io/istio` " + (m["istio"] or "?") + ", see `bench/peers/istiod-ca/`) "
             "ran side by side in one run on one machine, with the same CA bundle, the same JWKS, "
             "the same pool of distinct CSRs and tokens and the same load generator (`meshsign-bench`).")
    L.append("")
    L.append("## Machine and method")
    L.append("")
    L.append(f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory']}; Linux {m['kernel']}")
    L.append(f"- {m['rustc']}; {m['go']}; meshsign commit `{m['commit']}`; run at {m['date']}")
    L.append("- Each server is pinned to CPU 1 and the load generator to CPU 0 (`taskset`), so throughput "
             "and CPU per certificate are **per server core**. TLS 1.3 over loopback, HTTP/2, one fresh "
             "server process per scenario group.")
    if a.smoke:
        L.extend(smoke_method(a))
    else:
        L.append("- Pool: distinct CSRs and service-account JWTs (ES256), cycled round robin "
                 "(P-256 workloads: one key per CSR; RSA-2048 workloads: 64 keys, each CSR for a different identity).")
        L.append("- Closed loop: C connections × S streams send as fast as answers come; 2 s warm-up, 8 s measured. "
                 "Latency from an HDR histogram. Open loop (half saturation): fixed rate, latency measured from each "
                 "request's intended start (no coordinated omission). Every 50th answer is fully verified "
                 "(chain to the root, SAN).")
        L.append("- Server CPU = utime+stime from /proc over the measured window; peak RSS = VmHWM, reset at the window's start.")
        L.append("- CA keys: ECDSA P-256 (`meshsign ca init`) and RSA 2048 (Istio's `samples/certs`).")
        L.append("- Commands: `bench/run` (everything below); single points: "
                 "`meshsign-bench run --addr … --root … --pool … --connections C --streams S`.")
    L.append("")

    def server_cols(r):
        if not r:
            return ["–"] * 6
        errs = sum(r["errors"].values()) if r.get("errors") else 0
        return [
            fmt(r["throughput_rps"], "{:.0f}"),
            fmt(r["latency_ms"]["p50"], "{:.2f}"),
            fmt(r["latency_ms"]["p99"], "{:.2f}"),
            str(errs),
            fmt(r.get("server_cpu_s_per_1000"), "{:.3f}"),
            fmt(r.get("server_peak_rss_mib"), "{:.1f}"),
        ]

    L.append("## Throughput and latency (closed loop)")
    L.append("")
    L.append("| CA key | workload key | streams | meshsign cert/s | p50 ms | p99 ms | errors | CPU s/1k | RSS MiB "
             "| istiod cert/s | p50 ms | p99 ms | errors | CPU s/1k | RSS MiB | ratio |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(steady, key=lambda k: (k[0] != "p256", k[1] != "p256", k[2])):
        ca, wl, conc = key
        ms = steady[key].get("meshsign")
        ist = steady[key].get("istiod")
        ratio = fmt(ms["throughput_rps"] / ist["throughput_rps"], "{:.2f}×") if ms and ist and ist["throughput_rps"] else "–"
        L.append("| " + " | ".join([ca.upper() if ca == "rsa" else "P-256", "RSA 2048" if wl == "rsa" else "P-256", str(conc)]
                                   + server_cols(ms) + server_cols(ist) + [ratio]) + " |")
    L.append("")

    if extra:
        L.append("## Half saturation (open loop) and many connections")
        L.append("")
        L.append("| CA key | scenario | server | offered or achieved cert/s | p50 ms | p99 ms | p99.9 ms | errors | peak RSS MiB |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for (ca, key), by in sorted(extra.items()):
            for server in ("meshsign", "istiod"):
                r = by.get(server)
                if not r:
                    continue
                errs = sum(r["errors"].values()) if r.get("errors") else 0
                what = f"rate {r['rate']:.0f}/s, {r['connections']}×{r['streams']}" if r.get("rate") else f"{r['connections']} connections × 1 stream"
                L.append(f"| {'P-256' if ca == 'p256' else 'RSA 2048'} | {what} | {server} | {r['throughput_rps']:.0f} | "
                         f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | {r['latency_ms']['p999']:.2f} | {errs} | "
                         f"{fmt(r.get('server_peak_rss_mib'))} |")
        L.append("")

    if storms:
        L.append("## Renewal storm")
        L.append("")
        L.append("Each workload opens its own TLS connection and asks once; start times spread evenly over the window; "
                 "failures retried like istio-agent (exponential backoff).")
        L.append("")
        L.append("| server | workloads | window s | served | failed | retries | last certificate at s | p50 ms | p99 ms | server CPU s | peak RSS MiB |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in storms:
            lab = parse_label(s["label"])
            failed = sum(s["failed"].values()) if s.get("failed") else 0
            L.append(f"| {lab['server']} | {s['workloads']} | {s['window_s']:.0f} | {s['served']} | {failed} | {s['retries']} | "
                     f"{s['last_certificate_s']:.2f} | {s['latency_ms']['p50']:.1f} | {s['latency_ms']['p99']:.1f} | "
                     f"{fmt(s.get('server_cpu_s'), '{:.2f}')} | {fmt(s.get('server_peak_rss_mib'))} |")
        L.append("")

    if floors:
        L.append("## Crypto floor (one core, aws-lc-rs)")
        L.append("")
        L.append("The unavoidable work per certificate: verify the CSR signature, verify the JWT (ES256) signature, "
                 "sign the leaf. Also meshsign's whole request pipeline in process (authenticate, parse and check the "
                 "CSR, policy, sign, encode the response), i.e. everything but gRPC and TLS.")
        L.append("")
        L.append("| CA key | workload key | CSR verify µs | JWT verify µs | sign µs | floor cert/s/core | pipeline µs | pipeline cert/s/core | meshsign over the wire cert/s/core | wire ÷ floor |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (ca, wl), f in sorted(floor_by.items()):
            best = max((v["meshsign"]["throughput_rps"] for k, v in steady.items()
                        if k[0] == ca and k[1] == wl and "meshsign" in v), default=None)
            share = fmt(best / f["floor_certs_per_s_per_core"] * 100, "{:.1f}%") if best else "–"
            L.append(f"| {'P-256' if ca == 'p256' else 'RSA 2048'} | {'P-256' if wl == 'p256' else 'RSA 2048'} | "
                     f"{f['csr_verify_us']:.1f} | {f['jwt_verify_us']:.1f} | {f['sign_us']:.1f} | {f['floor_certs_per_s_per_core']:.0f} | "
                     f"{f['pipeline_us']:.1f} | {f['pipeline_certs_per_s_per_core']:.0f} | {fmt(best, '{:.0f}')} | {share} |")
        L.append("")

    if kube:
        L.extend(kube_section(kube, m))

    # Targets.
    def best(server, ca):
        vals = [v[server]["throughput_rps"] for k, v in steady.items() if k[0] == ca and server in v]
        return max(vals) if vals else None

    tg = []
    for ca, need in (("p256", 3.0), ("rsa", 1.3)):
        b_ms, b_ist = best("meshsign", ca), best("istiod", ca)
        if b_ms and b_ist:
            ratio = b_ms / b_ist
            tg.append((f"Saturation throughput, {'P-256' if ca == 'p256' else 'RSA 2048'} CA: ≥ {need}× istiod",
                       f"{b_ms:.0f} vs {b_ist:.0f} cert/s = {ratio:.2f}×", ratio >= need))
    for (ca, wl), f in sorted(floor_by.items()):
        vals = [v["meshsign"]["throughput_rps"] for k, v in steady.items() if k[0] == ca and k[1] == wl and "meshsign" in v]
        if vals:
            share = max(vals) / f["floor_certs_per_s_per_core"]
            tg.append((f"≥ 75% of the crypto floor ({'P-256' if ca == 'p256' else 'RSA'} CA, {'P-256' if wl == 'p256' else 'RSA'} workload)",
                       f"{share*100:.1f}%", share >= 0.75))
    for (ca, key), by in sorted(extra.items()):
        r = by.get("meshsign")
        if not r:
            continue
        errs = sum(r["errors"].values()) if r.get("errors") else 0
        if key == "half-saturation":
            tg.append((f"p99 ≤ 5 ms at half saturation, zero errors ({'P-256' if ca == 'p256' else 'RSA'} CA)",
                       f"p99 {r['latency_ms']['p99']:.2f} ms, {errs} errors", r["latency_ms"]["p99"] <= 5 and errs == 0))
        elif r.get("server_peak_rss_mib") is not None:
            tg.append((f"Peak RSS ≤ 64 MiB with {r['connections']} connections ({'P-256' if ca == 'p256' else 'RSA'} CA)",
                       f"{r['server_peak_rss_mib']:.1f} MiB", r["server_peak_rss_mib"] <= 64))
    for s in storms:
        if s["label"].startswith("meshsign"):
            failed = sum(s["failed"].values()) if s.get("failed") else 0
            tg.append((f"Renewal storm of {s['workloads']}: every one served",
                       f"{s['served']} served, {failed} failed, last at {s['last_certificate_s']:.2f}s", failed == 0 and s["served"] == s["workloads"]))
    if tg:
        L.append("## Targets")
        L.append("")
        if a.smoke:
            L.append("The full run's targets, for reference: a smoke run is too short and too small to meet or "
                     "miss the speed targets; only its errors count (bench/run fails on any).")
            L.append("")
        L.append("| target | measured | met |")
        L.append("|---|---|---|")
        for name, measured, ok in tg:
            L.append(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")
        L.append("")

    ghz = []
    for server in ("meshsign", "istiod"):
        p = os.path.join(a.work, f"ghz-{server}.json")
        if os.path.exists(p):
            try:
                g = json.load(open(p))
                lat = {d["percentage"]: d["latency"] / 1e6 for d in g.get("latencyDistribution", [])}
                ghz.append((server, g.get("count"), g.get("rps"), lat.get(50), lat.get(99), g.get("statusCodeDistribution")))
            except Exception:  # noqa: BLE001
                pass
    if ghz:
        L.append("## Cross-check with ghz")
        L.append("")
        L.append("Same P-256 CA, one CSR and token, 50 concurrent requests (`bench/ghz.sh`), both servers pinned as above; "
                 "ghz itself is not pinned.")
        L.append("")
        L.append("| server | requests | req/s | p50 ms | p99 ms | status codes |")
        L.append("|---|---:|---:|---:|---:|---|")
        for server, count, rps, p50, p99, codes in ghz:
            L.append(f"| {server} | {count} | {fmt(rps, '{:.0f}')} | {fmt(p50, '{:.2f}')} | {fmt(p99, '{:.2f}')} | {codes} |")
        L.append("")

    if a.chart:
        L.append("![throughput and p99 per scenario](bench/chart.png)")
        L.append("")
        draw_chart(a.chart, steady)

    open(a.markdown, "w").write("\n".join(L))
    print(f"wrote {a.markdown}")


def kube_section(kube, m):
    """The Kubernetes path: TokenReview and node authorization, both servers against one API server."""
    by = {}
    for r in kube:
        lab = parse_label(r["label"])
        by.setdefault(lab["kube"], []).append((lab, r))
    side = [r for lab, r in by.get("sidecar", [])]
    amb = [r for lab, r in by.get("ambient", [])]
    n = (amb or side)[0]["pool_size"]
    rounds = round(side[0]["requests"] / side[0]["pool_size"]) if side and side[0].get("requests") else None
    L = ["## Kubernetes path", ""]
    L.append(
        f"Both servers authenticate every caller with a `TokenReview` against one real kube-apiserver "
        f"{m.get('kubernetes') or ''} + etcd (`tests/kube/apiserver.sh`, pinned to CPU 0 with the load generator), "
        f"created for the run: {n} service accounts in one namespace, one pod of each on `node-1` with a "
        f"pod-bound token (TokenRequest, audience `istio-ca`), and ztunnel's service account "
        f"(`istio-system/ztunnel`, a trusted node account) with a pod on the same node and its pod-bound token. "
        f"**Sidecar renewal storm**: every workload asks {rounds or '?'} times with its own token "
        f"({n * (rounds or 1)} requests in {rounds or '?'} rounds, `clusterid: Kubernetes`), 64 at a time "
        f"(64 connections × 1 stream, closed loop). **Ambient storm**: ztunnel's one token with "
        f"`ImpersonatedIdentity` cycling over the {n} identities of its node (ztunnel's empty-subject P-256 CSRs, "
        f"made before the run), on one connection with 8 streams (ztunnel's SecretManager fetches 8 at a time); "
        f"the node authorizer checks each from its pod cache. TokenReviews are the API server's own count "
        f"(`apiserver_request_total{{resource=\"tokenreviews\",verb=\"POST\"}}` from its `/metrics`, "
        f"read before and after each run), the same for both servers. meshsign: `kubernetes:` with the review "
        f"cache at its defaults (one review per token, kept ≤ 60 s). istiod: `KubeJWTAuthenticator` and the "
        f"node authorizer from `istio.io/istio` {m.get('istio') or ''}, wired by `bench/peers/istiod-ca` as "
        f"`pilot/pkg/bootstrap` wires them; istiod's kube client is rate-limited client-side "
        f"(`--kubernetesApiQPS 80`, `--kubernetesApiBurst 160` by default), so it also ran with the limit "
        f"raised to 5000/10000. Throughput = certificates ÷ time until the last answer; latency per request.")
    L.append("")
    L.append("| scenario | server | certificates | distinct tokens | cert/s | p50 ms | p99 ms | errors "
             "| TokenReviews | TokenReviews per certificate | server CPU s/1k | peak RSS MiB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"sidecar": f"sidecar renewal storm ({n} workloads × {rounds or '?'})",
             "ambient": f"ambient: ztunnel for {n} pods"}
    ratios = []
    for scen in ("sidecar", "ambient"):
        rows = by.get(scen, [])
        ms = next((r for lab, r in rows if lab["server"] == "meshsign"), None)
        for lab, r in rows:
            if lab["server"] == "istiod":
                q = lab.get("qps")
                who = f"istiod (kube QPS {q}{', default' if q == '80' else ''})"
            else:
                who = lab["server"]
            errs = sum(r["errors"].values()) if r.get("errors") else 0
            tokens = r["pool_size"] if scen == "sidecar" else 1
            L.append(f"| {names[scen]} | {who} | {r['ok']} | {tokens} | {r['throughput_rps']:.0f} | "
                     f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | {errs} | "
                     f"{fmt(r.get('token_reviews'), '{:d}')} | {fmt(r.get('token_reviews_per_cert'), '{:.4f}')} | "
                     f"{fmt(r.get('server_cpu_s_per_1000'), '{:.3f}')} | {fmt(r.get('server_peak_rss_mib'))} |")
            if ms and lab["server"] == "istiod" and r["throughput_rps"]:
                ratios.append(f"{scen}, istiod at kube QPS {lab.get('qps')}: "
                              f"{ms['throughput_rps'] / r['throughput_rps']:.1f}×")
    L.append("")
    if ratios:
        L.append("meshsign's throughput ÷ istiod's: " + "; ".join(ratios) + ".")
        L.append("")
    return L


def draw_chart(path, steady):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(steady, key=lambda k: (k[0] != "p256", k[1] != "p256", k[2]))
    names = [f"{'P256' if k[0]=='p256' else 'RSA'} CA\n{'P256' if k[1]=='p256' else 'RSA'} wl\n{k[2]} str" for k in keys]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(keys) * 0.9), 8), sharex=True)
    xs = range(len(keys))
    w = 0.38
    for i, (server, color) in enumerate((("meshsign", "#1f77b4"), ("istiod", "#ff7f0e"))):
        tp = [steady[k].get(server, {}).get("throughput_rps", 0) for k in keys]
        p99 = [steady[k].get(server, {}).get("latency_ms", {}).get("p99", 0) for k in keys]
        pos = [x + (i - 0.5) * w for x in xs]
        ax1.bar(pos, tp, w, label=server, color=color)
        ax2.bar(pos, p99, w, label=server, color=color)
    ax1.set_ylabel("certificates / s (one server core)")
    ax1.legend()
    ax1.set_title("meshsign vs istiod CA: throughput (top) and p99 latency (bottom)")
    ax2.set_ylabel("p99 latency, ms (log)")
    ax2.set_yscale("log")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(names, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
