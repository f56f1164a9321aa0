"""
TopoLM: a GPT whose units sit on a cortical sheet.

Rathi, Mehrer, AlKhamissi, Binhuraib, Blauch, Schrimpf. "TopoLM: brain-like spatio-functional
organization in a topographic language model". ICLR 2025.

A GPT-2-style decoder (as in nanoGPT) in which the C = side*side units of every attention output and
every MLP output are given a position on a side x side grid. Training adds to the next-token loss a
spatial correlation loss (from TDANN, Margalit et al. 2024): inside small windows of the grid, the
response correlation of two units should track how close they are. Nearby units come to respond alike,
and functional clusters (e.g. language-selective patches) appear on the grid.

Read it top to bottom: config, model (the spatial loss first), spatial geometry, data loader, training
loop, checkpointing.

    python topo_gpt.py                      # laptop-size run on data/shakespeare (see README)
    python topo_gpt.py --alpha=0            # the non-topographic control
    python topo_gpt.py --preset=paper       # the paper's model and optimisation
    python topo_gpt.py --compile --out_dir=out_big --batch_size=32
    torchrun --standalone --nproc_per_node=4 topo_gpt.py --preset=paper
    python topo_gpt.py --bench              # ms/step with the spatial loss on and off
"""

import os
import sys
import math
import time
import random
import inspect
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# config: plain defaults, each overridable on the command line as --key=value
# (the defaults are a laptop run: about 11 minutes on a 2-core CPU, see README)
# I/O
out_dir = 'out'
eval_interval = 100
log_interval = 10
eval_iters = 20
resume = False  # continue the run in out_dir from its ckpt.pt
# data
data_dir = 'data'
dataset = 'shakespeare'  # reads data_dir/dataset/{train,val}.bin, written by prepare_data.py
gradient_accumulation_steps = 1
batch_size = 8
block_size = 128
# model
n_layer = 4
n_head = 4
n_embd = 256  # must be a perfect square: 256 units = a 16 x 16 grid
dropout = 0.0
bias = False
# topography (Rathi et al. 2025)
alpha = 2.5  # weight of the spatial loss; 0 = the non-topographic control
radius = 5  # neighbourhood = square window of side 2*radius-1 (radius 5: 9 x 9 = 81 units)
n_neighborhoods = 5  # windows sampled per map per step
residual_maps = False  # False: sublayer outputs are the maps (the paper); True: the residual stream
# AdamW
learning_rate = 1e-3
max_iters = 600
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 50
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
# system
device = 'auto'  # auto = cuda, then mps, then cpu
compile = False
seed = 1337
bench = False  # time training steps with the spatial loss on and off, then exit
preset = ''  # paper | classroom: a named set of overrides, applied before the other keys
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str))}

PRESETS = {
    # TopoLM as trained in the paper: GPT-2 small's shape on a 28 x 28 grid, FineWeb-Edu, ~0.5M tokens
    # per step (12 x 1024 x 40); 20k steps = one pass over the 10B-token sample
    'paper': dict(dataset='fineweb-edu', n_layer=12, n_head=16, n_embd=784, block_size=1024,
                  batch_size=12, gradient_accumulation_steps=40, dropout=0.0, bias=True,
                  learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                  warmup_iters=2000, max_iters=20000, min_lr=6e-5, alpha=2.5, radius=5,
                  n_neighborhoods=5, eval_interval=2000, eval_iters=200),
    # the five-minute classroom loop (README, "Classroom"): a model and its control in about 2 min each
    'classroom': dict(n_layer=2, n_head=4, n_embd=256, block_size=64, batch_size=8, max_iters=250,
                      eval_interval=125, eval_iters=10, warmup_iters=25),
}

# -----------------------------------------------------------------------------
# The spatial correlation loss (TDANN, as TopoLM uses it)

def distance_kernel(d):
    """How alike two units at distance d should respond: TopoLM's inverse distance, 1 / (1 + d)."""
    return 1 / (1 + d)

def spatial_correlation_loss(x, pos):
    """
    For one neighbourhood of n units with responses x (N samples, n units) at grid positions pos (n, 2):

        r_ij = corr(x_i, x_j)                      response correlation of units i and j over the samples
        D_ij = 1 / (1 + ||pos_i - pos_j||)         inverse cortical distance (distance_kernel)
        SL   = 0.5 * (1 - corr(lowtri(r), lowtri(D)))

    lowtri = the strict lower triangle (each pair once). SL is 0 when correlations fall off with distance
    exactly like D, 0.5 when they are unrelated to distance, 1 when they rise with it.
    x: (K, N, n) responses of K neighbourhoods, pos: (K, n, 2). Returns the K losses, (K,).
    A single (N, n), (n, 2) neighbourhood returns a scalar.
    """
    if x.dim() == 2:
        return spatial_correlation_loss(x[None], pos[None])[0]
    n = x.size(-1)
    # r: (K, n, n) Pearson correlation between every pair of units, over the N samples
    x = x - x.mean(dim=1, keepdim=True)
    cov = x.transpose(1, 2) @ x
    std = (cov.diagonal(dim1=1, dim2=2) + 1e-8).sqrt()  # (K, n); eps: a silent unit gives r = 0, not NaN
    r = cov / (std[:, :, None] * std[:, None, :])
    # D: (K, n, n) inverse Euclidean distance between the units' grid positions
    D = distance_kernel((pos[:, :, None, :] - pos[:, None, :, :]).norm(dim=-1))
    i, j = torch.tril_indices(n, n, offset=-1, device=x.device)
    r, D = r[:, i, j], D[:, i, j]  # (K, P), P = n(n-1)/2 pairs
    # Pearson correlation between r and D, per neighbourhood
    r = r - r.mean(dim=1, keepdim=True)
    D = D - D.mean(dim=1, keepdim=True)
    corr = (r * D).sum(1) / (r.norm(dim=1) * D.norm(dim=1) + 1e-8)
    return 0.5 * (1 - corr)

# -----------------------------------------------------------------------------
# The model: nanoGPT's GPT-2, with every block exposing two spatial maps

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 tokens, padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 784  # side * side units per map
    dropout: float = 0.0
    bias: bool = True
    alpha: float = 2.5  # 0 = non-topographic control: the spatial loss is not even computed
    radius: int = 5
    n_neighborhoods: int = 5
    residual_maps: bool = False
    seed: int = 1337  # draws the units' grid positions

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # flash attention where the device has it
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

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
        x = x + a
        h = x
        m = self.mlp(self.ln_2(x))  # (B, T, C) spatial map 'mlp'
        x = x + m
        # the paper's maps are the sublayer outputs, before they join the residual stream;
        # residual_maps takes the stream after each add instead (what the official code does)
        return x, ((h, x) if self.residual_maps else (a, m))

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        side = math.isqrt(config.n_embd)
        if side * side != config.n_embd:
            raise ValueError(f"n_embd={config.n_embd} is not a perfect square: the units must tile a "
                             f"side x side grid (e.g. 256 = 16 x 16, 784 = 28 x 28)")
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        if config.alpha > 0 and not 1 <= 2 * config.radius - 1 <= side:
            raise ValueError(f"radius={config.radius} gives a {2 * config.radius - 1}-wide window, "
                             f"which does not fit the {side} x {side} grid")
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

        # every map gets its own random placement of its units on the grid; buffers,
        # so they travel in every checkpoint. unit_pos[m, u] = (row, col) of unit u of map m,
        # grid[m, row, col] = the unit at that place.
        self.map_names = [f'h.{l}.{s}' for l in range(config.n_layer) for s in ('attn', 'mlp')]
        unit_pos, grid = lattice_positions(len(self.map_names), side, config.seed)
        self.register_buffer('unit_pos', unit_pos)  # (M, C, 2)
        self.register_buffer('grid', grid)  # (M, side, side)
        self.ce_loss = self.spatial_loss = None  # the two parts of the last loss, for logging

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        # the position embeddings are not counted, as in nanoGPT; the token embeddings are (tied)
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def positions(self, map_name):
        """(n_embd, 2) grid coordinates (row, col) of the units of one map, e.g. 'h.0.attn'."""
        return self.unit_pos[self.map_names.index(map_name)].float()

    def forward(self, idx, targets=None, return_maps=False):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        maps = []
        for block in self.transformer.h:
            x, (attn_map, mlp_map) = block(x)
            maps += [attn_map, mlp_map]
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)

        loss = None
        if targets is not None:
            self.ce_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                           ignore_index=-1)
            loss = self.ce_loss
            # loss = CE + alpha * sum over maps of SL. The control (alpha=0) skips the spatial loss
            # in training; evaluation still measures it
            if self.config.alpha > 0 or not self.training:
                self.spatial_loss = self.spatial_loss_of(maps)
                loss = loss + self.config.alpha * self.spatial_loss
        if return_maps:
            return logits, loss, OrderedDict(zip(self.map_names, maps))
        return logits, loss

    def spatial_loss_of(self, maps):
        """Sum over all maps of the mean spatial loss of n_neighborhoods random windows of each."""
        M, K = len(maps), self.config.n_neighborhoods
        units, pos = sample_neighborhoods(self.grid, K, self.config.radius)  # (M, K, n), (M, K, n, 2)
        n = units.size(-1)
        # gather the sampled units of each map: M small gathers, no loop over neighbourhoods
        x = torch.cat([m.reshape(-1, m.size(-1)).index_select(1, u.flatten()) for m, u in zip(maps, units)], 1)
        x = x.view(x.size(0), M * K, n).transpose(0, 1)  # (M*K, N, n), N = B*T token positions
        # correlations in float32, even under bf16 autocast. (A global name is looked up at call time:
        # topo_gpt.spatial_correlation_loss = my_loss changes what the model trains with.)
        with torch.autocast(device_type=x.device.type, enabled=False):
            sl = spatial_correlation_loss(x.float(), pos.view(M * K, n, 2).float())  # (M*K,)
        return sl.view(M, K).mean(dim=1).sum()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))

    def estimate_mfu(self, tokens_per_iter, dt):
        """Model flops utilization in units of an A100's bf16 peak (PaLM appendix B, as nanoGPT)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / 312e12

    @classmethod
    def from_checkpoint(cls, path, device='cpu'):
        """Rebuild a trained model (grid positions included) from a ckpt.pt written by this script."""
        ckpt = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get('model_type') != 'topolm':
            raise ValueError(f"{path} is not a TopoLM checkpoint written by topo_gpt.py")
        model = cls(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        return model.to(device).eval()

# -----------------------------------------------------------------------------
# Spatial geometry: units on a side x side grid, square neighbourhoods

def lattice_positions(n_maps, side, seed):
    """
    Each map's units get a random permutation of the side x side integer lattice, drawn once from the
    seed. Random, so that nothing but the spatial loss can make neighbours alike.
    Returns unit_pos (n_maps, side*side, 2): (row, col) of each unit, and its inverse,
    grid (n_maps, side, side): the index of the unit at each place.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(side * side, generator=g) for _ in range(n_maps)])
    unit_pos = torch.stack([perm // side, perm % side], dim=-1)  # unit u sits at place perm[u]
    grid = torch.empty_like(perm)
    grid.scatter_(1, perm, torch.arange(side * side).expand(n_maps, -1))
    return unit_pos, grid.view(n_maps, side, side)

def sample_neighborhoods(grid, k, radius):
    """
    k random square windows per map, all units within Chebyshev distance radius-1 of a centre
    (radius 5: 9 x 9 = 81 units, TopoLM's neighbourhood). Windows lie wholly inside the grid.
    grid: (M, side, side). Returns units (M, k, n): unit indices, pos (M, k, n, 2): their places.
    """
    M, side, _ = grid.shape
    w = 2 * radius - 1
    # the random corners come from the CPU generator, so runs are reproducible on any device
    corner = torch.randint(0, side - w + 1, (M, k, 2)).to(grid.device)
    offs = torch.arange(w, device=grid.device)
    rows = (corner[..., 0, None] + offs)[..., :, None].expand(M, k, w, w)  # (M, k, w, w)
    cols = (corner[..., 1, None] + offs)[..., None, :].expand(M, k, w, w)
    units = grid[torch.arange(M, device=grid.device)[:, None, None, None], rows, cols]
    pos = torch.stack([rows, cols], dim=-1)
    return units.reshape(M, k, w * w), pos.reshape(M, k, w * w, 2)

# -----------------------------------------------------------------------------
# Data: nanoGPT's loader, random chunks of the uint16 token files that prepare_data.py writes

def open_split(cfg, split):
    path = os.path.join(cfg['data_dir'], cfg['dataset'], f'{split}.bin')
    if not os.path.exists(path):
        raise UsageError(f"no {path}: prepare it with `python prepare_data.py` (Shakespeare), or "
                         f"`python prepare_data.py --input=YOUR_TEXT --name={cfg['dataset']}`")
    data = np.memmap(path, dtype=np.uint16, mode='r')
    if len(data) <= cfg['block_size'] + 1:
        raise UsageError(f"{path} has {len(data)} tokens, too few for block_size={cfg['block_size']}")
    return data

def get_batch(data, batch_size, block_size, device, generator=None):
    # x: (B, T) tokens, y: (B, T) the tokens that follow them
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# Training

class UsageError(Exception):
    """Bad input from the user: printed as one line, no traceback."""

def parse_args(argv, defaults=DEFAULTS, presets=PRESETS, doc=__doc__):
    """--key=value for any key of the config block (type checked), bare --flag for booleans,
    --preset=NAME first. Returns the full config and the keys the user set (preset included).
    (analyze.py parses its own keys with it too.)"""
    if '-h' in argv or '--help' in argv:
        print(doc.strip() + '\n\nconfig keys (--key=value):')
        for k, v in defaults.items():
            print(f"  --{k}={v}")
        if presets:
            print('presets: ' + ', '.join(f"{name} ({', '.join(f'{k}={v}' for k, v in p.items())})"
                                          for name, p in presets.items()))
        sys.exit(0)
    given = {}
    for arg in argv:
        if not arg.startswith('--'):
            raise UsageError(f"unexpected argument {arg!r}: options look like --key=value (see --help)")
        key, eq, val = arg[2:].partition('=')
        if key not in defaults:
            raise UsageError(f"unknown config key {key!r} (see --help for the list)")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise UsageError(f"--{key} needs a value, e.g. --{key}={default}")
            given[key] = True
        elif isinstance(default, bool):
            if val.lower() not in ('true', 'false', '1', '0'):
                raise UsageError(f"--{key}={val}: expected True or False")
            given[key] = val.lower() in ('true', '1')
        else:
            try:
                given[key] = type(default)(val)
            except ValueError:
                raise UsageError(f"--{key}={val}: expected a {type(default).__name__}") from None
    if given.get('preset'):
        if given['preset'] not in presets:
            raise UsageError(f"unknown preset {given['preset']!r}; presets: {', '.join(presets)}")
        given = {**presets[given['preset']], **given}  # explicit keys win over the preset
    return {**defaults, **given}, given

def pick_device(name):
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if torch.backends.mps.is_available() else 'cpu'

def keep_freed_memory():
    """
    glibc hands big freed blocks (the (B*T) x vocab logits and their gradient) back to the OS, and
    writing into fresh pages is slow: measured 3x slower CPU steps. Ask it to keep them for reuse.
    """
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: big blocks come from the heap, not fresh mmaps
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD = 1 GiB: keep freed heap memory around
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows): nothing to do

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr. Depends on the iteration only (for resume)."""
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it > decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])

def train_step(model, optimizer, scaler, next_batch, cfg, ctx, ddp):
    """One optimizer step over gradient_accumulation_steps micro-batches. Returns (loss, grad norm)."""
    steps = cfg['gradient_accumulation_steps']
    for micro_step in range(steps):
        if ddp:  # all-reduce the gradients only once, after the last micro-batch
            model.require_backward_grad_sync = micro_step == steps - 1
        X, Y = next_batch()
        with ctx:
            _, loss = model(X, Y)
        scaler.scale(loss / steps).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
    if not (math.isfinite(loss.item()) and (scaler.is_enabled() or math.isfinite(norm.item()))):
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm.item()  # the caller stops; the weights were not touched
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), norm.item()

def main(argv):
    cfg, given = parse_args(argv)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = None
    if cfg['resume']:
        ckpt = load_checkpoint(ckpt_path)
        cfg = {**ckpt['config'], **given}  # the run's own config, then what was set now

    # DDP (torchrun): one process per device; gloo on CPU, nccl on CUDA
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = 0, 1
    if ddp:
        from torch.distributed import init_process_group
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ['LOCAL_RANK'])
        dev = pick_device(cfg['device'])
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
        init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        if cfg['gradient_accumulation_steps'] % world:
            raise UsageError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a "
                             f"multiple of the {world} processes (it counts micro-batches over all of them)")
        cfg['gradient_accumulation_steps'] //= world
    else:
        dev = pick_device(cfg['device'])
    master = rank == 0
    device_type = 'cuda' if dev.startswith('cuda') else dev.split(':')[0]
    if device_type == 'cpu':
        keep_freed_memory()
    torch.manual_seed(cfg['seed'] + rank)  # each rank draws its own batches and neighbourhoods
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA (fp16 with a gradient scaler on GPUs without bf16), plain fp32 elsewhere
    dtype = torch.float32
    if device_type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    ctx = torch.autocast(device_type=device_type, dtype=dtype) if device_type == 'cuda' else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    model_args = dict(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'],
                      block_size=cfg['block_size'], vocab_size=50304, dropout=cfg['dropout'], bias=cfg['bias'],
                      alpha=cfg['alpha'], radius=cfg['radius'], n_neighborhoods=cfg['n_neighborhoods'],
                      residual_maps=cfg['residual_maps'], seed=cfg['seed'])
    if ckpt is not None:
        model_args = ckpt['model_args']  # the model is what was trained, whatever the flags say now
        ignored = [k for k in given if model_args.get(k, given[k]) != given[k]]
        if ignored and master:
            print(f"note: --resume keeps the checkpoint's model; ignoring {', '.join(ignored)}")
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
    model.to(dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), device_type)
    iter_num, best_val_loss = 0, float('inf')
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        if ddp:  # only rank 0's generator state is saved: give each rank its own stream again
            torch.manual_seed(cfg['seed'] + rank + 1000 * iter_num)
        else:
            set_rng_state(ckpt['rng'])
        ckpt = None  # free the memory
    raw_model = model
    if master:
        tokens_per_iter = cfg['gradient_accumulation_steps'] * world * cfg['batch_size'] * cfg['block_size']
        side = math.isqrt(model.config.n_embd)
        print(f"TopoLM: {model.get_num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
              f"{2 * model.config.n_layer} maps of {side}x{side} units, alpha={model.config.alpha}, "
              f"radius={model.config.radius}, {model.config.n_neighborhoods} neighbourhoods/map")
        print(f"device {dev}, {dtype}, {world} process(es), {tokens_per_iter:,} tokens per iteration")
    if cfg['compile']:
        if master:
            print("compiling the model... (a minute or two)")
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # the grid buffers never change: no need to broadcast them every forward
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)

    if cfg['bench']:
        benchmark(model, raw_model, optimizer, scaler, cfg, ctx, dev, ddp)
        return

    train_data, val_data = open_split(cfg, 'train'), open_split(cfg, 'val')

    def next_batch():
        return get_batch(train_data, cfg['batch_size'], cfg['block_size'], dev)

    @torch.no_grad()
    def estimate_loss():
        # the same eval batches every time (own generator), and the training RNG stream untouched
        # (fork_rng), so that evaluating never changes the course of training: resume stays exact
        out = {}
        model.eval()
        with torch.random.fork_rng(devices=[]):
            for split, data in (('train', train_data), ('val', val_data)):
                g = torch.Generator().manual_seed(cfg['seed'])
                ce, sl = torch.zeros(cfg['eval_iters']), torch.zeros(cfg['eval_iters'])
                for k in range(cfg['eval_iters']):
                    X, Y = get_batch(data, cfg['batch_size'], cfg['block_size'], dev, generator=g)
                    with ctx:
                        raw_model(X, Y)
                    ce[k], sl[k] = raw_model.ce_loss.item(), raw_model.spatial_loss.item()
                out[split] = (ce.mean().item(), sl.mean().item())
        model.train()
        return out

    os.makedirs(cfg['out_dir'], exist_ok=True)
    start_iter = iter_num
    t0, it0 = time.time(), iter_num  # the log's ms/iter: time since t0 over iterations since it0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        if master and (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']):
            losses = estimate_loss()
            (tce, _), (vce, vsl) = losses['train'], losses['val']
            print(f"step {iter_num}: train ce {tce:.4f}, val ce {vce:.4f}, val spatial loss {vsl:.4f} "
                  f"(x alpha {model_args['alpha']} = {model_args['alpha'] * vsl:.4f})")
            if not all(map(math.isfinite, (tce, vce, vsl))):
                raise UsageError(f"evaluation loss is not finite at iter {iter_num}: training diverged and "
                                 f"stopped; {last_checkpoint(ckpt_path)}. Try a lower learning_rate or alpha.")
            best_val_loss = min(best_val_loss, vce)
            if iter_num > start_iter:  # (a resumed run's first evaluation has nothing new to save)
                save_checkpoint(ckpt_path, raw_model, optimizer, iter_num, best_val_loss, cfg)
                print(f"saved {ckpt_path}")
            t0, it0 = time.time(), iter_num
        if iter_num >= cfg['max_iters']:
            break
        loss, norm = train_step(model, optimizer, scaler, next_batch, cfg, ctx, ddp)
        if not (math.isfinite(loss) and math.isfinite(norm)) and not scaler.is_enabled():
            raise UsageError(f"loss is {loss}, grad norm {norm} at iter {iter_num}: training diverged and "
                             f"stopped; {last_checkpoint(ckpt_path)}. Try a lower learning_rate or alpha.")
        iter_num += 1
        if master and iter_num % cfg['log_interval'] == 0:
            dt = (time.time() - t0) / (iter_num - it0)
            t0, it0 = time.time(), iter_num
            parts = f"ce {raw_model.ce_loss.item():.4f}, " + (f"spatial {raw_model.spatial_loss.item():.4f}"
                                                             if model_args['alpha'] > 0 else "control")
            msg = (f"iter {iter_num}: loss {loss:.4f} ({parts}), lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                   f"{tokens_per_iter / dt:,.0f} tok/s")
            if device_type == 'cuda':
                msg += f", mfu {raw_model.estimate_mfu(tokens_per_iter, dt) * 100:.1f}%"
            print(msg, flush=True)
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()

def benchmark(model, raw_model, optimizer, scaler, cfg, ctx, dev, ddp):
    """ms/step with the spatial loss on (alpha as configured) and off (alpha=0), interleaved step by
    step in one process so that drifting machine speed hits both alike. Random tokens, no data."""
    import resource
    alpha_on = raw_model.config.alpha or 2.5
    B, T = cfg['batch_size'], cfg['block_size']
    X = torch.randint(0, 50257, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    next_batch = lambda: (X[:, :-1].contiguous(), X[:, 1:].contiguous())
    times, peak = {'on': [], 'off': []}, {}
    cuda = dev.startswith('cuda')
    for mode in ('off', 'on'):  # warm up (and compile) each mode; peak memory in this order
        raw_model.config.alpha = alpha_on if mode == 'on' else 0.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            train_step(model, optimizer, scaler, next_batch, cfg, ctx, ddp)
        peak[mode] = (torch.cuda.max_memory_allocated() if cuda else
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    n = 10
    print(f"benchmark: {n} steps each, interleaved, batch {B} x {T} x {cfg['gradient_accumulation_steps']} accum")
    for i in range(n):
        for mode in ('on', 'off'):
            raw_model.config.alpha = alpha_on if mode == 'on' else 0.0
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            train_step(model, optimizer, scaler, next_batch, cfg, ctx, ddp)
            if cuda:
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t)
    tokens = B * T * cfg['gradient_accumulation_steps']
    label = {'on': f'spatial loss on (alpha={alpha_on})', 'off': 'spatial loss off (alpha=0)'}
    for mode in ('on', 'off'):
        ms = 1000 * float(np.median(times[mode]))
        line = f"{label[mode]:32s} {ms:8.1f} ms/step  {tokens / ms * 1000:9,.0f} tok/s  peak {peak[mode]:7,.0f} MiB"
        if cuda:
            line += f"  mfu {raw_model.estimate_mfu(tokens, ms / 1000) * 100:.1f}%"
        print(line)
    ratios = [a / b for a, b in zip(times['on'], times['off'])]
    print(f"on/off ratio: {np.median(times['on']) / np.median(times['off']):.3f} (medians), "
          f"{np.median(ratios):.3f} (median of step-by-step pairs)")
    raw_model.config.alpha = alpha_on if cfg['alpha'] > 0 else 0.0

# -----------------------------------------------------------------------------
# Checkpointing

def save_checkpoint(path, model, optimizer, iter_num, best_val_loss, cfg):
    """Everything a bit-exact resume needs. Written to a temporary file and renamed, so that a kill
    during the save leaves the previous checkpoint intact."""
    ckpt = {
        'model_type': 'topolm',
        'model_args': asdict(model.config),
        'model': model.state_dict(),  # grid positions included (buffers)
        'optimizer': optimizer.state_dict(),
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': cfg,
        'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
                'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def last_checkpoint(path):
    return f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was saved yet"

def load_checkpoint(path):
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path} (set --out_dir to the run's folder)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise UsageError(f"{path} could not be read as a checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get('model_type') != 'topolm':
        raise UsageError(f"{path} is not a TopoLM checkpoint written by topo_gpt.py")
    return ckpt

def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    random.setstate(rng['python'])
    if rng['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng['cuda'])

if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        sys.exit(130)
