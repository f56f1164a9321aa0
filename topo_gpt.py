"""
TopoLM: a GPT whose units sit on a cortical sheet.

Rathi, Mehrer, AlKhamissi, Binhuraib, Blauch, Schrimpf. "TopoLM: brain-like spatio-functional
organization in a topographic language model". ICLR 2025. Official code: epflneuroailab/topolm.

A GPT-2-style decoder (as in nanoGPT) in which the C = side*side units of every attention output and
every MLP output are given a place on a side x side grid. Training adds to the next-token loss a
spatial correlation loss (from TDANN, Margalit et al. 2024): inside small windows of the grid, the
response correlation of two units should track how close they are. Nearby units come to respond alike,
and functional clusters (e.g. language-selective patches) appear on the grid.

Read it top to bottom: config, topography (the spatial loss and the grid), model, data loader,
training, checkpointing, and the training loop itself, main().

    python topo_gpt.py                      # laptop-size run on data/shakespeare (see README)
    python topo_gpt.py --alpha=0            # the non-topographic control
    python topo_gpt.py --preset=paper       # the paper's model and optimisation
    python topo_gpt.py --compile --out_dir=out_big --batch_size=32
    torchrun --standalone --nproc_per_node=4 topo_gpt.py --preset=paper
    python topo_gpt.py --bench              # ms/step with the spatial loss on and off, and the loss alone
"""

import os
# Before torch loads OpenMP: its threads sleep while they wait instead of spinning. On a machine whose
# cores are shared (a laptop, a CI box), spinning threads starve the one they wait for (README, "Speed").
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import re
import sys
import math
import time
import random
import json
import pickle
import signal
import inspect
import warnings
import threading
from collections import OrderedDict
from contextlib import nullcontext, contextmanager
from dataclasses import dataclass, asdict, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# config: plain defaults, each overridable on the command line as --key=value. The comment says what a
# key does; a check before its colon (>= 1, (0, 1], a|b) says which values the command line accepts.
# I/O
out_dir = 'out'  # where ckpt.pt is written
eval_interval = 200  # >= 1: evaluate, and save a checkpoint, every this many steps
log_interval = 10  # >= 1: print a training line every this many steps
eval_iters = 20  # >= 1: batches per split in an evaluation
resume = False  # continue the run in out_dir from its ckpt.pt
# data
data_dir = 'data'  # where prepare_data.py writes its folders
dataset = 'shakespeare'  # reads data_dir/dataset/{train,val}.bin, written by prepare_data.py
gradient_accumulation_steps = 1  # >= 1: micro-batches per optimizer step, over all processes
batch_size = 8  # >= 1: sequences per micro-batch
block_size = 128  # >= 1: tokens per sequence (the context)
# model
n_layer = 4  # >= 1: transformer blocks; each has 2 maps
n_head = 4  # >= 1: attention heads; must divide n_embd
n_embd = 256  # >= 1: units per map, a perfect square: 256 units = a 16 x 16 grid
dropout = 0.0  # [0, 1): dropout probability
bias = False  # biases in the Linears and LayerNorms
# topography (Rathi et al. 2025)
alpha = 2.5  # >= 0: weight of the spatial loss; 0 = the non-topographic control
radius = 5  # >= 1: neighbourhoods are windows of side 2*radius-1 (5: 9 x 9 = 81 units)
n_neighborhoods = 5  # >= 1: windows drawn per map per step
residual_maps = False  # the maps are the sublayer outputs (False, the paper) or the residual stream (True)
# AdamW
learning_rate = 1e-3  # > 0: peak learning rate
max_iters = 2000  # >= 1: optimizer steps of the whole run
weight_decay = 0.1  # >= 0: on 2-D weights (matmuls, embeddings)
beta1 = 0.9  # [0, 1): AdamW's decay of the gradient's mean
beta2 = 0.95  # [0, 1): AdamW's decay of the gradient's square
grad_clip = 1.0  # >= 0: clip the gradient norm at this value; 0 = no clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100  # >= 0: steps of linear warmup
lr_decay_iters = 0  # >= 0: the step at which the cosine decay reaches min_lr; 0 = max_iters
min_lr = 1e-4  # >= 0: the learning rate after the decay
# system
device = 'auto'  # auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto|float32|bfloat16|float16: auto = bf16 on CUDA (else fp16) and on CPUs with native bf16
compile = False  # compile the model with torch.compile
seed = 1337  # >= 0: seeds the batches, the windows and the units' places
bench = False  # time training steps with the spatial loss on and off, and the loss alone, then exit
preset = ''  # a named set of overrides, applied before the other keys (see PRESETS)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str))}

PRESETS = {
    # TopoLM as trained in the paper and its official config (models/config/train_gpt2.yaml): GPT-2
    # small's shape on a 28 x 28 grid, no biases, 48 x 1024 x 20 = 983,040 tokens per step. The step
    # count is ours: 10k steps = one pass over FineWeb-Edu's 10B-token sample.
    'paper': dict(dataset='fineweb-edu', n_layer=12, n_head=16, n_embd=784, block_size=1024,
                  batch_size=48, gradient_accumulation_steps=20, dropout=0.0, bias=False,
                  learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                  warmup_iters=2000, max_iters=10000, min_lr=6e-5, alpha=2.5, radius=5,
                  n_neighborhoods=5, eval_interval=1000, eval_iters=200),
    # the five-minute classroom loop (README, "Classroom"): a model and its control in about a minute each
    'classroom': dict(n_layer=2, n_head=4, n_embd=256, block_size=64, batch_size=8, max_iters=400,
                      eval_interval=200, eval_iters=10, warmup_iters=40),
}

MODEL_TYPE = 'topolm'  # written into every checkpoint: analyze.py tells the models apart by it

class UsageError(Exception):
    """Bad input from the user: printed as one line, no traceback (see command())."""

def read_config_notes(path):
    """{key: (check, what it does)} from the comments of the config block at the top of the file at path."""
    with open(path, encoding='utf-8') as f:
        block = f.read().split('\nDEFAULTS = ')[0]
    notes = {}
    for key, comment in re.findall(r"^(\w+) = .*?  # (.*)$", block, re.M):
        check = re.match(r"(>=? \S+|[\[(]\S+, \S+[\])]|[\w-]*(?:\|[\w-]*)+): ", comment)
        notes[key] = (check.group(1), comment[check.end():]) if check else (None, comment)
    return notes

def check_value(key, value, check):
    """Raise a UsageError unless value passes check: '>= 1', '> 0', an interval '[0, 1)', or 'a|b|c'."""
    if check is None:
        return
    if '|' in check:
        ok = value in check.split('|')
    elif check[0] == '>':
        bound = float(check.split()[1])
        ok = (value >= bound if check.startswith('>=') else value > bound) and math.isfinite(value)
    else:
        lo, hi = (float(v) for v in check[1:-1].split(', '))
        ok = (lo <= value if check[0] == '[' else lo < value) and (value <= hi if check[-1] == ']' else value < hi)
    if not ok:  # (a NaN fails every comparison, so it lands here too)
        rule = (f"one of {check.replace('|', ', ')}" if '|' in check else
                f"finite and {check}" if check[0] == '>' else f"in the interval {check}")
        raise UsageError(f"--{key}={value}: must be {rule}")

def parse_args(argv, defaults, presets, doc, notes):
    """
    --key=value for any key of the config block, bare --flag for booleans, --preset=NAME first. Every
    value is checked against its type and the check in its comment (notes, from read_config_notes).
    Returns the full config and the keys the user set (the preset's included).
    """
    if '-h' in argv or '--help' in argv:
        print(doc.strip() + '\n\nconfig keys, --key=value (default):')
        for k, v in defaults.items():
            check, what = notes.get(k, (None, ''))
            print(f"  --{k}={v}".ljust(34) + what + (f" [{check}]" if check else ''))
        for name, p in presets.items():
            print(f"--preset={name}: " + ', '.join(f'{k}={v}' for k, v in p.items()))
        sys.exit(0)
    given = {}
    for arg in argv:
        key, eq, val = arg[2:].partition('=')
        if not arg.startswith('--') or key not in defaults:
            raise UsageError(f"unknown config key or argument {arg!r} (see --help for the list)")
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
                given[key] = type(default)(val) if not isinstance(default, int) else int(float(val))
                if isinstance(default, int) and float(val) != given[key]:
                    raise ValueError  # 1e9 is an int, 1.5 is not
            except (ValueError, OverflowError):
                raise UsageError(f"--{key}={val}: expected a {type(default).__name__}") from None
    if given.get('preset'):
        if given['preset'] not in presets:
            raise UsageError(f"unknown preset {given['preset']!r}; presets: {', '.join(presets)}")
        given = {**presets[given['preset']], **given}  # explicit keys win over the preset
    for key, value in given.items():
        check_value(key, value, notes.get(key, (None, ''))[0])
    return {**defaults, **given}, given

DEFAULT_NOTES = read_config_notes(__file__)

# -----------------------------------------------------------------------------
# Topography: the spatial correlation loss (TDANN, as TopoLM uses it) and the grid it acts on

def distance_kernel(d):
    """How alike two units at grid distance d should respond: TopoLM's inverse distance, 1 / (1 + d)."""
    return 1 / (1 + d)

class Covariance(torch.autograd.Function):
    """
    cov = xc^T xc with xc = x - (mean of x over the samples); x: (K, N, n) -> (K, n, n).
    What autograd would compute from those two lines, in one matmul less: the gradient is
    d cov -> xc (G + G^T), and the mean's share of it vanishes because xc sums to zero over the samples.
    """

    @staticmethod
    def forward(ctx, x):
        xc = x - x.mean(dim=1, keepdim=True)
        ctx.save_for_backward(xc)
        return xc.transpose(1, 2) @ xc

    @staticmethod
    def backward(ctx, g):
        xc, = ctx.saved_tensors
        # (G + G^T) xc^T, transposed: laid out like x's own storage when x is a transposed (K, n, N)
        # tensor, as the model's gather makes it, so the gradient flows back without a copy
        return ((g + g.transpose(1, 2)) @ xc.transpose(1, 2)).transpose(1, 2)

def correlation(x):
    """Pearson correlation of every pair of the n units over the N samples: x (K, N, n) -> r (K, n, n).
    The epsilon gives a silent unit r = 0 with everything, not NaN."""
    cov = Covariance.apply(x)
    std = (cov.diagonal(dim1=1, dim2=2) + 1e-8).sqrt()  # (K, n)
    return cov / (std[:, :, None] * std[:, None, :])

def lowtri(a):
    """The strict lower triangle of each (n, n) matrix of a (K, n, n): (K, n(n-1)/2), every pair once.
    (index_select rather than a[:, i, j]: the same values, a much cheaper gradient.)"""
    n = a.size(-1)
    i, j = torch.tril_indices(n, n, offset=-1, device=a.device)
    return a.flatten(1).index_select(1, i * n + j)

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
    r = lowtri(correlation(x))  # (K, P), P = n(n-1)/2 pairs
    D = lowtri(distance_kernel(torch.cdist(pos, pos)))  # (K, P)
    # Pearson correlation between r and D, per neighbourhood
    r = r - r.mean(dim=1, keepdim=True)
    D = D - D.mean(dim=1, keepdim=True)
    corr = (r * D).sum(1) / (r.norm(dim=1) * D.norm(dim=1) + 1e-8)
    return 0.5 * (1 - corr)

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
    return unit_pos, grid_of(unit_pos, side)

def grid_of(unit_pos, side):
    """The inverse of unit_pos (n_maps, side*side, 2): grid (n_maps, side, side), the unit at each place."""
    place = unit_pos[..., 0] * side + unit_pos[..., 1]  # (n_maps, side*side)
    grid = torch.empty_like(place)
    grid.scatter_(1, place, torch.arange(side * side).expand_as(place))
    return grid.view(-1, side, side)

def window_places(side, radius):
    """
    Every square window of the lattice that lies wholly inside it: all places within Chebyshev distance
    radius-1 of a centre (radius 5: 9 x 9 = 81 places, TopoLM's neighbourhood). The official code lists
    the same (side - 2(radius-1))^2 windows. Returns (W, w*w) flat places (row * side + col), row by row.
    """
    w = 2 * radius - 1
    offsets = (torch.arange(w)[:, None] * side + torch.arange(w)[None, :]).flatten()  # (w*w,)
    corners = torch.arange(side - w + 1)
    corners = (corners[:, None] * side + corners[None, :]).flatten()  # (W,)
    return corners[:, None] + offsets[None, :]

def sample_neighborhoods(grid, places, k):
    """
    k distinct windows per map, drawn anew every step (without replacement, as the official code draws
    its 5 of the precomputed windows). grid: (M, side, side) unit at each place; places: (W, n) from
    window_places. Returns units (M, k, n): unit indices, pos (M, k, n, 2): their (row, col) places.
    """
    M, side, _ = grid.shape
    pick = torch.rand(M, places.size(0)).argsort(dim=1)[:, :k]  # CPU generator: reproducible on any device
    cells = places[pick.to(places.device)]  # (M, k, n)
    units = grid.view(M, -1).gather(1, cells.view(M, -1)).view_as(cells)
    return units, torch.stack([cells // side, cells % side], dim=-1)

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
        # residual_maps takes the stream after each add instead (the official code's default)
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
        # checked for the control too: its evaluation measures the spatial loss, on the same scale
        n_windows = (side - 2 * config.radius + 2) ** 2 if 2 * config.radius - 1 <= side else 0
        if not 1 <= config.n_neighborhoods <= n_windows:
            raise ValueError(f"radius={config.radius} and n_neighborhoods={config.n_neighborhoods} do not fit the "
                             f"{side} x {side} grid: it holds {n_windows} windows of {2 * config.radius - 1} x "
                             f"{2 * config.radius - 1} units")
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

        # every map gets its own random placement of its units on the grid; buffers, so they travel in
        # every checkpoint. unit_pos[m, u] = (row, col) of unit u of map m, grid[m, row, col] = its unit.
        self.map_names = [f'h.{l}.{s}' for l in range(config.n_layer) for s in ('attn', 'mlp')]
        unit_pos, grid = lattice_positions(len(self.map_names), side, config.seed)
        self.register_buffer('unit_pos', unit_pos)  # (M, C, 2)
        self.register_buffer('grid', grid)  # (M, side, side)
        # the windows' places depend on the grid's size only: built once
        self.register_buffer('window_places', window_places(side, config.radius), persistent=False)  # (W, n)
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
        """Sum over the maps of the mean spatial loss of n_neighborhoods windows drawn from each."""
        M, K, C = len(maps), self.config.n_neighborhoods, self.config.n_embd
        units, pos = sample_neighborhoods(self.grid, self.window_places, K)  # (M, K, n), (M, K, n, 2)
        n = units.size(-1)
        # one gather for all maps: the responses unit by unit, (M*C, N) over the N = B*T tokens, of which
        # the windows' units are rows
        x = torch.stack(maps).flatten(1, 2).transpose(1, 2).reshape(M * C, -1)
        rows = (units + C * torch.arange(M, device=units.device)[:, None, None]).view(-1)
        x = x.index_select(0, rows).view(M * K, n, -1)  # (M*K, n, N)
        # correlations in float32, even under bf16 autocast. (A global name is looked up at call time:
        # topo_gpt.spatial_correlation_loss = my_loss changes what the model trains with.)
        with torch.autocast(device_type=x.device.type, enabled=False):
            sl = spatial_correlation_loss(x.float().transpose(1, 2), pos.view(M * K, n, 2).float())  # (M*K,)
        return sl.view(M, K).mean(dim=1).sum()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))

    def flops_per_token(self):
        """Training flops per token (PaLM appendix B, as nanoGPT): 6 per parameter plus attention."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second):
        """Model flops utilization of one process in units of an A100's bf16 peak, as nanoGPT."""
        return self.flops_per_token() * tokens_per_second / 312e12

    @classmethod
    def from_checkpoint(cls, path, device='cpu'):
        """Rebuild a trained model (grid positions included) from a ckpt.pt written by this script, or from
        its already loaded dict. Returned in eval mode."""
        ckpt = load_checkpoint(path) if isinstance(path, str) else path
        if ckpt.get('model_type') != 'topolm':
            raise ValueError("not a TopoLM checkpoint written by topo_gpt.py")
        model = cls(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        return model.to(device).eval()

    @classmethod
    def from_official(cls, path, positions_dir=None, device='cpu'):
        """
        Our GPT from a checkpoint of the official TopoLM code (epflneuroailab/topolm, models/train.py), such
        as the published models: {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}.
        Its model_args spell n_embed; with_resid=True means the maps are the residual stream (our
        residual_maps=True). Each map's unit places are the `coordinates` of the official position pickles,
        positions_dir/layer.{i}.{attn,mlp}.pkl (default: model_args['position_dir'] beside the checkpoint),
        so our maps are the official ones. The optimizer and the run config are not used; reading the file
        needs neither omegaconf nor the official code. Returned in eval mode.
        """
        ckpt = read_pickled(path, torch_file=True) if isinstance(path, str) else path
        args = ckpt.get('model_args') if isinstance(ckpt, dict) else None
        if not isinstance(args, dict) or 'n_embed' not in args or 'model' not in ckpt:
            raise ValueError("not a checkpoint of the official TopoLM code (no model_args with n_embed)")
        other = {k: args[k] for k in ('head_loss', 'attn_proj', 'finetune') if args.get(k)}
        if other:
            raise ValueError(f"an official model variant that this repo does not implement: {other}")
        if positions_dir is None:
            if not isinstance(path, str) or 'position_dir' not in args:
                raise ValueError("positions_dir is needed: where the official position pickles are")
            positions_dir = os.path.join(os.path.dirname(os.path.abspath(path)), args['position_dir'])
        coords = []
        for name in (f'layer.{l}.{s}' for l in range(args['n_layer']) for s in ('attn', 'mlp')):
            file = os.path.join(positions_dir, f'{name}.pkl')
            if not os.path.isfile(file):
                raise ValueError(f"no unit positions {file}: the official model's places are its position "
                                 f"pickles (models/gpt2-positions/ in the official repository)")
            layer = read_pickled(file).__dict__
            coords.append(torch.as_tensor(layer['coordinates']))
            if coords[-1].shape != (args['n_embed'], 2):
                raise ValueError(f"the unit positions {file} place {coords[-1].shape[0]} units, but the "
                                 f"model's maps have n_embed={args['n_embed']}: positions of another model size?")
            window = int(torch.as_tensor(layer['neighborhood_indices'])[0].sum())  # (2 radius - 1)^2 units
            radius, n_neighborhoods = (math.isqrt(window) + 1) // 2, int(layer['neighborhoods_per_batch'])
        config = GPTConfig(n_layer=args['n_layer'], n_head=args['n_head'], n_embd=args['n_embed'],
                           block_size=args['block_size'], vocab_size=args['vocab_size'], dropout=args['dropout'],
                           bias=args['bias'], alpha=args.get('alpha', 0.25), radius=radius,
                           n_neighborhoods=n_neighborhoods, residual_maps=args.get('with_resid', True))
        model = cls(config)
        side = math.isqrt(config.n_embd)
        unit_pos = torch.stack(coords).round().long()  # (M, C, 2)
        lattice = sorted((r, c) for r in range(side) for c in range(side))
        if any(sorted(map(tuple, p.tolist())) != lattice for p in unit_pos):
            raise ValueError(f"the position pickles in {positions_dir} are not permutations of the "
                             f"{side} x {side} lattice")
        state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}  # saved from torch.compile
        state.update(unit_pos=unit_pos, grid=grid_of(unit_pos, side))
        model.load_state_dict(state)
        return model.to(device).eval()

def read_pickled(path, torch_file=False):
    """
    A pickle (torch_file: a torch.save file) that may hold objects of the official TopoLM code: its run
    config (an OmegaConf DictConfig) and its LayerPositions. Those come back as plain objects with their
    attributes in __dict__, so that neither omegaconf nor the official code is needed to read the data.
    """
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split('.')[0] in ('omegaconf', 'positions'):
                return type(name, (), {'__setstate__': lambda self, state: self.__dict__.update(
                    state if isinstance(state, dict) else {'state': state})})
            return super().find_class(module, name)
    if torch_file:  # memory-mapped: the tensors are read when used
        pickle_module = SimpleNamespace(Unpickler=Unpickler, load=lambda f, **kw: Unpickler(f, **kw).load(),
                                        __name__='pickle')
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=pickle_module, mmap=True)
    with open(path, 'rb') as f:
        return Unpickler(f).load()

# -----------------------------------------------------------------------------
# Data: nanoGPT's loader, random chunks of the uint16 token files that prepare_data.py writes

def open_split(cfg, split):
    """data_dir/dataset/split.bin as uint16 tokens, after checking that it is what prepare_data.py wrote:
    meta.json, which it writes last, names the token count of each file."""
    folder = os.path.join(cfg['data_dir'], cfg['dataset'])
    path = os.path.join(folder, f'{split}.bin')
    rerun = (f"prepare it with `python prepare_data.py` (Shakespeare), or "
             f"`python prepare_data.py --input=YOUR_TEXT --name={cfg['dataset']}`")
    if not os.path.isfile(path):
        raise UsageError(f"no {path}: {rerun}")
    try:
        with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
            expected = json.load(f)[f'{split}_tokens']
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{folder} has no complete meta.json (an interrupted prepare_data.py?): {rerun}") from None
    size = os.path.getsize(path)
    if size != 2 * expected:
        raise UsageError(f"{path} holds {size} bytes, not the {expected} uint16 tokens that meta.json names: "
                         f"the folder is mixed or damaged; {rerun}")
    if expected <= cfg['block_size'] + 1:
        raise UsageError(f"{path} has {expected} tokens, too few for block_size={cfg['block_size']}")
    return np.memmap(path, dtype=np.uint16, mode='r')

def get_batch(data, batch_size, block_size, device, generator=None):
    # x: (B, T) tokens, y: (B, T) the tokens that follow them
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# Training: the run's device and precision, the learning rate, one step

def pick_device(name, local_rank=0):
    """The torch device for --device: auto = cuda, then mps, then cpu; a device that is not there is an error."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'cuda' and torch.cuda.is_available():
        return f'cuda:{local_rank}'
    ok = (name == 'cpu' or (name == 'mps' and torch.backends.mps.is_available()) or
          (re.fullmatch(r'cuda:\d+', name) and int(name[5:]) < torch.cuda.device_count()))
    if not ok:
        raise UsageError(f"--device={name}: not a device of this machine (it has cpu"
                         f"{', cuda' if torch.cuda.is_available() else ''}"
                         f"{', mps' if torch.backends.mps.is_available() else ''}); or use --device=auto")
    return name

def pick_dtype(name, device_type):
    """--dtype: auto = bfloat16 autocast on CUDA GPUs that have it (float16 with a gradient scaler on older
    ones) and on CPUs with native bf16 arithmetic (AVX512-BF16, AMX), float32 elsewhere."""
    cuda_bf16 = device_type == 'cuda' and torch.cuda.is_bf16_supported()
    if name == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if cuda_bf16 else 'float16'
        cpu_bf16 = any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported',
                                                                        '_is_amx_tile_supported'))
        return 'bfloat16' if device_type == 'cpu' and cpu_bf16 else 'float32'
    if name == 'float16' and device_type == 'cpu':
        raise UsageError("--dtype=float16 needs a GPU (cuda or mps); on a CPU use bfloat16 or float32")
    if name == 'bfloat16' and device_type == 'cuda' and not cuda_bf16:
        raise UsageError("--dtype=bfloat16: this GPU has no bf16; use float16 or float32")
    return name

def setup(cfg):
    """
    Where and how the run computes: one process, or one per device under torchrun (DDP: gloo on CPU, nccl
    on CUDA); the device; the dtype and its autocast context and gradient scaler; and how the processes
    share a step of gradient_accumulation_steps x batch_size sequences (each runs `accum` micro-batches of
    `batch_size`). Returns a namespace of all that.
    """
    if cfg['min_lr'] > cfg['learning_rate']:
        raise UsageError(f"--min_lr={cfg['min_lr']:g} is above --learning_rate={cfg['learning_rate']:g}: the "
                         f"schedule decays from learning_rate down to min_lr")
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    dev = pick_device(cfg['device'], local_rank)
    device_type = dev.split(':')[0]
    dtype = pick_dtype(cfg['dtype'], device_type)
    accum, batch_size = share_step(cfg['gradient_accumulation_steps'], cfg['batch_size'], world)
    if ddp:
        from torch.distributed import init_process_group
        if device_type == 'cuda':
            torch.cuda.set_device(dev)
        init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if device_type == 'cpu':
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, dev=dev, device_type=device_type,
                           dtype=dtype, ctx=ctx, scaler=scaler, accum=accum, batch_size=batch_size)

def share_step(accum, batch_size, world):
    """A step of accum micro-batches of batch_size sequences, shared by world processes: each runs fewer
    micro-batches where they divide evenly, else smaller ones. The tokens per step stay the user's."""
    if accum % world == 0:
        return accum // world, batch_size
    if batch_size % world == 0:
        return accum, batch_size // world
    raise UsageError(f"a step of {accum} x {batch_size} sequences cannot be shared evenly by {world} processes: "
                     f"make gradient_accumulation_steps or batch_size a multiple of {world}")

def keep_freed_memory():
    """
    glibc hands big freed blocks (the (B*T) x vocab logits and their gradient) back to the OS, and
    writing into fresh pages is slow on some machines: a default CPU step took twice as long (README,
    "Speed"). Ask it to keep them for reuse: a training process needs its peak memory again at every step.
    """
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: big blocks come from the heap, not fresh mmaps
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD = -1: never hand freed heap memory back
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

def train_step(model, optimizer, next_batch, run, grad_clip):
    """One optimizer step over run.accum micro-batches. Returns (loss, grad norm); on a non-finite loss or
    gradient the weights are left untouched (the caller stops)."""
    for micro_step in range(run.accum):
        if run.ddp:  # all-reduce the gradients only once, after the last micro-batch
            model.require_backward_grad_sync = micro_step == run.accum - 1
        X, Y = next_batch()
        with run.ctx:
            _, loss = model(X, Y)
        run.scaler.scale(loss / run.accum).backward()
    run.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    if math.isfinite(loss.item()) and (run.scaler.is_enabled() or math.isfinite(norm.item())):
        run.scaler.step(optimizer)  # (with fp16 the scaler itself skips steps with inf gradients)
        run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), norm.item()

def diverged(loss, first_loss):
    """A loss that is not finite, or far above where the run started, is divergence: never saved."""
    return not math.isfinite(loss) or (first_loss is not None and loss > 2 * first_loss + 1)

@torch.no_grad()
def estimate_loss(model, batch, cfg, run):
    """Mean CE and spatial loss over eval_iters batches of each split. The same batches every time (own
    generator) and the training RNG stream untouched (fork_rng), so that evaluating never changes the
    course of training: resume stays exact."""
    out = {}
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for split in ('train', 'val'):
            g = torch.Generator().manual_seed(cfg['seed'])
            ce, sl = torch.zeros(cfg['eval_iters']), torch.zeros(cfg['eval_iters'])
            for k in range(cfg['eval_iters']):
                with run.ctx:
                    model(*batch(split, g))
                ce[k], sl[k] = model.ce_loss.item(), model.spatial_loss.item()
            out[split] = (ce.mean().item(), sl.mean().item())
    model.train()
    return out

def compare_steps(steps, tokens, run, rounds=10, block=4):
    """
    Time two kinds of training step, {label: (step function, flops per token)}, the first against the
    second, in one process: in each round each runs block + 1 steps in turn, the order alternating and
    the first step after a switch not timed, so that drifting machine speed hits both alike and each is
    measured in its steady state. Prints ms/step, tokens/s, peak memory, GFLOP/s (CPU) or MFU (CUDA) and
    the ratio of the two; returns the median seconds per step of each.
    """
    import resource
    cuda = run.device_type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peak = {label: [] for label in steps}, {}
    for label, (step, _) in steps.items():  # warm up (and compile) each; peak memory in this order
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        peak[label] = (torch.cuda.max_memory_allocated() if cuda else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(f"benchmark: {rounds} rounds of {block} steps each, alternating, batch {run.batch_size} x "
          f"{tokens // run.batch_size // run.accum} x {run.accum} accum, {run.dtype}")
    for r in range(rounds):
        for label in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            step = steps[label][0]
            step()  # the switch
            sync()
            t = time.perf_counter()
            for _ in range(block):
                step()
            sync()
            times[label].append((time.perf_counter() - t) / block)
    medians = {label: float(np.median(t)) for label, t in times.items()}
    for label, (_, flops_per_token) in steps.items():
        s = medians[label]
        flops = flops_per_token * tokens / s
        print(f"{label:34s} {s * 1000:8.1f} ms/step  {tokens / s:9,.0f} tok/s  peak {peak[label]:7,.0f} MiB  "
              + (f"mfu {flops / 312e12 * 100:.1f}%" if cuda else f"{flops / 1e9:5.1f} GFLOP/s"))
    a, b = (np.array(t) for t in times.values())
    ma, mb = medians.values()
    print(f"ratio of the two: {ma / mb:.3f} (medians), {np.median(a / b):.3f} (median of the {rounds} rounds)")
    return medians

def benchmark(model, raw_model, optimizer, cfg, run):
    """ms/step with the spatial loss on (alpha as configured, 2.5 for a control) and off (alpha=0), on
    random tokens; then the spatial loss by itself, forward and backward, on the maps of one batch: what
    it costs apart from the rest of the step (and what a replaced spatial_correlation_loss costs)."""
    alpha = raw_model.config.alpha or 2.5
    X = torch.randint(0, 50257, (run.batch_size, cfg['block_size'] + 1), generator=torch.Generator().manual_seed(0))
    X = X.to(run.dev)
    next_batch = lambda: (X[:, :-1].contiguous(), X[:, 1:].contiguous())

    def step(a):
        raw_model.config.alpha = a
        train_step(model, optimizer, next_batch, run, cfg['grad_clip'])
    flops, off = raw_model.flops_per_token(), 'spatial loss off (alpha=0)'
    medians = compare_steps({f'spatial loss on (alpha={alpha})': (lambda: step(alpha), flops),
                             off: (lambda: step(0.0), flops)},
                            run.batch_size * cfg['block_size'] * run.accum, run)
    with torch.no_grad(), run.ctx:
        _, _, maps = raw_model(next_batch()[0], return_maps=True)
    maps = [m.requires_grad_() for m in maps.values()]  # leaves in the run's dtype, as in a step

    def loss_alone():
        for m in maps:
            m.grad = None
        with run.ctx:
            raw_model.spatial_loss_of(maps).backward()
        if run.device_type == 'cuda':
            torch.cuda.synchronize()
    times = []
    for _ in range(23):  # the first 3 warm up
        t = time.perf_counter()
        loss_alone()
        times.append(time.perf_counter() - t)
    s, k, (B, T, _) = float(np.median(times[3:])), raw_model.config.n_neighborhoods, maps[0].shape
    print(f"the spatial loss alone, forward and backward ({len(maps)} maps x {k} window{'s' * (k != 1)} of "
          f"{raw_model.window_places.size(1)} units, {B * T:,} tokens): {s * 1000:.1f} ms, "
          f"{s / medians[off] * 100:.1f}% of a step without it")

# -----------------------------------------------------------------------------
# Checkpointing

@contextmanager
def signals_deferred():
    """Ctrl-C (SIGINT) or SIGTERM inside this block waits until the block is done, then acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            os.kill(os.getpid(), s)  # delivered now, to the handler that was there before

def save_checkpoint(path, ckpt):
    """Write ckpt to path through a temporary file and a rename, with Ctrl-C held off until it is done: a kill,
    an interrupt or a full disk during a save always leaves the previous checkpoint whole."""
    tmp = path + '.tmp'
    with signals_deferred():
        try:
            with open(tmp, 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"could not write {path} ({reason}; a full disk?): {last_checkpoint(path)}") from None

def checkpoint_of(model, optimizer, iter_num, best_val_loss, first_val_loss, cfg):
    """Everything a bit-exact resume needs. cfg is the user's config: a resume on another number of
    processes shares the same step among them (see setup)."""
    return {
        'model_type': MODEL_TYPE,
        'model_args': asdict(model.config),
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'first_val_loss': first_val_loss,  # the divergence check compares with it (see diverged)
        'config': cfg,
        'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
                'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }

def last_checkpoint(path, saved=True):
    """What a stopped run leaves behind; saved: whether path is this run's (or the resumed run's)."""
    if saved and os.path.exists(path):
        return f"the last good checkpoint, {path}, is intact"
    return "no checkpoint was saved"

def load_checkpoint(path):
    """A checkpoint of this script, checked for everything a resume or from_checkpoint reads."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (for --resume, set --out_dir to the run's folder)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise UsageError(f"{path} could not be read as a checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get('model_type') != MODEL_TYPE:
        raise UsageError(f"{path} is not a {MODEL_TYPE} checkpoint written by {os.path.basename(__file__)}")
    missing = [k for k in ('model_args', 'model', 'optimizer', 'iter_num', 'best_val_loss', 'config', 'rng')
               if k not in ckpt]
    if missing:
        raise UsageError(f"{path} is incomplete: it has no {', '.join(missing)}")
    return ckpt

def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    random.setstate(rng['python'])
    if rng['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng['cuda'])

def resume_config(ckpt, given):
    """A resumed run's config: the run's own, then what was set now, except the model's shape, which is
    the checkpoint's whatever the flags say (a note names what is ignored)."""
    cfg = {**DEFAULTS, **ckpt['config'], **given}
    ignored = [k for k, v in ckpt['model_args'].items() if k in given and given[k] != v]
    cfg.update({k: v for k, v in ckpt['model_args'].items() if k in cfg})
    if ignored and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: --resume keeps the checkpoint's model; ignoring {', '.join(f'--{k}' for k in ignored)}")
    return cfg

def writable_dir(path):
    """Make sure out_dir is a folder this run can write into, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out_dir={path} is not a folder this run can write ({e.strerror})") from None

# -----------------------------------------------------------------------------
# The training loop

def main(argv):
    cfg, given = parse_args(argv, DEFAULTS, PRESETS, __doc__, DEFAULT_NOTES)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path) if cfg['resume'] else None
    if ckpt is not None:
        cfg = resume_config(ckpt, given)
    run = setup(cfg)
    torch.manual_seed(cfg['seed'] + run.rank)  # each process draws its own batches and windows
    model_args = {f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        raise UsageError(str(e)) from None
    iter_num, best_val_loss, first_val_loss = 0, float('inf'), None
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss, first_val_loss = ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('first_val_loss')
    model.to(run.dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), run.device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if run.ddp:  # only rank 0's generator state is saved: give each rank its own stream again
            torch.manual_seed(cfg['seed'] + run.rank + 1000 * iter_num)
        else:
            set_rng_state(ckpt['rng'])
        ckpt = None  # free the memory
    raw_model = model
    tokens_per_iter = run.accum * run.world * run.batch_size * cfg['block_size']
    if run.master:
        side = math.isqrt(cfg['n_embd'])
        print(f"TopoLM: {model.get_num_params() / 1e6:.2f}M parameters, {cfg['n_layer']} layers, "
              f"{2 * cfg['n_layer']} maps of {side}x{side} units, alpha={cfg['alpha']}, radius={cfg['radius']}, "
              f"{cfg['n_neighborhoods']} neighbourhoods/map")
        print(f"device {run.dev}, {run.dtype}, {run.world} process(es) of {run.accum} x {run.batch_size} "
              f"sequences, {tokens_per_iter:,} tokens per iteration")
    if cfg['compile']:
        if run.master:
            print("compiling the model... (under a minute on a CPU, during the first steps)")
        # torch's compiler warns about its own internals (FutureWarning): nothing a user can act on
        warnings.filterwarnings('ignore', category=FutureWarning, module=r'torch\._inductor')
        model = torch.compile(model)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # the grid buffers never change: no need to broadcast them every forward
        model = DDP(model, device_ids=[run.dev] if run.device_type == 'cuda' else None, broadcast_buffers=False)
    if cfg['bench']:
        return benchmark(model, raw_model, optimizer, cfg, run)

    data = {split: open_split(cfg, split) for split in ('train', 'val')}
    batch = lambda split, g=None: get_batch(data[split], run.batch_size, cfg['block_size'], run.dev, g)
    writable_dir(cfg['out_dir'])  # in every process: a usage error that all of them stop on
    saved = cfg['resume']  # whether out_dir/ckpt.pt is this run's (a resumed run's is)
    if not saved and os.path.exists(ckpt_path) and run.master:
        print(f"note: {ckpt_path} is an earlier run's; this run replaces it at its first save "
              f"(--resume continues it)")
    start_iter = iter_num
    t0, it0 = time.time(), iter_num  # the log's ms/iter: time since t0 over iterations since it0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        if run.master and (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']):
            losses = estimate_loss(raw_model, batch, cfg, run)
            (tce, _), (vce, vsl) = losses['train'], losses['val']
            print(f"step {iter_num}: train ce {tce:.4f}, val ce {vce:.4f}, val spatial loss {vsl:.4f} "
                  f"(x alpha {cfg['alpha']} = {cfg['alpha'] * vsl:.4f})")
            first_val_loss = vce if first_val_loss is None else first_val_loss
            if diverged(vce, first_val_loss) or not math.isfinite(tce + vsl):
                raise UsageError(f"training diverged at iter {iter_num} (val ce {vce:.4g}, it started at "
                                 f"{first_val_loss:.4g}) and stopped; {last_checkpoint(ckpt_path, saved)}. "
                                 f"Try a lower learning_rate or alpha.")
            best_val_loss = min(best_val_loss, vce)
            if iter_num > start_iter:  # (a resumed run's first evaluation has nothing new to save)
                save_checkpoint(ckpt_path, checkpoint_of(raw_model, optimizer, iter_num, best_val_loss,
                                                         first_val_loss, cfg))
                saved = True
                print(f"saved {ckpt_path}")
            t0, it0 = time.time(), iter_num
        if iter_num >= cfg['max_iters']:
            break
        loss, norm = train_step(model, optimizer, lambda: batch('train'), run, cfg['grad_clip'])
        if not run.scaler.is_enabled() and not (math.isfinite(loss) and math.isfinite(norm)):
            raise UsageError(f"loss {loss}, gradient norm {norm} at iter {iter_num}: training diverged and "
                             f"stopped; {last_checkpoint(ckpt_path, saved)}. Try a lower learning_rate or alpha.")
        iter_num += 1
        if run.master and iter_num % cfg['log_interval'] == 0:
            dt = (time.time() - t0) / (iter_num - it0)
            t0, it0 = time.time(), iter_num
            parts = f"ce {raw_model.ce_loss.item():.4f}, " + (f"spatial {raw_model.spatial_loss.item():.4f}"
                                                             if cfg['alpha'] > 0 else "control")
            msg = (f"iter {iter_num}: loss {loss:.4f} ({parts}), lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                   f"{tokens_per_iter / dt:,.0f} tok/s")
            if run.device_type == 'cuda':
                msg += f", mfu {raw_model.estimate_mfu(tokens_per_iter / run.world / dt) * 100:.1f}%"
            print(msg, flush=True)
    if start_iter >= cfg['max_iters'] and run.master:
        print(f"nothing to train: the run is at iter {start_iter} and max_iters={cfg['max_iters']}")
    if run.ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()

def command(main, argv, interrupted="a checkpoint is only ever replaced whole: the last one saved is intact"):
    """Run main as a command: a UsageError is one line on stderr and exit 2, Ctrl-C exit 130; under
    torchrun the first process speaks for all, the others only of what it did not meet."""
    speak = int(os.environ.get('RANK', 0)) == 0
    try:
        main(argv)
        return 0
    except UsageError as e:
        if not speak:
            # every process meets the same bad input, and torchrun stops the others as soon as one exits:
            # wait, so that the first process is not stopped before it has said why. (Still here after
            # the wait: the first process did not meet it, so say it here.)
            time.sleep(30)
        print(f"error: {e}" if speak else f"error: process {os.environ['RANK']}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speak:
            print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if speak:
            raise
        # under torchrun, when the first process stops (it says why), the others' collective calls fail
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        print(f"error: process {os.environ['RANK']} stopped: {reason}", file=sys.stderr)
        return 1

if __name__ == '__main__':
    sys.exit(command(main, sys.argv[1:]))
