"""Guided diffusion: ADM, classifier guidance, classifier-free guidance, GLIDE and CLIP guidance.

Papers:
- Dhariwal, Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, arXiv:2105.05233 (ADM:
  the U-Net, the noisy classifier, classifier guidance, algorithms 1 and 2).
- Ho, Salimans, "Classifier-Free Diffusion Guidance", 2021, arXiv:2207.12598.
- Nichol et al., "GLIDE: Towards Photorealistic Image Generation and Editing with Text-Guided
  Diffusion Models", 2021, arXiv:2112.10741 (text encoder, encoder_kv, the upsampler, CLIP
  guidance in section 2.4).

What is implemented:
- `UNet`, the ADM network: adaptive group norm (the embedding of t, and of y, gives a scale and a
  shift after GroupNorm), BigGAN residual blocks for up- and down-sampling, attention at several
  resolutions with a fixed head width (`num_head_channels`) or a fixed head count, a class
  embedding added to the time embedding, an optional conditioning vector projected and added to it
  (`cond`), optional context tokens that every attention layer also attends to (GLIDE's
  encoder_kv), GLIDE's text Transformer, a learned-variance output and a low-resolution input for
  upsamplers. The presets have the parameter counts of the released checkpoints, and the module
  names follow them (input_blocks, middle_block, output_blocks, out, label_emb, transformer, ...).
- `NoisyClassifier`: the encoder half of the UNet with attention pooling, trained on (x_t, t).
- classifier guidance: `classifier_cond_fn` gives s grad_x log p(y | x_t); the ancestral sampler
  shifts the mean by Sigma times it (alg. 1), DDIM shifts the score (alg. 2).
- classifier-free guidance: `ClassifierFreeGuidance` wraps a model so that one batched forward gives
  eps~ = eps(x_t, null) + s (eps(x_t, c) - eps(x_t, null)) (Ho & Salimans eq. 6 with s = 1 + w).
- CLIP guidance: `clip_cond_fn` gives s grad_x (f(x_t, t) . g(c)) through the same hook.
- `load_openai(path)`: the authors' released files (guided-diffusion's 64/128/256 diffusion models
  and noisy classifiers, GLIDE's base.pt and upsample.pt), their preset inferred from the keys and
  shapes, every key and shape checked; and `GPT2Tokenizer`, GLIDE's GPT-2 byte-pair encoding read
  from the user's encoder.json / vocab.bpe with the standard library only.
- trainable models: `ADM` (one UNet in a Gaussian diffusion, conditioned on labels, captions or a
  low-resolution image as its config says, with the condition dropped for classifier-free
  guidance), `NoisyClassifier`, and `GLIDE` (a text-conditional base model and a text-conditional
  upsampler, trained as two phases).

Deviations and choices (stated openly):
- Text is tokenised as UTF-8 bytes by default (no vocabulary file); the GLIDE presets keep the
  released 50,257-token embedding table so the counts match. With `bpe_dir` (GPT-2's encoder.json
  and vocab.bpe, as glide-text2im ships them) captions get GLIDE's own BPE ids (`GPT2Tokenizer`,
  standard library only), which the released weights need.
- The null class of classifier-free guidance is an extra learned row of the label embedding,
  present only when `p_uncond > 0` (the ADM presets have none, so their counts match).
- The upsampler's low-resolution input is the training image downsampled by area averaging, as in
  guided-diffusion's super-resolution training script (GLIDE's training code is not released and
  the paper does not say more); no further corruption is applied.
- CLIP guidance uses the cosine of normalised embeddings times `logit_scale`, as the released
  GLIDE code does (the paper writes the dot product f(x_t) . g(c)).
- The file is longer than STYLE.md's 800 lines because it carries ddpm.py's diffusion process as a
  checked copy (rule 3), and GLIDE's tokenizer and the released-checkpoint loader (about 300
  lines, kept here so that the file alone runs the released models); the models themselves are
  about 850 lines.

Glossary (paper symbol -> code name):
  x_t, t, y         x_t, t, y (class label; `num_classes` is the null label when p_uncond > 0)
  s                 guidance_scale (classifier-free), classifier_scale (classifier guidance)
  p(y | x_t)        NoisyClassifier(x_t, t).log_softmax(-1)[y]
  Sigma             the variance of p(x_{t-1} | x_t), `p["variance"]`
  eps(x_t, c)       conditional model output; eps(x_t, null) the unconditional one
  f(x_t, t), g(c)   the noised CLIP image encoder and the text encoder (CLIP guidance)
  encoder_kv        projection of the context tokens into each attention layer's keys and values
"""

import gzip
import json
import math
import os
import sys
import unicodedata
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- configs ---


@dataclass
class ADMConfig:
    """One diffusion model: the UNet and its Gaussian diffusion (ADM, GLIDE base or upsampler)."""
    image_size: int = 32  # side of x_t
    in_channels: int = 3  # image channels (an upsampler also takes as many low-res channels)
    num_classes: int = 0  # class-conditional when > 0 (train.py sets it from the data)
    model_channels: int = 16  # base width
    channel_mult: tuple[int, ...] = (1, 2, 4)  # width multiplier per resolution level
    num_res_blocks: int = 1  # residual blocks per level (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sides that get attention
    num_heads: int = 1  # attention heads (when num_head_channels == -1)
    num_head_channels: int = 32  # fixed head width; -1 uses num_heads
    num_heads_upsample: int = -1  # heads in the decoder; -1: as num_heads
    new_attention_order: bool = False  # split qkv before heads (ADM 64x64) instead of after
    use_scale_shift_norm: bool = True  # adaptive group norm (ADM section 3)
    resblock_updown: bool = True  # BigGAN residual blocks for up/downsampling (ADM section 3)
    norm_groups: int = 32  # GroupNorm groups (capped at the channel count)
    dropout: float = 0.0  # dropout in residual blocks
    learn_sigma: bool = True  # output Improved DDPM's variance interpolation too (2C channels)
    cond_dim: int = 0  # width of an extra conditioning vector added to the time embedding; 0: none
    context_dim: int = 0  # width of external context tokens for encoder_kv; 0: text width or none
    low_res_size: int = 0  # > 0: an upsampler from this side (GLIDE's super-resolution model)
    self_condition: bool = False  # also take an earlier x_0 estimate as input (Chen et al. 2022)
    text_ctx: int = 0  # text tokens; 0: no text encoder
    xf_width: int = 0  # text Transformer width
    xf_layers: int = 0  # text Transformer depth
    xf_heads: int = 1  # text Transformer heads
    xf_final_ln: bool = True  # LayerNorm after the text Transformer
    xf_padding: bool = True  # learned embeddings at padded text positions (GLIDE)
    vocab_size: int = 256  # token embedding rows (256 bytes; GLIDE's BPE has 50,257)
    bpe_dir: str = ""  # folder with GPT-2's encoder.json and vocab.bpe (or .gz): GLIDE's BPE; "": UTF-8 bytes
    diffusion_steps: int = 1000  # T
    noise_schedule: str = "cosine"  # "linear" (ADM 128/256, GLIDE upsampler) or "cosine"
    p_uncond: float = 0.1  # probability the condition is dropped in training (classifier-free)


@dataclass
class ClassifierConfig:
    """A noisy classifier p(y | x_t) (ADM section 4.1)."""
    image_size: int = 32  # side of x_t
    in_channels: int = 3  # image channels
    num_classes: int = 18  # classes (train.py sets it from the data)
    model_channels: int = 16  # classifier_width
    channel_mult: tuple[int, ...] = (1, 2, 4)  # width multiplier per level
    num_res_blocks: int = 1  # classifier_depth
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sides that get attention
    num_head_channels: int = 32  # head width (64 in ADM)
    use_scale_shift_norm: bool = True  # adaptive group norm
    resblock_updown: bool = True  # residual downsampling
    norm_groups: int = 32  # GroupNorm groups (capped at the channel count)
    diffusion_steps: int = 1000  # T of the diffusion it guides
    noise_schedule: str = "cosine"  # schedule of the diffusion it guides


@dataclass
class GLIDEConfig:
    """GLIDE: a text-conditional base model and a text-conditional upsampler."""
    image_size: int = 32  # side of the final samples (= upsample.image_size)
    in_channels: int = 3  # image channels
    base: ADMConfig = field(default_factory=lambda: ADMConfig(
        image_size=16, num_classes=0, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
        text_ctx=48, xf_width=64, xf_layers=2, xf_heads=2, p_uncond=0.2))
    upsample: ADMConfig = field(default_factory=lambda: ADMConfig(
        image_size=32, num_classes=0, model_channels=16, channel_mult=(1, 2, 4),
        attention_resolutions=(8,), low_res_size=16, text_ctx=48, xf_width=64, xf_layers=1,
        xf_heads=2, noise_schedule="linear", p_uncond=0.0))


def _adm(**kw):
    """The released ADM flags shared by all sizes (guided-diffusion README): learned sigma,
    scale-shift norm, residual up/down, attention at 32, 16, 8, 1000 classes, no text."""
    base = dict(in_channels=3, num_classes=1000, attention_resolutions=(32, 16, 8),
                learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
                diffusion_steps=1000, p_uncond=0.0)
    return ADMConfig(**{**base, **kw})


def _glide(**kw):
    """GLIDE's released (filtered) models (glide-text2im model_creation.py): 192 channels, head
    width 64, attention at 32, 16, 8, a 16-layer 512-wide text Transformer over 128 tokens."""
    base = dict(image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, vocab_size=50257,
                noise_schedule="cosine", p_uncond=0.2)
    return ADMConfig(**{**base, **kw})


PRESETS = {
    # CPU-sized class-conditional model for the 32x32 shapes (796,198 parameters with 18 classes)
    "tiny": ADMConfig(num_classes=18),
    "small": ADMConfig(num_classes=18, model_channels=128, channel_mult=(1, 2, 2, 2),
                       num_res_blocks=2, attention_resolutions=(16, 8), num_head_channels=64,
                       dropout=0.1),
    # Dhariwal & Nichol, released ImageNet models (guided-diffusion README flags)
    "adm-imagenet64": _adm(image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                           num_head_channels=64, new_attention_order=True, dropout=0.1,
                           noise_schedule="cosine"),  # 295,904,454 parameters
    "adm-imagenet128": _adm(image_size=128, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 3, 4),
                            num_heads=4, num_head_channels=-1,
                            noise_schedule="linear"),  # 421,529,606 parameters
    "adm-imagenet256": _adm(image_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                            num_head_channels=64, noise_schedule="linear"),  # 553,838,086 parameters
    # the same without classes (256x256_diffusion_uncond.pt): 552,814,086 parameters
    "adm-imagenet256-uncond": _adm(image_size=256, model_channels=256, num_res_blocks=2,
                                   channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, num_classes=0,
                                   noise_schedule="linear"),
    # Nichol et al., released filtered GLIDE (glide-text2im model_creation.py)
    "glide-base": _glide(),  # 385,030,726 parameters
    "glide-upsample": _glide(image_size=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                             low_res_size=64, noise_schedule="linear",
                             p_uncond=0.0),  # 398,361,286 parameters
}

CLASSIFIER_PRESETS = {
    "tiny": ClassifierConfig(),
    # Dhariwal & Nichol, released noisy classifiers (guided-diffusion README and script_util.py:
    # width 128, head width 64, attention pooling, attention at 32, 16, 8)
    "adm-classifier-imagenet64": ClassifierConfig(
        image_size=64, num_classes=1000, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=4,
        attention_resolutions=(32, 16, 8), num_head_channels=64),  # 65,438,568 parameters
    "adm-classifier-imagenet128": ClassifierConfig(
        image_size=128, num_classes=1000, model_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64,
        noise_schedule="linear"),  # 42,568,040 parameters
    "adm-classifier-imagenet256": ClassifierConfig(
        image_size=256, num_classes=1000, model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64,
        noise_schedule="linear"),  # 54,096,360 parameters
}

GLIDE_PRESETS = {
    # a 16x16 base and a 16 -> 32 upsampler for the shapes captions
    "tiny": GLIDEConfig(),
    # the released pair: 64x64 base and 64 -> 256 upsampler
    "glide": GLIDEConfig(image_size=256, base=PRESETS["glide-base"], upsample=PRESETS["glide-upsample"]),
}

# --- small helpers ---


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t as in ADM's released code: [cos(t w_i), sin(t w_i)] with
    w_i = max_period^(-i / (dim/2)). t: (B,) -> (B, dim). (Not copied from ddpm.py: Ho et al.'s
    order and spacing differ, and ADM checkpoints need this one.)"""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = t.float()[:, None] * w[None]                                    # (B, dim/2)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], 1)                  # (B, 2 * (dim/2))
    return F.pad(emb, (0, dim % 2))                                       # (B, dim)


# Copied from ddpm.zero_init
def zero_init(module):
    """Zero a layer's parameters, so a residual branch starts as the identity (Ho's released code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Copied from ddpm.GroupNorm
class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16 or fp16 input in its own dtype under autocast.

    Autocast runs group_norm in float32: a cast of the activation up, the norm, and the following
    SiLU in float32, then a cast back down for the next convolution, with the float32 copy saved
    for the backward pass. The kernel already accumulates mean and variance in float32 for half
    inputs, so calling it on the half tensor gives the same statistics, rounds only the output (as
    ADM's GroupNorm32 does: normalise in float32, cast back), and moves a third of the bytes.
    """

    def forward(self, x):
        if x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def group_norm(channels, groups=32):
    """GroupNorm over gcd(groups, channels) groups (32 in ADM), statistics in float32 (ADM's
    GroupNorm32 normalises in float32 and casts back; `GroupNorm` gets the same from the kernel)."""
    return GroupNorm(math.gcd(groups, channels), channels)


def tokenize(captions, text_ctx, bpe=None):
    """Captions -> (tokens (B, text_ctx) long, mask (B, text_ctx) bool): UTF-8 bytes, or GPT-2 BPE
    ids when `bpe` (a GPT2Tokenizer) is given, truncated to text_ctx and padded at the end (mask
    False; the pad id is 0 for bytes, the end token for BPE, as GLIDE's padded_tokens_and_mask);
    the empty caption is all padding (GLIDE's unconditional input)."""
    tokens = torch.full((len(captions), text_ctx), bpe.end_token if bpe else 0, dtype=torch.long)
    mask = torch.zeros(len(captions), text_ctx, dtype=torch.bool)
    for i, c in enumerate(captions):
        b = (bpe.encode(c) if bpe else list(c.encode("utf-8")))[:text_ctx]
        tokens[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        mask[i, :len(b)] = True
    return tokens, mask


# --- GLIDE's tokenizer: GPT-2's byte-pair encoding ---


# Copied from clip._byte_symbols
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


# Unicode's White_Space property: what `\s` matches in the `regex` package GPT-2's pattern is
# written for (str.isspace also counts the separators U+001C..U+001F, which it does not)
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(chr(c) for c in range(0x2000, 0x200B)))


# Copied from clip._bpe_merge
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


def _gpt2_pretokenize(text):
    """Splits text into words as GPT-2's pattern does, without the `regex` package:

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    At each position the first alternative that matches wins: a contraction; else an optional
    space and a run of letters (category L*), of numbers (N*) or of other non-space characters;
    else a run of whitespace, less its last character when a non-space follows (that character,
    if a space, then leads the next word: the backtracking of \\s+(?!\\S)). Letters and numbers
    are those of Python's unicodedata; a character assigned only in a newer Unicode version than
    it knows counts as "other" (checked equal to `regex` on every code point Python's table has).
    """
    def kind(ch):  # s: whitespace, L: letter, N: number, o: anything else
        return "s" if ch in _WHITE_SPACE else {"L": "L", "N": "N"}.get(unicodedata.category(ch)[0], "o")

    contractions = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
    words, i, n = [], 0, len(text)
    while i < n:
        c = next((c for c in contractions if text.startswith(c, i)), None)
        if c is not None:
            words.append(c)
            i += len(c)
            continue
        start = i + 1 if text[i] == " " and i + 1 < n and kind(text[i + 1]) != "s" else i
        k = kind(text[start])
        if k != "s":  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
            j = start + 1
            while j < n and kind(text[j]) == k:
                j += 1
        else:  # '\s+(?!\S)' or '\s+'
            j = i + 1
            while j < n and kind(text[j]) == "s":
                j += 1
            if j < n and j - i > 1:
                j -= 1
        words.append(text[i:j])
        i = j
    return words


class GPT2Tokenizer:
    """GPT-2's byte-pair encoder (Radford et al. 2019) as GLIDE uses it (section 2.3; glide-text2im's
    tokenizer): the text is lower-cased, split into words (`_gpt2_pretokenize`), each word's UTF-8
    bytes written as `_byte_symbols` and merged pair by pair, lowest rank first (Sennrich et al.
    2016). Ids come from encoder.json (50,257 for GPT-2; the last, <|endoftext|>, pads).

    bpe_dir: a folder with encoder.json and vocab.bpe, each possibly gzipped (glide-text2im ships
    them as glide_text2im/tokenizer/encoder.json.gz and vocab.bpe.gz).
    """

    def __init__(self, bpe_dir):
        self.encoder = json.loads(self._read(bpe_dir, "encoder.json"))
        lines = self._read(bpe_dir, "vocab.bpe").split("\n")[1:]  # the first line is a version header
        self.rank = {tuple(line.split()): r for r, line in enumerate(l for l in lines if l.strip())}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_to_symbol = _byte_symbols()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        self.n_vocab = len(self.encoder)
        self.end_token = self.n_vocab - 1
        self.cache = {}

    @staticmethod
    def _read(folder, name):
        for f in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
            if os.path.isfile(f):
                with (gzip.open(f, "rb") if f.endswith(".gz") else open(f, "rb")) as fh:
                    return fh.read().decode("utf-8")
        raise FileNotFoundError(f"no {name} (or {name}.gz) in {folder!r}: GLIDE's BPE files ship with "
                                "glide-text2im, in glide_text2im/tokenizer/")

    def bpe(self, word):
        """Merges the symbols of one word, lowest-ranked pair first, until no known pair is left."""
        if word in self.cache:
            return self.cache[word]
        parts = _bpe_merge(list(word), self.rank)
        self.cache[word] = parts
        return parts

    def encode(self, text):
        ids = []
        for word in _gpt2_pretokenize(text.lower()):
            symbols = "".join(self.byte_to_symbol[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(symbols))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytes(self.symbol_to_byte[ch] for ch in text).decode("utf-8", errors="replace")


_BPE_CACHE = {}


def get_bpe(bpe_dir):
    """GPT2Tokenizer of a folder (read once per folder), or None for "" (UTF-8 bytes)."""
    if not bpe_dir:
        return None
    if bpe_dir not in _BPE_CACHE:
        _BPE_CACHE[bpe_dir] = GPT2Tokenizer(bpe_dir)
    return _BPE_CACHE[bpe_dir]


def make_diffusion(c, **kw):
    """The config's Gaussian diffusion; its float64 tables live on the CPU even when the model is
    built on the meta device (parameter counting)."""
    with torch.device("cpu"):
        return GaussianDiffusion(make_beta_schedule(c.noise_schedule, c.diffusion_steps), **kw)


def host_to_device(t, device):
    """A tensor made on the CPU (token ids, targets) -> `device` without stalling the host: on CUDA
    through pinned memory with an asynchronous copy, since a copy from pageable memory first waits
    for the GPU to finish its queue (a host-device synchronisation in every training step)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --- building blocks ---


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to residual blocks and the context to attention."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """A strided 3x3 convolution. (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with the (t, y) embedding (ADM section 3).

    Adaptive group norm (use_scale_shift_norm): h = GroupNorm(h) (1 + scale) + shift with
    (scale, shift) = Linear(emb); otherwise h + Linear(emb). With up or down it is BigGAN's
    residual resampling block: both the branch and the skip are resampled (nearest 2x or 2x2
    average pooling) between the first norm and the first convolution.
    (B, C_in, H, W) -> (B, C_out, H', W').
    """

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, scale_shift_norm=True, up=False, down=False, groups=32):
        super().__init__()
        self.scale_shift_norm, self.up, self.down = scale_shift_norm, up, down
        self.in_layers = nn.Sequential(group_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out if scale_shift_norm else c_out))
        self.out_layers = nn.Sequential(group_norm(c_out, groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[:-1](x)
        h = self.in_layers[-1](self._resample(h))
        x = self._resample(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]           # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, 1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _heads(channels, num_heads, num_head_channels):
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over the H W positions, plus GLIDE's context tokens (section 2.3): each
    layer projects the context (B, S, D) to extra keys and values (encoder_kv), so every position
    attends to all H W positions and all S tokens. Residual, with a zero-initialised output.

    new_order: qkv channels are laid out [q | k | v] each split into heads (ADM 64x64's
    QKVAttention); otherwise per head [q, k, v] (the legacy layout of the other checkpoints).
    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, context_dim=0, new_order=False, groups=32):
        super().__init__()
        self.heads = _heads(channels, num_heads, num_head_channels)
        self.new_order = new_order
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        if context_dim:
            self.encoder_kv = nn.Conv1d(context_dim, 2 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def _split(self, t, n):
        """(B, n C, L) -> n tensors (B, heads, L, C / heads) in the checkpoint's channel layout."""
        B, _, L = t.shape
        if self.new_order:
            t = t.reshape(B, n, self.heads, -1, L).transpose(0, 1)        # (n, B, h, ch, L)
        else:
            t = t.reshape(B, self.heads, n, -1, L).permute(2, 0, 1, 3, 4)  # (n, B, h, ch, L)
        # channels last in memory: the fused (flash) kernels need it; else SDPA falls back to the
        # unfused maths, which under autocast runs in float32
        return [u.transpose(-1, -2).contiguous() for u in t]              # n x (B, h, L, ch)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))                 # (B, 3C, HW)
        q, k, v = self._split(qkv, 3)
        if context is not None and hasattr(self, "encoder_kv"):
            ek, ev = self._split(self.encoder_kv(context.transpose(1, 2).to(qkv.dtype)), 2)  # (B, h, S, ch)
            k, v = torch.cat([ek, k], 2), torch.cat([ev, v], 2)           # (B, h, S + HW, ch)
        a = F.scaled_dot_product_attention(q, k, v)                        # (B, h, HW, ch)
        a = a.transpose(-1, -2).reshape(B, C, H * W)                       # (B, C, HW)
        return x + self.proj_out(a).reshape(B, C, H, W)


class AttentionPool2d(nn.Module):
    """ADM's classifier head (CLIP's attention pooling): the mean position, with learned
    positional embeddings, queries all positions; its output is projected to the logits.
    (B, C, H, W) -> (B, out_dim)."""

    def __init__(self, spatial, channels, num_head_channels, out_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_dim, 1)
        self.heads = channels // num_head_channels

    def forward(self, x):
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)                                            # (B, C, HW)
        x = torch.cat([x.mean(-1, keepdim=True), x], -1)                   # (B, C, 1 + HW)
        x = x + self.positional_embedding[None].to(x.dtype)
        qkv = self.qkv_proj(x).reshape(B, 3, self.heads, C // self.heads, -1)  # (B, 3, h, C/h, 1 + HW)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)             # each (B, h, 1 + HW, C/h)
        a = F.scaled_dot_product_attention(q[:, :, :1], k, v)              # (B, h, 1, C/h)
        return self.c_proj(a.transpose(-1, -2).reshape(B, C, 1))[:, :, 0]  # (B, out_dim)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (GLIDE's xf.py)."""

    def forward(self, x):  # half precision inputs are normalised in float32
        return super().forward(x.float()).to(x.dtype) if x.element_size() < 4 else super().forward(x)


class TextBlock(nn.Module):
    """Pre-norm Transformer block of GLIDE's text encoder (bidirectional: no mask).
    (B, L, D) -> (B, L, D)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.attn = nn.ModuleDict(dict(c_qkv=nn.Linear(width, 3 * width), c_proj=nn.Linear(width, width)))
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        B, L, D = x.shape
        # GLIDE's layout: per head [q, k, v]
        qkv = self.attn.c_qkv(self.ln_1(x)).reshape(B, L, self.heads, 3, D // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)                               # 3 x (B, h, L, D/h)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        x = x + self.attn.c_proj(a)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class TextTransformer(nn.Module):
    """The stack of text blocks, named as GLIDE's `transformer.resblocks`."""

    def __init__(self, width, layers, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"xf_width {width} does not split into {heads} heads")
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


def _encoder(c, emb_dim, attn_ds, heads, head_ch, dropout, in_ch, context=0, new_order=False):
    """The UNet's downsampling half (ADM's input_blocks); shared by UNet and NoisyClassifier.
    Returns (blocks, the channels of each block's output, channels at the bottom, total downsampling)."""
    ch = c.model_channels * c.channel_mult[0]
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            layers = [ResBlock(ch, mult * c.model_channels, emb_dim, dropout, c.use_scale_shift_norm, groups=c.norm_groups)]
            ch = mult * c.model_channels
            if ds in attn_ds:
                layers.append(AttentionBlock(ch, heads, head_ch, context, new_order, c.norm_groups))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(c.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(
                ResBlock(ch, ch, emb_dim, dropout, c.use_scale_shift_norm, down=True, groups=c.norm_groups)
                if c.resblock_updown else Downsample(ch)))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ch, ds


def _attention_ds(c):
    """Feature-map sides (32, 16, 8) -> downsampling factors (image_size // side), as ADM's flags."""
    if c.image_size % 2 ** (len(c.channel_mult) - 1):
        raise ValueError(f"image_size {c.image_size} must be divisible by 2^{len(c.channel_mult) - 1} "
                         f"for channel_mult {c.channel_mult}")
    return {c.image_size // r for r in c.attention_resolutions if r > 0}


# --- the models ---


class UNet(nn.Module):
    """ADM's U-Net (Dhariwal & Nichol section 3), with GLIDE's text and context conditioning.

    forward(x_t, t, y=None, cond=None, context=None, low_res=None, tokens=None, mask=None,
            x_self=None):
      x_t (B, C, H, W); t (B,) original time indices; y (B,) labels (num_classes = null label);
      cond (B, cond_dim) projected and added to the time embedding; context (B, S, context_dim)
      extra keys/values of every attention layer; low_res (B, C, h, w) for an upsampler (resized
      bilinearly and concatenated with x_t); tokens, mask (B, text_ctx) for the text encoder, whose
      last token is projected into the time embedding and all of whose tokens join the context;
      x_self (B, C, H, W) with self_condition: an earlier estimate of x_0, concatenated with x_t
      (None: zeros, as in training without one).
      Returns (B, 2C, H, W) with learn_sigma (eps and Improved DDPM's v), else (B, C, H, W).
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if c.xf_width and c.context_dim and c.context_dim != c.xf_width:
            raise ValueError(f"context_dim {c.context_dim} must equal xf_width {c.xf_width} "
                             "(the context tokens join the text tokens)")
        if (c.text_ctx > 0) != (c.xf_width > 0):
            raise ValueError("a text encoder needs both text_ctx and xf_width > 0")
        context = c.context_dim or c.xf_width
        emb_dim = 4 * c.model_channels
        attn_ds = _attention_ds(c)
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes:  # one more row, the null label, when trained for classifier-free guidance
            self.label_emb = nn.Embedding(c.num_classes + (c.p_uncond > 0), emb_dim)
        if c.cond_dim:
            self.cond_proj = nn.Linear(c.cond_dim, emb_dim)
        in_ch = c.in_channels * (1 + bool(c.low_res_size) + c.self_condition)
        self.input_blocks, chans, ch, ds = _encoder(c, emb_dim, attn_ds, c.num_heads, c.num_head_channels,
                                                    c.dropout, in_ch, context, c.new_attention_order)
        mk_res = lambda a, b, **kw: ResBlock(a, b, emb_dim, c.dropout, c.use_scale_shift_norm, groups=c.norm_groups, **kw)
        mk_attn = lambda a, h: AttentionBlock(a, h, c.num_head_channels, context, c.new_attention_order, c.norm_groups)
        self.middle_block = TimestepEmbedSequential(mk_res(ch, ch), mk_attn(ch, c.num_heads), mk_res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [mk_res(ch + chans.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in attn_ds:
                    layers.append(mk_attn(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(mk_res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        out_ch = c.in_channels * (2 if c.learn_sigma else 1)
        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                 zero_init(nn.Conv2d(c.model_channels * c.channel_mult[0], out_ch, 3, padding=1)))
        if c.xf_width:  # GLIDE's text encoder (text2im_model.py names)
            self.transformer = TextTransformer(c.xf_width, c.xf_layers, c.xf_heads)
            self.final_ln = LayerNorm(c.xf_width) if c.xf_final_ln else None
            self.token_embedding = nn.Embedding(c.vocab_size, c.xf_width)
            self.positional_embedding = nn.Parameter(torch.randn(c.text_ctx, c.xf_width) * 0.01)
            self.transformer_proj = nn.Linear(c.xf_width, emb_dim)
            if c.xf_padding:
                self.padding_embedding = nn.Parameter(torch.randn(c.text_ctx, c.xf_width) * 0.01)

    def encode_text(self, tokens, mask):
        """GLIDE section 2.3: tokens (B, L) -> (last token projected (B, 4 model_channels),
        all tokens (B, L, xf_width)). Padded positions get learned padding embeddings."""
        x = self.token_embedding(tokens) + self.positional_embedding[None]   # (B, L, D)
        if self.config.xf_padding:
            x = torch.where(mask[..., None], x, self.padding_embedding[None].to(x.dtype))
        x = self.transformer(x)
        if self.final_ln is not None:
            x = self.final_ln(x)
        return self.transformer_proj(x[:, -1]), x

    def forward(self, x_t, t, y=None, cond=None, context=None, low_res=None, tokens=None, mask=None,
                x_self=None):
        c = self.config
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(x_t.dtype))  # (B, 4 mc)
        if c.num_classes:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass y")
            emb = emb + self.label_emb(y)
        if (cond is not None and not c.cond_dim) or (context is not None and not (c.context_dim or c.xf_width)):
            raise ValueError("cond needs cond_dim > 0 and context needs context_dim > 0 in the config")
        if cond is not None:
            emb = emb + self.cond_proj(cond.to(emb.dtype))
        if c.xf_width:
            if tokens is None:
                raise ValueError("this UNet is text-conditional: pass tokens and mask")
            proj, xf = self.encode_text(tokens, mask)
            emb = emb + proj
            context = xf if context is None else torch.cat([xf, context.to(xf.dtype)], 1)  # (B, L + S, D)
        h = x_t
        if c.low_res_size:
            if low_res is None:
                raise ValueError("this UNet is an upsampler: pass low_res")
            up = F.interpolate(low_res.to(x_t.dtype), x_t.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([x_t, up], 1)                                     # (B, 2C, H, W)
        if c.self_condition:
            h = torch.cat([h, torch.zeros_like(x_t) if x_self is None else x_self.to(x_t.dtype)], 1)
        elif x_self is not None:
            raise ValueError("x_self needs self_condition = True in the config")
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], 1), emb, context)            # (B, C_h + C_skip, H', W')
        return self.out(h)


class NoisyClassifier(nn.Module):
    """p(y | x_t): the UNet's encoder half and middle block with attention pooling (ADM section
    4.1, "the downsampling trunk of the UNet ... with an attention pool at the 8x8 layer"),
    trained with cross-entropy on noised images x_t ~ q(x_t | x_0) at uniform t.

    forward(x_t, t): (B, C, H, W), (B,) -> logits (B, num_classes).
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if c.num_classes < 1:
            raise ValueError("a classifier needs num_classes >= 1 (labelled data)")
        emb_dim = 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks, _, ch, ds = _encoder(c, emb_dim, _attention_ds(c), 1, c.num_head_channels, 0.0,
                                                c.in_channels)
        mk_res = lambda: ResBlock(ch, ch, emb_dim, 0.0, c.use_scale_shift_norm, groups=c.norm_groups)
        self.middle_block = TimestepEmbedSequential(
            mk_res(), AttentionBlock(ch, 1, c.num_head_channels, groups=c.norm_groups), mk_res())
        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                 AttentionPool2d(c.image_size // ds, ch, c.num_head_channels, c.num_classes))
        self.diffusion = make_diffusion(c)

    def forward(self, x_t, t):
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x_t.dtype))
        h = x_t
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb)).float()

    def loss(self, batch):
        """Cross-entropy of y given x_t at a uniform t (ADM section 4.1); labels -1 are skipped."""
        x_0, y = batch["image"], batch["label"]
        self.diffusion.to(x_0.device)
        t = torch.randint(0, self.config.diffusion_steps, (x_0.shape[0],), device=x_0.device)
        logits = self(self.diffusion.q_sample(x_0, t), t)
        ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        known = (y >= 0).float()
        n = known.sum().clamp(min=1)
        acc = ((logits.argmax(-1) == y).float() * known).sum() / n
        return {"loss": (ce * known).sum() / n, "acc": acc}

    @torch.no_grad()
    def evaluate(self, batch):
        """Accuracy on clean images (t = 0) and at a uniform t."""
        x_0, y = batch["image"], batch["label"]
        zero = torch.zeros(x_0.shape[0], dtype=torch.long, device=x_0.device)
        t = torch.randint(0, self.config.diffusion_steps, zero.shape, device=x_0.device)
        return {"acc_t0": (self(x_0, zero).argmax(-1) == y).float().mean(),
                "acc_random_t": (self(self.diffusion.q_sample(x_0, t), t).argmax(-1) == y).float().mean()}


# --- guidance ---


class ClassifierFreeGuidance(nn.Module):
    """eps~(x_t, c) = eps(x_t, null) + s (eps(x_t, c) - eps(x_t, null)) (Ho & Salimans eq. 6,
    written with s = 1 + w as in GLIDE eq. 4), from ONE forward on the batch [conditional;
    unconditional]. s = 1 is the conditional model, s = 0 the unconditional one. The variance
    channels (learned sigma) are the conditional ones.

    model: called as model(x_t, t, **kwargs); uncond: keyword arguments of the unconditional half
    (tensors with the batch's first dimension), e.g. {"y": null labels} or {"tokens", "mask"} of
    the empty caption. Keyword arguments at call time are the conditional ones; a keyword only in
    the conditional set (e.g. low_res) is shared by both halves.
    """

    def __init__(self, model, scale, uncond):
        super().__init__()
        self.model, self.scale, self.uncond = model, scale, uncond

    def forward(self, x_t, t, **cond):
        kw = {}
        for k in set(cond) | set(self.uncond):
            a, b = cond.get(k), self.uncond.get(k, cond.get(k))
            if a is None and b is not None:
                raise ValueError(f"{k} is given for the unconditional half only")
            kw[k] = None if a is None else torch.cat([a, b.to(a.dtype)], 0)    # (2B, ...)
        out = self.model(torch.cat([x_t, x_t], 0), torch.cat([t, t], 0), **kw)  # (2B, C', H, W)
        out_c, out_u = out.chunk(2, 0)
        C = x_t.shape[1]
        eps = out_u[:, :C] + self.scale * (out_c[:, :C] - out_u[:, :C])
        return torch.cat([eps, out_c[:, C:]], 1)                           # (B, C', H, W)


def classifier_cond_fn(classifier, y, scale):
    """The classifier-guidance hook: cond_fn(x_t, t) = s grad_{x_t} log p_phi(y | x_t, t)
    (Dhariwal & Nichol alg. 1 and 2). The samplers shift the ancestral mean by Sigma cond_fn
    (alg. 1) or eps by -sqrt(1 - alpha_bar) cond_fn (alg. 2, DDIM). Gradients are enabled locally,
    so sampling may run under torch.no_grad(). y: (B,) target classes."""

    def cond_fn(x_t, t, **_):
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            log_p = classifier(x, t).float().log_softmax(-1)                # (B, classes)
            selected = log_p[torch.arange(len(y), device=x.device), y.to(x.device)]
            return torch.autograd.grad(selected.sum(), x)[0] * scale

    return cond_fn


def clip_cond_fn(image_encoder, text_embedding, scale, logit_scale=1.0):
    """CLIP guidance (GLIDE section 2.4): cond_fn(x_t, t) = s grad_{x_t} (f(x_t, t) . g(c)), with
    f a CLIP image encoder trained on noised images and g(c) the caption's text embedding
    (B, D) or (D,). Both embeddings are normalised and scaled by logit_scale, as in the released
    code. Used through the same hook as `classifier_cond_fn`."""

    def cond_fn(x_t, t, **_):
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            z_i = F.normalize(image_encoder(x, t).float(), dim=-1)        # (B, D)
            z_t = F.normalize(text_embedding.float().to(x.device), dim=-1)
            return torch.autograd.grad(logit_scale * (z_i * z_t).sum(), x)[0] * scale

    return cond_fn


# --- trainable models ---


class ADM(nn.Module):
    """A diffusion model around one UNet (ADM; Dhariwal & Nichol section 3), conditioned on what
    its config names: class labels (num_classes), captions (xf_width) and/or a low-resolution
    image (low_res_size). Trained with Improved DDPM's L_hybrid when learn_sigma (ADM's choice),
    else L_simple. With p_uncond > 0 the condition is dropped to the null label / empty caption
    with that probability (Ho & Salimans algorithm 1), so one network is both eps(x_t, c) and
    eps(x_t, null) and can be sampled with classifier-free guidance.
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if not 0 <= c.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {c.p_uncond}")
        self.unet = UNet(c)
        self.diffusion = make_diffusion(c, variance="learned_range" if c.learn_sigma else "fixed_small",
                                        loss="hybrid" if c.learn_sigma else "simple")

    def forward(self, x_t, t, **kwargs):
        return self.unet(x_t, t, **kwargs)

    @torch.compiler.disable  # host-side string work: torch.compile would specialise on every caption
    def _text(self, captions, device):
        bpe = get_bpe(self.config.bpe_dir)
        if bpe is not None and bpe.n_vocab > self.config.vocab_size:
            raise ValueError(f"the BPE in {self.config.bpe_dir} has {bpe.n_vocab} tokens, the model's "
                             f"embedding {self.config.vocab_size}: set vocab_size")
        tokens, mask = tokenize(captions, self.config.text_ctx, bpe)
        return host_to_device(tokens, device), host_to_device(mask, device)

    def training_kwargs(self, batch, x_0):
        """The UNet's keyword arguments for a training batch, with the condition dropped (set to
        the null label / the empty caption) with probability p_uncond."""
        c, B, dev = self.config, x_0.shape[0], x_0.device
        drop = torch.rand(B, device=dev) < c.p_uncond                     # (B,)
        kw = {}
        if c.num_classes:
            y = batch["label"]
            kw["y"] = torch.where(drop | (y < 0), torch.full_like(y, c.num_classes), y) if c.p_uncond > 0 else y
        if c.xf_width:
            tokens, mask = self._text(batch["caption"], dev)
            kw["tokens"] = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
            kw["mask"] = mask & ~drop[:, None]
        if c.low_res_size:
            kw["low_res"] = F.interpolate(x_0, size=c.low_res_size, mode="area")  # (B, C, h, w)
        return kw

    def loss(self, batch):
        """L_hybrid (or L_simple) at a uniform t (Improved DDPM eq. 16), with condition dropout."""
        x_0 = batch["image"]
        self.diffusion.to(x_0.device)  # tables beside the data: no host copies per step
        kw = self.training_kwargs(batch, x_0)
        t = torch.randint(0, self.config.diffusion_steps, (x_0.shape[0],), device=x_0.device)
        terms = self.diffusion.training_losses(self.unet, x_0, t, model_kwargs=kw)
        return {k: v.mean() for k, v in terms.items()}

    def conditions(self, n, label=None, prompt=None, low_res=None, device="cpu"):
        """(conditional kwargs, unconditional kwargs, labels) for sampling n images. label: None
        (random classes), an int or a (n,) tensor; prompt: a caption or a list of n (None: the
        empty caption, i.e. unconditional text)."""
        c = self.config
        kw, un, y = {}, {}, None
        if label is not None or c.num_classes:
            if label is None:
                y = torch.randint(0, c.num_classes, (n,), device=device)
            else:
                y = torch.as_tensor(label, device=device).long().expand(n).clone()
                if c.num_classes and not ((0 <= y) & (y < c.num_classes)).all():
                    raise ValueError(f"--label must be in 0..{c.num_classes - 1}")
        if c.num_classes:
            kw["y"], un["y"] = y, torch.full_like(y, c.num_classes)
        if c.xf_width:
            prompts = [prompt or ""] * n if prompt is None or isinstance(prompt, str) else list(prompt)
            if len(prompts) != n:
                raise ValueError(f"{len(prompts)} prompts for {n} samples")
            kw["tokens"], kw["mask"] = self._text(prompts, device)
            un["tokens"], un["mask"] = self._text([""] * n, device)
        elif prompt is not None:
            raise ValueError("this model is not text-conditional; drop --prompt")
        if c.low_res_size:
            if low_res is None:
                raise ValueError("an upsampler needs low_res images")
            kw["low_res"] = low_res.to(device)
        return kw, un, y

    @torch.no_grad()
    def sample(self, n, label=None, prompt=None, guidance_scale=1.0, classifier=None, classifier_scale=1.0,
               steps=50, eta=None, low_res=None, noise=None, progress=None):
        """n samples (n, C, S, S) in [-1, 1].

        guidance_scale s: classifier-free guidance (1: the conditional model, 0: unconditional;
            needs p_uncond > 0). classifier: a NoisyClassifier of the same diffusion; its gradient
            toward `label` (random classes when None) scaled by classifier_scale guides sampling
            (ADM alg. 1, or alg. 2 when eta is given). steps: respaced sampling steps (None: all
            T; 50 by default, enough with learned variances, Improved DDPM section 4); eta: None
            for ancestral sampling, a number for DDIM. progress: a step counter on stderr; by
            default only when stderr is a terminal.
        """
        if progress is None:
            progress = sys.stderr.isatty()
        c, dev = self.config, _model_device(self)
        if classifier is not None and label is None and not c.num_classes:
            raise ValueError("classifier guidance needs a target class: pass --label")
        if label is not None and not c.num_classes and classifier is None:
            raise ValueError("this model is not class-conditional; drop --label")
        kw, un, y = self.conditions(n, label, prompt, low_res, dev)
        model = self.unet
        if guidance_scale != 1:
            if not un or c.p_uncond == 0:
                raise ValueError("--guidance-scale needs a model trained with its condition dropped "
                                 "(p_uncond > 0); this one has no unconditional mode")
            if guidance_scale == 0:  # eps(x_t, null) alone: no need for the conditional half
                kw = {**kw, **un}
            else:
                model = ClassifierFreeGuidance(self.unet, guidance_scale, un)
        cond_fn = None
        if classifier is not None:
            cc = getattr(classifier, "config", None)
            if cc is not None and (cc.diffusion_steps, cc.noise_schedule, cc.image_size) != (
                    c.diffusion_steps, c.noise_schedule, c.image_size):
                raise ValueError(f"the classifier was trained for T={cc.diffusion_steps} {cc.noise_schedule} "
                                 f"at {cc.image_size}px, the model is T={c.diffusion_steps} "
                                 f"{c.noise_schedule} at {c.image_size}px")
            if cc is not None and not (y < cc.num_classes).all():
                raise ValueError(f"--label must be in 0..{cc.num_classes - 1} for this classifier")
            cond_fn = classifier_cond_fn(classifier, y, classifier_scale)
        shape = (n, c.in_channels, c.image_size, c.image_size)
        x = self.diffusion.to(dev).sample(model, shape, steps, eta, noise=noise, model_kwargs=kw, progress=progress,
                                  cond_fn=cond_fn, device=dev)
        return x.clamp(-1, 1)


class GLIDE(nn.Module):
    """GLIDE (Nichol et al. section 2): a text-conditional base model and a text-conditional
    upsampler, each an ADM with its own text encoder, trained as two phases. Sampling runs the
    base with classifier-free guidance (scale 3 by default, the paper's choice) and the upsampler
    on its output with the same caption.
    """
    phases = ("base", "upsample")

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        b, u = c.base, c.upsample
        if not (b.xf_width and u.xf_width):
            raise ValueError("both GLIDE models are text-conditional: set xf_width and text_ctx")
        if u.low_res_size != b.image_size or u.image_size != c.image_size:
            raise ValueError(f"the upsampler must map base.image_size ({b.image_size}) to image_size "
                             f"({c.image_size}): set --upsample.low-res-size and --upsample.image-size")
        if b.in_channels != c.in_channels or u.in_channels != c.in_channels:
            raise ValueError("base, upsample and GLIDE must have the same in_channels")
        self.base, self.upsample = ADM(b), ADM(u)

    def phase_module(self, phase):
        return {"base": self.base, "upsample": self.upsample}[phase]

    def loss(self, batch, phase):
        if phase == "base":  # the base model learns the images downsampled to its size
            x = F.interpolate(batch["image"], size=self.config.base.image_size, mode="area")
            return self.base.loss({**batch, "image": x})
        return self.upsample.loss(batch)

    @torch.no_grad()
    def sample(self, n, prompt=None, guidance_scale=3.0, steps=50, eta=None, progress=None,
               upsample_steps=None, upsample_eta=None, upsample_temp=1.0):
        """n images (n, C, S, S): base samples with guidance, then upsampled (prompt None: the
        empty caption, i.e. unconditional samples). The upsampler takes `steps` and `eta` unless
        upsample_steps (a count, or a list of time indices such as `glide_fast27()`) and
        upsample_eta are given; its x_T is scaled by upsample_temp. GLIDE's released notebook
        samples the base with 100 ancestral steps at guidance 3 and the upsampler with DDIM
        (eta 0) on fast27 from x_T * 0.997."""
        if prompt is None:
            guidance_scale = 1.0  # guidance toward the empty caption is the unconditional model
        low = self.base.sample(n, prompt=prompt, guidance_scale=guidance_scale, steps=steps, eta=eta,
                               progress=progress)
        u = self.upsample.config
        noise = None
        if upsample_temp != 1.0:
            noise = torch.randn(n, u.in_channels, u.image_size, u.image_size, device=low.device) * upsample_temp
        return self.upsample.sample(n, prompt=prompt, steps=steps if upsample_steps is None else upsample_steps,
                                    eta=eta if upsample_eta is None else upsample_eta, low_res=low, noise=noise,
                                    progress=progress)


def glide_fast27(T=1000):
    """GLIDE's "fast27" spacing of the upsampler's T steps (glide-text2im respace.py): T split into
    five equal parts sampled with 10, 10, 3, 2 and 2 evenly spaced steps, the last index T - 1
    replaced by T - 3 (against DDIM artefacts at the noisiest steps). 27 indices."""
    counts, kept, start = (10, 10, 3, 2, 2), set(), 0
    for i, k in enumerate(counts):
        size = T // len(counts) + (i < T % len(counts))
        stride = (size - 1) / (k - 1) if k > 1 else 1
        kept |= {start + round(j * stride) for j in range(k)}
        start += size
    return sorted((kept - {T - 1}) | {T - 3})


# --- released checkpoints (guided-diffusion and glide-text2im) ---

# the authors' file name -> (our preset, which presets dict holds it)
OPENAI_FILES = {
    "64x64_diffusion.pt": ("adm-imagenet64", "PRESETS"),
    "128x128_diffusion.pt": ("adm-imagenet128", "PRESETS"),
    "256x256_diffusion.pt": ("adm-imagenet256", "PRESETS"),
    "256x256_diffusion_uncond.pt": ("adm-imagenet256-uncond", "PRESETS"),
    "64x64_classifier.pt": ("adm-classifier-imagenet64", "CLASSIFIER_PRESETS"),
    "128x128_classifier.pt": ("adm-classifier-imagenet128", "CLASSIFIER_PRESETS"),
    "256x256_classifier.pt": ("adm-classifier-imagenet256", "CLASSIFIER_PRESETS"),
    "base.pt (GLIDE)": ("glide-base", "PRESETS"),
    "upsample.pt (GLIDE)": ("glide-upsample", "PRESETS"),
}


# Copied from ddpm.read_state_dict
def read_state_dict(path):
    """A released weight file (or the dict already loaded from it) -> its flat {name: tensor} dict,
    loaded with weights_only=True (a file that needs code execution to load is refused). Any
    failure is a ValueError of one line."""
    if isinstance(path, dict):
        sd, path = path, "the state dict"
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except Exception as e:  # truncated zip, pickle that needs code, not a torch file at all
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}); it may be "
                             "truncated, or need code execution to load, which is refused") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict (a dict of named tensors)")
    return sd


# Copied from ddpm.check_layout
def check_layout(state_dict, layouts, what):
    """Find the layout a state dict has and check it key for key; return its name.

    layouts: {name: {key: shape}}, each a released file's keys in order. The candidate with the
    most (key, shape) pairs in common, less the keys it has and the file lacks, is checked (so an
    unconditional file is not taken for the conditional one, whose keys include its own); the
    first key that is missing, unexpected or of another shape raises a ValueError of one line
    naming it and the layout. A state dict that shares fewer than half its keys with every
    candidate is not one of `what`: the error lists them.
    """
    common = lambda lay: sum(tuple(v.shape) == lay.get(k) for k, v in state_dict.items())  # noqa: E731
    name = max(layouts, key=lambda n: 2 * common(layouts[n]) - len(layouts[n]))
    expected = layouts[name]
    if 2 * common(expected) < len(expected):
        raise ValueError(f"not a known layout of {what}; known: {', '.join(layouts)}")
    for k, v in state_dict.items():
        if k not in expected:
            raise ValueError(f"unexpected key {k!r} for the layout of {name}")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"key {k!r} has shape {tuple(v.shape)}, the layout of {name} has {expected[k]}")
    for k in expected:
        if k not in state_dict:
            raise ValueError(f"missing key {k!r} of the layout of {name}")
    return name


def _released_model(preset):
    """The model of a released file's preset (ADM or NoisyClassifier), built on the meta device:
    no memory is allocated until the weights are assigned."""
    file = next(f for f, (p, _) in OPENAI_FILES.items() if p == preset)
    table = OPENAI_FILES[file][1]
    with torch.device("meta"):
        if table == "CLASSIFIER_PRESETS":
            return NoisyClassifier(CLASSIFIER_PRESETS[preset])
        return ADM(PRESETS[preset])


def _layout_name(preset):
    file = next(f for f, (p, _) in OPENAI_FILES.items() if p == preset).split()[0]
    return f"{'glide-text2im' if preset.startswith('glide') else 'guided-diffusion'}'s {file} ({preset})"


def released_layouts(presets=None):
    """{"guided-diffusion's FILE (preset)": {key: shape}} of the released files (or of those with
    the given presets), in the authors' key order."""
    if not _LAYOUTS:  # built once (about a second: nine networks on the meta device)
        for preset, table in OPENAI_FILES.values():
            m = _released_model(preset)
            net = m if table == "CLASSIFIER_PRESETS" else m.unet
            _LAYOUTS[preset] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return {_layout_name(p): lay for p, lay in _LAYOUTS.items() if presets is None or p in presets}


_LAYOUTS = {}


def load_openai(path, preset=None):
    """A released guided-diffusion or GLIDE checkpoint -> the model, in eval mode, float32.

    guided-diffusion's 64x64, 128x128, 256x256 (and 256x256 unconditional) diffusion models load
    as `ADM`, its 64/128/256 noisy classifiers as `NoisyClassifier`, GLIDE's base.pt and
    upsample.pt as `ADM` with the glide-base / glide-upsample presets (give the model a BPE with
    `model.config.bpe_dir` for their captions). The file (or the dict already loaded from it) is
    read with weights_only=True; its layout picks the preset unless `preset` names one (see
    OPENAI_FILES); every key and shape is checked, and a mismatch is a ValueError of one line
    naming the key and the layout expected. Weights stored in float16 are cast to float32. The module names are the authors', so this is
    a key-for-key copy; the diffusion (T, schedule, learned sigma) is the preset's, as trained.
    """
    sd = read_state_dict(path)
    known = [p for p, _ in OPENAI_FILES.values()]
    if preset is not None and preset not in known:
        raise ValueError(f"{preset!r} is not the preset of a released file; known: {', '.join(known)}")
    layouts = released_layouts(None if preset is None else {preset})
    found = check_layout(sd, layouts, "guided-diffusion's and GLIDE's released checkpoints")
    preset = next(p for p in known if _layout_name(p) == found)
    model = _released_model(preset)
    net = model if isinstance(model, NoisyClassifier) else model.unet
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


# --- the diffusion process (checked copies of ddpm.py) ---


# Copied from ddpm.make_beta_schedule
def make_beta_schedule(name, T):
    """The noise schedule beta_1..beta_T as a float64 tensor of shape (T,).

    "linear": Ho et al. section 4, beta from 1e-4 to 0.02 at T = 1000; for other T both ends are
        scaled by 1000 / T (Improved DDPM, appendix / released code) so that alpha_bar_T stays
        close to the T = 1000 value.
    "cosine": Improved DDPM eq. 17, alpha_bar(t) = f(t) / f(0) with
        f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, s = 0.008, and
        beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999 to avoid the singularity
        at t = T.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if name == "linear":
        if T <= 20:
            raise ValueError(f"the linear schedule needs T > 20 (beta_T = 20/T must stay below 1), got T={T}")
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # f(0) cancels in ratios
        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")


# Copied from ddpm._gather
def _gather(a, t, x):
    """a[t] for a (T,) float64 table and (B,) long t, cast to x's dtype, shape (B, 1, ..., 1)."""
    return a.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


# Copied from ddpm._model_device
def _model_device(model):
    """The device of a module's first parameter; CPU for plain callables or parameterless modules."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# Copied from ddpm.normal_kl
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


# Copied from ddpm.discretized_gaussian_log_likelihood
def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) for images x in [-1, 1] quantized to 256 levels, under N(mean, e^{2 log_scale}).

    Ho et al. eq. 13: each level owns a bin of width 2/255 around it; the edge bins extend to
    -inf and +inf so that the 256 bin probabilities sum to 1. Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# Copied from ddpm.space_timesteps
def space_timesteps(T, steps):
    """`steps` time indices spread evenly over 0..T-1, always keeping 0 and T-1 (for steps > 1)."""
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..{T}, got {steps!r}")
    if steps == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})


# Copied from ddpm.GaussianDiffusion
class GaussianDiffusion:
    """The forward process q and the reverse process p around an arbitrary model (Ho et al. 2020).

    A plain object, not a module: its tables are float64 and stay outside the model's state dict,
    so they are neither cast by autocast nor saved (they follow from the config).

    Args:
        betas: (T,) schedule, from `make_beta_schedule`.
        prediction: what the model predicts: "eps" (Ho eq. 11), "x_0", or "v" (Salimans & Ho).
        variance: "fixed_small" (sigma^2 = beta_tilde), "fixed_large" (sigma^2 = beta; Ho section
            3.2) or "learned_range" (Improved DDPM eq. 15; the model returns 2C channels).
        loss: "simple" (Ho eq. 14), "hybrid" (Improved DDPM eq. 16) or "vlb" (Ho eq. 5).
        timestep_map: (T,) original time index of each step; set by `respace`, identity otherwise.
    """

    def __init__(self, betas, prediction="eps", variance="fixed_small", loss="simple", timestep_map=None):
        if prediction not in ("eps", "x_0", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; use 'eps', 'x_0' or 'v'")
        if variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"unknown variance {variance!r}; use 'fixed_small', 'fixed_large' or 'learned_range'")
        if loss not in ("simple", "hybrid", "vlb"):
            raise ValueError(f"unknown loss {loss!r}; use 'simple', 'hybrid' or 'vlb'")
        self.prediction, self.variance, self.loss_type = prediction, variance, loss
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        if self.betas.dim() != 1 or not ((self.betas > 0) & (self.betas < 1)).all():
            raise ValueError("betas must be a 1-d tensor with values in (0, 1)")
        self.num_timesteps = T = len(self.betas)
        self.timestep_map = (torch.arange(T, device=self.betas.device) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long, device=self.betas.device))
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)                        # alpha_bar_t = prod_s alpha_s
        self.alpha_bar_prev = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # Ho eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        self.posterior_variance = self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde_0 = 0; its log is clipped to beta_tilde_1, as in the released code (Improved
        # DDPM eq. 15 interpolates in log space, which needs a finite lower end at t = 0)
        post_var_1 = self.posterior_variance[1] if T > 1 else self.betas[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var_1.reshape(1), self.posterior_variance[1:]]))
        # Ho eq. 7: mu_tilde_t = coef1 x_0 + coef2 x_t
        self.posterior_mean_coef1 = self.betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)

    def to(self, device):
        """Move every table to `device` (in place; a no-op when already there), so that gathering
        from them inside the training loop never copies from the host."""
        device = torch.device(device)
        if self.betas.device != device:
            for k, v in vars(self).items():
                if torch.is_tensor(v):
                    setattr(self, k, v.to(device))
        return self

    # --- respacing ---

    def respace(self, steps):
        """A diffusion on `steps` evenly spaced time steps of this one (Improved DDPM section 4).

        For kept indices S_1 < ... < S_K the new process keeps alpha_bar_{S_i} and rebuilds
        beta_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}} (alpha_bar_{S_0} = 1), so sampling can
        take fewer steps than training without retraining. `timestep_map` remembers S_i so the
        model still sees the original time index. `steps` may also be a list of the indices to
        keep (a released model's own spacing, such as GLIDE's "fast27").
        """
        if steps is None or steps == self.num_timesteps:
            return self
        if isinstance(steps, (list, tuple)):
            kept = sorted(set(steps))
            if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
                raise ValueError(f"time indices must lie in 0..{self.num_timesteps - 1}")
        else:
            kept = space_timesteps(self.num_timesteps, steps)
        ab = self.alpha_bar[kept]
        betas = 1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
        return GaussianDiffusion(betas, self.prediction, self.variance, self.loss_type,
                                 timestep_map=self.timestep_map[kept])

    # --- forward process q ---

    def q_sample(self, x_0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) (Ho eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x_0: (B, C, H, W); t: (B,) long in 0..T-1; returns (B, C, H, W).
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        return _gather(self.sqrt_alpha_bar, t, x_0) * x_0 + _gather(self.sqrt_one_minus_alpha_bar, t, x_0) * noise

    def q_mean_variance(self, x_0, t):
        """Mean, variance and log variance of q(x_t | x_0) (Ho eq. 4)."""
        mean = _gather(self.sqrt_alpha_bar, t, x_0) * x_0
        return mean, _gather(1.0 - self.alpha_bar, t, x_0), _gather(torch.log(1.0 - self.alpha_bar), t, x_0)

    def q_posterior_mean_variance(self, x_0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho eq. 6-7).

        mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        """
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x_0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t), _gather(self.posterior_log_variance_clipped, t, x_t)

    # --- conversions between the model's targets ---

    def predict_x_0_from_eps(self, x_t, t, eps):
        """Ho eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * eps) / _gather(self.sqrt_alpha_bar, t, x_t)

    def predict_eps_from_x_0(self, x_t, t, x_0):
        """Ho eq. 4 solved for eps: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return (x_t - _gather(self.sqrt_alpha_bar, t, x_t) * x_0) / _gather(self.sqrt_one_minus_alpha_bar, t, x_t)

    def predict_x_0_from_v(self, x_t, t, v):
        """Salimans & Ho section 4: x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return _gather(self.sqrt_alpha_bar, t, x_t) * x_t - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * v

    def training_target(self, x_0, t, noise):
        """What the model regresses on under L_simple: eps, x_0, or v = sqrt(ab) eps - sqrt(1-ab) x_0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x_0":
            return x_0
        return _gather(self.sqrt_alpha_bar, t, x_0) * noise - _gather(self.sqrt_one_minus_alpha_bar, t, x_0) * x_0

    # --- reverse process p ---

    def model_output_to_mean_variance(self, out, x_t, t, clip_denoised=False):
        """Turn a raw model output into p(x_{t-1} | x_t) = N(mean, variance).

        out: (B, C, H, W), or (B, 2C, H, W) under learned_range, whose second half is Improved
        DDPM's v in [-1, 1] (eq. 15): log Sigma = v' log beta_t + (1 - v') log beta_tilde_t with
        v' = (v + 1) / 2. The mean is mu_tilde(x_0_hat, x_t) (Ho eq. 7 with eq. 11's x_0 estimate),
        which for eps prediction equals Ho eq. 11. Returns a dict of mean, variance, log_variance,
        pred_x_0, pred_eps, each (B, C, H, W) in x_t's dtype.
        """
        C = x_t.shape[1]
        if self.variance == "learned_range":
            assert out.shape[1] == 2 * C, f"learned_range needs 2C = {2 * C} output channels, got {out.shape[1]}"
            out, var_frac = out[:, :C], out[:, C:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(torch.log(self.betas), t, x_t)
            frac = (var_frac + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            assert out.shape[1] == C, f"fixed variance needs {C} output channels, got {out.shape[1]}"
            if self.variance == "fixed_large":
                # sigma^2 = beta_t; at t = 0 beta_tilde_1 instead, as in the released code, which
                # gives the decoder L_0 a sensible width
                table = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_timesteps > 1 else self.betas
                variance, log_variance = _gather(table, t, x_t), _gather(torch.log(table), t, x_t)
            else:  # fixed_small: sigma^2 = beta_tilde_t (0 at t = 0, where no noise is added)
                variance = _gather(self.posterior_variance, t, x_t)
                log_variance = _gather(self.posterior_log_variance_clipped, t, x_t)
        if self.prediction == "eps":
            pred_x_0 = self.predict_x_0_from_eps(x_t, t, out)
        elif self.prediction == "x_0":
            pred_x_0 = out
        else:
            pred_x_0 = self.predict_x_0_from_v(x_t, t, out)
        if clip_denoised:
            pred_x_0 = pred_x_0.clamp(-1, 1)
        pred_eps = self.predict_eps_from_x_0(x_t, t, pred_x_0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x_0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_x_0": pred_x_0, "pred_eps": pred_eps}

    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None):
        """Run the model at step t of this process and return p(x_{t-1} | x_t) (see above).

        The model is called as model(x_t, T_orig, **model_kwargs), T_orig the ORIGINAL time index
        (it differs from t only for a respaced process). The output is cast to at least float32
        for the maths, so a bf16 model never touches the schedule arithmetic.
        """
        out = model(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return self.model_output_to_mean_variance(out.to(dtype), x_t.to(dtype), t, clip_denoised)

    # --- samplers ---

    def condition_mean(self, cond_fn, p, x_t, t, model_kwargs=None):
        """Shift the ancestral mean by Sigma grad_x log p(y | x_t) (Dhariwal & Nichol 2021, alg. 1).

        A hook for classifier guidance (guided.py); cond_fn(x_t, t_orig, **model_kwargs) returns
        the (scaled) gradient, shape of x_t. The samplers run under no_grad, so cond_fn must
        enable gradients itself (torch.enable_grad()).
        """
        grad = cond_fn(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        return p["mean"] + p["variance"] * grad.to(p["mean"].dtype)

    def condition_score(self, cond_fn, p, x_t, t, model_kwargs=None):
        """Shift eps by -sqrt(1 - alpha_bar_t) grad_x log p(y | x_t) (Dhariwal & Nichol 2021, alg. 2).

        The DDIM counterpart of `condition_mean` (a score shift); returns updated pred_x_0, pred_eps.
        """
        grad = cond_fn(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        eps = p["pred_eps"] - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * grad.to(p["pred_eps"].dtype)
        return self.predict_x_0_from_eps(x_t, t, eps), eps

    def p_sample(self, model, x_t, t, clip_denoised=True, cond_fn=None, model_kwargs=None):
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (Ho algorithm 2, line 4):
        x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at t = 0.

        x_t: (B, C, H, W); t: (B,) long step of this process. Returns {"sample", "pred_x_0"}.
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        mean = self.condition_mean(cond_fn, p, x_t, t, model_kwargs) if cond_fn is not None else p["mean"]
        z = torch.randn_like(mean)
        nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        x_prev = mean + nonzero * torch.exp(0.5 * p["log_variance"]) * z
        return {"sample": x_prev.to(x_t.dtype), "pred_x_0": p["pred_x_0"]}

    def ddim_sample(self, model, x_t, t, eta=0.0, clip_denoised=True, cond_fn=None, model_kwargs=None):
        """One DDIM step (Song et al. 2021, eq. 12, with sigma from eq. 16):
        x_{t-1} = sqrt(alpha_bar_{t-1}) x_0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
        sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1}).
        eta = 0 is deterministic; eta = 1 is the ancestral sampler with sigma^2 = beta_tilde.
        eps_hat is recomputed from the (clipped) x_0_hat so that the two agree.
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        if cond_fn is not None:
            pred_x_0, _ = self.condition_score(cond_fn, p, x_t, t, model_kwargs)
        else:
            pred_x_0 = p["pred_x_0"]
        xt = x_t.to(pred_x_0.dtype)
        eps = self.predict_eps_from_x_0(xt, t, pred_x_0)
        ab, ab_prev = _gather(self.alpha_bar, t, xt), _gather(self.alpha_bar_prev, t, xt)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = ab_prev.sqrt() * pred_x_0 + torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
        z = torch.randn_like(xt)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return {"sample": (mean + nonzero * sigma * z).to(x_t.dtype), "pred_x_0": pred_x_0}

    def sample_steps(self, model, shape, steps=None, eta=None, noise=None, model_kwargs=None,
                     progress=False, clip_denoised=True, cond_fn=None, device=None):
        """Yield {"sample", "pred_x_0", "t"} after each reverse step, from x_T ~ N(0, I) to x_0.

        steps: None runs all T steps; k runs k evenly spaced steps (`respace`).
        eta: None is ancestral sampling (`p_sample`); a number is DDIM with that eta.
        noise: optional x_T of shape `shape`; otherwise drawn from the global torch RNG.
        """
        diffusion = self.respace(steps)
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        x = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
        K = diffusion.num_timesteps
        for k, i in enumerate(reversed(range(K))):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                if eta is None:
                    out = diffusion.p_sample(model, x, t, clip_denoised, cond_fn, model_kwargs)
                else:
                    out = diffusion.ddim_sample(model, x, t, eta, clip_denoised, cond_fn, model_kwargs)
            x = out["sample"]
            if progress and (k + 1 == K or (k + 1) % max(1, K // 50) == 0):
                print(f"\rsampling: step {k + 1}/{K}", end="\n" if k + 1 == K else "", file=sys.stderr, flush=True)
            yield {**out, "t": t}

    def sample(self, model, shape, steps=None, eta=None, noise=None, model_kwargs=None,
               progress=False, clip_denoised=True, cond_fn=None, device=None):
        """Generate x_0 of `shape` (Ho algorithm 2; see `sample_steps` for the options)."""
        out = None
        for out in self.sample_steps(model, shape, steps, eta, noise, model_kwargs, progress,
                                     clip_denoised, cond_fn, device):
            pass
        return out["sample"]

    # --- losses and the variational bound ---

    def vb_terms_bpd(self, p, x_0, x_t, t):
        """The VLB term of step t in bits/dim, shape (B,) (Ho eq. 5):
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (code index), and
        L_0 = -log p(x_0 | x_1) with the discretized Gaussian decoder (Ho eq. 13) at code t = 0.
        `p` is the dict of `model_output_to_mean_variance`.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_0, p["mean"], 0.5 * p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,) (Ho eq. 5); ~0 for a good schedule."""
        t = torch.full((x_0.shape[0],), self.num_timesteps - 1, device=x_0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_0, t)
        return normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).mean(1) / math.log(2.0)

    def training_losses(self, model, x_0, t, noise=None, model_kwargs=None):
        """Per-example losses at steps t, each (B,); "loss" is the one to minimise.

        simple: L_simple = ||target - model(x_t, t)||^2, mean over pixels (Ho eq. 14; target eps,
            x_0 or v). With learned_range only the first C channels enter it.
        hybrid: L_simple + lambda L_vlb, lambda = 0.001 (Improved DDPM eq. 16). L_vlb = sum_t L_t
            is estimated as T L_t, so the term is T / 1000 L_t. The mean output is detached
            inside it, so L_vlb trains only the variance (Improved DDPM section 3.1).
        vlb: T L_t (Ho eq. 5, one-sample estimate of the sum); the caller may reweight it for
            importance sampling (Improved DDPM eq. 18).
        x_0: (B, C, H, W) in [-1, 1]; t: (B,) long in 0..T-1.
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        out = model(x_t, self.timestep_map.to(x_0.device)[t], **(model_kwargs or {}))
        dtype = torch.promote_types(x_0.dtype, torch.float32)
        out, x_0f, x_tf = out.to(dtype), x_0.to(dtype), x_t.to(dtype)
        C, T = x_0.shape[1], self.num_timesteps
        terms = {}
        if self.loss_type in ("hybrid", "vlb"):
            frozen = out
            if self.loss_type == "hybrid":
                frozen = torch.cat([out[:, :C].detach(), out[:, C:]], 1) if out.shape[1] > C else out.detach()
            p = self.model_output_to_mean_variance(frozen, x_tf, t, clip_denoised=False)
            terms["vb"] = self.vb_terms_bpd(p, x_0f, x_tf, t) * (T / 1000.0 if self.loss_type == "hybrid" else T)
        if self.loss_type in ("simple", "hybrid"):
            target = self.training_target(x_0f, t, noise.to(dtype))
            terms["mse"] = ((target - out[:, :C]) ** 2).flatten(1).mean(1)
        terms["loss"] = terms.get("mse", 0) + terms.get("vb", 0)
        return terms

    def calc_bpd(self, model, x_0, model_kwargs=None):
        """The full VLB in bits/dim, per example (Ho eq. 5, all T + 1 terms):
        -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0. Returns {"bpd", "prior_bpd", "vb"} with
        "bpd" and "prior_bpd" (B,) and "vb" (B, T). Costs T model evaluations; never clips x_0.
        """
        B, T = x_0.shape[0], self.num_timesteps
        vb = []
        for i in range(T):
            t = torch.full((B,), i, device=x_0.device, dtype=torch.long)
            x_t = self.q_sample(x_0, t)
            with torch.no_grad():
                p = self.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            dtype = p["mean"].dtype
            vb.append(self.vb_terms_bpd(p, x_0.to(dtype), x_t.to(dtype), t))
        vb = torch.stack(vb, 1)                                               # (B, T)
        prior = self.prior_bpd(x_0.to(vb.dtype))
        return {"bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb}
