"""How ranks come to exist: local spawn (`local`), torchrun (SPMD, in-process), the CLI."""
