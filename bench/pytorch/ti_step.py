"""The PyTorch yardstick for `npm run bench` (issue 10): one Textual Inversion step on an
SD1.5-shaped model with random weights -- CLIP ViT-L/14 text encoder with the trained vector
spliced in, the ldm UNet (openaimodel.py UNetModel + attention.py SpatialTransformer, SD1 v1-inference
config), q_sample, MSE against the noise, backward to the vector, AdamW step -- the same computation
sidetrain's TI job does (trainers/methods/textual-inversion.ts). Plain torch, float32, batch 1, full (unsliced)
attention like ldm's CrossAttention, frozen weights with requires_grad=False.

Run as the bench does: LD_PRELOAD=libjemalloc.so.2 /usr/bin/python3 bench/pytorch/ti_step.py --px 256
(Debian python3-torch with libopenblas0-pthread as the system BLAS, 2 threads). Prints one JSON line.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(ch, eps=1e-5):
    return nn.GroupNorm(32, ch, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb=1280):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        b, n, c = x.shape
        h = self.heads
        split = lambda t: t.reshape(b, -1, h, c // h).transpose(1, 2).reshape(b * h, -1, c // h)
        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        attn = (torch.bmm(q, k.transpose(1, 2)) * self.scale).softmax(-1)
        out = torch.bmm(attn, v).reshape(b, h, n, c // h).transpose(1, 2).reshape(b, n, c)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, heads)
        self.attn2 = CrossAttention(dim, ctx_dim, heads)
        self.proj = nn.Linear(dim, dim * 8)  # GEGLU
        self.out = nn.Linear(dim * 4, dim)

    def forward(self, x, ctx):
        n1 = self.norm1(x)
        x = x + self.attn1(n1, n1)
        x = x + self.attn2(self.norm2(x), ctx)
        value, gate = self.proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, ctx_dim=768, heads=8):
        super().__init__()
        self.norm = group_norm(ch, 1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.block = TransformerBlock(ch, ctx_dim, heads)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, ctx):
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).reshape(b, c, hh * ww).transpose(1, 2)
        h = self.block(h, ctx).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Seq(nn.ModuleList):
    def forward(self, x, emb, ctx):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, ctx)
            elif isinstance(layer, Up):
                x = layer(x)
            else:
                x = layer(x)
        return x


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """SD1.5 v1-inference.yaml: 320 channels, mult 1,2,4,4, 2 res blocks, attention at levels 0-2, 8 heads."""

    def __init__(self, mc=320, mult=(1, 2, 4, 4), nres=2, attn_levels=(0, 1, 2)):
        super().__init__()
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, mc * 4), nn.SiLU(), nn.Linear(mc * 4, mc * 4))
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(4, mc, 3, padding=1)])])
        chans, ch = [mc], mc
        for level, m in enumerate(mult):
            for _ in range(nres):
                layers = [ResBlock(ch, m * mc)]
                ch = m * mc
                if level in attn_levels:
                    layers.append(SpatialTransformer(ch))
                self.input_blocks.append(Seq(layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Seq([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
        self.middle_block = Seq([ResBlock(ch, ch), SpatialTransformer(ch), ResBlock(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(nres + 1):
                layers = [ResBlock(ch + chans.pop(), m * mc)]
                ch = m * mc
                if level in attn_levels:
                    layers.append(SpatialTransformer(ch))
                if level and i == nres:
                    layers.append(Up(ch))
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, padding=1))

    def forward(self, x, t, ctx):
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], -1))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, ctx)
            skips.append(h)
        h = self.middle_block(h, emb, ctx)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], 1), emb, ctx)
        return self.out(h)


class ClipLayer(nn.Module):
    def __init__(self, w=768, heads=12):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.q, self.k, self.v, self.o = (nn.Linear(w, w) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x, mask):
        b, n, c = x.shape
        split = lambda t: t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        h = self.ln1(x)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        attn = ((q @ k.transpose(-1, -2)) * (c // self.heads) ** -0.5 + mask).softmax(-1)
        x = x + self.o((attn @ v).transpose(1, 2).reshape(b, n, c))
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class ClipText(nn.Module):
    """CLIP ViT-L/14 text tower (HF CLIPTextModel layout, as SD1.5 checkpoints store it)."""

    def __init__(self, vocab=49408, w=768, layers=12):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, w)
        self.position_embedding = nn.Parameter(torch.randn(77, w) * 0.01)
        self.layers = nn.ModuleList(ClipLayer(w) for _ in range(layers))
        self.final_ln = nn.LayerNorm(w)
        self.register_buffer("mask", torch.full((77, 77), float("-inf")).triu(1))

    def forward(self, ids, vector, at):
        emb = self.token_embedding(ids)  # [B, 77, w]
        emb = torch.cat([emb[:, :at], vector[None].expand(ids.shape[0], -1, -1), emb[:, at + vector.shape[0]:]], 1)
        x = emb + self.position_embedding
        for layer in self.layers:
            x = layer(x, self.mask)
        return self.final_ln(x)


def schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    text, unet = ClipText(), UNet()
    for p in [*text.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    load_s = time.perf_counter() - t0
    acp = schedule()
    vector = torch.nn.Parameter(text.token_embedding.weight[[320]].clone())  # 1 vector, init from a token
    opt = torch.optim.AdamW([vector], lr=0.005, weight_decay=0.0)
    ids = torch.full((args.batch, 77), 49407, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = 49406, 0, 320  # BOS, the embedding's slot, a word
    lat = args.px // 8
    times = []
    for step in range(args.steps + 1):
        s0 = time.perf_counter()
        latents = torch.randn(args.batch, 4, lat, lat)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,))
        a = acp[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ctx = text(ids, vector, 1)
        loss = F.mse_loss(unet(noisy, t, ctx), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - s0)
    timed = sorted(times[1:]) or times
    print(json.dumps({
        "px": args.px, "batch": args.batch, "threads": args.threads, "steps": len(timed),
        "secondsPerStep": timed[len(timed) // 2], "firstStepSeconds": times[0], "buildSeconds": load_s,
        "peakRssBytes": peak_rss_bytes(), "torch": torch.__version__,
        "unetParams": sum(p.numel() for p in unet.parameters()), "textParams": sum(p.numel() for p in text.parameters()),
    }))


if __name__ == "__main__":
    main()
