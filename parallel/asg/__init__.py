"""Asynchronous structure guidance (ASG): high-resolution generation beyond the native size.

After ASGDiffusion (Li et al., "ASGDiffusion: Parallel High-Resolution Generation with
Asynchronous Structure Guidance", 2024). The high-resolution (HR) latent is covered by
native-size tiles with overlap (`parallel.asg.tiles.TileGrid`); every denoiser call

1. (on guided steps, w > 0) runs a *structure branch*: the same denoiser on a global view of the HR latent at native
   size (nearest-neighbour subsampling, which keeps the per-pixel noise level that area
   averaging would shrink). Its noise prediction, upsampled to HR, is the guidance `G`; the
   branch's attention probabilities from image locations to the prompt's own tokens
   (cross-attention, or joint attention's image-to-text part; not the start token,
   not padding), averaged over heads and layers at native size, min-max normalised per
   image and lifted by a floor (`M = floor + (1 - floor) * map`), are the mask `M` in
   [0, 1] (strongest where the layout is decided by the prompt), upsampled where applied;
2. denoises every tile at native size and averages the tiles where they overlap
   (MultiDiffusion: sum / coverage count), giving `eps`;
3. guides it: `eps <- eps + w(t) * M * up(G - down(eps))`, where `down` picks the same latent
   pixels the branch saw and `up` is bilinear. This is ASGDiffusion's
   `eps_i + w M_i (G_i - eps_i)` with the difference taken on the branch's grid: both
   predictions there are of the same noisy pixels, so their difference is structure, not
   noise. Pulling eps towards a smooth upsampled G itself (measured on shapes-sd at 2x)
   erases the per-pixel noise prediction and leaves noise in the image. Averaging before
   guiding is the same as guiding each tile and averaging (the guidance is linear and
   global).

`w(t)` (`guidance_weight`): `strength * (1 + cos(pi * k / K)) / 2` at step k < K =
steps - detail_steps, strong at high noise, falling to zero; zero in the last
`detail_steps` steps, where tiles refine detail on their own. The schedule counts denoiser
calls (`GuidanceSchedule`): a second-order scheduler such as Heun calls the denoiser
twice per step but the last, the cosine runs over the calls, and the detail steps stay
whole steps. With CFG the same `w * M` applies to both halves, so by linearity the guided
prediction is guided by the branch's guided prediction.

- `tiles`: the tile grid and, for a parallel run, what each tile rank exchanges;
- `guidance`: the plan of a request, the guidance schedule, the attention-mass recorder and
  the structure mask;
- `denoiser`: the single-process reference of the algorithm (one rank computes all tiles
  and the branch) and the multi-rank one (tile ranks plus a branch rank). Both wrap the
  denoiser's forward for one request, so the unmodified diffusers pipeline and any
  elementwise scheduler run at the HR size;
- `control`: a request's ControlNet, deferred by the pipeline's call and run per tile (and on
  the branch's view) by the wrapped denoiser.
"""


from parallel.asg.denoiser import ParallelStructureGuidedTiles, StructureGuidedTiles, structure_guided
from parallel.asg.guidance import (ASG_PIPELINES, AttentionMassRecorder, GuidanceSchedule, RecordingOrOriginal,
                                   asg_plan, denoiser_calls, guidance_weight, prompt_token_spans, structure_mask,
                                   text_attention_layers)
from parallel.asg.tiles import TileGrid, TilePlan

__all__ = ["ASG_PIPELINES", "AttentionMassRecorder", "GuidanceSchedule", "ParallelStructureGuidedTiles",
           "RecordingOrOriginal", "StructureGuidedTiles", "TileGrid", "TilePlan", "asg_plan", "denoiser_calls",
           "guidance_weight", "prompt_token_spans", "structure_guided", "structure_mask", "text_attention_layers"]
