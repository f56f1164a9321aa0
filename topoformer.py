"""
Topoformer: a BERT whose attention units sit on a 2-D grid.

Binhuraib, Tuckute, Blauch. "Topoformer: brain-like topographic organization in Transformer language
models through spatial querying and reweighting". arXiv 2510.18745 (2025). Official code:
TahaBinhuraib/topoformer, and its BERT in TahaBinhuraib/cramming_local.

A BERT-style encoder (pre-LayerNorm, bidirectional attention, GELU-GLU feed-forward, tied embeddings)
trained with masked language modelling. The D = side*side units of the queries, keys, values and
attention outputs sit on a side x side grid in [0, 1)^2 (a torus by default), and two fixed local
connectivity patterns make neighbouring units respond alike:

  spatial querying (SQ):   q' = q M,  scores = q' k^T / sqrt(D)
      M[i, j] = 1 when unit j is within radius r of unit i, r = sqrt(sq / pi) (a disc covering a
      fraction sq of the grid), normalised. Each key unit is matched against the pooled queries of
      its neighbourhood.
  spatial reweighting (SR): out = y |W_o * M_sr|^T + b_sr
      the output projection is locally connected: unit i of the output reads only the units of the
      attention output within the disc of area sr around it. As in the official BERT, a dense
      projection follows: the block adds dense(out) to the residual stream.

sq = sr = 1 is the non-topographic control: plain queries and a dense output projection.

Read it top to bottom: config, model, spatial geometry, data loader, training, checkpointing, and the
training loop itself, main().

    python topoformer.py                          # laptop-size masked LM on data/shakespeare (see README)
    python topoformer.py --sq=1 --sr=1            # the non-topographic control
    python topoformer.py --preset=paper           # the paper's 16-layer BERT and optimisation
    python topoformer.py --preset=classroom       # a run of about a minute, for the classroom loop
    python topoformer.py --task=sentiment         # the paper's 1-layer IMDB classifier (data/imdb)
    python topoformer.py --compile --out_dir=out-big --batch_size=64
    torchrun --standalone --nproc_per_node=4 topoformer.py --preset=paper
    python topoformer.py --bench                  # ms/step of the Topoformer and of its control
"""

import os
# Before torch loads OpenMP: its threads sleep while they wait instead of spinning. On a machine whose
# cores are shared (a laptop, a CI box), spinning threads starve the one they wait for (README, "Speed").
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import re
import sys
import math
import time
import json
import random
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
out_dir = 'out-topoformer'  # where ckpt.pt is written
eval_interval = 250  # >= 1: evaluate, and save a checkpoint, every this many steps
log_interval = 10  # >= 1: print a training line every this many steps
eval_iters = 20  # >= 1: batches per split in an evaluation
resume = False  # continue the run in out_dir from its ckpt.pt
# task
task = 'mlm'  # mlm|sentiment: masked language modelling on data_dir/dataset, or IMDB reviews (TASK_DEFAULTS)
# data
data_dir = 'data'  # where prepare_data.py writes its folders
dataset = 'shakespeare'  # reads data_dir/dataset/{train,val}.bin, written by prepare_data.py
imdb_dir = 'data/imdb/aclImdb'  # --task=sentiment: the reviews, as aclImdb/{train,test}/{pos,neg}/*.txt
gradient_accumulation_steps = 1  # >= 1: micro-batches per optimizer step, over all processes
batch_size = 16  # >= 1: sequences per micro-batch
block_size = 128  # >= 1: tokens per sequence
# model
n_layer = 4  # >= 1: transformer blocks; each has 4 maps (q, k, v, out)
n_head = 1  # >= 1: attention heads; the paper's is one head of size D
n_embd = 256  # >= 1: D, a perfect square: 256 units = a 16 x 16 grid
ffn_size = 1024  # >= 2: width of the GELU-GLU layer, halved by the gate
dropout = 0.0  # [0, 1): dropout of the embeddings and of each sublayer's output (none on attention weights)
dense_proj = True  # a dense Linear(D, D) after spatial reweighting, as the official BERT has
# topography (Binhuraib et al. 2025)
sq = 0.3  # (0, 1]: spatial querying, the fraction of the grid pooled into each query; 1 = none (control)
sr = 0.3  # (0, 1]: spatial reweighting, the fraction of the grid each output unit reads; 1 = dense (control)
wrap = True  # distances on a torus (the paper's default); False: a flat square with edges
sr_nonneg = True  # SR weights act as |W| >= 0, as in the official code (see SpatialSelfAttention)
# AdamW
learning_rate = 1e-3  # > 0: peak learning rate
max_iters = 2500  # >= 1: optimizer steps of the whole run
weight_decay = 0.01  # >= 0: on 2-D weights (matmuls, embeddings)
beta1 = 0.9  # [0, 1): AdamW's decay of the gradient's mean
beta2 = 0.98  # [0, 1): AdamW's decay of the gradient's square
adam_eps = 1e-8  # > 0: AdamW's epsilon (PyTorch's default; the official BERT's is 1e-12)
grad_clip = 0.5  # >= 0: clip the gradient norm at this value; 0 = no clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100  # >= 0: steps of linear warmup
lr_decay_iters = 0  # >= 0: the step at which the cosine decay reaches min_lr; 0 = max_iters
min_lr = 1e-4  # >= 0: the learning rate after the decay
# system
device = 'auto'  # auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto|float32|bfloat16|float16: auto = bf16 on CUDA (else fp16) and on CPUs with native bf16
compile = False  # compile the model with torch.compile
seed = 1337  # >= 0: seeds the batches and the masks
bench = False  # time training steps of the Topoformer and of its control, then exit
preset = ''  # a named set of overrides, applied before the other keys (see PRESETS)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str))}

# --task=sentiment brings its own defaults, under any preset and explicit key: the paper's first
# experiment, a 1-layer Topoformer on a 20 x 20 grid classifying IMDB reviews (the official
# config_text.yaml and train_imdb.py: D=400, sq=0.1, sr=0.3, 256 tokens, dropout 0.1, AdamW lr 1e-3
# with PyTorch's betas, no dense layer after SR; its FFN is a ReLU MLP 400-1600-400, ours the GELU-GLU
# 400-1600(gated to 800)-400 of the BERT). A shorter run than the paper's 20 epochs of batch 256, so
# that it finishes on a laptop: 700 steps of 32 = one epoch of the 22.5k training reviews.
TASK_DEFAULTS = {
    'mlm': {},
    'sentiment': dict(out_dir='out-sentiment', n_layer=1, n_head=1, n_embd=400, ffn_size=1600,
                      block_size=256, sq=0.1, sr=0.3, dropout=0.1, dense_proj=False, batch_size=32,
                      max_iters=700, eval_interval=100, eval_iters=10, warmup_iters=50, learning_rate=1e-3,
                      weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=0.1),
}

PRESETS = {
    # the paper's BERT (cramming_local's arch/bert-c5_topo + train/bert-o3): 16 layers, 28 x 28 grid, one
    # head, GELU-GLU 3072, a dense layer after SR, sequence 128, sq = sr = 0.3, AdamW 1e-3 (0.9, 0.98),
    # eps 1e-12, wd 0.01, clip 0.5, 4096 sequences per step, and no dropout at all: the official
    # pretraining runs the model in eval mode (pretrain_in_train_mode: False). Ours, not the official: the
    # step count and the cosine schedule (cramming: a 12-hour budget, and a batch that ramps up to 4096
    # over its first 300k micro-batches), and the corpus, FineWeb-Edu, as for topo_gpt.py.
    'paper': dict(dataset='fineweb-edu', n_layer=16, n_head=1, n_embd=784, ffn_size=3072, block_size=128,
                  dropout=0.0, dense_proj=True, sq=0.3, sr=0.3, batch_size=128, gradient_accumulation_steps=32,
                  learning_rate=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.98, adam_eps=1e-12, grad_clip=0.5,
                  warmup_iters=1000, max_iters=20000, min_lr=1e-5, eval_interval=1000, eval_iters=100),
    # the five-minute classroom loop (README, "Classroom"): a model and its control in about a minute each
    'classroom': dict(n_layer=2, n_head=1, n_embd=256, ffn_size=1024, block_size=64, batch_size=16,
                      max_iters=600, eval_interval=200, eval_iters=10, warmup_iters=30),
}

MODEL_TYPE = 'topoformer'  # written into every checkpoint: analyze.py tells the models apart by it

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
HELP = __doc__ + '\n' + '\n'.join(f"--task={name} sets: " + ', '.join(f'{k}={v}' for k, v in d.items())
                                  for name, d in TASK_DEFAULTS.items() if d)

def config_of(argv):
    """parse_args, then the task's defaults under the preset and the explicit keys."""
    cfg, given = parse_args(argv, DEFAULTS, PRESETS, HELP, DEFAULT_NOTES)
    return {**cfg, **TASK_DEFAULTS[cfg['task']], **given}, given

# Token ids. GPT-2's tokenizer uses 0..50256; the vocabulary is padded to 50304 (a multiple of 64, for
# speed), and the tokens masked language modelling needs live in the padding.
EOT_ID = 50256  # <|endoftext|>, between documents in the .bin files
MASK_ID = 50257  # [MASK]
PAD_ID = 50258  # [PAD]: fills IMDB reviews up to the longest of the batch; never attended to
IGNORE_INDEX = -100  # MLM targets at the positions that were not masked (PyTorch's default)
MASK_PROB = 0.15  # BERT: 15% of the tokens are predicted

# -----------------------------------------------------------------------------
# The model: a pre-LayerNorm BERT whose self-attention queries and reweights spatially

@dataclass
class TopoformerConfig:
    block_size: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 tokens + [MASK], [PAD], padded to a multiple of 64
    n_layer: int = 16
    n_head: int = 1
    n_embd: int = 784  # D = side * side units on the grid
    ffn_size: int = 3072
    dropout: float = 0.0
    dense_proj: bool = True  # the official BERT's dense layer after SR
    sq: float = 0.3  # 1 = no spatial querying
    sr: float = 0.3  # 1 = dense output projection
    wrap: bool = True
    sr_nonneg: bool = True
    n_class: int = 0  # 0: masked LM head; > 0: mean-pool then a linear classifier (sentiment)

class SpatialSelfAttention(nn.Module):
    """
    Bidirectional self-attention with spatial querying (SQ) and spatial reweighting (SR).

        q = x W_q^T,  k = x W_k^T,  v = x W_v^T        (B, T, D) each
        q' = q M                                        SQ: pool the queries over each unit's disc
        y = softmax(q' k^T / sqrt(D)) v                 one head of size D, as in the paper
        out = y |W_o * M_sr|^T + b_sr                   SR: a locally connected output projection
        dense(out)                                      what the block adds to the residual stream

    M is fixed, so it folds into the query weight: q' = x W_q^T M = x (M^T W_q)^T. Pooling the D x D
    weight once per forward replaces pooling every one of the B*T queries (the official code multiplies
    each query by M: an extra (B*T) x D x D matmul). The control and the Topoformer then do the same
    per-token work; the Topoformer adds the fold and the SR mask, per step.
    """

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        side = math.isqrt(D)
        self.c_q = nn.Linear(D, D, bias=False)  # W_q
        self.c_kv = nn.Linear(D, 2 * D, bias=False)  # W_k and W_v
        self.c_proj = nn.Linear(D, D, bias=True)  # W_o and b_sr: SR, a Linear with a bias as the official one
        self.c_dense = nn.Linear(D, D, bias=False) if config.dense_proj else None  # the official BERT's dense
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.sr_nonneg = config.sr_nonneg
        # SQ: the disc matrix, normalised to unit Frobenius norm as in the official code. sq=1 means no
        # pooling at all. (The official control instead normalises an all-ones M: every query becomes the
        # mean query, so all queries rank the keys alike, through one scalar; README, "Deviations".)
        M = kernel = None
        if config.sq < 1:
            M = disc_mask(side, config.sq, config.wrap)
            M = M / M.norm()
            if config.wrap:
                # on the torus M is circulant: M[i, j] depends only on the offset from unit i to unit j,
                # so multiplying by M is a circular convolution of the side x side grid image with the
                # disc around unit 0, M[0]. By FFT that costs D log D per vector instead of D^2.
                kernel = torch.fft.rfft2(M[0].view(side, side)).real  # the disc is symmetric: real spectrum
        self.register_buffer('sq_matrix', M, persistent=False)  # (D, D), symmetric; None: no SQ
        self.register_buffer('sq_kernel', kernel, persistent=False)  # (side, side // 2 + 1); None: flat grid
        self.register_buffer('sr_mask', disc_mask(side, config.sr, config.wrap) if config.sr < 1 else None,
                             persistent=False)  # (D, D) 0/1; None: dense

    def fold_queries(self, w_q):
        """W_q' = M^T W_q = M W_q (M is symmetric), so that x W_q'^T = q M: column j of W_q (the weights
        from input unit j to every query unit) is pooled over the grid, as a query vector would be.
        On the torus by FFT (a circular convolution), on the flat grid by the matmul itself."""
        if self.sq_kernel is None or w_q.device.type == 'mps':  # the FFT path is untested on MPS
            return self.sq_matrix @ w_q
        D, side = w_q.size(0), self.sq_kernel.size(0)
        w = w_q.t().reshape(D, side, side)  # (D_in, side, side): column j as an image on the grid
        w = torch.fft.irfft2(torch.fft.rfft2(w) * self.sq_kernel, s=(side, side))
        return w.reshape(D, D).t()

    def forward(self, x, key_mask=None, return_maps=False):
        B, T, D = x.size()
        w_q = self.c_q.weight  # (D, D): (out, in), q = x W_q^T
        if self.sq_matrix is not None:
            w_q = self.fold_queries(w_q)  # q' = q M for every token at once
        q = F.linear(x, w_q)  # (B, T, D) pooled queries q'
        k, v = self.c_kv(x).split(D, dim=2)  # (B, T, D) each
        hs = D // self.n_head
        qh, kh, vh = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # scores / sqrt(hs) (= sqrt(D) with the one head); key_mask hides [PAD] keys; flash attention
        # where the device has it. No dropout on the attention weights: the official BERT's is 0.
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=key_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        w_o = self.c_proj.weight  # (D, D): w_o[i, j] connects unit j of y to unit i of the output
        if self.sr_mask is not None:
            # SR: masked in the forward pass, so the weights outside the disc get zero gradient (they
            # are zero from the init on, and stay so). sr_nonneg (the default) uses |W_o|, as the official
            # code does by rewriting the weights in place every forward: each output unit is then a
            # positive sum over its disc, neighbours share most of it, and the out maps turn topographic,
            # as the paper reports. Signed local weights do not (README, "Deviations").
            w_o = (w_o.abs() if self.sr_nonneg else w_o) * self.sr_mask
        out = F.linear(y, w_o, self.c_proj.bias)  # (B, T, D): the 'out' map, where the official code looks
        maps = None
        if return_maps:  # the queries before pooling: the paper's query maps (an extra matmul, here only)
            maps = (F.linear(x, self.c_q.weight), k, v, out)
        if self.c_dense is not None:
            out = self.c_dense(out)
        return self.resid_dropout(out), maps

class MLP(nn.Module):
    """GELU-GLU feed-forward, as the paper's BERT: D -> ffn_size, gate one half with the GELU of the
    other, ffn_size / 2 -> D."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_size, bias=False)
        self.c_proj = nn.Linear(config.ffn_size // 2, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        a, gate = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(a * F.gelu(gate)))

class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SpatialSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, key_mask=None, return_maps=False):
        a, maps = self.attn(self.ln_1(x), key_mask, return_maps)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, maps

class Topoformer(nn.Module):

    def __init__(self, config):
        super().__init__()
        side = math.isqrt(config.n_embd)
        if side * side != config.n_embd:
            raise ValueError(f"n_embd={config.n_embd} is not a perfect square: the units must tile a "
                             f"side x side grid (e.g. 256 = 16 x 16, 400 = 20 x 20, 784 = 28 x 28)")
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        for name in ('sq', 'sr'):
            if not 0 < getattr(config, name) <= 1:
                raise ValueError(f"{name}={getattr(config, name)} is outside (0, 1]: it is the fraction of "
                                 f"the grid a disc covers (1 = the non-topographic control)")
        if config.ffn_size < 2 or config.ffn_size % 2:
            raise ValueError(f"ffn_size={config.ffn_size} must be even: the GLU gate halves it")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        if config.n_class:
            self.classifier = nn.Linear(config.n_embd, config.n_class)
        else:  # the official BERT's prediction head (skip_head_transform: True): one dense Linear(D, D)
            self.prediction_head = nn.Linear(config.n_embd, config.n_embd, bias=False)  # before the decoder
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # the decoder
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight') or pn.endswith('c_dense.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():  # SR: the weights outside the disc start (and stay) at zero
            for block in self.transformer.h:
                if block.attn.sr_mask is not None:
                    block.attn.c_proj.weight.mul_(block.attn.sr_mask)

        # four maps per layer, all on the same grid: unit i sits at (i // side, i % side)
        self.map_names = [f'h.{l}.{s}' for l in range(config.n_layer) for s in ('q', 'k', 'v', 'out')]
        self.register_buffer('unit_pos', grid_coords(side), persistent=False)  # (D, 2)

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
        """(n_embd, 2) grid coordinates (row, col) of the units of one map, e.g. 'h.0.q'."""
        if map_name not in self.map_names:
            raise ValueError(f"no map {map_name!r}: maps are h.<layer>.{{q,k,v,out}}, e.g. h.0.q")
        return self.unit_pos.float()

    def forward(self, idx, targets=None, return_maps=False):
        """
        idx: (B, T) token ids. Masked LM (n_class = 0): targets (B, T) hold the original token at the
        masked positions and IGNORE_INDEX (-100) elsewhere; the logits are then (N, vocab) for the N
        masked positions only (in row-major order), as BERT computes them; without targets (B, T, vocab).
        Classifier (n_class > 0): targets (B,) labels, logits (B, n_class).
        return_maps: also an ordered dict {'h.<l>.q|k|v|out': (B, T, D)} of every layer's maps.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # the classifier's batches are padded; the MLM chunks never are (no mask: the fastest attention)
        key_mask = (idx != PAD_ID)[:, None, None, :] if self.config.n_class else None  # (B, 1, 1, T)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        maps = []
        for block in self.transformer.h:
            x, m = block(x, key_mask, return_maps)
            if return_maps:
                maps += m
        x = self.transformer.ln_f(x)

        loss = None
        if self.config.n_class:
            keep = key_mask[:, 0, 0, :, None].to(x.dtype)  # (B, T, 1): mean over the review, not the padding
            logits = self.classifier((x * keep).sum(1) / keep.sum(1))  # (B, n_class)
            if targets is not None:
                loss = F.cross_entropy(logits, targets)
        elif targets is None:
            logits = self.lm_head(self.prediction_head(x))  # (B, T, vocab_size)
        else:
            # gather the masked positions before the head: 15% of the (B*T) x vocab logits, as the
            # official sparse_prediction
            picked = targets != IGNORE_INDEX
            logits = self.lm_head(self.prediction_head(x[picked]))  # (N, vocab_size)
            loss = F.cross_entropy(logits, targets[picked])
        if return_maps:
            return logits, loss, OrderedDict(zip(self.map_names, maps))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        # weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms. (The
        # official BERT exempts by name, and its LayerNorms' names miss its keys: it decays their weights.)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps,
                                 **(dict(fused=True) if use_fused else {}))

    def flops_per_token(self):
        """Training flops per token (PaLM appendix B, as nanoGPT); the vocab projection counts only for
        the 15% masked tokens, the SQ fold not at all."""
        cfg = self.config
        emb = cfg.vocab_size * cfg.n_embd  # a lookup on the way in; a matmul on the way out, for MLM only
        flops = 6 * (self.get_num_params() - emb) + (0 if cfg.n_class else 6 * MASK_PROB * emb)
        return flops + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second):
        """Model flops utilization of one process in units of an A100's bf16 peak, as nanoGPT."""
        return self.flops_per_token() * tokens_per_second / 312e12

    @classmethod
    def from_checkpoint(cls, path, device='cpu'):
        """Rebuild a trained model from a ckpt.pt written by this script, or from its already loaded dict.
        Returned in eval mode."""
        ckpt = load_checkpoint(path) if isinstance(path, str) else path
        if ckpt.get('model_type') != 'topoformer':
            raise ValueError("not a Topoformer checkpoint written by topoformer.py")
        model = cls(TopoformerConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        return model.to(device).eval()

# -----------------------------------------------------------------------------
# Spatial geometry: units on a side x side grid in [0, 1)^2, discs of a given area

def grid_coords(side):
    """(side*side, 2) integer lattice coordinates (row, col): unit i is at (i // side, i % side)."""
    i = torch.arange(side * side)
    return torch.stack([i // side, i % side], dim=1)

def grid_distances(side, wrap=True):
    """
    (D, D) Euclidean distances between the units, placed at (row, col) / side in the unit square.
    wrap: on the torus, where an offset d along an axis is also an offset 1 - d the other way round.
    """
    pos = grid_coords(side).double() / side
    d = (pos[:, None, :] - pos[None, :, :]).abs()  # (D, D, 2) offsets along rows and columns
    if wrap:
        d = torch.minimum(d, 1 - d)
    return d.norm(dim=-1)

def disc_mask(side, frac, wrap=True):
    """
    (D, D) float 0/1 mask: M[i, j] = 1 when unit j lies within radius r of unit i, with r chosen so that
    the disc covers a fraction frac of the (unit) grid's area:  pi r^2 = frac  ->  r = sqrt(frac / pi).
    Symmetric. On the flat grid the discs of units near an edge are cut off, and cover less.
    """
    r = math.sqrt(frac / math.pi)
    return (grid_distances(side, wrap) <= r).to(torch.get_default_dtype())

# -----------------------------------------------------------------------------
# Data. MLM: nanoGPT's loader, random chunks of the uint16 token files that prepare_data.py writes,
# masked as BERT does. Sentiment: the IMDB reviews, tokenized into memory once.

def mask_tokens(x, generator=None):
    """
    BERT's masking of a (B, T) batch: each token but the special ones (end-of-text, [PAD]) is picked with
    probability 0.15; a picked token becomes [MASK] 80% of the time, a random token 10%, and stays itself
    10%. Returns the model's input and the targets: the original token where picked, IGNORE_INDEX
    elsewhere. All draws have fixed shapes, so a batch always consumes the same amount of the generator.
    """
    u = torch.rand(x.shape, generator=generator)
    u = u.masked_fill((x == EOT_ID) | (x == PAD_ID), 2.0)  # never picked, as in the official masking
    picked = u < MASK_PROB
    picked.view(-1)[u.view(-1).argmin()] |= bool(u.min() < 2)  # at least one target, even in a tiny batch
    r = torch.rand(x.shape, generator=generator)
    random_tokens = torch.randint(EOT_ID, x.shape, generator=generator)  # a real token, not end-of-text
    inp = torch.where(picked & (r < 0.8), MASK_ID, x)
    inp = torch.where(picked & (r >= 0.8) & (r < 0.9), random_tokens, inp)
    return inp, torch.where(picked, x, IGNORE_INDEX)

def to_device(x, y, device):
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

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
    # x: (B, T) masked random chunks of the token file, y: (B, T) the MLM targets
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    return to_device(*mask_tokens(x, generator), device)

def load_imdb(imdb_dir, split, block_size):
    """
    The reviews of imdb_dir/<split>/{neg,pos}/*.txt (the aclImdb layout), GPT-2 tokenized and cut to
    their first block_size tokens. Returns tokens (N, block_size) padded with PAD_ID, labels (N,):
    0 = negative, 1 = positive, in file name order.
    """
    texts, labels = [], []
    for label, sub in enumerate(('neg', 'pos')):
        folder = os.path.join(imdb_dir, split, sub)
        files = sorted(f for f in os.listdir(folder) if f.endswith('.txt')) if os.path.isdir(folder) else []
        if not files:
            raise UsageError(f"no reviews in {folder}: --imdb_dir must hold the IMDB layout {{train,test}}/"
                             f"{{pos,neg}}/*.txt (get it with `python prepare_data.py --dataset=imdb`)")
        for f in files:
            with open(os.path.join(folder, f), encoding='utf-8', errors='replace') as fh:
                texts.append(fh.read().replace('<br />', ' '))  # IMDB's line breaks are HTML
        labels += [label] * len(files)
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise UsageError(f"tiktoken could not load the GPT-2 vocabulary ({type(e).__name__}); offline, point "
                         f"TIKTOKEN_CACHE_DIR at a copy of tiktoken's cache (see README)") from None
    ids = [t[:block_size] for t in enc.encode_ordinary_batch(texts)]
    keep = [i for i, t in enumerate(ids) if t]  # an empty review has nothing to classify
    tokens = torch.full((len(keep), block_size), PAD_ID, dtype=torch.long)
    for row, i in enumerate(keep):
        tokens[row, :len(ids[i])] = torch.tensor(ids[i])
    return tokens, torch.tensor(labels)[keep]

def imdb_batch(tokens, labels, ix, device):
    # x: (B, T) reviews padded up to the longest of the batch, y: (B,) labels
    x = tokens[ix]
    x = x[:, :int((x != PAD_ID).sum(1).max())]
    return to_device(x, labels[ix], device)

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
    """Mean loss (and, classifying, accuracy) over eval_iters batches of each split. The same batches
    every time (own generator) and the training RNG stream untouched (fork_rng), so that evaluating never
    changes the course of training: resume stays exact."""
    out = {}
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for split in ('train', 'val'):
            g = torch.Generator().manual_seed(cfg['seed'])
            losses, accs = torch.zeros(cfg['eval_iters']), torch.zeros(cfg['eval_iters'])
            for k in range(cfg['eval_iters']):
                X, Y = batch(split, g)
                with run.ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
                if model.config.n_class:
                    accs[k] = (logits.argmax(-1) == Y).float().mean().item()
            out[split] = (losses.mean().item(), accs.mean().item())
    model.train()
    return out

@torch.no_grad()
def accuracy(model, tokens, labels, batch_size, device, ctx):
    """Sentiment: the fraction of the reviews classified right, in order, all of them."""
    model.eval()
    right = 0
    for i in range(0, len(labels), batch_size):
        X, Y = imdb_batch(tokens, labels, torch.arange(i, min(i + batch_size, len(labels))), device)
        with ctx:
            logits, _ = model(X)
        right += (logits.argmax(-1) == Y).sum().item()
    model.train()
    return right / len(labels)

def build_model(model_args):
    try:
        return Topoformer(TopoformerConfig(**model_args))
    except ValueError as e:
        raise UsageError(str(e)) from None

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

def benchmark(model_args, cfg, run):
    """ms/step of the Topoformer (sq, sr as configured, 0.3 where they are 1) and of its control
    (sq = sr = 1) at the same size, on the same random batch."""
    B, T = run.batch_size, cfg['block_size']
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, EOT_ID, (B, T), generator=g)
    if model_args['n_class']:
        X, Y = to_device(X, torch.randint(0, model_args['n_class'], (B,), generator=g), run.dev)
    else:
        X, Y = to_device(*mask_tokens(X, g), run.dev)
    steps = {}
    topo = tuple(v if v < 1 else 0.3 for v in (model_args['sq'], model_args['sr']))
    for name, (sq, sr) in (('topoformer', topo), ('control', (1.0, 1.0))):
        torch.manual_seed(cfg['seed'])
        model = build_model({**model_args, 'sq': sq, 'sr': sr}).to(run.dev)
        optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                               (cfg['beta1'], cfg['beta2']), run.device_type, cfg['adam_eps'])
        compiled = torch.compile(model) if cfg['compile'] else model
        step = lambda m=compiled, o=optimizer: train_step(m, o, lambda: (X, Y), run, cfg['grad_clip'])
        steps[f"{name} (sq={sq}, sr={sr})"] = (step, model.flops_per_token())
    print(f"{model_args['n_layer']} layers, D={model_args['n_embd']}")
    compare_steps(steps, B * T * run.accum, run)

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
    cfg, given = config_of(argv)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path) if cfg['resume'] else None
    if ckpt is not None:
        cfg = resume_config(ckpt, given)
    run = setup(cfg)
    torch.manual_seed(cfg['seed'] + run.rank)  # each process draws its own batches and masks
    sentiment = cfg['task'] == 'sentiment'
    model_args = {f.name: cfg[f.name] for f in fields(TopoformerConfig) if f.name in cfg}
    model_args = ckpt['model_args'] if ckpt is not None else {**model_args, 'n_class': 2 if sentiment else 0}
    if sentiment != bool(model_args['n_class']):
        raise UsageError(f"--task={cfg['task']} does not fit the checkpoint's model (a "
                         f"{'classifier' if model_args['n_class'] else 'masked LM'})")
    if cfg['bench']:
        return benchmark(model_args, cfg, run)
    model = build_model(model_args)
    iter_num, best_val_loss, first_val_loss = 0, float('inf'), None
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss, first_val_loss = ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('first_val_loss')
    model.to(run.dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), run.device_type, cfg['adam_eps'])
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if run.ddp:  # only rank 0's generator state is saved: give each rank its own stream again
            torch.manual_seed(cfg['seed'] + run.rank + 1000 * iter_num)
        else:
            set_rng_state(ckpt['rng'])
        ckpt = None  # free the memory

    # the data, before the model is compiled: a missing file should fail at once
    B, T = run.batch_size, cfg['block_size']
    if sentiment:
        tokens, labels = load_imdb(cfg['imdb_dir'], 'train', T)
        is_val = torch.arange(len(labels)) % 10 == 0  # every 10th training review is held out
        data = {'train': (tokens[~is_val], labels[~is_val]), 'val': (tokens[is_val], labels[is_val])}
        test_set = load_imdb(cfg['imdb_dir'], 'test', T)
        batch = lambda split, g=None: imdb_batch(*data[split], torch.randint(len(data[split][1]), (B,), generator=g),
                                                 run.dev)
    else:
        data = {split: open_split(cfg, split) for split in ('train', 'val')}
        batch = lambda split, g=None: get_batch(data[split], B, T, run.dev, g)
    raw_model = model
    items_per_iter = run.accum * run.world * B * (1 if sentiment else T)
    unit = 'reviews' if sentiment else 'tok'
    if run.master:
        side = math.isqrt(model.config.n_embd)
        kind = 'the non-topographic control' if model.config.sq == model.config.sr == 1 else 'Topoformer'
        print(f"{kind}: {model.get_num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
              f"{side}x{side} grid ({'torus' if model.config.wrap else 'flat'}), sq={model.config.sq}, "
              f"sr={model.config.sr}, task {cfg['task']}")
        print(f"device {run.dev}, {run.dtype}, {run.world} process(es) of {run.accum} x {B} sequences, "
              f"{items_per_iter:,} {unit} per iteration")
    writable_dir(cfg['out_dir'])  # in every process: a usage error that all of them stop on
    saved = cfg['resume']  # whether out_dir/ckpt.pt is this run's (a resumed run's is)
    if not saved and os.path.exists(ckpt_path) and run.master:
        print(f"note: {ckpt_path} is an earlier run's; this run replaces it at its first save "
              f"(--resume continues it)")
    if cfg['compile']:
        if run.master:
            print("compiling the model... (under a minute on a CPU, during the first steps)")
        # torch's compiler warns about its own internals (FutureWarning): nothing a user can act on
        warnings.filterwarnings('ignore', category=FutureWarning, module=r'torch\._inductor')
        model = torch.compile(model)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # the SQ/SR buffers never change: no need to broadcast them every forward
        model = DDP(model, device_ids=[run.dev] if run.device_type == 'cuda' else None, broadcast_buffers=False)

    start_iter = iter_num
    t0, it0 = time.time(), iter_num  # the log's ms/iter: time since t0 over iterations since it0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        if run.master and (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']):
            (tl, ta), (vl, va) = estimate_loss(raw_model, batch, cfg, run).values()
            what = 'loss' if sentiment else 'masked-token loss'
            print(f"step {iter_num}: train {what} {tl:.4f}, val {what} {vl:.4f}"
                  + (f", train acc {ta:.3f}, val acc {va:.3f}" if sentiment else ''))
            first_val_loss = vl if first_val_loss is None else first_val_loss
            if diverged(vl, first_val_loss) or not math.isfinite(tl):
                raise UsageError(f"training diverged at iter {iter_num} (val loss {vl:.4g}, it started at "
                                 f"{first_val_loss:.4g}) and stopped; {last_checkpoint(ckpt_path, saved)}. "
                                 f"Try a lower learning_rate.")
            best_val_loss = min(best_val_loss, vl)
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
                             f"stopped; {last_checkpoint(ckpt_path, saved)}. Try a lower learning_rate.")
        iter_num += 1
        if run.master and iter_num % cfg['log_interval'] == 0:
            dt = (time.time() - t0) / (iter_num - it0)
            t0, it0 = time.time(), iter_num
            msg = (f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                   f"{items_per_iter / dt:,.0f} {unit}/s")
            if run.device_type == 'cuda' and not sentiment:
                msg += f", mfu {raw_model.estimate_mfu(items_per_iter / run.world / dt) * 100:.1f}%"
            print(msg, flush=True)
    if start_iter >= cfg['max_iters'] and run.master:
        print(f"nothing to train: the run is at iter {start_iter} and max_iters={cfg['max_iters']}")
    if run.master and sentiment:
        acc = accuracy(raw_model, *test_set, 2 * B, run.dev, run.ctx)
        print(f"test accuracy {acc:.4f} on {len(test_set[1])} reviews")
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
