"""Mutation testing of the model files' formula functions: a developer tool, not part of CI.

Each mutant is one small change to one function that implements a formula (a swapped operator, a
shifted comparison, a changed constant, a dropped term or call, swapped arguments, a return value
replaced by an input); the file's fast test subset runs against it, and a mutant that no test
fails "survives". The kill rate measures whether the tests pin the maths (issue 26).

    python bench/mutation.py                       # every file in TARGETS
    python bench/mutation.py vae.py dalle.py       # some files
    python bench/mutation.py vae.py --function VAE.iwae_bound --list   # the mutants, not run
    python bench/mutation.py vqvae.py --show-excluded                  # run the equivalents too

It needs no package beyond pytest (mutmut and cosmic-ray need a network install and rewrite the
files on disk; this runner mutates in memory). The parent process imports torch and pytest once;
each mutant runs in a fork that compiles the mutated module into sys.modules under the file's
name and calls pytest.main on the subset with -x, so a run costs the tests' time, not an import
of torch. A mutant whose tests exceed the timeout (an endless loop) counts as killed. Run it with
OMP_NUM_THREADS=1 on a shared machine; -j runs several forks at once.

What is not mutated: docstrings and other strings, input checks (an `if` whose body only raises,
`raise` and `assert` statements), progress messages (an `if` whose body only prints), calls that
only change dtype or copy (`.float()`, `.clone()`, ...: equivalent on the fp32 CPU tests), swaps
of arguments that commute (`x.transpose(1, 2)`, `F.mse_loss(a, b)`) or are equal, and functions
not listed in TARGETS (network layers whose exact form no paper fixes). Mutants known to be
equivalent are listed in EQUIVALENT with the reason; they are reported but not counted. A
--sample is drawn before the equivalents are dropped, so a before/after pair sees the same
mutants.
"""

import argparse
import ast
import copy
import os
import select
import signal
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# file -> formula functions (qualified names) and the fast test subset (pytest arguments).
TARGETS = {
    "vae.py": {
        "functions": ["discretized_gaussian_log_likelihood", "gaussian_kl", "DAE.corrupt",
                      "VAE.set_progress", "VAE.encode", "VAE.reconstruct", "VAE.log_px_given_z",
                      "VAE.elbo_terms", "VAE.loss", "VAE.iwae_bound", "VAE.evaluate",
                      "VAE.sample", "AE.loss", "AE.evaluate", "AE.reconstruct"],
        "tests": ["tests/test_vae_values.py", "tests/test_vae.py",
                  "--deselect", "tests/test_vae.py::test_presets_build_and_paper_count"],
    },
    "vqvae.py": {
        "functions": ["down_shift", "gate", "sampling_labels", "VectorQuantizer.distances",
                      "VectorQuantizer.lookup", "VectorQuantizer.restart_dead_codes",
                      "VectorQuantizer.ema_update", "VectorQuantizer._quantize",
                      "GatedLayer.forward", "GatedPixelCNN.label_cond", "VQVAE.loss",
                      "VQVAE.evaluate", "VQVAE.sample", "VQVAE.decode", "sample_codes"],
        "tests": ["tests/test_vqvae_values.py", "tests/test_vqvae.py",
                  "--deselect", "tests/test_vqvae.py::test_presets_build_on_meta"],
    },
    # The quantiser, GatedLayer, sample_codes, ... are checked copies of vqvae.py's
    # (tests/test_copies.py keeps them identical), so they are mutated there, not here.
    "vqvae2.py": {
        "functions": ["CausalSelfAttention.forward", "PixelCNNPrior.condition",
                      "PixelCNNPrior.forward_embedded", "PixelCNNPrior.sample",
                      "VQ2Autoencoder.decode", "VQ2Autoencoder.forward", "VQVAE2.decode",
                      "VQVAE2.loss", "VQVAE2.evaluate", "VQVAE2.sample"],
        "tests": ["tests/test_vqvae2_values.py", "tests/test_vqvae2.py",
                  "--deselect", "tests/test_vqvae2.py::test_presets_build_on_meta"],
    },
    "dalle.py": {
        "functions": ["cosine_ramp", "map_pixels", "unmap_pixels", "logit_laplace_nll",
                      "discretized_logit_laplace_nll", "logit_normal_nll", "filter_logits",
                      "DiscreteVAE.pixel_nll", "DiscreteVAE.encode_tokens",
                      "DiscreteVAE.decode_tokens", "DALLETransformer.embed_image",
                      "DALLETransformer.forward", "DALLE.set_progress", "DALLE.dvae_loss",
                      "DALLE.transformer_loss", "DALLE.reconstruct", "DALLE.generate_tokens"],
        "tests": ["tests/test_dalle_values.py", "tests/test_dalle.py",
                  "--deselect", "tests/test_dalle.py::test_dalle_12b_preset_has_12_billion_parameters",
                  "--deselect", "tests/test_dalle.py::test_tiny_pixel_likelihood_lets_a_minority_colour_through"],
    },
    "ddpm.py": {
        "functions": ["make_beta_schedule", "normal_kl", "discretized_gaussian_log_likelihood",
                      "space_timesteps", "GaussianDiffusion.__init__", "GaussianDiffusion.respace",
                      "GaussianDiffusion.q_sample", "GaussianDiffusion.q_mean_variance",
                      "GaussianDiffusion.q_posterior_mean_variance",
                      "GaussianDiffusion.predict_x_0_from_eps", "GaussianDiffusion.predict_eps_from_x_0",
                      "GaussianDiffusion.predict_x_0_from_v", "GaussianDiffusion.training_target",
                      "GaussianDiffusion.model_output_to_mean_variance",
                      "GaussianDiffusion.p_mean_variance", "GaussianDiffusion.condition_mean",
                      "GaussianDiffusion.condition_score", "GaussianDiffusion.p_sample",
                      "GaussianDiffusion.ddim_sample", "GaussianDiffusion.sample_steps",
                      "GaussianDiffusion.vb_terms_bpd", "GaussianDiffusion.prior_bpd",
                      "GaussianDiffusion.training_losses", "GaussianDiffusion.calc_bpd",
                      "timestep_embedding", "DDPM._importance_probs", "DDPM._update_history",
                      "DDPM.loss", "DDPM.evaluate"],
        "tests": ["tests/test_ddpm_values.py", "tests/test_ddpm.py",  # slow or off-topic tests deselected
                  "--deselect", "tests/test_ddpm.py::test_paper_presets_have_the_papers_parameter_counts",
                  "--deselect", "tests/test_ddpm.py::test_loss_falls_when_overfitting_one_batch",
                  "--deselect", "tests/test_ddpm.py::test_bf16_autocast_keeps_diffusion_maths_fp32",
                  "--deselect", "tests/test_ddpm.py::test_cli_train_sample_eval",
                  "--deselect", "tests/test_ddpm.py::test_group_norm_keeps_half_inputs_in_their_dtype_with_float32_statistics",
                  "--deselect", "tests/test_ddpm.py::test_sample_compile_gives_the_eager_images",
                  "--deselect", "tests/test_ddpm.py::test_attention_hands_sdpa_channel_contiguous_inputs",
                  "--deselect", "tests/test_ddpm.py::test_channels_last_trains_and_samples_as_the_default_layout"],
    },
    # GaussianDiffusion and the schedule helpers are checked copies of ddpm.py's: mutated there.
    "guided.py": {
        "functions": ["timestep_embedding", "tokenize", "ClassifierFreeGuidance.forward",
                      "classifier_cond_fn", "clip_cond_fn", "NoisyClassifier.loss",
                      "NoisyClassifier.evaluate", "ADM.training_kwargs", "ADM.loss",
                      "ADM.conditions", "ADM.sample", "GLIDE.loss", "GLIDE.sample"],
        "tests": ["tests/test_guided_values.py", "tests/test_guided.py",  # slow or off-topic tests deselected
                  "--deselect", "tests/test_guided.py::test_unet_presets_have_the_released_parameter_counts",
                  "--deselect", "tests/test_guided.py::test_classifier_presets_have_the_released_parameter_counts",
                  "--deselect", "tests/test_guided.py::test_adm_and_classifier_losses_fall",
                  "--deselect", "tests/test_guided.py::test_cli_train_and_guided_sampling",
                  "--deselect", "tests/test_guided.py::test_cli_glide_two_phases",
                  "--deselect", "tests/test_guided.py::test_attention_hands_sdpa_channel_contiguous_inputs"],
    },
    "unclip.py": {
        "functions": ["resize", "slerp", "top_half", "cfg_combine", "DiffusionPrior.forward",
                      "DiffusionPrior.loss", "DiffusionPrior.sample", "ARPrior.fit",
                      "ARPrior.project", "ARPrior.unproject", "ARPrior.quantize",
                      "ARPrior.dequantize", "ARPrior.encode", "ARPrior.decode", "ARPrior.loss",
                      "ARPrior.sample", "Decoder.forward", "Decoder.loss", "Decoder.self_condition",
                      "Decoder.guided_model",
                      "gaussian_kernel", "blur", "Upsampler.loss", "UnCLIP.sample_prior",
                      "UnCLIP.decode", "UnCLIP.ddim_invert", "UnCLIP.interpolate", "UnCLIP.text_diff",
                      "UnCLIP.evaluate"],
        "tests": ["tests/test_unclip_values.py", "tests/test_unclip.py",  # slow or off-topic tests deselected
                  "--deselect", "tests/test_unclip.py::test_decoder_trains_on_the_data_sets_own_rendering",
                  "--deselect", "tests/test_unclip.py::test_bad_configs_are_reported",
                  "--deselect", "tests/test_unclip.py::test_paper_presets_counts_on_meta",
                  "--deselect", "tests/test_unclip.py::test_cli_trains_every_part_and_samples"],
    },
    "clip.py": {
        "functions": ["CLIP.encode_image", "CLIP.encode_text_tokens", "CLIP.encode_text",
                      "CLIP.scale", "CLIP.forward", "CLIP.loss", "CLIP.caption_targets",
                      "CLIP.rank_captions", "CLIP.retrieval_accuracy", "CLIP.evaluate",
                      "CLIP.zero_shot_classifier", "CLIP.zero_shot_classify"],
        "tests": ["tests/test_clip_values.py", "tests/test_clip.py",  # slow or off-topic tests deselected
                  "--deselect", "tests/test_clip.py::test_loss_falls_when_overfitting_one_batch",
                  "--deselect", "tests/test_clip.py::test_bpe_tokenizer",
                  "--deselect", "tests/test_clip.py::test_bpe_model_needs_enough_ids",
                  "--deselect", "tests/test_clip.py::test_vit_b_32_preset_matches_openai_on_meta_device",
                  "--deselect", "tests/test_clip.py::test_load_openai_round_trip",
                  "--deselect", "tests/test_clip.py::test_load_openai_bad_inputs",
                  "--deselect", "tests/test_clip.py::test_cli_trains_resumes_and_evaluates",
                  "--deselect", "tests/test_clip.py::test_cli_captionless_folder_is_a_one_line_error"],
    },
}

# Mutants that compute the same thing as the original (or differ only where no input can reach),
# keyed "file: function: before -> after" as --list prints them. Each says why it is equivalent.
EQUIVALENT = {
    "vae.py: VAE.loss: [D = x[0].numel()] 0 -> 1":
        "D from image 1 instead of image 0: every image of a batch has the same size",
    "vae.py: VAE.evaluate: [D = x[0].numel()] 0 -> 1":
        "as in VAE.loss",
    "dalle.py: filter_logits: [if top_k is not None and top_k < logits.shape[-1]:] "
    "top_k < logits.shape[-1] -> top_k <= logits.shape[-1]":
        "top_k == V keeps every logit either way: the k-th largest is the smallest, none is below",
    "dalle.py: filter_logits: [if top_k is not None and top_k < logits.shape[-1]:] -1 -> 1":
        "logits are (B, V): shape[1] is shape[-1]",
    "dalle.py: filter_logits: [probs = sorted_logits.softmax(-1)] -1 -> 1":
        "sorted_logits are (B, V): dim 1 is dim -1",
    "dalle.py: DALLE.generate_tokens: [return torch.multinomial(logits.softmax(-1), 1)] -1 -> 1":
        "logits are (n, V): dim 1 is dim -1",
    # 8-bit data never sits exactly on +-0.999 (the nearest values are +-1 and +-(1 - 2/255))
    "vae.py: discretized_gaussian_log_likelihood: [return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, l] x < -0.999 -> x <= -0.999":
        "8-bit data: no pixel value is exactly -0.999",
    "vae.py: discretized_gaussian_log_likelihood: [return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, l] x > 0.999 -> x >= 0.999":
        "8-bit data: no pixel value is exactly 0.999",
    "ddpm.py: discretized_gaussian_log_likelihood: [return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, lo] x < -0.999 -> x <= -0.999":
        "8-bit data: no pixel value is exactly -0.999",
    "ddpm.py: discretized_gaussian_log_likelihood: [return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, lo] x > 0.999 -> x >= 0.999":
        "8-bit data: no pixel value is exactly 0.999",
    "ddpm.py: timestep_embedding: [half = dim // 2] dim // 2 -> dim / 2":
        "the same for an even dim, and every caller passes one (the U-Net's ch); arange(4.0) is "
        "arange(4)",
    "guided.py: classifier_cond_fn: [log_p = classifier(x, t).float().log_softmax(-1)] -1 -> 1":
        "the classifier's logits are (B, classes): dim 1 is dim -1",
    "guided.py: ADM.training_kwargs: [drop = torch.rand(B, device=dev) < c.p_uncond] "
    "torch.rand(B, device=dev) < c.p_uncond -> torch.rand(B, device=dev) <= c.p_uncond":
        "a uniform draw equals p_uncond with probability 0",
    "guided.py: ADM.training_kwargs: [kw['y'] = torch.where(drop | (y < 0), torch.full_like(y, "
    "c.num_classes] c.p_uncond > 0 -> c.p_uncond >= 0":
        "differs only for unknown labels (-1) in a model trained without condition dropout, which "
        "has no null label to map them to (its data must be fully labelled)",
    "guided.py: ADM.sample: [if progress is None:] progress is None -> progress is not None":
        "decides only whether a step counter is printed to stderr",
    "clip.py: CLIP.zero_shot_classify: [z_i = F.normalize(self.encode_image(image), dim=-1)] -1 -> 1":
        "image features are (B, D): dim 1 is dim -1",
    "unclip.py: Decoder.self_condition: [use = torch.rand(x_0.shape[0], device=x_0.device) < p] "
    "torch.rand(x_0.shape[0], device=x_0.device) < p -> torch.rand(x_0.shape[0], device=x_0.device) <= p":
        "a uniform draw equals p with probability 0",
    "unclip.py: slerp: [near = dot > 1 - 1e-05] dot > 1 - 1e-05 -> dot >= 1 - 1e-05":
        "at dot == 1 - 1e-5 exactly both branches agree to float precision",
    "ddpm.py: GaussianDiffusion.ddim_sample: [return {'sample': (mean + nonzero * sigma * z).to(x_t.dtype), "
    "'pred_x_] nonzero * sigma -> sigma":
        "at t = 0 alpha_bar_prev is exactly 1, so sigma is exactly 0 there without the mask",
    "guided.py: GLIDE.sample: [guidance_scale = 1.0] 1.0 -> 2.0":
        "without a prompt both halves of the guided batch are the empty caption: eps_u + s (eps_c - "
        "eps_u) is eps_u for any s",
    "clip.py: CLIP.forward: [z_i = F.normalize(self.encode_image(image), dim=-1)] -1 -> 1":
        "image features are (B, D): dim 1 is dim -1",
    "clip.py: CLIP.forward: [z_t = F.normalize(self.encode_text(text), dim=-1)] -1 -> 1":
        "text features are (B, D): dim 1 is dim -1",
    "clip.py: CLIP.encode_text: [x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] -1 -> 1":
        "token ids are (B, L): dim 1 is dim -1",
    "clip.py: CLIP.encode_text: [tokens = self.tokenize(text, trim=True) if isinstance(text, (str, list] "
    "True -> False":
        "trim only drops padding after every end token: the causal Transformer's output at the end "
        "token does not see it",
    "clip.py: CLIP.caption_targets: [return (self.tokenize(distinct, truncate=True, trim=True), target)] "
    "True -> False #2":
        "trim: as in CLIP.encode_text",
    "clip.py: CLIP.rank_captions: [return self(image, self.tokenize(captions, truncate=truncate, trim=Tru] "
    "True -> False":
        "trim: as in CLIP.encode_text",
    "unclip.py: slerp: [if theta.dim() == 0:] theta.dim() == 0 -> theta.dim() != 0":
        "the expand changes nothing: theta broadcasts against w (..., 1) with or without it",
    "unclip.py: blur: [x = F.conv2d(F.pad(x, (p, p, 0, 0), mode='reflect'), k.view(1, 1, 1, -] "
    "k.view(1, 1, 1, -1) -> k":
        "k.repeat(C, 1, 1, 1) of the (size,) kernel is (C, 1, 1, size), what the view gives",
    "unclip.py: Upsampler.loss: [if c < u.image_size:] c < u.image_size -> c <= u.image_size":
        "at c == image_size the drawn crop is (0, 0) and the whole image; only the RNG stream moves",
    "guided.py: ADM.sample: [progress = sys.stderr.isatty()] sys.stderr.isatty() -> sys.stderr":
        "decides only whether a step counter is printed to stderr",
    "unclip.py: resize: [if x.shape[-1] == size and x.shape[-2] == size:] -2 -> 2":
        "images are (B, C, H, W): dim 2 is dim -2",
    "unclip.py: slerp: [dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-07, 1 - 1e-07)] 1 -> 2 #3":
        "a dot above 1 - 1e-5 takes the linear branch: the upper clamp only guards the discarded one",
    "unclip.py: slerp: [if theta.dim() == 0:] 0 -> 1":
        "a 0-d theta then skips the expand, which changes nothing (see dim() != 0); a 1-d theta "
        "broadcastable to (..., 1) has one element, and expanding it changes nothing either",
    "unclip.py: slerp: [theta = theta.expand(*a.shape[:-1], 1)] theta.expand(*a.shape[:-1], 1) -> theta":
        "the expand changes nothing: theta broadcasts against w (..., 1) with or without it",
    "unclip.py: slerp: [dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-07, 1 - 1e-07)] "
    "1 - 1e-07 -> 1 + 1e-07":
        "a dot above 1 - 1e-5 takes the linear branch: the upper clamp only guards the discarded one "
        "(slerp runs under no_grad, so the discarded branch's NaN never reaches a gradient)",
    "unclip.py: slerp: [dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-07, 1 - 1e-07)] 1 - 1e-07 -> 1":
        "the upper clamp: as for 1 + 1e-07",
    "unclip.py: ARPrior.fit: [comps = comps * sign] comps * sign -> comps / sign":
        "sign is +1 or -1: dividing by it is multiplying by it",
    "unclip.py: ARPrior.quantize: [return ((y - lo) / (hi - lo) * n).floor().clamp(0, n - 1).long()] "
    "((y - lo) / (hi - lo) * n).floor() -> (y - lo) / (hi - lo) * n":
        "after clamp(0, n - 1) the values are >= 0, where .long()'s truncation is the floor",
    "unclip.py: UnCLIP.interpolate: [z_theta = slerp(z[:1].expand(n, -1), z[1:].expand(n, -1), theta)] "
    "z[1:].expand(n, -1) -> z[1:]":
        "slerp broadcasts the (1, D) end against the (n, D) one",
    "clip.py: CLIP.loss: [return {'loss': (loss_i2t + loss_t2i) / 2, 'loss_i2t': loss_i2t, 'loss] "
    "self.scale().detach() -> self.scale()":
        "the logged logit scale: detach changes no value, and only 'loss' is backpropagated",
    "clip.py: CLIP.zero_shot_classify: [return (self.scale() * z_i @ weights.T).softmax(dim=-1)] -1 -> 1":
        "the logits are (B, K): dim 1 is dim -1",
    "guided.py: GLIDE.sample: [if upsample_temp != 1.0:] 1.0 -> 2.0":
        "at temperature 1 the x_T drawn here (times 1) is the draw the upsampler makes itself",
    "vqvae.py: VectorQuantizer.restart_dead_codes: [dist.broadcast(candidates, 0)] 0 -> 1":
        "not equivalent but unreachable here: it runs only under torch.distributed (the tests "
        "run one process); rank 0's candidates are the ones every rank must share",
    "vqvae.py: GatedLayer.forward: [h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[..., :W]] 0 -> 1":
        "one more column of padding on the right, which [..., :W] crops away",
}

# calls whose removal only changes dtype, memory layout or aliasing: equivalent in fp32 on the CPU
NEUTRAL_METHODS = {"float", "double", "contiguous", "clone", "to", "cpu", "cuda", "item",
                   "tolist", "detach_"}
# calls whose two arguments can be swapped without changing the result (x.transpose(1, 2) is
# x.transpose(2, 1)): their "swap args" mutants are equivalent by construction, so not made
SYMMETRIC_CALLS = {"transpose", "swapaxes", "swapdims", "maximum", "minimum", "logaddexp",
                   "mse_loss"}  # (a - b)^2: the same value and the same gradients
MODULE_NAMES = {"torch", "F", "math", "nn", "dist"}

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv,
              ast.MatMult: ast.Mult}
SHIFT_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
             ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
             ast.In: ast.NotIn, ast.NotIn: ast.In}
FLIP_CMP = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}


# --- mutants ---


def _is_print(stmt):
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "print")


def _is_guard(stmt):
    """An input check, `if cond: raise ...`, or a progress message, `if cond: print(...)`."""
    return isinstance(stmt, ast.If) and (all(isinstance(s, ast.Raise) for s in stmt.body)
                                         or all(_is_print(s) for s in stmt.body))


def _skipped(node):
    return (isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)) or _is_guard(node)
            or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)))


def _sites(func):
    """Nodes of a function body to mutate, in a fixed order (nested functions included)."""
    out = []

    def visit(node):
        if _skipped(node):
            return
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.arguments, ast.expr_context)) or child in decorators:
                continue
            visit(child)

    decorators = set(func.decorator_list)
    for stmt in func.body:
        visit(stmt)
    return out


def _params(func):
    names = [a.arg for a in func.args.posonlyargs + func.args.args]
    return [n for n in names if n != "self"]


def _mutations(node, func):
    """(label, replacement node) for each mutant of one node; the node itself is left alone."""
    c = copy.deepcopy
    out = []
    if isinstance(node, ast.BinOp):
        if type(node.op) in SWAP_BINOP:
            out.append(("swap op", ast.BinOp(c(node.left), SWAP_BINOP[type(node.op)](), c(node.right))))
        if isinstance(node.op, ast.Mult):  # a dropped weight, on either side
            out += [("drop right", c(node.left)), ("drop left", c(node.right))]
        elif isinstance(node.op, (ast.Add, ast.Sub, ast.Div, ast.Pow)):  # a dropped term
            out.append(("drop right", c(node.left)))
    elif isinstance(node, ast.AugAssign) and type(node.op) in SWAP_BINOP:
        out.append(("swap op", ast.AugAssign(c(node.target), SWAP_BINOP[type(node.op)](), c(node.value))))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(("drop unary", c(node.operand)))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1:
        op = type(node.ops[0])
        if op in SHIFT_CMP:
            out.append(("shift cmp", ast.Compare(c(node.left), [SHIFT_CMP[op]()], c(node.comparators))))
        if op in FLIP_CMP:
            out.append(("flip cmp", ast.Compare(c(node.left), [FLIP_CMP[op]()], c(node.comparators))))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("swap boolop", ast.BoolOp(other, c(node.values))))
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
        v = node.value
        if isinstance(v, bool):
            out.append(("flip bool", ast.Constant(not v)))
        elif isinstance(v, (int, float)):
            out.append(("const+1", ast.Constant(v + 1)))
    elif isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute):
            base = f.value
            is_module = (isinstance(base, ast.Name) and base.id in MODULE_NAMES) or (
                isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
                and base.value.id == "torch")
            is_self = isinstance(base, ast.Name) and base.id == "self" or (
                isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
                and base.value.id == "self" and not node.args)
            if is_module and node.args:
                out.append(("drop call", c(node.args[0])))
            elif not is_module and not is_self and f.attr not in NEUTRAL_METHODS:
                out.append(("drop method", c(base)))
        symmetric = isinstance(f, ast.Attribute) and f.attr in SYMMETRIC_CALLS
        same = len(node.args) >= 2 and ast.dump(node.args[-1]) == ast.dump(node.args[-2])
        if len(node.args) == 2 and not symmetric and not same:
            out.append(("swap args", ast.Call(c(f), [c(node.args[1]), c(node.args[0])], c(node.keywords))))
        elif len(node.args) >= 3 and not same:  # (swapping two equal arguments changes nothing)
            a = c(node.args)
            a[-1], a[-2] = a[-2], a[-1]
            out.append(("swap args", ast.Call(c(f), a, c(node.keywords))))
    elif isinstance(node, ast.Return) and node.value is not None:
        for p in _params(func)[:1]:
            if not (isinstance(node.value, ast.Name) and node.value.id == p):
                out.append(("return input", ast.Return(ast.Name(p, ast.Load()))))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("drop statement", ast.Pass()))
    elif isinstance(node, ast.AugAssign):
        out.append(("drop statement", ast.Pass()))
    return out


def find_function(tree, qualname):
    scope = tree
    for part in qualname.split("."):
        for node in scope.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part:
                scope = node
                break
        else:
            raise KeyError(f"no function {qualname}")
    return scope


def _replace(root, old, new):
    for parent in ast.walk(root):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if v is old:
                        value[i] = new
                        return
    raise ValueError("node not found")


def mutants(path, functions):
    """[(function, site index, mutation index, label, before, after)] of a file."""
    tree = ast.parse(path.read_text())
    out, seen = [], {}
    for q in functions:
        func = find_function(tree, q)
        parent = {c: n for n in ast.walk(func) for c in ast.iter_child_nodes(n)}
        for i, node in enumerate(_sites(func)):
            stmt = node
            while not isinstance(stmt, ast.stmt):
                stmt = parent[stmt]
            where = ast.unparse(stmt).splitlines()[0][:70]
            for j, (label, new) in enumerate(_mutations(node, func)):
                before = ast.unparse(node).splitlines()[0][:90]
                after = ast.unparse(new).splitlines()[0][:90] if not isinstance(new, ast.Pass) else "pass"
                if stmt is not node:  # name the statement, so equal snippets stay apart
                    before = f"[{where}] {before}"
                n = seen[q, before, after] = seen.get((q, before, after), 0) + 1
                if n > 1:  # the same change again in the same statement: number it
                    after = f"{after} #{n}"
                out.append((q, i, j, label, before, after, getattr(node, "lineno", 0)))
    return out


def mutated_tree(path, q, i, j):
    tree = ast.parse(path.read_text())
    func = find_function(tree, q)
    node = _sites(func)[i]
    new = _mutations(node, func)[j][1]
    _replace(tree, node, ast.copy_location(new, node))
    return ast.fix_missing_locations(tree)


# --- running ---


def _child(path, tree, tests, log):
    """In the fork: install the mutated module, run the tests, exit with pytest's status."""
    sys.dont_write_bytecode = True
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import pytest
    name = path.stem
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    sys.modules[name] = mod
    exec(compile(tree, str(path), "exec"), mod.__dict__)
    os._exit(pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "--no-header",
                          "-o", "addopts="]))


def start(path, tree, tests, log):
    pid = os.fork()
    if pid == 0:
        try:
            _child(path, tree, tests, log)
        finally:
            os._exit(99)
    return pid


def _cpu_seconds(pid, wall):
    """CPU seconds a child has used (Linux /proc), else its wall time: a timeout on CPU time
    does not fire for a mutant that a loaded or deprioritised machine merely starves."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return wall


def run_all(path, jobs, tests, timeout, n_jobs, log_dir):
    """jobs: [(key, tree)] -> {key: 'killed' | 'survived' | 'timeout'}."""
    results, running, queue = {}, {}, list(jobs)
    while queue or running:
        while queue and len(running) < n_jobs:
            key, tree = queue.pop(0)
            log = log_dir / f"{len(results) + len(running)}.log"
            running[start(path, tree, tests, log)] = (key, time.time())
        time.sleep(0.05)
        for pid, (key, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                results[key] = "survived" if code == 0 else "killed"
                del running[pid]
            elif _cpu_seconds(pid, time.time() - t0) > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[key] = "timeout"
                del running[pid]
    return results


def key_of(file, m):
    q, _, _, _, before, after, _ = m
    return f"{file}: {q}: {before} -> {after}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help=f"model files (default: {', '.join(TARGETS)})")
    p.add_argument("--function", action="append", help="only this function (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants, do not run them")
    p.add_argument("--show-excluded", action="store_true", help="run the known equivalents too")
    p.add_argument("--timeout", type=float, default=None, help="CPU seconds per mutant (default: "
                   "10 x the unmutated run, at least 60)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once")
    p.add_argument("--sample", type=int, default=0, help="run a random sample of this many "
                   "mutants per file (an estimate of the kill rate, for quick before/after checks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--exclude-tests", action="append", default=[], metavar="SUBSTRING",
                   help="drop the subset's test files containing this (e.g. _values.py, to "
                   "measure the suite without the value tests)")
    p.add_argument("--tests", nargs="+", help="pytest arguments instead of the file's subset")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch  # noqa: F401  (imported once here, inherited by every fork)
    import pytest  # noqa: F401
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"mutation_{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for file in args.files or list(TARGETS):
        spec, path = TARGETS[file], ROOT / file
        tests = args.tests or spec["tests"]
        kept = []
        for i, t in enumerate(tests):  # drop missing or excluded test files, keep options
            is_value = i > 0 and tests[i - 1] in ("-k", "--deselect")
            if (t.startswith("-") or (is_value and not t.startswith("tests/"))
                    or Path(t.split("::")[0]).exists() and not any(x in t for x in args.exclude_tests)):
                kept.append(t)
            elif is_value and kept and kept[-1] == tests[i - 1]:
                kept.pop()  # a --deselect of a dropped file
        tests = kept
        ms = mutants(path, args.function or spec["functions"])
        if args.sample and args.sample < len(ms):
            import random
            ms = sorted(random.Random(f"{args.seed}{file}").sample(ms, args.sample),
                        key=ms.index)
        # sampled before the equivalents are dropped, so that a sample stays the same set of
        # mutants when EQUIVALENT grows (before/after comparisons need the same mutants)
        excluded = [m for m in ms if key_of(file, m) in EQUIVALENT]
        if not args.show_excluded:
            ms = [m for m in ms if key_of(file, m) not in EQUIVALENT]
        if args.list:
            for m in ms:
                print(f"{file}:{m[6]} {m[3]:14} {key_of(file, m)}")
            print(f"{file}: {len(ms)} mutants ({len(excluded)} equivalent excluded)")
            continue
        t0 = time.time()
        base = run_all(path, [("base", ast.parse(path.read_text()))], tests, 1e9, 1, log_dir)
        t_base = time.time() - t0
        if base["base"] != "survived":
            sys.exit(f"{file}: the tests fail on the unmutated file; see {log_dir}/0.log")
        timeout = args.timeout or max(60.0, 10 * t_base)  # generous: a loaded machine is slow
        print(f"{file}: {len(ms)} mutants, unmutated tests {t_base:.1f}s, timeout {timeout:.0f}s",
              flush=True)
        print(f"  tests: {' '.join(tests)}", flush=True)
        jobs = [(m, mutated_tree(path, m[0], m[1], m[2])) for m in ms]
        results = {}
        for k in range(0, len(jobs), 10):  # in slices, to print progress
            part = run_all(path, jobs[k:k + 10], tests, timeout, args.jobs, log_dir)
            results.update(part)
            for m in (m for m, r in part.items() if r == "survived"):  # as soon as known
                print(f"  survived: {key_of(file, m)}", flush=True)
            done = len(results)
            killed = sum(r != "survived" for r in results.values())
            print(f"  {done}/{len(jobs)} run, {killed} killed ({time.time() - t0:.0f}s)", flush=True)
        survivors = [m for m in ms if results[m] == "survived"]
        for m in survivors:
            note = "  [equivalent]" if key_of(file, m) in EQUIVALENT else ""
            print(f"  SURVIVED {file}:{m[6]} {m[3]:14} {key_of(file, m)}{note}")
        n = len(ms)
        killed = n - len(survivors)
        summary.append(f"{file}: {killed}/{n} killed ({100 * killed / max(n, 1):.1f}%), "
                       f"{len(survivors)} survived, {len(excluded)} equivalent excluded, "
                       f"{sum(r == 'timeout' for r in results.values())} timeouts, "
                       f"{time.time() - t0:.0f}s")
        print(summary[-1], flush=True)
    if summary:
        print("\n".join(["", "summary:"] + summary))


if __name__ == "__main__":
    main()
