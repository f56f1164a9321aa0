"""
Prepare a corpus for topo_gpt.py: text in, GPT-2 tokens out (tiktoken "gpt2", encode_ordinary).

    python prepare_data.py                          # Shakespeare from Project Gutenberg -> data/shakespeare/
    python prepare_data.py --input=my_corpus/       # your own text -> data/my_corpus/
    python prepare_data.py --input=../shared/data/shakespeare/complete_works.txt --name=shakespeare
    python prepare_data.py --dataset=fineweb-edu --max_tokens=1e9 --val_fraction=0.005   # needs datasets
    python prepare_data.py --dataset=imdb           # IMDB reviews -> data/imdb/aclImdb/ (not tokenized)

Writes data/<name>/train.bin and val.bin (uint16 token ids) and, last, meta.json (source, counts,
tokenizer, split, seed): a folder with meta.json is complete. Read with np.memmap(path, np.uint16).

--input is a text file (one document) or a folder whose *.txt files (not sub-folders) are the
documents, in name order. Empty files are skipped. Text is read as UTF-8, byte for byte (no newline
conversion). Every document's tokens are followed by the end-of-text token 50256, and:
  - several documents: the split is by documents. With --seed they are shuffled and
    round(n * val_fraction) of them (at least 1, at most n-1) go to val; each .bin keeps name order.
  - one document: the split is contiguous. With its tokens t (no EOT), the last int(len(t) * val_fraction)
    go to val, so train = t[:-k] and val = t[-k:] + [EOT]; decode(train + val) == text + "<|endoftext|>".
  - tinystories / fineweb-edu are streamed: each document goes to val with probability val_fraction
    (seeded), and writing stops after the document that reaches --max_tokens (0 = no cap).
A long document is encoded in ~1 MB pieces cut where GPT-2's pre-tokenizer always splits, so the tokens
are exactly those of encoding it whole. Tokens go to train.bin.tmp / val.bin.tmp as they come and are
renamed at the end: an interrupted or failed run leaves no half-written .bin.
"""

import os
import re
import sys
import glob
import json
import time
import random
import shutil
import tarfile
import http.client
import urllib.request

import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
# defaults, each overridable as --key=value; --help lists them
input = ''  # a text file or a folder of .txt files to prepare; '' = prepare --dataset
dataset = 'shakespeare'  # shakespeare | tinystories | fineweb-edu | imdb (downloaded)
name = ''  # output folder out_dir/<name>; '' = the stem of --input, or the dataset's name
out_dir = 'data'  # = topo_gpt.py's --data_dir
val_fraction = 0.1  # of the documents, or of the tokens of a single document
seed = 1337  # for the document shuffle / split
max_tokens = 0  # tinystories / fineweb-edu only: stop after about this many tokens (0 = all)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, str))}

GUTENBERG_URL = 'https://www.gutenberg.org/cache/epub/100/pg100.txt'  # the complete works, public domain
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
HUB = {'tinystories': ('roneneldan/TinyStories', None),  # Hugging Face dataset, config
       'fineweb-edu': ('HuggingFaceFW/fineweb-edu', 'sample-10BT')}  # the TopoLM paper's corpus
EOT = 50256  # GPT-2's <|endoftext|>; all ids are < 2**16, hence uint16


def die(msg, code=1):
    """One clear line on stderr, no traceback (the `finally`s on the way out still clean up)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def parse_args(argv):
    cfg, given = dict(DEFAULTS), set()
    for arg in argv:
        if arg in ('-h', '--help'):
            block = open(__file__, encoding='utf-8').read().split('# defaults')[1]  # the comments there
            notes = dict(re.findall(r"^(\w+) = .*?# (.*)$", block.split('DEFAULTS =')[0], re.M))
            print(__doc__ + '\nkeys, with their defaults:')
            for k, v in DEFAULTS.items():
                print(f"  --{k}={v}".ljust(28) + notes.get(k, ''))
            sys.exit(0)
        key, eq, val = arg[2:].partition('=')
        if not arg.startswith('--') or key not in cfg:
            die(f"unknown argument {arg} (see --help)", 2)
        if not eq:
            die(f"--{key} needs a value, e.g. --{key}={cfg[key]}", 2)
        try:
            if isinstance(cfg[key], int):  # accept 1e9 for counts, not 1.5
                if not float(val).is_integer():
                    raise ValueError
                val = int(float(val))
            cfg[key] = type(cfg[key])(val)
        except ValueError:
            die(f"--{key}={val}: expected {type(DEFAULTS[key]).__name__}", 2)
        given.add(key)
    if cfg['dataset'] not in ('shakespeare', 'imdb', *HUB):
        die(f"--dataset={cfg['dataset']}: expected shakespeare, tinystories, fineweb-edu or imdb", 2)
    if 'input' in given and 'dataset' in given:
        die("give either --input (local text) or --dataset (a download), not both", 2)
    if not 0 < cfg['val_fraction'] < 1 or cfg['max_tokens'] < 0:
        die("--val_fraction must lie strictly between 0 and 1, --max_tokens must be >= 0", 2)
    if cfg['max_tokens'] and (cfg['input'] or cfg['dataset'] not in HUB):
        die("--max_tokens applies to --dataset=tinystories or fineweb-edu only", 2)
    return cfg

# -----------------------------------------------------------------------------
# reading documents

def list_files(path):
    """The non-empty documents at path: the file itself, or the folder's *.txt files sorted by name."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), '*.txt')))
    else:
        die(f"no such file or folder: {path}")
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
        die(f"no text in {path} (an empty file, or a folder without non-empty .txt files)")
    return files


def read_text(path):
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text (bad byte at offset {e.start})")


def hub_docs(path, config, val_fraction, seed):
    """Stream (split, text) from a Hugging Face dataset, without downloading all of it."""
    try:
        from datasets import load_dataset  # only these big corpora need it
    except ImportError:
        die(f"streaming {path} needs Hugging Face datasets: pip install datasets")
    rng = random.Random(seed)
    try:
        for row in load_dataset(path, name=config, split='train', streaming=True):
            yield ('val' if rng.random() < val_fraction else 'train'), row['text']
    except Exception as e:  # offline or hub trouble: datasets raises many kinds, none worth a traceback
        first = (str(e).splitlines() or [''])[0]
        die(f"could not stream {path} ({type(e).__name__}: {first}); no network? use --input=PATH for local text")

# -----------------------------------------------------------------------------
# tokenizing and writing

def pieces(text, size=1 << 20):
    """Cut text into ~size pieces, each ending before a newline that follows a non-space character.
    GPT-2's pre-tokenizer always splits there, so the pieces encode to exactly the tokens of the whole."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind('\n', start + 1, start + size)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind('\n', start + 1, cut)
        if cut <= start:  # no safe cut in this window: keep the rest whole
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def write_bins(docs, folder, tail=0.0, max_tokens=0):
    """Tokenize (split, text) documents into folder/{train,val}.bin, each document followed by EOT.
    tail > 0: docs is one document, given as train, whose last `tail` fraction of tokens moves to val.
    Returns the number of tokens and of documents (= EOTs) in each split."""
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken downloads its vocab once; offline it needs TIKTOKEN_CACHE_DIR
        die(f"could not load the GPT-2 tokenizer ({type(e).__name__}); offline, point TIKTOKEN_CACHE_DIR "
            "at a tiktoken cache")
    os.makedirs(folder, exist_ok=True)
    tmp = {s: os.path.join(folder, f'{s}.bin.tmp') for s in ('train', 'val')}
    n_tok, n_doc = dict(train=0, val=0), dict(train=0, val=0)
    t0 = t_print = time.time()
    mb = 0.0  # of text read

    def progress():
        dt = time.time() - t0
        print(f"{sum(n_doc.values()):,} documents, {sum(n_tok.values()):,} tokens, {mb:.1f} MB of text "
              f"in {dt:.1f}s ({mb / max(dt, 1e-9):.1f} MB/s)", flush=True)
    try:
        with open(tmp['train'], 'wb') as f_train, open(tmp['val'], 'wb') as f_val:
            out = dict(train=f_train, val=f_val)
            for split, text in docs:
                for piece in pieces(text):
                    ids = enc.encode_ordinary(piece)
                    out[split].write(np.array(ids, dtype=np.uint16).tobytes())
                    n_tok[split] += len(ids)
                    mb += len(piece.encode('utf-8')) / 1e6
                    if time.time() - t_print > 2:
                        progress()
                        t_print = time.time()
                out[split].write(np.array([EOT], dtype=np.uint16).tobytes())
                n_tok[split] += 1
                n_doc[split] += 1
                if max_tokens and sum(n_tok.values()) >= max_tokens:
                    print(f"reached --max_tokens={max_tokens}")
                    break
        progress()
        if tail:  # move the last int(n * tail) text tokens, and the final EOT, to val
            n = n_tok['train'] - 1
            k = int(n * tail)
            if k < 1:
                die(f"corpus too small: {n} tokens leave no validation tokens at --val_fraction={tail}")
            np.fromfile(tmp['train'], dtype=np.uint16, offset=2 * (n - k)).tofile(tmp['val'])
            os.truncate(tmp['train'], 2 * (n - k))
            n_tok, n_doc = dict(train=n - k, val=k + 1), dict(train=0, val=1)
        if not n_tok['train'] or not n_tok['val']:
            die(f"corpus too small: the split left {n_tok['train']} train and {n_tok['val']} val tokens "
                "(raise --max_tokens or --val_fraction)")
        if os.path.exists(os.path.join(folder, 'meta.json')):
            os.remove(os.path.join(folder, 'meta.json'))  # stale until the new one is written
        for s in tmp:
            os.replace(tmp[s], os.path.join(folder, f'{s}.bin'))
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return n_tok, n_doc


def write_meta(folder, meta):
    with open(os.path.join(folder, 'meta.json.tmp'), 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(folder, 'meta.json.tmp'), os.path.join(folder, 'meta.json'))

# -----------------------------------------------------------------------------
# downloads

def download(url, path, hint):
    """Fetch url into path via path.tmp (an interrupted download leaves nothing), printing progress."""
    print(f"downloading {url}")
    tmp = path + '.tmp'
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, 'wb') as f:
            total = int(r.headers.get('Content-Length') or 0) / 1e6
            done, t0, t_print = 0.0, time.time(), 0.0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk) / 1e6
                if time.time() - t_print > 2:
                    t_print = time.time()
                    print(f"  {done:.1f} of {total or '?'} MB, {done / max(t_print - t0, 1e-9):.1f} MB/s", flush=True)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused, reset: all OSError
        die(f"could not download {url} ({e}); no network? {hint}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def strip_gutenberg(text):
    """The book between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines, with \\n line ends."""
    text = text.lstrip('\ufeff').replace('\r\n', '\n')
    start = re.search(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$', text, re.M | re.I)
    end = re.search(r'^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK', text, re.M | re.I)
    if not start or not end or end.start() < start.end():
        die("the download has no Project Gutenberg START/END lines: not the expected book")
    return text[start.end():end.start()].strip() + '\n'


def get_shakespeare(folder):
    """Download the complete works once, keep the book without Gutenberg's header and licence."""
    path = os.path.join(folder, 'input.txt')
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        raw = os.path.join(folder, 'pg100.txt')
        download(GUTENBERG_URL, raw, "prepare local text with --input=PATH")
        text = strip_gutenberg(read_text(raw))
        with open(path + '.tmp', 'w', encoding='utf-8', newline='') as f:
            f.write(text)
        os.replace(path + '.tmp', path)
        os.remove(raw)
    return path


def safe_extract(archive, folder):
    """Unpack a .tar.gz into folder, refusing any member that would land outside it; links are skipped."""
    root = os.path.realpath(folder)
    with tarfile.open(archive) as tar:
        for i, m in enumerate(tar, 1):
            target = os.path.realpath(os.path.join(root, m.name))
            if os.path.commonpath([root, target]) != root:
                die(f"{archive} holds an unsafe path: {m.name}")
            if m.isdir():
                os.makedirs(target, exist_ok=True)
            elif m.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, 'wb') as dst:
                    shutil.copyfileobj(src, dst)
            if i % 10000 == 0:
                print(f"  {i:,} files unpacked")


def get_imdb(folder):
    """IMDB reviews (Maas et al. 2011) as folder/aclImdb/{train,test}/{pos,neg}/*.txt."""
    dest = os.path.join(folder, 'aclImdb')
    if os.path.isdir(dest):
        print(f"{dest} is already there")
        return
    os.makedirs(folder, exist_ok=True)
    archive, tmp = os.path.join(folder, 'aclImdb_v1.tar.gz'), os.path.join(folder, 'unpack.tmp')
    if not os.path.exists(archive):
        download(IMDB_URL, archive, f"download {IMDB_URL} by hand and unpack it into {folder}/")
    print(f"unpacking {archive}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
    try:
        safe_extract(archive, tmp)
        if not os.path.isdir(os.path.join(tmp, 'aclImdb')):
            die(f"{archive} has no aclImdb/ folder")
        os.replace(os.path.join(tmp, 'aclImdb'), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.remove(archive)
    print(f"wrote {dest}")

# -----------------------------------------------------------------------------

def main(argv):
    cfg = parse_args(argv)
    src, ds, frac, seed = cfg['input'], cfg['dataset'], cfg['val_fraction'], cfg['seed']
    stem = os.path.splitext(os.path.basename(os.path.abspath(src)))[0]
    folder = os.path.join(cfg['out_dir'], cfg['name'] or (stem if src else ds))
    if not src and ds == 'imdb':
        return get_imdb(folder)
    meta = dict(source=src, tokenizer='gpt2', eot_token=EOT, dtype='uint16', val_fraction=frac, seed=seed)
    if src or ds == 'shakespeare':
        files = list_files(src or get_shakespeare(folder))
        meta['source'] = src or GUTENBERG_URL
        if len(files) == 1:  # one document: a contiguous split
            meta['split'] = 'contiguous: the last val_fraction of the tokens'
            n_tok, n_doc = write_bins([('train', read_text(files[0]))], folder, tail=frac)
        else:  # several: a split by documents
            meta['split'] = 'documents, shuffled with the seed'
            order = list(range(len(files)))
            random.Random(seed).shuffle(order)
            val = set(order[:min(len(files) - 1, max(1, round(len(files) * frac)))])
            docs = ((('val' if i in val else 'train'), read_text(f)) for i, f in enumerate(files))
            n_tok, n_doc = write_bins(docs, folder)
    else:
        path, config = HUB[ds]
        meta.update(source=path + (f' ({config})' if config else ''), max_tokens=cfg['max_tokens'],
                    split='documents, each to val with probability val_fraction (seeded)')
        n_tok, n_doc = write_bins(hub_docs(path, config, frac, seed), folder, max_tokens=cfg['max_tokens'])
    meta.update(train_tokens=n_tok['train'], val_tokens=n_tok['val'],  # documents = EOTs in each .bin
                train_documents=n_doc['train'], val_documents=n_doc['val'])
    write_meta(folder, meta)
    print(f"wrote {folder}/: train.bin {n_tok['train']:,} tokens, val.bin {n_tok['val']:,} tokens, meta.json")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print("error: interrupted (temporary files removed)", file=sys.stderr)
        sys.exit(130)
