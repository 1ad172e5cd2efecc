"""Patch parallelism: one latent in row bands over the ranks (patch, patch-sync, pcpp).

- `bands`: the band plan (rows per rank at every resolution level);
- `context`: PatchContext, the per-rank state the swapped layers consult;
- `conv`, `groupnorm`, `attention` + `kv`: the patch-aware layers (halo convs, GroupNorm
  with global statistics, self-attention over the bands' K/V);
- `unet`, `dit`, `vae`, `backbones`: installing them into a diffusers model; `split`: the
  split of the denoiser input and the gather of its output;
- `compiled`: torch.compile of the denoiser with the layers installed.
"""
