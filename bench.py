"""
How fast a training step is, and what topography costs, as nanoGPT's bench.py: the real training step of
topo_gpt.py or topoformer.py on random tokens, two kinds of step timed against each other in one process.

    python bench.py topo_gpt [--key=value ...]      # the spatial loss on and off, then the loss alone
    python bench.py topoformer [--key=value ...]    # the Topoformer and its control (sq = sr = 1)
    python bench.py topo_gpt --preset=paper --compile

Takes the model script's own config keys and presets. Prints ms/step, tokens/s, peak memory, GFLOP/s (CPU)
or MFU (CUDA, against the GPU's dense bf16 peak, peak_flops' table) and the ratio of the two kinds of step
(docs/speed.md says how it measures and what it has measured).
"""
import os
import sys
import time
import resource
import warnings

import numpy as np
import torch

import topo_gpt
import topoformer

def peak_flops(dev):
    """(dense bf16/fp16 peak FLOP/s of the GPU, which GPU it is) for the MFU; None off CUDA."""
    if 'cuda' not in dev:
        return None
    name = torch.cuda.get_device_name(dev)
    for gpu, tflops in (('H200', 989), ('H100 PCIe', 756), ('H100', 989), ('A100', 312), ('L40S', 362), ('L4', 121),
                        ('A10', 125), ('RTX 4090', 165), ('RTX 3090', 71), ('V100', 125), ('T4', 65)):
        if gpu in name:
            return tflops * 1e12, f"the {gpu}'s {tflops} TFLOP/s"
    return 312e12, f"an A100's 312 TFLOP/s ({name} is not in peak_flops' table)"

def flops_per_token(model):
    """Training flops per token (PaLM appendix B, as nanoGPT): 6 per parameter a token passes through, plus attention.
    The Topoformer's embedding is a lookup, and its prediction head and decoder (tied to the embedding) run only on
    the 15% of the tokens that are masked (MLM), or not at all (a classifier); the SQ fold is not counted."""
    cfg, D, params = model.config, model.config.n_embd, model.get_num_params()
    if isinstance(model, topoformer.Topoformer):
        head = cfg.vocab_size * D + (0 if cfg.n_class else D * D)  # the decoder (tied to the embedding), the MLM's head
        params -= head * (1 if cfg.n_class else 1 - topoformer.MASK_PROB)  # run on the masked tokens only, or never
    return 6 * params + 12 * cfg.n_layer * D * cfg.block_size

def compare_steps(steps, tokens, dev, rounds=10, block=4):
    """
    Time two kinds of training step, {label: (step function, flops per token)}, the first against the second,
    in one process: in each round each runs block + 1 steps in turn, the order alternating and the first step
    after a switch not timed, so that drifting machine speed hits both alike and each is measured in its steady
    state. Prints ms/step, tokens/s, peak memory, GFLOP/s or MFU and the ratio; returns the median s/step of each.
    """
    cuda, peak = 'cuda' in dev, peak_flops(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, memory = {label: [] for label in steps}, {}
    for label, (step, _) in steps.items():  # warm up (and compile) each; the peak memory in this order
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        sync()
        memory[label] = (torch.cuda.max_memory_allocated() if cuda else
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(f"{rounds} rounds of {block} steps each, alternating" + (f"; mfu against {peak[1]}" if peak else ''))
    for r in range(rounds):
        for label in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            steps[label][0]()  # the switch
            sync()
            t = time.perf_counter()
            for _ in range(block):
                steps[label][0]()
            sync()
            times[label].append((time.perf_counter() - t) / block)
    medians = {label: float(np.median(t)) for label, t in times.items()}
    for label, (_, per_token) in steps.items():
        s = medians[label]
        flops = per_token * tokens / s
        rate = f"mfu {flops / peak[0]:.1%}" if peak else f"{flops / 1e9:5.1f} GFLOP/s"
        print(f"{label:34s} {s * 1000:8.1f} ms/step  {tokens / s:9,.0f} tok/s  peak {memory[label]:7,.0f} MiB  {rate}")
    (la, a), (lb, b) = times.items()
    print(f"ratio of the two: {medians[la] / medians[lb]:.3f} (medians), {np.median(np.array(a) / np.array(b)):.3f} "
          f"(median of the {rounds} rounds)")
    return medians

def setup(module, argv):
    """The model script's config, device, dtype and share of a step, as its main() sets them up."""
    cfg, _ = module.parse_config(argv, module.DEFAULTS, module.PRESETS, module.__doc__, module.__file__)
    cfg = {**cfg, **getattr(module, 'TASK_DEFAULTS', {}).get(cfg.get('task'), {})}
    if cfg.get('task', 'mlm') != 'mlm':
        raise module.UsageError("bench.py times the masked language model (--task=mlm)")
    _, _, _, dev = module.start_processes(cfg['device'])
    dtype, ctx, scaler = module.precision(cfg['dtype'], dev)
    accum, B = module.share_step(cfg['gradient_accumulation_steps'], cfg['batch_size'], 1)
    if cfg['compile']:  # (as the scripts do: inductor's notes are on its internals, not on the model)
        warnings.filterwarnings('ignore', module=r'torch\._inductor')
    print(f"{module.__name__}: batch {B} x {cfg['block_size']} x {accum} accum, {dtype}, {dev}")
    return cfg, dev, ctx, scaler, accum, B

def bench_topo_gpt(argv):
    """ms/step with the spatial loss on (alpha as configured, 2.5 for a control) and off (alpha = 0), on random
    tokens; then the spatial loss by itself, forward and backward, on the maps of one batch: what it costs
    apart from the rest of the step (and what a replaced spatial_correlation_loss costs)."""
    m = topo_gpt
    cfg, dev, ctx, scaler, accum, B = setup(m, argv)
    torch.manual_seed(cfg['seed'])
    model = m.GPT(m.GPTConfig(**{k: cfg[k] for k in m.GPTConfig.__dataclass_fields__ if k in cfg})).to(dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                           dev.split(':')[0])
    compiled = torch.compile(model) if cfg['compile'] else model
    tokens = torch.randint(0, m.GPT2_VOCAB, (B, cfg['block_size'] + 1), generator=torch.Generator().manual_seed(0))
    M, W, K = len(model.map_names), len(model.window_places), cfg['n_neighborhoods']
    batch = lambda: (*m.to_device(dev, tokens[:, :-1], tokens[:, 1:]),
                     dict(windows=m.to_device(dev, m.sample_neighborhoods(M, W, K))[0]))
    alpha = model.config.alpha or 2.5

    def step(a):
        model.config.alpha = a
        m.train_step(compiled, optimizer, scaler, ctx, batch, accum, cfg['grad_clip'])
    off = 'spatial loss off (alpha=0)'
    medians = compare_steps({f'spatial loss on (alpha={alpha})': (lambda: step(alpha), flops_per_token(model)),
                             off: (lambda: step(0.0), flops_per_token(model))}, B * cfg['block_size'] * accum, dev)
    x, _, kw = batch()
    with torch.no_grad(), ctx:
        maps = [t.requires_grad_() for t in model(x, return_maps=True)[2].values()]  # leaves, in the run's dtype

    def loss_alone():  # the forward under autocast, the backward outside it, as in a training step
        for t in maps:
            t.grad = None
        with ctx:
            loss = model.spatial_loss_of(maps, kw['windows'])
        loss.backward()
        if 'cuda' in dev:
            torch.cuda.synchronize()
    times = []
    for _ in range(23):  # the first 3 warm up
        t = time.perf_counter()
        loss_alone()
        times.append(time.perf_counter() - t)
    s, (b, T, _) = float(np.median(times[3:])), maps[0].shape
    print(f"the spatial loss alone, forward and backward ({len(maps)} maps x {K} window{'s' * (K != 1)} of "
          f"{model.window_places.size(1)} units, {b * T:,} tokens): {s * 1000:.1f} ms, "
          f"{s / medians[off] * 100:.1f}% of a step without it")

def bench_topoformer(argv):
    """ms/step of the Topoformer (sq, sr as configured, 0.3 where they are 1) and of its control (sq = sr = 1) at
    the same size, on the same random masked batch."""
    m = topoformer
    cfg, dev, ctx, scaler, accum, B = setup(m, argv)
    g = torch.Generator().manual_seed(0)
    x, y = m.mask_tokens(torch.randint(0, m.EOT_ID, (B, cfg['block_size']), generator=g), g)
    x, y, picked = m.to_device(dev, x, y, (y.view(-1) != m.IGNORE_INDEX).nonzero().squeeze(1))
    steps, topo = {}, tuple(v if v < 1 else 0.3 for v in (cfg['sq'], cfg['sr']))
    for name, (sq, sr) in (('topoformer', topo), ('control', (1.0, 1.0))):
        torch.manual_seed(cfg['seed'])
        args = {k: cfg[k] for k in m.TopoformerConfig.__dataclass_fields__ if k in cfg}
        model = m.Topoformer(m.TopoformerConfig(**{**args, 'sq': sq, 'sr': sr})).to(dev)
        optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                               dev.split(':')[0], cfg['adam_eps'])
        compiled = torch.compile(model) if cfg['compile'] else model
        step = lambda c=compiled, o=optimizer: m.train_step(c, o, scaler, ctx, lambda: (x, y, dict(picked=picked)),
                                                            accum, cfg['grad_clip'])
        steps[f"{name} (sq={sq}, sr={sr})"] = (step, flops_per_token(model))
    print(f"{cfg['n_layer']} layers, D={cfg['n_embd']}")
    compare_steps(steps, B * cfg['block_size'] * accum, dev)

if __name__ == '__main__':
    benches = {'topo_gpt': (topo_gpt, bench_topo_gpt), 'topoformer': (topoformer, bench_topoformer)}
    if sys.argv[1:2] in (['-h'], ['--help']):
        print(__doc__)
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        print("error: usage: python bench.py topo_gpt|topoformer [--key=value ...] (the model script's keys; "
              "--help)", file=sys.stderr)
        sys.exit(2)
    module, bench = benches[sys.argv[1]]
    sys.exit(module.command(bench, sys.argv[2:]))
