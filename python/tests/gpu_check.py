"""GPU check of the Python package on PyTorch CUDA tensors (run on a GPU machine after installing the wheel):
a ragged batch through prefill and decode steps against exact attention (8-bit layout: small quantization
error), the log-sum-exp, and bad inputs raising (the bit-exact checks against the CPU reference are the Rust GPU
tests)."""
import math
import sys

import torch

import kivi

torch.manual_seed(0)
dev = torch.device("cuda", 0)
SPEC8 = ("keys: { bits: 8, group_size: 32 }, values: { bits: 8, group_size: 32 }, residual_length: 128, "
         "num_heads: 8, num_kv_heads: 2, head_dim: 128")


def exact(q, keys, vals, lens, scale):
    """q [B,H,D]; keys/vals lists per batch entry of [Hkv, T_b, D] float64."""
    b, h, _ = q.shape
    hkv, dv = keys[0].shape[0], vals[0].shape[2]
    out = torch.empty((b, h, dv), dtype=torch.float64)
    lse = torch.empty((b, h), dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            k = keys[i][j // (h // hkv), : lens[i]]
            v = vals[i][j // (h // hkv), : lens[i]]
            s = (k @ q[i, j].double().cpu()) * scale
            lse[i, j] = torch.logsumexp(s, 0)
            out[i, j] = torch.softmax(s, 0) @ v
    return out, lse


def run(spec, tol, steps=4):
    lens = [300, 77, 1]
    b = len(lens)
    cache = kivi.KiviCache(spec, batch=b, capacity=512, device=dev)
    h, hkv, d, dv = cache.num_heads, cache.num_kv_heads, cache.head_dim, cache.value_head_dim
    t = max(lens)
    dt = cache.dtype
    k = (torch.rand((b, t, hkv, d), device=dev) * 4 - 2).to(dt).transpose(1, 2)  # a strided [B,Hkv,T,D] view
    v = (torch.rand((b, t, hkv, dv), device=dev) * 2 - 1).to(dt).transpose(1, 2)
    cache.prefill(k, v, lens)
    keys = [k[i].double().cpu() for i in range(b)]
    vals = [v[i].double().cpu() for i in range(b)]
    cur = list(lens)
    worst = worst_lse = 0.0
    for step in range(steps):
        q = torch.randn((b, h, d), device=dev).to(dt)
        kn = (torch.rand((b, hkv, d), device=dev) * 4 - 2).to(dt)
        vn = (torch.rand((b, hkv, dv), device=dev) * 2 - 1).to(dt)
        out, lse = cache.decode(q, kn, vn, lse=True)
        assert out.dtype == dt, out.dtype
        for i in range(b):
            keys[i] = torch.cat([keys[i][:, : cur[i]], kn[i].double().cpu()[:, None]], 1)
            vals[i] = torch.cat([vals[i][:, : cur[i]], vn[i].double().cpu()[:, None]], 1)
            cur[i] += 1
        ref, ref_lse = exact(q, keys, vals, cur, 1 / math.sqrt(d))
        got = out.double().cpu()
        err = ((got - ref).norm(dim=2) / ref.norm(dim=2)).max().item()
        worst = max(worst, err)
        worst_lse = max(worst_lse, (lse.double().cpu() - ref_lse).abs().max().item())
    cache.check_device_errors()
    print(f"{spec[:40]}...: worst relative L2 error {worst:.2e}, worst |lse error| {worst_lse:.2e}")
    assert worst < tol, worst
    return cache


cache = run(SPEC8, 2e-2)
# Keys of 192 channels, values of 128 (queries 192, outputs 128), with 4 sink tokens.
run("keys: { bits: 8, group_size: 32, head_dim: 192 }, values: { bits: 8, group_size: 32, head_dim: 128 }, "
    "residual_length: 128, num_heads: 8, num_kv_heads: 2, sink_tokens: 4", 2e-2)
# bf16 activations with fp32 key scales and bf16 value scales (the output is bf16: its rounding, 2^-9, is in the
# tolerance too).
run(SPEC8 + ", dtype: bf16, keys: { scale_dtype: fp32 }, values: { scale_dtype: bf16 }", 2.5e-2)


def tokens_match_steps(spec):
    """q_len > 1 (ragged q_lens, crossing a flush) is bit-identical to repeated single steps."""
    lens, q_lens, t = [126, 40, 255], [5, 0, 3], 5
    b = len(lens)
    cache = kivi.KiviCache(spec, batch=b, capacity=512, device=dev)
    h, hkv, d = cache.num_heads, cache.num_kv_heads, cache.head_dim
    k = (torch.rand((b, hkv, max(lens), d), device=dev) * 4 - 2).half()
    v = (torch.rand((b, hkv, max(lens), d), device=dev) * 2 - 1).half()
    cache.prefill(k, v, lens)
    q = torch.randn((t, b, h, d), device=dev).half()
    kn = (torch.rand((t, b, hkv, d), device=dev) * 4 - 2).half()
    vn = (torch.rand((t, b, hkv, d), device=dev) * 2 - 1).half()
    out = torch.full((t, b, h, d), float("nan"), dtype=torch.float16, device=dev)
    _, lse = cache.decode_tokens(q, kn, vn, out, q_lens=q_lens, lse=True)
    assert cache.lens == [n + m for n, m in zip(lens, q_lens)], cache.lens
    # One ordinary step after the tokens: the lengths on the device moved on as the host's did.
    q1 = torch.randn((b, h, d), device=dev).half()
    k1 = (torch.rand((b, hkv, d), device=dev) * 4 - 2).half()
    v1 = (torch.rand((b, hkv, d), device=dev) * 2 - 1).half()
    after = cache.decode(q1, k1, v1)
    for i in range(b):
        single = kivi.KiviCache(spec, batch=1, capacity=512, device=dev)
        single.prefill(k[i:i + 1], v[i:i + 1], [lens[i]])
        for j in range(q_lens[i]):
            o, l1 = single.decode(q[j, i:i + 1].contiguous(), kn[j, i:i + 1].contiguous(),
                                  vn[j, i:i + 1].contiguous(), lse=True)
            assert torch.equal(o[0], out[j, i]), (i, j)
            assert torch.equal(l1[0], lse[j, i]), (i, j, "lse")
        assert torch.isnan(out[q_lens[i]:, i].float()).all(), f"entry {i}: rows past q_lens were written"
        o = single.decode(q1[i:i + 1].contiguous(), k1[i:i + 1].contiguous(), v1[i:i + 1].contiguous())
        assert torch.equal(o[0], after[i]), (i, "the step after")
    cache.check_device_errors()
    print(f"decode_tokens: q_lens {q_lens} bit-identical to single steps")


tokens_match_steps(SPEC8)
tokens_match_steps("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128")

# Bad inputs raise, nothing crashes, and the context stays usable.
b, h, hkv, d = cache.batch, cache.num_heads, cache.num_kv_heads, cache.head_dim
q = torch.randn((b, h, d), device=dev).half()
kn = torch.randn((b, hkv, d), device=dev).half()
cases = {
    "CPU tensor": lambda: cache.decode(q.cpu(), kn, kn),
    "fp32": lambda: cache.decode(q.float(), kn, kn),
    "bf16 into an fp16 cache": lambda: cache.decode(q.bfloat16(), kn.bfloat16(), kn.bfloat16()),
    "wrong shape": lambda: cache.decode(q[:, :4], kn, kn),
    "non-contiguous": lambda: cache.decode(q.transpose(1, 2).contiguous().transpose(1, 2), kn, kn),
    "not a tensor": lambda: cache.decode([1, 2], kn, kn),
    "q_lens above q_len": lambda: cache.decode_tokens(q[None], kn[None], kn[None], q_lens=[2] * b),
    "q_len 0": lambda: cache.decode_tokens(q[None][:0], kn[None][:0], kn[None][:0]),
    "bad spec": lambda: kivi.KiviCache("kivi-2, head_dim: 80", 1, 64, device=dev),
}
for name, f in cases.items():
    try:
        f()
        sys.exit(f"{name}: no error")
    except (ValueError, TypeError) as e:
        print(f"{name}: {type(e).__name__}: {str(e)[:100]}")
out = cache.decode(q, kn, kn)
torch.cuda.synchronize()
assert torch.isfinite(out.float()).all()
print("python gpu check passed")
