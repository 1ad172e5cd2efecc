"""What one rank runs per request, delegating to its strategy (`parallel.registry`).

- `image`: RankRuntime (serial, row bands, asg tiles) and `make_runtime`, which picks the
  video runtime for a causal video model;
- `video`: the stream runtime (`none` on one rank, `tpp` over the ranks);
- `decode`: latents to images, serially or as row bands over the ranks.

Import the modules themselves (`engine.runtime.image.make_runtime`): importing this package
stays light (the results module needs only the decode helpers).
"""
