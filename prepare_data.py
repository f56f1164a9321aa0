"""
Prepare a corpus for topo_gpt.py and topoformer.py: text in, GPT-2 tokens out (tiktoken "gpt2",
encode_ordinary).

    python prepare_data.py                          # Shakespeare from Project Gutenberg -> data/shakespeare/
    python prepare_data.py --input=my_corpus/       # your own text -> data/my_corpus/
    python prepare_data.py --input=shakespeare.txt --name=shakespeare   # offline: a local copy instead
    python prepare_data.py --dataset=fineweb-edu --max_tokens=1000000000 --val_fraction=0.005   # needs datasets
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
are exactly those of encoding it whole. Tokens go to train.bin.tmp / val.bin.tmp as they come; at the
end the old meta.json goes, the two files are renamed into place and the new meta.json (with each file's
token count, which the trainers check) is written, with Ctrl-C held off meanwhile: an interrupted or
failed run leaves either the old dataset or the new one, never a mix that a trainer would accept.
"""

import os
import re
import sys
import glob
import json
import math
import time
import random
import shutil
import signal
import tarfile
import http.client
import urllib.request
from contextlib import contextmanager

import argparse
import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
# config, each key overridable as --key=value: its comment is its --help, and a check before the comment's
# colon (x >= 0, 0 < x < 1, a|b) says which values the command line accepts
input = ''  # a text file or a folder of .txt files to prepare; '' = prepare --dataset
dataset = 'shakespeare'  # shakespeare|tinystories|fineweb-edu|imdb: the corpus to download, without --input
name = ''  # the folder out_dir/<name>; '' = the stem of --input, or the dataset's name
out_dir = 'data'  # where the dataset folders go (= the trainers' --data_dir)
val_fraction = 0.1  # 0 < x < 1: of the documents, or of the tokens of a single document
seed = 1337  # x >= 0: for the document shuffle / split
max_tokens = 0  # x >= 0: tinystories / fineweb-edu only: stop after about this many tokens (0 = all)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and k.islower() and type(v) in (bool, int, float, str)}

GUTENBERG_URL = 'https://www.gutenberg.org/cache/epub/100/pg100.txt'  # the complete works, public domain
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
HUB = {'tinystories': ('roneneldan/TinyStories', None),  # Hugging Face dataset, config
       'fineweb-edu': ('HuggingFaceFW/fineweb-edu', 'sample-10BT')}  # the TopoLM paper's corpus
EOT = 50256  # GPT-2's <|endoftext|>; all ids are < 2**16, hence uint16



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


def config_of(argv):
    """The checked config: parse_args, then what the keys mean together."""
    cfg, given = parse_config(argv, DEFAULTS, {}, __doc__, __file__)
    if 'input' in given and 'dataset' in given:
        raise UsageError("give either --input (local text) or --dataset (a download), not both")
    if cfg['max_tokens'] and (cfg['input'] or cfg['dataset'] not in HUB):
        raise UsageError("--max_tokens applies to --dataset=tinystories or fineweb-edu only")
    if cfg['name'] in ('.', '..') or os.sep in cfg['name'] or (os.altsep and os.altsep in cfg['name']):
        raise UsageError(f"--name={cfg['name']}: a plain folder name, made inside --out_dir={cfg['out_dir']}")
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
        raise UsageError(f"no such file or folder: {path}")
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
        raise UsageError(f"no text in {path} (an empty file, or a folder without non-empty .txt files)")
    return files


def read_text(path):
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def hub_docs(path, config, val_fraction, seed):
    """Stream (split, text) from a Hugging Face dataset, without downloading all of it."""
    try:
        from datasets import load_dataset  # only these big corpora need it
    except ImportError:
        raise UsageError(f"streaming {path} needs Hugging Face datasets: pip install datasets") from None
    rng = random.Random(seed)
    try:
        for row in load_dataset(path, name=config, split='train', streaming=True):
            yield ('val' if rng.random() < val_fraction else 'train'), row['text']
    except Exception as e:  # offline or hub trouble: datasets raises many kinds, none worth a traceback
        first = (str(e).splitlines() or [''])[0]
        raise UsageError(f"could not stream {path} ({type(e).__name__}: {first}); no network? use "
                         f"--input=PATH for local text") from None

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


def write_bins(docs, folder, meta, tail=0.0, max_tokens=0):
    """Tokenize (split, text) documents into folder/{train,val}.bin, each document followed by EOT, then
    meta.json: meta plus the token and document counts of each file.
    tail > 0: docs is one document, given as train, whose last `tail` fraction of tokens moves to val.
    Returns the number of tokens in each split."""
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken downloads its vocab once; offline it needs a copy of its cache
        raise UsageError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
                         f"TIKTOKEN_CACHE_DIR to a copy of tiktoken's cache (README, 'Offline')") from None
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
                raise UsageError(f"corpus too small: {n} tokens leave no validation tokens at --val_fraction={tail}")
            np.fromfile(tmp['train'], dtype=np.uint16, offset=2 * (n - k)).tofile(tmp['val'])
            os.truncate(tmp['train'], 2 * (n - k))
            n_tok, n_doc = dict(train=n - k, val=k + 1), dict(train=0, val=1)
        if not n_tok['train'] or not n_tok['val']:
            raise UsageError(f"corpus too small: the split left {n_tok['train']} train and {n_tok['val']} val "
                             f"tokens (raise --max_tokens or --val_fraction)")
        meta = {**meta, 'train_tokens': n_tok['train'], 'val_tokens': n_tok['val'],  # documents = EOTs
                'train_documents': n_doc['train'], 'val_documents': n_doc['val']}
        # the switch: without meta.json the folder is incomplete (the trainers refuse it), and the new
        # meta.json names the new files' sizes. Ctrl-C waits until it is done.
        with signals_deferred():
            if os.path.exists(os.path.join(folder, 'meta.json')):
                os.remove(os.path.join(folder, 'meta.json'))
            for s in tmp:
                os.replace(tmp[s], os.path.join(folder, f'{s}.bin'))
            with open(os.path.join(folder, 'meta.json.tmp'), 'w') as f:
                json.dump(meta, f, indent=2)
            os.replace(os.path.join(folder, 'meta.json.tmp'), os.path.join(folder, 'meta.json'))
    except OSError as e:  # a full disk, a folder that cannot be written: the old dataset, if any, stays whole
        raise UsageError(f"could not write the dataset into {folder} ({e.strerror or e}; a full disk?)") from None
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return n_tok


@contextmanager
def new_folder(folder):
    """Make folder (and its parents) for the work inside the block; if the block fails, the folders it made
    and left empty are removed again, so that a failed download leaves no empty data/<name> (nor data/)."""
    made, f = [], os.path.abspath(folder)
    while not os.path.isdir(f):  # the folders to make, deepest first
        made.append(f)
        f = os.path.dirname(f)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the folder {folder} ({e.strerror}): check --out_dir and --name") from None
    try:
        yield folder
    except BaseException:
        for f in made:
            if os.path.isdir(f) and not os.listdir(f):
                os.rmdir(f)
        raise


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
        raise UsageError(f"could not download {url} ({e}); no network? {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def strip_gutenberg(text):
    """The book between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines, with \\n line ends."""
    text = text.lstrip('\ufeff').replace('\r\n', '\n')
    start = re.search(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$', text, re.M | re.I)
    end = re.search(r'^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK', text, re.M | re.I)
    if not start or not end or end.start() < start.end():
        raise UsageError("the download has no Project Gutenberg START/END lines: not the expected book")
    return text[start.end():end.start()].strip() + '\n'


def get_shakespeare(folder):
    """Download the complete works once, keep the book without Gutenberg's header and licence."""
    path = os.path.join(folder, 'input.txt')
    if not os.path.exists(path):
        raw = os.path.join(folder, 'pg100.txt')
        download(GUTENBERG_URL, raw, "with a copy of the text, run python prepare_data.py --input=PATH "
                 "--name=shakespeare (offline, also set TIKTOKEN_CACHE_DIR to a copy of tiktoken's cache)")
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
                raise UsageError(f"{archive} holds an unsafe path: {m.name}")
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
    archive, tmp = os.path.join(folder, 'aclImdb_v1.tar.gz'), os.path.join(folder, 'unpack.tmp')
    if not os.path.exists(archive):
        download(IMDB_URL, archive, f"download {IMDB_URL} by hand and unpack it into {folder}/")
    print(f"unpacking {archive}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
    try:
        safe_extract(archive, tmp)
        if not os.path.isdir(os.path.join(tmp, 'aclImdb')):
            raise UsageError(f"{archive} has no aclImdb/ folder")
        os.replace(os.path.join(tmp, 'aclImdb'), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.remove(archive)
    print(f"wrote {dest}")

# -----------------------------------------------------------------------------

def main(argv):
    cfg = config_of(argv)
    src, ds, frac, seed = cfg['input'], cfg['dataset'], cfg['val_fraction'], cfg['seed']
    stem = os.path.splitext(os.path.basename(os.path.abspath(src)))[0]
    folder = os.path.join(cfg['out_dir'], cfg['name'] or (stem if src else ds))
    if src:
        files = list_files(src)  # bad input fails before anything is made
    if os.path.exists(os.path.join(folder, 'meta.json')):
        print(f"note: {folder} holds a dataset already; the new one replaces it once it is complete")
    with new_folder(folder):
        if not src and ds == 'imdb':
            return get_imdb(folder)
        meta = dict(source=src, tokenizer='gpt2', eot_token=EOT, dtype='uint16', val_fraction=frac, seed=seed)
        if not src and ds == 'shakespeare':
            src, meta['source'] = get_shakespeare(folder), GUTENBERG_URL
            files = list_files(src)
        if src and len(files) == 1:  # one document: a contiguous split
            meta['split'] = 'contiguous: the last val_fraction of the tokens'
            n_tok = write_bins([('train', read_text(files[0]))], folder, meta, tail=frac)
        elif src:  # several: a split by documents
            meta['split'] = 'documents, shuffled with the seed'
            order = list(range(len(files)))
            random.Random(seed).shuffle(order)
            val = set(order[:min(len(files) - 1, max(1, round(len(files) * frac)))])
            docs = ((('val' if i in val else 'train'), read_text(f)) for i, f in enumerate(files))
            n_tok = write_bins(docs, folder, meta)
        else:
            path, config = HUB[ds]
            meta.update(source=path + (f' ({config})' if config else ''), max_tokens=cfg['max_tokens'],
                        split='documents, each to val with probability val_fraction (seeded)')
            n_tok = write_bins(hub_docs(path, config, frac, seed), folder, meta, max_tokens=cfg['max_tokens'])
    print(f"wrote {folder}/: train.bin {n_tok['train']:,} tokens, val.bin {n_tok['val']:,} tokens, meta.json")


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


if __name__ == '__main__':
    sys.exit(command(main, sys.argv[1:], interrupted="temporary files removed"))
