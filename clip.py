"""CLIP: Learning Transferable Visual Models From Natural Language Supervision.

Radford et al. 2021, arXiv:2103.00020. https://arxiv.org/abs/2103.00020

What is implemented
- A Vision Transformer image encoder (Dosovitskiy et al. 2020, with CLIP's extra LayerNorm before
  the Transformer) and a causal text Transformer whose feature is read at the end-of-text token
  (the largest token id of a sequence, as in OpenAI's code); both are linearly projected into one
  embedding space of size `embed_dim` (paper section 2.4).
- The symmetric contrastive loss of the paper's Figure 3 pseudo-code, with a learnable temperature
  initialised to tau = 0.07 and clipped so that logits are scaled by at most 100 (section 2.5).
- A byte-level tokenizer (the UTF-8 bytes, plus start and end tokens; no vocabulary file), and
  OpenAI's lower-cased byte-pair encoder (section 2.4: 49,152-token BPE, 49,408 ids with the byte
  tokens and the two special tokens) when the user gives its merges file
  `bpe_simple_vocab_16e6.txt.gz`.
- Zero-shot classification from prompt templates (section 3.1.2, prompt ensembling in 3.1.4) and
  caption retrieval.
- `load_openai(path)`: the parameter names are those of OpenAI's released checkpoints, so a
  released ViT file (TorchScript archive or plain state dict) loads key for key, strictly.

Deviations from the paper, said openly
- Repeated captions. The paper's batches come from 400M web pairs, where two equal captions in one
  batch are rare, and it treats every other pair as a negative. On a small captioned data set (the
  shapes data has 324 distinct captions) many images of a batch share a caption, and calling those
  negatives asks the model to tell apart images the captions cannot. So the loss scores each image
  against the batch's *distinct* captions, and a caption's positives are all images that carry it.
  When all captions of a batch are distinct this is exactly the paper's loss.
- The paper clips the temperature parameter itself; here the clip is applied where the scale is
  used (`exp(min(t, log 100))`), which scales logits identically and keeps train.py generic.
- Under DistributedDataParallel each rank's loss uses its own batch only; the paper gathers the
  features of all workers first, so its negatives are the global batch.
- Only the ViT image encoders; the paper's modified ResNets (RN50 ...) are not implemented.
- OpenAI's BPE tokenizer cleans text with `ftfy.fix_text` (a third-party package); here only the
  HTML unescaping and whitespace cleaning are done, which gives the same tokens for clean text.

Glossary (paper -> code)
  I_f, T_f   image and text features before projection   `encode_image` / `encode_text` internals
  W_i, W_t   projections to the joint space               `visual.proj`, `text_projection`
  I_e, T_e   L2-normalised embeddings                     `z_i`, `z_t`
  t          log inverse temperature, exp(t) = 1/tau     `logit_scale`
  [EOS]      end-of-text token                            `tokenizer.eot`
"""

import gzip
import html
import math
import os
import unicodedata
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- config ---

@dataclass
class CLIPConfig:
    image_size: int = 224  # input resolution (H = W)
    in_channels: int = 3  # image channels
    patch_size: int = 32  # ViT patch side; the image becomes (image_size / patch_size)^2 tokens
    vision_width: int = 768  # ViT width
    vision_layers: int = 12  # ViT residual attention blocks
    vision_heads: int = 12  # ViT attention heads (OpenAI: width / 64)
    embed_dim: int = 512  # size of the joint image-text embedding space
    context_length: int = 77  # text tokens, start and end tokens included
    vocab_size: int = 49408  # token ids (258 suffice for the byte-level tokenizer)
    text_width: int = 512  # text Transformer width
    text_layers: int = 12  # text Transformer blocks
    text_heads: int = 8  # text attention heads (OpenAI: width / 64)
    bpe_path: str = ""  # OpenAI's bpe_simple_vocab_16e6.txt.gz; empty: the byte-level tokenizer
    openai_normalize: bool = False  # map [-1, 1] images to OpenAI's mean/std input (released weights)


PRESETS = {
    # CPU in minutes: 32x32 shapes images as 8x8 = 64 patches of 4x4 (as ViTs on CIFAR; 8x8 patches
    # left a small circle and a small square of a few pixels inside one patch and confused them),
    # byte-level captions.
    "tiny": CLIPConfig(image_size=32, patch_size=4, vision_width=64, vision_layers=4, vision_heads=2,
                       embed_dim=64, context_length=64, vocab_size=258, text_width=64,
                       text_layers=2, text_heads=2),
    # One GPU: 64x64 images, 8x8 patches.
    "small": CLIPConfig(image_size=64, patch_size=8, vision_width=384, vision_layers=8, vision_heads=6,
                        embed_dim=256, context_length=77, vocab_size=258, text_width=256,
                        text_layers=8, text_heads=4),
    # The paper's ViT-B/32 (Table 20 of arXiv:2103.00020): 151,277,313 parameters.
    "vit-b-32": CLIPConfig(),
    # The paper's ViT-B/16: 149,620,737 parameters.
    "vit-b-16": CLIPConfig(patch_size=16),
    # The paper's ViT-L/14: 427,616,513 parameters.
    "vit-l-14": CLIPConfig(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                           embed_dim=768, text_width=768, text_heads=12),
}

TAU_INIT = 0.07  # initial temperature (section 2.5, from Wu et al. 2018)
MAX_LOGIT_SCALE = 100.0  # logits are scaled by at most 100 (section 2.5)
# The mean and standard deviation OpenAI's released models expect their [0, 1] RGB input in.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --- tokenizers ---

class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then start (256) and end (257) tokens; no vocabulary file.

    The end token is the largest id, so `argmax` over a sequence finds it, as with OpenAI's BPE.
    """

    vocab_size = 258
    sot = 256
    eot = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = _strip_special(list(ids), self.sot, self.eot)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _strip_special(ids, sot, eot):
    """Drops a leading start token and everything from the first end token on (the padding)."""
    if ids and ids[0] == sot:
        ids = ids[1:]
    return ids[:ids.index(eot)] if eot in ids else ids


def _byte_symbols():
    """The 256 printable characters that stand for the 256 bytes in OpenAI's merges file.

    Bytes that are printable Latin-1 characters stand for themselves; the others (control codes,
    space, soft hyphen ...) are given the characters 256, 257, ... in byte order, so that no symbol
    is whitespace. Returned in OpenAI's vocabulary order (the printable ones first).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table = {b: chr(b) for b in printable}
    extra = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def _bpe_merge(parts, rank):
    """Byte-pair merging of one word's symbols (Sennrich et al. 2016): join the adjacent pair with
    the lowest rank in `rank` everywhere it occurs, and repeat until no adjacent pair is ranked."""
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, math.inf))
        if best not in rank:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _pretokenize(text):
    """Splits lower-cased text into words like OpenAI's regular expression (no `regex` package).

    The expression is `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
    [^\\s\\p{L}\\p{N}]+`: special tokens, English contractions, runs of letters, single digits,
    runs of other non-space characters. Each alternative is tried in order at each position.
    """
    heads = ("<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
    kind = lambda ch: "s" if ch.isspace() else unicodedata.category(ch)[0]  # noqa: E731
    words, i, n = [], 0, len(text)
    while i < n:
        head = next((h for h in heads if text.startswith(h, i)), None)
        k = kind(text[i])
        if head is not None:
            j = i + len(head)
        elif k == "s":
            i += 1
            continue
        elif k == "N":
            j = i + 1
        elif k == "L":
            j = i + 1
            while j < n and kind(text[j]) == "L":
                j += 1
        else:
            j = i + 1
            while j < n and kind(text[j]) not in ("s", "L", "N"):
                j += 1
        words.append(text[i:j])
        i = j
    return words


class BPETokenizer:
    """OpenAI's CLIP byte-pair encoder (Sennrich et al. 2016 on UTF-8 bytes), from its merges file.

    Ids: the 256 byte symbols, the same 256 symbols ending a word (`</w>`), one id per merge in
    rank order, then `<|startoftext|>` and `<|endoftext|>`: 256 + 256 + 48,894 + 2 = 49,408 ids
    for `bpe_simple_vocab_16e6.txt.gz`.
    """

    max_merges = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file

    def __init__(self, merges_path):
        if not os.path.isfile(merges_path):
            raise FileNotFoundError(f"BPE merges file {merges_path!r} not found; pass the path "
                                    "of OpenAI's bpe_simple_vocab_16e6.txt.gz")
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:]  # the first line is a version header
        merges = [tuple(line.split()) for line in lines if line.strip()][:self.max_merges]
        self.byte_to_symbol = _byte_symbols()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        symbols = list(self.byte_to_symbol.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = vocab
        self.rank = {m: r for r, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot, self.eot = self.vocab_size - 2, self.vocab_size - 1
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def bpe(self, word):
        """Merges the symbols of one word, lowest-ranked pair first, until no known pair is left."""
        if word in self.cache:
            return self.cache[word]
        parts = _bpe_merge([*word[:-1], word[-1] + "</w>"], self.rank)  # </w>: the end of the word
        self.cache[word] = parts
        return parts

    def encode(self, text):
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        ids = []
        for word in _pretokenize(text):
            symbols = "".join(self.byte_to_symbol[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(symbols))
        return ids

    def decode(self, ids):
        ids = _strip_special(list(ids), self.sot, self.eot)
        text = "".join(self.decoder[i] for i in ids)
        text = bytes(self.symbol_to_byte[ch] for ch in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()  # the end-of-word marks become the spaces


_BPE_CACHE = {}


def get_tokenizer(bpe_path=""):
    """The byte-level tokenizer, or OpenAI's BPE from its merges file (read once per path)."""
    if not bpe_path:
        return ByteTokenizer()
    if bpe_path not in _BPE_CACHE:
        _BPE_CACHE[bpe_path] = BPETokenizer(bpe_path)
    return _BPE_CACHE[bpe_path]


def tokenize(texts, context_length=77, tokenizer=None, truncate=False, trim=False):
    """Texts -> (N, context_length) long ids: [start, tokens..., end, 0, 0, ...].

    `truncate` cuts a too long text and ends it with the end token instead of raising; `trim`
    returns only as many columns as the longest text needs (the padding after the end token does
    not change a causal encoder's feature at the end token, so this only saves work).
    """
    tokenizer = tokenizer or ByteTokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = [[tokenizer.sot, *tokenizer.encode(t), tokenizer.eot] for t in texts]
    for text, row in zip(texts, rows):
        if len(row) > context_length:
            if not truncate:
                raise ValueError(f"the text {text[:40]!r}... has {len(row)} tokens, more than the "
                                 f"context length {context_length}; shorten it or pass truncate=True")
            row[context_length - 1:] = [tokenizer.eot]
    width = max(map(len, rows), default=1) if trim else context_length
    out = torch.zeros(len(rows), width, dtype=torch.long)  # (N, L)
    for n, row in enumerate(rows):
        out[n, :len(row)] = torch.tensor(row)
    return out


# Copied from guided.host_to_device
def host_to_device(t, device):
    """A tensor made on the CPU (token ids, targets) -> `device` without stalling the host: on CUDA
    through pinned memory with an asynchronous copy, since a copy from pageable memory first waits
    for the GPU to finish its queue (a host-device synchronisation in every training step)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --- building blocks ---

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's released models were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names, computed by SDPA.

    `in_proj_weight` stacks W_q, W_k, W_v as rows, as torch packs them, so OpenAI's weights load
    unchanged; the batch comes first here (OpenAI runs the Transformer sequence-first).
    """

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads; change one of them")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        """(B, L, W) -> (B, L, W); with `causal`, position i attends to positions <= i only."""
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, W)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, L, d)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))  # (B, L, W)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2020): patches -> tokens, a class token, LayerNorm, Transformer.

    The image feature is the class token's output, layer-normalised and projected (I_f W_i).
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size "
                             f"{cfg.patch_size}; change one of them")
        W, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(cfg.in_channels, W, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = W ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.vision_layers, cfg.vision_heads)
        self.ln_post = nn.LayerNorm(W)
        self.proj = nn.Parameter(scale * torch.randn(W, cfg.embed_dim))

    def forward(self, x):
        """(B, C, H, W) -> (B, embed_dim)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, grid^2 + 1, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)


# --- the model ---

class CLIP(nn.Module):
    """Image and text encoders trained so that matching pairs have the larger cosine similarity."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / TAU_INIT)))  # t, exp(t) = 1 / tau
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_STD).view(3, 1, 1), persistent=False)
        self._init_text()

    def _init_text(self):
        """OpenAI's initialisation of the text side; the residual branches are scaled down by depth."""
        W, L = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=W ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * W) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
        nn.init.normal_(self.text_projection, std=W ** -0.5)

    @property
    def tokenizer(self):
        return get_tokenizer(self.cfg.bpe_path)

    @torch.compiler.disable  # host-side string work: torch.compile would specialise on every caption
    def tokenize(self, texts, truncate=False, trim=False):
        """Texts -> (N, context_length) token ids on the model's device (see `tokenize`)."""
        tokenizer = self.tokenizer
        if tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{self.cfg.vocab_size}; set bpe_path to OpenAI's merges file for OpenAI's weights")
        ids = tokenize(texts, self.cfg.context_length, tokenizer, truncate=truncate, trim=trim)
        return host_to_device(ids, self.logit_scale.device)

    def encode_image(self, image):
        """(B, C, H, W) in [-1, 1] -> image features I_f W_i, (B, embed_dim), not normalised."""
        size = self.cfg.image_size
        if image.shape[-2:] != (size, size):
            raise ValueError(f"images are {tuple(image.shape[-2:])} but this model takes "
                             f"{size}x{size}; resize them first")
        if self.cfg.openai_normalize:
            image = ((image + 1) / 2 - self.pixel_mean) / self.pixel_std
        return self.visual(image)

    def encode_text_tokens(self, tokens):
        """(B, L) ids -> (B, L, text_width) causal Transformer outputs after ln_final."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (B, L, W)
        return self.ln_final(self.transformer(x, causal=True))

    def encode_text(self, text):
        """Token ids (B, L) or a list of strings -> text features T_f W_t, (B, embed_dim).

        The feature is the output at the end-of-text token, the largest id of each sequence.
        """
        tokens = self.tokenize(text, trim=True) if isinstance(text, (str, list, tuple)) else text
        x = self.encode_text_tokens(tokens)  # (B, L, W)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        return x @ self.text_projection  # (B, embed_dim)

    def scale(self):
        """exp(t), clipped at 100 so logits are scaled by at most 100 (section 2.5)."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, image, text):
        """OpenAI's forward: (logits_per_image (B_i, B_t), logits_per_text (B_t, B_i))."""
        z_i = F.normalize(self.encode_image(image), dim=-1)  # (B_i, D)
        z_t = F.normalize(self.encode_text(text), dim=-1)  # (B_t, D)
        logits_per_image = self.scale() * z_i @ z_t.T  # (B_i, B_t)
        return logits_per_image, logits_per_image.T

    # --- the algorithm: contrastive loss, retrieval, zero-shot ---

    def loss(self, batch):
        """Symmetric cross-entropy over cosine similarities (the paper's Figure 3).

        logits = exp(t) * z_i z_t^T; loss = (CE_rows(logits) + CE_columns(logits)) / 2, with the
        batch's distinct captions as the columns (see the module docstring): each image's target is
        its caption, each caption's target is spread evenly over the images that carry it.
        """
        image = batch["image"]
        tokens, target = self.caption_targets(batch["caption"], image.device)  # (U, L), (B,)
        logits, _ = self(image, tokens)  # (B, U)
        loss_i2t = F.cross_entropy(logits, target)
        owners = F.one_hot(target, tokens.shape[0]).T.to(logits.dtype)  # (U, B)
        loss_t2i = F.cross_entropy(logits.T, owners / owners.sum(1, keepdim=True))
        acc = (logits.argmax(dim=1) == target).float().mean()
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                "retrieval_top1": acc, "logit_scale": self.scale().detach()}

    @torch.compiler.disable  # host-side string work, as `tokenize`
    def caption_targets(self, captions, device):
        """A batch's B captions -> (token ids (U, L) of its U distinct captions, target (B,): the
        column of each image's caption among them)."""
        distinct = list(dict.fromkeys(captions))
        if "" in distinct:
            raise ValueError("CLIP learns from captions, and this batch has images without one "
                             "(a folder without .txt captions?); give every image a caption")
        column = {c: j for j, c in enumerate(distinct)}
        target = host_to_device(torch.tensor([column[c] for c in captions]), device)  # (B,)
        return self.tokenize(distinct, truncate=True, trim=True), target

    def rank_captions(self, image, captions, truncate=False):
        """Scaled cosine similarities of B images with K captions, (B, K)."""
        return self(image, self.tokenize(captions, truncate=truncate, trim=True))[0]  # (B, K)

    @torch.no_grad()
    def retrieval_accuracy(self, image, captions, candidates=None):
        """Image -> text top-1: how often an image's best-scoring candidate is its own caption.

        `candidates` defaults to the distinct captions of `captions`; pass every distinct caption of
        a test split for the full retrieval figure. Returns a 0-dim tensor.
        """
        candidates = list(dict.fromkeys(candidates or captions))
        column = {c: j for j, c in enumerate(candidates)}
        if any(c not in column for c in captions):
            raise ValueError("every caption must be among the candidates; add the missing ones")
        target = host_to_device(torch.tensor([column[c] for c in captions]), image.device)  # (B,)
        return (self.rank_captions(image, candidates).argmax(dim=1) == target).float().mean()

    @torch.no_grad()
    def evaluate(self, batch):
        """The loss, and image -> text top-1 retrieval among the batch's distinct captions."""
        out = self.loss(batch)
        return {"retrieval_top1": out["retrieval_top1"], "loss": out["loss"]}

    @torch.no_grad()
    def zero_shot_classifier(self, classnames, templates=("a photo of a {}.",)):
        """Class weights (K, D): per class, the normalised mean of its normalised prompt embeddings.

        Section 3.1.4: prompt ensembling averages the embeddings of several templates per class.
        """
        weights = []
        for name in classnames:
            z_t = F.normalize(self.encode_text([t.format(name) for t in templates]), dim=-1)  # (T, D)
            weights.append(F.normalize(z_t.mean(0), dim=-1))
        return torch.stack(weights)  # (K, D)

    @torch.no_grad()
    def zero_shot_classify(self, image, weights):
        """Class probabilities (B, K) = softmax(exp(t) * z_i W^T) for weights from zero_shot_classifier."""
        z_i = F.normalize(self.encode_image(image), dim=-1)  # (B, D)
        return (self.scale() * z_i @ weights.T).softmax(dim=-1)  # (B, K)


# --- OpenAI's released weights ---

def config_from_state_dict(state_dict, bpe_path=""):
    """Infers a CLIPConfig from the tensor shapes of a ViT CLIP state dict (as OpenAI's build_model)."""
    if "visual.proj" not in state_dict:
        raise ValueError("this checkpoint has no visual.proj: it is a ResNet CLIP or not CLIP; "
                         "only the ViT models are supported")
    count = lambda prefix: len({k.split(".")[len(prefix.split("."))] for k in state_dict  # noqa: E731
                                if k.startswith(prefix + ".")})
    conv = state_dict["visual.conv1.weight"]  # (W, C, P, P)
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_width, text_width = conv.shape[0], state_dict["ln_final.weight"].shape[0]
    return CLIPConfig(
        image_size=conv.shape[-1] * grid, in_channels=conv.shape[1], patch_size=conv.shape[-1],
        vision_width=vision_width, vision_layers=count("visual.transformer.resblocks"),
        vision_heads=vision_width // 64, embed_dim=state_dict["text_projection"].shape[1],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0], text_width=text_width,
        text_layers=count("transformer.resblocks"), text_heads=text_width // 64,
        bpe_path=bpe_path, openai_normalize=True)


def load_openai(path, bpe_path=""):
    """Loads OpenAI's released ViT CLIP file (TorchScript archive or plain state dict), strictly.

    The config comes from the tensor shapes; the archive's `input_resolution`, `context_length` and
    `vocab_size` entries are dropped. Weights are cast to float32. Pass `bpe_path` (OpenAI's
    bpe_simple_vocab_16e6.txt.gz) to tokenize text as the released models expect.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}; pass the path of a released CLIP .pt file")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but the released files are archives
            warnings.simplefilter("ignore", DeprecationWarning)
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive: a plain state dict
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    cfg = config_from_state_dict(state_dict, bpe_path)
    model = CLIP(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
