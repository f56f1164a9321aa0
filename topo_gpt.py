"""TopoLM: a GPT whose units sit on a cortical sheet.

Rathi, Mehrer, AlKhamissi, Binhuraib, Blauch, Schrimpf. "TopoLM: brain-like spatio-functional organization in a
topographic language model". ICLR 2025. Official code: epflneuroailab/topolm.

nanoGPT's GPT-2, in which the C = side*side units of every attention output and every MLP output (the maps) each have
a place on a side x side grid. Training adds to the next-token loss a spatial correlation loss (from TDANN, Margalit
et al. 2024) that asks nearby units to respond alike. In a window of n units:

    r_ij = corr(x_i, x_j)                 response correlation of units i and j over the B*T tokens
    D_ij = 1 / (1 + ||p_i - p_j||)        inverse distance of their places p on the grid
    SL   = 0.5 * (1 - corr(lowtri(r), lowtri(D)))     lowtri: the strict lower triangle, each pair once
    loss = CE + alpha * (sum over the maps of the mean SL of n_neighborhoods random windows of the map)

SL is 0 when correlation falls off with distance as D does, 0.5 when it is unrelated to distance, 1 when it rises
with it. Below: config, the spatial loss and the grid, the model, data, the training loop; last, the plumbing.
"""

import os
# before torch loads OpenMP: waiting threads sleep, so that on shared cores they starve no other (docs/speed.md)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import re, sys, math, time, json, ctypes, pickle, signal, argparse, warnings
from contextlib import nullcontext, contextmanager
from dataclasses import dataclass, asdict, fields
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.distributed import init_process_group, destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

# ---- config, each key a --key=value: its comment is its --help, a check before the colon (x >= 1, a|b) its values ----
# I/O
out_dir = 'out'  # where ckpt.pt is written
eval_interval = 200  # x >= 1: evaluate, and save a checkpoint, every this many steps
log_interval = 10  # x >= 1: print a training line every this many steps
eval_iters = 20  # x >= 1: batches per split in an evaluation
resume = False  # continue the run in out_dir from its ckpt.pt
snapshot_iters = ''  # keep the model in out_dir/snapshots/ at these steps: 0,50,100, or log = 0, 25, 50, 100, ...
# data
data_dir = 'data'  # where prepare_data.py writes its folders
dataset = 'shakespeare'  # reads data_dir/dataset/{train,val}.bin, written by prepare_data.py
gradient_accumulation_steps = 1  # x >= 1: micro-batches per optimizer step, over all processes
batch_size = 8  # x >= 1: sequences per micro-batch
block_size = 128  # x >= 1: tokens per sequence (the context)
# model
n_layer = 4  # x >= 1: transformer blocks; each has 2 maps
n_head = 4  # x >= 1: attention heads; must divide n_embd
n_embd = 256  # x >= 1: units per map, a perfect square: 256 units = a 16 x 16 grid
dropout = 0.0  # 0 <= x < 1: dropout probability
bias = False  # biases in the Linears and LayerNorms
# topography (Rathi et al. 2025)
alpha = 2.5  # x >= 0: weight of the spatial loss; 0 = the non-topographic control
radius = 5  # x >= 2: neighbourhoods are windows of side 2*radius-1 (5: 9 x 9 = 81 units)
n_neighborhoods = 5  # x >= 1: windows drawn per map per step
residual_maps = False  # the maps are the sublayer outputs (False, the paper) or the residual stream (True)
# AdamW
learning_rate = 1e-3  # x > 0: peak learning rate
max_iters = 2000  # x >= 1: optimizer steps of the whole run
weight_decay = 0.1  # x >= 0: on 2-D weights (matmuls, embeddings)
beta1 = 0.9  # 0 <= x < 1: AdamW's decay of the gradient's mean
beta2 = 0.95  # 0 <= x < 1: AdamW's decay of the gradient's square
grad_clip = 1.0  # x >= 0: clip the gradient norm at this value; 0 = no clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100  # x >= 0: steps of linear warmup
lr_decay_iters = 0  # x >= 0: the step at which the cosine decay reaches min_lr; 0 = max_iters
min_lr = 1e-4  # x >= 0: the learning rate after the decay
# system
device = 'auto'  # auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto|float32|bfloat16|float16: auto = bf16 where the device has it natively (see precision)
compile = False  # compile the model with torch.compile
seed = 1337  # x >= 0: seeds the batches, the windows and the units' places
preset = ''  # a named set of overrides, applied before the other keys (see PRESETS)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and k.islower() and type(v) in (bool, int, float, str)}
PRESETS = {
    # the paper's model and its official config (models/config/train_gpt2.yaml; the keys not here: the defaults):
    # GPT-2 small on 28 x 28 grids, 983,040 tokens a step; ours: 10k steps, one pass over FineWeb-Edu's 10B sample
    'paper': dict(dataset='fineweb-edu', n_layer=12, n_head=16, n_embd=784, block_size=1024, batch_size=48,
                  gradient_accumulation_steps=20, learning_rate=6e-4, warmup_iters=2000, max_iters=10000, min_lr=6e-5,
                  eval_interval=1000, eval_iters=200, alpha=2.5, radius=5, n_neighborhoods=5),
    # the five-minute classroom loop (docs/classroom.md): a model and its control in about a minute each
    'classroom': dict(n_layer=2, n_head=4, n_embd=256, block_size=64, batch_size=8, max_iters=400,
                      eval_interval=200, eval_iters=10, warmup_iters=40, snapshot_iters='log'),
}
MODEL_TYPE = 'topolm'  # written into every checkpoint: analyze.py tells the models apart by it
GPT2_VOCAB = 50257  # GPT-2's tokens; the vocabulary is padded to 50304 (a multiple of 64, for speed)

# ---- Topography. The model looks up spatial_correlation_loss and distance_kernel at each call: assign yours to swap

def distance_kernel(d):
    """How alike two units at grid distance d should respond: TopoLM's inverse distance, 1 / (1 + d)."""
    return 1 / (1 + d)

def correlation(x):
    """Pearson correlation of every pair of the n units over the N samples, x (..., N, n) -> r (..., n, n):
        xc = x - mean(x),   cov = xc^T xc,   r_ij = cov_ij / sqrt(cov_ii cov_jj)   (+ epsilon: silent units get 0)"""
    cov = Covariance.apply(x)  # xc^T xc, with its gradient written by hand (see Covariance, below)
    std = (cov.diagonal(dim1=-2, dim2=-1) + 1e-8).sqrt()  # (..., n)
    return cov / (std[..., :, None] * std[..., None, :])

def lowtri(a):
    """(..., n, n) -> (..., n(n-1)/2): the strict lower triangle, every pair once (index_select: a cheap gradient)."""
    i, j = torch.tril_indices(a.size(-1), a.size(-1), offset=-1, device=a.device)
    return a.flatten(-2).index_select(-1, i * a.size(-1) + j)

def spatial_correlation_loss(x, pos):
    """SL of K windows of n units (top of this file): x (K, N, n) their responses to N samples, pos (n, 2) their
    places, the same in every window (one square, shifted), or (K, n, 2) -> (K,). One window, x (N, n): a scalar."""
    r = lowtri(correlation(x))  # (K, P), P = n(n-1)/2 pairs
    D = lowtri(distance_kernel(torch.cdist(pos, pos)))  # (P,) or (K, P)
    r = r - r.mean(dim=-1, keepdim=True)  # SL = 0.5 (1 - the Pearson correlation of r and D)
    D = D - D.mean(dim=-1, keepdim=True)
    corr = (r * D).sum(-1) / (r.norm(dim=-1) * D.norm(dim=-1) + 1e-8)
    return 0.5 * (1 - corr)

def grid_of(unit_pos, side):
    """The inverse of unit_pos (n_maps, side*side, 2): grid (n_maps, side, side), the unit at each place."""
    return (unit_pos[..., 0] * side + unit_pos[..., 1]).argsort(dim=1, stable=True).view(-1, side, side)

def lattice_positions(n_maps, side, seed):
    """Each map's units randomly permuted on the lattice, so only the spatial loss makes neighbours alike: (M, C, 2)."""
    g = torch.Generator().manual_seed(seed)
    places = torch.stack([torch.randperm(side * side, generator=g) for _ in range(n_maps)])  # unit u at places[:, u]
    return torch.stack([places // side, places % side], dim=-1)  # (row, col) of each place row * side + col

def window_places(side, radius):
    """Every w x w window, w = 2 radius - 1, inside the lattice, as the official code lists them: (W, w*w) places."""
    w, places = 2 * radius - 1, torch.arange(side * side).view(side, side)
    return places.unfold(0, w, 1).unfold(1, w, 1).reshape(-1, w * w) if w <= side else places.new_empty(0, w * w)

def sample_neighborhoods(n_maps, n_windows, k):
    """k distinct windows per map, drawn anew every step as the official code draws them: (n_maps, k) window ids."""
    return torch.rand(n_maps, n_windows).argsort(dim=1)[:, :k]

class Covariance(torch.autograd.Function):
    """A speed trick, set apart: correlation()'s cov = xc^T xc, its gradient by hand, d cov -> xc (G + G^T) as xc sums
    to zero: one matmul where autograd spends two and a pass for the mean. 3x faster; test_topo.py checks it."""
    @staticmethod
    def forward(ctx, x):
        xc = x - x.mean(dim=-2, keepdim=True)
        ctx.save_for_backward(xc)
        return xc.transpose(-1, -2) @ xc

    @staticmethod
    def backward(ctx, g):
        xc, = ctx.saved_tensors
        # (G + G^T) xc^T, transposed: laid out like x, the model's transposed (K, n, N) gather: no copy on the way back
        return ((g + g.transpose(-1, -2)) @ xc.transpose(-1, -2)).transpose(-1, -2)

# ---- The model: nanoGPT's GPT-2, with every block exposing two spatial maps ------------------------------------------

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 tokens, padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 784  # side * side units per map
    dropout: float = 0.0
    bias: bool = True
    alpha: float = 2.5  # 0 = non-topographic control: the spatial loss is not computed in training
    radius: int = 5
    n_neighborhoods: int = 5
    residual_maps: bool = False
    seed: int = 1337  # draws the units' grid positions

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        # q, k, v: (B, nh, T, hs); flash attention where the device and the head size allow it
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))  # (B, T, C)

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.residual_maps = config.residual_maps

    def forward(self, x):
        a = self.attn(self.ln_1(x))  # (B, T, C) spatial map 'attn'
        x = h = x + a
        m = self.mlp(self.ln_2(x))  # (B, T, C) spatial map 'mlp'
        x = x + m
        # the paper's maps are the sublayer outputs; residual_maps: the stream after each add (the official default)
        return x, ((h, x) if self.residual_maps else (a, m))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        side, w = math.isqrt(config.n_embd), 2 * config.radius - 1
        if side * side != config.n_embd:
            raise UsageError(f"n_embd={config.n_embd} is not a perfect square (256 = 16 x 16 units, 784 = 28 x 28)")
        if config.n_embd % config.n_head:
            raise UsageError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        n_windows = len(window_places(side, config.radius))  # (the control's too: its evaluation measures it)
        if not 1 <= config.n_neighborhoods <= n_windows:
            raise UsageError(f"radius={config.radius}, n_neighborhoods={config.n_neighborhoods} do not fit the "
                             f"{side} x {side} grid: it holds {n_windows} windows of {w} x {w} units")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # each map's own places, in every checkpoint: unit_pos[m, u] = (row, col), grid its inverse; then the windows
        self.map_names = [f'h.{l}.{s}' for l in range(config.n_layer) for s in ('attn', 'mlp')]
        self.register_buffer('unit_pos', lattice_positions(len(self.map_names), side, config.seed))  # (M, C, 2)
        self.register_buffer('grid', grid_of(self.unit_pos, side))  # (M, side, side)
        self.register_buffer('window_places', window_places(side, config.radius), persistent=False)  # (W, n)
        w0 = self.window_places[0]  # the (row, col) of a window's units, the same in every window (one square, shifted)
        self.register_buffer('window_pos', torch.stack([w0 // side, w0 % side], -1).float(), persistent=False)  # (n, 2)
        self.ce_loss = self.spatial_loss = None  # the two parts of the last loss, for logging

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):
        # the position embeddings are not counted, as in nanoGPT; the token embeddings are (tied)
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def positions(self, map_name):
        """(n_embd, 2) grid coordinates (row, col) of the units of one map, e.g. 'h.0.attn'."""
        return self.unit_pos[self.map_names.index(map_name)].float()

    def forward(self, idx, targets=None, return_maps=False, windows=None):
        """idx, targets (B, T): tokens and their next tokens; windows: the step's (sample_neighborhoods), drawn
        here if not given -> logits (B, T, vocab), loss (None without targets) [, {'h.<l>.attn|mlp': (B, T, C)}]"""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device)))
        maps = []
        for block in self.transformer.h:
            x, (attn_map, mlp_map) = block(x)
            maps += [attn_map, mlp_map]
        logits, loss = self.lm_head(self.transformer.ln_f(x)), None  # (B, T, vocab_size)
        if targets is not None:
            self.ce_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            loss = self.ce_loss
            # loss = CE + alpha * spatial loss; the control (alpha = 0) skips it in training, evaluation measures it
            if self.config.alpha > 0 or not self.training:
                if windows is None:
                    windows = sample_neighborhoods(len(maps), len(self.window_places), self.config.n_neighborhoods)
                self.spatial_loss = self.spatial_loss_of(maps, windows.to(idx.device))
                loss = loss + self.config.alpha * self.spatial_loss
        return (logits, loss, dict(zip(self.map_names, maps))) if return_maps else (logits, loss)

    def spatial_loss_of(self, maps, windows):
        """sum_m mean_k SL(the responses of the units in window k of map m): maps, M tensors (B, T, C); windows (M, K).
        All M*K windows go through spatial_correlation_loss in one call: a few big products, not M small ones."""
        (M, K), C, n = windows.shape, self.config.n_embd, len(self.window_pos)
        units = self.grid.view(M, -1).gather(1, self.window_places[windows].view(M, -1))  # (M, K*n) units in windows
        # map m's window units, their responses over the N = B*T tokens: (M*K, n, N)
        x = torch.stack([m.reshape(-1, C).t().index_select(0, u) for m, u in zip(maps, units)]).view(M * K, n, -1)
        with torch.autocast(device_type=x.device.type, enabled=False):  # in float32, even under autocast
            sl = spatial_correlation_loss(x.float().transpose(1, 2), self.window_pos)  # (M*K,)
        return sl.view(M, K).mean(dim=1).sum()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """nanoGPT's: idx (B, T) + max_new_tokens tokens, each from softmax(last logits / temperature) of the top_k."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1, :] / temperature  # (B, vocab_size)
            logits[:, GPT2_VOCAB:] = -float('inf')  # never the vocabulary's padding
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == 'cuda') or None)

    @classmethod
    def from_checkpoint(cls, path, device='cpu'):
        """The trained model, grid places included, of a ckpt.pt or snapshot of this script (or its loaded dict)."""
        ckpt = load_checkpoint(path) if isinstance(path, str) else path
        model = cls(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        return model.to(device).eval()

    @classmethod
    def from_official(cls, path, positions_dir=None, device='cpu'):
        """A model of the official TopoLM code (the published ones), its places from its position pickles."""
        config, state = read_official(path, positions_dir)
        return cls.from_checkpoint(dict(model_type=MODEL_TYPE, model_args=config, model=state), device)

# ---- Data: nanoGPT's loader, random chunks of the uint16 token files that prepare_data.py writes ---------------------

def open_split(cfg, split):
    """data_dir/dataset/split.bin as uint16 tokens, checked against meta.json, which prepare_data.py writes last."""
    folder = os.path.join(cfg['data_dir'], cfg['dataset'])
    path = os.path.join(folder, f'{split}.bin')
    rerun = f"run `python prepare_data.py` (Shakespeare) or `... --input=YOUR_TEXT --name={cfg['dataset']}`"
    if not os.path.isfile(path):
        raise UsageError(f"no {path}: {rerun}")
    try:
        with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
            n = json.load(f)[f'{split}_tokens']
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{folder} has no complete meta.json (an interrupted prepare_data.py?): {rerun}") from None
    if os.path.getsize(path) != 2 * n:
        raise UsageError(f"{path} does not hold the {n} tokens of meta.json, mixed or damaged: {rerun}")
    if n <= cfg['block_size'] + 1:
        raise UsageError(f"{path} has {n} tokens, too few for block_size={cfg['block_size']}")
    return np.memmap(path, dtype=np.uint16, mode='r')

def get_batch(data, batch_size, block_size, generator=None):
    # x: (B, T) tokens, y: (B, T) the tokens that follow them, on the CPU
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y

# ---- The training loop: its own functions (the learning rate, one step, an evaluation), then main() ------------------

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr. Depends on the iteration only (for resume)."""
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it > decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])

def train_step(model, optimizer, scaler, ctx, next_batch, accum, grad_clip):
    """One step of accum micro-batches, next_batch() -> (x, y, the model's other inputs) -> (loss, gradient norm)."""
    ddp = isinstance(getattr(model, '_orig_mod', model), DDP)  # (compiled: the DDP inside; no_sync reaches it)
    for micro_step in range(accum):
        x, y, kw = next_batch()
        with model.no_sync() if ddp and micro_step < accum - 1 else nullcontext():  # DDP: all-reduce at the last only
            with ctx:
                _, loss = model(x, y, **kw)
            scaler.scale(loss / accum).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    scaler.step(optimizer)  # (fp16: a step with gradients that are not finite is skipped)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm  # tensors: nothing here waits for the device

@torch.no_grad()
def estimate_loss(model, batch, eval_iters, seed, ctx):
    """{split: (mean CE, mean SL)}: the same batches each time; fork_rng: evaluating never alters the training."""
    out = {}
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for split in ('train', 'val'):
            g, ce, sl = torch.Generator().manual_seed(seed), torch.zeros(eval_iters), torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y, kw = batch(split, g)
                with ctx:
                    model(x, y, **kw)
                ce[k], sl[k] = model.ce_loss.item(), model.spatial_loss.item()
            out[split] = (ce.mean().item(), sl.mean().item())
    model.train()
    return out

def main(argv):
    cfg, given = parse_config(argv, DEFAULTS, PRESETS, __doc__, __file__)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path, resume=True) if cfg['resume'] else None
    cfg = resume_config(ckpt, given, ckpt_path) if ckpt else cfg
    snapshots = check_schedule(cfg)
    ddp, rank, world, dev = start_processes(cfg['device'])
    dtype, ctx, scaler = precision(cfg['dtype'], dev)
    accum, B = share_step(cfg['gradient_accumulation_steps'], cfg['batch_size'], world)
    master = rank == 0
    torch.manual_seed(cfg['seed'] + rank)  # each process draws its own batches and windows
    model = raw_model = GPT(GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg})).to(dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                           dev.split(':')[0])
    iter_num, best_val_loss, first_val_loss = 0, float('inf'), None
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt.get('scaler') or scaler.state_dict())  # fp16: the scale the run had reached
        iter_num, best_val_loss, first_val_loss = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['first_val_loss']
        set_rng_state(ckpt['rng'], dev, cfg['seed'] + rank + 1000 * iter_num if ddp else None)
        ckpt = None  # free the memory
    data = {split: open_split(cfg, split) for split in ('train', 'val')}
    M, W, K = len(model.map_names), len(model.window_places), cfg['n_neighborhoods']
    def batch(split, generator=None):  # the tokens, then the windows of the spatial loss where GPT.forward computes it
        x, y = get_batch(data[split], B, cfg['block_size'], generator)
        w = sample_neighborhoods(M, W, K) if cfg['alpha'] > 0 or not raw_model.training else None
        x, y, w = to_device(dev, x, y, w)
        return x, y, dict(windows=w)
    writable_dir(cfg['out_dir'])  # in every process: a usage error that all of them stop on
    tokens_per_iter = accum * world * B * cfg['block_size']
    side, hs = math.isqrt(cfg['n_embd']), cfg['n_embd'] // cfg['n_head']
    if master:
        print(f"TopoLM: {model.get_num_params() / 1e6:.2f}M parameters, {cfg['n_layer']} layers, {M} maps of {side}x"
              f"{side} units, alpha={cfg['alpha']}, radius={cfg['radius']}, {K} neighbourhoods/map\ndevice {dev}, "
              f"{dtype}, {world} process(es) of {accum} x {B} sequences, {tokens_per_iter:,} tokens per iteration"
              + "\ncompiling the model... (under a minute on a CPU, during the first steps)" * cfg['compile'])
    if master and 'cuda' in dev and dtype == 'float32' and hs % 4:  # (neither flash nor memory-efficient attention)
        print(f"note: in float32, CUDA attention on heads of {hs} units stores every score: "
              f"{B * cfg['n_head'] * cfg['n_layer'] * cfg['block_size'] ** 2 * 4 / 1e9:.0f} GB a micro-batch")
    if ddp:  # DDP, then compile, as PyTorch documents: the all-reduce then overlaps the compiled backward
        model = DDP(model, device_ids=[dev] if dev.startswith('cuda') else None, broadcast_buffers=False)
    if cfg['compile']:
        warnings.filterwarnings('ignore', module=r'torch\._inductor')  # notes on its internals, not on the model
        model = torch.compile(model)
    start_iter, saved = iter_num, (iter_num if cfg['resume'] else None)  # saved: the step ckpt.pt holds
    if saved is None and master and os.path.exists(ckpt_path):
        print(f"note: {ckpt_path} is an earlier run's; this run replaces it at its first save (--resume continues it)")
    t0, it0 = time.time(), iter_num
    diverged = lambda why: UsageError(f"training diverged at iter {iter_num} ({why}) and stopped; "
                                      f"{last_checkpoint(ckpt_path, saved)}. Try a lower learning_rate or alpha.")
    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            if master and (iter_num % cfg['eval_interval'] == 0 or iter_num in snapshots | {cfg['max_iters']}):
                (tce, _), (vce, vsl) = estimate_loss(raw_model, batch, cfg['eval_iters'], cfg['seed'], ctx).values()
                print(f"step {iter_num}: train ce {tce:.4f}, val ce {vce:.4f}, val spatial loss {vsl:.4f}")
                first_val_loss = vce if first_val_loss is None else first_val_loss
                if not math.isfinite(tce + vce + vsl) or vce > 2 * first_val_loss + 1:  # diverged: never saved
                    raise diverged(f"val ce {vce:.4g}, it started at {first_val_loss:.4g}")
                best_val_loss = min(best_val_loss, vce)
                if iter_num > start_iter:  # (a resumed run's first evaluation has nothing new to save)
                    left, saved = last_checkpoint(ckpt_path, saved), iter_num  # (a Ctrl-C in the save comes after it)
                    save_checkpoint(ckpt_path, checkpoint_of(raw_model, iter_num, cfg, optimizer, dev, best_val_loss,
                                                             first_val_loss, scaler=scaler.state_dict()), left)
                if iter_num in snapshots and (iter_num > start_iter or not cfg['resume']):  # (for analyze.py)
                    snapshot = checkpoint_of(raw_model, iter_num, cfg, losses=dict(train=tce, val=vce, val_spatial=vsl))
                    save_checkpoint(os.path.join(cfg['out_dir'], 'snapshots', f'step_{iter_num:06d}.pt'), snapshot,
                                    last_checkpoint(ckpt_path, saved))
                t0, it0 = time.time(), iter_num
            if iter_num >= cfg['max_iters']:
                break
            loss, norm = train_step(model, optimizer, scaler, ctx, lambda: batch('train'), accum, cfg['grad_clip'])
            iter_num += 1
            if master and iter_num % cfg['log_interval'] == 0:  # the one wait for the device, every log_interval
                loss, dt = loss.item(), (time.time() - t0) / (iter_num - it0)
                if not math.isfinite(loss):  # (a non-finite step has reached the weights, unless fp16 skipped it)
                    raise diverged(f"loss {loss}, gradient norm {norm.item():.4g}")
                parts = f"spatial {raw_model.spatial_loss.item():.4f}" if cfg['alpha'] > 0 else 'control'
                print(f"iter {iter_num}: loss {loss:.4f} (ce {raw_model.ce_loss.item():.4f}, {parts}), lr {lr:.2e}, "
                      f"{dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s", flush=True)
                t0, it0 = time.time(), iter_num
    except KeyboardInterrupt:
        raise KeyboardInterrupt(last_checkpoint(ckpt_path, saved)) from None
    if start_iter >= cfg['max_iters'] and master:
        print(f"nothing to train: the run is at iter {start_iter} and max_iters={cfg['max_iters']}")
    if ddp:
        destroy_process_group()

# =============================================================================
# Plumbing that is not the model: command line, devices, precision, checkpoint files, command() (the same in
# topo_gpt.py and topoformer.py: a test keeps the copies identical); last, the official checkpoint's reader.

class UsageError(ValueError):
    """Bad input: one line, no traceback (command()). The models raise it for a shape they cannot take."""

def parse_config(argv, defaults, presets, doc, source):
    """The defaults, --preset=NAME over them, each --key=value (a bare --flag: True) over both -> (config, keys set)."""
    with open(source, encoding='utf-8') as f:
        notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", f.read().split('\nDEFAULTS')[0], re.M))
    checks = {k: (re.match(r"((?:\S+ <=? )?x [<>]=? \S+|[\w-]*(?:\|[\w-]*)+): ", notes[k]) or [''] * 2)[1]
              for k in defaults}
    parser = argparse.ArgumentParser(os.path.basename(source), '%(prog)s [--key=value ...]', doc, '\n'.join(
        f"--preset={name}: {p}" for name, p in presets.items()), formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, argument_default=argparse.SUPPRESS)
    def error(message):  # argparse's own messages (a bad type, an unknown key, ...), as a UsageError
        raise UsageError(f"{message.removeprefix('argument ')} (see --help)")
    parser.error = error
    for key, default in defaults.items():
        choices = ['', *presets] if key == 'preset' else checks[key].split('|') if '|' in checks[key] else None
        flag = {'nargs': '?', 'const': True} if isinstance(default, bool) else {}  # a bare --flag is True
        parser.add_argument(f'--{key}', type=boolean if flag else type(default), choices=choices,
                            metavar='True|False' if flag else '', help=f"{notes[key]} ({default!r})", **flag)
    given = vars(parser.parse_args(argv))
    given = {**presets.get(given.get('preset'), {}), **given}  # explicit keys win over the preset
    for key, value in given.items():
        check = checks[key] if 'x' in checks[key] else 'True'
        if type(value) in (int, float) and not (math.isfinite(value) and eval(check, {'x': value})):
            raise UsageError(f"--{key}={value}: must be finite{f' and {check}' * (check != 'True')}")
    return {**defaults, **given}, given

def boolean(text):
    """A boolean on the command line: True, False, 1 or 0 (else a ValueError, which argparse reports)."""
    return ['false', '0', 'true', '1'].index(text.lower()) >= 2

def start_processes(device):
    """One process, or one per device under torchrun (DDP) -> (ddp, rank, world, device), a GPU made current."""
    rank, world, local, n_local = [int(os.environ.get(k, 0))
                                   for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')]
    n_gpus, mps = torch.cuda.device_count() if torch.cuda.is_available() else 0, torch.backends.mps.is_available()
    dev = device if device != 'auto' else 'cuda' if n_gpus else 'mps' if mps else 'cpu'
    if dev.startswith('cuda:') and n_local > 1:
        raise UsageError(f"--device={dev} puts all {n_local} processes on one GPU; under torchrun use --device=cuda")
    dev = f'cuda:{local}' if dev == 'cuda' else dev
    if not (dev == 'cpu' or dev == 'mps' and mps or re.fullmatch(r'cuda:\d+', dev) and int(dev[5:]) < n_gpus):
        raise UsageError(f"--device={device}: not a device (this machine has cpu{f', {n_gpus} GPUs' * bool(n_gpus)}"
                         f"{', mps' * mps}){f'; start at most --nproc_per_node={n_gpus}' * bool(n_local)}")
    if 'cuda' in dev:
        torch.cuda.set_device(dev)  # synchronize, memory figures and bf16 support then ask this GPU
    if 'RANK' in os.environ:
        init_process_group(backend='nccl' if 'cuda' in dev else 'gloo')
        # torch 2.13 deprecates main()'s DDP(broadcast_buffers=False) (the buffers are alike everywhere): no notice
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated', category=FutureWarning)
    if dev == 'cpu':
        keep_freed_memory()
    return 'RANK' in os.environ, rank, max(world, 1), dev

def precision(name, dev):
    """--dtype -> (dtype, autocast, scaler); auto: bf16 where native, else fp16 with a scaler on CUDA, else float32."""
    kind = dev.split(':')[0]
    native = (torch.cuda.is_bf16_supported(including_emulation=False) if kind == 'cuda' else kind == 'cpu' and any(
        getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')))
    dtype = name if name != 'auto' else 'bfloat16' if native else 'float16' if kind == 'cuda' else 'float32'
    if dtype == 'float16' and kind == 'cpu' or dtype == 'bfloat16' and kind == 'cuda' and not native:
        raise UsageError(f"--dtype={dtype}: this {'GPU has no native bf16' if kind == 'cuda' else 'needs a GPU'}; use "
                         f"{'float16' if kind == 'cuda' else 'bfloat16'} or float32")
    torch.backends.cuda.matmul.allow_tf32 = dtype == 'float32'  # (so under autocast the float32 spatial loss is exact)
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=kind, dtype=getattr(torch, dtype))
    return dtype, ctx, torch.amp.GradScaler(kind, enabled=dtype == 'float16')

def share_step(accum, batch_size, world):
    """A step of accum x batch_size sequences over world processes: fewer micro-batches each, or smaller ones."""
    if accum % world and batch_size % world:
        raise UsageError(f"a step of {accum} x {batch_size} sequences cannot be shared evenly by {world} processes: "
                         f"make gradient_accumulation_steps or batch_size a multiple of {world}")
    return (accum // world, batch_size) if accum % world == 0 else (accum, batch_size // world)

def to_device(dev, *tensors):
    """CPU tensors (or None) on dev; on CUDA pinned and not waiting, so that the copy overlaps the GPU's work."""
    return [t if t is None else t.pin_memory().to(dev, non_blocking=True) if 'cuda' in dev else t.to(dev)
            for t in tensors]

def keep_freed_memory():
    """glibc returns big freed blocks (the logits) to the OS, and fresh pages are slow (docs/speed.md): keep them."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: big blocks come from the heap, not fresh mmaps
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD = -1: never hand freed heap memory back
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows): nothing to do

def check_schedule(cfg):
    """Check the learning-rate schedule; the steps of --snapshot_iters (log: 0, 25, 50, 100, 200, ... and the last)."""
    spec, last = cfg['snapshot_iters'].replace(' ', ''), cfg['max_iters']
    if cfg['min_lr'] > cfg['learning_rate']:
        raise UsageError(f"--min_lr={cfg['min_lr']:g} is above --learning_rate={cfg['learning_rate']:g}")
    if spec != 'log' and (not re.fullmatch(r'(\d+(,\d+)*)?', spec) or any(int(s) > last for s in spec.split(',') if s)):
        raise UsageError(f"--snapshot_iters={spec}: expected log, or steps from 0 to max_iters={last} such as 0,50,100")
    if spec == 'log':
        return {0, last, *(25 * 2 ** k for k in range(last.bit_length()) if 25 * 2 ** k < last)}
    return {int(s) for s in spec.split(',') if s}

@contextmanager
def signals_deferred():
    """Ctrl-C (SIGINT) or SIGTERM inside this block waits until the block is done, then acts as usual."""
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            os.kill(os.getpid(), s)  # delivered now, to the handler that was there before

def save_checkpoint(path, ckpt, left):
    """ckpt into path via a temporary file and a rename, Ctrl-C held off: a kill or a full disk leaves the old file
    whole. If the save fails, its error says left: what the run leaves behind (last_checkpoint)."""
    with signals_deferred():
        try:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            with open(path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + '.tmp', path)
        except (OSError, RuntimeError) as e:
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
            raise UsageError(f"could not write {path} ({(str(e) or type(e).__name__).splitlines()[0]}; a full disk?): "
                             f"{left}") from None
    print(f"saved {path}")

def checkpoint_of(model, iter_num, cfg, optimizer=None, dev=None, best_val_loss=None, first_val_loss=None, **more):
    """A snapshot (model, places, step, config); with the optimizer a checkpoint, all that a bit-exact resume needs."""
    ckpt = dict(model_type=MODEL_TYPE, model_args=asdict(model.config), model=model.state_dict(), iter_num=iter_num,
                config=cfg, **more)
    if optimizer is not None:
        ckpt.update(optimizer=optimizer.state_dict(), best_val_loss=best_val_loss, first_val_loss=first_val_loss, rng={
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(dev) if 'cuda' in dev else None})
    return ckpt

def last_checkpoint(path, step):
    """What a stopped run leaves behind; step: the step that path holds, if it is this run's (else None)."""
    if step is not None:
        return f"{path} holds step {step}, intact"
    return "no checkpoint was saved" + (f" ({path} is an earlier run's, intact)" if os.path.exists(path) else '')

def load_checkpoint(path, resume=False):
    """A checkpoint or snapshot of this script, checked for all that from_checkpoint (resume: --resume) reads."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}" + " (for --resume, set --out_dir to the run's folder)" * resume)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise UsageError(f"{path} cannot be read: damaged, cut short or no torch file ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get('model_type') != MODEL_TYPE:
        raise UsageError(f"{path} is not a {MODEL_TYPE} checkpoint written by {os.path.basename(__file__)}")
    missing = [k for k in ['model_args', 'model'] + resume * ['optimizer', 'iter_num', 'best_val_loss',
                                                            'first_val_loss', 'config', 'rng'] if k not in ckpt]
    if missing:
        raise UsageError(f"{path} is incomplete{' for --resume (a snapshot?)' * resume}: it lacks {', '.join(missing)}")
    return ckpt

def set_rng_state(rng, dev, ddp_seed=None):
    """A checkpoint's RNG states, its GPU's on this GPU; under DDP (only rank 0's were saved) a per-process ddp_seed."""
    if ddp_seed is not None:
        return torch.manual_seed(ddp_seed)
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and 'cuda' in dev:
        torch.cuda.set_rng_state(rng['cuda'], dev)

def resume_config(ckpt, given, path):
    """The run's config, the keys given now over it, the model's fields (shape, alpha, sq, ...) the checkpoint's."""
    old = {**DEFAULTS, **ckpt['config']}
    cfg = {**old, **given, **{k: v for k, v in ckpt['model_args'].items() if k in old}}
    ignored = ', '.join(f'--{k}' for k, v in ckpt['model_args'].items() if k in given and given[k] != v)
    changed = [k for k in 'learning_rate min_lr warmup_iters lr_decay_iters max_iters'.split() if cfg[k] != old[k]]
    if int(os.environ.get('RANK', 0)) == 0:
        it = ckpt['iter_num']
        print(f"resuming from step {it} of {path}" + f"; ignoring {ignored}: --resume keeps the model" * bool(ignored))
        if any(get_lr(i, cfg) != get_lr(i, old) for i in range(it, cfg['max_iters'])):  # (not: the same schedule)
            print(f"note: {', '.join(f'--{k}={cfg[k]:g} (the run had {old[k]:g})' for k in changed)}: the learning "
                  f"rate follows the new schedule, {get_lr(it, cfg):.2e} at step {it} instead of {get_lr(it, old):.2e}")
    return cfg

def writable_dir(path):
    """Fail now unless path is a folder this run can make and write (made at the first save only)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir={path} is not a folder this run can write ({existing} is not a writable folder)")

def command(main, argv, interrupted=''):
    """main as a command: a UsageError is one line, exit 2; Ctrl-C one line, what is left, exit 130."""
    rank = int(os.environ.get('RANK', 0))
    try:
        main(argv)
        return 0
    except UsageError as e:
        if rank:
            # torchrun stops all when one exits: wait for process 0 to say why (still alive: it did not, so say it here)
            time.sleep(30)
        print(f"error: {f'process {rank}: ' * bool(rank)}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not rank:
            print('; '.join(['error: interrupted'] + [s for s in (str(e), interrupted) if s][:1]), file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not rank:
            raise
        # under torchrun, when the first process stops (it says why), the others' collective calls fail
        print(f"error: process {rank} stopped: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 1

def read_pickled(path, torch_file=False):
    """A pickle (torch_file: torch.save's) of the official TopoLM code; OmegaConf, LayerPositions as plain objects."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split('.')[0] in ('omegaconf', 'positions'):
                return type(name, (), {})  # a plain class: pickle puts the object's state in its __dict__
            return super().find_class(module, name)
    if torch_file:
        return torch.load(path, map_location='cpu', weights_only=False, mmap=True,  # a pickle_module: just an Unpickler
                          pickle_module=type('pickle', (), {'Unpickler': Unpickler}))
    with open(path, 'rb') as f:
        return Unpickler(f).load()

def read_official(path, positions_dir=None):
    """A checkpoint of the official TopoLM code (models/train.py), or its loaded dict -> (GPTConfig's fields, our state
    dict); each map's places are those of positions_dir/layer.{l}.{attn,mlp}.pkl (default: its position_dir)."""
    ckpt = read_pickled(path, torch_file=True) if isinstance(path, str) else path
    args = ckpt.get('model_args') if isinstance(ckpt, dict) else None
    if not isinstance(args, dict) or 'n_embed' not in args or any(args.get(k) for k in ('head_loss', 'attn_proj')):
        raise ValueError("not the official TopoLM's GPT-2 (model_args with n_embed) or its head_loss/attn_proj variant")
    if positions_dir is None and not (isinstance(path, str) and 'position_dir' in args):
        raise ValueError("positions_dir is needed: where the official position pickles are")
    positions_dir = positions_dir or os.path.join(os.path.dirname(os.path.abspath(path)), args['position_dir'])
    side, coords = math.isqrt(args['n_embed']), []
    for name in (f'layer.{l}.{s}' for l in range(args['n_layer']) for s in ('attn', 'mlp')):
        file = os.path.join(positions_dir, f'{name}.pkl')
        if not os.path.isfile(file):
            raise ValueError(f"no unit positions {file} (the official repository's models/gpt2-positions/)")
        layer = read_pickled(file).__dict__
        coords.append(torch.as_tensor(layer['coordinates']).round().long())
        if coords[-1].shape != (side * side, 2) or not ((0 <= coords[-1]) & (coords[-1] < side)).all():
            raise ValueError(f"{file} holds no places on a {side} x {side} grid: positions of another model size?")
    window = int(torch.as_tensor(layer['neighborhood_indices'])[0].sum())  # (2 radius - 1)^2 units
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}  # saved from torch.compile
    # published places may put two units on a cell (docs/deviations.md): unit_pos keeps them, grid lists them by place
    state.update(unit_pos=torch.stack(coords), grid=grid_of(torch.stack(coords), side))
    return dict({k: args[k] for k in ('n_layer', 'n_head', 'block_size', 'vocab_size', 'dropout', 'bias')},
                n_embd=args['n_embed'], alpha=args.get('alpha', 0.25), residual_maps=args.get('with_resid', True),
                n_neighborhoods=int(layer['neighborhoods_per_batch']), radius=(math.isqrt(window) + 1) // 2), state

if __name__ == '__main__':
    sys.exit(command(main, sys.argv[1:]))
