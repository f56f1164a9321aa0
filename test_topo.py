"""
Tests for topo-lm. Run: python -m pytest -q test_topo.py  (about 3 minutes on a 2-core CPU)
"""
import io
import os
import random
import sys
import json
import math
import time
import types
import signal
import tarfile
import subprocess
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(ROOT, '..', 'shared')
CACHE = os.path.join(SHARED, 'tiktoken_cache')
SHAKESPEARE = os.path.join(SHARED, 'data', 'shakespeare', 'complete_works.txt')
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(CACHE):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(CACHE)  # no vocab download offline
sys.path.insert(0, ROOT)

import tiktoken
import topo_gpt
import prepare_data
import analyze
import topoformer as tf
from topoformer import Topoformer, TopoformerConfig, SpatialSelfAttention
from topo_gpt import GPT, GPTConfig, spatial_correlation_loss

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, alpha=2.5, radius=3, n_neighborhoods=3)
# the same tiny model on the command line, for runs of the script itself
TINY_CLI = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--radius=3', '--n_neighborhoods=3',
            '--block_size=32', '--batch_size=4', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2']

def run(args, cwd=ROOT, timeout=600, **kw):
    """Run a script of the repo; returns the CompletedProcess (text)."""
    env = {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'}
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)

def assert_clean_error(p, *words):
    """A clear one-line error: non-zero exit, no traceback, the words in the message."""
    assert p.returncode != 0, p.stdout
    assert 'Traceback' not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]

@pytest.fixture(autouse=True)
def one_thread():
    """The models in these tests are tiny: one thread is as fast as two, and immune to the stalls a second
    OpenMP thread suffers on a busy machine (measured here: 10x slower steps at times)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """A small corpus as prepare_data.py would write it: data/tiny/{train,val}.bin."""
    d = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    # a repetitive 'language' over 200 tokens, so that a few steps can learn something
    base = rng.integers(0, 200, size=50)
    stream = np.concatenate([np.roll(base, rng.integers(0, 5)) for _ in range(200)]).astype(np.uint16)
    os.makedirs(d / 'tiny')
    stream[:9000].tofile(d / 'tiny' / 'train.bin')
    stream[9000:].tofile(d / 'tiny' / 'val.bin')
    return str(d)

# -----------------------------------------------------------------------------
# the spatial correlation loss

def smooth_fields(n_samples, side, width, seed=0):
    """n_samples random fields on a side x side grid, Gaussian-smoothed: responses that are a
    smooth function of position. (n_samples, side, side)"""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, 1, side + 4 * width, side + 4 * width, generator=g)
    ax = torch.arange(-2 * width, 2 * width + 1, dtype=torch.float32)
    k = torch.exp(-ax ** 2 / (2 * width ** 2))
    k2 = (k[:, None] * k[None, :])[None, None]
    return torch.nn.functional.conv2d(noise, k2)[:, 0, :side, :side]

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

def test_replacing_the_loss_changes_training(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 200, (2, 16))
    torch.manual_seed(1)
    _, loss = model(idx, idx)
    original = model.spatial_loss.item()
    grad_ref = torch.autograd.grad(loss, model.transformer.h[0].mlp.c_fc.weight)[0]

    def absolute_loss(x, pos):  # TDANN's older form: mean |r - D|, a classroom exercise
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True)
        r = x.transpose(1, 2) @ x
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

def test_spatial_loss_of_model_uses_the_sampled_windows():
    # a model's loss over its neighbourhoods equals the function applied window by window
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    maps = [torch.randn(2, 16, 64) for _ in range(4)]
    torch.manual_seed(5)
    total = model.spatial_loss_of(maps)
    torch.manual_seed(5)
    units, pos = topo_gpt.sample_neighborhoods(model.grid, 3, 3)
    expect = 0
    for m in range(4):
        for k in range(3):
            x = maps[m].reshape(32, 64)[:, units[m, k]]
            # the units' stored positions are the window's places
            assert torch.equal(model.unit_pos[m][units[m, k]], pos[m, k])
            expect = expect + spatial_correlation_loss(x, pos[m, k].float()) / 3
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    # windows are 5 x 5 squares of the lattice
    assert units.shape == (4, 3, 25)
    p = pos[0, 0]
    assert (p.max(0).values - p.min(0).values).tolist() == [4, 4]

# -----------------------------------------------------------------------------
# the model

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
    topo_gpt.save_checkpoint(path, model, opt, 0, 1.0, {})
    # a model built with another seed would place units elsewhere; the checkpoint's positions win
    loaded = GPT.from_checkpoint(path)
    for name in model.map_names:
        assert torch.equal(loaded.positions(name), model.positions(name))
    assert not torch.equal(GPT(GPTConfig(**{**TINY, 'seed': 7})).positions('h.0.attn'), seen[0])

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
    model.config.residual_maps = True
    for block in model.transformer.h:
        block.residual_maps = True
    _, _, res = model(idx, return_maps=True)
    x = res['h.1.mlp']
    torch.testing.assert_close(model.lm_head(model.transformer.ln_f(x)), logits)
    torch.testing.assert_close(res['h.1.mlp'] - res['h.1.attn'], maps['h.1.mlp'])

def test_training_lowers_the_loss(tiny_data):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
    data = np.memmap(os.path.join(tiny_data, 'tiny', 'train.bin'), dtype=np.uint16, mode='r')
    ces, sls = [], []
    for it in range(40):
        X, Y = topo_gpt.get_batch(data, 8, 32, 'cpu')
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
    topo_gpt.save_checkpoint(path, model, opt, 3, 1.0, {'seed': 1})
    loaded = GPT.from_checkpoint(path)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.config == model.config
    foreign = tmp_path / 'foreign.pt'
    torch.save({'model': model.state_dict()}, foreign)
    with pytest.raises(ValueError, match='not a TopoLM checkpoint'):
        GPT.from_checkpoint(str(foreign))

def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match='perfect square'):
        GPT(GPTConfig(**{**TINY, 'n_embd': 60}))
    with pytest.raises(ValueError, match='does not fit'):
        GPT(GPTConfig(**{**TINY, 'radius': 6}))

# -----------------------------------------------------------------------------
# the training script

def test_resume_is_bit_exact(tiny_data, tmp_path):
    common = TINY_CLI + [f'--data_dir={tiny_data}', '--dataset=tiny', '--eval_interval=3',
                         '--dropout=0.1', '--lr_decay_iters=8']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    p = run(['topo_gpt.py', *common, '--max_iters=8', f'--out_dir={a}'])
    assert p.returncode == 0, p.stderr
    p = run(['topo_gpt.py', *common, '--max_iters=4', f'--out_dir={b}'])
    assert p.returncode == 0, p.stderr
    p = run(['topo_gpt.py', '--resume', '--max_iters=8', f'--out_dir={b}'])
    assert p.returncode == 0, p.stderr
    ca = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=False)
    cb = torch.load(os.path.join(b, 'ckpt.pt'), weights_only=False)
    assert ca['iter_num'] == cb['iter_num'] == 8
    for k, v in ca['model'].items():
        assert torch.equal(v, cb['model'][k]), k
    assert ca['best_val_loss'] == cb['best_val_loss']

def test_training_script_end_to_end_and_nan_stop(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'out')
    args = TINY_CLI + [f'--data_dir={tiny_data}', '--dataset=tiny', '--eval_interval=4', f'--out_dir={out}']
    topo_gpt.main(args + ['--max_iters=4'])
    log = capsys.readouterr().out
    assert 'step 0: train ce' in log and 'val spatial loss' in log and 'tok/s' in log
    path = os.path.join(out, 'ckpt.pt')
    before = open(path, 'rb').read()
    monkeypatch.setattr(topo_gpt, 'spatial_correlation_loss', lambda x, pos: x.sum(dim=(1, 2)) * float('nan'))
    with pytest.raises(topo_gpt.UsageError, match='diverged.*last good checkpoint'):
        topo_gpt.main(args + ['--max_iters=8', '--resume'])
    assert open(path, 'rb').read() == before  # the good checkpoint is untouched
    assert not os.path.exists(path + '.tmp')

def test_cli_rejects_bad_input(tiny_data, tmp_path):
    assert_clean_error(run(['topo_gpt.py', '--n_layr=3']), "unknown config key 'n_layr'")
    assert_clean_error(run(['topo_gpt.py', '--batch_size=big']), 'expected a int')
    assert_clean_error(run(['topo_gpt.py', '--preset=huge']), 'unknown preset')
    assert_clean_error(run(['topo_gpt.py', '--n_embd=250', f'--data_dir={tiny_data}', '--dataset=tiny']),
                       'perfect square')
    assert_clean_error(run(['topo_gpt.py', f'--data_dir={tmp_path}', '--dataset=nothing']),
                       'prepare_data.py')
    assert_clean_error(run(['topo_gpt.py', '--resume', f'--out_dir={tmp_path}/none']), 'no checkpoint')
    p = run(['topo_gpt.py', '--help'])
    assert p.returncode == 0 and '--alpha=2.5' in p.stdout and '--compile=False' in p.stdout

def test_compile_runs_a_step(tiny_data, tmp_path):
    p = run(['topo_gpt.py', *TINY_CLI, '--compile', f'--data_dir={tiny_data}', '--dataset=tiny',
             '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path}'])
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'iter 2: loss' in p.stdout and os.path.exists(tmp_path / 'ckpt.pt')

def test_ddp_two_processes_on_cpu(tiny_data, tmp_path):
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'topo_gpt.py', *TINY_CLI, f'--data_dir={tiny_data}', '--dataset=tiny',
                        '--gradient_accumulation_steps=2', '--max_iters=3', '--eval_interval=3',
                        f'--out_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es)' in p.stdout and 'iter 3: loss' in p.stdout
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 3

# -----------------------------------------------------------------------------
# prepare_data.py

enc = tiktoken.get_encoding('gpt2')
EOT_TEXT = '<|endoftext|>'


def run_prepare(tmp_path, *args, env=None):
    """prepare_data.py as a user runs it, from tmp_path (so data/ lands there)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


def load(folder):
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    train = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16)
    val = np.fromfile(os.path.join(folder, 'val.bin'), dtype=np.uint16)
    return train, val, meta


def assert_prepare_error(r, *words, code=None):
    """Failed with one line on stderr, no traceback, mentioning words."""
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def assert_no_bins(folder):
    left = os.listdir(folder) if os.path.isdir(folder) else []
    assert not [f for f in left if f.endswith(('.bin', '.tmp', 'meta.json'))], left

# -----------------------------------------------------------------------------
# the local path (what every offline run and the README use)

def test_single_file_round_trip(tmp_path):
    # unicode, CRLF, tabs, trailing spaces: all must survive byte for byte
    text = ''.join(f"Line {i}: caf\u00e9 na\u00efve \u2014 \U0001F600\t  \r\nTo be, or not to be{i % 7}!\n\n"
                   for i in range(300))
    (tmp_path / 'play.txt').write_bytes(text.encode('utf-8'))
    r = run_prepare(tmp_path, '--input=play.txt')
    assert r.returncode == 0, r.stderr
    train, val, meta = load(tmp_path / 'data' / 'play')
    ids = enc.encode_ordinary(text)
    k = int(len(ids) * 0.1)
    # contiguous split: train = tokens[:-k], val = tokens[-k:] + [EOT], nothing lost or added
    assert train.tolist() == ids[:-k] and val.tolist() == ids[-k:] + [50256]
    assert enc.decode(train.tolist() + val.tolist()) == text + EOT_TEXT
    assert (train == 50256).sum() == 0 and (val == 50256).sum() == 1
    assert meta['train_tokens'] == len(train) and meta['val_tokens'] == len(val)
    assert meta['tokenizer'] == 'gpt2' and meta['eot_token'] == 50256 and meta['seed'] == 1337
    assert meta['val_fraction'] == 0.1 and meta['source'] == 'play.txt'


def make_folder(tmp_path, n=20):
    docs = {f'doc{i:02d}.txt': f"Document number {i}.\n" + "words and more words " * (i + 1) for i in range(n)}
    folder = tmp_path / 'corpus'
    folder.mkdir()
    for fname, text in docs.items():
        (folder / fname).write_text(text, encoding='utf-8')
    (folder / 'empty.txt').write_text('')  # skipped
    (folder / 'notes.md').write_text('not a .txt, ignored')
    return docs


def test_folder_split_by_documents(tmp_path):
    docs = make_folder(tmp_path)
    r = run_prepare(tmp_path, '--input=corpus', '--val_fraction=0.2')
    assert r.returncode == 0, r.stderr
    folder = tmp_path / 'data' / 'corpus'
    train, val, meta = load(folder)
    assert train.dtype == np.uint16 and os.path.getsize(folder / 'train.bin') == 2 * meta['train_tokens']
    assert os.path.getsize(folder / 'val.bin') == 2 * meta['val_tokens']
    got = {}
    for split, ids in (('train', train), ('val', val)):
        assert ids[-1] == 50256  # every document ends with EOT
        parts = enc.decode(ids.tolist()).split(EOT_TEXT)
        assert parts[-1] == ''
        got[split] = parts[:-1]
        assert len(got[split]) == meta[f'{split}_documents'] == (ids == 50256).sum()
    assert len(got['val']) == 4 and len(got['train']) == 16  # round(20 * 0.2)
    assert sorted(got['train'] + got['val']) == sorted(docs.values())  # each document exactly once
    assert got['train'] == sorted(got['train'], key=lambda t: int(t.split()[2][:-1]))  # name order


def test_seed_determines_split(tmp_path):
    make_folder(tmp_path)
    bins = {}
    for out, seed in (('a', 1), ('b', 1), ('c', 2)):
        assert run_prepare(tmp_path, '--input=corpus', f'--out_dir={out}', f'--seed={seed}').returncode == 0
        bins[out] = [(tmp_path / out / 'corpus' / f).read_bytes() for f in ('train.bin', 'val.bin')]
    assert bins['a'] == bins['b']
    assert bins['a'] != bins['c']


def test_few_documents_still_give_one_val_document(tmp_path):
    folder = tmp_path / 'three'
    folder.mkdir()
    for i in range(3):  # round(3 * 0.1) = 0, but val gets at least one document
        (folder / f'{i}.txt').write_text(f'document {i} ' * 20)
    assert run_prepare(tmp_path, '--input=three').returncode == 0
    train, val, meta = load(tmp_path / 'data' / 'three')
    assert (meta['train_documents'], meta['val_documents']) == (2, 1) == ((train == 50256).sum(), (val == 50256).sum())


@pytest.mark.parametrize('source', ['synthetic', 'shakespeare'])
def test_pieces_encode_like_the_whole(source):
    if source == 'shakespeare' and not os.path.exists(SHAKESPEARE):
        pytest.skip('needs ../shared/data')
    # "\n\n " is one pre-token before a word: cutting between its newlines would change the tokens
    text = (open(SHAKESPEARE, encoding='utf-8').read()[:300_000] if source == 'shakespeare'
            else ''.join(f"Paragraph {i} ends.\n\n  Then\tanother \n\n\n" for i in range(5000)))
    parts = list(prepare_data.pieces(text, size=2000))
    assert len(parts) > 50 and ''.join(parts) == text
    assert [t for p in parts for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_interrupt_leaves_no_files(tmp_path):
    def docs():
        yield 'train', 'some text ' * 100
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare_data.write_bins(docs(), str(tmp_path / 'out'))
    assert os.listdir(tmp_path / 'out') == []


def test_ctrl_c_removes_temporary_files(tmp_path):
    (tmp_path / 'big.txt').write_text("The quick brown fox jumps over the lazy dog, again.\n" * 400_000)  # 20 MB
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--input=big.txt'], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    tmp_bin, t0 = tmp_path / 'data' / 'big' / 'train.bin.tmp', time.time()
    while not tmp_bin.exists() and time.time() - t0 < 60:  # interrupt once tokens are being written
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == 'error: interrupted (temporary files removed)', err
    assert os.listdir(tmp_path / 'data' / 'big') == []


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason='needs ../shared/data')
def test_real_shakespeare(tmp_path):
    r = run_prepare(tmp_path, f'--input={os.path.abspath(SHAKESPEARE)}', '--name=shakespeare')
    assert r.returncode == 0, r.stderr
    train, val, meta = load(tmp_path / 'data' / 'shakespeare')
    assert meta['train_tokens'] + meta['val_tokens'] == 1_566_042 + 1  # the text's tokens + one EOT
    assert (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens']) == (1_409_438, 156_605)

# -----------------------------------------------------------------------------
# clean rejection: one line, no traceback, no half-written output

@pytest.mark.parametrize('setup, args, words', [
    (None, ['--input=nowhere.txt'], ['no such file or folder', 'nowhere.txt']),
    ('empty_file', ['--input=empty.txt'], ['no text', 'empty.txt']),
    ('empty_folder', ['--input=folder'], ['no text', 'folder']),
    ('empty_txts', ['--input=folder'], ['no text']),
    ('tiny', ['--input=tiny.txt'], ['too small']),
    ('latin1', ['--input=folder'], ['not UTF-8', 'b_latin1.txt']),
])
def test_bad_input(tmp_path, setup, args, words):
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
    r = run_prepare(tmp_path, *args)
    assert_prepare_error(r, *words, code=1)
    assert_no_bins(tmp_path / 'data' / os.path.splitext(args[0].split('=')[1])[0])


@pytest.mark.parametrize('args, words', [
    (['--bogus=1'], ['unknown argument', '--bogus']),
    (['shakespeare.txt'], ['unknown argument']),
    (['--seed=abc'], ['--seed=abc', 'int']),
    (['--seed=1.5'], ['int']),
    (['--val_fraction=lots'], ['float']),
    (['--val_fraction=1.5'], ['val_fraction']),
    (['--input'], ['needs a value']),
    (['--dataset=wikipedia'], ['--dataset=wikipedia']),
    (['--input=x.txt', '--dataset=imdb'], ['either']),
    (['--input=x.txt', '--max_tokens=100'], ['max_tokens']),
])
def test_bad_cli(tmp_path, args, words):
    assert_prepare_error(run_prepare(tmp_path, *args), *words, code=2)
    assert not (tmp_path / 'data').exists()


def test_help_lists_every_key(tmp_path):
    r = run_prepare(tmp_path, '--help')
    assert r.returncode == 0
    for k, v in prepare_data.DEFAULTS.items():
        assert f'--{k}={v}' in r.stdout

# -----------------------------------------------------------------------------
# downloads, offline

def test_strip_gutenberg():
    book = "THE SONNETS\r\n\r\nFrom fairest creatures we desire increase,\r\n"
    raw = ("\ufeffThe Project Gutenberg eBook of The Complete Works of William Shakespeare\r\n"
           "This eBook is for the use of anyone anywhere...\r\n\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\r\n\r\n\r\n"
           + book + "\r\n\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\r\n"
           "Updated editions will replace the previous one... Project Gutenberg License\r\n")
    assert prepare_data.strip_gutenberg(raw) == book.replace('\r\n', '\n').strip() + '\n'
    with pytest.raises(SystemExit):
        prepare_data.strip_gutenberg("<html>Service unavailable</html>")


def test_default_corpus_from_a_local_url(tmp_path, monkeypatch):
    # the no-argument run, with the Gutenberg URL pointed at a local file: download, strip, cache, tokenize
    book = ''.join(f"Sonnet {i}\r\nShall I compare thee to a summer's day?\r\n\r\n" for i in range(100))
    raw = tmp_path / 'pg100.txt'
    raw.write_bytes(("header\r\n*** START OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE ***\r\n" + book +
                     "*** END OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE ***\r\nlicence\r\n").encode('utf-8'))
    monkeypatch.setattr(prepare_data, 'GUTENBERG_URL', raw.as_uri())
    prepare_data.main([f'--out_dir={tmp_path / "data"}'])
    folder = tmp_path / 'data' / 'shakespeare'
    text = book.replace('\r\n', '\n').strip() + '\n'
    assert (folder / 'input.txt').read_text() == text
    assert sorted(os.listdir(folder)) == ['input.txt', 'meta.json', 'train.bin', 'val.bin']
    train, val, meta = load(folder)
    assert enc.decode(train.tolist() + val.tolist()) == text + EOT_TEXT and meta['source'] == raw.as_uri()


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(prepare_data.urllib.request, 'urlopen', offline)
    with pytest.raises(SystemExit) as e:
        prepare_data.main([f'--out_dir={tmp_path}'])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: could not download') and '--input' in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path / 'shakespeare') == []  # no partial input.txt, no .tmp


@pytest.mark.parametrize('dataset', ['shakespeare', 'imdb'])
def test_no_network_end_to_end(tmp_path, dataset):
    # a proxy that refuses connections stands in for "offline", wherever the tests run
    env = dict(os.environ, https_proxy='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9', no_proxy='', NO_PROXY='')
    r = run_prepare(tmp_path, f'--dataset={dataset}', env=env)
    assert_prepare_error(r, 'could not download', 'no network', code=1)
    assert os.listdir(tmp_path / 'data' / dataset) == []


def test_safe_extract(tmp_path, capsys):
    def tar_with(names):
        path = tmp_path / 'a.tar.gz'
        with tarfile.open(path, 'w:gz') as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 5
                tar.addfile(info, io.BytesIO(b'great'))
        return str(path)
    good = ['aclImdb/train/pos/0_9.txt', 'aclImdb/test/neg/1_2.txt']
    prepare_data.safe_extract(tar_with(good), str(tmp_path / 'ok'))
    assert (tmp_path / 'ok' / 'aclImdb' / 'train' / 'pos' / '0_9.txt').read_bytes() == b'great'
    with pytest.raises(SystemExit):
        prepare_data.safe_extract(tar_with(['aclImdb/x.txt', '../../evil.txt']), str(tmp_path / 'bad'))
    assert not (tmp_path / 'evil.txt').exists() and not (tmp_path.parent / 'evil.txt').exists()
    assert 'unsafe' in capsys.readouterr().err


def test_get_imdb_layout(tmp_path, monkeypatch):
    def fake_download(url, path, hint):  # what the archive holds, in miniature
        with tarfile.open(path, 'w:gz') as tar:
            for name in ('aclImdb/train/pos/0_9.txt', 'aclImdb/train/neg/1_1.txt', 'aclImdb/test/pos/2_8.txt'):
                info = tarfile.TarInfo(name)
                info.size = 4
                tar.addfile(info, io.BytesIO(b'okay'))
    monkeypatch.setattr(prepare_data, 'download', fake_download)
    prepare_data.main([f'--out_dir={tmp_path}', '--dataset=imdb'])
    assert sorted(os.listdir(tmp_path / 'imdb')) == ['aclImdb']  # archive and unpack.tmp gone
    assert (tmp_path / 'imdb' / 'aclImdb' / 'test' / 'pos' / '2_8.txt').read_text() == 'okay'

# -----------------------------------------------------------------------------
# the streamed corpora, with a stand-in for Hugging Face datasets

@pytest.mark.parametrize('dataset, hub_path, config', [('tinystories', 'roneneldan/TinyStories', None),
                                                       ('fineweb-edu', 'HuggingFaceFW/fineweb-edu', 'sample-10BT')])
def test_streamed_dataset(tmp_path, monkeypatch, dataset, hub_path, config):
    calls = []
    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return ({'text': f"Story {i}: once upon a time there was a topographic map."} for i in range(10**6))
    monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=load_dataset))
    prepare_data.main([f'--out_dir={tmp_path}', f'--dataset={dataset}', '--max_tokens=20000', '--seed=3'])
    assert calls == [(hub_path, config, 'train', True)]  # streamed, never the whole corpus
    train, val, meta = load(tmp_path / dataset)
    n = len(train) + len(val)
    assert 20000 <= n < 20000 + 30  # stops after the document that reaches --max_tokens
    n_docs = meta['train_documents'] + meta['val_documents']
    assert (train == 50256).sum() + (val == 50256).sum() == n_docs
    assert 0.05 < meta['val_documents'] / n_docs < 0.15  # each document to val with p = 0.1
    assert enc.decode(val.tolist()).split(EOT_TEXT)[0].startswith('Story ')


def test_streamed_dataset_missing_package_or_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import fails, as on a machine without it
    with pytest.raises(SystemExit):
        prepare_data.main([f'--out_dir={tmp_path}', '--dataset=fineweb-edu'])
    assert 'pip install datasets' in capsys.readouterr().err

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SystemExit):
        prepare_data.main([f'--out_dir={tmp_path}', '--dataset=fineweb-edu'])
    err = capsys.readouterr().err
    assert 'no network' in err and '--input' in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path / 'fineweb-edu') == []

# -----------------------------------------------------------------------------
# analyze.py: Welch's t and its p-values

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
    s = analyze.contrast_stats({'m': g}, ia, ib, 0.05, 25)['m']
    assert s['significant'][2:8, 3:9].all()
    assert len(s['patches']['positive']) == 1 and s['patches']['positive'][0] >= 36
    assert s['patches']['negative'] == []
    assert s['morans_i'] > 0.5
    perm = rng.permutation(60)
    null = analyze.contrast_stats({'m': g}, perm[:30], perm[30:], 0.05, 25)['m']
    assert null['percent'] < 5 and null['patches'] == {'positive': [], 'negative': []}

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
    # fractional coordinates in [0, 1) (cell corners or centres) give the same lattice
    np.testing.assert_array_equal(analyze.to_grid(values, pos / side), grid)
    np.testing.assert_array_equal(analyze.to_grid(values, (pos + 0.5) / side), grid)
    # leading axes are kept: (N, D) -> (N, side, side)
    assert analyze.to_grid(np.ones((3, side * side)), pos).shape == (3, side, side)
    with pytest.raises(ValueError):
        analyze.to_grid(values, np.zeros((16, 2)))

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

def _letters(text):
    return [len(w.strip('.,')) for w in text.split()]

def test_language_stimuli_balanced_and_matched():
    s = analyze.language_stimuli(1337)
    sent, non = s['sentences'], s['nonwords']
    assert len(sent) == len(non) >= 200
    assert len(set(sent)) == len(sent) and len(set(non)) == len(non)
    for a, b in zip(sent, non):
        assert _letters(a) == _letters(b)  # word for word, letter for letter
        for w in b.lower().strip('.').split():
            assert w.isalpha() and w not in analyze._REAL_WORDS and set(w) & set('aeiou')

def test_word_stimuli_2x2():
    cells = analyze.WORDS
    assert set(cells) == {'concrete_nouns', 'abstract_nouns', 'concrete_verbs', 'abstract_verbs'}
    words = [w for ws in cells.values() for w in ws]
    assert all(len(ws) >= 40 for ws in cells.values())
    assert len(set(words)) == len(words)  # no word in two cells
    assert {len(ws) for ws in cells.values()} == {len(cells['concrete_nouns'])}  # balanced
    lengths = [np.mean([len(w) for w in ws]) for ws in cells.values()]
    assert max(lengths) - min(lengths) < 1.5  # letters, roughly matched
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
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
    assert analyze.builtin_stimuli(7)['sentences'] != analyze.builtin_stimuli(8)['sentences']
    assert analyze.builtin_stimuli(7)['nonwords'] != analyze.builtin_stimuli(8)['nonwords']

def test_every_contrast_has_its_stimuli():
    stim = analyze.builtin_stimuli(1)
    for name, ((la, ca), (lb, cb)) in analyze.CONTRASTS.items():
        assert all(stim[c] for c in ca + cb), name
        assert sum(len(stim[c]) for c in ca) == sum(len(stim[c]) for c in cb), name  # balanced

# -----------------------------------------------------------------------------
# Command line and bad input

def _run_main(argv, capsys):
    """analyze.main in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        analyze.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def _assert_one_line_error(code, err, *words):
    assert code != 0
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert 'Traceback' not in err
    for w in words:
        assert w in err, err

def test_analyze_help_lists_every_key(capsys):
    code, out, _ = _run_main(['--help'], capsys)
    assert code == 0
    for k, v in analyze.DEFAULTS.items():
        assert f"--{k}={v}" in out

def test_analyze_cli_usage_errors(capsys):
    # unknown key and wrong type: one line, exit 2
    code, _, err = _run_main(['x.pt', '--bogus=1'], capsys)
    assert code == 2
    _assert_one_line_error(code, err, 'bogus')
    code, _, err = _run_main(['x.pt', '--n_shuffles=many'], capsys)
    assert code == 2
    _assert_one_line_error(code, err, 'n_shuffles')
    _assert_one_line_error(*_run_main([], capsys)[::2], 'usage')
    _assert_one_line_error(*_run_main(['x.pt', '--contrasts=language,colour'], capsys)[::2], 'colour')

def test_bad_checkpoints(capsys, tmp_path):
    import torch
    _assert_one_line_error(*_run_main([str(tmp_path / 'missing.pt')], capsys)[::2], 'no checkpoint')
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    _assert_one_line_error(*_run_main([str(text)], capsys)[::2], 'not a torch checkpoint')
    foreign = tmp_path / 'foreign.pt'
    torch.save({'model': {}, 'config': {}}, foreign)
    _assert_one_line_error(*_run_main([str(foreign)], capsys)[::2], 'foreign')
    odd = tmp_path / 'odd.pt'
    torch.save({'model_type': 'resnet'}, odd)
    _assert_one_line_error(*_run_main([str(odd)], capsys)[::2], 'resnet')

@pytest.mark.parametrize('content,words', [
    ("label,sentence\na,hello there\nb,good bye\n", ['condition,text']),
    ("condition,text\na,one thing\na,another thing\na,a third\n", ['exactly two', '1']),
    ("condition,text\na,x y\na,y z\nb,u v\nb,v w\nc,w x\nc,x w\n", ['exactly two', '3']),
    ("condition,text\na,the cat\na,the dog\nb,\nb,\n", ["'b'", '0 non-empty']),
    ("condition,text\na,the cat\na,the dog\nb,one\n", ["'b'", '1 non-empty']),
    ("", ['condition,text']),
])
def test_bad_stimuli_csv(capsys, tmp_path, content, words):
    path = tmp_path / 'stim.csv'
    path.write_text(content)
    # the CSV is checked before any checkpoint is opened: a missing checkpoint does not mask it
    _assert_one_line_error(*_run_main([str(tmp_path / 'none.pt'), f'--stimuli={path}'], capsys)[::2], *words)

def test_read_stimuli_csv_ok(tmp_path):
    path = tmp_path / 'animals.csv'
    path.write_text('text,condition\n"Dogs bark, loudly.",animate\nStones sit.,inanimate\n'
                    'Cats purr.,animate\n,inanimate\nRocks fall.,inanimate\n')
    name, groups = analyze.read_stimuli_csv(str(path))
    assert name == 'animals'
    assert list(groups) == ['animate', 'inanimate']  # the file's order: t = animate - inanimate
    assert groups['animate'] == ['Dogs bark, loudly.', 'Cats purr.']
    assert groups['inanimate'] == ['Stones sit.', 'Rocks fall.']  # the empty text is skipped

# -----------------------------------------------------------------------------
# The pipeline on tiny checkpoints

def _tiny_topolm(path, alpha, seed):
    import torch
    import topo_gpt
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, radius=3, alpha=alpha, seed=seed)
    model = topo_gpt.GPT(topo_gpt.GPTConfig(**args))
    cfg = {**topo_gpt.DEFAULTS, **args}
    topo_gpt.save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), 0, float('inf'), cfg)
    return model

@pytest.fixture(scope='module')
def topolm_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('topolm')
    _tiny_topolm(d / 'ckpt.pt', 2.5, 1)
    _tiny_topolm(d / 'control.pt', 0.0, 2)
    return d

def test_unit_responses_mean_over_tokens_without_padding(topolm_ckpts):
    import torch
    model, info = analyze.load_model(str(topolm_ckpts / 'ckpt.pt'))
    assert info == dict(checkpoint=str(topolm_ckpts / 'ckpt.pt'), model_type='topolm', topographic=True)
    texts = ['The cat sat.', 'A much longer sentence than the others here.', 'Dogs bark.', 'justice']
    r = analyze.unit_responses(model, texts, batch_size=2, log=lambda *a: None)
    assert list(r) == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    with torch.no_grad():
        for i, t in enumerate(texts):
            logits, _, maps = model(torch.tensor([enc.encode_ordinary(t)]), return_maps=True)
            for name, m in maps.items():
                np.testing.assert_allclose(r[name][i], m[0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert logits.shape[1] == len(enc.encode_ordinary(texts[-1]))  # the head is whole again afterwards

def test_pipeline_topolm_with_control(topolm_ckpts, capsys):
    out = topolm_ckpts / 'analysis'
    code, stdout, err = _run_main([str(topolm_ckpts / 'ckpt.pt'), f'--control={topolm_ckpts / "control.pt"}',
                                   '--n_shuffles=2'], capsys)
    assert code == 0, err
    for name in analyze.CONTRASTS:
        assert (out / f'{name}.png').stat().st_size > 1000
        assert f"{name}: mean Moran's I topo" in stdout  # the one-line summary per contrast
    assert (out / 'correlation_distance.png').exists()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['model']['topographic'] and not m['control']['topographic']
    assert m['model']['grid'] == [8, 8] and m['model']['maps'] == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    lang = m['model']['contrasts']['language']
    assert lang['conditions'] == ['sentences', 'nonwords'] and lang['n_stimuli'][0] >= 200
    v = lang['maps']['h.0.attn']
    for key in ('morans_i', 'morans_i_null', 'percent_selective', 'percent_selective_null', 'patches',
                'n_patches', 'n_patches_null', 'largest_patch', 'n_patches_scattered', 'largest_patch_scattered'):
        assert key in v
    assert set(v['morans_i_null']) == {'mean', 'sd'} and set(v['patches']) == {'positive', 'negative'}
    assert -1 <= v['morans_i'] <= 1 and 0 <= v['percent_selective'] <= 100
    comp = m['comparison']['language']
    assert comp['ratio'] == pytest.approx(comp['mean_morans_i'][0] / comp['mean_morans_i'][1])
    assert comp['difference'] == pytest.approx(comp['mean_morans_i'][0] - comp['mean_morans_i'][1])
    assert len(m['model']['correlation_profile']['h.1.mlp']['distance']) == 7

def test_pipeline_fwhm_and_own_stimuli(topolm_ckpts, capsys, tmp_path):
    csv_path = tmp_path / 'animacy.csv'
    rows = ['condition,text'] + [f'animate,{w}' for w in 'dog cat horse farmer child bird'.split()] \
        + [f'inanimate,{w}' for w in 'stone table cup rock chair spoon'.split()]
    csv_path.write_text('\n'.join(rows) + '\n')
    code, stdout, err = _run_main([str(topolm_ckpts / 'ckpt.pt'), f'--stimuli={csv_path}', '--fwhm=2',
                                   f'--out_dir={tmp_path / "out"}', '--n_shuffles=1'], capsys)
    assert code == 0, err
    assert (tmp_path / 'out' / 'animacy.png').exists()
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert list(m['model']['contrasts']) == ['animacy'] and m['config']['fwhm'] == 2.0
    assert m['model']['contrasts']['animacy']['conditions'] == ['animate', 'inanimate']
    assert 'smoothed with FWHM 2 grid units' in stdout  # labelled, also in the figures' titles

def test_analyze_cli_subprocess(topolm_ckpts, tmp_path):
    # the script as a user runs it: exit code 0, files written; and a bad file: one line, exit != 0
    cmd = [sys.executable, os.path.join(ROOT, 'analyze.py'), str(topolm_ckpts / 'ckpt.pt'),
           '--contrasts=noun_verb_abstract', '--n_shuffles=1', f'--out_dir={tmp_path}']
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'noun_verb_abstract.png').exists() and (tmp_path / 'metrics.json').exists()
    p = subprocess.run(cmd[:2] + [str(tmp_path / 'metrics.json')], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    _assert_one_line_error(p.returncode, p.stderr, 'not a torch checkpoint')

def _topoformer_or_skip():
    if not os.path.exists(os.path.join(ROOT, 'topoformer.py')):
        pytest.skip('topoformer.py does not exist yet')
    try:
        import topoformer
        return topoformer
    except Exception as e:  # a broken module is skipped here with its reason; its own tests fail
        pytest.skip(f'topoformer.py cannot be imported: {e}')

def test_pipeline_topoformer_with_control(tmp_path, capsys):
    tf = _topoformer_or_skip()
    import torch
    for name, s in (('ckpt.pt', 0.3), ('control.pt', 1.0)):
        torch.manual_seed(0)
        args = dict(n_layer=1, n_head=1, n_embd=64, ffn_size=128, block_size=64, sq=s, sr=s)
        model = tf.Topoformer(tf.TopoformerConfig(**args))
        tf.save_checkpoint(str(tmp_path / name), model, torch.optim.AdamW(model.parameters()), 0,
                           float('inf'), {**tf.DEFAULTS, **args})
    code, stdout, err = _run_main([str(tmp_path / 'ckpt.pt'), f'--control={tmp_path / "control.pt"}',
                                   '--contrasts=language,noun_verb_concrete', '--n_shuffles=1'], capsys)
    assert code == 0, err
    out = tmp_path / 'analysis'
    assert (out / 'language.png').exists() and (out / 'noun_verb_concrete.png').exists()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['model']['model_type'] == 'topoformer' and m['model']['topographic']
    assert not m['control']['topographic']
    assert m['model']['maps'] == ['h.0.q', 'h.0.k', 'h.0.v', 'h.0.out']
    assert "language: mean Moran's I topo" in stdout

# -----------------------------------------------------------------------------
# topoformer.py



def tf_tiny_config(**kw):
    args = dict(n_layer=2, n_head=1, n_embd=64, ffn_size=128, block_size=32, dropout=0.0, sq=0.3, sr=0.3)
    return TopoformerConfig(**{**args, **kw})


def tf_write_bins(root, name='tiny', n=20000, seed=0):
    """A token file MLM can learn from: sentences drawn from a small vocabulary, EOT between them."""
    rng = np.random.default_rng(seed)
    words = rng.choice(50000, size=40, replace=False)
    toks = []
    while len(toks) < n:
        toks += list(rng.choice(words, size=rng.integers(5, 15))) + [tf.EOT_ID]
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    arr = np.array(toks[:n], dtype=np.uint16)
    arr[: n * 9 // 10].tofile(os.path.join(d, 'train.bin'))
    arr[n * 9 // 10:].tofile(os.path.join(d, 'val.bin'))
    return str(root)


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


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'topoformer.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


# -----------------------------------------------------------------------------
# spatial geometry

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
    assert torch.equal(pos, pos.round())
    assert sorted(map(tuple, pos.long().tolist())) == [(r, c) for r in range(8) for c in range(8)]
    with pytest.raises(ValueError):
        model.positions('h.2.q')


# -----------------------------------------------------------------------------
# spatial querying, spatial reweighting, the control

def literal_attention(attn, x):
    """The paper's equations, written out: q' = q M, softmax(q' k^T / sqrt(D)) v, (W_o * mask)."""
    D = x.size(-1)
    q = x @ attn.c_q.weight.t()
    if attn.sq_matrix is not None:
        q = q @ attn.sq_matrix
    k, v = (x @ attn.c_kv.weight.t()).split(D, dim=-1)
    y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v
    w_o = attn.c_proj.weight
    if attn.sr_mask is not None:
        w_o = (w_o.abs() if attn.sr_nonneg else w_o) * attn.sr_mask
    return y @ w_o.t()


@pytest.mark.parametrize('wrap', [True, False])
def test_folded_spatial_querying_equals_the_literal_formula(wrap):
    torch.manual_seed(0)
    attn = SpatialSelfAttention(tf_tiny_config(n_embd=100, sq=0.2, sr=0.3, wrap=wrap))
    x = torch.randn(3, 9, 100)
    w = attn.c_q.weight
    folded = F.linear(x, attn.fold_queries(w))
    literal = (x @ w.t()) @ attn.sq_matrix
    torch.testing.assert_close(folded, literal, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x)[0], literal_attention(attn, x), atol=1e-6, rtol=1e-5)
    # M is the disc, normalised to unit Frobenius norm
    M = attn.sq_matrix
    assert M.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(M > 0, tf.disc_mask(10, 0.2, wrap) > 0)


def test_spatial_querying_pools_queries_locally():
    # a query that is one unit's impulse becomes, after pooling, nonzero exactly on that unit's disc
    torch.manual_seed(0)
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
    idx = torch.randint(0, 50257, (4, 32))
    inp, targets = tf.mask_tokens(idx)
    for _ in range(3):
        _, loss = model(inp, targets)
        loss.backward()
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
        torch.testing.assert_close(out, literal_attention(attn, x))
        with torch.no_grad():
            attn.c_proj.weight.neg_()
        torch.testing.assert_close(attn(x)[0], out)


def test_control_is_plain_multihead_attention():
    torch.manual_seed(0)
    attn = SpatialSelfAttention(tf_tiny_config(sq=1.0, sr=1.0))
    assert attn.sq_matrix is None and attn.sr_mask is None
    mha = nn.MultiheadAttention(64, 1, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.c_q.weight, attn.c_kv.weight]))
        mha.out_proj.weight.copy_(attn.c_proj.weight)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(attn(x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    # with more heads too
    attn4 = SpatialSelfAttention(tf_tiny_config(sq=1.0, sr=1.0, n_head=4))
    mha4 = nn.MultiheadAttention(64, 4, bias=False, batch_first=True)
    with torch.no_grad():
        mha4.in_proj_weight.copy_(torch.cat([attn4.c_q.weight, attn4.c_kv.weight]))
        mha4.out_proj.weight.copy_(attn4.c_proj.weight)
    torch.testing.assert_close(attn4(x)[0], mha4(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    # and the control's output projection is dense: no weight is zero
    assert torch.all(Topoformer(tf_tiny_config(sq=1.0, sr=1.0)).transformer.h[0].attn.c_proj.weight != 0)


def test_topoformer_return_maps():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config()).eval()
    idx = torch.randint(0, 50257, (3, 12))
    logits, loss, maps = model(idx, return_maps=True)
    assert loss is None and logits.shape == (3, 12, 50304)
    assert list(maps) == [f'h.{l}.{s}' for l in range(2) for s in ('q', 'k', 'v', 'out')]
    assert all(m.shape == (3, 12, 64) for m in maps.values())
    # the query map is the queries before pooling; the pooled ones feed the scores
    x = model.transformer.h[0].ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12)))
    torch.testing.assert_close(maps['h.0.q'], x @ model.transformer.h[0].attn.c_q.weight.t())
    torch.testing.assert_close(model(idx)[0], logits)


# -----------------------------------------------------------------------------
# masked language modelling

def test_mlm_masking_statistics():
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
    assert rand.min() >= 0 and rand.max() < tf.N_TOKENS  # random replacements are real GPT-2 tokens
    assert len(rand.unique()) > 1000
    # the special ids sit in the padded part of the vocabulary
    assert tf.N_TOKENS <= tf.MASK_ID < 50304 and tf.N_TOKENS <= tf.PAD_ID < 50304 and tf.MASK_ID != tf.PAD_ID
    # a tiny batch still has a target
    _, t = tf.mask_tokens(torch.zeros(1, 2, dtype=torch.long), torch.Generator().manual_seed(3))
    assert (t != tf.IGNORE_INDEX).sum() >= 1


def test_mlm_loss_is_on_the_masked_positions_only():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config()).eval()
    idx = torch.randint(0, 50257, (2, 16))
    inp, targets = tf.mask_tokens(idx, torch.Generator().manual_seed(1))
    logits, loss = model(inp, targets)
    picked = targets != tf.IGNORE_INDEX
    assert logits.shape == (picked.sum().item(), 50304)
    full, _ = model(inp)
    torch.testing.assert_close(logits, full[picked])
    torch.testing.assert_close(loss, F.cross_entropy(full.view(-1, 50304), targets.view(-1), ignore_index=-100))


def test_a_few_dozen_mlm_steps_lower_the_loss(tmp_path, capsys):
    data = tf_write_bins(tmp_path / 'data')
    tf.main([f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path / "out"}', '--n_layer=2',
             '--n_embd=64', '--ffn_size=128', '--block_size=32', '--batch_size=16', '--max_iters=40',
             '--eval_interval=40', '--eval_iters=4', '--warmup_iters=5', '--learning_rate=3e-3',
             '--log_interval=40'])
    out = capsys.readouterr().out
    vals = [float(line.split('val masked-token loss ')[1].split()[0].rstrip(','))
            for line in out.splitlines() if line.startswith('step')]
    assert vals[0] > 10 and vals[-1] < vals[0] - 3, out


# -----------------------------------------------------------------------------
# sentiment

def test_sentiment_beats_chance_on_a_separable_set(tmp_path, capsys):
    imdb = write_imdb(tmp_path / 'aclImdb')
    tf.main(['--task=sentiment', f'--imdb_dir={imdb}', f'--out_dir={tmp_path / "out"}', '--n_embd=64',
             '--ffn_size=128', '--block_size=48', '--batch_size=16', '--max_iters=40', '--eval_interval=40',
             '--eval_iters=2', '--warmup_iters=5', '--learning_rate=3e-3', '--log_interval=40'])
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith('test accuracy')][0]
    assert line.endswith('on 100 reviews')
    assert float(line.split()[2]) >= 0.85, out
    model = Topoformer.from_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert model.config.n_class == 2 and model.config.n_layer == 1 and model.config.sq == 0.1


def test_padding_does_not_change_the_classification():
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config(n_class=2)).eval()
    review = torch.randint(0, 50257, (1, 10))
    padded = torch.cat([review, torch.full((1, 7), tf.PAD_ID)], dim=1)
    torch.testing.assert_close(model(review)[0], model(padded)[0], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# checkpoints, resume, CLI

def test_topoformer_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Topoformer(tf_tiny_config(wrap=False, sq=0.2, dropout=0.1))
    opt = model.configure_optimizers(0.01, 1e-3, (0.9, 0.98), 'cpu')
    inp, targets = tf.mask_tokens(torch.randint(0, 50257, (2, 32)))
    model(inp, targets)[1].backward()
    opt.step()
    path = str(tmp_path / 'ckpt.pt')
    tf.save_checkpoint(path, model, opt, 1, 5.0, {'task': 'mlm'})
    assert not os.path.exists(path + '.tmp')
    ckpt = torch.load(path, weights_only=False)
    assert ckpt['model_type'] == 'topoformer' and ckpt['iter_num'] == 1
    assert {'torch', 'numpy', 'python', 'cuda'} <= set(ckpt['rng'])
    loaded = Topoformer.from_checkpoint(path)
    assert not loaded.training and loaded.config == model.config
    model.eval()
    a, b = model(inp, targets, return_maps=True), loaded(inp, targets, return_maps=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_topoformer_resume_is_bit_exact(tmp_path):
    data = tf_write_bins(tmp_path / 'data')
    common = [f'--data_dir={data}', '--dataset=tiny', '--n_layer=2', '--n_embd=64', '--ffn_size=128',
              '--block_size=32', '--batch_size=4', '--dropout=0.1', '--eval_iters=2', '--warmup_iters=2',
              '--lr_decay_iters=8', '--eval_interval=4', '--log_interval=100']
    a, b = tmp_path / 'a', tmp_path / 'b'
    tf.main(common + [f'--out_dir={a}', '--max_iters=8'])
    tf.main(common + [f'--out_dir={b}', '--max_iters=4'])
    halfway = torch.load(b / 'ckpt.pt', weights_only=False)
    assert halfway['iter_num'] == 4
    tf.main([f'--out_dir={b}', '--resume', '--max_iters=8'])
    ca = torch.load(a / 'ckpt.pt', weights_only=False)
    cb = torch.load(b / 'ckpt.pt', weights_only=False)
    assert ca['iter_num'] == cb['iter_num'] == 8
    assert ca['model'].keys() == cb['model'].keys()
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)
    assert not torch.equal(halfway['model']['transformer.h.0.attn.c_q.weight'],
                           cb['model']['transformer.h.0.attn.c_q.weight'])  # the resumed half did train


def test_parse_args_presets_and_task_defaults():
    cfg, _ = tf.parse_args(['--compile'])
    assert cfg['compile'] is True and cfg['n_embd'] == 256 and cfg['task'] == 'mlm'
    cfg, _ = tf.parse_args(['--preset=paper', '--n_layer=2'])
    assert (cfg['n_embd'], cfg['ffn_size'], cfg['n_layer'], cfg['sq'], cfg['sr'], cfg['grad_clip']) == \
        (784, 3072, 2, 0.3, 0.3, 0.5)
    cfg, _ = tf.parse_args(['--task=sentiment', '--sq=0.2'])
    assert (cfg['n_layer'], cfg['n_embd'], cfg['sq'], cfg['sr']) == (1, 400, 0.2, 0.3)
    cfg, _ = tf.parse_args(['--preset=classroom', '--sq=1', '--sr=1'])
    assert cfg['sq'] == cfg['sr'] == 1.0 and cfg['max_iters'] == tf.PRESETS['classroom']['max_iters']


@pytest.mark.parametrize('args, message', [
    (['--n_embd=250'], 'perfect square'),
    (['--sq=0'], 'sq=0.0 is outside (0, 1]'),
    (['--sr=1.5'], 'sr=1.5 is outside (0, 1]'),
    (['--dataset=nope'], 'prepare_data.py'),
    (['--task=sentiment', '--imdb_dir=WRONG'], 'IMDB layout'),
    (['--n_layr=3'], "unknown config key 'n_layr'"),
    (['--batch_size=big'], '--batch_size=big: expected'),
    (['--task=translate'], 'unknown task'),
    (['--preset=huge'], 'unknown preset'),
])
def test_topoformer_bad_input_is_one_clean_line(tmp_path, args, message):
    if args[0] == '--task=sentiment':  # an IMDB folder without the pos/neg layout
        os.makedirs(tmp_path / 'WRONG' / 'train')
        args = ['--task=sentiment', f'--imdb_dir={tmp_path / "WRONG"}']
    r = run_cli(*args, f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', cwd=tmp_path)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], r.stderr


def test_context_overflow_and_task_mismatch_are_rejected(tmp_path):
    model = Topoformer(tf_tiny_config(block_size=16))
    with pytest.raises(ValueError, match='longer than block_size'):
        model(torch.zeros(1, 17, dtype=torch.long))
    cfg, _ = tf.parse_args(['--n_layer=2', '--n_embd=64', '--ffn_size=128', '--block_size=16'])
    os.makedirs(tmp_path / 'out')
    tf.save_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'), model,
                       model.configure_optimizers(0.0, 1e-3, (0.9, 0.98), 'cpu'), 0, 9.9, cfg)
    r = run_cli(f'--out_dir={tmp_path / "out"}', '--resume', '--block_size=64')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: block_size=64 is longer than the model's context (16 tokens)"]
    r = run_cli(f'--out_dir={tmp_path / "out"}', '--resume', '--task=sentiment')  # an MLM checkpoint
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --task=sentiment does not fit the checkpoint's model (a masked LM)"]


def test_topoformer_help_lists_every_key():
    r = run_cli('--help')
    assert r.returncode == 0
    for key in tf.DEFAULTS:
        assert f'--{key}=' in r.stdout
    assert 'paper' in r.stdout and 'classroom' in r.stdout and '--task=sentiment sets' in r.stdout


def test_bench_compares_with_the_control(tmp_path):
    r = run_cli('--bench', '--n_layer=1', '--n_embd=64', '--ffn_size=128', '--block_size=16', '--batch_size=2',
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'control (sq=1.0, sr=1.0)' in r.stdout and 'topoformer (sq=0.3, sr=0.3)' in r.stdout
    ratio = float(r.stdout.split('topoformer/control ratio: ')[1].split()[0])
    assert 0.3 < ratio < 3


def test_topoformer_compile_runs_a_step(tmp_path, capsys):
    data = tf_write_bins(tmp_path / 'data')
    tf.main([f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path / "out"}', '--compile',
             '--n_layer=1', '--n_embd=64', '--ffn_size=128', '--block_size=16', '--batch_size=4',
             '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1'])
    out = capsys.readouterr().out
    assert 'compiling' in out and 'iter 2: loss' in out
    loss = float(out.split('iter 2: loss ')[1].split(',')[0])
    assert math.isfinite(loss) and 5 < loss < 12

# -----------------------------------------------------------------------------
# the classroom (README, "Classroom"): the five-minute loop and the reference answers run as written

README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()

def readme_answers():
    """Every ```python block of the README's worked answers (<details>), executed into one namespace."""
    ns = {}
    for details in README.split('<details>')[1:]:
        for block in details.split('</details>')[0].split('```python')[1:]:
            exec(block.split('```')[0], ns)
    return ns

@pytest.mark.parametrize('name, hook', [('absolute_loss', 'spatial_correlation_loss'),
                                        ('gaussian_kernel', 'distance_kernel'),
                                        ('cutoff_kernel', 'distance_kernel')])
def test_reference_answers_train(name, hook, monkeypatch, tiny_data):
    answer = readme_answers()[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 200, (4, 32))
    torch.manual_seed(1)
    model(idx, idx)
    before = model.spatial_loss.item()
    monkeypatch.setattr(topo_gpt, hook, answer)
    torch.manual_seed(1)  # the same windows
    model(idx, idx)
    assert model.spatial_loss.item() != pytest.approx(before)  # the model really trains with it
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
    data = np.memmap(os.path.join(tiny_data, 'tiny', 'train.bin'), dtype=np.uint16, mode='r')
    sls = []
    for _ in range(20):
        X, Y = topo_gpt.get_batch(data, 8, 32, 'cpu')
        _, loss = model(X, Y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sls.append(model.spatial_loss.item())
    assert np.mean(sls[-5:]) < np.mean(sls[:5])  # and it lowers its own loss

def test_readme_line_ranges_point_at_the_functions():
    # the exercises say where to edit as "topo_gpt.py lines A-B (`name`)": keep them true
    import re
    found = re.findall(r'`(\w+\.py)` lines (\d+)-(\d+) \(`([\w.]+)`\)', README)
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

def test_classroom_loop_runs_as_documented(tiny_data, tmp_path):
    # the README's one-line loop, on the tiny corpus with a tiny model (the real one takes ~5 minutes)
    line = README.split('<!-- classroom-loop -->')[1].split('```')[1].strip().splitlines()[-1]
    for cmd in line.split('&&'):
        args = cmd.split()
        assert args[0] == 'python'
        script = os.path.join(ROOT, args[1])
        extra = []
        if args[1] in ('topo_gpt.py', 'topoformer.py'):
            extra = TINY_CLI + [f'--data_dir={tiny_data}', '--dataset=tiny', '--max_iters=6', '--eval_interval=6']
        p = run([script, *args[2:], *extra], cwd=tmp_path)
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
    assert "mean Moran's I topo" in p.stdout and 'control' in p.stdout
