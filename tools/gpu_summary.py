#!/usr/bin/env python3
"""Turns the JSON that trainer/loader/PyTorch benchmarks print into one table cell (gpu-check.sh).

    gpu_summary.py bench < trainer-bench.json
    gpu_summary.py torch < bench_torch_step.json
    gpu_summary.py loader < loader-bench.json
    gpu_summary.py pretrain metrics.jsonl
    gpu_summary.py same-run metrics-a.jsonl metrics-b.jsonl   (two runs of the same steps)
"""
import json
import sys


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line")


def memory(peak):
    return "peak GPU memory ?" if peak is None else f"peak GPU memory {peak / 2**30:.1f} GiB"


def main():
    kind = sys.argv[1]
    if kind == "pretrain":
        m = [json.loads(line) for line in open(sys.argv[2])]
        first = sum(x["loss"] for x in m[:5]) / 5
        last = sum(x["loss"] for x in m[-5:]) / 5
        wait = sorted(x["data_wait"] for x in m[5:])
        vps = sorted(x["views_per_second"] for x in m[5:])
        print(f"steps {m[-1]['step']}, loss {first:.3f} -> {last:.3f}, "
              f"median data wait {100 * wait[len(wait) // 2]:.1f}%, median {vps[len(vps) // 2]:.0f} views/s")
        return
    if kind == "same-run":
        a, b = ([json.loads(line)["loss"] for line in open(p) if '"loss"' in line] for p in sys.argv[2:4])
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        verdict = "PASS" if len(a) == len(b) and worst <= 1e-3 else "FAIL"
        print(f"{verdict}: {len(b)} of {len(a)} steps, losses within {worst:.1e} (relative)")
        return
    d = last_json(sys.stdin.read())
    if kind == "bench":
        rows = sorted(d["groups"] + [d["step"]], key=lambda x: x["groups"])
        enc = " / ".join(f"G{x['groups']} {x['online_encoder_ms']:.0f}" for x in rows)
        s = d["step"]
        ops = s["ops"]
        print(f"{d['views_per_second']:.0f} views/s; {memory(s.get('peak_memory_bytes'))}; step {s['step_ms']:.0f} ms"
              f" = encoder {s['online_encoder_ms']:.0f} + heads {s['heads_ms']:.0f} + target {s['target_ms']:.0f}"
              f" + backward {s['backward_ms']:.0f} + optim {s['optimizer_ms']:.0f}; encoder ms by groups: {enc};"
              f" ops forward {ops['forward']} backward {ops['backward']} update {ops['update']}")
    elif kind == "torch":
        print(f"{d['views_per_second']:.0f} views/s (step {d['step_ms']:.0f} ms); {memory(d.get('peak_memory_bytes'))}")
    elif kind == "loader":
        print(f"{d['samples_per_second']:.0f} samples/s = {d['views_per_second']:.0f} views/s")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a failed run must still give the table a cell
        print(f"FAILED ({type(e).__name__})")
