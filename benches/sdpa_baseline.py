#!/usr/bin/env python3
"""FP16 baselines for `kivi bench`, timed on the same GPU in the same run.

- copy bandwidth: a device-to-device copy of >= 2 GiB through PyTorch, (bytes read + bytes written) / time;
- FP16 attention: for each shape (B, H, Hkv, D, T), one query token per sequence against T cached fp16 keys and
  values, through every SDPA backend PyTorch offers (flash, efficient, cuDNN, math as a last resort), with
  enable_gqa for grouped heads; the best backend's median time is the baseline.

Timing: CUDA events, warm-up, median of many runs, inputs rotated over enough copies that their total passes
4x the L2 cache. Prints one JSON object on the last line of stdout. Only PyTorch is needed; kivi does not depend
on this script.
"""
import argparse
import json
import statistics
import sys


def timed(fn, warmup, iters, torch):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True, help="B,H,Hkv,D,T;B,H,Hkv,D,T;...")
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    result = {"gpu": props.name, "torch": torch.__version__, "shapes": []}

    n = int(args.copy_gib * (1 << 30)) // 2
    x = torch.randn(n, device=dev, dtype=torch.float16)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), args.warmup, args.iters, torch)
    result["copy_gbps"] = 2 * n * 2 / (ms * 1e-3) / 1e9
    result["copy_bytes"] = 2 * n * 2
    del x, y

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for spec in args.shapes.split(";"):
        b, h, hkv, d, t = (int(v) for v in spec.split(","))
        kv_bytes = 2 * b * hkv * t * d * 2
        copies = max(1, -(-4 * l2 // kv_bytes))
        qs = [torch.randn(b, h, 1, d, device=dev, dtype=torch.float16) for _ in range(copies)]
        ks = [torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16) for _ in range(copies)]
        vs = [torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16) for _ in range(copies)]
        entry = {"shape": [b, h, hkv, d, t], "kv_bytes": kv_bytes, "copies": copies, "backends": {}}
        for name, be in backends:
            state = {"i": 0}

            def run():
                i = state["i"] % copies
                state["i"] += 1
                return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=(h != hkv))

            try:
                with sdpa_kernel([be]):
                    run()
                    torch.cuda.synchronize()
                    entry["backends"][name] = timed(run, args.warmup, args.iters, torch)
            except Exception as e:  # a backend that does not take this shape
                entry["backends"][name] = None
                entry.setdefault("errors", {})[name] = str(e).splitlines()[0][:200]
        fast = {k: v for k, v in entry["backends"].items() if v is not None and k != "math"}
        if not fast:
            fast = {k: v for k, v in entry["backends"].items() if v is not None}
        best = min(fast, key=fast.get)
        entry["best"] = best
        entry["best_ms"] = fast[best]
        result["shapes"].append(entry)
        del qs, ks, vs
        torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
