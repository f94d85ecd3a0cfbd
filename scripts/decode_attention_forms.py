"""Decode attention on the CPU: one query position against a full window, timed in several forms.

What a decode step's attention costs for a model's shape, for every layer in a row (so the keys
and values stream from memory as they do in a step, not from cache):

* `lminf`: `attention.lambda_attention` as a decode step calls it, the window as ring spans
  (cut into pieces for the threads) plus the global branch;
* `flash-masked`: the fused CPU kernel once over the whole ring with a 0/-inf mask (what a
  static, replayable step would run);
* `bmm`: scores as K @ q^T and values as p @ V, two batched products, softmax in float32;
* `int8`: keys and values in int8 with a scale per slot (values stored transposed), both
  products through PyTorch's weight-only int8 kernel (`aten._weight_int8pack_mm`, one call
  per KV head): what an int8 KV cache would read.  Scores only approximate the others';
* `int8-intmm`: the same int8 keys and values, the scores as an integer product
  (`torch._int_mm`, the query rounded to int8 per row, one call against every KV head's keys
  while there are at most 4) scaled in float32, values as in `int8`: what `ring.Int8Ring` runs;
* `scores-int8`, `scores-intmm`: the scores product alone, in each of those two forms (the
  rate column then counts the whole window's bytes, though only the keys are read).

Reports ms per step (all layers) and the rate at which each form reads the window's bytes
in the cache's dtype.  Needs a quiet machine.

    python scripts/decode_attention_forms.py --layers 30 --kv-heads 3 --heads 9 --window 8192 --ring 8704
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lminf_cli.attention import LocalSplit, lambda_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--ring", type=int, default=8704, help="ring slots (window + chunk)")
    ap.add_argument("--n-global", type=int, default=100)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    n_layers, h, hkv, d, w, r = a.layers, a.heads, a.kv_heads, a.head_dim, a.window, a.ring
    g = h // hkv
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randn(1, hkv, r, d, generator=gen).to(dt) for _ in range(n_layers)]
    vs = [torch.randn(1, hkv, r, d, generator=gen).to(dt) for _ in range(n_layers)]
    kg = [torch.randn(1, hkv, a.n_global, d, generator=gen).to(dt) for _ in range(n_layers)]
    vg = [torch.randn(1, hkv, a.n_global, d, generator=gen).to(dt) for _ in range(n_layers)]
    q, qc = torch.randn(1, h, 1, d, generator=gen).to(dt), torch.randn(1, h, 1, d, generator=gen).to(dt)
    scale = d ** -0.5
    start = (r - w) // 2 + 1000                       # the window wraps around the ring's end
    spans = ((start, r), (0, start + w - r))
    visible = torch.zeros(r, dtype=torch.bool)
    for s, e in spans:
        visible[s:e] = True
    split = LocalSplit(spans, torch.zeros(0, dtype=torch.long), torch.zeros(g, 0, dtype=dt))
    bias = torch.zeros(g, r, dtype=dt).masked_fill(~visible, float("-inf"))   # [g, N]
    gbias = torch.zeros(g, a.n_global, dtype=dt)

    def lminf(i: int) -> torch.Tensor:
        return lambda_attention(q, qc, ks[i], vs[i], None, kg[i], vg[i], gbias, scale, split=split)

    def flash_masked(i: int) -> torch.Tensor:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(1, hkv, g, d), ks[i], vs[i], 0.0, False, attn_mask=bias, scale=scale)[0]

    bias_f = bias.float()

    def bmm(i: int) -> torch.Tensor:
        s = torch.bmm(ks[i][0], q.reshape(hkv, g, d).transpose(1, 2).contiguous())  # [Hkv, N, g]
        s = torch.add(bias_f, s.transpose(1, 2), alpha=scale)                      # [Hkv, g, N] float32
        p = torch.softmax(s, dim=-1).to(dt)
        return torch.bmm(p, vs[i][0])                                              # [Hkv, g, D]

    # int8 copies: keys [Hkv, N, D] with a scale per slot, values transposed [Hkv, D, N] likewise.
    def quant(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.float().abs().amax(dim=dim, keepdim=True).clamp(min=1e-8) / 127
        return (x.float() / s).round().to(torch.int8), s
    k8 = [quant(k[0], -1) for k in ks]                                             # [Hkv, N, D], [Hkv, N, 1]
    v8 = [quant(v[0], -1) for v in vs]
    v8t = [(qv.transpose(1, 2).contiguous(), sv[..., 0].to(dt)) for qv, sv in v8]   # [Hkv, D, N], [Hkv, N]
    k8s = [(qk, sk[..., 0].to(dt)) for qk, sk in k8]
    ones = torch.ones(d, dtype=dt)
    mm8 = torch.ops.aten._weight_int8pack_mm

    def int8(i: int) -> torch.Tensor:
        qk, sk = k8s[i]
        qv, sv = v8t[i]
        ql = q.reshape(hkv, g, d)
        s = torch.stack([mm8(ql[j], qk[j], sk[j]) for j in range(hkv)])            # [Hkv, g, N]
        p = torch.softmax(torch.add(bias_f, s, alpha=scale), dim=-1).to(dt) * sv[:, None, :]
        return torch.stack([mm8(p[j], qv[j], ones) for j in range(hkv)])           # [Hkv, g, D]

    k8flat = [qk.reshape(hkv * r, d) for qk, _ in k8]                                # [Hkv * N, D]
    k8f = [sk[..., 0].float() for _, sk in k8]                                      # [Hkv, N] float32
    v8f = [sv.float() for _, sv in v8t]

    def int8_intmm(i: int) -> torch.Tensor:
        qv, _ = v8t[i]
        ql = q.reshape(hkv, g, d).float()
        qs = ql.abs().amax(-1, keepdim=True).mul_(1 / 127).clamp_(min=1e-12)          # [Hkv, g, 1]
        qi = torch.div(ql, qs).round_().to(torch.int8)
        if hkv <= 4:
            raw = torch._int_mm(qi.view(hkv * g, d), k8flat[i].t())                  # [Hkv*g, Hkv*N]
            raw = raw.as_strided((hkv, g, r), (g * hkv * r + r, hkv * r, 1))
        else:
            raw = torch.stack([torch._int_mm(qi[j], k8[i][0][j].t()) for j in range(hkv)])
        s = torch.mul(raw, k8f[i][:, None, :])
        s = torch.addcmul(bias_f, s, qs * scale)
        p = torch.mul(torch.softmax(s, dim=-1), v8f[i][:, None, :]).to(dt)
        return torch.stack([mm8(p[j], qv[j], ones) for j in range(hkv)])           # [Hkv, g, D]

    def scores_int8(i: int) -> torch.Tensor:  # the scores product alone, weight-only kernel (bfloat16 q)
        qk, sk = k8s[i]
        ql = q.reshape(hkv, g, d)
        return torch.stack([mm8(ql[j], qk[j], sk[j]) for j in range(hkv)])

    q_int = torch.randint(-127, 128, (hkv * g, d), dtype=torch.int8, generator=gen)

    def scores_intmm(i: int) -> torch.Tensor:  # the scores product alone, integers, every head in one call
        return torch._int_mm(q_int, k8flat[i].t())

    window_bytes = n_layers * 2 * hkv * w * d * torch.finfo(dt).bits // 8
    print(f"{n_layers} layers, {h} heads / {hkv} KV heads x {d}, window {w:,} of a {r:,}-slot ring, {a.dtype}; "
          f"{torch.get_num_threads()} threads; window bytes {window_bytes / 2**20:.0f} MiB per step")
    forms = {"lminf": lminf, "flash-masked": flash_masked, "bmm": bmm, "int8": int8, "int8-intmm": int8_intmm,
             "scores-int8": scores_int8, "scores-intmm": scores_intmm}
    # float32 reference for layer 0, local branch only (the forms other than `lminf` leave the global one out).
    s0 = (q.reshape(hkv, g, d).float() @ ks[0][0].float().transpose(1, 2)) * scale + bias_f
    ref = torch.softmax(s0, dim=-1) @ vs[0][0].float()                             # [Hkv, g, D]
    with torch.inference_mode():
        for name, f in forms.items():
            for i in range(n_layers):  # warm-up
                f(i)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                for i in range(n_layers):
                    f(i)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            err = "" if name == "lminf" or name.startswith("scores") else \
                f"  max |out - float32| {(f(0).float().reshape(ref.shape) - ref).abs().max().item():.4f}"
            print(f"{name:13s} {ms:7.2f} ms per step  {window_bytes / ms / 1e6:6.1f} GB/s of the window's bytes{err}")


if __name__ == "__main__":
    main()
