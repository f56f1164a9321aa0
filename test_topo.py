"""
Tests for topo-lm, in the order of the files they test: topo_gpt.py, topoformer.py, prepare_data.py,
analyze.py, bench.py, then what holds the house together (the shared code, the README and docs/). Run:

    python -m pytest -q test_topo.py

Offline, tests that need the GPT-2 vocabulary skip unless TIKTOKEN_CACHE_DIR points at a copy of
tiktoken's cache, and tests that need this repo's shared test data (a corpus, the official checkpoint)
skip unless it sits in ../shared or TOPO_SHARED names its folder. Every script is run in-process through
its own command() (exit code, one-line errors); one subprocess smoke test per script checks the real thing.
"""
import io
import os
import re
import sys
import json
import math
import errno
import pickle
import random
import signal
import tarfile
import inspect
import subprocess
import urllib.error
from collections import Counter
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get('TOPO_SHARED', os.path.join(ROOT, '..', 'shared'))
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(os.path.join(SHARED, 'tiktoken_cache'))
sys.path.insert(0, ROOT)

import topo_gpt
import topoformer as tf
import prepare_data
import analyze
import bench
from topo_gpt import GPT, GPTConfig, UsageError, spatial_correlation_loss
from topoformer import Topoformer, TopoformerConfig, SpatialSelfAttention

SHAKESPEARE = os.path.join(SHARED, 'data', 'shakespeare', 'complete_works.txt')
OFFICIAL = os.path.join(SHARED, 'fixtures', 'topolm_official')
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, alpha=2.5, radius=3, n_neighborhoods=3)
# the same tiny model on the command line, for runs of the script itself
TINY_CLI = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--radius=3', '--n_neighborhoods=3', '--block_size=32',
            '--batch_size=4', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2', '--dtype=float32']

# -----------------------------------------------------------------------------
# helpers: one way to run a script, one check of a clean error

def cli(main, argv, capsys, **kw):
    """A script's main(argv) run in-process as its command line runs it, through the script's own
    command(): (exit code, stdout, stderr)."""
    code = sys.modules[main.__module__].command(main, argv, **kw)
    out, err = capsys.readouterr()
    return code, out, err

def run_script(args, cwd=ROOT, timeout=300, env=None):
    """A script run as a user runs it, in a fresh Python: the CompletedProcess."""
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})

def assert_one_line_error(code, err, *words, exit_code=2):
    """A clear error: the exit code, exactly one line on stderr starting with 'error:', no traceback, the
    words in it."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == exit_code and len(lines) == 1 and lines[0].startswith('error:'), (code, err)
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])

@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even where this run's SIGINT is ignored (a job
    started in the background of a shell ignores it, and Python then keeps it ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)

def gpt2():
    """The GPT-2 tokenizer, or a skip that says what to set."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception:
        pytest.skip("needs the GPT-2 vocabulary: set TIKTOKEN_CACHE_DIR to a copy of tiktoken's cache")

def missing_shared(path):
    return f"needs this repo's shared test data ({path}): set TOPO_SHARED to its folder"

def needs_shared(path):
    if not os.path.exists(path):
        pytest.skip(missing_shared(path))
    return path

def write_dataset(folder, tokens, val_share=0.1):
    """A dataset as prepare_data.py writes it: train.bin, val.bin (uint16) and meta.json with their sizes."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    k = int(len(tokens) * (1 - val_share))
    os.makedirs(folder, exist_ok=True)
    tokens[:k].tofile(os.path.join(folder, 'train.bin'))
    tokens[k:].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({'train_tokens': k, 'val_tokens': len(tokens) - k}, f)

@pytest.fixture(autouse=True)
def one_thread():
    """The models in these tests are tiny: one thread is as fast as two, and immune to the stalls a second
    OpenMP thread suffers on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A small corpus: data/tiny/{train,val}.bin and meta.json, a repetitive 'language' over 200 tokens, so
    that a few steps can learn something. Returns the data_dir."""
    d = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=50)
    write_dataset(d / 'tiny', np.concatenate([np.roll(base, rng.integers(0, 5)) for _ in range(200)]))
    return str(d)

def gpt_run(tiny_data, out_dir, *extra):
    """The command line of a tiny TopoLM run on tiny_data into out_dir."""
    return [*TINY_CLI, f'--data_dir={tiny_data}', '--dataset=tiny', f'--out_dir={out_dir}', *extra]

# -----------------------------------------------------------------------------
# topo_gpt.py: the spatial correlation loss

def smooth_fields(n_samples, side, width, seed=0):
    """n_samples random fields on a side x side grid, Gaussian-smoothed: responses that are a
    smooth function of position. (n_samples, side, side)"""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, 1, side + 4 * width, side + 4 * width, generator=g)
    ax = torch.arange(-2 * width, 2 * width + 1, dtype=torch.float32)
    k = torch.exp(-ax ** 2 / (2 * width ** 2))
    return F.conv2d(noise, (k[:, None] * k[None, :])[None, None])[:, 0, :side, :side]

def window(side):
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing='ij')
    return torch.stack([rows.flatten(), cols.flatten()], -1).float()  # (side*side, 2)

def test_spatial_loss_smooth_vs_noise():
    pos = window(9)
    smooth = smooth_fields(500, 9, width=3).reshape(500, 81)
    noise = torch.randn(500, 81, generator=torch.Generator().manual_seed(1))
    sl_smooth = spatial_correlation_loss(smooth, pos).item()
    sl_noise = spatial_correlation_loss(noise, pos).item()
    assert sl_smooth < 0.1, sl_smooth  # correlations fall off with distance like 1/(1+d)
    assert abs(sl_noise - 0.5) < 0.05, sl_noise  # unrelated to distance
    # and what the loss is for: units placed at random lose the smoothness
    perm = torch.randperm(81, generator=torch.Generator().manual_seed(2))
    assert spatial_correlation_loss(smooth, pos[perm]).item() > 0.4

def test_spatial_loss_worked_by_hand():
    # three units on a line at distance 1: unit 1 copies unit 0, unit 2 is its negative.
    # pairs (1,0), (2,0), (2,1):  r = (1, -1, -1),  D = 1/(1+d) = (1/2, 1/3, 1/2)
    # r - mean = (4/3, -2/3, -2/3), D - mean = (1/18, -1/9, 1/18)
    # cov = 4/54 + 2/27 - 2/54 = 1/9; |r| |D| = sqrt(24/9) sqrt(1/54) = 2/9
    # corr = 1/2, SL = 0.5 * (1 - 1/2) = 0.25
    a = torch.tensor([1.0, 2.0, 4.0, -3.0, 0.5])
    x = torch.stack([a, a, -a], dim=1)  # (N=5, n=3)
    pos = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert spatial_correlation_loss(x, pos).item() == pytest.approx(0.25, abs=1e-5)
    # u, u + v, v with u, v orthogonal: r = (1/sqrt2, 0, 1/sqrt2), a rising line in D: SL = 0
    u, v = torch.tensor([1.0, -1, 1, -1]), torch.tensor([1.0, 1, -1, -1])
    assert spatial_correlation_loss(torch.stack([u, u + v, v], 1), pos).item() == pytest.approx(0, abs=1e-6)
    # and the mirror image, w orthogonal to both: r = (0, 1/sqrt2, 0) falls where D rises: SL = 1
    w = torch.tensor([1.0, -1, -1, 1])
    assert spatial_correlation_loss(torch.stack([u, w, u + v], 1), pos).item() == pytest.approx(1, abs=1e-6)

def test_spatial_loss_batch_equals_single_calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 100, 25, generator=g)
    x[1] = smooth_fields(100, 5, 2).reshape(100, 25)
    pos = torch.stack([window(5)[torch.randperm(25, generator=g)] for _ in range(4)])
    batch = spatial_correlation_loss(x, pos)
    assert batch.shape == (4,)
    singles = torch.stack([spatial_correlation_loss(x[k], pos[k]) for k in range(4)])
    torch.testing.assert_close(batch, singles)

def test_correlation_and_its_gradient_equal_plain_autograd():
    # Covariance's hand-written backward against autograd through the textbook formula, in float64,
    # for a contiguous x and for the transposed layout the model's gather passes in
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(3, 50, 7, generator=g, dtype=torch.float64),
              torch.randn(3, 7, 50, generator=g, dtype=torch.float64).transpose(1, 2)):
        x = x.requires_grad_()
        assert torch.autograd.gradcheck(topo_gpt.Covariance.apply, (x,))
        xc = x - x.mean(1, keepdim=True)
        plain = xc.transpose(1, 2) @ xc
        w = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
        torch.testing.assert_close(topo_gpt.Covariance.apply(x), plain)
        got, = torch.autograd.grad((topo_gpt.Covariance.apply(x) * w).sum(), x)
        want, = torch.autograd.grad((plain * w).sum(), x)
        torch.testing.assert_close(got, want)
        # and correlation() is numpy's corrcoef
        np.testing.assert_allclose(topo_gpt.correlation(x)[1].detach().numpy(),
                                   np.corrcoef(x[1].detach().numpy().T), atol=1e-9)

def test_replacing_the_loss_changes_training(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 200, (2, 16))
    torch.manual_seed(1)
    _, loss = model(idx, idx)
    original = model.spatial_loss.item()
    grad_ref = torch.autograd.grad(loss, model.transformer.h[0].mlp.c_fc.weight)[0]

    def absolute_loss(x, pos):  # TDANN's older form: mean |r - D|, a classroom exercise
        r = topo_gpt.correlation(x)
        D = 1 / (1 + torch.cdist(pos, pos))
        return (r - D).abs().mean(dim=(1, 2))

    monkeypatch.setattr(topo_gpt, 'spatial_correlation_loss', absolute_loss)
    torch.manual_seed(1)  # the same neighbourhoods as before
    _, loss = model(idx, idx)
    assert model.spatial_loss.item() != pytest.approx(original)
    assert loss.item() == pytest.approx(model.ce_loss.item() + 2.5 * model.spatial_loss.item(), rel=1e-5)
    grad_new = torch.autograd.grad(loss, model.transformer.h[0].mlp.c_fc.weight)[0]
    assert not torch.allclose(grad_new, grad_ref)

def test_alpha_zero_skips_spatial_loss(monkeypatch):
    def boom(x, pos):
        raise AssertionError("spatial loss computed")
    monkeypatch.setattr(topo_gpt, 'spatial_correlation_loss', boom)
    model = GPT(GPTConfig(**{**TINY, 'alpha': 0.0})).train()
    idx = torch.randint(0, 200, (2, 16))
    _, loss = model(idx, idx)
    assert loss.item() == model.ce_loss.item()
    model.config.alpha = 1.0
    with pytest.raises(AssertionError, match='spatial loss computed'):
        model(idx, idx)

# -----------------------------------------------------------------------------
# topo_gpt.py: the grid and its windows

def test_windows_are_the_interior_squares_drawn_without_replacement():
    side, radius = 12, 3  # 5 x 5 windows: (12 - 2 * 2)^2 = 64 of them, as the official code lists
    places = topo_gpt.window_places(side, radius)
    assert places.shape == (64, 25) and len({tuple(p.tolist()) for p in places}) == 64
    for p in places[[0, 9, 63]]:
        rows, cols = p // side, p % side
        assert rows.max() - rows.min() == 4 and cols.max() - cols.min() == 4  # a 5 x 5 square, row by row
        assert torch.equal(p, (rows.min() * side + cols.min()) + (torch.arange(5)[:, None] * side +
                                                                   torch.arange(5)).flatten())
    assert len(topo_gpt.window_places(8, 5)) == 0  # a window larger than the grid: none fits
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        ids = topo_gpt.sample_neighborhoods(3, 64, 5)
        assert ids.shape == (3, 5) and ids.device.type == 'cpu'
        assert all(len(set(row)) == 5 for row in ids.tolist())  # 5 distinct windows per map
        seen |= set(ids[0].tolist())
    assert seen == set(range(64))  # every window gets drawn

def test_spatial_loss_of_model_uses_the_sampled_windows():
    # the model's loss over its windows is the sum over the maps of the mean of the function applied window by
    # window, each window's units at their stored places; the one batched call equals the plain sum
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    maps = [torch.randn(2, 16, 64) for _ in range(4)]
    windows = topo_gpt.sample_neighborhoods(4, len(model.window_places), 3)
    total = model.spatial_loss_of(maps, windows)
    expect = 0
    for m in range(4):
        for k in range(3):
            cells = model.window_places[windows[m, k]]
            units = model.grid[m].view(-1)[cells]
            pos = torch.stack([cells // 8, cells % 8], dim=-1)  # (row, col)
            assert torch.equal(model.unit_pos[m][units], pos)  # the stored places are the window's places
            expect = expect + spatial_correlation_loss(maps[m].reshape(32, 64)[:, units], pos.float()) / 3
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    # pos shared by all windows, or one per window: the same losses
    x = torch.randn(5, 40, 25)
    cells = topo_gpt.window_places(12, 3)[0]
    shared = torch.stack([cells // 12, cells % 12], dim=-1).float()
    one_per_window = shared.expand(5, 25, 2)
    torch.testing.assert_close(spatial_correlation_loss(x, shared), spatial_correlation_loss(x, one_per_window))

def test_the_windows_come_with_the_batch_not_from_the_forward(tiny_data, tmp_path, capsys, monkeypatch):
    # a forward given its windows draws none (on a GPU a draw there waits for the device, and a compiled
    # graph draws other windows); the training loop draws them on the CPU with the batch and passes them in
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 200, (2, 16))
    windows = topo_gpt.sample_neighborhoods(4, len(model.window_places), 3)
    real, calls = topo_gpt.sample_neighborhoods, []
    monkeypatch.setattr(topo_gpt, 'sample_neighborhoods', lambda *a: calls.append(a) or real(*a))
    model(idx, idx, windows=windows)
    assert calls == []
    model(idx, idx)  # an API call without windows draws them itself
    assert len(calls) == 1
    seen = []
    real_forward = GPT.forward
    def forward(self, *a, **k):
        seen.append(k.get('windows'))
        return real_forward(self, *a, **k)
    monkeypatch.setattr(GPT, 'forward', forward)
    assert cli(topo_gpt.main, gpt_run(tiny_data, tmp_path, '--max_iters=2', '--eval_interval=2'), capsys)[0] == 0
    assert seen and all(w is not None and w.shape == (4, 3) and w.dtype == torch.long for w in seen)

def test_positions_are_a_permutation_of_the_lattice_and_survive_a_checkpoint(tmp_path):
    model = GPT(GPTConfig(**TINY))
    assert list(model.map_names) == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    lattice = {(r, c) for r in range(8) for c in range(8)}
    seen = []
    for name in model.map_names:
        p = model.positions(name)
        assert p.shape == (64, 2)
        assert {tuple(map(int, q)) for q in p.tolist()} == lattice
        seen.append(p)
    assert not torch.equal(seen[0], seen[1])  # each map its own placement
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    path = str(tmp_path / 'ckpt.pt')
    topo_gpt.save_checkpoint(path, topo_gpt.checkpoint_of(model, 0, {}, opt, 'cpu', 1.0, None), '')
    # a model built with another seed would place units elsewhere; the checkpoint's positions win
    loaded = GPT.from_checkpoint(path)
    for name in model.map_names:
        assert torch.equal(loaded.positions(name), model.positions(name))
    assert not torch.equal(GPT(GPTConfig(**{**TINY, 'seed': 7})).positions('h.0.attn'), seen[0])

# -----------------------------------------------------------------------------
# topo_gpt.py: the model

def test_causality():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 50257, (1, 20))
    idx2 = idx.clone()
    idx2[0, 12:] = torch.randint(0, 50257, (8,))
    with torch.no_grad():
        a, _, maps_a = model(idx, return_maps=True)
        b, _, maps_b = model(idx2, return_maps=True)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    for name in maps_a:
        torch.testing.assert_close(maps_a[name][:, :12], maps_b[name][:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])

def test_return_maps_shapes_and_sublayer_vs_residual():
    torch.manual_seed(0)
    idx = torch.randint(0, 50257, (2, 10))
    model = GPT(GPTConfig(**TINY)).eval()
    logits, loss, maps = model(idx, return_maps=True)
    assert logits.shape == (2, 10, 50304) and loss is None
    assert list(maps) == model.map_names and all(m.shape == (2, 10, 64) for m in maps.values())
    # the residual option maps the stream: the final map is what ln_f sees
    for block in model.transformer.h:
        block.residual_maps = True
    _, _, res = model(idx, return_maps=True)
    torch.testing.assert_close(model.lm_head(model.transformer.ln_f(res['h.1.mlp'])), logits)
    torch.testing.assert_close(res['h.1.mlp'] - res['h.1.attn'], maps['h.1.mlp'])

def test_training_lowers_the_loss(tiny_data):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
    data = np.memmap(os.path.join(tiny_data, 'tiny', 'train.bin'), dtype=np.uint16, mode='r')
    ces, sls = [], []
    for it in range(40):
        X, Y = topo_gpt.get_batch(data, 8, 32)
        _, loss = model(X, Y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ces.append(model.ce_loss.item())
        sls.append(model.spatial_loss.item())
    assert np.mean(ces[-5:]) < np.mean(ces[:5]) - 3
    assert np.mean(sls[-5:]) < np.mean(sls[:5]) - 0.3  # the maps became topographic

def test_save_load_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    path = str(tmp_path / 'ckpt.pt')
    topo_gpt.save_checkpoint(path, topo_gpt.checkpoint_of(model, 3, {'seed': 1}, opt, 'cpu', 1.0, 11.0), '')
    loaded = GPT.from_checkpoint(path)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.config == model.config
    torch.save({'model': model.state_dict()}, tmp_path / 'foreign.pt')
    with pytest.raises(UsageError, match='not a topolm checkpoint'):
        GPT.from_checkpoint(str(tmp_path / 'foreign.pt'))
    # a damaged file is named in our words, not in torch's cut off mid-sentence
    (tmp_path / 'cut.pt').write_bytes(open(path, 'rb').read()[:3000])
    with pytest.raises(UsageError, match=r'cannot be read: damaged, cut short or no torch file \(\w+\)$'):
        GPT.from_checkpoint(str(tmp_path / 'cut.pt'))

def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match='perfect square'):
        GPT(GPTConfig(**{**TINY, 'n_embd': 60}))
    with pytest.raises(ValueError, match='do not fit'):
        GPT(GPTConfig(**{**TINY, 'radius': 6}))
    # the control too: its evaluations measure the spatial loss (no crash mid-run)
    with pytest.raises(ValueError, match='do not fit'):
        GPT(GPTConfig(alpha=0, n_embd=64, n_head=4))
    with pytest.raises(ValueError, match='16 windows'):
        GPT(GPTConfig(**{**TINY, 'n_neighborhoods': 17}))

def test_official_checkpoint_reproduces_the_official_model():
    # a checkpoint and position pickles written by the official TopoLM code (../shared/fixtures): our GPT
    # gives its logits and maps, and its unit places exactly
    folder = needs_shared(OFFICIAL)
    model = GPT.from_official(os.path.join(folder, 'ckpt.pt'))
    ref = torch.load(os.path.join(folder, 'reference.pt'), weights_only=True)
    with torch.no_grad():
        logits, _, maps = model(ref['idx'], return_maps=True)
    assert (logits[..., :2048] - ref['logits_head']).abs().max() < 1e-5
    assert (logits.logsumexp(-1) - ref['logsumexp']).abs().max() < 1e-5
    for name, m in ref['maps'].items():  # official 'layer.0.attn' is our 'h.0.attn'
        ours = 'h.' + name.split('.', 1)[1]
        assert (maps[ours] - m).abs().max() < 1e-5
        assert torch.equal(model.positions(ours), ref['coordinates'][name].float())
    assert not model.config.residual_maps and model.config.radius == 3  # with_resid False; 5 x 5 windows
    with pytest.raises(ValueError, match='no unit positions'):
        GPT.from_official(os.path.join(folder, 'ckpt.pt'), positions_dir=folder)

# -----------------------------------------------------------------------------
# topo_gpt.py: training, checkpoints, resume

def test_official_positions_of_another_size_are_one_clear_error(tmp_path):
    import types
    folder = needs_shared(OFFICIAL)
    for name in ('layer.0.attn', 'layer.0.mlp', 'layer.1.attn', 'layer.1.mlp'):  # the places of 28 x 28 maps
        with open(tmp_path / f'{name}.pkl', 'wb') as f:
            pickle.dump(types.SimpleNamespace(coordinates=np.zeros((784, 2))), f)
    with pytest.raises(ValueError, match=r'positions of another model size'):
        GPT.from_official(os.path.join(folder, 'ckpt.pt'), str(tmp_path))

def shared_cell_positions(folder):
    """The fixture's position pickles, but unit 1 of every map on unit 0's cell and its own cell empty, as some
    units are in the published places (gpt2-positions-5-5): -> {official map name: coordinates}"""
    import types
    coords = {}
    for name in ('layer.0.attn', 'layer.0.mlp', 'layer.1.attn', 'layer.1.mlp'):
        layer = topo_gpt.read_pickled(os.path.join(OFFICIAL, 'gpt2-positions-3-5', f'{name}.pkl')).__dict__
        c = coords[name] = torch.as_tensor(layer['coordinates']).clone()
        c[1] = c[0]
        with open(os.path.join(folder, f'{name}.pkl'), 'wb') as f:
            pickle.dump(types.SimpleNamespace(**{**layer, 'coordinates': c}), f)
    return coords

def test_official_positions_with_shared_cells_load(tmp_path):
    # the model loads with the published places as they are, some units sharing a cell
    folder = needs_shared(OFFICIAL)
    coords = shared_cell_positions(tmp_path)
    model = GPT.from_official(os.path.join(folder, 'ckpt.pt'), str(tmp_path))
    for name, c in coords.items():
        assert torch.equal(model.positions('h.' + name.split('.', 1)[1]), c.float())

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_resume_is_bit_exact(tiny_data, tmp_path, capsys, dtype):
    args = lambda out, n: gpt_run(tiny_data, out, '--eval_interval=3', '--dropout=0.1', '--lr_decay_iters=8',
                                  f'--max_iters={n}', f'--dtype={dtype}')
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert cli(topo_gpt.main, args(a, 8), capsys)[0] == 0
    assert cli(topo_gpt.main, args(b, 4), capsys)[0] == 0
    code, out, err = cli(topo_gpt.main, ['--resume', '--max_iters=8', f'--out_dir={b}'], capsys)
    assert code == 0, err
    assert f'device cpu, {dtype}' in out
    ca = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=False)
    cb = torch.load(os.path.join(b, 'ckpt.pt'), weights_only=False)
    assert ca['iter_num'] == cb['iter_num'] == 8
    for k, v in ca['model'].items():
        assert torch.equal(v, cb['model'][k]), k
    assert ca['best_val_loss'] == cb['best_val_loss']

def test_resume_keeps_the_fp16_scalers_state(tiny_data, tmp_path, capsys, monkeypatch):
    # fp16's gradient scaler (here on the CPU, in float32 compute) grows its scale every 2 steps: a resumed run
    # goes on from the scale the run had reached, as the uninterrupted run does
    monkeypatch.setattr(topo_gpt, 'precision', lambda name, dev: (
        'float32', nullcontext(), torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, growth_interval=2)))
    args = lambda out, n: gpt_run(tiny_data, out, '--eval_interval=3', f'--max_iters={n}')
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert cli(topo_gpt.main, args(a, 6), capsys)[0] == 0
    assert cli(topo_gpt.main, args(b, 3), capsys)[0] == 0
    assert cli(topo_gpt.main, ['--resume', '--max_iters=6', f'--out_dir={b}'], capsys)[0] == 0
    ca, cb = (torch.load(os.path.join(d, 'ckpt.pt'), weights_only=False) for d in (a, b))
    assert ca['scaler']['scale'] == cb['scaler']['scale'] == 2.0 ** 11 and ca['scaler'] == cb['scaler']

def test_resume_keeps_the_checkpoints_model(tiny_data, tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=2', '--eval_interval=2'), capsys)[0] == 0
    code, stdout, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=4', '--block_size=8',
                                            '--n_layer=5', '--eval_interval=2'], capsys)
    assert code == 0, err  # the model's keys are ignored, and really so: no crash on the block size
    assert f'resuming from step 2 of {out}/ckpt.pt; ignoring --block_size, --n_layer' in stdout and 'step 4:' in stdout
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['config']['block_size'] == 32
    code, stdout, _ = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=4'], capsys)
    assert code == 0 and 'nothing to train: the run is at iter 4' in stdout

def test_resume_says_what_a_new_schedule_does(tiny_data, tmp_path, capsys):
    # a resumed run with another max_iters follows the new cosine schedule: it says so, with the lr it takes
    out = str(tmp_path / 'out')
    args = gpt_run(tiny_data, out, '--max_iters=20', '--eval_interval=10', '--warmup_iters=2')
    assert cli(topo_gpt.main, args[:] + ['--max_iters=10'], capsys)[0] == 0
    code, stdout, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=12'], capsys)
    assert code == 0, err
    cfg = {**topo_gpt.DEFAULTS, **torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['config']}
    new, old = topo_gpt.get_lr(10, {**cfg, 'max_iters': 12}), topo_gpt.get_lr(10, {**cfg, 'max_iters': 10})
    assert new != old
    assert (f"note: --max_iters=12 (the run had 10): the learning rate follows the new schedule, {new:.2e} at step "
            f"10 instead of {old:.2e}") in stdout
    # keys that leave the schedule as it was (the decay ends at step 12; after it, min_lr): no note
    code, stdout, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=14', '--lr_decay_iters=12'],
                            capsys)
    assert code == 0 and 'resuming from step 12' in stdout and 'note:' not in stdout, err

def test_divergence_never_replaces_a_good_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'out')
    assert cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=2', '--eval_interval=2'), capsys)[0] == 0
    path = os.path.join(out, 'ckpt.pt')
    good = open(path, 'rb').read()
    # an evaluation with exploded but finite losses: far above where the run started, so no save
    real, calls = topo_gpt.estimate_loss, []
    def explode_second(*a):  # the resumed run's first evaluation (iter 2) is fine, the next (iter 4) is not
        calls.append(1)
        return real(*a) if len(calls) == 1 else {**real(*a), 'val': (9.6e7, 0.2)}
    monkeypatch.setattr(topo_gpt, 'estimate_loss', explode_second)
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=6', '--eval_interval=2'],
                       capsys)
    assert_one_line_error(code, err, 'diverged at iter 4', 'it started at', f'{path} holds step 2, intact')
    assert open(path, 'rb').read() == good and not os.path.exists(path + '.tmp')
    monkeypatch.setattr(topo_gpt, 'estimate_loss', real)
    # a loss that turns NaN during a step stops at the next log line, naming the same intact checkpoint
    monkeypatch.setattr(topo_gpt, 'spatial_correlation_loss', lambda x, pos: x.sum(dim=(1, 2)) * float('nan'))
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=4'], capsys)
    assert_one_line_error(code, err, 'diverged', 'holds step 2, intact')
    assert open(path, 'rb').read() == good
    # a fresh run (not --resume) in the same out_dir says whose the checkpoint there is, and when it
    # diverges before its own first save it does not call the earlier run's file its last good checkpoint
    code, out_text, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=4'), capsys)
    assert f"note: {path} is an earlier run's" in out_text
    assert_one_line_error(code, err, 'diverged', "no checkpoint was saved", "is an earlier run's, intact")
    assert open(path, 'rb').read() == good

def test_fp16s_scaler_skips_a_non_finite_step_and_updates_every_step():
    # the gradient scaler of fp16, here on the CPU: a step whose loss is not finite is skipped, update() runs
    # anyway (a second unscale_ before an update would raise), and the next steps go on as usual
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    idx = torch.randint(0, 200, (2, 16))
    batch = lambda: (idx, idx, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = topo_gpt.spatial_correlation_loss
    topo_gpt.spatial_correlation_loss = lambda x, pos: real(x, pos) * float('inf')
    try:
        loss, _ = topo_gpt.train_step(model, opt, scaler, nullcontext(), batch, 1, 1.0)
    finally:
        topo_gpt.spatial_correlation_loss = real
    assert not torch.isfinite(loss) and scaler.get_scale() == 2.0 ** 7  # skipped, and the scale backed off
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for _ in range(2):
        loss, norm = topo_gpt.train_step(model, opt, scaler, nullcontext(), batch, 1, 1.0)
        assert torch.isfinite(loss) and torch.isfinite(norm)
    assert not torch.equal(model.state_dict()['lm_head.weight'], before['lm_head.weight'])

def test_train_step_waits_for_nothing():
    # the step reads no scalar off the device: the loss and the norm come back as tensors, read at log lines only
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 200, (2, 16))
    loss, norm = topo_gpt.train_step(model, opt, torch.amp.GradScaler('cpu', enabled=False), nullcontext(),
                                     lambda: (idx, idx, {}), 2, 1.0)
    assert isinstance(loss, torch.Tensor) and isinstance(norm, torch.Tensor) and not loss.requires_grad

def test_ctrl_c_during_a_save_finishes_the_save_then_stops(tiny_data, tmp_path, capsys, monkeypatch, ctrl_c):
    real_save = torch.save
    def save_with_ctrl_c(obj, f, *a, **k):  # Ctrl-C arrives in the middle of writing the checkpoint
        f.write(b'PK partial ')
        os.kill(os.getpid(), signal.SIGINT)
        f.seek(0)
        real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save_with_ctrl_c)
    out = str(tmp_path / 'out')
    code, stdout, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=4', '--eval_interval=2'), capsys)
    assert_one_line_error(code, err, 'interrupted', f'{out}/ckpt.pt holds step 2, intact', exit_code=130)
    assert 'step 2:' in stdout and 'step 4' not in stdout  # stopped right after the first save
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)  # whole, and the new one
    assert ckpt['iter_num'] == 2 and os.listdir(out) == ['ckpt.pt']

def test_ctrl_c_before_the_first_save_says_none_was_saved(tiny_data, tmp_path, capsys, monkeypatch):
    # interrupted before its first save: no checkpoint of its own, no empty out_dir left behind, and an earlier
    # run's file there is called what it is
    real = topo_gpt.train_step
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(topo_gpt, 'train_step', interrupted)
    out = tmp_path / 'out'
    code, _, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=4'), capsys)
    assert_one_line_error(code, err, 'error: interrupted; no checkpoint was saved', exit_code=130)
    assert not out.exists()
    monkeypatch.setattr(topo_gpt, 'train_step', real)
    assert cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=2', '--eval_interval=2'), capsys)[0] == 0
    monkeypatch.setattr(topo_gpt, 'train_step', interrupted)
    code, _, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=4'), capsys)
    assert_one_line_error(code, err, f"no checkpoint was saved ({out}/ckpt.pt is an earlier run's, intact)",
                          exit_code=130)

def test_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'out')
    assert cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=2', '--eval_interval=2'), capsys)[0] == 0
    good = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    def disk_full(obj, f, *a, **k):
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=4', '--eval_interval=2'],
                       capsys)
    assert_one_line_error(code, err, 'could not write', 'No space left', f'{out}/ckpt.pt holds step 2, intact')
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == good and os.listdir(out) == ['ckpt.pt']

def test_bad_data_is_one_line(tiny_data, tmp_path, capsys):
    def expect(folder, *words):
        code, _, err = cli(topo_gpt.main, gpt_run(str(tmp_path), tmp_path / 'out', f'--dataset={folder}'), capsys)
        assert_one_line_error(code, err, *words)
    expect('nothing', 'no ', 'prepare_data.py')
    write_dataset(tmp_path / 'nometa', np.arange(1000))
    os.remove(tmp_path / 'nometa' / 'meta.json')  # an interrupted prepare_data.py, before it wrote meta.json
    expect('nometa', 'no complete meta.json', 'prepare_data.py')
    write_dataset(tmp_path / 'mixed', np.arange(1000))
    np.arange(50, dtype=np.uint16).tofile(tmp_path / 'mixed' / 'val.bin')  # another dataset's val.bin
    expect('mixed', 'mixed or damaged', 'prepare_data.py')
    write_dataset(tmp_path / 'odd', np.arange(1000))
    with open(tmp_path / 'odd' / 'train.bin', 'ab') as f:
        f.write(b'\x00')  # half a token
    expect('odd', 'mixed or damaged')
    write_dataset(tmp_path / 'short', np.arange(40))
    expect('short', 'too few for block_size=32')

# every config key that has a range, checked before any work: one line, exit 2
BAD_CONFIG = [('--learning_rate=inf', 'learning_rate=inf: must be finite'), ('--min_lr=0.5', 'above --learning_rate'),
              ('--batch_size=0', 'batch_size=0'), ('--eval_interval=0', 'eval_interval'),
              ('--log_interval=0', 'log_interval'), ('--eval_iters=-1', 'eval_iters'),
              ('--learning_rate=-1', 'learning_rate'), ('--learning_rate=nan', 'learning_rate=nan'),
              ('--beta1=1.5', 'beta1'), ('--n_head=0', 'n_head'), ('--n_layer=0', 'n_layer'),
              ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps'), ('--max_iters=0', 'max_iters'),
              ('--grad_clip=-1', 'grad_clip'), ('--block_size=0', 'block_size'), ('--dropout=1', 'dropout'),
              ('--device=nonsense', 'not a device'), ('--dtype=float16', 'needs a GPU'),
              ('--dtype=int8', "--dtype: invalid choice: 'int8'"),
              ('--preset=huge', "--preset: invalid choice: 'huge'"),
              ('--n_layr=3', 'unrecognized arguments: --n_layr=3'), ('--batch_size=big', "invalid int value: 'big'"),
              ('--batch_size=1.5', 'invalid int value'), ('--compile=maybe', "invalid boolean value: 'maybe'"),
              ('--seed', '--seed: expected one argument'), ('--snapshot_iters=0,x', 'snapshot_iters'),
              ('--snapshot_iters=99999', 'from 0 to max_iters'),
              ('--n_embd=250', 'perfect square'), ('--n_embd=64', 'not divisible'), ('--radius=9', 'do not fit')]

@pytest.mark.parametrize('arg, words', BAD_CONFIG + [
    ('--alpha=-1', 'alpha'), ('--alpha=nan', 'alpha'), ('--alpha=inf', 'alpha=inf: must be finite'),
    ('--radius=1', 'radius=1: must be finite and x >= 2'),  # a 1 x 1 window has no pairs
    ('--n_neighborhoods=0', 'n_neighborhoods'),
    ('--device=cuda', 'not a device' if not torch.cuda.is_available() else 'n/a')])
def test_topolm_bad_config_is_one_line(arg, words, tiny_data, tmp_path, capsys):
    if arg == '--device=cuda' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    args = [f'--data_dir={tiny_data}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=1']
    if arg == '--n_embd=64':
        args.append('--n_head=3')
    code, _, err = cli(topo_gpt.main, args + [arg], capsys)
    assert_one_line_error(code, err, words)
    assert os.listdir(tmp_path) == []  # nothing was written

def test_out_dir_that_cannot_be_written_is_one_line(tiny_data, tmp_path, capsys):
    (tmp_path / 'afile').write_text('not a folder')
    code, _, err = cli(topo_gpt.main, gpt_run(tiny_data, tmp_path / 'afile', '--max_iters=1'), capsys)
    assert_one_line_error(code, err, '--out_dir=', 'not a folder this run can write')

def test_checkpoint_without_config_is_one_line(tmp_path, capsys):
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0, 1e-3, (0.9, 0.95), 'cpu')
    ckpt = topo_gpt.checkpoint_of(model, 1, {}, opt, 'cpu', 1.0, 1.0)
    del ckpt['config']
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={tmp_path}'], capsys)
    assert_one_line_error(code, err, 'incomplete', 'config')
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={tmp_path / "none"}'], capsys)
    assert_one_line_error(code, err, 'no checkpoint')
    # a snapshot holds no optimizer: it loads for analysis, not for --resume
    torch.save(topo_gpt.checkpoint_of(model, 1, {}), tmp_path / 'ckpt.pt')
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={tmp_path}'], capsys)
    assert_one_line_error(code, err, 'incomplete for --resume (a snapshot?)')
    assert GPT.from_checkpoint(str(tmp_path / 'ckpt.pt')).config == model.config

def test_checkpoints_keep_the_rng_state_of_their_own_device_only(monkeypatch):
    # the RNG state of this process's GPU alone, restored on this process's GPU (a resume on fewer GPUs works);
    # off CUDA none is kept, and a GPU state is not applied on a CPU
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    ckpt = topo_gpt.checkpoint_of(model, 1, {}, opt, 'cpu', 1.0, 1.0)
    assert set(ckpt['rng']) == {'torch', 'cuda'} and ckpt['rng']['cuda'] is None
    asked = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state',
                        lambda device: asked.append(device) or torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: asked.append(('set', device)))
    ckpt = topo_gpt.checkpoint_of(model, 1, {}, opt, 'cuda:3', 1.0, 1.0)
    assert asked == ['cuda:3'] and ckpt['rng']['cuda'].shape == (16,)
    state = torch.get_rng_state()
    topo_gpt.set_rng_state(ckpt['rng'], 'cuda:0')
    assert asked[-1] == ('set', 'cuda:0') and torch.equal(torch.get_rng_state(), ckpt['rng']['torch'])
    topo_gpt.set_rng_state(ckpt['rng'], 'cpu')
    assert asked[-1] == ('set', 'cuda:0')  # not applied off CUDA
    torch.set_rng_state(state)

def test_share_step_keeps_the_tokens_per_step():
    assert topo_gpt.share_step(4, 8, 2) == (2, 8)  # fewer micro-batches per process
    assert topo_gpt.share_step(1, 8, 2) == (1, 4)  # or smaller ones
    assert topo_gpt.share_step(3, 6, 1) == (3, 6)
    with pytest.raises(UsageError, match='cannot be shared evenly by 2'):
        topo_gpt.share_step(3, 5, 2)

def test_precision_picks_the_dtype_its_autocast_and_scaler(monkeypatch):
    native = any(getattr(torch.cpu, f, lambda: False)()
                 for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))
    dtype, ctx, scaler = topo_gpt.precision('auto', 'cpu')
    assert dtype == ('bfloat16' if native else 'float32') and not scaler.is_enabled()
    assert topo_gpt.precision('auto', 'mps')[0] == 'float32'
    assert topo_gpt.precision('bfloat16', 'cpu')[0] == 'bfloat16'  # forced: emulated where not native
    with pytest.raises(UsageError, match='needs a GPU'):
        topo_gpt.precision('float16', 'cpu')
    # a GPU whose bf16 is only emulated (a V100, a T4) gets float16 and the gradient scaler, not slow bf16
    asked = []
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)
    monkeypatch.setattr(torch.amp, 'GradScaler',
                        lambda device, enabled: SimpleNamespace(device=device, enabled=enabled))
    dtype, ctx, scaler = topo_gpt.precision('auto', 'cuda:0')
    assert asked == [False] and dtype == 'float16' and scaler.enabled and scaler.device == 'cuda'
    assert not torch.backends.cuda.matmul.allow_tf32  # TF32 off: the spatial loss's float32 products stay float32
    with pytest.raises(UsageError, match='no native bf16'):
        topo_gpt.precision('bfloat16', 'cuda:0')
    assert topo_gpt.precision('float32', 'cuda:0')[0] == 'float32' and torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False

def test_devices_under_torchrun_are_one_clear_line(monkeypatch):
    # cuda:N under torchrun would put every process on one GPU; a process beyond the machine's GPUs has none
    for k, v in (('RANK', '1'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '1'), ('LOCAL_WORLD_SIZE', '2')):
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match=r'--device=cuda:0 puts all 2 processes on one GPU; under torchrun use '
                                         r'--device=cuda'):
        topo_gpt.start_processes('cuda:0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(UsageError, match=r'--device=cuda: not a device \(this machine has cpu, 1 GPUs.*\); start '
                                         r'at most --nproc_per_node=1'):
        topo_gpt.start_processes('cuda')

def test_bench_prints_dtype_ratio_and_gflops(capsys):
    code = topo_gpt.command(bench.bench_topo_gpt, TINY_CLI)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'batch 4 x 32 x 1 accum, float32' in out and 'GFLOP/s' in out and 'spatial loss off' in out
    ratio = float(out.split('ratio of the two: ')[1].split()[0])
    assert 0.3 < ratio < 3
    # the loss alone: TINY_CLI's 2 layers x 2 maps, 3 windows of 5 x 5 units, 4 x 32 tokens
    alone = out.split('the spatial loss alone, forward and backward (')[1]
    assert alone.startswith('4 maps x 3 windows of 25 units, 128 tokens): ')
    ms, share = alone.split('): ')[1].split(' ms, ')
    assert float(ms) > 0 and 0 < float(share.split('%')[0]) < 100
    p = run_script(['bench.py', 'gpt'])
    assert_one_line_error(p.returncode, p.stderr, 'usage: python bench.py topo_gpt|topoformer')
    p = run_script(['bench.py', 'topoformer', '--batch_size=0'])
    assert_one_line_error(p.returncode, p.stderr, '--batch_size=0: must be finite and x >= 1')

def test_mfu_is_against_the_gpus_own_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda dev: 'NVIDIA H200')
    assert bench.peak_flops('cuda:0') == (989e12, "the H200's 989 TFLOP/s")
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda dev: 'NVIDIA A100-SXM4-80GB')
    assert bench.peak_flops('cuda:0')[0] == 312e12
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda dev: 'Some New GPU')
    assert 'is not in' in bench.peak_flops('cuda:0')[1] and bench.peak_flops('cpu') is None

def test_compile_runs_steps(tiny_data, tmp_path, capsys):
    code, out, err = cli(topo_gpt.main, gpt_run(tiny_data, tmp_path, '--compile', '--max_iters=2',
                                                 '--eval_interval=2'), capsys)
    assert code == 0, err[-3000:]
    assert 'iter 2: loss' in out and os.path.exists(tmp_path / 'ckpt.pt')

@pytest.mark.parametrize('module', ['topo_gpt', 'topoformer'])
def test_ddp_all_reduces_once_a_step_compiled_too(module, tmp_path):
    # accumulating micro-batches under DDP: one all-reduce of the gradients a step, after the last micro-batch;
    # compiled (the DDP inside the compiled module) as well as eager. One process, a comm hook that counts
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = tf if module == 'topoformer' else topo_gpt
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            if m is tf:
                model = tf.Topoformer(tf.TopoformerConfig(n_layer=1, n_embd=16, ffn_size=32, block_size=8))
                x, y = tf.mask_tokens(torch.randint(0, 100, (2, 8)))
                kw = dict(picked=(y.view(-1) != tf.IGNORE_INDEX).nonzero().squeeze(1))
            else:
                model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=64, radius=2,
                                      n_neighborhoods=1))
                x = y = torch.randint(0, 64, (2, 8))
                kw = dict(windows=topo_gpt.sample_neighborhoods(2, len(model.window_places), 1))
            ddp, calls = DDP(model, broadcast_buffers=False), []
            def count(state, bucket):
                calls.append(1)
                done = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done
            ddp.register_comm_hook(None, count)
            step = torch.compile(ddp, backend='eager') if compiled else ddp
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
            m.train_step(step, opt, torch.amp.GradScaler('cpu', enabled=False), nullcontext(),
                         lambda: (x, y, kw), 4, 1.0)
            assert len(calls) == 1, (compiled, len(calls))
    finally:
        dist.destroy_process_group()

def test_torchrun_shares_the_step_and_resumes(tiny_data, tmp_path, capsys):
    # the defaults (one micro-batch of 4) on 2 processes: each runs 1 x 2 sequences, 128 tokens a step
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'topo_gpt.py']
    p = run_script(torchrun + gpt_run(tiny_data, tmp_path, '--max_iters=2', '--eval_interval=2'))
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es) of 1 x 2 sequences, 128 tokens per iteration' in p.stdout
    assert 'broadcast_buffers' not in p.stderr  # (torch's deprecation notice of it, silenced: nothing to fix)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=False)['config']['gradient_accumulation_steps'] == 1
    # resumed on the same 2 processes, with 4 micro-batches: 2 each; and then on one process: the same step
    p = run_script(torchrun + ['--resume', f'--out_dir={tmp_path}', '--max_iters=4', '--eval_interval=2',
                               '--gradient_accumulation_steps=4'])
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es) of 2 x 4 sequences, 512 tokens per iteration' in p.stdout and 'step 4' in p.stdout
    code, out, err = cli(topo_gpt.main, ['--resume', f'--out_dir={tmp_path}', '--max_iters=6'], capsys)
    assert code == 0, err
    assert '1 process(es) of 4 x 4 sequences, 512 tokens per iteration' in out
    # a usage error under torchrun is printed once, not once per process
    p = run_script(torchrun + ['--batch_size=0'])
    assert p.returncode != 0 and p.stderr.count('error: --batch_size=0') == 1, p.stderr[-2000:]
    (tmp_path / 'afile').write_text('not a folder')  # checked in every process: no peer left hanging
    p = run_script(torchrun + gpt_run(tiny_data, tmp_path / 'afile', '--max_iters=2'))
    assert p.returncode != 0 and p.stderr.count('error: --out_dir=') == 1 and '[rank1]' not in p.stderr, p.stderr

def test_a_process_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys):
    # under torchrun, when the first process stops on an error only it meets (a failed save, a diverged
    # evaluation), the collective calls of the others fail: each says so in one line, not a traceback
    def peer_gone(argv):
        raise RuntimeError('[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:55989.\nmore')
    monkeypatch.setenv('RANK', '1')
    code = topo_gpt.command(peer_gone, [])
    assert_one_line_error(code, capsys.readouterr().err, 'process 1 stopped', 'closed by peer', exit_code=1)
    monkeypatch.setenv('RANK', '0')  # the first process keeps the traceback of an error it did not expect
    with pytest.raises(RuntimeError):
        topo_gpt.command(peer_gone, [])

def test_under_torchrun_the_others_wait_for_the_first_to_name_a_bad_input(monkeypatch, capsys):
    # torchrun stops every process once one exits: a process other than the first that met the bad input
    # first must not exit before the first has printed it (else nobody says why). Here nobody stops it.
    def bad(argv):
        raise topo_gpt.UsageError('--batch_size=0: must be >= 1')
    waits = []
    monkeypatch.setattr(topo_gpt.time, 'sleep', waits.append)
    monkeypatch.setenv('RANK', '1')
    code = topo_gpt.command(bad, [])
    assert waits == [30]
    assert_one_line_error(code, capsys.readouterr().err, 'error: process 1: --batch_size=0')
    monkeypatch.setenv('RANK', '0')  # the first process says it at once
    code = topo_gpt.command(bad, [])
    assert waits == [30]
    assert_one_line_error(code, capsys.readouterr().err, 'error: --batch_size=0')

def test_topolm_command_line(tiny_data, tmp_path):
    # the script itself, once: a run, --help with what every key does, and a bad key as one line
    p = run_script(['topo_gpt.py', *gpt_run(tiny_data, tmp_path, '--max_iters=1')])
    assert p.returncode == 0 and 'saved' in p.stdout, p.stderr
    assert_help_names_every_key(topo_gpt)
    p = run_script(['topo_gpt.py', '--learning_rate=-1'])
    assert_one_line_error(p.returncode, p.stderr, '--learning_rate=-1.0: must be finite and x > 0')

def assert_help_names_every_key(module):
    """--help lists every config key with its comment (argparse wraps the text: compared word for word)."""
    p = run_script([os.path.basename(module.__file__), '--help'])
    assert p.returncode == 0, p.stderr
    words = re.sub(r'-\s+', '-', ' '.join(p.stdout.split()))  # (argparse wraps lines after a hyphen too)
    notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", open(module.__file__).read().split('\nDEFAULTS')[0], re.M))
    assert set(notes) == set(module.DEFAULTS)
    for key, note in notes.items():
        assert f'--{key} ' in words and re.sub(r'-\s+', '-', ' '.join(note.split())) in words, key
    return words

def test_topolm_paper_preset_is_the_official_config():
    # models/config/train_gpt2.yaml of the official code: 12 x 16 heads x 784, 1024 tokens, no biases,
    # 48 x 1024 x 20 = 983,040 tokens a step, AdamW 6e-4 (0.9, 0.95), wd 0.1, clip 1, warmup 2000, min 6e-5
    cfg, _ = topo_gpt.parse_config(['--preset=paper'], topo_gpt.DEFAULTS, topo_gpt.PRESETS, '', topo_gpt.__file__)
    official = dict(n_layer=12, n_head=16, n_embd=784, block_size=1024, bias=False, dropout=0.0, batch_size=48,
                    gradient_accumulation_steps=20, learning_rate=6e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                    grad_clip=1.0, warmup_iters=2000, min_lr=6e-5, alpha=2.5, radius=5, n_neighborhoods=5,
                    residual_maps=False)
    assert {k: cfg[k] for k in official} == official
    assert cfg['batch_size'] * cfg['block_size'] * cfg['gradient_accumulation_steps'] == 983_040
    # explicit keys win over the preset; a preset's keys count as given
    cfg, given = topo_gpt.parse_config(['--n_layer=2', '--preset=classroom'], topo_gpt.DEFAULTS, topo_gpt.PRESETS, '',
                                       topo_gpt.__file__)
    assert cfg['n_layer'] == 2 and cfg['max_iters'] == 400 and given['block_size'] == 64

# -----------------------------------------------------------------------------
# topoformer.py

def tf_tiny_config(**kw):
    args = dict(n_layer=2, n_head=1, n_embd=64, ffn_size=128, block_size=32, dropout=0.0, sq=0.3, sr=0.3)
    return TopoformerConfig(**{**args, **kw})

@pytest.fixture(scope='session')
def mlm_data(tmp_path_factory):
    """A token file MLM can learn from: sentences drawn from a small vocabulary, EOT between them."""
    rng = np.random.default_rng(0)
    words = rng.choice(50000, size=40, replace=False)
    toks = []
    while len(toks) < 20000:
        toks += list(rng.choice(words, size=rng.integers(5, 15))) + [tf.EOT_ID]
    d = tmp_path_factory.mktemp('mlm')
    write_dataset(d / 'tiny', toks[:20000])
    return str(d)

TF_TINY_CLI = ['--n_layer=2', '--n_embd=64', '--ffn_size=128', '--block_size=32', '--batch_size=4', '--eval_iters=2',
               '--warmup_iters=2', '--log_interval=100', '--dtype=float32']

def write_imdb(root, n_train=120, n_test=50, seed=0):
    """The aclImdb layout, with reviews that are plainly positive or negative."""
    rnd = random.Random(seed)
    pos = "great wonderful excellent superb loved brilliant amazing delightful".split()
    neg = "awful terrible boring hated dreadful horrible worst dull".split()
    neutral = "the movie film was a and it this of plot actor scene story".split()
    for split, n in (('train', n_train), ('test', n_test)):
        for label, words in (('pos', pos), ('neg', neg)):
            d = os.path.join(root, split, label)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                w = [rnd.choice(neutral) for _ in range(rnd.randint(10, 30))]
                for _ in range(3):
                    w.insert(rnd.randrange(len(w)), rnd.choice(words))
                with open(os.path.join(d, f'{i}_{rnd.randint(1, 10)}.txt'), 'w') as f:
                    f.write(' '.join(w) + '<br /><br />')
    return str(root)

def test_disc_masks_are_symmetric_and_cover_their_fraction():
    for side, tol in ((16, 0.035), (20, 0.01), (28, 0.015), (40, 0.005)):  # lattice rounding, shrinking
        for frac in (0.1, 0.3):
            M = tf.disc_mask(side, frac, wrap=True)
            assert torch.equal(M, M.t())
            assert torch.all(M.diagonal() == 1)
            # on the torus every disc is the same: each covers ~frac of the grid, up to lattice rounding
            cover = M.sum(1) / side**2
            assert torch.all(cover == cover[0])
            assert abs(cover[0].item() - frac) < tol, (side, frac, cover[0].item())
            flat = tf.disc_mask(side, frac, wrap=False)
            assert torch.equal(flat, flat.t())
            # on the flat grid the discs of edge units are cut: less coverage, never more
            assert flat.sum(1).max() <= M.sum(1)[0] and flat.sum(1).min() < M.sum(1)[0]

def test_torus_and_flat_distances_on_a_4x4_grid_by_hand():
    # units at (row, col) / 4; unit 3 = (0, 3), unit 12 = (3, 0), unit 15 = (3, 3), unit 5 = (1, 1)
    d_torus, d_flat = tf.grid_distances(4, wrap=True), tf.grid_distances(4, wrap=False)
    assert d_torus[0, 3].item() == pytest.approx(0.25)  # one step the other way round
    assert d_flat[0, 3].item() == pytest.approx(0.75)
    assert d_torus[0, 15].item() == pytest.approx(math.sqrt(2) / 4)
    assert d_flat[0, 15].item() == pytest.approx(3 * math.sqrt(2) / 4)
    assert d_torus[0, 5].item() == d_flat[0, 5].item() == pytest.approx(math.sqrt(2) / 4)
    assert d_torus.max().item() == pytest.approx(math.sqrt(0.5))
    # a disc of radius 0.26 (frac = pi 0.26^2) holds a unit and its 4 nearest neighbours only
    frac = math.pi * 0.26**2
    torus, flat = tf.disc_mask(4, frac, wrap=True), tf.disc_mask(4, frac, wrap=False)
    assert sorted(torch.nonzero(torus[0]).flatten().tolist()) == [0, 1, 3, 4, 12]
    assert sorted(torch.nonzero(flat[0]).flatten().tolist()) == [0, 1, 4]
    assert sorted(torch.nonzero(flat[5]).flatten().tolist()) == [1, 4, 5, 6, 9]

def test_topoformer_positions_are_the_integer_lattice():
    model = Topoformer(tf_tiny_config())
    assert model.map_names[:4] == ['h.0.q', 'h.0.k', 'h.0.v', 'h.0.out']
    pos = model.positions('h.1.out')
    assert pos.shape == (64, 2) and pos.dtype == torch.float32
    assert sorted(map(tuple, pos.long().tolist())) == [(r, c) for r in range(8) for c in range(8)]
    with pytest.raises(ValueError):
        model.positions('h.2.q')

def official_attention(attn, x):
    """The official BERT's attention component, written out in float64 from its code (cramming_local
    components.py AttentionComponent, topoformer AttentionHead, LocallyConnected):
    dense(|W_o * M_sr| y + b_sr),  y = softmax((x W_q^T M)(x W_k^T)^T / sqrt(D)) (x W_v^T)."""
    D = x.size(-1)
    W_q, (W_k, W_v) = attn.c_q.weight, attn.c_kv.weight.split(D)
    q = x @ W_q.t()
    if attn.sq_matrix is not None:
        q = q @ attn.sq_matrix
    y = torch.softmax(q @ (x @ W_k.t()).transpose(-1, -2) / math.sqrt(D), dim=-1) @ (x @ W_v.t())
    W_o = attn.c_proj.weight if attn.sr_mask is None else (attn.c_proj.weight * attn.sr_mask).abs()
    out = y @ W_o.t() + attn.c_proj.bias
    return out @ attn.c_dense.weight.t() if attn.c_dense is not None else out

@pytest.mark.parametrize('wrap', [True, False])
def test_attention_equals_the_official_formula(wrap, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(torch, 'get_default_dtype', lambda: torch.float64)  # the SQ/SR masks in float64 too
    attn = SpatialSelfAttention(tf_tiny_config(n_embd=100, sq=0.2, sr=0.3, wrap=wrap)).double()
    with torch.no_grad():
        attn.c_proj.bias.normal_()  # zero at init: make the bias count
    x = torch.randn(3, 9, 100, dtype=torch.float64)
    torch.testing.assert_close(attn(x)[0], official_attention(attn, x), atol=1e-10, rtol=1e-10)
    # the folded SQ is the literal q @ M; M is the disc, normalised to unit Frobenius norm
    w = attn.c_q.weight
    torch.testing.assert_close(F.linear(x, attn.fold_queries(w)), (x @ w.t()) @ attn.sq_matrix)
    assert attn.sq_matrix.norm().item() == pytest.approx(1.0)
    assert torch.equal(attn.sq_matrix > 0, tf.disc_mask(10, 0.2, wrap) > 0)
    # without the dense layer (the 1-layer sentiment model), SR's output is added as it is
    bare = SpatialSelfAttention(tf_tiny_config(n_embd=100, dense_proj=False)).double()
    assert bare.c_dense is None
    torch.testing.assert_close(bare(x)[0], official_attention(bare, x), atol=1e-10, rtol=1e-10)

def test_spatial_querying_pools_queries_locally():
    # a query that is one unit's impulse becomes, after pooling, nonzero exactly on that unit's disc
    attn = SpatialSelfAttention(tf_tiny_config(n_embd=256, sq=0.1))
    with torch.no_grad():
        attn.c_q.weight.copy_(torch.eye(256))
    x = torch.zeros(1, 1, 256)
    x[0, 0, 37] = 1.0
    pooled = F.linear(x, attn.fold_queries(attn.c_q.weight))[0, 0]
    assert torch.equal(pooled.abs() > 1e-6, tf.disc_mask(16, 0.1)[37] > 0)

@pytest.mark.parametrize('nonneg', [False, True])
def test_masked_sr_weights_get_zero_gradient_and_stay_zero(nonneg):
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config(sr_nonneg=nonneg))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.98), 'cpu')
    inp, targets = tf.mask_tokens(torch.randint(0, 50256, (4, 32)))
    for _ in range(3):
        model(inp, targets)[1].backward()
        for block in model.transformer.h:
            off = block.attn.sr_mask == 0
            assert off.float().mean() > 0.5
            assert torch.all(block.attn.c_proj.weight.grad[off] == 0)
            assert block.attn.c_proj.weight.grad[~off].abs().sum() > 0
        opt.step()
        opt.zero_grad()
    for block in model.transformer.h:  # weight decay and Adam leave them at exactly zero
        assert torch.all(block.attn.c_proj.weight[block.attn.sr_mask == 0] == 0)
    if nonneg:  # the forward pass uses |W_o| inside the disc: the sign of the stored weights is ignored
        attn = model.transformer.h[0].attn
        x = torch.randn(1, 5, 64)
        out = attn(x)[0]
        with torch.no_grad():
            attn.c_proj.weight.neg_()
        torch.testing.assert_close(attn(x)[0], out)

def test_control_is_plain_multihead_attention():
    # sq = sr = 1: plain queries, a dense signed projection; SR and the dense layer compose into
    # MultiheadAttention's one output projection (W_dense W_o, W_dense b_o)
    torch.manual_seed(0)
    for n_head in (1, 4):
        attn = SpatialSelfAttention(tf_tiny_config(sq=1.0, sr=1.0, n_head=n_head))
        assert attn.sq_matrix is None and attn.sr_mask is None
        mha = nn.MultiheadAttention(64, n_head, bias=True, batch_first=True)
        with torch.no_grad():
            attn.c_proj.bias.normal_()
            mha.in_proj_weight.copy_(torch.cat([attn.c_q.weight, attn.c_kv.weight]))
            mha.in_proj_bias.zero_()
            mha.out_proj.weight.copy_(attn.c_dense.weight @ attn.c_proj.weight)
            mha.out_proj.bias.copy_(attn.c_dense.weight @ attn.c_proj.bias)
        x = torch.randn(2, 10, 64)
        torch.testing.assert_close(attn(x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    assert torch.all(Topoformer(tf_tiny_config(sq=1.0, sr=1.0)).transformer.h[0].attn.c_proj.weight != 0)

def test_topoformer_return_maps():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config()).eval()
    idx = torch.randint(0, 50256, (3, 12))
    logits, loss, maps = model(idx, return_maps=True)
    assert loss is None and logits.shape == (3, 12, 50304)
    assert list(maps) == [f'h.{l}.{s}' for l in range(2) for s in ('q', 'k', 'v', 'out')]
    assert all(m.shape == (3, 12, 64) for m in maps.values())
    # q is the queries before pooling; out is SR's output, before the dense layer (the official hook point)
    block = model.transformer.h[0]
    x = block.ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12)))
    torch.testing.assert_close(maps['h.0.q'], x @ block.attn.c_q.weight.t())
    torch.testing.assert_close(block.attn(x)[0], block.attn.c_dense(maps['h.0.out']))
    torch.testing.assert_close(model(idx)[0], logits)

def test_mlm_logits_pass_the_official_prediction_head_then_the_tied_decoder():
    # cramming_local's ScriptableLMForPreTraining with skip_head_transform: decoder(Linear(D, D)(final_norm(h)))
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config()).eval()
    assert model.prediction_head.weight.shape == (64, 64) and model.prediction_head.bias is None
    idx = torch.randint(0, 50256, (2, 10))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
    for block in model.transformer.h:
        x = block(x)[0]
    h = model.prediction_head(model.transformer.ln_f(x))
    torch.testing.assert_close(model(idx)[0], h @ model.transformer.wte.weight.t())
    inp, targets = tf.mask_tokens(idx, torch.Generator().manual_seed(0))
    picked = targets != tf.IGNORE_INDEX
    logits = model(inp, targets)[0]  # the masked positions only, as the official sparse_prediction
    assert logits.shape == (int(picked.sum()), 50304)
    torch.testing.assert_close(logits, model(inp)[0][picked])
    assert not hasattr(Topoformer(tf_tiny_config(n_class=2)), 'prediction_head')  # the classifier has none

def test_mlm_masking_statistics_and_special_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.full((400, 500), 1234)
    inp, targets = tf.mask_tokens(x, g)
    picked = targets != tf.IGNORE_INDEX
    assert abs(picked.float().mean().item() - 0.15) < 0.005
    assert torch.all(targets[picked] == 1234)
    assert torch.equal(inp[~picked], x[~picked])  # unpicked tokens are untouched
    n = picked.sum().item()
    masked = (inp[picked] == tf.MASK_ID).sum().item() / n
    kept = (inp[picked] == 1234).sum().item() / n
    rand = inp[picked][(inp[picked] != tf.MASK_ID) & (inp[picked] != 1234)]
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(len(rand) / n - 0.1) < 0.01
    assert rand.min() >= 0 and rand.max() < tf.EOT_ID and len(rand.unique()) > 1000  # real tokens
    assert tf.EOT_ID < tf.MASK_ID < 50304 and tf.EOT_ID < tf.PAD_ID < 50304 and tf.MASK_ID != tf.PAD_ID
    # end-of-text and [PAD] are never picked, as in the official masking, however many there are
    x = torch.randint(0, 50256, (300, 200))
    x[:, ::3] = tf.EOT_ID
    x[:, 1::7] = tf.PAD_ID
    special = (x == tf.EOT_ID) | (x == tf.PAD_ID)
    inp, targets = tf.mask_tokens(x, g)
    assert torch.all(targets[special] == tf.IGNORE_INDEX) and torch.equal(inp[special], x[special])
    assert abs((targets[~special] != tf.IGNORE_INDEX).float().mean().item() - 0.15) < 0.01
    # a tiny batch still has a target, and not a special token
    _, t = tf.mask_tokens(torch.tensor([[tf.EOT_ID, 7]]), torch.Generator().manual_seed(3))
    assert t.tolist() == [[tf.IGNORE_INDEX, 7]]

def test_mlm_loss_is_on_the_masked_positions_only():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config()).eval()
    inp, targets = tf.mask_tokens(torch.randint(0, 50256, (2, 16)), torch.Generator().manual_seed(1))
    logits, loss = model(inp, targets)
    picked = targets != tf.IGNORE_INDEX
    assert logits.shape == (picked.sum().item(), 50304)
    full, _ = model(inp)
    torch.testing.assert_close(logits, full[picked])
    torch.testing.assert_close(loss, F.cross_entropy(full.view(-1, 50304), targets.view(-1), ignore_index=-100))
    # the batch brings the masked positions, found on the CPU: the forward then finds none itself (on a GPU
    # finding them waits for the device, and under --compile splits the graph), with the same logits and loss
    data = np.tile(np.arange(1000, 1400, dtype=np.uint16), 10)
    x, y, picked = tf.get_batch(data, 2, 16, torch.Generator().manual_seed(2))
    assert torch.equal(picked, (y.view(-1) != tf.IGNORE_INDEX).nonzero().squeeze(1))
    with_picked = model(x, y, picked=picked)
    real = torch.Tensor.nonzero
    torch.Tensor.nonzero = lambda self, *a, **k: pytest.fail('nonzero in the forward')
    try:
        again = model(x, y, picked=picked)
    finally:
        torch.Tensor.nonzero = real
    assert torch.equal(with_picked[0], again[0]) and torch.equal(with_picked[1], model(x, y)[1])

def test_topoformer_flops_count_the_head_on_the_masked_tokens_only():
    model = Topoformer(tf_tiny_config())
    D, V = 64, 50304
    body = model.get_num_params() - V * D - D * D  # all but the tied decoder and the prediction head
    assert bench.flops_per_token(model) == pytest.approx(6 * (body + 0.15 * (V * D + D * D)) + 12 * 2 * D * 32)
    clf = Topoformer(tf_tiny_config(n_class=2))
    assert bench.flops_per_token(clf) == pytest.approx(6 * (clf.get_num_params() - V * D) + 12 * 2 * D * 32)
    gpt = GPT(GPTConfig(**TINY))  # nanoGPT's count: every parameter (the tied decoder too), plus attention
    assert bench.flops_per_token(gpt) == 6 * gpt.get_num_params() + 12 * 2 * gpt.config.n_embd * gpt.config.block_size

def test_a_few_dozen_mlm_steps_lower_the_loss(mlm_data, tmp_path, capsys):
    code, out, err = cli(tf.main, [*TF_TINY_CLI, f'--data_dir={mlm_data}', '--dataset=tiny', f'--out_dir={tmp_path}',
                                   '--batch_size=16', '--max_iters=40', '--eval_interval=40', '--eval_iters=4',
                                   '--warmup_iters=5', '--learning_rate=3e-3'], capsys)
    assert code == 0, err
    vals = [float(l.split('val masked-token loss ')[1]) for l in out.splitlines() if l.startswith('step')]
    assert vals[0] > 10 and vals[-1] < vals[0] - 3, out

def test_sentiment_beats_chance_on_a_separable_set(tmp_path, capsys):
    gpt2()
    imdb = write_imdb(tmp_path / 'aclImdb')
    code, out, err = cli(tf.main, ['--task=sentiment', f'--imdb_dir={imdb}', f'--out_dir={tmp_path / "out"}',
                                   '--n_embd=64', '--ffn_size=128', '--block_size=48', '--batch_size=16',
                                   '--max_iters=40', '--eval_interval=40', '--eval_iters=2', '--warmup_iters=5',
                                   '--learning_rate=3e-3', '--log_interval=40', '--dtype=float32'], capsys)
    assert code == 0, err
    line = [l for l in out.splitlines() if l.startswith('test accuracy')][0]
    assert line.endswith('on 100 reviews') and float(line.split()[2]) >= 0.85, out
    model = Topoformer.from_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert model.config.n_class == 2 and model.config.n_layer == 1 and model.config.sq == 0.1
    assert not model.config.dense_proj  # the official 1-layer model has no dense layer after SR

def test_padding_does_not_change_the_classification():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config(n_class=2)).eval()
    review = torch.randint(0, 50256, (1, 10))
    padded = torch.cat([review, torch.full((1, 7), tf.PAD_ID)], dim=1)
    torch.testing.assert_close(model(review)[0], model(padded)[0], atol=1e-5, rtol=1e-5)

def test_topoformer_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config(wrap=False, sq=0.2, dropout=0.1))
    opt = model.configure_optimizers(0.01, 1e-3, (0.9, 0.98), 'cpu')
    inp, targets = tf.mask_tokens(torch.randint(0, 50256, (2, 32)))
    model(inp, targets)[1].backward()
    opt.step()
    path = str(tmp_path / 'ckpt.pt')
    tf.save_checkpoint(path, tf.checkpoint_of(model, 1, {'task': 'mlm'}, opt, 'cpu', 5.0, 10.0), '')
    ckpt = torch.load(path, weights_only=False)
    assert ckpt['model_type'] == 'topoformer' and ckpt['iter_num'] == 1 and set(ckpt['rng']) == {'torch', 'cuda'}
    loaded = Topoformer.from_checkpoint(path)
    assert not loaded.training and loaded.config == model.config
    model.eval()
    a, b = model(inp, targets, return_maps=True), loaded(inp, targets, return_maps=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])

def test_topoformer_resume_is_bit_exact(mlm_data, tmp_path, capsys):
    common = [*TF_TINY_CLI, f'--data_dir={mlm_data}', '--dataset=tiny', '--dropout=0.1', '--lr_decay_iters=8',
              '--eval_interval=4']
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert cli(tf.main, common + [f'--out_dir={a}', '--max_iters=8'], capsys)[0] == 0
    assert cli(tf.main, common + [f'--out_dir={b}', '--max_iters=4'], capsys)[0] == 0
    halfway = torch.load(b / 'ckpt.pt', weights_only=False)
    assert cli(tf.main, [f'--out_dir={b}', '--resume', '--max_iters=8'], capsys)[0] == 0
    ca, cb = (torch.load(p / 'ckpt.pt', weights_only=False) for p in (a, b))
    assert ca['iter_num'] == cb['iter_num'] == 8 and ca['model'].keys() == cb['model'].keys()
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)
    assert not torch.equal(halfway['model']['transformer.h.0.attn.c_q.weight'],
                           cb['model']['transformer.h.0.attn.c_q.weight'])  # the resumed half did train

def test_topoformer_config_presets_and_task_defaults():
    parse = lambda argv: tf.parse_config(argv, tf.DEFAULTS, tf.PRESETS, tf.HELP, tf.__file__)[0]
    cfg = parse(['--compile'])
    assert cfg['compile'] is True and cfg['n_embd'] == 256 and cfg['task'] == 'mlm'
    cfg = parse(['--preset=classroom', '--sq=1', '--sr=1'])
    assert cfg['sq'] == cfg['sr'] == 1.0 and cfg['max_iters'] == tf.PRESETS['classroom']['max_iters']
    # --preset=paper is the official BERT: cramming_local arch/bert-c5_topo + train/bert-o3
    cfg = parse(['--preset=paper'])
    official = dict(n_layer=16, n_head=1, n_embd=784, ffn_size=3072, block_size=128, sq=0.3, sr=0.3, wrap=True,
                    dense_proj=True, dropout=0.0, learning_rate=1e-3, beta1=0.9, beta2=0.98, adam_eps=1e-12,
                    weight_decay=0.01, grad_clip=0.5, sr_nonneg=True)
    assert {k: cfg[k] for k in official} == official
    assert cfg['batch_size'] * cfg['gradient_accumulation_steps'] == 4096  # sequences per step
    s = tf.TASK_DEFAULTS['sentiment']  # the official 1-layer IMDB model (config_text.yaml)
    assert (s['n_layer'], s['n_embd'], s['sq'], s['sr'], s['dense_proj']) == (1, 400, 0.1, 0.3, False)

@pytest.mark.parametrize('arg, words', [c for c in BAD_CONFIG if 'snapshot' not in c[0]][:-3] + [
    ('--n_embd=250', 'perfect square'), ('--sq=0', '--sq=0.0: must be finite and 0 < x <= 1'),
    ('--sr=1.5', 'sr=1.5'), ('--task=translate', "--task: invalid choice: 'translate'"),
    ('--ffn_size=101', 'must be even')])
def test_topoformer_bad_config_is_one_line(arg, words, mlm_data, tmp_path, capsys):
    code, _, err = cli(tf.main, [f'--data_dir={mlm_data}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=1',
                                 arg], capsys)
    assert_one_line_error(code, err, words)
    assert os.listdir(tmp_path) == []

def test_topoformer_bad_data_and_mismatches_are_one_line(tmp_path, capsys):
    code, _, err = cli(tf.main, [f'--data_dir={tmp_path}', '--dataset=nope'], capsys)
    assert_one_line_error(code, err, 'prepare_data.py')
    os.makedirs(tmp_path / 'WRONG' / 'train')  # an IMDB folder without the pos/neg layout
    code, _, err = cli(tf.main, ['--task=sentiment', f'--imdb_dir={tmp_path / "WRONG"}'], capsys)
    assert_one_line_error(code, err, 'IMDB layout')
    model = Topoformer(tf_tiny_config(block_size=16))
    cfg, _ = tf.parse_config(['--n_layer=2', '--n_embd=64', '--ffn_size=128', '--block_size=16'], tf.DEFAULTS,
                             tf.PRESETS, tf.HELP, tf.__file__)
    tf.save_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'), tf.checkpoint_of(
        model, 0, cfg, model.configure_optimizers(0.0, 1e-3, (0.9, 0.98), 'cpu'), 'cpu', 9.9, None), '')
    code, _, err = cli(tf.main, [f'--out_dir={tmp_path / "out"}', '--resume', '--task=sentiment'], capsys)
    assert_one_line_error(code, err, "--task=sentiment does not fit the saved masked LM")
    with pytest.raises(ValueError, match='longer than block_size'):
        model(torch.zeros(1, 17, dtype=torch.long))

def test_topoformer_bench_compares_with_the_control(capsys):
    code = tf.command(bench.bench_topoformer, ['--n_layer=1', '--n_embd=64', '--ffn_size=128', '--block_size=16',
                                               '--batch_size=2', '--dtype=float32'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'control (sq=1.0, sr=1.0)' in out and 'topoformer (sq=0.3, sr=0.3)' in out and 'GFLOP/s' in out
    assert 0.3 < float(out.split('ratio of the two: ')[1].split()[0]) < 3

def test_topoformer_compile_runs_a_step(mlm_data, tmp_path, capsys):
    code, out, err = cli(tf.main, [*TF_TINY_CLI, f'--data_dir={mlm_data}', '--dataset=tiny', f'--out_dir={tmp_path}',
                                   '--compile', '--n_layer=1', '--max_iters=2', '--eval_interval=2',
                                   '--log_interval=1'],
                         capsys)
    assert code == 0, err[-3000:]
    assert math.isfinite(float(out.split('iter 2: loss ')[1].split(',')[0]))

def test_topoformer_command_line(mlm_data, tmp_path):
    p = run_script(['topoformer.py', *TF_TINY_CLI, f'--data_dir={mlm_data}', '--dataset=tiny',
                    f'--out_dir={tmp_path}', '--max_iters=1'])
    assert p.returncode == 0 and 'saved' in p.stdout, p.stderr
    words = assert_help_names_every_key(tf)
    assert '--task=sentiment sets:' in words and '--preset=paper:' in words
    p = run_script(['topoformer.py', '--sq=0'])
    assert_one_line_error(p.returncode, p.stderr, '--sq=0.0')

def test_fill_mask_ranks_what_the_model_was_trained_to_predict(mlm_data, tmp_path, capsys):
    # a Topoformer trained on sentences from 40 words puts one of them at each [MASK], never a special token
    code, out, err = cli(tf.main, [*TF_TINY_CLI, f'--data_dir={mlm_data}', '--dataset=tiny', f'--out_dir={tmp_path}',
                                   '--batch_size=16', '--max_iters=60', '--eval_interval=60', '--learning_rate=3e-3'],
                         capsys)
    assert code == 0, err
    model = Topoformer.from_checkpoint(str(tmp_path / 'ckpt.pt'))
    data = np.memmap(os.path.join(mlm_data, 'tiny', 'val.bin'), dtype=np.uint16, mode='r')
    idx = torch.from_numpy(data[:32].astype(np.int64))[None].clone()
    words = set(np.unique(data).tolist()) - {tf.EOT_ID}
    where = [i for i in range(32) if idx[0, i] != tf.EOT_ID][:3]
    idx[0, where] = tf.MASK_ID
    probs, ids = model.fill_mask(idx, k=5)
    assert probs.shape == ids.shape == (3, 5) and torch.all(probs[:, :-1] >= probs[:, 1:])
    assert set(ids.flatten().tolist()) <= words  # its five likeliest: words of the training text, no special token
    with pytest.raises(ValueError, match='classifier'):
        Topoformer(tf_tiny_config(n_class=2)).fill_mask(idx)

# -----------------------------------------------------------------------------
# prepare_data.py

EOT_TEXT = '<|endoftext|>'

def prepare(tmp_path, capsys, *args):
    """prepare_data.py in-process, from tmp_path (so data/ lands there): (exit code, stdout, stderr)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return cli(prepare_data.main, list(args), capsys, interrupted="temporary files removed")
    finally:
        os.chdir(cwd)

def load(folder):
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    train = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16)
    val = np.fromfile(os.path.join(folder, 'val.bin'), dtype=np.uint16)
    return train, val, meta

def test_single_file_round_trip(tmp_path, capsys):
    enc = gpt2()
    # unicode, CRLF, tabs, trailing spaces: all must survive byte for byte
    text = ''.join(f"Line {i}: caf\u00e9 na\u00efve \u2014 \U0001F600\t  \r\nTo be, or not to be{i % 7}!\n\n"
                   for i in range(300))
    (tmp_path / 'play.txt').write_bytes(text.encode('utf-8'))
    code, _, err = prepare(tmp_path, capsys, '--input=play.txt')
    assert code == 0, err
    train, val, meta = load(tmp_path / 'data' / 'play')
    ids = enc.encode_ordinary(text)
    k = int(len(ids) * 0.1)
    # contiguous split: train = tokens[:-k], val = tokens[-k:] + [EOT], nothing lost or added
    assert train.tolist() == ids[:-k] and val.tolist() == ids[-k:] + [50256]
    assert enc.decode(train.tolist() + val.tolist()) == text + EOT_TEXT
    assert meta['train_tokens'] == len(train) and meta['val_tokens'] == len(val)
    assert meta['tokenizer'] == 'gpt2' and meta['eot_token'] == 50256 and meta['seed'] == 1337
    assert meta['val_fraction'] == 0.1 and meta['source'] == 'play.txt'
    # a second run over it says so, and the trainers accept the result
    code, out, _ = prepare(tmp_path, capsys, '--input=play.txt')
    assert code == 0 and 'holds a dataset already' in out
    assert len(topo_gpt.open_split({'data_dir': str(tmp_path / 'data'), 'dataset': 'play', 'block_size': 8},
                                   'val')) == len(val)

def make_folder(tmp_path, n=20):
    docs = {f'doc{i:02d}.txt': f"Document number {i}.\n" + "words and more words " * (i + 1) for i in range(n)}
    folder = tmp_path / 'corpus'
    folder.mkdir()
    for fname, text in docs.items():
        (folder / fname).write_text(text, encoding='utf-8')
    (folder / 'empty.txt').write_text('')  # skipped
    (folder / 'notes.md').write_text('not a .txt, ignored')
    return docs

def test_folder_split_by_documents_and_seed(tmp_path, capsys):
    enc = gpt2()
    docs = make_folder(tmp_path)
    assert prepare(tmp_path, capsys, '--input=corpus', '--val_fraction=0.2')[0] == 0
    train, val, meta = load(tmp_path / 'data' / 'corpus')
    got = {}
    for split, ids in (('train', train), ('val', val)):
        assert ids[-1] == 50256  # every document ends with EOT
        parts = enc.decode(ids.tolist()).split(EOT_TEXT)
        got[split] = parts[:-1]
        assert parts[-1] == '' and len(got[split]) == meta[f'{split}_documents'] == (ids == 50256).sum()
    assert len(got['val']) == 4 and len(got['train']) == 16  # round(20 * 0.2)
    assert sorted(got['train'] + got['val']) == sorted(docs.values())  # each document exactly once
    assert got['train'] == sorted(got['train'], key=lambda t: int(t.split()[2][:-1]))  # name order
    bins = {}
    for out, seed in (('a', 1), ('b', 1), ('c', 2)):
        assert prepare(tmp_path, capsys, '--input=corpus', f'--out_dir={out}', f'--seed={seed}')[0] == 0
        bins[out] = [(tmp_path / out / 'corpus' / f).read_bytes() for f in ('train.bin', 'val.bin')]
    assert bins['a'] == bins['b'] != bins['c']
    # three documents: round(3 * 0.1) = 0, but val gets at least one
    (tmp_path / 'three').mkdir()
    for i in range(3):
        (tmp_path / 'three' / f'{i}.txt').write_text(f'document {i} ' * 20)
    assert prepare(tmp_path, capsys, '--input=three')[0] == 0
    assert [load(tmp_path / 'data' / 'three')[2][k] for k in ('train_documents', 'val_documents')] == [2, 1]

@pytest.mark.parametrize('source', ['synthetic', 'shakespeare'])
def test_pieces_encode_like_the_whole(source):
    enc = gpt2()
    # "\n\n " is one pre-token before a word: cutting between its newlines would change the tokens
    text = (open(needs_shared(SHAKESPEARE), encoding='utf-8').read()[:300_000] if source == 'shakespeare'
            else ''.join(f"Paragraph {i} ends.\n\n  Then\tanother \n\n\n" for i in range(5000)))
    parts = list(prepare_data.pieces(text, size=2000))
    assert len(parts) > 50 and ''.join(parts) == text
    assert [t for p in parts for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)

def test_ctrl_c_while_tokenizing_leaves_no_files(tmp_path, capsys, ctrl_c):
    gpt2()
    def docs():
        yield 'train', 'some text ' * 100
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the work
        yield 'train', 'never reached'
    (tmp_path / 'out').mkdir()
    with pytest.raises(KeyboardInterrupt):
        prepare_data.write_bins(docs(), str(tmp_path / 'out'), {})
    assert os.listdir(tmp_path / 'out') == []

@pytest.fixture
def old_dataset(tmp_path, capsys):
    """data/c prepared from old.txt, and new.txt to replace it with."""
    gpt2()
    (tmp_path / 'old.txt').write_text('An old corpus of some length. ' * 300)
    (tmp_path / 'new.txt').write_text('The new corpus, different and longer! ' * 700)
    assert prepare(tmp_path, capsys, '--input=old.txt', '--name=c')[0] == 0
    return tmp_path

def between_the_renames(monkeypatch, event):
    """os.replace that calls event() right after the new train.bin is renamed into place, before val.bin."""
    real_replace = os.replace
    def replace(a, b):
        real_replace(a, b)
        if b.endswith('train.bin'):
            event()
    monkeypatch.setattr(os, 'replace', replace)

def test_ctrl_c_during_the_switch_leaves_the_new_dataset_whole(old_dataset, capsys, monkeypatch, ctrl_c):
    between_the_renames(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGINT))
    code, _, err = prepare(old_dataset, capsys, '--input=new.txt', '--name=c')
    assert_one_line_error(code, err, 'interrupted', exit_code=130)
    monkeypatch.undo()
    train, val, meta = load(old_dataset / 'data' / 'c')  # the switch was finished: the new dataset, whole
    assert meta['source'] == 'new.txt' and (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens'])
    assert sorted(os.listdir(old_dataset / 'data' / 'c')) == ['meta.json', 'train.bin', 'val.bin']

def test_a_crash_during_the_switch_leaves_a_dataset_the_trainers_refuse(old_dataset, capsys, monkeypatch):
    def die():  # the process dies between the renames (kill -9, a power cut)
        raise SystemExit(137)
    between_the_renames(monkeypatch, die)
    with pytest.raises(SystemExit):
        prepare_data.main([f'--input={old_dataset / "new.txt"}', '--name=c', f'--out_dir={old_dataset / "data"}'])
    monkeypatch.undo()
    for main in (topo_gpt.main, tf.main):  # new train.bin beside the old val.bin: refused, never trained on
        code, _, err = cli(main, [f'--data_dir={old_dataset / "data"}', '--dataset=c',
                                  f'--out_dir={old_dataset / "o"}'], capsys)
        assert_one_line_error(code, err, 'no complete meta.json', 'prepare_data.py')

@pytest.mark.parametrize('setup, args, words', [
    (None, ['--input=nowhere.txt'], ['no such file or folder', 'nowhere.txt']),
    ('empty_file', ['--input=empty.txt'], ['no text', 'empty.txt']),
    ('empty_folder', ['--input=folder'], ['no text', 'folder']),
    ('empty_txts', ['--input=folder'], ['no text']),
    ('tiny', ['--input=tiny.txt'], ['too small']),
    ('latin1', ['--input=folder'], ['not UTF-8', 'b_latin1.txt']),
    (None, ['--bogus=1'], ['unrecognized arguments: --bogus=1']),
    (None, ['shakespeare.txt'], ['unrecognized arguments: shakespeare.txt']),
    (None, ['--seed=abc'], ["--seed: invalid int value: 'abc'"]),
    (None, ['--seed=1.5'], ['int']),
    (None, ['--seed=-1'], ['--seed=-1: must be finite and x >= 0']),
    (None, ['--val_fraction=lots'], ['float']),
    (None, ['--val_fraction=1.5'], ['val_fraction']),
    (None, ['--max_tokens=-5'], ['max_tokens']),
    (None, ['--input'], ['--input: expected one argument']),
    (None, ['--dataset=wikipedia'], ["--dataset: invalid choice: 'wikipedia'"]),
    (None, ['--input=x.txt', '--dataset=imdb'], ['either']),
    (None, ['--input=x.txt', '--max_tokens=100'], ['max_tokens']),
    ('tiny', ['--input=tiny.txt', '--name=../escape'], ['--name=../escape', 'plain folder name']),
    ('tiny', ['--input=tiny.txt', '--name=/tmp/abs'], ['plain folder name']),
    ('tiny', ['--input=tiny.txt', '--out_dir=tiny.txt'], ['cannot make the folder']),
])
def test_prepare_bad_input_is_one_line(tmp_path, capsys, setup, args, words):
    folder = tmp_path / 'folder'
    folder.mkdir()
    if setup == 'empty_file':
        (tmp_path / 'empty.txt').write_text('')
    if setup == 'empty_folder':
        (folder / 'readme.md').write_text('no .txt here')
    if setup == 'empty_txts':
        (folder / 'a.txt').write_text('')
    if setup == 'tiny':
        (tmp_path / 'tiny.txt').write_text('Hi there.')  # 3 tokens: 10% of them is none
    if setup == 'latin1':
        (folder / 'a_fine.txt').write_text('fine text ' * 50)
        (folder / 'b_latin1.txt').write_bytes('caf\u00e9 au lait'.encode('latin-1'))
    if setup in ('tiny', 'latin1'):
        gpt2()
    code, _, err = prepare(tmp_path, capsys, *args)
    assert_one_line_error(code, err, *words)
    assert not os.path.exists(tmp_path / 'data') or os.listdir(tmp_path / 'data') == []
    assert not os.path.exists('/tmp/abs') and not os.path.exists(tmp_path / 'escape')

def test_strip_gutenberg():
    book = "THE SONNETS\r\n\r\nFrom fairest creatures we desire increase,\r\n"
    raw = ("\ufeffThe Project Gutenberg eBook of The Complete Works of William Shakespeare\r\n"
           "This eBook is for the use of anyone anywhere...\r\n\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\r\n\r\n\r\n"
           + book + "\r\n\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\r\n"
           "Updated editions will replace the previous one... Project Gutenberg License\r\n")
    assert prepare_data.strip_gutenberg(raw) == book.replace('\r\n', '\n').strip() + '\n'
    with pytest.raises(prepare_data.UsageError, match='START/END'):
        prepare_data.strip_gutenberg("<html>Service unavailable</html>")

def test_default_corpus_from_a_local_url(tmp_path, monkeypatch, capsys):
    enc = gpt2()
    # the no-argument run, with the Gutenberg URL pointed at a local file: download, strip, cache, tokenize
    book = ''.join(f"Sonnet {i}\r\nShall I compare thee to a summer's day?\r\n\r\n" for i in range(100))
    raw = tmp_path / 'pg100.txt'
    raw.write_bytes(("header\r\n*** START OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE ***\r\n" + book +
                     "*** END OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE ***\r\nlicence\r\n").encode('utf-8'))
    monkeypatch.setattr(prepare_data, 'GUTENBERG_URL', raw.as_uri())
    assert prepare(tmp_path, capsys)[0] == 0
    folder = tmp_path / 'data' / 'shakespeare'
    text = book.replace('\r\n', '\n').strip() + '\n'
    assert (folder / 'input.txt').read_text() == text
    assert sorted(os.listdir(folder)) == ['input.txt', 'meta.json', 'train.bin', 'val.bin']
    train, val, meta = load(folder)
    assert enc.decode(train.tolist() + val.tolist()) == text + EOT_TEXT and meta['source'] == raw.as_uri()

@pytest.mark.parametrize('dataset', ['shakespeare', 'imdb'])
def test_a_failed_download_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys, dataset):
    def offline(*a, **k):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(prepare_data.urllib.request, 'urlopen', offline)
    code, _, err = prepare(tmp_path, capsys, f'--dataset={dataset}')
    assert_one_line_error(code, err, 'could not download', 'no network')
    if dataset == 'shakespeare':  # what to do instead, in full
        assert '--input=PATH --name=shakespeare' in err and 'TIKTOKEN_CACHE_DIR' in err
    assert not (tmp_path / 'data').exists()  # nor the data/ folder it made for it

def test_a_full_disk_while_writing_a_dataset_is_one_line_and_keeps_the_old_one(old_dataset, capsys, monkeypatch):
    before = {f: (old_dataset / 'data' / 'c' / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')}
    real_open = open
    def disk_full(path, mode='r', *a, **k):
        if str(path).endswith('.bin.tmp'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr('builtins.open', disk_full)
    code, _, err = prepare(old_dataset, capsys, '--input=new.txt', '--name=c')
    monkeypatch.undo()
    assert_one_line_error(code, err, 'could not write the dataset', 'No space left')
    assert {f: (old_dataset / 'data' / 'c' / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(old_dataset / 'data' / 'c')) == ['meta.json', 'train.bin', 'val.bin']

def test_safe_extract(tmp_path, capsys):
    def tar_with(names):
        path = tmp_path / 'a.tar.gz'
        with tarfile.open(path, 'w:gz') as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 5
                tar.addfile(info, io.BytesIO(b'great'))
        return str(path)
    prepare_data.safe_extract(tar_with(['aclImdb/train/pos/0_9.txt', 'aclImdb/test/neg/1_2.txt']), str(tmp_path / 'ok'))
    assert (tmp_path / 'ok' / 'aclImdb' / 'train' / 'pos' / '0_9.txt').read_bytes() == b'great'
    with pytest.raises(prepare_data.UsageError, match='unsafe'):
        prepare_data.safe_extract(tar_with(['aclImdb/x.txt', '../../evil.txt']), str(tmp_path / 'bad'))
    assert not (tmp_path / 'evil.txt').exists() and not (tmp_path.parent / 'evil.txt').exists()

def test_get_imdb_layout(tmp_path, monkeypatch, capsys):
    def fake_download(url, path, hint):  # what the archive holds, in miniature
        with tarfile.open(path, 'w:gz') as tar:
            for name in ('aclImdb/train/pos/0_9.txt', 'aclImdb/train/neg/1_1.txt', 'aclImdb/test/pos/2_8.txt'):
                info = tarfile.TarInfo(name)
                info.size = 4
                tar.addfile(info, io.BytesIO(b'okay'))
    monkeypatch.setattr(prepare_data, 'download', fake_download)
    assert prepare(tmp_path, capsys, '--dataset=imdb')[0] == 0
    assert sorted(os.listdir(tmp_path / 'data' / 'imdb')) == ['aclImdb']  # archive and unpack.tmp gone
    assert (tmp_path / 'data' / 'imdb' / 'aclImdb' / 'test' / 'pos' / '2_8.txt').read_text() == 'okay'

@pytest.mark.parametrize('dataset, hub_path, config', [('tinystories', 'roneneldan/TinyStories', None),
                                                       ('fineweb-edu', 'HuggingFaceFW/fineweb-edu', 'sample-10BT')])
def test_streamed_dataset(tmp_path, monkeypatch, capsys, dataset, hub_path, config):
    enc = gpt2()
    calls = []
    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return ({'text': f"Story {i}: once upon a time there was a topographic map."} for i in range(10**6))
    monkeypatch.setitem(sys.modules, 'datasets', type(sys)('datasets'))
    sys.modules['datasets'].load_dataset = load_dataset
    assert prepare(tmp_path, capsys, f'--dataset={dataset}', '--max_tokens=20000', '--seed=3')[0] == 0
    assert calls == [(hub_path, config, 'train', True)]  # streamed, never the whole corpus
    train, val, meta = load(tmp_path / 'data' / dataset)
    assert 20000 <= len(train) + len(val) < 20000 + 30  # stops after the document that reaches --max_tokens
    n_docs = meta['train_documents'] + meta['val_documents']
    assert (train == 50256).sum() + (val == 50256).sum() == n_docs
    assert 0.05 < meta['val_documents'] / n_docs < 0.15  # each document to val with p = 0.1
    assert enc.decode(val.tolist()).split(EOT_TEXT)[0].startswith('Story ')

def test_streamed_dataset_missing_package_or_network(tmp_path, monkeypatch, capsys):
    gpt2()
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import fails, as on a machine without it
    code, _, err = prepare(tmp_path, capsys, '--dataset=fineweb-edu')
    assert_one_line_error(code, err, 'pip install datasets')
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, 'datasets', type(sys)('datasets'))
    sys.modules['datasets'].load_dataset = offline
    code, _, err = prepare(tmp_path, capsys, '--dataset=fineweb-edu')
    assert_one_line_error(code, err, 'no network', '--input')
    assert not (tmp_path / 'data' / 'fineweb-edu').exists()

def test_prepare_command_line(tmp_path):
    # the script itself, once: the real Shakespeare (or a small text) and the trainers' check of its sizes
    gpt2()
    src = SHAKESPEARE if os.path.exists(SHAKESPEARE) else None
    if src is None:
        src = tmp_path / 'small.txt'
        src.write_text('To be, or not to be, that is the question. ' * 2000)
    p = run_script([os.path.join(ROOT, 'prepare_data.py'), f'--input={src}', '--name=shakespeare'], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path / 'data' / 'shakespeare')
    if src == SHAKESPEARE:
        assert meta['train_tokens'] + meta['val_tokens'] == 1_566_042 + 1  # the text's tokens + one EOT
        assert (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens']) == (1_409_438, 156_605)
    p = run_script([os.path.join(ROOT, 'prepare_data.py'), '--val_fraction=2'], cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stderr, '--val_fraction=2.0: must be finite and 0 < x < 1')

# -----------------------------------------------------------------------------
# analyze.py

needs_official = pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, 'ckpt.pt')),
                                    reason=missing_shared(OFFICIAL))

@pytest.fixture(scope='module')
def enc():
    return gpt2()

def save_topolm(path, alpha, seed, block_size=64):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=64, block_size=block_size, radius=3, alpha=alpha, seed=seed)
    model = topo_gpt.GPT(topo_gpt.GPTConfig(**args))
    opt = torch.optim.AdamW(model.parameters())
    topo_gpt.save_checkpoint(str(path), topo_gpt.checkpoint_of(model, 0, {**topo_gpt.DEFAULTS, **args}, opt, 'cpu',
                                                               float('inf'), None), '')

def save_topoformer(path, s):
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=1, n_embd=64, ffn_size=128, block_size=64, sq=s, sr=s)
    model = tf.Topoformer(tf.TopoformerConfig(**args))
    opt = torch.optim.AdamW(model.parameters())
    tf.save_checkpoint(str(path), tf.checkpoint_of(model, 0, {**tf.DEFAULTS, **args}, opt, 'cpu', float('inf'), None),
                       '')

@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Tiny checkpoints: a TopoLM and its control, a Topoformer and its control (8 x 8 maps); a TopoLM with
    a context too short for the language stimuli."""
    d = tmp_path_factory.mktemp('ckpts')
    save_topolm(d / 'topolm.pt', 2.5, 1)
    save_topolm(d / 'topolm_short.pt', 2.5, 1, block_size=32)
    save_topolm(d / 'topolm_control.pt', 0.0, 2)
    save_topoformer(d / 'topoformer.pt', 0.3)
    save_topoformer(d / 'topoformer_control.pt', 1.0)
    return d

def run_main(argv, capsys):
    """analyze.main in-process: (metrics, stdout)."""
    metrics = analyze.main([str(a) for a in argv])
    return metrics, capsys.readouterr().out

# -----------------------------------------------------------------------------
# Welch's t and its p-values

def test_welch_t_hand_example():
    # a = [1, 2, 3, 4]: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, s2_a = 5/12
    # b = [2, 4, 6]:    mean 4,   unbiased variance (4 + 0 + 4) / 2 = 4,                  s2_b = 4/3
    # t  = (2.5 - 4) / sqrt(5/12 + 16/12) = -1.5 / sqrt(7/4) = -1.133893
    # df = (7/4)^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.0625 / (0.0578704 + 0.8888889) = 3.234719
    t, df = analyze.welch_t(np.array([1, 2, 3, 4.]), np.array([2, 4, 6.]))
    assert t == pytest.approx(-1.5 / math.sqrt(7 / 4), abs=1e-12)
    assert t == pytest.approx(-1.133893, abs=1e-6)
    assert df == pytest.approx(3.0625 / (25 / 432 + 8 / 9), abs=1e-12)
    assert df == pytest.approx(3.234719, abs=1e-6)
    # per unit along axis 0, the sign follows a - b; silent units give t = 0 (not NaN)
    a = np.stack([[1, 2, 3, 4.], [5, 5, 5, 5], [0, 0, 0, 0]], axis=1)
    b = np.stack([[2, 4, 6.], [5, 5, 5], [0, 0, 0]], axis=1)
    t, df = analyze.welch_t(a, b)
    assert t[0] == pytest.approx(-1.133893, abs=1e-6) and t[1] == 0 and t[2] == 0
    assert np.isfinite(df).all()

def _t_pvalue_by_integration(t, df, n=400001):
    """Two-sided p of Student's t by numerical integration of its density (an independent check):
    f(x) = Gamma((v+1)/2) / (sqrt(v pi) Gamma(v/2)) (1 + x^2/v)^(-(v+1)/2), p = 1 - 2 int_0^|t| f."""
    x = np.linspace(0, abs(t), n)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    return 1 - 2 * np.sum((f[1:] + f[:-1]) / 2 * np.diff(x))

def test_t_pvalue_table_values():
    # two-sided critical values from the t table: p = 0.05 at t = 2.228 (df 10) and 2.086 (df 20),
    # 0.01 at 2.845 (df 20); the Cauchy (df 1): P(|T| > 1) = 0.5 exactly; the normal limit: 1.96 -> 0.05
    t = np.array([2.228, 2.086, 2.845, 1.0, 1.96])
    df = np.array([10, 20, 20, 1, 1e6])
    np.testing.assert_allclose(analyze.t_pvalue(t, df), [0.05, 0.05, 0.01, 0.5, 0.05], atol=5e-4)
    assert analyze.t_pvalue(1.0, 1.0) == pytest.approx(0.5, abs=1e-12)
    # df = 2 has a closed form: p = 1 - |t| / sqrt(2 + t^2)
    ts = np.array([0.1, 0.5, 1.5, 3.0, 10.0])
    np.testing.assert_allclose(analyze.t_pvalue(ts, 2), 1 - ts / np.sqrt(2 + ts**2), atol=1e-12)
    # symmetric in t, 1 at t = 0, 0 at infinity, small but not 0 far out
    assert analyze.t_pvalue(-2.228, 10) == analyze.t_pvalue(2.228, 10)
    assert analyze.t_pvalue(0.0, 7) == 1.0 and analyze.t_pvalue(np.inf, 7) == 0.0
    assert 0 < analyze.t_pvalue(12.0, 300) < 1e-25

def test_t_pvalue_fractional_df_against_integration():
    # Welch's df is fractional: check against the density integrated numerically, incl. the hand example
    for t, df in [(-1.133893, 3.234719), (2.5, 7.3), (0.7, 45.6), (4.0, 2.5), (1.2, 150.2)]:
        assert analyze.t_pvalue(t, df) == pytest.approx(_t_pvalue_by_integration(t, df), abs=1e-7)
    # vectorised over arrays of any shape, one value per unit
    t = np.linspace(-5, 5, 12).reshape(3, 4)
    p = analyze.t_pvalue(t, np.full((3, 4), 12.5))
    assert p.shape == (3, 4)
    assert p.flat[0] == pytest.approx(_t_pvalue_by_integration(-5, 12.5), abs=1e-7)

# -----------------------------------------------------------------------------
# Benjamini-Hochberg

def test_bh_fdr_worked_example():
    # p = [0.04, 0.001, 0.03, 0.2, 0.031], m = 5. Sorted with ranks: 0.001 (1), 0.03 (2), 0.031 (3),
    # 0.04 (4), 0.2 (5). p * m / rank: 0.005, 0.075, 0.051667, 0.05, 0.2. Running minimum from the
    # largest rank down: 0.2, 0.05, min(0.051667, 0.05) = 0.05, min(0.075, 0.05) = 0.05, 0.005.
    # Back in the input order: q = [0.05, 0.005, 0.05, 0.2, 0.05].
    q = analyze.bh_fdr([0.04, 0.001, 0.03, 0.2, 0.031])
    np.testing.assert_allclose(q, [0.05, 0.005, 0.05, 0.2, 0.05], atol=1e-12)
    # shape kept, capped at 1, one family across all entries
    q = analyze.bh_fdr(np.array([[0.9, 0.8], [0.01, 0.95]]))
    assert q.shape == (2, 2) and q.max() <= 1
    assert q[1, 0] == pytest.approx(0.04)  # 0.01 * 4 / 1

# -----------------------------------------------------------------------------
# Moran's I (queen contiguity, row-standardised weights)

def _morans_i_brute_force(x):
    """The textbook formula with an explicit N x N weight matrix: I = N / S0 * z'Wz / z'z."""
    H, W = x.shape
    cells = [(r, c) for r in range(H) for c in range(W)]
    w = np.array([[1.0 if max(abs(r1 - r2), abs(c1 - c2)) == 1 else 0.0 for r2, c2 in cells] for r1, c1 in cells])
    w /= w.sum(1, keepdims=True)
    z = x.ravel() - x.mean()
    return len(z) / w.sum() * z @ w @ z / (z @ z)

def test_morans_i_checkerboard_hand_value():
    # 4 x 4 checkerboard of +-1 (mean 0, sum z^2 = 16). The 4 rook neighbours of a cell have the opposite
    # sign, the 4 diagonal ones the same sign; each cell's neighbours share weight 1 (row-standardised).
    #   interior cell (4):  (4 diagonal - 4 rook) / 8 = 0
    #   edge cell (8):      (2 diagonal - 3 rook) / 5 = -1/5
    #   corner (4):         (1 diagonal - 2 rook) / 3 = -1/3
    # I = (8 * -1/5 + 4 * -1/3) / 16 = -44/15 / 16 = -11/60. (With rook contiguity it would be -1;
    # with queen, rook and diagonal cancel inside and only the border is left.)
    board = (np.indices((4, 4)).sum(0) % 2) * 2 - 1.0
    assert analyze.morans_i(board) == pytest.approx(-11 / 60, abs=1e-12)

def test_morans_i_gradient_noise_and_brute_force():
    ramp = np.add.outer(np.arange(16.0), np.zeros(16))  # a smooth gradient along the rows
    assert analyze.morans_i(ramp) > 0.95
    assert analyze.morans_i(np.add.outer(np.arange(16.0), np.arange(16.0))) > 0.95
    # shuffled noise: expectation -1/(N-1) under randomisation
    rng = np.random.default_rng(0)
    values = [analyze.morans_i(rng.permutation(ramp.ravel()).reshape(16, 16)) for _ in range(20)]
    assert np.mean(values) == pytest.approx(-1 / 255, abs=0.02)
    # the shifted-sum implementation equals the explicit weight matrix, on a non-square map too
    x = rng.standard_normal((5, 7))
    assert analyze.morans_i(x) == pytest.approx(_morans_i_brute_force(x), abs=1e-12)
    assert math.isnan(analyze.morans_i(np.ones((4, 4))))

# -----------------------------------------------------------------------------
# Clusters and patches

def _mask(drawing):
    return np.array([[ch == '#' for ch in line] for line in drawing.split()])

def test_clusters_hand_drawn():
    mask = _mask("""
        ##..#
        #...#
        ..#..
        .###.
        #....""")
    labels, sizes = analyze.clusters(mask)
    # 4-connectivity, numbered in row-major order of their first cell; the corner cell (4, 0) touches
    # (3, 1) only diagonally, so it is a component of its own
    expected = np.array([[1, 1, 0, 0, 2],
                         [1, 0, 0, 0, 2],
                         [0, 0, 3, 0, 0],
                         [0, 3, 3, 3, 0],
                         [4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(labels, expected)
    assert sizes == [3, 2, 4, 1]
    assert analyze.clusters(np.zeros((3, 3), bool))[1] == []

def test_patches_split_by_sign_and_size():
    t = np.zeros((8, 8))
    t[:3, :3] = 5.0  # 9 positive units
    t[5:, 4:] = -4.0  # 12 negative units
    t[3, 3] = 3.0  # a lone positive unit
    sig = t != 0
    assert analyze.patches(t, sig, min_size=1)[0] == {'positive': [9, 1], 'negative': [12]}
    sizes, where = analyze.patches(t, sig, min_size=10)
    assert sizes == {'positive': [], 'negative': [12]}
    np.testing.assert_array_equal(where, np.where(t < 0, -1, 0))  # only the big negative block
    # a positive and a negative block side by side are two patches, not one
    t2 = np.zeros((4, 4))
    t2[:, :2], t2[:, 2:] = 3.0, -3.0
    sizes, where = analyze.patches(t2, t2 != 0, min_size=8)
    assert sizes == {'positive': [8], 'negative': [8]}
    np.testing.assert_array_equal(where, np.sign(t2))
    # significance decides, not the sign alone
    assert analyze.patches(t2, np.zeros((4, 4), bool), min_size=1)[0] == {'positive': [], 'negative': []}

def test_contrast_stats_finds_a_planted_patch_and_the_null_does_not():
    # 30 + 30 stimuli on a 12 x 12 map of independent noise; the first group adds +1.5 inside a 6 x 6 square
    rng = np.random.default_rng(1)
    g = rng.standard_normal((60, 12, 12))
    g[:30, 2:8, 3:9] += 1.5
    ia, ib = np.arange(30), np.arange(30, 60)
    s = analyze.contrast_stats({'m': g}, ia, ib, 0.05, 25, {'m': analyze.smooth(g, 2.0)})['m']
    assert s['significant'][2:8, 3:9].all()
    assert len(s['patches']['positive']) == 1 and s['patches']['positive'][0] >= 36
    assert s['patches']['negative'] == []
    assert s['morans_i'] > 0.5 and s['morans_i_smoothed'] > s['morans_i']
    assert s['percent_selective'] >= 100 * 36 / 144 and s['percent_selective_second'] < 2
    # the smoothed read-out's selectivity, as the official localizer: smooth, then t, BH-FDR and t > 0
    ts, sig = analyze.t_maps({'m': analyze.smooth(g, 2.0)}, ia, ib, 0.05)
    assert s['percent_selective_smoothed'] == 100 * (sig['m'] & (ts['m'] > 0)).mean() >= 100 * 36 / 144
    a, b = analyze.redraw_labels(ia, ib, 'shuffled', rng)
    null = analyze.contrast_stats({'m': g}, a, b, 0.05, 25)['m']
    assert null['percent_selective'] < 5 and null['patches'] == {'positive': [], 'negative': []}
    assert null['morans_i_smoothed'] is None and null['percent_selective_smoothed'] is None  # no smoothed grids

def test_percent_selective_counts_only_q_below_fdr_and_positive_t():
    # 40 + 40 stimuli on a 4 x 4 map. The second group's values are the first group's in reverse order,
    # so a unit's t is exactly 0 unless something is added to one group:
    #   (0, 0), (0, 1): +5 in the first group -> t >> 0, selective (for the first condition)
    #   (3, 3):         +5 in the second group -> t << 0, selective for the second
    #   (1, 1):         +0.01 in the first group -> t > 0 but far from significant
    rng = np.random.default_rng(0)
    first = rng.standard_normal((40, 4, 4))
    g = np.concatenate([first, first[::-1]])
    g[:40, 0, 0] += 5
    g[:40, 0, 1] += 5
    g[40:, 3, 3] += 5
    g[:40, 1, 1] += 0.01
    ia, ib = np.arange(40), np.arange(40, 80)
    s = analyze.contrast_stats({'m': g}, ia, ib, 0.05, 1)['m']
    assert s['t'][1, 1] > 0 and not s['significant'][1, 1]
    assert s['percent_selective'] == 100 * 2 / 16
    assert s['percent_selective_second'] == 100 * 1 / 16
    # FDR over all units of all maps together: the same units beside a second map of 16 silent units
    # are still selective (their q is tiny), and the share is of all 32 units
    both = analyze.contrast_stats({'m': g, 'quiet': np.zeros_like(g)}, ia, ib, 0.05, 1)
    assert both['m']['percent_selective'] == 100 * 2 / 16 and both['quiet']['percent_selective'] == 0

# -----------------------------------------------------------------------------
# The nulls: labels shuffled, or swapped within matched pairs

def test_redraw_labels_paired_keeps_every_pair_split_and_shuffled_keeps_group_sizes():
    rng = np.random.default_rng(0)
    ia, ib = np.arange(50), np.arange(50, 100)
    swaps = np.zeros(50)
    for _ in range(200):
        a, b = analyze.redraw_labels(ia, ib, 'paired', rng)
        # pair i = (i, 50 + i) is always split across the groups, in one order or the other
        assert all({x, y} == {i, 50 + i} for i, (x, y) in enumerate(zip(a, b)))
        swaps += a != ia
    assert np.all((swaps > 60) & (swaps < 140))  # each pair swaps about half the time (200 draws)
    together = 0
    for _ in range(20):
        a, b = analyze.redraw_labels(ia, np.arange(50, 130), 'shuffled', rng)
        assert len(a) == 50 and len(b) == 80 and sorted(np.concatenate([a, b])) == list(range(130))
        together += sum(i in set(a) and 50 + i in set(a) for i in range(50))
    assert together > 0  # unlike the paired null, the shuffled one puts both members of a pair in one group

def test_paired_null_keeps_what_the_pairs_share():
    # 40 pairs whose members share a strong pattern (a frame and topic), and no effect of the condition.
    # The real split has each pair's two members in different groups, so the shared patterns cancel and t
    # is small everywhere; the paired null keeps that, the shuffled null does not (its groups hold
    # unequal shares of the patterns, and its t-maps spread ~6 times wider: too wide a null).
    rng = np.random.default_rng(0)
    shared = 2 * rng.standard_normal((40, 6, 6))
    g = np.concatenate([shared + 0.3 * rng.standard_normal((40, 6, 6)), shared + 0.3 * rng.standard_normal((40, 6, 6))])
    ia, ib = np.arange(40), np.arange(40, 80)
    spread = lambda a, b: analyze.welch_t(g[a], g[b])[0].std()
    paired = [spread(*analyze.redraw_labels(ia, ib, 'paired', rng)) for _ in range(10)]
    shuffled = [spread(*analyze.redraw_labels(ia, ib, 'shuffled', rng)) for _ in range(10)]
    assert spread(ia, ib) < 0.3 and max(paired) < 0.3 and min(shuffled) > 0.5

def test_contrasts_declare_their_null():
    assert {n: c[2] for n, c in analyze.CONTRASTS.items()} == {
        'language': 'paired', 'noun_verb': 'shuffled', 'noun_verb_words': 'shuffled',
        'concrete_abstract': 'shuffled', 'noun_verb_concrete': 'shuffled', 'noun_verb_abstract': 'shuffled',
        'sentiment': 'paired'}

# -----------------------------------------------------------------------------
# Grids, smoothing, correlation vs distance

def test_to_grid_places_units_at_their_positions():
    side = 4
    rng = np.random.default_rng(0)
    perm = rng.permutation(side * side)
    pos = np.stack([perm // side, perm % side], axis=1)  # unit u sits at pos[u], as TopoLM's positions
    values = np.arange(side * side, dtype=float)
    grid = analyze.to_grid(values, pos)
    for u in range(side * side):
        assert grid[pos[u, 0], pos[u, 1]] == values[u]
    np.testing.assert_array_equal(analyze.to_grid(values, pos.astype(np.float32)), grid)  # float integers
    # leading axes are kept: (N, D) -> (N, side, side); a non-square grid too
    assert analyze.to_grid(np.ones((3, side * side)), pos).shape == (3, side, side)
    rect = np.stack(np.divmod(np.arange(12), 4), axis=1)
    assert analyze.to_grid(np.arange(12.0), rect).shape == (3, 4)
    # only the integer lattice, one unit per cell: fractions, duplicates and holes are errors
    for bad in (pos / side, np.zeros((16, 2)), np.concatenate([pos[:-1], [[5, 5]]]), pos - 1):
        with pytest.raises(ValueError):
            analyze.to_grid(values, bad)

def test_smooth_fwhm():
    # a single active cell becomes a Gaussian whose value at distance FWHM/2 is half its peak
    x = np.zeros((21, 21))
    x[10, 10] = 1.0
    y = analyze.smooth(x, 4.0)
    assert y[10, 12] / y[10, 10] == pytest.approx(0.5, abs=1e-5)
    assert y[12, 10] / y[10, 10] == pytest.approx(0.5, abs=1e-5)
    # a constant map stays constant up to the borders; leading axes are kept
    z = analyze.smooth(np.full((2, 6, 5), 3.0), 2.5)
    np.testing.assert_allclose(z, 3.0, atol=1e-12)

def test_smoothed_t_maps_equal_the_official_unnormalised_kernel():
    # The official read-out (eval/hrf.py) gives each grid point the sum of all units' responses weighted by
    # exp(-d^2 / 2 sigma^2) / (2 pi sigma^2), with no renormalisation at the borders. Ours renormalises;
    # the maps differ by a positive factor per cell, which Welch's t does not see.
    rng = np.random.default_rng(0)
    g = rng.standard_normal((30, 6, 7))
    g[:14, 1:3, 2:5] += 0.8
    sigma = 2.0 / math.sqrt(8 * math.log(2))
    r, c = np.indices((6, 7)).reshape(2, -1)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    official = (g.reshape(30, 42) @ (np.exp(-d2 / (2 * sigma**2)) / (2 * np.pi * sigma**2))).reshape(30, 6, 7)
    ours = analyze.smooth(g, 2.0)
    assert not np.allclose(ours, official)  # different maps...
    t_ours, t_official = (analyze.welch_t(x[:14], x[14:])[0] for x in (ours, official))
    np.testing.assert_allclose(t_ours, t_official, rtol=1e-9, atol=1e-12)  # ...the same t-map

def test_correlation_profile():
    rng = np.random.default_rng(0)
    d, r = analyze.correlation_profile(rng.standard_normal((400, 6, 6)))
    np.testing.assert_array_equal(d, [1, 2, 3, 4, 5])
    assert np.abs(r).max() < 0.05  # independent units
    s = rng.standard_normal((50, 1, 1)) * np.linspace(1, 2, 36).reshape(1, 6, 6)  # one signal, scaled
    np.testing.assert_allclose(analyze.correlation_profile(s)[1], 1.0, atol=1e-12)
    # smoothed noise: neighbours correlate strongly, far units little
    _, r = analyze.correlation_profile(analyze.smooth(rng.standard_normal((200, 8, 8)), 3.0))
    assert r[0] > 0.6 and r[-1] < 0.2 and np.all(np.diff(r[:4]) < 0)

# -----------------------------------------------------------------------------
# Stimuli

ENGLISH_TWO_LETTER = set('ab ad ag am an as at av be by do ed go he hi id if in is it me my no of oh ok on op '
                         'or ox so to uk um up us we'.split())

def test_language_stimuli_12_words_matched_twins_of_non_words(enc):
    s = analyze.language_stimuli(1337)
    sent, non = s['sentences'], s['nonwords']
    assert len(sent) == len(non) >= 200
    assert len(set(sent)) == len(sent) and len(set(non)) == len(non)
    for a, b in zip(sent, non):
        wa, wb = a.rstrip('.').split(), b.rstrip('.').split()
        assert len(wa) == len(wb) == 12  # the Fedorenko original's length
        assert [len(w) for w in wa] == [len(w) for w in wb]  # word for word, letter for letter
        assert min(len(w) for w in wa) >= 2  # no one-letter words, which have no non-word twin
        assert a[0].isupper() and b[0].isupper() and a.endswith('.') and b.endswith('.')
        for i, w in enumerate(wb):
            low = w.lower()
            assert low.isalpha() and set(low) & set('aeiou') and low not in analyze._REAL_WORDS
            if len(w) == 2:
                assert low not in ENGLISH_TWO_LETTER
            else:  # not a word GPT-2 knows whole: more than one token, where it stands in the string
                assert len(enc.encode_ordinary(w if i == 0 else ' ' + w)) > 1, w

def test_phrase_stimuli_as_the_paper_tests_nouns_and_verbs():
    s = analyze.phrase_stimuli(1337)
    assert len(analyze.NOUNS) >= 4 and len(analyze.VERBS) >= 4
    for kind, article, categories in (('noun', 'the', analyze.NOUNS), ('verb', 'to', analyze.VERBS)):
        phrases = [p for c in categories for p in s[f'{kind}_{c}']]
        assert len(phrases) >= 200 and len(set(phrases)) == len(phrases)
        assert len({len(s[f'{kind}_{c}']) for c in categories}) == 1  # categories balanced
        for c, words in categories.items():
            assert len(words) >= 20 and len(set(words)) == len(words)
            xs, ys = [], []
            for p in s[f'{kind}_{c}']:
                m = re.fullmatch(rf"{article} (\w+) {article} (\w+)", p)
                assert m, p  # "the X the Y" / "to X to Y"
                x, y = m.groups()
                assert x != y and x in words and y in words  # two words of the same category
                xs.append(x)
                ys.append(y)
            # every word of the category as often first as second, and as often as any other word
            assert set(Counter(xs).values()) == set(Counter(ys).values()) == {len(xs) // len(words)}
    all_nouns = {w for ws in analyze.NOUNS.values() for w in ws}
    all_verbs = {w for ws in analyze.VERBS.values() for w in ws}
    assert not all_nouns & all_verbs
    assert sum(map(len, analyze.NOUNS.values())) == len(all_nouns)  # no word in two categories
    assert analyze.phrase_stimuli(7) == analyze.phrase_stimuli(7)
    assert analyze.phrase_stimuli(7) != analyze.phrase_stimuli(8)

def test_word_stimuli_2x2(enc):
    cells = analyze.WORDS
    assert set(cells) == {'concrete_nouns', 'abstract_nouns', 'concrete_verbs', 'abstract_verbs'}
    words = [w for ws in cells.values() for w in ws]
    assert all(len(ws) >= 40 for ws in cells.values())
    assert len(set(words)) == len(words)  # no word in two cells
    assert {len(ws) for ws in cells.values()} == {len(cells['concrete_nouns'])}  # balanced
    lengths = [np.mean([len(w) for w in ws]) for ws in cells.values()]
    assert max(lengths) - min(lengths) < 1.5  # letters, roughly matched
    tokens = [np.mean([len(enc.encode_ordinary(w)) for w in ws]) for ws in cells.values()]
    assert max(tokens) - min(tokens) < 0.3  # what the model sees, matched

def test_sentiment_stimuli_paired():
    s = analyze.sentiment_stimuli(1337)
    assert len(s['positive']) == len(s['negative']) >= 200
    assert len(set(s['positive'])) == len(s['positive'])
    for p, n in zip(s['positive'], s['negative']):
        diff = [(a, b) for a, b in zip(p.split(), n.split()) if a != b]
        assert len(p.split()) == len(n.split()) and len(diff) == 1  # only the adjective differs

def test_stimuli_reproducible_from_seed():
    assert analyze.builtin_stimuli(7) == analyze.builtin_stimuli(7)
    for cond in ('sentences', 'nonwords', 'noun_places', 'verb_hand', 'positive'):
        assert analyze.builtin_stimuli(7)[cond] != analyze.builtin_stimuli(8)[cond]

def test_every_contrast_has_its_stimuli():
    stim = analyze.builtin_stimuli(1)
    for name, ((la, ca), (lb, cb), null) in analyze.CONTRASTS.items():
        assert all(stim[c] for c in ca + cb), name
        assert sum(len(stim[c]) for c in ca) == sum(len(stim[c]) for c in cb), name  # balanced
        if null == 'paired':  # one condition each, stimulus i of the first paired with stimulus i of the second
            assert len(ca) == len(cb) == 1 and len(stim[ca[0]]) == len(stim[cb[0]])

# -----------------------------------------------------------------------------
# Command line and bad input: one line, exit 2

def test_analyze_help_lists_every_key_with_its_check(capsys):
    words = assert_help_names_every_key(analyze)
    assert '--sample ' in words
    notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", open(analyze.__file__).read().split('\nDEFAULTS')[0], re.M))
    checked = {k for k, note in notes.items() if re.match(r"((\S+ <=? )?x [<>]=? \S+): ", note)}
    assert checked == {'n_shuffles', 'fwhm', 'fdr', 'min_patch', 'batch_size', 'seed'}

@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    (d / 'notes.txt').write_text('not a checkpoint\n')
    torch.save({'model': {}, 'config': {}}, d / 'foreign.pt')
    torch.save({'model_type': 'resnet'}, d / 'odd.pt')
    torch.save({'model_type': 'topolm', 'model': {}}, d / 'no_config.pt')  # no model_args
    (d / 'a_file').write_text('x')
    return d

@pytest.mark.parametrize('argv, words', [
    (['{ckpt}', '--n_shuffles=-1'], ['--n_shuffles=-1', '>= 0']),
    (['{ckpt}', '--fdr=0'], ['--fdr=0', '0 < x < 1']),
    (['{ckpt}', '--fdr=1.5'], ['--fdr=1.5']),
    (['{ckpt}', '--fwhm=-1'], ['--fwhm=-1.0', '>= 0']),
    (['{ckpt}', '--fwhm=nan'], ['--fwhm=nan']),
    (['{ckpt}', '--batch_size=0'], ['--batch_size=0', '>= 1']),
    (['{ckpt}', '--min_patch=0'], ['--min_patch=0']),
    (['{ckpt}', '--seed=-2'], ['--seed=-2']),
    (['{ckpt}', '--n_shuffles=many'], ['n_shuffles', 'int']),
    (['{ckpt}', '--bogus=1'], ['bogus']),
    (['{ckpt}', '--contrasts=language,colour'], ['colour']),
    (['{ckpt}', '--device=tpu'], ['--device=tpu']),
    ([], ['usage']),
    (['{ckpt}', '{ckpt}'], ['usage']),
    (['{ckpt}', '--out_dir={bad}/a_file'], ['--out_dir', 'not a folder']),
    (['{ckpt}', '--out_dir={bad}/a_file/sub'], ['--out_dir', 'not a folder']),
    (['{bad}/missing.pt'], ['no checkpoint']),
    (['{bad}/notes.txt'], ['cannot be read']),
    (['{bad}/foreign.pt'], ['foreign']),
    (['{bad}/odd.pt'], ['resnet']),
    (['{bad}/no_config.pt'], ['incomplete', 'model_args']),
    (['{ckpt}', '--control={bad}/foreign.pt'], ['foreign']),
    (['{ckpt}', '--control={dir}/topoformer_control.pt'], ['Topoformer', 'same kind']),
    (['{dir}/topoformer.pt', '--control={dir}/topolm_control.pt'], ['TopoLM', 'same kind']),
    (['{ckpt}', '--positions={dir}'], ['--positions', 'official']),
    (['{dir}/topolm_short.pt', '--contrasts=sentiment,language'], ['block_size 32', 'the longest', '--contrasts']),
])
def test_bad_input_is_a_usage_error(argv, words, ckpts, bad_files, enc, tmp_path):
    fill = dict(ckpt=ckpts / 'topolm.pt', dir=ckpts, bad=bad_files)
    argv = [a.format(**fill) for a in argv]
    if not any(a.startswith('--out_dir') for a in argv):
        argv.append(f'--out_dir={tmp_path / "out"}')
    with pytest.raises(topo_gpt.UsageError) as e:
        analyze.main(argv)
    message = str(e.value)
    assert '\n' not in message
    for w in words:
        assert w in message, message
    assert not (tmp_path / 'out').exists()  # refused before anything was written

def test_command_prints_one_line_and_returns_2(ckpts, bad_files, enc, capsys):
    code = topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), '--fdr=0'])
    assert_one_line_error(code, capsys.readouterr().err, '--fdr=0')
    code = topo_gpt.command(analyze.main, [str(bad_files / 'foreign.pt'), f'--out_dir={bad_files / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'foreign')

def test_missing_tokenizer_is_one_line(ckpts, monkeypatch, capsys, tmp_path):
    import tiktoken
    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Max retries")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    code = topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'TIKTOKEN_CACHE_DIR', 'ConnectionError')
    assert 'tiktoken' not in vars(analyze)  # the tokenizer is loaded when needed, never at import

@pytest.mark.parametrize('content, words', [
    ("label,sentence\na,hello there\nb,good bye\n", ['condition,text']),
    ("condition,text\na,one thing\na,another thing\na,a third\n", ['exactly two', '1']),
    ("condition,text\na,x y\na,y z\nb,u v\nb,v w\nc,w x\nc,x w\n", ['exactly two', '3']),
    ("condition,text\na,the cat\na,the dog\nb,\nb,\n", ["'b'", '0 different non-empty']),
    ("condition,text\na,the cat\na,the dog\nb,one\n", ["'b'", '1 different non-empty']),
    ("condition,text\na,hello there\na,hello there\nb,good day\nb,good day\n", ["'a'", '1 different']),
    ("", ['condition,text']),
    ("condition,text\na,the cat\na,the dog\nb,the dog\nb,the cat\n", ['same texts']),
    ("condition,text\na,un caf\u00e9\na,the dog\nb,the cow\nb,the cat\n".encode('latin-1'),
     ['not UTF-8', 'save it as UTF-8']),
])
def test_bad_stimuli_csv(content, words, tmp_path):
    path = tmp_path / 'stim.csv'
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    # the CSV is checked before any checkpoint is opened: a missing checkpoint does not mask it
    with pytest.raises(topo_gpt.UsageError) as e:
        analyze.main([str(tmp_path / 'none.pt'), f'--stimuli={path}'])
    for w in words:
        assert w in str(e.value), str(e.value)

def test_read_stimuli_csv_ok(tmp_path):
    path = tmp_path / 'animals.csv'
    path.write_text('text,condition\n"Dogs bark, loudly.",animate\nStones sit.,inanimate\n'
                    'Cats purr.,animate\n,inanimate\nRocks fall.,inanimate\n', encoding='utf-8')
    name, groups = analyze.read_stimuli_csv(str(path))
    assert name == 'animals'
    assert list(groups) == ['animate', 'inanimate']  # the file's order: t = animate - inanimate
    assert groups['animate'] == ['Dogs bark, loudly.', 'Cats purr.']
    assert groups['inanimate'] == ['Stones sit.', 'Rocks fall.']  # the empty text is skipped

# -----------------------------------------------------------------------------
# The pipeline on tiny checkpoints

def test_unit_responses_mean_over_tokens_without_padding(ckpts, enc, capsys):
    model, info = analyze.load_model(str(ckpts / 'topolm.pt'), '', 'cpu')
    assert info == dict(checkpoint=str(ckpts / 'topolm.pt'), model_type='topolm', official=False, topographic=True,
                        step=0, losses=None)
    texts = ['The cat sat.', 'A much longer sentence than the others here.', 'Dogs bark.', 'justice']
    r = analyze.unit_responses(model, texts, enc, batch_size=2)
    assert list(r) == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    with torch.no_grad():
        for i, t in enumerate(texts):
            logits, _, maps = model(torch.tensor([enc.encode_ordinary(t)]), return_maps=True)
            for name, m in maps.items():
                np.testing.assert_allclose(r[name][i], m[0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert logits.shape[1] == len(enc.encode_ordinary(texts[-1]))  # the head is whole again afterwards

MAP_KEYS = {'morans_i', 'morans_i_null', 'morans_i_smoothed', 'morans_i_smoothed_null', 'percent_selective',
            'percent_selective_second', 'percent_selective_null', 'percent_selective_smoothed',
            'percent_selective_smoothed_null', 'patches', 'n_patches', 'n_patches_null',
            'largest_patch', 'n_patches_scattered', 'largest_patch_scattered'}

def test_pipeline_topolm_with_control(ckpts, enc, capsys, tmp_path):
    out = tmp_path / 'analysis'
    metrics, stdout = run_main([ckpts / 'topolm.pt', f'--control={ckpts / "topolm_control.pt"}', '--n_shuffles=2',
                                f'--out_dir={out}'], capsys)
    for name in analyze.CONTRASTS:
        assert (out / f'{name}.png').stat().st_size > 1000
        assert re.search(rf"^{name}: mean Moran's I -?\d\.\d\d vs control -?\d\.\d\d, difference [+-]\d\.\d\d; "
                         rf"smoothed", stdout, re.M)  # the one-line summary per contrast
    assert (out / 'correlation_distance.png').exists()
    # the tables: plain column names, model and control side by side, a difference and no ratio, a legend
    assert "| Moran's I   shuffled smoothed I   shuffled % selective  smoothed %   patches |" in stdout
    assert 'model: TopoLM (topographic)' in stdout and 'control: TopoLM (non-topographic)' in stdout
    assert "difference of the mean Moran's I, model - control" in stdout and 'ratio' not in stdout
    assert 'null: labels swapped within matched pairs' in stdout and 'null: labels shuffled over all stimuli' in stdout
    for key in ("Moran's I", 'shuffled', 'smoothed I', '% selective', 'smoothed %', 'patches', 'null: paired',
                'null: shuffled'):
        assert re.search(rf"^ *{re.escape(key)}  \w", stdout, re.M), key
    m = json.loads((out / 'metrics.json').read_text())
    assert m == json.loads(json.dumps(metrics, default=float).replace('NaN', 'null'))  # returned as written
    assert m['model']['topographic'] and not m['control']['topographic'] and not m['model']['official']
    assert m['model']['grid'] == [8, 8] and m['model']['maps'] == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    lang = m['model']['contrasts']['language']
    assert lang['conditions'] == ['sentences', 'non-words'] and lang['n_stimuli'] == [240, 240]
    assert lang['null'] == 'paired' and m['model']['contrasts']['noun_verb']['null'] == 'shuffled'
    assert m['model']['contrasts']['noun_verb']['n_stimuli'] == [288, 288]
    v = lang['maps']['h.0.attn']
    assert set(v) == MAP_KEYS
    assert set(v['morans_i_null']) == {'mean', 'sd'} and set(v['patches']) == {'positive', 'negative'}
    assert -1 <= v['morans_i'] <= 1 and -1 <= v['morans_i_smoothed'] <= 1
    assert 0 <= v['percent_selective'] + v['percent_selective_second'] <= 100
    # the smoothed read-out is reported beside the unsmoothed one, and differs from it
    for c in m['model']['contrasts'].values():
        assert c['mean_morans_i_smoothed'] is not None and c['mean_morans_i_smoothed_null']['mean'] is not None
        assert c['mean_morans_i_smoothed'] != c['mean_morans_i']
        assert c['mean_morans_i'] == pytest.approx(np.mean([x['morans_i'] for x in c['maps'].values()]))
    comp = m['comparison']['language']
    assert 'ratio' not in comp
    assert comp['difference'] == pytest.approx(comp['mean_morans_i'][0] - comp['mean_morans_i'][1])
    smoothed = comp['mean_morans_i_smoothed']
    assert comp['difference_smoothed'] == pytest.approx(smoothed[0] - smoothed[1])
    assert len(m['model']['correlation_profile']['h.1.mlp']['distance']) == 7

def test_a_full_disk_while_writing_the_analysis_is_one_line(ckpts, enc, capsys, tmp_path, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(analyze, 'plot_contrast', disk_full)
    code = topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), '--contrasts=language', '--n_shuffles=0',
                                           f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'could not write into', 'No space left')
    assert os.listdir(tmp_path / 'out') == []  # no temporary file left behind

def test_an_analysis_is_written_whole_or_not_at_all(ckpts, enc, capsys, tmp_path, monkeypatch, ctrl_c):
    # Ctrl-C while the figures are written leaves the folder's earlier analysis as it was, every file whole;
    # a run that finishes replaces it whole
    out = tmp_path / 'out'
    args = [str(ckpts / 'topolm.pt'), '--contrasts=language', '--n_shuffles=0', '--fwhm=0', f'--out_dir={out}']
    run_main(args, capsys)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert set(before) == {'language.png', 'correlation_distance.png', 'metrics.json'}
    real = analyze.plot_profiles
    def interrupted(path, *a):
        real(path, *a)
        open(path, 'r+b').truncate(124)  # the figure half written when Ctrl-C comes
        raise KeyboardInterrupt
    monkeypatch.setattr(analyze, 'plot_profiles', interrupted)
    code = topo_gpt.command(analyze.main, args + ['--seed=7'], interrupted='x')
    assert code == 130 and {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    monkeypatch.setattr(analyze, 'plot_profiles', real)
    run_main(args + ['--seed=7'], capsys)
    assert set(os.listdir(out)) == set(before) and json.loads((out / 'metrics.json').read_text())['config']['seed'] == 7

def test_one_colour_scale_set_by_the_99th_percentile_of_both_models(monkeypatch, tmp_path):
    # a few extreme t-values (the control's) must not pale every map: the shared scale is the 99th percentile of
    # all |t| of both models, and the colour bar says so
    seen = {}
    import matplotlib.axes
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, 'imshow', lambda self, *a, **k: seen.update(k) or real(self, *a, **k))
    rng = np.random.default_rng(0)
    model = {'h.0.attn': (rng.normal(0, 3, (8, 8)), np.zeros((8, 8)))}
    control = {'h.0.attn': (rng.normal(0, 3, (8, 8)), np.zeros((8, 8)))}
    control['h.0.attn'][0][0, 0] = 130.0
    mm = {'h.0.attn': dict(morans_i=0.5, morans_i_smoothed=None)}
    analyze.plot_contrast(str(tmp_path / 'x.png'), [('model: a', model, mm), ('control: b', control, mm)], 'title')
    both = np.abs(np.concatenate([model['h.0.attn'][0].ravel(), control['h.0.attn'][0].ravel()]))
    assert seen['vmax'] == pytest.approx(np.percentile(both, 99)) and seen['vmax'] < 20
    assert seen['vmin'] == -seen['vmax']

def test_samples_of_both_models_and_their_bad_prompts(ckpts, enc, capsys, tmp_path):
    # --sample prints what the model says beside its control, each line starting with the prompt; the default
    # analysis prints one short sample of each under its tables
    code = topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), f'--control={ckpts / "topolm_control.pt"}',
                                           '--sample=To be, or not to be'])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 2 and out[0].startswith('model:   To be, or not to be')
    assert out[1].startswith('control: To be, or not to be') and len(out[0]) > len('model:   To be, or not to be') + 10
    again = topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), '--sample=To be, or not to be'])
    assert again == 0 and capsys.readouterr().out.splitlines() == out[:1]  # the same seed, the same words
    long = 'word ' * 100  # longer than the context of 64: cropped, and said so
    assert topo_gpt.command(analyze.main, [str(ckpts / 'topolm.pt'), f'--sample={long}']) == 0
    assert 'lie beyond the context of 64' in capsys.readouterr().out
    code = topo_gpt.command(analyze.main, [str(ckpts / 'topoformer.pt'), f'--control={ckpts / "topoformer_control.pt"}',
                                           '--sample=The [MASK] was lovely.'])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].startswith('model:   The [MASK] was lovely. -> [MASK] = ')
    assert out[1].startswith('control: The [MASK] was lovely. -> [MASK] = ') and out[0].count(',') >= 4
    for ckpt, prompt, words in (('topolm.pt', ' ', 'empty'), ('topoformer.pt', 'No mask here.', '[MASK]')):
        code = topo_gpt.command(analyze.main, [str(ckpts / ckpt), f'--sample={prompt}'])
        assert_one_line_error(code, capsys.readouterr().err, words)

def test_pipeline_own_stimuli_unsmoothed(ckpts, enc, capsys, tmp_path):
    csv_path = tmp_path / 'animacy.csv'
    rows = ['condition,text'] + [f'animate,{w}' for w in 'dog cat horse farmer child bird'.split()] \
        + [f'inanimate,{w}' for w in 'stone table cup rock chair spoon'.split()]
    csv_path.write_text('\n'.join(rows) + '\n')
    metrics, stdout = run_main([ckpts / 'topolm.pt', f'--stimuli={csv_path}', '--fwhm=0',
                                f'--out_dir={tmp_path / "out"}', '--n_shuffles=1'], capsys)
    assert (tmp_path / 'out' / 'animacy.png').exists()
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert list(m['model']['contrasts']) == ['animacy'] and m['config']['fwhm'] == 0.0 and m['control'] is None
    c = m['model']['contrasts']['animacy']
    assert c['conditions'] == ['animate', 'inanimate'] and c['null'] == 'shuffled'
    assert c['mean_morans_i_smoothed'] is None and c['maps']['h.0.attn']['morans_i_smoothed'] is None
    assert 'null: labels shuffled over all stimuli, 1 draws' in stdout and 'not computed (--fwhm=0)' in stdout

def test_pipeline_topoformer_with_control(ckpts, enc, capsys, tmp_path):
    metrics, stdout = run_main([ckpts / 'topoformer.pt', f'--control={ckpts / "topoformer_control.pt"}',
                                '--contrasts=language,noun_verb_concrete', '--n_shuffles=1',
                                f'--out_dir={tmp_path}'], capsys)
    assert (tmp_path / 'language.png').exists() and (tmp_path / 'noun_verb_concrete.png').exists()
    assert metrics['model']['model_type'] == 'topoformer' and metrics['model']['topographic']
    assert not metrics['control']['topographic']
    assert metrics['model']['maps'] == ['h.0.q', 'h.0.k', 'h.0.v', 'h.0.out']
    assert 'model: Topoformer (topographic)' in stdout

def test_analyze_cli_subprocess(ckpts, enc, tmp_path):
    # the script as a user runs it (the one subprocess of this file): exit code 0, files written
    p = run_script(['analyze.py', str(ckpts / 'topolm.pt'), '--contrasts=noun_verb_abstract', '--n_shuffles=1',
                    f'--out_dir={tmp_path}'])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'noun_verb_abstract.png').exists() and (tmp_path / 'metrics.json').exists()
    assert "noun_verb_abstract: mean Moran's I" in p.stdout and p.stdout.count('To be, or not to be') == 1

# -----------------------------------------------------------------------------
# Over training: snapshots while training, and their analysis

def test_snapshot_steps():
    cfg = {**topo_gpt.DEFAULTS, 'max_iters': 400}
    assert topo_gpt.check_schedule({**cfg, 'snapshot_iters': 'log'}) == {0, 25, 50, 100, 200, 400}
    assert topo_gpt.check_schedule({**cfg, 'snapshot_iters': '0, 50,100'}) == {0, 50, 100}
    assert topo_gpt.check_schedule(cfg) == set()
    for bad in ('every', '0,,5', '500'):
        with pytest.raises(UsageError, match='snapshot_iters'):
            topo_gpt.check_schedule({**cfg, 'snapshot_iters': bad})

def test_snapshots_are_written_at_the_steps_asked_and_load(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    code, stdout, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--max_iters=6', '--eval_interval=100',
                                                   '--snapshot_iters=0,3,6'), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / 'snapshots')) == ['step_000000.pt', 'step_000003.pt', 'step_000006.pt']
    snap = torch.load(out / 'snapshots' / 'step_000003.pt', weights_only=False)
    assert snap['iter_num'] == 3 and 'optimizer' not in snap and set(snap['losses']) == {'train', 'val', 'val_spatial'}
    assert f"step 3: train ce {snap['losses']['train']:.4f}" in stdout
    model = GPT.from_checkpoint(str(out / 'snapshots' / 'step_000003.pt'))
    assert model.config.n_embd == 64 and not model.training
    # resumed, the run keeps the snapshots it had and adds the later ones
    code, _, err = cli(topo_gpt.main, ['--resume', f'--out_dir={out}', '--max_iters=8', '--snapshot_iters=3,8'], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / 'snapshots'))[-1] == 'step_000008.pt'
    code, _, err = cli(tf.main, [*TF_TINY_CLI, f'--data_dir={tiny_data}', '--dataset=tiny',
                                 f'--out_dir={tmp_path / "tf"}', '--max_iters=2', '--snapshot_iters=log'], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / 'tf' / 'snapshots')) == ['step_000000.pt', 'step_000002.pt']
    assert Topoformer.from_checkpoint(str(tmp_path / 'tf' / 'snapshots' / 'step_000002.pt')).config.n_embd == 64

def test_the_analysis_of_a_folder_of_snapshots(tiny_data, ckpts, enc, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / 'run'
    code, _, err = cli(topo_gpt.main, gpt_run(tiny_data, out, '--block_size=64', '--max_iters=60',
                                              '--eval_interval=100', '--snapshot_iters=log'), capsys)
    assert code == 0, err
    metrics = analyze.main([str(out / 'snapshots'), f'--control={ckpts / "topolm_control.pt"}',
                            '--contrasts=language,noun_verb'])
    stdout = capsys.readouterr().out
    assert '4 snapshots in' in stdout and '2 label redraws each' in stdout  # fewer redraws, and said
    assert re.search(r"^ +25 +\d+\.\d{3} \| +-?\d\.\d\d \(-?\d\.\d\d ± \d\.\d\d\)", stdout, re.M)
    folder = out / 'snapshots' / 'analysis'
    assert sorted(os.listdir(folder)) == ['metrics.json', 'over_training.gif', 'over_training.png',
                                          'over_training_maps.png']
    gif = Image.open(folder / 'over_training.gif')
    assert gif.n_frames == 4  # the maps at steps 0, 25, ... as an animation
    m = json.loads((folder / 'metrics.json').read_text())
    assert [e['step'] for e in m['over_training']] == [0, 25, 50, 60]
    single = analyze.main([str(out / 'snapshots' / 'step_000060.pt'), '--contrasts=language,noun_verb',
                           '--n_shuffles=2', f'--out_dir={tmp_path / "one"}'])
    capsys.readouterr()
    last = m['over_training'][-1]
    assert set(last['contrasts']['language']) == set(single['model']['contrasts']['language'])  # the same keys
    assert last['contrasts']['language']['mean_morans_i'] == pytest.approx(
        single['model']['contrasts']['language']['mean_morans_i'])  # and the same figures
    assert last['losses']['val'] > 0 and m['control']['topographic'] is False
    # a damaged snapshot, or a folder without any, is one clear line
    (out / 'snapshots' / 'step_000025.pt').write_bytes(b'PK half a file')
    code = topo_gpt.command(analyze.main, [str(out / 'snapshots'), '--contrasts=language'])
    assert_one_line_error(code, capsys.readouterr().err, 'step_000025.pt', 'cannot be read')
    code = topo_gpt.command(analyze.main, [str(tmp_path), '--contrasts=language'])
    assert_one_line_error(code, capsys.readouterr().err, 'holds no snapshots')

# -----------------------------------------------------------------------------
# The official TopoLM checkpoint format (the published models), on the tiny fixture in ../shared

@needs_official
def test_analyze_an_official_checkpoint(ckpts, enc, capsys, tmp_path):
    ckpt, positions = os.path.join(OFFICIAL, 'ckpt.pt'), os.path.join(OFFICIAL, 'gpt2-positions-3-5')
    # with --positions, and our own TopoLM as its control (the same kind of model)
    metrics, stdout = run_main([ckpt, f'--positions={positions}', f'--control={ckpts / "topolm_control.pt"}',
                                '--contrasts=language,noun_verb', '--n_shuffles=1', f'--out_dir={tmp_path / "a"}'],
                               capsys)
    assert metrics['model']['official'] and metrics['model']['model_type'] == 'topolm'
    assert metrics['model']['grid'] == [8, 8]
    assert metrics['model']['maps'] == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    assert 'model: TopoLM, official (topographic)' in stdout
    for f in ('language.png', 'noun_verb.png', 'correlation_distance.png', 'metrics.json'):
        assert (tmp_path / 'a' / f).stat().st_size > 100
    # the positions from the checkpoint's own position_dir, and an official control
    metrics, _ = run_main([ckpt, f'--control={ckpt}', '--contrasts=language', '--n_shuffles=1',
                           f'--out_dir={tmp_path / "b"}'], capsys)
    assert metrics['control']['official'] and metrics['comparison']['language']['difference'] == 0
    assert (tmp_path / 'b' / 'language.png').exists()

@needs_official
def test_official_places_that_share_cells_are_one_line(enc, tmp_path, capsys):
    # analyze.py draws one unit per cell: it says so before any work, and writes nothing
    (tmp_path / 'pos').mkdir()
    shared_cell_positions(tmp_path / 'pos')
    code = topo_gpt.command(analyze.main, [os.path.join(OFFICIAL, 'ckpt.pt'), f'--positions={tmp_path / "pos"}',
                                           f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'units take 63 of the 64 cells', 'one unit per cell')
    assert not (tmp_path / 'out').exists()

@needs_official
def test_official_checkpoint_without_its_positions_is_one_line(enc, tmp_path, capsys):
    ckpt = os.path.join(OFFICIAL, 'ckpt.pt')
    code = topo_gpt.command(analyze.main, [ckpt, f'--positions={tmp_path / "nowhere"}',
                                           f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'no unit positions', '--positions=DIR')
    # a copy of the checkpoint whose position_dir is not beside it
    os.symlink(ckpt, tmp_path / 'ckpt.pt')
    code = topo_gpt.command(analyze.main, [str(tmp_path / 'ckpt.pt'), f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(code, capsys.readouterr().err, 'gpt2-positions-3-5', '--positions=DIR')
    assert not (tmp_path / 'out').exists()

# -----------------------------------------------------------------------------
# the house: shared code that cannot drift, and a README that tells the truth

# Each script is self-contained, so the plumbing is written out in both model scripts (and the config and
# signal handling in prepare_data.py too): these copies must stay identical, to the character.
SHARED_CODE = {
    'topoformer.py': ['UsageError', 'parse_config', 'boolean', 'start_processes', 'precision', 'share_step',
                      'to_device', 'keep_freed_memory', 'check_schedule', 'signals_deferred', 'save_checkpoint',
                      'checkpoint_of', 'last_checkpoint', 'load_checkpoint', 'set_rng_state', 'resume_config',
                      'writable_dir', 'command', 'get_lr', 'train_step', 'open_split'],
    'prepare_data.py': ['UsageError', 'parse_config', 'boolean', 'signals_deferred', 'command'],
}
# written differently on purpose: what each model computes, reports and loads
DIFFERENT_BY_DESIGN = {'get_batch': 'MLM masks its batches', 'estimate_loss': 'CE + spatial loss vs loss + accuracy',
                       'main': 'the two training loops'}

def test_shared_code_is_identical_in_every_copy():
    modules = {'topoformer.py': tf, 'prepare_data.py': prepare_data}
    for file, names in SHARED_CODE.items():
        for name in names:
            assert inspect.getsource(getattr(topo_gpt, name)) == inspect.getsource(getattr(modules[file], name)), \
                f"{name} in {file} differs from topo_gpt.py's: change both copies alike"
    # everything else the two model scripts both define is either shared above or different by design
    def top_level(module):
        return {n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__}
    both = top_level(topo_gpt) & top_level(tf)
    shared = set(SHARED_CODE['topoformer.py'])
    assert both <= shared | set(DIFFERENT_BY_DESIGN), both - shared

def test_each_model_file_reads_in_nanogpts_order():
    # docstring, config, the science (its first line early), data, the loop's functions, main(), then the plumbing
    for module, first in ((topo_gpt, 'def distance_kernel'), (tf, 'def grid_coords')):
        text = open(module.__file__).read()
        lines = text.splitlines()
        assert text[:text.index(first)].count('\n') < 150, module.__name__  # the first line of topography
        main_at = next(i for i, l in enumerate(lines) if l.startswith('def main('))
        end = next(i for i in range(main_at + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
        main_len = len('\n'.join(lines[main_at:end]).rstrip().splitlines())
        assert main_len <= 100, (module.__name__, main_len)
        plumbing = text.index('# Plumbing that is not the model')
        for name in SHARED_CODE['topoformer.py'][:18]:
            assert text.index(f'{"class" if name == "UsageError" else "def"} {name}') > plumbing, name
        assert text.index('def main(') < plumbing and text.index('def get_batch(') < text.index('def train_step(')
    for path in ('topo_gpt.py', 'topoformer.py', 'analyze.py', 'prepare_data.py', 'bench.py', 'test_topo.py'):
        long = [i + 1 for i, l in enumerate(open(os.path.join(ROOT, path)).read().splitlines()) if len(l) > 120]
        assert not long, (path, long)

README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
CLASSROOM = open(os.path.join(ROOT, 'docs', 'classroom.md'), encoding='utf-8').read()
ANSWERS = open(os.path.join(ROOT, 'docs', 'classroom-answers.md'), encoding='utf-8').read()

def reference_answers():
    """Every ```python block of the teachers' answers (docs/classroom-answers.md), executed into one namespace."""
    ns = {}
    for block in ANSWERS.split('```python')[1:]:
        exec(block.split('```')[0], ns)
    return ns

@pytest.mark.parametrize('name, hook', [('absolute_loss', 'spatial_correlation_loss'),
                                        ('gaussian_kernel', 'distance_kernel'),
                                        ('cutoff_kernel', 'distance_kernel')])
def test_reference_answers_train(name, hook, monkeypatch, tiny_data):
    answer = reference_answers()[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 200, (4, 32))
    windows = topo_gpt.sample_neighborhoods(4, len(model.window_places), 3)
    model(idx, idx, windows=windows)
    before = model.spatial_loss.item()
    monkeypatch.setattr(topo_gpt, hook, answer)
    model(idx, idx, windows=windows)  # the same windows
    assert model.spatial_loss.item() != pytest.approx(before)  # the model really trains with it
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
    data = np.memmap(os.path.join(tiny_data, 'tiny', 'train.bin'), dtype=np.uint16, mode='r')
    sls = []
    for _ in range(20):
        X, Y = topo_gpt.get_batch(data, 8, 32)
        _, loss = model(X, Y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sls.append(model.spatial_loss.item())
    assert np.mean(sls[-5:]) < np.mean(sls[:5])  # and it lowers its own loss

def test_classroom_line_ranges_point_at_the_functions():
    # the handout says where to edit as "topo_gpt.py lines A-B (`name`)": keep them true
    found = re.findall(r'`(\w+\.py)` lines (\d+)-(\d+) \(`([\w.]+)`\)', CLASSROOM)
    assert len(found) >= 4
    for path, a, b, name in found:
        lines = open(os.path.join(ROOT, path)).read().splitlines()
        a, b = int(a), int(b)
        indent = lambda l: len(l) - len(l.lstrip())
        assert re.match(rf"(def|class) {name.split('.')[-1]}\b", lines[a - 1].strip()), (path, a, name)
        # a..b is the whole definition: its body, then the next line leaves it
        assert all(not l.strip() or indent(l) > indent(lines[a - 1]) for l in lines[a:b]), (path, a, b, name)
        after = lines[b] if b < len(lines) else ''
        assert not after.strip() or indent(after) <= indent(lines[a - 1]), (path, b, name)

def test_classroom_loop_runs_as_documented(tiny_data, tmp_path, capsys, monkeypatch):
    # the README's five-minute loop, each command through its script's main, on the tiny corpus and model
    gpt2()
    for text in (README, CLASSROOM):
        line = text.split('<!-- classroom-loop -->')[1].split('```')[1].strip().splitlines()[-1]
        monkeypatch.chdir(tmp_path)
        mains = {'topo_gpt.py': topo_gpt.main, 'topoformer.py': tf.main, 'analyze.py': analyze.main}
        for cmd in line.split('&&'):
            python, script, *args = cmd.split()
            assert python == 'python' and script in mains
            if script != 'analyze.py':
                args += [*TINY_CLI, '--block_size=64', f'--data_dir={tiny_data}', '--dataset=tiny', '--max_iters=6',
                         '--eval_interval=6', '--snapshot_iters=0,6' * ('snapshot' in cmd)]
            code, out, err = cli(mains[script], [a for a in args if a], capsys)
            assert code == 0, (cmd, err[-2000:])
        assert "Moran's I" in out and 'control' in out

def test_readme_test_command_is_what_ci_runs():
    ci = open(os.path.join(ROOT, '.ci', 'run')).read()
    command = 'python -m pytest -q test_topo.py'
    assert command in README and command in ci
